"""``apimart-async``: the command line, built on the public API only.

Exit codes: 0 everything completed, 1 some jobs failed or errored, 2 bad input or usage,
130 interrupted with work left (the summary prints the command that resumes it).
The API key comes from ``APIMART_API_KEY``, ``--api-key-file PATH``, ``--api-key -`` (stdin)
or ``--api-key KEY``, and is never printed: a resume line names ``APIMART_API_KEY`` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

# Start-up (issue 16): `--help` and usage errors import no more than argparse and this
# module. ``apimart_async`` is lazy (a name's module is imported on its first use), and the
# client, aiohttp, anyio, the emulator and the gallery are imported by the commands that use
# them (tests/test_cli.py::test_help_and_usage_errors_import_no_aiohttp).
import apimart_async as am

from ._errors import UsageError as UsageError
from ._json import is_array, is_object

if TYPE_CHECKING:
    from ._jobsfile import JobCheck
    from ._journal import RunLock

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

JOBS_SCHEMA = """\
jobs file:
  JSONL  one JSON object per line (blank lines and lines starting with # are skipped):
           {"name": "neon-cat", "model": "sora-2-preview", "prompt": "a neon cat",
            "duration": 8, "aspect_ratio": "portrait"}
         keys: model (required), name (file name of the video; default: the line's index),
         prompt, image_urls, video_urls, duration, resolution, aspect_ratio, seed,
         extend_from_task_id, webhook, and extra: {...} for fields this SDK does not model
         (sent as given). For a model listed by `apimart-async models`, any other key is an
         error ("did you mean ..."); for other models, other keys are sent as written.
  CSV    a header row with the same names; image_urls and video_urls hold URLs separated
         by |; duration and seed are integers; extra holds a JSON object; empty cells are
         left unset.
  A model name within 2 edits of a known one is refused as a likely typo unless
  --allow-unknown-model. Errors name the file and the 1-based line: jobs.jsonl:3: ...
"""

RUN_EPILOG = (
    JOBS_SCHEMA
    + """
outcomes: completed (video ready), failed (the service ran it and the generation failed),
errored (it never ran to the end here: refused, lost, timed out, download failed),
not started (stopped before its turn: Ctrl-C, --max-cost).
Re-running the same command resumes: nothing finished is paid for twice, refused submits are
sent again, --retry-failed also resubmits failed generations (billed again).
"""
)

KEY_HELP = (
    "no API key: set APIMART_API_KEY, or pass --api-key-file PATH or --api-key - (read from"
    " stdin); --emulate runs against the built-in emulator, --base-url points at a running"
    " `apimart-async emulator`"
)


# -- output ---------------------------------------------------------------------------------


class Ui:
    """Where and how things are printed: a live line on a terminal (stderr), plain lines
    elsewhere; ``-q`` keeps only errors and the summary, ``-v`` adds every step."""

    def __init__(
        self,
        *,
        stream: TextIO,
        quiet: bool = False,
        verbose: int = 0,
        progress: bool = True,
        color: str = "auto",
        tty: bool | None = None,
    ) -> None:
        self.stream = stream
        self.tty: bool = stream.isatty() if tty is None else tty
        self.quiet = quiet
        self.verbose = verbose
        self.live: bool = self.tty and progress
        if color == "auto":
            self.color: bool = self.tty and not os.environ.get("NO_COLOR")
        else:
            self.color = color == "always"
        self._status = ""
        self._last = 0.0

    def paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def line(self, text: str, *, level: str = "info") -> None:
        """A line above the live status. ``level``: error (always), info (not with -q),
        detail (off a terminal, or with -v)."""
        if level == "info" and self.quiet:
            return
        if level == "detail" and (self.quiet or (self.live and not self.verbose)):
            return
        if self.live and self._status:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text + "\n")
        if self.live and self._status:
            self.stream.write(self._status)
        self.stream.flush()

    def status(self, text: str, *, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        self._status = text
        self.stream.write("\r\x1b[2K" + text)
        self.stream.flush()

    def close(self) -> None:
        if self.live and self._status:
            self.stream.write("\r\x1b[2K" + self._status + "\n")
            self.stream.flush()
            self._status = ""


class _LogToUi(logging.Handler):
    """The SDK's log records (a Ctrl-C notice, retries with -v) as lines above the bar."""

    def __init__(self, ui: Ui) -> None:
        super().__init__()
        self.ui = ui

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad record never breaks the run
            return
        level = "error" if record.levelno >= logging.WARNING else "info"
        self.ui.line(f"{record.levelname.lower()}: {text}", level=level)


def outcome_kind(outcome: am.Outcome) -> str:
    """One vocabulary everywhere: completed, failed, errored, not started."""
    if outcome.ok:
        return "completed"
    if isinstance(outcome.error, am.TaskFailedError):
        return "failed"
    if isinstance(outcome.error, am.BatchStoppedError):
        return "not started"
    return "errored"


def _default_label(index: int, name: str | None) -> str:
    return name or f"job {index}"


class Progress:
    """Counts of one run, a live bar on a terminal, and a line per job event."""

    def __init__(
        self,
        total: int,
        stream: TextIO,
        *,
        tty: bool | None = None,
        ui: Ui | None = None,
        labels: Callable[[int, str | None], str] | None = None,
        emit_json: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.total = total
        self.ui: Ui = ui or Ui(stream=stream, tty=tty)
        self.labels: Callable[[int, str | None], str] = labels or _default_label
        self.emit_json = emit_json
        self.submitted: int = 0
        self.counts: dict[str, int] = {"completed": 0, "failed": 0, "errored": 0, "not started": 0}
        self.replayed: int = 0
        #: Errored jobs that never became a task: a re-run sends them again.
        self.no_task: int = 0
        #: Errored jobs whose task completed and was paid for, files not all here (the
        #: journal keeps them open: a resume fetches the rest).
        self.to_download: int = 0
        #: Task ids of errored jobs (a wait ended by an error: the task may still run, and
        #: ``pending_task_ids()`` lists it too; the summary counts it once, as errored).
        self.errored_tasks: set[str] = set()
        self.cost: float = 0.0  # this run only: replayed outcomes were paid for earlier
        self.earlier_cost: float = 0.0
        #: Jobs whose task an earlier run submitted (and paid for), with its id: followed
        #: again or their files fetched now, their cost is the earlier run's.
        self.paid_earlier: dict[int, str] = {}
        self.started: float = time.monotonic()
        #: Distinct local reference files of the run, and the batch's upload counts.
        self.files: int = 0
        self.uploads: am.UploadStats | None = None

    @property
    def completed(self) -> int:
        return self.counts["completed"]

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def event(self, event: am.BatchEvent) -> None:
        if event.kind == "submitted":
            self.submitted += 1
            label = self.labels(event.index, None)
            self.ui.line(f"submitted {label} as {event.task_id}", level="detail")
            if self.emit_json is not None:
                self.emit_json(
                    {"event": "submitted", "index": event.index, "task_id": event.task_id}
                )
        self.draw()

    def outcome(self, outcome: am.Outcome) -> None:
        kind = outcome_kind(outcome)
        self.counts[kind] += 1
        cost = outcome.task.cost if outcome.task is not None and outcome.task.cost else 0.0
        if outcome.replayed:
            self.replayed += 1
            self.earlier_cost += cost
        elif (
            outcome.task_id is not None and self.paid_earlier.get(outcome.index) == outcome.task_id
        ):
            self.earlier_cost += cost
        else:
            self.cost += cost
        label = self.labels(outcome.index, outcome.name)
        earlier = " (earlier run)" if outcome.replayed else ""
        if kind == "completed":
            files = " ".join(f.path for f in outcome.files)
            text = f"completed {label} {outcome.task_id} {files}".rstrip() + earlier
            self.ui.line(self.ui.paint(text, "32") if not earlier else text, level="detail")
        elif kind == "failed":
            task_error = outcome.task.error if outcome.task is not None else None
            reason = task_error.message if task_error is not None else str(outcome.error)
            text = f"failed {label} {outcome.task_id}: {reason}{earlier}"
            self.ui.line(self.ui.paint(text, "31"), level="error")
        elif kind == "not started":
            self.ui.line(f"not started {label}: {outcome.error}", level="detail")
        else:
            error = outcome.error
            if (
                outcome.task_id is None
                and not outcome.replayed
                and not isinstance(error, (am.JournalMismatchError, am.ValidationError))
            ):
                self.no_task += 1
            if outcome.task_id is not None:
                self.errored_tasks.add(outcome.task_id)
            task = outcome.task
            if task is not None and task.ok:  # completed, its files not fetched (any error)
                self.to_download += 1
            what = type(error).__name__ if error is not None else "error"
            text = f"errored {label}: {what}: {error}{earlier}"
            self.ui.line(self.ui.paint(text, "31"), level="error")
        if self.emit_json is not None:
            self.emit_json(
                {
                    "event": kind.replace(" ", "_"),
                    "index": outcome.index,
                    "name": outcome.name,
                    "task_id": outcome.task_id,
                    "cost": outcome.task.cost if outcome.task is not None else None,
                    "files": [f.path for f in outcome.files],
                    "error": str(outcome.error) if outcome.error is not None else None,
                    "error_type": type(outcome.error).__name__ if outcome.error else None,
                    "replayed": outcome.replayed,
                }
            )
        self.draw(force=True)

    def bar(self) -> str:
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        elapsed = time.monotonic() - self.started
        eta = ""
        if 0 < self.done < self.total:
            secs = int(elapsed / self.done * (self.total - self.done))
            eta = f" ETA {secs // 60}:{secs % 60:02d}"
        running = max(0, self.submitted - (self.done - self.replayed - self.counts["not started"]))
        c = self.counts
        u = self.uploads
        if u is not None and self.files and u.uploaded + u.reused + u.failed < self.files:
            # The upload phase: each distinct local file is uploaded before its first job.
            phase = f"uploads {u.uploaded + u.reused}/{self.files}"
            phase += f" ({u.uploading} now)" if u.uploading else ""
            return f"{phase} | {self.done}/{self.total} submitted {self.submitted}"
        return (
            f"[{'#' * filled}{'-' * (width - filled)}] {self.done}/{self.total} "
            f"running {running} completed {c['completed']} failed {c['failed']} "
            f"errored {c['errored']} ${self.cost:.2f}{eta}"
        )

    def draw(self, force: bool = False) -> None:
        self.ui.status(self.bar(), force=force)

    def close(self) -> None:
        self.draw(force=True)
        self.ui.close()


# -- helpers --------------------------------------------------------------------------------


def _looks_like_a_key(value: str) -> bool:
    """Whether a command-line value that should be a path looks like an API key (``sk-``
    and a long run of key characters, no folder): then it is never printed back."""
    return re.fullmatch(r"sk-[A-Za-z0-9_-]{8,}", value) is not None


def _read_key(args: argparse.Namespace) -> str | None:
    if getattr(args, "_key", None) is not None:
        return str(args._key)
    key: str | None
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            # The value is not repeated: it may be the key itself, given to the wrong flag.
            raise UsageError(
                "--api-key-file: cannot read it: no such file (the value is not shown, in case"
                " it is a key; this flag takes the path of a file holding the key)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise UsageError(
                f"--api-key-file: cannot read {args.api_key_file} ({reason})"
            ) from None
        if not key:
            raise UsageError(f"--api-key-file: {args.api_key_file} is empty")
    elif args.api_key == "-":
        key = sys.stdin.readline().strip()
        if not key:
            raise UsageError("--api-key -: no key on standard input")
    else:
        key = args.api_key or os.environ.get("APIMART_API_KEY")
    args._key = key
    return key


def _key(args: argparse.Namespace) -> str:
    key = _read_key(args)
    if not key:
        raise UsageError(KEY_HELP)
    return key


def emulator_state_path(journal: Path) -> Path:
    """Where ``run --emulate`` keeps the emulator's state: next to the journal, so Ctrl-C
    and a re-run resume against the same tasks, as they would at the real service."""
    return journal.parent / (journal.stem + ".emulator-state.jsonl")


@contextlib.asynccontextmanager
async def _client(
    args: argparse.Namespace, *, emulator_state: Path | None = None
) -> AsyncGenerator[am.AsyncApimart, None]:
    if args.emulate:
        if args.base_url:
            raise UsageError("--emulate and --base-url: give one or the other")
        from .emulator import Emulator

        emu = Emulator(task_duration=(1.0, 3.0), state_path=emulator_state)
        async with emu, am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client:
            yield client
        return
    async with am.AsyncApimart(_key(args), base_url=args.base_url) as client:
        yield client


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False, indent=None), flush=True)


def _task_dict(task: am.Task) -> dict[str, Any]:
    return {
        "id": task.id,
        "status": str(task.status.value)
        if task.status is not am.TaskStatus.UNKNOWN
        else task.raw_status,
        "progress": task.progress,
        "cost": task.cost,
        "video_urls": list(task.video_urls),
        "error": task.error.message if task.error else None,
    }


def _missing_dict(task_id: str) -> dict[str, Any]:
    return {"id": task_id, "status": "not_found", "error": "does not exist or has expired"}


_SECRET_FLAGS = ("--api-key",)


def resume_command(argv: Sequence[str]) -> list[str]:
    """The command line that resumes a run, without the key: ``--api-key KEY`` and
    ``--api-key=KEY`` are left out (the user exports APIMART_API_KEY instead); a
    ``postgresql://`` journal's password too (PGPASSWORD gives it)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _SECRET_FLAGS:
            skip = True
            continue
        if any(arg.startswith(flag + "=") for flag in _SECRET_FLAGS):
            continue
        out.append(_without_password(arg))
    return ["apimart-async", *out]


def _without_password(arg: str) -> str:
    """``arg`` with the password of a ``postgresql://`` URL in it (``--journal=URL`` too)
    left out."""
    from ._pg_journal import is_postgres_url, redact_url

    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if not is_postgres_url(value):
        return arg
    shown = redact_url(value)
    return flag + eq + (shown.replace(":***@", "@") if ":***@" in shown else shown)


def _resume_text(argv: Sequence[str], args: argparse.Namespace) -> str:
    line = " ".join(shlex.quote(a) for a in resume_command(argv))
    if args.journal and any(_without_password(a) != a for a in argv):
        line += "\n  (the journal's password is left out: set PGPASSWORD, or put it back)"
    if args.emulate:
        return line
    if args.api_key and not args.api_key_file:
        return (
            f"{line}\n  (set APIMART_API_KEY to your key first;"
            " a key given as a flag is not repeated)"
        )
    if args.api_key_file:
        return line
    return f"{line}\n  (with APIMART_API_KEY set as it is now)"


def _label_for(jobs: Sequence[am.JobLine]) -> Callable[[int, str | None], str]:
    def label(index: int, name: str | None) -> str:
        if 0 <= index < len(jobs):
            job = jobs[index]
            return job.name or f"line {job.line}"
        return name or f"job {index}"

    return label


def _kind(request: am.VideoRequest) -> tuple[Any, ...]:
    return (request.model, request.duration, request.resolution)


def _kind_text(kind: tuple[Any, ...]) -> str:
    model, duration, resolution = kind
    parts = [model] + ([f"{duration} s"] if duration else []) + ([resolution] if resolution else [])
    return " ".join(parts)


async def _journal_records(journal: Path | am.PostgresJournal) -> dict[int, am.JobRecord]:
    if isinstance(journal, am.PostgresJournal):
        # read only, without the batch's lock, as a file (ruff takes it for Path.read...)
        return await journal.read()  # noqa: ASYNC240
    return await _file_records(journal)


async def _file_records(path: Path) -> dict[int, am.JobRecord]:
    from ._threads import run_sync

    if not await run_sync(path.is_file):
        return {}
    # read only, without the journal's lock: a dry run may look while a batch runs
    return await run_sync(am.SqliteJournal.read, path)


def _learn_price(
    prices: dict[tuple[Any, ...], float], record: am.JobRecord, request: am.VideoRequest
) -> None:
    """What the journal's ``record`` of ``request`` paid, as the price of its kind (the SDK
    has no price list; the highest seen)."""
    if record.cost and record.fingerprint == request.fingerprint():
        k = _kind(request)
        prices[k] = max(prices.get(k, 0.0), record.cost)


def _submitted(record: am.JobRecord, request: am.VideoRequest, *, retry_failed: bool) -> bool:
    """Whether the journal's ``record`` of ``request`` keeps it from being submitted again
    (failed ones are, with ``retry_failed``)."""
    return (
        record.state in ("done", "downloading", "pending")
        and record.fingerprint == request.fingerprint()
        and not (retry_failed and record.status in ("failed", "cancelled"))
    )


def _add_uploads(files: dict[str, am.LocalFile], job: am.JobLine | JobCheck) -> None:
    """The job's local images, by content, first path kept (videos go as data: URIs)."""
    for f in job.files:
        if f.kind == "image":
            files.setdefault(f.sha256, f)


def _estimate(
    jobs: Sequence[am.JobLine], records: dict[int, am.JobRecord], indexes: Sequence[int]
) -> tuple[float, list[tuple[Any, ...]]]:
    """Estimated cost of ``indexes`` from the prices the journal has seen (the SDK has no
    price list): the sum for kinds of known price and the kinds of unknown price."""
    prices: dict[tuple[Any, ...], float] = {}
    for rec in records.values():
        if 0 <= rec.index < len(jobs):
            _learn_price(prices, rec, jobs[rec.index].request)
    total = 0.0
    unknown: list[tuple[Any, ...]] = []
    for i in indexes:
        k = _kind(jobs[i].request)
        if k in prices:
            total += prices[k]
        elif k not in unknown:
            unknown.append(k)
    return total, unknown


def _cost_text(total: float, unknown: list[tuple[Any, ...]]) -> str:
    if not unknown:
        return f"${total:.2f}"
    kinds = ", ".join(_kind_text(k) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
    known = f"${total:.2f} plus " if total else ""
    return f"{known}unknown (no price seen yet for {kinds}; --max-cost caps the spend)"


def _whole_at_least_1(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse names the flag)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _seconds_above_0(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _at_least_0(text: str) -> float:
    """argparse type: a number >= 0 (``inf`` allowed; not ``nan``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _check_out(out: Path, flag: str = "--out") -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag}: {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot create {out} ({exc.strerror})") from None


# -- commands -------------------------------------------------------------------------------


OUT_LOCK = ".apimart-run.lock"
"""The lock file of a run's output directory, beside the videos (issue 14)."""


async def cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``run``: one run per output directory, as per journal (the lock of the journal, taken
    by the batch, guards it; that of the directory, taken here, guards the videos' ``.part``
    files, the manifest and the gallery when two runs have different journals)."""
    held: list[RunLock] = []
    try:
        return await _cmd_run(args, argv, held)
    finally:
        for lock in held:
            lock.release()


class _Tally:
    """What ``run`` tells of a jobs file before sending anything, gathered job by job as the
    file streams past (issue 16: nothing per job is kept, so memory stays flat in the file's
    size): the jobs, by model; those ``records`` (a journal) do not hold as submitted, by
    kind (model, duration, resolution); the prices the journal has seen, by kind; the
    distinct local files to upload."""

    def __init__(self, records: dict[int, am.JobRecord], *, retry_failed: bool) -> None:
        self.records = records
        self.retry_failed = retry_failed
        self.jobs = 0
        self.models: dict[str, int] = {}
        self.todo = 0
        self.todo_kinds: dict[tuple[Any, ...], int] = {}
        self.prices: dict[tuple[Any, ...], float] = {}
        self.uploads: dict[str, am.LocalFile] = {}

    def add(self, job: JobCheck) -> None:
        index = self.jobs
        self.jobs += 1
        self.models[job.model] = self.models.get(job.model, 0) + 1
        kind = (job.model, job.duration, job.resolution)  # _kind
        record = self.records.get(index) if self.records else None
        if record is not None:
            request = job.request
            assert request is not None  # check_jobs(requests=True) when there are records
            _learn_price(self.prices, record, request)
            if _submitted(record, request, retry_failed=self.retry_failed):
                return
        self.todo += 1
        self.todo_kinds[kind] = self.todo_kinds.get(kind, 0) + 1
        if job.files:
            _add_uploads(self.uploads, job)

    def estimate(self) -> tuple[float, list[tuple[Any, ...]]]:
        """As ``_estimate``: the cost of the jobs to submit, and the kinds of unknown price."""
        total = sum(self.prices[k] * n for k, n in self.todo_kinds.items() if k in self.prices)
        return total, [k for k in self.todo_kinds if k not in self.prices]


def _read_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "allow_unknown_model": args.allow_unknown_model,
        "media_root": args.media_root,
        "allow_any_path": args.allow_any_path,
    }


def _check_pass(
    args: argparse.Namespace, records: dict[int, am.JobRecord], *, warn: bool
) -> _Tally:
    """One pass over the jobs file (streamed: no list of jobs), every line checked; prints
    the warnings of its lines with ``warn``. Raises JobsFileError listing every bad line."""
    from ._jobsfile import check_jobs

    tally = _Tally(records, retry_failed=args.retry_failed)
    # the requests only to match the journal's records (their fingerprints)
    for job in check_jobs(args.jobs, **_read_options(args), requests=bool(records)):
        tally.add(job)
        if warn:
            for note in job.warnings:
                args.ui.line(f"warning: {args.jobs}:{job.line}: {note}", level="error")
    return tally


def _pg_journal(
    args: argparse.Namespace, fingerprints: list[str] | None = None
) -> am.PostgresJournal | None:
    """The ``PostgresJournal`` of ``--journal postgresql://...`` (batch ``--name``, default the
    jobs file's stem; ``--schema``), or None for a journal file (where --name and --schema
    are refused)."""
    from ._pg_journal import is_url

    if not is_url(args.journal):  # a URL this SDK cannot use is refused by PostgresJournal
        if args.name is not None or args.schema is not None:
            raise UsageError("--name and --schema are for a --journal postgresql://... only")
        return None
    name = args.name if args.name is not None else Path(args.jobs).stem
    if args.schema is None:
        return am.PostgresJournal(args.journal, name=name, fingerprints=fingerprints)
    return am.PostgresJournal(
        args.journal, name=name, schema=args.schema, fingerprints=fingerprints
    )


def _file_part(name: str) -> str:
    """``name`` as part of a file name (anything but letters, digits, ``.``, ``_``, ``-``
    becomes ``_``)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in name)


def _journal_text(journal: Path | am.PostgresJournal) -> str:
    """The journal, for the summary (a PostgreSQL URL without its password)."""
    if isinstance(journal, Path):
        return str(journal)
    return f"{journal.url} (batch {journal.name}, schema {journal.schema})"


def _jobs_file_error(exc: am.JobsFileError) -> int:
    print(
        f"error: {len(exc.problems)} problem(s) in {exc.path}; nothing was submitted",
        file=sys.stderr,
    )
    print(str(exc), file=sys.stderr)
    return EXIT_USAGE


async def _cmd_run(args: argparse.Namespace, argv: Sequence[str], held: list[RunLock]) -> int:
    ui = args.ui
    if _looks_like_a_key(args.jobs) and not Path(args.jobs).exists():  # noqa: ASYNC240
        # brk16h: the key given where the path goes was printed back in the error
        raise UsageError(
            "the jobs file does not exist (the value is not shown: it looks like an API key;"
            " run takes the path of a JSONL or CSV jobs file)"
        )
    try:
        # every line is checked before anything is sent, the file streamed (issue 16)
        tally = _check_pass(args, {}, warn=True)
    except am.JobsFileError as exc:
        return _jobs_file_error(exc)
    if args.out is None and not args.dry_run:
        raise UsageError("-o/--out DIR is required (where the videos, manifest and journal go)")
    out = Path(args.out) if args.out is not None else None
    journal: Path | am.PostgresJournal | None
    pg = _pg_journal(args)
    if pg is not None:
        journal = pg
    elif args.journal:
        journal = Path(args.journal)
    elif out is not None:
        journal = out / (
            ".apimart-journal-emulated.sqlite" if args.emulate else ".apimart-journal.sqlite"
        )
    else:
        journal = None
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} is a file, not a directory")
    records = await _journal_records(journal) if journal is not None else {}
    if args.dry_run:
        if records:  # which jobs the journal holds: another streaming pass
            try:
                tally = _check_pass(args, records, warn=False)
            except am.JobsFileError as exc:  # the file changed meanwhile
                return _jobs_file_error(exc)
        return _dry_run(args, tally)
    try:  # the jobs, for the batch, its gallery and journal (a second pass)
        jobs = am.read_jobs(args.jobs, **_read_options(args))
    except am.JobsFileError as exc:  # the file changed meanwhile
        return _jobs_file_error(exc)
    assert out is not None
    assert journal is not None
    if pg is not None:  # with the whole list: a different one under this name is refused
        pg = _pg_journal(args, [j.request.fingerprint() for j in jobs])
        assert pg is not None
        journal = pg
    _check_out(out)
    from ._journal import RunLock

    held.append(RunLock.acquire(out, what="output directory", lock_file=out / OUT_LOCK))
    retry_note = ""
    if args.retry_failed:
        failed = [
            r.index
            for r in records.values()
            if r.state == "done"
            and r.status in ("failed", "cancelled")
            and 0 <= r.index < len(jobs)
            and r.fingerprint == jobs[r.index].request.fingerprint()
        ]
        if failed:
            total, unknown = _estimate(jobs, records, failed)
            cost = _cost_text(total, unknown)
            retry_note = f"{len(failed)} failed job(s) submitted again, estimated {cost}"
            ui.line(f"--retry-failed: {retry_note}", level="info")
    if args.emulate and isinstance(journal, am.PostgresJournal):
        ui.line(
            "warning: --emulate runs an emulator in this worker only: the tasks of the batch's"
            " other workers are unknown to it (a job taken over from a worker that died ends in"
            " NotFoundError); for a fleet, run 'apimart-async emulator' once and give every"
            " worker its --base-url",
            level="error",
        )
    emit_json = _print_json if args.as_json else None
    progress = Progress(len(jobs), sys.stderr, ui=ui, labels=_label_for(jobs), emit_json=emit_json)
    progress.paid_earlier = {
        r.index: r.task_id
        for r in records.values()
        if r.task_id is not None and r.state in ("pending", "downloading")
    }
    todo = _todo(jobs, records, retry_failed=args.retry_failed)
    progress.files = len(_files_to_upload(jobs, todo))  # the images this run may upload
    media_roots = [Path(args.jobs).parent, *(args.media_root or ())]  # as read_jobs allowed
    items = [(j.name, j.request) if j.name else j.request for j in jobs]
    from . import report

    gallery = report.LiveGallery(out, [(j.name, j.request) for j in jobs])

    def on_event(event: am.BatchEvent) -> None:
        progress.event(event)
        gallery.event(event)

    # the emulator's state beside the journal; for one in PostgreSQL, in --out by batch name
    beside = journal if isinstance(journal, Path) else out / f".apimart-{_file_part(journal.name)}"
    mine: set[int] = set()  # the jobs this run handed out (a worker's share, issue 15)
    state = emulator_state_path(beside) if args.emulate else None
    async with _client(args, emulator_state=state) as client, gallery:
        async with (
            client.batch(
                items,
                concurrency=args.concurrency,
                max_pending=args.max_pending,
                max_cost=args.max_cost,
                journal=journal,
                download_dir=out,
                sigint_grace=args.grace if _sigint_reaches() else None,
                retry_failed=args.retry_failed,
                on_event=on_event,
                media_root=media_roots,
                allow_any_path=args.allow_any_path,
                lease=args.lease,
            ) as results,
            _sigterm_as_ctrl_c(results._on_sigint),
        ):
            progress.uploads = results.uploads
            async for outcome in results:
                mine.add(outcome.index)
                if isinstance(outcome.error, am.JournalMismatchError):
                    line = jobs[outcome.index] if outcome.index < len(jobs) else None
                    what = _changed_text(line, records.get(outcome.index))
                    ui.line(
                        f"error: {args.jobs}:{line.line if line else '?'}: {what}, and its job"
                        " already has a task; restore it, or use another --journal to run it as"
                        " a new job",
                        level="error",
                    )
                progress.outcome(outcome)
                gallery.outcome(outcome)
        # Left early (Ctrl-C, a stop): jobs that ended as the batch was left, among them files
        # cut off mid-download (paid for: a resume fetches the rest), were not read above.
        for outcome in results.unread():
            mine.add(outcome.index)
            progress.outcome(outcome)
            gallery.outcome(outcome)
        progress.close()
        running = len(set(results.pending_task_ids()) - progress.errored_tasks)
        # submits cut off before their reply: a task may exist (brk16h: counted as running)
        unconfirmed = len(results.unconfirmed_submissions())
    seen = progress.done
    elsewhere, completed_elsewhere = await _ended_elsewhere(journal, mine)
    left = running + unconfirmed + elsewhere
    not_started = progress.counts["not started"] + max(0, len(jobs) - seen - left)
    c = progress.counts
    everything_ended = not (not_started or running or unconfirmed or progress.to_download)
    interrupted = bool(results.interrupted) and not everything_ended
    resume = _resume_text(argv, args) if interrupted else None
    summary = {
        "jobs": len(jobs),
        "completed": c["completed"],
        "failed": c["failed"],
        "errored": c["errored"],
        "not_started": not_started,
        "running": running,
        "unconfirmed": unconfirmed,
        "to_download": progress.to_download,
        "replayed": progress.replayed,
        "cost": round(progress.cost, 6),
        "earlier_cost": round(progress.earlier_cost, 6),
        "uploads": results.uploads.uploaded,
        "uploads_reused": results.uploads.reused,
        "files": str(out),
        "manifest": str(out / "manifest.jsonl"),
        "journal": _journal_text(journal),
        "gallery": str(gallery.path),
        "resume": resume.splitlines()[0] if resume else None,
    }
    if isinstance(journal, am.PostgresJournal) and journal.shared:
        summary["other_workers"] = elsewhere
    if args.as_json:
        _print_json({"event": "summary", **summary})
    else:
        rows = [
            ("jobs", str(len(jobs))),
            ("completed", str(c["completed"])),
            ("failed", str(c["failed"])),
            ("errored", str(c["errored"])),
            ("not started", str(not_started)),
        ]
        if elsewhere:
            rows.append(("elsewhere", f"{elsewhere} ended by other workers of the batch"))
        if running:
            rows.append(("running", f"{running} (at the service; a resume picks them up)"))
        if unconfirmed:
            rows.append(
                (
                    "unconfirmed",
                    f"{unconfirmed} submit(s) cut off before their reply: a task may exist; a"
                    " resume sends each again with its key (never billed twice)",
                )
            )
        if progress.no_task:
            rows.append(
                (
                    "to retry",
                    f"{progress.no_task} errored job(s) never became a task:"
                    " re-running the same command sends them again",
                )
            )
        if progress.to_download:
            rows.append(
                (
                    "to download",
                    f"{progress.to_download} errored job(s) completed and were paid for, their"
                    " files not all here: re-running the same command fetches them",
                )
            )
        if progress.replayed:
            rows.append(("replayed", f"{progress.replayed} (finished in earlier runs)"))
        cost = f"${progress.cost:.2f}"
        if progress.earlier_cost:
            cost += f" (earlier runs: ${progress.earlier_cost:.2f})"
        rows.append(("cost", cost))
        if any(j.files for j in jobs):  # the file names local files
            u = results.uploads
            made = f"{u.uploaded} made ({_size_text(u.bytes_uploaded)}), {u.reused} reused"
            rows.append(("uploads", made + " (from earlier runs)" * bool(u.reused)))
        if retry_note:
            rows.append(("retried", retry_note))
        rows += [("files", str(out)), ("manifest", str(out / "manifest.jsonl"))]
        rows.append(("journal", _journal_text(journal)))
        rows.append(("gallery", str(gallery.path)))
        print("\n" + "\n".join(f"{k:<12}{v}" for k, v in rows))
    if gallery.error is not None:
        ui.line(f"warning: {gallery.error}", level="error")
    if interrupted:
        print(f"\ninterrupted; resume with:\n  {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if c["completed"] + completed_elsewhere == len(jobs) else EXIT_FAILED


def _sigint_reaches() -> bool:
    """Whether Ctrl-C can reach this process: not when it was started with SIGINT ignored
    (a shell's background job, nohup, some service managers); then ``run`` asks for no
    Ctrl-C handling (and says nothing about it)."""
    import signal

    return signal.getsignal(signal.SIGINT) is not signal.SIG_IGN


@contextlib.asynccontextmanager
async def _sigterm_as_ctrl_c(callback: Callable[[], None]) -> AsyncGenerator[None, None]:
    """SIGTERM (a service manager, a CI time limit, a spot machine's notice, ``kill``) stops
    ``run`` as Ctrl-C does: a worker of a batch lets go of its jobs at once, and the resume
    line is printed. Left alone where SIGTERM already has a handler, or off the main thread."""
    import asyncio
    import signal
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, callback)
    except (NotImplementedError, RuntimeError, ValueError):  # this loop cannot
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _ended_elsewhere(journal: Path | am.PostgresJournal, mine: set[int]) -> tuple[int, int]:
    """Issue 15: the jobs of a batch run by workers that others ended (not handed out by this
    run), and how many of them completed; (0, 0) for a batch run by one process."""
    if not isinstance(journal, am.PostgresJournal) or not journal.shared:
        return 0, 0
    records = await journal.read()  # noqa: ASYNC240 - not a path: the journal's read
    done = [r for i, r in records.items() if r.state == "done" and i not in mine]
    return len(done), sum(r.status == "completed" for r in done)


async def cmd_report(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import webbrowser

    from . import report
    from ._threads import run_sync

    out = Path(args.dir)
    source = Path(args.journal) if args.journal else out / "manifest.jsonl"
    try:
        path = await run_sync(report.write_gallery, source, out)
    except (report.GalleryError, am.JournalError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.as_json:
        _print_json({"path": str(path)})
    else:
        print(path)
    if args.open:
        uri = path.resolve().as_uri()
        try:
            opened = webbrowser.open(uri)
        except webbrowser.Error:
            opened = False
        if not opened:  # no browser here (a server, no DISPLAY): say so rather than nothing
            print(f"no browser could be opened; open {uri} yourself", file=sys.stderr)
    return EXIT_OK


def _size_text(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size / 1024 / 1024:.1f} MB"


def _changed_text(job: am.JobLine | None, record: am.JobRecord | None) -> str:
    """Why a line no longer matches its job in the journal: a local file it names (its content
    changed, or it is at another path: the folder moved) when the rest is as recorded."""
    from ._references import _canonical_hash as canonical_file

    line = "this line changed since the journal recorded it"
    if job is None or not job.files or record is None or record.request is None:
        return line
    then, now = dict(record.request), json.loads(json.dumps(job.request.to_body()))
    notes: list[str] = []
    for field in ("image_urls", "video_urls"):
        old, new = then.pop(field, []), now.pop(field, [])
        if not is_array(old) or not is_array(new) or len(old) != len(new):
            return line
        for i, (was, is_) in enumerate(zip(old, new, strict=True)):
            if was == is_:
                continue
            before, after = canonical_file(str(was)), canonical_file(str(is_))
            if before is None or after is None:
                return line
            if before[0] == after[0]:
                notes.append(f"{after[0]} changed since the journal recorded this line")
            else:
                notes.append(
                    f"{field}[{i}] is now {after[0]}, was {before[0]} when the journal recorded"
                    " this line"
                )
    return notes[0] if notes and then == now else line


def _todo(
    jobs: Sequence[am.JobLine], records: dict[int, am.JobRecord], *, retry_failed: bool
) -> list[int]:
    """The lines the journal has not submitted yet (or failed ones, with ``retry_failed``)."""
    done = {
        r.index
        for r in records.values()
        if 0 <= r.index < len(jobs)
        and _submitted(r, jobs[r.index].request, retry_failed=retry_failed)
    }
    return [i for i in range(len(jobs)) if i not in done]


def _files_to_upload(jobs: Sequence[am.JobLine], todo: Sequence[int]) -> list[am.LocalFile]:
    """The distinct local files (by content) the jobs still to submit need, first path kept."""
    files: dict[str, am.LocalFile] = {}
    for i in todo:
        _add_uploads(files, jobs[i])
    return list(files.values())


def _dry_run(args: argparse.Namespace, tally: _Tally) -> int:
    done = tally.jobs - tally.todo
    total, unknown = tally.estimate()
    models = tally.models
    uploads = list(tally.uploads.values())
    upload_bytes = sum(f.size for f in uploads)
    if args.as_json:
        _print_json(
            {
                "jobs": tally.jobs,
                "to_submit": tally.todo,
                "uploads": [
                    {"path": str(f.path), "bytes": f.size, "sha256": f.sha256} for f in uploads
                ],
                "upload_bytes": upload_bytes,
                "models": models,
                "estimated_cost": None if unknown else round(total, 6),
                "known_cost": round(total, 6),
                "unknown_price": [_kind_text(k) for k in unknown],
            }
        )
        return EXIT_OK
    print(f"{tally.jobs} job(s) valid; nothing submitted (--dry-run)")
    for model, count in sorted(models.items()):
        print(f"  {model}: {count}")
    if done:
        print(f"{done} already submitted or finished (journal); {tally.todo} to submit")
    if uploads:
        print(
            f"{len(uploads)} local file(s) to upload, {_size_text(upload_bytes)} in all"
            " (each distinct file once; fewer if the journal still holds their URLs):"
        )
        for f in uploads:
            print(f"  {f.path}  {_size_text(f.size)}")
    print(f"estimated cost: {_cost_text(total, unknown)}")
    if args.max_cost is not None:
        print(f"budget: --max-cost ${args.max_cost:.2f} (never exceeded)")
    return EXIT_OK


_FIELD_FLAGS = {
    "model": "--model",
    "prompt": "--prompt",
    "duration": "--duration",
    "resolution": "--resolution",
    "aspect_ratio": "--aspect-ratio",
    "seed": "--seed",
    "image_url": "--image-url",
    "video_url": "--video-url",
}


def _request_from_flags(args: argparse.Namespace) -> am.VideoRequest:
    if args.request:
        given = [flag for name, flag in _FIELD_FLAGS.items() if getattr(args, name) is not None]
        if given:
            raise UsageError(
                f"--request gives the whole request; drop {', '.join(given)} or put it in the JSON"
            )
        try:
            data = json.loads(args.request)
        except ValueError as exc:
            raise UsageError(f"--request is not JSON: {exc}") from None
    elif not args.model:
        raise UsageError("give --model (and the other fields) or --request '{...}'")
    else:
        data = {"model": args.model}
        for name in ("prompt", "duration", "resolution", "aspect_ratio", "seed"):
            value = getattr(args, name)
            if value is not None:
                data[name] = value
        if args.image_url:
            data["image_urls"] = args.image_url
        if args.video_url:
            data["video_urls"] = args.video_url
    if is_object(data):  # the checks of a jobs line: misspelled keys, a model name's typo
        from ._jobsfile import _check_keys as check_keys

        try:
            check_keys(data, args.allow_unknown_model)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return am.VideoRequest.from_dict(data)


async def cmd_submit(args: argparse.Namespace, argv: Sequence[str]) -> int:
    request = _request_from_flags(args)
    async with _client(args) as client:
        task_id = await client.videos.submit(request)
    if args.as_json:
        _print_json({"id": task_id})
    else:
        print(task_id)
        args.ui.line(f"submitted {task_id} ({request.model})", level="detail")
    return EXIT_OK


def _batch_journal(args: argparse.Namespace) -> Path | am.PostgresJournal:
    """The journal ``manifest`` and ``status --journal`` read: a file, or the batch ``--name``
    of a ``postgresql://`` database (``--schema``)."""
    from ._pg_journal import is_url

    if not is_url(args.journal):  # a URL this SDK cannot use is refused by PostgresJournal
        if args.name is not None or args.schema is not None:
            raise UsageError("--name and --schema are for a --journal postgresql://... only")
        return Path(args.journal)
    if args.name is None:
        raise UsageError("--name NAME is required with a postgresql:// journal (the batch)")
    if args.schema is None:
        return am.PostgresJournal(args.journal, name=args.name)
    return am.PostgresJournal(args.journal, name=args.name, schema=args.schema)


async def cmd_manifest(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``manifest``: OUT/manifest.jsonl rebuilt from the journal, which is only read."""
    from ._batch_view import read_batch, write_manifest
    from ._journal import RunLock

    journal = _batch_journal(args)
    out = Path(args.out)
    view = await read_batch(journal)
    _check_out(out)
    # a run writing its own manifest there holds the directory: it is left to it
    lock = RunLock.acquire(out, what="output directory", lock_file=out / OUT_LOCK)
    try:
        path = out / "manifest.jsonl"
        lines = await write_manifest(view.records, path)
    finally:
        lock.release()
    if args.as_json:
        _print_json({"path": str(path), "lines": lines, "journal": view.journal})
    else:
        print(f"{path}: {lines} line(s) from {view.journal}")
    return EXIT_OK


def _fleet_text(view: Any) -> list[str]:
    from ._batch_view import age_text

    states: dict[str, int] = view.states()
    total = view.size if view.size is not None else len(view.records)
    counts = ", ".join(f"{n} {state}" for state, n in states.items()) or "none recorded"
    lines = [
        f"batch     {view.journal}",
        f"jobs      {total}: {counts}",
        f"cost      ${view.cost():.2f} (recorded)",
        f"workers   {len(view.workers)}",
    ]
    for w in view.workers:
        pid = w.pid if w.pid is not None else "-"
        lines.append(
            f"  {w.worker}  host {w.host or '-'}  pid {pid}  heartbeat {age_text(w.heartbeat_age)}"
            f"  holds {w.held}"
        )
    return lines


async def cmd_fleet_status(args: argparse.Namespace) -> int:
    """``status --journal``: the batch's progress, read from its journal (no API key)."""
    from ._batch_view import read_batch

    if args.task_ids:
        raise UsageError("give TASK_IDs or --journal, not both")
    view = await read_batch(_batch_journal(args))
    if args.as_json:
        _print_json(view.to_dict())
    else:
        print("\n".join(_fleet_text(view)))
    return EXIT_OK


async def cmd_status(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.journal is not None:
        return await cmd_fleet_status(args)
    if args.name is not None or args.schema is not None:
        raise UsageError("--name and --schema go with --journal")
    if not args.task_ids:
        raise UsageError("give one or more TASK_IDs, or --journal J (a batch's progress)")
    async with _client(args) as client:
        tasks = await client.tasks.get_many(args.task_ids)
    found = {t.id: t for t in tasks}
    missing = [t for t in args.task_ids if t not in found]
    if args.as_json:
        _print_json(
            [_task_dict(found[t]) if t in found else _missing_dict(t) for t in args.task_ids]
        )
    else:
        for t in args.task_ids:
            if t in found:
                d = _task_dict(found[t])
                pct = d["progress"] if d["progress"] is not None else "-"
                print(f"{t}  {d['status']:<11} {pct:>3}%  {' '.join(d['video_urls'])}".rstrip())
    for t in missing:
        print(f"error: task {t} does not exist or has expired", file=sys.stderr)
    return EXIT_FAILED if missing else EXIT_OK


async def cmd_wait(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import anyio

    ui: Ui = args.ui
    ids = list(dict.fromkeys(args.task_ids))
    results: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    failed = 0
    started = time.monotonic()

    def show() -> None:
        secs = int(time.monotonic() - started)
        ended = len(results) + len(missing)
        ui.status(
            f"waiting for {len(ids) - ended} of {len(ids)} task(s); {ended} ended; "
            f"{secs // 60}:{secs % 60:02d}",
            force=True,
        )

    async def ticker() -> None:
        while True:
            show()
            await anyio.sleep(0.5)

    async with _client(args) as client:

        async def one(task_id: str) -> None:
            nonlocal failed
            try:
                task = await client.tasks.wait(task_id)
            except am.TaskFailedError as exc:
                task = exc.task
            except am.NotFoundError:
                missing.append(task_id)
                ui.line(f"error: task {task_id} does not exist or has expired", level="error")
                return
            d = _task_dict(task)
            if task.ok and args.out:
                import functools

                from ._threads import run_sync

                out = Path(args.out)
                await run_sync(functools.partial(out.mkdir, parents=True, exist_ok=True))
                files = await client.download(task, Path(args.out))
                d["files"] = [f.path for f in files]
            failed += not task.ok
            results[task_id] = d
            if not args.as_json:
                text = f"{task.id}  {d['status']}  {' '.join(d.get('files', d['video_urls']))}"
                print(text.rstrip(), flush=True)
            show()

        if args.out:
            _check_out(Path(args.out))
        async with anyio.create_task_group() as tg:
            if ui.live:
                tg.start_soon(ticker)
            async with anyio.create_task_group() as waiters:
                for task_id in ids:
                    waiters.start_soon(one, task_id)
            tg.cancel_scope.cancel()
    ui.close()
    if args.as_json:
        _print_json([results[t] if t in results else _missing_dict(t) for t in ids])
    return EXIT_FAILED if failed or missing else EXIT_OK


async def cmd_download(args: argparse.Namespace, argv: Sequence[str]) -> int:
    out = Path(args.out)
    _check_out(out)
    async with _client(args) as client:
        task = await client.tasks.get(args.task_id)
        if not task.ok:
            print(f"error: task {task.id} is {task.status.value}, not completed", file=sys.stderr)
            return EXIT_FAILED
        files = await client.download(task, out)
    if args.as_json:
        _print_json([{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in files])
    else:
        for f in files:
            print(f"{f.path}  {f.bytes} bytes  sha256 {f.sha256}")
    return EXIT_OK


async def cmd_balance(args: argparse.Namespace, argv: Sequence[str]) -> int:
    async with _client(args) as client:
        b = await client.balance(account=args.account)
    if args.as_json:
        _print_json(
            {
                "remain_balance": b.remain_balance,
                "used_balance": b.used_balance,
                "unlimited": b.unlimited,
            }
        )
    else:
        print(
            "unlimited"
            if b.unlimited
            else f"${b.remain_balance:.2f} left, ${b.used_balance:.2f} used"
        )
    return EXIT_OK


async def cmd_upload(args: argparse.Namespace, argv: Sequence[str]) -> int:
    async with _client(args) as client:
        url = await client.uploads.image(args.file)
    if args.as_json:
        _print_json({"url": url, "file": args.file})
    else:
        print(url)
    return EXIT_OK


def _spec_rules(spec: am.ModelSpec) -> dict[str, str]:
    durations = spec.durations
    return {
        "prompt": spec.prompt.replace("_", " ")
        + (f", at most {spec.prompt_max_chars} characters" if spec.prompt_max_chars else ""),
        "duration": "not taken"
        if durations is None
        else durations.describe() + " s"
        if isinstance(durations, am.IntRange)
        else "/".join(map(str, durations)) + " s",
        "resolution": "not taken" if spec.resolutions is None else "/".join(spec.resolutions),
        "aspect_ratio": "not taken" if spec.aspect_ratios is None else "/".join(spec.aspect_ratios),
        "images": "not taken"
        if spec.image_count is None
        else f"{spec.image_count[0]} to {spec.image_count[1] or 'any'}"
        f" ({', '.join(spec.image_formats)})",
        "videos": "not taken" if spec.video_count is None else f"up to {spec.video_count[1]}",
        "billed": spec.billing,
    }


async def cmd_models(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.as_json:
        for spec in am.MODEL_SPECS.values():
            _print_json(
                {
                    "name": spec.name,
                    "summary": spec.summary,
                    **_spec_rules(spec),
                    "not_checked": list(spec.unchecked),
                }
            )
        return EXIT_OK
    for spec in am.MODEL_SPECS.values():
        print(f"{spec.name}: {spec.summary}")
        for name, rule in _spec_rules(spec).items():
            print(f"  {name} {rule}")
        for u in spec.unchecked:
            print(f"  not checked here: {u}")
    print("other models: sent as given (generic checks only); extra fields pass through")
    return EXIT_OK


def cmd_emulator(args: argparse.Namespace) -> int:
    from apimart_async.emulator.__main__ import run

    return run(args)


# -- parser ---------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help with the default of every flag that has one, epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"
        return text


def _common(*, network: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    if network:
        g = p.add_argument_group("connection")
        g.add_argument(
            "--api-key",
            metavar="KEY",
            help="API key; '-' reads it from stdin. Prefer APIMART_API_KEY or --api-key-file:"
            " a flag shows in ps and shell history. Never printed. Default: APIMART_API_KEY",
        )
        g.add_argument("--api-key-file", metavar="PATH", help="read the API key from this file")
        g.add_argument(
            "--base-url",
            metavar="URL",
            help="API base URL, e.g. that of a running `apimart-async emulator`."
            " Default: APIMART_BASE_URL or https://api.apimart.ai",
        )
        g.add_argument(
            "--emulate",
            action="store_true",
            help="run against a built-in emulator started for this command (no key, no network)",
        )
    o = p.add_argument_group("output")
    o.add_argument("--json", dest="as_json", action="store_true", help="print JSON on stdout")
    o.add_argument("-q", "--quiet", action="store_true", help="print only errors and the result")
    o.add_argument(
        "-v", "--verbose", action="count", default=0, help="print every step (-vv: requests)"
    )
    o.add_argument("--no-progress", action="store_true", help="no live status line on a terminal")
    o.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="color the output (auto: on a terminal, unless NO_COLOR is set)",
    )
    return p


EMULATOR_HELP = "run the built-in emulator (prints its URL and key)"
DOCTOR_HELP = "check connectivity, TLS, proxy, key and the service's variants; run this first"

#: Subcommands whose options import the emulator or the client (aiohttp): ``_parse`` defines
#: them in full only when the command line names them, so ``apimart-async --help`` and the
#: other commands start without those imports. Their one-line help, for the command list.
_LATE_COMMANDS = {"emulator": EMULATOR_HELP, "doctor": DOCTOR_HELP}


def _batch_flags(p: argparse.ArgumentParser, what: str, *, required: bool = False) -> None:
    """--journal, --name, --schema: a batch's journal, to read (``manifest``, ``status``)."""
    p.add_argument(
        "--journal",
        metavar="J",
        required=required,
        help=f"{what}: a journal file, or a postgresql://user@host/db URL (the password from"
        " the URL or PGPASSWORD; never printed)",
    )
    p.add_argument("--name", metavar="NAME", help="with a postgresql:// journal: the batch")
    p.add_argument(
        "--schema",
        metavar="NAME",
        help="with a postgresql:// journal: the schema of its tables (default: apimart)",
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line. ``command``: the subcommand the command line names (``""``
    for none); ``emulator`` and ``doctor`` then get their options only if it is theirs (a
    stand-in lists them in ``--help``). None: every subcommand in full."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog="apimart-async",
        description="APIMart video generation from the shell.",
        epilog="Run `apimart-async COMMAND --help` for a command's flags.\n\n" + JOBS_SCHEMA,
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"apimart-async {am.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, parents: list[argparse.ArgumentParser], **kw: Any) -> Any:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            parents=parents,
            formatter_class=_Formatter,
            allow_abbrev=False,
            **kw,
        )

    run = add("run", "run a batch from a JSONL or CSV file", [common], epilog=RUN_EPILOG)
    run.add_argument("jobs", help="the jobs file: .jsonl, or .csv (see below)")
    run.add_argument(
        "-o",
        "--out",
        metavar="DIR",
        help="directory for the videos, manifest.jsonl, the journal and the gallery"
        " (index.html); required unless --dry-run",
    )
    run.add_argument(
        "--journal",
        metavar="PATH",
        help="journal file (default: OUT/.apimart-journal.sqlite;"
        " with --emulate OUT/.apimart-journal-emulated.sqlite, and the emulator's state"
        " beside it, so a re-run resumes the demo too), or a postgresql://user@host/db URL"
        " (pip install 'apimart-async[postgres]'; the password from the URL or PGPASSWORD)",
    )
    run.add_argument(
        "--name",
        metavar="NAME",
        default=None,
        help="with a postgresql:// journal: the batch's name there (default: the jobs"
        " file's name without its extension); a different job list under the same name is"
        " refused",
    )
    run.add_argument(
        "--schema",
        metavar="NAME",
        default=None,
        help="with a postgresql:// journal: the schema of its tables (default: apimart)",
    )
    run.add_argument(
        "--lease",
        type=_seconds_above_0,
        default=30.0,
        metavar="SECONDS",
        help="with a postgresql:// journal, every process running the batch is a worker:"
        " the seconds a worker holds its jobs without a heartbeat before another takes them"
        " over (default: 30)",
    )
    run.add_argument(
        "--concurrency",
        type=_whole_at_least_1,
        default=8,
        metavar="N",
        help="submits in flight at most",
    )
    run.add_argument(
        "--max-pending",
        type=_whole_at_least_1,
        default=None,
        metavar="N",
        help="running tasks at most (default: no limit)",
    )
    run.add_argument(
        "--max-cost",
        type=_at_least_0,
        default=None,
        metavar="USD",
        help="budget: no job is submitted that could pass it (default: no limit)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check every line and print the estimated cost; submit nothing",
    )
    run.add_argument(
        "--grace",
        type=_at_least_0,
        default=10.0,
        metavar="SECONDS",
        help="after Ctrl-C, follow running tasks this long before stopping",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="also resubmit jobs whose generation failed in an earlier run (billed again)",
    )
    run.add_argument(
        "--allow-unknown-model",
        action="store_true",
        help="send model names that look like typos of known ones as written",
    )
    run.add_argument(
        "--media-root",
        action="append",
        default=None,
        metavar="DIR",
        help="local reference files may also come from DIR (repeatable; by default only"
        " from the jobs file's folder); each distinct file is uploaded once",
    )
    run.add_argument(
        "--allow-any-path",
        action="store_true",
        help="upload local reference files from anywhere (only for jobs files you wrote:"
        " each file a line names is sent to the service)",
    )
    run.set_defaults(func=cmd_run)

    rep = add(
        "report",
        "write DIR/index.html: a gallery of a batch's videos",
        [_common(network=False)],
    )
    rep.add_argument("dir", help="the batch's --out folder")
    rep.add_argument(
        "--journal", metavar="PATH", help="read this journal instead of DIR/manifest.jsonl"
    )
    rep.add_argument("--open", action="store_true", help="open the page in the browser")
    rep.set_defaults(func=cmd_report)

    submit = add("submit", "submit one job, print its task id", [common])
    submit.add_argument("--request", metavar="JSON", help="the whole request as a JSON object")
    submit.add_argument("--model", help="model name (see `apimart-async models`)")
    submit.add_argument("--prompt", help="what to generate")
    submit.add_argument(
        "--image-url", action="append", metavar="URL", help="reference image (repeatable)"
    )
    submit.add_argument(
        "--video-url", action="append", metavar="URL", help="reference video (repeatable)"
    )
    submit.add_argument("--duration", type=int, metavar="SECONDS", help="video length")
    submit.add_argument("--resolution", help="e.g. 720p (the model's rules apply)")
    submit.add_argument("--aspect-ratio", help="e.g. 16:9, portrait (the model's rules apply)")
    submit.add_argument("--seed", type=int, help="seed, for models that take one")
    submit.add_argument(
        "--allow-unknown-model",
        action="store_true",
        help="send a model name that looks like a typo of a known one as written",
    )
    submit.set_defaults(func=cmd_submit)

    status = add(
        "status",
        "status of tasks; with --journal, a batch's progress (its workers, cost)",
        [common],
    )
    status.add_argument("task_ids", nargs="*", metavar="TASK_ID", help="task ids")
    _batch_flags(status, "read this batch's journal (no API key needed)")
    status.set_defaults(func=cmd_status)

    manifest = add(
        "manifest",
        "rebuild OUT/manifest.jsonl from a batch's journal (read only; no API key needed)",
        [_common(network=False)],
    )
    _batch_flags(manifest, "the batch's journal", required=True)
    manifest.add_argument(
        "-o", "--out", metavar="DIR", required=True, help="where manifest.jsonl is written"
    )
    manifest.set_defaults(func=cmd_manifest)

    wait = add("wait", "wait for tasks to end (live status on a terminal)", [common])
    wait.add_argument("task_ids", nargs="+", metavar="TASK_ID", help="task ids")
    wait.add_argument(
        "-o",
        "--out",
        "--download",
        dest="out",
        metavar="DIR",
        help="download the videos of completed tasks here (--download is an alias)",
    )
    wait.set_defaults(func=cmd_wait)

    download = add("download", "download a task's videos", [common])
    download.add_argument("task_id", metavar="TASK_ID", help="a completed task")
    download.add_argument(
        "-o", "--out", metavar="DIR", default=".", help="directory for the videos"
    )
    download.set_defaults(func=cmd_download)

    balance = add("balance", "remaining balance", [common])
    balance.add_argument("--account", action="store_true", help="the whole account, not this key")
    balance.set_defaults(func=cmd_balance)

    upload = add("upload", "upload an image, print its URL (lives 72 h)", [common])
    upload.add_argument("file", help="a JPEG, PNG, WebP or GIF image, at most 20 MB")
    upload.set_defaults(func=cmd_upload)

    models = add("models", "known models and their rules", [_common(network=False)])
    models.set_defaults(func=cmd_models)

    late = [name for name in _LATE_COMMANDS if command is None or command == name]
    for name in _LATE_COMMANDS:
        if name not in late:  # its name and help in the list; its options only when used
            sub.add_parser(name, help=_LATE_COMMANDS[name], add_help=False)
        elif name == "emulator":
            # The emulator's own options, defined once in apimart_async/emulator/__main__.py.
            from apimart_async.emulator import __main__ as emulator_main

            emulator = sub.add_parser(
                "emulator",
                help=EMULATOR_HELP,
                description=emulator_main.DESCRIPTION,
                formatter_class=_Formatter,
                allow_abbrev=False,
            )
            emulator_main.add_arguments(emulator)
            emulator.set_defaults(func=None)
        else:
            from ._doctor import add_doctor_parser  # `apimart-async doctor`: its logic lives there

            add_doctor_parser(sub, common, key=_key)
    parser._subparsers_by_name = sub.choices  # type: ignore[attr-defined]
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    # The top level has no option taking a value: the first word that is not an option is
    # the command.
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command)
    args, extras = parser.parse_known_args(argv)
    if extras:
        # Show the subcommand's usage, not the top level's, and never echo a value: a
        # mistyped --api-kye=KEY (or a stray key) would be printed back.
        by_name: dict[str, argparse.ArgumentParser] = getattr(parser, "_subparsers_by_name", {})
        sub = by_name.get(args.command, parser)
        shown = [a.split("=", 1)[0] if a.startswith("-") else "<value>" for a in extras]
        sub.error(f"unrecognized arguments: {' '.join(shown)} (values not shown)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    if args.command == "emulator":
        return cmd_emulator(args)
    ui = Ui(
        stream=sys.stderr,
        quiet=args.quiet,
        verbose=args.verbose,
        progress=not args.no_progress,
        color=args.color,
    )
    args.ui = ui
    handler = _LogToUi(ui)
    logger = logging.getLogger("apimart_async")
    saved_level = logger.level
    logger.addHandler(handler)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    logger.setLevel(level)
    try:
        import asyncio  # not before: `--help` and usage errors need none of it

        code: int = asyncio.run(args.func(args, argv))
        return code
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except am.ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except am.ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except am.ApimartError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)  # main() may run inside another program (or a test)


if __name__ == "__main__":
    # `python -m apimart_async.cli`: run the package's own module, not this __main__ copy, so
    # that the errors raised by modules importing apimart_async.cli are the ones caught here
    from apimart_async.cli import main as _main

    raise SystemExit(_main())

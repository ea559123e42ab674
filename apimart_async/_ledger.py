"""What a batch writes down, and when: the journal (every step before it is taken) and the
JSONL manifest (one line per finished job). The batch calls these at each step of a job;
none of them decides anything (``_jobs`` does).

A journal write that fails (disk full, ...) is a fault of the whole batch, not of a job: the
first one is kept in ``fault`` and reported to ``on_fault`` (the batch stops), and nothing more
is written to the journal, so that it stays as it was at the fault and a resume picks up from
there. Only ``before_submit`` raises it (a job that cannot be recorded is not sent); the other
steps carry on without the journal (their job is still handed out, not written down: the
manifest gets its line when a later run closes the job). No error of a journal ever leaves
here as anything but a ``JournalError``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ._converter import task_to_wire
from ._errors import ApimartError, BudgetExceededError, JournalError, TakenOver
from ._jobs import Conclusion, Job, definitive, files_complete, reopens
from ._journal import JobRecord, Journal
from ._manifest import Manifest, outcome_line, record_line
from ._models import DownloadedFile, Task
from ._outcomes import Outcome
from ._prior_store import load_priors, save_priors
from ._priors import Priors
from ._threads import run_sync

if TYPE_CHECKING:
    from ._options import BatchOptions

__all__ = ["Ledger"]

logger = logging.getLogger("apimart_async")


class Ledger:
    """The journal and the manifest of one batch (either may be None)."""

    def __init__(
        self,
        journal: Journal | None,
        manifest_path: Path | None,
        *,
        priors: Priors | None = None,
        on_fault: Callable[[JournalError], None] | None = None,
    ) -> None:
        self.journal = journal
        self.manifest_path = manifest_path
        #: The poll schedule's learned priors, loaded from the journal and saved back to it.
        self.priors = priors
        #: The first journal write that failed (then nothing more is written to the journal).
        self.fault: JournalError | None = None
        self._error: JournalError | None = None
        self._error_raised = False
        self._on_fault = on_fault
        self._manifest: Manifest | None = None
        self._opened = False
        #: Which done jobs a run takes up again (``_jobs.reopens``): their manifest lines wait
        #: until they end again, or until the close if they never come by.
        self.reopens: Callable[[JobRecord], bool] = lambda record: False
        self._held: dict[int, JobRecord] = {}
        self._listed: set[int] = set()  # jobs whose line the manifest has
        self._manifest_failed = False

    @classmethod
    def for_batch(
        cls,
        options: BatchOptions,
        manifest_path: Path | None,
        *,
        priors: Priors | None,
        on_fault: Callable[[JournalError], None],
    ) -> Ledger:
        """The ledger of a batch with these options."""
        ledger = cls(options.make_journal(), manifest_path, priors=priors, on_fault=on_fault)
        downloads = options.download_dir is not None
        ledger.reopens = functools.partial(
            reopens,
            retry_failed=options.retry_failed,
            downloads=downloads,
            files_complete=files_complete,
        )
        return ledger

    async def _write(
        self, what: str, call: Callable[..., Awaitable[bool | None]], *args: Any, **kw: Any
    ) -> bool:
        """One journal write; True if it was made. On failure ``fault`` is set and reported."""
        if self.fault is not None:
            return False
        try:
            made = await call(*args, **kw)
        except (BudgetExceededError, TakenOver):  # issue 15: the fleet's max_cost, a takeover
            raise
        except Exception as exc:  # noqa: BLE001 - any journal's failure becomes a JournalError
            self._failed(exc, what)
            return False
        return made is not False  # False: another worker of the batch wrote it (issue 15)

    def _failed(self, exc: Exception, what: str) -> None:
        if not isinstance(exc, JournalError):  # a Journal of another kind, failing its own way
            exc = JournalError(f"the journal {self.journal!r} failed: {type(exc).__name__}: {exc}")
        fault = JournalError(f"{exc} (while recording {what})")
        fault.__cause__ = exc.__cause__
        if self.fault is None:
            self.fault = fault
            logger.warning("the batch is stopping: %s", fault)
            if self._on_fault is not None:
                self._on_fault(fault)

    def batch_error(self, left: list[str], *, final: bool) -> JournalError | None:
        """The error that ends the batch after ``fault`` (``stop_error``), the same object once
        the batch is ``final``; None without a fault, or once it reached the caller
        (``raised``)."""
        if self.fault is None or self._error_raised:
            return None
        if self._error is None or not final:
            self._error = self.stop_error(left)
        return self._error

    def raised(self, exc: BaseException) -> None:
        """``exc`` reached the caller: if it is ``batch_error``'s, it is not raised again."""
        self._error_raised = self._error_raised or exc is self._error

    def stop_error(self, left: list[str]) -> JournalError:
        """The error that ends a batch after ``fault``: what happened, the tasks (or the keys
        of submits) ``left`` unfollowed, and how to resume."""
        running = (
            f" Tasks submitted and not followed to their end (pending_task_ids()):"
            f" {', '.join(left)}."
            if left
            else ""
        )
        if self.journal is None:  # the manifest failed, and no journal can resume the batch
            return JournalError(
                f"the batch stopped: {self.fault}. No new job was started after that.{running}"
                " Fix the cause (free some space, check the file's permissions); the jobs"
                " that ended are in unread(), and client.tasks.watch(pending_task_ids())"
                " follows the running ones (a journal= would resume them all)."
            )
        return JournalError(
            f"the batch stopped: {self.fault}. No new job was started after that.{running} To"
            " resume, fix the cause (free some space, check the file's permissions) and"
            " run the same batch again with the same journal: it picks up every job"
            " already sent, by task id or idempotency key, and pays for none twice."
        )

    @property
    def keeps_records(self) -> bool:
        """Whether an ended job has anything to write down."""
        return self.journal is not None or self.manifest_path is not None

    async def open(self) -> dict[int, JobRecord]:
        """Open the journal (its records by index) and start the manifest with the jobs it
        holds as done; on failure, close what was opened."""
        records: dict[int, JobRecord] = {}
        try:
            if self.journal is not None:
                try:
                    records = await self.journal.open()
                except JournalError:
                    raise
                except Exception as exc:  # a Journal of another kind, failing its own way
                    raise JournalError(
                        f"cannot open the journal {self.journal!r}: {type(exc).__name__}: {exc}"
                    ) from exc
                self._opened = True
                if self.priors is not None:
                    await load_priors(self.journal, self.priors)
            if self.manifest_path is not None:
                self._manifest = Manifest(self.manifest_path)
                # 20,000 done jobs: a stat of each one's files and its line, ~0.25 s of work
                # that held the event loop (brk21c): on a worker thread
                lines = await run_sync(self._done_lines, records)
                await self._manifest.open(lines)
        except BaseException:
            await self.close(keep_priors=False)
            raise
        return records

    def _done_lines(self, records: dict[int, JobRecord]) -> list[dict[str, Any]]:
        """The manifest lines of the jobs ``records`` holds as done, but for those this run
        takes up again (held back until they end again): for a worker thread."""
        assert self.manifest_path is not None
        done = sorted((r for r in records.values() if r.state == "done"), key=_index)
        if getattr(self.journal, "shared", False):  # issue 15: one worker of several
            done = [r for r in done if _beside(r, self.manifest_path)]
        self._held = {r.index: r for r in done if self.reopens(r)}
        listed = [r for r in done if r.index not in self._held]
        self._listed = {r.index for r in listed}
        return [record_line(r) for r in listed]

    async def close(self, *, keep_priors: bool = True) -> None:
        """Close the manifest and the journal (saving the priors to it, with ``keep_priors``)."""
        with anyio.CancelScope(shield=True):
            if self._manifest is not None:
                try:
                    for record in self._held.values():  # never taken up again: as they were
                        await self._manifest_write(record.index, record_line(record))
                    self._held.clear()
                    await self._manifest.close()
                except JournalError as exc:  # the manifest's disk: the batch's error
                    self._failed(exc, "the manifest")
            if self.journal is not None and self._opened:
                self._opened = False
                try:
                    if keep_priors and self.priors is not None and self.fault is None:
                        await save_priors(self.journal, self.priors)
                finally:
                    try:
                        await self.journal.close()
                    except Exception as exc:  # noqa: BLE001 - every write was made before
                        logger.warning("the journal did not close cleanly: %s", exc)

    async def write_manifest(self, outcome: Outcome, status: str) -> None:
        """The job's line: appended, or in place of the line it had (each job listed once)."""
        if self._manifest is not None:
            with anyio.CancelScope(shield=True):
                index = outcome.index
                self._held.pop(index, None)
                await self._manifest_write(index, outcome_line(outcome, status))

    async def _manifest_write(self, index: int, line: dict[str, Any]) -> None:
        """Job ``index``'s line. A manifest that cannot be written (its disk is full...) is
        a fault of the batch, as the journal's is (``fault``); nothing more is written to it:
        a journal rebuilds it on the next run."""
        if self._manifest is None or self._manifest_failed:
            return
        try:
            if index in self._listed:  # taken up again though its files seemed whole
                await self._manifest.replace(index, line)
            else:
                await self._manifest.write(line)
                self._listed.add(index)
        except JournalError as exc:
            self._manifest_failed = True
            self._failed(exc, f"the manifest line of job {index}")

    # -- the steps of a job ------------------------------------------------------------------

    async def before_submit(self, job: Job) -> bool:
        """Record the job (with its key) before its submit is sent; False: another worker of
        the batch took it over meanwhile (issue 15), nothing recorded: not to be sent."""
        if self.journal is not None and not job.journaled:
            if self.fault is not None:
                raise JournalError(f"job {job.index} not submitted: {self.fault}")
            record = self.journal.restart if job.restart else self.journal.add
            body = job.request.to_body()
            what = f"job {job.index} before its submit"
            args = (job.index, job.request.fingerprint(), job.key, job.name, body)
            try:
                made = await self._write(what, record, *args)
            except TakenOver:
                return False
            if not made:
                assert self.fault is not None
                raise self.fault  # not recorded: not sent
            job.journaled = True
        return True

    async def submit_failed(self, job: Job, exc: ApimartError, outcome: Outcome) -> None:
        """A submit ended with ``exc``: without a journal, the manifest says so; with one, a
        job whose task surely does not exist is closed as refused (the next run submits it
        again, with a fresh key); any other stays open for a resume with the same key."""
        with anyio.CancelScope(shield=True):
            if self.journal is None:
                await self.write_manifest(outcome, "error")
            elif job.journaled and definitive(exc, resent=job.resent):
                what = f"the refused submit of job {job.index}"
                error, error_type = str(exc), type(exc).__name__
                refused = self.journal.refused
                recorded = await self._write(
                    what, refused, job.index, error=error, error_type=error_type
                )
                if recorded:  # else the run that records it writes its line
                    await self.write_manifest(outcome, "error")

    async def submitted(self, job: Job, task_id: str) -> None:
        if self.journal is not None:
            with anyio.CancelScope(shield=True):  # the id of a paid task is never lost
                what = f"the task {task_id} of job {job.index}"
                await self._write(what, self.journal.set_task, job.index, task_id)

    async def downloading(self, job: Job, task: Task) -> None:
        if self.journal is not None:
            what = f"that the task {task.id} of job {job.index} completed"
            await self._write(
                what, self.journal.set_downloading, job.index, task_to_wire(task), task.cost
            )

    async def finished(self, job: Job, end: Conclusion, files: tuple[DownloadedFile, ...]) -> bool:
        """Record an ended job: the journal closes it if ``end.closes`` (else a later run picks
        it up again), and the manifest gets its line when the journal closes it or there is
        no journal. False: another worker of the batch ended it first (issue 15), nothing
        written; its outcome is that worker's to hand out."""
        here = [True]
        with anyio.CancelScope(shield=True):  # the caller leaving finds it done, or unread
            here[0] = await self._finished(job, end, files)
        return here[0]

    async def _finished(self, job: Job, end: Conclusion, files: tuple[DownloadedFile, ...]) -> bool:
        outcome = end.outcome
        if self.journal is None:
            await self.write_manifest(outcome, end.status)
        elif end.closes:
            task = outcome.task
            error = outcome.error
            recorded = await self._write(
                f"the end of job {job.index}",
                self.journal.finish,
                job.index,
                status=end.status,
                cost=task.cost if task is not None else None,
                task=task_to_wire(task) if task is not None else None,
                files=files,
                error=str(error) if error is not None else None,
                error_type=type(error).__name__ if error is not None else None,
            )
            if recorded:  # else the run that records it writes its line
                await self.write_manifest(outcome, end.status)
            return recorded or self.fault is not None
        return True


def _index(record: JobRecord) -> int:
    return record.index


def _beside(record: JobRecord, manifest: Path) -> bool:
    """Whether a job's files are beside ``manifest`` (a worker's manifest lists the jobs
    whose files are in its own folder; the journal holds them all)."""
    folder = manifest.resolve().parent
    return bool(record.files) and all(Path(f.path).resolve().parent == folder for f in record.files)

"""``apimart-async``: the command line, built on the public API only.

Exit codes: 0 all succeeded, 1 some jobs failed, 2 bad input or usage, 130 interrupted.
The API key comes from ``--api-key`` or ``APIMART_API_KEY`` and is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import sys
import time
import webbrowser
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any, TextIO

import anyio

import apimart_async as am
from apimart_async import report
from apimart_async.emulator import Emulator

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    pass


# -- progress -----------------------------------------------------------------------------------


class Progress:
    """A live bar on a terminal; plain lines, one per event, anywhere else."""

    def __init__(self, total: int, stream: TextIO, *, tty: bool | None = None) -> None:
        self.total = total
        self.stream = stream
        self.tty: bool = stream.isatty() if tty is None else tty
        self.submitted: int = 0
        self.completed: int = 0
        self.failed: int = 0
        self.errored: int = 0
        self.cost: float = 0.0
        self.started: float = time.monotonic()
        self._last_draw = 0.0

    @property
    def done(self) -> int:
        return self.completed + self.failed + self.errored

    def event(self, event: am.BatchEvent) -> None:
        if event.kind == "submitted":
            self.submitted += 1
            self._line(f"submitted job {event.index} as {event.task_id}")
        elif event.kind == "progress":
            self._draw()

    def outcome(self, outcome: am.Outcome) -> None:
        if outcome.task is not None and outcome.task.cost:
            self.cost += outcome.task.cost
        label = outcome.name or f"job {outcome.index}"
        if outcome.ok:
            self.completed += 1
            files = " ".join(f.path for f in outcome.files)
            self._line(f"completed {label} {outcome.task_id} {files}".rstrip())
        elif isinstance(outcome.error, am.TaskFailedError):
            self.failed += 1
            self._line(f"failed {label} {outcome.task_id}: {outcome.error}")
        else:
            self.errored += 1
            self._line(f"error {label}: {type(outcome.error).__name__}: {outcome.error}")
        self._draw(force=True)

    def _line(self, text: str) -> None:
        if not self.tty:
            self.stream.write(text + "\n")
            self.stream.flush()
        else:
            self._draw()

    def bar(self) -> str:
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        elapsed = time.monotonic() - self.started
        eta = ""
        if 0 < self.done < self.total:
            secs = int(elapsed / self.done * (self.total - self.done))
            eta = f" ETA {secs // 60}:{secs % 60:02d}"
        running = max(0, self.submitted - self.done)
        return (
            f"[{'#' * filled}{'-' * (width - filled)}] {self.done}/{self.total} "
            f"submitted {self.submitted} running {running} done {self.completed} "
            f"failed {self.failed + self.errored} ${self.cost:.2f}{eta}"
        )

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self.stream.write("\r\x1b[2K" + self.bar())
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


# -- helpers --------------------------------------------------------------------------------


def _key(args: argparse.Namespace) -> str:
    key = args.api_key or os.environ.get("APIMART_API_KEY")
    if not key:
        raise UsageError("no API key: pass --api-key or set APIMART_API_KEY (or use --emulate)")
    return str(key)


@contextlib.asynccontextmanager
async def _client(
    args: argparse.Namespace, emulate: bool = False
) -> AsyncGenerator[am.AsyncApimart, None]:
    if emulate:
        emu = Emulator(task_duration=(1.0, 3.0))
        async with emu, am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client:
            yield client
        return
    async with am.AsyncApimart(_key(args), base_url=args.base_url) as client:
        yield client


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False, indent=None))


def _task_dict(task: am.Task) -> dict[str, Any]:
    return {
        "id": task.id,
        "status": task.status.value
        if task.status is not am.TaskStatus.UNKNOWN
        else task.raw_status,
        "progress": task.progress,
        "cost": task.cost,
        "video_urls": task.video_urls,
        "error": task.error.message if task.error else None,
    }


def _resume_command(argv: Sequence[str]) -> str:
    return "apimart-async " + " ".join(shlex.quote(a) for a in argv)


# -- commands -------------------------------------------------------------------------------


async def cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        jobs = am.read_jobs(args.jobs)
    except am.JobsFileError as exc:
        print(
            f"error: {len(exc.problems)} problem(s) in {exc.path}; nothing was submitted",
            file=sys.stderr,
        )
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    for job in jobs:
        for note in job.warnings:
            print(f"warning: {args.jobs}:{job.line}: {note}", file=sys.stderr)
    if args.dry_run:
        models: dict[str, int] = {}
        for job in jobs:
            models[job.request.model] = models.get(job.request.model, 0) + 1
        print(f"{len(jobs)} job(s) valid; nothing submitted (--dry-run)")
        for model, count in sorted(models.items()):
            print(f"  {model}: {count}")
        return EXIT_OK
    out = Path(args.out)
    journal = Path(args.journal) if args.journal else out / ".apimart-journal.sqlite"
    if args.emulate and not args.journal:
        # A fresh emulator knows no earlier tasks: emulated runs start afresh.
        journal = out / ".apimart-journal-emulated.sqlite"
        for suffix in ("", "-wal", "-shm"):
            await anyio.Path(str(journal) + suffix).unlink(missing_ok=True)
    progress = Progress(len(jobs), sys.stderr)
    items = [(j.name, j.request) if j.name else j.request for j in jobs]
    gallery = report.LiveGallery(out, [(j.name, j.request) for j in jobs])

    def on_event(event: am.BatchEvent) -> None:
        progress.event(event)
        gallery.event(event)

    async with _client(args, emulate=args.emulate) as client, gallery:
        async with client.batch(
            items,
            concurrency=args.concurrency,
            max_pending=args.max_pending,
            max_cost=args.max_cost,
            journal=journal,
            download_dir=out,
            sigint_grace=args.grace,
            on_event=on_event,
        ) as results:
            async for outcome in results:
                progress.outcome(outcome)
                gallery.outcome(outcome)
        progress.close()
        stats = results.stats()
    print(
        f"\n{'jobs':<12}{len(jobs)}\n{'completed':<12}{progress.completed}\n"
        f"{'failed':<12}{progress.failed}\n{'errors':<12}{progress.errored}\n"
        f"{'cost':<12}${stats.cost:.2f}\n{'files':<12}{out}\n"
        f"{'manifest':<12}{out / 'manifest.jsonl'}\n{'journal':<12}{journal}\n"
        f"{'gallery':<12}{gallery.path}"
    )
    if gallery.error is not None:
        print(f"warning: {gallery.error}", file=sys.stderr)
    if results.interrupted:
        print(f"\ninterrupted; resume with:\n  {_resume_command(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if progress.completed == len(jobs) else EXIT_FAILED


async def cmd_report(args: argparse.Namespace, argv: Sequence[str]) -> int:
    out = Path(args.dir)
    source = Path(args.journal) if args.journal else out / "manifest.jsonl"
    try:
        path = await anyio.to_thread.run_sync(report.write_gallery, source, out)
    except (report.GalleryError, am.JournalError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(path)
    if args.open:
        webbrowser.open(path.resolve().as_uri())
    return EXIT_OK


def _request_from_flags(args: argparse.Namespace) -> am.VideoRequest:
    if args.request:
        try:
            data = json.loads(args.request)
        except ValueError as exc:
            raise UsageError(f"--request is not JSON: {exc}") from None
        return am.VideoRequest.from_dict(data)
    if not args.model:
        raise UsageError("give --model (and the other fields) or --request '{...}'")
    fields: dict[str, Any] = {"model": args.model}
    for name in ("prompt", "duration", "resolution", "aspect_ratio", "seed"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.image_url:
        fields["image_urls"] = args.image_url
    if args.video_url:
        fields["video_urls"] = args.video_url
    return am.VideoRequest.from_dict(fields)


async def cmd_submit(args: argparse.Namespace, argv: Sequence[str]) -> int:
    request = _request_from_flags(args)
    async with _client(args) as client:
        task_id = await client.videos.submit(request)
    if args.as_json:
        _print_json({"task_id": task_id})
    else:
        print(task_id)
    return EXIT_OK


async def cmd_status(args: argparse.Namespace, argv: Sequence[str]) -> int:
    async with _client(args) as client:
        tasks = await client.tasks.get_many(args.task_ids)
    found = {t.id: t for t in tasks}
    missing = [t for t in args.task_ids if t not in found]
    if args.as_json:
        _print_json([_task_dict(found[t]) for t in args.task_ids if t in found])
    else:
        for t in args.task_ids:
            if t in found:
                d = _task_dict(found[t])
                pct = d["progress"] if d["progress"] is not None else "-"
                print(f"{t}  {d['status']:<11} {pct:>3}%  {' '.join(d['video_urls'])}")
    for t in missing:
        print(f"error: task {t} does not exist or has expired", file=sys.stderr)
    return EXIT_FAILED if missing else EXIT_OK


async def cmd_wait(args: argparse.Namespace, argv: Sequence[str]) -> int:
    results: list[dict[str, Any]] = []
    failed = 0
    async with _client(args) as client, client.tasks.watch(args.task_ids) as stream:
        with contextlib.suppress(am.NotFoundError):
            async for task in stream:
                d = _task_dict(task)
                if task.ok and args.download:
                    await anyio.Path(args.download).mkdir(parents=True, exist_ok=True)
                    files = await client.download(task, Path(args.download))
                    d["files"] = [f.path for f in files]
                failed += not task.ok
                results.append(d)
                if not args.as_json:
                    print(f"{task.id}  {d['status']}  {' '.join(d.get('files', d['video_urls']))}")
        missing = stream.remaining
    if args.as_json:
        _print_json(results)
    for t in missing:
        print(f"error: task {t} does not exist or has expired", file=sys.stderr)
    return EXIT_FAILED if failed or missing else EXIT_OK


async def cmd_download(args: argparse.Namespace, argv: Sequence[str]) -> int:
    async with _client(args) as client:
        task = await client.tasks.get(args.task_id)
        if not task.ok:
            print(f"error: task {task.id} is {task.status.value}, not completed", file=sys.stderr)
            return EXIT_FAILED
        await anyio.Path(args.out).mkdir(parents=True, exist_ok=True)
        for f in await client.download(task, Path(args.out)):
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
        print(await client.uploads.image(args.file))
    return EXIT_OK


async def cmd_models(args: argparse.Namespace, argv: Sequence[str]) -> int:
    for spec in am.MODEL_SPECS.values():
        print(f"{spec.name}: {spec.summary}")
        durations = spec.durations
        rules = [
            f"prompt {spec.prompt.replace('_', ' ')}"
            + (f", at most {spec.prompt_max_chars} characters" if spec.prompt_max_chars else ""),
            "duration "
            + (
                "not taken"
                if durations is None
                else durations.describe() + " s"
                if isinstance(durations, am.IntRange)
                else "/".join(map(str, durations)) + " s"
            ),
            "resolution "
            + ("not taken" if spec.resolutions is None else "/".join(spec.resolutions)),
            "aspect_ratio "
            + ("not taken" if spec.aspect_ratios is None else "/".join(spec.aspect_ratios)),
            "images "
            + (
                "not taken"
                if spec.image_count is None
                else f"{spec.image_count[0]} to {spec.image_count[1] or 'any'}"
                f" ({', '.join(spec.image_formats)})"
            ),
            "videos "
            + ("not taken" if spec.video_count is None else f"up to {spec.video_count[1]}"),
            f"billed {spec.billing}",
            *(f"not checked here: {u}" for u in spec.unchecked),
        ]
        for rule in rules:
            print(f"  {rule}")
    print("other models: sent as given (generic checks only); extra fields pass through")
    return EXIT_OK


def cmd_emulator(args: argparse.Namespace) -> int:
    from apimart_async.emulator.__main__ import run

    return run(args)


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api-key", help="API key (default: APIMART_API_KEY); never printed")
    common.add_argument(
        "--base-url", help="API base URL (default: APIMART_BASE_URL or https://api.apimart.ai)"
    )
    parser = argparse.ArgumentParser(
        prog="apimart-async", description="APIMart video generation from the shell."
    )
    parser.add_argument("--version", action="version", version=f"apimart-async {am.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="run a batch from a JSONL or CSV file")
    run.add_argument("jobs", help="JSONL (one VideoRequest per line, optional name) or CSV")
    run.add_argument(
        "--out",
        required=True,
        help="directory for the videos, manifest, journal and gallery (index.html)",
    )
    run.add_argument("--journal", help="journal file (default: OUT/.apimart-journal.sqlite)")
    run.add_argument("--concurrency", type=int, default=8)
    run.add_argument("--max-pending", type=int, default=None)
    run.add_argument("--max-cost", type=float, default=None, help="USD budget")
    run.add_argument(
        "--emulate", action="store_true", help="run against the built-in emulator (no key)"
    )
    run.add_argument("--dry-run", action="store_true", help="validate only; submit nothing")
    run.add_argument(
        "--grace", type=float, default=10.0, help="seconds to follow running tasks after Ctrl-C"
    )
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="write DIR/index.html: a gallery of a batch's videos")
    rep.add_argument("dir", help="the batch's --out folder")
    rep.add_argument("--journal", help="read this journal instead of DIR/manifest.jsonl")
    rep.add_argument("--open", action="store_true", help="open the page in the browser")
    rep.set_defaults(func=cmd_report)

    submit = sub.add_parser("submit", parents=[common], help="submit one job, print its task id")
    submit.add_argument("--request", help="the whole request as a JSON object")
    submit.add_argument("--model")
    submit.add_argument("--prompt")
    submit.add_argument("--image-url", action="append")
    submit.add_argument("--video-url", action="append")
    submit.add_argument("--duration", type=int)
    submit.add_argument("--resolution")
    submit.add_argument("--aspect-ratio")
    submit.add_argument("--seed", type=int)
    submit.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", parents=[common], help="status of tasks")
    status.add_argument("task_ids", nargs="+")
    status.add_argument("--json", dest="as_json", action="store_true")
    status.set_defaults(func=cmd_status)

    wait = sub.add_parser("wait", parents=[common], help="wait for tasks to end")
    wait.add_argument("task_ids", nargs="+")
    wait.add_argument("--download", metavar="DIR")
    wait.add_argument("--json", dest="as_json", action="store_true")
    wait.set_defaults(func=cmd_wait)

    download = sub.add_parser("download", parents=[common], help="download a task's videos")
    download.add_argument("task_id")
    download.add_argument("--out", required=True)
    download.set_defaults(func=cmd_download)

    balance = sub.add_parser("balance", parents=[common], help="remaining balance")
    balance.add_argument("--account", action="store_true", help="the whole account, not this key")
    balance.add_argument("--json", dest="as_json", action="store_true")
    balance.set_defaults(func=cmd_balance)

    upload = sub.add_parser("upload", parents=[common], help="upload an image, print its URL")
    upload.add_argument("file")
    upload.set_defaults(func=cmd_upload)

    models = sub.add_parser("models", help="known models and their rules")
    models.set_defaults(func=cmd_models)

    # The emulator's own options, defined once in apimart_async/emulator/__main__.py.
    from apimart_async.emulator import __main__ as emulator_main

    emulator = sub.add_parser(
        "emulator",
        help="run the built-in emulator",
        description=emulator_main.DESCRIPTION,
    )
    emulator_main.add_arguments(emulator)
    emulator.set_defaults(func=None)

    from ._doctor import add_doctor_parser  # `apimart-async doctor`: the logic lives there

    add_doctor_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    try:
        if args.command == "emulator":
            return cmd_emulator(args)
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


if __name__ == "__main__":
    raise SystemExit(main())

"""``client.batch(...)``: many jobs, submitted under limits, watched by the shared poller.

The ``Batch`` async context manager owns an anyio task group (one feeder task that reads the
input lazily, one short-lived task per submit in flight, one per job being finalised) and
hands out outcomes through a memory object stream, in completion order. Pending tasks cost no
task at all here: the client's single poller calls back when each one ends.

With a journal, every step is recorded before it is taken (see ``_journal``), so running the
same batch again resumes it: nothing is submitted twice and nothing is lost. With a download
directory, each completed job's files are fetched, verified and recorded before its outcome
is handed out; a JSONL manifest gets one line per finished job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, cast, final

import anyio
import anyio.abc
import anyio.to_thread
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._converter import structure_task, task_to_wire
from ._download import DownloadError, safe_name
from ._errors import (
    ApimartError,
    APIStatusError,
    ClientClosedError,
    FieldError,
    InsufficientBalanceError,
    NotFoundError,
    TaskFailedError,
    TaskTimeoutError,
    ValidationError,
)
from ._journal import JobRecord, Journal, JournalError, JournalMismatchError, SqliteJournal
from ._models import DownloadedFile, Task, VideoRequest
from ._prior_store import load_priors, save_priors
from ._priors import kind_of
from ._schedule import PollPolicy
from ._scheduler import Budget, RateLimiter, SubmitScheduler
from ._transport import new_idempotency_key

if TYPE_CHECKING:
    from ._client import AsyncApimart

__all__ = [
    "Batch",
    "BatchEvent",
    "BatchStats",
    "BatchStoppedError",
    "BudgetExceededError",
    "Failure",
    "Outcome",
    "ReplayedError",
    "Success",
]

logger = logging.getLogger("apimart_async")

MAX_UNREAD_OUTCOMES = 10_000
"""Outcomes the caller has not read yet beyond which no new job is submitted (memory bound)."""

EventKind = Literal["submitted", "progress", "completed", "failed", "errored"]
JobInput = VideoRequest | tuple[str, VideoRequest]


class BatchStoppedError(ApimartError):
    """The job was not submitted because the batch stopped (an error with
    ``stop_on_error``, the batch deadline, ``stop()``, or a closed client)."""


class BudgetExceededError(BatchStoppedError):
    """Budget reached: submitting this job could pass ``max_cost``; it was not submitted."""


class ReplayedError(ApimartError):
    """The recorded error of a job that ended in an earlier run (replayed from the journal).
    ``error_type`` names the original exception class."""

    def __init__(self, message: str, error_type: str | None) -> None:
        super().__init__(message)
        self.error_type = error_type


@attrs.frozen
class Outcome:
    """How one job ended. Exactly one per input read.

    ``task_id`` is None if no task was created; ``task`` is the terminal task when the service
    reported one; ``error`` is None on success (``TaskFailedError``, a submit error, a
    timeout, a ``DownloadError``...). ``files`` are the downloaded videos (with
    ``download_dir``). ``idempotency_key`` is the key the submit used: resubmitting with it can
    never create a second task. ``replayed``: the job ended in an earlier run (journal).
    """

    index: int
    """The job's position in the input, from 0."""
    request: VideoRequest | None
    """The job's request (None when the input item was not a request)."""
    task_id: str | None = None
    """The task's id, if one was created."""
    task: Task | None = None
    """The terminal task, when the service reported one."""
    error: ApimartError | None = None
    """Why the job did not succeed; None on success."""
    idempotency_key: str | None = None
    """The key the submit used (resubmitting with it never creates a second task)."""
    name: str | None = None
    """The job's name, for ``(name, request)`` input items."""
    files: tuple[DownloadedFile, ...] = ()
    """The downloaded videos (with ``download_dir``)."""
    replayed: bool = False
    """True when the job ended in an earlier run of the same journal."""

    @property
    def ok(self) -> bool:
        """True when the task completed and nothing went wrong after (e.g. its download)."""
        return self.error is None and self.task is not None and self.task.ok


@final
class Success(Outcome):
    """An ``Outcome`` whose task completed: ``task`` is set and ``error`` is None.

    A batch yields ``Success | Failure``, so a type checker narrows on
    ``isinstance(outcome, Success)`` (or a ``match`` on the class) and, for mypy, on
    ``outcome.ok`` too.
    """

    if TYPE_CHECKING:
        # Narrower views of the inherited fields, for type checkers only.
        task: Task
        error: None

        @property
        def ok(self) -> Literal[True]: ...


@final
class Failure(Outcome):
    """An ``Outcome`` that did not succeed: ``error`` says why (``TaskFailedError`` for a failed
    task, a submit error, a timeout, a ``DownloadError``...); ``task`` is set when the service
    reported one."""

    if TYPE_CHECKING:
        error: ApimartError

        @property
        def ok(self) -> Literal[False]: ...


def _outcome(
    index: int,
    request: VideoRequest | None,
    task_id: str | None = None,
    task: Task | None = None,
    error: ApimartError | None = None,
    idempotency_key: str | None = None,
    name: str | None = None,
    files: tuple[DownloadedFile, ...] = (),
    *,
    replayed: bool = False,
) -> Success | Failure:
    """The ``Success`` or ``Failure`` these fields make."""
    if error is None and task is not None and task.ok:
        return Success(index, request, task_id, task, None, idempotency_key, name, files, replayed)
    if error is None:  # a finished job with no readable task: say so rather than claim success
        error = ReplayedError("the journal holds no completed task for this job", None)
    return Failure(index, request, task_id, task, error, idempotency_key, name, files, replayed)


@attrs.frozen
class BatchEvent:
    """A step of one job, for progress displays (``on_event``)."""

    kind: EventKind
    """``"submitted"``, ``"progress"``, ``"completed"``, ``"failed"`` or ``"errored"``."""
    index: int
    """The job's position in the input."""
    task_id: str | None = None
    """The task's id, once known."""
    task: Task | None = None
    """The task as last read (progress and terminal events)."""
    error: ApimartError | None = None
    """The error of a failed or errored job."""


@attrs.frozen
class BatchStats:
    """Counts of a batch at one moment (``Batch.stats()``)."""

    read: int
    """Input items read so far."""
    submitting: int
    """Submits in flight."""
    submitted: int
    """Jobs submitted (a task was created)."""
    pending: int
    """Tasks submitted and not finished."""
    completed: int
    """Jobs that succeeded."""
    failed: int
    """Jobs whose task failed or was cancelled."""
    errored: int
    """Jobs that ended with any other error (bad input, submit error, timeout, download...)."""
    cost: float
    """Money spent on finished tasks, in USD."""
    elapsed: float
    """Seconds since the batch started."""
    requests: dict[str, int]
    """HTTP requests of the client so far, by endpoint."""
    replayed: int = 0
    """Jobs replayed from an earlier run."""
    downloading: int = 0
    """Jobs whose files are being downloaded."""

    @property
    def done(self) -> int:
        """Jobs that ended: completed, failed or errored."""
        return self.completed + self.failed + self.errored


@attrs.define
class _Job:
    index: int
    request: VideoRequest
    key: str
    name: str | None = None
    submitted_at: float = 0.0
    journaled: bool = False
    #: Recorded in an earlier run and sent afresh (new key, maybe a new request).
    restart: bool = False


def _check_positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError([FieldError(name, "must be a whole number >= 1", value)])


def _check_seconds(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValidationError([FieldError(name, "must be a positive number of seconds", value)])


def _definitive(exc: ApimartError) -> bool:
    """A submit error after which the task surely does not exist (the job can be closed);
    otherwise the POST may have created it and a resume retries with the same key."""
    if isinstance(exc, ValidationError):
        return True
    if isinstance(exc, APIStatusError):
        return 400 <= exc.status < 500 and exc.status not in (408, 409, 429)
    return False


class _Manifest:
    """The JSONL manifest: one line per finished job, flushed as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None
        self._limiter = anyio.CapacityLimiter(1)

    async def open(self, lines: list[dict[str, Any]]) -> None:
        def run() -> None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fh = self.path.open("w", encoding="utf-8")
            except OSError as exc:
                raise JournalError(
                    f"cannot write the manifest {self.path}: {exc.strerror or exc}"
                ) from None
            self._fh = fh
            for line in lines:
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            fh.flush()

        await anyio.to_thread.run_sync(run, limiter=self._limiter)

    async def write(self, line: dict[str, Any]) -> None:
        def run() -> None:
            if self._fh is not None:
                self._fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                self._fh.flush()

        await anyio.to_thread.run_sync(run, limiter=self._limiter)

    async def close(self) -> None:
        def run() -> None:
            fh, self._fh = self._fh, None
            if fh is not None:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()

        await anyio.to_thread.run_sync(run, limiter=self._limiter)


def _manifest_line(
    index: int,
    name: str | None,
    body: dict[str, Any] | None,
    task_id: str | None,
    status: str,
    cost: float | None,
    files: tuple[DownloadedFile, ...],
    error: str | None,
    times: tuple[int | None, int | None] = (None, None),
) -> dict[str, Any]:
    return {
        "index": index,
        "name": name,
        "request": body,
        "task_id": task_id,
        "status": status,
        "cost": cost,
        "files": [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in files],
        "error": error,
        # the task's created / completed times at the service (Unix seconds)
        "created": times[0],
        "completed": times[1],
    }


class Batch:
    """Run many jobs; iterate the outcomes in completion order::

        async with client.batch(jobs, concurrency=16) as results:
            async for outcome in results:
                ...

    Leaving the block early stops submitting and polling at once; the tasks already
    submitted keep running (and are billed) at the service: ``pending_task_ids()`` lists them
    and ``unconfirmed_submissions()`` lists submits cut off before their reply. With a
    journal, running the same batch again picks all of them up.
    """

    def __init__(
        self,
        client: AsyncApimart,
        requests: Iterable[JobInput] | AsyncIterable[JobInput],
        *,
        concurrency: int = 8,
        max_pending: int | None = None,
        requests_per_second: float | None = None,
        job_timeout: float | None = None,
        timeout: float | None = None,
        stop_on_error: bool = False,
        on_event: Callable[[BatchEvent], None] | None = None,
        poll: PollPolicy | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        download_dir: str | os.PathLike[str] | None = None,
        manifest: str | os.PathLike[str] | None = None,
        max_bytes: int | None = None,
        max_cost: float | None = None,
        cost_estimate: Callable[[VideoRequest], float | None] | None = None,
        check_balance: bool = False,
        replay_finished: bool = True,
        retry_failed: bool = False,
        sigint_grace: float | None = None,
    ) -> None:
        _check_positive_int("concurrency", concurrency)
        _check_positive_int("max_pending", max_pending, allow_none=True)
        _check_positive_int("max_bytes", max_bytes, allow_none=True)
        _check_seconds("job_timeout", job_timeout)
        _check_seconds("timeout", timeout)
        _check_seconds("requests_per_second", requests_per_second)
        if not isinstance(requests, (Iterable, AsyncIterable)):
            raise ValidationError(
                [FieldError("requests", "must be an iterable of VideoRequest", requests)]
            )
        if poll is not None and not isinstance(poll, PollPolicy):
            raise ValidationError([FieldError("poll", "must be a PollPolicy", poll)])
        self._client = client
        self._requests = requests
        self._poll = poll
        self._sched = SubmitScheduler(
            concurrency=concurrency, max_pending=max_pending, throttle=client.throttle
        )
        try:
            self._budget = Budget(max_cost, cost_estimate) if max_cost is not None else None
        except ValueError as exc:
            raise ValidationError(
                [FieldError("max_cost", str(exc).split(", got")[0], max_cost)]
            ) from None
        self._check_balance = check_balance
        self._rps = requests_per_second
        self._saved_limiter: RateLimiter | None = None
        self.job_timeout = job_timeout
        """Seconds one job may take from its submit to its end (None: no limit)."""
        self.timeout = timeout
        """Seconds the whole batch may take (None: no limit)."""
        self.stop_on_error = stop_on_error
        """Whether the first error stops submitting."""
        self.replay_finished = replay_finished
        """Whether jobs finished in an earlier run are handed out again."""
        self.retry_failed = retry_failed
        """Whether jobs whose generation failed are submitted again (costs money)."""
        self._on_event = on_event
        if journal is None or isinstance(journal, (str, os.PathLike)):
            self._journal: Journal | None = (
                SqliteJournal(os.fspath(journal)) if journal is not None else None
            )
        else:
            self._journal = journal
        self.download_dir: Path | None = Path(download_dir) if download_dir is not None else None
        """Where result videos go (None: not downloaded)."""
        if manifest is None and self.download_dir is not None:
            manifest = self.download_dir / "manifest.jsonl"
        self.manifest_path: Path | None = Path(manifest) if manifest is not None else None
        """The JSONL manifest, one line per finished job (None: none)."""
        self._manifest: _Manifest | None = None
        self.max_bytes = max_bytes
        """The largest result file accepted, in bytes (None: no limit)."""
        if sigint_grace is not None and not (
            isinstance(sigint_grace, (int, float)) and sigint_grace >= 0
        ):
            raise ValidationError(
                [FieldError("sigint_grace", "must be >= 0 seconds", sigint_grace)]
            )
        self.sigint_grace = sigint_grace
        """Seconds the first Ctrl-C leaves running tasks to finish (None: no handler)."""
        self._interrupts = 0
        self._sigint_installed = False
        self._records: dict[int, JobRecord] = {}
        self._jobs: dict[str, _Job] = {}  # pending: task id -> job
        self._submitting: dict[int, _Job] = {}
        self._finishing = 0
        self._unconfirmed: list[_Job] = []
        self._abandoned: list[str] = []  # timed out here, still running at the service
        self._read = 0
        self._submitted = 0
        self._completed = 0
        self._failed = 0
        self._errored = 0
        self._replayed = 0
        self._cost = 0.0
        self._delivered = 0
        self._emitted = 0
        self._feeding = True
        self._finished = False
        self._stopped: str | None = None
        self._feed_error: BaseException | None = None
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        #: Download file stems claimed so far (lower-cased), with the job that claimed each.
        self._file_stems: dict[str, int] = {}
        self._started = 0.0
        self._baseline: dict[str, int] = {}
        # Made in __aenter__, so a Batch that is never entered holds no open stream.
        self._send: MemoryObjectSendStream[Success | Failure]
        self._to_submit: MemoryObjectSendStream[_Job]
        self._submit_queue: MemoryObjectReceiveStream[_Job]
        self._receive: MemoryObjectReceiveStream[Success | Failure]

    # -- context manager -----------------------------------------------------------------------

    async def __aenter__(self) -> Batch:
        if self._tg is not None:
            raise RuntimeError("a Batch can be entered only once")
        self._client._transport.session()  # raises ClientClosedError if the client is not open
        if self._check_balance:
            await self._require_balance()
        opened = False
        try:
            if self._journal is not None:
                self._records = await self._journal.open()
                opened = True
                await load_priors(self._journal, self._client._poller.schedule.priors)  # issue 22
            await self._enter()
        except BaseException:
            # __aexit__ will not run: close what this batch opened (the journal's connection)
            with anyio.CancelScope(shield=True):
                if self._manifest is not None:
                    await self._manifest.close()
                if opened:
                    assert self._journal is not None
                    await self._journal.close()
            raise
        return self

    async def _enter(self) -> None:
        if self._journal is not None:
            for rec in self._records.values():
                if rec.cost and rec.state in ("done", "downloading"):
                    self._cost += rec.cost
                    if self._budget is not None:
                        self._budget.spent += rec.cost
        if self.manifest_path is not None:
            self._manifest = _Manifest(self.manifest_path)
            done = [r for r in self._records.values() if r.state == "done"]
            await self._manifest.open(
                [self._line_of(r) for r in sorted(done, key=lambda r: r.index)]
            )
        self._send, self._receive = anyio.create_memory_object_stream[Success | Failure](
            max_buffer_size=math.inf
        )
        # Admitted jobs go to a pool of submitters (as many as the concurrency allows at
        # most), cheaper than a task per job; admission keeps one free for every queued job.
        self._to_submit, self._submit_queue = anyio.create_memory_object_stream[_Job](
            max_buffer_size=math.inf
        )
        self._started = time.monotonic()
        self._baseline = self._client.request_counts()
        if self._rps is not None:
            self._saved_limiter = self._client._transport.limiter
            self._client._transport.limiter = RateLimiter(self._rps)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._feed, name="apimart-async batch feeder")
        for _ in range(self._sched.concurrency):
            tg.start_soon(self._submitter, name="apimart-async batch submitter")
        self._install_sigint()
        if self.timeout is not None:
            tg.start_soon(self._deadline, self.timeout, name="apimart-async batch deadline")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._remove_sigint()
        tg, self._tg = self._tg, None
        if not self._finished:
            self._stop("the batch was left")
        poller = self._client._poller
        for task_id in list(self._jobs):
            poller.unwatch(task_id, self._on_done)
        self._unconfirmed.extend(self._submitting.values())
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            self._to_submit.close()
            self._submit_queue.close()
            if self._rps is not None:
                self._client._transport.limiter = self._saved_limiter
            self._send.close()
            self._receive.close()
            with anyio.CancelScope(shield=True):
                if self._manifest is not None:
                    await self._manifest.close()
                if self._journal is not None:
                    try:
                        await save_priors(self._journal, self._client._poller.schedule.priors)
                    finally:
                        await self._journal.close()
        return None

    # -- Ctrl-C ----------------------------------------------------------------------------------

    @property
    def interrupted(self) -> int:
        """How many times Ctrl-C reached this batch (with ``sigint_grace``)."""
        return self._interrupts

    def _install_sigint(self) -> None:
        if self.sigint_grace is None or threading.current_thread() is not threading.main_thread():
            return
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._on_sigint)
        except (NotImplementedError, RuntimeError):  # not on this platform / loop
            return
        self._sigint_installed = True

    def _remove_sigint(self) -> None:
        if self._sigint_installed:
            self._sigint_installed = False
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)

    def _on_sigint(self) -> None:
        """First Ctrl-C: stop submitting and follow running tasks for ``sigint_grace`` s.
        Second: end the iteration now. The journal is consistent either way."""
        self._interrupts += 1
        tg = self._tg
        if self._interrupts == 1 and tg is not None and self.sigint_grace:
            logger.warning(
                "interrupted: no new job will be submitted; following %d running task(s) for"
                " up to %gs (Ctrl-C again stops at once); what is left is kept for a resume",
                len(self._jobs) + len(self._submitting),
                self.sigint_grace,
            )
            tg.start_soon(functools.partial(self.stop, grace=self.sigint_grace))
            self._stopped = self._stopped or "interrupted"
            return
        self._stopped = self._stopped or "interrupted"
        if self._jobs or self._submitting:
            logger.warning(
                "interrupted: stopping now; %d task(s) still running at the service are"
                " picked up by a resume",
                len(self._jobs) + len(self._submitting),
            )
        poller = self._client._poller
        for task_id in list(self._jobs):
            poller.unwatch(task_id, self._on_done)
        self._jobs.clear()
        self._finished = True
        self._send.close()

    async def _require_balance(self) -> None:
        balance = await self._client.balance()
        if balance.unlimited:
            return
        budget_left = self._budget.max_cost if self._budget is not None else math.inf
        if balance.remain_balance <= 0 or balance.remain_balance < min(budget_left, 0.01):
            raise InsufficientBalanceError(
                f"balance ${balance.remain_balance:.2f} cannot cover any job; not starting",
                status=402,
                type="insufficient_balance",
            )

    # -- iteration -----------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Success | Failure]:
        return self

    async def __anext__(self) -> Success | Failure:
        try:
            outcome = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self._feed_error is not None:
                raise self._feed_error from None
            raise StopAsyncIteration from None
        self._delivered += 1
        self._notify()
        return outcome

    # -- state -----------------------------------------------------------------------------------

    def pending_task_ids(self) -> list[str]:
        """Tasks submitted by this batch whose end it has not seen: still running (and billed)
        at the service. Re-attach with ``client.tasks.watch`` or ``client.tasks.wait``."""
        return [*self._jobs, *self._abandoned]

    def unconfirmed_submissions(self) -> list[tuple[int, VideoRequest, str]]:
        """(index, request, idempotency key) of submits cut off before their reply (by leaving
        the batch): the task may exist. Submitting again with the same key is always safe."""
        return [(j.index, j.request, j.key) for j in self._unconfirmed]

    @property
    def stopped(self) -> str | None:
        """Why the batch stopped submitting, if it did."""
        return self._stopped

    @property
    def budget(self) -> Budget | None:
        """The ``max_cost`` budget and what it has committed (None without ``max_cost``)."""
        return self._budget

    def stats(self) -> BatchStats:
        """The batch's counts now."""
        counts = self._client.request_counts()
        requests = {
            k: v - self._baseline.get(k, 0)
            for k, v in counts.items()
            if v - self._baseline.get(k, 0)
        }
        return BatchStats(
            read=self._read,
            submitting=len(self._submitting),
            submitted=self._submitted,
            pending=len(self._jobs),
            completed=self._completed,
            failed=self._failed,
            errored=self._errored,
            cost=round(self._cost, 6),
            elapsed=(time.monotonic() - self._started) if self._started else 0.0,
            requests=requests,
            replayed=self._replayed,
            downloading=self._finishing,
        )

    def __repr__(self) -> str:
        s = self.stats()
        reqs = " ".join(f"{k}={v}" for k, v in sorted(s.requests.items())) or "none"
        stop = f" stopped: {self._stopped}" if self._stopped else ""
        return (
            f"<Batch read={s.read} submitted={s.submitted} pending={s.pending} | "
            f"completed={s.completed} failed={s.failed} errored={s.errored} | "
            f"cost=${s.cost:.2f} | requests: {reqs}{stop}>"
        )

    async def stop(self, *, grace: float = 0.0) -> None:
        """Stop submitting now; keep following the tasks already submitted for up to ``grace``
        seconds, then end the iteration. Unfinished jobs stay in the journal for a resume."""
        self._stop("stopped by the caller")
        if grace > 0 and self._jobs:
            self._notify()
            with anyio.move_on_after(grace):
                while self._jobs:
                    await self._changed_wait()
        poller = self._client._poller
        for task_id in list(self._jobs):
            poller.unwatch(task_id, self._on_done)
        self._jobs.clear()
        self._maybe_close()

    # -- workers ---------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()

    async def _changed_wait(self, timeout: float = math.inf) -> None:
        self._changed = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._changed.wait()

    async def _inputs(self) -> AsyncGenerator[object, None]:
        requests = self._requests
        if isinstance(requests, AsyncIterable):
            async for item in requests:
                yield item
        else:
            for item in requests:
                yield item

    def _unpack(
        self, index: int, item: object
    ) -> tuple[str | None, VideoRequest] | ValidationError:
        name: str | None = None
        if isinstance(item, tuple):
            pair = cast("tuple[object, ...]", item)
            if len(pair) == 2 and isinstance(pair[0], str):
                name, item = pair[0], pair[1]
        if not isinstance(item, VideoRequest):
            rule = "must be a VideoRequest or (name, VideoRequest) (see VideoRequest.from_dict)"
            return ValidationError([FieldError(f"requests[{index}]", rule, item)])
        return name, item

    async def _feed(self) -> None:
        inputs = self._inputs()
        try:
            while not self._stopped:
                try:
                    item = await inputs.__anext__()
                except StopAsyncIteration:
                    break
                index = self._read
                self._read += 1
                unpacked = self._unpack(index, item)
                if isinstance(unpacked, ValidationError):
                    self._errored += 1
                    self._emit(_outcome(index, None, error=unpacked))
                    continue
                name, request = unpacked
                clash = self._claim_file_name(index, name)
                if clash is not None:
                    self._errored += 1
                    self._emit(_outcome(index, request, error=clash, name=name))
                    continue
                record = self._records.pop(index, None)
                afresh = record is not None and self._afresh(record)
                if record is not None and not afresh:
                    fingerprint = request.fingerprint()
                    if record.fingerprint != fingerprint:
                        # This job may have a task for the old request: leave it alone,
                        # report it, go on with the others.
                        mismatch = JournalMismatchError(index, record.fingerprint, fingerprint)
                        self._errored += 1
                        self._emit(_outcome(index, request, error=mismatch, name=name))
                        continue
                    if self._resume(record, request, name):
                        continue
                verdict = await self._admit(index, request)
                if verdict != "ok":
                    self._errored += 1
                    if verdict == "over":
                        assert self._budget is not None
                        budget = self._budget
                        error: ApimartError = BudgetExceededError(
                            f"budget reached: job {index} not submitted (${budget.committed:.2f}"
                            f" of ${budget.max_cost:.2f} committed)"
                        )
                        self._emit(_outcome(index, request, error=error, name=name))
                        continue
                    reason = self._stopped or "stopped"
                    stopped = BatchStoppedError(f"job {index} not submitted: {reason}")
                    self._emit(_outcome(index, request, error=stopped, name=name))
                    break
                if record is not None and not afresh:
                    job = _Job(index, request, record.idempotency_key, name, journaled=True)
                else:
                    job = _Job(index, request, new_idempotency_key(), name, restart=afresh)
                self._sched.started()
                self._submitting[index] = job
                self._to_submit.send_nowait(job)
        except Exception as exc:  # noqa: BLE001 - the caller's iterable failed: re-raised to them
            self._feed_error = exc
            self._stop(f"reading the requests failed: {exc!r}")
        finally:
            self._feeding = False
            self._to_submit.close()  # the submitters end once the queue is empty
            await inputs.aclose()
            self._maybe_close()

    def _claim_file_name(self, index: int, name: str | None) -> ValidationError | None:
        """With downloads, every job needs a file name of its own: two names that sanitise to
        the same file (``a/b`` and ``a_b``, or a name used twice) would overwrite each other's
        video. The later job is refused, the same way on every run of the same input."""
        if self.download_dir is None:
            return None
        stem = _file_stem(index, name).lower()  # case-insensitive file systems too
        first = self._file_stems.setdefault(stem, index)
        if first == index:
            return None
        rule = f"gives the same file name as job {first} ({stem}.mp4); names must differ"
        return ValidationError([FieldError(f"requests[{index}].name", rule, name)])

    def _afresh(self, record: JobRecord) -> bool:
        """Whether a recorded job is submitted again as a new task, with a fresh key and the
        request as it reads now: its submit was refused (no task exists), or its generation
        failed and ``retry_failed`` asks for another go."""
        if record.state == "refused":
            return True
        return (
            self.retry_failed
            and record.state == "done"
            and record.task is not None
            and record.status in ("failed", "cancelled")
        )

    def _resume(self, record: JobRecord, request: VideoRequest, name: str | None) -> bool:
        """Pick up a job recorded in an earlier run. False: it still has to be (re)submitted
        with its recorded idempotency key."""
        tg = self._tg
        assert tg is not None
        job = _Job(
            record.index, request, record.idempotency_key, name or record.name, journaled=True
        )
        if record.state == "submitting":
            return False
        if record.state == "pending" and record.task_id:
            self._sched.started()
            self._sched.submitted(ok=True)
            self._submitted += 1
            job.submitted_at = self._client._poller.now()
            self._jobs[record.task_id] = job
            if self._budget is not None:
                est = self._budget.estimate(request) or 0.0
                self._budget.reserve(job.index, request, est)
            self._client._poller.watch(
                record.task_id,
                self._on_done,
                on_progress=self._on_progress,
                reattach=True,
                policy=self._poll,
                kind=kind_of(request),  # issue 22: learned priors by kind
            )
            return True
        task = structure_task(record.task) if record.task is not None else None
        files_missing = (
            self.download_dir is not None
            and task is not None
            and task.ok
            and not _files_complete(record.files)
        )
        if record.state == "downloading" or (record.state == "done" and files_missing):
            if task is None:
                return False
            self._submitted += 1
            self._finishing += 1
            tg.start_soon(self._finalize, job, record.task_id or task.id, task)
            return True
        # done: replay
        self._replayed += 1
        error: ApimartError | None = None
        if record.status == "completed":
            self._completed += 1
        elif task is not None and record.status in ("failed", "cancelled", "expired"):
            self._failed += 1
            error = TaskFailedError(task)
        else:
            self._errored += 1
            error = ReplayedError(record.error or "failed in an earlier run", record.error_type)
        if self.replay_finished:
            self._emit(
                _outcome(
                    record.index,
                    request,
                    record.task_id,
                    task,
                    error,
                    record.idempotency_key,
                    job.name,
                    record.files,
                    replayed=True,
                )
            )
        return True

    async def _admit(self, index: int, request: VideoRequest) -> Literal["ok", "over", "stopped"]:
        while not self._stopped:
            if self._emitted - self._delivered >= MAX_UNREAD_OUTCOMES:
                await self._changed_wait()
                continue
            wait = self._sched.admit(time.monotonic())
            if wait is None:
                await self._changed_wait()
                continue
            if wait > 0:
                await self._changed_wait(wait)
                continue
            if self._budget is not None:
                verdict, est = self._budget.check(request)
                if verdict == "wait":
                    await self._changed_wait()
                    continue
                if verdict == "over":
                    return "over"
                self._budget.reserve(index, request, est)
            return "ok"
        return "stopped"

    async def _submitter(self) -> None:
        async for job in self._submit_queue:
            await self._submit(job)

    async def _submit(self, job: _Job) -> None:
        try:
            if self._journal is not None and not job.journaled:
                body = job.request.to_body()
                record = self._journal.restart if job.restart else self._journal.add
                await record(job.index, job.request.fingerprint(), job.key, job.name, body)
                job.journaled = True
            task_id = await self._client.videos.submit(job.request, idempotency_key=job.key)
        except ApimartError as exc:
            self._sched.submitted(ok=False)
            if self._budget is not None:
                self._budget.settle(job.index, job.request, None)
            outcome = _outcome(
                job.index, job.request, error=exc, idempotency_key=job.key, name=job.name
            )
            # The job stays in _submitting until its outcome is sent: while it awaits the
            # journal and the manifest, no other job may close the stream under it.
            with anyio.CancelScope(shield=True):
                if self._journal is None:
                    await self._write_manifest(outcome, "error")
                elif job.journaled and _definitive(exc):
                    # No task exists: the next run submits the job again, with a fresh key.
                    await self._journal.refused(
                        job.index, error=str(exc), error_type=type(exc).__name__
                    )
                    await self._write_manifest(outcome, "error")
            self._submitting.pop(job.index, None)
            self._errored += 1
            self._emit(outcome)
            self._event("errored", job.index, error=exc)
            if isinstance(exc, ClientClosedError):
                self._stop("the client was closed")
            elif self.stop_on_error:
                self._stop(f"job {job.index} could not be submitted: {exc}")
            self._maybe_close()
            return
        if self._journal is not None:
            with anyio.CancelScope(shield=True):  # the id of a paid task is never lost
                await self._journal.set_task(job.index, task_id)
        self._submitting.pop(job.index, None)
        self._sched.submitted(ok=True)
        self._notify()
        self._submitted += 1
        job.submitted_at = self._client._poller.now()
        self._jobs[task_id] = job
        self._event("submitted", job.index, task_id=task_id)
        if self._tg is None:  # the batch was left as this reply came in: listed, not followed
            self._unconfirmed = [j for j in self._unconfirmed if j is not job]
            return
        if self._stopped == "the batch deadline passed":
            self._on_done(task_id, TaskTimeoutError(task_id, self.timeout or 0.0))
            return
        self._client._poller.watch(
            task_id,
            self._on_done,
            on_progress=self._on_progress,
            timeout=self.job_timeout,
            submitted_at=job.submitted_at,
            policy=self._poll,
            kind=kind_of(job.request),  # issue 22: learned priors by kind
        )

    async def _deadline(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        if self._finished:
            return
        self._stop("the batch deadline passed")
        poller = self._client._poller
        for task_id in list(self._jobs):
            poller.unwatch(task_id, self._on_done)
            self._on_done(task_id, TaskTimeoutError(task_id, seconds))

    # -- callbacks from the poller ---------------------------------------------------------------

    def _on_progress(self, task: Task) -> None:
        job = self._jobs.get(task.id)
        if job is not None:
            self._event("progress", job.index, task_id=task.id, task=task)

    def _on_done(self, task_id: str, result: Task | ApimartError) -> None:
        job = self._jobs.pop(task_id, None)
        if job is None:
            return
        self._sched.task_done()
        # Decide about stopping now, before the feeder can admit another job.
        if isinstance(result, ClientClosedError):
            self._stop("the client was closed")
        elif self.stop_on_error and (isinstance(result, ApimartError) or not result.ok):
            self._stop(f"task {task_id} (job {job.index}) failed")
        self._notify()
        tg = self._tg
        if tg is None:
            return
        needs_io = (
            self._journal is not None
            or self._manifest is not None
            or (self.download_dir is not None and isinstance(result, Task) and result.ok)
        )
        if not needs_io:  # nothing to record or fetch: hand it out now, no task needed
            outcome, _, _, event = self._conclude(job, task_id, result)
            self._publish(outcome, event)
            self._maybe_close()
            return
        self._finishing += 1
        tg.start_soon(self._finalize, job, task_id, result)

    async def _finalize(self, job: _Job, task_id: str, result: Task | ApimartError) -> None:
        """Download, record and hand out one ended job."""
        try:
            await self._finalize_job(job, task_id, result)
        finally:
            self._finishing -= 1
            self._maybe_close()

    async def _finalize_job(self, job: _Job, task_id: str, result: Task | ApimartError) -> None:
        journal = self._journal
        files: tuple[DownloadedFile, ...] = ()
        download_error: ApimartError | None = None
        if isinstance(result, Task) and result.ok and self.download_dir is not None:
            if journal is not None:
                await journal.set_downloading(job.index, task_to_wire(result), result.cost)
            stem = _file_stem(job.index, job.name)
            try:
                files = await self._client._downloader.task_files(
                    result, self.download_dir, stem, max_bytes=self.max_bytes
                )
            except (DownloadError, ApimartError) as exc:
                download_error = exc
        outcome, status, record, event = self._conclude(job, task_id, result, files, download_error)
        if record and journal is not None:
            task = outcome.task
            await journal.finish(
                job.index,
                status=status,
                cost=task.cost if task is not None else None,
                task=task_to_wire(task) if task is not None else None,
                files=files,
                error=str(outcome.error) if outcome.error is not None else None,
                error_type=type(outcome.error).__name__ if outcome.error is not None else None,
            )
        if record or journal is None:
            await self._write_manifest(outcome, status)
        self._publish(outcome, event)

    def _conclude(
        self,
        job: _Job,
        task_id: str,
        result: Task | ApimartError,
        files: tuple[DownloadedFile, ...] = (),
        download_error: ApimartError | None = None,
    ) -> tuple[Success | Failure, str, bool, BatchEvent]:
        """Count one ended job and build its outcome. Returns the outcome, its manifest
        status, whether the journal closes the job (False: a later run picks it up again) and
        the event to report."""
        if isinstance(result, ApimartError):
            self._errored += 1
            if self._budget is not None:
                self._budget.settle(job.index, job.request, None)
            if isinstance(result, TaskTimeoutError):
                self._abandoned.append(task_id)
            outcome = _outcome(job.index, job.request, task_id, None, result, job.key, job.name)
            definitive = isinstance(result, NotFoundError)  # the service forgot the task
            event = BatchEvent("errored", job.index, task_id, None, result)
            return outcome, "error", definitive, event
        task = result
        cost = task.cost
        if self._budget is not None:
            self._budget.settle(job.index, job.request, cost or 0.0)
        if cost:
            self._cost += cost
        if not task.ok:
            self._failed += 1
            error = TaskFailedError(task)
            outcome = _outcome(job.index, job.request, task_id, task, error, job.key, job.name)
            event = BatchEvent("failed", job.index, task_id, task, error)
            return outcome, task.status.value, True, event
        if download_error is not None:
            # Paid and completed, files missing: the journal keeps it for a resume.
            self._errored += 1
            outcome = _outcome(
                job.index, job.request, task_id, task, download_error, job.key, job.name
            )
            event = BatchEvent("errored", job.index, task_id, task, download_error)
            return outcome, "download_failed", False, event
        self._completed += 1
        outcome = _outcome(job.index, job.request, task_id, task, None, job.key, job.name, files)
        return outcome, "completed", True, BatchEvent("completed", job.index, task_id, task)

    def _publish(self, outcome: Success | Failure, event: BatchEvent) -> None:
        self._emit(outcome)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("on_event callback failed")

    # -- plumbing --------------------------------------------------------------------------------

    def _line_of(self, record: JobRecord) -> dict[str, Any]:
        task = record.task or {}
        return _manifest_line(
            record.index,
            record.name,
            record.request,
            record.task_id,
            record.status or "error",
            record.cost,
            record.files,
            record.error,
            (task.get("created"), task.get("completed")),
        )

    async def _write_manifest(self, outcome: Outcome, status: str) -> None:
        if self._manifest is None:
            return
        body = outcome.request.to_body() if outcome.request is not None else None
        cost = outcome.task.cost if outcome.task is not None else None
        error = str(outcome.error) if outcome.error is not None else None
        task = outcome.task
        times = (task.created, task.completed) if task is not None else (None, None)
        line = _manifest_line(
            outcome.index,
            outcome.name,
            body,
            outcome.task_id,
            status,
            cost,
            outcome.files,
            error,
            times,
        )
        with anyio.CancelScope(shield=True):
            await self._manifest.write(line)

    def _emit(self, outcome: Success | Failure) -> None:
        self._emitted += 1
        # If the caller already left, the outcome only counts in the stats.
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(outcome)
        self._notify()

    def _event(
        self,
        kind: EventKind,
        index: int,
        *,
        task_id: str | None = None,
        task: Task | None = None,
        error: ApimartError | None = None,
    ) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(BatchEvent(kind, index, task_id, task, error))
        except Exception:
            logger.exception("on_event callback failed")

    def _stop(self, reason: str) -> None:
        if self._stopped is None:
            self._stopped = reason
        self._notify()

    def _maybe_close(self) -> None:
        if not self._feeding and not self._submitting and not self._jobs and not self._finishing:
            self._finished = True
            self._send.close()


def _file_stem(index: int, name: str | None) -> str:
    """The file name (without ``.mp4``) of a job's video: its sanitised name, else its index."""
    return safe_name(name) if name else f"{index:06d}"


def _files_complete(files: tuple[DownloadedFile, ...]) -> bool:
    if not files:
        return False
    for f in files:
        try:
            if os.path.getsize(f.path) != f.bytes:
                return False
        except OSError:
            return False
    return True

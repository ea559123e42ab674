"""What a batch hands out: ``Outcome`` (``Success`` / ``Failure``), ``BatchEvent`` and
``BatchStats`` as data, the ``Outbox`` that streams outcomes to the caller and the
``Reporter`` that hands events to ``on_event``."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, final

import anyio.lowlevel
import attrs

from ._channel import Channel
from ._errors import ApimartError, ReplayedError
from ._models import DownloadedFile, Task, VideoRequest
from ._slices import let_the_loop_run

__all__ = [
    "MAX_UNREAD_REPLAYS",
    "BatchEvent",
    "BatchStats",
    "EventKind",
    "Failure",
    "JobInput",
    "Outbox",
    "Outcome",
    "Reporter",
    "Success",
    "error_dict",
    "outcome_of",
]

logger = logging.getLogger("apimart_async")

EventKind = Literal["submitted", "progress", "completed", "failed", "errored"]
JobInput = VideoRequest | tuple[str, VideoRequest]


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

    def to_dict(self) -> dict[str, Any]:
        """The outcome as plain JSON values (e.g. a web handler's response): ``request``,
        ``task`` and ``files`` by their own ``to_dict()``, ``error`` as ``{"type", "message",
        "status"}`` (the class name, the message, the HTTP status when there was one) or None.
        """
        return {
            "index": self.index,
            "name": self.name,
            "ok": self.ok,
            "task_id": self.task_id,
            "idempotency_key": self.idempotency_key,
            "replayed": self.replayed,
            "request": self.request.to_dict() if self.request is not None else None,
            "task": self.task.to_dict() if self.task is not None else None,
            "error": error_dict(self.error) if self.error is not None else None,
            "files": [file.to_dict() for file in self.files],
        }


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


def error_dict(error: BaseException) -> dict[str, Any]:
    """``{"type", "message", "status"}`` of an error: its class name, its message, and the
    HTTP status when it carries one (``APIStatusError``, ``DownloadError``...), else None."""
    status = getattr(error, "status", None)
    if isinstance(status, bool) or not isinstance(status, int):
        status = None
    return {"type": type(error).__name__, "message": str(error), "status": status}


def outcome_of(
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
    unread: int = 0
    """Outcomes handed out and not read yet (after an early exit: ``Batch.unread()``)."""

    @property
    def done(self) -> int:
        """Jobs that ended: completed, failed or errored."""
        return self.completed + self.failed + self.errored

    def to_dict(self) -> dict[str, Any]:
        """The counts as plain JSON values, ``done`` included (``requests`` is a copy)."""
        return {
            "read": self.read,
            "submitting": self.submitting,
            "submitted": self.submitted,
            "pending": self.pending,
            "completed": self.completed,
            "failed": self.failed,
            "errored": self.errored,
            "done": self.done,
            "cost": self.cost,
            "elapsed": self.elapsed,
            "requests": dict(self.requests),
            "replayed": self.replayed,
            "downloading": self.downloading,
            "unread": self.unread,
        }


#: Replayed outcomes (jobs finished in an earlier run: no request, so a replay runs ahead of
#: any reader) waiting to be read at most; then the replay waits for the reader. Unbounded,
#: 20,000 queued outcomes were 60,000 more objects for each full garbage collection to walk,
#: each a stall of the event loop (issue 21).
MAX_UNREAD_REPLAYS = 1_000


class Outbox:
    """A batch's outcome stream: unbounded, in the order outcomes are put; those not read yet
    are kept (``unread_outcomes``), also once the reader left.

    Made by ``open`` (so a batch never entered holds no stream). Once closed, ``get`` ends
    the iteration, with ``error`` if one is set (the caller's input failed)."""

    def __init__(self) -> None:
        #: Outcomes put and not read, oldest first: also those put after the reader left,
        #: so an early exit loses none (``Batch.unread()``).
        self._unread: collections.deque[Success | Failure] = collections.deque()
        self.error: BaseException | None = None
        #: What ``get`` hands out (issue 16: a Channel, not an anyio stream); None until open.
        self._channel: Channel[Success | Failure] | None = None
        #: When (``time.perf_counter``) the event loop last ran in ``get``.
        self._slice = 0.0

    @property
    def unread(self) -> int:
        """Outcomes put and not read yet."""
        return len(self._unread)

    @property
    def replays_full(self) -> bool:
        """Whether a replay must wait for the reader (``MAX_UNREAD_REPLAYS`` unread)."""
        return len(self._unread) >= MAX_UNREAD_REPLAYS

    def open(self) -> None:
        self._channel = Channel()

    def unread_outcomes(self) -> list[Success | Failure]:
        return list(self._unread)

    def put(self, outcome: Success | Failure) -> None:
        self._unread.append(outcome)
        # If the reader already left, the outcome is only kept as unread.
        if self._channel is not None and not self._channel.closed:
            self._channel.put(outcome)

    def close(self) -> None:
        """No more outcomes: the reader ends after those already put."""
        if self._channel is not None:
            self._channel.close()

    def close_all(self) -> None:
        """The reader left: ``get`` ends at once; what it did not take stays unread."""
        if self._channel is not None:
            self._channel.close(drop=True)

    async def get(self) -> Success | Failure:
        """The next outcome; ``StopAsyncIteration`` (or ``error``) once closed and empty.
        A cancellation of the reader (its cancel scope, its task cancelled) ends it here,
        before it takes an outcome: that one stays unread (brk16). A get that waits lets the
        event loop run; one that finds an outcome ready does so once ``LOOP_SLICE`` of the
        reader's time has passed since the loop last ran here (a deadline that fell due
        meanwhile fires then), not for every outcome as anyio's stream did: a trip round
        the loop per outcome cost a twentieth of a bare client's whole job (issue 16)."""
        channel = self._channel
        try:
            if channel is None:
                raise StopAsyncIteration
            if len(channel) or channel.closed:
                await self._checkpoint()
            else:
                self._slice = time.perf_counter()  # the get waits: the loop runs
            outcome = await channel.get()
        except StopAsyncIteration:
            if self.error is not None:
                raise self.error from None
            raise
        self._unread.popleft()  # the channel hands them out in the order they were put
        return outcome

    async def _checkpoint(self) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # its task cancelled
            await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint_if_cancelled()  # its cancel scope cancelled
        self._slice = await let_the_loop_run(self._slice)


class Reporter:
    """Hands a batch's events to its ``on_event`` callback (if any); an exception in the
    callback is logged, never raised into the batch."""

    def __init__(self, on_event: Callable[[BatchEvent], None] | None) -> None:
        self.on_event = on_event

    def __call__(self, event: BatchEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # the caller's code: seen, and the batch goes on
                logger.warning("on_event callback failed", exc_info=True)

    def step(self, kind: EventKind, index: int, **fields: Any) -> None:
        """Report a step of job ``index`` (the event is built only when someone listens)."""
        if self.on_event is not None:
            self(BatchEvent(kind, index, **fields))

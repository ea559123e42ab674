"""``client.batch(...)``: many jobs, submitted under limits, watched by the shared poller.

The ``Batch`` async context manager owns an anyio task group (one feeder task that reads the
input lazily and one short-lived task per submit in flight) and hands out outcomes through a
memory object stream, in completion order. Pending tasks cost no task at all here: the
client's single poller calls back when each one ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import (
    ApimartError,
    ClientClosedError,
    FieldError,
    TaskFailedError,
    TaskTimeoutError,
    ValidationError,
)
from ._models import Task, VideoRequest
from ._schedule import PollPolicy
from ._scheduler import RateLimiter, SubmitScheduler
from ._transport import new_idempotency_key

if TYPE_CHECKING:
    from ._client import AsyncApimart

__all__ = ["Batch", "BatchEvent", "BatchStats", "BatchStoppedError", "Outcome"]

logger = logging.getLogger("apimart_async")

#: Outcomes the caller has not read yet beyond which no new job is submitted (memory bound).
MAX_UNREAD_OUTCOMES = 10_000

EventKind = Literal["submitted", "progress", "completed", "failed", "errored"]


class BatchStoppedError(ApimartError):
    """The job was not submitted because the batch stopped (an error with
    ``stop_on_error``, the batch deadline, or a closed client)."""


@attrs.frozen
class Outcome:
    """How one job ended. Exactly one per input read.

    ``task_id`` is None if no task was created; ``task`` is the terminal task when the service
    reported one; ``error`` is None on success (``TaskFailedError``, a submit error, a
    timeout...). ``idempotency_key`` is the key the submit used: resubmitting with it can never
    create a second task.
    """

    index: int
    request: VideoRequest | None
    task_id: str | None = None
    task: Task | None = None
    error: ApimartError | None = None
    idempotency_key: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.task is not None and self.task.ok


@attrs.frozen
class BatchEvent:
    """A step of one job, for progress displays (``on_event``)."""

    kind: EventKind
    index: int
    task_id: str | None = None
    task: Task | None = None
    error: ApimartError | None = None


@attrs.frozen
class BatchStats:
    read: int
    submitting: int
    submitted: int
    pending: int
    completed: int
    failed: int
    errored: int
    cost: float
    elapsed: float
    requests: dict[str, int]

    @property
    def done(self) -> int:
        return self.completed + self.failed + self.errored


@attrs.define
class _Job:
    index: int
    request: VideoRequest
    key: str
    submitted_at: float = 0.0


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


class Batch:
    """Run many jobs; iterate the outcomes in completion order::

        async with client.batch(jobs, concurrency=16) as results:
            async for outcome in results:
                ...

    Leaving the block early stops submitting and polling at once; the tasks already
    submitted keep running (and are billed) at the service: ``pending_task_ids()`` lists them
    and ``unconfirmed_submissions()`` lists submits cut off before their reply.
    """

    def __init__(
        self,
        client: AsyncApimart,
        requests: Iterable[VideoRequest] | AsyncIterable[VideoRequest],
        *,
        concurrency: int = 8,
        max_pending: int | None = None,
        requests_per_second: float | None = None,
        job_timeout: float | None = None,
        timeout: float | None = None,
        stop_on_error: bool = False,
        on_event: Callable[[BatchEvent], None] | None = None,
        poll: PollPolicy | None = None,
    ) -> None:
        _check_positive_int("concurrency", concurrency)
        _check_positive_int("max_pending", max_pending, allow_none=True)
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
        self._rps = requests_per_second
        self._saved_limiter: RateLimiter | None = None
        self.job_timeout = job_timeout
        self.timeout = timeout
        self.stop_on_error = stop_on_error
        self._on_event = on_event
        self._jobs: dict[str, _Job] = {}  # pending: task id -> job
        self._submitting: dict[int, _Job] = {}
        self._unconfirmed: list[_Job] = []
        self._abandoned: list[str] = []  # timed out here, still running at the service
        self._read = 0
        self._submitted = 0
        self._completed = 0
        self._failed = 0
        self._errored = 0
        self._cost = 0.0
        self._delivered = 0
        self._emitted = 0
        self._feeding = True
        self._finished = False
        self._stopped: str | None = None
        self._feed_error: BaseException | None = None
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._started = 0.0
        self._baseline: dict[str, int] = {}
        # Made in __aenter__, so a Batch that is never entered holds no open stream.
        self._send: MemoryObjectSendStream[Outcome]
        self._receive: MemoryObjectReceiveStream[Outcome]

    # -- context manager -----------------------------------------------------------------------

    async def __aenter__(self) -> Batch:
        if self._tg is not None:
            raise RuntimeError("a Batch can be entered only once")
        self._client._transport.session()  # raises ClientClosedError if the client is not open
        self._send, self._receive = anyio.create_memory_object_stream[Outcome](
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
        if self.timeout is not None:
            tg.start_soon(self._deadline, self.timeout, name="apimart-async batch deadline")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        if not self._finished:
            self._stop("the batch was left")
        poller = self._client._poller
        for task_id in list(self._jobs):
            poller.unwatch(task_id, self._on_done)
        self._unconfirmed.extend(self._submitting.values())
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        if self._rps is not None:
            self._client._transport.limiter = self._saved_limiter
        self._send.close()
        self._receive.close()
        return None

    # -- iteration -----------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Outcome]:
        return self

    async def __anext__(self) -> Outcome:
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

    def stats(self) -> BatchStats:
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

    async def _feed(self) -> None:
        tg = self._tg
        assert tg is not None
        inputs = self._inputs()
        try:
            while not self._stopped:
                try:
                    item = await inputs.__anext__()
                except StopAsyncIteration:
                    break
                index = self._read
                self._read += 1
                if not isinstance(item, VideoRequest):
                    rule = "must be a VideoRequest (see VideoRequest.from_dict)"
                    self._errored += 1
                    self._emit(
                        Outcome(
                            index,
                            None,
                            error=ValidationError([FieldError(f"requests[{index}]", rule, item)]),
                        )
                    )
                    continue
                if not await self._admit():
                    self._errored += 1
                    reason = self._stopped or "stopped"
                    self._emit(
                        Outcome(
                            index,
                            item,
                            error=BatchStoppedError(f"job {index} not submitted: {reason}"),
                        )
                    )
                    break
                job = _Job(index, item, new_idempotency_key())
                self._sched.started()
                self._submitting[index] = job
                tg.start_soon(self._submit, job)
        except Exception as exc:  # noqa: BLE001 - the caller's iterable failed: re-raised to them
            self._feed_error = exc
            self._stop(f"reading the requests failed: {exc!r}")
        finally:
            self._feeding = False
            await inputs.aclose()
            self._maybe_close()

    async def _admit(self) -> bool:
        while not self._stopped:
            if self._emitted - self._delivered >= MAX_UNREAD_OUTCOMES:
                await self._changed_wait()
                continue
            wait = self._sched.admit(time.monotonic())
            if wait == 0.0:
                return True
            await self._changed_wait(math.inf if wait is None else wait)
        return False

    async def _submit(self, job: _Job) -> None:
        try:
            task_id = await self._client.videos.submit(job.request, idempotency_key=job.key)
        except ApimartError as exc:
            self._submitting.pop(job.index, None)
            self._sched.submitted(ok=False)
            self._errored += 1
            self._emit(Outcome(job.index, job.request, error=exc, idempotency_key=job.key))
            self._event("errored", job.index, error=exc)
            if isinstance(exc, ClientClosedError):
                self._stop("the client was closed")
            elif self.stop_on_error:
                self._stop(f"job {job.index} could not be submitted: {exc}")
            self._maybe_close()
            return
        self._submitting.pop(job.index, None)
        self._sched.submitted(ok=True)
        self._notify()
        self._submitted += 1
        job.submitted_at = time.monotonic()
        self._jobs[task_id] = job
        self._event("submitted", job.index, task_id=task_id)
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
        if isinstance(result, Task):
            if result.cost:
                self._cost += result.cost
            if result.ok:
                self._completed += 1
                outcome = Outcome(job.index, job.request, task_id, result, None, job.key)
                self._event("completed", job.index, task_id=task_id, task=result)
            else:
                self._failed += 1
                error = TaskFailedError(result)
                outcome = Outcome(job.index, job.request, task_id, result, error, job.key)
                self._event("failed", job.index, task_id=task_id, task=result, error=error)
                if self.stop_on_error:
                    self._stop(f"task {task_id} (job {job.index}) failed")
        else:
            self._errored += 1
            if isinstance(result, TaskTimeoutError):
                self._abandoned.append(task_id)
            outcome = Outcome(job.index, job.request, task_id, None, result, job.key)
            self._event("errored", job.index, task_id=task_id, error=result)
            if isinstance(result, ClientClosedError):
                self._stop("the client was closed")
            elif self.stop_on_error:
                self._stop(f"task {task_id} (job {job.index}): {result}")
        self._emit(outcome)
        self._maybe_close()

    # -- plumbing --------------------------------------------------------------------------------

    def _emit(self, outcome: Outcome) -> None:
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
        if not self._feeding and not self._submitting and not self._jobs:
            self._finished = True
            self._send.close()

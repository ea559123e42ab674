"""The one status loop of a client: it runs ``PollSchedule`` over the client's status reads.

Every waiter of the client (batches, ``generate``, ``tasks.wait``, ``tasks.watch``) registers
a callback here; one background loop (in the client's task group) asks the service about every
due task in shared requests and calls back once with the terminal ``Task`` or an error.

No id is ever stranded: every read of a round ends in a result per id, and every id is
reported back to the schedule, whatever the round raised. What a result means:

- a running task: the schedule plans its next check; a terminal one ends the wait;
- ``completed`` with no video URL, a reply that cannot be read, or an error that waiting
  cannot heal (401, 403, a redirect, a 400 for the id, any other 4xx but 408/429): read again
  after a backoff, and after ``PollPolicy.hard_error_tries`` in a row the wait ends with it
  (``NoVideoError``, ``ResponseValidationError``, the ``APIStatusError``);
- "no such task" (404, or a 400 / an in-body code saying the id is unknown, invalid or
  expired): ends the wait with ``NotFoundError`` only when said twice at least
  ``PollPolicy.not_found_grace`` seconds apart (absence from a batch reply is not even that:
  such an id is read by id first);
- anything else (connection errors, timeouts, 408, 429, 5xx, a reply that is not even JSON,
  after the transport's retries): read again after a backoff, until the wait's deadline;
- and when no status read at all has got through for ``unreachable`` seconds (the client's
  ``wait_unreachable``; counted from the first failed read with no success since, while
  something waits; a 429 or any other answer of the service counts as reachable), every wait
  ends with ``APIConnectionError``, logged at WARNING: failing loud, not polling in silence.

Deadlines belong to waiters, not to tasks: a wait past its ``timeout`` ends alone (with
``TaskTimeoutError``); the task is read as long as anyone else still follows it.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

import anyio

from ._api import Statuses, is_unknown_task
from ._checks import check_positive_number
from ._errors import (
    APIConnectionError,
    ApimartError,
    APIStatusError,
    ClientClosedError,
    NotFoundError,
    NoVideoError,
    RateLimitError,
    ResponseValidationError,
    TaskTimeoutError,
)
from ._models import Task
from ._pacing import Pacing
from ._poll_schedule import PollPolicy, PollSchedule
from ._retry import is_retryable_status
from ._slices import LOOP_SLICE
from ._status_window import ReadTicket, StatusWindow
from ._transport import request_tally

__all__ = ["Fetch", "Poller", "WatchCallback", "classify", "is_unknown_task"]

logger = logging.getLogger("apimart_async")

#: Called once with the task id and the terminal task or the error that ended the watch.
WatchCallback = Callable[[str, Task | ApimartError], None]
#: Called with every non-terminal status seen (for progress displays).
ProgressCallback = Callable[[Task], None]
#: Reads the status of many tasks: a task or an error for every id (``Api.get_tasks``); raises
#: only ``ClientClosedError``.
Fetch = Callable[[list[str]], Awaitable[Statuses]]
#: Reads the status of one task (``Api.get_task``), for per-task reads that leave one by one.
Read = Callable[[str], Awaitable[Task]]


ReadVerdict = Literal["gone", "hard", "transient"]
#: Seconds of failed status reads before a WARNING says so (half ``unreachable`` if less).
_WARN_AFTER = 30.0


def classify(exc: ApimartError) -> ReadVerdict:
    """What a failed status read of one task means (see the module docstring): only what a
    retry may heal is transient (a lost or cut reply, a timeout, 408, 429, 5xx, a body that is
    not even JSON); anything else is bounded."""
    if is_unknown_task(exc):
        return "gone"
    if isinstance(exc, APIConnectionError):
        return "transient"
    if isinstance(exc, ResponseValidationError):
        return "transient" if not exc.decodable else "hard"
    if isinstance(exc, APIStatusError) and is_retryable_status(exc.status):
        return "transient"
    return "hard"


class _Waiter:
    """One follower of a task: its callbacks and its own deadline (the poller's clock)."""

    __slots__ = ("deadline", "done", "progress", "tally", "timeout")

    def __init__(
        self,
        done: WatchCallback,
        progress: ProgressCallback | None,
        timeout: float | None,
        deadline: float | None,
    ) -> None:
        self.done = done
        self.progress = progress
        self.timeout = timeout
        self.deadline = deadline
        #: Who counts the reads made for it (a batch's requests): taken from ``watch``'s caller.
        self.tally = request_tally.get()


class _Watchers:
    """Everyone following one task."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[_Waiter] = []


def _tallies(
    watchers: dict[str, _Watchers], ids: list[str]
) -> tuple[collections.Counter[str], ...]:
    """The request counters of everyone following ``ids`` (a shared read counts once for
    each batch it serves)."""
    found: dict[int, collections.Counter[str]] = {}
    for task_id in ids:
        entry = watchers.get(task_id)
        if entry is not None:
            for waiter in entry.waiters:
                for tally in waiter.tally:
                    found.setdefault(id(tally), tally)
    return tuple(found.values())


class _Alarm:
    """What a loop of the poller waits on between its rounds: ``set`` (a new watch, a read
    back, another clock) ends the wait at once, else it ends after the wait's timeout. One
    asyncio future and at most one timer a wait: an anyio event and cancel scope made one
    wait cost several times that, paid about once every two jobs (issue 16)."""

    __slots__ = ("_future", "_set")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self._set = False

    def set(self) -> None:
        self._set = True
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    def is_set(self) -> bool:
        """Whether ``set`` was called since the last wait began."""
        return self._set

    @property
    def waiting(self) -> bool:
        return self._future is not None

    async def wait(self, timeout: float) -> None:
        """Until ``set`` or ``timeout`` seconds (``inf``: no limit); a ``set`` made before
        the wait began does not end it."""
        self._set = False
        loop = asyncio.get_running_loop()
        future = self._future = loop.create_future()
        timer = None if timeout == math.inf else loop.call_later(max(0.0, timeout), _ring, future)
        try:
            await future
        finally:
            self._future = None
            if timer is not None:
                timer.cancel()


def _ring(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _ReadTasks:
    """The per-task reads in flight, each in a plain asyncio task: a seventh of the CPU of an
    anyio task group's ``start_soon`` (issue 16). A read raises nothing but cancellation."""

    __slots__ = ("loop", "tasks")

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        #: Made in the poller's loop (asking for the running loop is a system call, getpid).
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()

    def start(self, read: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(read)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def aclose(self) -> None:
        """As a task group would: cancel the reads still in flight and wait for their end."""
        tasks = set(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(tasks)


class Poller:
    """Shared status polling for one client.

    It gets only what it needs: ``fetch`` reads the status of many tasks, ``batched(now)``
    says whether those reads go through the batch route now (the schedule then groups due
    tasks into shared requests); without it, ``read`` reads one task at a time within the
    ``reads`` window, which ``pacing`` (the caps in force, 429s) and ``retries`` (the
    transport's retry count) tell about congestion; ``clock`` / ``wall`` tell the time.
    """

    def __init__(
        self,
        fetch: Fetch,
        policy: PollPolicy,
        *,
        batched: Callable[[float], bool] = lambda now: True,
        read: Read | None = None,
        pacing: Pacing | None = None,
        retries: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        reads: StatusWindow | None = None,
        unreachable: float | None = None,
    ) -> None:
        self._fetch = fetch
        self._batched = batched
        self._read = read or self._read_by_fetch
        self._pacing = pacing
        self._retries = retries
        self.schedule: PollSchedule = PollSchedule(policy)
        # issue 22: per-task reads leave one by one as they fall due, ``reads.limit`` at most
        self.reads: StatusWindow = reads or StatusWindow(start=8, maximum=64)
        self._reading: _ReadTasks | None = None  # per-task reads in flight, while ``run`` runs
        self._clock = clock
        self._wall = wall
        #: How many of the clock's seconds pass per real second (an emulator's compressed
        #: clock, see ``apimart_async.testing.follow_clock``); real waits are divided by it.
        self.time_scale: float = 1.0
        self._watchers: dict[str, _Watchers] = {}
        #: Waiters with a deadline, earliest first: (deadline, seq, task id, waiter); an entry
        #: whose waiter left is skipped when it comes up.
        self._deadlines: list[tuple[float, int, str, _Waiter]] = []
        self._seq = itertools.count()
        self._wake = _Alarm()
        self._closed = False
        #: Seconds without one status read getting through after which every wait ends
        #: with APIConnectionError (None: never).
        self.unreachable: float | None = unreachable
        self._failing_since: float | None = None
        #: When (``anyio.current_time``) the oldest status read still out without an answer left
        #: (brk21c: a service that hangs answers nothing for minutes): failing from then.
        self._asking_since: float | None = None
        self._last_failure: ApimartError | None = None
        self._warned_since: float | None = None  # the outage already warned about
        #: Called with every watch's end before its waiters are (the client's journal
        #: records the ends it sees, issue 21); it must not raise.
        self.on_end: WatchCallback | None = None
        #: Keeps the deadlines and ``unreachable`` while a round's read is out (brk21c, fix21).
        self.keeper: Keeper = Keeper()
        #: Check rounds run and task statuses read, for stats and benchmarks.
        self.rounds: int = 0
        self.checks: int = 0

    def __len__(self) -> int:
        return len(self._watchers)

    def __repr__(self) -> str:
        return f"<Poller watching={len(self._watchers)} rounds={self.rounds} checks={self.checks}>"

    def now(self) -> float:
        return self._clock()

    def wall(self) -> float:
        """Unix time on the clock the poller schedules on (an emulator's, in tests)."""
        return self._wall()

    def use_clock(
        self, clock: Callable[[], float], wall: Callable[[], float], time_scale: float = 1.0
    ) -> None:
        """Schedule on another clock (``time_scale`` of its seconds per real second)."""
        check_positive_number("time_scale", time_scale, finite=True)
        self._clock = clock
        self._wall = wall
        self.time_scale = float(time_scale)
        self._wake.set()
        self.keeper.wake()

    # -- registration --------------------------------------------------------------------------

    def watch(
        self,
        task_id: str,
        on_done: WatchCallback,
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        submitted_at: float | None = None,
        reattach: bool = False,
        policy: PollPolicy | None = None,
        kind: str | None = None,
        webhook: bool = False,
    ) -> None:
        """Follow ``task_id`` until it ends; ``on_done`` is called exactly once (unless
        ``unwatch`` comes first). ``reattach``: a task submitted elsewhere, checked at once.
        ``kind``: what the schedule learns and uses priors by (``_priors.kind_of``).
        ``webhook``: a callback will come (``check_now``); polled only as a fallback."""
        if self._closed:
            on_done(
                task_id, ClientClosedError(f"the client is closed; cannot watch task {task_id}")
            )
            return
        now = self._clock()
        if not self._watchers:  # idle until now: no evidence of an outage in the meantime
            self._failing_since = self._warned_since = None
            self._asking_since = None if self._asking_since is None else anyio.current_time()
            self.keeper.wake()  # a read still out times this wait from now
        entry = self._watchers.get(task_id)
        if entry is None:
            entry = self._watchers[task_id] = _Watchers()
        deadline = now + timeout if timeout is not None else None
        waiter = _Waiter(on_done, on_progress, timeout, deadline)
        entry.waiters.append(waiter)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._seq), task_id, waiter))
            self.keeper.wake()  # a deadline to keep
        self.schedule.add(
            task_id,
            now=now,
            submitted_at=submitted_at if submitted_at is not None else (None if reattach else now),
            check_now=reattach,
            policy=policy,
            kind=kind,
            webhook=webhook,
            wait_ends=None if deadline is None or timeout is None else (deadline, timeout),
        )
        self._wake.set()

    def check_now(self, task_id: str) -> bool:
        """A callback said ``task_id`` ended (issue 15): read it in the next round (the loop is
        woken; pacing and the read window still apply). False: nobody watches it."""
        if self._closed:  # a 503 for the callback: the service retries on 5xx, not on 200
            raise ClientClosedError("the client is closed: this callback is not followed")
        hinted = self.schedule.hint(task_id, self._clock())
        self._wake.set()
        return hinted

    def unwatch(self, task_id: str, on_done: WatchCallback) -> None:
        """Stop calling ``on_done`` for ``task_id``; the task stops being polled when nobody
        else follows it."""
        entry = self._watchers.get(task_id)
        if entry is None:
            return
        for waiter in entry.waiters:
            if waiter.done == on_done:
                self._leave(task_id, entry, waiter)
                return

    def _leave(self, task_id: str, entry: _Watchers, waiter: _Waiter) -> None:
        """``waiter`` no longer follows ``task_id`` (nobody left: the task is not read)."""
        entry.waiters.remove(waiter)
        if not entry.waiters:
            del self._watchers[task_id]
            self.schedule.remove(task_id)

    def _expired(self, now: float) -> list[tuple[str, _Waiter]]:
        """The waiters past their deadline, each taken off its task."""
        out: list[tuple[str, _Waiter]] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, task_id, waiter = heapq.heappop(heap)
            entry = self._watchers.get(task_id)
            if entry is not None and any(w is waiter for w in entry.waiters):
                self._leave(task_id, entry, waiter)
                out.append((task_id, waiter))
        return out

    def _next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap:
            _, _, task_id, waiter = heap[0]
            entry = self._watchers.get(task_id)
            if entry is not None and any(w is waiter for w in entry.waiters):
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def watching(self) -> list[str]:
        return list(self._watchers)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled (the client's task group owns this)."""
        self._reading = reads = _ReadTasks()  # issue 22: per-task reads in flight
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.keeper.run, self)  # brk21c: deadlines hold while a read is out
                while True:
                    try:
                        await self._round()
                    except anyio.get_cancelled_exc_class():
                        raise
                    except Exception:
                        logger.exception("status poller round failed; continuing")
                        await anyio.sleep(self.schedule.policy.min_interval / self.time_scale)
        finally:
            self._reading = None
            await reads.aclose()

    async def _round(self) -> None:
        delay = await self.step()
        if delay is None:
            return
        await self._wake.wait(delay / self.time_scale)

    async def step(self) -> float | None:
        """One round, without waiting: end the waits past their deadline, then read the due
        tasks. None when it read some; else the clock's seconds until something is due
        (``inf``: nothing is watched). The loop waits that long (or until ``watch``)."""
        now = self._clock()
        self._give_up_if_unreachable(now)
        for task_id, waiter in self._expired(now):
            self._call(task_id, waiter, TaskTimeoutError(task_id, waiter.timeout or 0.0))
        batched = self._batched(now)
        # issue 22 hook: without the batch route, reads leave one by one (``_read_one``)
        window_full = False
        if not batched and self._reading is not None:
            ids, window_full = self._per_task_due(now)
            for task_id in ids:
                self._reading.start(self._read_one(task_id, self.reads.started(now)))
            if ids:
                return None
        else:
            ids = self.schedule.due(now, batched=batched)
        if ids:
            await self._check(ids)
            return None
        times = [t for t in (self.schedule.next_wakeup(), self._next_deadline()) if t is not None]
        delay = math.inf if not times else max(0.0, min(times) - self._clock())
        if window_full:  # a read coming back frees a slot (and wakes the loop)
            delay = math.inf if self.reads.in_flight else delay
        if self._failing_since is not None and self.unreachable is not None and self._watchers:
            delay = min(delay, max(0.0, self._failing_since + self.unreachable - now))
        return delay

    async def _check(self, ids: list[str]) -> None:
        self.rounds += 1
        token = request_tally.set(_tallies(self._watchers, ids))
        _start_asking(self)
        try:
            results = await self._fetch(ids)
        except ClientClosedError:
            self.close("the client was closed")
            return
        except Exception:  # a bug, never a reason to strand the round: read them again later
            logger.exception(
                "status check of %d task(s) failed; reading them again later", len(ids)
            )
            self.schedule.on_error(ids, self._clock())
            return
        finally:
            request_tally.reset(token)
            self._asking_since = None
        now = self._clock()
        try:  # hundreds of waits may end in one round: in slices, the event loop runs between
            taken = 0
            while taken < len(ids) and not self._closed:
                if taken:
                    await anyio.lowlevel.checkpoint()
                taken += self._report(ids[taken:], results, now, budget=LOOP_SLICE)
        finally:
            self.schedule.release(ids, now)

    # -- issue 22: per-task reads, each on its own ---------------------------------------------

    def _per_task_due(self, now: float) -> tuple[list[str], bool]:
        """The ids whose reads may leave now, and whether the window held some back."""
        free = self.reads.free(_rate(self._pacing))
        ids = self.schedule.due(now, batched=False, limit=free)
        wakeup = self.schedule.next_wakeup() if len(ids) == free else None
        held = wakeup is not None and wakeup <= now
        if held:
            self.reads.held_back(now)
        return ids, held

    async def _read_by_fetch(self, task_id: str) -> Task:
        result = (await self._fetch([task_id])).get(task_id)
        if isinstance(result, Task):
            return result
        raise result or APIConnectionError(f"status of task {task_id} not read")

    def _trouble(self) -> int:
        """Client-wide count of 429s and retries (a change while a read was out: congestion)."""
        limited = self._pacing.throttle.rate_limited if self._pacing is not None else 0
        return limited + self._retries()

    async def _read_one(self, task_id: str, ticket: ReadTicket) -> None:
        """One per-task read, reported alone as soon as its reply is back."""
        self.rounds += 1
        trouble = self._trouble()
        result: Task | ApimartError
        request_tally.set(_tallies(self._watchers, [task_id]))  # this task's own context
        _start_asking(self)
        try:
            result = await self._read(task_id)
        except ApimartError as exc:
            result = exc
        except Exception:  # a bug, never a reason to strand the id: read it again later
            logger.exception("status read of task %s failed; reading it again later", task_id)
            result = APIConnectionError(f"status read of task {task_id} failed")
        self._asking_since = None
        now = self._clock()
        try:
            congested = self._trouble() != trouble or (
                isinstance(result, ApimartError) and classify(result) == "transient"
            )
            self.reads.finished(ticket, now, congested=congested)
            self._report([task_id], {task_id: result}, now)
        except Exception:  # a bug: never let it end the poller's reads
            logger.exception("reporting the status of task %s failed", task_id)
        finally:
            self.schedule.release([task_id], now)
            self._wake.set()

    def _report(
        self,
        ids: list[str],
        results: dict[str, Task | ApimartError],
        now: float,
        *,
        budget: float = math.inf,
    ) -> int:
        """Tell the schedule about the ids of a round and end the waits that are over, for
        ``budget`` seconds at most (one id at least); how many ids it took (all once closed)."""
        until, wall = time.perf_counter() + budget, self._wall()
        retry: list[str] = []
        reason: ApimartError | None = None
        taken = 0
        for task_id in ids:
            if taken and time.perf_counter() > until:
                break
            taken, self.checks = taken + 1, self.checks + 1
            result = results.get(task_id)
            try:
                verdict = self._report_one(task_id, result, now, wall)
            except Exception as exc:  # noqa: BLE001 - a bug met for this task: its problem alone
                _unhandled(self, task_id, exc, now)
                continue
            if verdict == "closed":
                return len(ids)
            if verdict == "retry":
                retry.append(task_id)
                if isinstance(result, ApimartError):
                    reason = result
        if retry:
            logger.info(
                "status of %d task(s) not read this round (%s); reading them again later",
                len(retry),
                f"{type(reason).__name__}: {reason}" if reason is not None else "no answer",
            )
            self.schedule.on_error(retry, now)
        self._give_up_if_unreachable(now)
        return taken

    # -- failing loud: the service unreachable for ``unreachable`` seconds ---------------------

    def _report_one(
        self, task_id: str, result: Task | ApimartError | None, now: float, wall: float
    ) -> Literal["done", "retry", "closed"]:
        """Tell the schedule about one id's result; whether to read it again or stop."""
        self._note_reachability(result, now)
        if isinstance(result, Task):
            self._on_task(task_id, result, now, wall)
            return "done"
        if isinstance(result, ClientClosedError):
            self.close("the client was closed")
            return "closed"
        if result is None:  # not answered at all: read again
            return "retry"
        verdict = classify(result)
        if verdict == "gone":
            if self.schedule.on_missing(task_id, now):
                self._finish(
                    task_id,
                    NotFoundError(
                        f"task {task_id} does not exist or has expired at the service",
                        status=404,
                    ),
                )
        elif verdict == "hard":
            if self.schedule.on_hard_error(task_id, now):
                self._finish(task_id, result)
        else:
            return "retry"
        return "done"

    def _note_reachability(self, result: Task | ApimartError | None, now: float) -> None:
        """A read that got an answer from the service (a task, a 4xx, a 429...) restarts the
        count; one that did not (connection error, timeout, 5xx, garbage) starts it."""
        if result is None or isinstance(result, ClientClosedError):
            return
        if (
            isinstance(result, ApimartError)
            and not isinstance(result, RateLimitError)
            and classify(result) == "transient"
        ):
            self._last_failure = result
            if self._failing_since is None:
                self._failing_since = now
            return
        self._failing_since = None
        if self._warned_since is not None:
            logger.info(
                "status reads get through again after %gs", round(now - self._warned_since, 1)
            )
            self._warned_since = None

    def _give_up_if_unreachable(self, now: float) -> None:
        """One WARNING once reads have failed for a while (30 s, or half the limit), then
        at the limit: every wait ends with APIConnectionError, said at WARNING too."""
        limit, since, last = self.unreachable, self._failing_since, self._last_failure
        asking = self._asking_since  # real time: a clock a test moves on is no outage
        asked = None if asking is None else now - (anyio.current_time() - asking) * self.time_scale
        if asked is not None and (since is None or asked < since):  # a read unanswered
            since, last = asked, None
        if since is None or not self._watchers:
            return
        error = f"{type(last).__name__}: {last}" if last is not None else "no answer"
        if self._warned_since is None and now - since >= _warn_after(limit):  # once an outage
            self._warned_since = since
            logger.warning(
                "status reads have failed for %gs (%s); %d wait(s) %s",
                round(now - since, 1),
                error,
                len(self._watchers),
                "keep waiting (wait_unreachable=None)"
                if limit is None
                else f"end with APIConnectionError in {max(0.0, since + limit - now):.0f}s"
                f" unless a read gets through (wait_unreachable={limit:g})",
            )
        if limit is None or now - since < limit:
            return
        self._failing_since = None  # a later wait gets its own ``unreachable`` seconds
        self._asking_since = None if asking is None else anyio.current_time()
        self._warned_since = None
        reason = (
            f"the API has been unreachable for {round(now - since, 1):g}s"
            f" (wait_unreachable={limit:g}): no status read got through; last error: {error}"
        )
        logger.warning("%s; ending %d wait(s)", reason, len(self._watchers))
        for task_id in list(self._watchers):
            self._finish(
                task_id, APIConnectionError(f"{reason} (task {task_id} may still be running)")
            )

    def _on_task(self, task_id: str, task: Task, now: float, wall: float) -> None:
        if task.ok and not task.video_urls:
            # completed, but nothing to fetch: read again a few times, then an error
            if self.schedule.on_hard_error(task_id, now):
                self._finish(task_id, NoVideoError(task))
            return
        if self.schedule.on_status(task, now, wall_now=wall):
            self._finish(task_id, task)
            return
        entry = self._watchers.get(task_id)
        if entry is not None:
            for waiter in list(entry.waiters):
                if waiter.progress is not None:
                    waiter.progress(task)

    def _finish(self, task_id: str, result: Task | ApimartError) -> None:
        entry = self._watchers.pop(task_id, None)
        self.schedule.remove(task_id)
        if entry is None:
            return
        if self.on_end is not None:
            try:
                self.on_end(task_id, result)
            except Exception:
                logger.exception("recording the end of task %s failed", task_id)
        for waiter in entry.waiters:
            self._call(task_id, waiter, result)

    def _call(self, task_id: str, waiter: _Waiter, result: Task | ApimartError) -> None:
        try:
            waiter.done(task_id, result)
        except Exception:
            logger.exception("callback for task %s failed", task_id)

    def close(self, reason: str) -> None:
        """End every watch with ``ClientClosedError`` (the client is going away)."""
        self._closed = True
        for task_id in list(self._watchers):
            self._finish(task_id, ClientClosedError(f"{reason} while waiting for task {task_id}"))
        self._wake.set()


def _unhandled(poller: Poller, task_id: str, exc: Exception, now: float) -> None:
    """Handling the status of ``task_id`` raised (a bug, or a reply no rule foresaw): it is
    read again, and after ``hard_error_tries`` such reads its wait ends with a typed error;
    the other tasks of the round go on."""
    what = f"cannot handle the status of task {task_id}: {type(exc).__name__}: {exc}"
    logger.error("%s; reading it again later", what, exc_info=exc)
    try:
        if poller.schedule.on_hard_error(task_id, now):
            poller._finish(task_id, ResponseValidationError(what))
    except Exception:  # the schedule itself is broken for this id: stop following it
        logger.exception("giving up on task %s", task_id)
        poller._finish(task_id, ResponseValidationError(what))


def _rate(pacing: Pacing | None) -> float | None:
    """The requests-per-second cap in force (the tightest, scaled by the throttle)."""
    if pacing is None or not pacing.limiters:
        return None
    return min(limiter.rate for limiter in pacing.limiters) * pacing.throttle.factor


def _warn_after(limit: float | None) -> float:
    """Seconds of failed reads before the WARNING: 30, or half ``unreachable`` if less."""
    return _WARN_AFTER if limit is None else min(_WARN_AFTER, limit / 2)


def _start_asking(poller: Poller) -> None:
    """A status read leaves: if none was out, the oldest unanswered read is this one, and
    the keeper times it from now."""
    if poller._asking_since is None:
        poller._asking_since = anyio.current_time()
        poller.keeper.wake()


class Keeper:
    """Beside the poller's rounds (brk21c): the waits' deadlines and ``unreachable`` end
    waits on time even while a round's read is out, which a service that accepts
    connections and never answers holds for minutes (attempt timeouts times retries).

    It sleeps until there is something to do (fix21: it woke every quarter of a second, for
    the life of the client): the earliest deadline, or, while a read is out, the moment that
    read would be warned about or given up; for ever when nothing is watched, until ``wake``
    (a deadline added, a read leaving, another clock)."""

    def __init__(self) -> None:
        self._alarm = _Alarm()
        #: Times it woke up (tests count them).
        self.wakeups: int = 0

    def wake(self) -> None:
        self._alarm.set()

    async def woken(self) -> None:
        """Until ``wake`` is called."""
        await self._alarm.wait(math.inf)

    async def pause(self, seconds: float) -> None:
        """``seconds`` of real time (at least a millisecond), or until ``wake``."""
        await self._alarm.wait(max(0.001, seconds))

    def delay(self, poller: Poller, now: float) -> float:
        """The poller's seconds from ``now`` until there is something to do (``inf``: none)."""
        if not poller._watchers:
            return math.inf
        times: list[float] = []
        deadline = poller._next_deadline()
        if deadline is not None:
            times.append(deadline)
        asking, limit = poller._asking_since, poller.unreachable
        if asking is not None:  # as ``_give_up_if_unreachable`` counts it
            since = now - (anyio.current_time() - asking) * poller.time_scale
            if poller._failing_since is not None:
                since = min(since, poller._failing_since)
            if poller._warned_since is None:
                times.append(since + _warn_after(limit))
            if limit is not None:
                times.append(since + limit)
        return max(0.0, min(times) - now) if times else math.inf

    async def run(self, poller: Poller) -> None:
        while True:
            now = poller.now()
            poller._give_up_if_unreachable(now)
            for task_id, waiter in poller._expired(now):
                poller._call(task_id, waiter, TaskTimeoutError(task_id, waiter.timeout or 0.0))
            await self.pause(self.delay(poller, poller.now()) / poller.time_scale)
            self.wakeups += 1

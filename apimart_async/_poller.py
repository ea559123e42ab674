"""The one status loop of a client: it runs ``PollSchedule`` over ``tasks.get_many``.

Every waiter of the client (batches, ``generate``, ``tasks.wait``, ``tasks.watch``) registers
a callback here; one background loop (in the client's task group) asks the service about every
due task in shared requests and calls back once with the terminal ``Task`` or an error.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from ._errors import ApimartError, ClientClosedError, NotFoundError, TaskTimeoutError
from ._models import Task
from ._schedule import PollPolicy, PollSchedule

if TYPE_CHECKING:
    from ._client import AsyncApimart

__all__ = ["Poller", "WatchCallback"]

logger = logging.getLogger("apimart_async")

#: Called once with the task id and the terminal task or the error that ended the watch.
WatchCallback = Callable[[str, Task | ApimartError], None]
#: Called with every non-terminal status seen (for progress displays).
ProgressCallback = Callable[[Task], None]


class _Watchers:
    __slots__ = ("done", "progress", "timeout")

    def __init__(self) -> None:
        self.done: list[WatchCallback] = []
        self.progress: list[ProgressCallback] = []
        self.timeout: float | None = None


class Poller:
    """Shared status polling for one client."""

    def __init__(
        self,
        client: AsyncApimart,
        policy: PollPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self.schedule = PollSchedule(policy)
        self._clock = clock
        self._wall = wall
        self._watchers: dict[str, _Watchers] = {}
        self._wake = anyio.Event()
        self._closed = False
        #: Check rounds run and task statuses read, for stats and benchmarks.
        self.rounds = 0
        self.checks = 0

    def __len__(self) -> int:
        return len(self._watchers)

    def __repr__(self) -> str:
        return f"<Poller watching={len(self._watchers)} rounds={self.rounds} checks={self.checks}>"

    def now(self) -> float:
        return self._clock()

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
    ) -> None:
        """Follow ``task_id`` until it ends; ``on_done`` is called exactly once (unless
        ``unwatch`` comes first). ``reattach``: a task submitted elsewhere, checked at once."""
        if self._closed:
            on_done(
                task_id, ClientClosedError(f"the client is closed; cannot watch task {task_id}")
            )
            return
        now = self._clock()
        entry = self._watchers.get(task_id)
        if entry is None:
            entry = self._watchers[task_id] = _Watchers()
        entry.done.append(on_done)
        if on_progress is not None:
            entry.progress.append(on_progress)
        deadline = None
        if timeout is not None:
            deadline = now + timeout
            entry.timeout = timeout
        self.schedule.add(
            task_id,
            now=now,
            submitted_at=submitted_at if submitted_at is not None else (None if reattach else now),
            deadline=deadline,
            check_now=reattach,
            policy=policy,
        )
        self._wake.set()

    def unwatch(self, task_id: str, on_done: WatchCallback) -> None:
        """Stop calling ``on_done`` for ``task_id``; the task stops being polled when nobody
        else follows it."""
        entry = self._watchers.get(task_id)
        if entry is None:
            return
        if on_done in entry.done:
            entry.done.remove(on_done)
        if not entry.done:
            del self._watchers[task_id]
            self.schedule.remove(task_id)

    def watching(self) -> list[str]:
        return list(self._watchers)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled (the client's task group owns this)."""
        while True:
            try:
                await self._round()
            except anyio.get_cancelled_exc_class():
                raise
            except Exception:
                logger.exception("status poller round failed; continuing")
                await anyio.sleep(self.schedule.policy.min_interval)

    async def _round(self) -> None:
        now = self._clock()
        for task_id in self.schedule.expired(now):
            entry = self._watchers.get(task_id)
            timeout = entry.timeout if entry is not None and entry.timeout is not None else 0.0
            self._finish(task_id, TaskTimeoutError(task_id, timeout))
        batched = self._client.batch_route_available is not False
        ids = self.schedule.due(now, batched=batched)
        if ids:
            await self._check(ids)
            return
        wakeup = self.schedule.next_wakeup()
        delay = math.inf if wakeup is None else max(0.0, wakeup - self._clock())
        self._wake = anyio.Event()
        with anyio.move_on_after(delay):
            await self._wake.wait()

    async def _check(self, ids: list[str]) -> None:
        self.rounds += 1
        try:
            tasks = await self._client.tasks.get_many(ids)
        except ClientClosedError:
            self.close("the client was closed")
            return
        except ApimartError as exc:
            logger.warning("status check of %d task(s) failed: %s", len(ids), exc)
            self.schedule.on_error(ids, self._clock())
            return
        now = self._clock()
        wall = self._wall()
        found = {t.id: t for t in tasks}
        self.checks += len(ids)
        for task_id in ids:
            task = found.get(task_id)
            if task is None:
                if self.schedule.on_missing(task_id, now):
                    self._finish(
                        task_id,
                        NotFoundError(
                            f"task {task_id} does not exist or has expired at the service",
                            status=404,
                        ),
                    )
            elif self.schedule.on_status(task, now, wall_now=wall):
                self._finish(task_id, task)
            else:
                entry = self._watchers.get(task_id)
                if entry is not None:
                    for cb in list(entry.progress):
                        cb(task)

    def _finish(self, task_id: str, result: Task | ApimartError) -> None:
        entry = self._watchers.pop(task_id, None)
        self.schedule.remove(task_id)
        if entry is None:
            return
        for cb in entry.done:
            try:
                cb(task_id, result)
            except Exception:
                logger.exception("callback for task %s failed", task_id)

    def close(self, reason: str) -> None:
        """End every watch with ``ClientClosedError`` (the client is going away)."""
        self._closed = True
        for task_id in list(self._watchers):
            self._finish(task_id, ClientClosedError(f"{reason} while waiting for task {task_id}"))
        self._wake.set()

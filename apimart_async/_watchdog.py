"""The time limits of API requests, on one event-loop timer for all of them (issue 16).

aiohttp's own limits put timers on the event loop for every request: one for ``total``, and
for ``sock_read`` one at the start and a new one at every chunk of the reply. On a status
read that is three timers, and on a busy loop (a heap of thousands of timers, half of them
cancelled) they cost about as much CPU as the rest of the SDK's work on the request. The
transport's API requests are watched here instead: each attempt in flight is a ``Watch``, and
one timer, set for the earliest check due, looks at them all.

The limits, as ``Timeout`` documents them:

- ``total``: the whole attempt, from its start (a wait for a free connection included). It
  ends exactly then.
- ``read``: once the attempt holds a connection, ``read`` seconds without a byte of the reply
  (before the first, or between two) end it. An attempt that gets no byte at all ends exactly
  ``read`` seconds after it got its connection; one whose reply stops halfway is looked at
  every ``read / CHECKS`` seconds, so its silence is noticed between ``read`` and
  ``read * (1 + 1 / CHECKS)`` seconds after the last byte. Bytes are counted by the
  connection's protocol (``CountingHandler``), which the transport's connector makes.

An attempt past its limit is cancelled, as aiohttp cancels one past its ``total``; where it
is awaited, ``Watchdog.timed_out`` tells that cancellation (``TimeoutError``) from one of the
caller's own (passed on), as ``asyncio.timeout`` does. Uploads (a body that may take longer
to send than ``read``) keep aiohttp's limits, whose read clock starts once the body is sent.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import ssl
import time
from typing import Any, Final

import aiohttp
from aiohttp.client_proto import ResponseHandler

__all__ = ["CHECKS", "CountingHandler", "Watch", "Watchdog", "WatchedConnector"]

#: How often (per ``read`` seconds) an attempt that gets bytes is looked at again.
CHECKS: Final = 8
#: Slack for the timer's resolution: asyncio runs a timer up to a clock tick early, uvloop
#: up to a millisecond (a look then would only set the timer again for what is left). The
#: watchdog's clock is ``time.monotonic`` (asyncio's, without a call to the loop's method).
_EPS: Final = 1e-3

#: The watch of the attempt this task is making (for its connection's protocol, which meets
#: the attempt inside aiohttp).
_CURRENT: contextvars.ContextVar[Watch | None] = contextvars.ContextVar(
    "apimart_async_watch", default=None
)


class CountingHandler(ResponseHandler):
    """aiohttp's protocol of a client connection, counting the pieces of data it received:
    the watchdog's sign of life of a reply (read without a timer per piece)."""

    received: int = 0

    def data_received(self, data: bytes) -> None:
        """One more piece received (then aiohttp's own handling)."""
        self.received += 1
        ResponseHandler.data_received(self, data)

    def set_response_params(self, **params: Any) -> None:
        """aiohttp, as a request is about to go out on this connection (in the task making
        it): the attempt being watched, if any, has its connection and its read clock
        starts."""
        ResponseHandler.set_response_params(self, **params)
        watch = _CURRENT.get()
        if watch is not None:
            watch.protocol = self
            watch.seen = self.received
            watch.mark = time.monotonic()


class WatchedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, whose connections (``CountingHandler``) count what they receive
    and tell the attempt being watched (``Watch``) when it got its connection."""

    def __init__(self, *, limit: int, ssl: ssl.SSLContext | bool) -> None:
        super().__init__(limit=limit, ssl=ssl)  # pyright: ignore[reportUnknownMemberType]
        factory = getattr(self, "_factory", None)
        #: Whether the connections are ``CountingHandler``s (an aiohttp that builds its
        #: protocols otherwise keeps its own timers: ``Transport`` asks).
        self.counts: bool = (
            isinstance(factory, functools.partial) and factory.func is ResponseHandler
        )
        if self.counts:
            assert isinstance(factory, functools.partial)
            counting = functools.partial(CountingHandler, *factory.args, **factory.keywords)
            self._factory = counting  # type: ignore[assignment]  # a ResponseHandler too


class Watch:
    """One attempt in flight and its limits."""

    __slots__ = (
        "cancelling",
        "deadline",
        "due",
        "expired",
        "mark",
        "protocol",
        "read",
        "reported",
        "seen",
        "started",
        "task",
        "token",
    )

    def __init__(
        self, task: asyncio.Task[Any], read: float | None, total: float | None, now: float
    ):
        self.task: asyncio.Task[Any] = task
        #: The task's pending cancellations when the attempt started (``timed_out``).
        self.cancelling: int = task.cancelling()
        self.read: float | None = read
        self.started: float = now
        self.deadline: float = now + total if total is not None else math.inf
        #: When the watchdog looks at it next.
        self.due: float = (
            min(now + read / CHECKS, self.deadline) if read is not None else self.deadline
        )
        #: The connection's protocol, once it has one; what it had received by ``mark``.
        self.protocol: CountingHandler | None = None
        self.seen: int = 0
        #: When it got its connection, or the last look that found new bytes.
        self.mark: float = now
        #: "read", "total" or "closed" once the watchdog cancelled it; whether the caller
        #: heard.
        self.expired: str | None = None
        self.reported: bool = False
        self.token: contextvars.Token[Watch | None] | None = None

    @property
    def sent(self) -> bool:
        """Whether the request may have left this machine (it had a connection)."""
        return self.protocol is not None

    def describe(self) -> str:
        """Which limit ended it, for its error's message."""
        if self.expired == "closed":
            return "the client was closed"
        if self.expired == "total":
            return f"total limit of {self.deadline - self.started:g} s"
        return f"no byte of the reply for {self.read:g} s"


class Watchdog:
    """The attempts in flight on one event loop, and the one timer that looks at them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._live: set[Watch] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._when = math.inf
        #: Looks taken (each goes over every attempt in flight); for tests and benchmarks.
        self.looks: int = 0

    def __len__(self) -> int:
        return len(self._live)

    def start(self, read: float | None, total: float | None) -> Watch | None:
        """Watch the attempt the current task makes now (None: no limit to watch). Every
        ``start`` is followed by ``end`` in the same task."""
        if read is None and total is None:
            return None
        task = asyncio.current_task(self._loop)  # its loop given: no system call for it
        if task is None:  # not in a task (a bare coroutine driven by hand): nothing to cancel
            return None
        watch = Watch(task, read, total, time.monotonic())
        watch.token = _CURRENT.set(watch)
        self._live.add(watch)
        if watch.due < self._when:
            self._arm(watch.due)
        return watch

    def end(self, watch: Watch) -> None:
        """The attempt ended (in its task), however it did."""
        self._live.discard(watch)
        if watch.token is not None:
            _CURRENT.reset(watch.token)
        if watch.expired is not None and not watch.reported:
            watch.task.uncancel()  # the cancellation never reached the request: taken back

    def timed_out(self, watch: Watch | None) -> bool:
        """Whether the ``CancelledError`` being handled is this watchdog's, and so a timeout
        (asked once, in the task, as the attempt ends with it). False: a cancellation of the
        caller's own (too), which goes on."""
        if watch is None or watch.expired is None:
            return False
        watch.reported = True
        return watch.task.uncancel() <= watch.cancelling

    def close(self) -> None:
        """The transport closed: every attempt in flight ends ("closed": a connect in progress
        or a wait for a connection would not end with the session), and no more looks."""
        for watch in list(self._live):
            self._expire(watch, "closed")
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._when = math.inf

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._when = when
        self._timer = self._loop.call_later(max(0.0, when - time.monotonic()), self._look)

    def _look(self, now: float | None = None) -> None:
        """The timer's callback: every attempt whose look is due (``now``: for tests)."""
        self._timer = None
        self._when = math.inf
        self.looks += 1
        if now is None:
            now = time.monotonic()
        soonest = math.inf
        for watch in list(self._live):
            if watch.due <= now + _EPS and self._check(watch, now):
                continue
            if watch.due < soonest:
                soonest = watch.due
        if soonest < math.inf:
            self._arm(soonest)

    def _check(self, watch: Watch, now: float) -> bool:
        """Look at one attempt: True if it is past a limit (and cancelled), else its next
        look is set."""
        if now + _EPS >= watch.deadline:
            return self._expire(watch, "total")
        read = watch.read
        if read is None:
            watch.due = watch.deadline
            return False
        protocol = watch.protocol
        if protocol is None:  # still waiting for a connection: only ``total`` runs
            watch.due = min(now + read / CHECKS, watch.deadline)
            return False
        if protocol.received != watch.seen:
            watch.seen = protocol.received
            watch.mark = now
        elif now + _EPS >= watch.mark + read:
            return self._expire(watch, "read")
        watch.due = min(now + read / CHECKS, watch.mark + read, watch.deadline)
        return False

    def _expire(self, watch: Watch, why: str) -> bool:
        watch.expired = why
        self._live.discard(watch)
        watch.task.cancel()
        return True

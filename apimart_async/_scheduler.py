"""Admission decisions, logic only: what may start now, what waits, and for how long.

- ``Throttle`` (one per client): a 429 or ``Retry-After`` slows the whole client. Every request
  waits out the server's pause, and the concurrency of every batch is scaled by ``factor``,
  halved on a rate limit (at most once per ``cut_cooldown``) and raised additively on success
  (AIMD, as TCP does), so a 429 storm backs everyone off and a quiet spell recovers.
- ``RateLimiter`` (one per client, optional): a token bucket shared by submit, poll and
  download requests.
- ``SubmitScheduler`` (one per batch): at most ``concurrency`` (scaled by the throttle) submit
  requests in flight and at most ``max_pending`` submitted-but-unfinished tasks.

All methods are synchronous and take ``now`` (a monotonic clock) so tests use a fake clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["Budget", "RateLimiter", "SubmitScheduler", "Throttle"]


class Throttle:
    """Client-wide back-pressure from 429s (AIMD on a concurrency factor, plus pauses).

    ``client.throttle`` is the client's; read it, the client drives it. Each 429 multiplies
    ``factor`` by ``decrease`` (at most once per ``cut_cooldown`` seconds, never below
    ``min_factor``) and pauses every request until ``pause_until`` (the server's
    ``Retry-After``, else ``default_pause`` seconds); each success adds ``increase`` back.
    """

    def __init__(
        self,
        *,
        decrease: float = 0.5,
        increase: float = 0.05,
        min_factor: float = 0.05,
        cut_cooldown: float = 1.0,
        default_pause: float = 1.0,
    ) -> None:
        self.factor: float = 1.0
        """What every batch's concurrency is multiplied by now (1.0: no 429 lately)."""
        self.pause_until: float = 0.0
        """Monotonic time before which no request is sent."""
        self.decrease = decrease
        self.increase = increase
        self.min_factor = min_factor
        self.cut_cooldown = cut_cooldown
        self.default_pause = default_pause
        self.rate_limited: int = 0
        """429 replies seen."""
        self._last_cut = -math.inf

    def on_rate_limited(self, now: float, retry_after: float | None) -> None:
        """A 429 arrived at ``now``: pause, and cut the factor."""
        self.rate_limited += 1
        pause = self.default_pause if retry_after is None else retry_after
        self.pause_until = max(self.pause_until, now + pause)
        if now - self._last_cut >= self.cut_cooldown:
            self.factor = max(self.min_factor, self.factor * self.decrease)
            self._last_cut = now

    def on_success(self, now: float) -> None:
        """A request succeeded at ``now``: let the factor recover a step."""
        if self.factor < 1.0 and now - self._last_cut >= self.cut_cooldown:
            self.factor = min(1.0, self.factor + self.increase)

    def wait_time(self, now: float) -> float:
        """How long a request must wait before it may be sent (the server's pause)."""
        return max(0.0, self.pause_until - now)

    def scaled(self, limit: int) -> int:
        """``limit`` scaled by the factor (at least 1)."""
        return max(1, math.floor(limit * self.factor))

    def __repr__(self) -> str:
        return f"<Throttle factor={self.factor:.2f} rate_limited={self.rate_limited}>"


class RateLimiter:
    """A token bucket: at most ``rate`` requests a second on average, bursts of ``burst``."""

    def __init__(self, rate: float, *, burst: float | None = None) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"requests_per_second must be a positive number, got {rate!r}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        self._tokens = self.burst
        self._last: float | None = None

    def reserve(self, now: float, *, factor: float = 1.0) -> float:
        """Take one token; returns how long to wait before using it (0: at once). The rate is
        scaled by ``factor`` (the throttle's) so 429s slow the cap down too."""
        rate = self.rate * max(factor, 1e-6)
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * rate)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / rate


class SubmitScheduler:
    """Which job of one batch may be submitted now."""

    def __init__(self, *, concurrency: int, max_pending: int | None, throttle: Throttle) -> None:
        self.concurrency = concurrency
        self.max_pending = max_pending
        self.throttle = throttle
        self.in_flight = 0
        self.pending = 0
        self.max_in_flight_seen = 0
        self.max_pending_seen = 0

    @property
    def limit(self) -> int:
        """The concurrency in force now (``concurrency`` scaled by the client's throttle)."""
        return self.throttle.scaled(self.concurrency)

    def admit(self, now: float) -> float | None:
        """0.0: submit one now (then call ``started``). A positive number: wait that many
        seconds (the server asked for a pause). None: wait until a submit or a task ends."""
        pause = self.throttle.wait_time(now)
        if pause > 0:
            return pause
        if self.in_flight >= self.limit:
            return None
        if self.max_pending is not None and self.pending + self.in_flight >= self.max_pending:
            return None
        return 0.0

    def started(self) -> None:
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)

    def submitted(self, *, ok: bool) -> None:
        """A submit request ended; ``ok``: a task now exists and is pending."""
        self.in_flight -= 1
        if ok:
            self.pending += 1
            self.max_pending_seen = max(self.max_pending_seen, self.pending)

    def task_done(self) -> None:
        """A pending task ended (any outcome) or stopped being followed."""
        self.pending -= 1

    def __repr__(self) -> str:
        return (
            f"<SubmitScheduler in_flight={self.in_flight}/{self.limit} "
            f"pending={self.pending}/{self.max_pending if self.max_pending is not None else '∞'}>"
        )


class Budget:
    """``max_cost`` for a batch (USD): no submission that could pass it.

    Committed money = known costs of finished jobs + an estimate for every job submitted and
    not yet finished. A job's estimate comes from ``estimate(request)`` if given, else from
    what the same kind of job (model, duration, resolution) cost before. A job of a kind never
    seen is a price probe: one probe at a time across all kinds, each admitted only if the
    worst price known so far still fits (the very first runs on its own; without
    ``estimate`` nothing tells its price before it ends). ``batch.budget`` is the batch's.
    """

    def __init__(
        self, max_cost: float, estimate: Callable[[Any], float | None] | None = None
    ) -> None:
        if not (isinstance(max_cost, (int, float)) and max_cost >= 0 and math.isfinite(max_cost)):
            raise ValueError(f"max_cost must be a non-negative number of USD, got {max_cost!r}")
        self.max_cost: float = float(max_cost)
        """The limit, in USD."""
        self.spent: float = 0.0
        """Known costs of finished jobs, in USD."""
        self._estimate = estimate
        self._reserved: dict[int, float] = {}
        self._learned: dict[tuple[Any, ...], float] = {}
        self._probing: dict[tuple[Any, ...], int] = {}

    @staticmethod
    def kind(request: Any) -> tuple[Any, ...]:
        """What makes jobs cost the same: (model, duration, resolution)."""
        return (request.model, request.duration, request.resolution)

    @property
    def committed(self) -> float:
        """Money spent plus the estimates of jobs in flight, in USD."""
        return self.spent + sum(self._reserved.values())

    def estimate(self, request: Any) -> float | None:
        """What ``request`` is expected to cost, or None when nothing is known yet."""
        if self._estimate is not None:
            value = self._estimate(request)
            if value is not None:
                return float(value)
        return self._learned.get(self.kind(request))

    def check(self, request: Any) -> tuple[Literal["ok", "wait", "over"], float]:
        """ "ok" (with the estimate to reserve), "wait" (jobs in flight may free room or teach
        the price), or "over" (it cannot fit even when everything in flight is settled)."""
        est = self.estimate(request)
        if est is None:
            # A probe: the first job of its kind teaches the price. One probe at a time
            # across all kinds, admitted only if the worst price known so far still fits.
            if any(self._probing.values()):
                return "wait", 0.0
            est = max(self._learned.values(), default=0.0)
        if self.committed + est <= self.max_cost + 1e-9:
            return "ok", est
        if self._reserved:
            return "wait", est
        return "over", est

    def reserve(self, index: int, request: Any, est: float) -> None:
        """Job ``index`` is being submitted: hold ``est`` USD for it."""
        self._reserved[index] = est
        if self.estimate(request) is None:
            kind = self.kind(request)
            self._probing[kind] = self._probing.get(kind, 0) + 1

    def settle(self, index: int, request: Any, cost: float | None) -> None:
        """The job ended; ``cost`` is what it really cost (None: no task or unknown)."""
        self._reserved.pop(index, None)
        kind = self.kind(request)
        if self._probing.get(kind):
            self._probing[kind] -= 1
        if cost is not None:
            self.spent += cost
            if cost > 0:
                self._learned[kind] = max(cost, self._learned.get(kind, 0.0))

    def __repr__(self) -> str:
        return f"<Budget committed=${self.committed:.2f} of ${self.max_cost:.2f}>"

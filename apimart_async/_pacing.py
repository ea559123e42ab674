"""Pacing, logic only: how long a request waits before it is sent.

- ``Throttle`` (one per client): a 429 or ``Retry-After`` slows the whole client. Every request
  waits out the server's pause, and the concurrency of every batch is scaled by ``factor``,
  halved on a rate limit (at most once per ``cut_cooldown``) and raised additively on success
  (AIMD, as TCP does), so a 429 storm backs everyone off and a quiet spell recovers.
- ``RateLimiter``: a token bucket (``requests_per_second``).
- ``Pacing`` (one per client, held by the transport): the throttle and the set of rate limiters
  in force. The client's own cap (``AsyncApimart(requests_per_second=)``) stays for the
  client's life; a batch with ``requests_per_second`` adds its limiter while it runs and
  removes that same limiter when it ends, so overlapping batches each keep their own cap and
  the client is left as it was after them.

All methods are synchronous and take ``now`` (a monotonic clock) so tests use a fake clock.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Generator

from ._checks import check_positive_number
from ._retry import MAX_RETRY_AFTER

__all__ = ["Pacing", "RateLimiter", "Throttle"]


class Throttle:
    """Client-wide back-pressure from 429s (AIMD on a concurrency factor, plus pauses).

    ``client.throttle`` is the client's; read it, the client drives it. Each 429 multiplies
    ``factor`` by ``decrease`` (at most once per ``cut_cooldown`` seconds, never below
    ``min_factor``) and pauses every request until ``pause_until`` (the server's
    ``Retry-After`` up to 120 s, the longest a retry waits, else ``default_pause`` seconds); each
    success adds ``increase`` back.
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
        # at most the longest Retry-After a retry waits for: the request given a longer one
        # fails at once (RateLimitError), and every other request of the client must not
        # sleep for it unsent (an hour, under no timeout); past the cap, one probes again
        pause = min(pause, MAX_RETRY_AFTER)
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
        check_positive_number("requests_per_second", rate, finite=True)
        self.rate: float = float(rate)
        self.burst: float = float(burst) if burst is not None else max(1.0, self.rate)
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


class Pacing:
    """The throttle and the requests-per-second caps in force on one client's requests."""

    def __init__(
        self, throttle: Throttle | None = None, limiter: RateLimiter | None = None
    ) -> None:
        self.throttle: Throttle = throttle or Throttle()
        """Client-wide back-pressure from 429s."""
        self._limiters: list[RateLimiter] = [limiter] if limiter is not None else []

    @property
    def limiters(self) -> tuple[RateLimiter, ...]:
        """Every cap in force now (each request takes a token from each)."""
        return tuple(self._limiters)

    def add(self, limiter: RateLimiter) -> None:
        self._limiters.append(limiter)

    def idle(self) -> bool:
        """No cap in force and no server pause ever asked for: no request waits (checked
        before ``wait_time``, which reads the clock)."""
        return not self._limiters and self.throttle.pause_until == 0.0

    def remove(self, limiter: RateLimiter) -> None:
        """Take ``limiter`` (this very object) out; the others stay."""
        for i, held in enumerate(self._limiters):
            if held is limiter:
                del self._limiters[i]
                return

    @contextlib.contextmanager
    def capped(self, rate: float) -> Generator[RateLimiter, None, None]:
        """A cap of ``rate`` requests a second while the block runs."""
        limiter = RateLimiter(rate)
        self.add(limiter)
        try:
            yield limiter
        finally:
            self.remove(limiter)

    def wait_time(self, now: float, *, honour_pause: bool = True) -> float:
        """Seconds the next request waits: the server's pause (unless ``honour_pause`` is
        False) and a token of every cap (each scaled by the throttle's factor)."""
        wait = self.throttle.wait_time(now) if honour_pause else 0.0
        for limiter in self._limiters:
            wait = max(wait, limiter.reserve(now, factor=self.throttle.factor))
        return wait

    def __repr__(self) -> str:
        caps = ", ".join(f"{lim.rate:g}/s" for lim in self._limiters) or "none"
        return f"<Pacing factor={self.throttle.factor:.2f} caps: {caps}>"

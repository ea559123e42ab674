"""How many per-task status reads may be in flight: AIMD on a window, logic only (issue 22).

The poller's per-task reads (``GET /v1/tasks/{id}``, used when the batch status route is
refused or absent) go out one by one as they fall due, at most ``StatusWindow.limit`` at a
time. The window adapts as TCP's does (and as submits do under ``Throttle``):

- it starts at the client's ``status_concurrency``;
- while the window is what holds reads back (due reads waited for a free slot while this one
  was out), each reply that came back fast (within ``fast_factor`` times the fastest round
  trip seen, plus ``fast_slack`` seconds) and without a 429 or a retry widens it: by one per
  reply until the first cut (slow start: the window doubles every round trip), by one per
  window's worth of replies after it (additive increase);
- a 429, a 5xx, a timeout or any retry during a read narrows it by ``decrease`` (halves it),
  at most once per round trip, never below 1;
- it never exceeds ``maximum`` (the client's ``max_status_concurrency``) nor what the
  client's ``requests_per_second`` can feed (rate times the smoothed round trip: reads beyond
  that would only queue in the rate limiter).

All methods take ``now`` (the poller's monotonic clock), so tests drive it with a fake clock.
"""

from __future__ import annotations

import math
from typing import Final

import attrs

from ._checks import check_int, check_positive_int

__all__ = ["DEFAULT_MAX_STATUS_CONCURRENCY", "ReadTicket", "StatusWindow"]

#: ``AsyncApimart(max_status_concurrency=None)``: this, or ``status_concurrency`` if larger.
DEFAULT_MAX_STATUS_CONCURRENCY: Final = 64


@attrs.define(slots=True)
class ReadTicket:
    """One read in flight: when it left (the caller's clock). Never changed once made (not
    frozen: a frozen class costs three times as much to make, and one is made per read)."""

    sent_at: float


class StatusWindow:
    """The per-task status reads a client may have in flight (see the module docstring)."""

    def __init__(
        self,
        *,
        start: int,
        maximum: int,
        decrease: float = 0.5,
        fast_factor: float = 2.0,
        fast_slack: float = 0.05,
        rtt_weight: float = 0.125,
    ) -> None:
        check_positive_int("status_concurrency", start)
        least = f"status_concurrency ({start})"
        check_int("max_status_concurrency", maximum, minimum=start, least=least)
        self.start: int = start
        self.maximum: int = maximum
        self.decrease: float = decrease
        self.fast_factor: float = fast_factor
        self.fast_slack: float = fast_slack
        self.rtt_weight: float = rtt_weight
        self.window: float = float(start)
        """The window before the rate bound (may be fractional during additive increase)."""
        self.in_flight: int = 0
        self.slow_start: bool = True
        #: The fastest round trip seen, and a smoothed one (None before the first reply).
        self.min_rtt: float | None = None
        self.srtt: float | None = None
        #: Counters for stats and benchmarks.
        self.cuts: int = 0
        self.max_in_flight_seen: int = 0
        self._last_cut: float = -math.inf
        self._limited_at: float = -math.inf

    def limit(self, rate: float | None = None) -> int:
        """Reads allowed in flight now; ``rate``: the client's requests per second, if capped."""
        cap = self.maximum
        if rate is not None and rate > 0 and self.srtt is not None:
            cap = min(cap, max(1, math.ceil(rate * self.srtt)))
        limit = math.floor(self.window)
        if cap < limit:
            limit = cap
        return limit if limit > 1 else 1

    def free(self, rate: float | None = None) -> int:
        """How many more reads may leave now."""
        free = self.limit(rate) - self.in_flight
        return free if free > 0 else 0

    def held_back(self, now: float) -> None:
        """Reads are due that the window does not let out now (the window is the limit)."""
        self._limited_at = now

    def started(self, now: float) -> ReadTicket:
        """A read leaves at ``now``."""
        self.in_flight = in_flight = self.in_flight + 1
        if in_flight > self.max_in_flight_seen:
            self.max_in_flight_seen = in_flight
        return ReadTicket(now)

    def finished(self, ticket: ReadTicket, now: float, *, congested: bool) -> None:
        """The read of ``ticket`` ended at ``now``; ``congested``: it met a 429, a 5xx, a
        timeout or a retry (its own or another request's while it was out)."""
        # (``min`` and ``max`` of two spelled out: the poller's every read ends here)
        in_flight = self.in_flight - 1
        self.in_flight = in_flight if in_flight > 0 else 0
        rtt = now - ticket.sent_at
        if not rtt > 0.0:
            rtt = 0.0
        if congested:
            if now - self._last_cut >= (self.srtt or 0.0):
                self.window = max(1.0, self.window * self.decrease)
                self.slow_start = False
                self._last_cut = now
                self.cuts += 1
            return
        least = self.min_rtt
        if least is None or rtt < least:
            self.min_rtt = least = rtt
        srtt = self.srtt
        self.srtt = rtt if srtt is None else srtt + self.rtt_weight * (rtt - srtt)
        fast = rtt <= self.fast_factor * least + self.fast_slack
        if not fast or self._limited_at < ticket.sent_at or self.window >= self.maximum:
            return
        step = 1.0 if self.slow_start else 1.0 / max(1.0, self.window)
        self.window = min(float(self.maximum), self.window + step)

    def __repr__(self) -> str:
        return (
            f"<StatusWindow in_flight={self.in_flight}/{self.limit()} max={self.maximum} "
            f"cuts={self.cuts}>"
        )

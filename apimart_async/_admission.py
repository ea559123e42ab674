"""Admission decisions, logic only: which job of a batch may be submitted now, and whether
the money allows it.

- ``SubmitScheduler`` (one per batch): at most ``concurrency`` (scaled by the client's
  ``Throttle``, see ``_pacing``) submit requests in flight and at most ``max_pending``
  submitted-but-unfinished tasks.
- ``Budget`` (one per batch with ``max_cost``): no submission that could pass the limit.

All methods are synchronous and take ``now`` (a monotonic clock) so tests use a fake clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from ._checks import check_non_negative_number
from ._errors import BudgetExceededError, InsufficientBalanceError
from ._pacing import Throttle

__all__ = ["Budget", "SubmitScheduler", "admit_job", "require_balance"]


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

    @classmethod
    def of(cls, options: Any, throttle: Throttle) -> SubmitScheduler:
        """The scheduler of a batch's ``options`` (its ``concurrency`` and ``max_pending``)."""
        return cls(
            concurrency=options.concurrency, max_pending=options.max_pending, throttle=throttle
        )

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
        check_non_negative_number("max_cost", max_cost, unit="USD", finite=True)
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

    def exceeded(self, index: int) -> BudgetExceededError:
        """The error of job ``index``, refused because it could pass ``max_cost``."""
        return BudgetExceededError(
            f"budget reached: job {index} not submitted (${self.committed:.2f}"
            f" of ${self.max_cost:.2f} committed)"
        )

    def __repr__(self) -> str:
        return f"<Budget committed=${self.committed:.2f} of ${self.max_cost:.2f}>"


def require_balance(balance: Any, budget: Budget | None) -> None:
    """``check_balance``: refuse to start a batch when the balance (a ``Balance``) cannot pay
    for any job (less than a cent, or than the whole ``max_cost`` if that is smaller)."""
    if balance.unlimited:
        return
    budget_left = budget.max_cost if budget is not None else math.inf
    if balance.remain_balance <= 0 or balance.remain_balance < min(budget_left, 0.01):
        raise InsufficientBalanceError(
            f"balance ${balance.remain_balance:.2f} cannot cover any job; not starting",
            status=402,
            type="insufficient_balance",
        )


def admit_job(
    sched: SubmitScheduler,
    budget: Budget | None,
    index: int,
    request: Any,
    now: float,
    *,
    backlog_full: bool = False,
) -> float | Literal["over"] | None:
    """May job ``index`` be submitted now? ``0.0``: yes (its estimate is reserved in the
    budget; call ``sched.started()``); a positive number: wait that many seconds (the server
    asked for a pause); None: wait until a submit or a task ends (or the caller reads an
    outcome, with ``backlog_full``); ``"over"``: it cannot fit ``max_cost``."""
    if backlog_full:
        return None
    wait = sched.admit(now)
    if wait is None or wait > 0:
        return wait
    if budget is not None:
        verdict, est = budget.check(request)
        if verdict == "wait":
            return None
        if verdict == "over":
            return "over"
        budget.reserve(index, request, est)
    return 0.0

"""When to check which task: the poll schedule, logic only (no I/O, no clock of its own).

Every pending task of a client lives here with a next-check time. The async poller asks
``due(now)`` for the ids to check, sends the status requests, and reports back with
``on_status`` / ``on_missing`` / ``on_error``. Tests drive it with a fake clock.

How the next check is chosen (``PollPolicy``), issue 22:

1. A new task is first checked ``first_check`` seconds after it was submitted (``target_lag``
   if longer): that check learns ``estimated_time`` and ``progress``. A task of a kind whose
   completed tasks taught the schedule how long it takes (``_priors``) is first checked at the
   kind's earliest end instead, and its window uses how far the kind's estimates proved right.
2. Each status gives a window of plausible ends. ``estimated_time`` is trusted to within
   ``estimate_margin`` (25 %) either way, and to a rounding (whole seconds): the earliest
   plausible end is ``(estimated_time - 1) / (1 + margin)`` after the start, the latest
   ``estimated_time / (1 - margin)``. Progress lags elapsed time and stalls on real services,
   so it is never extrapolated as exact: without an estimate, half of its extrapolation is the
   early edge. With neither, ``default_estimate`` with the same margin.
   A kind whose progress proved to move in a straight line (``_priors``, issue 11) gets the
   window its last progress implies, when that is the narrower one and lies within the
   estimate's (partly outside it, the task's progress is not what the kind taught, and the
   estimate's window stands). The trust is what tasks that ended taught, and tasks in flight
   may show it no longer holds (the service's progress turned uneven): a task whose own
   readings fit no straight line from its start within the kind's trusted spread (each
   reading widened by its request's time) is followed as if nothing had been learned, and its
   kind's trust is in doubt until it leaves the schedule: used for none of the kind's tasks,
   and those whose next check it set fall back to the window without it. A learned window
   narrower than ``target_lag`` gets a single check, at its latest end; if that check finds
   the task still running, the task is followed from then on as if nothing had been learned.
3. Before the window, nothing is checked (the window's edge is the next check; ``max_interval``
   still caps every wait). From the window's edge until the task ends, two checks never leave
   more than ``target_lag`` seconds apart. With the batch route the checks sit on a grid of a
   quarter of ``target_lag`` so that tasks in their windows go out together; with per-task
   reads they leave earlier by half the last round's time (the reply is what counts). Past
   the latest plausible end by ``overdue_window`` of the span, the gaps grow by
   ``overdue_growth`` up to ``max_interval`` (a task that runs far too long is not hammered).
4. Checks before the window get a small positive jitter (never early). With the batch status
   route, tasks due within ``coalesce`` seconds or a quarter of ``target_lag`` (the longer)
   ride along in a request that is going out anyway, filling its last 100 ids.
5. A task submitted with a webhook (issue 15) gets no first check: a callback says when it
   ends (``hint``: read it in the next round). Polling is only the fallback: one safety check
   ``webhook_grace`` past its latest plausible end, then every ``webhook_interval``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Iterable
from typing import Final

import attrs

from ._checks import check_positive_int, check_positive_number
from ._errors import FieldError, OptionError
from ._models import Task
from ._priors import Priors

__all__ = ["BATCH_IDS", "PollPolicy", "PollSchedule"]

BATCH_IDS: Final = 100


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    check_positive_number(f"PollPolicy.{attribute.name}", value, finite=True)


def _count(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_positive_int(f"PollPolicy.{attribute.name}", value)


def _fraction(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise OptionError(
            [FieldError(f"PollPolicy.{attribute.name}", "must be between 0 and 1", value)]
        )


def _growth(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 1 <= value < math.inf
    if not ok:  # under 1, an overdue task's waits would shrink towards zero
        raise OptionError(
            [FieldError(f"PollPolicy.{attribute.name}", "must be a number >= 1", value)]
        )


def _flag(_: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise OptionError(
            [FieldError(f"PollPolicy.{attribute.name}", "must be True or False", value)]
        )


@attrs.frozen(kw_only=True)
class PollPolicy:
    """How often the shared poller checks a task (seconds). The defaults suit 5 s to 10 min
    videos; all of a client's tasks share one policy (the client's ``poll=``)."""

    target_lag: float = attrs.field(default=2.0, validator=_positive)
    """The trade between requests and how late an end is seen: from the earliest plausible
    end of a task until it ends, two checks are never more than this many seconds apart
    (less when ``max_interval`` is shorter). 10 s suits bulk scripts, 1 s web backends."""
    first_check: float = attrs.field(default=2.0, validator=_positive)
    """The first check, this long after the submit (it learns ``estimated_time``), or
    ``target_lag`` after it if that is longer (or, for a kind learned before, its earliest end)."""
    min_interval: float = attrs.field(default=1.0, validator=_positive)
    """The shortest wait between two checks of one task."""
    max_interval: float = attrs.field(default=60.0, validator=_positive)
    """The longest wait between two checks of a running task, whatever the prediction says
    (a task submitted with a webhook is checked every ``webhook_interval`` instead: a callback,
    not polling, is what tells its end)."""
    overdue_growth: float = attrs.field(default=1.5, validator=_growth)
    """Once a task is overdue, each wait is this many times the one before."""
    overdue_window: float = attrs.field(default=0.25, validator=_fraction)
    """How long (as a fraction of the predicted duration) checks stay at ``min_interval`` after the
    predicted end before they start to space out."""
    jitter: float = attrs.field(default=0.1, validator=_fraction)
    """Each wait is spread at random by up to this fraction, so checks do not bunch up."""
    coalesce: float = attrs.field(default=1.0, validator=_fraction)
    """Tasks due within this many seconds join a batch status request that has room."""
    default_estimate: float = attrs.field(default=30.0, validator=_positive)
    """The duration assumed for a task whose service gives no estimate."""
    estimate_margin: float = attrs.field(default=0.25, validator=_fraction)
    """Estimates are trusted to within this fraction: with no progress to go on, the next check
    comes at the early edge of the estimate (then progress says the rest)."""
    use_progress: bool = attrs.field(default=True, validator=_flag)
    """Whether progress reports move the predicted end."""
    not_found_grace: float = attrs.field(default=10.0, validator=_positive)
    """A task the service says it does not know ends as ``NotFoundError`` only once it has said so
    twice, at least this many seconds apart (a new task may not be visible everywhere yet;
    absence from a batch reply alone is never taken as proof)."""
    hard_error_tries: int = attrs.field(default=3, validator=_count)
    """Reads of a task that ended in an error waiting cannot heal (401, 403, a redirect, a 400 for a
    known id, a reply that cannot be read, completed without a video) before the wait ends with
    that error."""
    batch_route_retry: float = attrs.field(default=600.0, validator=_positive)
    """Seconds after which a batch status route that refused or kept failing is tried again (the
    client's policy only; meanwhile status reads go task by task)."""
    webhook_grace: float = attrs.field(default=10.0, validator=_positive)
    """A task submitted with a webhook (issue 15) is not polled until its latest plausible end
    plus this many seconds: the safety check, for a callback that never came."""
    webhook_interval: float = attrs.field(default=120.0, validator=_positive)
    """After its safety check, a task with a webhook is checked this many seconds apart (the
    slow cadence that stays the fallback when no callback comes)."""
    webhook_gather: float = attrs.field(default=0.27, validator=_positive)
    """With the batch status route, the callbacks that arrive within this many seconds of a
    first one are read together at the end of that window (at once when they fill a request
    of 100 ids): the trade between a callback's latency and status requests per job (the
    default keeps a callback's outcome within 0.3 s of it with a read of up to 30 ms, and
    reads about 50 callbacks per request when 200 come a second). Without the route, a
    callback's task is read at once."""


#: What ``_plan`` reads of a policy at every check, worked out once per policy (``_derive``):
#: lag (``target_lag`` capped by ``max_interval``), ``use_progress``, ``1 + estimate_margin``,
#: ``1 - estimate_margin`` (at least 1e-9), the default window's two edges after the start,
#: ``overdue_window``, the batch grid's step (a quarter of lag), the shortest nudge
#: (``min(min_interval, lag) / 2``) and ``max_interval``.
_Derived = tuple[float, bool, float, float, float, float, float, float, float, float]


def _derive(p: PollPolicy) -> _Derived:
    """``_Derived`` of ``p``: each value computed as ``_plan`` computed it at every check."""
    lag = p.max_interval if p.max_interval < p.target_lag else p.target_lag
    m = p.estimate_margin
    below = 1 - m if 1 - m > 1e-9 else 1e-9
    return (
        lag,
        p.use_progress,
        1 + m,
        below,
        p.default_estimate * (1 - m),
        p.default_estimate / max(1e-9, 1 - m),
        p.overdue_window,
        lag / 4,
        (lag if lag < p.min_interval else p.min_interval) * 0.5,
        p.max_interval,
    )


@attrs.define(slots=True)
class _Watch:
    task_id: str
    t0: float | None
    """Monotonic time the task started (submit time, or derived from ``created``), or None."""
    next_at: float
    policy: PollPolicy
    #: ``_derive(policy)``
    derived: _Derived
    #: Bumped at every new next-check time and when the task leaves the schedule: a heap
    #: entry of another version is stale.
    version: int = 0
    checking: bool = False
    deadline: float | None = None
    overdue_checks: int = 0
    #: When the check being answered was handed out by ``due`` (the caller's clock).
    sent_at: float | None = None
    last_at: float | None = None
    absences: int = 0
    absent_since: float | None = None
    checks: int = 0
    errors: int = 0
    hard_errors: int = 0
    #: issue 22, learned priors: the task's kind, its last estimate, when the last check that
    #: saw it running left
    kind: str | None = None
    estimate: float | None = None
    running_sent: float | None = None
    #: issue 11, progress trust. A check that sees progress p at age a implies, if progress
    #: moves in a straight line, an end between a*100/(p+1) and a*100/p: the last check's
    #: pair, the smallest a*100/p and the largest a*100/(p+1) of all its checks
    implied: tuple[float, float] | None = None
    implied_ceiling: float | None = None
    implied_floor: float | None = None
    #: the end of the narrow window the next check was set at (see ``_plan``); a check that
    #: still finds the task running past it sets ``distrusted``
    narrow_until: float | None = None
    #: the kind's progress trust no longer applies to this task, for good: a narrow window's
    #: check still found it running past the window's end, or its own readings do not fit one
    #: straight line within the kind's trusted spread (``_plan``)
    distrusted: bool = False
    #: its readings put its kind's trust in doubt (``_Doubts``) until it leaves the schedule
    doubting: bool = False
    #: the next check was set from the kind's trusted window; the window without the trust
    #: starts at ``fallback`` (``_fall_back``)
    trusted: bool = False
    fallback: float = 0.0
    #: the largest floor and the smallest ceiling of its readings, each widened by the time of
    #: its request (``_fits``)
    line_floor: float = 0.0
    line_ceiling: float = math.inf
    #: issue 15: a webhook will say when the task ends (polled slowly, as a fallback); a
    #: callback came while a check was in flight (the check may predate the end)
    webhook: bool = False
    hinted: bool = False
    #: a wait of this task ends at a deadline: with a webhook, it is checked once before
    #: (``LAST_LOOK``), so a callback that never came does not fail a finished task unseen
    look_by: float | None = None


#: Callbacks for tasks nobody follows yet (a submit, then a wait; a wait registered after
#: ``on_submitted``) are kept this many seconds, at most ``EARLY_HINTS`` of them (the oldest go
#: first: callbacks are unsigned, anyone may send them): a wait that starts meanwhile reads its
#: task at once instead of trusting a callback that already came.
EARLY_HINT_AGE = 600.0
EARLY_HINTS = 10_000

#: How long before a wait's deadline a task with a webhook gets its last look: a tenth of the
#: wait, at most this many seconds.
LAST_LOOK = 5.0


class _EarlyHints:
    """Callbacks for tasks nobody follows yet: id -> when, ``EARLY_HINT_AGE`` seconds at
    most, ``EARLY_HINTS`` of them at most (the oldest go first)."""

    __slots__ = ("_at",)

    def __init__(self) -> None:
        self._at: dict[str, float] = {}

    def note(self, task_id: str, now: float) -> None:
        self._at.pop(task_id, None)
        self._at[task_id] = now
        if len(self._at) > EARLY_HINTS:
            del self._at[next(iter(self._at))]

    def take(self, task_id: str, now: float) -> bool:
        """Whether a callback for ``task_id`` came lately (forgotten now)."""
        at = self._at.pop(task_id, None)
        return at is not None and now - at <= EARLY_HINT_AGE


class _Gathering:
    """The callbacks of a window of ``webhook_gather`` seconds (from the first) are read
    together at its end, or at once when they fill a request of ``BATCH_IDS`` (issue 15)."""

    __slots__ = ("ends", "window")

    def __init__(self) -> None:
        self.window: list[_Watch] = []
        self.ends = -math.inf

    def times(self, w: _Watch, now: float) -> list[tuple[_Watch, float]]:
        """The next checks to set for a callback of ``w`` at ``now``."""
        if now >= self.ends:
            self.window, self.ends = [], now + w.policy.webhook_gather
        if not self.ends < w.next_at:
            return []  # due sooner anyway (or hinted in this window already)
        self.window.append(w)
        if len(self.window) < BATCH_IDS:
            return [(w, self.ends)]
        full, self.window, self.ends = self.window, [], now
        return [(x, now) for x in full]


class _Doubts:
    """Kinds whose progress trust tasks in flight put in doubt: a task whose own readings fit
    no straight line within its kind's trusted spread holds a doubt on the kind until it
    leaves the schedule (it has ended, and taught the kind what it showed). While a kind is in
    doubt its trust is used for none of its tasks (``PollSchedule._plan``): trust learned from
    tasks that ended is not taken over what tasks in flight show."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def __contains__(self, kind: object) -> bool:
        return kind in self._held

    def hold(self, kind: str) -> bool:
        """One more doubt on ``kind``; True when it was not in doubt (its tasks whose next
        check the trust set must fall back: ``_fall_back``)."""
        held = self._held.get(kind, 0)
        self._held[kind] = held + 1
        return held == 0

    def release(self, kind: str) -> None:
        held = self._held.pop(kind, 0)
        if held > 1:
            self._held[kind] = held - 1


class PollSchedule:
    """The next-check times of every watched task. All times are the caller's monotonic clock.

    Example (fake clock)::

        s = PollSchedule(PollPolicy(jitter=0))
        s.add("task_a", now=0.0)
        s.due(now=1.0)   # []
        s.due(now=2.0)   # ["task_a"]
    """

    def __init__(self, policy: PollPolicy | None = None, *, seed: int | None = None) -> None:
        self.policy: PollPolicy = policy or PollPolicy()
        #: the last policy a task was added with, and its ``_derive`` (tasks come in runs of
        #: one policy: a client's, a batch's; one kept, so a policy per batch is no leak)
        self._derived: tuple[PollPolicy, _Derived] = (self.policy, _derive(self.policy))
        self._rng = random.Random(seed)
        self._watches: dict[str, _Watch] = {}
        #: What finished tasks taught, by kind (see ``_priors``); a batch's journal keeps them.
        self.priors: Priors = Priors()
        #: (next check at, sequence, watch, its version then): an entry whose version is not
        #: the watch's any more is stale and dies when it comes up
        self._heap: list[tuple[float, int, _Watch, int]] = []
        self._deadlines: list[tuple[float, str, int]] = []
        self._seq = itertools.count()
        #: Whether the last ``due`` was for the batch route (checks then share a grid).
        self._batched = True
        #: issue 15: the callbacks of the current gathering window
        self._gathering = _Gathering()
        #: callbacks for tasks not followed (yet)
        self._early = _EarlyHints()
        #: kinds whose progress trust tasks in flight put in doubt
        self._doubts = _Doubts()

    # -- membership ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._watches)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._watches

    def ids(self) -> list[str]:
        return list(self._watches)

    def add(
        self,
        task_id: str,
        *,
        now: float,
        submitted_at: float | None = None,
        deadline: float | None = None,
        check_now: bool = False,
        policy: PollPolicy | None = None,
        kind: str | None = None,
        webhook: bool = False,
        wait_ends: tuple[float, float] | None = None,
    ) -> None:
        """Watch a task (with its own ``policy``, else the schedule's). ``submitted_at``: when
        it was submitted (default ``now``); a task re-attached from elsewhere passes
        ``check_now=True`` to be checked at once. ``kind`` (``_priors.kind_of``): a known kind
        is first checked at its earliest end seen, not ``first_check`` after the submit.
        ``webhook``: a callback will say when it ends (``hint``); it is polled only as a
        fallback (``_webhook_check``), and checked once before ``wait_ends`` (a waiter's
        deadline and timeout) if nothing said it ended by then."""
        look_by = None if wait_ends is None else wait_ends[0] - min(LAST_LOOK, wait_ends[1] / 10)
        existing = self._watches.get(task_id)
        if existing is not None:
            _rejoin(self, existing, now, deadline, check_now, webhook, look_by)
            return
        pol = policy or self.policy
        t0 = now if submitted_at is None and not check_now else submitted_at
        # no check is due before target_lag: a task ending at once is still seen within it
        wait = max(pol.first_check, min(pol.target_lag, pol.max_interval))
        prior = self.priors.get(kind)
        if prior is not None:  # a known kind: nothing to learn before its earliest end
            wait = max(wait, prior.durations()[0])
        first = now if check_now else (t0 if t0 is not None else now) + min(wait, pol.max_interval)
        derived = self._derived
        if derived[0] is not pol:
            derived = self._derived = (pol, _derive(pol))
        if webhook and not check_now:  # no first check: the safety check at the latest end
            latest = derived[1][5] if prior is None else prior.durations()[1]
            first = (t0 if t0 is not None else now) + latest + pol.webhook_grace
            if look_by is not None and look_by < first:  # the last look before a deadline
                first = max(now, look_by)
        if self._early.take(task_id, now):
            first = now  # a callback came before this wait: look at once
        watch = _Watch(
            task_id, t0, next_at=first, policy=pol, derived=derived[1], deadline=deadline, kind=kind
        )
        watch.webhook = webhook
        watch.look_by = look_by
        self._watches[task_id] = watch
        self._push(watch, first)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, task_id, watch.version))

    def remove(self, task_id: str) -> None:
        self._drop(self._watches.pop(task_id, None))  # heap entries die lazily

    def next_check(self, task_id: str) -> float | None:
        w = self._watches.get(task_id)
        return None if w is None or w.checking else w.next_at

    def due_at(self, task_id: str) -> float | None:
        """When the check being made (or the next one) fell or falls due; None: not watched.
        ``now - due_at`` for an id ``due`` just handed out: how late its check leaves."""
        w = self._watches.get(task_id)
        return None if w is None else w.next_at

    def hint(self, task_id: str, now: float) -> bool:
        """A callback said ``task_id`` ended (issue 15): check it in the next round, within
        ``webhook_gather`` on the batch route (callbacks together share a request). False:
        not watched. A callback during its check: checked again if that check sees it run."""
        w = self._watches.get(task_id)
        if w is None:  # kept a while: its wait may start later (submit, then wait)
            self._early.note(task_id, now)
            return False
        if w.checking:
            w.hinted = True
        elif not self._batched:
            self._set(w, _not_before(w, now))
        else:  # the batch route: callbacks that come together share a request
            for x, at in self._gathering.times(w, now):
                if self._watches.get(x.task_id) is x and not x.checking:
                    self._set(x, _not_before(x, at))
        return True

    # -- what to do now ------------------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        """The earliest time anything is due (a check or a deadline), or None."""
        heap, dl = self._heap, self._deadlines
        while heap:  # stale entries die here (``_prune``, the checks' half inline)
            _at, _, w, version = heap[0]
            if w.version == version and not w.checking:
                break
            heapq.heappop(heap)
        if dl:
            self._prune()
        if heap:
            at = heap[0][0]
            if dl and dl[0][0] < at:
                return dl[0][0]
            return at
        return dl[0][0] if dl else None

    def due(self, now: float, *, batched: bool = True, limit: int | None = None) -> list[str]:
        """Ids to check now (at most ``limit``, the earliest due first). With ``batched``,
        tasks due within ``coalesce`` seconds are added while they fill the last request of
        100 ids. Returned tasks are marked as being checked until
        ``on_status``/``on_missing``/``on_error`` reports on them."""
        self._batched = batched
        heap = self._heap
        if not heap or heap[0][0] > now or (limit is not None and limit <= 0):
            return []  # nothing due (what ``_pop_until`` would find, found at once)
        out: list[str] = []
        self._pop_until(now, now, out, limit)
        if batched and out:
            pol = self.policy
            # a request is going out anyway: tasks due within a quarter of target_lag (or
            # coalesce, if longer) ride along, so that checks of many tasks share requests
            horizon = max(pol.coalesce, min(pol.target_lag, pol.max_interval) / 4)
            room = (-len(out)) % BATCH_IDS
            if room and horizon > 0:
                self._pop_until(now + horizon, now, out, room)
        return out

    def expired(self, now: float) -> list[str]:
        """Ids whose deadline has passed; they are removed from the schedule."""
        out: list[str] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, task_id, _version = heapq.heappop(self._deadlines)
            w = self._watches.get(task_id)
            if w is not None and w.deadline is not None and w.deadline <= now:
                self._drop(self._watches.pop(task_id))
                out.append(task_id)
        return out

    # -- reports -------------------------------------------------------------------------------

    def on_status(self, task: Task, now: float, *, wall_now: float | None = None) -> bool:
        """Record a status. Returns True when the task is terminal (and no longer watched)."""
        w = self._watches.get(task.id)
        if w is None:
            return task.is_terminal
        w.checking = False
        w.checks += 1
        w.absences = 0
        w.absent_since = None
        w.errors = 0
        w.hard_errors = 0
        if task.is_terminal:
            del self._watches[task.id]
            w.version += 1  # ``_drop``, inline
            self._learn(w, task, now)
            if w.doubting:  # what it showed is learned: the doubt it held goes
                self._drop(w)
            return True
        if w.t0 is None and task.created is not None and wall_now is not None:
            age = wall_now - task.created
            if 0 <= age <= 7 * 24 * 3600:
                w.t0 = now - age
        self._plan(w, task, now)
        if w.hinted:  # a callback came while this check was out: it may predate the end
            w.hinted = False
            self._set(w, min(w.next_at, now + w.policy.webhook_gather))
        return False

    def on_missing(self, task_id: str, now: float, *, times: int = 2) -> bool:
        """The service said it does not know the task. Returns True once it has said so
        ``times`` times with no status in between, the last at least the policy's
        ``not_found_grace`` seconds after the first (the task no longer exists); else the task
        is checked again when that can be."""
        w = self._watches.get(task_id)
        if w is None:
            return False
        w.checking = False
        w.absences += 1
        if w.absent_since is None:
            w.absent_since = now
        grace = w.policy.not_found_grace
        if w.absences >= times and now - w.absent_since >= grace:
            self._drop(self._watches.pop(task_id))
            return True
        self._set(w, max(now + w.policy.min_interval, w.absent_since + grace))
        return False

    def on_error(self, task_ids: Iterable[str], now: float) -> None:
        """A status request failed (after its own retries): try these again later, backing
        off exponentially up to ``max_interval``."""
        for task_id in task_ids:
            w = self._watches.get(task_id)
            if w is None:
                continue
            w.checking = False
            w.errors += 1
            self._set(w, now + self._backoff(w))

    def on_hard_error(self, task_id: str, now: float) -> bool:
        """A read ended in an error that waiting is unlikely to heal. Returns True on the
        ``hard_error_tries``-th in a row (the task is no longer watched); else it is read again
        after a backoff."""
        w = self._watches.get(task_id)
        if w is None:
            return False
        w.checking = False
        w.errors += 1
        w.hard_errors += 1
        if w.hard_errors >= w.policy.hard_error_tries:
            self._drop(self._watches.pop(task_id))
            return True
        self._set(w, now + self._backoff(w))
        return False

    def release(self, task_ids: Iterable[str], now: float) -> None:
        """Ids handed out by ``due`` that are still marked as being checked get an error
        report (a round that ended without reporting on them never strands them)."""
        self.on_error([t for t in task_ids if (w := self._watches.get(t)) and w.checking], now)

    def _learn(self, w: _Watch, task: Task, now: float) -> None:
        """A task ended: a completed one of a known kind and start teaches its kind's prior."""
        kind = w.kind
        if kind is None or w.t0 is None or not task.ok:
            return
        running = None if w.running_sent is None else w.running_sent - w.t0
        estimate = task.estimated_time if task.estimated_time else w.estimate
        extrapolated = None
        if w.implied_ceiling is not None and w.implied_floor is not None:
            extrapolated = (w.implied_ceiling, w.implied_floor)
        earned = self.priors.progress_trust(kind) is not None  # doubts aside: earned before
        self.priors.observe(
            kind,
            seen_running=running,
            seen_done=now - w.t0,
            estimate=estimate,
            extrapolated=extrapolated,
            implied=None if w.implied is None else sum(w.implied) / 2,
        )
        if not earned and self._trust(kind) is not None:
            _replan_kind(self, kind, now)

    def _trust(self, kind: str | None) -> tuple[float, float] | None:
        """The range of ``duration / extrapolated`` the kind's progress earned, or None (also
        while tasks in flight put it in doubt)."""
        return None if kind in self._doubts else self.priors.progress_trust(kind)

    @staticmethod
    def _backoff(w: _Watch) -> float:
        growth: float = 2.0 ** min(w.errors, 32)
        return min(w.policy.max_interval, w.policy.min_interval * growth)

    # -- internals -----------------------------------------------------------------------------

    def _push(self, w: _Watch, at: float) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), w, w.version))

    def _set(self, w: _Watch, at: float) -> None:
        w.version = version = w.version + 1
        w.next_at = at
        heapq.heappush(self._heap, (at, next(self._seq), w, version))

    def _drop(self, w: _Watch | None) -> None:
        """``w`` has left the schedule: its heap entries are stale from now on, and the doubt
        it held on its kind's trust goes."""
        if w is not None:
            w.version += 1
            if w.doubting and w.kind is not None:
                w.doubting = False
                self._doubts.release(w.kind)

    def _prune(self) -> None:
        heap = self._heap
        watches = self._watches
        while heap:
            _at, _, w, version = heap[0]
            if w.version == version and not w.checking:
                break
            heapq.heappop(heap)
        dl = self._deadlines
        while dl:
            _, task_id, version = dl[0]
            kept = watches.get(task_id)
            if kept is not None and kept.deadline is not None and kept.deadline <= dl[0][0]:
                break
            heapq.heappop(dl)

    def _pop_until(self, until: float, sent: float, out: list[str], limit: int | None) -> None:
        """Hand out (into ``out``) the tasks due by ``until``, at most ``limit``, as checks
        that leave at ``sent``."""
        heap = self._heap
        pop = heapq.heappop
        append = out.append
        # no limit: at most every entry (stale ones are popped without counting)
        left = len(heap) if limit is None else limit
        while heap and left > 0 and heap[0][0] <= until:
            _, _, w, version = pop(heap)
            if w.version != version or w.checking:
                continue
            w.checking = True
            w.sent_at = sent
            append(w.task_id)
            left -= 1

    def _jittered(self, w: _Watch, now: float, at: float) -> float:
        # min / max spelled out (this runs at every check): the same values, in the same cases
        p = w.policy
        delay = at - now
        if not delay > 0.0:
            delay = 0.0
        if p.max_interval < delay:
            delay = p.max_interval
        short = p.min_interval if p.min_interval < delay else delay
        return now + delay + p.jitter * short * self._rng.random()

    def _plan(self, w: _Watch, task: Task, now: float) -> None:
        """Choose the next check of a running task (see the module docstring).

        It runs at every check of every task (issue 22's simulator: millions of times), so
        what it needs of the policy is worked out once (``_Derived``), and ``min`` and ``max``
        of two numbers are spelled out as comparisons that pick the same one in every case
        (``min(a, b)`` is ``b if b < a else a``)."""
        lag, use_progress, over, below, default_lo, default_hi, overdue, step, nudge, longest = (
            w.derived
        )
        start = w.t0
        progress = task.progress if use_progress else None
        estimate = task.estimated_time
        if not (estimate and estimate > 0):
            estimate = None
        w.last_at = now
        sent = w.sent_at
        if sent is None:
            sent = now
        w.running_sent = sent
        if estimate is not None:
            w.estimate = estimate
        prior, ratios, trust = self.priors.usable(w.kind)
        if w.narrow_until is not None:
            # a narrow window's check found the task still running (a check that rode along
            # before the window's end, on the batch route, proves nothing against it)
            if sent >= w.narrow_until - 1e-9:
                w.distrusted = True
            w.narrow_until = None
        # the duration the progress implies, as of when the service read it (about halfway
        # through the request): learned from at every check, trusted once a kind taught it
        implied = None
        seen = (sent + now) / 2
        if start is not None and progress is not None and 0 < progress < 100 and seen > start:
            age = seen - start
            floor, ceiling = age * 100.0 / (progress + 1), age * 100.0 / progress
            implied = (floor, ceiling)
            f, c = w.implied_floor, w.implied_ceiling
            f = floor if f is None or floor > f else f
            c = ceiling if c is None or ceiling < c else c
            w.implied_floor, w.implied_ceiling = f, c
            _read_line(self, w, trust, (start, sent, now), progress)
        w.implied = implied
        # The earliest and latest plausible ends. An estimate is off by up to estimate_margin
        # either way; progress may lag elapsed time and stall, so it only ever stands in for a
        # missing estimate, and then with half its extrapolation as the early edge.
        lo: float
        hi: float
        learned = False  # whether the window is what this kind's completed tasks taught
        if start is None:
            lo = hi = now  # age unknown: any moment may be the end
        elif estimate is not None and ratios is not None:
            # a known kind: the range of duration / estimate its completed tasks showed
            lo = start + estimate * ratios[0]
            hi = start + estimate * ratios[1]
            learned = True
        elif estimate is not None:
            # whole seconds on the wire: an estimate rounded up may be up to 1 s over
            rounded = estimate - 1
            lo = start + (rounded if rounded > 0.0 else 0.0) / over
            hi = start + estimate / below
        elif progress is not None and 0 < progress < 100 and now > start:
            extrapolated = (now - start) * 100.0 / progress
            lo = start + 0.5 * extrapolated
            hi = start + extrapolated
        elif prior is not None:
            lo, hi = (start + d for d in prior.durations())
        else:
            lo = start + default_lo
            hi = start + default_hi
        if w.distrusted or (trust is not None and w.kind in self._doubts):
            trust = None
        w.trusted = False
        w.fallback = lo
        if trust is not None and implied is not None and start is not None:
            # a kind whose progress proved straight: its window, when it lies within the one
            # the estimate gives (if any). Partly outside it, this task's progress is not what
            # the kind taught (a slow start, say) and the estimate's window stands: cut down
            # to the part inside, a wide window's edge would pass for a narrow window (one
            # check at its end, an end early in the estimate's window seen a minute late)
            lo_p, hi_p = start + implied[0] * trust[0], start + implied[1] * trust[1]
            inside = estimate is None or (lo <= lo_p and hi_p <= hi)
            if inside and lo_p <= hi_p and hi_p - lo_p < hi - lo:
                lo, hi = lo_p, hi_p
                w.trusted = True
                learned = True
        if w.webhook:  # age unknown: no end to expect, the slow cadence
            w.trusted = False  # (a callback says when it ends: nothing to fall back to)
            at = _webhook_check(w.policy, now, hi if start is not None else -math.inf)
            if w.look_by is not None and now < w.look_by < at:
                at = w.look_by  # the last look before a wait gives up
            self._set(w, at)
            return
        span = hi - (start if start is not None else now)
        if lag > span:
            span = lag
        if learned and not w.distrusted and now < hi and hi - lo <= lag:
            # A window narrower than target_lag (learned): one check at its latest end sees
            # the end within target_lag. If that check finds the task running, the window was
            # wrong for this task: from then on it is followed as any other.
            # (max_interval still caps the wait: an end progress mispredicted is not missed
            # for longer than that)
            w.narrow_until = hi
            self._set(w, min(max(hi, now + nudge), now + longest))
            return
        if now + lag < lo:
            # before the window: nothing to learn until its edge (max_interval still caps)
            self._set(w, self._jittered(w, now, lo))
            return
        # In the window (or past it): checks target_lag apart, counted from when the last one
        # left, on a grid of a quarter of target_lag so that tasks in their windows go out
        # together (one batch request for many). Past the latest plausible end by more than
        # overdue_window of the span, the gaps grow by overdue_growth up to max_interval.
        if now <= hi + overdue * span:
            w.overdue_checks = 0
            if self._batched:
                at = math.floor((sent + lag) / step) * step
            else:
                # per-task reads share nothing, so no grid (it would only bunch reads into
                # waves); and a reply is seen only when its round is back, so the slower the
                # last round, the sooner the next check leaves
                took = now - sent
                at = sent + lag - 0.5 * (took if took > 0.0 else 0.0)
            if at <= now:
                at = now + nudge
            w.version = version = w.version + 1  # ``_set``, inline (the most common case)
            w.next_at = at
            heapq.heappush(self._heap, (at, next(self._seq), w, version))
            return
        p = w.policy
        interval = lag * p.overdue_growth**w.overdue_checks
        if interval < p.max_interval:  # once there, the count stops (growth**n would overflow)
            w.overdue_checks += 1
            interval = min(p.max_interval, interval * p.overdue_growth)
        else:
            interval = p.max_interval
        self._set(w, self._jittered(w, now, now + interval))


def _rejoin(
    s: PollSchedule,
    w: _Watch,
    now: float,
    deadline: float | None,
    check_now: bool,
    webhook: bool,
    look_by: float | None,
) -> None:
    """``PollSchedule.add`` of a task watched already: the earlier deadline and last look,
    a webhook, a check now."""
    w.webhook = w.webhook or webhook
    if look_by is not None and (w.look_by is None or look_by < w.look_by):
        w.look_by = look_by
        if w.webhook and not w.checking and look_by < w.next_at:
            s._set(w, max(now, look_by))
    if deadline is not None and (w.deadline is None or deadline < w.deadline):
        w.deadline = deadline
        heapq.heappush(s._deadlines, (deadline, w.task_id, w.version))
    if check_now and not w.checking:
        s._set(w, now)


def _replan_kind(s: PollSchedule, kind: str, now: float) -> None:
    """The kind's progress has just earned trust: its tasks waiting for a check are moved
    to the end their last progress implies, when that window is narrower than target_lag
    (as ``_plan`` would have done had the trust been there)."""
    trust = s._trust(kind)
    if trust is None:
        return
    for w in s._watches.values():
        if w.kind != kind or w.checking or w.distrusted or w.t0 is None:
            continue
        if w.implied is None:
            continue
        lag = min(w.policy.target_lag, w.policy.max_interval)
        lo, hi = w.t0 + w.implied[0] * trust[0], w.t0 + w.implied[1] * trust[1]
        if now < hi and hi - lo <= lag:
            w.narrow_until = hi
            w.trusted = True
            soonest = now + min(w.policy.min_interval, lag) * 0.5
            # max_interval from its last check still caps the wait
            cap = (now if w.last_at is None else w.last_at) + w.policy.max_interval
            s._set(w, max(soonest, min(hi, cap)))


def _read_line(
    s: PollSchedule,
    w: _Watch,
    trust: tuple[float, float] | None,
    times: tuple[float, float, float],
    progress: float,
) -> None:
    """A reading of ``progress`` % of ``w`` (``times``: when it started, when the request left,
    when it came back). The end a straight line through it implies, as wide as the
    request's time makes it (the service read the progress at some moment of it, and the
    submit took about as long), is kept with the others'; when no straight line within the
    kind's trusted spread passes through all of them (a plateau, a slow start, a change of
    pace), the trust is not for this task, and in doubt for its kind's tasks in flight until
    it leaves the schedule (``_Doubts``)."""
    start, sent, now = times
    f = (sent - (now - sent) - start) * 100.0 / (progress + 1)
    c = (now - start) * 100.0 / progress
    if w.line_floor > f:
        f = w.line_floor
    if w.line_ceiling < c:
        c = w.line_ceiling
    w.line_floor, w.line_ceiling = f, c
    if trust is not None and not w.distrusted and not _fits(f, c, trust):
        w.distrusted = w.doubting = True
        w.trusted = False
        if w.kind is not None and s._doubts.hold(w.kind):
            _fall_back(s, w.kind, now)


def _fits(floor: float, ceiling: float, trust: tuple[float, float]) -> bool:
    """Whether a straight line from the submit, within the kind's trusted spread (and at least
    the whole percents' rounding), passes through every reading of a task: the largest
    ``floor`` and the smallest ``ceiling`` they implied leave room for one end."""
    lo, hi = trust
    return floor * (lo if lo < 1.0 else 1.0) <= ceiling * (hi if hi > 1.0 else 1.0)


def _fall_back(s: PollSchedule, kind: str, now: float) -> None:
    """The kind's trust has just been put in doubt: its tasks whose next check the trusted
    window set get the check the window without it gives (its early edge, or target_lag
    after the last check, at once if that is past), when that is sooner."""
    for w in s._watches.values():
        if w.kind != kind or not w.trusted or w.checking:
            continue
        w.trusted = False
        w.narrow_until = None
        lag, nudge = w.derived[0], w.derived[8]
        last = now if w.running_sent is None else w.running_sent
        at = w.fallback if w.fallback > last + lag else last + lag
        if at < now + nudge:
            at = now + nudge
        if at < w.next_at:
            s._set(w, at)


def _not_before(w: _Watch, at: float) -> float:
    """``at``, or later: a callback (unsigned: anyone may send one, as often as they like)
    never gets a task checked sooner than ``min_interval`` after its last check."""
    if w.last_at is None:
        return at
    return max(at, w.last_at + w.policy.min_interval)


def _webhook_check(p: PollPolicy, now: float, latest: float) -> float:
    """The next check of a running task with a webhook (issue 15): the safety check
    ``webhook_grace`` past its latest plausible end, or, once that is past, the slow cadence
    (``webhook_interval``); polling stays the fallback when no callback comes."""
    at = latest + p.webhook_grace
    if at < now + p.min_interval:
        at = now + p.webhook_interval
    return at if at < now + p.webhook_interval else now + p.webhook_interval

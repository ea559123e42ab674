"""Trying the poller as a new user would (issues 11 and 22): odd policies, progress that
misleads, a trusted kind's one check at the end its progress implies. Fake clock only."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from pathlib import Path

import anyio
import pytest

import apimart_async as am
from apimart_async._journal import SqliteJournal
from apimart_async._poll_schedule import PollSchedule
from apimart_async._priors import KindPrior
from apimart_async.emulator import RealisticProfile
from apimart_async.emulator._realistic import Curve

from .test_priors import run_kind, straight

KIND = "sora-2/8//text"


def teach_straight(s: PollSchedule, rng: random.Random, n: int, lo: float, hi: float) -> None:
    """``n`` jobs of ``lo``-``hi`` s whose progress is straight, their estimates off by up to
    20 %, run through ``s``: its kind learns to trust their progress."""
    run_kind(s, [_straight_job(rng.uniform(lo, hi), rng) for _ in range(n)], KIND)


def _straight_job(d: float, rng: random.Random) -> tuple[float, int, Curve]:
    return (d, round(d * rng.uniform(0.8, 1.2)), straight(d))


def trusted(policy: am.PollPolicy, lo: float = 0.999, hi: float = 1.0) -> PollSchedule:
    """A schedule whose kind's progress proved straight (50 tasks, within 0.1 %), or whose
    learned progress trust is ``lo`` to ``hi``."""
    s = PollSchedule(policy)
    s.priors.merge(
        {
            KIND: KindPrior(
                samples=50,
                duration_lo=5.0,
                duration_hi=600.0,
                progress_samples=50,
                progress_lo=lo,
                progress_hi=hi,
            )
        }
    )
    return s


def running(task_id: str, progress: int | None = None) -> am.Task:
    return am.Task(id=task_id, status=am.TaskStatus.PROCESSING, progress=progress)


@pytest.mark.parametrize("target_lag", [10.0, 30.0])
def test_the_one_check_at_the_end_progress_implies_still_obeys_max_interval(
    target_lag: float,
) -> None:
    """max_interval is 'the longest wait between two checks of a running task, whatever the
    prediction says'. With target_lag 10 s, 50 % at 70 s implies an end 70 s later, within a
    window (1.4 s) narrower than target_lag: the one check there must still come within
    max_interval (60 s), or an end the progress mispredicted is seen minutes late."""
    policy = am.PollPolicy(jitter=0.0, target_lag=target_lag)
    s = trusted(policy)
    s.add("a", now=0.0, kind=KIND)
    first = s.next_check("a")
    assert first is not None and s.due(first, batched=False) == ["a"]
    s.on_status(running("a", 1), first)
    second = s.next_check("a")
    assert second == pytest.approx(first + policy.max_interval)
    assert s.due(second, batched=False) == ["a"]
    s.on_status(running("a", 50), second)
    third = s.next_check("a")
    assert third is not None
    assert third - second <= policy.max_interval + 1e-9


def test_tasks_moved_when_their_kind_earns_trust_still_obey_max_interval() -> None:
    """The same bound when trust arrives while a task waits: b's end is the 20th progress
    sample; a (50 % at 210 s of age, an end 210 s later implied) must not be moved past
    max_interval after its last check."""
    policy = am.PollPolicy(jitter=0.0, target_lag=10.0)
    s = PollSchedule(policy)
    s.priors.merge(
        {
            KIND: KindPrior(
                samples=50,
                duration_lo=5.0,
                duration_hi=600.0,
                progress_samples=s.priors.min_samples - 1,
                progress_lo=0.999,
                progress_hi=1.0,
            )
        }
    )
    s.add("a", now=0.0, submitted_at=-200.0, kind=KIND)
    s.add("b", now=0.0, kind=KIND)
    assert sorted(s.due(10.0, batched=False)) == ["a", "b"]
    s.on_status(
        am.Task(id="a", status=am.TaskStatus.PROCESSING, progress=50, estimated_time=800.0),
        10.0,
    )
    assert s.next_check("a") == pytest.approx(70.0)  # the estimate's window: max_interval caps
    s.on_status(running("b", 47), 10.0)
    assert s.next_check("b") == pytest.approx(20.0)
    assert s.due(20.0, batched=False) == ["b"]
    s.on_status(running("b", 95), 20.0)  # it ends at the 21 s this implies, seen at 30 s
    assert s.due(30.0, batched=False) == ["b"]
    assert s.on_status(am.Task(id="b", status=am.TaskStatus.COMPLETED, progress=100), 30.0)
    assert s.priors.progress_trust(KIND) is not None  # b earned the kind its trust
    moved = s.next_check("a")
    assert moved is not None and moved <= 10.0 + policy.max_interval + 1e-9


def test_a_progress_window_that_only_grazes_the_estimates_earns_no_single_check() -> None:
    """A kind whose progress trust is wide (uneven progress, learned: 0.99 to 1.5): 44 % at
    60 s implies an end from 132 s to 204 s; the estimate (100 s, within 25 %) says 79 s to
    133.3 s. The two meet only in their last 1.3 s: that is no window narrower than
    target_lag to check once at its end (a task ending at 80 s would be seen 53 s late; the
    first run of issue 22's simulator, p99 9.3 s). The estimate's window stands: the next
    check at its earliest end."""
    policy = am.PollPolicy(jitter=0.0)
    s = trusted(policy, lo=0.99, hi=1.5)
    assert s.priors.progress_trust(KIND) is not None
    s.add("a", now=0.0, kind=KIND)
    assert s.due(60.0, batched=False) == ["a"]
    task = am.Task(id="a", status=am.TaskStatus.PROCESSING, progress=44, estimated_time=100.0)
    s.on_status(task, 60.0)
    earliest = 99.0 / 1.25  # the estimate's earliest end (rounded to whole seconds)
    assert s.next_check("a") == pytest.approx(earliest)


def test_a_kind_whose_straight_progress_turns_uneven_still_sees_ends_within_target_lag() -> None:
    """30 jobs of 30-60 s with straight progress teach the kind its progress is exact; then
    the service's progress turns realistic (a slow start, plateaus, a jump to 100 at the
    end: the task ends before the end its progress implies). The estimate (off by up to
    25 %) still brackets every end: the 50 jobs in flight must not pay for the trust."""
    rng = random.Random(3)
    policy = am.PollPolicy(jitter=0.0)
    s = PollSchedule(policy)
    teach_straight(s, rng, 30, 30.0, 60.0)
    assert s.priors.progress_trust(KIND) is not None
    control = PollSchedule(policy)  # nothing learned: the estimate's window
    profile = RealisticProfile(durations={"viduq3": (30, 60)})
    uneven = [profile.draw(rng, "viduq3", 5) for _ in range(50)]
    _, control_lags = run_kind(control, uneven, KIND)
    assert len(control_lags) == 50 and max(control_lags) <= policy.target_lag
    lags = sorted(run_kind(s, uneven, KIND)[1])
    assert len(lags) == 50
    # before the kind's trust yielded to the tasks in flight: p90 9.1 s, the worst 13.7 s
    assert lags[44] <= policy.target_lag and lags[-1] <= 3 * policy.target_lag


def checked(s: PollSchedule, task_id: str, now: float, progress: int) -> float:
    """``task_id`` is due at ``now`` and found running at ``progress`` %, with an estimate of
    100 s: its next check."""
    if s.next_check(task_id) is not None:  # (None: handed out already, with another)
        assert task_id in s.due(now, batched=False)
    task = am.Task(
        id=task_id, status=am.TaskStatus.PROCESSING, progress=progress, estimated_time=100.0
    )
    assert not s.on_status(task, now)
    at = s.next_check(task_id)
    assert at is not None
    return at


def test_a_task_whose_own_progress_bends_loses_its_kinds_trust() -> None:
    """Trusted progress (the kind's tasks moved in a straight line) is used for a task only
    while its own readings fit one: 2 % at 2 s says it ends by 100 s, 70 % at 79.2 s says
    after 111.5 s. No straight line passes through both (a slow start, or a plateau), so the
    end the last reading implies (a single check at 113.1 s) is not trusted: the estimate's
    window (79.2 s to 133.3 s), checks target_lag apart."""
    policy = am.PollPolicy(jitter=0.0, max_interval=120.0)
    s = trusted(policy)
    s.add("a", now=0.0, kind=KIND)
    assert checked(s, "a", 2.0, 2) == pytest.approx(99.0 / 1.25)  # the estimate's earliest end
    # before the fix: 113.1 (the trusted window's end; an end at 80 s was seen 33 s late)
    assert checked(s, "a", 79.2, 70) == pytest.approx(79.2 + policy.target_lag)
    # and for good: a reading that fits a line again does not bring the trust back
    assert checked(s, "a", 81.2, 80) == pytest.approx(81.2 + policy.target_lag)


def test_a_task_that_bends_puts_its_kinds_trust_in_doubt_until_it_leaves() -> None:
    """Two tasks of a trusted kind. a's readings fit a straight line: one check at the end
    they imply (100.25 s). Then b's readings bend: the trust the kind learned from tasks that
    ended is in doubt while b runs. a's check falls back to the estimate's window (target_lag
    after its last check) and its next readings are planned without the trust; once b has
    left the schedule, a's next reading gets its single check again."""
    policy = am.PollPolicy(jitter=0.0, max_interval=120.0)
    s = trusted(policy)
    s.add("a", now=0.0, kind=KIND)
    s.add("b", now=0.0, kind=KIND)
    assert checked(s, "a", 2.0, 2) == pytest.approx(79.2)
    assert checked(s, "b", 2.0, 2) == pytest.approx(79.2)
    single = checked(s, "a", 79.2, 79)  # 99 s to 100.25 s: narrower than target_lag
    assert single == pytest.approx(79.2 * 100 / 79, rel=1e-4)  # (the trust's padding)
    # b: 70 % at 79.2 s, after 2 % at 2 s
    assert checked(s, "b", 79.2, 70) == pytest.approx(81.2)
    # before the fix: a stayed at 100.25 s (an end at 82 s seen 18 s late)
    assert s.next_check("a") == pytest.approx(81.2)
    assert checked(s, "a", 81.2, 81) == pytest.approx(83.2)  # no trust while b runs
    s.remove("b")  # b leaves (its end, or a cancel): the doubt goes with it
    assert checked(s, "a", 83.2, 83) == pytest.approx(83.2 * 100 / 83, rel=1e-4)


def test_straight_progress_read_over_round_trips_never_puts_the_trust_in_doubt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reading's moment is not known to the client (the service reads the task somewhere
    within the request, and started it somewhere within the submit's): a task whose progress
    moves in a straight line must still fit one, or a straight kind would lose its trust (and
    what it saves) to round trips. 300 tasks of a taught straight kind, reads of 0.1 to 0.5 s,
    tasks started up to 0.25 s after the client's submit."""
    from apimart_async import _poll_schedule

    doubts: list[str] = []
    hold = _poll_schedule._Doubts.hold

    def counted(self: _poll_schedule._Doubts, kind: str) -> bool:
        doubts.append(kind)
        return hold(self, kind)

    monkeypatch.setattr(_poll_schedule._Doubts, "hold", counted)
    rng = random.Random(5)
    policy = am.PollPolicy(jitter=0.0)
    taught = PollSchedule(policy)
    teach_straight(taught, rng, 100, 5.0, 60.0)
    assert taught.priors.progress_trust(KIND) is not None
    durations = [rng.uniform(5.0, 60.0) for _ in range(300)]
    starts = [rng.uniform(0.0, 0.25) for _ in durations]

    def run(s: PollSchedule, kind: str | None) -> tuple[float, int]:
        """Status requests per job, and jobs seen to end."""
        trips = random.Random(7)
        for i in range(len(durations)):
            s.add(f"t{i}", now=0.0, kind=kind)
        now, requests, ended = 0.0, 0, 0
        while len(s):
            wake = s.next_wakeup()
            assert wake is not None
            now = max(now, wake)
            trip = trips.uniform(0.1, 0.5)
            for task_id in s.due(now, batched=False):
                i = int(task_id[1:])
                age = now + trips.uniform(0.0, trip) - starts[i]
                status, progress = straight(durations[i]).status(age)
                requests += 1
                task = am.Task(
                    id=task_id,
                    status=am.TaskStatus(status),
                    progress=progress,
                    estimated_time=float(round(durations[i])),
                )
                ended += s.on_status(task, now + trip)
            now += trip
        return requests / len(durations), ended

    per_job, ended = run(taught, KIND)
    assert doubts == [] and ended == 300
    blind, _ = run(PollSchedule(policy), None)  # nothing learned: the estimate's window
    assert per_job < blind - 1.0


@pytest.mark.parametrize(
    "hints",
    [
        {"estimated_time": "60s"},
        {"estimated_time": "soon"},
        {"progress": "50%"},
        {"progress": {"value": 50}},
        {"created": "2026-11-30T03:00:00Z"},
        {"actual_time": "40 s", "completed": "2026-11-30T03:01:00Z"},
        {"progress": 10**400, "estimated_time": 10**400},  # brk16: no float holds them
    ],
)
@pytest.mark.parametrize("route", ["task", "batch"])
def test_an_unreadable_hint_does_not_make_a_running_or_finished_task_unreadable(
    hints: dict[str, object], route: str
) -> None:
    """progress, estimated_time, actual_time, created and completed only steer the schedule:
    a service (or a channel in front of it) that writes one as '60s' or '50%' or an ISO date
    must not turn every read of a billed task into ResponseValidationError (which ends the
    job with an error after hard_error_tries reads)."""
    import json

    from apimart_async._converter import parse_task, parse_task_items

    video = {"result": {"videos": [{"url": ["https://cdn.example.com/v.mp4"]}]}}
    for status, extra in (("processing", {}), ("completed", video)):
        data = {"id": "task_1", "status": status, **extra, **hints}
        if route == "task":
            task = parse_task(json.dumps({"code": 200, "data": data}).encode())
        else:
            body = json.dumps({"code": 200, "data": [data]}).encode()
            tasks, bad = parse_task_items(body)
            assert bad == {}
            (task,) = tasks
        assert task.id == "task_1" and task.status.value == status
        for name in hints:
            assert getattr(task, name) is None
        if status == "completed":
            assert task.ok and task.videos


def test_priors_a_journal_carries_that_no_run_could_have_learned_are_passed_over(
    tmp_path: Path,
) -> None:
    """A journal is a file a user may copy between services or edit: a priors row with a
    text, infinite, negative or inverted value is passed over (as a row with a bad kind is),
    not a raw ValueError when the batch opens it, nor a TypeError later in the poller."""
    path = tmp_path / "run.sqlite"

    async def opened() -> None:
        journal = SqliteJournal(path)
        await journal.open()
        await journal.close()

    anyio.run(opened)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executemany(
            "INSERT INTO priors (kind, samples, duration_lo, duration_hi, ratio_lo, ratio_hi,"
            " updated_at, progress_samples, progress_lo, progress_hi)"
            " VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
            [
                ("text", 30, "abc", 2.0, None, None, 0, None, None),
                ("ratio text", 30, 1.0, 2.0, "x", 1.2, 0, None, None),
                ("infinite", 30, 1.0, 9e999, 0.8, 1.2, 0, None, None),
                ("negative", 30, -5.0, 2.0, 0.8, 1.2, 0, None, None),
                ("inverted", 30, 3.0, 1.0, 0.8, 1.2, 0, None, None),
                ("ratio inverted", 30, 1.0, 2.0, 1.2, 0.8, 0, None, None),
                ("ratio zero", 30, 1.0, 2.0, 0.0, 1.2, 0, None, None),
                ("good", 30, 1.0, 2.0, 0.8, 1.2, 0, None, None),
                # schema 4: a progress trust nobody could have learned is dropped, the rest kept
                ("progress text", 30, 1.0, 2.0, 0.8, 1.2, 25, "x", 1.1),
                ("progress inverted", 30, 1.0, 2.0, 0.8, 1.2, 25, 1.1, 0.9),
                ("progress trusted", 30, 1.0, 2.0, 0.8, 1.2, 25, 0.97, 1.02),
            ],
        )
        conn.commit()

    async def load() -> dict[str, KindPrior]:
        journal = SqliteJournal(path)
        await journal.open()
        try:
            return await journal.load_priors()
        finally:
            await journal.close()

    plain = KindPrior(30, 1.0, 2.0, 0.8, 1.2)
    trusted = KindPrior(30, 1.0, 2.0, 0.8, 1.2, progress_samples=25)
    trusted.progress_lo, trusted.progress_hi = 0.97, 1.02
    assert anyio.run(load) == {
        "good": plain,
        "progress text": plain,
        "progress inverted": plain,
        "progress trusted": trusted,
    }


class _NoProgress:
    """A task that reports 0 % until its end (only its estimate says anything)."""

    def __init__(self, duration: float) -> None:
        self.duration = duration

    def status(self, age: float) -> tuple[str, int]:
        return ("completed", 100) if age >= self.duration else ("processing", 0)


def test_one_absurd_estimate_does_not_poison_the_kind_for_good() -> None:
    rng = random.Random(1)

    def jobs(n: int, absurd: bool = False) -> list[tuple[float, int, Curve]]:
        out: list[tuple[float, int, Curve]] = []
        for i in range(n):
            d = rng.uniform(60.0, 120.0)
            estimate = 10_000_000 if absurd and i == 0 else round(d * rng.uniform(0.9, 1.1))
            out.append((d, estimate, _NoProgress(d)))  # type: ignore[arg-type]
        return out

    policy = am.PollPolicy(jitter=0.0)
    clean, poisoned = PollSchedule(policy), PollSchedule(policy)
    for s, absurd in ((clean, False), (poisoned, True)):
        run_kind(s, jobs(30), KIND)
        run_kind(s, jobs(5, absurd), KIND)
    follow = jobs(100)
    requests = {}
    for name, s in (("clean", clean), ("poisoned", poisoned)):
        per_job, lags = run_kind(s, follow, KIND)
        assert len(lags) == 100 and max(lags) <= policy.target_lag
        requests[name] = per_job
    # before the fix: clean 6.4 status reads per job, poisoned 17.1
    assert requests["poisoned"] <= 1.5 * requests["clean"]
    # a later task with an absurd estimate is planned by the kind's durations: seen in time
    _, lags = run_kind(clean, jobs(3, absurd=True), KIND)
    assert len(lags) == 3 and max(lags) <= policy.target_lag


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_lag", True),
        ("max_interval", False),
        ("jitter", True),
        ("estimate_margin", False),
        ("use_progress", "no"),
        ("target_lag", "2"),
    ],
)
def test_a_policy_value_of_the_wrong_type_is_refused_naming_the_field(
    field: str, value: object
) -> None:
    """PollPolicy(target_lag=True) was taken as 1 s, and use_progress="no" as true."""
    with pytest.raises(am.OptionError, match=f"PollPolicy.{field}"):
        am.PollPolicy(**{field: value})  # type: ignore[arg-type]

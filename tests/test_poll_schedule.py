"""The poll schedule with a fake clock: given these tasks and this clock, exactly these checks
(issue 22: target_lag, an estimate that is off, progress that is noisy)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

import apimart_async as am
from apimart_async._poll_schedule import PollSchedule
from apimart_async.emulator import RealisticProfile
from apimart_async.emulator._realistic import Curve

NO_JITTER = am.PollPolicy(jitter=0.0)


def running(task_id: str, progress: int | None = None, estimate: float | None = None) -> am.Task:
    return am.Task(
        id=task_id, status=am.TaskStatus.PROCESSING, progress=progress, estimated_time=estimate
    )


def done(task_id: str) -> am.Task:
    return am.Task(id=task_id, status=am.TaskStatus.COMPLETED, progress=100)


def simulate(
    schedule: PollSchedule,
    durations: dict[str, float],
    *,
    linear: bool = True,
    estimate: dict[str, float] | None = None,
    until: float = 1000.0,
) -> dict[str, list[float]]:
    """Drive the schedule like the poller does; a task reports floor(age/d*100)% progress."""
    checks: dict[str, list[float]] = {t: [] for t in durations}
    now = 0.0
    while len(schedule) and now < until:
        wake = schedule.next_wakeup()
        assert wake is not None
        now = max(now, wake)
        for task_id in schedule.due(now, batched=False):
            checks[task_id].append(round(now, 3))
            d = durations[task_id]
            if now >= d:
                assert schedule.on_status(done(task_id), now)
            else:
                progress = int(now / d * 100) if linear else None
                est = (estimate or {}).get(task_id)
                assert not schedule.on_status(running(task_id, progress, est), now)
    return checks


def test_first_check_then_the_window_from_the_estimate_every_target_lag() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0)
    assert s.due(1.99) == []
    assert s.next_wakeup() == 2.0
    # 100 s task, estimate 100 s trusted to 25 % (and to a rounding): the earliest plausible
    # end is 99 / 1.25 = 79.2 s; nothing is checked before it (max_interval 60 caps one wait),
    # then target_lag (2 s) apart (per-task reads: no grid; the fake round takes no time)
    checks = simulate(s, {"a": 100.0}, estimate={"a": 100.0})["a"]
    assert checks == pytest.approx([2.0, 62.0, *[79.2 + 2 * k for k in range(12)]])


def test_progress_alone_is_not_extrapolated_as_exact() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0)
    assert s.due(2.0) == ["a"]
    # 10 % at 10 s of age would say "ends at 100 s"; noisy progress only moves the early edge
    # to half of that
    s.on_status(running("a", 10), 10.0)
    assert s.next_check("a") == pytest.approx(50.0)


def test_no_estimate_no_progress_uses_the_default_with_its_margin() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0, default_estimate=30.0))
    s.add("a", now=0.0)
    assert s.due(2.0) == ["a"]
    s.on_status(am.Task(id="a", status=am.TaskStatus.SUBMITTED), 2.0)
    assert s.next_check("a") == pytest.approx(22.5)


def test_overdue_tasks_space_out_up_to_max_interval() -> None:
    policy = am.PollPolicy(jitter=0.0, max_interval=10.0, overdue_growth=2.0, overdue_window=0.25)
    s = PollSchedule(policy)
    s.add("a", now=0.0)
    checks = simulate(s, {"a": 300.0}, linear=False, estimate={"a": 12.0})["a"]
    # window from (12 - 1) / 1.25 = 8.8 s (whole-second estimates); latest plausible end 16 s,
    # plus a quarter of the span: checks at most 2 s apart until 20 s, then spaced out
    assert checks[:8] == pytest.approx([2.0, 8.8, 10.8, 12.8, 14.8, 16.8, 18.8, 20.8])
    late = [b - a for a, b in itertools.pairwise(checks) if a >= 20.5]
    assert late[:3] == pytest.approx([4.0, 8.0, 10.0])
    assert all(g == pytest.approx(10.0) for g in late[3:-1])
    assert checks[-1] - 300.0 <= 10.0


def test_a_task_overdue_for_days_is_still_checked_every_max_interval() -> None:
    # A task stuck in "processing" (a long-lived web backend follows it): after ~1,750 checks
    # 1.5 ** checks overflowed a float, on_status raised, and every poll round failed from
    # then on, so no other task of the client was ever seen to end.
    policy = am.PollPolicy(jitter=0.0, max_interval=30.0)
    s = PollSchedule(policy)
    s.add("stuck", now=0.0)
    days = 2 * 24 * 3600.0
    checks = simulate(s, {"stuck": days}, linear=False, estimate={"stuck": 60.0}, until=days + 60)
    late = [b - a for a, b in itertools.pairwise(checks["stuck"]) if a >= 3600.0]
    assert len(late) > 5000 and all(g == pytest.approx(30.0) for g in late[:-1])
    assert checks["stuck"][-1] >= days  # and its end was seen


@pytest.mark.parametrize("target_lag", [1.0, 2.0, 5.0, 10.0, 30.0])
def test_realistic_draws_never_wait_longer_than_target_lag_in_the_window(
    target_lag: float,
) -> None:
    profile = RealisticProfile()
    rng = random.Random(int(target_lag))
    policy = am.PollPolicy(target_lag=target_lag, max_interval=max(60.0, target_lag))
    s = PollSchedule(policy, seed=1)
    jobs = {}
    for i in range(200):
        model, clip = ("sora-2-preview", 8) if i % 2 else ("viduq3", 5)
        jobs[f"t{i}"] = profile.draw(rng, model, clip)
        s.add(f"t{i}", now=0.0)
    checks: dict[str, list[float]] = {t: [] for t in jobs}
    now = 0.0
    while len(s):
        wake = s.next_wakeup()
        assert wake is not None
        now = max(now, wake)
        for task_id in s.due(now, batched=True):
            checks[task_id].append(now)
            duration, estimate, curve = jobs[task_id]
            status, progress = curve.status(now)
            task = am.Task(
                id=task_id,
                status=am.TaskStatus(status),
                progress=progress,
                estimated_time=float(estimate),
            )
            assert s.on_status(task, now) == (status == "completed")
    for task_id, times in checks.items():
        duration, estimate, _ = jobs[task_id]
        earliest = (estimate - 1) / 1.25  # off by up to 25 %, rounded to whole seconds
        assert earliest <= duration
        window = [t for t in times if t >= earliest - target_lag]
        assert window and window[-1] >= duration
        gaps = [b - a for a, b in itertools.pairwise(window)]
        assert max(gaps, default=0.0) <= target_lag + 1e-9, (task_id, window)
        assert window[-1] - duration <= target_lag + 1e-9
        # before the window: the first check and max_interval's caps, nothing else
        before = [t for t in times if t < earliest - target_lag]
        assert len(before) <= 1 + math.ceil(earliest / policy.max_interval)


def test_target_lag_is_capped_by_max_interval_and_validated() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0, target_lag=10.0, max_interval=3.0))
    s.add("a", now=0.0)
    assert s.due(3.0) == ["a"]
    s.on_status(running("a", estimate=4.0), 3.0)
    assert s.next_check("a") == pytest.approx(6.0)
    with pytest.raises(ValueError, match="PollPolicy.target_lag: must be a positive number"):
        am.PollPolicy(target_lag=0)


def test_max_interval_caps_every_wait() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0, first_check=5.0, max_interval=3.0))
    s.add("a", now=0.0)
    assert s.next_check("a") == 3.0
    s.due(3.0)
    s.on_status(running("a", estimate=100.0), 3.0)
    assert s.next_check("a") == 6.0


def test_jitter_is_positive_before_the_window_and_none_inside() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.1, min_interval=1.0), seed=7)
    for i in range(50):
        s.add(f"t{i}", now=0.0)
    ids = s.due(2.0)
    for task_id in ids:
        s.on_status(running(task_id, estimate=13.5), 2.0)  # window from 10.0
    times = [s.next_check(t) for t in ids]
    assert all(at is not None and 10.0 <= at <= 10.1 for at in times)
    assert len(set(times)) > 1
    for task_id in s.due(10.1):
        s.on_status(running(task_id, estimate=13.5), 10.2)
    # in the window: on a grid, never later than target_lag after the check left
    assert all((at := s.next_check(t)) is not None and 11.5 < at <= 12.1 for t in ids)


def test_due_batches_and_coalesces_only_to_fill_a_request() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0, coalesce=1.0))
    for i in range(250):
        s.add(f"a{i}", now=0.0)  # due at 2.0
    for i in range(100):
        s.add(f"b{i}", now=0.5)  # due at 2.5: within the coalescing window
    for i in range(10):
        s.add(f"c{i}", now=1.5)  # due at 3.5: outside
    ids = s.due(2.0)
    assert len(ids) == 300  # 250 due + 50 riding along to fill the third request
    assert ids[:250] == [f"a{i}" for i in range(250)]
    assert s.due(2.0) == []  # being checked: not handed out twice
    later = s.due(2.5)  # the other 50 b's, and the 10 c's ride along in that request
    assert len(later) == 60 and later[-10:] == [f"c{i}" for i in range(10)]


def test_per_task_mode_does_not_coalesce() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0))
    s.add("a", now=0.0)
    s.add("b", now=0.5)
    assert s.due(2.0, batched=False) == ["a"]


def test_missing_twice_over_the_grace_period_means_gone() -> None:
    s = PollSchedule(NO_JITTER)  # not_found_grace: 10 s
    s.add("a", now=0.0)
    s.due(2.0)
    assert not s.on_missing("a", 2.0)
    assert s.next_check("a") == 12.0  # the second look waits out the grace period
    s.due(12.0)
    assert s.on_missing("a", 12.0)
    assert "a" not in s


def test_missing_twice_too_soon_is_not_proof() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0)
    s.due(2.0)
    assert not s.on_missing("a", 2.0)
    s.add("a", now=3.0, check_now=True)  # re-attached by another waiter: checked at once
    assert s.due(3.0) == ["a"]
    assert not s.on_missing("a", 3.0)  # twice, but within the grace period
    assert s.next_check("a") == 12.0
    assert s.due(12.0) == ["a"]
    assert s.on_missing("a", 12.0)


def test_a_status_in_between_resets_absence() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0)
    s.due(2.0)
    assert not s.on_missing("a", 2.0)
    s.due(12.0)
    s.on_status(am.Task("a", am.TaskStatus.PROCESSING, progress=50), 12.0)
    s.due(s.next_check("a") or 0.0)
    assert not s.on_missing("a", 30.0)  # counting starts again


def test_hard_errors_end_after_the_policy_tries_with_backoff() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0, hard_error_tries=3))
    s.add("a", now=0.0)
    now = 2.0
    times = []
    for _ in range(2):
        assert s.due(now) == ["a"]
        assert not s.on_hard_error("a", now)
        now = s.next_check("a") or 0.0
        times.append(now)
    assert times == [4.0, 8.0]
    assert s.due(now) == ["a"]
    assert s.on_hard_error("a", now)
    assert "a" not in s


def test_release_reports_ids_left_checking() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0)
    s.add("b", now=0.0)
    assert s.due(2.0) == ["a", "b"]
    s.on_status(am.Task("a", am.TaskStatus.PROCESSING), 2.0)
    planned = s.next_check("a")
    s.release(["a", "b"], 2.0)
    assert s.next_check("a") == planned  # reported: untouched
    assert s.next_check("b") == 4.0  # left checking: read again after a backoff


def test_errors_back_off() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0)
    times = []
    now = 2.0
    for _ in range(4):
        assert s.due(now) == ["a"]
        s.on_error(["a"], now)
        now = s.next_check("a") or 0.0
        times.append(now)
    assert times == [4.0, 8.0, 16.0, 32.0]


def test_deadlines_expire() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0, deadline=5.0)
    s.add("b", now=0.0)
    assert s.next_wakeup() == 2.0
    s.due(2.0)
    s.on_status(running("a", 10), 2.0)
    s.on_status(running("b", 10), 2.0)
    assert s.next_wakeup() == 5.0
    assert s.expired(4.9) == []
    assert s.expired(5.0) == ["a"]
    assert s.ids() == ["b"]


def test_reattached_tasks_are_checked_at_once_and_aged_from_created() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=100.0, check_now=True)
    assert s.due(100.0) == ["a"]
    # created 8 s ago (wall clock 1008), estimate 26 s: the window opens at 92 + 25 / 1.25
    task = am.Task(id="a", status=am.TaskStatus.PROCESSING, estimated_time=26.0, created=1000)
    s.on_status(task, 100.0, wall_now=1008.0)
    assert s.next_check("a") == pytest.approx(112.0)


def test_removed_tasks_are_never_due() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0)
    s.remove("a")
    assert s.due(100.0) == []
    assert s.next_wakeup() is None


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="PollPolicy.min_interval: must be a positive number"):
        am.PollPolicy(min_interval=0)
    with pytest.raises(ValueError, match="PollPolicy.jitter: must be between 0 and 1"):
        am.PollPolicy(jitter=2)
    # a growth under 1 shrank the waits of an overdue task towards zero: reads back to back
    with pytest.raises(ValueError, match=r"PollPolicy.overdue_growth: must be a number >= 1"):
        am.PollPolicy(overdue_growth=0.5)
    assert am.PollPolicy(overdue_growth=1).overdue_growth == 1  # even gaps: allowed


def test_in_the_window_the_gap_counts_from_when_the_check_left() -> None:
    # batch route: on a grid of target_lag / 4, never later than target_lag after the send
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0, submitted_at=0.0)
    assert s.due(9.0) == ["a"]
    s.on_status(running("a", estimate=11.0), 9.7)  # in the window from 8.0; round took 0.7 s
    assert s.next_check("a") == pytest.approx(11.0)
    # per-task reads: no grid, and earlier by half the last round's time
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0, submitted_at=0.0)
    assert s.due(9.0, batched=False) == ["a"]
    s.on_status(running("a", estimate=11.0), 9.4)
    assert s.next_check("a") == pytest.approx(9.0 + 2.0 - 0.2)


def test_due_at_says_when_a_handed_out_check_fell_due() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0)
    assert s.due_at("a") == 2.0 and s.due_at("zz") is None
    assert s.due(2.5, batched=False) == ["a"]
    assert s.next_check("a") is None  # being checked
    assert s.due_at("a") == 2.0  # left 0.5 s after it fell due


def _decisions(batched: bool, target_lag: float, n: int = 400) -> str:
    """Every check the schedule hands out and every status it hears, on realistic jobs that
    arrive over time (three kinds, so priors and progress trust are learned on the way), as a
    sha256 of the exact times. Rounds take a jittered round trip; per-task reads are limited
    to 16 at a time; an id's status is read half a trip after its check leaves."""
    import hashlib

    profile = RealisticProfile()
    rng = random.Random(11)
    kinds = (("sora-2-preview", 8), ("viduq3", 5), ("veo3", 8))
    jobs = []
    for i in range(n):
        model, clip = kinds[i % 3]
        duration, estimate, curve = profile.draw(rng, model, clip)
        if model == "veo3":  # progress in a straight line: the kind earns progress trust
            curve = Curve(duration=duration, queued=0.0, ages=(0.0, duration), values=(0, 99.9))
        jobs.append((f"t{i}", i * 0.25, float(estimate), curve, f"{model}/{clip}//text"))
    by_id = {j[0]: j for j in jobs}
    s = PollSchedule(am.PollPolicy(target_lag=target_lag), seed=3)
    digest = hashlib.sha256()
    now, nxt, done = 0.0, 0, 0
    while done < n:
        while nxt < n and jobs[nxt][1] <= now:
            task_id, submit, _, _, kind = jobs[nxt]
            s.add(task_id, now=now, submitted_at=submit, kind=kind)
            nxt += 1
        ids = s.due(now, batched=batched, limit=None if batched else 16)
        if not ids:
            wake = s.next_wakeup()
            arrival = jobs[nxt][1] if nxt < n else math.inf
            now = max(now, min(math.inf if wake is None else wake, arrival))
            continue
        rtt = profile.round_trip(rng)
        digest.update(f"due {now!r} {','.join(ids)}\n".encode())
        back = now + rtt
        for task_id in ids:
            _, submit, estimate, curve, _ = by_id[task_id]
            status, progress = curve.status(now + rtt / 2 - submit)
            task = am.Task(
                id=task_id,
                status=am.TaskStatus(status),
                progress=progress,
                estimated_time=estimate,
            )
            ended = s.on_status(task, back)
            done += ended
            digest.update(f"{task_id} {ended} {s.next_check(task_id)!r}\n".encode())
        now = back
    # every kind was learned on the way, and the straight one earned progress trust
    assert len(s.priors) == 3 and s.priors.progress_trust("veo3/8//text") is not None
    return digest.hexdigest()[:16]


@pytest.mark.parametrize(
    ("batched", "target_lag", "expected"),
    [
        (True, 2.0, "8fe8bb413cab5812"),
        (False, 2.0, "d1983d75bdba0414"),
        (True, 10.0, "5b6c5d961c357785"),
        (False, 1.0, "9bcc9d9c6d5f2de8"),
    ],
)
def test_the_decisions_on_realistic_jobs_are_pinned(
    batched: bool, target_lag: float, expected: str
) -> None:
    # A guard for work on the schedule's speed (issue 22's simulator): the same jobs and the
    # same seed give exactly the same checks, at exactly the same times. A change meant to
    # change decisions updates these digests (and says so in its commit).
    assert _decisions(batched, target_lag) == expected

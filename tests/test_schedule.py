"""The poll schedule with a fake clock: given these tasks and this clock, exactly these checks."""

from __future__ import annotations

import pytest

import apimart_async as am
from apimart_async._schedule import PollSchedule

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


def test_first_check_then_predicted_end_from_progress() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0)
    assert s.due(1.99) == []
    assert s.next_wakeup() == 2.0
    # 10 s task: 20 % at 2 s predicts the end at exactly 10 s -> two checks in all
    assert simulate(s, {"a": 10.0}) == {"a": [2.0, 10.0]}


def test_low_progress_gets_one_refining_check() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0)
    # 20 s task: 10 % at 2 s (uncertain) -> refine at 70 % of the way (14.6 s), then the end
    assert simulate(s, {"a": 20.0}) == {"a": [2.0, 14.6, 20.0]}


def test_progress_upper_bound_is_never_early_for_floored_progress() -> None:
    s = PollSchedule(NO_JITTER)
    durations = {f"t{i}": 5.0 + i * 0.37 for i in range(40)}
    for task_id in durations:
        s.add(task_id, now=0.0)
    checks = simulate(s, durations)
    for task_id, times in checks.items():
        assert len(times) <= 3, (task_id, times)
        assert times[-1] - durations[task_id] < 0.5, (task_id, times)


def test_estimate_only_then_tight_then_spaced_out_and_capped() -> None:
    policy = am.PollPolicy(
        jitter=0.0,
        use_progress=False,
        min_interval=1.0,
        max_interval=10.0,
        overdue_growth=2.0,
        overdue_window=0.25,
    )
    s = PollSchedule(policy)
    s.add("a", now=0.0)
    checks = simulate(s, {"a": 60.0}, linear=False, estimate={"a": 12.0})
    # first check at 2, then at the early edge of the estimate (75 % of 12 s), then at the
    # estimate, then every second for 3 checks (25 % of 12 s is 3 s), then 2, 4, 8, 10 (the
    # cap), 10, ... until done at 60
    assert checks["a"][:10] == [2.0, 9.0, 12.0, 13.0, 14.0, 15.0, 17.0, 21.0, 29.0, 39.0]
    gaps = [b - a for a, b in zip(checks["a"][9:], checks["a"][10:], strict=False)]
    assert all(g == 10.0 for g in gaps)


def test_no_estimate_uses_the_default() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0, default_estimate=30.0))
    s.add("a", now=0.0)
    assert s.due(2.0) == ["a"]
    s.on_status(am.Task(id="a", status=am.TaskStatus.SUBMITTED), 2.0)
    assert s.next_check("a") == 30.0


def test_max_interval_caps_every_wait() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0, first_check=5.0, max_interval=3.0))
    s.add("a", now=0.0)
    assert s.next_check("a") == 3.0
    s.due(3.0)
    s.on_status(running("a", estimate=100.0), 3.0)
    assert s.next_check("a") == 6.0


def test_jitter_is_positive_and_bounded() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.1, min_interval=1.0), seed=7)
    for i in range(50):
        s.add(f"t{i}", now=0.0)
    ids = s.due(2.0)
    for task_id in ids:
        s.on_status(running(task_id, 20), 2.0)  # predicts 10.0
    for task_id in ids:
        at = s.next_check(task_id)
        assert at is not None and 10.0 <= at <= 10.1


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
    # created 8 s ago (wall clock 1008) and 40 % done: a 20 s task, ending at 92 + 20 here
    task = am.Task(id="a", status=am.TaskStatus.PROCESSING, progress=40, created=1000)
    s.on_status(task, 100.0, wall_now=1008.0)
    assert s.next_check("a") == pytest.approx(112.0)


def test_removed_tasks_are_never_due() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0)
    s.remove("a")
    assert s.due(100.0) == []
    assert s.next_wakeup() is None


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="PollPolicy.min_interval must be a positive number"):
        am.PollPolicy(min_interval=0)
    with pytest.raises(ValueError, match="PollPolicy.jitter must be between 0 and 1"):
        am.PollPolicy(jitter=2)

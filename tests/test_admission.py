"""Admission decisions with a fake clock."""

from __future__ import annotations

import pytest

from apimart_async._admission import SubmitScheduler
from apimart_async._pacing import RateLimiter, Throttle


def test_concurrency_bound() -> None:
    s = SubmitScheduler(concurrency=2, max_pending=None, throttle=Throttle())
    assert s.admit(0.0) == 0.0
    s.started()
    assert s.admit(0.0) == 0.0
    s.started()
    assert s.admit(0.0) is None  # wait for a submit to end
    s.submitted(ok=True)
    assert s.admit(0.0) == 0.0
    assert (s.in_flight, s.pending) == (1, 1)


def test_max_pending_counts_in_flight_submits_too() -> None:
    s = SubmitScheduler(concurrency=10, max_pending=3, throttle=Throttle())
    for _ in range(3):
        assert s.admit(0.0) == 0.0
        s.started()
    assert s.admit(0.0) is None
    s.submitted(ok=True)
    s.submitted(ok=True)
    s.submitted(ok=False)  # no task: frees its place
    assert s.admit(0.0) == 0.0
    s.started()
    s.submitted(ok=True)
    assert s.admit(0.0) is None  # 3 pending
    s.task_done()
    assert s.admit(0.0) == 0.0


def test_rate_limit_halves_concurrency_and_pauses() -> None:
    t = Throttle(cut_cooldown=1.0, increase=0.1)
    s = SubmitScheduler(concurrency=16, max_pending=None, throttle=t)
    t.on_rate_limited(10.0, retry_after=2.0)
    assert s.limit == 8
    assert s.admit(10.0) == 2.0  # the server's pause, for everyone
    assert s.admit(12.0) == 0.0
    t.on_rate_limited(10.5, None)  # same burst: no second cut within the cooldown
    assert s.limit == 8
    t.on_rate_limited(11.5, None)
    assert s.limit == 4
    t.on_success(11.6)  # within the cooldown: no recovery yet
    assert t.factor == 0.25
    for i in range(5):
        t.on_success(13.0 + i)
    assert t.factor == pytest.approx(0.75)
    for i in range(10):
        t.on_success(20.0 + i)
    assert t.factor == 1.0 and s.limit == 16


def test_factor_has_a_floor_and_limit_never_reaches_zero() -> None:
    t = Throttle(cut_cooldown=0.0, min_factor=0.05)
    for i in range(20):
        t.on_rate_limited(float(i), 0.0)
    assert t.factor == 0.05
    assert SubmitScheduler(concurrency=4, max_pending=None, throttle=t).limit == 1


def test_token_bucket() -> None:
    r = RateLimiter(2.0, burst=2)
    assert [r.reserve(0.0) for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]
    assert r.reserve(10.0) == 0.0  # refilled
    slow = RateLimiter(10.0, burst=1)
    slow.reserve(0.0)
    assert slow.reserve(0.0, factor=0.5) == pytest.approx(0.2)  # throttled to 5/s
    with pytest.raises(ValueError, match="^requests_per_second: must be a positive number, got 0"):
        RateLimiter(0)


# -- Pacing: the throttle and the caps in force -----------------------------------------------


def test_pacing_waits_for_every_cap_in_force_and_forgets_a_removed_one() -> None:
    from apimart_async._pacing import Pacing

    pacing = Pacing()
    assert pacing.wait_time(0.0) == 0.0 and pacing.limiters == ()
    fast, slow = RateLimiter(10), RateLimiter(2)
    pacing.add(fast)
    pacing.add(slow)
    assert [pacing.wait_time(0.0) for _ in range(2)] == [0.0, 0.0]  # the slow cap's burst
    assert pacing.wait_time(0.0) == pytest.approx(0.5)  # the slower cap decides
    pacing.remove(fast)
    assert pacing.limiters == (slow,)
    pacing.remove(fast)  # removing twice changes nothing
    assert pacing.limiters == (slow,)
    pacing.remove(slow)
    assert pacing.limiters == () and pacing.wait_time(10.0) == 0.0


def test_pacing_caps_of_the_same_rate_are_removed_one_by_one() -> None:
    from apimart_async._pacing import Pacing

    pacing = Pacing()
    with pacing.capped(5) as outer:
        with pacing.capped(5) as inner:
            assert pacing.limiters == (outer, inner)
        assert pacing.limiters == (outer,)  # the same rate, but not the same cap
    assert pacing.limiters == ()


def test_pacing_honours_the_server_pause_unless_told_not_to() -> None:
    from apimart_async._pacing import Pacing

    pacing = Pacing()
    pacing.throttle.on_rate_limited(0.0, 3.0)
    assert pacing.wait_time(1.0) == pytest.approx(2.0)
    assert pacing.wait_time(1.0, honour_pause=False) == 0.0


# -- admit_job: the whole decision for one job ------------------------------------------------


def test_admit_job_waits_for_room_then_for_the_budget_then_refuses_what_cannot_fit() -> None:
    from apimart_async import VideoRequest
    from apimart_async._admission import Budget, admit_job

    request = VideoRequest("sora-2-preview", "a cat", duration=4)
    sched = SubmitScheduler(concurrency=1, max_pending=None, throttle=Throttle())
    budget = Budget(1.0, estimate=lambda r: 0.6)
    assert admit_job(sched, budget, 0, request, 0.0, backlog_full=True) is None  # unread
    assert admit_job(sched, budget, 0, request, 0.0) == 0.0
    assert budget.committed == pytest.approx(0.6)  # reserved when admitted
    sched.started()
    assert admit_job(sched, budget, 1, request, 0.0) is None  # no room in flight
    sched.submitted(ok=True)
    assert admit_job(sched, budget, 1, request, 0.0) is None  # room, but the money waits
    budget.settle(0, request, 0.6)
    assert admit_job(sched, budget, 1, request, 0.0) == "over"  # 0.6 + 0.6 > 1.0, for good
    assert "job 1 not submitted" in str(budget.exceeded(1))


def test_admit_job_waits_out_the_server_pause() -> None:
    from apimart_async._admission import admit_job

    throttle = Throttle()
    throttle.on_rate_limited(0.0, 2.0)
    sched = SubmitScheduler(concurrency=4, max_pending=None, throttle=throttle)
    assert admit_job(sched, None, 0, object(), 0.5) == pytest.approx(1.5)

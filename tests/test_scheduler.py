"""Admission decisions with a fake clock."""

from __future__ import annotations

import pytest

from apimart_async._scheduler import RateLimiter, SubmitScheduler, Throttle


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
    with pytest.raises(ValueError, match="requests_per_second must be a positive number"):
        RateLimiter(0)

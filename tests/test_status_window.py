"""Per-task status reads in flight adapt (issue 22): ``StatusWindow`` on a fake clock, and the
poller's reads against the emulator (they leave as they fall due, as many as the window lets).
"""

from __future__ import annotations

import anyio
import pytest

import apimart_async as am
from apimart_async._status_window import ReadTicket, StatusWindow
from apimart_async.emulator import Emulator, Fault, RealisticProfile

from .conftest import FAST_POLL

DEADLINE = 30


def fill(w: StatusWindow, now: float, *, held: bool = True) -> list[object]:
    """Start as many reads as the window lets out at ``now`` (the caller had more due)."""
    tickets = [w.started(now) for _ in range(w.free())]
    if held:
        w.held_back(now)
    return tickets


def round_trip(w: StatusWindow, now: float, rtt: float, *, congested: bool = False) -> float:
    """Fill the window at ``now``; every read comes back ``rtt`` later. Returns the new now."""
    tickets = fill(w, now)
    for t in tickets:
        w.finished(t, now + rtt, congested=congested)  # type: ignore[arg-type]
    return now + rtt


def test_slow_start_doubles_the_window_every_round_trip_up_to_the_maximum() -> None:
    w = StatusWindow(start=8, maximum=64)
    now = 0.0
    limits = []
    for _ in range(5):
        now = round_trip(w, now, 0.2)
        limits.append(w.limit())
    assert limits == [16, 32, 64, 64, 64]
    assert w.max_in_flight_seen == 64


def test_the_window_does_not_grow_while_it_holds_nothing_back() -> None:
    w = StatusWindow(start=8, maximum=64)
    for i in range(20):
        t = w.started(float(i))  # one read at a time: the window is never the limit
        w.finished(t, i + 0.2, congested=False)
    assert w.limit() == 8


def test_slow_replies_do_not_widen_the_window() -> None:
    w = StatusWindow(start=8, maximum=64)
    now = round_trip(w, 0.0, 0.2)  # fastest seen 0.2 s: 16
    assert w.limit() == 16
    now = round_trip(w, now, 1.0)  # five times slower: a queue somewhere, not room
    assert w.limit() == 16


def test_a_429_or_5xx_halves_the_window_once_per_round_trip_then_it_grows_additively() -> None:
    w = StatusWindow(start=8, maximum=64)
    now = round_trip(w, 0.0, 0.2)
    now = round_trip(w, now, 0.2)
    assert w.limit() == 32
    now = round_trip(w, now, 0.2, congested=True)  # 32 reads meet 429s in one round trip
    assert (w.limit(), w.cuts) == (16, 1)
    now = round_trip(w, now + 0.5, 0.2, congested=True)
    assert (w.limit(), w.cuts) == (8, 2)
    # after a cut: about one more per window's worth of fast replies (additive increase)
    now = round_trip(w, now, 0.2)
    assert w.window == pytest.approx(9, abs=0.05)
    now = round_trip(w, now, 0.2)
    assert w.window == pytest.approx(9.8, abs=0.05)  # 8 reads (the floor) of 1/9 each


def test_the_window_never_goes_below_one() -> None:
    w = StatusWindow(start=2, maximum=4)
    now = 0.0
    for _ in range(10):
        now = round_trip(w, now + 1, 0.2, congested=True)
    assert w.limit() == 1 and w.free() == 1


def test_requests_per_second_bounds_the_window() -> None:
    w = StatusWindow(start=8, maximum=64)
    now = 0.0
    for _ in range(6):
        now = round_trip(w, now, 0.2)
    assert w.limit() == 64
    # 20 requests a second at 0.2 s a trip feed 4 reads in flight, no more
    assert w.limit(rate=20.0) == 4
    assert w.free(rate=20.0) == 4
    assert w.limit(rate=0.5) == 1


def test_bad_bounds_name_the_option() -> None:
    with pytest.raises(am.OptionError, match="^status_concurrency: must be a whole number >= 1"):
        StatusWindow(start=0, maximum=4)
    with pytest.raises(ValueError, match=r"^max_status_concurrency: must be a whole .*\(8\)"):
        StatusWindow(start=8, maximum=4)


def test_client_options_bound_the_window_and_are_checked_before_any_request() -> None:
    client = am.AsyncApimart("sk-test", status_concurrency=4)
    assert (client._poller.reads.start, client._poller.reads.maximum) == (4, 64)
    client = am.AsyncApimart("sk-test", status_concurrency=100)
    assert client._poller.reads.maximum == 100
    client = am.AsyncApimart("sk-test", status_concurrency=2, max_status_concurrency=3)
    assert client._poller.reads.maximum == 3
    with pytest.raises(am.ConfigurationError, match=r"max_status_concurrency: must be .*\(8\)"):
        am.AsyncApimart("sk-test", max_status_concurrency=4)
    with pytest.raises(am.ConfigurationError, match="max_status_concurrency"):
        am.AsyncApimart("sk-test", max_status_concurrency=True)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_per_task_reads_widen_past_the_starting_concurrency() -> None:
    """Before issue 22's window, per-task reads went out ``status_concurrency`` at a time."""
    profile = RealisticProfile(rtt=0.05, rtt_jitter=0.0)
    async with Emulator(mode="manual", profile=profile) as emu:
        emu.batch_route = "absent"
        ids = emu.create_tasks(200)
        async with am.AsyncApimart(
            emu.api_key,
            base_url=emu.base_url,
            poll=FAST_POLL,
            status_concurrency=2,
            max_status_concurrency=24,
        ) as client:
            with anyio.fail_after(DEADLINE):
                async with client.tasks.watch(ids) as stream:
                    # slow start: the window doubles every round trip while reads wait
                    reads = client._poller.reads
                    await emu.wait_until(lambda: reads.max_in_flight_seen >= 8, timeout=DEADLINE)
                    emu.complete_all()
                    done = [t async for t in stream]
            window = client._poller.reads
            assert len(client._poller) == 0
    assert sorted(t.id for t in done) == sorted(ids)
    assert emu.counters.get("batch", 0) == 1  # tried once, absent
    # reads in flight as the client sent them (the emulator's handler holds each for an
    # instant only: the round trip is added around it)
    assert 8 <= window.max_in_flight_seen <= 24 and window.in_flight == 0
    assert emu.state.max_in_flight["task"] <= 24


@pytest.mark.anyio
async def test_429s_on_per_task_reads_narrow_the_window_and_every_task_still_ends_once() -> None:
    profile = RealisticProfile(rtt=0.05, rtt_jitter=0.0)
    async with Emulator(mode="manual", profile=profile) as emu:
        emu.batch_route = "absent"
        ids = emu.create_tasks(100)
        async with am.AsyncApimart(
            emu.api_key,
            base_url=emu.base_url,
            poll=FAST_POLL,
            max_retries=1,
            status_concurrency=2,
            max_status_concurrency=32,
        ) as client:
            window = client._poller.reads
            cuts: list[tuple[int, int]] = []  # the limit before and after each congested reply
            finished = window.finished

            def spy(ticket: ReadTicket, now: float, *, congested: bool) -> None:
                before = window.limit()
                finished(ticket, now, congested=congested)
                if congested:
                    cuts.append((before, window.limit()))

            window.finished = spy  # type: ignore[method-assign]
            with anyio.fail_after(DEADLINE):
                async with client.tasks.watch(ids) as stream:
                    await emu.wait_until(lambda: window.limit() >= 8, timeout=DEADLINE)
                    emu.faults.inject("task", Fault.rate_limited(retry_after=0), times=40)
                    await emu.wait_until(lambda: emu.faults.pending() == 0, timeout=DEADLINE)
                    emu.complete_all()
                    done = [t async for t in stream]
    assert sorted(t.id for t in done) == sorted(ids)
    assert client.throttle.rate_limited >= 1
    assert window.cuts >= 1 and not window.slow_start
    assert any(after <= before // 2 for before, after in cuts if before >= 8)


@pytest.mark.anyio
async def test_a_bug_in_a_per_task_read_reads_that_task_again_and_frees_its_slot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Emulator(mode="manual") as emu:
        emu.batch_route = "absent"
        ids = emu.create_tasks(5)
        async with am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, poll=FAST_POLL, status_concurrency=1
        ) as client:
            real = client._api.get_task
            calls: list[str] = []

            async def flaky(task_id: str) -> am.Task:
                calls.append(task_id)
                if len(calls) == 7:  # after the first round (the batch route's fallback)
                    raise RuntimeError("a bug")
                return await real(task_id)

            # every status read by id goes through these two: the api's (a batch route
            # fallback) and the poller's per-task reads
            client._api.get_task = flaky  # type: ignore[method-assign]
            client._poller._read = flaky
            with anyio.fail_after(DEADLINE):
                async with client.tasks.watch(ids) as stream:
                    await emu.wait_until(lambda: len(calls) >= 12)
                    emu.complete_all()
                    done = [t async for t in stream]
            assert client._poller.reads.in_flight == 0
    assert sorted(t.id for t in done) == sorted(ids)
    assert "status read of task" in caplog.text

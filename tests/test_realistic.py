"""The emulator's realistic profile (issue 22): minute-long jobs per model, an estimate that is
off, uneven progress that never goes backwards, a round trip on every reply, a time scale the
client can follow. Time is driven by the emulator's frozen clock, never by sleeping."""

from __future__ import annotations

import random

import aiohttp
import anyio
import pytest

import apimart_async as am
from apimart_async.emulator import Emulator, RealisticProfile
from apimart_async.emulator import __main__ as emu_main
from apimart_async.emulator._state import Clock
from apimart_async.testing import emulated_api, follow_clock

pytestmark = pytest.mark.anyio

SORA = {"model": "sora-2-preview", "prompt": "a cat", "duration": 8}
VIDU = {
    "model": "viduq3",
    "prompt": "the bear waves",
    "image_urls": ["https://e.com/bear.png"],
    "duration": 5,
}


def test_curves_never_go_back_and_jump_to_100_at_the_end() -> None:
    profile = RealisticProfile()
    rng = random.Random(1)
    lagging = 0
    for _ in range(300):
        duration, estimate, curve = profile.draw(rng, "sora-2-preview", 8)
        assert 60 <= duration <= 240
        assert 0.75 * duration - 0.5 <= estimate <= 1.25 * duration + 0.5
        seen = [curve.status(duration * k / 400) for k in range(400)]
        progress = [p for _, p in seen]
        assert progress == sorted(progress), "progress went backwards"
        assert max(progress) < 100
        assert seen[0] == ("submitted", 0)
        assert {s for s, _ in seen} <= {"submitted", "pending", "processing"}
        assert curve.status(duration) == ("completed", 100)
        # status() works out the progress itself (it is faster so): the same as progress()
        assert all(p == curve.progress(duration * k / 400) for k, (s, p) in enumerate(seen))
        # the slow start: nothing moves while queued, at least 5 % of the duration
        assert all(p == 0 for p in progress[:20])
        lagging += curve.progress(duration / 2) < 50
    # progress lags elapsed time for most tasks (the reason extrapolation is late)
    assert lagging > 200


def test_durations_per_model_and_clip_length() -> None:
    profile = RealisticProfile(
        durations={"sora-2": (60, 240), "sora-2:12": (200, 300), "viduq3": (30, 120)},
        default_duration=(7, 9),
    )
    assert profile.duration_range("sora-2-pro-preview", 4) == (60, 240)
    assert profile.duration_range("sora-2-preview", 12) == (200, 300)
    assert profile.duration_range("viduq3-turbo", 5) == (30, 120)
    assert profile.duration_range("kling-v3", 5) == (7, 9)
    rng = random.Random(0)
    for _ in range(100):
        d, _, _ = profile.draw(rng, "viduq3", 5)
        assert 30 <= d <= 120


def test_bad_profile_numbers_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"durations\['sora-2'\]"):
        RealisticProfile(durations={"sora-2": (100, 10)})
    with pytest.raises(ValueError, match="estimate_error"):
        RealisticProfile(estimate_error=1.5)
    with pytest.raises(ValueError, match="rtt"):
        RealisticProfile(rtt=-1)
    with pytest.raises(ValueError, match="profile must be one of default, realistic"):
        Emulator(profile="fast")
    with pytest.raises(ValueError, match="time_scale"):
        Emulator(time_scale=0)


def test_the_default_profile_is_unchanged() -> None:
    emu = Emulator()
    assert emu.profile is None and emu.rtt is None and emu.clock.scale == 1.0


async def test_realistic_tasks_move_with_the_clock_and_repeat_by_seed() -> None:
    async def run(seed: int) -> list[list[tuple[str, int]]]:
        profile = RealisticProfile(rtt=0.0)  # the round trip is real time on a frozen clock
        async with Emulator(profile=profile, frozen_clock=True, seed=seed) as emu:
            ids = emu.create_tasks(3, SORA) + emu.create_tasks(3, VIDU)
            tasks = [emu.state.tasks[i] for i in ids]
            for t in tasks[:3]:
                assert 60 <= t.duration <= 240
            for t in tasks[3:]:
                assert 30 <= t.duration <= 120
            seen: list[list[tuple[str, int]]] = [[] for _ in ids]
            async with aiohttp.ClientSession() as http:
                for _ in range(50):
                    for n, task_id in enumerate(ids):
                        async with http.get(
                            f"{emu.base_url}/v1/tasks/{task_id}",
                            headers={"Authorization": f"Bearer {emu.api_key}"},
                        ) as r:
                            data = (await r.json())["data"]
                        seen[n].append((data["status"], data["progress"]))
                    emu.advance(5.0)
            for history, task in zip(seen, tasks, strict=True):
                progress = [p for _, p in history]
                assert progress == sorted(progress)
                assert history[-1] == ("completed", 100)
                assert all(s != "completed" for s, _ in history[: int(task.duration // 5)])
            return seen

    first = await run(3)
    assert await run(3) == first
    assert await run(4) != first


async def test_every_reply_carries_a_jittered_round_trip() -> None:
    # time_scale 1000: the 0.2 s round trips of the emulator's time are 0.2 ms of real time
    profile = RealisticProfile(rtt=0.2, rtt_jitter=0.5)
    async with Emulator(profile=profile, time_scale=1000, seed=1) as emu:
        assert emu.rtt is not None
        async with aiohttp.ClientSession() as http:
            for _ in range(20):
                async with http.get(
                    f"{emu.base_url}/v1/balance",
                    headers={"Authorization": f"Bearer {emu.api_key}"},
                ) as r:
                    assert r.status == 200
            async with http.get(f"{emu.base_url}/_emulator/stats") as r:
                assert r.status == 200  # admin routes are not held
        assert emu.rtt.replies == 20
        assert 20 * 0.1 <= emu.rtt.added <= 20 * 0.3
        assert emu.rtt.added != pytest.approx(20 * 0.2, abs=1e-9)  # jittered


def test_the_clock_scale_compresses_time(monkeypatch: pytest.MonkeyPatch) -> None:
    real = [100.0]
    monkeypatch.setattr("apimart_async.emulator._state.time.monotonic", lambda: real[0])
    clock = Clock(scale=20, start=0.0)
    real[0] += 1.5
    assert clock.now() == pytest.approx(30.0)
    clock.advance(5)
    assert clock.monotonic() == pytest.approx(35.0)


async def test_a_client_that_follows_the_clock_schedules_on_emulator_time() -> None:
    profile = RealisticProfile(rtt=0.0)
    async with emulated_api(profile=profile, frozen_clock=True) as api:
        follow_clock(api.client, api.emulator)
        before = api.client._poller.now()
        api.emulator.advance(100)
        assert api.client._poller.now() - before == pytest.approx(100, abs=1.0)
        assert api.client._poller._wall() == pytest.approx(api.emulator.clock.now())


async def test_realistic_jobs_on_a_compressed_clock_each_end_once() -> None:
    profile = RealisticProfile(durations={"viduq3": (30, 60)}, rtt=0.2)
    poll = am.PollPolicy()
    async with emulated_api(profile=profile, time_scale=300, seed=5, poll=poll) as api:
        assert api.client._poller.time_scale == 300
        jobs = [
            am.VideoRequest("viduq3", f"a bear {i}", image_urls=["https://e.com/b.png"], duration=5)
            for i in range(10)
        ]
        outcomes = []
        async with api.client.batch(jobs) as results:
            async for outcome in results:
                outcomes.append(outcome)
        assert sorted(o.index for o in outcomes) == list(range(10))
        assert all(o.ok for o in outcomes)
        # the jobs took at least 30 s of the emulator's time (real seconds: not asserted)
        assert api.emulator.clock.monotonic() >= 30


def test_cli_flags_build_the_profile() -> None:
    args = emu_main.build_parser().parse_args(
        [
            "--profile",
            "realistic",
            "--model-duration",
            "sora-2=10-20",
            "--model-duration",
            "sora-2:12=30-40",
            "--rtt",
            "0.1",
            "--estimate-error",
            "0.1",
            "--time-scale",
            "10",
        ]
    )
    profile = emu_main._profile(args)
    assert isinstance(profile, RealisticProfile)
    assert profile.durations["sora-2"] == (10, 20)
    assert profile.durations["sora-2:12"] == (30, 40)
    assert profile.durations["viduq3"] == (30, 120)
    assert profile.rtt == 0.1 and profile.estimate_error == 0.1
    assert args.time_scale == 10
    assert emu_main._profile(emu_main.build_parser().parse_args([])) == "default"
    with pytest.raises(SystemExit):
        emu_main.build_parser().parse_args(["--model-duration", "sora-2"])
    with pytest.raises(SystemExit):
        emu_main.build_parser().parse_args(["--time-scale", "0"])


async def test_batch_jobs_are_scheduled_on_the_clock_the_poller_follows() -> None:
    # regression: the batch stamped submits with time.monotonic(), so on any other poller
    # clock the first check of each job landed at a meaningless time
    profile = RealisticProfile(rtt=0.0)
    async with emulated_api(profile=profile, frozen_clock=True, poll=am.PollPolicy()) as api:
        follow_clock(api.client, api.emulator)  # its time starts near 0, far from monotonic()
        poller = api.client._poller
        async with api.client.batch([am.VideoRequest("sora-2-preview", "a cat")]) as results:
            with anyio.fail_after(10):
                while not poller.schedule.ids():  # noqa: ASYNC110 - no event to wait on
                    await anyio.sleep(0.001)
            (task_id,) = poller.schedule.ids()
            first = poller.schedule.next_check(task_id)
            assert first is not None
            assert 0 < first - poller.now() <= 2.0 * 1.1
            await results.stop()

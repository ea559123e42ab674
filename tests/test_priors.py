"""Learned priors (issue 22): what completed tasks of a kind teach the schedule, on a fake
clock, and how a batch's journal keeps them for the next run."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import anyio
import pytest

import apimart_async as am
from apimart_async._journal import SqliteJournal
from apimart_async._poll_schedule import PollSchedule
from apimart_async._priors import MIN_SAMPLES, KindPrior, Priors, kind_of
from apimart_async.emulator import Emulator, RealisticProfile
from apimart_async.emulator._realistic import Curve

from .conftest import FAST_POLL

KIND = "sora-2-preview/8//text"


def test_kinds_tell_model_duration_resolution_and_references_apart() -> None:
    a = am.VideoRequest("sora-2-preview", "a cat", duration=8)
    assert kind_of(a) == KIND
    assert kind_of(am.VideoRequest("sora-2-preview", "a dog", duration=8)) == KIND  # prompt: no
    assert kind_of(am.VideoRequest("sora-2-preview", "a", duration=4)) != KIND
    pro = am.VideoRequest("sora-2-pro-preview", "a", duration=8, resolution="high")
    assert kind_of(pro) == "sora-2-pro-preview/8/high/text"
    refs = am.VideoRequest("sora-2-preview", "a", duration=8, image_urls=["https://e.com/a.png"])
    assert kind_of(refs) == "sora-2-preview/8//refs"


def test_a_kind_is_used_only_after_enough_completed_tasks() -> None:
    priors = Priors()
    for i in range(MIN_SAMPLES - 1):
        priors.observe(KIND, seen_running=60.0 + i, seen_done=62.0 + i, estimate=61.0 + i)
    assert priors.get(KIND) is None
    priors.observe(KIND, seen_running=100.0, seen_done=102.0, estimate=80.0)
    prior = priors.get(KIND)
    assert prior is not None and prior.samples == MIN_SAMPLES
    # midpoints 61 .. 79 and 101; widened by range / samples each side
    lo, hi = prior.durations()
    assert lo == pytest.approx(61 - 40 / 20) and hi == pytest.approx(101 + 40 / 20)
    r_lo, r_hi = prior.ratios() or (0, 0)
    pad = (101 / 80 - 1) / 20
    assert r_lo == pytest.approx(1 - pad) and r_hi == pytest.approx(101 / 80 + pad)
    assert priors.get("other") is None and priors.get(None) is None


def test_nonsense_observations_are_passed_over() -> None:
    priors = Priors(min_samples=1)
    priors.observe(KIND, seen_running=5.0, seen_done=3.0, estimate=4.0)
    priors.observe(KIND, seen_running=-1.0, seen_done=3.0, estimate=4.0)
    priors.observe(KIND, seen_running=1.0, seen_done=float("inf"), estimate=4.0)
    assert priors.get(KIND) is None and len(priors) == 0


def test_merging_the_same_store_twice_counts_it_once() -> None:
    priors = Priors(min_samples=2)
    stored = {KIND: KindPrior(samples=30, duration_lo=60, duration_hi=90, ratio_lo=0.8)}
    priors.merge(stored)
    priors.merge(stored)
    prior = priors.get(KIND)
    assert prior is not None and prior.samples == 30
    assert (prior.ratio_lo, prior.ratio_hi) == (0.8, None) and prior.ratios() is None
    mine = priors.export()[KIND]
    mine.samples = 0  # an export is a copy
    assert priors.get(KIND) is not None


def test_a_known_kind_is_first_checked_at_its_earliest_end_not_first_check() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0))
    s.priors.merge({KIND: KindPrior(samples=50, duration_lo=55.0, duration_hi=105.0)})
    s.add("known", now=0.0, kind=KIND)
    s.add("new", now=0.0, kind="viduq3/5//refs")
    s.add("none", now=0.0)
    assert s.next_check("new") == 2.0 and s.next_check("none") == 2.0
    assert s.next_check("known") == pytest.approx(55.0 - 50 / 50)


def test_a_known_kind_trusts_its_estimates_as_far_as_they_proved_right() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0))
    # estimates of this kind were within 5 %: the window is 0.95 .. 1.05 of the estimate
    s.priors.merge(
        {
            KIND: KindPrior(
                samples=100, duration_lo=50, duration_hi=150, ratio_lo=0.95, ratio_hi=1.05
            )
        }
    )
    s.add("a", now=0.0, kind=KIND)
    s.add("b", now=0.0)
    assert s.due(2.0, batched=False) == ["b"]  # no prior: the policy's 25 %
    s.on_status(am.Task(id="b", status=am.TaskStatus.PROCESSING, estimated_time=100.0), 2.0)
    assert s.next_check("b") == pytest.approx(60.0 + 2.0)  # 79.2, but max_interval caps
    first = s.next_check("a")
    assert first is not None and first == pytest.approx(49.0)
    assert s.due(first, batched=False) == ["a"]
    s.on_status(am.Task(id="a", status=am.TaskStatus.PROCESSING, estimated_time=100.0), first)
    assert s.next_check("a") == pytest.approx(100 * (0.95 - 0.1 / 100))


def run_kind(
    schedule: PollSchedule, jobs: list[tuple[float, int, Curve]], kind: str
) -> tuple[float, list[float]]:
    """Per-task reads of these realistic jobs (all submitted at 0, the reply in the same
    instant) on a fake clock: status requests per job and each job's lag."""
    for i in range(len(jobs)):
        schedule.add(f"t{i}", now=0.0, kind=kind)
    requests = 0
    lags: list[float] = []
    now = 0.0
    while len(schedule):
        wake = schedule.next_wakeup()
        assert wake is not None
        now = max(now, wake)
        for task_id in schedule.due(now, batched=False):
            requests += 1
            duration, estimate, curve = jobs[int(task_id[1:])]
            status, progress = curve.status(now)
            task = am.Task(
                id=task_id,
                status=am.TaskStatus(status),
                progress=progress,
                estimated_time=float(estimate),
            )
            if schedule.on_status(task, now):
                lags.append(now - duration)
    return requests / len(jobs), lags


def test_a_second_run_of_the_same_kinds_needs_fewer_checks_and_sees_ends_as_soon() -> None:
    profile = RealisticProfile()
    rng = random.Random(7)
    first_jobs = [profile.draw(rng, "sora-2-preview", 8) for _ in range(300)]
    second_jobs = [profile.draw(rng, "sora-2-preview", 8) for _ in range(300)]
    policy = am.PollPolicy(jitter=0.0)
    cold = PollSchedule(policy)
    per_job_cold, lags_cold = run_kind(cold, second_jobs, KIND)
    learned = PollSchedule(policy)
    run_kind(learned, first_jobs, KIND)  # the first run teaches
    assert learned.priors.get(KIND) is not None
    per_job_warm, lags_warm = run_kind(learned, second_jobs, KIND)
    assert len(lags_warm) == len(lags_cold) == 300
    # the first check 2 s after the submit is gone, every end is still seen within target_lag
    assert per_job_warm <= per_job_cold - 0.9
    assert max(lags_warm) <= policy.target_lag
    assert max(lags_cold) <= policy.target_lag


def test_a_schema_2_journal_gains_the_priors_table(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema', '2');"
        "CREATE TABLE jobs (idx INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL,"
        " idempotency_key TEXT NOT NULL UNIQUE, name TEXT, body TEXT NOT NULL,"
        " state TEXT NOT NULL, task_id TEXT, status TEXT, cost REAL, error TEXT,"
        " error_type TEXT, task TEXT, files TEXT, updated_at REAL NOT NULL);"
        "INSERT INTO jobs VALUES (0, 'f', 'k', NULL, '{}', 'pending', 'task_1', NULL, NULL,"
        " NULL, NULL, NULL, NULL, 0);"
    )
    conn.commit()
    conn.close()

    async def run() -> dict[str, KindPrior]:
        journal = SqliteJournal(path)
        records = await journal.open()
        assert records[0].task_id == "task_1"
        assert await journal.load_priors() == {}
        await journal.save_priors({KIND: KindPrior(samples=3, duration_lo=1, duration_hi=2)})
        await journal.close()
        await journal.open()
        try:
            return await journal.load_priors()
        finally:
            await journal.close()

    assert anyio.run(run) == {KIND: KindPrior(samples=3, duration_lo=1.0, duration_hi=2.0)}
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("3",)
    conn.close()


@pytest.mark.anyio
async def test_a_batch_journal_keeps_the_priors_for_the_next_run(tmp_path: Path) -> None:
    journal = tmp_path / "run.sqlite"
    n = 3
    jobs = [am.VideoRequest("sora-2-preview", f"a cat {i}", duration=8) for i in range(n)]
    # what a long first run would have learned (the learning itself: the fake-clock tests)
    taught = KindPrior(samples=40, duration_lo=60, duration_hi=240, ratio_lo=0.8, ratio_hi=1.3)
    async with Emulator(mode="manual") as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client:
            client._poller.schedule.priors.merge({KIND: taught})
            with anyio.fail_after(30):
                async with client.batch(jobs, journal=journal) as results:
                    await emu.wait_until(lambda: emu.tasks_created == n)
                    emu.complete_all()
                    outcomes = [o async for o in results]
        assert len(outcomes) == n and all(o.ok for o in outcomes)
        conn = sqlite3.connect(journal)
        rows = conn.execute(
            "SELECT kind, samples, duration_lo, duration_hi, ratio_lo, ratio_hi FROM priors"
        ).fetchall()
        conn.close()
        # these tasks ended before their first check: such tasks can be shorter than 60 s
        assert len(rows) == 1 and rows[0][:2] == (KIND, 40) and rows[0][2] < 60
        stored = KindPrior(*rows[0][1:])
        assert (stored.duration_hi, stored.ratio_lo, stored.ratio_hi) == (240, 0.8, 1.3)
        more = [am.VideoRequest("sora-2-preview", f"a dog {i}", duration=8) for i in range(n)]
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client:
            assert client._poller.schedule.priors.get(KIND) is None
            with anyio.fail_after(30):
                async with client.batch(jobs + more, journal=journal) as results:
                    # loaded when the batch opened its journal, before any task of it ended
                    assert client._poller.schedule.priors.get(KIND) == stored
                    await emu.wait_until(lambda: emu.tasks_created == 2 * n)
                    emu.complete_all()
                    again = [o async for o in results]
        assert len(again) == 2 * n and sum(o.replayed for o in again) == n


def test_checks_far_apart_only_widen_the_range_and_an_end_before_the_first_check_lowers_it() -> (
    None
):
    priors = Priors(min_samples=1)
    priors.observe(KIND, seen_running=99.0, seen_done=101.0, estimate=100.0)  # a sample
    # seen running at 60 s, done at 95 s: no sample (its end could be anywhere between), but
    # it ended before the shortest learned, so the range reaches down to 95 s (0.95)
    priors.observe(KIND, seen_running=60.0, seen_done=95.0, estimate=100.0)
    prior = priors.get(KIND)
    assert prior is not None and prior.samples == 1
    assert (prior.duration_lo, prior.duration_hi) == (95.0, 100.0)
    assert (prior.ratio_lo, prior.ratio_hi) == (0.95, 1.0)
    # far apart and inside the range: nothing moves
    priors.observe(KIND, seen_running=20.0, seen_done=99.0, estimate=100.0)
    assert (prior.samples, prior.duration_lo, prior.ratio_lo) == (1, 95.0, 0.95)
    # found done by its first check at 90 s: such tasks can be shorter than 90 s
    priors.observe(KIND, seen_running=None, seen_done=90.0, estimate=100.0)
    assert (prior.samples, prior.duration_lo, prior.ratio_lo) == (1, 45.0, 0.95)

"""Learned priors (issue 22): what completed tasks of a kind teach the schedule, on a fake
clock, and how a batch's journal keeps them for the next run."""

from __future__ import annotations

import contextlib
import itertools
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
from apimart_async.testing import follow_clock

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
    schedule: PollSchedule, jobs: list[tuple[float, int, Curve]], kind: str | None
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


async def saved_and_loaded(
    journal: SqliteJournal, priors: dict[str, KindPrior]
) -> dict[str, KindPrior]:
    """Store ``priors`` in an open journal, close it, open it again and read them back."""
    await journal.save_priors(priors)
    await journal.close()
    await journal.open()
    try:
        return await journal.load_priors()
    finally:
        await journal.close()


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
        return await saved_and_loaded(
            journal, {KIND: KindPrior(samples=3, duration_lo=1, duration_hi=2)}
        )

    assert anyio.run(run) == {KIND: KindPrior(samples=3, duration_lo=1.0, duration_hi=2.0)}
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("5",)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"priors", "submits"} <= tables  # schema 5 added the client journal's table
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


# -- progress trust (issue 11) ----------------------------------------------------------------


def test_progress_trust_is_how_far_the_ends_progress_implied_held() -> None:
    priors = Priors(min_samples=2)
    # a 100 s task; its checks' progress implied ends no later than 104 s (the least ceiling,
    # a*100/p) and no sooner than 95 s (the greatest floor, a*100/(p+1)): 100/95 .. 100/104
    priors.observe(
        KIND, seen_running=99.0, seen_done=101.0, estimate=100.0, extrapolated=(104.0, 95.0)
    )
    prior = priors._kinds[KIND]
    assert prior.progress_samples == 1 and prior.progress_ratios(2) is None  # not yet
    assert priors.progress_trust(KIND) is None
    priors.observe(KIND, seen_running=99.0, seen_done=101.0, estimate=100.0, extrapolated=None)
    assert prior.samples == 2 and prior.progress_samples == 1  # no progress: no progress sample
    # progress in a straight line: the end lies between floor and ceiling
    priors.observe(
        KIND, seen_running=49.0, seen_done=51.0, estimate=50.0, extrapolated=(50.5, 49.5)
    )
    assert (prior.progress_lo, prior.progress_hi) == (50 / 49.5, 50 / 50.5)
    lo, hi = priors.progress_trust(KIND) or (0.0, 0.0)
    pad = (50 / 49.5 - 50 / 50.5) / 2  # the window is floor * lo .. ceiling * hi
    assert lo == pytest.approx(50 / 49.5 - pad) and hi == pytest.approx(50 / 50.5 + pad)
    # checks far apart: only a bound that proves the range too narrow moves it
    # (its end, 30 .. 90 s, over the floor 100 s: at most 0.9; over the ceiling 20 s: >= 1.5)
    priors.observe(
        KIND, seen_running=30.0, seen_done=90.0, estimate=100.0, extrapolated=(20.0, 100.0)
    )
    assert (prior.progress_lo, prior.progress_hi) == (0.9, 1.5)
    # the end the last progress implied, held within checks 2 s apart: a progress sample
    # (not one of durations and estimates, which need checks within 10 %)
    priors.observe(
        KIND, seen_running=9.0, seen_done=11.0, estimate=10.0, extrapolated=(10.0, 9.0), implied=9.5
    )
    assert (prior.samples, prior.progress_samples) == (3, 3)
    assert (prior.progress_lo, prior.progress_hi) == (0.9, 1.5)  # 9.5/9 .. 9.5/10: inside
    priors.observe(
        KIND, seen_running=9.0, seen_done=11.0, estimate=10.0, extrapolated=(5.0, 4.9), implied=5.0
    )
    # it implied 5 s but was running at 9 s: the sample is 9 s, 1.8 times its ceiling
    assert prior.progress_samples == 4 and prior.progress_hi == pytest.approx(1.8)
    priors.observe(
        KIND, seen_running=5.0, seen_done=11.0, estimate=10.0, extrapolated=(9.0, 8.9), implied=9.0
    )
    assert prior.progress_samples == 4  # 6 s apart on 8 s: no sample
    # what a store carries: merged as extremes, the larger count
    merged = prior.merged(KindPrior(progress_samples=9, progress_lo=0.5, progress_hi=1.0))
    assert (merged.progress_samples, merged.progress_lo, merged.progress_hi) == (9, 0.5, 1.8)


def straight(duration: float) -> Curve:
    """Progress in a straight line from the submit to the end, in whole percents."""

    class _Straight:
        def status(self, age: float) -> tuple[str, int]:
            if age >= duration:
                return "completed", 100
            return "processing", int(age / duration * 100)

    return _Straight()  # type: ignore[return-value]


def test_straight_progress_of_a_taught_kind_is_followed_with_two_checks() -> None:
    """Jobs of 5-20 s whose estimates are off by up to 20 % and whose progress moves in a
    straight line (the emulator's default): once 20 of the kind have taught the schedule,
    a job is checked at the kind's earliest end, then once at the end its progress implies,
    and every end is still seen within target_lag."""
    rng = random.Random(3)
    policy = am.PollPolicy(jitter=0.0)

    def jobs(n: int) -> list[tuple[float, int, Curve]]:
        out = []
        for _ in range(n):
            duration = rng.uniform(5.0, 20.0)
            out.append((duration, round(duration * rng.uniform(0.8, 1.2)), straight(duration)))
        return out

    teach, follow = jobs(100), jobs(300)
    blind = PollSchedule(policy)
    per_job_blind, _ = run_kind(blind, follow, None)  # no kind: nothing is learned
    cold = PollSchedule(policy)
    per_job_cold, lags_cold = run_kind(cold, follow, KIND)  # learns as its tasks end
    taught = PollSchedule(policy)
    run_kind(taught, teach, KIND)
    lo, hi = taught.priors.progress_trust(KIND) or (0.0, 0.0)
    assert 0.9 < lo < 1.0 < hi < 1.1  # whole percents: within a few % of straight
    per_job, lags = run_kind(taught, follow, KIND)
    assert len(lags) == len(lags_cold) == 300
    assert per_job_blind > 3.5  # the estimate's window: checks 2 s apart across +-20 %
    # learning as it goes: once 20 have ended, the tasks still waiting move to the end
    # their last progress implied
    assert per_job_cold < per_job_blind - 0.9
    assert per_job <= 2.2  # the kind's earliest end, then the end progress implies
    assert per_job < per_job_cold
    assert max(lags) <= policy.target_lag and max(lags_cold) <= policy.target_lag


def test_uneven_progress_earns_no_trust() -> None:
    """The realistic profile's progress stalls and jumps: the range it teaches is wide, and
    checks stay target_lag apart through the estimate's window as before."""
    profile = RealisticProfile()
    rng = random.Random(5)
    taught = PollSchedule(am.PollPolicy(jitter=0.0))
    run_kind(taught, [profile.draw(rng, "sora-2-preview", 8) for _ in range(300)], KIND)
    prior = taught.priors.get(KIND)
    assert prior is not None
    lo, hi = prior.progress_ratios(MIN_SAMPLES) or (0.0, 0.0)
    assert hi - lo > 0.3
    _, lags = run_kind(taught, [profile.draw(rng, "sora-2-preview", 8) for _ in range(300)], KIND)
    assert len(lags) == 300 and max(lags) <= 2.0


def test_a_task_whose_progress_lies_is_followed_as_any_other_after_one_missed_check() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0))
    s.priors.merge(
        {
            KIND: KindPrior(
                samples=50,
                duration_lo=5.0,
                duration_hi=20.0,
                progress_samples=50,
                progress_lo=0.97,
                progress_hi=1.0,
            )
        }
    )
    s.add("a", now=0.0, kind=KIND)
    first = s.next_check("a")
    assert first == pytest.approx(5.0 - 15 / 50)
    assert s.due(first, batched=False) == ["a"]
    # 25 % at 4.7 s: it claims to end at 18.8 s; the window is 0.97 .. 1.0 of that (widened)
    s.on_status(am.Task(id="a", status=am.TaskStatus.PROCESSING, progress=25), first)
    narrow = s.next_check("a")
    pad = 0.03 / 50
    assert narrow == pytest.approx(18.8 * (1.0 + pad))
    # it lied (it stalls at 90 % until 60 s): one missed check, then target_lag apart
    checks: list[float] = []
    now = narrow
    while now < 60.0:
        assert s.due(now, batched=False) == ["a"]
        checks.append(now)
        s.on_status(am.Task(id="a", status=am.TaskStatus.PROCESSING, progress=90), now)
        at = s.next_check("a")
        assert at is not None
        now = at
    gaps = [b - a for a, b in itertools.pairwise(checks)]
    assert gaps and all(0.5 <= g <= 2.0 + 1e-9 for g in gaps[:5])


def test_tasks_waiting_when_their_kind_earns_trust_move_to_the_end_progress_implied() -> None:
    s = PollSchedule(am.PollPolicy(jitter=0.0))
    taught = KindPrior(
        samples=50,
        duration_lo=5.0,
        duration_hi=20.0,
        progress_samples=MIN_SAMPLES - 1,  # one short of trust
        progress_lo=0.97,
        progress_hi=1.0,
    )
    s.priors.merge({KIND: taught})
    s.add("a", now=0.0, kind=KIND)
    s.add("b", now=0.0, kind=KIND)
    first = 5.0 - 15 / 50  # the kind's earliest end
    assert sorted(s.due(first, batched=False)) == ["a", "b"]
    running = am.TaskStatus.PROCESSING
    # a: 47 % at 4.7 s implies 10 s, but its estimate says 40 s and progress is not yet
    # trusted: its next check is at the estimate's window, (40 - 1) / 1.25 s
    s.on_status(am.Task(id="a", status=running, progress=47, estimated_time=40.0), first)
    assert s.next_check("a") == pytest.approx(31.2)
    s.on_status(am.Task(id="b", status=running, progress=94, estimated_time=5.0), first)
    b_next = s.next_check("b")
    assert b_next is not None and b_next < 10.0
    assert s.due(b_next, batched=False) == ["b"]
    # b ends where its progress said: the 20th sample; a moves to the end it implied
    assert s.on_status(am.Task(id="b", status=am.TaskStatus.COMPLETED, progress=100), b_next)
    pad = 0.03 / MIN_SAMPLES
    assert s.next_check("a") == pytest.approx(10.0 * (1.0 + pad))


def test_a_check_that_rode_along_early_does_not_count_as_a_missed_narrow_window() -> None:
    """On the batch route a task due soon rides along in a request going out anyway: its
    check then comes before the end its progress implied, and finding it running there proves
    nothing against the window."""
    s = PollSchedule(am.PollPolicy(jitter=0.0))
    s.priors.merge(
        {
            KIND: KindPrior(
                samples=50,
                duration_lo=5.0,
                duration_hi=20.0,
                progress_samples=50,
                progress_lo=0.97,
                progress_hi=1.0,
            )
        }
    )
    s.add("a", now=0.0, kind=KIND)
    first = s.next_check("a")
    assert first is not None
    assert s.due(first) == ["a"]
    s.on_status(am.Task(id="a", status=am.TaskStatus.PROCESSING, progress=25), first)
    narrow = s.next_check("a")
    assert narrow is not None and narrow > 15.0
    s.add("b", now=narrow - 0.3 - 60.0, submitted_at=narrow - 0.3 - 60.0)  # due just before
    assert sorted(s.due(narrow - 0.3)) == ["a", "b"]  # a rides along, 0.3 s early
    s.on_status(am.Task(id="a", status=am.TaskStatus.PROCESSING, progress=95), narrow - 0.3)
    again = s.next_check("a")
    # still trusted: one check at the end 95 % implies, not target_lag steps from now
    assert again is not None and again == pytest.approx((narrow - 0.3) * 100 / 95 * (1 + 0.03 / 50))


async def _settle_then_advance(emu: Emulator, client: am.AsyncApimart) -> bool:
    """Wait until the poller has made every check due and heard back, then move the emulator's
    (frozen) clock to the next check and wake the poller. False once nothing is watched."""
    poller = client._poller
    s = poller.schedule

    def settled() -> bool:
        wake = s.next_wakeup()
        busy = any(s.next_check(t) is None for t in s.ids())  # a check being made
        return not busy and (wake is None or wake > poller.now())

    with anyio.fail_after(30):
        while not settled():  # noqa: ASYNC110 - the schedule has no event to wait on
            await anyio.sleep(0.001)
    wake = s.next_wakeup()
    if wake is None:
        return False
    emu.advance(wake - poller.now() + 1e-6)
    poller._wake.set()
    return True


@pytest.mark.anyio
async def test_single_generates_learn_their_kind_and_the_next_is_first_checked_at_its_end() -> None:
    # client.videos.generate passes the request's kind to the poller, as a batch does: after
    # MIN_SAMPLES completed tasks of a kind, the next one is first checked at the kind's
    # earliest end, not first_check (2 s) after its submit (tasks of 50 s: max_interval, 60 s,
    # caps the wait for the first check)
    policy = am.PollPolicy(jitter=0.0)
    async with Emulator(frozen_clock=True, task_duration=50.0, estimate_error=0.0) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=policy) as client:
            follow_clock(client, emu)
            s = client._poller.schedule
            requests = [
                am.VideoRequest("sora-2-preview", f"cat {i}", duration=8) for i in range(21)
            ]
            done: list[am.Task] = []

            async def generate(request: am.VideoRequest) -> None:
                done.append(await client.videos.generate(request))

            async with anyio.create_task_group() as tg:
                for request in requests[:MIN_SAMPLES]:
                    tg.start_soon(generate, request)
                with anyio.fail_after(30):
                    while len(s) < MIN_SAMPLES:  # noqa: ASYNC110 - no event to wait on
                        await anyio.sleep(0.001)
                first_run = emu.counters.get("batch", 0)
                while await _settle_then_advance(emu, client):
                    pass
            first_run = emu.counters.get("batch", 0) - first_run
            assert len(done) == MIN_SAMPLES and all(t.ok for t in done)
            prior = s.priors.get(KIND)
            assert prior is not None and prior.samples == MIN_SAMPLES
            earliest = prior.durations()[0]
            assert 49 <= earliest <= 51  # the 50 s tasks, each seen ending within target_lag
            # the next task of the kind: not a single check before its kind's earliest end
            async with anyio.create_task_group() as tg:
                submitted = client._poller.now()
                tg.start_soon(generate, requests[-1])
                with anyio.fail_after(30):
                    while len(s) < 1:  # noqa: ASYNC110 - no event to wait on
                        await anyio.sleep(0.001)
                (task_id,) = s.ids()
                first = s.next_check(task_id)
                assert first is not None
                assert first - submitted == pytest.approx(earliest, abs=0.01)
                before = emu.counters.get("batch", 0)
                checks = []
                while await _settle_then_advance(emu, client):
                    checks.append(client._poller.now() - submitted)
            second_run = emu.counters.get("batch", 0) - before
            assert len(done) == MIN_SAMPLES + 1 and done[-1].ok
            # the first check found it at its end: one status request in all; the first 20
            # (together, in shared batch requests) took one 2 s after their submit, then one
            # every 2 s from the estimate's early edge (49 / 1.25 = 39.2 s) to the end
            assert checks == [pytest.approx(earliest, abs=0.01)]
            assert second_run == 1
            assert first_run == 8


def test_an_absurd_estimate_is_set_aside_but_a_lasting_change_is_learned() -> None:
    from apimart_async._priors import MIN_SAMPLES, KindPrior

    prior = KindPrior()
    for i in range(MIN_SAMPLES):
        prior.add(90.0 + i, 100.0)  # ratios 0.9 .. 1.09
    lo, hi = prior.ratio_lo, prior.ratio_hi
    prior.add(95.0, 10_000_000.0)  # one absurd estimate: set aside
    assert (prior.ratio_lo, prior.ratio_hi) == (lo, hi) and prior.ratio_outliers == 1
    assert prior.samples == MIN_SAMPLES + 1  # its duration still counts
    prior.add(95.0, 12.0)  # another (22 samples: two may be set aside)
    assert prior.ratio_hi == hi and prior.ratio_outliers == 2
    prior.add(95.0, 12.0)  # a third: more than one in ten is a change of the estimates, learned
    assert prior.ratio_hi == 95.0 / 12.0 and prior.ratio_outliers == 2


#: A kind whose progress proved straight, as a long run leaves it.
TRUSTED = KindPrior(
    samples=30,
    duration_lo=60.0,
    duration_hi=90.0,
    ratio_lo=0.9,
    ratio_hi=1.1,
    progress_samples=25,
    progress_lo=0.97,
    progress_hi=1.02,
)


def test_progress_trust_is_kept_in_the_journal_for_the_next_run(tmp_path: Path) -> None:
    # issue 22: a kind whose progress proved straight needs no new min_samples tasks to be
    # trusted again by the next run
    taught = TRUSTED

    async def run() -> dict[str, KindPrior]:
        journal = SqliteJournal(tmp_path / "run.sqlite")
        await journal.open()
        return await saved_and_loaded(journal, {KIND: taught})

    loaded = anyio.run(run)
    assert loaded == {KIND: taught}
    priors = Priors()
    priors.merge(loaded)
    assert priors.progress_trust(KIND) is not None


def test_a_schema_3_journal_keeps_its_priors_and_gains_progress_trust(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "INSERT INTO meta VALUES ('schema', '3');"
            "INSERT INTO meta VALUES ('format', 'apimart-async journal');"
            "CREATE TABLE jobs (idx INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL,"
            " idempotency_key TEXT NOT NULL UNIQUE, name TEXT, body TEXT NOT NULL,"
            " state TEXT NOT NULL, task_id TEXT, status TEXT, cost REAL, error TEXT,"
            " error_type TEXT, task TEXT, files TEXT, updated_at REAL NOT NULL);"
            "CREATE TABLE priors (kind TEXT PRIMARY KEY, samples INTEGER NOT NULL,"
            " duration_lo REAL NOT NULL, duration_hi REAL NOT NULL, ratio_lo REAL,"
            " ratio_hi REAL, updated_at REAL NOT NULL);"
            f"INSERT INTO priors VALUES ('{KIND}', 30, 60.0, 90.0, 0.9, 1.1, 0);"
        )
        conn.commit()
    old = KindPrior(samples=30, duration_lo=60.0, duration_hi=90.0, ratio_lo=0.9, ratio_hi=1.1)
    trusted = TRUSTED

    async def run() -> tuple[dict[str, KindPrior], dict[str, KindPrior]]:
        journal = SqliteJournal(path)
        await journal.open()
        before = await journal.load_priors()
        return before, await saved_and_loaded(journal, {KIND: trusted})

    assert anyio.run(run) == ({KIND: old}, {KIND: trusted})
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("5",)

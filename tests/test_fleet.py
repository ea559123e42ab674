"""Many workers, one batch (issue 15, part 2).

- ``Fleet`` (``_fleet``), one worker's claim loop, on fakes: what it feeds, what it lets go,
  when it ends.
- Workers on a real PostgreSQL and the emulator: two at once share the jobs; the fleet-wide
  ``max_pending`` holds; and the crash test: 3 worker processes, faults, SIGKILLs and
  restarts (150 jobs and 4 kills here; 1,000 jobs and 15 kills under ``--long``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import apimart_async as am
from apimart_async._fleet import Claimed, Fleet, Solo, unclaim
from apimart_async._journal import JobRecord
from apimart_async.emulator import Emulator

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


# -- Fleet on fakes --------------------------------------------------------------------------


class FakeClaims:
    """A claims table in memory: ``holder`` by job, ``done`` jobs, and what was asked."""

    def __init__(self, size: int, me: str = "me") -> None:
        self.size = size
        self.me = me
        self.holder: dict[int, str] = {}
        self.done: set[int] = set()
        self.released: list[set[int]] = []
        self.naps: list[float] = []
        self.records: dict[int, JobRecord] = {}

    async def claim(self, n: int, exclude: set[int]) -> list[int]:
        free = [
            i
            for i in range(self.size)
            if i not in self.holder and i not in self.done and i not in exclude
        ][:n]
        for i in free:
            self.holder[i] = self.me
        return free

    async def beat(self) -> set[int]:
        for i in [i for i, w in self.holder.items() if w == self.me and i in self.done]:
            del self.holder[i]
        return {i for i, w in self.holder.items() if w == self.me}

    async def outstanding(self, exclude: set[int]) -> int:
        return sum(
            1
            for i in range(self.size)
            if i not in self.done and self.holder.get(i) != self.me and i not in exclude
        )

    async def read(self, indexes: list[int]) -> dict[int, JobRecord]:
        return {i: self.records[i] for i in indexes if i in self.records}

    async def release(self, indexes: set[int]) -> None:
        self.released.append(set(indexes))
        for i in indexes:
            if self.holder.get(i) == self.me:
                del self.holder[i]

    async def nap(self, seconds: float) -> None:
        self.naps.append(seconds)
        await anyio.lowlevel.checkpoint()

    def fleet(self, chunk: int = 2) -> Fleet:
        return Fleet(
            claim=self.claim,
            beat=self.beat,
            outstanding=self.outstanding,
            records=self.read,
            release=self.release,
            lease=3.0,
            chunk=chunk,
            sleep=self.nap,
        )


def record(index: int, state: str, task_id: str | None = None) -> JobRecord:
    return JobRecord(index, f"fp{index}", f"key{index}", state, task_id=task_id)


async def test_a_worker_is_fed_only_the_jobs_it_claims_with_their_records_read_again() -> None:
    fake = FakeClaims(5)
    fake.holder[1] = "other"  # another worker holds job 1
    fake.records[2] = record(2, "pending", "task_2")  # left by a worker that died
    fleet = fake.fleet()
    known: dict[int, JobRecord] = {2: record(2, "submitting"), 3: record(3, "submitting")}
    fed: list[Claimed] = []
    items = fleet.items(["a", "b", "c", "d", "e"], known)
    assert not isinstance(items, list)
    async for item in items:  # type: ignore[union-attr]
        assert isinstance(item, Claimed)
        fed.append(item)
        if len(fed) == 4:
            fake.done.add(1)  # the other worker ended job 1: nothing is left to this one
    assert [(c.index, c.item) for c in fed] == [(0, "a"), (2, "c"), (3, "d"), (4, "e")]
    assert fleet.claimed == 4 and fleet.held == {0, 2, 3, 4}
    assert known == {2: record(2, "pending", "task_2")}  # read again; 3 has no row: forgotten
    assert fake.naps == []  # it never had to wait: job 1 was done when it looked


async def test_a_worker_waits_while_another_holds_jobs_then_takes_them_over() -> None:
    fake = FakeClaims(2)
    fake.holder[0] = fake.holder[1] = "dead"
    fleet = fake.fleet()
    fed: list[int] = []

    async def nap(seconds: float) -> None:
        fake.naps.append(seconds)
        if len(fake.naps) == 3:  # the dead worker's leases ran out
            fake.holder.clear()

    fleet._sleep = nap
    async for item in fleet.items(["a", "b"], {}):  # type: ignore[union-attr]
        fed.append(unclaim(99, item)[0])
        fake.done.add(fed[-1])
    assert fed == [0, 1]
    assert fake.naps == [1.0, 1.0, 1.0]  # waits of min(lease / 3, 1 s), no busy loop


async def test_the_heartbeat_lets_go_of_jobs_taken_over_and_releases_ended_ones() -> None:
    fake = FakeClaims(6)
    fleet = fake.fleet(chunk=6)
    dropped: list[set[int]] = []
    fleet.let_go = dropped.append
    gen = fleet.items(list("abcdef"), {})
    got = [await gen.__anext__() for _ in range(6)]  # type: ignore[union-attr]
    assert len(got) == 6
    seen = fleet.observe(None)
    seen(am.BatchEvent("completed", 0))
    seen(am.BatchEvent("errored", 1))  # ended here without being done: not taken again
    seen(am.BatchEvent("progress", 2))
    fake.done.add(0)
    fake.holder[3] = "other"  # its lease ran out and another worker took it
    fake.done.add(4)
    fake.holder.pop(4)  # and another worker ended job 4 (after taking it over)
    await fleet.beat_once()
    assert fake.released == [{0, 1}]
    assert dropped == [{3, 4}]
    assert fleet.held == {2, 5} and fleet.taken_over == 2 and fleet.tried == {0, 1}
    assert {3, 4} <= fleet.fed  # left to the others: never fed here again
    await fleet.beat_once()  # nothing new
    assert dropped == [{3, 4}] and fake.released == [{0, 1}]
    await fleet.close()  # a clean stop lets go of the rest
    assert fake.released[-1] == {2, 5}
    assert not [i for i, w in fake.holder.items() if w == "me"]
    assert await fake.claim(6, fleet.tried) == [2, 5]  # others may take them at once


async def test_a_job_that_ended_here_without_being_done_is_not_claimed_here_again() -> None:
    fake = FakeClaims(1)
    fleet = fake.fleet()
    gen = fleet.items(["a"], {})
    assert unclaim(0, await gen.__anext__()) == (0, "a")  # type: ignore[union-attr]
    fleet.observe(None)(am.BatchEvent("errored", 0))
    await fleet.beat_once()
    with pytest.raises(StopAsyncIteration):  # left for another worker or a later run
        await gen.__anext__()  # type: ignore[union-attr]
    assert fake.holder == {}


async def test_a_job_is_never_fed_twice_by_one_worker_even_when_its_own_lease_ran_out() -> None:
    fake = FakeClaims(2)
    fleet = fake.fleet(chunk=1)
    gen = fleet.items(["a", "b"], {})
    assert unclaim(9, await gen.__anext__()) == (0, "a")  # type: ignore[union-attr]
    asked: list[set[int]] = []
    claim = fake.claim

    async def claim_after_a_stall(n: int, exclude: set[int]) -> list[int]:
        asked.append(set(exclude))
        fake.holder.pop(0, None)  # this worker was slow: its lease on job 0 ran out
        return await claim(n, exclude)

    fleet._claim = claim_after_a_stall
    assert unclaim(9, await gen.__anext__()) == (1, "b")  # not job 0 again (two downloads)
    assert asked == [{0}]


async def test_a_worker_needs_a_list_and_a_solo_batch_is_fed_everything() -> None:
    fake = FakeClaims(1)
    with pytest.raises(am.ValidationError, match="requests: must be a list"):
        fake.fleet().items(iter(["a"]), {})
    items = ["a"]
    assert Solo().items(items, {}) is items
    assert unclaim(7, "x") == (7, "x")


async def test_heartbeat_failure_is_the_batch_fault() -> None:
    fake = FakeClaims(1)
    fleet = fake.fleet()

    async def lost() -> set[int]:
        raise am.JournalError("the journal is out of reach")

    faults: list[am.JournalError] = []
    fleet._beat = lost
    fleet.fault = faults.append
    await fleet.heartbeats()  # returns after reporting
    assert [str(f) for f in faults] == ["the journal is out of reach"]


# -- workers on PostgreSQL and the emulator ---------------------------------------------------


def fleet_jobs(n: int) -> list[tuple[str, am.VideoRequest]]:
    return [(f"job{i}", am.VideoRequest("sora-2-preview", f"prompt {i}")) for i in range(n)]


def pg_journal(url: str, schema: str, n: int, name: str = "fleet") -> am.PostgresJournal:
    prints = [r.fingerprint() for _, r in fleet_jobs(n)]
    return am.PostgresJournal(url, name=name, schema=schema, fingerprints=prints)


async def pg_rows(url: str, sql: str) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


FAST = am.PollPolicy(first_check=0.05, min_interval=0.05, max_interval=0.2, jitter=0.0)


async def run_worker(
    emu: Emulator,
    url: str,
    schema: str,
    n: int,
    out: Path,
    outcomes: list[am.Outcome],
    **options: Any,
) -> None:
    """One worker of the batch of ``n`` fleet jobs (its own client, a 5 s lease, files to
    ``out``), its outcomes appended to ``outcomes``."""
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST) as client:
        async with client.batch(
            fleet_jobs(n),
            journal=pg_journal(url, schema, n),
            download_dir=out,
            lease=5.0,
            **options,
        ) as results:
            async for outcome in results:
                outcomes.append(outcome)


async def test_two_workers_share_one_batch_each_job_once_within_a_fleet_wide_limit(
    postgres: Any, pg_schema: str, tmp_path: Path
) -> None:
    n, limit = 40, 3
    ended: dict[str, list[int]] = {"a": [], "b": []}
    async with Emulator(task_duration=(0.05, 0.3), video_bytes=4096, seed=3) as emu:

        async def worker(tag: str) -> None:
            async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST) as client:
                async with client.batch(
                    fleet_jobs(n),
                    concurrency=4,
                    max_pending=limit,
                    journal=pg_journal(postgres.url, pg_schema, n),
                    download_dir=tmp_path / tag,
                    lease=5.0,
                ) as results:
                    async for outcome in results:
                        assert outcome.ok, outcome.error
                        ended[tag].append(outcome.index)

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, "a")
            tg.start_soon(worker, "b")
        assert sorted(ended["a"] + ended["b"]) == list(range(n))  # each job once, fleet-wide
        assert ended["a"] and ended["b"]  # both worked
        assert emu.tasks_created == n and set(emu.tasks_per_key.values()) == {1}
        # each worker alone may have up to 3 pending: together, never more than 3 either
        assert emu.state.max_unfinished <= limit
    rows = await pg_rows(
        postgres.url, f"SELECT state, count(*) AS n FROM {pg_schema}.jobs GROUP BY state"
    )
    assert {r["state"]: r["n"] for r in rows} == {"done": n}
    held = await pg_rows(
        postgres.url, f"SELECT count(*) AS n FROM {pg_schema}.claims WHERE worker IS NOT NULL"
    )
    assert held[0]["n"] == 0  # every claim let go
    workers = await pg_rows(postgres.url, f"SELECT host, pid FROM {pg_schema}.workers")
    assert len(workers) == 2


async def test_a_batch_run_by_workers_keeps_a_fleet_wide_max_cost(
    postgres: Any, pg_schema: str, tmp_path: Path
) -> None:
    n = 12
    async with Emulator(task_duration=(0.05, 0.2), video_bytes=1024, seed=4) as emu:
        price = None
        outcomes: list[am.Outcome] = []
        run = (emu, postgres.url, pg_schema, n)
        async with anyio.create_task_group() as tg:
            for tag in ("a", "b"):
                tg.start_soon(
                    partial(run_worker, *run, tmp_path / tag, outcomes, concurrency=2, max_cost=1.0)
                )
        paid = [o for o in outcomes if o.ok]
        price = paid[0].task.cost if paid and paid[0].task else None
        assert price is not None and price > 0
        assert emu.tasks_created == len(paid) == int(1.0 // price)  # not one more, fleet-wide
        # every other job refused by a budget: the worker's own (it spent it) or the fleet's
        # (the other did), whichever looked first; two local budgets alone would pay twice.
        # A refused job is not done: each worker that claims it says so (at most once each).
        refused = [o for o in outcomes if isinstance(o.error, am.BudgetExceededError)]
        assert {o.index for o in refused} == set(range(n)) - {o.index for o in paid}
        assert len(refused) <= 2 * (n - len(paid)) and len(outcomes) == len(paid) + len(refused)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_workers_killed_and_restarted_every_job_ends_once(
    postgres: Any, pg_schema: str, tmp_path: Path, long_run: bool
) -> None:
    """The must-show crash test: 3 worker processes, 5 % faults, random SIGKILLs and
    restarts; every job ends exactly once, no key makes two tasks, ``max_pending`` holds
    fleet-wide (measured at the emulator), every file is whole (sha256)."""
    n, kills_wanted, lease, limit = (1000, 15, 2.0, 24) if long_run else (150, 4, 2.0, 12)
    rng = random.Random(15)
    outs = [tmp_path / f"w{slot}" for slot in range(3)]
    async with Emulator(
        task_duration=(0.1, 0.6), video_bytes=64 * 1024, file_chunk_delay=0.002, seed=15
    ) as emu:
        emu.faults.set_rate(0.05)  # every endpoint, every kind of fault
        procs: dict[int, Any] = {}
        kills: list[tuple[int, int, int]] = []  # (slot, tasks created, file requests)

        def progress() -> int:
            return emu.tasks_created + emu.counters.get("file", 0)

        async def start(slot: int) -> None:
            cmd = [
                sys.executable,
                str(ROOT / "tests" / "fleet_worker.py"),
                emu.base_url,
                emu.api_key,
                postgres.url,
                pg_schema,
                str(outs[slot]),
                str(n),
                str(lease),
                str(limit),
            ]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            procs[slot] = await anyio.open_process(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=None
            )

        for slot in range(3):
            await start(slot)
        # a kill each time the fleet made this much progress (tasks made + files fetched)
        step = max(10, 2 * n // (kills_wanted * 3 // 2))
        with anyio.fail_after(600 if long_run else 240):
            base = progress()
            while len(kills) < kills_wanted:
                live = [s for s, p in procs.items() if p.returncode is None]
                if not live:
                    break  # the batch ended before all the kills: asserted below
                if progress() - base < step:
                    try:
                        await emu.wait_until(lambda b=base: progress() - b >= step, timeout=2)
                    except TimeoutError:
                        continue  # quiet (leases running out, or the end): look again
                slot = rng.choice(live)
                proc = procs[slot]
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                await proc.aclose()
                kills.append((slot, emu.tasks_created, emu.counters.get("file", 0)))
                base = progress()
                await start(slot)  # a restart, as a supervisor would
            codes = [await p.wait() for p in procs.values()]
            for p in procs.values():
                await p.aclose()
        print(f"jobs {n}, kills {len(kills)} (slot, tasks made, file requests): {kills}")
        assert codes == [0, 0, 0]
        assert len(kills) >= kills_wanted
        # nothing paid twice: each key made one task, each job one task
        assert emu.tasks_created == n
        assert set(emu.tasks_per_key.values()) == {1}
        prompts = Counter(t.body["prompt"] for t in emu.state.tasks.values())
        assert len(prompts) == n and set(prompts.values()) == {1}
        task_of = {t.body["prompt"]: t.id for t in emu.state.tasks.values()}
        # the fleet-wide limit, as the service saw it
        print(f"max pending at the emulator {emu.state.max_unfinished} (limit {limit})")
        assert emu.state.max_unfinished <= limit
        served = emu.stats()["faults_served"]
        print(f"faults served {sum(served.values())}: {served}")
        assert served  # faults were served
        # the journal: every job done, completed, with its task and its file
        rows = await pg_rows(
            postgres.url,
            f"SELECT idx, state, status, task_id, files FROM {pg_schema}.jobs"
            " WHERE batch = 'fleet' ORDER BY idx",
        )
        assert [r["idx"] for r in rows] == list(range(n))
        for r in rows:
            assert (r["state"], r["status"]) == ("done", "completed"), r
            assert r["task_id"] == task_of[f"prompt {r['idx']}"]
            (f,) = json.loads(r["files"])
            path = Path(f["path"])
            assert path.name == f"job{r['idx']}.mp4"
            assert f["sha256"] == emu.file_sha256(r["task_id"]) == file_sha256(path)
            assert path.stat().st_size == emu.state.video_bytes == f["bytes"]
        # ended exactly once: no job in two manifests (a killed worker may miss a line)
        lines = [
            json.loads(line)["index"]
            for out in outs
            if (out / "manifest.jsonl").exists()
            for line in (out / "manifest.jsonl").read_text().splitlines()
        ]
        assert set(Counter(lines).values()) <= {1}


# -- options -----------------------------------------------------------------------------------


async def test_lease_is_checked_before_anything_is_sent() -> None:
    async with am.AsyncApimart("sk-test", base_url="http://127.0.0.1:9") as client:
        with pytest.raises(am.ValidationError, match="lease"):
            client.batch([], lease=0)
        with pytest.raises(am.ValidationError, match="lease"):
            client.batch([], lease=float("inf"))


async def test_cli_lease_flag_is_checked(tmp_path: Path) -> None:
    from .test_cli import JOBS, cli

    code, _, stderr = await cli("run", str(JOBS), "--out", str(tmp_path), "--lease", "0")
    assert code == 2
    assert "--lease: must be a number of seconds > 0, got '0'" in stderr


async def test_cli_workers_share_a_batch(postgres: Any, pg_schema: str, tmp_path: Path) -> None:
    """Two `run` commands of the same batch at once: each a worker, no JournalLockedError,
    each job ended by one of them, and each exits 0 counting the other's jobs."""
    from .test_cli import JOBS, cli

    base = ["--journal", postgres.url, "--schema", pg_schema, "--emulate", "--lease", "5"]
    results: list[tuple[int, str, str]] = []

    async def one(tag: str) -> None:
        results.append(await cli("run", str(JOBS), "--out", str(tmp_path / tag), *base))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "a")
        tg.start_soon(one, "b")
    completed = 0
    for code, stdout, stderr in results:
        assert code == 0, stderr
        assert "JournalLockedError" not in stderr
        # each runs an emulator of its own: a job taken over from a worker that died would be
        # unknown to it (NotFoundError); the warning says so and what to run instead
        assert "--emulate runs an emulator in this worker only" in stderr
        (mine,) = re.findall(r"^completed\s+(\d+)$", stdout, re.MULTILINE)
        completed += int(mine)
    assert completed == 5  # each job ended by one worker; each run counts the other's too
    videos = [p.name for tag in "ab" for p in (tmp_path / tag).glob("*.mp4")]
    assert len(videos) == len(set(videos)) == 5


async def test_a_job_taken_over_while_its_worker_waited_to_record_it_is_dropped_not_a_fault(
    postgres: Any, pg_schema: str, tmp_path: Path
) -> None:
    """Worker B claimed job 1 and waits to record it (the fleet is at max_pending, or the
    database is out of reach) past its lease; worker A takes job 1 over and records it with
    its own key. B must let job 1 go (not submit it, not stop): found by stopping PostgreSQL
    for longer than --lease with two CLI workers, one of which ended with 'job 26 is already
    recorded with another key' and exit 1."""
    from .test_pg_journal import eventually, fetchval

    n = 3
    jobs = fleet_jobs(n)
    other = pg_journal(postgres.url, pg_schema, n)
    await other.open()
    from apimart_async._pg_claims import Claims

    holder = Claims(other, worker="x", lease=300)
    await holder.join()
    assert [c.index for c in await holder.claim(1)] == [0]
    body = jobs[0][1].to_body()
    await other.add(0, jobs[0][1].fingerprint(), "key-x", "job0", body)
    await other.set_task(0, "task_x")  # in flight elsewhere: the fleet is at max_pending=1
    outcomes: list[am.Outcome] = []
    async with Emulator(task_duration=(0.05, 0.2), video_bytes=1024, seed=5) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST) as client:
            async with client.batch(
                jobs,
                concurrency=1,
                max_pending=1,
                journal=pg_journal(postgres.url, pg_schema, n),
                download_dir=tmp_path / "b",
                lease=30.0,
            ) as results:
                held = f"SELECT worker FROM {pg_schema}.claims WHERE idx = 1"

                async def b_holds_job_1() -> bool:
                    return (await fetchval(postgres.url, held)) not in (None, "x")

                await eventually(b_holds_job_1)
                # B's lease ran out; A took job 1 over, recorded it with its key and ended it
                await fetchval(postgres.url, f"UPDATE {pg_schema}.claims SET worker = 'a' WHERE idx = 1")  # fmt: skip
                await other.add(1, jobs[1][1].fingerprint(), "key-a", "job1", jobs[1][1].to_body())
                for i in (0, 1):
                    await other.finish(
                        i, status="completed", cost=0.1, task=None, files=(), error=None,
                        error_type=None,
                    )  # fmt: skip
                async for outcome in results:
                    outcomes.append(outcome)
        assert emu.tasks_created == 1  # job 2 only: job 1 is A's
    await holder.close()
    await other.close()
    assert [(o.index, o.ok) for o in outcomes] == [(2, True)]


async def test_pending_jobs_taken_over_free_their_places_for_the_next_job(
    postgres: Any, pg_schema: str, tmp_path: Path
) -> None:
    """Worker B's only pending task (max_pending=1) is taken over by another worker while B's
    feeder waits for a free place: the heartbeat lets it go, and the feeder must be woken to
    submit the next job (it waited forever, renewing the lease of that job: nobody ran it)."""
    from .test_pg_journal import fetchval

    n = 2
    jobs = fleet_jobs(n)
    other = pg_journal(postgres.url, pg_schema, n)
    async with Emulator(mode="manual") as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST) as client:
            async with client.batch(
                jobs,
                concurrency=1,
                max_pending=1,
                journal=pg_journal(postgres.url, pg_schema, n),
                download_dir=tmp_path / "b",
                lease=0.6,
            ) as results:
                await emu.wait_until(lambda: emu.tasks_created == 1)
                # another worker took job 0 over (B stalled past its lease) and ended it
                await fetchval(postgres.url, f"UPDATE {pg_schema}.claims SET worker = 'a' WHERE idx = 0")  # fmt: skip
                await other.open()
                await other.finish(
                    0, status="completed", cost=0.1, task=None, files=(), error=None,
                    error_type=None,
                )  # fmt: skip
                await emu.wait_until(lambda: emu.tasks_created == 2, timeout=20)
                emu.complete(sorted(emu.task_ids())[-1])
                outcomes = [o async for o in results]
    await other.close()
    assert [(o.index, o.ok) for o in outcomes] == [(1, True)]


async def test_a_job_another_worker_ended_first_is_not_handed_out_twice(
    postgres: Any, pg_schema: str, tmp_path: Path
) -> None:
    """After an outage longer than the lease, worker A re-attached B's task of job 0 and ended
    it first; B, still following the same task, sees it end too. B must not hand job 0 out
    (nor count it, nor its cost): a job ends once in the fleet, not once per worker that saw
    it (found with two CLI workers: 8 jobs 'completed' in both summaries, $6.40 counted twice)."""
    from .test_pg_journal import fetchval

    n = 2
    other = pg_journal(postgres.url, pg_schema, n)
    async with Emulator(mode="manual") as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST) as client:
            async with client.batch(
                fleet_jobs(n),
                journal=pg_journal(postgres.url, pg_schema, n),
                download_dir=tmp_path / "b",
                lease=30.0,
            ) as results:
                await emu.wait_until(lambda: emu.tasks_created == n)
                first = await fetchval(
                    postgres.url, f"SELECT task_id FROM {pg_schema}.jobs WHERE idx = 0"
                )
                await fetchval(postgres.url, f"UPDATE {pg_schema}.claims SET worker = 'a' WHERE idx = 0")  # fmt: skip
                await other.open()
                await other.finish(
                    0, status="completed", cost=0.8, task=None, files=(), error=None,
                    error_type=None,
                )  # fmt: skip
                for task_id in emu.task_ids():
                    emu.complete(task_id)
                outcomes = [o async for o in results]
                stats = results.stats()
    await other.close()
    assert first is not None
    assert [(o.index, o.ok) for o in outcomes] == [(1, True)]
    assert (stats.completed, stats.errored) == (1, 0)
    assert stats.cost == outcomes[0].task.cost  # type: ignore[union-attr]


async def test_sigterm_stops_a_cli_worker_as_ctrl_c_does_letting_go_of_its_jobs(
    postgres: Any, pg_schema: str, tmp_path: Path
) -> None:
    """SIGTERM is how a service manager, a CI time limit or a spot machine's notice stops a
    worker. It was the default death: no resume line, and the worker's jobs stayed claimed
    until their --lease ran out (here 300 s). Now it is Ctrl-C: exit 130, claims let go."""
    from .test_pg_journal import fetchval

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(
            json.dumps({"name": f"j{i}", "model": "sora-2-preview", "prompt": f"p {i}"}) + "\n"
            for i in range(6)
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with Emulator(mode="manual") as emu:
        env["APIMART_API_KEY"] = emu.api_key
        cmd = [
            sys.executable, "-m", "apimart_async.cli", "run", str(jobs), "-o", str(tmp_path / "o"),
            "--base-url", emu.base_url, "--journal", postgres.url, "--schema", pg_schema,
            "--lease", "300", "--grace", "0", "--concurrency", "2",
        ]  # fmt: skip
        async with await anyio.open_process(cmd, env=env) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            await emu.wait_until(lambda: emu.tasks_created >= 2, timeout=60)
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(60):
                await proc.wait()
            err = (await proc.stderr.receive(1 << 20)).decode()
    assert proc.returncode == 130, err
    assert "resume with:" in err and postgres.password not in err
    held = f"SELECT count(*) FROM {pg_schema}.claims WHERE worker IS NOT NULL"
    assert await fetchval(postgres.url, held) == 0  # let go: another worker takes them at once


async def test_a_worker_claims_no_more_than_it_can_run_soon(
    postgres: Any, pg_schema: str, tmp_path: Path
) -> None:
    """The claim chunk is sized by what the worker may run: with max_pending=2 it held 8 jobs
    (its concurrency) while running 2, jobs another worker could have run meanwhile."""
    from .test_pg_journal import eventually, fetchval

    n = 20
    async with Emulator(mode="manual") as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST) as client:
            async with client.batch(
                fleet_jobs(n),
                concurrency=8,
                max_pending=2,
                journal=pg_journal(postgres.url, pg_schema, n),
                download_dir=tmp_path / "w",
                lease=30.0,
            ) as results:
                await emu.wait_until(lambda: emu.tasks_created == 2)
                fleet = results._run._fleet
                await eventually(lambda: fleet.claimed > 2)  # the next chunk, then it waits
                held = f"SELECT count(*) FROM {pg_schema}.claims WHERE worker IS NOT NULL"
                assert await fetchval(postgres.url, held) == fleet.claimed <= 2 * 2
                await results.stop()


async def test_a_worker_blocked_at_the_fleet_limit_takes_over_a_dead_workers_running_jobs(
    postgres: Any, pg_schema: str, tmp_path: Path
) -> None:
    """Worker x filled the fleet's max_pending=2 (jobs 0 and 1 running) and died. Worker B,
    started meanwhile, had claimed jobs 2 to 5 and waited for a free place; x's leases ran
    out, but B never took its jobs over (only its feeder claims, and the feeder waited for
    that place): B waited forever, renewing its own claims (found with two CLI workers and
    SIGKILL: the survivor held 16 jobs and submitted none)."""
    from apimart_async._pg_claims import Claims

    from .test_pg_journal import eventually, fetchval

    n = 6
    jobs = fleet_jobs(n)
    other = pg_journal(postgres.url, pg_schema, n)
    await other.open()
    x = Claims(other, worker="x", lease=300)
    await x.join()
    assert [c.index for c in await x.claim(2)] == [0, 1]
    outcomes: list[am.Outcome] = []
    async with Emulator(task_duration=(0.05, 0.2), video_bytes=1024, seed=6) as emu:
        for i, task_id in enumerate(emu.create_tasks(2)):
            request = jobs[i][1]
            await other.add(i, request.fingerprint(), f"key-x{i}", f"job{i}", request.to_body())
            await other.set_task(i, task_id)
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST) as client:
            async with client.batch(
                jobs,
                concurrency=2,
                max_pending=2,
                journal=pg_journal(postgres.url, pg_schema, n),
                download_dir=tmp_path / "b",
                lease=3.0,
            ) as results:
                fleet = results._run._fleet  # type: ignore[attr-defined]
                await eventually(lambda: fleet.claimed >= 4)  # 2, 3 wait in add; 4 at the feeder
                expire = f"UPDATE {pg_schema}.claims SET lease_until = 0 WHERE worker = 'x'"
                await fetchval(postgres.url, expire)  # x died
                with anyio.fail_after(30):
                    outcomes = [o async for o in results]
        assert emu.tasks_created == n  # x's two (re-attached here), then 2 to 5
    await x.close()
    await other.close()
    assert sorted((o.index, o.ok) for o in outcomes) == [(i, True) for i in range(n)]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"max_pending": 3}, {}),  # the second worker was started without --max-pending
        ({"max_pending": 3}, {"max_pending": 10}),  # ... or with a looser one
    ],
    ids=["second-without-limit", "second-looser"],
)
async def test_the_strictest_max_pending_of_the_workers_holds_fleet_wide(
    postgres: Any,
    pg_schema: str,
    tmp_path: Path,
    first: dict[str, Any],
    second: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The account's limit is per account: a worker started with other limits (or none)
    must not lift the fleet's. The limits are the batch's, kept in the database: each
    worker's tighten them, none loosens them (brk15b finding 13)."""
    n = 30
    outcomes: list[am.Outcome] = []
    async with Emulator(task_duration=(0.05, 0.3), video_bytes=1024, seed=5) as emu:
        run = (emu, postgres.url, pg_schema, n)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                partial(run_worker, *run, tmp_path / "a", outcomes, concurrency=8, **first)
            )
            await emu.wait_until(lambda: emu.tasks_created >= 1)  # a runs the batch first
            tg.start_soon(
                partial(run_worker, *run, tmp_path / "b", outcomes, concurrency=8, **second)
            )
        assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
        assert emu.tasks_created == n and set(emu.tasks_per_key.values()) == {1}
        assert emu.state.max_unfinished <= 3
    told = [r.getMessage() for r in caplog.records if "runs under" in r.getMessage()]
    assert told == [  # the second worker is told, once; the first's are the batch's
        "the batch fleet runs under max_pending=3, max_cost=None: the strictest limits its"
        f" workers were started with (this one: max_pending={second.get('max_pending')},"
        " max_cost=None)"
    ]


async def test_the_strictest_max_cost_of_the_workers_holds_fleet_wide(
    postgres: Any, pg_schema: str, tmp_path: Path
) -> None:
    n = 12
    outcomes: list[am.Outcome] = []
    async with Emulator(task_duration=(0.05, 0.2), video_bytes=1024, seed=4) as emu:
        run = (emu, postgres.url, pg_schema, n)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                partial(run_worker, *run, tmp_path / "a", outcomes, concurrency=2, max_cost=1.0)
            )
            await emu.wait_until(lambda: emu.tasks_created >= 1)
            # no budget of its own: the batch's holds
            tg.start_soon(partial(run_worker, *run, tmp_path / "b", outcomes, concurrency=2))
        paid = [o for o in outcomes if o.ok]
        price = paid[0].task.cost if paid and paid[0].task else None
        assert price is not None and price > 0
        assert emu.tasks_created == len(paid) == int(1.0 // price)
        refused = [o for o in outcomes if isinstance(o.error, am.BudgetExceededError)]
        assert {o.index for o in refused} == set(range(n)) - {o.index for o in paid}

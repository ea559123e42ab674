"""Claims of several workers on one batch's jobs, against a real PostgreSQL (issue 15, part 2
groundwork: ``_pg_claims``). Time passing is a lease set in the past, not a wait."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

import apimart_async as am
from apimart_async._pg_claims import Claim, Claims
from apimart_async._pg_journal import PostgresJournal

from ._pg import PgServer
from .test_pg_journal import fetchval

pytestmark = pytest.mark.anyio

N = 100


async def batch_with_a_list(pg: PgServer, schema: str, n: int = N) -> PostgresJournal:
    """The batch "b" with its job list stored (as the CLI's first run stores it)."""
    j = PostgresJournal(pg.url, name="b", schema=schema, fingerprints=[f"{i:064x}" for i in range(n)])  # fmt: skip
    await j.open()
    await j.close()
    return j


async def test_workers_claiming_at_once_never_share_a_job(
    postgres: PgServer, pg_schema: str
) -> None:
    j = await batch_with_a_list(postgres, pg_schema)
    workers = [Claims(j, worker=f"w{k}") for k in range(4)]
    got: dict[str, list[int]] = {w.worker: [] for w in workers}

    joined = anyio.Event()  # all joined before any claims: a worker still joining (under
    # load) would find every job taken by the first, which proves nothing either way

    async def work(w: Claims) -> None:
        await joined.wait()
        while batch := await w.claim(7):
            got[w.worker] += [c.index for c in batch]
            assert all(c.previous is None for c in batch)
            await anyio.lowlevel.checkpoint()

    try:
        for w in workers:
            assert await w.join() == N
            assert await w.claim(1, exclude=range(N)) == []  # its claim statement prepared
        async with anyio.create_task_group() as tg:
            for w in workers:
                tg.start_soon(work, w)
            joined.set()
    finally:
        for w in workers:
            await w.close()
    counts = Counter(i for held in got.values() for i in held)
    assert sorted(counts) == list(range(N)) and set(counts.values()) == {1}
    # Several got jobs. Without the warm-up claim above, one worker often took all 100: not
    # starvation, but the first claim on a connection costs ~6 ms (asyncpg prepares it and
    # introspects integer[]; 13-18 ms with four at once on two cores) and the next ones
    # ~0.4 ms, so the first worker through took its 15 chunks before the others' first answer
    # (cold: one worker took all 100 in 2 runs of 6; warm: all four got jobs in 6 of 6).
    assert sum(1 for held in got.values() if held) >= 2
    assert await fetchval(postgres.url, f"SELECT count(*) FROM {pg_schema}.workers") == 4


async def test_a_lease_that_ran_out_is_taken_over_and_its_holder_learns_it(
    postgres: PgServer, pg_schema: str
) -> None:
    j = await batch_with_a_list(postgres, pg_schema, 20)
    a, b = Claims(j, worker="a", lease=30), Claims(j, worker="b", lease=30)
    try:
        await a.join()
        await b.join()
        assert [c.index for c in await a.claim(10)] == list(range(10))
        assert [c.index for c in await b.claim(100)] == list(range(10, 20))
        assert await b.claim(5) == []  # all held, leases running
        assert await a.heartbeat() == set(range(10))
        # a stops heartbeating (killed): its leases run out
        await fetchval(
            postgres.url,
            f"UPDATE {pg_schema}.claims SET lease_until = 0 WHERE worker = 'a' AND idx < 4",
        )
        taken = await b.claim(100)
        assert taken == [Claim(i, "a") for i in range(4)]
        assert await a.heartbeat() == set(range(4, 10))  # the others are still a's
        assert await b.heartbeat() == set(range(20)) - set(range(4, 10))
    finally:
        await a.close()
        await b.close()


async def test_a_heartbeat_moves_the_lease_on(postgres: PgServer, pg_schema: str) -> None:
    j = await batch_with_a_list(postgres, pg_schema, 3)
    w = Claims(j, worker="w", lease=30)
    try:
        await w.join()
        await w.claim(3)
        sql = f"SELECT min(lease_until) FROM {pg_schema}.claims WHERE worker = 'w'"
        await fetchval(
            postgres.url, f"UPDATE {pg_schema}.claims SET lease_until = lease_until - 20"
        )
        before = await fetchval(postgres.url, sql)
        assert await w.heartbeat() == {0, 1, 2}
        assert await fetchval(postgres.url, sql) >= before + 20  # 30 s from now again
    finally:
        await w.close()


async def test_done_jobs_are_never_claimed_and_released_ones_are_at_once(
    postgres: PgServer, pg_schema: str
) -> None:
    j = await batch_with_a_list(postgres, pg_schema, 5)
    await j.open()
    await j.add(1, f"{1:064x}", "key-1", None, {"model": "m"})
    await j.finish(1, status="completed", cost=0.1, task=None, files=(), error=None, error_type=None)  # fmt: skip
    await j.add(2, f"{2:064x}", "key-2", None, {"model": "m"})  # submitting: still to do
    await j.close()
    a, b = Claims(j, worker="a"), Claims(j, worker="b")
    try:
        await a.join()
        await b.join()
        assert [c.index for c in await a.claim(10)] == [0, 2, 3, 4]
        await a.release([2, 3])
        assert await b.claim(10) == [Claim(2, None), Claim(3, None)]
        assert await a.heartbeat() == {0, 4}
    finally:
        await a.close()
        await b.close()


async def test_join_needs_the_job_list_and_options_are_checked(
    postgres: PgServer, pg_schema: str
) -> None:
    j = PostgresJournal(postgres.url, name="no-list", schema=pg_schema)
    await j.open()
    await j.close()
    w = Claims(j)
    try:
        with pytest.raises(am.JournalError, match="has no job list for the batch 'no-list'"):
            await w.join()
    finally:
        await w.close()
    assert postgres.password not in repr(w)
    with pytest.raises(am.ValidationError, match="lease: must be a positive number"):
        Claims(j, lease=0)
    with pytest.raises(am.ValidationError, match="n: must be a whole number"):
        await Claims(j).claim(0)


async def test_beat_lets_go_of_done_jobs_and_a_job_ends_once(
    postgres: PgServer, pg_schema: str
) -> None:
    """Issue 15, workers: the heartbeat lets go of the jobs the journal holds as done, whoever
    ended them; ``outstanding`` counts the others' and the free jobs; ``exclude`` is never
    claimed; a worker's end over a job another worker ended writes nothing."""
    j = await batch_with_a_list(postgres, pg_schema, 4)
    me, other = Claims(j, worker="me"), Claims(j, worker="other")
    w = PostgresJournal(postgres.url, name="b", schema=pg_schema, fingerprints=[f"{i:064x}" for i in range(4)])  # fmt: skip
    await w.open()
    try:
        await me.join()
        assert [c.index for c in await me.claim(3, exclude=[0])] == [1, 2, 3]
        assert await me.outstanding() == 1  # job 0: free
        assert await other.outstanding(exclude=[0]) == 3  # mine
        for i in (1, 2):
            await w.add(i, f"{i:064x}", f"key{i}", None, {"model": "m"})
        end = {"status": "completed", "cost": 0.1, "task": None, "files": ()}
        assert await w.finish(1, **end, error=None, error_type=None) is True
        assert await w.finish(1, **end, error=None, error_type=None) is False  # ended already
        assert await me.beat() == {2, 3}  # job 1 is done: let go
        held = f"SELECT count(*) FROM {pg_schema}.claims WHERE worker = 'me'"
        assert await fetchval(postgres.url, held) == 2
        assert await me.outstanding() == 1
        records = await me.records([1, 2, 3])
        assert sorted(records) == [1, 2] and records[1].state == "done"
    finally:
        await w.close()
        await me.close()
        await other.close()


async def test_a_full_fleet_gives_back_a_waiting_job_only_for_jobs_this_worker_may_take(
    postgres: PgServer, pg_schema: str
) -> None:
    """The fleet (max_pending=1) is full with job 0, in flight and held by nobody. A worker
    that may take job 0 over gives its waiting job back (``TakenOver``) to go and claim it; a
    worker that already had job 0 (it ended there, in doubt: it never claims it again) must
    wait instead, or it would give back and claim again in a loop."""
    import asyncpg

    from apimart_async._errors import TakenOver

    j = await batch_with_a_list(postgres, pg_schema, 3)
    await j.open()
    await j.add(0, f"{0:064x}", "key-0", None, {"model": "m"})  # in doubt: no task id
    await j.close()
    fed_0, other = Claims(j, worker="fed-0"), Claims(j, worker="other")
    conn = await asyncpg.connect(postgres.url)
    try:
        for w in (fed_0, other):
            w.limit(max_pending=1, max_cost=None)  # the limits join the batch's at join()
            await w.join()
        assert [c.index for c in await fed_0.claim(1, exclude=[0])] == [1]
        assert [c.index for c in await other.claim(1, exclude=[0])] == [2]
        fed_0.not_mine = lambda: {0}
        async with conn.transaction():
            assert await fed_0.admits(conn, 1) is False  # waits: job 0 is not its to take
        assert fed_0.given_back == set()
        with pytest.raises(TakenOver):
            async with conn.transaction():
                await other.admits(conn, 2)
        assert other.given_back == {2}
    finally:
        await conn.close()
        await fed_0.close()
        await other.close()

"""Replicas of a web backend sharing one PostgreSQL client journal (issue 15): a webhook
callback that lands on any replica ends the wait wherever it is, and any replica waits for a
task another submitted. The real PostgreSQL of tests/_pg.py, one emulator whose callbacks reach
replica B only; the emulator's clock is frozen and moved by the test (no sleeps), and the
status reads of each replica are counted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest

import apimart_async as am
from apimart_async._pg_journal import PostgresJournal
from apimart_async.emulator import Emulator
from apimart_async.testing import follow_clock

from ._pg import PgServer
from .test_webhooks import DEADLINE, NO_JITTER, callback_server, status_reads

pytestmark = pytest.mark.anyio

REQUEST = am.VideoRequest("sora-2-preview", "a cat on a skateboard", duration=4)


@asynccontextmanager
async def replicas(
    emu: Emulator, pg: PgServer, schema: str
) -> AsyncIterator[tuple[am.AsyncApimart, am.AsyncApimart, str]]:
    """Replicas A and B on one journal, on the emulator's clock, both listening; yields them
    and B's ``webhook_url`` (the only route the emulator calls back)."""

    def replica() -> am.AsyncApimart:
        journal = PostgresJournal(pg.url, name="web", schema=schema)
        return am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER, journal=journal)

    async with replica() as a, replica() as b, callback_server(b) as url:
        for client in (a, b):
            follow_clock(client, emu)
            with anyio.fail_after(DEADLINE):
                await listening(client).wait()
        yield a, b, url


def listening(client: am.AsyncApimart) -> anyio.Event:
    store: Any = client._journal.store  # type: ignore[union-attr]
    event: anyio.Event = store.listening
    return event


def advance(emu: Emulator, *clients: am.AsyncApimart, seconds: float) -> None:
    emu.advance(seconds)
    for client in clients:
        client._poller._wake.set()


async def test_a_callback_on_replica_b_ends_the_wait_on_replica_a(
    postgres: PgServer, pg_schema: str
) -> None:
    async with (
        Emulator(mode="manual", frozen_clock=True) as emu,
        replicas(emu, postgres, pg_schema) as (a, b, url),
    ):
        task_id = await a.videos.submit(REQUEST, webhook_url=url)
        box: list[am.Task] = []
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:

                async def wait() -> None:
                    box.append(await a.tasks.wait(task_id))

                tg.start_soon(wait)
                await emu.wait_until(lambda: task_id in a._poller.schedule.ids())
                emu.complete(task_id)  # the emulator calls B back, at once
                await emu.wait_until(lambda: a.tasks.webhook_counts()["relayed"] == 1)
                advance(emu, a, b, seconds=0.3)  # webhook_gather: A reads it in its next round
        assert box[0].ok and box[0].id == task_id
        assert b.tasks.webhook_counts() == {
            "received": 1, "checked": 0, "ignored": 1, "malformed": 0, "forwarded": 1,
            "relayed": 0,
        }  # fmt: skip
        assert a.tasks.webhook_counts()["received"] == 0
        # A read the task once, when the callback said so (a webhook: no polling before the
        # safety check, 50 s away on the frozen clock); B, which waits for nothing, never
        assert status_reads(a) == (1, 0) and status_reads(b) == (0, 0)
        assert await a.tasks.unfinished() == []  # the end A saw, written (flushed)...
        assert await b.tasks.unfinished() == []  # ...for every replica
        assert (await b.tasks.wait(task_id)).ok  # from the journal: no read
        assert status_reads(b) == (0, 0)


async def test_replica_a_waits_for_a_task_replica_b_submitted_and_b_gets_its_callback(
    postgres: PgServer, pg_schema: str
) -> None:
    async with (
        Emulator(mode="manual", frozen_clock=True) as emu,
        replicas(emu, postgres, pg_schema) as (a, b, url),
    ):
        task_id = await b.videos.submit(REQUEST, webhook_url=url)
        box: list[am.Task] = []
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:

                async def wait() -> None:
                    box.append(await a.tasks.wait(task_id))

                tg.start_soon(wait)
                # A knows the task only by its id: it reads it at once, then as its estimate says
                await emu.wait_until(lambda: sum(status_reads(a)) == 1)  # counted when sent
                while (planned := a._poller.schedule.next_check(task_id)) is None:  # noqa: ASYNC110
                    await anyio.sleep(0.001)  # its reply is being handled (bounded: fail_after)
                assert planned > 1.0
                emu.complete(task_id)
                await emu.wait_until(lambda: a.tasks.webhook_counts()["relayed"] == 1)
                # min_interval (1 s) after its first look, well before the check it planned
                advance(emu, a, b, seconds=1.0)
        assert box[0].ok and box[0].id == task_id
        assert sum(status_reads(a)) == 2  # the first look, and the one the callback asked for
        assert status_reads(b) == (0, 0)
        assert b.tasks.webhook_counts()["forwarded"] == 1


async def test_a_callback_for_a_task_the_journal_does_not_hold_pending_is_not_passed_on(
    postgres: PgServer, pg_schema: str
) -> None:
    async with (
        Emulator(mode="manual", frozen_clock=True) as emu,
        replicas(emu, postgres, pg_schema) as (a, b, url),
        aiohttp.ClientSession() as http,
    ):
        done_id = await a.videos.submit(REQUEST)
        emu.complete(done_id)
        assert (await a.tasks.wait(done_id)).ok  # its end is recorded: not pending any more
        await a._journal.flush()  # type: ignore[union-attr]
        for forged in ("task_nobody_submitted", done_id):
            async with http.post(f"{url}/callback", json={"id": forged}) as r:
                assert r.status == 200
        assert b.tasks.webhook_counts()["ignored"] == 2
        assert b.tasks.webhook_counts()["forwarded"] == 0
        store: Any = a._journal.store  # type: ignore[union-attr]
        assert store.relayed == 0


async def test_the_listener_reconnects_after_the_database_comes_back(
    postgres: PgServer, pg_schema: str
) -> None:
    async with (
        Emulator(mode="manual", frozen_clock=True) as emu,
        replicas(emu, postgres, pg_schema) as (a, b, url),
    ):
        try:
            await anyio.to_thread.run_sync(postgres.stop)
            store: Any = a._journal.store  # type: ignore[union-attr]
            with anyio.fail_after(DEADLINE):
                while store.listening.is_set():  # noqa: ASYNC110 - it notices the loss itself
                    await anyio.sleep(0.01)
        finally:
            await anyio.to_thread.run_sync(postgres.start)
        with anyio.fail_after(DEADLINE):
            await listening(a).wait()  # listening again, on a new connection
        task_id = await a.videos.submit(REQUEST, webhook_url=url)
        box: list[am.Task] = []
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:

                async def wait() -> None:
                    box.append(await a.tasks.wait(task_id))

                tg.start_soon(wait)
                await emu.wait_until(lambda: task_id in a._poller.schedule.ids())
                emu.complete(task_id)
                await emu.wait_until(lambda: a.tasks.webhook_counts()["relayed"] == 1)
                advance(emu, a, b, seconds=0.3)
        assert box[0].ok and status_reads(a) == (1, 0)

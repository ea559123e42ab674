"""Deadlines belong to waiters, not to tasks (issue 14): a short ``tasks.wait`` beside a batch
ends only that wait; a batch's ``job_timeout`` ends only the batch's job, not a ``tasks.watch``
of the same task; the task is polled as long as anyone still follows it. Time runs on the
emulator's frozen clock, which the tests move (``follow_clock`` + ``advance``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import pytest

import apimart_async as am
from apimart_async._poll_schedule import PollPolicy
from apimart_async._poller import Poller
from apimart_async.emulator import Emulator
from apimart_async.testing import follow_clock

from .conftest import FAST_POLL, ticking

pytestmark = pytest.mark.anyio

#: Every wait here that could hang before its fix is bounded by this many real seconds.
DEADLINE = 20


def sora(i: int) -> am.VideoRequest:
    return am.VideoRequest("sora-2-preview", f"a cat, take {i}", duration=4)


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for a state of the client (no event to wait on); bounded by ``DEADLINE``."""
    with anyio.fail_after(DEADLINE):
        while not predicate():  # noqa: ASYNC110 - the poller has no event to wait on
            await anyio.sleep(0.001)


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(mode="manual", frozen_clock=True) as emulator:
        yield emulator


@pytest.fixture
async def client(emu: Emulator) -> AsyncIterator[am.AsyncApimart]:
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as c:
        follow_clock(c, emu)
        yield c


def waiters(client: am.AsyncApimart, task_id: str) -> int:
    entry = client._poller._watchers.get(task_id)
    return 0 if entry is None else len(entry.waiters)


async def test_a_short_wait_beside_a_batch_ends_only_the_wait(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    async with client.batch([sora(0)]) as results:
        await until(lambda: len(client._poller) == 1)
        (task_id,) = emu.task_ids()
        caught: list[BaseException] = []

        async def short_wait() -> None:
            try:
                await client.tasks.wait(task_id, timeout=1)
            except am.TaskTimeoutError as exc:
                caught.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(short_wait)
            await until(lambda: waiters(client, task_id) == 2)
            emu.advance(2)  # past the wait's second, on the poller's clock
        assert [type(e) for e in caught] == [am.TaskTimeoutError]
        assert client._poller.watching() == [task_id]  # the batch still follows it
        assert results.stats().pending == 1
        emu.complete(task_id)
        # the clock runs on from here: a read still in flight from before complete() may
        # say "processing", and the check after it must fall due
        with anyio.fail_after(DEADLINE):
            async with ticking(emu):
                outcomes = [o async for o in results]
    assert [(o.task_id, o.ok) for o in outcomes] == [(task_id, True)]


async def test_a_batch_job_timeout_does_not_end_a_watch_of_the_same_task(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    async with client.batch([sora(0)], job_timeout=5) as results:
        await until(lambda: len(client._poller) == 1)
        (task_id,) = emu.task_ids()
        async with client.tasks.watch([task_id]) as stream:
            assert waiters(client, task_id) == 2
            emu.advance(6)  # past the job's 5 s
            with anyio.fail_after(DEADLINE):
                (outcome,) = [o async for o in results]
            assert type(outcome.error) is am.TaskTimeoutError
            assert results.pending_task_ids() == [task_id]  # abandoned by the batch
            assert client._poller.watching() == [task_id]  # the watch still follows it
            emu.complete(task_id)
            emu.advance(1)
            with anyio.fail_after(DEADLINE):
                tasks = [t async for t in stream]
    assert [(t.id, t.ok) for t in tasks] == [(task_id, True)]
    assert len(client._poller) == 0


async def test_two_waits_of_one_task_each_end_at_their_own_deadline(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    task_id = await client.videos.submit(sora(0))
    ended: dict[str, float] = {}

    async def wait(name: str, timeout: float) -> None:
        with pytest.raises(am.TaskTimeoutError) as caught:
            await client.tasks.wait(task_id, timeout=timeout)
        ended[name] = caught.value.timeout

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "short", 1.0)
            tg.start_soon(wait, "long", 10.0)
            await until(lambda: waiters(client, task_id) == 2)
            emu.advance(2)
            await until(lambda: "short" in ended)
            assert "long" not in ended
            assert client._poller.watching() == [task_id]
            emu.advance(10)
    assert ended == {"short": 1.0, "long": 10.0}
    assert len(client._poller) == 0  # nobody follows it: no longer polled


async def test_poller_expires_only_the_waiter_past_its_deadline() -> None:
    """The poller alone, on a fake clock: two waiters of one task, two deadlines."""
    now = [0.0]
    results: list[tuple[str, str]] = []

    async def fetch(ids: list[str]) -> dict[str, am.Task | am.ApimartError]:
        raise AssertionError("no read is due in this test")

    poller = Poller(fetch, PollPolicy(first_check=100, min_interval=100), clock=lambda: now[0])
    poller.watch("t", lambda _, r: results.append(("a", type(r).__name__)), timeout=1)
    poller.watch("t", lambda _, r: results.append(("b", type(r).__name__)), timeout=5)
    poller.watch("t", lambda _, r: results.append(("c", type(r).__name__)))
    assert await poller.step() == 1.0  # the first deadline is the next thing due
    now[0] = 1.5
    await poller.step()
    assert results == [("a", "TaskTimeoutError")]
    assert "t" in poller.schedule
    now[0] = 5.0
    await poller.step()
    assert results == [("a", "TaskTimeoutError"), ("b", "TaskTimeoutError")]
    assert "t" in poller.schedule  # "c" has no deadline and still follows it

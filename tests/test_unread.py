"""Leaving early loses nothing (issue 14): outcomes that finished but were not read are still
reachable after the batch, with their task ids (``results.unread()``), counted by ``stats()``
and the repr, and the journal holds them as done."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import anyio
import pytest

import apimart_async as am
from apimart_async.emulator import Emulator

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio


def sora(i: int) -> am.VideoRequest:
    return am.VideoRequest("sora-2-preview", f"a cat, take {i}", duration=4)


async def finished_unread(results: am.Batch, n: int) -> None:
    """Wait until ``n`` outcomes are handed out (put, not read)."""
    with anyio.fail_after(20):
        while results.stats().done < n:  # noqa: ASYNC110 - no event to wait on
            await anyio.sleep(0.001)


async def all_finished(emu: Emulator, client: am.AsyncApimart, results: am.Batch, n: int) -> None:
    """Complete the batch's ``n`` tasks and wait until their outcomes are handed out."""
    await emu.wait_until(lambda: len(client._poller) == n)
    emu.complete_all()
    await finished_unread(results, n)


async def test_a_reader_that_breaks_early_can_still_list_the_unread_outcomes(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    async with manual_client.batch([sora(i) for i in range(5)]) as results:
        await all_finished(manual_emu, manual_client, results, 5)
        assert results.stats().unread == 5
        first = await results.__anext__()
    unread = results.unread()
    assert len(unread) == 4 and all(o.ok for o in unread)
    assert {o.index for o in unread} | {first.index} == set(range(5))
    created = set(manual_emu.task_ids())
    assert {o.task_id for o in [first, *unread]} == created  # every paid task is reachable
    assert results.stats().unread == 4 and results.pending_task_ids() == []
    assert "unread=4" in repr(results)


async def test_outcomes_that_arrive_after_the_reader_left_are_kept_too(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    with anyio.CancelScope() as scope:
        async with manual_client.batch([sora(i) for i in range(3)]) as results:
            await manual_emu.wait_until(lambda: len(manual_client._poller) == 3)
            manual_emu.complete(manual_emu.task_ids()[0])
            await finished_unread(results, 1)
            scope.cancel()  # the caller's deadline, say, with one outcome not read
            await anyio.sleep(1)
    assert [o.task_id for o in results.unread()] == [manual_emu.task_ids()[0]]
    # the two others were still running: listed as pending, not lost
    assert sorted(results.pending_task_ids()) == sorted(manual_emu.task_ids()[1:])
    assert results.stats().unread == 1


@pytest.mark.parametrize("how", ["cancel scope", "task cancel"])
async def test_a_cancel_in_the_loop_ends_it_before_the_next_ready_outcome(
    manual_emu: Emulator, manual_client: am.AsyncApimart, how: str
) -> None:
    # brk16: the Channel hands a ready outcome out without a trip round the event loop, so a
    # cancellation asked for in the loop's body was only seen once no outcome was ready: the
    # reader went on taking them all (anyio's stream delivered it at the next outcome)
    read: list[am.Success | am.Failure] = []

    async def reader(results: am.Batch) -> None:
        with anyio.CancelScope() as scope:
            async for outcome in results:
                read.append(outcome)
                if how == "cancel scope":
                    scope.cancel()  # the caller's own "enough", say
                else:
                    asyncio.current_task().cancel()  # type: ignore[union-attr]

    async with manual_client.batch([sora(i) for i in range(5)]) as results:
        await all_finished(manual_emu, manual_client, results, 5)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.ensure_future(reader(results))
    assert len(read) == 1
    assert len(results.unread()) == 4 and results.stats().unread == 4
    assert {o.index for o in [*read, *results.unread()]} == set(range(5))


async def test_unread_outcomes_are_done_in_the_journal(
    manual_emu: Emulator, manual_client: am.AsyncApimart, tmp_path: Path
) -> None:
    journal = tmp_path / "run.sqlite"
    async with manual_client.batch([sora(i) for i in range(3)], journal=journal) as results:
        await all_finished(manual_emu, manual_client, results, 3)
    assert len(results.unread()) == 3
    # a second run submits nothing and hands the three out as replayed
    async with manual_client.batch([sora(i) for i in range(3)], journal=journal) as again:
        replayed = [o async for o in again]
    assert sorted(o.index for o in replayed) == [0, 1, 2] and all(o.replayed for o in replayed)
    assert manual_emu.tasks_created == 3


async def test_read_outcomes_are_not_listed_as_unread(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    async with manual_client.batch([sora(i) for i in range(2)]) as results:
        await manual_emu.wait_until(lambda: len(manual_client._poller) == 2)
        manual_emu.complete_all()
        got = [o async for o in results]
    assert len(got) == 2 and results.unread() == [] and results.stats().unread == 0
    assert "unread" not in repr(results)


async def test_leaving_during_a_download_keeps_the_paid_job_as_unread(tmp_path: Path) -> None:
    # A completed job whose file is still downloading when the caller leaves: its task is
    # paid and done, so it is in neither pending list. It must come out as an unread outcome
    # (with its task id and a DownloadError), and the journal must let a re-run fetch the rest.
    journal, videos = tmp_path / "run.sqlite", tmp_path / "videos"
    jobs = [sora(i) for i in range(3)]
    async with Emulator(mode="manual", frozen_clock=True, video_bytes=1024 * 1024) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as c:
            async with c.batch(jobs, journal=journal, download_dir=videos) as results:
                await emu.wait_until(lambda: len(c._poller) == 3)
                emu.file_chunk_delay = 60.0  # the file stalls after its first 256 KiB
                done = emu.task_ids()[0]
                emu.complete(done)
                with anyio.fail_after(20):
                    while not results.stats().downloading:  # noqa: ASYNC110 - no event
                        await anyio.sleep(0.001)
            unread = results.unread()
            assert [o.task_id for o in unread] == [done]
            (cut,) = unread
            assert isinstance(cut, am.Failure) and isinstance(cut.error, am.DownloadError)
            assert cut.task is not None and cut.task.id == done
            assert "left" in str(cut.error)
            assert sorted(results.pending_task_ids()) == sorted(emu.task_ids()[1:])
            assert results.stats().unread == 1 and "unread=1" in repr(results)
            # a re-run submits nothing and fetches the file
            emu.file_chunk_delay = 0.0
            async with c.batch(jobs, journal=journal, download_dir=videos) as again:
                emu.complete_all()
                got = [o async for o in again]
            assert sorted(o.index for o in got) == [0, 1, 2] and all(o.ok for o in got)
            assert emu.tasks_created == 3
            assert (videos / "000000.mp4").stat().st_size == 1024 * 1024


@pytest.mark.parametrize("how", ["stop", "ctrl-c"])
async def test_tasks_a_stop_leaves_running_are_listed_as_pending(
    manual_emu: Emulator, manual_client: am.AsyncApimart, tmp_path: Path, how: str
) -> None:
    # stop(grace=0) (or a Ctrl-C with no grace left) stops following the running tasks: they
    # are paid and running, so pending_task_ids() must list them, and the journal resumes them
    journal = tmp_path / "run.sqlite"
    jobs = [sora(i) for i in range(4)]
    async with manual_client.batch(jobs, journal=journal, sigint_grace=0) as results:
        await manual_emu.wait_until(lambda: len(manual_client._poller) == 4)
        done = manual_emu.task_ids()[0]
        manual_emu.complete(done)
        first = await results.__anext__()
        if how == "stop":
            await results.stop()
        else:
            results._on_sigint()
        rest = [o async for o in results]
    assert first.task_id == done and rest == [] and results.unread() == []
    running = manual_emu.task_ids()[1:]
    assert sorted(results.pending_task_ids()) == sorted(running)
    async with manual_client.batch(jobs, journal=journal) as again:
        manual_emu.complete_all()
        second = [o async for o in again]
    assert sorted(o.index for o in second) == [0, 1, 2, 3] and all(o.ok for o in second)
    assert manual_emu.tasks_created == 4


async def test_a_reader_that_never_awaits_still_lets_the_loop_run_and_deadlines_fire(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    # issue 16: a ready outcome is handed out without a trip round the event loop, but not
    # for longer than LOOP_SLICE of the reader's time: other tasks run (issue 21), and a
    # deadline that fell due meanwhile ends the loop with the rest unread
    async with manual_client.batch([sora(i) for i in range(10)]) as results:
        await all_finished(manual_emu, manual_client, results, 10)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.lowlevel.checkpoint()

        read: list[am.Success | am.Failure] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.lowlevel.checkpoint()  # the ticker is running
            before = ticks
            with anyio.move_on_after(0.01):
                async for outcome in results:
                    read.append(outcome)
                    spin(0.004)  # the reader's own work, no await: 40 ms for all 10
            during = ticks - before
            tg.cancel_scope.cancel()
    assert 1 <= len(read) <= 6  # the deadline (10 ms) ended it at a slice's end (5 ms)
    assert len(results.unread()) == 10 - len(read)
    assert during >= 1  # the loop ran between outcomes


def spin(seconds: float) -> None:
    """Work on the CPU for ``seconds`` (no await)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass

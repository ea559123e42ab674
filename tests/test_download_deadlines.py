"""Batch deadlines bound downloads too, and a download slower than a floor rate is cut and
resumed (issue 14). The emulator's CDN stalls for an hour after its first 256 KiB
(``file_chunk_delay``): only a deadline or the floor can end such a transfer, so these tests do
not depend on how fast the machine is; the stall is lifted by setting the knob back."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

import apimart_async as am
from apimart_async._download import Downloader
from apimart_async.emulator import Emulator, Fault
from apimart_async.testing import follow_clock

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

#: Every batch here that could hang before its fix is bounded by this many real seconds.
DEADLINE = 60
SIZE = 1024 * 1024  # four 256 KiB pieces: the CDN stalls after the first
STALL = 3600.0


def sora(i: int) -> am.VideoRequest:
    return am.VideoRequest("sora-2-preview", f"a cat, take {i}", duration=4)


async def drain(results: am.Batch) -> list[am.Outcome]:
    with anyio.fail_after(DEADLINE):
        return [o async for o in results]


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(mode="manual", frozen_clock=True, video_bytes=SIZE) as emulator:
        try:
            yield emulator
        finally:
            emulator.file_chunk_delay = 0  # a stalled transfer ends before the server stops


@pytest.fixture
async def client(emu: Emulator) -> AsyncIterator[am.AsyncApimart]:
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as c:
        yield c


def whole(emu: Emulator, outcome: am.Outcome) -> bool:
    (f,) = outcome.files
    data = Path(f.path).read_bytes()
    return len(data) == SIZE and hashlib.sha256(data).hexdigest() == emu.file_sha256(
        f"{outcome.task_id}"
    )


async def one_job_under_a_floor(emu: Emulator, client: am.AsyncApimart, where: Path) -> am.Outcome:
    """One job, completed at once, its file downloaded into ``where`` under a floor of
    64 KiB per 0.2 s window; its outcome."""
    async with client.batch(
        [sora(0)], download_dir=where, min_download_rate=64 * 1024, download_rate_window=0.2
    ) as results:
        await emu.wait_until(lambda: emu.tasks_created == 1)
        emu.complete_all()
        (outcome,) = await drain(results)
    return outcome


async def test_a_stalled_download_is_cut_by_the_rate_floor_and_resumed(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    emu.file_chunk_delay = STALL
    opened = 0
    real_stream = client._downloader._open_stream

    def stream(url: str, **kwargs: Any) -> Any:
        nonlocal opened
        opened += 1
        if opened == 2:  # the CDN recovers for the retry
            emu.file_chunk_delay = 0
        return real_stream(url, **kwargs)

    client._downloader._open_stream = stream
    outcome = await one_job_under_a_floor(emu, client, tmp_path)
    assert outcome.ok, outcome.error
    assert whole(emu, outcome)
    assert opened == 2 and emu.counters["file"] == 2
    assert emu.state.statuses[("file", 206)] == 1  # the retry resumed what had arrived


async def test_the_batch_timeout_ends_a_download_in_progress_and_keeps_the_part(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    options: dict[str, Any] = {"journal": tmp_path / "jobs.db", "download_dir": tmp_path / "v"}
    part = tmp_path / "v" / "000000.mp4.part"
    # run 1: the file server fails, the job is paid and done, its file missing
    emu.faults.inject("file", Fault.server_error(500), times=100)
    async with client.batch([sora(0)], **options) as results:
        await emu.wait_until(lambda: emu.tasks_created == 1)
        emu.complete_all()
        (first,) = await drain(results)
    assert type(first.error) is am.APIConnectionError
    emu.faults.clear()
    # run 2: the download resumes at once and stalls after 256 KiB; the batch deadline ends it.
    # The deadline is on the wall clock (anyio's): 10 s leaves a loaded machine ample time to
    # open the journal, read the task again and get the first 256 KiB (2 s failed in CI with
    # four suites side by side).
    emu.file_chunk_delay = STALL
    async with client.batch([sora(0)], timeout=10.0, **options) as results:
        (second,) = await drain(results)
    assert type(second.error) is am.DownloadError
    assert "batch deadline" in str(second.error) and "timeout=10" in str(second.error)
    assert second.task is not None and second.task.ok
    assert part.stat().st_size == 256 * 1024  # what arrived is kept
    # run 3: the CDN is back; the part is resumed, nothing is submitted again
    emu.file_chunk_delay = 0
    async with client.batch([sora(0)], **options) as results:
        (third,) = await drain(results)
    assert third.ok and whole(emu, third)
    assert emu.counters["submit"] == emu.tasks_created == 1
    assert emu.state.statuses[("file", 206)] == 1
    assert not part.exists()


async def test_job_timeout_ends_a_download_in_progress(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    follow_clock(client, emu)  # the job's time runs on the emulator's frozen clock
    emu.file_chunk_delay = STALL
    async with client.batch([sora(0)], job_timeout=20, download_dir=tmp_path) as results:
        # the client has the task (not only the emulator): a submit reply read after the
        # advance below would start the job's 20 s there (seen on Python 3.12+)
        with anyio.fail_after(20):
            while len(client._poller) != 1:  # noqa: ASYNC110 - no event to wait on
                await anyio.sleep(0.001)
        emu.complete_all()
        emu.advance(19.9)  # seen done 19.9 s into its 20 s: 0.1 s left for the download
        (outcome,) = await drain(results)
    assert type(outcome.error) is am.DownloadError
    assert "job_timeout=20" in str(outcome.error)
    assert outcome.task is not None and outcome.task.ok
    assert results.pending_task_ids() == []  # the task ended: nothing runs at the service


def test_the_floor_is_checked() -> None:
    client = am.AsyncApimart("k", base_url="http://127.0.0.1:9")
    with pytest.raises(am.ValidationError, match="^min_download_rate: must be a positive"):
        client.batch([], min_download_rate=0)
    with pytest.raises(am.ValidationError, match="^download_rate_window: must be a positive"):
        client.batch([], download_rate_window=-1)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files through /proc")
async def test_a_download_cancelled_as_it_completes_closes_its_part(tmp_path: Path) -> None:
    # The whole body arrived; the caller is cancelled (the batch was left) before the part is
    # renamed into place: the part must be closed then, not left to the garbage collector.
    body = b"v" * 1000
    scope = anyio.CancelScope()

    class Reply:
        status = 200
        headers: ClassVar[dict[str, str]] = {"Content-Length": str(len(body))}

        async def _chunks(self) -> AsyncIterator[bytes]:
            yield body

        def chunks(self, size: int) -> AsyncIterator[bytes]:
            return self._chunks()

    @contextlib.asynccontextmanager
    async def stream(url: str, headers: object = None) -> AsyncIterator[Reply]:
        yield Reply()
        scope.cancel()  # after the last byte, before the rename

    async def refresh(task_id: str) -> am.Task:
        raise AssertionError("not called")

    def open_parts() -> list[str]:
        fds = Path("/proc/self/fd")
        links = []
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                links.append(os.readlink(fd))
        return [link for link in links if link.endswith(".part")]

    dest = tmp_path / "v.mp4"
    with scope:
        await Downloader(stream=stream, refresh=refresh).fetch("http://127.0.0.1:9/v.mp4", dest)
    assert scope.cancelled_caught
    assert open_parts() == []
    assert (tmp_path / "v.mp4.part").read_bytes() == body  # kept whole for a resume


async def test_a_download_too_slow_on_every_attempt_ends_saying_what_was_tried(
    tmp_path: Path,
) -> None:
    """brk16f: when the last attempt was cut by the rate floor too, the job's error still said
    '...; resuming', though nothing resumed. It says how many attempts were made and that
    what arrived is kept for a resume."""
    async with (
        Emulator(mode="manual", video_bytes=16 * 256 * 1024, file_chunk_delay=STALL) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
    ):
        try:
            outcome = await one_job_under_a_floor(emu, client, tmp_path)
        finally:
            emu.file_chunk_delay = 0  # a stalled transfer ends before the server stops
    assert type(outcome.error) is am.APIConnectionError
    message = str(outcome.error)
    assert "resuming" not in message
    assert "download slower than 65536 bytes/s over 0.2 s" in message
    assert "4 attempts" in message and "kept for a resume" in message
    assert emu.counters["file"] == 4
    assert (tmp_path / "000000.mp4.part").stat().st_size == 4 * 256 * 1024


@pytest.mark.parametrize("grace", [0.0, 0.3])
async def test_a_stop_s_grace_bounds_the_downloads_in_flight_too(
    tmp_path: Path, grace: float
) -> None:
    """brk16h: ``stop(grace=...)`` (and Ctrl-C with ``--grace``) followed the running tasks
    for the grace, but files already downloading went on to their end: 20 s after Ctrl-C
    with slow files, and for ever with a stalled file server. Past the grace they are cut:
    each job ends with a DownloadError (paid, its part kept: a resume fetches the rest)."""
    async with (
        Emulator(mode="manual", video_bytes=SIZE, file_chunk_delay=STALL) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
    ):
        try:
            with anyio.fail_after(30):  # for ever, before: the CDN never sends the rest
                async with client.batch(
                    [sora(0), sora(1)], download_dir=tmp_path, journal=tmp_path / "j.sqlite"
                ) as results:
                    await emu.wait_until(lambda: emu.tasks_created == 2)
                    emu.complete_all()
                    await emu.wait_until(lambda: emu.state.in_flight["file"] == 2)
                    await results.stop(grace=grace)
                    outcomes = [o async for o in results]
        finally:
            emu.file_chunk_delay = 0
    assert sorted(o.index for o in outcomes) == [0, 1]
    for outcome in outcomes:
        assert type(outcome.error) is am.DownloadError, outcome.error
        assert "cut off" in str(outcome.error)
        assert outcome.task is not None and outcome.task.ok
    assert results.pending_task_ids() == []
    records = am.SqliteJournal.read(tmp_path / "j.sqlite")
    assert {r.state for r in records.values()} == {"downloading"}  # a resume fetches them

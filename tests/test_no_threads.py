"""A machine out of threads (a container's pids limit, ulimit -u): every new thread refused
once the client is open. Short work the SDK puts on a worker thread (a stat, a file read, a
part's open and close) runs on the event loop instead; work that needs a thread of its own (a
download's writer) ends its job with a typed error; never a raw ``RuntimeError`` (a break-it
pass of issue 16: ``client.download``, a batch's downloads and uploads all raised one)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import AsyncGenerator, Generator
from pathlib import Path

import pytest

import apimart_async as am
from apimart_async.emulator import Emulator

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

SIZE = 512 * 1024


@contextlib.contextmanager
def no_new_threads(monkeypatch: pytest.MonkeyPatch) -> Generator[None, None, None]:
    """Every thread started from now on is refused, as CPython does when the OS refuses one
    (anyio's worker threads are ``threading.Thread`` too); threads already running go on."""

    start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        if self.name.startswith("asyncio_"):  # the emulator's (it shares this process): an
            start(self)  # older aiohttp reads an upload on the event loop's executor
            return
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        yield


@contextlib.asynccontextmanager
async def emulated() -> AsyncGenerator[tuple[Emulator, am.AsyncApimart], None]:
    async with (
        Emulator(task_duration=0.0, video_bytes=SIZE) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
    ):
        yield emu, client


def sora(i: int) -> am.VideoRequest:
    return am.VideoRequest("sora-2-preview", f"a cat, take {i}", duration=4)


async def test_a_download_without_threads_is_a_download_error_and_resumes_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with emulated() as (emu, client):
        task = await client.videos.generate(sora(0))
        with no_new_threads(monkeypatch), pytest.raises(am.DownloadError) as info:
            await client.download(task, tmp_path)
        assert "refused a new thread" in str(info.value)
        assert str(tmp_path / f"{task.id}.mp4") in str(info.value)
        # nothing was left open or locked: once threads are to be had, it downloads
        (file,) = await client.download(task, tmp_path)
    data = Path(file.path).read_bytes()
    assert len(data) == file.bytes == SIZE
    assert hashlib.sha256(data).hexdigest() == file.sha256 == emu.file_sha256(task.id)
    assert not list(tmp_path.glob("*.part"))


async def test_a_batchs_download_without_threads_ends_its_job_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with emulated() as (emu, client):
        with no_new_threads(monkeypatch):
            async with client.batch([sora(0), sora(1)], download_dir=tmp_path) as results:
                outcomes = [o async for o in results]
    assert sorted(o.index for o in outcomes) == [0, 1]
    for outcome in outcomes:
        assert isinstance(outcome.error, am.DownloadError), repr(outcome.error)
        assert "refused a new thread" in str(outcome.error)
        assert outcome.task is not None and outcome.task.ok  # paid for; a resume fetches it
    assert emu.tasks_created == 2


async def test_an_upload_without_threads_reads_its_file_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    picture = tmp_path / "bear.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"a bear " * 200)
    request = am.VideoRequest("viduq3", "the bear waves", image_urls=[str(picture)], duration=4)
    async with emulated() as (emu, client):
        with no_new_threads(monkeypatch):
            async with client.batch([request], media_root=tmp_path) as results:
                (outcome,) = [o async for o in results]
    assert outcome.ok, outcome.error
    assert results.uploads.uploaded == 1 and emu.tasks_created == 1


async def test_a_journal_without_threads_is_written_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was a JournalError ('cannot open the journal ...: RuntimeError: can't start new
    thread'), nothing sent; each of its writes is short, so it now runs on the loop."""
    journal = tmp_path / "j.sqlite"
    async with emulated() as (emu, client):
        with no_new_threads(monkeypatch):
            async with client.batch([sora(0), sora(1)], journal=journal) as results:
                outcomes = [o async for o in results]
    assert sorted(o.index for o in outcomes) == [0, 1] and all(o.ok for o in outcomes)
    records = am.SqliteJournal.read(journal)
    assert sorted(records) == [0, 1]
    assert {r.state for r in records.values()} == {"done"}
    assert {r.task_id for r in records.values()} == {o.task_id for o in outcomes}
    assert emu.tasks_created == 2


def test_a_sync_client_without_threads_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """brk16h: ``Apimart()`` (its event loop runs on a thread of its own) raised a raw
    ``RuntimeError: can't start new thread``."""
    before = threading.active_count()
    with no_new_threads(monkeypatch), pytest.raises(am.ApimartError) as info:
        am.Apimart("sk-test-key-123456", base_url="http://127.0.0.1:9")
    assert "refused a new thread" in str(info.value) and "sk-test" not in str(info.value)
    assert threading.active_count() == before

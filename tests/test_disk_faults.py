"""Local disk faults during downloads (issue 14): a full disk, a read-only directory, a name
the file system refuses. Each ends only its own job, with a ``DownloadError`` that names the
path and the OS error; the job stays in the journal and a second run fetches its files
without submitting anything again."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, ClassVar

import pytest

import apimart_async as am
from apimart_async import _download
from apimart_async._download import Downloader, _PartFile
from apimart_async._manifest import Manifest
from apimart_async.emulator import Emulator

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio


def sora(i: int) -> am.VideoRequest:
    return am.VideoRequest("sora-2-preview", f"a cat, take {i}", duration=4)


async def drain(results: am.Batch) -> list[am.Outcome]:
    return [o async for o in results]


@contextlib.asynccontextmanager
async def emulated(video_bytes: int = 64 * 1024) -> AsyncIterator[tuple[Emulator, am.AsyncApimart]]:
    async with (
        Emulator(task_duration=0.0, video_bytes=video_bytes) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
    ):
        yield emu, client


def check_files(emu: Emulator, outcomes: list[am.Outcome]) -> None:
    """Every outcome is a success whose file is whole (size and sha256 the emulator's)."""
    for o in outcomes:
        assert o.ok, o.error
        assert o.task_id is not None
        (f,) = o.files
        data = Path(f.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.sha256 == emu.file_sha256(o.task_id)


async def download_whole(where: Path, size: int = 2 * 1024 * 1024) -> am.DownloadedFile:
    """One task's file of ``size`` bytes downloaded into ``where``, checked whole: its bytes,
    the sha256 reported and the emulator's."""
    async with emulated(video_bytes=size) as (emu, client):
        task = await client.videos.generate(sora(0))
        (file,) = await client.download(task, where)
    assert file.bytes == size
    assert hashlib.sha256(Path(file.path).read_bytes()).hexdigest() == file.sha256
    assert file.sha256 == emu.file_sha256(task.id)
    return file


def _mount_tmpfs(where: Path, size: str, *options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    cmd = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)]
    try:
        done = subprocess.run(cmd, capture_output=True, check=False, timeout=30)
    except OSError:
        return False
    return done.returncode == 0


def _remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root and mount rights: skipped elsewhere; the injected-fault
    tests below run everywhere)."""
    where = tmp_path / "small-disk"
    if not _mount_tmpfs(where, "2m"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


# -- injected faults: run on every machine ----------------------------------------------------


async def test_enospc_at_the_write_ends_that_job_only_and_a_second_run_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = 12
    faulty = {"000002", "000005", "000009"}  # the file stems whose write fails
    real_write = _PartFile.write_sync

    def full_disk(self: _PartFile, pieces: list[bytes]) -> None:
        if self.path.name.split(".")[0] in faulty:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, pieces)

    videos = tmp_path / "videos"
    options = {
        "journal": tmp_path / "jobs.db",
        "download_dir": videos,
        "manifest": tmp_path / "manifest.jsonl",
    }
    async with emulated() as (emu, client):
        monkeypatch.setattr(_PartFile, "write_sync", full_disk)
        async with client.batch([sora(i) for i in range(jobs)], **options) as results:
            first = await drain(results)  # no OSError, no ExceptionGroup out of the batch
        assert sorted(o.index for o in first) == list(range(jobs))
        failed = [o for o in first if not o.ok]
        assert sorted(f"{o.index:06d}" for o in failed) == sorted(faulty)
        for o in failed:
            assert type(o.error) is am.DownloadError
            assert o.task is not None and o.task.ok  # paid and done; only the file is missing
            message = str(o.error)
            assert str(videos / f"{o.index:06d}.mp4") in message
            assert "[Errno 28] No space left on device" in message
        assert results.stats().errored == len(faulty)
        submits = emu.counters["submit"]
        assert submits == emu.tasks_created == jobs

        monkeypatch.setattr(_PartFile, "write_sync", real_write)  # the disk has room again
        async with client.batch([sora(i) for i in range(jobs)], **options) as again:
            second = await drain(again)
        assert emu.counters["submit"] == submits  # nothing submitted again
        assert emu.tasks_created == jobs
    assert sorted(o.index for o in second) == list(range(jobs))
    check_files(emu, second)
    refetched = {o.index for o in second if not o.replayed}
    assert refetched == {o.index for o in failed}
    # jobs 12, faults 3, lost 0, duplicated 0: every task's file is on disk exactly once
    assert sorted(p.name for p in videos.iterdir()) == [f"{i:06d}.mp4" for i in range(jobs)]


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EROFS, "Read-only file system"),
        (errno.EACCES, "Permission denied"),
        (errno.ENAMETOOLONG, "File name too long"),
    ],
)
async def test_a_refused_open_is_a_download_error_naming_path_and_os_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    def refuse(self: _PartFile, *, resume: bool) -> None:
        raise OSError(code, os.strerror(code), str(self.path))

    monkeypatch.setattr(_PartFile, "open_sync", refuse)
    async with emulated() as (emu, client):
        async with client.batch(
            [sora(i) for i in range(3)], download_dir=tmp_path, manifest=tmp_path / "m.jsonl"
        ) as results:
            outcomes = await drain(results)
        assert emu.tasks_created == 3
    assert sorted(o.index for o in outcomes) == [0, 1, 2]
    for o in outcomes:
        assert type(o.error) is am.DownloadError
        assert str(tmp_path / f"{o.index:06d}.mp4") in str(o.error)
        assert f"[Errno {code}] {words}" in str(o.error)


async def test_a_download_dir_whose_name_is_too_long_for_the_file_system(
    tmp_path: Path,
) -> None:
    too_long = tmp_path / ("x" * 300)  # a real ENAMETOOLONG from mkdir, no injection
    async with emulated() as (emu, client):
        async with client.batch(
            [sora(i) for i in range(2)], download_dir=too_long, manifest=tmp_path / "m.jsonl"
        ) as results:
            outcomes = await drain(results)
        assert emu.tasks_created == 2
    assert [type(o.error) for o in outcomes] == [am.DownloadError, am.DownloadError]
    assert all("File name too long" in str(o.error) for o in outcomes)


async def test_client_download_turns_os_errors_into_download_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(self: _PartFile, pieces: list[bytes]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_PartFile, "write_sync", full_disk)
    async with emulated() as (_emu, client):
        task = await client.videos.generate(sora(0))
        with pytest.raises(am.DownloadError, match=r"No space left on device") as caught:
            await client.download(task, tmp_path)
    assert str(tmp_path / f"{task.id}.mp4") in str(caught.value)


async def test_too_little_free_space_is_refused_before_the_body_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_usage = _download.shutil.disk_usage

    def tight(path: str | os.PathLike[str]) -> object:
        usage = real_usage(path)
        return type(usage)(usage.total, usage.total - 1000, 1000)  # 1000 bytes free

    monkeypatch.setattr(_download.shutil, "disk_usage", tight)
    async with emulated() as (_emu, client):
        task = await client.videos.generate(sora(0))
        with pytest.raises(am.DownloadError) as caught:
            await client.download(task, tmp_path)
    message = str(caught.value)
    assert "not enough free space" in message
    assert f"{64 * 1024} bytes" in message and "1000 bytes free" in message
    assert str(tmp_path / f"{task.id}.mp4") in message
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a .part


@pytest.mark.parametrize("journaled", [True, False])
async def test_a_manifest_whose_disk_fills_stops_the_batch_cleanly_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journaled: bool
) -> None:
    # the manifest sits on its own disk (manifest=), which fills after two lines: its writes,
    # its flush at the close too, fail with ENOSPC
    jobs = 8
    real_open = Manifest.open

    class FillingDisk:
        def __init__(self, fh: IO[str]) -> None:
            self.fh, self.lines = fh, 0

        def write(self, text: str) -> None:
            if self.lines >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.lines += 1
            self.fh.write(text)

        def flush(self) -> None:
            if self.lines >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.fh.flush()

        def fileno(self) -> int:
            return self.fh.fileno()

        def close(self) -> None:
            self.fh.close()

    async def filling(self: Manifest, lines: list[dict[str, object]]) -> None:
        await real_open(self, lines)
        assert self._fh is not None
        self._fh = FillingDisk(self._fh)  # type: ignore[assignment]

    manifest = tmp_path / "manifest.jsonl"
    options: dict[str, object] = {"download_dir": tmp_path / "videos", "manifest": manifest}
    if journaled:
        options["journal"] = tmp_path / "jobs.db"
    got: list[am.Outcome] = []
    async with emulated() as (emu, client):
        monkeypatch.setattr(Manifest, "open", filling)
        with pytest.raises(am.JournalError) as caught:  # no OSError, no ExceptionGroup
            async with client.batch([sora(i) for i in range(jobs)], **options) as results:
                async for outcome in results:
                    got.append(outcome)
        assert "No space left on device" in str(caught.value)
        assert str(manifest) in str(caught.value)
        # every paid task is reachable: read, unread, or still running
        reachable = [o.task_id for o in [*got, *results.unread()]] + results.pending_task_ids()
        assert sorted(reachable) == sorted(emu.task_ids())
        if not journaled:
            return
        monkeypatch.setattr(Manifest, "open", real_open)  # the user frees space
        submits = emu.counters["submit"]
        async with client.batch([sora(i) for i in range(jobs)], **options) as again:
            second = await drain(again)
        assert emu.counters["submit"] == submits == emu.tasks_created  # nothing paid twice
    assert sorted(o.index for o in second) == list(range(jobs))
    lines = [json.loads(t) for t in manifest.read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(jobs))  # each exactly once


# -- a real small disk (a 2 MiB tmpfs) --------------------------------------------------------


async def test_a_batch_filling_a_small_disk_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    jobs = 10
    size = 384 * 1024  # 10 jobs = 3.75 MiB, on a 2 MiB disk
    options = {
        "journal": tmp_path / "jobs.db",  # journal and manifest on a disk with room
        "download_dir": small_disk,
        "manifest": tmp_path / "manifest.jsonl",
        "concurrency": 3,
    }
    async with emulated(video_bytes=size) as (emu, client):
        async with client.batch([sora(i) for i in range(jobs)], **options) as results:
            first = await drain(results)
        assert sorted(o.index for o in first) == list(range(jobs))
        failed = [o for o in first if not o.ok]
        assert failed, "a 2 MiB disk cannot hold 3.75 MiB"
        for o in failed:
            assert type(o.error) is am.DownloadError
            assert str(small_disk / f"{o.index:06d}.mp4") in str(o.error)
            text = str(o.error)
            assert "No space left on device" in text or "not enough free space" in text
        check_files(emu, [o for o in first if o.ok])
        submits = emu.counters["submit"]

        _remount(small_disk, "size=16m")  # the user frees space
        async with client.batch([sora(i) for i in range(jobs)], **options) as again:
            second = await drain(again)
        assert emu.counters["submit"] == submits == jobs
    check_files(emu, second)
    assert {o.index for o in second if not o.replayed} == {o.index for o in failed}
    names = sorted(p.name for p in small_disk.iterdir())
    assert names == [f"{i:06d}.mp4" for i in range(jobs)]  # no .part left, none twice
    print(f"small disk: jobs {jobs}, faults {len(failed)}, lost 0, duplicated 0")


async def test_a_write_past_the_end_of_a_small_disk(small_disk: Path) -> None:
    """No Content-Length, so no check before: the write itself hits ENOSPC on a real disk."""

    class Reply:
        status = 200
        headers: ClassVar[dict[str, str]] = {}

        async def _chunks(self) -> AsyncIterator[bytes]:
            for _ in range(12):  # 3 MiB
                yield b"v" * (256 * 1024)

        def chunks(self, size: int) -> AsyncIterator[bytes]:
            return self._chunks()

    @contextlib.asynccontextmanager
    async def stream(url: str, headers: object = None) -> AsyncIterator[Reply]:
        yield Reply()

    async def refresh(task_id: str) -> am.Task:
        raise AssertionError("not called")

    downloader = Downloader(stream=stream, refresh=refresh)
    dest = small_disk / "big.mp4"
    with pytest.raises(am.DownloadError) as caught:
        await downloader.fetch("http://127.0.0.1:9/big.mp4", dest)
    assert f"{dest}" in str(caught.value)
    assert "[Errno 28] No space left on device" in str(caught.value)
    assert not dest.exists()


@pytest.fixture
def read_only_disk(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs (root only: skipped elsewhere; the injected EROFS test runs)."""
    where = tmp_path / "ro"
    if not _mount_tmpfs(where, "1m", "ro"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


async def test_a_read_only_download_dir_on_a_real_mount(
    tmp_path: Path, read_only_disk: Path
) -> None:
    async with emulated() as (emu, client):
        async with client.batch(
            [sora(i) for i in range(2)], download_dir=read_only_disk, manifest=tmp_path / "m.jsonl"
        ) as results:
            outcomes = await drain(results)
        assert emu.tasks_created == 2
    assert [type(o.error) for o in outcomes] == [am.DownloadError, am.DownloadError]
    assert all("[Errno 30] Read-only file system" in str(o.error) for o in outcomes)


async def test_written_bytes_are_flushed_to_disk_while_the_rest_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write-behind (issue 16) where the OS cannot start a write-back without waiting (macOS,
    Windows; forced here): every ``_FLUSH_EVERY`` bytes written (the first time
    ``_FIRST_FLUSH``) are flushed before the file is whole, so the fsync before the rename
    waits only for the tail; the file is the same."""
    monkeypatch.setattr(_download, "_start_writeback", None)
    monkeypatch.setattr(_download, "_FLUSH_EVERY", 256 * 1024)
    monkeypatch.setattr(_download, "_FIRST_FLUSH", 128 * 1024)
    monkeypatch.setattr(_download, "CHUNK", 64 * 1024)  # batches of 64 KiB for the writer
    flushed_at: list[int] = []
    real_flush = _PartFile.flush_sync

    def watched(self: _PartFile) -> None:
        flushed_at.append(self.size)
        real_flush(self)

    monkeypatch.setattr(_PartFile, "flush_sync", watched)
    async with emulated(video_bytes=2 * 1024 * 1024) as (emu, client):
        task = await client.videos.generate(sora(0))
        (file,) = await client.download(task, tmp_path)
    assert file.bytes == 2 * 1024 * 1024
    assert hashlib.sha256(Path(file.path).read_bytes()).hexdigest() == emu.file_sha256(task.id)
    assert flushed_at and flushed_at[0] < file.bytes, "nothing was flushed before the end"
    assert flushed_at == sorted(flushed_at)
    # one flush at a time: the first after at least _FIRST_FLUSH bytes, each later one after
    # at least _FLUSH_EVERY more than the one before
    assert flushed_at[0] >= 128 * 1024
    assert all(b - a >= 256 * 1024 for a, b in itertools.pairwise(flushed_at))


async def test_a_failed_flush_is_a_download_error_and_keeps_the_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_download, "_start_writeback", None)  # the flushing write-behind
    monkeypatch.setattr(_download, "_FLUSH_EVERY", 256 * 1024)
    monkeypatch.setattr(_download, "_FIRST_FLUSH", 256 * 1024)
    monkeypatch.setattr(_download, "CHUNK", 64 * 1024)  # batches of 64 KiB and a piece
    batches: list[int] = []
    failed_at: list[int] = []
    flush_failed = threading.Event()
    real_write = _PartFile.write_sync

    def broken(self: _PartFile) -> None:
        failed_at.append(self.size)
        flush_failed.set()
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def write(self: _PartFile, pieces: list[bytes]) -> None:
        # the flush's thread may start late (a busy machine): writes past the first flush
        # wait for its failure, so the test sees what the writer does once it is known
        if self.size >= 256 * 1024:
            flush_failed.wait(timeout=30)
        batches.append(sum(map(len, pieces)))
        real_write(self, pieces)

    monkeypatch.setattr(_PartFile, "flush_sync", broken)
    monkeypatch.setattr(_PartFile, "write_sync", write)
    async with emulated(video_bytes=2 * 1024 * 1024) as (_emu, client):
        task = await client.videos.generate(sora(0))
        with pytest.raises(am.DownloadError, match=r"\[Errno 5\] Input/output error") as caught:
            await client.download(task, tmp_path)
    dest = tmp_path / f"{task.id}.mp4"
    assert str(dest) in str(caught.value)
    assert not dest.exists()
    part = tmp_path / f"{task.id}.mp4.part"
    # what arrived is kept for a resume; the writer stops once the flush has failed: at most
    # the batch it was waiting to write then and one more (the two threads' ends race)
    assert failed_at == [failed_at[0]] and failed_at[0] >= 256 * 1024  # one flush, one failure
    assert failed_at[0] <= part.stat().st_size <= failed_at[0] + 2 * max(batches)
    assert part.stat().st_size < 2 * 1024 * 1024
    assert max(batches) <= 64 * 1024 + 256 * 1024  # a batch and the piece that filled it


async def test_each_batch_starts_its_write_back_as_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write-behind where the OS can start a write-back without waiting (Linux's
    ``posix_fadvise``; recorded here, so on every OS): each batch written is sent on to the
    disk at once, the ranges cover the file in order, no flush thread runs, and the file and
    its sha256 are the same."""
    monkeypatch.setattr(_download, "CHUNK", 64 * 1024)
    advised: list[tuple[int, int, int]] = []
    threads: set[int] = set()

    def start_writeback(fd: int, offset: int, length: int, advice: int) -> None:
        assert os.fstat(fd).st_size >= offset + length  # what it names is in the file
        advised.append((offset, length, advice))
        threads.add(threading.get_ident())

    def no_flush(self: _PartFile) -> None:
        raise AssertionError("no flush thread where the write-back can be started")

    monkeypatch.setattr(_download, "_start_writeback", start_writeback)
    monkeypatch.setattr(_PartFile, "flush_sync", no_flush)
    file = await download_whole(tmp_path)
    assert len(advised) >= 4  # one a batch: started long before the file's end
    assert {advice for *_, advice in advised} == {_download._WRITEBACK_ADVICE}
    ends = [0] + [offset + length for offset, length, _ in advised]
    assert [offset for offset, _, _ in advised] == ends[:-1]  # in order, no gap, no overlap
    assert ends[-1] == file.bytes
    assert threading.get_ident() not in threads  # never on the event loop's thread


async def test_a_refused_write_back_advice_does_not_fail_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def refuse(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append(offset)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(_download, "_start_writeback", refuse)
    async with emulated(video_bytes=1024 * 1024) as (emu, client):
        task = await client.videos.generate(sora(0))
        (file,) = await client.download(task, tmp_path)
    assert calls  # asked, refused, and the download went on
    assert file.bytes == 1024 * 1024
    assert hashlib.sha256(Path(file.path).read_bytes()).hexdigest() == emu.file_sha256(task.id)


async def test_hashing_and_writing_run_side_by_side_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sha256 and the writes each release the GIL: one thread writes, another hashes, and
    neither is the event loop's thread (issue 16)."""
    monkeypatch.setattr(_download, "CHUNK", 64 * 1024)
    writers: set[int] = set()
    hashers: set[int] = set()
    real_write, real_hash = _PartFile.write_sync, _download._Pipe._hash

    def write(self: _PartFile, pieces: list[bytes]) -> None:
        writers.add(threading.get_ident())
        real_write(self, pieces)

    def hash_(self: _download._Pipe, hashes: object) -> None:
        hashers.add(threading.get_ident())
        real_hash(self, hashes)  # type: ignore[arg-type]

    monkeypatch.setattr(_PartFile, "write_sync", write)
    monkeypatch.setattr(_download._Pipe, "_hash", hash_)
    async with emulated(video_bytes=1024 * 1024) as (emu, client):
        task = await client.videos.generate(sora(0))
        (file,) = await client.download(task, tmp_path)
    assert file.sha256 == emu.file_sha256(task.id)
    assert len(writers) == len(hashers) == 1
    assert writers.isdisjoint(hashers)
    assert threading.get_ident() not in writers | hashers


async def test_running_out_of_memory_while_hashing_is_a_download_error_not_a_wrong_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hasher cannot hash a batch: the download stops with a DownloadError (never a file
    under its final name with a sha256 of part of it), what was written is kept, and a
    second try resumes it into the right file."""
    monkeypatch.setattr(_download, "CHUNK", 64 * 1024)
    real_open = _PartFile.open_sync

    class Starved:
        def __init__(self, inner: hashlib._Hash) -> None:
            self.inner, self.calls = inner, 0

        def update(self, data: bytes) -> None:
            self.calls += 1
            if self.calls > 3:
                raise MemoryError
            self.inner.update(data)

        def hexdigest(self) -> str:
            return self.inner.hexdigest()

    def starved_open(self: _PartFile, *, resume: bool) -> None:
        real_open(self, resume=resume)
        self.hash = Starved(self.hash)  # type: ignore[assignment]

    monkeypatch.setattr(_PartFile, "open_sync", starved_open)
    async with emulated(video_bytes=1024 * 1024) as (emu, client):
        task = await client.videos.generate(sora(0))
        with pytest.raises(am.DownloadError, match="out of memory while hashing") as caught:
            await client.download(task, tmp_path)
        dest = tmp_path / f"{task.id}.mp4"
        assert str(dest) in str(caught.value)
        assert not dest.exists()
        part = tmp_path / f"{task.id}.mp4.part"
        assert 0 < part.stat().st_size <= 1024 * 1024  # what was written is kept

        monkeypatch.setattr(_PartFile, "open_sync", real_open)
        (file,) = await client.download(task, tmp_path)
    assert file.bytes == 1024 * 1024
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == file.sha256
    assert file.sha256 == emu.file_sha256(task.id)


class _NoThreads:
    """``threading`` for ``_download`` on a machine out of threads: ``Thread.start`` fails as
    CPython's does when the OS refuses one."""

    Lock = threading.Lock

    class Thread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")


@pytest.mark.parametrize("writeback", ["started per batch", "flushed every 256 KiB"])
async def test_a_refused_thread_costs_the_overlap_not_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writeback: str
) -> None:
    """The OS refuses the hasher's (or the flusher's) thread: the writer hashes (or flushes)
    itself, and the download ends as ever; never a raw RuntimeError or an exception group
    (a break-it pass of issue 16)."""
    monkeypatch.setattr(_download, "threading", _NoThreads)
    monkeypatch.setattr(_download, "CHUNK", 64 * 1024)
    if writeback != "started per batch":
        monkeypatch.setattr(_download, "_start_writeback", None)
        monkeypatch.setattr(_download, "_FLUSH_EVERY", 256 * 1024)
        monkeypatch.setattr(_download, "_FIRST_FLUSH", 256 * 1024)
    await download_whole(tmp_path)


def test_a_forked_child_does_not_keep_a_downloads_part_locked(tmp_path: Path) -> None:
    """A process forked while a download writes its part (a process pool's worker, started
    for other work) inherits the part's descriptor, and with it the lock: the download's own
    retry was refused as "another download is writing" (a second break-it pass of issue 16).
    The child lets go of every part it inherited."""
    import warnings

    path, dest = tmp_path / "v.mp4.part", tmp_path / "v.mp4"
    part = _PartFile(path, dest)
    part.open_sync(resume=False)
    part.write_sync([b"x" * 1000])
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork beside pytest's threads
        pid = os.fork()
    if pid == 0:  # the child: an idle worker that outlives the download's first attempt
        os.write(ready_w, b"r")
        os.read(done_r, 1)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"r"
        part.close_sync()  # the attempt was cut: the retry opens the part again
        again = _PartFile(path, dest)
        again.open_sync(resume=True)
        assert again.size == 1000
        again.close_sync()
    finally:
        os.write(done_w, b"d")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


def test_a_part_renamed_away_before_its_lock_is_not_the_one_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download opens the part just as another finishes with it (renames it into place and
    lets go of its lock): the lock it then takes is on the finished file, which it would
    have emptied and written (a second break-it pass of issue 16). It opens the part again."""
    path, dest = tmp_path / "v.mp4.part", tmp_path / "v.mp4"
    path.write_bytes(b"A" * 100)  # the other download's part, complete
    real_lock = _download._lock
    calls: list[int] = []

    def finished_meanwhile(fd: int, where: Path) -> None:
        if not calls:
            os.replace(path, dest)  # the other download renames it into place
        calls.append(fd)
        real_lock(fd, where)

    monkeypatch.setattr(_download, "_lock", finished_meanwhile)
    part = _PartFile(path, dest)
    part.open_sync(resume=False)
    try:
        assert dest.read_bytes() == b"A" * 100  # the finished file is untouched
        assert len(calls) == 2
        assert part._fh is not None
        assert os.fstat(part._fh.fileno()).st_ino == path.stat().st_ino
        part.write_sync([b"B" * 10])
        assert path.read_bytes() == b"B" * 10
    finally:
        part.close_sync()


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
async def test_a_part_that_is_not_a_regular_file_is_refused_not_followed(
    tmp_path: Path, kind: str
) -> None:
    """A ``.part`` that is a FIFO hung the download for ever (its open waited for a reader);
    one that is a link had the video appended to the file it names (a second break-it pass
    of issue 16). Either is a DownloadError, at once, and the thing itself is left alone."""
    import anyio

    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"keep")
    async with emulated(video_bytes=64 * 1024) as (emu, client):
        task = await client.videos.generate(sora(0))
        part = tmp_path / f"{task.id}.mp4.part"
        if kind == "fifo":
            os.mkfifo(part)
        else:
            part.symlink_to(target)
        with anyio.fail_after(10), pytest.raises(am.DownloadError, match="not a regular file"):
            await client.download(task, tmp_path)
        assert emu.counters.get("file", 0) == 0  # nothing fetched
    assert target.read_bytes() == b"keep"
    assert not (tmp_path / f"{task.id}.mp4").exists()


async def test_an_origin_beside_the_part_that_is_a_fifo_is_not_read(tmp_path: Path) -> None:
    """The part's origin record is read only from a regular file: a FIFO there hung the
    resume for ever. It counts as no record (the part resumes unchecked, as one left by an
    older version)."""
    import anyio

    async with emulated(video_bytes=64 * 1024) as (_emu, client):
        task = await client.videos.generate(sora(0))
        whole = (await client.download(task, tmp_path / "first.mp4"))[0]
        data = Path(whole.path).read_bytes()
        part = tmp_path / f"{task.id}.mp4.part"
        part.write_bytes(data[:1000])
        os.mkfifo(tmp_path / f"{task.id}.mp4.part.origin")
        with anyio.fail_after(10):
            (file,) = await client.download(task, tmp_path)
    assert Path(file.path).read_bytes() == data
    assert file.sha256 == whole.sha256

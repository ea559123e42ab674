"""Result files to disk: streamed to ``<name>.part``, resumed with Range, checked, renamed.

- Only http and https URLs are fetched, never with the API key.
- A partial file is resumed from where it stopped (``Range: bytes=N-``); a server that ignores
  the range restarts it. A resume must be of the file the part began with: it is sent with
  ``If-Range`` (the first reply's strong ETag, else Last-Modified), and a reply whose total
  size or validator differs from the first one's starts the file again (a cut error page is
  not the start of a video). That origin is kept beside the part (``<name>.part.origin``)
  for a resume by a later process. The length is checked against Content-Length /
  Content-Range and the sha256 is computed on the way; only a complete file is renamed into
  place, so a ``.part`` is never mistaken for a finished one.
- ``max_bytes`` stops a file that is (or becomes) larger than allowed.
- A part is locked while a download writes it (``flock``; not on Windows): a second download
  to the same place, in this process or another, is a ``DownloadError``, never two files
  written into one.
- The file is asked for as it is (``Accept-Encoding: identity``): a body compressed for the
  client is not the file, and no Range of it is a range of the file. A server that
  compresses anyway is decoded (the body is then the file, of a size not known beforehand);
  a compressed reply to a Range starts the file again from zero.
- A URL that has expired (403/404/410, or past ``expires_at``) costs one fresh status request
  for a new URL before giving up.
- File names come from the caller (the job's index or name), sanitised; nothing from the
  server names a file, and no name can leave the download directory.
- The local disk fails too: a write refused (full, read-only, no permission, a name too
  long) is a ``DownloadError`` naming the path and the OS error, never a raw ``OSError``;
  what arrived stays in the ``.part`` for a resume. When the size is known, the free space
  is checked first and a file that cannot fit is refused before its body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import json
import os
import queue
import re
import shutil
import stat
import sys
import threading
import time
import unicodedata
from collections.abc import Awaitable, Callable, Generator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import attrs

if sys.platform != "win32":  # Windows: parts are not locked
    import fcntl

from . import _retry
from ._errors import (
    APIConnectionError,
    ApimartError,
    ClientClosedError,
    DownloadError,
    DownloadExpiredError,
    DownloadGoneError,
    DownloadTooLargeError,
)
from ._models import DownloadedFile, Task
from ._threads import refused, run_sync
from ._transport import DECODABLE, StreamReply

__all__ = [
    "DEFAULT_FLOOR", "Cuts", "Downloader", "RateFloor", "Refresh", "Stream", "inside", "safe_name",
]  # fmt: skip

#: Opens a streaming GET of a result file (``Transport.stream``: never with the API key).
Stream = Callable[..., AbstractAsyncContextManager[StreamReply]]
#: A fresh status read of a task, for new result URLs (``Api.get_task``).
Refresh = Callable[[str], Awaitable[Task]]

#: The writer's batches, about this many bytes each. 512 KiB rather than 1 MiB: less of the
#: body in flight is less memory the allocator gives back and faults in again (process CPU
#: per file, paired runs: 10 MB 13.7-16.8 against 15.1-17.7 ms, 200 MB 234-246 against
#: 248-259 ms).
CHUNK = 1 << 19
#: The reply's read buffer: aiohttp stops reading the socket while twice this waits unread.
#: The body is taken as it arrives, piece by piece (``StreamReply.chunks``), so the floor
#: rate sees progress as it comes.
_READ = 1 << 19
#: Batches of about CHUNK bytes that may wait for the writer thread (memory per download:
#: about (_QUEUED + 2) * CHUNK).
_QUEUED = 2
#: Write-behind where the OS can start a file's write-back without waiting for it (Linux:
#: ``posix_fadvise(POSIX_FADV_DONTNEED)`` on a range just written starts its write-back and
#: returns): each batch is sent on its way to the disk as it is written, so the fsync before
#: the rename waits for about the last batch only. Issue 16, paired runs on loopback: 10 MB
#: files in 25.2 against 30.4 ms. Pages still being written stay in the page cache.
_start_writeback: Callable[[int, int, int, int], None] | None = getattr(os, "posix_fadvise", None)
_WRITEBACK_ADVICE: int = getattr(os, "POSIX_FADV_DONTNEED", 0)
#: Elsewhere (macOS, Windows), write-behind by flushing: after this many bytes written since
#: the last flush, they are flushed to disk (fdatasync) on another thread while the rest
#: arrives.
_FLUSH_EVERY = 8 << 20
#: The first flush comes sooner, so that a file of a few MiB has one under way before its
#: end (flushing every 4 MiB throughout cost large files a tenth under a loaded CPU).
_FIRST_FLUSH = 4 << 20
#: fdatasync where there is one (not on macOS): data, and only the metadata needed to read it.
_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
#: Whether an open part can be renamed and removed (not on Windows): then it is, while
#: still locked.
_WHILE_OPEN = sys.platform != "win32"
_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
#: A part is opened for reading (its bytes hashed on a resume) and appending, never through a
#: link, without waiting (a FIFO's open would wait for a reader), never inherited by an exec.
_PART_FLAGS: int = (
    os.O_RDWR
    | os.O_CREAT
    | os.O_APPEND
    | getattr(os, "O_NOFOLLOW", 0)
    | _NONBLOCK
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
#: What a file name keeps: letters and digits of any script, ``_``, ``.`` and ``-`` (brk16h:
#: ASCII alone made every Chinese or Japanese name "video"); anything else becomes ``_``.
_SAFE = re.compile(r"[^\w.-]+")
#: The longest name kept, in UTF-8 bytes: room for ``~99.mp4.part.origin`` in 255.
_NAME_BYTES = 200


@attrs.frozen
class RateFloor:
    """The slowest a download may be: at least ``bytes_per_second`` over every ``window``
    seconds, else it is cut and retried (resumed where it stopped)."""

    bytes_per_second: float
    window: float

    @property
    def quota(self) -> float:
        """Bytes that must arrive within each window."""
        return self.bytes_per_second * self.window


#: 10 KiB/s over 30 s: a stalled or trickling transfer is cut and resumed.
DEFAULT_FLOOR = RateFloor(10 * 1024, 30.0)


def safe_name(name: str, *, fallback: str = "video") -> str:
    """A file name that is safe on every OS and cannot name another directory."""
    text = unicodedata.normalize("NFKC", str(name))
    text = _SAFE.sub("_", text).strip("._")[:120]
    while len(text.encode()) > _NAME_BYTES:
        text = text[:-1]
    return text.rstrip("._") or fallback


def disk_error(path: Path, exc: OSError) -> DownloadError:
    """A local file error as the ``DownloadError`` a caller gets: the path and the OS error."""
    reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else repr(exc)
    return DownloadError(f"cannot write {path}: {reason}; what arrived is kept for a resume")


def _free_bytes(directory: Path) -> int | None:
    """Free bytes for an unprivileged writer in ``directory`` (None: cannot tell)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _reserve(part: _PartFile, needed: int, free: int | None) -> None:
    """Refuse a file that cannot fit: ``needed`` more bytes than the disk has ``free``."""
    if free is not None and needed > free:
        raise DownloadError(
            f"cannot write {part.dest}: not enough free space ({needed} bytes to write, "
            f"{free} bytes free); free some space and run again to resume"
        )


def _refuse_special(dest: Path) -> None:
    """A destination that exists must be a file (or a link) the rename may replace: never a
    device, a FIFO or a socket (``/dev/null`` replaced by a video, run as root)."""
    try:
        mode = dest.lstat().st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise _not_regular(dest)


def _not_regular(path: Path) -> DownloadError:
    return DownloadError(f"cannot write {path}: it exists and is not a regular file")


def _busy(path: Path) -> DownloadError:
    return DownloadError(f"another download is writing {path}; run again once it has ended")


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one named ``path``."""
    held = os.fstat(fd)
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


#: The descriptors of the parts this process holds locked. A child forked meanwhile (a
#: process pool's worker, say) inherits them, and with them the locks: it lets go of them at
#: once (``_let_go_in_child``), else the download's own retry would find its part locked.
_HELD: set[int] = set()


def _let_go_in_child() -> None:
    """In a forked child: each inherited part's descriptor names /dev/null instead, which
    lets go of the part and its lock, and keeps the number valid for the file object that
    owns it (closing it later closes /dev/null, and nothing is written to the part)."""
    if not _HELD:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in list(_HELD):
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
    finally:
        os.close(null)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_child)


def _lock(fd: int, path: Path) -> None:
    """Hold the part while this download writes it: another download to the same place (in
    this process or another) is refused, instead of both writing one file. Where the OS or
    the file system has no such lock (Windows, some network mounts), nothing is locked."""
    if sys.platform == "win32":
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(path) from None
    except OSError:  # no locks here (ENOLCK, EINVAL): unlocked, as before
        return


def inside(directory: Path, name: str) -> Path:
    """``directory / name`` after checking that it stays inside ``directory``."""
    base = directory.resolve()
    path = (base / name).resolve()
    if path.parent != base:
        raise DownloadError(f"file name {name!r} would leave {base}")
    return path


class _PartFile:
    """The ``.part`` file and its running sha256 (all file work on worker threads)."""

    def __init__(self, path: Path, dest: Path) -> None:
        self.path = path
        #: The final file, named in errors.
        self.dest = dest
        self.size = 0
        self.hash = hashlib.sha256()
        self._fh: BinaryIO | None = None
        #: What the reply that began the part said of the file: its total size and its
        #: validator (a strong ETag, else Last-Modified); unknown for a part left by an
        #: earlier process. A resume must be of the same file, or it starts again.
        self.origin_total: int | None = None
        self.origin_tag: str | None = None
        #: Where the origin is kept beside the part, for a resume by a later process.
        self.origin_path = path.with_name(path.name + ".origin")
        #: The free bytes where the part is, read when it was opened (None: cannot tell).
        self.free: int | None = None

    def open_sync(self, *, resume: bool) -> None:
        """Open the part for appending, locked (``_lock``) before anything in it changes:
        resumed (its bytes hashed) or emptied."""
        self.hash = hashlib.sha256()
        self.size = 0
        _refuse_special(self.dest)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._open_locked()
        try:
            if resume:  # read from its start (appends go to its end whatever the position)
                while block := os.read(fd, CHUNK):
                    self.hash.update(block)
                    self.size += len(block)
            if self.size:
                self._read_origin()
            else:  # begun afresh (or empty): no origin yet
                os.ftruncate(fd, 0)
                self.origin_total = self.origin_tag = None
                self.origin_path.unlink(missing_ok=True)
            self._fh = os.fdopen(fd, "ab")
        except BaseException:
            _HELD.discard(fd)
            os.close(fd)
            raise
        self.free = _free_bytes(self.path.parent)

    def _open_locked(self) -> int:
        """The part, opened for reading and appending and locked (``_lock``): a regular file
        (never a FIFO, whose open would wait for a reader, nor a link, whose target would
        take the bytes), and still the part once locked (another download may have renamed
        it into place meanwhile: then again)."""
        for _ in range(3):
            try:
                fd = os.open(self.path, _PART_FLAGS, 0o666)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # O_NOFOLLOW: a link
                    raise _not_regular(self.path) from None
                raise
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise _not_regular(self.path)
                if _NONBLOCK:
                    os.set_blocking(fd, True)
                _lock(fd, self.path)
                if _is_at(fd, self.path):
                    _HELD.add(fd)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise _busy(self.path)

    def _read_origin(self) -> None:
        """The origin kept beside the part (none for a part made by other means: a part
        without one is resumed unchecked, as before; nor from anything but a regular file)."""
        try:
            if not stat.S_ISREG(self.origin_path.lstat().st_mode):
                return
            origin = json.loads(self.origin_path.read_text(encoding="utf-8"))
            total, tag = origin["total"], origin["tag"]
        except (OSError, ValueError, TypeError, KeyError, RecursionError):  # garbage: unknown
            return
        if isinstance(total, int) and not isinstance(total, bool):
            self.origin_total = total
        if isinstance(tag, str):
            self.origin_tag = tag

    def record_origin_sync(self, total: int | None, tag: str | None) -> None:
        self.origin_total, self.origin_tag = total, tag
        self.origin_path.unlink(missing_ok=True)  # whatever was there (a FIFO would block)
        self.origin_path.write_text(json.dumps({"total": total, "tag": tag}), encoding="utf-8")

    def write_sync(self, pieces: list[bytes]) -> None:
        """Append ``pieces`` (hashed elsewhere: ``_Pipe``); where the OS can, their
        write-back to the disk starts now (``_start_writeback``)."""
        fh = self._fh
        assert fh is not None
        start = self.size
        fh.writelines(pieces)
        self.size += sum(map(len, pieces))
        if _start_writeback is not None:
            fh.flush()  # what the buffer holds is in the file, so the range is whole
            with contextlib.suppress(OSError):  # advice: a file system may not take it
                _start_writeback(fh.fileno(), start, self.size - start, _WRITEBACK_ADVICE)

    def flush_sync(self) -> None:
        """Flush what was written so far to disk (the writer may go on meanwhile)."""
        fh = self._fh
        if fh is not None:
            fh.flush()
            _datasync(fh.fileno())

    def close_sync(self) -> None:
        """Close, keeping what arrived for a resume (an empty part is removed). Never raises:
        it runs after the error that ended the download (a full disk may refuse the flush)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):  # the part is checked when it is resumed
                self._close(fh, remove=self.size == 0)

    def discard_sync(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                self._close(fh, remove=True)

    def _close(self, fh: BinaryIO, *, remove: bool) -> None:
        """Close the part, removed first (with its origin) if ``remove``: while it is still
        locked, so that what goes is never another download's part (Windows, which cannot
        remove an open file, removes it after)."""
        try:
            if remove and _WHILE_OPEN:
                self._remove()
        finally:
            _HELD.discard(fh.fileno())
            fh.close()
        if remove and not _WHILE_OPEN:
            self._remove()

    def _remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.origin_path.unlink(missing_ok=True)

    def finish_sync(self, dest: Path) -> None:
        """The part is complete: flush it to disk, then rename it into place, so a file under
        its final name is always whole (also after a power cut)."""
        fh, self._fh = self._fh, None
        assert fh is not None
        with fh:
            try:
                fh.flush()
                os.fsync(fh.fileno())
                if _WHILE_OPEN:  # renamed still locked: no other download opens it meanwhile
                    self._into_place(dest)
            finally:
                _HELD.discard(fh.fileno())
        if not _WHILE_OPEN:
            self._into_place(dest)

    def _into_place(self, dest: Path) -> None:
        os.replace(self.path, dest)
        with contextlib.suppress(OSError):  # the file is whole and in place already
            self.origin_path.unlink(missing_ok=True)


def _started(target: Callable[..., None], *args: object) -> threading.Thread | None:
    """A daemon thread running ``target(*args)``, or None when the OS refuses a thread
    (CPython's RuntimeError): the caller then does that work itself, without the overlap."""
    thread = threading.Thread(target=target, args=args, daemon=True)
    try:
        thread.start()
    except RuntimeError:
        return None
    return thread


class _Pipe:
    """Between the event loop, which reads a body, and two threads: the writer, a worker
    thread, writes it to the part (``drain``), and hands each batch on to the hasher, a
    thread of its own, which hashes it (sha256 and the write each release the GIL, so the
    two run side by side: issue 16, 200 MB files in 352 against 392 ms, 10 MB 22.9 against
    30.4 with the write-back below). Plain queues, so a batch costs the loop no trip to a
    thread and the writer no trip back (those trips, one per batch, cost 0.3-0.5 ms each on
    loopback). The loop is woken only when it waits for room: at most ``_QUEUED`` batches
    are between it and the hasher's end.

    Where the OS cannot start a write-back without waiting (``_start_writeback``), every
    ``_FLUSH_EVERY`` bytes written (the first time ``_FIRST_FLUSH``) are flushed (fdatasync)
    on a thread of their own while the writer goes on, one flush at a time. A failed write
    or flush is kept in ``failed``: the writer drops what is queued after it and the reader
    stops. When the OS refuses the hasher's or a flusher's thread, the writer hashes or
    flushes itself."""

    def __init__(self, part: _PartFile, loop: asyncio.AbstractEventLoop) -> None:
        self.part = part
        self._loop = loop
        #: The origin of a part begun from its first byte, recorded before that byte.
        self.origin: tuple[int | None, str | None] | None = None
        self._closed = False
        self._queue: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._sent = 0  # batches queued by the reader
        self._taken = 0  # batches done with (hashed, or dropped)
        self._room: asyncio.Event | None = None  # the reader waits for the writer
        self._flusher: threading.Thread | None = None
        self._flushed_at = part.size
        self._flush_after = _FIRST_FLUSH  # bytes written before the next flush
        self.failed: list[OSError] = []
        #: The body's compression, when the server compressed it though asked not to.
        self.coding: str | None = None

    async def run(self) -> None:
        """The writer, on a worker thread until ``close`` (which the reader always calls):
        shielded, so that what was queued is written also when the download is cancelled
        before the thread has started."""
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self.drain)
            except RuntimeError as exc:
                if not refused(exc):
                    raise
                # no writer: nothing is written, the reader stops at its next batch
                self.failed.append(
                    OSError(errno.EAGAIN, f"the system refused a new thread ({exc})")
                )
                room, self._room = self._room, None
                if room is not None:
                    room.set()

    async def send(self, batch: list[bytes]) -> None:
        """Queue ``batch``; wait while more than ``_QUEUED`` wait for the writer."""
        if self.failed:  # also: no writer to wait for
            return
        self._queue.put(batch)
        with self._lock:
            self._sent += 1
            if self._sent - self._taken <= _QUEUED:
                return
            room = self._room = asyncio.Event()
        await room.wait()

    def close(self, pieces: list[bytes]) -> None:
        """No more batches: ``pieces`` (if any, and nothing failed) is the last. Once."""
        if self._closed:
            return
        self._closed = True
        if pieces and not self.failed:
            self._queue.put(pieces)
        self._queue.put(None)

    def drain(self) -> None:
        """The writer thread: the part's origin recorded (a part begun from its first byte),
        then each batch written in order and handed to the hasher, until ``close``."""
        hashes: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        hasher = _started(self._hash, hashes)  # None: the OS refused, this thread hashes
        try:
            while (batch := self._queue.get()) is not None:
                if self.failed:
                    self._done()  # dropped: the reader stops at its next batch
                    continue
                try:
                    if self.origin is not None:  # before the part's first byte
                        origin, self.origin = self.origin, None
                        self.part.record_origin_sync(*origin)
                    self.part.write_sync(batch)
                except OSError as exc:  # disk full, say
                    self.failed.append(exc)
                    self._done()
                    continue
                if hasher is not None:
                    hashes.put(batch)
                else:
                    self._hash_one(batch)
                if _start_writeback is None:
                    self._flush_behind()
        finally:
            if hasher is not None:
                hashes.put(None)
                hasher.join()
            if self._flusher is not None:
                self._flusher.join()

    def _hash(self, hashes: queue.SimpleQueue[list[bytes] | None]) -> None:
        """The hasher thread: each batch written into the part's sha256, in order."""
        while (batch := hashes.get()) is not None:
            self._hash_one(batch)

    def _hash_one(self, batch: list[bytes]) -> None:
        if not self.failed:  # else the part is not complete: its hash is not needed
            try:
                for data in batch:
                    self.part.hash.update(data)
            except MemoryError:  # stop the download, never report a wrong sha256
                self.failed.append(OSError(errno.ENOMEM, "out of memory while hashing"))
        self._done()

    def _done(self) -> None:
        """One batch done with: room for the reader, if it waits."""
        with self._lock:
            self._taken += 1
            room, self._room = self._room, None
        if room is not None:
            self._loop.call_soon_threadsafe(room.set)

    def _flush_behind(self) -> None:
        """Start a flush of what was written, if enough was and none is under way."""
        if self.part.size - self._flushed_at >= self._flush_after and not (
            self._flusher is not None and self._flusher.is_alive()
        ):
            self._flushed_at = self.part.size
            self._flush_after = _FLUSH_EVERY
            self._flusher = _started(self._flush)
            if self._flusher is None:  # the OS refused a thread: flushed here, in turn
                self._flush()

    def _flush(self) -> None:
        try:
            self.part.flush_sync()
        except OSError as exc:
            self.failed.append(exc)


class Cuts:
    """Downloads a stop may cut short (a batch's grace is over: brk16h, they went on to their
    end, for ever from a stalled server): each runs in a cancel scope of its own, all
    cancelled by ``cut``, and any started after it at once. What arrived stays in the part."""

    def __init__(self) -> None:
        self._scopes: set[anyio.CancelScope] = set()
        self._cut = False

    @contextlib.contextmanager
    def scope(self) -> Generator[anyio.CancelScope, None, None]:
        """A download's scope (``cancelled_caught``: it was cut)."""
        with anyio.CancelScope() as scope:
            if self._cut:
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    def cut(self) -> None:
        self._cut = True
        for scope in self._scopes:
            scope.cancel()


class Downloader:
    """Fetches result files for one client, at most ``concurrency`` at a time.

    It gets only what it needs: ``stream`` opens a GET of a URL, ``refresh`` reads a task
    again for fresh URLs, ``max_retries`` bounds the attempts of one file.
    """

    def __init__(
        self,
        *,
        stream: Stream,
        refresh: Refresh,
        max_retries: int = 3,
        concurrency: int = 4,
    ) -> None:
        self._open_stream = stream
        self._refresh_task = refresh
        self.max_retries = max_retries
        self.limiter: anyio.CapacityLimiter = anyio.CapacityLimiter(concurrency)

    async def fetch_url(
        self, url: str, dest: Path, *, max_bytes: int | None = None
    ) -> DownloadedFile:
        """``fetch`` for a bare URL, which nothing can renew: a URL that answers 403/404/410
        raises ``DownloadExpiredError``."""
        try:
            return await self.fetch(url, dest, max_bytes=max_bytes)
        except DownloadGoneError as exc:
            raise DownloadExpiredError(
                f"result URL answered HTTP {exc.status}; pass the Task to renew it",
                url=url,
                status=exc.status,
            ) from None

    async def fetch(
        self,
        url: str,
        dest: Path,
        *,
        max_bytes: int | None = None,
        floor: RateFloor | None = DEFAULT_FLOOR,
    ) -> DownloadedFile:
        """Download ``url`` to ``dest`` (resuming ``dest.part``). Raises DownloadError, or
        ``DownloadGoneError`` for a URL that answers 403/404/410 (the caller may refresh it).
        A transfer slower than ``floor`` (None: no floor) is cut and resumed."""
        if not url.lower().startswith(("http://", "https://")):
            raise DownloadError(f"refusing to download a non-http(s) URL: {url[:80]!r}", url=url)
        async with self.limiter:
            return await self._fetch(url, dest, max_bytes, floor)

    async def _fetch(
        self, url: str, dest: Path, max_bytes: int | None, floor: RateFloor | None
    ) -> DownloadedFile:
        part = _PartFile(dest.with_name(dest.name + ".part"), dest)
        try:
            return await self._attempts(url, dest, part, max_bytes, floor)
        except OSError as exc:  # the local disk: full, read-only, a name too long...
            raise disk_error(dest, exc) from exc

    async def _attempts(
        self, url: str, dest: Path, part: _PartFile, max_bytes: int | None, floor: RateFloor | None
    ) -> DownloadedFile:
        resume = True
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            await run_sync(functools.partial(part.open_sync, resume=resume))
            complete: bool | None = False
            try:
                complete = await self._stream(url, part, max_bytes, floor)
            except APIConnectionError as exc:  # also a 408/429/5xx from the file server
                if attempt == attempts:  # the type kept; the message says it is the last
                    exc.message = f"{exc.message}; gave up after {attempts} attempts, what"
                    exc.message += " arrived is kept for a resume"
                    exc.args = (exc.message,)
                    raise
                if not _retry.is_testing():
                    await anyio.sleep(_retry.backoff_delay(attempt))
            except DownloadTooLargeError:
                with anyio.CancelScope(shield=True):
                    await run_sync(part.discard_sync)
                raise
            finally:
                if not complete:  # keep what arrived for a resume; a complete part is kept open
                    with anyio.CancelScope(shield=True):  # also when a deadline ends it
                        await run_sync(part.close_sync)
            if complete:
                digest = part.hash.hexdigest()
                size = part.size
                try:
                    await run_sync(part.finish_sync, dest)
                except BaseException:  # the disk, or cancelled before the rename: closed, kept
                    with anyio.CancelScope(shield=True):
                        await run_sync(part.close_sync)
                    raise
                return DownloadedFile(path=str(dest), bytes=size, sha256=digest, url=url)
            # None: the server ignored the range or the part was bad: restart; else resume
            resume = complete is not None
        raise DownloadError(
            f"download of {dest.name} stayed incomplete after {attempts} attempts", url=url
        )

    async def _stream(
        self, url: str, part: _PartFile, max_bytes: int | None, floor: RateFloor | None
    ) -> bool | None:
        """One GET. True: complete. False: cut short. None: start again from zero.

        The writer thread (``_Pipe``) starts as the request goes out, so it is ready when
        the first batch arrives (started then, it waited for the loop, busy with the reply)."""
        pipe = _Pipe(part, asyncio.get_running_loop())
        copied: tuple[int | None] | None = None
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipe.run)
            try:
                copied = await self._get(url, part, max_bytes, floor, pipe)
            except Exception as exc:  # noqa: BLE001 - raised below, not as a group
                error = exc
            finally:
                pipe.close([])  # the writer stores what was queued, then ends
        if error is not None:
            raise _undecoded(error, url, pipe.coding)
        if pipe.failed:
            raise disk_error(part.dest, pipe.failed[0]) from pipe.failed[0]
        if copied is None:
            return None
        (total,) = copied
        if total is None:
            return True
        if part.size > total:
            return None
        return part.size == total

    async def _get(
        self,
        url: str,
        part: _PartFile,
        max_bytes: int | None,
        floor: RateFloor | None,
        pipe: _Pipe,
    ) -> tuple[int | None] | None:
        """The GET of ``_stream``, its body to ``pipe``: the file's total size, if known; None
        when the part must start again from zero."""
        offset = part.size
        # the bytes as they are: a body a server compressed because the client accepts it
        # has another length than the file, and no Range of it is a range of the file
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if part.origin_tag is not None:  # the rest of that version, else all of the new
                headers["If-Range"] = part.origin_tag
        async with self._open_stream(url, headers=headers) as resp:
            if resp.status in (403, 404, 410):
                raise DownloadGoneError(resp.status)
            if resp.status == 416 and offset:
                return None  # the part is not a prefix of this file
            if _retry.is_retryable_status(resp.status):
                raise APIConnectionError(
                    f"download answered HTTP {resp.status}", method="GET", path=urlsplit(url).path
                )
            if resp.status not in (200, 206):
                raise DownloadError(
                    f"download answered HTTP {resp.status}", url=url, status=resp.status
                )
            page = _error_page(resp.headers)
            if page is not None:  # a CDN's or a proxy's error page, never a video: again
                raise APIConnectionError(
                    f"download answered HTTP {resp.status} with a {page} body, not a file",
                    method="GET",
                    path=urlsplit(url).path,
                )
            if offset and resp.status == 200:
                return None
            # compressed though asked not to: decoded, it is the file, but a range of it is no
            # range of the file
            pipe.coding = coding = _coding(resp.headers)
            if coding is not None:
                if coding not in DECODABLE:
                    raise _undecodable(url, coding)
                if offset:
                    return None
            # its length (and version tag) are the compressed body's: the file's size is not
            # known, and the part it leaves, if cut, has no version to resume against
            total = None if coding else _total_size(resp.status, resp.headers, offset)
            tag = None if coding else _validator(resp.headers)
            if not offset:  # kept on disk by the writer thread before the part's first byte
                pipe.origin = part.origin_total, part.origin_tag = total, tag
            elif (None not in (total, part.origin_total) and total != part.origin_total) or (
                None not in (tag, part.origin_tag) and tag != part.origin_tag
            ):
                # the part began with another thing (an error page cut short, an older
                # version of the file): its bytes are not the start of this one
                return None
            if max_bytes is not None and total is not None and total > max_bytes:
                raise DownloadTooLargeError(
                    f"file is {total} bytes, more than max_bytes={max_bytes}", url=url
                )
            if total is not None:
                _reserve(part, total - part.size, part.free)
            await self._copy(resp, pipe, url, max_bytes, floor)
            return (total,)

    async def _copy(
        self,
        resp: StreamReply,
        pipe: _Pipe,
        url: str,
        max_bytes: int | None,
        floor: RateFloor | None,
    ) -> None:
        """Body to the part file through ``pipe``: its threads write and hash about
        ``CHUNK`` bytes at a time while the next arrive; at most ``_QUEUED`` batches wait in
        memory, so memory stays flat whatever the file size. What is written goes on to the
        disk meanwhile (write-behind). Each ``floor.window`` must
        bring ``floor.quota`` bytes: a window that does not is cut (``APIConnectionError``,
        retried). A failed write stops the copy (``pipe.failed``, raised by ``_stream``)."""
        received = pipe.part.size
        pieces: list[bytes] = []
        # the window: a new one starts each time the last one's quota has arrived
        window_start = received
        pace = anyio.CancelScope()
        if floor is not None:
            pace.deadline = anyio.current_time() + floor.window
        try:
            size = 0
            with pace:
                async for chunk in resp.chunks(_READ):
                    received += len(chunk)
                    if floor is not None and received - window_start >= floor.quota:
                        window_start = received
                        pace.deadline = anyio.current_time() + floor.window
                    if max_bytes is not None and received > max_bytes:
                        raise DownloadTooLargeError(f"file exceeds max_bytes={max_bytes}", url=url)
                    pieces.append(chunk)
                    size += len(chunk)
                    if size >= CHUNK:
                        batch, pieces, size = pieces, [], 0
                        await pipe.send(batch)
                        if pipe.failed:
                            return  # the disk: raised by _stream
            if pace.cancelled_caught:
                assert floor is not None
                raise APIConnectionError(
                    f"download slower than {floor.bytes_per_second:g} bytes/s over "
                    f"{floor.window:g} s ({received - window_start} bytes in the last window)",
                    method="GET",
                    path=urlsplit(url).path,
                )
        finally:
            # what arrived is kept, also from a window or a deadline cut short: the writer
            # stores it after what was queued (no gap)
            pipe.close(pieces)

    async def task_files_by(
        self,
        deadline: tuple[float, str],
        task: Task,
        directory: Path,
        stem: str,
        *,
        max_bytes: int | None = None,
        floor: RateFloor | None = DEFAULT_FLOOR,
    ) -> tuple[tuple[DownloadedFile, ...], ApimartError | None]:
        """``task_files`` ended at ``deadline`` (anyio's clock, inf: never; and the name of
        the limit it is): the files, or none and the error that ended the download (a
        ``DownloadError`` naming the limit when the deadline did; the ``.part`` is kept)."""
        end_at, limit = deadline
        with anyio.CancelScope(deadline=end_at):
            try:
                files = await self.task_files(
                    task, directory, stem, max_bytes=max_bytes, floor=floor
                )
            except ApimartError as exc:  # DownloadError included
                return (), exc
            return files, None
        return (), DownloadError(  # the deadline passed
            f"download of task {task.id} ended by the {limit}; what arrived is kept"
            " and a resume fetches the rest"
        )

    async def task_files(
        self,
        task: Task,
        directory: Path,
        stem: str,
        *,
        max_bytes: int | None = None,
        floor: RateFloor | None = DEFAULT_FLOOR,
    ) -> tuple[DownloadedFile, ...]:
        """Every video of a completed task into ``directory`` as ``<stem>.mp4``, the second
        and later as ``<stem>~2.mp4``, ``<stem>~3.mp4``: ``~`` is never in a safe name, so
        no job's own file is another's further video. One fresh status request renews
        expired URLs."""
        files: list[DownloadedFile] = []
        fresh: Task | None = None
        for n, video in enumerate(task.videos):
            name = safe_name(stem) + (f"~{n + 1}" if n else "") + ".mp4"
            try:
                dest = inside(directory, name)
            except OSError as exc:
                raise disk_error(directory / name, exc) from exc
            url = video.url
            if url is None:
                raise DownloadError(f"task {task.id} lists a video without a URL")
            if video.is_expired(time.time()) and fresh is None:
                fresh = await self._refresh(task)
                url = _nth_url(fresh, n) or url
            try:
                files.append(await self.fetch(url, dest, max_bytes=max_bytes, floor=floor))
                continue
            except DownloadGoneError as gone:
                if fresh is not None:
                    raise DownloadExpiredError(
                        f"result URL of task {task.id} answered HTTP {gone.status}, "
                        "also after a refresh",
                        url=url,
                        status=gone.status,
                    ) from None
            fresh = await self._refresh(task)
            new_url = _nth_url(fresh, n)
            if new_url is None:
                raise DownloadExpiredError(
                    f"task {task.id} has no URL for video {n} any more", url=url
                )
            try:
                files.append(await self.fetch(new_url, dest, max_bytes=max_bytes, floor=floor))
            except DownloadGoneError as gone:
                raise DownloadExpiredError(
                    f"result URL of task {task.id} answered HTTP {gone.status}, "
                    "also after a refresh",
                    url=new_url,
                    status=gone.status,
                ) from None
        return tuple(files)

    async def _refresh(self, task: Task) -> Task:
        try:
            return await self._refresh_task(task.id)
        except ClientClosedError:
            raise
        except ApimartError as exc:
            raise DownloadExpiredError(
                f"result URL of task {task.id} expired and the refresh failed: {exc}"
            ) from None


def _nth_url(task: Task, n: int) -> str | None:
    return task.videos[n].url if n < len(task.videos) else None


def _validator(headers: Any) -> str | None:
    """What identifies this version of the file for ``If-Range``: a strong ETag, else
    Last-Modified (a weak ETag cannot be used there)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return str(etag)
    modified = headers.get("Last-Modified")
    return str(modified) if modified else None


def _error_page(headers: Any) -> str | None:
    """The media type of a reply that is a page (JSON, HTML), not a file, else None."""
    kind = str(headers.get("Content-Type", "")).split(";", 1)[0].strip().lower()
    if kind in ("application/json", "text/html", "application/xhtml+xml") or kind.endswith("+json"):
        return kind
    return None


def _undecodable(url: str, coding: str) -> DownloadError:
    """A file sent compressed (``coding``) although asked for as it is, that this client
    cannot decode: sent so again on a retry, so none is made."""
    return DownloadError(
        f"the file server sent the file compressed ({coding}) although asked for it as it is,"
        " and it cannot be decoded here",
        url=url,
    )


def _undecoded(error: Exception, url: str, coding: str | None) -> Exception:
    """``error``, or the ``_undecodable`` it means (aiohttp: "Can not decode
    content-encoding: gzip", also before the headers reach the downloader)."""
    said = re.search(r"decode content-encoding: ([\w.-]+)(?: \(([\w.-]+)\))?", str(error))
    if not isinstance(error, APIConnectionError) or said is None:
        return error
    return _undecodable(url, coding or said[2] or said[1])


def _coding(headers: Any) -> str | None:
    """A reply body's compression, if any (aiohttp decodes it: the bytes read are the
    file's, its ``Content-Length`` and ``Content-Range`` are not)."""
    coding = str(headers.get("Content-Encoding", "")).strip().lower()
    return None if coding in ("", "identity") else coding


def _total_size(status: int, headers: Any, offset: int) -> int | None:
    if status == 206:
        content_range = headers.get("Content-Range", "")
        if "/" in content_range:
            total = content_range.rsplit("/", 1)[1]
            if total.isdigit():
                return int(total)
    length = headers.get("Content-Length")
    if length is not None and length.isdigit():
        return int(length) + (offset if status == 206 else 0)
    return None

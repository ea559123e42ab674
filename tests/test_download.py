"""Downloads: resume, verification, expiry refresh, size guard, names that cannot escape."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

import apimart_async as am
from apimart_async._download import inside, safe_name
from apimart_async.emulator import Emulator, Fault

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

SORA = am.VideoRequest("sora-2-preview", "a cat", duration=4)


@contextlib.asynccontextmanager
async def file_server(
    serve: Callable[[web.Request], Awaitable[web.StreamResponse]], route: str = "/v.mp4"
) -> AsyncIterator[str]:
    """A file server of our own on loopback for the bodies the emulator does not send;
    yields its base URL."""
    app = web.Application()
    app.router.add_get(route, serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def completed_task(emu: Emulator, client: am.AsyncApimart) -> am.Task:
    task_id = await client.videos.submit(SORA)
    emu.advance(10)
    return await client.tasks.get(task_id)


async def test_download_task_to_directory(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    task = await completed_task(emu, client)
    (f,) = await client.download(task, tmp_path)
    path = Path(f.path)
    assert path == tmp_path / f"{task.id}.mp4"
    data = path.read_bytes()
    assert len(data) == f.bytes == 64 * 1024
    assert f.sha256 == hashlib.sha256(data).hexdigest() == emu.file_sha256(task.id)
    assert not path.with_name(path.name + ".part").exists()
    assert emu.state.file_requests_with_auth == 0


async def test_download_to_a_file_path(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    task = await completed_task(emu, client)
    (f,) = await client.download(task, tmp_path / "sub" / "clip.mp4")
    assert f.path == str(tmp_path / "sub" / "clip.mp4")


async def test_range_resume_of_a_half_written_file(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    task = await completed_task(emu, client)
    (whole,) = await client.download(task, tmp_path / "ref.mp4")
    data = (tmp_path / "ref.mp4").read_bytes()
    part = tmp_path / "clip.mp4.part"
    part.write_bytes(data[:20_000])
    before = emu.counters["file"]
    (f,) = await client.download(task, tmp_path / "clip.mp4")
    assert emu.counters["file"] == before + 1
    assert emu.state.statuses[("file", 206)] == 1  # resumed, not restarted
    assert f.sha256 == whole.sha256 and f.bytes == len(data)
    assert not part.exists()


async def test_a_corrupt_part_longer_than_the_file_restarts(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    task = await completed_task(emu, client)
    (tmp_path / "clip.mp4.part").write_bytes(b"x" * (64 * 1024 + 10))
    (f,) = await client.download(task, tmp_path / "clip.mp4")
    assert f.sha256 == emu.file_sha256(task.id)


async def test_cut_transfers_are_resumed(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    task = await completed_task(emu, client)
    emu.faults.inject("file", Fault.drop())
    (f,) = await client.download(task, tmp_path)
    assert f.sha256 == emu.file_sha256(task.id)
    assert emu.counters["file"] == 2


async def test_a_200_with_an_error_page_is_not_taken_for_the_video(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    """A file server (a CDN, a proxy) may answer 200 with a JSON or HTML error page: that is
    not the video. It was saved as the .mp4, its sha256 taken as the file's (issue 15's
    crash test caught it); it is now fetched again, and a page that stays is a clear error."""
    task = await completed_task(emu, client)
    emu.faults.inject("file", Fault.malformed(), times=2)  # 200, application/json
    (f,) = await client.download(task, tmp_path)
    assert f.sha256 == emu.file_sha256(task.id) and f.bytes == 64 * 1024
    assert emu.counters["file"] == 3
    emu.faults.inject("file", Fault.malformed(), times=10)
    with pytest.raises(am.APIConnectionError, match="application/json body, not a file"):
        await client.download(task, tmp_path / "again.mp4")
    assert not (tmp_path / "again.mp4").exists()


async def test_expired_url_is_refreshed_once(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    task = await completed_task(emu, client)
    emu.faults.inject("file", Fault.error(403, "expired"))
    n = emu.counters["task"]
    (f,) = await client.download(task, tmp_path)
    assert emu.counters["task"] == n + 1  # one fresh status request
    assert f.sha256 == emu.file_sha256(task.id)


async def test_expired_for_good_is_a_clear_error(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    task = await completed_task(emu, client)
    emu.advance(25 * 3600)  # past expires_at: the service's URL is refused
    with pytest.raises(am.DownloadExpiredError, match="answered HTTP 403, also after a refresh"):
        await client.download(task, tmp_path)
    assert not list(tmp_path.iterdir())


async def test_max_bytes(emu: Emulator, client: am.AsyncApimart, tmp_path: Path) -> None:
    task = await completed_task(emu, client)
    with pytest.raises(am.DownloadTooLargeError, match="more than max_bytes=1000"):
        await client.download(task, tmp_path, max_bytes=1000)
    assert not list(tmp_path.iterdir())  # neither the file nor a .part


async def test_only_http_urls(client: am.AsyncApimart, tmp_path: Path) -> None:
    with pytest.raises(am.DownloadError, match="refusing to download a non-http"):
        await client.download("file:///etc/passwd", tmp_path / "x.mp4")
    with pytest.raises(am.ValidationError, match="^task: must be completed"):
        await client.download(am.Task(id="t", status=am.TaskStatus.PROCESSING), tmp_path)


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../../etc/passwd", "etc_passwd"),
        ("/abs/path", "abs_path"),
        ("..", "video"),
        ("", "video"),
        ("a\x00b", "a_b"),
        ("ｆｕｌｌｗｉｄｔｈ", "fullwidth"),
        ("名前", "名前"),  # brk16h: every name in another script was "video"
        ("猫", "猫"),
        ("Ünïcode ✓ café", "Ünïcode_café"),
        ("\u202eevil\u202c.exe", "evil_.exe"),  # a direction override is no letter
        ("猫" * 100, "猫" * 66),  # 198 bytes: room for ~2.mp4.part.origin in 255
        ("C:\\win\\x", "C_win_x"),
        ("ok-name_1.2", "ok-name_1.2"),
    ],
)
def test_safe_names(name: str, safe: str, tmp_path: Path) -> None:
    assert safe_name(name) == safe
    assert len(safe.encode()) <= 200
    assert inside(tmp_path, safe_name(name) + ".mp4").parent == tmp_path.resolve()


def test_inside_refuses_escapes(tmp_path: Path) -> None:
    with pytest.raises(am.DownloadError, match="would leave"):
        inside(tmp_path, "../x.mp4")


async def test_a_chunked_body_with_empty_chunks_is_read_whole(
    client: am.AsyncApimart, tmp_path: Path
) -> None:
    """A file served with ``Transfer-Encoding: chunked`` and no length: the body is taken
    piece by piece as it arrives (issue 16), and an HTTP chunk's end is not the body's end."""
    body = [bytes([n]) * size for n, size in enumerate((1, 70_000, 3, 300_000, 5, 1 << 20))]

    async def serve(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for piece in body:
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async with file_server(serve) as base:
        (file,) = await client.download(f"{base}/v.mp4", tmp_path / "v.mp4")
    whole = b"".join(body)
    assert file.bytes == len(whole)
    assert (tmp_path / "v.mp4").read_bytes() == whole
    assert file.sha256 == hashlib.sha256(whole).hexdigest()


async def test_the_body_reader_goes_on_past_an_empty_piece_that_ends_an_http_chunk() -> None:
    """aiohttp's ``readchunk`` says ``(b"", True)`` where an HTTP chunk ends exactly where the
    reader is: not the end of the body, which is ``(b"", False)``."""
    from apimart_async._transport import _pieces

    class Reader:
        def __init__(self) -> None:
            self.script = [(b"ab", True), (b"", True), (b"c", False), (b"", True), (b"", False)]
            self.limit: int | None = None

        def set_read_chunk_size(self, n: int) -> None:
            self.limit = n

        async def readchunk(self) -> tuple[bytes, bool]:
            return self.script.pop(0)

        def read_nowait(self, n: int) -> bytes:
            return b""  # nothing more has arrived

    reader = Reader()
    got = [piece async for piece in _pieces(reader, 4096)]  # type: ignore[arg-type]
    assert got == [b"ab", b"c"]
    assert reader.script == [] and reader.limit == 4096


async def test_a_body_in_tiny_http_chunks_reaches_the_writer_in_few_pieces(
    client: am.AsyncApimart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that sends its body in HTTP chunks of a few bytes: what has arrived is
    joined before it is handed on, so a batch is not thousands of tiny objects (memory and
    a call each; a break-it pass of issue 16 measured 5x the memory)."""
    import asyncio

    from apimart_async._download import _PartFile

    body = bytes(range(256)) * 1024  # 256 KiB in 16,384 HTTP chunks of 16 bytes
    pieces: list[int] = []
    real_write = _PartFile.write_sync

    def counted(self: _PartFile, batch: list[bytes]) -> None:
        pieces.append(len(batch))
        real_write(self, batch)

    monkeypatch.setattr(_PartFile, "write_sync", counted)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        for at in range(0, len(body), 4096):  # 256 chunks to a socket write
            block = body[at : at + 4096]
            writer.write(
                b"".join(b"10\r\n" + block[i : i + 16] + b"\r\n" for i in range(0, 4096, 16))
            )
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        (file,) = await client.download(f"http://127.0.0.1:{port}/v.mp4", tmp_path / "v.mp4")
    finally:
        server.close()
        await server.wait_closed()
    assert (tmp_path / "v.mp4").read_bytes() == body
    assert file.sha256 == hashlib.sha256(body).hexdigest()
    assert sum(pieces) <= 256, f"{sum(pieces)} pieces for 16,384 chunks of 16 bytes"


async def test_a_file_server_that_compresses_what_the_client_accepts_sends_the_file_whole(
    client: am.AsyncApimart, tmp_path: Path
) -> None:
    """A file GET asks for the bytes as they are (``Accept-Encoding: identity``): a server or
    CDN that gzips what a client accepts would send a compressed body whose length is not
    the file's, and a Range resume of it is not a resume of the file (a break-it pass of
    issue 16: every attempt restarted, then a DownloadError)."""
    import gzip

    body = bytes(range(256)) * 4096  # 1 MiB that compresses well
    asked: list[str] = []

    async def serve(request: web.Request) -> web.StreamResponse:
        accepts = request.headers.get("Accept-Encoding", "")
        asked.append(accepts)
        if "gzip" in accepts:
            packed = gzip.compress(body)
            return web.Response(
                body=packed,
                headers={"Content-Type": "video/mp4", "Content-Encoding": "gzip"},
            )
        return web.Response(body=body, headers={"Content-Type": "video/mp4"})

    async with file_server(serve) as base:
        (file,) = await client.download(f"{base}/v.mp4", tmp_path / "v.mp4")
    assert asked == ["identity"]
    assert (tmp_path / "v.mp4").read_bytes() == body
    assert file.bytes == len(body) and file.sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut-then-resumed"])
async def test_a_file_server_that_compresses_though_asked_not_to_still_gives_the_file(
    client: am.AsyncApimart, tmp_path: Path, cut: bool
) -> None:
    """brk16f: a server that gzips the file although the GET asked for ``identity``: its
    length was the compressed one, so every attempt 'stayed incomplete' (4 GETs, then a
    generic DownloadError). The body, decoded, is the file: it is taken whole, sha256 and all.
    A range of a compressed reply is no range of the file: a part cut short starts again
    from zero if the server compresses the range; an uncompressed 206 resumes it."""
    import gzip

    body = bytes(range(256)) * 4096  # 1 MiB that compresses well
    packed = gzip.compress(body)
    asked: list[tuple[str, str | None]] = []

    async def serve(request: web.Request) -> web.StreamResponse:
        ranged = request.headers.get("Range")
        asked.append((request.headers.get("Accept-Encoding", ""), ranged))
        if cut and len(asked) == 1:  # the first reply stops after half the compressed bytes
            resp = web.StreamResponse(
                headers={
                    "Content-Type": "video/mp4",
                    "Content-Encoding": "gzip",
                    "Content-Length": str(len(packed)),
                }
            )
            await resp.prepare(request)
            await resp.write(packed[: len(packed) // 2])
            request.transport.close()  # type: ignore[union-attr]
            return resp
        if ranged:
            start = int(ranged.removeprefix("bytes=").removesuffix("-"))
            return web.Response(
                status=206,
                body=body[start:],
                headers={
                    "Content-Type": "video/mp4",
                    "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
                },
            )
        return web.Response(
            body=packed, headers={"Content-Type": "video/mp4", "Content-Encoding": "gzip"}
        )

    async with file_server(serve) as base:
        (file,) = await client.download(f"{base}/v.mp4", tmp_path / "v.mp4")
    assert (tmp_path / "v.mp4").read_bytes() == body
    assert file.bytes == len(body) and file.sha256 == hashlib.sha256(body).hexdigest()
    assert [a for a, _ in asked] == ["identity"] * len(asked)
    if cut:  # the decoded half was kept and resumed with an uncompressed range
        assert len(asked) == 2 and asked[1][1] is not None and asked[1][1] != "bytes=0-"
    else:
        assert asked == [("identity", None)]


@pytest.mark.parametrize("coding", ["gzip", "zstd", "x-unknown"])
async def test_a_body_compressed_past_decoding_is_one_clear_error_not_four_gets(
    client: am.AsyncApimart, tmp_path: Path, coding: str
) -> None:
    """brk16h: a body compressed in a way that cannot be decoded (a broken gzip, a coding
    this client has no decoder for) was retried 4 times, then 'download failed:
    ClientPayloadError: 400, message:\n  Can not decode ...; what arrived is kept'."""
    gets = 0

    async def serve(request: web.Request) -> web.StreamResponse:
        nonlocal gets
        gets += 1
        body = b"\x1f\x8b\x08\x00" + b"not gzip at all" * 100 if coding == "gzip" else b"x" * 999
        return web.Response(
            body=body, headers={"Content-Type": "video/mp4", "Content-Encoding": coding}
        )

    async with file_server(serve) as base:
        with pytest.raises(am.DownloadError) as info:
            await client.download(f"{base}/v.mp4", tmp_path / "v.mp4")
    message = str(info.value)
    assert gets == 1
    assert f"compressed ({coding})" in message and "cannot be decoded" in message
    assert "\n" not in message and "400" not in message
    assert not (tmp_path / "v.mp4").exists()


async def test_a_second_download_to_a_path_being_written_is_refused_and_spoils_nothing(
    client: am.AsyncApimart, tmp_path: Path
) -> None:
    """Two downloads to one destination at once (two clients, two processes, a mistake):
    the second finds the ``.part`` locked and raises a DownloadError; the first goes on and
    its file is whole, with the sha256 of its bytes. Before, the second truncated the part
    and wrote its own file into it, and the first then wrote into the renamed file: a mix
    of the two under the final name, reported with the sha256 of one (a break-it pass of
    issue 16)."""
    import anyio

    first, second = bytes(range(256)) * 4096, b"\x07" * (1 << 20)
    asked, go_on = anyio.Event(), anyio.Event()

    async def serve(request: web.Request) -> web.StreamResponse:
        body = first if request.path == "/a.mp4" else second
        resp = web.StreamResponse(
            headers={"Content-Type": "video/mp4", "Content-Length": str(len(body))}
        )
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        if body is first:
            asked.set()  # its part is open: it is opened before the GET is sent
            await go_on.wait()
        await resp.write(body[len(body) // 2 :])
        await resp.write_eof()
        return resp

    dest, part = tmp_path / "v.mp4", tmp_path / "v.mp4.part"
    got: list[am.DownloadedFile] = []
    async with file_server(serve, "/{name}") as base, anyio.create_task_group() as tg:

        async def download_first() -> None:
            got.extend(await client.download(f"{base}/a.mp4", dest))

        tg.start_soon(download_first)
        try:
            with anyio.fail_after(10):
                await asked.wait()
            with pytest.raises(am.DownloadError, match="another download") as caught:
                await client.download(f"{base}/b.mp4", dest)
        finally:
            go_on.set()
        assert str(part) in str(caught.value)
    (file,) = got
    assert dest.read_bytes() == first
    assert file.sha256 == hashlib.sha256(first).hexdigest()
    assert not part.exists()


async def test_a_destination_that_is_not_a_regular_file_is_never_replaced(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    """``download(task, "/dev/null")`` run as root replaced the device with the video (the
    rename into place; a break-it pass of issue 16). A destination that exists and is not a
    regular file (a device, a FIFO, a socket) is refused before anything is fetched."""
    import os
    import stat

    task = await completed_task(emu, client)
    fifo = tmp_path / "out.mp4"
    os.mkfifo(fifo)
    gets = emu.counters.get("file", 0)
    with pytest.raises(am.DownloadError, match="not a regular file") as caught:
        await client.download(task, fifo)
    assert str(fifo) in str(caught.value)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still the FIFO
    assert not (tmp_path / "out.mp4.part").exists()
    assert emu.counters.get("file", 0) == gets  # nothing fetched


async def test_a_second_video_never_takes_another_jobs_file(tmp_path: Path) -> None:
    """brk16g: the second video of job ``x`` was ``x-1.mp4``, the very file of a job named
    ``x-1``: one paid video overwrote the other and the manifest listed the survivor twice.
    Further videos are ``x~2.mp4``, ``x~3.mp4``: ``~`` is never in a job's own file name."""
    jobs = [("x", SORA), ("x-1", SORA), ("x-2", SORA)]
    async with (
        Emulator(mode="manual") as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
        client.batch(jobs, download_dir=tmp_path, journal=tmp_path / "j.sqlite") as results,
    ):
        await emu.wait_until(lambda: emu.tasks_created == 3)
        ids = list(emu.task_ids())
        for task_id in ids:
            emu.complete(task_id, videos=3 if task_id == ids[0] else 1)
        outcomes = sorted([o async for o in results], key=lambda o: o.index)
    assert all(o.ok for o in outcomes)
    by_job = {o.name: [Path(f.path).name for f in o.files] for o in outcomes}
    paths = [f.path for o in outcomes for f in o.files]
    assert len(set(paths)) == len(paths) == 5
    first = next(o.name for o in outcomes if o.task_id == ids[0])
    assert by_job[first] == [f"{first}.mp4", f"{first}~2.mp4", f"{first}~3.mp4"]
    sums = [f.sha256 for o in outcomes for f in o.files]
    assert len(set(sums)) == 5  # five different videos, each in its own file
    assert all(
        hashlib.sha256(Path(f.path).read_bytes()).hexdigest() == f.sha256
        for o in outcomes
        for f in o.files
    )

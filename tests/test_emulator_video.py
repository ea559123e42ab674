"""The emulator's result files are real MP4 videos (VP9), padded to ``video_bytes`` with a
``free`` box so that sizes, sha256 checks and Range requests work as before."""

from __future__ import annotations

import hashlib
import struct

import aiohttp
import pytest

from apimart_async.emulator import Emulator
from apimart_async.emulator._state import SAMPLE_VIDEO, file_bytes

pytestmark = pytest.mark.anyio


def boxes(data: bytes) -> list[tuple[str, int]]:
    """The top-level MP4 boxes (type, size); fails unless they tile the data exactly."""
    out = []
    pos = 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            (size,) = struct.unpack(">Q", data[pos + 8 : pos + 16])
        assert size >= 8, (pos, size)
        out.append((kind.decode("latin-1"), size))
        pos += size
    assert pos == len(data)
    return out


def test_the_sample_is_a_small_vp9_mp4() -> None:
    assert 1000 < len(SAMPLE_VIDEO) < 16 * 1024
    kinds = [k for k, _ in boxes(SAMPLE_VIDEO)]
    assert kinds[0] == "ftyp" and "moov" in kinds and "mdat" in kinds
    assert kinds.index("moov") < kinds.index("mdat")  # metadata first: plays while loading
    assert b"vp09" in SAMPLE_VIDEO  # the codec Debian's Chromium plays (no H.264 needed)


async def test_served_file_is_the_sample_plus_a_free_box() -> None:
    async with Emulator(task_duration=0.0) as emu, aiohttp.ClientSession() as http:
        ids = emu.create_tasks(2)
        emu.complete_all()
        url = emu.task(ids[0])["result"]["videos"][0]["url"][0]
        async with http.get(url) as r:
            data = await r.read()
        async with http.get(url, headers={"Range": f"bytes={len(SAMPLE_VIDEO) - 3}-"}) as r:
            assert r.status == 206
            tail = await r.read()
    assert len(data) == 64 * 1024
    assert data.startswith(SAMPLE_VIDEO)
    assert tail == data[len(SAMPLE_VIDEO) - 3 :]
    assert boxes(data)[-1] == ("free", 64 * 1024 - len(SAMPLE_VIDEO))
    assert hashlib.sha256(data).hexdigest() == emu.file_sha256(ids[0])
    assert emu.file_sha256(ids[0]) != emu.file_sha256(ids[1])


def test_huge_files_use_a_64_bit_box_size() -> None:
    size = 5 << 30  # 5 GiB: the free box is bigger than a 32-bit size can say
    n = len(SAMPLE_VIDEO)
    head = file_bytes(b"\x00" * 4096, "t/0", 0, n + 16, size)
    assert head[:n] == SAMPLE_VIDEO
    assert struct.unpack(">I4sQ", head[n : n + 16]) == (1, b"free", size - n)


def test_files_smaller_than_the_sample_are_filler_with_an_mp4_head() -> None:
    data = file_bytes(b"\x01" * 4096, "t/0", 0, 1024, 1024)
    assert len(data) == 1024 and data[4:8] == b"ftyp"

"""Shared pieces of the benchmarks: an emulator in its own process, results files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent


@contextlib.asynccontextmanager
async def emulator_process(*args: str) -> AsyncIterator[dict[str, Any]]:
    """Start ``python -m apimart_async.emulator`` on a free port in a separate process (so the
    client's CPU and memory figures are the client's own); yields its base_url, api_key and
    pid."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "apimart_async.emulator",
        "--port",
        "0",
        "--balance",
        "-1",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        yield {**json.loads(line), "pid": proc.pid}
    finally:
        proc.terminate()
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(proc.wait(), 10)


async def admin(base_url: str, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(base_url + path) as r:
        return await r.json()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]

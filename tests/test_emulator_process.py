"""``python -m apimart_async.emulator`` runs standalone and serves a real client."""

from __future__ import annotations

import json
import os
import sys

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import apimart_async as am

pytestmark = pytest.mark.anyio

CMD = [
    sys.executable,
    "-m",
    "apimart_async.emulator",
    "--port",
    "0",
    "--duration",
    "0",
    "--api-key",
    "sk-test",
]


async def test_standalone_emulator() -> None:
    async with await anyio.open_process(CMD) as proc:
        assert proc.stdout is not None
        try:
            with anyio.fail_after(30):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 4096)
            info = json.loads(line)
            assert info["api_key"] == "sk-test"
            assert info["base_url"].startswith("http://127.0.0.1:")
            async with am.AsyncApimart(
                info["api_key"], base_url=info["base_url"], poll=am.PollPolicy(first_check=0.01)
            ) as client:
                task = await client.videos.generate(am.VideoRequest("sora-2-preview", "x"))
            assert task.ok
        finally:
            proc.terminate()
            await proc.wait()


async def test_standalone_emulator_over_https_on_the_real_network_profile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    async with await anyio.open_process([*CMD, "--network", "real", "--tls"]) as proc:
        assert proc.stdout is not None
        try:
            with anyio.fail_after(30):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 4096)
            info = json.loads(line)
            assert info["base_url"].startswith("https://127.0.0.1:")
            monkeypatch.setenv("SSL_CERT_FILE", info["ca_file"])
            async with am.AsyncApimart(
                info["api_key"], base_url=info["base_url"], poll=am.PollPolicy(first_check=0.01)
            ) as client:
                task = await client.videos.generate(am.VideoRequest("sora-2-preview", "x"))
            assert task.ok
        finally:
            proc.terminate()
            await proc.wait()
    assert proc.returncode == 0
    assert not os.path.exists(info["ca_file"])  # removed when the emulator stopped

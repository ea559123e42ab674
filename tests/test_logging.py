"""Warnings somebody sees (issue 21): every WARNING the SDK logs (the switch to per-task status
reads, status reads that keep failing, waits given up on an unreachable API, a callback that
failed) reaches stderr under a
bare ``python script.py`` (Python's last-resort handler: WARNING and up, when nothing is
configured) and under uvicorn's default logging config (which configures only its own
``uvicorn*`` loggers). Each case runs a real script in a subprocess and reads its stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import asyncio
import sys

import apimart_async as am
from apimart_async.emulator import Emulator, Fault

if sys.argv[1] == "uvicorn":
    import logging.config

    import uvicorn.config

    logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)
elif sys.argv[1] == "silenced":  # what an application does to silence the SDK
    import logging

    logging.getLogger("apimart_async").setLevel(logging.CRITICAL)

FAST = am.PollPolicy(first_check=0.001, min_interval=0.001, max_interval=0.005, jitter=0.0)


def on_event(event: am.BatchEvent) -> None:
    raise RuntimeError("a bug in the application's callback")


async def main() -> None:
    am.set_testing(True)
    async with Emulator(batch_route=False, task_duration=0.0) as emu:
        async with am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, poll=FAST, max_retries=0, wait_unreachable=0.05
        ) as client:
            jobs = [am.VideoRequest("sora-2-preview", "a cat")]
            async with client.batch(jobs, on_event=on_event) as results:
                outcomes = [o async for o in results]
            print("batch", [o.ok for o in outcomes], flush=True)
            emu.faults.set_rate(1.0, endpoints=["task", "batch"], faults=[Fault.drop()])
            try:
                await client.videos.generate(am.VideoRequest("sora-2-preview", "a dog"))
            except am.APIConnectionError:
                print("generate ended", flush=True)
        print("key", emu.api_key, flush=True)


asyncio.run(main())
"""

#: One line (or its start) per kind of WARNING the script provokes.
EXPECTED = [
    "batch status route unusable",  # the switch to per-task reads
    "on_event callback failed",  # a callback that raised (with its traceback)
    "RuntimeError: a bug in the application's callback",
    "status reads have failed for",  # a poll that keeps failing (before giving up)
    "the API has been unreachable",  # waits given up (wait_unreachable)
]


def _run(tmp_path: Path, mode: str) -> tuple[str, str]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), mode],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "batch [True]" in proc.stdout
    assert "generate ended" in proc.stdout
    key = proc.stdout.split("key ", 1)[1].strip()
    assert key and key not in proc.stderr  # never the key
    return proc.stdout, proc.stderr


@pytest.mark.parametrize("mode", ["bare", "uvicorn"])
def test_sdk_warnings_reach_stderr(tmp_path: Path, mode: str) -> None:
    _, stderr = _run(tmp_path, mode)
    for text in EXPECTED:
        assert text in stderr, f"{text!r} not shown under {mode} logging; stderr:\n{stderr}"
    # only WARNING and up: the INFO lines of a round not read stay quiet
    assert "reading them again later" not in stderr


def test_an_application_can_still_silence_it(tmp_path: Path) -> None:
    _, stderr = _run(tmp_path, "silenced")
    for text in EXPECTED:
        assert text not in stderr

"""A batch counts its own requests, and a failing ``on_event`` is seen (issue 14)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import anyio
import pytest

import apimart_async as am
from apimart_async.emulator import Emulator

pytestmark = pytest.mark.anyio


def sora(i: int) -> am.VideoRequest:
    return am.VideoRequest("sora-2-preview", f"a cat, take {i}", duration=4)


async def test_stats_requests_count_the_batchs_own_requests_only(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    async with manual_client.batch([sora(0), sora(1)]) as results:
        await manual_emu.wait_until(lambda: len(manual_client._poller) == 2)
        # the same client does other work meanwhile: not the batch's requests
        await manual_client.balance()
        other = await manual_client.videos.submit(sora(9))
        await manual_client.tasks.get(other)
        batch_tasks = [t for t in manual_emu.task_ids() if t != other]
        for task_id in batch_tasks:
            manual_emu.complete(task_id)
        outcomes = [o async for o in results]
    assert sorted(o.index for o in outcomes) == [0, 1] and all(o.ok for o in outcomes)
    requests = results.stats().requests
    client_total = manual_client._api.request_counts()
    assert requests["submit"] == 2  # the client's total is 3
    assert client_total["submit"] == 3
    assert "balance" not in requests and "task" not in requests  # the other work's kinds
    assert client_total["balance"] == 1 and client_total["task"] >= 1
    assert requests.get("batch", 0) >= 1  # status reads of its tasks are its own
    assert f"submit={requests['submit']}" in repr(results)


async def test_two_batches_count_their_own_submits(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    async with (
        manual_client.batch([sora(i) for i in range(3)]) as a,
        manual_client.batch([sora(i) for i in range(3, 8)]) as b,
    ):
        await manual_emu.wait_until(lambda: len(manual_client._poller) == 8)
        manual_emu.complete_all()
        done = [o async for o in a] + [o async for o in b]
    assert len(done) == 8
    assert (a.stats().requests["submit"], b.stats().requests["submit"]) == (3, 5)


async def test_an_on_event_exception_is_a_warning_and_the_batch_goes_on(
    manual_emu: Emulator, manual_client: am.AsyncApimart, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def on_event(event: am.BatchEvent) -> None:
        seen.append(event.kind)
        raise RuntimeError(f"the display broke on {event.kind}")

    caplog.set_level(logging.WARNING, logger="apimart_async")
    async with manual_client.batch([sora(i) for i in range(3)], on_event=on_event) as results:
        await manual_emu.wait_until(lambda: len(manual_client._poller) == 3)
        manual_emu.complete_all()
        with anyio.fail_after(20):
            outcomes = [o async for o in results]
    assert sorted(o.index for o in outcomes) == [0, 1, 2] and all(o.ok for o in outcomes)
    assert seen.count("completed") == 3
    records = [r for r in caplog.records if r.name == "apimart_async" and "on_event" in r.msg]
    assert len(records) == len(seen)  # one warning per failed call
    assert {r.levelno for r in records} == {logging.WARNING}
    assert records[0].exc_info is not None and records[0].exc_info[0] is RuntimeError
    assert "the display broke" in caplog.text


def test_a_warning_is_seen_without_any_logging_setup() -> None:
    """No handler configured by the program: Python's last resort prints warnings to stderr
    (the library adds no NullHandler that would swallow them)."""
    script = textwrap.dedent(
        """
        import anyio
        import apimart_async as am
        from apimart_async.testing import emulated_api

        def on_event(event):
            raise RuntimeError("boom in on_event")

        async def main():
            async with emulated_api() as api:
                req = am.VideoRequest("sora-2-preview", "a cat", duration=4)
                async with api.client.batch([req], on_event=on_event) as results:
                    assert all([o.ok async for o in results])

        anyio.run(main)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "on_event callback failed" in done.stderr
    assert "RuntimeError: boom in on_event" in done.stderr

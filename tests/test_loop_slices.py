"""A batch's own work lets the event loop run (issue 21): replaying many finished jobs sends
no request, and held the loop for the whole replay (every other request of a web replica
stalled meanwhile: 0.5 s for 20,000 jobs). The input reader now yields every ``LOOP_SLICE``
seconds of work; the clock it reads is faked here, so nothing depends on this machine's speed."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import apimart_async as am
from apimart_async import _api, _client, _jobs, _ledger, _outcomes, _poller
from apimart_async.emulator import Emulator

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio


class SlowClock:
    """``time`` for ``_jobs``: each reading is 2 ms after the last (as if each item took 2 ms)."""

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def perf_counter(self) -> float:
        return next(self._ticks) * 0.002


async def test_a_long_replay_lets_the_event_loop_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "run.sqlite"
    jobs = [am.VideoRequest("sora-2-preview", f"take {i}") for i in range(300)]
    async with Emulator(task_duration=0.0) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as c:
            async with c.batch(jobs, journal=journal, concurrency=32) as results:
                assert len([o async for o in results]) == 300
            monkeypatch.setattr(_jobs, "time", SlowClock(), raising=False)
            runs: list[int] = []  # outcomes replayed between two turns of another task
            async with c.batch(jobs, journal=journal) as results:
                async with anyio.create_task_group() as tg:

                    async def other_request() -> None:
                        seen = 0
                        while True:
                            await anyio.lowlevel.checkpoint()
                            now = results.stats().replayed
                            runs.append(now - seen)
                            seen = now

                    tg.start_soon(other_request)
                    replayed = [o async for o in results]
                    tg.cancel_scope.cancel()
    assert len(replayed) == 300 and all(o.replayed for o in replayed)
    assert emu.tasks_created == 300
    assert sum(runs) == 300 and max(runs) <= 5  # without the slices: all 300 in one stretch


async def test_resuming_a_batch_to_disk_checks_its_files_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """brk21c: resuming a batch with ``download_dir`` checked every done job's files on disk
    and built its manifest line in one stretch of the event loop (20,000 jobs: ~0.25 s of
    stat calls and lines, more on a slow disk). Done on a worker thread now."""
    journal, out = tmp_path / "run.sqlite", tmp_path / "out"
    jobs = [am.VideoRequest("sora-2-preview", f"take {i}") for i in range(5)]
    async with Emulator(task_duration=0.0, video_bytes=64) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as c:
            async with c.batch(jobs, journal=journal, download_dir=out) as results:
                assert all([o.ok async for o in results])
            loop_thread = threading.current_thread()
            seen: list[tuple[str, bool]] = []

            def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
                def call(*args: Any) -> Any:
                    seen.append((name, threading.current_thread() is loop_thread))
                    return real(*args)

                return call

            monkeypatch.setattr(_ledger, "record_line", spy("line", _ledger.record_line))
            monkeypatch.setattr(_ledger, "files_complete", spy("files", _ledger.files_complete))
            async with c.batch(jobs, journal=journal, download_dir=out) as results:
                replayed = [o async for o in results]
    assert len(replayed) == 5 and all(o.replayed for o in replayed)
    assert sorted(seen) == [("files", False)] * 5 + [("line", False)] * 5
    assert emu.tasks_created == 5


async def test_a_poll_round_that_ends_hundreds_of_waits_lets_the_event_loop_run(
    manual_emu: Emulator, manual_client: am.AsyncApimart, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of tasks ending in one round (a web replica's awaiting requests): the poller
    hands the ends out in slices of ``LOOP_SLICE`` seconds, not all in one stretch."""
    n = 300
    poller = manual_client._poller
    with anyio.fail_after(30):
        ids = [
            await manual_client.videos.submit(am.VideoRequest("sora-2-preview", f"take {i}"))
            for i in range(n)
        ]
        ended: list[str] = []
        all_ended = anyio.Event()
        drops: list[int] = []  # waits ended between two turns of another task

        async def wait(task_id: str) -> None:
            ended.append((await manual_client.tasks.wait(task_id)).id)
            if len(ended) == n:
                all_ended.set()

        async with anyio.create_task_group() as tg:
            for task_id in ids:
                tg.start_soon(wait, task_id)
            await manual_emu.wait_until(lambda: len(poller) == n)  # re-checked at each read
            monkeypatch.setattr(_poller, "time", SlowClock(), raising=False)

            async def other_request() -> None:
                watched = len(poller)
                while True:
                    await anyio.lowlevel.checkpoint()
                    drops.append(watched - len(poller))
                    watched = len(poller)

            tg.start_soon(other_request)
            manual_emu.complete_all()
            await all_ended.wait()
            tg.cancel_scope.cancel()
    assert sorted(ended) == sorted(ids) and len(poller) == 0
    assert sum(drops) == n and max(drops) <= 5  # without the slices: all 300 in one stretch


async def test_opening_clients_reads_the_certificates_once_per_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``SSL_CERT_FILE`` set, each client opened built a fresh TLS context: 40-60 ms of
    the event loop reading the certificates, for every client a web app opened. One context
    is built for each value of the variable, and shared."""
    import ssl

    from apimart_async import _transport

    built: list[ssl.SSLContext] = []
    real = ssl.create_default_context

    def create_default_context(*args: object, **kwargs: object) -> ssl.SSLContext:
        built.append(real())
        return built[-1]

    monkeypatch.setattr(_transport, "_SSL_CONTEXTS", {})
    monkeypatch.setattr(ssl, "create_default_context", create_default_context)
    monkeypatch.setenv("SSL_CERT_FILE", ssl.get_default_verify_paths().openssl_cafile)
    for _ in range(3):
        async with am.AsyncApimart("sk-test", base_url="https://127.0.0.1:9") as client:
            assert client._transport.session().connector._ssl is built[0]  # type: ignore[attr-defined]
    monkeypatch.setenv("SSL_CERT_FILE", str(Path(__file__)))  # another value: read again
    monkeypatch.setenv("SSL_CERT_DIR", "/nonexistent")
    monkeypatch.delenv("SSL_CERT_FILE")
    async with am.AsyncApimart("sk-test", base_url="https://127.0.0.1:9"):
        pass
    assert len(built) == 2


async def test_a_replay_waits_for_its_reader_instead_of_queueing_every_outcome(
    tmp_path: Path,
) -> None:
    """A replay sends no request, so it ran ahead of a slower reader and queued all its
    outcomes: 20,000 of them (60,000 objects) for the garbage collector to walk at every full
    collection, each a stall of the event loop (50 ms at half a 20,000-job replay). It now
    waits while ``MAX_UNREAD_REPLAYS`` outcomes are unread."""
    n = 3 * _outcomes.MAX_UNREAD_REPLAYS
    journal = tmp_path / "run.sqlite"
    jobs = [am.VideoRequest("sora-2-preview", f"take {i}") for i in range(n)]
    async with Emulator(task_duration=0.0, balance=None) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as c:
            async with c.batch(jobs, journal=journal, concurrency=32) as results:
                assert len([o async for o in results]) == n
            unread: list[int] = []
            async with c.batch(iter(jobs), journal=journal) as results:
                replayed = []
                for _ in range(2):  # the reader away, twice: the feeder stops at the limit
                    await anyio.wait_all_tasks_blocked()
                    unread.append(len(results.unread()))
                    replayed += [await results.__anext__() for _ in range(unread[-1])]
                replayed += [o async for o in results]
    assert unread[0] == _outcomes.MAX_UNREAD_REPLAYS and unread[1] > 0
    assert sorted(o.index for o in replayed) == list(range(n))
    assert [o for o in replayed if not o.replayed] == []
    assert emu.tasks_created == n


async def test_watching_thousands_of_tasks_lets_the_event_loop_run(
    manual_emu: Emulator, manual_client: am.AsyncApimart, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica taking up its tasks after a restart (``tasks.watch`` of 20,000 ids) checked
    and registered every id in one stretch: 170-250 ms of the loop's CPU (brk21b 9). They go
    in slices now; a bad id among them leaves nothing watched."""
    ids = manual_emu.create_tasks(300)  # running: each stays watched until the block ends
    monkeypatch.setattr(_client, "time", SlowClock(), raising=False)
    runs: list[int] = []  # ids registered between two turns of another task
    poller = manual_client._poller
    async with anyio.create_task_group() as tg:

        async def other_request() -> None:
            seen = 0
            while True:
                await anyio.lowlevel.checkpoint()
                runs.append(len(poller) - seen)
                seen = len(poller)

        tg.start_soon(other_request)
        async with manual_client.tasks.watch(ids) as stream:
            assert stream.remaining == ids and len(poller) == 300
            tg.cancel_scope.cancel()
    assert sum(runs) == 300 and max(runs) <= 5  # without the slices: all 300 in one stretch
    assert len(poller) == 0
    with pytest.raises(am.ValidationError, match=r"task_ids\[\]"):
        async with manual_client.tasks.watch([*ids, "a/b"]):
            pass
    assert len(poller) == 0


async def test_get_many_of_thousands_of_ids_lets_the_event_loop_run(
    manual_emu: Emulator, manual_client: am.AsyncApimart, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tasks.get_many`` with an untrusted list of 50,000 ids (a web route reading many
    tasks) checked every id in one stretch before its first request: ~50 ms of the loop
    here, 200 ms under a profiler. The ids are checked in slices now."""
    ids = manual_emu.create_tasks(300)
    checked = 0
    check = _api.check_task_id

    def counting(task_id: Any, field: str = "task_id") -> str:
        nonlocal checked
        checked += 1
        return check(task_id, field)

    monkeypatch.setattr(_api, "check_task_id", counting)
    monkeypatch.setattr(_api, "time", SlowClock(), raising=False)
    runs: list[int] = []  # ids checked between two turns of another task
    async with anyio.create_task_group() as tg:

        async def other_request() -> None:
            seen = 0
            while True:
                await anyio.lowlevel.checkpoint()
                runs.append(checked - seen)
                seen = checked

        tg.start_soon(other_request)
        tasks = await manual_client.tasks.get_many(ids)
        tg.cancel_scope.cancel()
    assert [t.id for t in tasks] == ids
    assert sum(runs) == 300 and max(runs) <= 10  # without the slices: all 300 in one stretch

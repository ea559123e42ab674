"""Closing is safe (issue 21): a cancelled ``aclose()`` still closes the HTTP session, and
closing with waits in flight ends each of them with ``ClientClosedError``. The emulator runs
in manual mode, so nothing ends unless the test says; no sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import apimart_async as am
from apimart_async.emulator import Emulator, Fault
from tests.conftest import FAST_POLL

pytestmark = pytest.mark.anyio


def _client(emu: Emulator) -> am.AsyncApimart:
    return am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL)


@pytest.mark.parametrize("at_checkpoint", [1, 2, 3, 4])
async def test_a_cancelled_aclose_still_closes_the_session(
    manual_emu: Emulator, at_checkpoint: int
) -> None:
    client = await _client(manual_emu).open()
    task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "x"))
    session = client._transport.session()
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await client.tasks.wait(task_id)
        except am.ApimartError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await manual_emu.wait_until(lambda: len(client._poller) == 1)
        closing = asyncio.get_running_loop().create_task(client.aclose())
        for _ in range(at_checkpoint):  # cancelled at its first, second... suspension point
            await anyio.lowlevel.checkpoint()
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
    assert session.closed
    assert not client._transport.is_open
    assert len(errors) == 1 and isinstance(errors[0], am.ClientClosedError)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        del session
        gc.collect()
    assert [w for w in record if "Unclosed" in str(w.message)] == []
    await client.aclose()  # closing again is harmless


async def test_aclose_ends_every_wait_in_flight_with_client_closed_error(
    manual_emu: Emulator,
) -> None:
    client = await _client(manual_emu).open()
    submitted = await client.videos.submit(am.VideoRequest("sora-2-preview", "waited"))
    ended: dict[str, BaseException | object] = {}

    async def run(name: str, coro: object) -> None:
        try:
            ended[name] = await coro  # type: ignore[misc]
        except BaseException as exc:
            ended[name] = exc
            if not isinstance(exc, Exception):
                raise

    batch_errors: list[am.ApimartError | None] = []

    async def iterate_batch() -> None:
        # one outcome per job, each a Failure
        jobs = [am.VideoRequest("sora-2-preview", f"b{i}") for i in range(3)]
        async with client.batch(jobs, max_pending=2) as results:
            async for outcome in results:
                batch_errors.append(outcome.error)
        raise batch_errors[0] or AssertionError("a job succeeded")

    async def watch() -> int:
        seen = 0
        async with client.tasks.watch([submitted]) as stream:
            async for _ in stream:
                seen += 1
        return seen

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "wait", client.tasks.wait(submitted))
        tg.start_soon(
            run, "generate", client.videos.generate(am.VideoRequest("sora-2-preview", "g"))
        )
        tg.start_soon(run, "batch", iterate_batch())
        tg.start_soon(run, "watch", watch())
        # everyone is waiting: 1 + 1 + 2 (max_pending) tasks created, all followed
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 4)
        await manual_emu.wait_until(lambda: len(client._poller) == 4)
        await client.aclose()
    assert set(ended) == {"wait", "generate", "batch", "watch"}
    for name, result in ended.items():
        assert isinstance(result, am.ClientClosedError), (name, result)
    # the two submitted jobs end with ClientClosedError, the one never submitted with
    # BatchStoppedError (the batch's word for "not submitted"), saying why
    assert len(batch_errors) == 3
    closed = [e for e in batch_errors if isinstance(e, am.ClientClosedError)]
    stopped = [e for e in batch_errors if isinstance(e, am.BatchStoppedError)]
    assert len(closed) == 2 and len(stopped) == 1, batch_errors
    assert "the client was closed" in str(stopped[0])
    assert manual_emu.tasks_created == 4  # nothing more submitted after the close


async def test_waiters_of_one_task_each_get_an_error_of_their_own(manual_emu: Emulator) -> None:
    """Three requests of a web backend wait for one task; the client closes. The poller ends
    the task's watch with one error: raised as that same object in the three waiting tasks,
    each raise chained the frames of every waiter onto the one traceback (a request's log
    showed the others' stacks, and its notes were theirs)."""
    import traceback

    client = await _client(manual_emu).open()
    task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "shared"))
    errors: list[BaseException] = []

    async def wait(name: str) -> None:
        try:
            await client.tasks.wait(task_id)
        except am.ClientClosedError as exc:
            exc.add_note(f"waiter {name}")
            errors.append(exc)
            await anyio.lowlevel.checkpoint()  # the others raise and note theirs meanwhile

    async with anyio.create_task_group() as tg:
        for name in "abc":
            tg.start_soon(wait, name)
        await manual_emu.wait_until(lambda: len(client._poller) == 1)
        await anyio.lowlevel.checkpoint()
        await client.aclose()
    assert len(errors) == 3 and len({id(e) for e in errors}) == 3
    for exc in errors:
        assert str(exc) == f"the client was closed while waiting for task {task_id}"
        assert len(getattr(exc, "__notes__", [])) == 1
        frames = [f.name for f in traceback.extract_tb(exc.__traceback__)]
        assert frames.count("_wait") == 1, frames  # its own call, once


async def test_aclose_during_the_submit_of_generate_ends_it_with_client_closed_error(
    manual_emu: Emulator,
) -> None:
    client = await _client(manual_emu).open()
    # the reply comes 5 s late: long after the close (the emulator's shutdown waits for it)
    manual_emu.faults.inject("submit", Fault.slow(5.0))
    ended: list[BaseException] = []

    async def generate() -> None:
        try:
            await client.videos.generate(am.VideoRequest("sora-2-preview", "g"))
        except am.ApimartError as exc:
            ended.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(generate)
        await manual_emu.wait_until(lambda: manual_emu.state.in_flight["submit"] == 1)
        await client.aclose()
    assert len(ended) == 1 and isinstance(ended[0], am.ClientClosedError), ended


async def test_a_client_opened_in_another_event_loop_fails_typed_and_closes(
    manual_emu: Emulator, tmp_path: Path
) -> None:
    """A client opened by an earlier ``asyncio.run()`` (a script's setup, a session-scoped
    test fixture's loop) and used in this loop: aiohttp raised a bare ``RuntimeError: Event
    loop is closed`` from every request, and ``aclose()`` a bare ``CancelledError``. Each
    call now says what happened (``ClientClosedError``) and ``aclose()`` closes it."""
    client = am.AsyncApimart(
        manual_emu.api_key,
        base_url=manual_emu.base_url,
        poll=FAST_POLL,
        journal=tmp_path / "client.sqlite",
    )

    async def open_elsewhere() -> None:  # in a loop of its own, which then ends
        await client.open()
        for _ in range(5):  # its background tasks get going there
            await asyncio.sleep(0)

    await anyio.to_thread.run_sync(asyncio.run, open_elsewhere())
    request = am.VideoRequest("sora-2-preview", "a cat")
    calls = [
        client.balance,
        lambda: client.videos.submit(request),
        lambda: client.videos.generate(request),
        lambda: client.tasks.get("task_x"),
        lambda: client.tasks.wait("task_x"),
        client.tasks.unfinished,
    ]
    with anyio.fail_after(10):
        for call in calls:
            with pytest.raises(am.ClientClosedError, match="another event loop"):
                await call()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)  # no "Unclosed client session"
            await client.aclose()
            gc.collect()
    with pytest.raises(am.ClientClosedError, match="closed"):
        await client.balance()
    assert manual_emu.tasks_created == 0


async def test_aclose_ends_a_download_in_flight_with_client_closed_error(tmp_path: Path) -> None:
    """A web app shutting down while a handler downloads a result: the download went on
    waiting for the next bytes of a connection the closed session no longer read, until the
    read timeout (30 s by default, past any shutdown grace), or raised aiohttp's bare
    ``RuntimeError('Connection closed.')``. It now ends at once with ``ClientClosedError``."""
    async with Emulator(mode="manual", video_bytes=2 * 1024 * 1024, file_chunk_delay=60) as emu:
        client = _client(emu)
        await client.open()
        task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
        emu.complete(task_id)
        task = await client.tasks.get(task_id)
        download = asyncio.ensure_future(client.download(task, tmp_path))
        await emu.wait_until(lambda: emu.counters.get("file", 0) == 1)  # the first part sent
        with anyio.fail_after(5):
            await client.aclose()
            with pytest.raises(am.ClientClosedError, match="download"):
                await download


async def test_watches_of_one_task_each_get_an_error_of_their_own(manual_emu: Emulator) -> None:
    """As for waits: two requests streaming one task's end (``tasks.watch``, an SSE route,
    say) and a wait, then the client closes. The two watches raised the one error object the
    poller ended the task with (each raise chained its frames onto the other's traceback)."""
    client = await _client(manual_emu).open()
    task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "shared"))
    errors: list[BaseException] = []

    async def watch(name: str) -> None:
        async with client.tasks.watch([task_id]) as stream:
            try:
                async for _ in stream:
                    pass
            except am.ClientClosedError as exc:
                exc.add_note(f"watch {name}")
                errors.append(exc)
                await anyio.lowlevel.checkpoint()

    async def wait() -> None:
        with contextlib.suppress(am.ClientClosedError):
            await client.tasks.wait(task_id)

    async with anyio.create_task_group() as tg:
        for name in "ab":
            tg.start_soon(watch, name)
        tg.start_soon(wait)
        await manual_emu.wait_until(lambda: len(client._poller) == 1)
        await anyio.lowlevel.checkpoint()
        await client.aclose()
    assert len(errors) == 2 and errors[0] is not errors[1]
    for exc in errors:
        assert isinstance(exc, am.ClientClosedError)
        assert len(getattr(exc, "__notes__", [])) == 1

"""The request watchdog (``_watchdog``): the read and total limits of API requests on one
event-loop timer (issue 16). Its logic is driven by hand (``_look(now)``); on the wire, a raw
server sends what aiohttp's timers used to judge (a stalled body, a trickled one)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest

import apimart_async as am
from apimart_async._watchdog import CHECKS, CountingHandler, Watch, Watchdog
from apimart_async.emulator import Emulator, Fault

pytestmark = pytest.mark.anyio

BALANCE = b'{"success": true, "remain_balance": 5.0, "used_balance": 1.0, "unlimited_quota": false}'


class _Protocol:
    """What the watchdog reads of a connection: the pieces it received."""

    received = 0


def _attach(watch: Watch, at: float) -> _Protocol:
    """``watch`` got its connection at ``at`` (as ``CountingHandler.set_response_params``)."""
    protocol = _Protocol()
    watch.protocol = protocol  # type: ignore[assignment]
    watch.seen = 0
    watch.mark = at
    return protocol


async def _watched(
    watchdog: Watchdog, read: float | None, total: float | None
) -> tuple[asyncio.Task[str], Watch]:
    """A task that makes an attempt watched by ``watchdog`` (it waits until cancelled) and
    reports how it ended; its watch."""
    started: asyncio.Future[Watch] = asyncio.get_running_loop().create_future()

    async def attempt() -> str:
        watch = watchdog.start(read, total)
        assert watch is not None
        started.set_result(watch)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if watchdog.timed_out(watch):
                return f"timed out ({watch.describe()})"
            raise
        finally:
            watchdog.end(watch)
        return "ended"

    task = asyncio.create_task(attempt())
    return task, await started


async def _outcome(task: asyncio.Task[str]) -> str:
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


# -- the limits, by hand -----------------------------------------------------------------------


async def test_total_ends_an_attempt_exactly_at_its_limit() -> None:
    watchdog = Watchdog(asyncio.get_running_loop())
    task, watch = await _watched(watchdog, read=None, total=5.0)
    assert watch.due == watch.started + 5.0
    watchdog._look(watch.started + 4.99)
    assert watch.expired is None and not task.done()
    watchdog._look(watch.started + 5.0)
    assert watch.expired == "total"
    assert await _outcome(task) == "timed out (total limit of 5 s)"
    assert task.cancelling() == 0
    assert len(watchdog) == 0
    watchdog.close()


async def test_the_read_clock_starts_when_the_attempt_has_its_connection() -> None:
    watchdog = Watchdog(asyncio.get_running_loop())
    task, watch = await _watched(watchdog, read=8.0, total=None)
    t0 = watch.started
    # 100 s waiting for a free connection: no byte is due yet, so no read limit runs
    now = t0
    while now < t0 + 100:
        now = watch.due
        watchdog._look(now)
    assert watch.expired is None
    _attach(watch, at=t0 + 100.0)
    watchdog._look(t0 + 107.99)
    assert watch.expired is None
    assert watch.due == pytest.approx(t0 + 108.0)  # exactly the limit: nothing came
    watchdog._look(t0 + 108.0)
    assert watch.expired == "read"
    assert await _outcome(task) == "timed out (no byte of the reply for 8 s)"
    assert task.cancelling() == 0
    watchdog.close()


async def test_bytes_keep_a_reply_alive_and_its_end_is_noticed_within_the_check_step() -> None:
    read = 8.0
    watchdog = Watchdog(asyncio.get_running_loop())
    task, watch = await _watched(watchdog, read=read, total=None)
    t0 = watch.started
    protocol = _attach(watch, at=t0)
    # a piece every 7 s (under ``read``) for 200 s, the watchdog looking when it said
    now, last_byte = t0, t0
    while now < t0 + 200:
        now = watch.due
        while last_byte + 7.0 <= now:
            last_byte += 7.0
            protocol.received += 1
        watchdog._look(now)
        assert watch.expired is None, now - t0
    while watch.expired is None:  # the reply stops: silence from ``last_byte`` on
        now = watch.due
        watchdog._look(now)
    silence = now - last_byte
    assert read <= silence <= read * (1 + 2 / CHECKS)
    assert await _outcome(task) == f"timed out (no byte of the reply for {read:g} s)"
    watchdog.close()


async def test_the_earliest_limit_sets_the_one_timer() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(loop)
    slow, slow_watch = await _watched(watchdog, read=None, total=100.0)
    timer = watchdog._timer
    assert timer is not None and watchdog._when == slow_watch.due
    later, _ = await _watched(watchdog, read=None, total=200.0)
    assert watchdog._timer is timer  # a later limit: the same timer
    sooner, sooner_watch = await _watched(watchdog, read=None, total=1.0)
    assert watchdog._when == sooner_watch.due and watchdog._timer is not timer
    for task in (slow, later, sooner):
        task.cancel()
        assert await _outcome(task) == "cancelled"
    assert len(watchdog) == 0
    watchdog._look()  # nothing in flight: no timer set again
    assert watchdog._timer is None
    watchdog.close()


async def test_no_limit_no_watch() -> None:
    watchdog = Watchdog(asyncio.get_running_loop())
    assert watchdog.start(None, None) is None
    assert len(watchdog) == 0 and watchdog._timer is None


# -- cancellation: the watchdog's or the caller's ------------------------------------------------


async def test_a_callers_cancellation_is_never_taken_for_a_timeout() -> None:
    watchdog = Watchdog(asyncio.get_running_loop())
    task, watch = await _watched(watchdog, read=None, total=5.0)
    task.cancel()  # the caller's, then the watchdog's in the same turn of the loop
    watchdog._look(watch.started + 5.0)
    assert watch.expired == "total"
    assert await _outcome(task) == "cancelled"
    assert len(watchdog) == 0
    watchdog.close()


async def test_a_cancellation_of_the_watchdog_that_never_reached_the_request_is_taken_back() -> (
    None
):
    watchdog = Watchdog(asyncio.get_running_loop())
    counts: list[int] = []

    async def attempt() -> None:
        watch = watchdog.start(None, 1.0)
        assert watch is not None
        try:
            watchdog._look(watch.started + 1.0)  # while the attempt runs: not yet delivered
            assert asyncio.current_task().cancelling() == 1  # type: ignore[union-attr]
        finally:
            watchdog.end(watch)
        counts.append(asyncio.current_task().cancelling())  # type: ignore[union-attr]

    task = asyncio.create_task(attempt())
    with contextlib.suppress(asyncio.CancelledError):
        await task  # the cancel asked of a running task still lands at its next await
    assert counts == [0]
    watchdog.close()


def test_a_watch_is_sent_once_it_has_a_connection() -> None:
    async def main() -> None:
        watchdog = Watchdog(asyncio.get_running_loop())
        watch = watchdog.start(1.0, 2.0)
        assert watch is not None and not watch.sent
        _attach(watch, at=watch.started)
        assert watch.sent
        watchdog.end(watch)
        watchdog.close()

    asyncio.run(main())


# -- on the wire -------------------------------------------------------------------------------


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def _server(serve: Serve) -> AsyncIterator[str]:
    """A raw HTTP/1.1 server on loopback that answers each request with ``serve``."""

    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while await reader.readuntil(b"\r\n\r\n"):
                    await serve(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


def _head(length: int) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {length}\r\n\r\n".encode()
    )


async def test_a_body_that_stops_halfway_ends_after_read_seconds_of_silence() -> None:
    stalled = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_head(len(BALANCE)) + BALANCE[:20])
        await writer.drain()
        await stalled.wait()  # the rest never comes

    timeout = am.Timeout(connect=5.0, read=0.3, total=None)
    async with _server(serve) as url:
        async with am.AsyncApimart("sk-test", base_url=url, timeout=timeout, max_retries=0) as c:
            with anyio.fail_after(30):  # a hang bound, not a timing
                with pytest.raises(am.APITimeoutError) as info:
                    await c.balance()
            assert str(info.value) == "GET /v1/balance timed out (no byte of the reply for 0.3 s)"
            assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
            watchdog = c._transport.watchdog
            assert watchdog is not None and len(watchdog) == 0
        stalled.set()


async def test_a_reply_trickled_in_pieces_is_read_however_long_it_takes() -> None:
    pause = 0.05  # a tenth of ``read`` between pieces, 1.5 s (three times ``read``) in all

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply = _head(len(BALANCE)) + BALANCE
        step = -(-len(reply) // 30)
        for start in range(0, len(reply), step):
            writer.write(reply[start : start + step])
            await writer.drain()
            await asyncio.sleep(pause)

    timeout = am.Timeout(connect=5.0, read=0.5, total=None)
    async with _server(serve) as url:
        async with am.AsyncApimart("sk-test", base_url=url, timeout=timeout, max_retries=0) as c:
            balance = await c.balance()
    assert balance.remain_balance == 5.0


async def test_a_wait_for_a_free_connection_is_not_a_read_timeout(emu: Emulator) -> None:
    # one connection, four reads of 0.5 s each: the last waits 1.5 s for the connection,
    # three times its read limit, and then gets its reply within it
    emu.faults.inject("balance", Fault.slow(0.5), times=4)
    timeout = am.Timeout(connect=5.0, read=1.0, total=None)
    client = am.AsyncApimart(emu.api_key, base_url=emu.base_url, timeout=timeout)
    client._transport.connection_limit = 1
    async with client as c:
        balances = await asyncio.gather(*(c.balance() for _ in range(4)))
        assert c.request_counts() == {"balance": 4}
    assert [b.remain_balance for b in balances] == [1000.0] * 4


async def test_a_callers_cancellation_of_a_request_stays_a_cancellation(emu: Emulator) -> None:
    emu.faults.inject("balance", Fault.slow(5.0))
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, timeout=1.0) as c:
        with anyio.move_on_after(0.2) as scope:
            await c.balance()
        assert scope.cancelled_caught
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        watchdog = c._transport.watchdog
        assert watchdog is not None and len(watchdog) == 0
        assert c.request_counts() == {"balance": 1}


async def test_status_reads_put_no_timer_on_the_event_loop_per_request(emu: Emulator) -> None:
    loop = asyncio.get_running_loop()
    timers: list[Any] = []
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        timers.append(getattr(callback, "__qualname__", callback))
        return call_at(when, callback, *args, **kwargs)

    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url) as c:
        task_id = await c.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
        await c.balance()  # the connection is open and pooled
        loop.call_at = counting  # type: ignore[method-assign]
        try:
            for _ in range(30):
                await c.tasks.get(task_id)
        finally:
            del loop.call_at  # type: ignore[method-assign]
    # aiohttp's limits: three timers per read (90); the watchdog's one timer, set at most once
    assert len(timers) <= 1, timers


def test_the_connector_counts_what_its_connections_receive() -> None:
    async def main() -> None:
        async with am.AsyncApimart("sk-test", base_url="http://127.0.0.1:9") as c:
            await c.open()
            assert c._transport.watchdog is not None
            connector = c._transport.session().connector
            assert connector is not None
            assert connector._factory().__class__ is CountingHandler  # type: ignore[attr-defined]

    asyncio.run(main())


# -- found by the break-it pass ------------------------------------------------------------------


async def test_closing_ends_the_attempts_in_flight_as_closed() -> None:
    # the transport's close used to cancel the one timer while attempts were still in flight:
    # one stuck in a connect (no connect limit) then ran past its ``total`` until the
    # system gave up on the connect (135 s)
    watchdog = Watchdog(asyncio.get_running_loop())
    task, watch = await _watched(watchdog, read=None, total=5.0)
    watchdog.close()
    assert watch.expired == "closed"
    assert await _outcome(task) == "timed out (the client was closed)"
    assert task.cancelling() == 0
    assert len(watchdog) == 0 and watchdog._timer is None


async def test_a_limit_of_zero_is_no_limit(emu: Emulator) -> None:
    # aiohttp reads 0 as no limit, and so did the client before the watchdog: a limit of 0
    # must not end every request at once
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, timeout=0) as c:
        balance = await c.balance()
        assert c.request_counts() == {"balance": 1}
    assert balance.remain_balance == 1000.0


async def test_a_look_a_moment_early_counts_as_due() -> None:
    # uvloop runs a timer up to a millisecond early: a look then must still end the attempt,
    # not set the timer again for what is left (8,421 looks instead of 198 for 300 requests)
    watchdog = Watchdog(asyncio.get_running_loop())
    task, watch = await _watched(watchdog, read=None, total=5.0)
    watchdog._look(watch.started + 5.0 - 0.0009)
    assert watch.expired == "total"
    assert await _outcome(task) == "timed out (total limit of 5 s)"
    watchdog.close()


def _blackhole() -> tuple[Any, list[Any]]:
    """A listening socket whose accept queue is full: a connect to it hangs."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    return listener, fillers


async def test_closing_the_client_ends_a_request_stuck_in_its_connect() -> None:
    listener, fillers = _blackhole()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        timeout = am.Timeout(connect=None, read=0.2, total=60.0)
        client = am.AsyncApimart("sk-test", base_url=url, timeout=timeout, max_retries=0)
        await client.open()
        request = asyncio.create_task(client.balance())
        watchdog = client._transport.watchdog
        assert watchdog is not None
        with anyio.fail_after(30):  # a hang bound, not a timing
            while not len(watchdog):  # noqa: ASYNC110 - the watchdog has no event to wait on
                await asyncio.sleep(0.01)
            await client.aclose()
            with pytest.raises(am.ClientClosedError, match="closed during the request"):
                await request
    finally:
        for sock in (listener, *fillers):
            sock.close()


async def _one_slow_connection(emu: Emulator) -> am.AsyncApimart:
    """An open client with one connection, which a balance read will hold for 30 s."""
    emu.faults.inject("balance", Fault.slow(30.0))
    client = am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=0)
    client._transport.connection_limit = 1
    return await client.open()


async def test_requests_waiting_for_a_connection_end_as_closed_when_the_client_closes(
    emu: Emulator,
) -> None:
    # aiohttp cancels the waits for a connection when its connector closes: a raw
    # CancelledError reached the callers, whom nobody had cancelled
    client = await _one_slow_connection(emu)
    requests = [asyncio.create_task(client.balance()) for _ in range(3)]
    with anyio.fail_after(30):  # a hang bound, not a timing
        await emu.wait_until(lambda: emu.state.in_flight["balance"] == 1)
        await client.aclose()
        ended = await asyncio.gather(*requests, return_exceptions=True)
    assert [type(e) for e in ended] == [am.ClientClosedError] * 3, ended


async def test_a_submit_cut_by_the_clients_close_after_it_went_out_may_have_a_task(
    emu: Emulator,
) -> None:
    # second break-it pass: the POST had reached the service (which went on to create the
    # task) and the close cut its reply; the error said ``submit_not_taken``, "no task, not
    # billed", and carried no key to find the task by
    emu.faults.inject("submit", Fault.slow(3.0))
    client = am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=2)
    await client.open()
    submit = asyncio.create_task(client.videos.submit(am.VideoRequest("sora-2-preview", "a cat")))
    with anyio.fail_after(30):  # a hang bound, not a timing
        await emu.wait_until(lambda: emu.state.in_flight["submit"] == 1)
        await client.aclose()
        with pytest.raises(am.ClientClosedError) as info:
            await submit
    assert not info.value.submit_not_taken
    key = info.value.idempotency_key
    assert key is not None and key.startswith("am-")
    assert f"submit again with idempotency_key={key!r}" in str(info.value)
    assert emu.counters["submit"] == 1


async def test_a_submit_still_waiting_for_a_connection_at_the_close_was_not_taken(
    emu: Emulator,
) -> None:
    client = await _one_slow_connection(emu)
    balance = asyncio.create_task(client.balance())
    submit = asyncio.create_task(client.videos.submit(am.VideoRequest("sora-2-preview", "a cat")))
    with anyio.fail_after(30):  # a hang bound, not a timing
        await emu.wait_until(lambda: emu.state.in_flight["balance"] == 1)
        await asyncio.sleep(0)  # the submit is queued for the one connection
        await client.aclose()
        with pytest.raises(am.ClientClosedError) as info:
            await submit
        with pytest.raises(am.ClientClosedError):
            await balance
    assert info.value.submit_not_taken
    assert emu.counters.get("submit", 0) == 0


async def test_requests_waiting_for_their_turn_end_when_the_client_closes(emu: Emulator) -> None:
    # second break-it pass: requests waiting out ``requests_per_second`` ended only when
    # their turn came (10 s and 20 s here), long after the close
    client = am.AsyncApimart(emu.api_key, base_url=emu.base_url, requests_per_second=0.1)
    await client.open()
    requests = [asyncio.create_task(client.balance()) for _ in range(3)]
    with anyio.fail_after(5):  # the turns are 10 s apart: a hang bound, not a timing
        await emu.wait_until(lambda: emu.counters.get("balance", 0) == 1)
        await client.aclose()
        ended = await asyncio.gather(*requests, return_exceptions=True)
    closed = [e for e in ended if isinstance(e, am.ClientClosedError)]
    assert len(closed) == 2, ended
    assert emu.counters["balance"] == 1

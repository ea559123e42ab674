"""The aiohttp.web backend example: one client shared by every request, against the emulator."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from apimart_async.emulator import Emulator, Fault

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from aiohttp_backend import create_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

pytestmark = pytest.mark.anyio


async def test_submit_and_status_through_the_backend() -> None:
    async with Emulator(frozen_clock=True, task_duration=10.0) as emu:
        app = create_app(api_key=emu.api_key, base_url=emu.base_url)
        async with TestClient(TestServer(app)) as http:
            ids = []
            for prompt in ("a cat", "a dog"):
                resp = await http.post(
                    "/videos", json={"model": "sora-2-preview", "prompt": prompt}
                )
                assert resp.status == 202
                ids.append((await resp.json())["task_id"])
            resp = await http.post("/videos", json={"model": "sora-2-preview", "duration": 5})
            assert resp.status == 422
            assert (
                "duration: sora-2-preview takes only 4, 8 or 12 seconds, got 5"
                in (await resp.json())["error"]
            )
            # an untrusted body that is not a request: 422 naming the field, never a 500
            # (issue 21: "extra": 5 raised TypeError inside from_dict)
            for bad, field in (
                ({"model": "sora-2-preview", "prompt": "x", "extra": 5}, "extra"),
                ([1, 2], "request"),
                ({"model": ["sora-2-preview"], "prompt": "x"}, "model"),
            ):
                resp = await http.post("/videos", json=bad)
                assert resp.status == 422, bad
                assert (await resp.json())["error"].startswith(f"{field}: "), bad
            # nested past Python's recursion limit: RecursionError in json.loads (was a 500)
            resp = await http.post("/videos", data=b"[" * 100_000 + b"]" * 100_000)
            assert resp.status == 422
            emu.advance(10)
            for task_id in ids:
                body = await (await http.get(f"/videos/{task_id}")).json()
                assert body["status"] == "completed" and body["video_urls"]
            assert (await http.get("/videos/task_nope")).status == 404
        assert emu.tasks_created == 2


async def test_sdk_errors_get_the_reference_apps_http_statuses() -> None:
    """The reference app's table (``examples/web_backend.py``): a task id the SDK refuses
    before sending anything is the caller's error (422, was 502), the service refusing the
    backend's own key is an upstream failure (502, was the service's 401 passed on to the
    browser), a rate limit is 429 (brk21b 12, 13)."""
    async with Emulator(frozen_clock=True, task_duration=10.0) as emu:
        wrong_key = create_app(api_key="sk-not-this-one", base_url=emu.base_url)
        async with TestClient(TestServer(wrong_key)) as http:
            resp = await http.post("/videos", json={"model": "sora-2-preview", "prompt": "x"})
            assert resp.status == 502
        app = create_app(api_key=emu.api_key, base_url=emu.base_url)
        async with TestClient(TestServer(app)) as http:
            resp = await http.get("/videos/a%20b")
            assert resp.status == 422
            assert (await resp.json())["error"].startswith("task_id: must not contain")
            emu.faults.inject("submit", Fault.rate_limited(0), times=10)
            resp = await http.post("/videos", json={"model": "sora-2-preview", "prompt": "x"})
            assert resp.status == 429
        assert emu.tasks_created == 0


async def test_generate_and_unfinished_with_a_journal(tmp_path: Path) -> None:
    """The reference app's parts on aiohttp.web (brk21b 13): a client journal, so a billed
    task whose end nobody saw is listed after a restart; ``generate`` answered with the
    task's ``to_dict()``; the status too."""
    journal = str(tmp_path / "client.sqlite")
    async with Emulator(mode="manual") as emu:
        async with TestClient(
            TestServer(create_app(api_key=emu.api_key, base_url=emu.base_url, journal=journal))
        ) as http:
            resp = await http.post("/videos", json={"model": "sora-2-preview", "prompt": "x"})
            task_id = (await resp.json())["task_id"]
        # a restart: the task was submitted, nobody saw it end
        app = create_app(api_key=emu.api_key, base_url=emu.base_url, journal=journal)
        async with TestClient(TestServer(app)) as http:
            listed = await (await http.get("/videos/unfinished")).json()
            assert listed["count"] == 1 and listed["tasks"][0]["task_id"] == task_id
            emu.complete(task_id)
            body = await (await http.get(f"/videos/{task_id}")).json()
            assert body["id"] == task_id and body["status"] == "completed" and body["video_urls"]
            generating = asyncio.ensure_future(
                http.post("/videos/generate", json={"model": "sora-2-preview", "prompt": "y"})
            )
            await emu.wait_until(lambda: emu.tasks_created == 2)
            emu.complete_all()
            done = await (await generating).json()
            assert done["status"] == "completed" and done["id"] != task_id


async def test_unfinished_without_a_journal_says_so_instead_of_a_500() -> None:
    """``--journal`` is optional (the default is none): ``GET /videos/unfinished`` then
    raised ``ConfigurationError`` out of its handler, a 500 with a traceback in the log."""
    async with Emulator(mode="manual") as emu:
        app = create_app(api_key=emu.api_key, base_url=emu.base_url)
        async with TestClient(TestServer(app)) as http:
            resp = await http.get("/videos/unfinished")
            assert resp.status == 501
            assert "--journal" in (await resp.json())["error"]


async def test_a_client_gone_while_sending_its_body_is_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """brk21c: a caller that went away before its body arrived made ``request.json()`` raise
    ``ConnectionResetError`` out of the handler: "Error handling request" and a traceback at
    ERROR for each."""
    async with Emulator(frozen_clock=True) as emu:
        app = create_app(api_key=emu.api_key, base_url=emu.base_url)
        handling = 0  # requests between the outermost middleware's start and end
        changed = asyncio.Event()

        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            nonlocal handling
            handling += 1
            changed.set()
            try:
                return await handler(request)
            finally:
                handling -= 1
                changed.set()

        async def until(n: int) -> None:
            async with asyncio.timeout(20):
                while handling != n:
                    changed.clear()
                    await changed.wait()

        app.middlewares.insert(0, count)  # outside the example's own
        runner = web.AppRunner(app)  # as the example serves it (TestServer logs nothing)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            for path in ("/videos", "/videos/generate"):
                _, writer = await asyncio.open_connection(host, port)
                writer.write(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    'Content-Length: 1000\r\n\r\n{"model": '.encode()
                )
                await writer.drain()
                await until(1)  # the handler is reading the body
                writer.close()
                await writer.wait_closed()
                await until(0)  # and has ended
        finally:
            await runner.cleanup()  # waits for every handler: whatever they log is logged
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert emu.tasks_created == 0


async def test_an_abandoned_generate_stops_its_wait() -> None:
    """brk21c: aiohttp.web lets a handler run on after its client went away unless told
    otherwise (``handler_cancellation``, off by default): an abandoned ``/videos/generate``
    kept its wait, and the shared poller read the task, until the task ended. The example
    serves with handler cancellation: the wait ends with the request (the task's id is
    logged, and listed by the journal)."""
    from aiohttp_backend import CLIENT, runner_for

    async with Emulator(mode="manual") as emu:
        app = create_app(api_key=emu.api_key, base_url=emu.base_url)
        runner = runner_for(app)  # as the example serves it
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            client = app[CLIENT]
            body = b'{"model": "sora-2-preview", "prompt": "a cat"}'
            _, writer = await asyncio.open_connection(host, port)
            writer.write(
                b"POST /videos/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            await emu.wait_until(lambda: len(client._poller) == 1)  # submitted, waiting
            writer.close()  # the caller goes away
            await writer.wait_closed()
            await emu.wait_until(lambda: len(client._poller) == 0, timeout=10)
        finally:
            await runner.cleanup()
        assert emu.tasks_created == 1

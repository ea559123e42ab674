"""A web backend that shares ONE client for its whole lifetime (aiohttp.web).

    POST /videos            {"model": "...", "prompt": "...", ...}  -> 202 {"task_id": "..."}
    POST /videos/generate   the same, answered when the video is done: the task (``to_dict()``)
    GET  /videos/unfinished the billed tasks whose end nobody saw, across restarts
    GET  /videos/{task_id}  the task (``Task.to_dict()``)

Every request handler uses the same ``AsyncApimart``: one connection pool, one shared poller,
one client-wide back-off when the service says 429. With ``--journal FILE`` the client records
every submit before its POST and its task id after, so no billed task is lost to a crash or
an abandoned request (``/videos/unfinished``). SDK errors get the HTTP statuses of the
reference app (``examples/web_backend.py``, FastAPI). Run it against the built-in emulator:

    python examples/aiohttp_backend.py --emulate       # then: curl -XPOST localhost:8080/videos ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

import apimart_async as am
from apimart_async.emulator import Emulator

CLIENT = web.AppKey("apimart_client", am.AsyncApimart)


def create_app(
    *, api_key: str | None = None, base_url: str | None = None, journal: str | None = None
) -> web.Application:
    app = web.Application()

    async def client_lifetime(app: web.Application) -> AsyncIterator[None]:
        async with am.AsyncApimart(api_key, base_url=base_url, journal=journal) as client:
            app[CLIENT] = client
            yield

    app.cleanup_ctx.append(client_lifetime)
    app.router.add_post("/videos", create_video)
    app.router.add_post("/videos/generate", generate_video)
    app.router.add_get("/videos/unfinished", unfinished)  # before /videos/{task_id}
    app.router.add_get("/videos/{task_id}", video_status)
    return app


async def _video_request(request: web.Request) -> am.VideoRequest | web.Response:
    try:
        return am.VideoRequest.from_dict(await request.json())
    except ValueError as exc:  # bad JSON, or a ValidationError naming the field and the rule
        return web.json_response({"error": str(exc)}, status=422)
    except RecursionError:  # JSON nested too deep to parse
        return web.json_response({"error": "request: is nested too deep"}, status=422)
    except ConnectionResetError:  # the caller went away while sending it: nobody reads this
        return web.json_response({"error": "the client went away"}, status=400)


async def create_video(request: web.Request) -> web.Response:
    video = await _video_request(request)
    if isinstance(video, web.Response):
        return video
    try:
        task_id = await request.app[CLIENT].videos.submit(video)
    except am.ApimartError as exc:
        return error_response(exc)
    return web.json_response({"task_id": task_id}, status=202)


async def generate_video(request: web.Request) -> web.Response:
    video = await _video_request(request)
    if isinstance(video, web.Response):
        return video

    def submitted(task_id: str) -> None:  # the id the moment it exists: store it if you like
        logging.getLogger(__name__).info("generating %s", task_id)

    try:
        task = await request.app[CLIENT].videos.generate(video, on_submitted=submitted)
    except am.ApimartError as exc:
        return error_response(exc)
    return web.json_response(task.to_dict())


async def unfinished(request: web.Request) -> web.Response:
    try:
        items = await request.app[CLIENT].tasks.unfinished()
    except am.ConfigurationError:  # the client has no journal: nothing to list
        error = "this server keeps no journal of its submits (start it with --journal FILE)"
        return web.json_response({"error": error}, status=501)
    except am.ApimartError as exc:  # the journal cannot be read
        return error_response(exc)
    return web.json_response({"count": len(items), "tasks": [i.to_dict() for i in items]})


async def video_status(request: web.Request) -> web.Response:
    try:
        task = await request.app[CLIENT].tasks.get(request.match_info["task_id"])
    except am.NotFoundError:
        return web.json_response({"error": "no such task"}, status=404)
    except am.ApimartError as exc:
        return error_response(exc)
    return web.json_response(task.to_dict())


def http_status(exc: am.ApimartError) -> int:
    """The HTTP status for an SDK error (the table of ``examples/web_backend.py``)."""
    match exc:
        case am.ValidationError() | am.BadRequestError():  # the caller's request: nothing sent,
            return 422  # or the service refused it
        case am.APIStatusError(status=413):
            return 413
        case am.InsufficientBalanceError():
            return 402
        case am.RateLimitError():
            return 429
        case am.NotFoundError():
            return 404
        case am.TaskTimeoutError() | am.APITimeoutError():
            return 504
        case am.ClientClosedError():  # the server is shutting down
            return 503
        case _:  # upstream failures: 5xx, unreachable, our own key refused (never the caller's)
            return 502


def error_response(exc: am.ApimartError) -> web.Response:
    headers = {}
    if isinstance(exc, am.RateLimitError) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return web.json_response({"error": str(exc)}, status=http_status(exc), headers=headers)


def runner_for(app: web.Application) -> web.AppRunner:
    """How the example serves ``app``: with handler cancellation (aiohttp's default lets a
    handler run on after its client went away: an abandoned ``/videos/generate`` would keep
    waiting, and the shared poller reading its task, until the task ends)."""
    return web.AppRunner(app, handler_cancellation=True)


async def main_emulated(port: int, journal: str | None) -> None:
    async with Emulator() as emu:
        app = create_app(api_key=emu.api_key, base_url=emu.base_url, journal=journal)
        runner = runner_for(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"backend on http://127.0.0.1:{port} (emulator at {emu.base_url}); Ctrl-C to stop")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--emulate", action="store_true")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--journal", help="the client's journal (an SQLite file)")
    ns = parser.parse_args()
    if not ns.emulate and not os.environ.get("APIMART_API_KEY"):
        parser.error("set APIMART_API_KEY to your key, or use --emulate")
    if ns.emulate:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main_emulated(ns.port, ns.journal))
    else:
        web.run_app(create_app(journal=ns.journal), port=ns.port, handler_cancellation=True)

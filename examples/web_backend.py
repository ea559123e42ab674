"""A web backend on FastAPI that shares ONE client for its whole lifetime (the reference app).

    POST /videos                  {"model": ..., "prompt": ...}  -> 202 {"task_id": ...}
    GET  /videos/unfinished       the billed tasks whose end nobody saw, across restarts
                                  (``?offset=&limit=``: a page, 100 by default)
    GET  /videos/{task_id}        the task, as ``Task.to_dict()``
    GET  /videos/{task_id}/wait   wait for it (``?timeout=`` seconds) -> the task
    POST /videos/generate         submit and wait inside the request (``?timeout=``)
    POST /batches                 {"name": ..., "jobs": [...]} -> 202; runs in the background
    GET  /batches/{name}          its counts (``BatchStats.to_dict()``) and outcomes so far
    GET  /debug/metrics           asyncio tasks, requests in flight, event-loop lag, the
                                  loop's CPU, full collections (``?heap=true``: objects),
                                  whether the startup recovery still runs
    POST /apimart/callback        APIMart's webhook callbacks (with ``--webhook-url``)

What it shows:

- The client lives in the lifespan and reaches handlers through a dependency: one connection
  pool, one shared poller, one client-wide back-off after a 429, for every request.
- The client has a journal (``journal=``): every submit is recorded before its POST, so no
  billed task is lost to a crash, a SIGKILL or an abandoned request; ``/videos/unfinished``
  lists them after a restart.
- ``/videos/generate`` records the task id the moment it exists (``on_submitted``), stops
  waiting when the HTTP client goes away (the wait is cancelled: no task, no watcher, no
  polling left behind) and, when the server shuts down, answers 503 with the task id at once
  instead of holding the shutdown.
- A background batch has a journal of its own; batches left unfinished are resumed on startup
  (nothing is submitted twice; finished jobs are replayed from the journal). A name is
  its journal's: ``POST /batches`` with the same name and jobs runs it again the same way,
  with other jobs it is a 422 (they would not match the journal). That recovery,
  like the settling of submits whose reply was lost, runs in the background: the app serves
  at once, however slow the service is to answer it, and a shutdown cancels it.
- SDK errors become HTTP statuses (``http_status``): 422 for a request that breaks a model's
  rule or that the service refuses (400), 413 a body too large for it, 402 balance, 429 rate
  limit, 404 unknown task, 504 a wait or an upstream timeout, 502 any other upstream failure;
  every body is JSON from ``to_dict()``. A request body past 1 MiB (64 MiB for a batch) is a
  413 as soon as it is past (Starlette itself reads a body of any size into memory).
- One process per journal file: a second process on the same journal (``uvicorn --workers 2``
  on this app) is refused with ``JournalLockedError`` at startup; give each worker its own
  ``--journal`` and ``--batch-dir``.
- Replicas: with ``--journal postgresql://user@host/db`` (``--schema``, default ``apimart``)
  every replica shares one client journal. A task submitted on one is listed by
  ``/videos/unfinished`` and answered by ``/videos/{id}/wait`` on any other, across restarts;
  a webhook callback that lands on a replica where nobody waits for its task is passed on to
  the others (PostgreSQL ``NOTIFY``), so the wait ends wherever it is. Each replica keeps its
  own ``--batch-dir``.
- Webhooks (``--webhook-url https://this.host/apimart``, or ``self`` for the address it
  listens on): every submit carries it, and APIMart calls ``/apimart/callback`` when a task
  ends. The route hands the body to ``client.tasks.notify``: the callback is only a hint (it
  is unsigned), the task is read in the poller's next round and the waits end from that read;
  tasks with a webhook are polled only as a fallback. A body naming no task gets 400.
- The application owns the process's signals: uvicorn handles SIGINT and SIGTERM and waits up
  to ``--grace`` seconds for the requests in flight; the SDK installs no handler.

Run it against the built-in emulator (no key, no network):

    python examples/web_backend.py --emulate
    curl -XPOST localhost:8000/videos/generate -d '{"model": "sora-2-preview", "prompt": "a cat"}'

Or against the real service: ``APIMART_API_KEY=sk-... python examples/web_backend.py``.
It needs FastAPI and uvicorn (``pip install "apimart-async[examples]"``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import anyio
import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

import apimart_async as am

T = TypeVar("T")
logger = logging.getLogger("web_backend")


# -- SDK errors as HTTP statuses ------------------------------------------------------------


def http_status(exc: am.ApimartError) -> int:
    """The HTTP status a web backend answers for an SDK error."""
    match exc:
        case am.ValidationError():  # the caller's request broke a rule; nothing was sent
            return 422
        case am.WebhookError():  # a webhook callback naming no task
            return 400
        case am.BadRequestError():  # the service refused the caller's request (an unknown
            return 422  # model is passed through unchecked)
        case am.APIStatusError(status=413):  # the caller's body is too large for the service
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
        case _:  # upstream failures: 5xx, unreachable, a failed task, our key refused
            return 502


def error_body(exc: am.ApimartError) -> dict[str, Any]:
    """``{"error": {"type", "message", "status"}}``, and the task when there is one."""
    status = getattr(exc, "status", None)
    body: dict[str, Any] = {
        "error": {
            "type": type(exc).__name__,
            "message": str(exc),
            "status": status if isinstance(status, int) else None,
        }
    }
    task = getattr(exc, "task", None)
    if isinstance(task, am.Task):
        body["task"] = task.to_dict()
    task_id = getattr(exc, "task_id", None)
    if isinstance(task_id, str):
        body["task_id"] = task_id
    return body


async def on_sdk_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, am.ApimartError)
    headers = {}
    if isinstance(exc, am.RateLimitError) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(error_body(exc), status_code=http_status(exc), headers=headers)


# -- background batches, each with its own journal, resumed on startup -----------------------


class Batches:
    """Batches running in the background. Each keeps ``<name>.jobs.json`` (its input) and
    ``<name>.sqlite`` (its journal) in ``folder``; on startup every batch found there runs
    again: finished jobs are replayed from the journal, running ones followed, none paid
    twice."""

    def __init__(self, client: am.AsyncApimart, folder: Path, state: Any = None) -> None:
        self.client = client
        self.folder = folder
        self.state = state  # the app's: its ``webhook_url``
        self.handles: dict[str, am.Batch] = {}
        #: Each batch's outcomes so far, each as JSON text (``Outcome.to_dict()``): strings
        #: are not containers, so the garbage collector never scans them (20,000 outcomes as
        #: dicts are about 200,000 more objects for every full collection to walk).
        self.outcomes: dict[str, list[str]] = {}
        self.errors: dict[str, dict[str, Any]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: The grace of the shutdown once it has begun: a batch still opening its journal
        #: then (no handle yet to stop) stops itself as soon as it has one.
        self.stopping: float | None = None

    def start(self, name: str, jobs: list[str]) -> None:
        """Run the batch of ``jobs`` (each job as JSON text, ``VideoRequest.to_dict()``: text
        is no container for the GC to walk, where 20,000 ``VideoRequest`` objects held for the
        whole batch were; the batch makes each request as it reads it)."""
        self.outcomes[name] = []
        self._tasks[name] = asyncio.get_running_loop().create_task(
            self._run(name, jobs), name=f"batch {name}"
        )

    async def resume_all(self) -> None:
        """Start every batch of ``folder`` again (the startup step, while the app serves: a
        batch a request started meanwhile under the same name is left alone)."""
        paths = await anyio.to_thread.run_sync(lambda: sorted(self.folder.glob("*.jobs.json")))
        for path in paths:
            name = path.name.removesuffix(".jobs.json")
            try:
                jobs = await anyio.to_thread.run_sync(_read_jobs, path)
            except (OSError, ValueError, TypeError) as exc:  # unreadable: the others resume
                logger.warning("batch %s not resumed: its input %s: %s", name, path, exc)
                continue
            if not self.running(name) and self.stopping is None:
                self.start(name, jobs)

    async def _run(self, name: str, jobs: list[str]) -> None:
        kept = self.outcomes[name]
        try:
            async with self.client.batch(
                (am.VideoRequest.from_dict(json.loads(job)) for job in jobs),
                journal=self.folder / f"{name}.sqlite",
                concurrency=16,
                webhook_url=getattr(self.state, "webhook_url", None),
            ) as results:
                self.handles[name] = results
                async with anyio.create_task_group() as tg:
                    if self.stopping is not None:  # the shutdown began while it opened
                        tg.start_soon(functools.partial(results.stop, grace=self.stopping))
                    async for outcome in results:
                        kept.append(json.dumps(outcome.to_dict()))
        except am.ApimartError as exc:  # the journal cannot be used, the client closed...
            self.errors[name] = error_body(exc)["error"]
            logger.warning("batch %s stopped: %s", name, exc)

    def running(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    async def stop(self, grace: float) -> None:
        """Stop every batch (the shutdown step): running tasks are followed for ``grace``
        seconds; what is left is in the journals for the next start."""
        self.stopping = grace
        async with anyio.create_task_group() as tg:  # side by side: one grace for all
            for handle in list(self.handles.values()):
                tg.start_soon(functools.partial(handle.stop, grace=grace))
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- event-loop lag, for /debug/metrics -------------------------------------------------------


class LagMonitor:
    """How late a 5 ms sleep wakes up: what every request on this replica waits on top of its
    own work when something holds the event loop. Two windows: since the last ``reset()``
    (``window``) and since the last ``reset(everything=True)`` (``total``).

    Beside the lag, the loop thread's CPU time in each wake-up window with the GC's taken out
    (``work``): what this process's own work held the loop for. The lag also counts the time
    the machine gave other processes; this does not."""

    def __init__(self) -> None:
        self.window: list[float] = []
        self.total: list[float] = []
        self.work_window: list[float] = []
        self.work_total: list[float] = []
        #: Pauses of Python's cyclic garbage collector (seconds), which hold the loop too: a
        #: full collection scans every container object the process holds.
        self.gc_window: list[float] = []
        self.gc_total: list[float] = []
        self._gc_started = 0.0
        self._gc_cpu_started = 0.0
        self._gc_cpu = 0.0  # the loop thread's CPU in collections, this wake-up window

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            self._gc_cpu_started = time.thread_time()
            return
        self._gc_cpu += time.thread_time() - self._gc_cpu_started
        if info.get("generation") == 2:  # the young generations take well under a ms
            pause = time.perf_counter() - self._gc_started
            self.gc_window.append(pause)
            self.gc_total.append(pause)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        gc.callbacks.append(self._on_gc)
        try:
            while True:
                start, cpu = loop.time(), time.thread_time()
                self._gc_cpu = 0.0
                await asyncio.sleep(0.005)
                late = loop.time() - start - 0.005
                work = max(0.0, time.thread_time() - cpu - self._gc_cpu)
                for samples, value in (
                    (self.window, late),
                    (self.total, late),
                    (self.work_window, work),
                    (self.work_total, work),
                ):
                    samples.append(value)
                if len(self.total) > 1_000_000:  # about 1.5 hours: keep the memory bounded
                    for everything, window in (
                        (self.total, self.window),
                        (self.work_total, self.work_window),
                    ):
                        del everything[:500_000]
                        del window[: max(0, len(window) - 500_000)]
        finally:
            gc.callbacks.remove(self._on_gc)

    def reset(self, *, everything: bool = False) -> None:
        self.window = []
        self.work_window = []
        self.gc_window = []
        if everything:
            self.total = []
            self.work_total = []
            self.gc_total = []

    @staticmethod
    def figures(samples: list[float]) -> dict[str, Any]:
        ordered = sorted(samples)
        if not ordered:
            return {"samples": 0, "p99_ms": None, "max_ms": None}
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return {
            "samples": len(ordered),
            "p99_ms": round(p99 * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2),
        }


class CountInFlight:
    """ASGI middleware: ``state.in_flight`` is the HTTP requests being handled."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state
        state.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


# -- the app ----------------------------------------------------------------------------------


def create_app(
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    journal: str | os.PathLike[str] | am.PostgresJournal = "apimart-web.sqlite",
    batch_dir: str | os.PathLike[str] = "batches",
    poll: am.PollPolicy | None = None,
    grace: float = 10.0,
    webhook_url: str | None = None,
) -> FastAPI:
    """The app; the client opens in its lifespan. ``grace``: seconds a shutdown lets running
    background batches go on (set uvicorn's ``timeout_graceful_shutdown`` to match).
    ``webhook_url``: the base URL APIMart calls back (``<webhook_url>/callback``, this app's
    ``/apimart/callback``); ``"self"``: the address ``serve`` listens on."""
    webhook_url = check_webhook_url(webhook_url)  # the server's setting: refused now, by name
    # Web backends want results soon after they exist: checks at most 1 s apart near the end.
    policy = poll or am.PollPolicy(target_lag=1.0)
    folder = Path(batch_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncGenerator[None, None]:
        app.state.waits = Waits()
        app.state.lag = LagMonitor()
        lag_task = asyncio.get_running_loop().create_task(app.state.lag.run(), name="lag")
        await anyio.Path(folder).mkdir(parents=True, exist_ok=True)
        async with am.AsyncApimart(
            api_key, base_url=base_url, poll=policy, journal=journal
        ) as client:
            app.state.client = client
            app.state.batches = Batches(client, folder, app.state)
            # The recovery of an earlier run (lost submits settled, batches resumed) talks to
            # the service: in the background, so that the app serves at once however slow
            # the service is to answer it; cancelled by the shutdown.
            recovery = app.state.recovery = asyncio.get_running_loop().create_task(
                recover_earlier_run(client, app.state.batches), name="startup recovery"
            )
            # What startup made (the framework's and the SDK's modules, the app) lives as long
            # as the process: out of the cyclic GC's way, so that its full collections, which
            # hold the event loop, walk only what requests and batches make afterwards.
            gc.freeze()
            try:
                yield
            finally:
                app.state.waits.stop()
                recovery.cancel()  # a submit it was settling stays listed for the next start
                with contextlib.suppress(asyncio.CancelledError):
                    await recovery
                await app.state.batches.stop(grace)
                lag_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lag_task

    app = FastAPI(title="apimart-async web backend", lifespan=lifespan)
    app.state.webhook_url = webhook_url
    app.add_exception_handler(am.ApimartError, on_sdk_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(RequestTooLarge, on_too_large)
    app.add_middleware(CountInFlight, state=app.state)
    _add_routes(app)
    return app


def check_webhook_url(url: str | None) -> str | None:
    """``url`` if it is None, ``"self"`` or a base URL the service can call back (http(s), no
    query or fragment: it calls ``<url>/callback``); else a ``ValidationError`` naming
    ``webhook_url``, at startup rather than on every caller's request."""
    if url is None or url == "self":
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        rule = "must be an http(s) URL"
    elif parts.query or parts.fragment or url.endswith(("?", "#")):
        rule = "must have no query or fragment (the service calls <webhook_url>/callback)"
    else:
        return url
    raise am.ValidationError([am.FieldError("webhook_url", rule, url)])


#: Lost submits settled at once on startup: a backlog of them (a crash under load) is sent
#: side by side, not one round trip after another, and without a burst the service refuses.
RECOVER_CONCURRENCY = 8


async def recover_earlier_run(client: am.AsyncApimart, batches: Batches) -> None:
    """The startup step, run in the background while the app serves: the submits of an
    earlier run whose reply was lost get their task id, and its unfinished batches run again,
    side by side. A failure is logged; the app serves on."""

    async def step(name: str, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        except am.ApimartError as exc:  # the journal cannot be read, the client closed...
            logger.warning("startup recovery: %s stopped: %s", name, exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(step, "settling lost submits", lambda: settle_lost_replies(client))
        tg.start_soon(step, "resuming batches", batches.resume_all)


async def settle_lost_replies(client: am.AsyncApimart) -> None:
    """After a crash: the submits whose reply never arrived get their task id (sent again with
    the same idempotency key, the service answers with the task the first POST created), up
    to ``RECOVER_CONCURRENCY`` at a time."""
    lost = iter([item for item in await client.tasks.unfinished() if item.task_id is None])

    async def recover() -> None:  # each worker takes the next lost submit (no task for each)
        for item in lost:
            try:
                logger.info("recovered task %s", await client.tasks.recover(item))
            except am.ApimartError as exc:
                logger.warning("could not recover a submit of an earlier run: %s", exc)

    async with anyio.create_task_group() as tg:
        for _ in range(RECOVER_CONCURRENCY):
            tg.start_soon(recover)


async def get_client(request: Request) -> am.AsyncApimart:
    """The dependency: the one client of this process. ``async def``: FastAPI runs a plain
    ``def`` dependency in its threadpool, so every request would wait for a worker thread
    (behind any sync endpoint holding them all) just to be handed the client."""
    client: am.AsyncApimart = request.app.state.client
    return client


class Waits:
    """The requests waiting in ``while_connected``: a shutdown cancels them all at once (one
    registry, rather than a task in every request watching for the shutdown)."""

    def __init__(self) -> None:
        self.stopping = False
        self._scopes: set[anyio.CancelScope] = set()

    def add(self, scope: anyio.CancelScope) -> None:
        self._scopes.add(scope)
        if self.stopping:
            scope.cancel()

    def discard(self, scope: anyio.CancelScope) -> None:
        self._scopes.discard(scope)

    def stop(self) -> None:
        """The shutdown began: every wait ends now (its caller gets a 503 with the task id)."""
        self.stopping = True
        for scope in list(self._scopes):
            scope.cancel()


class ClientGone(Exception):
    """The HTTP client went away before its request body arrived."""


async def on_client_gone(request: Request, exc: Exception) -> JSONResponse:
    return _not_waiting("disconnected", None)  # nobody reads it; no traceback in the log


class RequestTooLarge(Exception):
    """The request's body is larger than its route takes (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")


async def on_too_large(request: Request, exc: Exception) -> JSONResponse:
    error = {"type": "RequestTooLarge", "message": str(exc), "status": None}
    return JSONResponse({"error": error}, status_code=413)


#: The largest body a route reads (Starlette has no limit of its own: a body of gigabytes
#: was read whole into memory): a video request or a webhook callback, and a batch of jobs.
MAX_BODY = 1 << 20
MAX_BATCH_BODY = 64 << 20


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, or ``RequestTooLarge`` as soon as it is past ``limit`` bytes
    (by its Content-Length, or as it arrives), or ``ClientGone``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(limit)
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(limit)
            parts.append(chunk)
    except ClientDisconnect:  # the caller went away while sending it: not a server error
        raise ClientGone from None
    return b"".join(parts)


def json_body(limit: int) -> Callable[[Request], Awaitable[Any]]:
    """A dependency: the request's body (at most ``limit`` bytes) as JSON, whatever its
    Content-Type says (422 naming it if not)."""

    async def parse(request: Request) -> Any:
        return await _json(await read_body(request, limit))

    return parse


async def _json(raw: bytes) -> Any:
    try:  # a large body is parsed on a worker thread: the event loop serves everyone else
        return (
            json.loads(raw) if len(raw) < 65536 else await anyio.to_thread.run_sync(json.loads, raw)
        )
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        text = raw[:80].decode(errors="replace")
        raise am.ValidationError([am.FieldError("request", "must be JSON", text)]) from None


Client = Annotated[am.AsyncApimart, Depends(get_client)]
JsonBody = Annotated[Any, Depends(json_body(MAX_BODY))]
BatchBody = Annotated[Any, Depends(json_body(MAX_BATCH_BODY))]
Timeout = Annotated[float | None, Query(gt=0, description="seconds to wait at most")]
Offset = Annotated[int, Query(ge=0)]
Limit = Annotated[int, Query(ge=1, le=1000)]


async def while_connected(request: Request, work: Callable[[], Awaitable[T]]) -> T | str:
    """Run ``work()``, unless the HTTP client goes away first or the server starts shutting
    down: then ``work`` is cancelled and the reason returned ("disconnected" or "stopping").

    ``work`` runs in the request's own task; one small task watches for the disconnect, and
    the shutdown cancels every wait through ``Waits`` (a task group of three tasks per
    request was some 100 more objects per awaiting request for the GC to walk)."""
    waits: Waits = request.app.state.waits
    reason = ""
    with anyio.CancelScope() as scope:
        waits.add(scope)

        async def client_gone() -> None:
            nonlocal reason
            # the body was read: the next message an ASGI server sends is http.disconnect
            with contextlib.suppress(Exception):  # a failed receive: the connection is gone
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            reason = reason or "disconnected"
            scope.cancel()

        watcher = asyncio.get_running_loop().create_task(client_gone())
        try:
            return await work()
        finally:
            waits.discard(scope)
            watcher.cancel()
    return reason or "stopping"  # the scope was cancelled: by the watcher or the shutdown


def _add_routes(app: FastAPI) -> None:
    @app.post("/videos", status_code=202)
    async def submit(client: Client, request: Request, body: JsonBody) -> dict[str, Any]:
        video = am.VideoRequest.from_dict(body)
        task_id = await client.videos.submit(video, webhook_url=request.app.state.webhook_url)
        return {"task_id": task_id}

    @app.post("/apimart/callback")
    async def apimart_callback(client: Client, request: Request) -> dict[str, Any]:
        # a hint, never a result: the task is read in the poller's next round (400 for a
        # body naming no task, through on_sdk_error)
        followed = await client.tasks.notify(await read_body(request, MAX_BODY))
        return {"ok": True, "followed": followed}

    @app.get("/videos/unfinished")
    async def unfinished(client: Client, offset: Offset = 0, limit: Limit = 100) -> dict[str, Any]:
        # a page: after a long outage the list is thousands long (20,000 as one answer: 3 MB
        # built and encoded on the event loop, every other request held meanwhile)
        items = await client.tasks.unfinished()
        page = [item.to_dict() for item in items[offset : offset + limit]]
        return {"count": len(items), "offset": offset, "tasks": page}

    @app.get("/videos/{task_id}")
    async def status(client: Client, task_id: str) -> dict[str, Any]:
        return (await client.tasks.get(task_id)).to_dict()

    @app.get("/videos/{task_id}/wait", response_model=None)
    async def wait(
        client: Client, request: Request, task_id: str, timeout: Timeout = None
    ) -> dict[str, Any] | JSONResponse:
        result = await while_connected(request, lambda: client.tasks.wait(task_id, timeout=timeout))
        if isinstance(result, str):
            return _not_waiting(result, task_id)
        return result.to_dict()

    @app.post("/videos/generate", response_model=None)
    async def generate(
        client: Client, request: Request, body: JsonBody, timeout: Timeout = None
    ) -> dict[str, Any] | JSONResponse:
        video = am.VideoRequest.from_dict(body)  # 422 naming the field, before any request
        ids: list[str] = []  # the task id, as soon as the service gave it

        def submitted(task_id: str) -> None:
            ids.append(task_id)
            logger.info("generating %s", task_id)

        result = await while_connected(
            request,
            lambda: client.videos.generate(
                video,
                timeout=timeout,
                on_submitted=submitted,
                webhook_url=request.app.state.webhook_url,
            ),
        )
        if isinstance(result, str):
            return _not_waiting(result, ids[0] if ids else None)
        return result.to_dict()

    @app.post("/batches", status_code=202)
    async def start_batch(request: Request, body: BatchBody) -> dict[str, Any]:
        batches: Batches = request.app.state.batches
        # thousands of jobs take a while to check: on a worker thread, as their file is written
        name, jobs = await anyio.to_thread.run_sync(_batch_input, body)
        if batches.running(name):
            raise am.ValidationError(
                [am.FieldError("name", "a batch of this name is running", name)]
            )
        path = batches.folder / f"{name}.jobs.json"
        # a name that ran before keeps its journal: the same jobs resume it (replayed, none
        # paid twice); others would meet that journal's jobs (JournalMismatchError each)
        if not await anyio.to_thread.run_sync(_same_jobs_or_none, path, jobs):
            rule = "a batch of this name ran with other jobs (its journal is kept): use another"
            raise am.ValidationError([am.FieldError("name", rule, name)])
        # the input first, so that a restart can resume the batch with the same journal
        await anyio.to_thread.run_sync(_write_jobs, path, jobs)
        batches.start(name, jobs)
        return {"name": name, "jobs": len(jobs)}

    @app.get("/batches/{name}", response_model=None)
    async def batch_status(
        request: Request,
        name: str,
        offset: Offset = 0,
        limit: Annotated[int, Query(ge=0, le=1000)] = 100,
    ) -> dict[str, Any] | JSONResponse:
        batches: Batches = request.app.state.batches
        if name not in batches.outcomes:
            return JSONResponse(
                {"error": {"type": "NotFound", "message": f"no batch {name!r}"}}, 404
            )
        handle = batches.handles.get(name)
        return {
            "name": name,
            "running": batches.running(name),
            "stats": handle.stats().to_dict() if handle is not None else None,
            "error": batches.errors.get(name),
            "outcomes_count": len(batches.outcomes[name]),
            "outcomes": [json.loads(o) for o in batches.outcomes[name][offset : offset + limit]],
        }

    @app.get("/debug/metrics")
    async def metrics(
        request: Request,
        client: Client,
        reset_lag: bool = False,
        reset_all: bool = False,
        heap: bool = False,
    ) -> dict[str, Any]:
        """Debugging figures (keep this route private): ``loop_lag`` since the last
        ``?reset_lag=true``, ``loop_lag_total`` since the last ``?reset_all=true``;
        ``loop_work_cpu``: the loop thread's CPU per wake-up window, the GC's apart. With
        ``?heap=true``, ``gc_objects``: the container objects a full collection walks (those
        made since startup; it takes a few ms to count them)."""
        lag: LagMonitor = request.app.state.lag
        window, total = lag.figures(lag.window), lag.figures(lag.total)
        work_window, work_total = lag.figures(lag.work_window), lag.figures(lag.work_total)
        gc_window, gc_total = lag.figures(lag.gc_window), lag.figures(lag.gc_total)
        if reset_lag or reset_all:
            lag.reset(everything=reset_all)
        return {
            "recovering": not request.app.state.recovery.done(),  # the startup recovery
            "asyncio_tasks": len(asyncio.all_tasks()),
            "requests_in_flight": request.app.state.in_flight - 1,  # not this one
            "loop_lag": window,
            "loop_lag_total": total,
            "loop_work_cpu": work_window,
            "loop_work_cpu_total": work_total,
            "gc_full_collections": gc_window,
            "gc_full_collections_total": gc_total,
            "sdk_requests": client.request_counts(),
            **({"gc_objects": len(gc.get_objects())} if heap else {}),
        }


def _not_waiting(reason: str, task_id: str | None) -> JSONResponse:
    # "disconnected": nobody reads this answer. "stopping": the task goes on at the service
    # and is in the journal; the caller asks for it later (no id yet: the submit was in
    # flight, and the restarted server lists it in /videos/unfinished once recovered).
    if reason != "stopping":
        message = "the client went away"
    elif task_id is not None:
        message = f"the server is shutting down; the task goes on: GET /videos/{task_id}"
    else:
        message = (
            "the server is shutting down while submitting; a task it created is listed in"
            " GET /videos/unfinished after the restart"
        )
    return JSONResponse(
        {
            "task_id": task_id,
            "error": {
                "type": "ServerStopping" if reason == "stopping" else "ClientDisconnected",
                "message": message,
                "status": None,
            },
        },
        status_code=503,
        headers={"Retry-After": "5"},
    )


def _write_jobs(path: Path, jobs: list[str]) -> None:
    """Whole or not at all (a crash mid-write left a file cut short, which a restart could
    not read): written beside it, then renamed over it."""
    part = path.with_name(path.name + ".part")
    part.write_text(f"[{', '.join(jobs)}]")
    os.replace(part, path)


def _read_jobs(path: Path) -> list[str]:
    return [json.dumps(job) for job in json.loads(path.read_text())]


def _same_jobs_or_none(path: Path, jobs: list[str]) -> bool:
    """Whether no batch of ``path`` ran before, or it ran with these ``jobs``."""
    try:
        return _read_jobs(path) == jobs
    except FileNotFoundError:
        return True
    except (OSError, ValueError, TypeError):  # cut short or unreadable: its journal stays
        return False


def _batch_input(body: Any) -> tuple[str, list[str]]:
    """The batch's name and its jobs, each checked (as a ``VideoRequest``) and kept as JSON
    text: one request at a time, none held (20,000 of them at once are as many objects that
    live long enough for the GC to count them as long-lived)."""
    if not isinstance(body, dict):
        raise am.ValidationError([am.FieldError("request", "must be a JSON object", body)])
    name = body.get("name")
    # the name is a file name (``<name>.jobs.json``, ``<name>.sqlite``): short, ASCII
    if not isinstance(name, str) or not (name.isascii() and name.isidentifier()) or len(name) > 64:
        raise am.ValidationError(
            [am.FieldError("name", "must be a word of at most 64 letters, digits or _", name)]
        )
    jobs = body.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise am.ValidationError([am.FieldError("jobs", "must be a non-empty list", jobs)])
    texts: list[str] = []
    local: list[am.FieldError] = []
    for i, job in enumerate(jobs):
        request = am.VideoRequest.from_dict(job)
        # A batch uploads the local files its jobs name: from untrusted callers, only URLs (a
        # path would have this server upload one of its own files as the caller's reference).
        local += [
            am.FieldError(f"jobs[{i}].{field}[{k}]", "must be an http(s) URL", url)
            for field in ("image_urls", "video_urls")
            for k, url in enumerate(getattr(request, field))
            if url.split(":", 1)[0].lower() not in ("http", "https", "data")
        ]
        texts.append(json.dumps(request.to_dict()))
    if local:
        raise am.ValidationError(local)
    return name, texts


# -- running it under uvicorn -----------------------------------------------------------------


class Server(uvicorn.Server):
    """uvicorn's server, telling the app the moment a shutdown starts (SIGINT, SIGTERM), so
    that requests waiting for a generation answer at once instead of holding the shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        waits: Waits | None = getattr(self._app.state, "waits", None)
        if waits is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(waits.stop)
        super().handle_exit(sig, frame)


async def serve(app: FastAPI, host: str, port: int, grace: int) -> None:
    """Serve ``app`` until SIGINT or SIGTERM; prints ``{"url": ...}`` once listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections wait in the backlog until the lifespan has started
    url = f"http://{host}:{sock.getsockname()[1]}"
    if app.state.webhook_url == "self":  # callbacks to this very address
        app.state.webhook_url = f"{url}/apimart"
    print(json.dumps({"url": url}), flush=True)
    config = uvicorn.Config(app, timeout_graceful_shutdown=grace, log_level="info")
    await Server(config, app).serve(sockets=[sock])


async def serve_emulated(ns: argparse.Namespace, folder: str) -> None:
    from apimart_async.emulator import Emulator

    async with Emulator() as emu:
        print(f"emulator at {emu.base_url}", file=sys.stderr)
        app = create_app(
            api_key=emu.api_key,
            base_url=emu.base_url,
            journal=_journal(ns, os.path.join(folder, "apimart-web.sqlite")),
            batch_dir=ns.batch_dir or os.path.join(folder, "batches"),
            poll=_poll(ns.poll_lag),
            grace=ns.grace,
            webhook_url=ns.webhook_url,
        )
        await serve(app, ns.host, ns.port, ns.grace)


def _journal(ns: argparse.Namespace, default: str) -> str | am.PostgresJournal:
    """``--journal``: a file, or a ``postgresql://`` database shared by every replica (the
    replicas share the client name ``web-backend``, in ``--schema``)."""
    journal: str = ns.journal or default
    if journal.startswith(("postgresql://", "postgres://")):
        return am.PostgresJournal(journal, name="web-backend", schema=ns.schema)
    return journal


def _poll(lag: float) -> am.PollPolicy:
    return am.PollPolicy(target_lag=lag, first_check=min(2.0, lag), min_interval=min(1.0, lag))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--emulate", action="store_true", help="run against the built-in emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free one")
    parser.add_argument(
        "--journal",
        help="the client's journal: a file (default apimart-web.sqlite), or a"
        " postgresql://user@host/db URL shared by every replica",
    )
    parser.add_argument(
        "--schema", default="apimart", help="with a postgresql:// journal: its schema"
    )
    parser.add_argument("--batch-dir", help="the batches' inputs and journals (default batches/)")
    parser.add_argument(
        "--grace", type=int, default=10, help="seconds a shutdown waits (default 10)"
    )
    parser.add_argument(
        "--poll-lag", type=float, default=1.0, help="PollPolicy.target_lag (default 1 s)"
    )
    parser.add_argument(
        "--webhook-url",
        help="base URL APIMart calls back (this app's /apimart, public), or 'self' for the "
        "address it listens on (the emulator calls back on loopback)",
    )
    ns = parser.parse_args(argv)
    if not ns.emulate and not os.environ.get("APIMART_API_KEY"):
        parser.error("set APIMART_API_KEY to your key, or use --emulate")
    try:  # a journal URL, a schema or a webhook URL that cannot be used: said now
        _journal(ns, "apimart-web.sqlite")
        check_webhook_url(ns.webhook_url)
    except am.ApimartError as exc:
        parser.error(str(exc))
    with contextlib.suppress(KeyboardInterrupt):
        if ns.emulate:
            # uvicorn raises SIGTERM again once it has shut down: end as Ctrl-C does, so that
            # the temporary folder (the journal, the batches) is removed
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            with tempfile.TemporaryDirectory(prefix="apimart-web-") as folder:
                asyncio.run(serve_emulated(ns, folder))
        else:
            app = create_app(
                journal=_journal(ns, "apimart-web.sqlite"),
                batch_dir=ns.batch_dir or "batches",
                poll=_poll(ns.poll_lag),
                grace=ns.grace,
                webhook_url=ns.webhook_url,
            )
            asyncio.run(serve(app, ns.host, ns.port, ns.grace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

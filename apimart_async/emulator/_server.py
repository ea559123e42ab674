"""The emulator's aiohttp.web server and its ``Emulator`` handle.

Shapes follow apimart-api.md. Where that page says [assumed], this emulator picks one plausible
shape and says so here:

- batch status replies ``{"code": 200, "data": [task, ...]}``, unknown ids absent, <= 100 ids;
- an unknown or expired task is HTTP 404 with ``type`` ``invalid_request_error``;
- a 409 carries its sub-code (``idempotency_in_progress``, ...) in both ``error.type`` and
  ``error.code``.

Service variants (constructor keywords, ``python -m apimart_async.emulator`` flags, and
attributes a test may change while the emulator runs) play the other shapes apimart-api.md
says the real service may have:

- ``batch_route``: ``"ok"`` (True, the default), ``"absent"`` (False: 404 as a missing route),
  ``"refuse"`` (400 for our body), ``"partial"`` (a random third of the live tasks left out of
  each reply), ``"nested"`` (``{"data": {"tasks": [...]}}``) or ``"keyed"`` (``{"data": {id:
  task}}``). ``batch_hidden`` is a set of ids every batch reply leaves out.
- ``unknown_task``: an unknown or expired task id is answered ``"404"`` (default), ``"400"``
  (``invalid task ID``) or ``"200"`` (HTTP 200 with ``{"code": 404, ..., "data": null}``).
- ``conflict_code_in``: the 409 sub-code in ``"both"`` (default), only ``"type"`` (``code`` is
  409) or only ``"code"`` (``type`` is ``invalid_request_error``).
- ``status_names``: the word the service uses for a status, e.g. ``{"completed": "success"}``.
- fields a model does not take are ignored (as JSON APIs usually do);
- a task's price is held at submit and given back if the task fails or is cancelled;
- result files are served by the emulator itself under ``/files/``, without auth, like a CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, Literal, cast
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from ._faults import FaultPlan
from ._json import is_array
from ._network import NETWORK_PROFILES, LocalCA, Network, NetworkProfile
from ._realistic import PROFILES, RealisticProfile, RttMiddleware
from ._rules import RuleError, check_body, price
from ._state import TERMINAL, Clock, EmuTask, IdemRecord, Mode, State, _pattern, file_bytes
from ._store import Snapshot, StateFile

__all__ = ["Emulator"]

logger = logging.getLogger("apimart_async.emulator")

RESPONSE_VERSION_OBJECT: Final = "2026-07-27"
MAX_UPLOAD: Final = 20 * 1024 * 1024
BATCH_MAX: Final = 100
_LANG_NOT_FOUND: Final = {
    "en": "task does not exist or has expired",
    "zh": "任务不存在或已过期",
    "ja": "タスクが存在しないか、有効期限が切れています",
    "ko": "작업이 존재하지 않거나 만료되었습니다",
}
_RANGE: Final = re.compile(r"^bytes=(\d*)-(\d*)$")

Handler = Callable[[web.Request, float], Awaitable[web.StreamResponse]]

BatchRoute = Literal["ok", "absent", "refuse", "partial", "nested", "keyed"]
BATCH_ROUTES: Final = ("ok", "absent", "refuse", "partial", "nested", "keyed")
UnknownTask = Literal["404", "400", "200"]
UNKNOWN_TASK_REPLIES: Final = ("404", "400", "200")
ConflictPlacement = Literal["both", "type", "code"]
CONFLICT_PLACEMENTS: Final = ("both", "type", "code")


def _error(
    status: int,
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: Any = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    err: dict[str, Any] = {
        "code": status if code is None else code,
        "message": message,
        "type": type_,
    }
    if param is not None:
        err["param"] = param
    body = {"error": err, "request_id": "req_" + secrets.token_hex(8)}
    return web.json_response(body, status=status, headers=headers)


def _is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Emulator:
    """A local APIMart on loopback, for tests, demos and benchmarks.

    ::

        async with Emulator(mode="manual") as emu:
            client = AsyncApimart(emu.api_key, base_url=emu.base_url)
            ...
            emu.complete(task_id)

    Args:
        mode: ``auto`` (tasks finish after ``task_duration`` seconds of the emulator's clock)
            or ``manual`` (tasks stay put until ``complete()`` / ``fail()`` / ``set_running()``).
        task_duration: seconds, or a (low, high) range drawn uniformly per task.
        estimate_error: ``estimated_time`` is the true duration times 1 +/- this.
        failure_rate: fraction of auto-mode tasks that end ``failed``.
        balance: starting USD balance; None for an unlimited key (``remain_balance`` -1).
        frozen_clock: the clock moves only by ``advance()``; otherwise with real time too.
        batch_route: how ``POST /v1/tasks/batch`` behaves (see the module docstring); True is
            ``"ok"``, False is ``"absent"`` (404 as a missing route).
        unknown_task: how an unknown or expired task id is answered: ``"404"``, ``"400"`` or
            ``"200"`` (an error code inside a 200 reply).
        conflict_code_in: where a 409's sub-code goes: ``"both"``, ``"type"`` or ``"code"``.
        status_names: the service's word for a status (``{"completed": "succeeded"}``).
        video_bytes: size of each result file. seed: makes ids, durations, failures repeatable.
        file_chunk_delay: real seconds of pause after each 256 KiB of a result file.
        network: ``loopback`` (default: every reply in one piece, uncompressed) or ``real``
            (gzip when accepted, small segments with pauses, sometimes chunked; see
            ``_network``), drawn from ``seed``.
        tls: serve https on loopback: True makes a private CA (``ca_file``,
            ``client_ssl_context()``; needs ``trustme``), or pass a server ``ssl.SSLContext``.
        state_path: a file that keeps the service's state across restarts (see ``_store``):
            tasks, balance, idempotency keys and the clock are loaded from it at ``start()``
            and saved on every change and at ``stop()``. An emulator restarted on the same
            file answers for the same tasks, and tasks created before go on with its clock,
            so a batch interrupted with Ctrl-C resumes against the same tasks. The seed and
            file size that made earlier result files are taken from the file.
        profile: ``"default"`` or ``"realistic"`` (minute-long jobs per model, ``estimated_time``
            off by up to 25 %, uneven progress, a 0.2 s round trip on every reply; see
            ``_realistic``), or a ``RealisticProfile`` with other numbers. With a realistic
            profile, ``task_duration`` and ``estimate_error`` are the profile's.
        time_scale: the emulator's clock runs this many times faster than real time (round
            trips shrink with it). A client scheduling on the same time reads
            ``clock.monotonic`` and ``clock.now`` and divides its real waits by the scale.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: Mode = "auto",
        task_duration: float | tuple[float, float] = (2.0, 6.0),
        estimate_error: float = 0.2,
        failure_rate: float = 0.0,
        seed: int = 0,
        balance: float | None = 1000.0,
        video_bytes: int = 64 * 1024,
        video_ttl: float = 24 * 3600,
        task_ttl: float = 3 * 24 * 3600,
        frozen_clock: bool = False,
        batch_route: bool | BatchRoute = True,
        unknown_task: UnknownTask = "404",
        conflict_code_in: ConflictPlacement = "both",
        status_names: dict[str, str] | None = None,
        blocked_words: tuple[str, ...] = ("[blocked]",),
        webhook_retry_delays: tuple[float, ...] = (10.0, 30.0, 60.0),
        file_chunk_delay: float = 0.0,
        network: Network = "loopback",
        tls: bool | ssl.SSLContext = False,
        state_path: str | os.PathLike[str] | None = None,
        profile: str | RealisticProfile = "default",
        time_scale: float = 1.0,
    ) -> None:
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
            realistic = RealisticProfile() if profile == "realistic" else None
        elif isinstance(profile, RealisticProfile):
            realistic = profile
        else:
            raise ValueError("profile must be 'default', 'realistic' or a RealisticProfile")
        if network not in NETWORK_PROFILES:
            raise ValueError(f"network must be one of {', '.join(NETWORK_PROFILES)}")
        if mode not in ("auto", "manual"):
            raise ValueError("mode must be 'auto' or 'manual'")
        if not _is_loopback_url(f"http://{host}/"):
            raise ValueError("the emulator listens on loopback only")
        self.api_key: str = api_key or "sk-emu-" + secrets.token_hex(16)
        """The key the emulator accepts (random unless given)."""
        self.host = host
        """The loopback address it listens on."""
        self.port: int = port
        """The port it listens on (the one picked, once started with port 0)."""
        self.batch_route = batch_route  # normalised by the setter
        if unknown_task not in UNKNOWN_TASK_REPLIES:
            raise ValueError(f"unknown_task must be one of {', '.join(UNKNOWN_TASK_REPLIES)}")
        if conflict_code_in not in CONFLICT_PLACEMENTS:
            raise ValueError(f"conflict_code_in must be one of {', '.join(CONFLICT_PLACEMENTS)}")
        self.unknown_task: UnknownTask = unknown_task
        """How an unknown task id is answered ("404", "400" or "200"); may change at run time."""
        self.conflict_code_in: ConflictPlacement = conflict_code_in
        """Where a 409 sub-code goes ("both", "type" or "code"); may change at run time."""
        self.batch_hidden: set[str] = set()
        """Ids every batch status reply leaves out (the task still exists); a test may add ids."""
        self.webhook_retry_delays = webhook_retry_delays
        """Seconds between webhook delivery attempts."""
        self.file_chunk_delay = file_chunk_delay
        """Real seconds to pause after each 256 KiB of a result file (a slow CDN)."""
        self.clock: Clock = Clock(frozen=frozen_clock, scale=time_scale)
        """The emulated service's clock (``advance()`` moves it)."""
        self.profile = realistic
        """The realistic profile's numbers, or None for the default profile."""
        self.rtt: RttMiddleware | None = (
            RttMiddleware(realistic, seed, lambda: self.clock.scale)
            if realistic is not None and realistic.rtt > 0
            else None
        )
        """The round trip added to every reply (realistic profile with ``rtt > 0``), or None."""
        self.faults: FaultPlan = FaultPlan(seed)
        """Faults to inject (``inject()``, ``set_rate()``)."""
        self.state: State = State(
            api_key=self.api_key,
            mode=mode,
            task_duration=task_duration,
            estimate_error=estimate_error,
            failure_rate=failure_rate,
            seed=seed,
            balance=balance,
            video_bytes=video_bytes,
            video_ttl=video_ttl,
            task_ttl=task_ttl,
            clock=self.clock,
            blocked_words=blocked_words,
            status_names=status_names,
            profile=realistic,
        )
        """The emulator's internals (tasks, counters), for white-box assertions; no stable API."""
        self.webhook_deliveries: list[tuple[str, str, int | str]] = []
        """Webhook deliveries made: (url, task id, HTTP status or the error's class name)."""
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self.base_url: str = ""
        """``http://host:port`` once started."""
        self.network = network
        """The network profile: ``"loopback"`` or ``"real"``."""
        self.network_profile: NetworkProfile | None = (
            NetworkProfile(seed) if network == "real" else None
        )
        """The ``real`` profile's middleware and its counts, or None."""
        self._tls = tls
        self.ca: LocalCA | None = None
        """The private CA when ``tls=True`` (made at start, removed at stop)."""
        self.state_path: Path | None = Path(state_path) if state_path is not None else None
        """Where the state is kept across restarts (None: nowhere)."""
        self._store = StateFile(self.state_path) if self.state_path is not None else None

    @property
    def ca_file(self) -> str | None:
        """PEM file of the private CA when ``tls=True`` (for ``SSL_CERT_FILE``), else None."""
        return self.ca.ca_file if self.ca is not None else None

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client SSL context that trusts this emulator's private CA (``tls=True`` only)."""
        if self.ca is None:
            raise RuntimeError("client_ssl_context() needs Emulator(tls=True), started")
        return self.ca.client_context()

    @property
    def batch_route(self) -> BatchRoute:
        """How the batch status route behaves now (see the module docstring); settable, also
        with True (``"ok"``) or False (``"absent"``)."""
        return self._batch_route

    @batch_route.setter
    def batch_route(self, value: bool | BatchRoute) -> None:
        if value is True:
            value = "ok"
        elif value is False:
            value = "absent"
        if value not in BATCH_ROUTES:
            raise ValueError(f"batch_route must be True, False or one of {', '.join(BATCH_ROUTES)}")
        self._batch_route: BatchRoute = value

    def __repr__(self) -> str:
        s = self.state
        return (
            f"<Emulator {self.base_url or 'not started'} mode={s.mode} "
            f"tasks={len(s.tasks)} unfinished={s.unfinished} requests={sum(s.requests.values())}>"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (prefer ``async with``)."""
        snap = self._load_state()
        middlewares = [self.network_profile.middleware] if self.network_profile else []
        if self.rtt is not None:  # outermost: the round trip covers the whole reply
            middlewares.insert(0, self.rtt.middleware)
        app = web.Application(client_max_size=MAX_UPLOAD + 1024 * 1024, middlewares=middlewares)
        app.router.add_post("/v1/videos/generations", self._wrap("submit", self._submit))
        app.router.add_post("/v1/tasks/batch", self._wrap("batch", self._batch))
        app.router.add_get("/v1/tasks/{task_id}", self._wrap("task", self._task))
        app.router.add_get("/v1/balance", self._wrap("balance", self._balance))
        app.router.add_get("/v1/user/balance", self._wrap("balance", self._balance))
        app.router.add_post("/v1/uploads/images", self._wrap("upload", self._upload))
        app.router.add_get("/files/{task_id}/{n}.mp4", self._wrap("file", self._file, auth=False))
        app.router.add_get("/uploads/{name}", self._uploaded)
        app.router.add_get("/_emulator/stats", self._stats)
        app.router.add_post("/_emulator/advance", self._advance)
        app.router.add_get("/_emulator/finished", self._finished)
        app.router.add_post("/_emulator/tasks", self._create_tasks)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        server_ssl: ssl.SSLContext | None = None
        if isinstance(self._tls, ssl.SSLContext):
            server_ssl = self._tls
        elif self._tls:
            self.ca = self.ca or LocalCA()
            server_ssl = self.ca.server_context()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=server_ssl)
        if self.port == 0 and snap is not None and snap.port:
            # Back on the port of the earlier run if it is free, so result URLs handed out
            # then (a download cut by a restart) still work, as a CDN's would.
            again = web.TCPSite(self._runner, self.host, snap.port, ssl_context=server_ssl)
            try:
                await again.start()
                site = again
            except OSError:
                await site.start()
        else:
            await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        if not sockets:
            raise RuntimeError("the emulator did not get a listening socket")
        self.port = sockets[0].getsockname()[1]
        scheme = "https" if server_ssl is not None else "http"
        self.base_url = f"{scheme}://{self.host}:{self.port}"
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._ticker = asyncio.create_task(self._tick(), name="apimart-emulator-ticker")
        if self._store is not None:
            self._save_state()
            store, state = self._store, self.state
            state.on_change = lambda task: store.append(
                task, self.clock.now(), (state.remain_balance, state.used_balance)
            )

    async def stop(self) -> None:
        """Stop listening and end background work."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.ca is not None:
            self.ca.cleanup()
            self.ca = None
        self._save_state(final=True)

    def _load_state(self) -> Snapshot | None:
        if self._store is None:
            return None
        state = self.state
        snap = self._store.load()
        if snap is not None:
            if (snap.seed, snap.video_bytes) != (state.seed, state.video_bytes):
                state.seed, state.video_bytes = snap.seed, snap.video_bytes
                state.pattern = _pattern(snap.seed)
            rng = snap.rng
            if is_array(rng) and len(rng) == 3 and is_array(rng[1]):
                with contextlib.suppress(TypeError, ValueError):
                    state.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
            state.unlimited = snap.unlimited
            state.remain_balance, state.used_balance = snap.remain_balance, snap.used_balance
            self.clock.resume_from(snap.now)
            state.restore(snap.tasks, keep_for=state.task_ttl)
        return snap

    def _save_state(self, *, final: bool = False) -> None:
        """Rewrite the state file compactly (atomic); later changes are appended to it."""
        if self._store is None:
            return
        s = self.state
        header = {
            "seed": s.seed,
            "video_bytes": s.video_bytes,
            "now": self.clock.now(),
            "unlimited": s.unlimited,
            "balance": [s.remain_balance, s.used_balance],
            "rng": s.rng.getstate(),
            "port": self.port,
        }
        self._store.rewrite(header, list(s.tasks.values()))
        if final:  # stopped: nothing more to append
            s.on_change = None
            self._store.close()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- controls ----------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the emulator's clock forward; tasks due by then finish now."""
        self.clock.advance(seconds)
        self._after_change()

    def set_running(self, task_id: str, progress: int = 0, status: str = "processing") -> None:
        """Manual mode: report the task as running with ``progress`` (any status string)."""
        self.state.set_running(task_id, progress, status)
        self._after_change()

    def complete(self, task_id: str, *, videos: int = 1) -> None:
        """End a task ``completed`` with ``videos`` result files (0: a completed task whose
        reply carries no video URL)."""
        self.state.complete(task_id, videos=videos)
        self._after_change([self.state.tasks[task_id]])

    def fail(
        self,
        task_id: str,
        *,
        code: int | str = "generation_failed",
        message: str = "Video generation failed",
        type: str = "task_error",
    ) -> None:
        """Manual mode: the task fails now, with this error."""
        self.state.fail(task_id, code=code, message=message, type=type)
        self._after_change([self.state.tasks[task_id]])

    def cancel(self, task_id: str) -> None:
        """Manual mode: the task is cancelled now."""
        self.state.cancel(task_id)
        self._after_change([self.state.tasks[task_id]])

    def complete_all(self) -> int:
        """Manual mode: complete every unfinished task; returns how many."""
        ids = [t.id for t in self.state.tasks.values() if t.status not in TERMINAL]
        for task_id in ids:
            self.state.complete(task_id)
        self._after_change([self.state.tasks[t] for t in ids])
        return len(ids)

    def create_tasks(self, count: int, body: dict[str, Any] | None = None) -> list[str]:
        """Create ``count`` tasks at once, as if each had been submitted with ``body`` (default:
        a sora-2-preview prompt) and no idempotency key; returns their ids. For load tests that
        need many pending tasks without paying for many POSTs (use manual mode to keep them
        pending)."""
        if not isinstance(count, int) or count < 0:
            raise ValueError("count must be a non-negative integer")
        body = body if body is not None else {"model": "sora-2-preview", "prompt": "load"}
        model, params = check_body(body)
        tasks = [self.state.create_task(model, params, body, None) for _ in range(count)]
        self._after_change([t for t in tasks if t.status in TERMINAL])
        self._wake.set()
        return [t.id for t in tasks]

    def task(self, task_id: str) -> dict[str, Any]:
        """The task as the status endpoint would report it now."""
        self.state.sweep()
        return self.state.task_object(self.state.get(task_id), self.base_url)

    def task_ids(self) -> list[str]:
        """Every task created, in creation order."""
        return list(self.state.tasks)

    def file_sha256(self, task_id: str, n: int = 0) -> str:
        """The sha256 of a task's result file, computed as the server would send it."""
        h = hashlib.sha256()
        size = self.state.video_bytes
        for start in range(0, size, 1 << 20):
            h.update(
                file_bytes(
                    self.state.pattern, f"{task_id}/{n}", start, min(size, start + (1 << 20)), size
                )
            )
        return h.hexdigest()

    @property
    def counters(self) -> dict[str, int]:
        """Requests received, by endpoint (submit, task, batch, balance, upload, file)."""
        return dict(self.state.requests)

    @property
    def tasks_created(self) -> int:
        """How many tasks were created (a submit retried with its key creates one)."""
        return len(self.state.tasks)

    @property
    def tasks_per_key(self) -> dict[str, int]:
        """Tasks created per idempotency key (more than 1 anywhere would be a double charge)."""
        return dict(self.state.tasks_per_key)

    def stats(self) -> dict[str, Any]:
        """Counters and balance as one dict, for reports."""
        s = self.state
        return {
            "requests": dict(s.requests),
            "statuses": {f"{ep} {code}": n for (ep, code), n in sorted(s.statuses.items())},
            "tasks_created": len(s.tasks),
            "unfinished": s.unfinished,
            "max_unfinished": s.max_unfinished,
            "max_in_flight": dict(s.max_in_flight),
            "duplicate_keys": sum(1 for n in s.tasks_per_key.values() if n > 1),
            "submits_without_key": s.submits_without_key,
            "faults_served": {
                f"{ep} {kind}": n for (ep, kind), n in sorted(self.faults.served.items())
            },
            "remain_balance": -1 if s.unlimited else round(s.remain_balance, 6),
            "used_balance": round(s.used_balance, 6),
            "file_requests_with_auth": s.file_requests_with_auth,
        }

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait (without polling) until ``predicate()`` holds; it is re-checked after every
        request and every change. Raises TimeoutError after ``timeout`` real seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("emulator condition not reached in time")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    # -- internals ---------------------------------------------------------------------------

    def _after_change(self, finished: list[EmuTask] | None = None) -> None:
        for task in finished or ():
            self._on_finished(task)
        self._wake.set()
        self._changed.set()

    async def _tick(self) -> None:
        """Finish auto-mode tasks on time even when nobody asks (for webhooks, balances)."""
        while True:
            for task in self.state.sweep():
                self._on_finished(task)
            self._changed.set()
            due = self.state.next_due()
            wait = (
                1.0
                if due is None or self.clock.frozen
                else min(1.0, max(0.001, (due - self.clock.now()) / self.clock.scale))
            )
            self._wake.clear()
            # not asyncio.wait_for: on 3.11 it can swallow the cancellation of stop() when the
            # event is set at the same moment, and the ticker would never end
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    def _on_finished(self, task: EmuTask) -> None:
        webhook = task.body.get("webhook")
        if isinstance(webhook, str) and webhook:
            job = asyncio.ensure_future(self._deliver(webhook.rstrip("/") + "/callback", task))
            self._background.add(job)
            job.add_done_callback(self._background.discard)

    async def _deliver(self, url: str, task: EmuTask) -> None:
        """POST the task object to the webhook; retried on timeout or 5xx, not on 4xx."""
        if not _is_loopback_url(url):
            self.webhook_deliveries.append((url, task.id, "refused: not loopback"))
            return
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        payload = self.state.task_object(task, self.base_url)
        for delay in (0.0, *self.webhook_retry_delays):
            if delay:
                await asyncio.sleep(delay)
            try:
                async with self._http.post(url, json=payload) as resp:
                    self.webhook_deliveries.append((url, task.id, resp.status))
                    if resp.status < 500:
                        return
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.webhook_deliveries.append((url, task.id, type(exc).__name__))
            finally:
                self._changed.set()

    def _wrap(
        self, endpoint: str, handler: Handler, *, auth: bool = True
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        state = self.state

        async def wrapped(request: web.Request) -> web.StreamResponse:
            state.requests[endpoint] += 1
            state.in_flight[endpoint] += 1
            state.max_in_flight[endpoint] = max(
                state.max_in_flight[endpoint], state.in_flight[endpoint]
            )
            self._changed.set()
            status = 0
            try:
                resp = await self._serve(request, endpoint, handler, auth)
                status = resp.status
                return resp
            finally:
                state.in_flight[endpoint] -= 1
                state.statuses[(endpoint, status)] += 1
                self._changed.set()

        return wrapped

    async def _serve(
        self, request: web.Request, endpoint: str, handler: Handler, auth: bool
    ) -> web.StreamResponse:
        fault = self.faults.next(endpoint)
        delay = 0.0
        if fault is not None:
            if fault.kind == "slow":
                delay = fault.delay
                if endpoint != "submit":
                    await asyncio.sleep(delay)
            elif fault.kind == "status":
                headers = (
                    {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
                )
                return _error(
                    fault.status,
                    fault.message or "injected error",
                    fault.type or "server_error",
                    headers=headers,
                )
            elif fault.kind == "reply":
                return web.Response(
                    status=fault.status, body=fault.body, content_type="application/json"
                )
            elif fault.kind == "drop":
                return await self._drop(request)
            elif fault.kind == "malformed":
                return web.Response(
                    status=200,
                    body=b'{"code": 200, "data": [{"status": "subm',
                    content_type="application/json",
                )
            elif fault.kind == "truncated":
                return await self._truncated(request)
        if auth:
            header = request.headers.get("Authorization", "")
            if not header.startswith("Bearer ") or not secrets.compare_digest(
                header[7:].strip(), self.api_key
            ):
                return web.json_response(
                    {
                        "error": {
                            "message": "API key is required or invalid",
                            "type": "apimart_error",
                            "code": 401,
                        }
                    },
                    status=401,
                )
        else:
            if "Authorization" in request.headers:
                self.state.file_requests_with_auth += 1
        for task in self.state.sweep():
            self._on_finished(task)
        resp = await handler(request, delay)
        if fault is not None and fault.kind == "lost_reply":
            return await self._drop(request)
        return resp

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        """Close the connection without a reply."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise asyncio.CancelledError

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        body = json.dumps(
            {"code": 200, "data": {"id": "task_cut", "status": "processing"}}
        ).encode()
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "application/json", "Content-Length": str(len(body) + 64)},
        )
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        return await self._drop(request)

    # -- endpoints ---------------------------------------------------------------------------

    async def _submit(self, request: web.Request, delay: float) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON", "invalid_request_error")
        state = self.state
        key = request.headers.get("Idempotency-Key")
        record: IdemRecord | None = None
        if key is not None:
            if not key or len(key) > 255:
                return _error(
                    400,
                    "Idempotency-Key must be 1 to 255 characters",
                    "invalid_request_error",
                    param="Idempotency-Key",
                )
            body_hash = state.body_hash(body)
            record = state.idempotency.get(key)
            if record is not None:
                if record.body_hash != body_hash:
                    return self._conflict(
                        "Idempotency-Key was already used with a different request body",
                        "idempotency_key_reused",
                    )
                if record.in_progress:
                    return self._conflict(
                        "A request with this Idempotency-Key is still being processed",
                        "idempotency_in_progress",
                        headers={"Retry-After": "1"},
                    )
                return self._submitted(request, record.task_id or "")
            record = IdemRecord(body_hash)
            state.idempotency[key] = record
            self._changed.set()
        try:
            if delay:
                await asyncio.sleep(delay)
            try:
                model, params = check_body(body)
            except RuleError as exc:
                return _error(400, exc.message, "invalid_request_error", param=exc.param)
            if not state.can_pay(price(model, params)):
                return _error(402, "Insufficient balance", "payment_required")
            task = state.create_task(model, params, body, key)
            if record is not None:
                record.task_id = task.id
                record.in_progress = False
            if task.status in TERMINAL:
                self._after_change([task])
            else:
                self._wake.set()
            return self._submitted(request, task.id)
        finally:
            if record is not None and record.in_progress:
                state.idempotency.pop(key or "", None)

    def _conflict(
        self, message: str, sub_code: str, *, headers: dict[str, str] | None = None
    ) -> web.Response:
        """A 409 with its sub-code where ``conflict_code_in`` says."""
        placement = self.conflict_code_in
        type_ = sub_code if placement in ("both", "type") else "invalid_request_error"
        code = sub_code if placement in ("both", "code") else 409
        return _error(409, message, type_, code=code, headers=headers)

    def _submitted(self, request: web.Request, task_id: str) -> web.Response:
        version = request.headers.get("X-APIMart-Response-Version", "")
        if version and version >= RESPONSE_VERSION_OBJECT:
            return web.json_response({"code": 200, "data": {"id": task_id, "status": "submitted"}})
        return web.json_response(
            {"code": 200, "data": [{"status": "submitted", "task_id": task_id}]}
        )

    def _not_found(self, request: web.Request) -> web.Response:
        lang = request.query.get("language", "en")
        message = _LANG_NOT_FOUND.get(lang, _LANG_NOT_FOUND["en"])
        if self.unknown_task == "400":
            # the vendor's error table: 400 "invalid task ID" for task queries
            return _error(400, f"invalid task ID: {message}", "invalid_request_error")
        if self.unknown_task == "200":
            # the vendor's CLI checks ``code != 200`` on 200 replies
            return web.json_response({"code": 404, "message": message, "data": None})
        return _error(404, message, "invalid_request_error")

    async def _task(self, request: web.Request, delay: float) -> web.StreamResponse:
        task = self.state.tasks.get(request.match_info["task_id"])
        if task is None or self.state.expired(task):
            return self._not_found(request)
        return web.json_response({"code": 200, "data": self.state.task_object(task, self.base_url)})

    async def _batch(self, request: web.Request, delay: float) -> web.StreamResponse:
        variant = self.batch_route
        if variant == "absent":
            return web.Response(status=404, text="404: Not Found")
        if variant == "refuse":
            return _error(
                400, "ids is required", "invalid_request_error", param="ids"
            )  # it wants another body than ours
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON", "invalid_request_error")
        raw: Any = cast("dict[str, Any]", body).get("task_ids") if isinstance(body, dict) else None
        items: list[object] = cast("list[object]", raw) if isinstance(raw, list) else []
        ids = [i for i in items if isinstance(i, str)]
        if not isinstance(raw, list) or len(ids) != len(items):
            return _error(
                400,
                "task_ids must be an array of task ids",
                "invalid_request_error",
                param="task_ids",
            )
        if len(ids) > BATCH_MAX:
            return _error(
                400,
                f"at most {BATCH_MAX} task_ids per request",
                "invalid_request_error",
                param="task_ids",
            )
        data: list[dict[str, Any]] = []
        for task_id in ids:
            task = self.state.tasks.get(task_id)
            if task is None or self.state.expired(task) or task_id in self.batch_hidden:
                continue
            if variant == "partial" and self.state.rng.random() < 1 / 3:
                continue  # a live task left out: absence proves nothing
            data.append(self.state.task_object(task, self.base_url))
        if variant == "nested":
            return web.json_response({"code": 200, "data": {"tasks": data, "total": len(data)}})
        if variant == "keyed":
            return web.json_response({"code": 200, "data": {t["id"]: t for t in data}})
        return web.json_response({"code": 200, "data": data})

    async def _balance(self, request: web.Request, delay: float) -> web.StreamResponse:
        s = self.state
        remain = -1.0 if s.unlimited else round(s.remain_balance, 6)
        return web.json_response(
            {
                "success": True,
                "remain_balance": remain,
                "used_balance": round(s.used_balance, 6),
                "remain_credits": -1 if s.unlimited else round(s.remain_balance * 10, 4),
                "used_credits": round(s.used_balance * 10, 4),
                "unlimited_quota": s.unlimited,
                "message": "",
            }
        )

    async def _upload(self, request: web.Request, delay: float) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            return _error(
                400,
                "upload must be multipart/form-data with a 'file' field",
                "invalid_request_error",
                param="file",
            )
        try:
            form = await request.post()
        except (ValueError, web.HTTPRequestEntityTooLarge):
            return _error(413, "file must be at most 20 MB", "invalid_request_error", param="file")
        field = form.get("file")
        if not isinstance(field, web.FileField):
            return _error(400, "missing 'file' field", "invalid_request_error", param="file")
        data = field.file.read()
        if len(data) > MAX_UPLOAD:
            return _error(413, "file must be at most 20 MB", "invalid_request_error", param="file")
        kind = _sniff(data)
        if kind is None:
            return _error(
                400,
                "only JPEG, PNG, WebP and GIF images are supported",
                "invalid_request_error",
                param="file",
            )
        name = f"img_{secrets.token_hex(8)}.{kind[1]}"
        now = self.clock.now()
        self.state.uploads[name] = (kind[0], data, now)
        return web.json_response(
            {
                "url": f"{self.base_url}/uploads/{name}",
                "filename": field.filename or name,
                "content_type": kind[0],
                "bytes": len(data),
                "created_at": int(now),
            }
        )

    async def _uploaded(self, request: web.Request) -> web.StreamResponse:
        item = self.state.uploads.get(request.match_info["name"])
        if item is None or self.clock.now() - item[2] > 72 * 3600:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=item[1], content_type=item[0])

    async def _file(self, request: web.Request, delay: float) -> web.StreamResponse:
        task = self.state.tasks.get(request.match_info["task_id"])
        try:
            n = int(request.match_info["n"])
        except ValueError:
            n = -1
        if task is None or task.status != "completed" or not 0 <= n < task.videos:
            return web.Response(status=404, text="Not Found")
        if task.expires_at is not None and self.clock.now() >= task.expires_at:
            return web.Response(status=403, text="Request has expired")
        size = self.state.video_bytes
        start, end = 0, size
        status = 200
        rng = request.headers.get("Range")
        if rng is not None:
            m = _RANGE.match(rng.strip())
            if m is None or (not m.group(1) and not m.group(2)):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start = max(0, size - int(m.group(2)))
            if start >= size or start >= end:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
        headers = {
            "Content-Type": "video/mp4",
            "Accept-Ranges": "bytes",
            "Content-Length": str(end - start),
            "ETag": f'"{task.id}-{n}"',
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        name = f"{task.id}/{n}"
        chunk = 256 * 1024
        for pos in range(start, end, chunk):
            await resp.write(file_bytes(self.state.pattern, name, pos, min(end, pos + chunk), size))
            if self.file_chunk_delay:
                await asyncio.sleep(self.file_chunk_delay)
        await resp.write_eof()
        return resp

    # -- admin (for an emulator in another process) --------------------------------------------

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats())

    async def _finished(self, request: web.Request) -> web.StreamResponse:
        """Exact finish times (emulator clock, Unix seconds) of ended tasks, for benchmarks."""
        tasks = self.state.tasks
        return web.json_response(
            {t: tasks[t].finished_at for t in self.state.finished_log if t in tasks}
        )

    async def _create_tasks(self, request: web.Request) -> web.StreamResponse:
        """``{"count": N, "body": {...}}`` -> ``{"task_ids": [...]}`` (see ``create_tasks``)."""
        try:
            data = await request.json()
            ids = self.create_tasks(int(data.get("count", 0)), data.get("body"))
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, str(exc), "invalid_request_error")
        except RuleError as exc:
            return _error(400, exc.message, "invalid_request_error", param=exc.param)
        return web.json_response({"task_ids": ids})

    async def _advance(self, request: web.Request) -> web.StreamResponse:
        try:
            seconds = float((await request.json()).get("seconds", 0))
            self.advance(seconds)
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, str(exc), "invalid_request_error")
        return web.json_response({"now": self.clock.now()})


def _sniff(data: bytes) -> tuple[str, str] | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg", "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png", "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif", "gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    return None

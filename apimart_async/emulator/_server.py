"""The emulator's ``Emulator``: its settings, its lifecycle (the aiohttp server) and its
controls. Its routes are in ``_routes``, its work outside requests in ``_background``.

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
import os
import secrets
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ._background import Background, is_loopback_url
from ._faults import FaultPlan
from ._network import NETWORK_PROFILES, LocalCA, Network, NetworkProfile
from ._realistic import PROFILES, RealisticProfile, RttMiddleware
from ._routes import MAX_UPLOAD, Routes
from ._rules import check_body
from ._service import (
    BATCH_ROUTES,
    CONFLICT_PLACEMENTS,
    UNKNOWN_TASK_REPLIES,
    BatchRoute,
    ConflictPlacement,
    UnknownTask,
)
from ._state import TERMINAL, Clock, Mode, State, file_bytes
from ._store import StateFile

__all__ = ["Emulator"]

#: Real seconds ``stop()`` lets the requests in flight finish before it cuts them off.
_SHUTDOWN_GRACE = 0.5


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
        webhook_retry_delays: real seconds between the attempts of a webhook delivery that
            timed out or got a 5xx (the service's ~10/30/60 s).
        webhook_loss: fraction of webhook callbacks never delivered (the real service loses
            those to hosts it cannot reach); recorded in ``webhook_deliveries`` as ``"lost"``.
        webhook_duplicates: fraction of webhook callbacks delivered twice (the service may
            repeat one). Which callbacks are lost or repeated is drawn from ``seed`` and the
            task id, so a run is repeatable.
        webhook_delay: seconds of the emulator's clock (real seconds divided by
            ``time_scale``; over at once when ``advance()`` moves a frozen clock past them)
            between a task's end and its callback.
        file_chunk_delay: real seconds of pause after each 256 KiB of a result file (a slow
            CDN; a large value stalls it). Changing ``emu.file_chunk_delay`` at run time also
            ends the pauses under way, so a test can stall a transfer and then let it go.
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
        webhook_loss: float = 0.0,
        webhook_duplicates: float = 0.0,
        webhook_delay: float = 0.0,
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
        if not is_loopback_url(f"http://{host}/"):
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
        for name, value in (
            ("webhook_loss", webhook_loss),
            ("webhook_duplicates", webhook_duplicates),
            ("webhook_delay", webhook_delay),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        for name, value in (
            ("webhook_loss", webhook_loss),
            ("webhook_duplicates", webhook_duplicates),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
        if not 0.0 <= webhook_delay < float("inf"):
            raise ValueError(
                f"webhook_delay must be a number of seconds >= 0, got {webhook_delay!r}"
            )
        self.webhook_loss = webhook_loss
        """Fraction of webhook callbacks never delivered; may change at run time."""
        self.webhook_duplicates = webhook_duplicates
        """Fraction of webhook callbacks delivered twice; may change at run time."""
        self.webhook_delay = webhook_delay
        """Emulator seconds between a task's end and its callback; may change at run time."""
        self.seed = seed
        """What ids, durations, failures and webhook losses are drawn from."""
        self._file_chunk_delay = file_chunk_delay
        #: Replaced (and set) when the delay changes: ends the pauses under way.
        self._delay_changed = asyncio.Event()
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
        self._background = Background(self)
        self._routes = Routes(self, self._background)
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
        snap = self._store.restore(self.state, self.clock) if self._store is not None else None
        middlewares = [self.network_profile.middleware] if self.network_profile else []
        if self.rtt is not None:  # outermost: the round trip covers the whole reply
            middlewares.insert(0, self.rtt.middleware)
        app = web.Application(client_max_size=MAX_UPLOAD + 1024 * 1024, middlewares=middlewares)
        self._routes.add_to(app.router)
        # stop() ends the requests in flight after _SHUTDOWN_GRACE (a slow fault holds its
        # reply for seconds): the service goes away as a real one does, its clients cut off
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_GRACE
        )
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
        self._background.start()
        if self._store is not None:
            self._store.save(self.state, self.clock, self.port)
            store, state = self._store, self.state
            state.on_change = lambda task: store.append(
                task, self.clock.now(), (state.remain_balance, state.used_balance)
            )
            state.on_upload = lambda name: store.append_upload(name, state.uploads[name])

    async def stop(self) -> None:
        """Stop listening and end background work."""
        await self._background.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.ca is not None:
            self.ca.cleanup()
            self.ca = None
        if self._store is not None:  # saved compactly; stopped: nothing more to append
            self._store.save(self.state, self.clock, self.port)
            self.state.on_change = None
            self.state.on_upload = None
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
        self._background.after_change()

    def set_running(self, task_id: str, progress: int = 0, status: str = "processing") -> None:
        """Manual mode: report the task as running with ``progress`` (any status string)."""
        self.state.set_running(task_id, progress, status)
        self._background.after_change()

    def complete(self, task_id: str, *, videos: int = 1) -> None:
        """End a task ``completed`` with ``videos`` result files (0: a completed task whose
        reply carries no video URL)."""
        self.state.complete(task_id, videos=videos)
        self._background.after_change([self.state.tasks[task_id]])

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
        self._background.after_change([self.state.tasks[task_id]])

    def cancel(self, task_id: str) -> None:
        """Manual mode: the task is cancelled now."""
        self.state.cancel(task_id)
        self._background.after_change([self.state.tasks[task_id]])

    def complete_all(self) -> int:
        """Manual mode: complete every unfinished task; returns how many."""
        ids = [t.id for t in self.state.tasks.values() if t.status not in TERMINAL]
        for task_id in ids:
            self.state.complete(task_id)
        self._background.after_change([self.state.tasks[t] for t in ids])
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
        self._background.after_change([t for t in tasks if t.status in TERMINAL])
        self._background.wake()
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
    def file_chunk_delay(self) -> float:
        """Real seconds to pause after each 256 KiB of a result file (a slow CDN). Setting it
        ends the pauses under way (a stalled transfer goes on at the new pace)."""
        return self._file_chunk_delay

    @file_chunk_delay.setter
    def file_chunk_delay(self, seconds: float) -> None:
        self._file_chunk_delay = seconds
        changed, self._delay_changed = self._delay_changed, asyncio.Event()
        changed.set()

    async def file_chunk_pause(self) -> None:
        """The pause after a piece of a result file: ``file_chunk_delay`` seconds, or until
        the delay is changed."""
        changed = self._delay_changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), self._file_chunk_delay)

    @property
    def counters(self) -> dict[str, int]:
        """Requests received, by endpoint (submit, task, batch, balance, upload, file)."""
        return dict(self.state.requests)

    @property
    def tasks_created(self) -> int:
        """How many tasks were created (a submit retried with its key creates one)."""
        return len(self.state.tasks)

    @property
    def uploads_per_hash(self) -> dict[str, int]:
        """Images uploaded, by the sha256 of their content (1 each: every file sent once)."""
        return dict(self.state.uploads_per_hash)

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
            "uploads": sum(s.uploads_per_hash.values()),
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
        await self._background.wait_until(predicate, timeout)

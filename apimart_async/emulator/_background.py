"""The emulator's work outside requests (``Background``): the ticker that ends auto-mode
tasks on time even when nobody asks (for webhooks and balances), webhook deliveries, and the
change signal that ``Emulator.wait_until`` waits on (set after every request and change)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ._service import Service
from ._state import EmuTask

__all__ = ["Background", "is_loopback_url"]


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Background:
    """The ticker, the webhooks and the change signal of one emulator (``emu``)."""

    def __init__(self, emu: Service) -> None:
        self._emu = emu
        self._ticker: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._sleepers: set[asyncio.Event] = set()  # waits on the clock (see _sleep)
        self._http: aiohttp.ClientSession | None = None

    def start(self) -> None:
        """Start the ticker (on the running loop)."""
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._ticker = asyncio.create_task(self._tick(), name="apimart-emulator-ticker")

    async def stop(self) -> None:
        """End the ticker and the webhook deliveries under way."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for task in list(self._jobs):
            task.cancel()
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    def changed(self) -> None:
        """Something changed: ``wait_until`` checks its predicate again."""
        self._changed.set()

    def wake(self) -> None:
        """A task may be due sooner than the ticker thinks: it looks again."""
        self._wake.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """See ``Emulator.wait_until``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("emulator condition not reached in time")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def after_change(self, finished: list[EmuTask] | None = None) -> None:
        """The state changed (``finished``: tasks that ended with it, for their webhooks)."""
        for task in finished or ():
            self.finished(task)
        self._wake.set()
        self._changed.set()
        for sleeper in self._sleepers:
            sleeper.set()

    async def _sleep(self, seconds: float) -> None:
        """``seconds`` of the emulator's clock: real seconds divided by its scale, over as soon
        as a test's ``advance()`` moves the clock past them (a frozen clock never gets there
        by itself)."""
        clock = self._emu.clock
        due = clock.now() + seconds
        while (left := due - clock.now()) > 0:
            moved = asyncio.Event()
            self._sleepers.add(moved)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0 if clock.frozen else left / clock.scale):
                        await moved.wait()
            finally:
                self._sleepers.discard(moved)

    async def _tick(self) -> None:
        """Finish auto-mode tasks on time even when nobody asks (for webhooks, balances)."""
        while True:
            for task in self._emu.state.sweep():
                self.finished(task)
            self._changed.set()
            due = self._emu.state.next_due()
            wait = (
                1.0
                if due is None or self._emu.clock.frozen
                else min(1.0, max(0.001, (due - self._emu.clock.now()) / self._emu.clock.scale))
            )
            self._wake.clear()
            # not asyncio.wait_for: on 3.11 it can swallow the cancellation of stop() when the
            # event is set at the same moment, and the ticker would never end
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    def finished(self, task: EmuTask) -> None:
        """``task`` ended: deliver its webhook, if it has one (maybe not, maybe twice: the
        emulator's ``webhook_loss`` and ``webhook_duplicates``, drawn from its seed and the
        random part of the task id: not from its first part, the time, so a seed loses the
        same callbacks on every run)."""
        webhook = task.body.get("webhook")
        if isinstance(webhook, str) and webhook:
            url = webhook.rstrip("/") + "/callback"
            draw = random.Random(f"{self._emu.seed}:{task.id[-16:]}")
            if draw.random() < self._emu.webhook_loss:
                self._emu.webhook_deliveries.append((url, task.id, "lost"))
                self._changed.set()
                return
            times = 2 if draw.random() < self._emu.webhook_duplicates else 1
            for _ in range(times):
                job = asyncio.ensure_future(self._deliver(url, task))
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)

    async def _deliver(self, url: str, task: EmuTask) -> None:
        """POST the task object to the webhook; retried on timeout or 5xx, not on 4xx."""
        if not is_loopback_url(url):
            self._emu.webhook_deliveries.append((url, task.id, "refused: not loopback"))
            return
        if self._emu.webhook_delay > 0:
            await self._sleep(self._emu.webhook_delay)
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        payload = self._emu.state.task_object(task, self._emu.base_url)
        for delay in (0.0, *self._emu.webhook_retry_delays):
            if delay:
                await asyncio.sleep(delay)
            try:
                async with self._http.post(url, json=payload) as resp:
                    self._emu.webhook_deliveries.append((url, task.id, resp.status))
                    if resp.status < 500:
                        return
            except (TimeoutError, aiohttp.ClientError) as exc:
                self._emu.webhook_deliveries.append((url, task.id, type(exc).__name__))
            finally:
                self._changed.set()

"""Headless Chromium driven over the DevTools protocol with aiohttp's websocket client.

Used by the gallery's browser test (``tests/test_gallery_browser.py``) and the gallery
benchmark; no browser-automation package needed. Debian: ``apt-get install -y chromium``
(``tests/ci_setup_browser.sh``). ``APIMART_CHROMIUM`` names another binary.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--hide-scrollbars",
)
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str | None:
    """The Chromium binary to use, or None when none is installed."""
    named = os.environ.get("APIMART_CHROMIUM")
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(Exception):
    pass


class Page:
    """One browser tab: ``send`` a DevTools command, ``events`` seen so far by method,
    ``wait_event`` for the next one."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(CDPError(str(data["error"])))
                    else:
                        fut.set_result(data.get("result", {}))
            elif "method" in data:
                params = data.get("params", {})
                self.events.setdefault(data["method"], []).append(params)
                if data["method"] == "Page.javascriptDialogOpening":  # recorded; never block
                    task = asyncio.get_running_loop().create_task(
                        self.send("Page.handleJavaScriptDialog", accept=False)
                    )
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                for fut in self._waiters.pop(data["method"], []):
                    if not fut.done():
                        fut.set_result(params)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("the browser closed the connection"))

    async def send(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        await self._ws.send_str(json.dumps({"id": self._next, "method": method, "params": params}))
        return await asyncio.wait_for(fut, timeout)

    def next_event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``method`` event (take it before the action that causes it)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(method, []).append(fut)
        return fut

    async def evaluate(self, expression: str, *, timeout: float = 60.0) -> Any:
        """The JSON value of ``expression`` in the page (promises are awaited)."""
        reply = await self.send(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in reply:
            raise CDPError(f"{expression[:60]!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def goto(self, url: str, *, timeout: float = 60.0) -> None:
        """Open ``url`` and wait for its load event."""
        loaded = self.next_event("Page.loadEventFired")
        reply = await self.send("Page.navigate", url=url)
        if reply.get("errorText"):
            raise CDPError(f"cannot open {url}: {reply['errorText']}")
        await asyncio.wait_for(loaded, timeout)

    async def screenshot(self, path: Path) -> Path:
        reply = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(reply["data"]))
        return path

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def chromium(binary: str, *, width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
    """Start headless Chromium with a fresh profile and yield its first tab (Page, Runtime,
    Log and dialog events enabled; JavaScript dialogs are recorded and dismissed)."""
    profile = tempfile.mkdtemp(prefix="apimart-chromium-")
    proc = await asyncio.create_subprocess_exec(
        binary,
        *FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    drain: asyncio.Task[None] | None = None
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        endpoint = None
        while endpoint is None:
            raw = await asyncio.wait_for(proc.stderr.readline(), 60)
            if not raw:
                raise CDPError("chromium exited before it listened:\n" + "".join(seen[-20:]))
            line = raw.decode(errors="replace")
            seen.append(line)
            m = _LISTENING.search(line)
            if m:
                endpoint = m.group(1)

        async def drain_stderr() -> None:
            assert proc.stderr is not None
            while await proc.stderr.readline():
                pass

        drain = asyncio.get_running_loop().create_task(drain_stderr())
        host = endpoint.split("/")[2]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{host}/json/list") as r:
                targets = await r.json()
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            ws = await http.ws_connect(ws_url, max_msg_size=0)
            page = Page(ws)
            try:
                for domain in ("Page", "Runtime", "Log"):
                    await page.send(f"{domain}.enable")
                yield page
            finally:
                await page.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
        shutil.rmtree(profile, ignore_errors=True)

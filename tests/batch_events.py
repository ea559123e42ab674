"""Waiting for the client's own state in tests, without sleeping or polling.

The emulator's ``wait_until`` wakes on the emulator's changes: a task exists there a moment
before the client has read the submit's reply. A test that asserts what the client knows waits
for the client's events instead: pass a ``BatchEvents`` as ``on_event=`` and ``await
events.wait_until(...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

import apimart_async as am


class BatchEvents:
    """A batch's ``on_event=``: records every event; ``wait_until`` re-checks a predicate after
    each one."""

    def __init__(self) -> None:
        self.seen: list[am.BatchEvent] = []
        self._changed = anyio.Event()

    def __call__(self, event: am.BatchEvent) -> None:
        self.seen.append(event)
        self._changed.set()

    def count(self, kind: str) -> int:
        return sum(e.kind == kind for e in self.seen)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Wait until ``predicate()`` holds; ``timeout`` only guards against a hang."""
        with anyio.fail_after(timeout):
            while not predicate():
                self._changed = anyio.Event()
                await self._changed.wait()

"""Ctrl-C for a batch: a SIGINT handler on the running loop, main thread only."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

__all__ = ["SigintHandler", "announce_interrupt"]

logger = logging.getLogger("apimart_async")


class SigintHandler:
    """Calls ``callback`` on each Ctrl-C while installed (instead of KeyboardInterrupt)."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self.installed = False

    def install(self) -> None:
        """Install on the running loop; nothing off the main thread or where the loop has no
        signal handlers."""
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._callback)
        except (NotImplementedError, RuntimeError):  # not on this platform / loop
            return
        self.installed = True

    def remove(self) -> None:
        if self.installed:
            self.installed = False
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)


def announce_interrupt(*, running: int, grace: float | None) -> None:
    """Say what a Ctrl-C does to a batch with ``running`` tasks: with ``grace`` (seconds, the
    first Ctrl-C), they are followed that long; without, the batch stops at once."""
    if grace:
        logger.warning(
            "interrupted: no new job will be submitted; following %d running task(s) for"
            " up to %gs (Ctrl-C again stops at once); what is left is kept for a resume",
            running,
            grace,
        )
    elif running:
        logger.warning(
            "interrupted: stopping now; %d task(s) still running at the service are"
            " picked up by a resume",
            running,
        )

"""Ctrl-C for a batch: a SIGINT handler on the running loop, main thread only."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable

__all__ = ["SigintHandler"]


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

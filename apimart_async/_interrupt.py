"""Ctrl-C for a batch (``sigint_grace=``), only where it cannot take a signal from its owner.

The application owns the process's signals. A handler is installed only on the main thread,
and only when the SIGINT handler in force is still the one Python starts with: the
interpreter's ``signal.default_int_handler``, or the one ``asyncio.run`` / ``asyncio.Runner``
(and so ``anyio.run``) puts in its place, which also just raises ``KeyboardInterrupt`` in the
main task. Anywhere else (a worker thread, a web server such as uvicorn with handlers of its
own) ``sigint_grace`` is a no-op that says so once, as an ``ApimartWarning`` and a WARNING log
line; a server stops a batch from its own shutdown hook with ``await results.stop(grace=...)``.
Whatever is installed is removed when the batch ends, and the previous handler put back.
Batches side by side share the SDK's handler (each gets every Ctrl-C); the last to end puts
the previous handler back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

from ._errors import ApimartWarning

__all__ = ["SigintHandler", "announce_interrupt", "refuse", "sigint_is_ours_to_take"]

logger = logging.getLogger("apimart_async")

_NOT_MAIN = (
    "sigint_grace is ignored: the batch does not run on the main thread, where signals are"
    " delivered; stop it with 'await results.stop(grace=...)' instead"
)
_NOT_DEFAULT = (
    "sigint_grace is ignored: the application has its own SIGINT handler ({handler}), which"
    " is left alone; stop the batch from it with 'await results.stop(grace=...)'"
)


def _is_python_default(handler: Any) -> bool:
    """Python's own SIGINT behaviour: the interpreter's handler, or asyncio's runner's."""
    if handler is signal.default_int_handler:
        return True
    if isinstance(handler, functools.partial):
        func = getattr(handler.func, "__func__", handler.func)
        runner = getattr(asyncio, "Runner", None)  # Python 3.11+
        return runner is not None and func is getattr(runner, "_on_sigint", None)
    return False


def sigint_is_ours_to_take() -> str | None:
    """None when a SIGINT handler may be installed here; else why not (the warning)."""
    if threading.current_thread() is not threading.main_thread():
        return _NOT_MAIN
    handler = signal.getsignal(signal.SIGINT)
    if not _is_python_default(handler):
        return _NOT_DEFAULT.format(handler=getattr(handler, "__qualname__", repr(handler)))
    return None


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package: the application's line
    that opened the batch (however many SDK frames, sync facade or not, lie between)."""
    package = os.path.dirname(__file__) + os.sep
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def refuse(reason: str) -> None:
    """Say once, as a warning (pointing at the application's line) and a log line, that
    ``sigint_grace`` is not honoured."""
    warnings.warn(reason, ApimartWarning, stacklevel=_caller_level())
    logger.warning("%s", reason)


#: The batches whose Ctrl-C callback is in force (side by side, they share the SDK's one
#: handler), and the handler found before the first of them.
_active: list[SigintHandler] = []
_found: list[Any] = []


def _on_sigint() -> None:
    for handler in list(_active):
        handler._callback()


class SigintHandler:
    """Calls ``callback`` on each Ctrl-C while installed (instead of KeyboardInterrupt)."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self.installed = False
        #: Set by the sync facade, which installs its own handler on the main thread and
        #: forwards Ctrl-C to the batch: the batch then installs nothing.
        self.forwarded = False

    def install(self) -> None:
        """Install on the running loop if the application lets it (see the module doc);
        else warn once and do nothing."""
        if self.forwarded or self.installed:
            return
        if _active and threading.current_thread() is threading.main_thread():
            # another batch of this program (its loop: one runs on a thread) has the SDK's
            # handler in force: share it
            _active.append(self)
            self.installed = True
            return
        reason = sigint_is_ours_to_take()
        if reason is not None:
            refuse(reason)
            return
        previous = signal.getsignal(signal.SIGINT)
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, _on_sigint)
        except (NotImplementedError, RuntimeError, ValueError) as exc:  # platform / loop
            refuse(f"sigint_grace is ignored: this event loop cannot handle signals ({exc})")
            return
        _found[:] = [previous]
        _active.append(self)
        self.installed = True

    def remove(self) -> None:
        """Remove the handler and put back the one found when installing."""
        if not self.installed:
            return
        self.installed = False
        _active.remove(self)
        if _active:  # another batch still runs: the handler stays for it
            return
        previous = _found.pop()
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        except RuntimeError:  # no running loop (torn down): the signal module still works
            pass
        finally:
            # asyncio resets SIGINT to default_int_handler; put back what was there (e.g.
            # asyncio.run's own handler)
            signal.signal(signal.SIGINT, previous)


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

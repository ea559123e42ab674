"""Short blocking work (a stat, a file read, a part's open or close, a journal's write) off
the event loop, on anyio's worker threads, and on the loop itself when the system refuses a
new thread (a container's pids limit, ``ulimit -u``): slower for that moment, never a raw
``RuntimeError`` where the SDK promises typed errors. Work that needs a thread of its own for
long (a download's writer) cannot run on the loop; it asks ``refused`` and fails typed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio
import anyio.to_thread

__all__ = ["refused", "run_sync"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

logger = logging.getLogger("apimart_async")
_warned: list[bool] = []  # said once per process: a machine out of threads stays so a while


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` is CPython's error for a thread the system refused to start."""
    return isinstance(exc, RuntimeError) and "can't start new thread" in str(exc)


async def run_sync(
    fn: Callable[[Unpack[Ts]], T],
    *args: *Ts,
    limiter: anyio.CapacityLimiter | None = None,
) -> T:
    """``fn(*args)`` on a worker thread (``limiter`` as anyio's), or on the loop, still
    inside ``limiter``, when no worker thread can be had."""
    try:
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)
    except RuntimeError as exc:
        if not refused(exc):
            raise
        if not _warned:
            _warned.append(True)
            logger.warning(
                "the system refused a new thread (%s): short blocking work runs on the event"
                " loop while it does",
                exc,
            )
    if limiter is None:
        return fn(*args)
    async with limiter:  # whoever holds it runs alone, as on a worker thread
        return fn(*args)

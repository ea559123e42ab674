"""How long a stretch of the SDK's own work may hold the event loop (issue 21)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import anyio.lowlevel

#: Seconds of the SDK's own work after which it lets the event loop run before going on:
#: replaying thousands of finished jobs, or ending hundreds of waits in one poll round, would
#: otherwise hold the loop for the whole stretch, and every other request of a web replica
#: with it (0.5 s for a 20,000-job replay).
LOOP_SLICE: Final = 0.005


async def let_the_loop_run(since: float, clock: Callable[[], float] = time.perf_counter) -> float:
    """Once ``LOOP_SLICE`` seconds of work have passed since ``since`` (by ``clock``), let
    the event loop run; when the next slice starts."""
    if clock() - since <= LOOP_SLICE:
        return since
    await anyio.lowlevel.checkpoint()
    return clock()

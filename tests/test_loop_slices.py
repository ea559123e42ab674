"""A batch's own work lets the event loop run (issue 21): replaying many finished jobs sends
no request, and held the loop for the whole replay (every other request of a web replica
stalled meanwhile: 0.5 s for 20,000 jobs). The input reader now yields every ``LOOP_SLICE``
seconds of work; the clock it reads is faked here, so nothing depends on this machine's speed."""

from __future__ import annotations

import itertools
from pathlib import Path

import anyio
import pytest

import apimart_async as am
from apimart_async import _jobs
from apimart_async.emulator import Emulator

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio


class SlowClock:
    """``time`` for ``_jobs``: each reading is 2 ms after the last (as if each item took 2 ms)."""

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def perf_counter(self) -> float:
        return next(self._ticks) * 0.002


async def test_a_long_replay_lets_the_event_loop_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "run.sqlite"
    jobs = [am.VideoRequest("sora-2-preview", f"take {i}") for i in range(300)]
    async with Emulator(task_duration=0.0) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as c:
            async with c.batch(jobs, journal=journal, concurrency=32) as results:
                assert len([o async for o in results]) == 300
            monkeypatch.setattr(_jobs, "time", SlowClock(), raising=False)
            runs: list[int] = []  # outcomes replayed between two turns of another task
            async with c.batch(jobs, journal=journal) as results:
                async with anyio.create_task_group() as tg:

                    async def other_request() -> None:
                        seen = 0
                        while True:
                            await anyio.lowlevel.checkpoint()
                            now = results.stats().replayed
                            runs.append(now - seen)
                            seen = now

                    tg.start_soon(other_request)
                    replayed = [o async for o in results]
                    tg.cancel_scope.cancel()
    assert len(replayed) == 300 and all(o.replayed for o in replayed)
    assert emu.tasks_created == 300
    assert sum(runs) == 300 and max(runs) <= 5  # without the slices: all 300 in one stretch

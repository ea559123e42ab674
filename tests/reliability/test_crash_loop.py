"""Crash loop: one durable batch with journal and downloads, SIGKILLed at random moments again
and again (20 times with ``--long``, 8 by default), then run to the end.

The moments are random but event-driven: each run is killed once the emulator has seen a
random amount of new work from it (task creations, status requests and file requests
together), so every phase gets hit (first submits, polling, mid-download, the end) without
any sleep. Pass: zero duplicate tasks, zero lost results, every file sha256-verified, the
manifest complete with every job exactly once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from apimart_async.emulator import Emulator
from tests.test_crash import check_finished, run_worker

pytestmark = [pytest.mark.anyio, pytest.mark.reliability, pytest.mark.timeout(900)]


def work_done(emu: Emulator) -> int:
    c = emu.counters
    return emu.tasks_created + c.get("batch", 0) + c.get("task", 0) + c.get("file", 0)


async def test_sigkill_loop_then_finish(tmp_path: Path, long_run: bool) -> None:
    kills, jobs = (20, 300) if long_run else (8, 100)
    rng = random.Random(20261121)
    journal = tmp_path / "run.sqlite"
    out = tmp_path / "videos"
    async with Emulator(
        task_duration=(0.05, 0.4), video_bytes=256 * 1024, file_chunk_delay=0.003, seed=99
    ) as emu:
        # A whole batch is about jobs x 2.5 units of work (a task, a file request, a share of
        # the polls); each run gets a random slice of it, so the kills fall all along the way.
        mean_slice = max(2, int(jobs * 2.5) // kills)
        killed = 0
        finished_early = 0
        partial_files_seen = 0
        for _ in range(kills):
            start = work_done(emu)
            threshold = rng.randint(1, 2 * mean_slice)

            def kill_when(start: int = start, threshold: int = threshold) -> bool:
                return work_done(emu) - start >= threshold

            when: Callable[[], bool] = kill_when
            code = await run_worker(emu, journal, out, when, jobs=jobs)
            if code is None:
                killed += 1
                partial_files_seen += len(list(out.glob("*.part"))) if out.exists() else 0
            else:  # the run ended before its kill point came: it must have finished cleanly
                assert code == 0
                finished_early += 1
        print(
            f"\n{jobs} jobs, {killed} SIGKILLs, {finished_early} runs finished before their "
            f"kill point, .part files seen after kills: {partial_files_seen}"
        )
        assert killed >= kills * 3 // 4
        assert await run_worker(emu, journal, out, None, jobs=jobs) == 0
        check_finished(emu, out, jobs)

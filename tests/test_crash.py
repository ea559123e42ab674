"""SIGKILL a durable batch at many points; every re-run finishes it with nothing billed twice,
nothing lost, every file whole and verified, every job in the manifest exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from apimart_async.emulator import Emulator

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
JOBS = 300


async def run_worker(
    emu: Emulator,
    journal: Path | str,
    out: Path,
    kill_when: Callable[[], bool] | None,
    *,
    sig: signal.Signals = signal.SIGKILL,
    times: int = 1,
    grace: float | None = None,
    jobs: int = JOBS,
    env: dict[str, str] | None = None,
) -> int | None:
    """Start the worker; send it ``sig`` (``times`` times) once ``kill_when()`` holds.
    Returns its exit code, or None if SIGKILL ended it."""
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "crash_worker.py"),
        emu.base_url,
        emu.api_key,
        str(journal),
        str(out),
        str(jobs),
    ]
    if grace is not None:
        cmd.append(str(grace))
    environ = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    async with await anyio.open_process(
        cmd, env=environ, stdout=subprocess.DEVNULL, stderr=None
    ) as proc:
        if kill_when is None:
            with anyio.fail_after(120):
                return await proc.wait()
        exited = anyio.Event()

        async def watch() -> None:
            await proc.wait()
            exited.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            with anyio.fail_after(120):
                while not exited.is_set() and not kill_when():
                    await emu.wait_until(lambda: kill_when() or exited.is_set(), timeout=120)
            for _ in range(times):
                if not exited.is_set():
                    proc.send_signal(sig)
            with anyio.fail_after(60):
                await proc.wait()
            tg.cancel_scope.cancel()
        return None if proc.returncode == -signal.SIGKILL else proc.returncode


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_sigkill_at_many_points_then_resume(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    journal: Path | str = tmp_path / "run.sqlite"
    env: dict[str, str] = {}
    if store == "postgres":  # the same, with a PostgresJournal (issue 15)
        journal = request.getfixturevalue("postgres").url
        env["CRASH_PG_SCHEMA"] = request.getfixturevalue("pg_schema")
    out = tmp_path / "videos"
    async with Emulator(
        task_duration=(0.1, 0.6), video_bytes=512 * 1024, file_chunk_delay=0.005, seed=11
    ) as emu:

        def since_start(
            measure: Callable[[], int], at_least: int
        ) -> Callable[[], Callable[[], bool]]:
            """A kill point measured from the start of the run it is used for."""

            def arm() -> Callable[[], bool]:
                base = measure()
                return lambda: measure() - base >= at_least

            return arm

        created = lambda: emu.tasks_created  # noqa: E731
        polls = lambda: emu.counters.get("batch", 0)  # noqa: E731
        file_requests = lambda: emu.counters.get("file", 0)  # noqa: E731
        kill_points = [
            ("during the first submissions", since_start(created, 20)),
            ("in the middle of submitting", since_start(created, 100)),
            ("while polling", since_start(polls, 4)),
            ("mid-download", since_start(file_requests, 30)),
            ("mid-download, later", since_start(file_requests, 60)),
            ("right at a download", since_start(file_requests, 5)),
        ]
        killed = []
        for name, arm in kill_points:
            if await run_worker(emu, journal, out, arm(), env=env) is None:
                parts = len(list(out.glob("*.part"))) if out.exists() else 0
                killed.append((name, emu.tasks_created, file_requests(), parts))
        print("kills (point, tasks created, file requests, .part files left):", *killed, sep="\n  ")
        assert len(killed) >= 5
        assert any(parts for *_, parts in killed)  # some kills left half-written files
        assert await run_worker(emu, journal, out, None, env=env) == 0

        check_finished(emu, out)
    if store == "postgres":  # the journal the workers shared is whole
        from .test_pg_journal import fetchval

        schema = env["CRASH_PG_SCHEMA"]
        sql = f"SELECT count(*) FROM {schema}.jobs WHERE batch='crash' AND state='done'"
        assert await fetchval(str(journal), sql) == JOBS


def check_finished(emu: Emulator, out: Path, jobs: int = JOBS) -> None:
    """Nothing billed twice, nothing lost, every file whole and verified, manifest complete."""
    assert emu.tasks_created == jobs
    assert set(emu.tasks_per_key.values()) == {1}
    prompts = Counter(t.body["prompt"] for t in emu.state.tasks.values())
    assert set(prompts.values()) == {1} and len(prompts) == jobs
    task_of = {t.body["prompt"]: t.id for t in emu.state.tasks.values()}
    assert sorted(p.name for p in out.glob("*.part")) == []
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(jobs))  # each exactly once
    size = emu.state.video_bytes
    for line in lines:
        i = line["index"]
        assert line["status"] == "completed"
        assert line["task_id"] == task_of[f"prompt {i}"]
        (f,) = line["files"]
        assert Path(f["path"]).name == f"job{i}.mp4"
        assert f["sha256"] == emu.file_sha256(line["task_id"])
        assert Path(f["path"]).stat().st_size == size == f["bytes"]
    assert len(list(out.glob("*.mp4"))) == jobs


KILL_POINTS = {
    "submitting": lambda emu: emu.tasks_created >= 40,
    "polling": lambda emu: emu.counters.get("batch", 0) >= 4,
    "mid-download": lambda emu: emu.counters.get("file", 0) >= 40,
    "late download": lambda emu: emu.counters.get("file", 0) >= 200,
    "first download": lambda emu: emu.counters.get("file", 0) >= 1,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
async def test_each_kill_point_then_one_rerun_finishes(tmp_path: Path, point: str) -> None:
    journal = tmp_path / "run.sqlite"
    out = tmp_path / "videos"
    async with Emulator(
        task_duration=(0.1, 0.6), video_bytes=256 * 1024, file_chunk_delay=0.005, seed=7
    ) as emu:
        when = KILL_POINTS[point]
        assert await run_worker(emu, journal, out, lambda: when(emu)) is None  # killed
        assert await run_worker(emu, journal, out, None) == 0
        check_finished(emu, out)


@pytest.mark.parametrize(
    ("times", "grace"), [(1, 30.0), (2, 30.0)], ids=["one Ctrl-C", "two Ctrl-C"]
)
async def test_ctrl_c_then_resume(tmp_path: Path, times: int, grace: float) -> None:
    journal = tmp_path / "run.sqlite"
    out = tmp_path / "videos"
    async with Emulator(task_duration=(0.1, 0.6), video_bytes=64 * 1024, seed=5) as emu:
        code = await run_worker(
            emu,
            journal,
            out,
            lambda: emu.tasks_created >= 60,
            sig=signal.SIGINT,
            times=times,
            grace=grace,
        )
        assert code == 130
        stopped_at = emu.tasks_created
        assert stopped_at < JOBS  # it stopped submitting
        assert await run_worker(emu, journal, out, None) == 0
        assert emu.tasks_created == JOBS
        assert set(emu.tasks_per_key.values()) == {1}
        lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert sorted(line["index"] for line in lines) == list(range(JOBS))

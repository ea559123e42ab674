"""The manifest lists each job exactly once across any sequence of runs, crashes and repairs
(issue 14). Hypothesis draws the sequence: whole runs (with or without ``retry_failed``),
runs cut off at a random point (the caller's cancel scope, as a crash leaves the journal),
videos deleted or cut short between runs. After every whole run, each job of the input has
exactly one line, whose files are on disk and verified; after a cut-off run, none has two."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apimart_async as am
from apimart_async.emulator import Emulator

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

JOBS = 5
Step = tuple[str, int]

steps = st.lists(
    st.one_of(
        st.tuples(st.just("run"), st.integers(0, 1)),  # 1: with retry_failed
        st.tuples(st.just("cut"), st.integers(1, 12)),  # cut after this many requests
        st.tuples(st.just("delete"), st.integers(0, JOBS - 1)),
        st.tuples(st.just("truncate"), st.integers(0, JOBS - 1)),
    ),
    min_size=1,
    max_size=7,
).map(lambda s: [*s, ("run", 1)])  # the last run ends it all


def lines_of(out: Path) -> list[dict[str, Any]]:
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


async def play(seq: list[Step], root: Path, seed: int) -> None:
    journal, out = root / "run.sqlite", root / "videos"
    jobs = [(f"job{i}", am.VideoRequest("sora-2-preview", f"prompt {i}")) for i in range(JOBS)]
    async with Emulator(task_duration=0.0, failure_rate=0.3, seed=seed, video_bytes=2048) as emu:
        for action, arg in seq:
            if action in ("delete", "truncate"):
                video = out / f"job{arg}.mp4"
                if video.exists():
                    if action == "delete":
                        video.unlink()
                    else:
                        video.write_bytes(video.read_bytes()[:100])
                continue
            start = sum(emu.counters.values())
            whole = action == "run"
            async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as c:
                options: dict[str, Any] = {"retry_failed": whole and arg == 1}
                async with anyio.create_task_group() as tg:

                    async def cut(scope: anyio.CancelScope, start: int, after: int) -> None:
                        await emu.wait_until(lambda: sum(emu.counters.values()) - start >= after)
                        scope.cancel()

                    with anyio.CancelScope() as scope, anyio.fail_after(60):
                        if not whole:
                            tg.start_soon(cut, scope, start, arg)
                        async with c.batch(jobs, journal=journal, download_dir=out, **options) as b:
                            [o async for o in b]
                    tg.cancel_scope.cancel()  # a run that ended before its cut
            lines = lines_of(out)
            indexes = [line["index"] for line in lines]
            assert len(indexes) == len(set(indexes)), (seq, indexes)  # never twice
            if whole:
                assert sorted(indexes) == list(range(JOBS)), (seq, indexes)
                for line in lines:
                    if line["status"] == "completed":
                        (f,) = line["files"]
                        assert Path(f["path"]).stat().st_size == f["bytes"]
                        assert f["sha256"] == emu.file_sha256(line["task_id"])
        # nothing was paid twice: one task per job, plus one per retried failure at most
        assert emu.tasks_created <= JOBS * (1 + sum(a == "run" for a, _ in seq))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(seq=steps, seed=st.integers(0, 1000))
def test_each_job_is_listed_once_across_runs_crashes_and_repairs(
    seq: list[Step], seed: int
) -> None:
    am.set_testing(True)
    try:
        with tempfile.TemporaryDirectory() as root:
            anyio.run(play, seq, Path(root), seed)
    finally:
        am.set_testing(False)


async def test_a_line_written_again_replaces_the_one_listed(tmp_path: Path) -> None:
    # the rare path: a job taken up again after its line was listed (its video deleted
    # between the journal's open and its resume)
    from apimart_async._manifest import Manifest

    manifest = Manifest(tmp_path / "manifest.jsonl")
    await manifest.open([{"index": i, "status": "completed"} for i in range(3)])
    await manifest.replace(1, {"index": 1, "status": "failed"})
    await manifest.write({"index": 3, "status": "completed"})
    await manifest.close()
    lines = lines_of(tmp_path)
    assert [(x["index"], x["status"]) for x in lines] == [
        (0, "completed"),
        (2, "completed"),
        (1, "failed"),
        (3, "completed"),
    ]
    assert not (tmp_path / "manifest.jsonl.tmp").exists()

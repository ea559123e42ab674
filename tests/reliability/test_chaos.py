"""Chaos soak: a durable batch with downloads against an emulator that injects 10 % faults of
every kind at once, on every endpoint, plus task failures.

Short by default (300 jobs); ``pytest --long`` runs the full 3,000. Pass: exactly one outcome
per job, exactly one task per job at the emulator (per idempotency key and per prompt), every
file whole and sha256-verified, no unhandled exception, no warning, every pending counter back
to zero.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import pytest

import apimart_async as am
from apimart_async.emulator import Emulator, Fault
from tests.conftest import FAST_POLL

pytestmark = [pytest.mark.anyio, pytest.mark.reliability, pytest.mark.timeout(900)]

#: What the network and the service throw at the client, 10 % of all requests.
API_FAULTS = [
    Fault.server_error(500),
    Fault.server_error(502),
    Fault.server_error(503),
    Fault.rate_limited(1),  # 429 with Retry-After: 1 (waits are zero under set_testing)
    Fault.drop(),
    Fault.slow(0.4),  # longer than the client's read timeout: it gives up and retries
    Fault.malformed(),
    Fault.truncated(),
    Fault.lost_reply(),  # submit only: the task is created, the reply never arrives
]
#: A file server fails the ways a CDN does (a 200 with garbage is not one of them: without a
#: checksum from the service nobody could tell it from a video).
FILE_FAULTS = [
    Fault.server_error(503),
    Fault.rate_limited(1),
    Fault.drop(),
    Fault.slow(0.4),
    Fault.truncated(),
]


async def test_chaos_soak(tmp_path: Path, long_run: bool, caplog: pytest.LogCaptureFixture) -> None:
    jobs = 3000 if long_run else 300
    caplog.set_level(logging.INFO, logger="apimart_async")
    out = tmp_path / "videos"
    async with Emulator(
        task_duration=(0.01, 0.3), failure_rate=0.05, video_bytes=4096, seed=2026, balance=None
    ) as emu:
        emu.faults.set_rate(0.1, endpoints=["submit", "task", "batch"], faults=API_FAULTS)
        emu.faults.set_rate(0.1, endpoints=["file"], faults=FILE_FAULTS)
        requests = (
            (f"job{i}", am.VideoRequest("sora-2-preview", f"soak {i}")) for i in range(jobs)
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with am.AsyncApimart(
                emu.api_key,
                base_url=emu.base_url,
                poll=FAST_POLL,
                max_retries=10,
                timeout=am.Timeout(connect=2.0, read=0.2, total=5.0),
            ) as client:
                async with client.batch(
                    requests,
                    concurrency=32,
                    journal=tmp_path / "soak.sqlite",
                    download_dir=out,
                ) as results:
                    outcomes = [o async for o in results]
                stats = results.stats()
                poller_left = len(client._poller)
                schedule_left = len(client._poller.schedule)
        served = emu.faults.served
        print(
            f"\n{jobs} jobs, faults served: {sum(served.values())} {dict(sorted(served.items()))}"
        )

        # exactly one outcome per job
        assert sorted(o.index for o in outcomes) == list(range(jobs))
        kinds = Counter("ok" if o.ok else type(o.error).__name__ for o in outcomes)
        assert set(kinds) <= {"ok", "TaskFailedError"}, kinds
        assert kinds["TaskFailedError"] > 0  # the failures really happened
        # exactly one task per job: per idempotency key, per prompt, none without a key
        assert emu.tasks_created == jobs
        assert set(emu.tasks_per_key.values()) == {1}
        assert emu.state.submits_without_key == 0
        prompts = Counter(t.body["prompt"] for t in emu.state.tasks.values())
        assert len(prompts) == jobs and set(prompts.values()) == {1}
        assert {o.task_id for o in outcomes} == set(emu.task_ids())
        # every kind of fault was served, and often
        kinds_served = {kind for (_, kind) in served}
        assert kinds_served >= {"status", "drop", "slow", "malformed", "truncated", "lost_reply"}
        assert sum(served.values()) >= jobs * 0.2
        assert any(ep == "file" for (ep, _) in served)
        # every file whole and verified
        for o in outcomes:
            if o.ok:
                (f,) = o.files
                assert f.sha256 == emu.file_sha256(o.task_id or "")
                assert Path(f.path).stat().st_size == 4096
        assert list(out.glob("*.part")) == []
        assert len(list(out.glob("*.mp4"))) == kinds["ok"]
    # counters back to zero; no warning, neither a Python one nor a log record of the SDK
    assert (stats.pending, stats.submitting, stats.errored) == (0, 0, 0), stats
    assert stats.completed + stats.failed == jobs
    assert poller_left == 0 and schedule_left == 0
    assert emu.stats()["unfinished"] == 0
    assert [str(w.message) for w in caught] == []
    ours = [r for r in caplog.records if r.name.startswith("apimart_async")]
    assert [r.getMessage() for r in ours if r.levelno >= logging.WARNING] == []
    assert any("retrying" in r.getMessage() for r in ours)  # the faults were felt

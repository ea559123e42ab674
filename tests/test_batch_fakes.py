"""ARCHITECTURE.md says a ``Batch`` is built from ``requests``, a ``BatchOptions`` and the
``api``, ``poller``, ``downloader`` and ``pacing`` it needs: so a whole batch runs here on
fakes and a fake clock, with no client, no emulator and no socket."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import apimart_async as am
from apimart_async._api import Statuses
from apimart_async._handle import Batch
from apimart_async._options import BatchOptions
from apimart_async._pacing import Pacing
from apimart_async._poller import Poller

pytestmark = pytest.mark.anyio

POLICY = am.PollPolicy(first_check=1.0, min_interval=1.0, max_interval=1.0, jitter=0.0)


class FakeApi:
    """What a batch asks of ``Api``: an open check, submits, the request counts."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []

    def ensure_open(self) -> None:
        pass

    async def submit(self, request: am.VideoRequest, *, idempotency_key: str | None = None) -> str:
        self.keys.append(idempotency_key)
        return f"task_{len(self.keys)}"

    def request_counts(self) -> dict[str, int]:
        return {"submit": len(self.keys)}


async def test_a_batch_runs_on_fakes_and_a_fake_clock() -> None:
    now = [1000.0]
    reads: list[list[str]] = []

    async def fetch(ids: list[str]) -> Statuses:
        reads.append(list(ids))
        video = am.Video(("https://files.example/v.mp4",))
        return {i: am.Task(i, am.TaskStatus.COMPLETED, videos=(video,)) for i in ids}

    poller = Poller(fetch, POLICY, clock=lambda: now[0], wall=lambda: now[0])
    api = FakeApi()
    jobs = [am.VideoRequest("sora-2-preview", f"a cat {i}", duration=4) for i in range(3)]
    fake: Any = api
    batch = Batch(
        jobs, BatchOptions(concurrency=2), api=fake, poller=poller, downloader=None, pacing=Pacing()
    )  # type: ignore[arg-type]
    outcomes: list[am.Success | am.Failure] = []
    async with batch as results:
        async with anyio.create_task_group() as tg:

            async def collect() -> None:
                async for outcome in results:
                    outcomes.append(outcome)

            tg.start_soon(collect)
            while len(outcomes) < 3:
                await anyio.wait_all_tasks_blocked()
                wakeup = poller.schedule.next_wakeup()
                if wakeup is not None:
                    now[0] = max(now[0], wakeup)
                    await poller.step()
    assert sorted(o.index for o in outcomes) == [0, 1, 2]
    assert [o.ok for o in outcomes] == [True] * 3, [getattr(o, "error", None) for o in outcomes]
    assert len(api.keys) == 3 and len(set(api.keys)) == 3
    assert sorted(i for ids in reads for i in ids) == ["task_1", "task_2", "task_3"]
    assert results.stats().completed == 3 and results.stats().submitted == 3


@pytest.mark.parametrize(
    "field", ["journal", "download_dir", "manifest", "on_event", "cost_estimate"]
)
def test_a_batch_option_of_the_wrong_kind_is_refused_by_name(field: str) -> None:
    # journal=3 failed on entry with a raw AttributeError, download_dir=3 with a raw
    # TypeError, on_event=3 and cost_estimate=3 were taken and failed later, quietly.
    client = am.AsyncApimart("sk-test")  # never opened: nothing is sent
    with pytest.raises(am.ValidationError, match=f"^{field}: must be ") as caught:
        client.batch([], **{field: 3})
    assert caught.value.field == field

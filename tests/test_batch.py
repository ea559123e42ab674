"""client.batch against the emulator: accounting, limits, lifecycle, re-attach."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

import apimart_async as am
from apimart_async.emulator import Emulator, Fault

from .batch_events import BatchEvents
from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio


def sora(i: int) -> am.VideoRequest:
    return am.VideoRequest("sora-2-preview", f"a cat, take {i}", duration=4)


def task_ids_by_prompt(emu: Emulator, n: int) -> list[str]:
    """The emulator's task for each of ``sora(0) ... sora(n - 1)``: concurrent submits reach
    the emulator in any order, so its creation order says nothing about the job's index."""
    by_prompt = {emu.state.tasks[t].body["prompt"]: t for t in emu.task_ids()}
    return [by_prompt[sora(i).prompt] for i in range(n)]


async def drain(results: am.Batch) -> list[am.Outcome]:
    return [o async for o in results]


# -- the big one ------------------------------------------------------------------------------


async def test_1000_jobs_with_faults_and_failures_each_accounted_for_once() -> None:
    async with Emulator(task_duration=(0.01, 0.2), failure_rate=0.05, seed=3) as emu:
        emu.faults.set_rate(
            0.1,
            faults=[
                Fault.server_error(500),
                Fault.server_error(502),
                Fault.server_error(503),
                Fault.rate_limited(0),
                Fault.drop(),
                Fault.lost_reply(),
                Fault.malformed(),
                Fault.truncated(),
            ],
        )
        async with am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, poll=FAST_POLL, max_retries=8
        ) as client:
            async with client.batch((sora(i) for i in range(1000)), concurrency=32) as results:
                outcomes = await drain(results)
            stats = results.stats()
            poller_left = len(client._poller)
    assert sorted(o.index for o in outcomes) == list(range(1000))  # exactly one each
    by_status = Counter("ok" if o.ok else type(o.error).__name__ for o in outcomes)
    assert by_status["ok"] + by_status["TaskFailedError"] == 1000, by_status
    assert 20 <= by_status["TaskFailedError"] <= 90  # ~5 %
    # exactly one task per job at the emulator, none without a key, every key used once
    assert emu.tasks_created == 1000
    assert set(emu.tasks_per_key.values()) == {1}
    assert emu.state.submits_without_key == 0
    assert {o.task_id for o in outcomes} == set(emu.task_ids())
    assert {o.idempotency_key for o in outcomes} == set(emu.tasks_per_key)
    assert emu.faults.total_served() > 100
    assert (stats.completed, stats.failed, stats.errored, stats.pending) == (
        by_status["ok"],
        by_status["TaskFailedError"],
        0,
        0,
    )
    assert stats.cost == pytest.approx(by_status["ok"] * 0.4)
    assert poller_left == 0


# -- limits -----------------------------------------------------------------------------------


async def test_concurrency_is_reached_and_never_exceeded(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    emu.faults.set_rate(1.0, endpoints=["submit"], faults=[Fault.slow(0.02)])
    async with client.batch([sora(i) for i in range(40)], concurrency=5) as results:
        await emu.wait_until(lambda: emu.tasks_created == 40, timeout=30)
        assert results.stats().submitted <= 40
    assert emu.state.max_in_flight["submit"] == 5  # reached, never exceeded


async def test_max_pending_holds_back_submits_and_reads_lazily(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    pulled = 0

    def jobs() -> Iterator[am.VideoRequest]:
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield sora(i)

    # Wait for the client's own state, not the emulator's: a task exists at the emulator a
    # moment before the client has read the submit's reply and counts it pending.
    events = BatchEvents()
    async with manual_client.batch(
        jobs(), concurrency=4, max_pending=5, on_event=events
    ) as results:
        await events.wait_until(lambda: events.count("submitted") == 5)
        assert results.stats().pending == 5
        assert results.stats().submitted == 5
        assert pulled == 6  # five submitted, one waiting in hand; the rest never read
        first = manual_emu.task_ids()[0]
        manual_emu.complete(first)
        outcome = await results.__anext__()
        assert outcome.task_id == first and outcome.ok
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 6)
        assert pulled == 7
        assert manual_emu.state.max_unfinished == 5
    assert manual_emu.state.max_unfinished == 5


async def test_a_429_storm_slows_the_whole_client(emu: Emulator, client: am.AsyncApimart) -> None:
    emu.faults.inject("submit", Fault.rate_limited(0), times=6)
    emu.faults.set_rate(1.0, endpoints=["submit"], faults=[Fault.slow(0.01)])
    limits: list[int] = []

    def on_event(event: am.BatchEvent) -> None:
        if event.kind == "submitted":
            limits.append(results._run.roster.sched.limit)

    async with client.batch(
        [sora(i) for i in range(30)], concurrency=16, on_event=on_event
    ) as results:
        await emu.wait_until(lambda: emu.tasks_created == 30, timeout=30)
    assert client.throttle.rate_limited == 6
    assert min(limits) < 16  # the effective concurrency dropped
    assert emu.tasks_created == 30 and set(emu.tasks_per_key.values()) == {1}


async def test_requests_per_second_caps_the_client(emu: Emulator, client: am.AsyncApimart) -> None:
    async with client.batch([sora(i) for i in range(3)], requests_per_second=1000):
        assert _caps(client) == [1000]
        await emu.wait_until(lambda: emu.tasks_created == 3)
    assert _caps(client) == []  # restored


def _caps(client: am.AsyncApimart) -> list[float]:
    """The requests-per-second caps in force on the client's requests now."""
    return [limiter.rate for limiter in client._transport.pacing.limiters]


async def test_overlapping_batches_each_keep_their_own_cap_and_the_client_returns_to_none(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    # Each batch runs in a task of its own: the first one entered leaves first.
    entered = [anyio.Event(), anyio.Event()]
    leave = [anyio.Event(), anyio.Event()]
    left = [anyio.Event(), anyio.Event()]

    async def run(n: int, rate: float) -> None:
        async with manual_client.batch([sora(n)], requests_per_second=rate):
            entered[n].set()
            await leave[n].wait()
        left[n].set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, 0, 1000)
        await entered[0].wait()
        tg.start_soon(run, 1, 50)
        await entered[1].wait()
        assert sorted(_caps(manual_client)) == [50, 1000]  # both caps hold while both run
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 2)
        leave[0].set()
        await left[0].wait()
        assert _caps(manual_client) == [50]  # the second batch keeps its own cap
        leave[1].set()
    assert _caps(manual_client) == []  # and the client is capped by nothing after them


# -- the shared poller ------------------------------------------------------------------------


async def test_status_goes_through_one_poller_in_shared_requests(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    async with (
        manual_client.batch([sora(i) for i in range(150)], concurrency=50) as a,
        manual_client.batch([sora(i) for i in range(150, 200)], concurrency=50) as b,
    ):
        await manual_emu.wait_until(lambda: len(manual_client._poller) == 200)
        assert manual_emu.tasks_created == 200
        before = manual_emu.counters.get("batch", 0)
        await manual_emu.wait_until(lambda: manual_emu.counters.get("batch", 0) >= before + 2)
        manual_emu.complete_all()
        outcomes = await drain(a) + await drain(b)
    assert len(outcomes) == 200 and all(o.ok for o in outcomes)
    assert manual_emu.counters.get("task", 0) == 0
    assert len(manual_client._poller) == 0


async def test_batch_route_missing_falls_back_to_gets(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    manual_emu.batch_route = False
    async with manual_client.batch([sora(i) for i in range(20)]) as results:
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 20)
        manual_emu.complete_all()
        outcomes = await drain(results)
    assert len(outcomes) == 20 and all(o.ok for o in outcomes)
    assert manual_emu.counters["batch"] == 1
    assert manual_emu.counters["task"] >= 20
    assert manual_emu.state.max_in_flight["task"] <= manual_client._poller.reads.maximum


async def test_unknown_statuses_keep_a_task_running(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    async with manual_client.batch([sora(0)]) as results:
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 1)
        (task_id,) = manual_emu.task_ids()
        manual_emu.set_running(task_id, 10, status="rendering_on_gpu")
        n = manual_emu.counters.get("batch", 0)
        await manual_emu.wait_until(lambda: manual_emu.counters.get("batch", 0) >= n + 3)
        assert results.stats().pending == 1
        manual_emu.complete(task_id)
        (outcome,) = await drain(results)
    assert outcome.ok


async def test_vanished_task_ends_with_a_clear_error(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    async with manual_client.batch([sora(0)]) as results:
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 1)
        manual_emu.advance(4 * 24 * 3600)  # past the service's retention
        (outcome,) = await drain(results)
    assert isinstance(outcome.error, am.NotFoundError)
    assert str(outcome.error).startswith(f"task {outcome.task_id} does not exist or has expired")


# -- outcomes, events, stats ------------------------------------------------------------------


async def test_outcomes_events_and_stats(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    seen = BatchEvents()
    manual_emu.faults.inject("submit", Fault.slow(0.2))  # created last: any order is possible
    jobs = [sora(0), sora(1), am.VideoRequest("no-such-model", "x"), "not a request"]
    async with manual_client.batch(jobs, on_event=seen) as results:  # type: ignore[arg-type]
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 2)
        t0, t1 = task_ids_by_prompt(manual_emu, 2)  # submits may arrive in any order
        manual_emu.set_running(t0, 50)
        # the client has seen it running (a poll that merely reached the emulator may still
        # be reading the state when the task completes)
        await seen.wait_until(
            lambda: any(
                e.kind == "progress" and e.index == 0 and e.task and e.task.progress == 50
                for e in seen.seen
            )
        )
        manual_emu.complete(t0)
        manual_emu.fail(t1, message="nope")
        outcomes = {o.index: o async for o in results}
        stats = results.stats()
        text = repr(results)
    events = [(e.kind, e.index) for e in seen.seen]
    assert outcomes[0].ok and outcomes[0].task is not None and outcomes[0].task.cost == 0.4
    assert isinstance(outcomes[1].error, am.TaskFailedError) and outcomes[1].task_id == t1
    assert isinstance(outcomes[2].error, am.BadRequestError) and outcomes[2].task_id is None
    assert isinstance(outcomes[3].error, am.ValidationError) and outcomes[3].request is None
    assert (
        str(outcomes[3].error)
        == "requests[3]: must be a VideoRequest or (name, VideoRequest) (see VideoRequest.from_dict), got 'not a request'"
    )
    assert ("submitted", 0) in events and ("progress", 0) in events and ("completed", 0) in events
    assert ("failed", 1) in events and ("errored", 2) in events
    assert (
        stats.read,
        stats.submitted,
        stats.completed,
        stats.failed,
        stats.errored,
        stats.pending,
    ) == (4, 2, 1, 1, 2, 0)
    assert stats.requests["submit"] == 3
    assert text.startswith(
        "<Batch read=4 submitted=2 pending=0 | completed=1 failed=1 errored=2 | cost=$0.40 | requests: "
    )


async def test_async_iterable_input(emu: Emulator, client: am.AsyncApimart) -> None:
    async def jobs() -> AsyncIterator[am.VideoRequest]:
        for i in range(5):
            yield sora(i)

    async with client.batch(jobs()) as results:
        emu.advance(10)
        await emu.wait_until(lambda: emu.tasks_created == 5)
        emu.advance(10)
        outcomes = await drain(results)
    assert sorted(o.index for o in outcomes) == [0, 1, 2, 3, 4]


async def test_input_errors_reach_the_caller_after_the_outcomes(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    def jobs() -> Iterator[am.VideoRequest]:
        yield sora(0)
        raise RuntimeError("bad input file")

    seen = []
    with pytest.raises(RuntimeError, match="bad input file"):
        async with manual_client.batch(jobs()) as results:
            await manual_emu.wait_until(lambda: manual_emu.tasks_created == 1)
            manual_emu.complete_all()
            async for outcome in results:
                seen.append(outcome.index)
    assert seen == [0]
    assert results.stopped is not None and "bad input file" in results.stopped


# -- leaving early, timeouts, stopping --------------------------------------------------------


async def test_break_leaves_paid_tasks_listed_and_nothing_running(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    events = BatchEvents()
    async with manual_client.batch(
        [sora(i) for i in range(10)], concurrency=10, on_event=events
    ) as results:
        await events.wait_until(lambda: events.count("submitted") == 10)  # all ids known
        first = manual_emu.task_ids()[0]
        manual_emu.complete(first)
        async for outcome in results:
            assert outcome.task_id == first
            break
    assert sorted(results.pending_task_ids()) == sorted(manual_emu.task_ids()[1:])
    assert len(manual_client._poller) == 0  # no longer polled
    assert results.stopped == "the batch was left"
    # Nothing of the batch still runs to send requests. Counted where they are made: a poll
    # the client sent just before leaving may reach the emulator only after this point.
    sent = manual_client.request_counts()
    await anyio.sleep(0.02)
    assert manual_client.request_counts() == sent


async def test_exception_in_the_block_propagates_and_cleans_up(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    with pytest.raises(KeyError, match="boom"):
        async with manual_client.batch([sora(i) for i in range(3)]):
            await manual_emu.wait_until(lambda: manual_emu.tasks_created == 3)
            raise KeyError("boom")
    assert len(manual_client._poller) == 0


async def test_cancellation_cleans_up(manual_emu: Emulator, manual_client: am.AsyncApimart) -> None:
    events = BatchEvents()
    batch = manual_client.batch([sora(i) for i in range(3)], on_event=events)
    with anyio.CancelScope() as scope:
        async with batch as results, anyio.create_task_group() as tg:
            tg.start_soon(drain, results)  # never ends: manual tasks
            # all three known to the client: cancel now, not after a guessed delay
            await events.wait_until(lambda: events.count("submitted") == 3)
            scope.cancel()
    assert scope.cancelled_caught
    assert len(batch.pending_task_ids()) == 3
    assert len(manual_client._poller) == 0


async def test_cut_off_submits_are_listed_with_their_key(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    emu.faults.set_rate(1.0, endpoints=["submit"], faults=[Fault.slow(5.0)])
    async with client.batch([sora(i) for i in range(2)], concurrency=2) as results:
        await emu.wait_until(lambda: emu.state.in_flight["submit"] == 2)
    unconfirmed = results.unconfirmed_submissions()
    assert sorted(i for i, _, _ in unconfirmed) == [0, 1]
    assert all(key.startswith("am-") for _, _, key in unconfirmed)


async def test_a_submit_reply_arriving_as_the_batch_is_left_is_listed_not_followed(
    manual_emu: Emulator, manual_client: am.AsyncApimart, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply of a submit reaches the client in the same loop step as the batch is left:
    its submitter resumes with the task id (the cancellation cannot reach a task whose wait
    is already over). The task is reported as running, not as an unconfirmed submit, and the
    poller does not follow it for a batch that is gone."""
    real_submit = manual_client._api.submit  # what a batch submits through
    replies: list[asyncio.Future[str]] = []
    sent = anyio.Event()

    async def held_submit(request: am.VideoRequest, *, idempotency_key: str | None = None) -> str:
        await real_submit(request, idempotency_key=idempotency_key)  # the task exists
        reply = asyncio.get_running_loop().create_future()
        replies.append(reply)
        sent.set()
        return await reply  # held until the test lets it through

    monkeypatch.setattr(manual_client._api, "submit", held_submit)
    async with manual_client.batch([sora(0)]) as results:
        await sent.wait()
        (task_id,) = manual_emu.task_ids()
        replies[0].set_result(task_id)  # no checkpoint between this and leaving
    assert manual_client._poller.watching() == []
    assert results.pending_task_ids() == [task_id]
    assert results.unconfirmed_submissions() == []


async def test_job_timeout(manual_emu: Emulator, manual_client: am.AsyncApimart) -> None:
    async with manual_client.batch([sora(0), sora(1)], job_timeout=0.05) as results:
        outcomes = await drain(results)
    assert [type(o.error) for o in outcomes] == [am.TaskTimeoutError, am.TaskTimeoutError]
    assert sorted(results.pending_task_ids()) == sorted(manual_emu.task_ids())


async def test_batch_deadline(manual_emu: Emulator, manual_client: am.AsyncApimart) -> None:
    # The deadline is on the wall clock: 2 s leaves a loaded machine ample time for the three
    # submits (0.1 s once could not be relied on). Manual mode: no task ever ends by itself.
    async with manual_client.batch(
        [sora(i) for i in range(100)], max_pending=3, timeout=2.0
    ) as results:
        outcomes = await drain(results)
    assert results.stopped == "the batch deadline passed"
    assert sum(isinstance(o.error, am.TaskTimeoutError) for o in outcomes) == 3
    assert sum(isinstance(o.error, am.BatchStoppedError) for o in outcomes) == 1  # the one in hand
    assert len(outcomes) == results.stats().read == 4


async def test_stop_on_error(manual_emu: Emulator, manual_client: am.AsyncApimart) -> None:
    async with manual_client.batch(
        [sora(i) for i in range(50)], max_pending=2, stop_on_error=True
    ) as results:
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 2)
        first, second = manual_emu.task_ids()
        manual_emu.fail(first)
        manual_emu.complete(second)
        outcomes = await drain(results)
    assert results.stopped is not None and "failed" in results.stopped
    assert manual_emu.tasks_created == 2
    assert {type(o.error) for o in outcomes} == {
        am.TaskFailedError,
        type(None),
        am.BatchStoppedError,
    }
    assert len(outcomes) == results.stats().read == 3


async def test_closing_the_client_ends_running_batches(manual_emu: Emulator) -> None:
    client = am.AsyncApimart(manual_emu.api_key, base_url=manual_emu.base_url, poll=FAST_POLL)
    await client.open()
    async with client.batch([sora(i) for i in range(4)], max_pending=2) as results:
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 2)
        await client.aclose()
        outcomes = await drain(results)
    assert len(outcomes) == 3
    closed = [o for o in outcomes if isinstance(o.error, am.ClientClosedError)]
    assert len(closed) == 2
    assert results.stopped == "the client was closed"
    # brk16g: their tasks run on (billed), their ends unseen: listed as a timed-out one's
    # are, where the docs say to look (it was empty)
    assert sorted(results.pending_task_ids()) == sorted(manual_emu.task_ids())
    assert sorted(str(o.task_id) for o in closed) == sorted(manual_emu.task_ids())


async def test_a_task_that_completed_without_a_video_is_not_listed_as_running(
    manual_emu: Emulator,
) -> None:
    """Its end was seen (completed, nothing to fetch): not among ``pending_task_ids()``, which
    lists the tasks that may still run, billed (a wait the client's close or a timeout ended)."""
    url = manual_emu.base_url
    async with (
        am.AsyncApimart(manual_emu.api_key, base_url=url, poll=FAST_POLL) as client,
        client.batch([sora(0)]) as results,
    ):
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 1)
        manual_emu.complete(manual_emu.task_ids()[0], videos=0)
        (outcome,) = await drain(results)
    assert isinstance(outcome.error, am.NoVideoError)
    assert results.pending_task_ids() == []


async def test_bad_arguments() -> None:
    client = am.AsyncApimart("k", base_url="http://127.0.0.1:9")
    with pytest.raises(
        am.ValidationError, match="^concurrency: must be a whole number >= 1, got 0"
    ):
        client.batch([], concurrency=0)
    with pytest.raises(
        am.ValidationError, match="^job_timeout: must be a positive number of seconds"
    ):
        client.batch([], job_timeout=-1)
    with pytest.raises(am.ClientClosedError):
        async with client.batch([]):
            pass


async def test_empty_batch(client: am.AsyncApimart) -> None:
    async with client.batch([]) as results:
        assert await drain(results) == []


# -- re-attach: wait and watch ----------------------------------------------------------------


async def test_wait_and_watch_reattach_from_another_client(manual_emu: Emulator) -> None:
    async with am.AsyncApimart(manual_emu.api_key, base_url=manual_emu.base_url) as first:
        ids = [await first.videos.submit(sora(i)) for i in range(4)]
    async with am.AsyncApimart(
        manual_emu.api_key, base_url=manual_emu.base_url, poll=FAST_POLL
    ) as second:
        manual_emu.complete(ids[0])
        assert (await second.tasks.wait(ids[0])).ok
        async with second.tasks.watch([ids[3], ids[1], ids[2]]) as stream:
            manual_emu.complete(ids[2])
            first = await stream.__anext__()
            manual_emu.fail(ids[3])
            second_done = await stream.__anext__()
            manual_emu.complete(ids[1])
            rest = [t async for t in stream]
        assert [first.id, second_done.id, *(t.id for t in rest)] == [ids[2], ids[3], ids[1]]
        assert second_done.status is am.TaskStatus.FAILED
        with pytest.raises(am.NotFoundError):
            await second.tasks.wait("task_never_existed")
        with pytest.raises(am.TaskTimeoutError):
            await second.tasks.wait(await second.videos.submit(sora(9)), timeout=0.05)
        assert len(second._poller) == 0


async def test_watch_left_early_stops_following(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    ids = [await manual_client.videos.submit(sora(i)) for i in range(3)]
    async with manual_client.tasks.watch(ids) as stream:
        manual_emu.complete(ids[0])
        async for task in stream:
            assert task.id == ids[0]
            break
        assert stream.remaining == ids[1:]
    assert len(manual_client._poller) == 0


async def test_generate_uses_the_shared_poller(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(manual_client.videos.generate, sora(0))
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 1)
        await manual_emu.wait_until(lambda: len(manual_client._poller) == 1)
        manual_emu.complete_all()
    assert len(manual_client._poller) == 0


async def test_iterating_a_batch_or_a_watch_outside_async_with_says_how_to_use_it(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    """``async for o in client.batch(jobs)`` ended at once with no outcome and nothing sent,
    and ``async for t in client.tasks.watch(ids)`` waited for ever (brk21b 8): both run only
    inside ``async with``, and now say so."""
    with pytest.raises(RuntimeError, match=r"inside 'async with client.batch\(...\) as"):
        async for _ in manual_client.batch([sora(0)]):
            pass
    with pytest.raises(RuntimeError, match=r"inside 'async with client.tasks.watch\(...\) as"):
        async for _ in manual_client.tasks.watch(["t1"]):
            pass
    assert sum(manual_emu.counters.values()) == 0
    assert len(manual_client._poller) == 0


@pytest.mark.parametrize("option", ["manifest", "download_dir", "media_root", "journal"])
async def test_a_path_with_a_nul_character_is_refused_by_name(
    manual_emu: Emulator, manual_client: am.AsyncApimart, option: str
) -> None:
    """``ValueError: embedded null byte`` escaped from ``async with`` (brk21b 14)."""
    with pytest.raises(am.ValidationError, match=f"{option}: must not contain a NUL character"):
        manual_client.batch([sora(0)], **{option: "x\x00"})
    with pytest.raises(am.ValidationError, match="journal: must not contain a NUL character"):
        am.AsyncApimart("sk-test", base_url=manual_emu.base_url, journal="j\x00.sqlite")
    assert sum(manual_emu.counters.values()) == 0


@pytest.mark.parametrize("option", ["manifest", "download_dir", "media_root", "journal"])
async def test_a_path_with_a_lone_surrogate_is_refused_by_name(
    manual_emu: Emulator, manual_client: am.AsyncApimart, option: str
) -> None:
    """brk21c: a path holding a lone surrogate (JSON's \\ud800, in a name a web app took
    from its caller) raised a raw ``UnicodeEncodeError`` out of ``async with``, of the
    client's ``open``, of ``download`` and of ``uploads.image``: no file name holds one."""
    rule = "must be a path a file system can hold"
    with pytest.raises(am.ValidationError, match=f"{option}: {rule}"):
        manual_client.batch([sora(0)], **{option: "x\ud800"})
    with pytest.raises(am.ValidationError, match=f"journal: {rule}"):
        am.AsyncApimart("sk-test", base_url=manual_emu.base_url, journal="j\ud800.sqlite")
    url = f"{manual_emu.base_url}/files/task_x/0.mp4"
    with pytest.raises(am.ValidationError, match=f"dest: {rule}"):
        await manual_client.download(url, "v\ud800.mp4")
    with pytest.raises(am.ValidationError, match=f"file: {rule}"):
        await manual_client.uploads.image("i\ud800.png")
    assert sum(manual_emu.counters.values()) == 0
    # a file name is only a label: sent with the character replaced, as a non-UTF-8 one is
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    assert (await manual_client.uploads.image(png, filename="\ud800.png")).startswith("http")


@pytest.mark.parametrize("refusal", ["wrong key", "no balance"])
async def test_a_refused_key_or_an_empty_balance_stops_submitting(refusal: str) -> None:
    """brk16h: a wrong key sent all 200 jobs' POSTs, each answered 401 (and an empty balance
    each 402): every later submit gets the same answer. The first such answer stops the
    batch, as ``stop_on_error`` would: the jobs not yet sent are not (a re-run, key or
    balance fixed, sends them), nothing billed."""
    options: dict[str, object] = {"api_key": "sk-right-key-123456"}
    if refusal == "no balance":
        options["balance"] = 0.0
    async with Emulator(**options) as emu:  # type: ignore[arg-type]
        key = "sk-wrong-key-123456" if refusal == "wrong key" else emu.api_key
        async with (
            am.AsyncApimart(key, base_url=emu.base_url, poll=FAST_POLL) as client,
            client.batch([sora(i) for i in range(40)], concurrency=2) as results,
        ):
            outcomes = await drain(results)
    indexes = [o.index for o in outcomes]
    assert len(set(indexes)) == len(indexes) == results.stats().read  # each job read, once
    expected = am.AuthenticationError if refusal == "wrong key" else am.InsufficientBalanceError
    refused = [o for o in outcomes if isinstance(o.error, expected)]
    stopped = [o for o in outcomes if isinstance(o.error, am.BatchStoppedError)]
    assert 1 <= len(refused) <= 2 and len(refused) + len(stopped) == len(outcomes) <= 4
    assert emu.counters["submit"] == len(refused)  # at most the two already in flight
    assert emu.tasks_created == 0
    assert results.stopped is not None
    assert ("API key" if refusal == "wrong key" else "balance") in results.stopped

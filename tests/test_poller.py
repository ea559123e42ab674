"""The shared poller against every variant of the service: no id is ever stranded.

Each test here is a regression test of issue 11 (or 23): a status round that fails in any way
turns into a result per id; the batch status route is a cheaper path, never the only one;
absence proves nothing; errors that waiting cannot heal end the wait after a bounded number of
tries; a completed task without a video is an error. Time that matters (grace periods, the
batch route's retry) runs on the poller's clock, which the tests move (``SkewClock``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import attrs
import pytest

import apimart_async as am
from apimart_async import _converter
from apimart_async.emulator import Emulator, Fault

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

#: Every test that could hang before its fix is bounded by this many real seconds.
DEADLINE = 20


def sora(i: int) -> am.VideoRequest:
    return am.VideoRequest("sora-2-preview", f"a cat, take {i}", duration=4)


class SkewClock:
    """The poller's clock: real monotonic time plus an offset the test moves forward."""

    def __init__(self, client: am.AsyncApimart) -> None:
        self.offset = 0.0
        self._poller = client._poller
        self._poller._clock = self

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        self._poller._wake.set()


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for a state of the client (no event to wait on); bounded by ``DEADLINE``."""
    with anyio.fail_after(DEADLINE):
        while not predicate():  # noqa: ASYNC110 - the schedule has no event to wait on
            await anyio.sleep(0.001)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "apimart_async" and r.levelno == logging.WARNING
    ]


@pytest.fixture
async def manual() -> AsyncIterator[Emulator]:
    async with Emulator(mode="manual", frozen_clock=True, seed=7) as emulator:
        yield emulator


def client_of(emu: Emulator, **kwargs: object) -> am.AsyncApimart:
    options: dict[str, object] = {"poll": FAST_POLL, "max_retries": 1, **kwargs}
    return am.AsyncApimart(emu.api_key, base_url=emu.base_url, **options)  # type: ignore[arg-type]


async def run_batch(
    client: am.AsyncApimart, emu: Emulator, n: int, **kw: object
) -> list[am.Outcome]:
    """Submit ``n`` jobs, complete them all at the emulator once created, drain the outcomes."""
    with anyio.fail_after(DEADLINE):
        async with client.batch([sora(i) for i in range(n)], **kw) as results:  # type: ignore[arg-type]
            await emu.wait_until(lambda: emu.tasks_created == n, timeout=DEADLINE)
            emu.complete_all()
            return [o async for o in results]


# -- the batch route is never the only path ---------------------------------------------------


@pytest.mark.parametrize("variant", ["refuse", "absent"])
async def test_unusable_batch_route_falls_back_with_one_warning(
    caplog: pytest.LogCaptureFixture, variant: str
) -> None:
    caplog.set_level(logging.INFO, logger="apimart_async")
    async with Emulator(mode="manual", frozen_clock=True, batch_route=variant) as emu:  # type: ignore[arg-type]
        async with client_of(emu) as client:
            outcomes = await run_batch(client, emu, 100, concurrency=16)
            assert client.batch_route_available is False
    assert sorted(o.index for o in outcomes) == list(range(100))
    assert all(o.ok for o in outcomes)
    assert emu.counters["batch"] == 1  # refused once, then per-task reads
    assert emu.counters["task"] >= 100
    (warning,) = warnings_of(caplog)
    assert warning.startswith("batch status route unusable (")
    assert "using per-task status requests" in warning


@pytest.mark.parametrize("variant", ["nested", "keyed"])
async def test_other_batch_reply_shapes_are_read(variant: str) -> None:
    async with Emulator(mode="manual", frozen_clock=True, batch_route=variant) as emu:  # type: ignore[arg-type]
        async with client_of(emu) as client:
            outcomes = await run_batch(client, emu, 30)
            assert client.batch_route_available is True
    assert all(o.ok for o in outcomes) and len(outcomes) == 30
    assert emu.counters.get("task", 0) == 0


async def test_consecutive_batch_failures_switch_then_the_route_is_tried_again(
    manual: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apimart_async")
    async with client_of(manual) as client:
        clock = SkewClock(client)
        (task_id,) = manual.create_tasks(1)
        manual.faults.inject("batch", Fault.server_error(503), times=6)  # 3 rounds x 2 tries
        with anyio.fail_after(DEADLINE):
            async with client.tasks.watch([task_id]) as stream:
                await manual.wait_until(lambda: manual.counters.get("task", 0) >= 1)
                # the switch follows that per-task read's reply, after the emulator counted it
                while client.batch_route_available is not False:  # noqa: ASYNC110 (client side)
                    await anyio.sleep(0.001)
                assert manual.counters["batch"] == 6
                # ten minutes later on the poller's clock, the route is tried again
                clock.advance(600)
                await manual.wait_until(lambda: manual.counters["batch"] == 7)
                manual.complete(task_id)
                (task,) = [t async for t in stream]
        assert task.ok
        assert client.batch_route_available is True
    assert len(warnings_of(caplog)) == 1


@pytest.mark.parametrize("outage", ["connection refused", "503 on every route"])
async def test_an_outage_keeps_the_batch_route_and_uses_it_again_at_recovery(
    caplog: pytest.LogCaptureFixture, outage: str
) -> None:
    """brk21d: an outage (the service down, connections refused) was logged as "batch status
    route unusable" and status reads went task by task for the next 600 s, one request per
    task instead of one per hundred. Failing everywhere says nothing of the batch route: the
    poller keeps it and backs off, and the first round after the recovery goes through it.
    Only a route failing while the service answers per-task reads is switched off
    (``test_consecutive_batch_failures_switch_then_the_route_is_tried_again``)."""
    caplog.set_level(logging.INFO, logger="apimart_async")
    async with Emulator(mode="manual", frozen_clock=True) as emu:
        async with client_of(emu, wait_unreachable=None) as client:
            ids = emu.create_tasks(3)
            with anyio.fail_after(DEADLINE):
                async with client.tasks.watch(ids) as stream:
                    await emu.wait_until(lambda: emu.counters.get("batch", 0) >= 2)
                    assert client.batch_route_available is True
                    if outage == "connection refused":
                        await emu.stop()
                    else:
                        emu.faults.set_rate(
                            1.0, endpoints=["batch", "task"], faults=[Fault.server_error(503)]
                        )

                    def attempts() -> int:  # status requests tried, refused ones too
                        counts = client.request_counts()
                        return counts.get("batch", 0) + counts.get("task", 0)

                    sent = attempts()
                    # five rounds of status reads failing (each after its retry), and more
                    await until(lambda: attempts() >= sent + 10)
                    assert client.batch_route_available is True
                    if outage == "connection refused":
                        await emu.start()
                    else:
                        emu.faults.clear()
                    by_id, batched = emu.counters.get("task", 0), emu.counters["batch"]
                    await emu.wait_until(lambda: emu.counters["batch"] >= batched + 3)
                    assert emu.counters.get("task", 0) == by_id  # no read task by task
                    emu.complete_all()
                    done = [t async for t in stream]
    assert sorted(t.id for t in done) == sorted(ids)
    assert not [w for w in warnings_of(caplog) if "unusable" in w]
    assert not [r for r in caplog.records if "unusable" in r.getMessage()]


async def test_refused_route_is_tried_again_after_ten_minutes(manual: Emulator) -> None:
    manual.batch_route = "refuse"
    async with client_of(manual) as client:
        clock = SkewClock(client)
        ids = manual.create_tasks(3)
        with anyio.fail_after(DEADLINE):
            async with client.tasks.watch(ids) as stream:
                await manual.wait_until(lambda: manual.counters.get("task", 0) >= 6)
                assert manual.counters["batch"] == 1
                manual.batch_route = "ok"
                clock.advance(500)  # not yet
                n = manual.counters["task"]
                await manual.wait_until(lambda: manual.counters["task"] >= n + 3)
                assert manual.counters["batch"] == 1
                clock.advance(100)
                await manual.wait_until(lambda: manual.counters["batch"] == 2)
                manual.complete_all()
                done = [t async for t in stream]
    assert sorted(t.id for t in done) == sorted(ids)


# -- a failed status read never strands its round ---------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault.server_error(503),  # after the client's retries
        Fault.reply(200, b"<html><body>Gateway says hello</body></html>"),
        Fault.error(400, "invalid_request_error", message="invalid task ID"),
        Fault.drop(),
    ],
    ids=["503", "html-200", "400-invalid-id", "drop"],
)
async def test_failed_per_task_read_reschedules_its_ids(manual: Emulator, fault: Fault) -> None:
    manual.batch_route = "absent"
    async with client_of(manual, status_concurrency=1) as client:
        ids = manual.create_tasks(20)
        # one read at a time, two tries each: the first three ids of the round fail
        manual.faults.inject("task", fault, times=6)
        with anyio.fail_after(DEADLINE):
            async with client.tasks.watch(ids) as stream:
                await manual.wait_until(lambda: manual.counters.get("task", 0) >= 40)
                manual.complete_all()
                done = [t async for t in stream]
        assert len(client._poller) == 0
    assert sorted(t.id for t in done) == sorted(ids)
    assert all(t.ok for t in done)


async def test_unexpected_exception_in_a_round_reschedules_its_ids(
    manual: Emulator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = _converter.parse_task_list
    calls = []

    def flaky(body: bytes, *, status: int | None = None) -> list[am.Task]:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug")
        return real(body, status=status)

    monkeypatch.setattr(_converter, "parse_task_list", flaky)
    async with client_of(manual) as client:
        ids = manual.create_tasks(5)
        manual.complete_all()
        with anyio.fail_after(DEADLINE):
            async with client.tasks.watch(ids) as stream:
                done = [t async for t in stream]
    assert sorted(t.id for t in done) == sorted(ids)


@pytest.mark.parametrize("batch_route", ["ok", "absent"])
async def test_a_status_that_cannot_be_handled_strands_no_other_task_of_its_round(
    manual: Emulator,
    batch_route: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug met while handling one task's status (here: the schedule raises for it, every
    time) is that task's problem alone: the other tasks read in the same round end, and the
    bad one ends after ``hard_error_tries`` reads with a typed error naming it (it used to
    fail the whole round, every round, so the tasks after it were never reported)."""
    manual.batch_route = batch_route  # type: ignore[assignment]
    async with client_of(manual) as client:
        ids = manual.create_tasks(5)
        bad = ids[0]
        schedule = client._poller.schedule
        real = schedule.on_status

        def on_status(task: am.Task, now: float, **kw: float | None) -> bool:
            if task.id == bad:
                raise KeyError("a bug")
            return real(task, now, **kw)

        monkeypatch.setattr(schedule, "on_status", on_status)
        manual.complete_all()
        results: dict[str, am.Task | Exception] = {}

        async def wait(task_id: str) -> None:
            try:
                results[task_id] = await client.tasks.wait(task_id)
            except am.ApimartError as exc:
                results[task_id] = exc

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                for task_id in ids:
                    tg.start_soon(wait, task_id)
    assert all(isinstance(results[t], am.Task) for t in ids[1:])
    error = results[bad]
    assert isinstance(error, am.ResponseValidationError)
    assert str(error).startswith(f"cannot handle the status of task {bad}: KeyError")
    assert len(client._poller) == 0
    handled = [r for r in caplog.records if "cannot handle the status of task" in r.getMessage()]
    assert len(handled) == 3  # one per read: hard_error_tries


# -- absence proves nothing -------------------------------------------------------------------


async def test_task_left_out_of_batch_replies_is_read_by_id_and_not_lost(
    manual: Emulator, tmp_path: Path
) -> None:
    async with client_of(manual) as client:
        with anyio.fail_after(DEADLINE):
            async with client.batch(
                [sora(i) for i in range(5)], journal=tmp_path / "j.sqlite"
            ) as results:
                # every task known to the batch (its id journaled), not only made at the
                # emulator: on a loaded machine the replies' journal writes come later
                await manual.wait_until(lambda: results.stats().pending == 5)
                hidden = manual.task_ids()[2]
                manual.batch_hidden.add(hidden)
                n = manual.counters.get("batch", 0)
                await manual.wait_until(lambda: manual.counters.get("batch", 0) >= n + 4)
                assert results.stats().pending == 5
                manual.complete_all()
                outcomes = [o async for o in results]
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        assert manual.counters["task"] >= 2  # the absent one was confirmed by id
        # the journal holds every job as completed: a re-run replays them all
        async with client.batch(
            [sora(i) for i in range(5)], journal=tmp_path / "j.sqlite"
        ) as again:
            replayed = [o async for o in again]
    assert all(o.ok and o.replayed for o in replayed)
    assert manual.tasks_created == 5


async def test_one_not_found_is_not_proof(manual: Emulator) -> None:
    async with client_of(manual) as client:
        (task_id,) = manual.create_tasks(1)
        manual.batch_hidden.add(task_id)
        manual.faults.inject("task", Fault.error(404, "invalid_request_error"), times=1)
        with anyio.fail_after(DEADLINE):
            async with client.tasks.watch([task_id]) as stream:
                await manual.wait_until(lambda: manual.counters.get("task", 0) >= 3)
                manual.complete(task_id)
                (task,) = [t async for t in stream]
    assert task.ok


@pytest.mark.parametrize("variant", ["404", "400", "200"])
async def test_gone_task_ends_after_two_confirmations_over_the_grace_period(variant: str) -> None:
    policy = am.PollPolicy(
        first_check=0.001, min_interval=0.001, max_interval=0.005, jitter=0.0, not_found_grace=60
    )
    async with Emulator(mode="manual", frozen_clock=True, unknown_task=variant) as emu:  # type: ignore[arg-type]
        async with client_of(emu, poll=policy) as client:
            clock = SkewClock(client)
            (task_id,) = emu.create_tasks(1)
            emu.advance(4 * 24 * 3600)  # past the service's retention
            with anyio.fail_after(DEADLINE):
                async with client.tasks.watch([task_id]) as stream:
                    await emu.wait_until(lambda: emu.counters.get("task", 0) == 1)
                    # the poller has taken the answer in: the next check is planned
                    await until(lambda: client._poller.schedule.next_check(task_id) is not None)
                    assert stream.remaining == [task_id]
                    clock.advance(30)
                    assert stream.remaining == [task_id]
                    clock.advance(30)
                    with pytest.raises(am.NotFoundError, match="does not exist or has expired"):
                        await stream.__anext__()
    assert emu.counters["task"] == 2  # one confirmation, one more after the grace period
    assert emu.counters["batch"] == 2


async def test_vanished_task_is_journaled_done_only_after_confirmation(
    manual: Emulator, tmp_path: Path
) -> None:
    journal = tmp_path / "j.sqlite"
    async with client_of(manual) as client:
        with anyio.fail_after(DEADLINE):
            async with client.batch([sora(0)], journal=journal) as results:
                await manual.wait_until(lambda: manual.tasks_created == 1)
                manual.advance(4 * 24 * 3600)
                (outcome,) = [o async for o in results]
        assert isinstance(outcome.error, am.NotFoundError)
        assert manual.counters["task"] == 2
        records = am.SqliteJournal.read(journal)
    assert records[0].state == "done"
    assert records[0].error_type == "NotFoundError"


# -- errors that waiting cannot heal ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (
            Fault.error(401, "authentication_error", message="API key is invalid"),
            am.AuthenticationError,
        ),
        (Fault.error(403, "permission_error", message="not allowed"), am.PermissionDeniedError),
        (Fault.reply(302, b""), am.APIStatusError),
        (
            Fault.error(400, "invalid_request_error", message="language is not supported"),
            am.BadRequestError,
        ),
    ],
    ids=["401", "403", "redirect", "400"],
)
async def test_unhealable_status_errors_end_the_wait_after_bounded_tries(
    manual: Emulator, fault: Fault, error: type[am.ApimartError]
) -> None:
    async with client_of(manual) as client:
        (task_id,) = manual.create_tasks(1)
        manual.faults.inject("*", fault, times=100)
        with anyio.fail_after(DEADLINE), pytest.raises(error) as info:
            await client.tasks.wait(task_id)
        assert len(client._poller) == 0
    assert type(info.value) is error
    # the batch route refused once (-> per-task reads), then three reads of the task
    assert manual.counters == {"batch": 1, "task": 3}


async def test_unhealable_error_ends_a_batch_job_resumably(
    manual: Emulator, tmp_path: Path
) -> None:
    async with client_of(manual) as client:
        with anyio.fail_after(DEADLINE):
            async with client.batch([sora(0)], journal=tmp_path / "j.sqlite") as results:
                await manual.wait_until(lambda: manual.tasks_created == 1)
                manual.faults.inject("*", Fault.error(403, "permission_error"), times=100)
                (outcome,) = [o async for o in results]
        assert isinstance(outcome.error, am.PermissionDeniedError)
        records = am.SqliteJournal.read(tmp_path / "j.sqlite")
    assert records[0].state == "pending"  # a later run picks the task up again


# -- completed without a video ----------------------------------------------------------------


async def test_completed_without_video_is_an_error_no_file_and_resumable(
    manual: Emulator, tmp_path: Path
) -> None:
    journal, out = tmp_path / "j.sqlite", tmp_path / "videos"
    async with client_of(manual) as client:
        with anyio.fail_after(DEADLINE):
            async with client.batch([sora(0)], journal=journal, download_dir=out) as results:
                await manual.wait_until(lambda: manual.tasks_created == 1)
                (task_id,) = manual.task_ids()
                manual.complete(task_id, videos=0)
                (outcome,) = [o async for o in results]
        err = outcome.error
        assert isinstance(err, am.NoVideoError)
        assert isinstance(err, am.ResponseValidationError)
        assert err.task.id == task_id
        assert str(err).startswith(f"task {task_id} is completed but its reply has no video URL")
        assert not outcome.ok
        assert manual.counters.get("file", 0) == 0
        assert not any(out.glob("*.mp4")) if out.exists() else True
        records = am.SqliteJournal.read(journal)
        assert records[0].state == "pending"  # a later run reads the task again


async def test_completed_without_video_is_read_a_bounded_number_of_times(manual: Emulator) -> None:
    async with client_of(manual) as client:
        (task_id,) = manual.create_tasks(1)
        manual.complete(task_id, videos=0)
        with anyio.fail_after(DEADLINE), pytest.raises(am.NoVideoError):
            await client.tasks.wait(task_id)
    assert manual.counters == {"batch": 3}  # read three times before giving up, not forever


async def test_generate_raises_no_video_error(manual: Emulator) -> None:
    async with client_of(manual) as client:

        async def complete_empty() -> None:
            await manual.wait_until(lambda: manual.tasks_created == 1)
            manual.complete(manual.task_ids()[0], videos=0)

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(complete_empty)
                with pytest.raises(am.NoVideoError):
                    await client.videos.generate(sora(0))


# -- statuses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "name"),
    [
        ("success", "COMPLETED"),
        ("succeeded", "COMPLETED"),
        ("SUCCESS", "COMPLETED"),
        ("failure", "FAILED"),
        ("error", "FAILED"),
        ("canceled", "CANCELLED"),
        ("cancelled", "CANCELLED"),
        ("expired", "EXPIRED"),
        ("rendering", "UNKNOWN"),
    ],
)
def test_status_synonyms(word: str, name: str) -> None:
    status = am.TaskStatus[name]
    assert am.TaskStatus.parse(word) is status
    assert status.is_terminal is (status is not am.TaskStatus.UNKNOWN)


@pytest.mark.parametrize(
    "names",
    [
        {"completed": "success", "failed": "failure", "cancelled": "canceled"},
        {"completed": "succeeded", "failed": "error", "cancelled": "expired"},
    ],
)
async def test_synonyms_end_waits(names: dict[str, str]) -> None:
    async with Emulator(mode="manual", frozen_clock=True, status_names=names) as emu:
        async with client_of(emu) as client:
            a, b, c = emu.create_tasks(3)
            emu.complete(a)
            emu.fail(b)
            emu.cancel(c)
            with anyio.fail_after(DEADLINE):
                assert (await client.tasks.wait(a)).ok
                with pytest.raises(am.TaskFailedError) as failed:
                    await client.tasks.wait(b)
                with pytest.raises(am.TaskFailedError) as cancelled:
                    await client.tasks.wait(c)
    assert failed.value.task.status is am.TaskStatus.FAILED
    assert cancelled.value.task.raw_status == names["cancelled"]
    assert not cancelled.value.task.ok


# -- a task reply that cannot be read (issue 23) ----------------------------------------------


@pytest.mark.parametrize("batch_route", ["ok", "absent"])
async def test_unreadable_task_reply_ends_the_task_after_bounded_tries(
    manual: Emulator, batch_route: str
) -> None:
    manual.batch_route = batch_route  # type: ignore[assignment]
    async with client_of(manual) as client:
        (task_id,) = manual.create_tasks(1)
        weird = {"id": task_id, "status": "processing", "result": {"videos": {}}}
        manual.faults.inject("batch", Fault.reply(200, {"code": 200, "data": [weird]}), times=100)
        manual.faults.inject("task", Fault.reply(200, {"code": 200, "data": weird}), times=100)
        with anyio.fail_after(DEADLINE), pytest.raises(am.ResponseValidationError) as info:
            await client.tasks.wait(task_id)
    assert str(info.value).startswith("cannot read task")
    assert manual.counters["task"] == 3  # bounded; each by id (a batch reply names the item)


@pytest.mark.parametrize(
    ("code", "read"), [(1301, 1301), ("policy", "policy"), (5.0, 5), (None, None)]
)
def test_error_code_int_or_str_is_read(code: object, read: object) -> None:
    body = {"code": 200, "data": {"id": "t", "status": "failed", "error": {"code": code}}}
    task = _converter.parse_task(json.dumps(body).encode())
    assert task.error is not None
    assert task.error.code == read


@pytest.mark.parametrize(
    ("message", "unknown"),
    [
        ("invalid task ID", True),
        ("task does not exist or has expired", True),
        ("unknown task_id: task_x", True),
        ("Task not found", True),
        ("no such id", True),
        ("任务不存在或已过期", True),
        ("タスクが存在しないか、有効期限が切れています", True),
        ("작업이 존재하지 않거나 만료되었습니다", True),
        ("language is not supported", False),
        ("invalid request", False),
        ("model not found", False),
    ],
)
def test_which_400s_say_the_task_is_unknown(message: str, unknown: bool) -> None:
    from apimart_async._poller import classify, is_unknown_task

    exc = am.BadRequestError(message, status=400)
    assert is_unknown_task(exc) is unknown
    assert classify(exc) == ("gone" if unknown else "hard")
    assert is_unknown_task(am.NotFoundError("x", status=404))
    assert classify(am.ServerError("x", status=503)) == "transient"
    assert classify(am.ResponseValidationError("x", decodable=False)) == "transient"
    assert classify(am.ResponseValidationError("x")) == "hard"
    assert classify(am.APIStatusError("redirect", status=302)) == "hard"
    assert classify(am.APITimeoutError("slow")) == "transient"
    assert classify(am.RateLimitError("x", status=429)) == "transient"
    # a local error (an id the service gave that we cannot even send back) never heals
    assert classify(am.ValidationError([am.FieldError("task_id", "bad", "a b")])) == "hard"


def test_batch_route_state() -> None:
    from apimart_async._api import BatchRoute

    route = BatchRoute(retry_after=600.0, max_failures=3)
    assert route.available is None and route.usable(0.0)
    route.on_ok()
    assert route.available is True
    assert not route.on_failed(1.0) and not route.on_failed(2.0)
    route.on_ok()  # a success in between: counting starts again
    assert not route.on_failed(3.0) and not route.on_failed(4.0)
    assert route.on_failed(5.0)  # the third in a row switches it off
    assert route.available is False and not route.usable(604.9)
    assert route.usable(605.0)  # tried again ten minutes later
    assert route.available is None
    assert not route.on_refused(606.0)  # not the first switch of the session
    assert route.switches == 2 and not route.usable(1205.9) and route.usable(1206.0)
    assert repr(route) == "<BatchRoute untried failures=0 switches=2>"


async def test_batch_route_retry_is_the_client_policy(manual: Emulator) -> None:
    manual.batch_route = "refuse"
    policy = attrs.evolve(FAST_POLL, batch_route_retry=30.0)
    async with client_of(manual, poll=policy) as client:
        clock = SkewClock(client)
        (task_id,) = manual.create_tasks(1)
        with anyio.fail_after(DEADLINE):
            async with client.tasks.watch([task_id]) as stream:
                await manual.wait_until(lambda: manual.counters.get("task", 0) >= 2)
                clock.advance(30)
                await manual.wait_until(lambda: manual.counters["batch"] == 2)
                manual.complete(task_id)
                (task,) = [t async for t in stream]
    assert task.ok

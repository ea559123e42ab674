"""Webhooks (issue 15): a callback is a hint to read the task now, never a result; tasks with a
webhook are polled only as a fallback (a safety check past the predicted end, then a slow
cadence). The schedule runs on a fake clock; the end-to-end tests on a frozen emulator clock
that the test moves (callbacks arrive over loopback; no sleeps)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web

import apimart_async as am
from apimart_async import webhooks
from apimart_async._hints import task_id_of
from apimart_async._poll_schedule import PollSchedule
from apimart_async.emulator import Emulator, Fault
from apimart_async.testing import follow_clock

pytestmark = pytest.mark.anyio

DEADLINE = 30  # real seconds any wait of an end-to-end test may take before it fails

# webhook_gather as it was set when these tests were written (the default is 0.27 s): the
# clock-driven tests step 0.3 s to reach the end of a window with room to spare
NO_JITTER = am.PollPolicy(jitter=0.0, webhook_gather=0.2)


def running(task_id: str, estimate: float | None = None) -> am.Task:
    return am.Task(id=task_id, status=am.TaskStatus.PROCESSING, estimated_time=estimate)


def done(task_id: str) -> am.Task:
    return am.Task(id=task_id, status=am.TaskStatus.COMPLETED, progress=100)


# -- the schedule, on a fake clock -----------------------------------------------------------------


def test_a_task_with_a_webhook_gets_a_safety_check_past_its_latest_end_then_a_slow_cadence() -> (
    None
):
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0, webhook=True)
    s.add("b", now=0.0)  # no webhook: first checked at first_check (2 s)
    assert s.next_check("b") == 2.0
    # no first check: the default estimate's latest end (30 / 0.75 = 40 s) + webhook_grace
    assert s.next_check("a") == pytest.approx(50.0)
    assert s.due(48.0) == ["b"]  # only b (a is not due, nor within the ride-along horizon)
    assert s.due(50.0) == ["a"]
    # still running, estimate 100 s: the safety check moves past the new latest end
    # (100 / 0.75 = 133.3 s) + 10 s, capped by webhook_interval (120 s) from now
    assert not s.on_status(running("a", estimate=100), 50.0)
    assert s.next_check("a") == pytest.approx(100 / 0.75 + 10)
    assert s.due(143.4) == ["a"]
    assert not s.on_status(running("a", estimate=100), 143.4)
    # past it: the slow cadence
    assert s.next_check("a") == pytest.approx(143.4 + 120)


def test_a_hint_checks_the_task_in_the_next_round_after_webhook_gather_on_the_batch_route() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0, webhook=True)
    s.add("c", now=0.0, webhook=True)
    assert s.due(1.0, batched=True) == []
    assert s.hint("a", 5.0) is True
    assert s.hint("a", 5.05) is True  # a repeat: the same check, not a second one
    assert s.hint("c", 5.05) is True
    assert s.hint("nobody-follows-this", 5.0) is False
    # the window of webhook_gather (0.2 s) from the first callback: read together at its end
    assert s.next_wakeup() == pytest.approx(5.2)
    assert s.due(5.19, batched=True) == []
    assert s.due(5.2, batched=True) == ["a", "c"]
    assert s.on_status(done("a"), 5.2) and s.on_status(done("c"), 5.2)
    assert s.hint("a", 6.0) is False  # ended: a late repeat is ignored
    assert len(s) == 0


def test_callbacks_that_fill_a_request_are_read_at_once() -> None:
    s = PollSchedule(NO_JITTER)
    ids = [f"t{i}" for i in range(250)]
    for task_id in ids:
        s.add(task_id, now=0.0, webhook=True)
    assert s.due(1.0, batched=True) == []
    for task_id in ids[:99]:
        s.hint(task_id, 10.0)
    assert s.due(10.0, batched=True) == []  # 99: the window is still open
    s.hint(ids[99], 10.01)  # the 100th: a full request, no reason to wait
    assert s.due(10.01, batched=True) == ids[:100]
    for task_id in ids[100:150]:  # a new window
        s.hint(task_id, 10.02)
    assert s.next_wakeup() == pytest.approx(10.22)
    assert s.due(10.22, batched=True) == ids[100:150]


def test_a_hint_is_due_at_once_with_per_task_reads() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0, webhook=True)
    assert s.due(1.0, batched=False) == []
    assert s.hint("a", 7.0)
    assert s.due(7.0, batched=False) == ["a"]


def test_a_hint_during_a_check_gets_the_task_checked_again_if_that_check_saw_it_run() -> None:
    s = PollSchedule(NO_JITTER)
    s.add("a", now=0.0, webhook=True)
    assert s.due(50.0) == ["a"]  # the safety check leaves...
    assert s.hint("a", 50.05)  # ...and the callback comes while it is out
    assert not s.on_status(running("a", estimate=60), 50.1)  # it read the task before its end
    assert s.next_check("a") == pytest.approx(50.3)


def test_lost_callbacks_end_by_polling_and_every_task_is_read_a_known_number_of_times() -> None:
    """100 tasks of 20 s with a webhook; the callbacks of 10 never come. Each hinted task is
    read exactly once; each lost one at its safety check (40 s + 10 s), once."""
    s = PollSchedule(NO_JITTER)
    ids = [f"t{i}" for i in range(100)]
    for task_id in ids:
        s.add(task_id, now=0.0, webhook=True)
    lost = set(ids[::10])
    reads: dict[str, int] = dict.fromkeys(ids, 0)
    rounds = 0

    def run_due(now: float) -> None:
        nonlocal rounds
        due = s.due(now, batched=True)
        rounds += bool(due)
        for task_id in due:
            reads[task_id] += 1
            assert s.on_status(done(task_id) if now >= 20 else running(task_id), now)

    run_due(19.0)  # nothing is due before the end: no request at all
    assert rounds == 0
    for task_id in ids:  # the callbacks, all at the end
        if task_id not in lost:
            assert s.hint(task_id, 20.0)
    run_due(20.2)
    assert (rounds, len(s)) == (1, 10)
    wake = s.next_wakeup()
    assert wake == pytest.approx(50.0)
    run_due(wake)
    assert (rounds, len(s)) == (2, 0)
    assert set(reads.values()) == {1}


def test_webhook_policy_fields_are_checked_by_name() -> None:
    with pytest.raises(am.OptionError, match="PollPolicy.webhook_interval"):
        am.PollPolicy(webhook_interval=0)
    with pytest.raises(am.OptionError, match="PollPolicy.webhook_gather"):
        am.PollPolicy(webhook_gather=-1)


# -- what a callback says ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"id": "task_1", "status": "completed"},
        {"task_id": "task_1"},
        {"code": 200, "data": {"id": "task_1", "status": "failed"}},
        b'{"id": "task_1", "status": "completed", "result": {}}',
        '{"code": 200, "data": {"task_id": "task_1"}}',
    ],
)
def test_the_task_id_is_read_from_every_shape_the_api_describes(body: Any) -> None:
    assert task_id_of(body) == "task_1"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"not json", "the body is not JSON"),
        (b"\xff\xfe", "the body is not JSON"),
        (b"[1, 2]", "the body is not a JSON object"),
        ({"status": "completed"}, "the body names no task"),
        ({"code": 200, "data": None}, "the body names no task"),
        ({"id": 12}, "the body names no task"),
        ({"id": "a/../b"}, "the task id in the body is not a task id"),
        (b"x" * (2 << 20), "the body is larger than"),
        (12, "the body must be bytes, str or a dict, got int"),
    ],
)
def test_a_malformed_callback_is_a_webhook_error_naming_the_problem(
    body: Any, problem: str
) -> None:
    with pytest.raises(am.WebhookError, match="^webhook callback refused: " + problem) as info:
        task_id_of(body)
    assert isinstance(info.value, am.ApimartError)


# -- webhook_url: checked by name before any request ---------------------------------------------


async def test_a_bad_webhook_url_is_refused_by_name_before_any_request() -> None:
    async with Emulator() as emu, am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client:
        request = am.VideoRequest("sora-2-preview", "a cat", duration=4)
        with pytest.raises(am.ValidationError, match="webhook_url: must be an http"):
            await client.videos.submit(request, webhook_url="ftp://x/hook")
        with pytest.raises(am.ValidationError, match="webhook_url: must be an http"):
            await client.videos.generate(request, webhook_url="not a url")
        with pytest.raises(am.ValidationError, match="webhook_url: must be an http"):
            client.batch([request], webhook_url=12)  # type: ignore[arg-type]
        # brk21c: a lone surrogate (JSON's \ud800) cannot be sent in a URL
        lone = "https://u:HOOKSECRET@e.example/\ud800"
        with pytest.raises(am.ValidationError, match="webhook_url: must be valid Unicode") as info:
            await client.videos.submit(request, webhook_url=lone)
        assert "HOOKSECRET" not in str(info.value)
        str(info.value).encode()  # a message any log can print
        with pytest.raises(am.ValidationError, match="webhook: must be valid Unicode") as info:
            am.VideoRequest("sora-2-preview", "a cat", webhook=lone)
        assert "HOOKSECRET" not in str(info.value)
        str(info.value).encode()
        assert client.request_counts().get("submit", 0) == 0
        assert emu.state.tasks == {}


async def test_webhook_url_sets_the_webhook_unless_the_request_has_its_own() -> None:
    async with Emulator() as emu, am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client:
        plain = am.VideoRequest("sora-2-preview", "a cat", duration=4)
        own = am.VideoRequest("sora-2-preview", "a dog", duration=4, webhook="http://own.example")
        a = await client.videos.submit(plain, webhook_url="https://hooks.example/apimart")
        b = await client.videos.submit(own, webhook_url="https://hooks.example/apimart")
        c = await client.videos.submit(plain)
        bodies = {t: emu.state.tasks[t].body for t in (a, b, c)}
    assert bodies[a]["webhook"] == "https://hooks.example/apimart"
    assert bodies[b]["webhook"] == "http://own.example"
    assert "webhook" not in bodies[c]


# -- end to end: the emulator's callbacks, some lost, some repeated -------------------------------


@asynccontextmanager
async def callback_server(client: am.AsyncApimart) -> AsyncIterator[str]:
    """An aiohttp app on loopback with the SDK's handler; yields the ``webhook_url``."""
    app = web.Application()
    app.router.add_post("/apimart/callback", webhooks.aiohttp_handler(client))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/apimart"
    finally:
        await runner.cleanup()


def advance(emu: Emulator, client: am.AsyncApimart, seconds: float) -> None:
    """Move the emulator's clock (the poller's too) and wake the poller."""
    emu.advance(seconds)
    client._poller._wake.set()


async def advance_when_idle(emu: Emulator, client: am.AsyncApimart, seconds: float) -> None:
    """``advance`` once the poller has done what the clock's last step made due and waits
    again: however slow the machine, no step of the clock overtakes a read in flight."""

    def idle() -> bool:  # waiting for a wake-up no one has given yet
        wake = client._poller._wake
        return not wake.is_set() and wake.waiting

    await until(idle)
    advance(emu, client, seconds)
    await until(idle)


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for a state of the client (no event to wait on); bounded by the test's deadline."""
    while not predicate():  # noqa: ASYNC110 - the poller has no event to wait on
        await anyio.sleep(0.001)


def status_reads(client: am.AsyncApimart) -> tuple[int, int]:
    counts = client.request_counts()
    return counts.get("batch", 0), counts.get("task", 0)


N = 40


def jobs() -> list[am.VideoRequest]:
    return [am.VideoRequest("sora-2-preview", f"a cat, take {i}", duration=4) for i in range(N)]


@pytest.mark.parametrize("batch_route", [True, False], ids=["batch-route", "per-task"])
async def test_callbacks_arrive_some_never_do_every_result_once_and_exact_status_reads(
    batch_route: bool,
) -> None:
    async with (
        Emulator(
            frozen_clock=True,
            task_duration=10.0,
            seed=5,
            batch_route=batch_route,
            webhook_loss=0.2,
            webhook_duplicates=0.3,
        ) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client,
        callback_server(client) as url,
    ):
        follow_clock(client, emu)
        outcomes: list[am.Outcome] = []
        with anyio.fail_after(DEADLINE):
            async with client.batch(jobs(), webhook_url=url) as results:
                await until(lambda: len(client._poller) == N)  # every task followed
                assert status_reads(client) == (0, 0)  # no first check: a callback will come
                advance(emu, client, 10)  # every task ends; the emulator calls back
                await emu.wait_until(lambda: len(emu.webhook_deliveries) >= N)
                deliveries = list(emu.webhook_deliveries)
                lost = {t for _, t, status in deliveries if status == "lost"}
                repeated = len(deliveries) - N
                await emu.wait_until(
                    lambda: client.tasks.webhook_counts()["received"] == N - len(lost) + repeated
                )
                assert 0 < len(lost) < N and repeated > 0
                advance(emu, client, 0.3)  # webhook_gather: the hinted tasks are read now
                while len(outcomes) < N - len(lost):
                    outcomes.append(await results.__anext__())
                hinted_reads = status_reads(client)
                assert emu.state.tasks  # the lost ones are still followed, by polling
                advance(emu, client, 40)  # past the safety check (40 s + 10 s after submit)
                async for outcome in results:
                    outcomes.append(outcome)
    ids = [o.task_id for o in outcomes]
    assert sorted(o.index for o in outcomes) == list(range(N))  # each job exactly once
    assert len(set(ids)) == N and all(o.ok for o in outcomes)
    assert {o.task_id for o in outcomes[N - len(lost) :]} == lost  # ended by polling
    counts = client.tasks.webhook_counts()
    # every callback was one of a followed task, or a repeat that came after its end
    assert counts["received"] == N - len(lost) + repeated
    assert counts["malformed"] == 0
    assert counts["checked"] + counts["ignored"] == counts["received"]
    if batch_route:
        # one request for every hinted task (they came together), one for the lost ones
        assert hinted_reads == (1, 0)
        assert status_reads(client) == (2, 0)
    else:
        # the batch route is tried once (absent: 404), then every task is read once by id
        assert hinted_reads == (1, N - len(lost))
        assert status_reads(client) == (1, N)


async def test_a_callback_for_an_unknown_task_is_acknowledged_and_a_malformed_one_gets_400(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="apimart_async")
    async with (
        Emulator() as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client,
        callback_server(client) as url,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(
            f"{url}/callback", json={"id": "task_nobody", "status": "completed"}
        ) as r:
            assert (r.status, await r.text()) == (200, "ok\n")
        async with http.post(f"{url}/callback", data=b"{not json") as r:
            assert (r.status, await r.text()) == (400, "the body is not JSON\n")
        async with http.post(f"{url}/callback", json={"status": "completed"}) as r:
            assert r.status == 400
        async with http.post(f"{url}/callback", data=io.BytesIO(b" " * (2 << 20))) as r:
            assert r.status == 413  # beyond the app's client_max_size: never read whole
        assert await client.tasks.notify({"code": 200, "data": {"id": "task_other"}}) is False
        with pytest.raises(am.WebhookError, match="names no task"):
            await client.tasks.notify("{}")
        assert client.tasks.webhook_counts() == {
            "received": 5,
            "checked": 0,
            "ignored": 2,
            "malformed": 3,
            "forwarded": 0,
            "relayed": 0,
        }
        assert client.request_counts().get("task", 0) == 0  # nothing was read for them
    assert emu.api_key not in caplog.text


async def test_generate_with_a_webhook_waits_for_the_callback_not_for_polling() -> None:
    async with (
        Emulator(frozen_clock=True, task_duration=10.0) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client,
        callback_server(client) as url,
    ):
        follow_clock(client, emu)
        request = am.VideoRequest("sora-2-preview", "a cat", duration=4)
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                box: list[am.Task] = []

                async def generate() -> None:
                    box.append(await client.videos.generate(request, webhook_url=url))

                tg.start_soon(generate)
                await until(lambda: len(client._poller) == 1)
                advance(emu, client, 10)
                await emu.wait_until(lambda: client.tasks.webhook_counts()["checked"] == 1)
                advance(emu, client, 0.3)
        assert box[0].ok
        assert status_reads(client) == (1, 0)  # the one read the callback asked for


async def test_tasks_wait_after_submit_with_a_webhook_polls_only_as_a_fallback() -> None:
    async with (
        Emulator(frozen_clock=True, task_duration=10.0) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client,
        callback_server(client) as url,
    ):
        follow_clock(client, emu)
        request = am.VideoRequest("sora-2-preview", "a cat", duration=4)
        task_id = await client.videos.submit(request, webhook_url=url)
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                box: list[am.Task] = []

                async def wait() -> None:
                    box.append(await client.tasks.wait(task_id))

                tg.start_soon(wait)
                await emu.wait_until(
                    lambda: 1 in client._poller.schedule.ids() or bool(client._poller.watching())
                )
                advance(emu, client, 10)
                await emu.wait_until(lambda: client.tasks.webhook_counts()["checked"] == 1)
                advance(emu, client, 0.3)
        assert box[0].id == task_id
        assert status_reads(client) == (1, 0)


# -- a journaled batch resumed with another webhook_url is the same batch ------------------------


async def test_a_resume_with_another_webhook_url_is_not_a_changed_input(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite"
    reqs = jobs()[:4]
    async with Emulator(mode="manual") as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client:
            async with client.batch(reqs, journal=journal, webhook_url="https://a.example/h") as r:
                await emu.wait_until(lambda: len(emu.state.tasks) == 4)
                await r.stop()
            for task_id in list(emu.state.tasks):
                emu.complete(task_id)
            async with client.batch(reqs, journal=journal, webhook_url="https://b.example/h") as r:
                outcomes = [o async for o in r]
        bodies = [t.body for t in emu.state.tasks.values()]
    assert sorted(o.index for o in outcomes) == [0, 1, 2, 3]
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    assert len(bodies) == 4  # re-attached: nothing submitted twice
    assert {b["webhook"] for b in bodies} == {"https://a.example/h"}
    # the journal keeps the request as it was sent (the first webhook)
    assert json.dumps(bodies[0], sort_keys=True).count("a.example") == 1


async def test_a_resend_with_its_recorded_key_carries_the_recorded_webhook(
    tmp_path: Path,
) -> None:
    """The first submit's reply is lost (the task exists, the journal has only the key); the
    resume has another webhook_url. The resend must carry the body the key was first sent
    with, or the service refuses the key as reused with another body (409)."""
    journal = tmp_path / "run.sqlite"
    reqs = jobs()[:1]
    async with Emulator(frozen_clock=True, task_duration=2.0) as emu:
        emu.faults.inject("submit", Fault.lost_reply())
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=0) as client:
            async with client.batch(reqs, journal=journal, webhook_url="https://a.example/h") as r:
                (first,) = [o async for o in r]
        assert isinstance(first.error, am.APIConnectionError)
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client:
            follow_clock(client, emu)
            with anyio.fail_after(DEADLINE):
                async with client.batch(
                    reqs, journal=journal, webhook_url="https://b.example/h"
                ) as r:
                    await until(lambda: len(client._poller) == 1)
                    advance(emu, client, 120)  # not covered by b's callbacks: polled as usual
                    (again,) = [o async for o in r]
        assert again.ok, again.error
        assert again.idempotency_key == first.idempotency_key
        assert emu.tasks_created == 1 and emu.counters["submit"] == 2
        (task,) = emu.state.tasks.values()
        assert task.body["webhook"] == "https://a.example/h"


def test_the_emulator_takes_its_webhook_settings_from_the_command_line_and_checks_them() -> None:
    from apimart_async.emulator import __main__ as emulator_main

    parser = emulator_main.build_parser()
    args = ["--webhook-loss", "0.25", "--webhook-duplicates", "1", "--webhook-delay", "3"]
    emu = emulator_main.emulator_from_args(parser.parse_args(args))
    assert (emu.webhook_loss, emu.webhook_duplicates, emu.webhook_delay) == (0.25, 1.0, 3.0)
    for bad in (["--webhook-loss", "1.5"], ["--webhook-delay", "-1"], ["--webhook-delay", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(ValueError, match="webhook_duplicates must be between 0 and 1"):
        Emulator(webhook_duplicates=-0.1)
    with pytest.raises(ValueError, match="webhook_delay must be a number of seconds"):
        Emulator(webhook_delay=float("nan"))


# -- found by a break-it pass (brk15): a callback body nested too deeply ------------------

DEEP = b"[" * 100_000  # 100 kB: far below the 1 MiB the handler and notify accept


async def test_a_deeply_nested_callback_body_is_a_webhook_error_not_a_recursion_error() -> None:
    async with Emulator() as emu, am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client:
        with pytest.raises(am.WebhookError):  # before the fix: RecursionError (not an ApimartError)
            await client.tasks.notify(DEEP)
        counts = client.tasks.webhook_counts()
        # every callback received is accounted for once (today: received 1, the rest 0)
        assert counts["received"] == counts["checked"] + counts["ignored"] + counts["malformed"]


async def test_the_aiohttp_handler_answers_400_not_500_to_a_deeply_nested_body() -> None:
    async with (
        Emulator() as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client,
        callback_server(client) as url,
        aiohttp.ClientSession() as http,
        http.post(f"{url}/callback", data=DEEP) as reply,
    ):
        # before the fix: 500 (aiohttp logs the RecursionError); a 5xx also makes the service retry
        assert reply.status == 400


async def test_the_aiohttp_handler_answers_a_caller_gone_mid_body_without_an_error() -> None:
    """A caller that went away while sending its body: ``request.read()`` raised
    ``ConnectionResetError`` out of the SDK's handler ("Error handling request" and a
    traceback at ERROR for each)."""

    class Gone:
        async def read(self) -> bytes:
            raise ConnectionResetError("Connection lost")

    async with Emulator() as emu, am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client:
        handler = webhooks.aiohttp_handler(client)
        reply = await handler(Gone())  # type: ignore[arg-type]
        assert reply.status == 400
        assert client.tasks.webhook_counts()["received"] == 0


# -- a wait with a deadline looks at its task once before giving up (brk15 F12) ------------


def request() -> am.VideoRequest:
    return am.VideoRequest("sora-2-preview", "a cat", duration=4)


async def test_generate_with_a_webhook_and_a_timeout_looks_at_the_task_before_giving_up() -> None:
    """The callback is lost (webhook_loss=1: a host the service cannot reach, which the docs
    say happens). The task completes at 5 s; the first status read of a task with a webhook is
    planned at 50 s (40 s + webhook_grace), past the caller's timeout of 30 s: the wait ends
    with TaskTimeoutError ("not finished after 30 s") without a single status read, for a
    video that is done and billed. Without webhook_url the same call returns the task."""
    async with (
        Emulator(frozen_clock=True, task_duration=5.0, webhook_loss=1.0) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client,
        callback_server(client) as url,
    ):
        follow_clock(client, emu)
        box: list[am.Task | Exception] = []

        async def generate() -> None:
            try:
                box.append(await client.videos.generate(request(), webhook_url=url, timeout=30))
            except am.ApimartError as exc:
                box.append(exc)

        with anyio.fail_after(30):  # a guard only: the emulator's clock drives the test
            async with anyio.create_task_group() as tg:
                tg.start_soon(generate)
                await emu.wait_until(lambda: len(client._poller) == 1)
                while not box:
                    await advance_when_idle(emu, client, 1.0)
        assert isinstance(box[0], am.Task), f"{box[0]!r}; reads: {client.request_counts()}"


async def test_a_batch_job_timeout_with_a_webhook_still_sees_the_finished_jobs() -> None:
    async with (
        Emulator(frozen_clock=True, task_duration=5.0, webhook_loss=1.0) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client,
        callback_server(client) as url,
    ):
        follow_clock(client, emu)
        jobs = [am.VideoRequest("sora-2-preview", f"a cat {i}", duration=4) for i in range(3)]
        outcomes: list[am.Outcome] = []
        with anyio.fail_after(30):
            async with client.batch(jobs, webhook_url=url, job_timeout=30) as results:

                async def drive() -> None:
                    while len(outcomes) < len(jobs):
                        await advance_when_idle(emu, client, 1.0)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(drive)
                    async for outcome in results:
                        outcomes.append(outcome)
        # before the fix: 3 x TaskTimeoutError, {'submit': 3} and not one status read
        assert all(o.ok for o in outcomes), [(o.error, client.request_counts()) for o in outcomes]


# -- a callback that comes before its wait is not lost (brk15 F6) ---------------------------

GUARD = 5.0  # real seconds: only stops a wait the frozen clock would never end


async def test_a_callback_before_the_wait_is_not_lost() -> None:
    """videos.submit(webhook_url=...) then tasks.wait(id) later (the README's web pattern:
    POST /videos, then GET /videos/{id}/wait). The task ends and its callback arrives before
    the wait starts: notify() finds no watcher and drops it. The wait then trusts that a
    callback will come and first looks at the safety check (submit + 40 s + webhook_grace),
    50 s of the service's time after the submit, for a task that ended at 10 s."""
    async with (
        Emulator(frozen_clock=True, task_duration=10.0) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client,
        callback_server(client) as url,
    ):
        follow_clock(client, emu)
        task_id = await client.videos.submit(request(), webhook_url=url)
        advance(emu, client, 10)  # the task ends; the emulator calls back at once
        await emu.wait_until(lambda: client.tasks.webhook_counts()["received"] == 1)
        box: list[am.Task] = []

        async def wait() -> None:
            box.append(await client.tasks.wait(task_id))

        with anyio.move_on_after(GUARD):  # the frozen clock stays at 10.3 s from here
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                # the wait began (or is over already: the remembered callback asked for a read)
                await until(lambda: bool(box) or client._poller.watching() == [task_id])
                await advance_when_idle(emu, client, 0.3)  # webhook_gather: the next round
        assert box and box[0].ok  # before the fix: still waiting for the safety check at 50 s


async def test_generate_a_callback_during_on_submitted_is_not_lost() -> None:
    """The same through generate(): the callback lands while ``on_submitted`` stores the id
    (a web handler writing it to its database), before the wait is registered."""
    async with (
        Emulator(frozen_clock=True, task_duration=10.0) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client,
        callback_server(client) as url,
    ):
        follow_clock(client, emu)

        async def slow_store(task_id: str) -> None:
            advance(emu, client, 10)  # meanwhile the task ends and its callback comes
            await emu.wait_until(lambda: client.tasks.webhook_counts()["received"] == 1)

        box: list[am.Task] = []

        async def generate() -> None:
            box.append(
                await client.videos.generate(request(), webhook_url=url, on_submitted=slow_store)
            )

        with anyio.move_on_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(generate)
                await emu.wait_until(lambda: client.tasks.webhook_counts()["received"] == 1)
                # the wait began (or is over already: the remembered callback asked for a read)
                await until(lambda: bool(box) or len(client._poller.watching()) == 1)
                await advance_when_idle(emu, client, 0.3)
        assert box and box[0].ok  # before the fix: waits for the safety check at 50 s


async def test_a_batch_callback_during_the_journal_write_of_the_task_id_is_not_lost(
    tmp_path: Path,
) -> None:
    """A batch records the task id (``journal.set_task``) before it follows the task. With a
    PostgreSQL journal that write is a round trip, and during an outage it waits up to
    ``reconnect_for`` (60 s): a callback in that window finds no watcher and is dropped, and
    the job then waits for its safety check (50 s, counted from when the write returned: the
    read is planned at 60 s here, for a task that ended at 10 s). Played here with a journal
    whose ``set_task`` is held until the callback has come."""
    from apimart_async._journal import SqliteJournal

    released = anyio.Event()

    class SlowJournal(SqliteJournal):
        async def set_task(self, index: int, task_id: str) -> None:
            await released.wait()  # the database is slow (or away) right now
            await super().set_task(index, task_id)

    async with (
        Emulator(frozen_clock=True, task_duration=10.0) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client,
        callback_server(client) as url,
    ):
        follow_clock(client, emu)
        outcomes: list[am.Outcome] = []
        journal = SlowJournal(str(tmp_path / "run.sqlite"))
        with anyio.move_on_after(GUARD):
            async with client.batch([request()], journal=journal, webhook_url=url) as results:
                await emu.wait_until(lambda: emu.tasks_created == 1)
                advance(emu, client, 10)  # the task ends; its callback comes
                await emu.wait_until(lambda: client.tasks.webhook_counts()["received"] == 1)
                released.set()  # the write goes through; the batch follows the task
                # the task is followed (and may be read already: the callback was remembered)
                await until(lambda: results.stats().submitted == 1)
                await advance_when_idle(emu, client, 0.3)
                outcomes.extend([o async for o in results])
        assert outcomes and outcomes[0].ok  # before the fix: waits for the safety check at 50 s


def test_an_early_callback_is_kept_for_a_while_and_for_so_many_tasks() -> None:
    from apimart_async import _poll_schedule

    s = PollSchedule(NO_JITTER)
    assert not s.hint("early", 0.0)  # nobody follows it yet
    assert not s.hint("stale", 0.0)
    s.add("early", now=5.0, webhook=True)
    assert s.next_check("early") == 5.0  # looked at once: its callback came already
    s.add("stale", now=_poll_schedule.EARLY_HINT_AGE + 1, webhook=True)  # too long ago
    assert s.next_check("stale") == pytest.approx(_poll_schedule.EARLY_HINT_AGE + 1 + 50.0)
    # unsigned callbacks for ids nobody follows: at most EARLY_HINTS are kept, the oldest go
    for i in range(_poll_schedule.EARLY_HINTS + 1):
        s.hint(f"forged-{i}", 10.0)
    s.add("forged-0", now=11.0, webhook=True)
    s.add("forged-1", now=11.0, webhook=True)
    assert s.next_check("forged-0") == pytest.approx(61.0)  # pushed out by the newer ones
    assert s.next_check("forged-1") == 11.0


# -- forged callbacks, webhook URLs with a query, a closed client (brk15 F13, F7, F8) -------


async def test_callbacks_for_one_task_do_not_read_it_more_often_than_min_interval() -> None:
    """Callbacks are unsigned: anyone who knows a task id (it is in every result URL) can
    POST it to the route. Each one makes the poller read the task at once, ignoring
    ``min_interval`` ("the shortest wait between two checks of one task", 1 s): 50
    callbacks over 0.5 s of the service's clock give ~50 status reads on the user's key
    (measured with a running clock: 281 reads in 4 s for 300 callbacks without the batch
    route, 20 in 3.7 s with it), up to the 429s that slow the whole client."""
    async with (
        Emulator(frozen_clock=True, mode="manual", batch_route="absent") as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client,
    ):
        follow_clock(client, emu)
        task_id = await client.videos.submit(request(), webhook_url="http://127.0.0.1:9/hook")
        before = sum(status_reads(client))
        with anyio.move_on_after(GUARD):
            async with anyio.create_task_group() as tg:

                async def wait() -> None:
                    await client.tasks.wait(task_id)

                tg.start_soon(wait)
                await emu.wait_until(lambda: len(client._poller) == 1)
                for _ in range(50):  # forged: the task is still running
                    advance(emu, client, 0.01)  # 0.5 s of the service's time in all
                    await client.tasks.notify({"id": task_id, "status": "completed"})
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        reads = sum(status_reads(client)) - before
        # 0.5 s passed: one read for the first callback (+1 for the batch route's probe),
        # none for the others until min_interval (1 s) has passed. Before the fix: ~50.
        assert reads <= 2, (reads, client.request_counts())


async def test_notify_on_a_closed_client_raises_client_closed_error() -> None:
    """A replica shutting down (rolling restart): its client is closed while the route still
    answers. notify() returns False ("nobody follows it") and the aiohttp handler answers 200,
    so the service never retries (it retries on 5xx only) and the callback is lost; every
    other method of a closed client raises ClientClosedError."""
    async with Emulator(mode="manual") as emu:
        client = am.AsyncApimart(emu.api_key, base_url=emu.base_url)
        async with client:
            task_id = await client.videos.submit(request())
        with pytest.raises(am.ClientClosedError):
            await client.tasks.wait(task_id)  # the rule for every other method
        with pytest.raises(am.ClientClosedError):
            await client.tasks.notify({"id": task_id})  # before the fix: returns False


async def test_the_aiohttp_handler_of_a_closed_client_answers_503() -> None:
    async with Emulator(mode="manual") as emu:
        client = am.AsyncApimart(emu.api_key, base_url=emu.base_url)
        async with client:
            task_id = await client.videos.submit(request())
        async with (
            callback_server(client) as url,
            aiohttp.ClientSession() as http,
            http.post(f"{url}/callback", json={"id": task_id, "status": "completed"}) as reply,
        ):
            assert (
                reply.status == 503
            )  # before the fix: 200 "ok": the service will not send it again


@pytest.mark.parametrize("suffix", ["?token=s3cret", "#frag"], ids=["query", "fragment"])
async def test_a_webhook_url_with_a_query_or_fragment_is_refused_by_name(suffix: str) -> None:
    """The service POSTs to ``<webhook>/callback`` (apimart-api.md; the emulator does the
    same: ``webhook.rstrip('/') + '/callback'``): ``https://h/apimart?token=s3cret`` becomes
    ``https://h/apimart?token=s3cret/callback`` - the path stays /apimart, the route
    /apimart/callback never sees a callback and the token is now ``s3cret/callback``. A user
    who adds a token the usual way (callbacks are unsigned) silently gets no callbacks and
    the slow fallback polling (first look at ~50 s, then every 120 s)."""
    async with (
        Emulator(frozen_clock=True, task_duration=10.0) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client,
        callback_server(client) as url,
    ):
        follow_clock(client, emu)
        try:
            await client.videos.submit(request(), webhook_url=url + suffix)
        except am.ValidationError as exc:
            assert "webhook_url" in str(exc)
            return
        advance(emu, client, 10)
        await emu.wait_until(lambda: len(emu.webhook_deliveries) >= 1)
        # before the fix: delivered to the wrong route (404) or path, and never reaches the handler
        assert client.tasks.webhook_counts()["received"] == 1, emu.webhook_deliveries


@pytest.mark.parametrize("field", ["webhook_loss", "webhook_duplicates", "webhook_delay"])
@pytest.mark.parametrize("value", ["0.5", True], ids=["str", "bool"])
def test_the_emulator_refuses_a_webhook_option_of_the_wrong_type_by_name(
    field: str, value: Any
) -> None:
    # before the fix: "0.5" -> TypeError: '<=' not supported...; True -> accepted as 1.0
    with pytest.raises(ValueError, match=field):
        Emulator(**{field: value})


async def test_the_emulators_webhook_delay_follows_its_clock_when_a_test_advances_it() -> None:
    """``webhook_delay`` is seconds of the emulator's clock (its docstring): with a frozen
    clock advanced past it, the callback comes at once, not a real minute later (brk15 F17)."""
    async with (
        Emulator(frozen_clock=True, task_duration=1.0, webhook_delay=60.0) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=NO_JITTER) as client,
        callback_server(client) as url,
    ):
        follow_clock(client, emu)
        await client.videos.submit(request(), webhook_url=url)
        advance(emu, client, 1.0)  # the task ends: its callback is due 60 s later
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
        assert client.tasks.webhook_counts()["received"] == 0  # not before the delay
        advance(emu, client, 61.0)
        with anyio.move_on_after(GUARD):  # the frozen clock: only a bound for a hang
            await emu.wait_until(lambda: client.tasks.webhook_counts()["received"] == 1)
        assert client.tasks.webhook_counts()["received"] == 1


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks:HOOKSECRET@hooks.example.com/apimart path",  # white space
        "ftp://hooks:HOOKSECRET@hooks.example.com/apimart",  # not http(s)
        "https://hooks:HOOKSECRET@hooks.example.com/apimart?x=1",  # a query
    ],
)
async def test_the_credentials_of_a_refused_webhook_url_are_not_echoed(url: str) -> None:
    """A secret in the URL is the usual protection of an unsigned callback: a refused
    webhook_url is named with its user and password hidden, in both places that check one
    (brk15 F9); a request's repr hides them too, while the request sent keeps them."""
    async with am.AsyncApimart("sk-test", base_url="http://127.0.0.1:9") as client:
        with pytest.raises(am.ValidationError, match="webhook_url") as info:
            await client.videos.submit(request(), webhook_url=url)
        assert "HOOKSECRET" not in str(info.value) and "***@hooks.example.com" in str(info.value)
        if "?" not in url:  # a request's own webhook may carry a query
            with pytest.raises(am.ValidationError, match="webhook") as info:
                am.VideoRequest("sora-2-preview", "a cat", webhook=url)
            assert "HOOKSECRET" not in str(info.value)
            assert "***@hooks.example.com" in str(info.value)
    good = am.VideoRequest("sora-2-preview", "a cat", webhook="https://u:HOOKSECRET@h.example/a")
    assert "HOOKSECRET" not in repr(good) and "https://***@h.example/a" in repr(good)
    assert good.to_dict()["webhook"] == "https://u:HOOKSECRET@h.example/a"


# -- a webhook_url the service will never call (brk15 F20) --------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8000/apimart", "127.0.0.1 is not a public address"),
        ("http://10.0.0.5/apimart", "10.0.0.5 is not a public address"),
        ("http://[::1]/apimart", "::1 is not a public address"),
        ("http://localhost/apimart", "localhost is not a public host name"),
        ("https://web/apimart", "web is not a public host name"),
        ("https://api.svc.internal/apimart", "api.svc.internal is not a public host name"),
        ("https://hooks.example.com:8443/apimart", "port 8443: it calls ports 80 and 443 only"),
        ("http://u:HOOKSECRET@10.0.0.5/apimart", "10.0.0.5 is not a public address"),
    ],
)
def test_a_webhook_url_the_service_cannot_reach_is_warned_about_once(
    caplog: pytest.LogCaptureFixture, url: str, reason: str
) -> None:
    """The service calls back public hosts on ports 80 and 443 only: such a URL's callbacks
    never come, and every task waits for its safety check (a batch ~8x slower in brk15)."""
    caplog.set_level(logging.WARNING, logger="apimart_async")
    client = am.AsyncApimart("sk-test", base_url="https://api.example.com")
    for _ in range(3):
        client.batch([request()], webhook_url=url)
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    shown = url.replace("u:HOOKSECRET@", "***@")  # a secret in the URL is not logged (F9)
    assert f"webhook_url {shown}: {reason}" in message
    assert "callbacks will never come" in message and "polled" in message


def test_a_public_webhook_url_or_one_for_a_loopback_emulator_is_not_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="apimart_async")
    client = am.AsyncApimart("sk-test", base_url="https://api.example.com")
    client.batch([request()], webhook_url="https://hooks.example.com/apimart")
    client.batch([request()], webhook_url="http://hooks.example.com:80/apimart")
    emulated = am.AsyncApimart("sk-test", base_url="http://127.0.0.1:9/")  # an emulator
    emulated.batch([request()], webhook_url="http://127.0.0.1:8000/apimart")
    assert [r for r in caplog.records if r.levelno == logging.WARNING] == []


def test_a_webhook_url_with_a_port_out_of_range_is_refused_by_name() -> None:
    with pytest.raises(am.ValidationError, match=r"webhook_url: .*port") as info:
        am.AsyncApimart("sk-test").batch([request()], webhook_url="http://u:S3@host:99999/a")
    assert "S3" not in str(info.value)


async def test_the_same_seed_loses_the_same_callbacks_whatever_the_time() -> None:
    """The emulator's webhook losses and repeats come from its seed, not from the time of the
    run (task ids start with the time): with seed 5, the test above loses callbacks on every
    run, not on all but one run in ten thousand."""

    async def fates(hours_later: float) -> list[str]:
        async with (
            Emulator(frozen_clock=True, task_duration=10.0, seed=5, webhook_loss=0.5) as emu,
            am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client,
            callback_server(client) as url,
        ):
            emu.advance(hours_later * 3600)
            ids = [await client.videos.submit(request, webhook_url=url) for request in jobs()[:20]]
            emu.advance(10)
            await emu.wait_until(lambda: len(emu.webhook_deliveries) >= len(ids))
            lost = {t for _, t, status in emu.webhook_deliveries if status == "lost"}
            return ["lost" if task_id in lost else "sent" for task_id in ids]

    first = await fates(0)
    assert "lost" in first and "sent" in first
    assert [await fates(h) for h in (1.7, 29.3, 5000.1)] == [first] * 3

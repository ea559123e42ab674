"""Failing loud (issue 21): when no status read gets through for ``wait_unreachable`` seconds
(counted from the first failed read with no success since), every wait ends with
``APIConnectionError`` instead of polling in silence forever.

The poller is driven step by step on a fake clock (``Poller.step``, no loop, no sleeps); the
client-level tests run against the emulator with every status route failing and a small
``wait_unreachable``."""

from __future__ import annotations

import logging
import math

import anyio
import pytest

import apimart_async as am
from apimart_async._errors import ApimartError
from apimart_async._poller import Poller
from apimart_async.emulator import Emulator, Fault

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

POLICY = am.PollPolicy(first_check=1.0, min_interval=1.0, max_interval=10.0, jitter=0.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Service:
    """A status route that fails (connection refused) while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.reads = 0

    async def fetch(self, ids: list[str]) -> dict[str, am.Task | ApimartError]:
        self.reads += 1
        if self.down:
            return {i: am.APIConnectionError("Cannot connect to host") for i in ids}
        return {i: am.Task(id=i, status=am.TaskStatus.PROCESSING, progress=10) for i in ids}


def _poller(service: Service, clock: FakeClock, limit: float | None) -> Poller:
    return Poller(service.fetch, POLICY, clock=clock, wall=clock, unreachable=limit)


async def _run_until(poller: Poller, clock: FakeClock, until: float) -> None:
    """Step the poller, jumping the clock to each wakeup, until the clock reaches ``until``."""
    while clock.now < until:
        delay = await poller.step()
        if delay is None:
            continue
        if math.isinf(delay):
            return
        clock.now = min(until, clock.now + max(delay, 1e-3))


async def test_waits_end_with_api_connection_error_after_wait_unreachable() -> None:
    service, clock = Service(), FakeClock()
    poller = _poller(service, clock, 300.0)
    ended: dict[str, am.Task | ApimartError] = {}
    poller.watch("task_a", lambda i, r: ended.setdefault(i, r))
    poller.watch("task_b", lambda i, r: ended.setdefault(i, r), timeout=10_000)
    start = clock.now
    await _run_until(poller, clock, start + 299.0)
    assert ended == {}  # reads failing since the first one (a second or two in): waiting
    assert service.reads >= 2
    await _run_until(poller, clock, start + 310.0)
    assert set(ended) == {"task_a", "task_b"}
    for result in ended.values():
        assert isinstance(result, am.APIConnectionError)
        assert "unreachable" in str(result) and "wait_unreachable=300" in str(result)
        assert "Cannot connect to host" in str(result)
    assert len(poller) == 0


async def test_one_warning_early_in_an_outage_then_one_when_giving_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not 300 s of silence: one WARNING once reads have failed for 30 s (half the limit if
    that is less), one more when the waits are given up."""
    service, clock = Service(), FakeClock()
    poller = _poller(service, clock, 300.0)
    poller.watch("task_a", lambda i, r: None)
    start = clock.now
    with caplog.at_level(logging.INFO, logger="apimart_async"):
        await _run_until(poller, clock, start + 25.0)
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        await _run_until(poller, clock, start + 45.0)
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1
        text = warnings[0].getMessage()
        assert text.startswith("status reads have failed for ")
        assert "Cannot connect to host" in text and "APIConnectionError" in text
        assert "1 wait(s) end with APIConnectionError in 2" in text  # 25x s from now
        await _run_until(poller, clock, start + 290.0)
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
        await _run_until(poller, clock, start + 320.0)
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 2
        assert "the API has been unreachable" in warnings[1].getMessage()


async def test_the_end_of_an_outage_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    service, clock = Service(), FakeClock()
    poller = _poller(service, clock, 300.0)
    poller.watch("task_a", lambda i, r: None)
    start = clock.now
    with caplog.at_level(logging.INFO, logger="apimart_async"):
        await _run_until(poller, clock, start + 60.0)
        service.down = False
        await _run_until(poller, clock, start + 120.0)
    back = [r for r in caplog.records if "get through again" in r.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.INFO


async def test_a_successful_read_restarts_the_count() -> None:
    service, clock = Service(), FakeClock()
    poller = _poller(service, clock, 300.0)
    ended: dict[str, am.Task | ApimartError] = {}
    poller.watch("task_a", lambda i, r: ended.setdefault(i, r))
    start = clock.now
    await _run_until(poller, clock, start + 250.0)
    service.down = False
    await _run_until(poller, clock, start + 270.0)  # reads get through again
    service.down = True
    await _run_until(poller, clock, start + 500.0)  # 230 s of failures since the last success
    assert ended == {}
    await _run_until(poller, clock, start + 600.0)
    assert isinstance(ended["task_a"], am.APIConnectionError)


async def test_an_idle_poller_forgets_an_old_outage() -> None:
    """The count runs while something waits: a wait that starts after an idle spell gets its
    full ``wait_unreachable`` even if the last reads, long ago, failed."""
    service, clock = Service(), FakeClock()
    poller = _poller(service, clock, 300.0)
    first: dict[str, am.Task | ApimartError] = {}

    def on_first(task_id: str, result: am.Task | ApimartError) -> None:
        first[task_id] = result

    poller.watch("task_a", on_first)
    await _run_until(poller, clock, clock.now + 200.0)
    poller.unwatch("task_a", on_first)  # e.g. the handler went away: nothing is watched
    clock.now += 10_000.0
    ended: dict[str, am.Task | ApimartError] = {}
    poller.watch("task_b", lambda i, r: ended.setdefault(i, r))
    start = clock.now
    await _run_until(poller, clock, start + 250.0)
    assert ended == {} and first == {}
    await _run_until(poller, clock, start + 320.0)
    assert isinstance(ended["task_b"], am.APIConnectionError)


async def test_none_waits_for_ever() -> None:
    service, clock = Service(), FakeClock()
    poller = _poller(service, clock, None)
    ended: dict[str, am.Task | ApimartError] = {}
    poller.watch("task_a", lambda i, r: ended.setdefault(i, r))
    await _run_until(poller, clock, clock.now + 100_000.0)
    assert ended == {}
    assert service.reads > 100


async def test_rate_limits_do_not_count_as_unreachable() -> None:
    clock = FakeClock()

    async def fetch(ids: list[str]) -> dict[str, am.Task | ApimartError]:
        return {i: am.RateLimitError("Too many requests", status=429) for i in ids}

    poller = Poller(fetch, POLICY, clock=clock, wall=clock, unreachable=300.0)
    ended: dict[str, am.Task | ApimartError] = {}
    poller.watch("task_a", lambda i, r: ended.setdefault(i, r))
    await _run_until(poller, clock, clock.now + 1000.0)
    assert ended == {}  # the service answers: it is reachable, only busy


@pytest.mark.parametrize("value", [0, -1, math.inf, math.nan, "300", True])
def test_wait_unreachable_is_checked(value: object) -> None:
    with pytest.raises(am.ConfigurationError, match="wait_unreachable"):
        am.AsyncApimart("k" * 20, wait_unreachable=value)  # type: ignore[arg-type]


def test_wait_unreachable_default_is_five_minutes() -> None:
    assert am.AsyncApimart("k" * 20).wait_unreachable == 300.0
    assert am.AsyncApimart("k" * 20, wait_unreachable=None).wait_unreachable is None


async def test_every_kind_of_wait_fails_loud_when_status_reads_all_fail(
    manual_emu: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apimart_async")
    async with am.AsyncApimart(
        manual_emu.api_key,
        base_url=manual_emu.base_url,
        poll=FAST_POLL,
        max_retries=0,
        wait_unreachable=0.05,
    ) as client:
        waited = await client.videos.submit(am.VideoRequest("sora-2-preview", "w"))
        manual_emu.faults.set_rate(1.0, endpoints=["task", "batch"], faults=[Fault.drop()])
        ended: dict[str, BaseException] = {}
        outcomes: list[am.Success | am.Failure] = []

        async def wait() -> None:
            try:
                await client.tasks.wait(waited)
            except am.ApimartError as exc:
                ended["wait"] = exc

        async def generate() -> None:
            try:
                await client.videos.generate(am.VideoRequest("sora-2-preview", "g"))
            except am.ApimartError as exc:
                ended["generate"] = exc

        async def batch() -> None:
            jobs = [am.VideoRequest("sora-2-preview", f"b{i}") for i in range(2)]
            async with client.batch(jobs) as results:
                outcomes.extend([o async for o in results])

        with anyio.fail_after(60):  # a hang guard, not a timing assertion
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                tg.start_soon(generate)
                tg.start_soon(batch)
        assert isinstance(ended["wait"], am.APIConnectionError), ended
        assert isinstance(ended["generate"], am.APIConnectionError), ended
        assert len(outcomes) == 2
        assert all(isinstance(o.error, am.APIConnectionError) for o in outcomes), outcomes
        assert "unreachable" in str(ended["wait"])
        assert manual_emu.tasks_created == 4  # every task was created: only reads failed
        # fix21: an outage is no evidence against the batch route: it is kept
        assert client.batch_route_available is not False
        assert not [r for r in caplog.records if "route unusable" in r.getMessage()]


# -- a service that hangs (brk21c) ----------------------------------------------------------------


@pytest.mark.parametrize("route", ["batch route", "per-task reads"])
async def test_a_status_read_that_hangs_still_ends_waits_on_time(
    route: str, caplog: pytest.LogCaptureFixture
) -> None:
    """brk21c: a service that accepts connections and never answers (a stopped process
    behind its address, a stuck proxy) held the round's read for minutes (four 60 s
    attempts): a ``tasks.wait(id, timeout=3)`` ended after 121 s, ``wait_unreachable=5``
    did nothing, and nothing was logged. The waits' deadlines and ``wait_unreachable`` now
    hold while a read is out (a read unanswered counts as failing since it left). On the
    real clock, with fractions of a second."""

    async def fetch(ids: list[str]) -> dict[str, am.Task | ApimartError]:
        await anyio.sleep_forever()
        raise AssertionError

    async def read(task_id: str) -> am.Task:
        await anyio.sleep_forever()
        raise AssertionError

    batched = route == "batch route"
    poller = Poller(fetch, POLICY, batched=lambda now: batched, read=read, unreachable=1.0)
    ended: dict[str, tuple[float, am.Task | ApimartError]] = {}

    def on_done(task_id: str, result: am.Task | ApimartError) -> None:
        ended[task_id] = (anyio.current_time() - start, result)

    start = anyio.current_time()
    with anyio.fail_after(30):  # a hang guard: before the fix, nothing ended at all
        async with anyio.create_task_group() as tg:
            tg.start_soon(poller.run)
            poller.watch("task_a", on_done, timeout=0.2, reattach=True)
            poller.watch("task_b", on_done, reattach=True)
            while len(ended) < 2:  # noqa: ASYNC110 - the poller has no event to wait on
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    after_a, result_a = ended["task_a"]
    after_b, result_b = ended["task_b"]
    assert isinstance(result_a, am.TaskTimeoutError) and after_a < 1.0
    assert isinstance(result_b, am.APIConnectionError) and 1.0 <= after_b < 5.0
    assert "wait_unreachable=1" in str(result_b) and "no answer" in str(result_b)
    # fix21: one WARNING at half the limit, not one at each look of the keeper (its float
    # "since" moved with real time: 4 a second until the waits ended), then the give-up
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("status reads have failed for ")
    assert warnings[1].startswith("the API has been unreachable")


async def test_a_client_wait_on_a_hung_service_ends_at_its_timeout(manual_emu: Emulator) -> None:
    """The same through the client: every status route holds its reply for 5 s (longer than
    both waits; not for ever, so that the emulator's shutdown need not wait for them)."""
    async with am.AsyncApimart(
        manual_emu.api_key, base_url=manual_emu.base_url, poll=FAST_POLL, wait_unreachable=2
    ) as client:
        task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "w"))
        manual_emu.faults.set_rate(1.0, endpoints=["task", "batch"], faults=[Fault.slow(5)])
        with anyio.fail_after(30):  # a hang guard (before the fix: four minutes)
            start = anyio.current_time()
            with pytest.raises(am.TaskTimeoutError):
                await client.tasks.wait(task_id, timeout=0.3)
            assert anyio.current_time() - start < 2.0  # not when the held read comes back
            with pytest.raises(am.APIConnectionError, match="unreachable"):
                await client.tasks.wait(task_id)


# -- the keeper beside the rounds sleeps until there is something to time (fix21 5) -----------


async def test_the_keeper_sleeps_until_the_next_deadline_or_outage_step_and_never_when_idle() -> (
    None
):
    """brk21d: the task keeping the waits' deadlines while a read is out (``Keeper``) woke
    every 0.25 s for the life of the client, even with nothing watched (an idle client in a
    web app: four wake-ups a second, for ever). What it sleeps, on a fake clock: for ever
    while nothing is watched, nor any deadline or read out; else until the earliest deadline,
    or the moment a read out now would be warned about (30 s) or given up (``unreachable``)."""
    clock = FakeClock()

    async def fetch(ids: list[str]) -> dict[str, am.Task | ApimartError]:
        raise AssertionError("no round runs here")

    poller = Poller(fetch, POLICY, clock=clock, wall=clock, unreachable=300.0)
    keeper = poller.keeper
    assert keeper.delay(poller, clock.now) == math.inf  # nothing watched: never
    poller.watch("task_a", lambda i, r: None)
    assert keeper.delay(poller, clock.now) == math.inf  # no deadline, no read out
    poller.watch("task_b", lambda i, r: None, timeout=100)
    assert keeper.delay(poller, clock.now) == 100.0
    poller._asking_since = anyio.current_time()  # a read leaves and hangs
    assert 29.0 < keeper.delay(poller, clock.now) <= 30.0  # its warning is due first
    poller._warned_since = clock.now  # the outage was warned about
    assert 99.0 < keeper.delay(poller, clock.now) <= 100.0  # warned: the deadline next
    poller.unreachable = 50.0
    assert 49.0 < keeper.delay(poller, clock.now) <= 50.0  # given up at 50 s
    poller.unwatch("task_b", poller._watchers["task_b"].waiters[0].done)
    poller.unwatch("task_a", poller._watchers["task_a"].waiters[0].done)
    assert keeper.delay(poller, clock.now) == math.inf  # nothing watched again


async def test_the_keeper_wakes_only_when_there_is_something_to_do() -> None:
    """Its wake-ups counted, with the pauses it asks for taken on the fake clock (no real
    time): idle it pauses for ever; a watch with a deadline wakes it, it pauses until that
    deadline, ends that wait, and pauses for ever again."""
    clock = FakeClock()

    async def fetch(ids: list[str]) -> dict[str, am.Task | ApimartError]:
        raise AssertionError("no round runs here")

    poller = Poller(fetch, POLICY, clock=clock, wall=clock, unreachable=300.0)
    keeper = poller.keeper
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)
        if math.isinf(seconds):
            await keeper.woken()
        else:
            clock.now += seconds

    keeper.pause = pause  # type: ignore[method-assign]
    ended: dict[str, am.Task | ApimartError] = {}
    with anyio.fail_after(10):  # a hang guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(keeper.run, poller)
            for _ in range(100):  # the event loop runs on: nothing wakes the keeper
                await anyio.lowlevel.checkpoint()
            assert pauses == [math.inf]
            poller.watch("task_a", lambda i, r: ended.setdefault(i, r), timeout=10)
            await anyio.wait_all_tasks_blocked()
            assert pauses == [math.inf, 10.0, math.inf]
            assert isinstance(ended["task_a"], am.TaskTimeoutError)
            assert keeper.wakeups == 2
            tg.cancel_scope.cancel()

"""Retries counted at the emulator: what is retried, how often, and that nothing bills twice."""

from __future__ import annotations

import time

import pytest

import apimart_async as am
from apimart_async import _retry
from apimart_async.emulator import Emulator, Fault

pytestmark = pytest.mark.anyio

SORA = am.VideoRequest("sora-2-preview", "a cat on a skateboard", duration=8)


async def test_two_503s_then_success_is_three_requests_and_one_task(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    emu.faults.inject("submit", Fault.server_error(503), times=2)
    task_id = await client.videos.submit(SORA)
    assert emu.counters["submit"] == 3
    assert emu.tasks_created == 1
    assert emu.task_ids() == [task_id]
    assert client.request_counts() == {"submit": 3, "retries": 2}


@pytest.mark.parametrize(
    "fault",
    [
        Fault.lost_reply(),
        Fault.drop(),
        Fault.malformed(),
        Fault.truncated(),
        Fault.rate_limited(1),
        Fault.server_error(500),
        Fault.server_error(502),
        Fault.server_error(504),
        Fault.error(408, "timeout"),
        Fault.error(503, "idempotency_unavailable"),
    ],
    ids=lambda f: f"{f.kind}-{f.status}-{f.type}",
)
async def test_each_transient_fault_on_submit_creates_exactly_one_task(
    emu: Emulator, client: am.AsyncApimart, fault: Fault
) -> None:
    emu.faults.inject("submit", fault)
    task_id = await client.videos.submit(SORA)
    assert emu.counters["submit"] == 2
    assert emu.tasks_created == 1
    assert emu.task_ids() == [task_id]
    assert list(emu.tasks_per_key.values()) == [1]


async def test_lost_reply_retry_returns_the_original_task(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    emu.faults.inject("submit", Fault.lost_reply(), times=3)
    task_id = await client.videos.submit(SORA, idempotency_key="job-7")
    assert emu.counters["submit"] == 4
    assert emu.tasks_per_key == {"job-7": 1}
    assert emu.task_ids() == [task_id]


async def test_every_submit_has_its_own_key(emu: Emulator, client: am.AsyncApimart) -> None:
    a = await client.videos.submit(SORA)
    b = await client.videos.submit(SORA)
    assert a != b
    assert emu.tasks_created == 2
    assert sorted(emu.tasks_per_key.values()) == [1, 1]
    assert emu.state.submits_without_key == 0


async def test_same_key_same_body_is_not_billed_twice(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    a = await client.videos.submit(SORA, idempotency_key="k1")
    b = await client.videos.submit(SORA, idempotency_key="k1")
    assert a == b
    assert emu.tasks_created == 1


async def test_key_reused_with_another_body_is_a_conflict_not_retried(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    await client.videos.submit(SORA, idempotency_key="k1")
    other = am.VideoRequest("sora-2-preview", "a dog", duration=8)
    with pytest.raises(am.ConflictError) as info:
        await client.videos.submit(other, idempotency_key="k1")
    assert info.value.type == "idempotency_key_reused"
    assert info.value.status == 409
    assert emu.counters["submit"] == 2


async def test_in_progress_conflict_is_waited_out(emu: Emulator, client: am.AsyncApimart) -> None:
    emu.faults.inject("submit", Fault.error(409, "idempotency_in_progress", retry_after=1), times=2)
    task_id = await client.videos.submit(SORA)
    assert emu.counters["submit"] == 3
    assert emu.task_ids() == [task_id]


async def test_in_progress_is_waited_out_past_max_retries(emu: Emulator) -> None:
    # The service still works on the first attempt: a slow network, a busy service. Every
    # "in progress" answer is the service holding our request, not a failure: it must not use
    # up the retries meant for failures, or a submit that is about to succeed ends unknown.
    emu.faults.inject("submit", Fault.error(409, "idempotency_in_progress"), times=6)
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=2) as client:
        task_id = await client.videos.submit(SORA, idempotency_key="slow-1")
    assert emu.counters["submit"] == 7
    assert emu.task_ids() == [task_id]
    assert emu.tasks_per_key == {"slow-1": 1}


async def test_in_progress_wait_is_bounded(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    # It is bounded by the seconds waited (here 4 pauses of 50 ms), then raised as it is:
    # no attempt of ours went unanswered, so another holder of the key is running it.
    monkeypatch.setattr(_retry, "IN_PROGRESS_MAX_WAIT", 4 * _retry.IN_PROGRESS_TEST_PAUSE)
    emu.faults.inject("submit", Fault.error(409, "idempotency_in_progress"), times=100)
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=2) as client:
        with pytest.raises(am.ConflictError) as info:
            await client.videos.submit(SORA, idempotency_key="held")
    assert info.value.sub_code == "idempotency_in_progress"
    assert emu.counters["submit"] == 5
    assert emu.task_ids() == []


async def test_in_progress_conflict_is_not_retried_for_reads(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    emu.faults.inject("task", Fault.error(409, "idempotency_in_progress"))
    with pytest.raises(am.ConflictError):
        await client.tasks.get("task_x")
    assert emu.counters["task"] == 1


@pytest.mark.parametrize(
    ("status", "type_", "cls"),
    [
        (400, "invalid_request_error", am.BadRequestError),
        (401, "authentication_error", am.AuthenticationError),
        (402, "payment_required", am.InsufficientBalanceError),
        (403, "permission_error", am.PermissionDeniedError),
        (409, "idempotency_key_reused", am.ConflictError),  # indeterminate: test_error_codes
        (422, "invalid_request_error", am.BadRequestError),
        (500, "build_request_failed", am.BadRequestError),
        (501, "server_error", am.ServerError),
    ],
)
async def test_never_retried(
    emu: Emulator, client: am.AsyncApimart, status: int, type_: str, cls: type[am.APIStatusError]
) -> None:
    emu.faults.inject("submit", Fault.error(status, type_, message="nope"))
    with pytest.raises(cls) as info:
        await client.videos.submit(SORA)
    assert type(info.value) is cls
    assert (info.value.status, info.value.type, info.value.message) == (status, type_, "nope")
    assert emu.counters["submit"] == 1
    assert emu.tasks_created == 0


async def test_gives_up_after_max_retries(emu: Emulator) -> None:
    emu.faults.inject("task", Fault.server_error(502), times=10)
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=2) as c:
        with pytest.raises(am.ServerError) as info:
            await c.tasks.get("task_x")
    assert info.value.status == 502
    assert emu.counters["task"] == 3


async def test_max_retries_zero_means_one_attempt(emu: Emulator) -> None:
    emu.faults.inject("submit", Fault.drop())
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=0) as c:
        with pytest.raises(am.APIConnectionError):
            await c.videos.submit(SORA)
    assert emu.counters["submit"] == 1


async def test_reads_are_retried_on_garbage_cut_replies_and_429(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    task_id = await client.videos.submit(SORA)
    for fault in (Fault.malformed(), Fault.truncated(), Fault.rate_limited(0)):
        emu.faults.inject("task", fault)
    assert (await client.tasks.get(task_id)).id == task_id  # the 4th attempt
    assert emu.counters["task"] == 4
    assert client.request_counts()["retries"] == 3


async def test_a_dropped_read_is_retried(emu: Emulator, client: am.AsyncApimart) -> None:
    task_id = await client.videos.submit(SORA)
    emu.faults.inject("task", Fault.drop(), times=2)
    assert (await client.tasks.get(task_id)).id == task_id
    # aiohttp itself re-sends an idempotent GET once when a kept-alive connection is closed
    # under it (RFC 9112); ours then retries what remains. Both together: exactly 3 requests.
    assert emu.counters["task"] == 3


async def test_a_dropped_submit_is_never_resent_by_aiohttp(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    await client.videos.submit(SORA)  # warm a kept-alive connection
    emu.faults.inject("submit", Fault.drop())
    await client.videos.submit(SORA)
    assert emu.counters["submit"] == 3
    assert client.request_counts() == {"submit": 3, "retries": 1}


async def test_slow_reply_times_out_and_is_retried(emu: Emulator) -> None:
    # A timeout is the wall clock's to measure, so the margins are wide: the stalled reply
    # comes 3 s late against a 1 s read limit, and the healthy one has that 1 s between
    # chunks and no total limit (a total of 0.3 s once failed on a loaded CI machine).
    emu.faults.inject("balance", Fault.slow(3.0))
    timeout = am.Timeout(connect=5.0, read=1.0, total=None)
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, timeout=timeout) as c:
        bal = await c.balance()
    assert bal.remain_balance == 1000.0
    assert emu.counters["balance"] == 2
    assert c.request_counts()["retries"] == 1


async def test_timeout_error_after_retries(emu: Emulator) -> None:
    emu.faults.inject("balance", Fault.slow(1.0), times=2)
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, timeout=0.2, max_retries=1) as c:
        with pytest.raises(am.APITimeoutError) as info:
            await c.balance()
    assert isinstance(info.value, TimeoutError)
    assert str(info.value).startswith("GET /v1/balance timed out")


# -- the wait policy, without waiting -------------------------------------------------------


def _waits(excs: list[BaseException]) -> list[float]:
    gen = _retry.wait_gen()
    gen.send(None)
    return [gen.send(e) for e in excs]


def test_waits_honour_retry_after_and_back_off_otherwise() -> None:
    am.set_testing(False)
    limited = am.RateLimitError("slow down", status=429, retry_after=7.0)
    server = am.ServerError("boom", status=503)
    waits = _waits([limited, server, server, server, server, server, server])
    assert waits[0] == 7.0
    caps = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # the 429 was attempt 1
    for wait, cap in zip(waits[1:], caps, strict=True):
        assert 0.0 <= wait <= cap


def test_testing_switch_makes_waits_zero() -> None:
    am.set_testing(True)
    limited = am.RateLimitError("slow down", status=429, retry_after=7.0)
    assert _waits([limited, am.ServerError("x", status=500)]) == [0.0, 0.0]


def test_a_retry_after_beyond_the_cap_is_not_waited_for() -> None:
    exc = am.RateLimitError(
        "come back tomorrow", status=429, retry_after=_retry.MAX_RETRY_AFTER + 1
    )
    assert not _retry.is_retryable(exc)
    assert _retry.is_retryable(am.RateLimitError("x", status=429, retry_after=3))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("0.5", 0.5),
        ("-4", 0.0),
        ("", None),
        ("soon", None),
        (None, None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 10.0),
        # not a number of seconds (RFC 9110: digits): no wait said, never an infinite one,
        # which ``round()`` (a web app's own Retry-After header) cannot take
        ("inf", None),
        ("Infinity", None),
        ("1e999", None),
        ("-inf", None),
        ("nan", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = 1445412470.0  # 10 s before the date above
    assert _retry.parse_retry_after(value, now=now) == expected


async def test_an_infinite_retry_after_reaches_the_error_as_none(emu: Emulator) -> None:
    """A web app answers its own 429 with ``Retry-After: round(exc.retry_after)`` (as both
    examples do): an ``inf`` there was an OverflowError in its error handler, a 500."""
    emu.faults.inject("balance", Fault.rate_limited(retry_after="inf"))
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=0) as client:
        with pytest.raises(am.RateLimitError) as caught:
            await client.balance()
    assert caught.value.retry_after is None


async def test_retry_after_header_reaches_the_error(emu: Emulator) -> None:
    emu.faults.inject("balance", Fault.rate_limited(retry_after=500))
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url) as c:
        with pytest.raises(am.RateLimitError) as info:
            await c.balance()
    assert info.value.retry_after == 500.0
    assert emu.counters["balance"] == 1  # 500 s is past the cap: not waited for


async def test_a_retry_after_past_the_cap_does_not_hold_every_later_request(
    emu: Emulator,
) -> None:
    """The request given ``Retry-After: 3600`` fails at once (past the cap); the client-wide
    pause it sets must not make every other request (each web request's status read, the
    poller) sleep an hour before it is even sent, bounded by no timeout: it was 3600 s."""
    emu.faults.inject("submit", Fault.rate_limited(retry_after=3600))
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url) as c:
        with pytest.raises(am.RateLimitError) as info:
            await c.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
        assert info.value.retry_after == 3600.0
        pause = c.throttle.wait_time(time.monotonic())
    assert 0 < pause <= _retry.MAX_RETRY_AFTER

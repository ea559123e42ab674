"""409 sub-codes and build_request_failed wherever the body carries them; submits whose outcome
is unknown; the caller's Idempotency-Key rule. Requests counted at the emulator."""

from __future__ import annotations

import pytest

import apimart_async as am
from apimart_async.emulator import Emulator, Fault

pytestmark = pytest.mark.anyio

SORA = am.VideoRequest("sora-2-preview", "a cat on a skateboard", duration=8)


def bodies(sub_code: str, status: int) -> list[object]:
    """The same sub-code in error.code, in error.type, in the message, and in a flat body."""
    return [
        {"error": {"code": sub_code, "message": "conflict", "type": "invalid_request_error"}},
        {"error": {"code": status, "message": "conflict", "type": sub_code}},
        {"error": {"code": status, "message": f"{sub_code}: see docs", "type": "apimart_error"}},
        {"code": sub_code, "message": "conflict"},
    ]


WHERE = ["in-code", "in-type", "in-message", "flat"]


@pytest.mark.parametrize("where", range(4), ids=WHERE)
async def test_key_reused_is_a_conflict_and_not_retried(
    emu: Emulator, client: am.AsyncApimart, where: int
) -> None:
    emu.faults.inject("submit", Fault.reply(409, bodies("idempotency_key_reused", 409)[where]))
    with pytest.raises(am.ConflictError) as info:
        await client.videos.submit(SORA, idempotency_key="job-1")
    assert info.value.sub_code == "idempotency_key_reused"
    assert emu.counters["submit"] == 1
    assert emu.tasks_created == 0


@pytest.mark.parametrize("where", range(4), ids=WHERE)
async def test_in_progress_is_retried_with_the_same_key(
    emu: Emulator, client: am.AsyncApimart, where: int
) -> None:
    emu.faults.inject("submit", Fault.reply(409, bodies("idempotency_in_progress", 409)[where]))
    task_id = await client.videos.submit(SORA, idempotency_key="job-2")
    assert emu.counters["submit"] == 2
    assert emu.tasks_per_key == {"job-2": 1}
    assert emu.task_ids() == [task_id]


@pytest.mark.parametrize("status", [503, 409])
@pytest.mark.parametrize("where", range(4), ids=WHERE)
async def test_idempotency_unavailable_is_retried(
    emu: Emulator, client: am.AsyncApimart, where: int, status: int
) -> None:
    body = bodies("idempotency_unavailable", status)[where]
    emu.faults.inject("submit", Fault.reply(status, body), times=2)
    await client.videos.submit(SORA, idempotency_key="job-3")
    assert emu.counters["submit"] == 3
    assert emu.tasks_per_key == {"job-3": 1}


@pytest.mark.parametrize("where", range(4), ids=WHERE)
async def test_result_indeterminate_raises_submit_indeterminate_with_the_key(
    emu: Emulator, client: am.AsyncApimart, where: int
) -> None:
    body = bodies("idempotency_result_indeterminate", 409)[where]
    emu.faults.inject("submit", Fault.reply(409, body))
    with pytest.raises(am.SubmitIndeterminateError) as info:
        await client.videos.submit(SORA, idempotency_key="job-4")
    assert info.value.idempotency_key == "job-4"
    assert isinstance(info.value.__cause__, am.ConflictError)
    assert "idempotency_key='job-4'" in str(info.value)
    assert emu.counters["submit"] == 1


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"code": 500, "message": "build_request_failed: duration", "type": "x"}},
        {"error": {"message": "build_request_failed", "type": "server_error"}},
        {"code": 500, "message": "build_request_failed (bad size)"},
    ],
    ids=["error-message", "bare-message", "flat"],
)
async def test_build_request_failed_in_a_500_message_is_a_bad_request_not_retried(
    emu: Emulator, client: am.AsyncApimart, body: object
) -> None:
    emu.faults.inject("submit", Fault.reply(500, body), times=4)
    with pytest.raises(am.BadRequestError) as info:
        await client.videos.submit(SORA)
    assert info.value.status == 500
    assert info.value.sub_code == "build_request_failed"
    assert emu.counters["submit"] == 1
    assert client.request_counts() == {"submit": 1}


async def test_plain_500_is_still_retried(emu: Emulator, client: am.AsyncApimart) -> None:
    emu.faults.inject("submit", Fault.reply(500, {"error": {"message": "oops"}}))
    await client.videos.submit(SORA)
    assert emu.counters["submit"] == 2


# -- outcome unknown after every retry ------------------------------------------------------


@pytest.mark.parametrize("fault", [Fault.lost_reply(), Fault.drop()], ids=["lost", "drop"])
async def test_submit_unanswered_after_all_retries_raises_indeterminate_with_the_key(
    emu: Emulator, fault: Fault
) -> None:
    emu.faults.inject("submit", fault, times=3)
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=2) as client:
        with pytest.raises(am.SubmitIndeterminateError) as info:
            await client.videos.submit(SORA)
        key = info.value.idempotency_key
        assert key.startswith("am-")
        assert isinstance(info.value, am.APIConnectionError)
        assert emu.counters["submit"] == 3
        # resubmitting with the key gets the original task if one was made, never a second
        task_id = await client.videos.submit(SORA, idempotency_key=key)
    assert emu.tasks_per_key == {key: 1}
    assert emu.task_ids() == [task_id]


async def test_submit_that_never_connected_is_a_plain_connection_error() -> None:
    async with Emulator() as emu:
        base_url = emu.base_url  # nobody listens there once the emulator stops
    async with am.AsyncApimart("sk-test", base_url=base_url, max_retries=1) as client:
        with pytest.raises(am.APIConnectionError) as info:
            await client.videos.submit(SORA)
    assert not isinstance(info.value, am.SubmitIndeterminateError)


async def test_timeout_after_sending_then_503s_is_indeterminate(emu: Emulator) -> None:
    # wall-clock margins: the stalled reply is 4 s late against a 1.5 s limit, and the two
    # 503s are tiny replies that a loaded machine still sends well within 1.5 s
    emu.faults.inject("submit", Fault.slow(4.0))
    emu.faults.inject("submit", Fault.server_error(503), times=2)
    async with am.AsyncApimart(
        emu.api_key, base_url=emu.base_url, max_retries=2, timeout=am.Timeout(total=1.5)
    ) as client:
        with pytest.raises(am.SubmitIndeterminateError) as info:
            await client.videos.submit(SORA, idempotency_key="job-9")
    assert info.value.idempotency_key == "job-9"
    assert isinstance(info.value.__cause__, am.ServerError)


async def test_batch_with_journal_keeps_an_indeterminate_job_resumable_with_its_key(
    emu: Emulator, tmp_path: object
) -> None:
    from pathlib import Path

    journal = Path(str(tmp_path)) / "jobs.sqlite"
    emu.faults.inject("submit", Fault.lost_reply(), times=3)
    async with am.AsyncApimart(
        emu.api_key, base_url=emu.base_url, max_retries=2, poll=_fast()
    ) as client:
        async with client.batch([SORA], journal=journal) as results:
            first = [o async for o in results]
        assert len(first) == 1 and isinstance(first[0].error, am.SubmitIndeterminateError)
        key = first[0].idempotency_key
        assert first[0].error.idempotency_key == key
        assert emu.tasks_per_key == {key: 1}  # the lost reply did create the task
        emu.advance(60)
        async with client.batch([SORA], journal=journal) as results:
            second = [o async for o in results]
    assert len(second) == 1 and second[0].ok
    assert second[0].idempotency_key == key
    assert emu.tasks_per_key == {key: 1}  # resumed with the same key: not paid twice


def _fast() -> am.PollPolicy:
    from .conftest import FAST_POLL

    return FAST_POLL


# -- the caller's key -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", "has space", "tab\there", "ключ", "x" * 192, "new\nline", "\x7f", 42],
    ids=["empty", "space", "tab", "non-ascii", "192-chars", "newline", "del", "int"],
)
async def test_bad_caller_key_is_refused_before_any_request(
    emu: Emulator, client: am.AsyncApimart, key: object
) -> None:
    with pytest.raises(am.ValidationError) as info:
        await client.videos.submit(SORA, idempotency_key=key)  # type: ignore[arg-type]
    assert info.value.field == "idempotency_key"
    assert "^[!-~]{1,191}$" in info.value.rule
    assert emu.counters.get("submit", 0) == 0
    assert client.request_counts() == {}


async def test_caller_key_of_191_visible_characters_is_accepted(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    key = "!~" + "k" * 189
    await client.videos.submit(SORA, idempotency_key=key)
    assert emu.tasks_per_key == {key: 1}

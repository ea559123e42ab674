"""The client's endpoints against the emulator."""

from __future__ import annotations

import json
import re

import anyio
import pytest

import apimart_async as am
from apimart_async.emulator import Emulator, Fault

pytestmark = pytest.mark.anyio

SORA = am.VideoRequest("sora-2-preview", "a cat on a skateboard", duration=8)
VIDU = am.VideoRequest(
    "viduq3", "the bear waves", image_urls=["https://e.com/bear.png"], duration=5
)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


# -- construction ---------------------------------------------------------------------------


def test_missing_key_is_a_clear_error() -> None:
    with pytest.raises(
        am.ConfigurationError,
        match="no API key: pass AsyncApimart\\(api_key=...\\) or set APIMART_API_KEY",
    ):
        am.AsyncApimart()


def test_key_and_base_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIMART_API_KEY", "sk-env")
    monkeypatch.setenv("APIMART_BASE_URL", "http://127.0.0.1:9/")
    c = am.AsyncApimart()
    assert c.base_url == "http://127.0.0.1:9"
    monkeypatch.delenv("APIMART_BASE_URL")
    assert am.AsyncApimart().base_url == "https://api.apimart.ai"


@pytest.mark.parametrize(
    "url", ["http://api.apimart.ai", "http://10.0.0.1:8000", "http://example.com/v1"]
)
def test_plain_http_refused_for_remote_hosts(url: str) -> None:
    with pytest.raises(am.ConfigurationError, match="refusing plain http"):
        am.AsyncApimart("k", base_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://localhost:1",
        "http://[::1]:80",
        "https://proxy.example.com/apimart",
    ],
)
def test_allowed_base_urls(url: str) -> None:
    assert am.AsyncApimart("k", base_url=url).base_url == url


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "ftp://x"}, "base_url must be an http(s) URL with a host"),
        ({"base_url": "https://user:pw@x.com"}, "base_url must not carry credentials"),
        ({"max_retries": -1}, "max_retries: must be a whole number >= 0, got -1"),
        ({"language": "e n"}, "language must be a language code such as 'en' or 'zh-TW'"),
        ({"language": ""}, "language must be a language code such as 'en' or 'zh-TW'"),
        ({"timeout": "5"}, "timeout must be a Timeout, a number or None, got '5'"),
        ({"status_concurrency": 0}, "status_concurrency: must be a whole number >= 1, got 0"),
        ({"download_concurrency": True}, "download_concurrency: must be a whole number >= 1"),
        ({"requests_per_second": 0}, "requests_per_second: must be a positive number, got 0"),
    ],
)
def test_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(
        am.ConfigurationError, match=message.replace("(", "\\(").replace(")", "\\)")
    ):
        am.AsyncApimart("k", **kwargs)  # type: ignore[arg-type]


def test_bad_key_characters() -> None:
    with pytest.raises(am.ConfigurationError, match="white space or control characters"):
        am.AsyncApimart("sk-a\r\nX-Evil: 1")


def test_timeout_config() -> None:
    assert am.Timeout.of(5) == am.Timeout(connect=5.0, read=5.0, total=5.0)
    assert am.Timeout.of(None) == am.Timeout(connect=None, read=None, total=None)
    assert am.AsyncApimart("k", timeout=am.Timeout(total=9)).timeout.total == 9
    with pytest.raises(am.ConfigurationError, match="^Timeout.read: must be >= 0 seconds"):
        am.Timeout(read=-1)


async def test_not_open_and_closed(emu: Emulator) -> None:
    c = am.AsyncApimart(emu.api_key, base_url=emu.base_url)
    with pytest.raises(am.ClientClosedError, match="the client is not open"):
        await c.balance()
    async with c:
        assert (await c.balance()).remain_balance == 1000.0
        assert "[open]" in repr(c)
    with pytest.raises(am.ClientClosedError, match="the client was closed"):
        await c.balance()
    with pytest.raises(am.ClientClosedError):
        await c.open()
    assert emu.counters == {"balance": 1}


def test_repr() -> None:
    c = am.AsyncApimart("k", base_url="http://127.0.0.1:9")
    assert repr(c) == "<AsyncApimart http://127.0.0.1:9 [new] requests: none>"


# -- submit and status ----------------------------------------------------------------------


async def test_submit_sends_the_body_and_a_key(emu: Emulator, client: am.AsyncApimart) -> None:
    task_id = await client.videos.submit(VIDU)
    assert task_id.startswith("task_")
    task = emu.state.tasks[task_id]
    assert task.body == {
        "model": "viduq3",
        "prompt": "the bear waves",
        "image_urls": ["https://e.com/bear.png"],
        "duration": 5,
    }
    assert task.idempotency_key is not None
    assert task.idempotency_key.startswith("am-")


async def test_submit_rejects_non_requests_before_sending(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    with pytest.raises(am.ValidationError, match="^request: must be a VideoRequest"):
        await client.videos.submit({"model": "sora-2-preview"})  # type: ignore[arg-type]
    with pytest.raises(
        am.ValidationError, match=r"^idempotency_key: must be 1 to 191 visible ASCII"
    ):
        await client.videos.submit(SORA, idempotency_key="")
    assert emu.counters == {}


async def test_submit_reads_the_newer_reply_shape(emu: Emulator) -> None:
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url) as c:
        ids = []
        for version in (None, "2026-07-27"):
            headers = {"X-APIMart-Response-Version": version} if version else {}
            ids.append(
                await c._transport.request(
                    "POST",
                    "/v1/videos/generations",
                    kind="submit",
                    retry="submit",
                    parse=lambda r: am._converter.parse_submit(r.body),
                    json_body=SORA.to_body(),
                    headers={**headers, "Idempotency-Key": f"k-{version}"},
                )
            )
    assert ids == emu.task_ids()


async def test_server_side_validation_is_a_bad_request(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    # An unknown model passes the SDK (generic checks only) and is refused by the service.
    with pytest.raises(am.BadRequestError) as info:
        await client.videos.submit(am.VideoRequest("no-such-model", "x"))
    assert info.value.status == 400
    assert info.value.param == "model"
    assert info.value.message == "model no-such-model does not exist or is not available"
    assert info.value.request_id is not None
    assert info.value.request_id.startswith("req_")


async def test_task_lifecycle_with_the_clock(emu: Emulator, client: am.AsyncApimart) -> None:
    task_id = await client.videos.submit(SORA)
    t0 = await client.tasks.get(task_id)
    assert (t0.status, t0.progress, t0.estimated_time, t0.cost) == (
        am.TaskStatus.SUBMITTED,
        0,
        10,
        None,
    )
    emu.advance(5)
    t1 = await client.tasks.get(task_id)
    assert (t1.status, t1.progress) == (am.TaskStatus.PROCESSING, 50)
    emu.advance(5)
    t2 = await client.tasks.get(task_id)
    assert t2.status is am.TaskStatus.COMPLETED
    assert (t2.progress, t2.cost, t2.credits_cost, t2.actual_time) == (100, 0.8, 8.0, 10)
    assert t2.video_urls == [f"{emu.base_url}/files/{task_id}/0.mp4"]
    assert t2.videos[0].expires_at == t2.completed + 24 * 3600


async def test_unknown_task_is_not_found(client: am.AsyncApimart) -> None:
    with pytest.raises(am.NotFoundError, match="task does not exist or has expired"):
        await client.tasks.get("task_nope")


async def test_a_language_beyond_the_four_is_passed_through(emu: Emulator) -> None:
    # newer docs list about ten languages: the SDK passes through what the user gives
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, language="zh-TW") as c:
        assert c.language == "zh-TW"
        task_id = await c.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
        await c.tasks.get(task_id)
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, language="fr") as c:
        await c.tasks.get(task_id)


async def test_language_changes_error_messages(emu: Emulator) -> None:
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, language="ja") as c:
        with pytest.raises(am.NotFoundError, match="タスクが存在しない"):
            await c.tasks.get("task_nope")


async def test_expired_task_is_not_found(emu: Emulator, client: am.AsyncApimart) -> None:
    task_id = await client.videos.submit(SORA)
    emu.advance(3 * 24 * 3600 + 1)
    with pytest.raises(am.NotFoundError):
        await client.tasks.get(task_id)


@pytest.mark.parametrize("bad", ["", "a/b", "a b", None, ".", ".."])  # dots: /v1/tasks/.. is /v1/
async def test_bad_task_ids_are_refused_before_sending(
    emu: Emulator, client: am.AsyncApimart, bad: object
) -> None:
    with pytest.raises(am.ValidationError, match="^task_id: "):
        await client.tasks.get(bad)  # type: ignore[arg-type]
    assert emu.counters == {}


@pytest.mark.parametrize(
    ("bad", "rule"),
    [
        ("t" * 10_000, "must be at most 256 characters, not 10000"),
        ("t" * 257, "must be at most 256 characters, not 257"),
        ("task_\x7f1", "must not contain '/', white space or control characters"),
        ("task_\x9b1", "must not contain '/', white space or control characters"),
        ("task_\x001", "must not contain '/', white space or control characters"),
        ("task/../balance", "must not contain '/', white space or control characters"),
        ("   ", "must be a non-empty string"),
    ],
    ids=["10000 chars", "257 chars", "DEL", "C1 CSI", "NUL", "slash", "blank"],
)
async def test_a_bad_task_id_is_refused_by_every_method_before_any_request(
    manual_emu: Emulator, manual_client: am.AsyncApimart, bad: str, rule: str
) -> None:
    """brk21d: a 10,000-character task id went to the service unchecked (``tasks.get``,
    ``tasks.wait``...): a URL path no server takes. Ids are checked first, by every method
    that takes one, each error naming the field and the rule; nothing reaches the service.
    Real ids are about 30 characters (``task_01KS1H7ZYSJWH1N779S2FSHTKA``); 256 leaves room."""
    calls = {
        "get": lambda: manual_client.tasks.get(bad),
        "wait": lambda: manual_client.tasks.wait(bad, timeout=5),
        "get_many": lambda: manual_client.tasks.get_many(["task_ok", bad]),
    }
    for name, call in calls.items():
        with pytest.raises(am.ValidationError) as caught:
            await call()
        field = "task_ids[]" if name == "get_many" else "task_id"
        assert (caught.value.field, caught.value.rule) == (field, rule), name
    with pytest.raises(am.ValidationError, match=r"^task_ids\[\]: " + re.escape(rule)):
        async with manual_client.tasks.watch(["task_ok", bad]):
            pass
    assert sum(manual_emu.counters.values()) == 0


async def test_a_watch_iterated_after_its_block_ends_its_iteration(
    manual_client: am.AsyncApimart, manual_emu: Emulator
) -> None:
    """Leaving the block stops following the rest: an ``async for`` over the stream after it
    (a handler that kept it) raised anyio's bare ``ClosedResourceError``."""
    task_id = await manual_client.videos.submit(am.VideoRequest("sora-2-preview", "x"))
    async with manual_client.tasks.watch([task_id]) as stream:
        pass
    assert [task async for task in stream] == []


async def test_a_task_id_of_256_characters_is_sent() -> None:
    from apimart_async._api import check_task_id

    assert check_task_id("t" * 256) == "t" * 256
    assert check_task_id("task_01KS1H7ZYSJWH1N779S2FSHTKA") == "task_01KS1H7ZYSJWH1N779S2FSHTKA"
    assert check_task_id("タスク_1") == "タスク_1"  # not ASCII, but text: passed through


# -- get_many -------------------------------------------------------------------------------


async def test_get_many_in_chunks_of_100(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    ids = [await manual_client.videos.submit(SORA) for _ in range(250)]
    manual_emu.complete(ids[7])
    tasks = await manual_client.tasks.get_many([*ids, "task_unknown", ids[0]])
    assert [t.id for t in tasks] == ids  # asked order, unknown left out, duplicates once
    assert tasks[7].status is am.TaskStatus.COMPLETED
    assert manual_emu.counters["batch"] == 3
    assert manual_emu.counters["task"] == 1  # absence proves nothing: the unknown id, by id
    assert manual_client.batch_route_available is True


async def test_get_many_falls_back_when_the_route_is_missing(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    manual_emu.batch_route = False
    ids = [await manual_client.videos.submit(SORA) for _ in range(30)]
    tasks = await manual_client.tasks.get_many([*ids, "task_unknown"])
    assert [t.id for t in tasks] == ids
    assert manual_emu.counters["batch"] == 1
    assert manual_emu.counters["task"] == 31
    assert manual_emu.state.max_in_flight["task"] <= 8
    assert manual_client.batch_route_available is False
    # for the rest of the session, no more batch requests
    await manual_client.tasks.get_many(ids[:5])
    assert manual_emu.counters["batch"] == 1
    assert manual_emu.counters["task"] == 36


async def test_get_many_falls_back_when_the_route_answers_an_unreadable_shape(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    ids = [await manual_client.videos.submit(SORA) for _ in range(3)]
    manual_emu.faults.inject("batch", Fault.reply(200, {"code": 200, "data": {"total": 3}}))
    tasks = await manual_client.tasks.get_many(ids)
    assert [t.id for t in tasks] == ids
    assert manual_emu.counters["batch"] == 1
    assert manual_client.batch_route_available is False


@pytest.mark.parametrize("status", [405, 501])
async def test_get_many_falls_back_on_405_and_501(
    manual_emu: Emulator, manual_client: am.AsyncApimart, status: int
) -> None:
    task_id = await manual_client.videos.submit(SORA)
    manual_emu.faults.inject("batch", Fault.error(status, "x"))
    assert [t.id for t in await manual_client.tasks.get_many([task_id])] == [task_id]
    assert manual_client.batch_route_available is False


async def test_get_many_does_not_fall_back_on_transient_errors(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    task_id = await manual_client.videos.submit(SORA)
    manual_emu.faults.inject("batch", Fault.server_error(503), times=2)
    assert [t.id for t in await manual_client.tasks.get_many([task_id])] == [task_id]
    assert manual_emu.counters["batch"] == 3
    assert manual_client.batch_route_available is True


# -- generate and wait ----------------------------------------------------------------------


def status_requests(emu: Emulator) -> int:
    return emu.counters.get("task", 0) + emu.counters.get("batch", 0)


async def _complete_when_polled(emu: Emulator, fail: bool = False) -> None:
    await emu.wait_until(lambda: status_requests(emu) >= 1)
    (task_id,) = emu.task_ids()
    emu.set_running(task_id, 40)
    await emu.wait_until(lambda: status_requests(emu) >= 2)
    if fail:
        emu.fail(task_id, code=1301, message="unsafe content")
    else:
        emu.complete(task_id)


async def test_generate_until_completed(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_complete_when_polled, manual_emu)
        task = await manual_client.videos.generate(VIDU)
    assert task.ok
    assert task.id == manual_emu.task_ids()[0]
    assert manual_emu.counters["submit"] == 1


async def test_generate_failed_raises_with_the_task(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_complete_when_polled, manual_emu, True)
        with pytest.raises(am.TaskFailedError) as info:
            await manual_client.videos.generate(VIDU)
    err = info.value
    assert err.task.status is am.TaskStatus.FAILED
    assert err.task.error == am.TaskError(code=1301, message="unsafe content", type="task_error")
    assert str(err) == f"task {err.task_id} failed: unsafe content (code 1301)"


async def test_generate_times_out_but_the_task_lives_on(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    with pytest.raises(am.TaskTimeoutError) as info:
        await manual_client.videos.generate(SORA, timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert info.value.task_id == manual_emu.task_ids()[0]
    assert str(info.value).startswith(f"task {info.value.task_id} not finished after 0.05 s")


async def test_moderated_prompt_fails_at_once_and_costs_nothing(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    with pytest.raises(am.TaskFailedError) as info:
        await client.videos.generate(am.VideoRequest("sora-2-preview", "[blocked] thing"))
    assert info.value.task.cost == 0.0
    assert info.value.task.error is not None
    assert info.value.task.error.type == "moderation_error"
    assert (await client.balance()).used_balance == 0.0


# -- balance and uploads --------------------------------------------------------------------


async def test_balance_falls_as_tasks_cost(emu: Emulator, client: am.AsyncApimart) -> None:
    before = await client.balance()
    assert (before.remain_balance, before.used_balance, before.remain_credits) == (
        1000.0,
        0.0,
        10000.0,
    )
    await client.videos.submit(am.VideoRequest("sora-2-pro-preview", "x", duration=12))
    after = await client.balance()
    assert after.used_balance == pytest.approx(3.6)
    assert after.remain_balance == pytest.approx(996.4)
    account = await client.balance(account=True)
    assert account == after


async def test_insufficient_balance(emu: Emulator) -> None:
    emu.state.remain_balance = 0.5
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url) as c:
        with pytest.raises(am.InsufficientBalanceError) as info:
            await c.videos.submit(SORA)
    assert info.value.status == 402
    assert emu.counters["submit"] == 1
    assert emu.tasks_created == 0


async def test_unlimited_balance() -> None:
    async with (
        Emulator(balance=None) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url) as c,
    ):
        bal = await c.balance()
    assert bal.unlimited
    assert bal.remain_balance == -1


async def test_upload_bytes_and_path(
    emu: Emulator, client: am.AsyncApimart, tmp_path: object
) -> None:
    url = await client.uploads.image(PNG)
    assert url.startswith(f"{emu.base_url}/uploads/")
    assert url.endswith(".png")
    path = anyio.Path(str(tmp_path)) / "cat.webp"
    await path.write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 32)
    info = await client.uploads.create(str(path))
    assert (info.filename, info.content_type, info.bytes) == ("cat.webp", "image/webp", 48)
    assert emu.counters["upload"] == 2


async def test_upload_checked_locally_before_sending(
    emu: Emulator, client: am.AsyncApimart, tmp_path: object
) -> None:
    with pytest.raises(
        am.ValidationError, match="^file: must be a JPEG, PNG, WebP or GIF image, got 'doc.pdf'"
    ):
        await client.uploads.image(b"%PDF-1.7", filename="doc.pdf")
    with pytest.raises(am.ValidationError, match="^file: must be at most 20 MB"):
        await client.uploads.image(PNG + b"\x00" * (20 * 1024 * 1024))
    with pytest.raises(am.ValidationError, match="^file: is empty"):
        await client.uploads.image(b"")
    with pytest.raises(am.ValidationError, match="^file: cannot be read"):
        await client.uploads.image(str(anyio.Path(str(tmp_path)) / "missing.png"))
    # a folder, or a file that cannot be opened: the same typed error, never a raw OSError
    with pytest.raises(am.ValidationError, match=r"^file: cannot be read \(Is a directory\)"):
        await client.uploads.image(str(tmp_path))
    assert emu.counters == {}


async def test_an_upload_with_a_callers_file_name_is_sent_whatever_the_name(
    emu: Emulator, client: am.AsyncApimart
) -> None:
    """A web app passing on an uploaded file's name (``UploadFile.filename``, the caller's
    to choose: ``filename*=UTF-8''a%0Ab.png`` decodes to a line break): aiohttp refused a
    control character in the form's header with a bare ValueError (a 500), and a name of
    100,000 characters made a header line the server refused. The name is made safe."""
    for name in ("a\r\nX-Evil: 1.png", "a\x00b.png", "a\nb", "x" * 100_000 + ".png"):
        info = await client.uploads.create(PNG, filename=name)
        assert info.url.startswith(f"{emu.base_url}/uploads/"), name
        assert all(c >= " " and c != "\x7f" for c in info.filename), info.filename
        assert len(info.filename) <= 255
    assert info.filename.endswith(".png")
    for bad in (5, b"x.png"):
        with pytest.raises(am.ValidationError, match="^filename: must be a string"):
            await client.uploads.image(PNG, filename=bad)  # type: ignore[arg-type]
    assert emu.counters["upload"] == 4


LONE_SURROGATE_ID = json.loads('"task_\\ud800"')  # what json.loads makes of "task_\ud800"


async def test_a_task_id_with_a_lone_surrogate_is_refused_and_stalls_no_other_wait(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    """A task id from a JSON body may hold a lone surrogate (valid JSON, not encodable): it
    passed the checks, then every status round that carried it failed (UnicodeEncodeError
    in the URL), so one such wait stalled every wait of the client (brk21b 1, 2)."""
    with pytest.raises(am.ValidationError, match="task_id: must be valid Unicode text"):
        await manual_client.tasks.get(LONE_SURROGATE_ID)
    with pytest.raises(am.ValidationError, match="task_id: must be valid Unicode text"):
        await manual_client.tasks.wait(LONE_SURROGATE_ID, timeout=5)
    with pytest.raises(am.ValidationError, match=r"task_ids\[\]: must be valid Unicode"):
        async with manual_client.tasks.watch(["t1", LONE_SURROGATE_ID]):
            pass
    with pytest.raises(am.WebhookError, match="not a task id"):
        await manual_client.tasks.notify({"id": LONE_SURROGATE_ID, "status": "completed"})
    assert sum(manual_emu.counters.values()) == 0


async def test_a_whole_number_too_large_for_a_float_is_refused_by_name(
    manual_emu: Emulator, manual_client: am.AsyncApimart
) -> None:
    """``timeout=10**400`` passed the check (a positive number), then ended in a raw
    OverflowError where it became a float (brk21b 16)."""
    with pytest.raises(am.OptionError, match="timeout: is too large"):
        await manual_client.tasks.wait("t1", timeout=10**400)
    with pytest.raises(am.OptionError, match="timeout: is too large"):
        await manual_client.videos.generate(am.VideoRequest("sora-2-preview", "x"), timeout=10**400)
    assert sum(manual_emu.counters.values()) == 0

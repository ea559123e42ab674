"""The emulator follows apimart-api.md: raw HTTP against it, no SDK involved."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from apimart_async.emulator import Emulator, Fault

pytestmark = pytest.mark.anyio

SORA = {"model": "sora-2-preview", "prompt": "a cat", "duration": 8}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def auth(emu: Emulator, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {emu.api_key}", **extra}


async def submit(
    http: aiohttp.ClientSession, emu: Emulator, body: dict[str, Any] = SORA, **headers: str
) -> tuple[int, Any]:
    async with http.post(
        f"{emu.base_url}/v1/videos/generations", json=body, headers=auth(emu, **headers)
    ) as r:
        return r.status, await r.json()


async def test_auth_required_on_every_api_route(emu: Emulator, http: aiohttp.ClientSession) -> None:
    routes = [
        ("POST", "/v1/videos/generations"),
        ("GET", "/v1/tasks/x"),
        ("POST", "/v1/tasks/batch"),
        ("GET", "/v1/balance"),
        ("GET", "/v1/user/balance"),
        ("POST", "/v1/uploads/images"),
    ]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            async with http.request(method, emu.base_url + path, headers=headers) as r:
                assert r.status == 401
                body = await r.json()
                assert body["error"]["type"] == "apimart_error"
                assert body["error"]["message"].startswith("API key is required")


async def test_a_non_ascii_key_is_a_401_not_a_500(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    """A key pasted with a typographic quote (``sk-...\u2019``): the emulator's comparison
    raised TypeError (non-ASCII str), a 500 the SDK retried and reported as a ServerError."""
    for key in ("sk-nope\u2019", emu.api_key + "\u00e9"):
        headers = {"Authorization": f"Bearer {key}"}
        async with http.get(f"{emu.base_url}/v1/balance", headers=headers) as r:
            assert r.status == 401


async def test_submit_shapes(emu: Emulator, http: aiohttp.ClientSession) -> None:
    status, body = await submit(http, emu)
    assert status == 200
    assert body["code"] == 200
    assert body["data"][0]["status"] == "submitted"
    assert body["data"][0]["task_id"].startswith("task_")
    status, body = await submit(http, emu, **{"X-APIMart-Response-Version": "2026-07-27"})
    assert body["data"]["id"].startswith("task_")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "sora-2-preview"}, "prompt"),
        ({**SORA, "duration": 5}, "duration"),
        ({**SORA, "resolution": "high"}, "resolution"),
        ({"model": "viduq3", "prompt": "x"}, "image_urls"),
        (
            {
                "model": "viduq3-mix",
                "prompt": "x",
                "image_urls": ["https://e/a.png"],
                "resolution": "540p",
            },
            "resolution",
        ),
        ({"model": "gemini-omni-flash-preview"}, "prompt"),
        (
            {
                "model": "gemini-omni-flash-preview",
                "prompt": "x",
                "video_urls": ["https://e/a.mp4", "https://e/b.mp4"],
            },
            "video_urls",
        ),
        ({"model": "nope", "prompt": "x"}, "model"),
        # reference-image formats, per model, as the seed pages state them: every image of the
        # array is checked (sora: .jpeg/.jpg/.png/.webp, even though only the first is used)
        ({**SORA, "image_urls": ["https://e/a.png", "https://e/d.gif"]}, "image_urls"),
        ({**SORA, "image_urls": ["https://e/a.bmp"]}, "image_urls"),
        ({"model": "viduq3", "prompt": "x", "image_urls": ["https://e/a.gif"]}, "image_urls"),
        (
            {"model": "gemini-omni-flash-preview", "image_urls": ["https://e/a.webp"]},
            "image_urls",
        ),
    ],
)
async def test_validation_errors_name_the_param(
    emu: Emulator, http: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    status, reply = await submit(http, emu, body)
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"] == param
    assert emu.tasks_created == 0


async def test_gemini_silently_maps_other_aspect_ratios(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    status, _ = await submit(
        http, emu, {"model": "gemini-omni-flash-preview", "prompt": "x", "aspect_ratio": "1:1"}
    )
    assert status == 200


async def test_idempotency(emu: Emulator, http: aiohttp.ClientSession) -> None:
    _, a = await submit(http, emu, **{"Idempotency-Key": "k"})
    _, b = await submit(http, emu, **{"Idempotency-Key": "k"})
    assert a == b
    status, c = await submit(http, emu, {**SORA, "prompt": "other"}, **{"Idempotency-Key": "k"})
    assert (status, c["error"]["type"]) == (409, "idempotency_key_reused")
    assert emu.tasks_per_key == {"k": 1}


async def test_in_progress_while_the_first_is_slow(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    import anyio

    emu.faults.inject("submit", Fault.slow(0.5))
    results: list[tuple[int, Any]] = []

    async def first() -> None:
        results.append(await submit(http, emu, **{"Idempotency-Key": "slow"}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await emu.wait_until(lambda: "slow" in emu.state.idempotency)
        async with http.post(
            f"{emu.base_url}/v1/videos/generations",
            json=SORA,
            headers=auth(emu, **{"Idempotency-Key": "slow"}),
        ) as r:
            assert r.status == 409
            assert r.headers["Retry-After"] == "1"
            assert (await r.json())["error"]["type"] == "idempotency_in_progress"
    assert results[0][0] == 200
    assert emu.tasks_created == 1


async def test_lifecycle_progress_and_cost(emu: Emulator, http: aiohttp.ClientSession) -> None:
    _, body = await submit(http, emu)
    task_id = body["data"][0]["task_id"]
    seen = []
    for step in (0, 1, 3, 5, 1):
        emu.advance(step)
        seen.append((emu.task(task_id)["status"], emu.task(task_id)["progress"]))
    assert seen == [
        ("submitted", 0),
        ("pending", 0),
        ("processing", 40),
        ("processing", 90),
        ("completed", 100),
    ]
    done = emu.task(task_id)
    assert (done["cost"], done["credits_cost"], done["actual_time"], done["estimated_time"]) == (
        0.8,
        8.0,
        10,
        10,
    )


async def test_failure_rate_fails_and_refunds() -> None:
    async with (
        Emulator(frozen_clock=True, task_duration=1, failure_rate=1.0) as emu,
        aiohttp.ClientSession() as http,
    ):
        _, body = await submit(http, emu)
        emu.advance(1)
        task = emu.task(body["data"][0]["task_id"])
        assert task["status"] == "failed"
        assert task["error"]["code"] == "generation_failed"
        assert task["cost"] == 0.0
        assert emu.stats()["used_balance"] == 0.0


async def test_batch_status(emu: Emulator, http: aiohttp.ClientSession) -> None:
    ids = [(await submit(http, emu))[1]["data"][0]["task_id"] for _ in range(3)]
    async with http.post(
        f"{emu.base_url}/v1/tasks/batch", json={"task_ids": [*ids, "task_gone"]}, headers=auth(emu)
    ) as r:
        body = await r.json()
    assert [t["id"] for t in body["data"]] == ids
    async with http.post(
        f"{emu.base_url}/v1/tasks/batch", json={"task_ids": ["t"] * 101}, headers=auth(emu)
    ) as r:
        assert r.status == 400
    emu.batch_route = False
    async with http.post(
        f"{emu.base_url}/v1/tasks/batch", json={"task_ids": ids}, headers=auth(emu)
    ) as r:
        assert r.status == 404


async def _finished_file(emu: Emulator, http: aiohttp.ClientSession) -> tuple[str, str]:
    _, body = await submit(http, emu)
    task_id = body["data"][0]["task_id"]
    emu.advance(10)
    return task_id, emu.task(task_id)["result"]["videos"][0]["url"][0]


async def test_files_with_range_and_expiry(emu: Emulator, http: aiohttp.ClientSession) -> None:
    task_id, url = await _finished_file(emu, http)
    async with http.get(url) as r:
        whole = await r.read()
        assert r.status == 200
        assert r.headers["Accept-Ranges"] == "bytes"
    assert len(whole) == 64 * 1024
    assert whole[4:8] == b"ftyp"
    assert hashlib.sha256(whole).hexdigest() == emu.file_sha256(task_id)
    async with http.get(url, headers={"Range": "bytes=1000-"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 1000-{len(whole) - 1}/{len(whole)}"
        assert await r.read() == whole[1000:]
    async with http.get(url, headers={"Range": "bytes=10-19"}) as r:
        assert await r.read() == whole[10:20]
    async with http.get(url, headers={"Range": "bytes=-5"}) as r:
        assert await r.read() == whole[-5:]
    async with http.get(url, headers={"Range": f"bytes={len(whole)}-"}) as r:
        assert r.status == 416
    emu.advance(24 * 3600)
    async with http.get(url) as r:
        assert r.status == 403
    assert emu.state.file_requests_with_auth == 0


async def test_files_differ_per_task(emu: Emulator, http: aiohttp.ClientSession) -> None:
    a, _ = await _finished_file(emu, http)
    b, _ = await _finished_file(emu, http)
    assert emu.file_sha256(a) != emu.file_sha256(b)


async def test_upload(emu: Emulator, http: aiohttp.ClientSession) -> None:
    form = aiohttp.FormData()
    form.add_field("file", b"GIF89a" + b"\x00" * 10, filename="x.gif", content_type="image/gif")
    async with http.post(f"{emu.base_url}/v1/uploads/images", data=form, headers=auth(emu)) as r:
        body = await r.json()
    assert (body["content_type"], body["bytes"], body["filename"]) == ("image/gif", 16, "x.gif")
    async with http.get(body["url"]) as r:
        assert await r.read() == b"GIF89a" + b"\x00" * 10
    form = aiohttp.FormData()
    form.add_field("file", b"not an image", filename="x.txt")
    async with http.post(f"{emu.base_url}/v1/uploads/images", data=form, headers=auth(emu)) as r:
        assert r.status == 400


async def test_webhook_delivery(http: aiohttp.ClientSession) -> None:
    received: list[dict[str, Any]] = []

    async def callback(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook/callback", callback)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with Emulator(frozen_clock=True, task_duration=2) as emu:
            _, body = await submit(http, emu, {**SORA, "webhook": f"http://127.0.0.1:{port}/hook"})
            emu.advance(2)
            await emu.wait_until(lambda: len(emu.webhook_deliveries) == 1)
    finally:
        await runner.cleanup()
    assert [t["id"] for t in received] == [body["data"][0]["task_id"]]
    assert received[0]["status"] == "completed"


async def test_manual_mode_controls(manual_emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu = manual_emu
    ids = [(await submit(http, emu))[1]["data"][0]["task_id"] for _ in range(4)]
    emu.advance(3600)
    assert {emu.task(t)["status"] for t in ids} == {"submitted"}
    emu.set_running(ids[0], 30, status="in_progress")
    emu.complete(ids[1])
    emu.fail(ids[2], code=42, message="bad")
    emu.cancel(ids[3])
    assert [emu.task(t)["status"] for t in ids] == [
        "in_progress",
        "completed",
        "failed",
        "cancelled",
    ]
    assert emu.task(ids[2])["error"] == {"code": 42, "message": "bad", "type": "task_error"}
    with pytest.raises(ValueError, match="already ended"):
        emu.complete(ids[1])
    assert emu.complete_all() == 1
    assert emu.stats()["unfinished"] == 0


async def test_bulk_created_tasks(manual_emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu = manual_emu
    url = emu.base_url + "/_emulator/tasks"
    async with http.post(url, json={"count": 250}) as r:
        ids = (await r.json())["task_ids"]
    assert len(set(ids)) == 250 == emu.tasks_created == emu.stats()["unfinished"]
    assert emu.counters.get("submit", 0) == 0
    assert emu.task(ids[0])["status"] == "submitted"
    async with http.post(
        url, json={"count": 1, "body": {"model": "sora-2-preview", "prompt": "x", "duration": 7}}
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "duration"
    async with http.post(url, json={"count": -1}) as r:
        assert r.status == 400
    assert emu.tasks_created == 250


async def test_random_faults_are_counted(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.faults.set_rate(1.0, endpoints=["balance"], faults=[Fault.server_error(502)])
    async with http.get(f"{emu.base_url}/v1/balance", headers=auth(emu)) as r:
        assert r.status == 502
    assert emu.stats()["faults_served"] == {"balance status": 1}
    with pytest.raises(ValueError, match="unknown endpoint"):
        emu.faults.inject("nope", Fault.drop())


# -- service variants -------------------------------------------------------------------------


async def batch_reply(
    http: aiohttp.ClientSession, emu: Emulator, ids: list[str]
) -> tuple[int, Any]:
    async with http.post(
        f"{emu.base_url}/v1/tasks/batch", json={"task_ids": ids}, headers=auth(emu)
    ) as r:
        text = await r.text()
        return r.status, json.loads(text) if text.startswith("{") else text


async def test_batch_route_variants(http: aiohttp.ClientSession) -> None:
    async with Emulator(mode="manual", batch_route="refuse", seed=5) as emu:
        ids = emu.create_tasks(30)
        status, body = await batch_reply(http, emu, ids)
        assert (status, body["error"]["type"]) == (400, "invalid_request_error")
        emu.batch_route = "nested"
        status, body = await batch_reply(http, emu, ids)
        assert status == 200
        assert [t["id"] for t in body["data"]["tasks"]] == ids
        emu.batch_route = "keyed"
        status, body = await batch_reply(http, emu, ids)
        assert list(body["data"]) == ids
        assert all(body["data"][i]["id"] == i for i in ids)
        emu.batch_route = "partial"
        status, body = await batch_reply(http, emu, ids)
        shown = [t["id"] for t in body["data"]]
        assert 0 < len(shown) < len(ids)  # live tasks left out
        assert all(i in ids for i in shown)
        emu.batch_route = True
        emu.batch_hidden.add(ids[3])
        status, body = await batch_reply(http, emu, ids)
        assert [t["id"] for t in body["data"]] == ids[:3] + ids[4:]
        emu.batch_route = False
        assert emu.batch_route == "absent"
        status, _ = await batch_reply(http, emu, ids)
        assert status == 404
        with pytest.raises(ValueError, match="batch_route must be"):
            emu.batch_route = "sometimes"  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("variant", "status", "body"),
    [
        (
            "404",
            404,
            {"error": {"code": 404, "type": "invalid_request_error"}},
        ),
        (
            "400",
            400,
            {"error": {"code": 400, "type": "invalid_request_error"}},
        ),
        ("200", 200, {"code": 404, "data": None}),
    ],
)
async def test_unknown_task_variants(
    http: aiohttp.ClientSession, variant: str, status: int, body: dict[str, Any]
) -> None:
    async with Emulator(unknown_task=variant) as emu:  # type: ignore[arg-type]
        async with http.get(f"{emu.base_url}/v1/tasks/task_nope", headers=auth(emu)) as r:
            got = await r.json()
            assert r.status == status
    for key, value in body.items():
        if isinstance(value, dict):
            assert value.items() <= got[key].items()
        else:
            assert got[key] == value
    message = got["error"]["message"] if "error" in got else got["message"]
    assert "does not exist or has expired" in message
    if variant == "400":
        assert message.startswith("invalid task ID")


@pytest.mark.parametrize(
    ("placement", "type_", "code"),
    [
        ("both", "idempotency_key_reused", "idempotency_key_reused"),
        ("type", "idempotency_key_reused", 409),
        ("code", "invalid_request_error", "idempotency_key_reused"),
    ],
)
async def test_conflict_sub_code_placement(
    http: aiohttp.ClientSession, placement: str, type_: str, code: object
) -> None:
    async with Emulator(conflict_code_in=placement) as emu:  # type: ignore[arg-type]
        await submit(http, emu, **{"Idempotency-Key": "k"})
        status, body = await submit(
            http, emu, {**SORA, "prompt": "other"}, **{"Idempotency-Key": "k"}
        )
    assert status == 409
    assert (body["error"]["type"], body["error"]["code"]) == (type_, code)


async def test_status_names_and_completed_without_video(http: aiohttp.ClientSession) -> None:
    names = {"completed": "succeeded", "failed": "failure", "cancelled": "canceled"}
    async with Emulator(mode="manual", status_names=names) as emu:
        a, b, c = emu.create_tasks(3)
        emu.complete(a, videos=0)
        emu.fail(b)
        emu.cancel(c)
        _, body = await batch_reply(http, emu, [a, b, c])
    assert [t["status"] for t in body["data"]] == ["succeeded", "failure", "canceled"]
    assert body["data"][0]["result"] == {"videos": []}


def test_variant_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown_task must be one of 404, 400, 200"):
        Emulator(unknown_task="500")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="conflict_code_in must be one of both, type, code"):
        Emulator(conflict_code_in="message")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_route must be"):
        Emulator(batch_route="maybe")  # type: ignore[arg-type]

"""The emulator's HTTP face: every route, with the faults, the auth check and the counters
around each (``Routes``). The reply shapes are described in ``_server``'s docstring; the
handlers read the emulator's live settings (``Service``) and tell ``Background`` what changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from aiohttp import web

from ._background import Background
from ._rules import RuleError, check_body, price
from ._service import Service
from ._state import TERMINAL, IdemRecord, file_bytes

__all__ = ["MAX_UPLOAD", "Routes"]

RESPONSE_VERSION_OBJECT: Final = "2026-07-27"
MAX_UPLOAD: Final = 20 * 1024 * 1024
BATCH_MAX: Final = 100
_LANG_NOT_FOUND: Final = {
    "en": "task does not exist or has expired",
    "zh": "任务不存在或已过期",
    "ja": "タスクが存在しないか、有効期限が切れています",
    "ko": "작업이 존재하지 않거나 만료되었습니다",
}
_RANGE: Final = re.compile(r"^bytes=(\d*)-(\d*)$")

Handler = Callable[[web.Request, float], Awaitable[web.StreamResponse]]


def _error(
    status: int,
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: Any = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    err: dict[str, Any] = {
        "code": status if code is None else code,
        "message": message,
        "type": type_,
    }
    if param is not None:
        err["param"] = param
    body = {"error": err, "request_id": "req_" + secrets.token_hex(8)}
    return web.json_response(body, status=status, headers=headers)


class Routes:
    """The request handlers of one emulator (``emu``), and the routes that lead to them."""

    def __init__(self, emu: Service, background: Background) -> None:
        self._emu = emu
        self._background = background

    def add_to(self, router: web.UrlDispatcher) -> None:
        """Route every endpoint of the service, the result files and the admin API."""
        router.add_post("/v1/videos/generations", self._wrap("submit", self._submit))
        router.add_post("/v1/tasks/batch", self._wrap("batch", self._batch))
        router.add_get("/v1/tasks/{task_id}", self._wrap("task", self._task))
        router.add_get("/v1/balance", self._wrap("balance", self._balance))
        router.add_get("/v1/user/balance", self._wrap("balance", self._balance))
        router.add_post("/v1/uploads/images", self._wrap("upload", self._upload))
        router.add_get("/files/{task_id}/{n}.mp4", self._wrap("file", self._file, auth=False))
        router.add_get("/uploads/{name}", self._uploaded)
        router.add_get("/_emulator/stats", self._stats)
        router.add_post("/_emulator/advance", self._advance)
        router.add_get("/_emulator/finished", self._finished)
        router.add_post("/_emulator/tasks", self._create_tasks)

    def _wrap(
        self, endpoint: str, handler: Handler, *, auth: bool = True
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        state = self._emu.state

        async def wrapped(request: web.Request) -> web.StreamResponse:
            state.requests[endpoint] += 1
            state.in_flight[endpoint] += 1
            state.max_in_flight[endpoint] = max(
                state.max_in_flight[endpoint], state.in_flight[endpoint]
            )
            self._background.changed()
            status = 0
            try:
                resp = await self._serve(request, endpoint, handler, auth)
                status = resp.status
                return resp
            finally:
                state.in_flight[endpoint] -= 1
                state.statuses[(endpoint, status)] += 1
                self._background.changed()

        return wrapped

    async def _serve(
        self, request: web.Request, endpoint: str, handler: Handler, auth: bool
    ) -> web.StreamResponse:
        fault = self._emu.faults.next(endpoint)
        delay = 0.0
        if fault is not None and fault.kind in ("status", "reply", "malformed"):
            # Read the body before an early answer, as a server that keeps the connection
            # must: aiohttp 3.10.2 (our floor) misreads the unread rest of an upload as
            # the next request on the connection (a 400 "Invalid method" on the next one).
            await request.read()
        if fault is not None:
            if fault.kind == "slow":
                delay = fault.delay
                if endpoint != "submit":
                    await asyncio.sleep(delay)
            elif fault.kind == "status":
                headers = (
                    {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
                )
                return _error(
                    fault.status,
                    fault.message or "injected error",
                    fault.type or "server_error",
                    headers=headers,
                )
            elif fault.kind == "reply":
                return web.Response(
                    status=fault.status, body=fault.body, content_type="application/json"
                )
            elif fault.kind == "drop":
                return await self._drop(request)
            elif fault.kind == "malformed":
                return web.Response(
                    status=200,
                    body=b'{"code": 200, "data": [{"status": "subm',
                    content_type="application/json",
                )
            elif fault.kind == "truncated":
                return await self._truncated(request)
        if auth:
            header = request.headers.get("Authorization", "")
            # as bytes: compare_digest refuses a str that is not ASCII (a pasted "’")
            if not header.startswith("Bearer ") or not secrets.compare_digest(
                header[7:].strip().encode("utf-8", "surrogateescape"),
                self._emu.api_key.encode("utf-8", "surrogateescape"),
            ):
                return web.json_response(
                    {
                        "error": {
                            "message": "API key is required or invalid",
                            "type": "apimart_error",
                            "code": 401,
                        }
                    },
                    status=401,
                )
        else:
            if "Authorization" in request.headers:
                self._emu.state.file_requests_with_auth += 1
        for task in self._emu.state.sweep():
            self._background.finished(task)
        resp = await handler(request, delay)
        if fault is not None and fault.kind == "lost_reply":
            return await self._drop(request)
        return resp

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        """Close the connection without a reply."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise asyncio.CancelledError

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        body = json.dumps(
            {"code": 200, "data": {"id": "task_cut", "status": "processing"}}
        ).encode()
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "application/json", "Content-Length": str(len(body) + 64)},
        )
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        return await self._drop(request)

    # -- endpoints ---------------------------------------------------------------------------

    async def _submit(self, request: web.Request, delay: float) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON", "invalid_request_error")
        state = self._emu.state
        key = request.headers.get("Idempotency-Key")
        record: IdemRecord | None = None
        if key is not None:
            if not key or len(key) > 255:
                return _error(
                    400,
                    "Idempotency-Key must be 1 to 255 characters",
                    "invalid_request_error",
                    param="Idempotency-Key",
                )
            body_hash = state.body_hash(body)
            record = state.idempotency.get(key)
            if record is not None:
                if record.body_hash != body_hash:
                    return self._conflict(
                        "Idempotency-Key was already used with a different request body",
                        "idempotency_key_reused",
                    )
                if record.in_progress:
                    return self._conflict(
                        "A request with this Idempotency-Key is still being processed",
                        "idempotency_in_progress",
                        headers={"Retry-After": "1"},
                    )
                return self._submitted(request, record.task_id or "")
            record = IdemRecord(body_hash)
            state.idempotency[key] = record
            self._background.changed()
        try:
            if delay:
                await asyncio.sleep(delay)
            try:
                model, params = check_body(body)
            except RuleError as exc:
                return _error(400, exc.message, "invalid_request_error", param=exc.param)
            gone = self._missing_upload(body)
            if gone is not None:  # the service fetches references: an expired upload fails
                message = f"image_urls: cannot fetch {gone}"
                return _error(400, message, "invalid_request_error", param="image_urls")
            if not state.can_pay(price(model, params)):
                return _error(402, "Insufficient balance", "payment_required")
            task = state.create_task(model, params, body, key)
            if record is not None:
                record.task_id = task.id
                record.in_progress = False
            if task.status in TERMINAL:
                self._background.after_change([task])
            else:
                self._background.wake()
            return self._submitted(request, task.id)
        finally:
            if record is not None and record.in_progress:
                state.idempotency.pop(key or "", None)

    def _conflict(
        self, message: str, sub_code: str, *, headers: dict[str, str] | None = None
    ) -> web.Response:
        """A 409 with its sub-code where ``conflict_code_in`` says."""
        placement = self._emu.conflict_code_in
        type_ = sub_code if placement in ("both", "type") else "invalid_request_error"
        code = sub_code if placement in ("both", "code") else 409
        return _error(409, message, type_, code=code, headers=headers)

    def _submitted(self, request: web.Request, task_id: str) -> web.Response:
        version = request.headers.get("X-APIMart-Response-Version", "")
        if version and version >= RESPONSE_VERSION_OBJECT:
            return web.json_response({"code": 200, "data": {"id": task_id, "status": "submitted"}})
        return web.json_response(
            {"code": 200, "data": [{"status": "submitted", "task_id": task_id}]}
        )

    def _not_found(self, request: web.Request) -> web.Response:
        lang = request.query.get("language", "en")
        message = _LANG_NOT_FOUND.get(lang, _LANG_NOT_FOUND["en"])
        if self._emu.unknown_task == "400":
            # the vendor's error table: 400 "invalid task ID" for task queries
            return _error(400, f"invalid task ID: {message}", "invalid_request_error")
        if self._emu.unknown_task == "200":
            # the vendor's CLI checks ``code != 200`` on 200 replies
            return web.json_response({"code": 404, "message": message, "data": None})
        return _error(404, message, "invalid_request_error")

    async def _task(self, request: web.Request, delay: float) -> web.StreamResponse:
        task = self._emu.state.tasks.get(request.match_info["task_id"])
        if task is None or self._emu.state.expired(task):
            return self._not_found(request)
        return web.json_response(
            {"code": 200, "data": self._emu.state.task_object(task, self._emu.base_url)}
        )

    async def _batch(self, request: web.Request, delay: float) -> web.StreamResponse:
        variant = self._emu.batch_route
        if variant == "absent":
            return web.Response(status=404, text="404: Not Found")
        if variant == "refuse":
            return _error(
                400, "ids is required", "invalid_request_error", param="ids"
            )  # it wants another body than ours
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON", "invalid_request_error")
        raw: Any = cast("dict[str, Any]", body).get("task_ids") if isinstance(body, dict) else None
        items: list[object] = cast("list[object]", raw) if isinstance(raw, list) else []
        ids = [i for i in items if isinstance(i, str)]
        if not isinstance(raw, list) or len(ids) != len(items):
            return _error(
                400,
                "task_ids must be an array of task ids",
                "invalid_request_error",
                param="task_ids",
            )
        if len(ids) > BATCH_MAX:
            return _error(
                400,
                f"at most {BATCH_MAX} task_ids per request",
                "invalid_request_error",
                param="task_ids",
            )
        data: list[dict[str, Any]] = []
        for task_id in ids:
            task = self._emu.state.tasks.get(task_id)
            if task is None or self._emu.state.expired(task) or task_id in self._emu.batch_hidden:
                continue
            if variant == "partial" and self._emu.state.rng.random() < 1 / 3:
                continue  # a live task left out: absence proves nothing
            data.append(self._emu.state.task_object(task, self._emu.base_url))
        if variant == "nested":
            return web.json_response({"code": 200, "data": {"tasks": data, "total": len(data)}})
        if variant == "keyed":
            return web.json_response({"code": 200, "data": {t["id"]: t for t in data}})
        return web.json_response({"code": 200, "data": data})

    async def _balance(self, request: web.Request, delay: float) -> web.StreamResponse:
        s = self._emu.state
        remain = -1.0 if s.unlimited else round(s.remain_balance, 6)
        return web.json_response(
            {
                "success": True,
                "remain_balance": remain,
                "used_balance": round(s.used_balance, 6),
                "remain_credits": -1 if s.unlimited else round(s.remain_balance * 10, 4),
                "used_credits": round(s.used_balance * 10, 4),
                "unlimited_quota": s.unlimited,
                "message": "",
            }
        )

    async def _upload(self, request: web.Request, delay: float) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            return _error(
                400,
                "upload must be multipart/form-data with a 'file' field",
                "invalid_request_error",
                param="file",
            )
        try:
            form = await request.post()
        except (ValueError, web.HTTPRequestEntityTooLarge):
            return _error(413, "file must be at most 20 MB", "invalid_request_error", param="file")
        field = form.get("file")
        if not isinstance(field, web.FileField):
            return _error(400, "missing 'file' field", "invalid_request_error", param="file")
        with field.file:  # closed here: a dropped connection would leave it to the collector
            data = field.file.read()
        if len(data) > MAX_UPLOAD:
            return _error(413, "file must be at most 20 MB", "invalid_request_error", param="file")
        kind = _sniff(data)
        if kind is None:
            return _error(
                400,
                "only JPEG, PNG, WebP and GIF images are supported",
                "invalid_request_error",
                param="file",
            )
        name = f"img_{secrets.token_hex(8)}.{kind[1]}"
        now = self._emu.clock.now()
        self._emu.state.uploads[name] = (kind[0], data, now)
        self._emu.state.uploads_per_hash[hashlib.sha256(data).hexdigest()] += 1
        if self._emu.state.on_upload is not None:
            self._emu.state.on_upload(name)
        return web.json_response(
            {
                "url": f"{self._emu.base_url}/uploads/{name}",
                "filename": field.filename or name,
                "content_type": kind[0],
                "bytes": len(data),
                "created_at": int(now),
            }
        )

    def _live_upload(self, name: str) -> tuple[str, bytes, float] | None:
        item = self._emu.state.uploads.get(name)
        if item is None or self._emu.clock.now() - item[2] > self._emu.state.upload_ttl:
            return None
        return item

    def _missing_upload(self, body: dict[str, Any]) -> str | None:
        """The first of this emulator's upload URLs in ``image_urls`` that is gone, if any."""
        prefix = f"{self._emu.base_url}/uploads/"
        urls: object = body.get("image_urls")
        for url in cast("list[object]", urls) if isinstance(urls, list) else []:
            known = isinstance(url, str) and url.startswith(prefix)
            if known and self._live_upload(str(url)[len(prefix) :]) is None:
                return str(url)
        return None

    async def _uploaded(self, request: web.Request) -> web.StreamResponse:
        item = self._live_upload(request.match_info["name"])
        if item is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=item[1], content_type=item[0])

    async def _file(self, request: web.Request, delay: float) -> web.StreamResponse:
        task = self._emu.state.tasks.get(request.match_info["task_id"])
        try:
            n = int(request.match_info["n"])
        except ValueError:
            n = -1
        if task is None or task.status != "completed" or not 0 <= n < task.videos:
            return web.Response(status=404, text="Not Found")
        if task.expires_at is not None and self._emu.clock.now() >= task.expires_at:
            return web.Response(status=403, text="Request has expired")
        size = self._emu.state.video_bytes
        start, end = 0, size
        status = 200
        rng = request.headers.get("Range")
        if rng is not None:
            m = _RANGE.match(rng.strip())
            if m is None or (not m.group(1) and not m.group(2)):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start = max(0, size - int(m.group(2)))
            if start >= size or start >= end:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
        headers = {
            "Content-Type": "video/mp4",
            "Accept-Ranges": "bytes",
            "Content-Length": str(end - start),
            "ETag": f'"{task.id}-{n}"',
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        name = f"{task.id}/{n}"
        chunk = 256 * 1024
        for pos in range(start, end, chunk):
            await resp.write(
                file_bytes(self._emu.state.pattern, name, pos, min(end, pos + chunk), size)
            )
            if self._emu.file_chunk_delay:
                await self._emu.file_chunk_pause()
        await resp.write_eof()
        return resp

    # -- admin (for an emulator in another process) --------------------------------------------

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._emu.stats())

    async def _finished(self, request: web.Request) -> web.StreamResponse:
        """Exact finish times (emulator clock, Unix seconds) of ended tasks, for benchmarks."""
        tasks = self._emu.state.tasks
        return web.json_response(
            {t: tasks[t].finished_at for t in self._emu.state.finished_log if t in tasks}
        )

    async def _create_tasks(self, request: web.Request) -> web.StreamResponse:
        """``{"count": N, "body": {...}}`` -> ``{"task_ids": [...]}`` (see ``create_tasks``)."""
        try:
            data = await request.json()
            ids = self._emu.create_tasks(int(data.get("count", 0)), data.get("body"))
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, str(exc), "invalid_request_error")
        except RuleError as exc:
            return _error(400, exc.message, "invalid_request_error", param=exc.param)
        return web.json_response({"task_ids": ids})

    async def _advance(self, request: web.Request) -> web.StreamResponse:
        try:
            seconds = float((await request.json()).get("seconds", 0))
            self._emu.advance(seconds)
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, str(exc), "invalid_request_error")
        return web.json_response({"now": self._emu.clock.now()})


def _sniff(data: bytes) -> tuple[str, str] | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg", "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png", "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif", "gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    return None

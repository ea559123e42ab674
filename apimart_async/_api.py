"""The endpoints over the transport: what each request sends and how its reply is read.

``Api`` is what every engine above calls: submit (with its idempotency key), one task, many
tasks (holding the batch status route's state, ``BatchRoute``), the balance and uploads; it
checks ids and keys before anything is sent. It knows nothing of polling, batches or files:
those engines get the few of its methods they need (see ARCHITECTURE.md).
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import quote, urlencode

import aiohttp
import anyio
import attrs

from . import _converter as conv
from . import _retry
from ._checks import check_path
from ._config import Timeout
from ._errors import (
    APIConnectionError,
    ApimartError,
    APIStatusError,
    ClientClosedError,
    FieldError,
    NotFoundError,
    ResponseValidationError,
    SubmitIndeterminateError,
    ValidationError,
)
from ._models import (
    NOT_UNICODE,
    Balance,
    Task,
    UploadedImage,
    VideoRequest,
    is_local_ref,
    is_unicode_text,
)
from ._poll_schedule import BATCH_IDS
from ._retry import is_retryable_status
from ._slices import let_the_loop_run
from ._status_window import StatusWindow
from ._threads import run_sync
from ._transport import Reply, SendTrack, Transport, new_idempotency_key

__all__ = [
    "BATCH_ROUTE_FAILURES",
    "BATCH_ROUTE_RETRY",
    "MAX_TASK_ID",
    "MAX_UPLOAD_BYTES",
    "Api",
    "BatchRoute",
    "Statuses",
    "SubmitLog",
    "check_idempotency_key",
    "check_task_id",
    "is_unknown_task",
    "new_idempotency_key",
    "sniff_image",
]

logger = logging.getLogger("apimart_async")

T = TypeVar("T")

#: A result for every id asked: its task, or the error its read ended with.
Statuses = dict[str, Task | ApimartError]

MAX_UPLOAD_BYTES: Final = 20 * 1024 * 1024
MIN_UPLOAD_RATE: Final = 10 * 1024
"""Bytes per second an upload is given at least: the client's total timeout of an attempt is
raised to the file's size at this rate (an image of a few MB over a slow uplink takes minutes;
cut at the total, it would start again from zero every time)."""


_IMAGE_MAGIC: Final = (
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"GIF87a", "image/gif", "gif"),
    (b"GIF89a", "image/gif", "gif"),
)


def _parse(fn: Callable[..., T]) -> Callable[[Reply], T]:
    """Adapt a body parser of ``_converter`` to a transport ``parse`` callback."""
    return lambda reply: fn(reply.body, status=reply.status)


def upload_timeout(timeout: Timeout, size: int) -> Timeout:
    """``timeout`` for an upload of ``size`` bytes (or a submit carrying a ``data:`` video):
    its total at least ``size`` at ``MIN_UPLOAD_RATE`` (connect and read as they are; no total
    stays no total)."""
    if timeout.total is None:
        return timeout
    return attrs.evolve(timeout, total=max(timeout.total, size / MIN_UPLOAD_RATE))


def sniff_image(data: bytes) -> tuple[str, str] | None:
    """(content type, extension) of a JPEG, PNG, WebP or GIF image, from its first bytes."""
    for magic, content_type, ext in _IMAGE_MAGIC:
        if data.startswith(magic):
            return content_type, ext
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    return None


#: White space (the regex ``\s`` is str.isspace's set), control characters (C0, DEL, C1)
#: and '/': a task id goes into a URL path.
_BAD_ID_CHAR = re.compile(r"[\s\x00-\x1f\x7f-\x9f/]")
#: The longest task id sent (fix21): the service's are about 30 characters
#: (``task_01KS1H7ZYSJWH1N779S2FSHTKA``); a URL path of 10,000 is refused by servers (8 KB).
MAX_TASK_ID: Final = 256
#: A task id ``check_task_id`` accepts that ``quote`` leaves as it is (the service's ids).
_PLAIN_ID: Final = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_TASK_ID}}}\Z")


#: The longest file name an upload's form carries (the extension kept).
MAX_FILE_NAME: Final = 255
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")


def _safe_file_name(name: str) -> str:
    """``name`` as an upload's form can carry it: a file name may come from a web app's
    caller (``UploadFile.filename``), and aiohttp refuses a control character in the
    form's header with a bare ValueError; a name of 100,000 characters makes a header line
    servers refuse. Control characters become ``_``; a long name is cut, its extension kept."""
    name = _CONTROL_CHAR.sub("_", name)
    if len(name) > MAX_FILE_NAME:
        stem, dot, ext = name.rpartition(".")
        keep = f".{ext}" if dot and stem and len(ext) <= 10 else ""
        name = name[: MAX_FILE_NAME - len(keep)] + keep
    return name


def check_task_id(task_id: Any, field: str = "task_id") -> str:
    """``task_id`` if it can be a task id of the service; else a ``ValidationError`` naming
    ``field`` and the rule, before any request."""
    if not isinstance(task_id, str) or not task_id.strip():
        raise ValidationError([FieldError(field, "must be a non-empty string", task_id)])
    if len(task_id) > MAX_TASK_ID:
        rule = f"must be at most {MAX_TASK_ID} characters, not {len(task_id)}"
        raise ValidationError([FieldError(field, rule, task_id)])  # shown cut short
    if _BAD_ID_CHAR.search(task_id) is not None:
        rule = "must not contain '/', white space or control characters"
        raise ValidationError([FieldError(field, rule, task_id)])
    if task_id in (".", ".."):  # a path step: GET /v1/tasks/.. would read /v1/
        raise ValidationError([FieldError(field, "must not be '.' or '..'", task_id)])
    if not task_id.isascii() and not is_unicode_text(task_id):
        raise ValidationError([FieldError(field, NOT_UNICODE, task_id)])
    return task_id


#: The vendor's own client's rule for a caller-supplied Idempotency-Key.
_IDEMPOTENCY_KEY: Final = re.compile(r"[!-~]{1,191}")


def check_idempotency_key(key: Any) -> str:
    if not isinstance(key, str) or _IDEMPOTENCY_KEY.fullmatch(key) is None:
        raise ValidationError(
            [
                FieldError(
                    "idempotency_key",
                    "must be 1 to 191 visible ASCII characters, no spaces (^[!-~]{1,191}$)",
                    key,
                )
            ]
        )
    return key


#: A message saying the task id is not known: "invalid task ID", "task not found", "task does
#: not exist or has expired", "unknown task_id"...
_UNKNOWN_ID = re.compile(
    r"(?=.*(task|\bids?\b))(?=.*(not (exist|found)|unknown|invalid|expired|no such))"
    # the same in the other languages of ``?language=``
    r"|任务.*(不存在|过期)|タスク.*(存在しない|有効期限)|작업.*(존재하지|만료)",
    re.IGNORECASE | re.DOTALL,
)


def is_unknown_task(exc: ApimartError) -> bool:
    """The service says it does not know the task: a 404, or a 400 (also a 200 carrying the
    code 400) whose message says the id is unknown, invalid or expired."""
    if isinstance(exc, NotFoundError):
        return True
    return (
        isinstance(exc, APIStatusError)
        and exc.status == 400
        and _UNKNOWN_ID.search(exc.message) is not None
    )


#: Seconds after which a batch status route that proved unusable is tried again.
BATCH_ROUTE_RETRY: Final = 600.0
#: Batch status requests failing in a row (each after its retries) that switch to per-task.
BATCH_ROUTE_FAILURES: Final = 3


def _refused(exc: ApimartError) -> bool:
    """A batch status reply that says the route will not serve us: an error status other than
    408, 429 and 5xx (404 missing, 400 another body wanted, 401/403, a redirect, 501), or a
    body that cannot be read (an unknown shape, or not even JSON after the retries)."""
    if isinstance(exc, ResponseValidationError):
        return True
    return isinstance(exc, APIStatusError) and not is_retryable_status(exc.status)


def _says_nothing_of_the_route(exc: ApimartError) -> bool:
    """A failed batch request that is no evidence against the route (fix21): no reply at all
    (connection refused, reset, a timeout: the service is out of reach, every route alike),
    or a 408 / 429 (the service is busy, not missing a route)."""
    if isinstance(exc, APIConnectionError):
        return True
    return isinstance(exc, APIStatusError) and exc.status in (408, 429)


def _answered(result: Task | ApimartError) -> bool:
    """A per-task read the service answered (a task, or an error that is not transient): it
    is reachable, so a batch route failing meanwhile is the route's own trouble."""
    if isinstance(result, Task):
        return True
    if isinstance(result, APIConnectionError):
        return False
    if isinstance(result, ResponseValidationError):
        return result.decodable
    return not (isinstance(result, APIStatusError) and is_retryable_status(result.status))


class BatchRoute:
    """Whether status reads go through ``POST /v1/tasks/batch``: logic only, no I/O; times
    are the poller's clock.

    The route is the cheaper path, never the only one: a refusal switches to per-task reads
    at once, ``max_failures`` transient failures in a row do too (``Api.get_tasks`` counts
    only 5xx replies, and switches only once a per-task read shows the service answers: an
    outage is no evidence against the route), and ``retry_after`` seconds later the route is
    tried again.
    """

    def __init__(
        self, *, retry_after: float = BATCH_ROUTE_RETRY, max_failures: int = BATCH_ROUTE_FAILURES
    ) -> None:
        self.retry_after = retry_after
        self.max_failures = max_failures
        #: None until the route answered, True once it did, False while it is off.
        self.available: bool | None = None
        self.failures: int = 0
        self.off_until: float | None = None
        #: How many times the route was switched off.
        self.switches: int = 0

    def __repr__(self) -> str:
        state = {None: "untried", True: "on", False: "off"}[self.available]
        return f"<BatchRoute {state} failures={self.failures} switches={self.switches}>"

    def usable(self, now: float) -> bool:
        """Whether to send a batch request now (an off route is tried again once its time
        has come)."""
        if self.available is not False:
            return True
        if self.off_until is not None and now >= self.off_until:
            self.available = None
            self.off_until = None
            return True
        return False

    def on_ok(self) -> None:
        self.available = True
        self.failures = 0

    def on_refused(self, now: float) -> bool:
        """The route refused: off now. Returns True for the first switch of the session."""
        self._off(now)
        return self.switches == 1

    def on_failed(self, now: float) -> bool:
        """A transient failure. Returns True when it switched the route off."""
        self.failures += 1
        if self.failures < self.max_failures:
            return False
        self._off(now)
        return True

    def last_straw(self) -> bool:
        """Whether one more transient failure would switch the route off."""
        return self.failures + 1 >= self.max_failures

    def on_outage(self) -> None:
        """The service answered nothing on any route: not the route's fault; the failures in
        a row count from zero again."""
        self.failures = 0

    def _off(self, now: float) -> None:
        self.available = False
        self.failures = 0
        self.off_until = now + self.retry_after
        self.switches += 1


class SubmitLog(Protocol):
    """What records every submit of a client (``_client_journal.ClientJournal``): the key
    before the POST, the task id after its reply, the error of one that failed."""

    async def before_submit(self, key: str, request: VideoRequest) -> None:
        """Called before the POST; raising stops the submit (nothing is sent)."""
        ...

    async def submitted(self, key: str, task_id: str) -> None:
        """The POST returned ``task_id`` (called shielded from cancellation)."""
        ...

    async def submit_failed(self, key: str, exc: ApimartError) -> None:
        """The submit ended with ``exc`` (called shielded from cancellation)."""
        ...


class Api:
    """The service's endpoints over one transport.

    ``clock`` gives the batch route its times (the client points it at the poller's clock,
    so an emulator's compressed clock moves the route's retry too).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        language: str = "en",
        status_concurrency: int = 8,
        route: BatchRoute | None = None,
        clock: Callable[[], float] = time.monotonic,
        reads: StatusWindow | None = None,
    ) -> None:
        self.transport = transport
        self.language = language
        self._query = ("", "")
        self.status_concurrency = status_concurrency
        #: The adaptive window of per-task reads (issue 22); without one, status_concurrency.
        self.reads = reads
        self.route: BatchRoute = route or BatchRoute()
        self.clock = clock
        #: Records every submit (the client's journal, issue 21); None: nothing is recorded.
        self.submit_log: SubmitLog | None = None

    def __repr__(self) -> str:
        return f"<Api {self.transport.base_url} {self.route!r}>"

    def _language_query(self) -> str:
        """``language=...`` encoded, once per language rather than from a dict per read."""
        language, query = self._query
        if language != self.language:
            query = urlencode({"language": self.language})
            self._query = (self.language, query)
        return query

    def ensure_open(self) -> None:
        """Raise ``ClientClosedError`` unless the transport's session is open."""
        self.transport.session()

    def request_counts(self) -> dict[str, int]:
        """HTTP attempts made so far, by kind."""
        return dict(self.transport.counters)

    # -- submit --------------------------------------------------------------------------------

    async def submit(self, request: VideoRequest, *, idempotency_key: str | None = None) -> str:
        """``POST /v1/videos/generations`` with an ``Idempotency-Key`` the same on every retry;
        the task id. ``SubmitIndeterminateError`` when the outcome is unknown."""
        if not isinstance(request, VideoRequest):
            raise ValidationError(
                [
                    FieldError(
                        "request", "must be a VideoRequest (see VideoRequest.from_dict)", request
                    )
                ]
            )
        local: list[FieldError] = []
        if request.image_urls or request.video_urls:
            local = [
                FieldError(
                    f"{field}[{i}]",
                    "is a local file: client.batch uploads it (or upload it with"
                    " client.uploads.image and pass the URL)",
                    ref,
                )
                for field in ("image_urls", "video_urls")
                for i, ref in enumerate(getattr(request, field))
                if is_local_ref(ref)
            ]
        if local:  # never send a local path to the service
            raise ValidationError(local)
        key = (
            new_idempotency_key()
            if idempotency_key is None
            else check_idempotency_key(idempotency_key)
        )
        log = self.submit_log
        if log is not None:
            self.ensure_open()  # a closed client sends nothing: nothing to record
            await log.before_submit(key, request)  # the key is durable before the POST
            try:
                task_id = await self._submit(request, key)
            except ApimartError as exc:
                with anyio.CancelScope(shield=True):
                    await log.submit_failed(key, exc)
                raise
            with anyio.CancelScope(shield=True):  # the id of a paid task is never lost
                await log.submitted(key, task_id)
            return task_id
        return await self._submit(request, key)

    async def _submit(self, request: VideoRequest, key: str) -> str:
        track = SendTrack()
        path = "/v1/videos/generations"
        # a data: video (a local one, up to 10 MB) is sent in the body, so like an upload
        inline = (
            sum(len(url) for url in request.video_urls if url[:5].lower() == "data:")
            if request.video_urls
            else 0
        )
        try:
            return await self.transport.request(
                "POST",
                path,
                kind="submit",
                retry="submit",
                parse=_parse(conv.parse_submit),
                json_body=request.to_body(),
                headers={"Idempotency-Key": key},
                timeout=upload_timeout(self.transport.timeout, inline) if inline else None,
                track=track,
            )
        except ApimartError as exc:
            if isinstance(exc, APIStatusError) and (
                exc.sub_code == "idempotency_result_indeterminate"
            ):
                reason = "the service cannot say whether it created the task"
            elif track.unanswered and isinstance(exc, ClientClosedError):
                # the close cut off an attempt that went out: a task may exist
                closed = ClientClosedError(
                    f"{exc}; the submit may have reached the service: submit again with "
                    f"idempotency_key={key!r} to get its task if there is one"
                )
                closed.idempotency_key = key
                raise closed from exc
            elif track.unanswered and _retry.is_retryable(exc, submit=True):
                reason = f"an attempt reached the service without a reply; last error: {exc}"
            else:
                exc.submit_not_taken = not track.unanswered and not track.taken
                raise
            raise SubmitIndeterminateError(
                f"submit outcome unknown ({reason}); submit again with "
                f"idempotency_key={key!r} to get the original task if there is one",
                idempotency_key=key,
                path=path,
            ) from exc

    # -- status --------------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> Task:
        """``GET /v1/tasks/{task_id}``."""
        if type(task_id) is str and _PLAIN_ID.match(task_id):  # valid, nothing to quote
            path = "/v1/tasks/" + task_id
        else:
            task_id = check_task_id(task_id)
            path = f"/v1/tasks/{quote(task_id, safe='')}"

        def parse(reply: Reply) -> Task:
            task = conv.parse_task(reply.body, status=reply.status)
            if task.id != task_id:
                raise ResponseValidationError(
                    f"asked for task {task_id}, got {task.id}", body=reply.body, status=reply.status
                )
            return task

        return await self.transport.request(
            "GET",
            path,
            kind="task",
            retry="read",
            parse=parse,
            query=self._language_query(),
        )

    async def get_many(self, task_ids: Iterable[str]) -> list[Task]:
        """The tasks asked for, in order; those the service does not know are left out. Raises
        the first error of a read that failed otherwise (after its retries)."""
        # in slices: an untrusted list of 50,000 ids held the loop ~50 ms in one stretch
        checked: dict[str, None] = {}
        since = time.perf_counter()
        for given in task_ids:
            checked[check_task_id(given, "task_ids[]")] = None
            since = await let_the_loop_run(since, time.perf_counter)
        ids = list(checked)
        results = await self.get_tasks(ids)
        found: list[Task] = []
        for task_id in ids:
            result = results.get(task_id)
            if isinstance(result, Task):
                found.append(result)
            elif result is not None and not is_unknown_task(result):
                raise result
        return found

    async def get_tasks(self, ids: Sequence[str]) -> Statuses:
        """A result for every id: its task, or the error its read ended with (after retries).

        Batch requests first while the route is usable; an id a batch reply leaves out, or
        whose item cannot be read, is read by id (absence proves nothing). A refused or
        unreadable batch route switches to per-task reads (see ``BatchRoute``); a transient
        failure of a batch request is the result of each of its ids. Raises only
        ``ClientClosedError``."""
        route = self.route
        results: Statuses = {}
        by_id: list[str] = []
        for start in range(0, len(ids), BATCH_IDS):
            chunk = ids[start : start + BATCH_IDS]
            if not route.usable(self.clock()):
                by_id.extend(chunk)
                continue
            try:
                tasks, unreadable = await self._batch(chunk)
            except ClientClosedError:
                raise
            except ApimartError as exc:
                now = self.clock()
                if _refused(exc):
                    self._switch(route.on_refused(now), exc)
                    by_id.extend(chunk)
                elif _says_nothing_of_the_route(exc) or not route.last_straw():
                    results.update((task_id, exc) for task_id in chunk)  # backed off, kept
                    if not _says_nothing_of_the_route(exc):
                        route.on_failed(now)
                else:  # failing again: the route's trouble, or the whole service's?
                    results.update(await self._probe(chunk, exc))
                    if _answered(results[chunk[0]]):
                        route.on_failed(self.clock())  # the last straw: off
                        self._switch(route.switches == 1, exc)
                        by_id.extend(chunk[1:])
                    else:
                        route.on_outage()
                continue
            route.on_ok()
            wanted = set(chunk)
            results.update((t.id, t) for t in tasks if t.id in wanted)
            by_id.extend(t for t in chunk if t not in results or t in unreadable)
        if by_id:
            results.update(await self._each(by_id))
        return results

    async def _probe(self, chunk: Sequence[str], exc: ApimartError) -> Statuses:
        """The batch request failed once more: the first id read by id tells whether the
        service answers at all; the rest of ``chunk`` keeps the batch request's error."""
        results: Statuses = dict.fromkeys(chunk, exc)
        try:
            results[chunk[0]] = await self.get_task(chunk[0])
        except ClientClosedError:
            raise
        except ApimartError as failed:
            results[chunk[0]] = failed
        return results

    def batch_route_usable(self, now: float) -> bool:
        """Whether the next status reads may go through the batch route."""
        return self.route.usable(now)

    async def _batch(
        self, chunk: Sequence[str]
    ) -> tuple[list[Task], dict[str, ResponseValidationError]]:
        """One batch status request: the tasks read, and the ids of items that could not be."""
        return await self.transport.request(
            "POST",
            "/v1/tasks/batch",
            kind="batch",
            retry="read",
            parse=_parse(conv.parse_task_items),
            json_body={"task_ids": list(chunk)},
        )

    def _switch(self, first: bool, exc: ApimartError) -> None:
        """Log a switch to per-task reads: one WARNING a session, later ones at INFO."""
        logger.log(
            logging.WARNING if first else logging.INFO,
            "batch status route unusable (%s: %s); using per-task status requests from now on"
            " (the route is tried again in %.0f s)",
            type(exc).__name__,
            str(exc)[:200],
            self.route.retry_after,
        )

    async def _each(self, chunk: Sequence[str]) -> Statuses:
        """Per-task GETs, as many at a time as the read window allows (``status_concurrency``
        without one; a few workers over the chunk, not a task per id); each read's task or
        error."""
        results: Statuses = {}
        todo = iter(chunk)

        async def worker() -> None:
            for task_id in todo:
                try:
                    results[task_id] = await self.get_task(task_id)
                except ApimartError as exc:
                    results[task_id] = exc

        async with anyio.create_task_group() as tg:
            limit = self.reads.limit() if self.reads is not None else self.status_concurrency
            for _ in range(min(limit, len(chunk))):
                tg.start_soon(worker)
        return results

    # -- account and uploads -------------------------------------------------------------------

    async def balance(self, *, account: bool = False) -> Balance:
        """``GET /v1/balance``, or ``/v1/user/balance`` for the whole account."""
        path = "/v1/user/balance" if account else "/v1/balance"
        return await self.transport.request(
            "GET", path, kind="balance", retry="read", parse=_parse(conv.parse_balance)
        )

    async def upload_image(
        self, file: str | os.PathLike[str] | bytes, *, filename: str | None = None
    ) -> UploadedImage:
        """``POST /v1/uploads/images``; type and size are checked first."""
        given: object = filename  # the caller may pass anything
        if given is not None and not isinstance(given, str):
            rule = "must be a string"
            raise ValidationError([FieldError("filename", rule, type(given).__name__)])
        if isinstance(file, (bytes, bytearray, memoryview)):
            data = bytes(file)
            name = filename or "image"
        elif isinstance(file, (str, os.PathLike)):
            check_path("file", file)
            path = Path(file)
            try:
                size = (await run_sync(path.stat)).st_size
            except OSError as exc:
                raise ValidationError(
                    [FieldError("file", f"cannot be read ({exc.strerror})", str(path))]
                ) from None
            if size > MAX_UPLOAD_BYTES:
                raise ValidationError(
                    [
                        FieldError(
                            "file",
                            f"must be at most {MAX_UPLOAD_BYTES // 2**20} MB",
                            f"{size} bytes",
                        )
                    ]
                )
            try:
                data = await run_sync(path.read_bytes)
            except OSError as exc:  # a folder, no permission
                raise ValidationError(
                    [FieldError("file", f"cannot be read ({exc.strerror})", str(path))]
                ) from None
            name = filename or path.name
        else:
            raise ValidationError(
                [FieldError("file", "must be a path or bytes", type(file).__name__)]
            )
        if len(data) > MAX_UPLOAD_BYTES:
            raise ValidationError(
                [
                    FieldError(
                        "file",
                        f"must be at most {MAX_UPLOAD_BYTES // 2**20} MB",
                        f"{len(data)} bytes",
                    )
                ]
            )
        if not data:
            raise ValidationError([FieldError("file", "is empty", name)])
        kind = sniff_image(data)
        if kind is None:
            raise ValidationError(
                [FieldError("file", "must be a JPEG, PNG, WebP or GIF image", name)]
            )
        content_type, ext = kind
        name = _safe_file_name(name)
        if "." not in name:
            name = f"{name}.{ext}"
        # A file name need not be UTF-8 ("caf\udce9.png"): the form sends it as UTF-8.
        try:
            raw = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate no byte stands for ("\ud800.png")
            raw = name.encode("utf-8", "replace")
        name = raw.decode("utf-8", "replace")

        def form() -> aiohttp.FormData:
            fd = aiohttp.FormData()
            # A stream, not bytes: aiohttp warns that a large raw body may block the loop.
            fd.add_field("file", io.BytesIO(data), filename=name, content_type=content_type)
            return fd

        return await self.transport.request(
            "POST",
            "/v1/uploads/images",
            kind="upload",
            retry="read",
            parse=_parse(conv.parse_upload),
            data_factory=form,
            timeout=upload_timeout(self.transport.timeout, len(data)),
        )

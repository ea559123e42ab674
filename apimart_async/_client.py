"""``AsyncApimart``: the endpoints a video user needs, over one transport."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import ssl as _ssl
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar
from urllib.parse import quote

import aiohttp
import anyio

from . import _converter as conv
from . import _retry
from ._batch import Batch, BatchEvent, JobInput, _check_seconds
from ._config import DEFAULT_TIMEOUT, LANGUAGES, Timeout, check_base_url, resolve_api_key
from ._download import Downloader, DownloadExpiredError, _Gone
from ._errors import (
    ApimartError,
    APIStatusError,
    ClientClosedError,
    ConfigurationError,
    FieldError,
    ResponseValidationError,
    SubmitIndeterminateError,
    TaskFailedError,
    ValidationError,
)
from ._journal import Journal
from ._models import Balance, DownloadedFile, Task, UploadedImage, Video, VideoRequest
from ._poller import Poller, is_unknown_task
from ._retry import is_retryable_status
from ._schedule import BATCH_IDS, PollPolicy
from ._scheduler import RateLimiter, Throttle
from ._status_window import DEFAULT_MAX_STATUS_CONCURRENCY, StatusWindow
from ._transport import Reply, SendTrack, Transport, check_proxy_url, new_idempotency_key

__all__ = ["AsyncApimart", "TaskWatch", "Tasks", "Uploads", "Videos"]

logger = logging.getLogger("apimart_async")

T = TypeVar("T")

MAX_UPLOAD_BYTES: Final = 20 * 1024 * 1024

_IMAGE_MAGIC: Final = (
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"GIF87a", "image/gif", "gif"),
    (b"GIF89a", "image/gif", "gif"),
)


def _parse(fn: Callable[..., T]) -> Callable[[Reply], T]:
    """Adapt a body parser of ``_converter`` to a transport ``parse`` callback."""
    return lambda reply: fn(reply.body, status=reply.status)


def sniff_image(data: bytes) -> tuple[str, str] | None:
    """(content type, extension) of a JPEG, PNG, WebP or GIF image, from its first bytes."""
    for magic, content_type, ext in _IMAGE_MAGIC:
        if data.startswith(magic):
            return content_type, ext
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    return None


#: White space (the regex ``\s`` is str.isspace's set), control characters and '/'.
_BAD_ID_CHAR = re.compile(r"[\s\x00-\x1f/]")


def _check_task_id(task_id: Any, field: str = "task_id") -> str:
    if not isinstance(task_id, str) or not task_id.strip():
        raise ValidationError([FieldError(field, "must be a non-empty string", task_id)])
    if _BAD_ID_CHAR.search(task_id) is not None:
        raise ValidationError([FieldError(field, "must not contain '/' or white space", task_id)])
    return task_id


#: A language code for ``?language=`` (``en``, ``zh-TW``, ``pt_BR``): passed through as given.
_LANGUAGE: Final = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")

#: The vendor's own client's rule for a caller-supplied Idempotency-Key.
_IDEMPOTENCY_KEY: Final = re.compile(r"[!-~]{1,191}")


def _check_idempotency_key(key: Any) -> str:
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


class AsyncApimart:
    """Async client for the APIMart video API.

    ::

        async with AsyncApimart() as client:          # key from APIMART_API_KEY
            task = await client.videos.generate(VideoRequest("sora-2-preview", "a cat"))

    Args:
        api_key: the API key; default ``APIMART_API_KEY``. Never shown in reprs or logs.
        base_url: default ``APIMART_BASE_URL``, else ``https://api.apimart.ai``. Plain http is
            refused unless the host is loopback (the built-in emulator).
        timeout: per-attempt timeouts, a ``Timeout``, seconds for every phase, or None.
        max_retries: retries after the first attempt for retryable failures (see ``_retry``).
        language: language of the service's error messages: en, zh, ja, ko or any other
            language code (passed through: newer docs list more).
        status_concurrency: per-task status GETs in flight at first when the batch status
            route is missing; the number adapts (AIMD) between 1 and ``max_status_concurrency``.
        max_status_concurrency: the most per-task status GETs in flight (default: 64, or
            ``status_concurrency`` if larger); ``requests_per_second`` bounds it too.
        poll: the shared poller's ``PollPolicy`` (when to check each pending task).
        requests_per_second: an optional cap on all requests of this client (submit, status,
            upload, download), shared by everything the client does.
        download_concurrency: result files downloaded at once.
        ssl: an ``ssl.SSLContext`` for https (a private CA, a client certificate); default:
            the system's CAs, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set.
        proxy: an http(s) proxy for every request of this client, e.g.
            ``http://user:pass@proxy.example:3128`` (credentials are never shown).
        trust_env: without ``proxy``, follow ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``
            (read when the client opens), as requests and httpx do; False ignores them.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: Timeout | float | None = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        language: str = "en",
        status_concurrency: int = 8,
        max_status_concurrency: int | None = None,
        poll: PollPolicy | None = None,
        requests_per_second: float | None = None,
        download_concurrency: int = 4,
        ssl: _ssl.SSLContext | None = None,
        proxy: str | None = None,
        trust_env: bool = True,
    ) -> None:
        key = resolve_api_key(api_key)
        if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
            raise ConfigurationError(
                f"ssl must be an ssl.SSLContext or None, got {type(ssl).__name__}"
            )
        if proxy is not None:
            proxy = check_proxy_url(proxy)
        if not isinstance(trust_env, bool):
            raise ConfigurationError(f"trust_env must be True or False, got {trust_env!r}")
        url = check_base_url(base_url)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigurationError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not isinstance(language, str) or _LANGUAGE.fullmatch(language) is None:
            raise ConfigurationError(
                f"language must be a language code such as 'en' or 'zh-TW' (the service "
                f"documents {', '.join(LANGUAGES)}; others are passed through), got {language!r}"
            )
        if (
            isinstance(status_concurrency, bool)
            or not isinstance(status_concurrency, int)
            or status_concurrency < 1
        ):
            raise ConfigurationError(
                f"status_concurrency must be an int >= 1, got {status_concurrency!r}"
            )
        # issue 22: the adaptive per-task read window's bound
        if max_status_concurrency is None:
            max_status_concurrency = max(DEFAULT_MAX_STATUS_CONCURRENCY, status_concurrency)
        elif (
            isinstance(max_status_concurrency, bool)
            or not isinstance(max_status_concurrency, int)
            or max_status_concurrency < status_concurrency
        ):
            raise ConfigurationError(
                f"max_status_concurrency must be an int >= status_concurrency "
                f"({status_concurrency}), got {max_status_concurrency!r}"
            )
        if poll is not None and not isinstance(poll, PollPolicy):
            raise ConfigurationError(f"poll must be a PollPolicy, got {type(poll).__name__}")
        try:
            limiter = RateLimiter(requests_per_second) if requests_per_second is not None else None
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(str(exc)) from None
        self.language = language
        """The language of the service's error messages."""
        self.status_concurrency = status_concurrency
        """Parallel status GETs when the batch status route is missing."""
        self._transport = Transport(
            api_key=key,
            base_url=url,
            timeout=Timeout.of(timeout),
            max_retries=max_retries,
            throttle=Throttle(),
            limiter=limiter,
            ssl_context=ssl,
            proxy=proxy,
            trust_env=trust_env,
        )
        if (
            isinstance(download_concurrency, bool)
            or not isinstance(download_concurrency, int)
            or download_concurrency < 1
        ):
            raise ConfigurationError(
                f"download_concurrency must be an int >= 1, got {download_concurrency!r}"
            )
        self._poller = Poller(
            self,
            poll or PollPolicy(),
            reads=StatusWindow(start=status_concurrency, maximum=max_status_concurrency),
        )
        self._downloader = Downloader(self, concurrency=download_concurrency)
        self._runner: asyncio.Task[None] | None = None
        self._stop_runner = anyio.Event()
        #: Whether status reads use ``POST /v1/tasks/batch`` (times on the poller's clock).
        self._route = BatchRoute(retry_after=self._poller.schedule.policy.batch_route_retry)
        self.videos: Videos = Videos(self)
        """Submit and generate videos."""
        self.tasks: Tasks = Tasks(self)
        """Read, wait for and watch tasks."""
        self.uploads: Uploads = Uploads(self)
        """Upload reference images."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> Self:
        """Open the HTTP session and start the shared poller (prefer ``async with``)."""
        await self._transport.open()
        if self._runner is None:
            self._stop_runner = anyio.Event()
            # The poller's task group lives in a task of its own that the client owns and
            # joins in aclose(), so the client can be closed from any task, even from inside
            # a batch, without unwinding cancel scopes out of order.
            self._runner = asyncio.get_running_loop().create_task(
                self._run_background(), name="apimart-async client"
            )
        return self

    async def _run_background(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._poller.run, name="apimart-async poller")
            await self._stop_runner.wait()
            tg.cancel_scope.cancel()

    async def aclose(self) -> None:
        """Close the client: running waits and batches end with ``ClientClosedError``."""
        self._poller.close("the client was closed")
        runner, self._runner = self._runner, None
        if runner is not None:
            self._stop_runner.set()
            await runner
        await self._transport.aclose()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def base_url(self) -> str:
        """The API's base URL."""
        return self._transport.base_url

    @property
    def timeout(self) -> Timeout:
        """The per-attempt timeouts."""
        return self._transport.timeout

    @property
    def max_retries(self) -> int:
        """Retries after the first attempt of a retryable request."""
        return self._transport.max_retries

    @property
    def poll_policy(self) -> PollPolicy:
        """When the shared poller checks each pending task."""
        return self._poller.schedule.policy

    @property
    def throttle(self) -> Throttle:
        """Client-wide back-pressure from 429s (read-only use: ``factor``, ``rate_limited``)."""
        return self._transport.throttle

    @property
    def batch_route_available(self) -> bool | None:
        """True once the batch status route answered, False while status reads go task by
        task because it refused or kept failing (it is tried again after a while), None
        before it has answered."""
        return self._route.available

    def request_counts(self) -> dict[str, int]:
        """HTTP attempts made so far, by kind (submit, task, batch, balance, upload, retries)."""
        return dict(self._transport.counters)

    def __repr__(self) -> str:
        state = (
            "open" if self._transport.is_open else "closed" if self._transport.is_closed else "new"
        )
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self._transport.counters.items()))
        return f"<AsyncApimart {self.base_url} [{state}] requests: {counts or 'none'}>"

    # -- many jobs ---------------------------------------------------------------------------

    def batch(
        self,
        requests: Iterable[JobInput] | AsyncIterable[JobInput],
        *,
        concurrency: int = 8,
        max_pending: int | None = None,
        requests_per_second: float | None = None,
        poll: PollPolicy | None = None,
        job_timeout: float | None = None,
        timeout: float | None = None,
        stop_on_error: bool = False,
        on_event: Callable[[BatchEvent], None] | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        download_dir: str | os.PathLike[str] | None = None,
        manifest: str | os.PathLike[str] | None = None,
        max_bytes: int | None = None,
        max_cost: float | None = None,
        cost_estimate: Callable[[VideoRequest], float | None] | None = None,
        check_balance: bool = False,
        replay_finished: bool = True,
        retry_failed: bool = False,
        sigint_grace: float | None = None,
    ) -> Batch:
        """Run many jobs; outcomes arrive in completion order::

            async with client.batch(jobs, concurrency=16) as results:
                async for outcome in results:
                    ...

        Args:
            requests: any iterable or async iterable of ``VideoRequest``, read lazily.
            concurrency: submit requests in flight at most (scaled down after 429s).
            max_pending: submitted-but-unfinished tasks at most (account limits).
            requests_per_second: cap on all of this client's requests while the batch runs.
            poll: a ``PollPolicy`` for this batch's tasks (default: the client's).
            job_timeout: seconds a task may run after its submit before its outcome is a
                ``TaskTimeoutError`` (it keeps running at the service).
            timeout: seconds for the whole batch; then nothing more is submitted and every
                pending job ends with ``TaskTimeoutError``.
            stop_on_error: stop submitting after the first failed or errored job.
            on_event: called with each ``BatchEvent`` (submitted, progress, completed, ...).
            journal: an SQLite file (or a ``Journal``) recording every job; running the same
                batch with the same journal resumes it without submitting anything twice.
            download_dir: fetch each completed job's videos there (``<index>.mp4`` or
                ``<name>.mp4``), verified, before its outcome is handed out.
            manifest: a JSONL file with one line per finished job (default
                ``<download_dir>/manifest.jsonl``).
            max_bytes: refuse result files larger than this.
            max_cost: USD; no job is submitted that could take the batch past it (jobs left
                out end with ``BudgetExceededError``).
            cost_estimate: a job's expected cost, for ``max_cost`` (default: learnt from
                finished jobs of the same model, duration and resolution).
            check_balance: ask ``balance()`` first and refuse to start if nothing can be paid.
            replay_finished: with a journal, hand out the outcomes of jobs finished in earlier
                runs again (``Outcome.replayed``); False skips them.
            retry_failed: with a journal, submit again (as new, billed tasks) the jobs whose
                generation failed in an earlier run. Off by default: it costs money.
            sigint_grace: handle Ctrl-C while the batch runs (main thread only): the first
                stops submitting and follows running tasks for this many seconds, the second
                ends the iteration at once; ``results.interrupted`` tells. The journal keeps
                everything needed to resume.

        Items of ``requests`` may also be ``(name, VideoRequest)`` pairs: the name (sanitised)
        names the downloaded files and appears in the manifest.
        """
        return Batch(
            self,
            requests,
            concurrency=concurrency,
            max_pending=max_pending,
            requests_per_second=requests_per_second,
            job_timeout=job_timeout,
            timeout=timeout,
            stop_on_error=stop_on_error,
            on_event=on_event,
            poll=poll,
            journal=journal,
            download_dir=download_dir,
            manifest=manifest,
            max_bytes=max_bytes,
            max_cost=max_cost,
            cost_estimate=cost_estimate,
            check_balance=check_balance,
            replay_finished=replay_finished,
            retry_failed=retry_failed,
            sigint_grace=sigint_grace,
        )

    async def download(
        self,
        item: Task | Video | str,
        dest: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
    ) -> list[DownloadedFile]:
        """Download a completed task's videos (or one ``Video`` / URL) to ``dest``.

        ``dest`` is a directory (files named ``<task id>.mp4``, ``-N`` for later videos) or a
        file path. Streams to ``.part``, resumes with Range, checks the length, computes the
        sha256, renames when complete. An expired task URL is renewed once by a status request.
        """
        target = Path(dest)
        if isinstance(item, Task):
            if not item.ok:
                raise ValidationError(
                    [FieldError("task", "must be completed to download", item.status.value)]
                )
            is_dir = await anyio.Path(target).is_dir()
            if is_dir or str(dest).endswith(("/", os.sep)):
                directory, stem = target, item.id
            else:
                directory, stem = target.parent, target.stem
            return list(
                await self._downloader.task_files(item, directory, stem, max_bytes=max_bytes)
            )
        url = item.url if isinstance(item, Video) else item
        if not isinstance(url, str):
            raise ValidationError([FieldError("item", "must be a Task, a Video or a URL", item)])
        if await anyio.Path(target).is_dir():
            raise ValidationError(
                [FieldError("dest", "must be a file path for a single URL", str(dest))]
            )
        try:
            return [await self._downloader.fetch(url, target, max_bytes=max_bytes)]
        except _Gone as exc:
            raise DownloadExpiredError(
                f"result URL answered HTTP {exc.status}; pass the Task to renew it",
                url=url,
                status=exc.status,
            ) from None

    # -- account -----------------------------------------------------------------------------

    async def balance(self, *, account: bool = False) -> Balance:
        """The balance of this key (``GET /v1/balance``), or of the whole account."""
        path = "/v1/user/balance" if account else "/v1/balance"
        return await self._transport.request(
            "GET", path, kind="balance", retry="read", parse=_parse(conv.parse_balance)
        )


class Videos:
    """``client.videos``: submit generations and wait for them."""

    def __init__(self, client: AsyncApimart) -> None:
        self._client = client

    async def submit(self, request: VideoRequest, *, idempotency_key: str | None = None) -> str:
        """Submit one generation; returns its task id.

        The POST carries an ``Idempotency-Key`` (``idempotency_key`` or a fresh one) that is
        the same on every retry, so a retried submit never creates a second task.

        Raises ``SubmitIndeterminateError`` (carrying ``idempotency_key``) when the outcome is
        unknown: the service answered ``idempotency_result_indeterminate``, or an attempt
        reached it without a reply and the retries did not settle it. Submit again with that
        key to get the original task, if one was created, instead of a second one.
        """
        if not isinstance(request, VideoRequest):
            raise ValidationError(
                [
                    FieldError(
                        "request", "must be a VideoRequest (see VideoRequest.from_dict)", request
                    )
                ]
            )
        key = (
            new_idempotency_key()
            if idempotency_key is None
            else _check_idempotency_key(idempotency_key)
        )
        track = SendTrack()
        path = "/v1/videos/generations"
        try:
            return await self._client._transport.request(
                "POST",
                path,
                kind="submit",
                retry="submit",
                parse=_parse(conv.parse_submit),
                json_body=request.to_body(),
                headers={"Idempotency-Key": key},
                track=track,
            )
        except ApimartError as exc:
            if isinstance(exc, APIStatusError) and (
                exc.sub_code == "idempotency_result_indeterminate"
            ):
                reason = "the service cannot say whether it created the task"
            elif track.unanswered and _retry.is_retryable(exc, submit=True):
                reason = f"an attempt reached the service without a reply; last error: {exc}"
            else:
                raise
            raise SubmitIndeterminateError(
                f"submit outcome unknown ({reason}); submit again with "
                f"idempotency_key={key!r} to get the original task if there is one",
                idempotency_key=key,
                path=path,
            ) from exc

    async def generate(
        self,
        request: VideoRequest,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Submit and wait (through the shared poller) until the task ends. Raises
        ``TaskFailedError`` if it failed and ``TaskTimeoutError`` after ``timeout`` seconds
        (the task itself keeps running at the service, and is billed)."""
        _check_seconds("timeout", timeout)
        submitted_at = self._client._poller.now()
        task_id = await self.submit(request, idempotency_key=idempotency_key)
        return await self._client.tasks._wait(task_id, timeout=timeout, submitted_at=submitted_at)


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


class BatchRoute:
    """Whether status reads go through ``POST /v1/tasks/batch``: logic only, no I/O; times
    are the poller's clock.

    The route is the cheaper path, never the only one: a refusal switches to per-task reads
    at once, ``max_failures`` transient failures in a row do too, and ``retry_after`` seconds
    later the route is tried again.
    """

    def __init__(
        self, *, retry_after: float = BATCH_ROUTE_RETRY, max_failures: int = BATCH_ROUTE_FAILURES
    ) -> None:
        self.retry_after = retry_after
        self.max_failures = max_failures
        #: None until the route answered, True once it did, False while it is off.
        self.available: bool | None = None
        self.failures = 0
        self.off_until: float | None = None
        #: How many times the route was switched off.
        self.switches = 0

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

    def _off(self, now: float) -> None:
        self.available = False
        self.failures = 0
        self.off_until = now + self.retry_after
        self.switches += 1


class Tasks:
    """``client.tasks``: status of submitted tasks."""

    def __init__(self, client: AsyncApimart) -> None:
        self._client = client

    async def get(self, task_id: str) -> Task:
        """``GET /v1/tasks/{task_id}``. Raises ``NotFoundError`` for an unknown or expired task."""
        task_id = _check_task_id(task_id)

        def parse(reply: Reply) -> Task:
            task = conv.parse_task(reply.body, status=reply.status)
            if task.id != task_id:
                raise ResponseValidationError(
                    f"asked for task {task_id}, got {task.id}", body=reply.body, status=reply.status
                )
            return task

        return await self._client._transport.request(
            "GET",
            f"/v1/tasks/{quote(task_id, safe='')}",
            kind="task",
            retry="read",
            parse=parse,
            params={"language": self._client.language},
        )

    async def get_many(self, task_ids: Iterable[str]) -> list[Task]:
        """The status of many tasks, in the order asked; tasks the service does not know are
        left out. Uses ``POST /v1/tasks/batch`` (100 ids a request) while that route works,
        per-task GETs for ids it leaves out and while it refuses or keeps failing. Raises the
        first error of a read that failed otherwise (after its retries)."""
        ids = list(dict.fromkeys(_check_task_id(t, "task_ids[]") for t in task_ids))
        results = await self._statuses(ids)
        found: list[Task] = []
        for task_id in ids:
            result = results.get(task_id)
            if isinstance(result, Task):
                found.append(result)
            elif result is not None and not is_unknown_task(result):
                raise result
        return found

    async def _statuses(self, ids: Sequence[str]) -> dict[str, Task | ApimartError]:
        """A result for every id: its task, or the error its read ended with (after retries).

        Batch requests first while the route is usable; an id a batch reply leaves out, or
        whose item cannot be read, is read by id (absence proves nothing). A refused or
        unreadable batch route switches to per-task reads (see ``BatchRoute``); a transient
        failure of a batch request is the result of each of its ids. Raises only
        ``ClientClosedError``."""
        route = self._client._route
        results: dict[str, Task | ApimartError] = {}
        by_id: list[str] = []
        for start in range(0, len(ids), BATCH_IDS):
            chunk = ids[start : start + BATCH_IDS]
            if not route.usable(self._client._poller.now()):
                by_id.extend(chunk)
                continue
            try:
                tasks, unreadable = await self._batch(chunk)
            except ClientClosedError:
                raise
            except ApimartError as exc:
                now = self._client._poller.now()
                if _refused(exc):
                    self._switch(route.on_refused(now), exc)
                    by_id.extend(chunk)
                elif route.on_failed(now):
                    self._switch(route.switches == 1, exc)
                    by_id.extend(chunk)
                else:
                    results.update((task_id, exc) for task_id in chunk)
                continue
            route.on_ok()
            wanted = set(chunk)
            results.update((t.id, t) for t in tasks if t.id in wanted)
            by_id.extend(t for t in chunk if t not in results or t in unreadable)
        if by_id:
            results.update(await self._each(by_id))
        return results

    async def _batch(
        self, chunk: Sequence[str]
    ) -> tuple[list[Task], dict[str, ResponseValidationError]]:
        """One batch status request: the tasks read, and the ids of items that could not be."""
        return await self._client._transport.request(
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
            self._client._route.retry_after,
        )

    async def _each(self, chunk: Sequence[str]) -> dict[str, Task | ApimartError]:
        """Per-task GETs, as many at a time as the poller's read window allows (a few workers
        over the chunk, not a task per id); each read's task or error."""
        results: dict[str, Task | ApimartError] = {}
        todo = iter(chunk)

        async def worker() -> None:
            for task_id in todo:
                try:
                    results[task_id] = await self.get(task_id)
                except ApimartError as exc:
                    results[task_id] = exc

        async with anyio.create_task_group() as tg:
            for _ in range(min(self._client._poller.reads.limit(), len(chunk))):
                tg.start_soon(worker)
        return results

    async def wait(self, task_id: str, *, timeout: float | None = None) -> Task:
        """Wait for a task submitted earlier (here, in another process, in an earlier run)
        through the shared poller. Returns it when completed; raises ``TaskFailedError`` if it
        failed, was cancelled or expired, ``TaskTimeoutError`` after ``timeout`` seconds,
        ``NotFoundError`` if the service says twice (``PollPolicy.not_found_grace`` apart) that
        it does not know it, ``NoVideoError`` if it completed with no video URL, and the error
        of a status read that waiting cannot heal (401, 403, ...) after
        ``PollPolicy.hard_error_tries`` reads."""
        _check_seconds("timeout", timeout)
        return await self._wait(_check_task_id(task_id), timeout=timeout, submitted_at=None)

    async def _wait(
        self, task_id: str, *, timeout: float | None, submitted_at: float | None
    ) -> Task:
        poller = self._client._poller
        done = anyio.Event()
        box: list[Task | ApimartError] = []

        def on_done(_: str, result: Task | ApimartError) -> None:
            box.append(result)
            done.set()

        poller.watch(
            task_id,
            on_done,
            timeout=timeout,
            submitted_at=submitted_at,
            reattach=submitted_at is None,
        )
        try:
            await done.wait()
        finally:
            if not box:
                poller.unwatch(task_id, on_done)
        result = box[0]
        if isinstance(result, ApimartError):
            raise result
        if not result.ok:
            raise TaskFailedError(result)
        return result

    def watch(self, task_ids: Iterable[str]) -> TaskWatch:
        """Follow many tasks through the shared poller; yields each as it ends::

        async with client.tasks.watch(ids) as stream:
            async for task in stream:      # completion order; failed ones too
                ...
        """
        ids = list(dict.fromkeys(_check_task_id(t, "task_ids[]") for t in task_ids))
        return TaskWatch(self._client._poller, ids)


class TaskWatch:
    """The async context manager of ``tasks.watch``: an async iterator of ended tasks.

    A task the service no longer knows raises ``NotFoundError`` from the iteration (the others
    are still followed if you iterate again); leaving the block stops following the rest.
    """

    def __init__(self, poller: Poller, ids: list[str]) -> None:
        self._poller = poller
        self._ids = ids
        self._remaining = set(ids)
        self._send, self._receive = anyio.create_memory_object_stream[Task | ApimartError](
            max_buffer_size=math.inf
        )

    async def __aenter__(self) -> TaskWatch:
        if not self._ids:
            self._send.close()
        for task_id in self._ids:
            self._poller.watch(task_id, self._on_done, reattach=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task_id in list(self._remaining):
            self._poller.unwatch(task_id, self._on_done)
        self._send.close()
        self._receive.close()

    def _on_done(self, task_id: str, result: Task | ApimartError) -> None:
        self._remaining.discard(task_id)
        self._send.send_nowait(result)
        if not self._remaining:
            self._send.close()

    @property
    def remaining(self) -> list[str]:
        """Ids not ended yet."""
        return [t for t in self._ids if t in self._remaining]

    def __aiter__(self) -> TaskWatch:
        return self

    async def __anext__(self) -> Task:
        try:
            item = await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        if isinstance(item, ApimartError):
            raise item
        return item


class Uploads:
    """``client.uploads``: images to use as reference media."""

    def __init__(self, client: AsyncApimart) -> None:
        self._client = client

    async def image(
        self, file: str | os.PathLike[str] | bytes, *, filename: str | None = None
    ) -> str:
        """Upload a JPEG, PNG, WebP or GIF image (at most 20 MB); returns its URL (72 h)."""
        return (await self.create(file, filename=filename)).url

    async def create(
        self, file: str | os.PathLike[str] | bytes, *, filename: str | None = None
    ) -> UploadedImage:
        """Upload an image and return the whole reply. Type and size are checked first."""
        if isinstance(file, (bytes, bytearray, memoryview)):
            data = bytes(file)
            name = filename or "image"
        elif isinstance(file, (str, os.PathLike)):
            path = Path(file)
            try:
                size = (await anyio.Path(path).stat()).st_size
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
                data = await anyio.Path(path).read_bytes()
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
        if "." not in name:
            name = f"{name}.{ext}"

        def form() -> aiohttp.FormData:
            fd = aiohttp.FormData()
            fd.add_field("file", data, filename=name, content_type=content_type)
            return fd

        return await self._client._transport.request(
            "POST",
            "/v1/uploads/images",
            kind="upload",
            retry="read",
            parse=_parse(conv.parse_upload),
            data_factory=form,
        )

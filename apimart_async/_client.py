"""``AsyncApimart``: the wiring and lifecycle of one client, and its front-ends.

The client builds the layers below it once (transport, ``Api``, ``Poller``, ``Downloader``)
and hands each engine only the parts it needs; ``videos``, ``tasks`` and ``uploads`` are thin
front-ends over them. See ARCHITECTURE.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import ssl as _ssl
import time
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, cast

import anyio

from ._api import Api, BatchRoute, check_task_id, new_idempotency_key
from ._checks import (
    check_int,
    check_path,
    check_positive_int,
    check_positive_number,
    check_seconds,
)
from ._client_journal import ClientJournal, UnfinishedTask, notify_submitted
from ._config import DEFAULT_TIMEOUT, LANGUAGES, Timeout, check_base_url, resolve_api_key
from ._download import Downloader
from ._errors import (
    ApimartError,
    ClientClosedError,
    ConfigurationError,
    FieldError,
    NoVideoError,
    TaskFailedError,
    TaskTimeoutError,
    ValidationError,
    WebhookError,
    rebuild_error,
)
from ._handle import Batch
from ._hints import (
    WebhookCounts,
    check_webhook_url,
    is_loopback_url,
    task_id_of,
    unreachable_reason,
    with_webhook,
)
from ._journal import Journal, SqliteJournal
from ._models import (
    Balance,
    DownloadedFile,
    Task,
    UploadedImage,
    Video,
    VideoRequest,
    hide_userinfo,
)
from ._options import BatchOptions
from ._outcomes import BatchEvent, JobInput
from ._pacing import Pacing, RateLimiter, Throttle
from ._pg_journal import PostgresJournal
from ._poll_schedule import PollPolicy
from ._poller import Poller
from ._priors import kind_of
from ._slices import let_the_loop_run
from ._status_window import DEFAULT_MAX_STATUS_CONCURRENCY, StatusWindow
from ._threads import run_sync
from ._transport import Transport, check_proxy_url

__all__ = ["AsyncApimart", "TaskWatch", "Tasks", "Uploads", "Videos"]

logger = logging.getLogger("apimart_async")

#: A language code for ``?language=`` (``en``, ``zh-TW``, ``pt_BR``): passed through as given.
_LANGUAGE: Final = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")
#: Seconds of failed status reads after which waits end with APIConnectionError (issue 21).
DEFAULT_WAIT_UNREACHABLE: Final = 300.0
#: Tasks ``videos.submit`` sent with a webhook that a client remembers (issue 15).
_COVERED: Final = 100_000


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
        wait_unreachable: seconds without a single status read getting through (connection
            errors, timeouts, 5xx; counted from the first failed read with no success since,
            or from a read still unanswered)
            after which every wait (``generate``, ``tasks.wait``, ``tasks.watch``, batch jobs)
            ends with ``APIConnectionError``, logged at WARNING; the tasks may still be
            running at the service. Default 300; None waits for ever.
        journal: an SQLite file (or an ``SqliteJournal``) recording every submit made through
            this client: ``videos.submit``, ``videos.generate`` and the submits of its batches
            (whether or not a batch has a journal of its own). The idempotency key is
            committed before each POST and the task id right after its reply; the end of a
            task is recorded when a wait or a status read (``tasks.get``, ``get_many``)
            through this client sees it. After a restart, ``tasks.unfinished()`` lists the
            tasks whose end nobody saw, ``tasks.wait(id)``
            answers from the journal when the end is known, and ``tasks.recover(item)``
            settles a submit whose reply was lost. Opened with the client (one client per
            file at a time: another gets ``JournalLockedError``); the file may be a batch's
            journal too, but not one a running batch holds. The API key is never written.
            A ``postgresql://`` URL (or a ``PostgresJournal``: its ``schema``, and its
            ``name`` naming the client) keeps the same records in PostgreSQL, shared by the
            replicas of a web app (no lock): any replica lists and waits for the tasks any
            of them submitted, and a webhook callback that lands on a replica where no wait
            follows its task is passed on to the others (a PostgreSQL notification), so the
            wait ends wherever it is.
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
        wait_unreachable: float | None = DEFAULT_WAIT_UNREACHABLE,
        journal: str | os.PathLike[str] | SqliteJournal | PostgresJournal | None = None,
    ) -> None:
        key = resolve_api_key(api_key)
        self._journal = ClientJournal.of(journal)
        if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
            raise ConfigurationError(
                f"ssl must be an ssl.SSLContext or None, got {type(ssl).__name__}"
            )
        if proxy is not None:
            proxy = check_proxy_url(proxy)
        if not isinstance(trust_env, bool):
            raise ConfigurationError(f"trust_env must be True or False, got {trust_env!r}")
        url = check_base_url(base_url)
        check_int("max_retries", max_retries, minimum=0)
        if not isinstance(language, str) or _LANGUAGE.fullmatch(language) is None:
            raise ConfigurationError(
                f"language must be a language code such as 'en' or 'zh-TW' (the service "
                f"documents {', '.join(LANGUAGES)}; others are passed through), got {language!r}"
            )
        check_positive_int("status_concurrency", status_concurrency)
        # issue 22: the adaptive per-task read window's bound
        if max_status_concurrency is None:
            max_status_concurrency = max(DEFAULT_MAX_STATUS_CONCURRENCY, status_concurrency)
        least = f"status_concurrency ({status_concurrency})"
        check_int(
            "max_status_concurrency",
            max_status_concurrency,
            minimum=status_concurrency,
            least=least,
        )
        check_positive_number(
            "wait_unreachable", wait_unreachable, unit="of seconds", allow_none=True, finite=True
        )
        if poll is not None and not isinstance(poll, PollPolicy):
            raise ConfigurationError(f"poll must be a PollPolicy, got {type(poll).__name__}")
        check_positive_number(
            "requests_per_second", requests_per_second, allow_none=True, finite=True
        )
        limiter = RateLimiter(requests_per_second) if requests_per_second is not None else None
        check_positive_int("download_concurrency", download_concurrency)
        self._transport = Transport(
            api_key=key,
            base_url=url,
            timeout=Timeout.of(timeout),
            max_retries=max_retries,
            pacing=Pacing(Throttle(), limiter),
            ssl_context=ssl,
            proxy=proxy,
            trust_env=trust_env,
        )
        policy = poll or PollPolicy()
        # issue 22: the adaptive window of per-task status reads, shared by the poller (reads
        # that leave one by one) and the api (per-task reads of a fetch)
        reads = StatusWindow(start=status_concurrency, maximum=max_status_concurrency)
        self._api = Api(
            self._transport,
            language=language,
            status_concurrency=status_concurrency,
            route=BatchRoute(retry_after=policy.batch_route_retry),
            reads=reads,
        )
        transport = self._transport
        self._poller = Poller(
            self._api.get_tasks,
            policy,
            batched=self._api.batch_route_usable,
            read=self._api.get_task,
            pacing=transport.pacing,
            retries=lambda: transport.counters["retries"],
            reads=reads,
            unreachable=None if wait_unreachable is None else float(wait_unreachable),
        )
        # The batch route's times are the poller's clock (an emulator's compressed one too).
        self._api.clock = self._poller.now
        self._downloader = Downloader(
            stream=self._transport.stream,
            refresh=self._api.get_task,
            max_retries=max_retries,
            concurrency=download_concurrency,
        )
        if self._journal is not None:  # issue 21: every submit and every end seen, recorded
            self._api.submit_log = self._journal
            self._poller.on_end = self._journal.saw_end
        self._runner: asyncio.Task[None] | None = None
        self._stop_runner = anyio.Event()
        self.tasks: Tasks = Tasks(self._api, self._poller, self._journal)
        """Read, wait for and watch tasks."""
        if self._journal is not None:  # issue 15: callbacks other replicas received
            self._journal.on_relay = self.tasks._relayed
        self.videos: Videos = Videos(self._api, self.tasks)
        """Submit and generate videos."""
        self.uploads: Uploads = Uploads(self._api)
        """Upload reference images."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> Self:
        """Open the journal (if any) and the HTTP session, and start the shared poller
        (prefer ``async with``)."""
        if self._journal is not None:
            await self._journal.open()
        try:
            await self._transport.open()
        except BaseException:
            if self._journal is not None:
                await self._journal.close()
            raise
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
            if self._journal is not None:
                tg.start_soon(self._journal.run, name="apimart-async journal writer")
            await self._stop_runner.wait()
            tg.cancel_scope.cancel()

    async def aclose(self) -> None:
        """Close the client: running waits and batches end with ``ClientClosedError``."""
        self._poller.close("the client was closed")
        runner, self._runner = self._runner, None
        if runner is not None and self._transport.in_another_loop():
            # opened in another event loop (an earlier asyncio.run()): its background task
            # belongs there and cannot be awaited here; it ends with its loop
            if not runner.get_loop().is_closed():
                runner.get_loop().call_soon_threadsafe(runner.cancel)
            runner = None
        try:
            if runner is not None:
                self._stop_runner.set()
                await runner
        finally:
            # closed even when this close is cancelled (no "Unclosed client session")
            with anyio.CancelScope(shield=True):
                try:
                    if self._journal is not None:
                        await self._journal.close()  # the ends seen are written first
                finally:
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
    def language(self) -> str:
        """The language of the service's error messages."""
        return self._api.language

    @property
    def status_concurrency(self) -> int:
        """Parallel status GETs when the batch status route is missing."""
        return self._api.status_concurrency

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
    def wait_unreachable(self) -> float | None:
        """Seconds of failed status reads after which waits end (None: never)."""
        return self._poller.unreachable

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
        task because it refused or kept failing while the service answered per-task reads
        (it is tried again after a while; an outage does not switch it off), None before it
        has answered."""
        return self._api.route.available

    def request_counts(self) -> dict[str, int]:
        """HTTP attempts made so far, by kind (submit, task, batch, balance, upload, retries)."""
        return self._api.request_counts()

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
        name: str | None = None,
        download_dir: str | os.PathLike[str] | None = None,
        manifest: str | os.PathLike[str] | None = None,
        max_bytes: int | None = None,
        max_cost: float | None = None,
        cost_estimate: Callable[[VideoRequest], float | None] | None = None,
        check_balance: bool = False,
        replay_finished: bool = True,
        retry_failed: bool = False,
        sigint_grace: float | None = None,
        media_root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        allow_any_path: bool = False,
        min_download_rate: float | None = 10 * 1024,
        download_rate_window: float = 30.0,
        webhook_url: str | None = None,
        lease: float = 30.0,
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
                Whether or not a batch has one, a client opened with ``journal=`` records
                every submit of the batch in its own journal too, and the ends the batch sees:
                ``client.tasks.unfinished()`` lists the batch's billed tasks whose end nobody
                saw (a batch left early, a crash). The two must be different files.
                A ``postgresql://`` URL (or ``postgres://``) keeps the journal in PostgreSQL
                (``pip install 'apimart-async[postgres]'``), as the batch ``name``, in the
                schema ``apimart``; pass a ``PostgresJournal`` for another schema or option.
            name: the batch's name in a ``postgresql://`` journal (required there: one
                database holds many batches); refused with any other journal.
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
                runs again (``Outcome.replayed``); False skips them. Like new jobs (submitted
                while fewer than 10,000 outcomes are unread), replays wait for the reader:
                while 1,000 are unread, the batch reads no further input.
            retry_failed: with a journal, submit again (as new, billed tasks) the jobs whose
                generation failed in an earlier run. Off by default: it costs money.
            sigint_grace: handle Ctrl-C while the batch runs (main thread only): the first
                stops submitting and follows running tasks for this many seconds, the second
                ends the iteration at once; ``results.interrupted`` tells. The journal keeps
                everything needed to resume. Honoured only where the application left SIGINT
                to Python (the main thread, with Python's or ``asyncio.run``'s handler in
                force); elsewhere (a server with its own handler, a worker thread) a no-op
                with one ``ApimartWarning``: call ``await results.stop(grace=...)`` there.
                The handler found before is put back when the batch ends.
            media_root: local reference files (paths in ``image_urls`` / ``video_urls``) must
                lie under this folder (or one of these folders), and relative paths start
                there (at the first; default: the current folder). Each distinct file is
                uploaded once (by sha256); with a journal, its URL is reused by later runs
                until it expires.
            allow_any_path: send local files from anywhere (symlinks are followed before the
                ``media_root`` check; only lift it for requests you wrote yourself).
            min_download_rate: bytes per second a result download must keep up, measured
                over every ``download_rate_window`` seconds; a slower one is cut and resumed
                where it stopped (retried like a dropped connection). None: no floor.
            download_rate_window: the seconds over which ``min_download_rate`` is measured.
            webhook_url: the service calls ``<webhook_url>/callback`` when each task ends
                (the ``webhook`` of every request without its own); hand those callbacks to
                ``client.tasks.notify`` (or ``apimart_async.webhooks.aiohttp_handler``) and
                the batch's tasks are polled only as a fallback: a safety check past each
                predicted end, then every ``PollPolicy.webhook_interval``. Not part of what a
                job is: a journaled batch resumed with another ``webhook_url`` resumes the
                same jobs (a resend with a recorded key carries the webhook it was recorded
                with; re-attached tasks are polled as usual).
            lease: with a ``PostgresJournal`` given the job list (``fingerprints=``, as the
                CLI does), every process running the batch is one of its workers: each claims
                jobs and holds them this many seconds, renewed by a heartbeat; another worker
                takes over the jobs of one that stopped renewing (README: "More than one
                machine"). ``max_pending`` and ``max_cost`` then hold for all workers together.

        ``timeout`` and ``job_timeout`` also end a download in progress: the job ends with a
        ``DownloadError``, what arrived is kept (``.part``) and a resume fetches the rest.

        Items of ``requests`` may also be ``(name, VideoRequest)`` pairs: the name (sanitised)
        names the downloaded files and appears in the manifest.
        """
        options = BatchOptions.of(locals())
        self.tasks._note_webhook(options.webhook_url)
        return Batch(
            requests,
            options,
            api=self._api,
            poller=self._poller,
            downloader=self._downloader,
            pacing=self._transport.pacing,
        )

    async def download(
        self,
        item: Task | Video | str,
        dest: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
    ) -> list[DownloadedFile]:
        """Download a completed task's videos (or one ``Video`` / URL) to ``dest``.

        ``dest`` is a directory (files named ``<task id>.mp4``, then ``<task id>~2.mp4`` and
        on for later videos) or a file path. Streams to ``.part``, resumes with Range, checks
        the length, computes the sha256, renames when complete. An expired task URL is renewed
        once by a status request.
        """
        check_path("dest", dest)
        target = Path(dest)
        if isinstance(item, Task):
            if not item.ok:
                raise ValidationError(
                    [FieldError("task", "must be completed to download", item.status.value)]
                )
            is_dir = await run_sync(target.is_dir)
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
        if await run_sync(target.is_dir):
            raise ValidationError(
                [FieldError("dest", "must be a file path for a single URL", str(dest))]
            )
        return [await self._downloader.fetch_url(url, target, max_bytes=max_bytes)]

    # -- account -----------------------------------------------------------------------------

    async def balance(self, *, account: bool = False) -> Balance:
        """The balance of this key (``GET /v1/balance``), or of the whole account."""
        return await self._api.balance(account=account)


class Videos:
    """``client.videos``: submit generations and wait for them."""

    def __init__(self, api: Api, tasks: Tasks) -> None:
        self._api = api
        self._tasks = tasks

    async def submit(
        self,
        request: VideoRequest,
        *,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
    ) -> str:
        """Submit one generation; returns its task id.

        ``webhook_url``: the service calls ``<webhook_url>/callback`` when the task ends (sets
        the request's ``webhook`` unless it has its own); route that to ``tasks.notify`` (or
        ``apimart_async.webhooks.aiohttp_handler``) and a later ``tasks.wait(id)`` of this
        client polls the task only as a fallback (see README, "Webhooks").

        The POST carries an ``Idempotency-Key`` (``idempotency_key`` or a fresh one) that is
        the same on every retry, so a retried submit never creates a second task.

        Raises ``SubmitIndeterminateError`` (carrying ``idempotency_key``) when the outcome is
        unknown: the service answered ``idempotency_result_indeterminate``, or an attempt
        reached it without a reply and the retries did not settle it. Submit again with that
        key to get the original task, if one was created, instead of a second one. Cancelled
        during the POST (a Ctrl-C, a caller gone), the key is logged at WARNING on the
        ``apimart_async`` logger, as for ``generate``.

        With ``AsyncApimart(journal=...)`` the key is committed before the POST (a journal
        that cannot be written raises ``JournalError`` and nothing is sent) and the task id
        right after the reply, so a caller cancelled in between finds it in
        ``client.tasks.unfinished()``. There is no ``on_submitted`` here: the returned id is
        the earliest the caller can have it.
        """
        webhook_url = check_webhook_url(webhook_url)
        self._tasks._note_webhook(webhook_url)
        sent = with_webhook(request, webhook_url) if isinstance(request, VideoRequest) else request
        submitted_at = self._tasks._poller.now()
        key = new_idempotency_key() if idempotency_key is None else idempotency_key
        try:
            task_id = await self._api.submit(sent, idempotency_key=key)
        except anyio.get_cancelled_exc_class():
            self._in_doubt("submit() was cancelled during its submit", key)
            raise
        if webhook_url is not None and sent.webhook == webhook_url:
            self._tasks._covered(task_id, submitted_at)
        return task_id

    def _hint(self, journaled: str, plain: str) -> str:
        """Where a caller finds a task a cancelled ``generate()`` left (with a journal, or not)."""
        return journaled if self._tasks._journal is not None else plain

    def _in_doubt(self, what: str, key: str) -> None:
        """Say, at WARNING, that a submit ended without its reply: the task may exist."""
        logger.warning(
            "%s (idempotency key %s): the service may have created a task; %s",
            what,
            key,
            self._hint(
                "client.tasks.unfinished() lists the key and tasks.recover() finds the task",
                "submit the same request with this idempotency_key to get it",
            ),
        )

    async def generate(
        self,
        request: VideoRequest,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        on_submitted: Callable[[str], object] | None = None,
        webhook_url: str | None = None,
    ) -> Task:
        """Submit and wait (through the shared poller) until the task ends. Raises
        ``TaskFailedError`` if it failed and ``TaskTimeoutError`` after ``timeout`` seconds
        (the task itself keeps running at the service, and is billed). The ``timeout`` is the
        whole call's, the submit included: run out before the submit's reply came, the error
        has no ``task_id`` and carries the POST's ``idempotency_key`` (the service may have
        created the task; as for a cancel during the submit, below, the key is logged at
        WARNING and with a journal ``tasks.unfinished()`` lists it).

        The wait learns from and uses what the client's earlier tasks of the same kind (model,
        duration, resolution, references or not) showed about how long they take, as a
        batch's jobs do: once enough of a kind completed, its tasks are first checked at the
        kind's earliest end, not 2 s after the submit.

        ``on_submitted``: called with the task id as soon as the submit's reply is read, before
        the wait starts (a function or a coroutine function), so a web handler can store the
        id before it awaits. If it raises, the task id is logged at WARNING (the task runs on,
        and is billed; with a journal ``tasks.unfinished()`` lists it) and its exception
        propagates: there is no wait.

        Cancelled after the submit (a web handler whose client went away), the task id is
        logged at WARNING on the ``apimart_async`` logger; with a journal the task stays in
        ``tasks.unfinished()`` until a wait sees its end. Cancelled during the submit, its
        idempotency key is logged at WARNING (the POST may have created a task: the same
        request sent with that key gets it; with a journal ``tasks.recover`` does).

        ``webhook_url``: as for ``submit``; the wait then polls the task only as a fallback (a
        safety check past its predicted end, then ``PollPolicy.webhook_interval``), and a
        callback handed to ``tasks.notify`` ends it at the next status read."""
        check_seconds("timeout", timeout)
        webhook_url = check_webhook_url(webhook_url)
        self._tasks._note_webhook(webhook_url)
        if isinstance(request, VideoRequest):
            request = with_webhook(request, webhook_url)
        if on_submitted is not None and not callable(on_submitted):
            raise ValidationError(
                [FieldError("on_submitted", "must be a function of the task id", on_submitted)]
            )
        poller = self._tasks._poller
        submitted_at = poller.now()
        key = new_idempotency_key() if idempotency_key is None else idempotency_key
        task_id: str | None = None
        try:
            # fix21: ``timeout`` covers the submit too (a service holding the POST held the
            # call for the attempts' timeouts times the retries). The poller's seconds, as
            # the wait's deadline (an emulator's compressed clock divides the real wait).
            limit = None if timeout is None else timeout / poller.time_scale
            with anyio.move_on_after(limit):
                task_id = await self._api.submit(request, idempotency_key=key)
        except anyio.get_cancelled_exc_class():
            self._in_doubt("generate() was cancelled during its submit", key)
            raise
        if task_id is None:  # the time ran out during the submit: in doubt, as a cancel is
            assert timeout is not None
            self._in_doubt(f"generate() reached its timeout ({timeout:g} s) during its submit", key)
            raise TaskTimeoutError(None, timeout, idempotency_key=key)
        try:
            if on_submitted is not None:
                await notify_submitted(on_submitted, task_id)
            return await self._tasks._wait(
                task_id,
                timeout=timeout,
                submitted_at=submitted_at,
                kind=kind_of(request),
                webhook=webhook_url is not None and request.webhook == webhook_url,
                started=submitted_at,
            )
        except anyio.get_cancelled_exc_class():
            where = self._hint(
                "client.tasks.unfinished() lists it", "client.tasks.wait(id) follows it"
            )
            logger.warning(
                "generate() was cancelled after submitting task %s: it runs on at the service"
                " and is billed; %s",
                task_id,
                where,
            )
            raise


class Tasks:
    """``client.tasks``: status of submitted tasks."""

    def __init__(self, api: Api, poller: Poller, journal: ClientJournal | None = None) -> None:
        self._api = api
        self._poller = poller
        self._journal = journal
        #: issue 15: tasks ``videos.submit`` sent with a ``webhook_url``, and when (the poller's
        #: clock): a later ``wait`` polls them only as a fallback (the newest ``_COVERED``)
        self._webhooked: dict[str, float] = {}
        self._callbacks = WebhookCounts()
        self._warned: set[str] = set()  # webhook URLs said to be out of the service's reach

    def _note_webhook(self, url: str | None) -> None:
        """A ``webhook_url`` the real service would never call (a private host, another
        port): said once per URL, at WARNING (brk15 F20). Not for a client of a service on
        this machine (the emulator calls back loopback)."""
        if url is None or url in self._warned or is_loopback_url(self._api.transport.base_url):
            return
        reason = unreachable_reason(url)
        if reason is None:
            return
        if len(self._warned) < 100:
            self._warned.add(url)
        logger.warning(
            "webhook_url %s: %s; the service calls back public hosts on ports 80 and 443"
            " only, so its callbacks will never come: its tasks are polled as a fallback"
            " (a safety check past the predicted end, then every webhook_interval), slower"
            " than without a webhook",
            hide_userinfo(url),
            reason,
        )

    def _covered(self, task_id: str, submitted_at: float) -> None:
        self._webhooked[task_id] = submitted_at
        if len(self._webhooked) > _COVERED:
            del self._webhooked[next(iter(self._webhooked))]

    async def notify(self, body: bytes | str | dict[str, Any]) -> bool:
        """A webhook callback of the service, for any web framework (Starlette, FastAPI...;
        ``apimart_async.webhooks.aiohttp_handler`` does this for aiohttp)::

            @app.post("/apimart/callback")
            async def callback(request: Request) -> Response:
                await client.tasks.notify(await request.body())
                return Response(status_code=200)

        ``body``: the POST's raw bytes or text, or the JSON object already decoded; the task
        object, or wrapped as ``{"code": 200, "data": {...}}``. Only its task id is read: a
        callback is unsigned, so it is a hint, never a result. A task this client follows
        (a wait, a batch job) is read in the shared poller's next status round, with the
        other callbacks that came meanwhile, and its waits end from that read (once, however
        often the callback comes). Returns True then; False for a task nobody here follows
        (acknowledge it all the same). Raises ``WebhookError`` for a body that names no task
        (answer 400). Counted in ``webhook_counts()``."""
        self._callbacks.received += 1
        try:
            task_id = task_id_of(body)
        except WebhookError:
            self._callbacks.malformed += 1
            raise
        if self._poller.check_now(task_id):  # ClientClosedError once closed (answer 503)
            self._callbacks.checked += 1
            return True
        self._callbacks.ignored += 1
        # a replica sharing the (PostgreSQL) journal may be the one waiting for it
        journal = self._journal
        if journal is not None and journal.shared and await journal.publish(task_id):
            self._callbacks.forwarded += 1
        return False

    def _relayed(self, task_id: str) -> None:
        """Another replica received the callback of ``task_id``: read it in the next round
        if a wait here follows it."""
        try:
            if self._poller.check_now(task_id):
                self._callbacks.relayed += 1
        except ClientClosedError:
            pass  # closing: nobody here waits any more

    def webhook_counts(self) -> dict[str, int]:
        """Callbacks handed to ``notify`` so far: ``received``, ``checked`` (a followed task,
        read in the next round), ``ignored`` (nobody here follows it: unknown, or ended
        already) and ``malformed`` (refused with ``WebhookError``)."""
        return self._callbacks.as_dict()

    async def get(self, task_id: str) -> Task:
        """``GET /v1/tasks/{task_id}``. Raises ``NotFoundError`` for an unknown or expired task.
        With a client journal, an end read here is recorded as a wait's is: the task leaves
        ``unfinished()`` (its caller saw the end)."""
        return self._saw(await self._api.get_task(task_id))

    async def get_many(self, task_ids: Iterable[str]) -> list[Task]:
        """The status of many tasks, in the order asked; tasks the service does not know are
        left out. Uses ``POST /v1/tasks/batch`` (100 ids a request) while that route works,
        per-task GETs for ids it leaves out and while it refuses or keeps failing. Raises the
        first error of a read that failed otherwise (after its retries). With a client
        journal, the ends read are recorded, as ``get`` does."""
        tasks = await self._api.get_many(task_ids)
        for task in tasks:
            self._saw(task)
        return tasks

    def _saw(self, task: Task) -> Task:
        """``task`` as read; its end, if it has ended, noted in the client journal."""
        if self._journal is not None and task.status.is_terminal:
            self._journal.saw_end(task.id, task)
        return task

    async def wait(self, task_id: str, *, timeout: float | None = None) -> Task:
        """Wait for a task submitted earlier (here, in another process, in an earlier run)
        through the shared poller. Returns it when completed; raises ``TaskFailedError`` if it
        failed, was cancelled or expired, ``TaskTimeoutError`` after ``timeout`` seconds,
        ``NotFoundError`` if the service says twice (``PollPolicy.not_found_grace`` apart) that
        it does not know it, ``NoVideoError`` if it completed with no video URL, and the error
        of a status read that waiting cannot heal (401, 403, ...) after
        ``PollPolicy.hard_error_tries`` reads.

        A bare task id says nothing of the task's kind, so this wait neither uses nor teaches
        what earlier tasks of a kind showed about their durations (``videos.generate`` and
        batches do): the task is checked at once, then as its ``estimated_time`` says.

        With ``AsyncApimart(journal=...)``, a task whose end a wait of this client saw (in
        this run or an earlier one) is answered from the journal, with no request; any other
        is followed as above, and its end recorded when it comes."""
        check_seconds("timeout", timeout)
        task_id = check_task_id(task_id)
        if self._journal is not None:
            self._api.ensure_open()
            known = await self._journal.end_of(task_id)
            if known is not None:
                return _settled(known)
        submitted_at = self._webhooked.get(task_id)
        return await self._wait(
            task_id, timeout=timeout, submitted_at=submitted_at, webhook=submitted_at is not None
        )

    async def unfinished(self) -> list[UnfinishedTask]:
        """The submits made through this client (any run of it with the same journal) whose
        task's end no wait or status read saw, oldest first: running tasks, tasks that ended
        while nobody waited, and submits whose reply was never read (``task_id`` None: settle
        them with ``recover``). Needs ``AsyncApimart(journal=...)``; ``ConfigurationError``
        without."""
        journal = self._need_journal("tasks.unfinished()")
        return await journal.unfinished()

    async def recover(self, item: UnfinishedTask) -> str:
        """The task id of an unfinished submit. For one with no task id (its reply was lost,
        or its POST never arrived) the same request is sent again with the SAME idempotency
        key: the service answers with the task the first POST created, or creates it now if
        none arrived (one task either way; the service keeps keys for a limited time, so
        recover soon). The id is recorded; ``tasks.wait(id)`` then follows it. Raises the
        submit's error if it fails; the item stays in ``unfinished()`` whatever the error
        (the service out of reach, a key it refuses now: nothing of the first POST is
        proved), so a later ``recover`` can try again."""
        journal = self._need_journal("tasks.recover()")
        if not isinstance(item, UnfinishedTask):
            raise ValidationError(
                [FieldError("item", "must be an UnfinishedTask from tasks.unfinished()", item)]
            )
        if item.task_id is not None:
            return item.task_id
        self._api.ensure_open()
        request = await journal.request_of(item.idempotency_key)
        if request is None:
            raise ValidationError(
                [FieldError("item", "is not in this client's journal", item.idempotency_key)]
            )
        return await self._api.submit(request, idempotency_key=item.idempotency_key)

    def _need_journal(self, what: str) -> ClientJournal:
        if self._journal is None:
            raise ConfigurationError(
                f"{what} needs a client journal: AsyncApimart(..., journal='tasks.sqlite')"
            )
        self._api.ensure_open()
        return self._journal

    async def _wait(
        self,
        task_id: str,
        *,
        timeout: float | None,
        submitted_at: float | None,
        kind: str | None = None,
        webhook: bool = False,
        started: float | None = None,
    ) -> Task:
        """Follow ``task_id`` until it ends. ``started``: when (the poller's clock) the
        ``timeout`` began (``generate``: before its submit), so the wait gets what is left of
        it; a ``TaskTimeoutError`` still names the whole ``timeout``."""
        poller = self._poller
        left = timeout
        if timeout is not None and started is not None:
            left = max(0.0, timeout - (poller.now() - started))
        done = anyio.Event()
        box: list[Task | ApimartError] = []

        def on_done(_: str, result: Task | ApimartError) -> None:
            box.append(result)
            done.set()

        poller.watch(
            task_id,
            on_done,
            timeout=left,
            submitted_at=submitted_at,
            reattach=submitted_at is None,
            kind=kind,  # issue 22: learned priors by kind (None: a bare id, no kind)
            webhook=webhook,  # issue 15: a callback will come; polled as a fallback
        )
        try:
            await done.wait()
        finally:
            if not box:
                poller.unwatch(task_id, on_done)
        result = box[0]
        if isinstance(result, TaskTimeoutError) and timeout is not None and left != timeout:
            raise TaskTimeoutError(task_id, timeout, result.task)
        if isinstance(result, ApimartError):
            raise _own(result)
        return _settled(result)

    def watch(self, task_ids: Iterable[str]) -> TaskWatch:
        """Follow many tasks through the shared poller; yields each as it ends::

        async with client.tasks.watch(ids) as stream:
            async for task in stream:      # completion order; failed ones too
                ...
        """
        if isinstance(task_ids, (str, bytes)) or not isinstance(task_ids, Iterable):
            rule = "must be a list of task ids"
            raise ValidationError([FieldError("task_ids", rule, type(task_ids).__name__)])
        return TaskWatch(self._poller, list(task_ids))  # checked as they are registered


def _own(exc: ApimartError) -> ApimartError:
    """A copy of ``exc`` for one waiter. The waits of one task share the poller's one error
    (the client closed, the API out of reach, the task gone): raised as one object in every
    waiting task, each raise chained its frames onto the same traceback and shared its notes.
    Built without ``__init__`` (whose arguments differ by class): the same type, message and
    attributes."""
    copy = rebuild_error(type(exc), exc.args)  # as unpickling builds one
    copy.__dict__.update(exc.__dict__)
    notes: object = exc.__dict__.get("__notes__")
    if isinstance(notes, list):
        copy.__notes__ = [str(note) for note in cast("list[object]", notes)]
    copy.__cause__ = exc.__cause__
    copy.__suppress_context__ = exc.__suppress_context__
    return copy


def _settled(task: Task) -> Task:
    """A terminal task as a wait returns it: completed, else ``TaskFailedError``."""
    if not task.ok:
        raise TaskFailedError(task)
    if not task.video_urls:
        raise NoVideoError(task)
    return task


async def _let_the_loop_run(since: float) -> float:
    """Once ``LOOP_SLICE`` seconds of work have passed since ``since``, let the event loop run;
    when the next slice starts."""
    return await let_the_loop_run(since, time.perf_counter)  # this module's clock (tests)


class TaskWatch:
    """The async context manager of ``tasks.watch``: an async iterator of ended tasks.

    A task the service no longer knows raises ``NotFoundError`` from the iteration (the others
    are still followed if you iterate again); leaving the block stops following the rest.
    """

    def __init__(self, poller: Poller, ids: list[str]) -> None:
        self._poller = poller
        self._given = ids
        self._ids: list[str] = []
        self._remaining: set[str] = set()
        self._send, self._receive = anyio.create_memory_object_stream[Task | ApimartError](
            max_buffer_size=math.inf
        )
        self._entered = False

    async def __aenter__(self) -> TaskWatch:
        # 20,000 ids (a replica taking up its tasks after a restart) are checked and handed
        # to the poller in slices of LOOP_SLICE seconds, not in one stretch of the loop
        self._entered = True
        since = time.perf_counter()
        ids: dict[str, None] = {}
        try:
            for given in self._given:
                ids[check_task_id(given, "task_ids[]")] = None
                since = await _let_the_loop_run(since)
            self._ids, self._remaining = list(ids), set(ids)
            if not self._ids:
                self._send.close()
            for task_id in self._ids:
                self._poller.watch(task_id, self._on_done, reattach=True)
                since = await _let_the_loop_run(since)
        except BaseException:  # a bad id, or cancelled: nothing is left watched
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task_id in list(self._remaining):
            self._poller.unwatch(task_id, self._on_done)
        self._send.close()
        self._receive.close()

    def _on_done(self, task_id: str, result: Task | ApimartError) -> None:
        self._remaining.discard(task_id)
        # an error of its own: the poller ends every watch and wait of the task with one
        self._send.send_nowait(_own(result) if isinstance(result, ApimartError) else result)
        if not self._remaining:
            self._send.close()

    @property
    def remaining(self) -> list[str]:
        """Ids not ended yet."""
        return [t for t in self._ids if t in self._remaining]

    def __aiter__(self) -> TaskWatch:
        return self

    async def __anext__(self) -> Task:
        if not self._entered:  # nothing is followed before async with: it would wait for ever
            self._send.close()
            self._receive.close()
            raise RuntimeError(
                "a watch follows its tasks inside 'async with client.tasks.watch(...) as"
                " stream:'; iterate 'async for task in stream' there"
            )
        try:
            item = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):  # ended, or its block left
            raise StopAsyncIteration from None
        if isinstance(item, ApimartError):
            raise item
        return item


class Uploads:
    """``client.uploads``: images to use as reference media."""

    def __init__(self, api: Api) -> None:
        self._api = api

    async def image(
        self, file: str | os.PathLike[str] | bytes, *, filename: str | None = None
    ) -> str:
        """Upload a JPEG, PNG, WebP or GIF image (at most 20 MB); returns its URL (72 h)."""
        return (await self.create(file, filename=filename)).url

    async def create(
        self, file: str | os.PathLike[str] | bytes, *, filename: str | None = None
    ) -> UploadedImage:
        """Upload an image and return the whole reply. Type and size are checked first."""
        return await self._api.upload_image(file, filename=filename)

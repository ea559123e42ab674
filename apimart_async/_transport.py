"""The only module that sends with aiohttp: session, auth header, timeouts, retries, error
mapping. (``_watchdog`` makes its connector, and times its API requests.)

The API key is added per request to API calls only (never to downloads of result files),
redirects are never followed with it, and no log record, repr or exception built here holds it.

Replies are read whole however they travel (many segments, chunked, gzip or deflate, which
aiohttp decodes); aiohttp checks that the wire carried every byte a ``Content-Length`` or the
chunked framing promised, and a reply cut short becomes a retryable ``APIConnectionError``.

Proxies: ``proxy=`` names one; otherwise, unless ``trust_env=False``, ``HTTPS_PROXY`` /
``HTTP_PROXY`` / ``NO_PROXY`` (read when the session opens) decide, as in requests and httpx.
They are resolved here rather than by aiohttp's ``trust_env``, which would also read
``~/.netrc`` credentials into requests that already carry the API key (aiohttp then refuses
them) and costs a thread hop per request. TLS: ``ssl=`` takes an ``ssl.SSLContext``;
without one, ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` are honoured when set.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import contextvars
import ipaddress
import json
import logging
import os
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Mapping,
)
from typing import Any, Final, Literal, NamedTuple, TypeVar, cast
from urllib.parse import urlsplit

import aiohttp
import anyio
import attrs
import backoff
from aiohttp import compression_utils

from . import _retry
from ._config import Secret, Timeout
from ._errors import (
    APIConnectionError,
    ApimartError,
    APIStatusError,
    APITimeoutError,
    ClientClosedError,
    ConfigurationError,
    ConflictError,
    ResponseValidationError,
    find_sub_code,
    status_error_class,
)
from ._json import is_object
from ._pacing import Pacing, Throttle
from ._version import __version__
from ._watchdog import Watchdog, WatchedConnector

__all__ = [
    "DECODABLE",
    "Reply",
    "RetryMode",
    "SendTrack",
    "StreamReply",
    "Transport",
    "check_proxy_url",
    "counting_into",
    "new_idempotency_key",
    "request_tally",
]

logger = logging.getLogger("apimart_async")

#: Who else counts the requests made in this context, by kind (a batch counts its own: its
#: tasks set this to its counter; the poller sets the counters of the batches a read serves).
request_tally: contextvars.ContextVar[tuple[collections.Counter[str], ...]] = (
    contextvars.ContextVar("apimart_async_request_tally", default=())
)


@contextlib.contextmanager
def counting_into(tally: collections.Counter[str]) -> Generator[None]:
    """Requests made inside the block are counted into ``tally`` too (``request_tally``)."""
    token = request_tally.set((tally,))
    try:
        yield
    finally:
        request_tally.reset(token)


RetryMode = Literal["read", "submit", "never"]
T = TypeVar("T")

#: Keys this long or longer are blanked out of replies (``_attempt``); real ones are ~40.
_REDACTED_KEY_MIN: Final = 16

#: A client used in an event loop other than the one it was opened in.
ANOTHER_LOOP: Final = (
    "the client was opened in another event loop (an earlier asyncio.run(), another test's"
    " loop); a client serves the loop it was opened in: open one in this loop"
)

#: Largest API reply read into memory (result files are streamed, not read through here).
MAX_REPLY_BYTES = 16 * 1024 * 1024


def new_idempotency_key() -> str:
    return f"am-{os.urandom(16).hex()}"  # 128 random bits, as uuid4 but cheaper


@attrs.define
class SendTrack:
    """Filled in by the attempts of one request: how many may have reached the service and
    ended without a reply (a dropped connection, a timeout after sending). A submit with
    such an attempt has an unknown outcome if its retries do not settle it."""

    unanswered: int = 0
    taken: int = 0
    """Attempts the service answered other than with 429 (it may have acted on them)."""


#: aiohttp errors raised before the request left this machine (nothing reached the service).
_NOT_SENT: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,  # refused, DNS, TLS handshake, proxy unreachable
    aiohttp.ClientHttpProxyError,  # the proxy refused the tunnel
    *((aiohttp.ConnectionTimeoutError,) if hasattr(aiohttp, "ConnectionTimeoutError") else ()),
)


def check_proxy_url(proxy: Any) -> str:
    """A proxy URL as given to ``AsyncApimart(proxy=...)``: http(s) with a host; credentials
    in it are allowed and never shown in errors."""
    ok = isinstance(proxy, str)
    if isinstance(proxy, str):
        try:
            parts = urlsplit(proxy.strip())
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port  # a bad port raises ValueError
        except ValueError:
            ok = False
    if not ok:
        shown = "a URL with credentials" if isinstance(proxy, str) and "@" in proxy else proxy
        raise ConfigurationError(
            f"proxy must be an http(s) URL such as 'http://proxy.example:3128', got {shown!r}"
        )
    return str(proxy).strip()


class _Proxies:
    """Which proxy, if any, a URL goes through: the named one, or the environment's."""

    def __init__(self, proxy: str | None, *, trust_env: bool) -> None:
        self._fixed = _split_proxy(proxy) if proxy is not None else None
        self._env: dict[str, str] = {}
        self._by_origin: dict[
            tuple[str, str, int | None], tuple[str | None, Mapping[str, str] | None]
        ] = {}
        if proxy is None and trust_env:
            self._env = {
                k: v if k == "no" or "://" in v else f"http://{v}"  # proxy.corp:3128 is http
                for k, v in urllib.request.getproxies().items()
                if k in ("http", "https", "no")
            }
        #: Whether any URL may go through a proxy (else ``for_url`` need not be asked).
        self.any: bool = self._fixed is not None or bool(self._env)

    def for_url(self, url: str) -> tuple[str | None, Mapping[str, str] | None]:
        if self._fixed is not None:
            return self._fixed
        if not self._env:
            return None, None
        parts = urlsplit(url)
        try:
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            port = None
        key = (parts.scheme, parts.hostname or "", port)
        found = self._by_origin.get(key)
        if found is None:
            proxy = self._env.get(parts.scheme)
            if proxy is None or _bypassed(key[1], port, self._env):
                found = (None, None)
            else:
                found = _split_proxy(proxy)
            self._by_origin[key] = found
        return found

    @property
    def in_use(self) -> bool:
        return self._fixed is not None or bool(set(self._env) - {"no"})


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_NO_PROXY: Final[tuple[None, None]] = (None, None)


def _bypassed(host: str, port: int | None, env: Mapping[str, str]) -> bool:
    if "no" in env:
        return _no_proxy_matches(host, port, env["no"])
    try:
        return bool(urllib.request.proxy_bypass(host))
    except OSError:  # pragma: no cover - system proxy settings unreadable
        return False


def _no_proxy_matches(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` lists this host, as curl, requests and httpx read it: ``*``; a
    name that matches itself and its subdomains (``example.com``, ``.example.com``,
    ``*.example.com``); an IP address or network (``10.0.0.0/8``, ``::1``); any of these with
    ``:port`` (``127.0.0.1:8000``, ``[::1]:8443``) to match that port only."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for raw in no_proxy.lower().split(","):
        entry = raw.strip()
        if entry == "*":
            return True
        entry_port: int | None = None
        if entry.startswith("["):  # [::1] or [::1]:8443
            entry, _, rest = entry[1:].partition("]")
            if rest.startswith(":") and rest[1:].isdigit():
                entry_port = int(rest[1:])
        elif entry.count(":") == 1:  # host:port (a bare IPv6 address has several colons)
            name, _, digits = entry.partition(":")
            if digits.isdigit():
                entry, entry_port = name, int(digits)
        if not entry or (entry_port is not None and entry_port != port):
            continue
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:  # a name: it cannot match an address
                pass
            continue
        name = entry.lstrip("*").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _split_proxy(proxy: str) -> tuple[str, Mapping[str, str] | None]:
    """(proxy URL without credentials, a ``Proxy-Authorization`` header for them or None).
    aiohttp sends the header to open a tunnel (https); a plain-http request, which the proxy
    forwards, carries it itself (see ``_with_proxy_auth``)."""
    parts = urlsplit(proxy)
    if parts.username is None:
        return proxy, None
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    auth = {"Proxy-Authorization": f"Basic {token}"}
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), auth


def _with_proxy_auth(
    url: str, headers: Mapping[str, str] | None, proxy_headers: Mapping[str, str] | None
) -> Mapping[str, str] | None:
    """The request's headers, plus the proxy's credentials when the request is plain http:
    the proxy forwards it without a tunnel, and aiohttp sends ``proxy_headers`` only on a
    CONNECT."""
    if not proxy_headers or not url.startswith("http:"):
        return headers
    return {**(headers or {}), **proxy_headers}


#: The verified contexts built for ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``, by their values: reading
#: the certificates takes 40-60 ms of the event loop, once per process rather than per client.
_SSL_CONTEXTS: dict[tuple[str, str], ssl.SSLContext] = {}


def _default_ssl() -> ssl.SSLContext | bool:
    """aiohttp's shared verified context, unless ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` is set:
    aiohttp builds its context at import time, so one built here reads them as they are now."""
    where = (os.environ.get("SSL_CERT_FILE", ""), os.environ.get("SSL_CERT_DIR", ""))
    if not any(where):
        return True
    context = _SSL_CONTEXTS.get(where)
    if context is None:
        context = _SSL_CONTEXTS[where] = ssl.create_default_context()
    return context


class Reply(NamedTuple):
    """One API reply (a named tuple: made for every request, at a fifth of a frozen attrs
    class's cost)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def _error_from_reply(status: int, headers: Mapping[str, str], body: bytes) -> APIStatusError:
    """Build the typed error for an error reply, reading the documented error body if any."""
    message: str | None = None
    err_type: str | None = None
    code: int | str | None = None
    param: str | None = None
    request_id: str | None = headers.get("X-Request-Id") or headers.get("Request-Id")
    try:
        payload: Any = json.loads(body) if body else None
    except (ValueError, RecursionError):
        payload = None
    if is_object(payload):
        err = payload.get("error")
        if is_object(err):
            message = _as_str(err.get("message"))
            err_type = _as_str(err.get("type"))
            raw_code = err.get("code")
            if isinstance(raw_code, (int, str)) and not isinstance(raw_code, bool):
                code = raw_code
            param = _as_str(err.get("param"))
            request_id = _as_str(err.get("request_id")) or request_id
        elif isinstance(err, str):
            message = err
        else:  # a flat body: {"code": "idempotency_key_reused", "message": "..."}
            raw_code = payload.get("code")
            if isinstance(raw_code, (int, str)) and not isinstance(raw_code, bool):
                code = raw_code
            err_type = err_type or _as_str(payload.get("type"))
        message = message or _as_str(payload.get("message")) or _as_str(payload.get("msg"))
        request_id = _as_str(payload.get("request_id")) or request_id
    if not message:
        message = body.decode("utf-8", "replace").strip()[:200] or f"HTTP {status}"
    sub_code = find_sub_code(code, err_type, message)
    cls = status_error_class(status, sub_code or err_type)
    retry_after = _retry.parse_retry_after(headers.get("Retry-After"))
    return cls(
        message,
        status=status,
        type=err_type,
        code=code,
        param=param,
        request_id=request_id,
        retry_after=retry_after,
        body=body,
        sub_code=sub_code,
    )


def _as_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _embedded_error(status: int, body: bytes) -> int | None:
    """A 2xx reply that is really an error (``{"error": {...}}`` or ``{"code": 4xx}`` with no
    data): the status to report it under, else None."""
    # A reply with data is never an embedded error: skip it without parsing, so the status
    # replies on the poller's path are parsed once, by their own parser.
    if not body.startswith(b"{") or b'"data"' in body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not is_object(payload) or payload.get("data") is not None:
        return None
    code: Any = None
    err = payload.get("error")
    if is_object(err):
        code = err.get("code")
        if not (isinstance(code, int) and 400 <= code <= 599):
            code = 400
    elif isinstance(payload.get("code"), int) and 400 <= payload["code"] <= 599:
        code = payload["code"]
    return code if isinstance(code, int) and not isinstance(code, bool) else None


class Transport:
    """One aiohttp session and the retry loop around it. Opened and closed by the client."""

    def __init__(
        self,
        *,
        api_key: Secret,
        base_url: str,
        timeout: Timeout,
        max_retries: int,
        connection_limit: int = 100,
        pacing: Pacing | None = None,
        ssl_context: ssl.SSLContext | None = None,
        proxy: str | None = None,
        trust_env: bool = True,
    ) -> None:
        self._key = api_key
        self._ssl_context = ssl_context
        self._proxy = proxy
        self.trust_env = trust_env
        #: Resolved when the session opens (the environment as it is then).
        self.proxies: _Proxies = _Proxies(proxy, trust_env=False)
        #: Client-wide back-pressure from 429s, and the requests-per-second caps in force.
        self.pacing: Pacing = pacing or Pacing()
        self.base_url = base_url
        self.timeout = timeout
        self.max_retries = max_retries
        self.connection_limit = connection_limit
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        #: The downloads streaming now (``stream``), each in a cancel scope ``aclose`` cancels.
        self._streams: set[anyio.CancelScope] = set()
        #: The event loop the session was opened in: it serves no other (its connections
        #: belong to that loop; used from another, aiohttp fails with raw RuntimeErrors).
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Attempts made, by kind of request ("submit", "task", "batch", ...), and "retries".
        self.counters: collections.Counter[str] = collections.Counter()
        #: Set by ``aclose`` (in the session's loop): requests waiting for their turn end.
        self._closing: asyncio.Event | None = None
        #: Times the API requests (``_watchdog``), once the session is open; None: aiohttp
        #: does (an aiohttp whose connections cannot be counted).
        self.watchdog: Watchdog | None = None
        self._retrying_read = self._retrying(submit=False)
        self._retrying_submit = self._retrying(submit=True)

    def _count(self, kind: str) -> None:
        """One more attempt of ``kind``: for the client, and for whoever counts it here."""
        self.counters[kind] += 1
        for tally in request_tally.get():
            tally[kind] += 1

    @property
    def throttle(self) -> Throttle:
        return self.pacing.throttle

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._session is not None and not self._session.closed

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def open(self) -> None:
        if self._closed:
            raise ClientClosedError("this client was closed; create a new AsyncApimart")
        if self._session is None:
            self.loop = asyncio.get_running_loop()
            ssl_option = self._ssl_context if self._ssl_context is not None else _default_ssl()
            self.proxies = _Proxies(self._proxy, trust_env=self.trust_env)
            connector = WatchedConnector(limit=self.connection_limit, ssl=ssl_option)
            # the watchdog times API requests; aiohttp's own limits (a timer per request,
            # and per chunk) only where a request asks for them (uploads)
            self.watchdog = Watchdog(self.loop) if connector.counts else None
            timeout = self.timeout
            if self.watchdog is not None:
                timeout = attrs.evolve(timeout, read=None, total=None)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": f"apimart-async/{__version__}"},
                timeout=self.client_timeout(timeout),
                raise_for_status=False,
            )

    async def aclose(self) -> None:
        self._closed = True
        for scope in list(self._streams):  # downloads in flight end (ClientClosedError)
            scope.cancel()
        session, self._session = self._session, None
        if self.watchdog is not None:  # the requests in flight end (ClientClosedError)
            self._in_its_loop(self.watchdog.close)
        if self._closing is not None:  # and those waiting for their turn
            self._in_its_loop(self._closing.set)
        if session is None:
            return
        if not self.in_another_loop():
            await session.close()
        elif self.loop is not None and not self.loop.is_closed():
            # its own loop still runs (on another thread): the session is closed there
            asyncio.run_coroutine_threadsafe(session.close(), self.loop)
        else:  # its loop is gone, and its connections with it: nothing to await
            session.detach()

    def _in_its_loop(self, callback: Callable[[], object]) -> None:
        """``callback()`` in the session's event loop: now if it runs this code, else soon
        on its own thread (nothing if that loop is gone)."""
        if not self.in_another_loop():
            callback()
        elif self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(callback)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if self._closed:
                raise ClientClosedError("the client was closed")
            raise ClientClosedError(
                "the client is not open: use 'async with AsyncApimart() as client:' "
                "or 'await client.open()'"
            )
        running = asyncio._get_running_loop()  # in_another_loop, without a call per request
        if running is not None and self.loop is not None and running is not self.loop:
            raise ClientClosedError(ANOTHER_LOOP)
        return self._session

    def in_another_loop(self) -> bool:
        """Whether the session was opened in an event loop other than the running one (a
        client opened by one ``asyncio.run`` or test's loop, used in the next one's)."""
        running = asyncio._get_running_loop()
        return running is not None and self.loop is not None and running is not self.loop

    @staticmethod
    def client_timeout(timeout: Timeout) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=timeout.total, sock_connect=timeout.connect, sock_read=timeout.read
        )

    # -- requests ----------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base_url + path

    async def request(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        retry: RetryMode,
        parse: Callable[[Reply], T],
        json_body: Any = None,
        data_factory: Callable[[], aiohttp.FormData] | None = None,
        query: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: Timeout | None = None,
        track: SendTrack | None = None,
    ) -> T:
        """Send one API request with the retry policy of ``retry`` and return ``parse(reply)``
        of its 2xx reply, or raise a typed error. Parsing is part of each attempt, so a reply
        that is not even JSON is retried like a dropped one. ``data_factory`` builds a fresh
        multipart body per attempt. ``query`` is the URL's query string, already encoded
        (``language=en``: built once by the caller rather than from a dict per request).
        ``track`` counts attempts that may have reached the service without a reply."""

        args = (method, path, kind, parse, json_body, data_factory, query, headers, timeout, track)
        try:  # the first attempt, as in _retried (and without its coroutine, issue 16)
            return await self._attempt(*args)
        except ApimartError as exc:
            if retry == "never" or self.max_retries <= 0:
                raise
            if retry != "submit" and not _retry.is_retryable_failure(exc, submit=False):
                raise
            first = exc
        if retry == "submit":
            result: T = await self._waiting_out_in_progress(args, first)
            return result
        return cast("T", await self._retrying_read([first], *args))

    async def _retried(self, args: tuple[Any, ...], *, submit: bool) -> Any:
        """The first attempt on its own; only after it failed with a retryable error does the
        retry policy (backoff) take over, from that failure on: the same attempts, waits, logs
        and counters as when backoff runs every attempt, without its bookkeeping on the
        common path (a status read that succeeds at once)."""
        try:
            return await self._attempt(*args)
        except ApimartError as exc:
            if not _retry.is_retryable_failure(exc, submit=submit):
                raise
            failed = [exc]
        retrying = self._retrying_submit if submit else self._retrying_read
        return await retrying(failed, *args)

    def _retrying(self, *, submit: bool) -> Callable[..., Awaitable[Any]]:
        """``_replayed_attempt`` wrapped in the retry policy; built once per transport (building
        a backoff decorator per request costs more than the rest of the request's own work)."""

        def giveup(exc: Exception) -> bool:
            return not _retry.is_retryable_failure(exc, submit=submit)

        def on_backoff(details: Any) -> None:
            exc = details.get("exception")
            method, path = details["args"][1:3]
            self._count("retries")
            logger.info(
                "retrying %s %s in %.2f s (attempt %d of %d) after %s",
                method,
                path,
                details.get("wait", 0.0),
                details["tries"] + 1,
                self.max_retries + 1,
                _retry.describe(exc) if isinstance(exc, ApimartError) else "error",
            )

        wrapped: Callable[..., Awaitable[Any]] = backoff.on_exception(
            _retry.wait_gen,
            ApimartError,
            max_tries=lambda: self.max_retries + 1,
            giveup=giveup,
            jitter=None,
            logger=None,
            on_backoff=on_backoff,
        )(self._replayed_attempt)
        return wrapped

    async def _replayed_attempt(self, failed: list[ApimartError], *args: Any) -> Any:
        """Under the retry policy: first the failure of the attempt made before it (raised
        again, so backoff counts it as its first try), then real attempts."""
        if failed:
            raise failed.pop()
        return await self._attempt(*args)

    async def _waiting_out_in_progress(self, args: tuple[Any, ...], first: ApimartError) -> Any:
        """A submit with its retries for failures (``_retried``), asked again after a pause
        while the service reports an earlier attempt with the same key still in progress, for
        up to ``_retry.IN_PROGRESS_MAX_WAIT`` seconds of pauses in all. Each answer "in
        progress" proves the service holds the request: it is not a failure, and it does not
        use up the retries for failures (which a slow service would otherwise exhaust, ending
        a submit about to succeed as indeterminate). ``first``: how its first attempt (made by
        ``request``) failed."""
        waited = 0.0
        rounds = 0
        failed: ApimartError | None = first  # the first attempt's failure (``request``)
        while True:
            try:
                if failed is None:
                    return await self._retried(args, submit=True)
                earlier, failed = failed, None  # as _retried goes on after a failed attempt
                if not _retry.is_retryable_failure(earlier, submit=True):
                    raise earlier
                return await self._retrying_submit([earlier], *args)
            except ConflictError as exc:
                if not _retry.in_progress(exc) or (
                    exc.retry_after is not None and exc.retry_after > _retry.MAX_RETRY_AFTER
                ):
                    raise
                rounds += 1
                delay = _retry.in_progress_delay(rounds, exc)
                if waited + delay > _retry.IN_PROGRESS_MAX_WAIT + 1e-9:
                    raise
                waited += delay
                self._count("retries")
                logger.info(
                    "%s %s: the service still works on this key; asking again in %.2f s "
                    "(%.0f s of %.0f s waited)",
                    args[0],
                    args[1],
                    delay,
                    waited,
                    _retry.IN_PROGRESS_MAX_WAIT,
                )
                await anyio.sleep(delay)

    async def _attempt(
        self,
        method: str,
        path: str,
        kind: str,
        parse: Callable[[Reply], T],
        json_body: Any,
        data_factory: Callable[[], aiohttp.FormData] | None,
        query: str | None,
        headers: Mapping[str, str] | None,
        timeout: Timeout | None,
        track: SendTrack | None = None,
    ) -> T:
        """One attempt, parsed (so a reply that is not even JSON is retried like a lost one).
        One coroutine for the whole attempt: every suspension of the request resumes through
        each frame of the chain awaiting it (issue 16)."""
        data = data_factory() if data_factory is not None else None
        session = self.session()
        if not self.pacing.idle() and (wait := self._pause()) > 0:
            await self._wait_turn(wait)  # a server-requested pause or a requests/s cap
        all_headers = {
            "Authorization": f"Bearer {self._key.reveal()}",
            "Accept": "application/json",
        }
        if headers:
            all_headers.update(headers)
        self.counters[kind] += 1  # _count, without a call per request
        for tally in request_tally.get():
            tally[kind] += 1
        debug = logger.isEnabledFor(logging.DEBUG)
        started = time.perf_counter() if debug else 0.0
        options: dict[str, Any] = {}
        watchdog = self.watchdog
        if timeout is not None or data is not None:
            # aiohttp's limits (an upload's read clock starts once its body is sent)
            options["timeout"] = self.client_timeout(timeout or self.timeout)
            watchdog = None
        url = self.base_url + path if query is None else f"{self.base_url}{path}?{query}"
        proxy, proxy_headers = self.proxies.for_url(url) if self.proxies.any else _NO_PROXY
        if proxy is not None:
            options["proxy"] = proxy
            options["proxy_headers"] = proxy_headers
            all_headers = dict(_with_proxy_auth(url, all_headers, proxy_headers) or {})
        # else the session's limits, which are the client's (no watchdog) or none
        watch = (  # a limit of 0 is none, as aiohttp reads it
            None
            if watchdog is None
            else watchdog.start(self.timeout.read or None, self.timeout.total or None)
        )
        try:
            async with session.request(
                method,
                url,
                json=json_body if data is None else None,
                data=data,
                headers=all_headers,
                allow_redirects=False,
                **options,
            ) as resp:
                status = resp.status
                reply_headers = resp.headers  # case-insensitive, read-only
                declared = reply_headers.get("Content-Length")
                if (
                    declared is not None
                    and declared.isdigit()
                    and int(declared) <= MAX_REPLY_BYTES
                    and "Content-Encoding" not in reply_headers
                ):  # _read_whole's common case, without its coroutine: aiohttp's parser
                    body = await resp.read()  # delivers no byte past the declared length
                else:
                    body = await _read_whole(resp, method, path)
        except asyncio.CancelledError:
            if watchdog is None or not watchdog.timed_out(watch):
                task = asyncio.current_task()
                if self._closed and task is not None and task.cancelling() == 0:
                    # nobody cancelled the task: aiohttp's close cancelled a wait inside it
                    # (for a connection, as its connector closed)
                    raise ClientClosedError("the client was closed during the request") from None
                raise  # the caller's own cancellation
            assert watch is not None  # timed_out said so
            if track is not None and watch.sent:  # it may have reached the service
                track.unanswered += 1
            if watch.expired == "closed":
                raise ClientClosedError("the client was closed during the request") from None
            logger.debug("%s %s timed out", method, path)
            raise APITimeoutError(
                f"{method} {path} timed out ({watch.describe()})", method=method, path=path
            ) from None
        except TimeoutError as exc:
            if track is not None and not isinstance(exc, _NOT_SENT):
                track.unanswered += 1
            logger.debug("%s %s timed out", method, path)
            raise APITimeoutError(
                f"{method} {path} timed out ({type(exc).__name__})", method=method, path=path
            ) from None
        except aiohttp.ClientError as exc:
            if track is not None and not isinstance(exc, _NOT_SENT):
                track.unanswered += 1  # it may have reached the service
            if self._closed:
                raise ClientClosedError("the client was closed during the request") from None
            logger.debug("%s %s failed: %s", method, path, type(exc).__name__)
            raise APIConnectionError(
                f"{method} {path} failed: {type(exc).__name__}: {_safe_str(exc)}",
                method=method,
                path=path,
            ) from None
        # aiohttp: "Session is closed"; aiohttp 3.10 also fails on the connector a close has
        # set to None ("'NoneType' object has no attribute 'connect'")
        except (RuntimeError, AttributeError):
            if self._closed or session.closed:
                raise ClientClosedError("the client was closed during the request") from None
            raise
        finally:
            if watch is not None and watchdog is not None:
                watchdog.end(watch)
        if debug:
            elapsed_ms = (time.perf_counter() - started) * 1000
            logger.debug("%s %s -> %d in %.1f ms", method, path, status, elapsed_ms)
        if track is not None and status != 429:
            track.taken += 1
        throttle = self.pacing.throttle
        if status == 429:
            retry_after = _retry.parse_retry_after(reply_headers.get("Retry-After"))
            throttle.on_rate_limited(time.monotonic(), retry_after)
        elif status < 300 and throttle.factor < 1.0:  # else nothing to recover
            throttle.on_success(time.monotonic())
        if (
            declared is not None
            and declared.isdigit()
            and "Content-Encoding" not in reply_headers
            and int(declared) != len(body)
        ):  # aiohttp checks the framing; this is a second look at an uncompressed body
            raise APIConnectionError(
                f"{method} {path}: reply cut short ({len(body)} of {declared} bytes)",
                method=method,
                path=path,
            )
        # The key blanked out: a gateway quoting it in an error ("invalid key sk-...") would
        # put it in the error's message and body, and from there in logs and in whatever a
        # web app answers its own callers. A short test key ("test") is no secret, and
        # blanking it would garble replies that hold it.
        key = self._key.reveal_bytes()
        if len(key) >= _REDACTED_KEY_MIN and key in body:
            body = body.replace(key, b"***")
        if 300 <= status < 400:
            raise APIStatusError(
                f"{method} {path} answered with a redirect; redirects are not followed "
                "so that the API key is never sent elsewhere",
                status=status,
                body=body,
            )
        if status >= 400:
            raise _error_from_reply(status, reply_headers, body)
        # a reply with data is never an embedded error (_embedded_error's first test)
        embedded = None if b'"data"' in body else _embedded_error(status, body)
        if embedded is not None:
            error = _error_from_reply(embedded, reply_headers, body)
            error.http_status = status  # the error came inside a 2xx reply
            raise error
        return parse(Reply(status=status, headers=reply_headers, body=body))

    async def _wait_turn(self, wait: float) -> None:
        """Wait ``wait`` seconds for a request's turn, or until the client closes (then
        ``ClientClosedError``: a close does not wait for the turns of the requests paced)."""
        closing = self._closing
        if closing is None:
            closing = self._closing = asyncio.Event()
        with anyio.move_on_after(wait):
            await closing.wait()
        if self._closed:
            raise ClientClosedError("the client was closed while a request waited for its turn")

    def _pause(self) -> float:
        """Seconds to wait before a request: a server-requested pause (not under
        ``set_testing``) and the requests-per-second cap, if any (checked without a coroutine:
        every request asks)."""
        return self.pacing.wait_time(time.monotonic(), honour_pause=not _retry.is_testing())

    @contextlib.asynccontextmanager
    async def stream(
        self, url: str, *, headers: Mapping[str, str] | None = None
    ) -> AsyncGenerator[StreamReply, None]:
        """GET a result file (never with the API key; redirects followed, http(s) only).
        Connection failures and timeouts become APIConnectionError / APITimeoutError."""
        session = self.session()
        if (wait := self._pause()) > 0:
            await self._wait_turn(wait)
        self._count("download")
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout.connect, sock_read=self.timeout.read
        )
        # aclose() cancels it: a closed session stops reading its connections, and a read
        # waiting for the next bytes would wait for the read timeout (30 s by default)
        scope = anyio.CancelScope()
        self._streams.add(scope)
        try:
            proxy, proxy_headers = self.proxies.for_url(url)
            with scope:
                async with session.get(
                    url,
                    headers=_with_proxy_auth(url, headers, proxy_headers),
                    timeout=timeout,
                    proxy=proxy,
                    proxy_headers=proxy_headers,
                ) as resp:
                    yield StreamReply(resp)
            if scope.cancelled_caught:
                raise ClientClosedError("the client was closed during a download")
        except TimeoutError:
            raise APITimeoutError("download timed out", method="GET", path=_url_path(url)) from None
        except RuntimeError:  # aiohttp: "Connection closed." (read after the session closed)
            if self._closed:
                raise ClientClosedError("the client was closed during a download") from None
            raise
        except aiohttp.ClientError as exc:
            if self._closed:
                raise ClientClosedError("the client was closed during a download") from None
            raise APIConnectionError(
                f"download failed: {type(exc).__name__}: {_safe_str(exc)}",
                method="GET",
                path=_url_path(url),
            ) from None
        finally:
            self._streams.discard(scope)


#: Content codings the client decodes (br and zstd only with aiohttp's optional packages).
DECODABLE: frozenset[str] = frozenset(
    ("gzip", "x-gzip", "deflate")
    + (("br",) if compression_utils.HAS_BROTLI else ())
    + (("zstd",) if getattr(compression_utils, "HAS_ZSTD", False) else ())
)


async def _read_whole(resp: aiohttp.ClientResponse, method: str, path: str) -> bytes:
    """The whole body of an API reply, decoded (gzip, deflate), however many pieces it came
    in; a declared length over ``MAX_REPLY_BYTES`` is refused before reading, an undeclared
    body (or one that inflates) is cut off past it. A reply cut short raises aiohttp's
    ``ClientPayloadError``, which the caller maps to a retryable ``APIConnectionError``."""
    limit = MAX_REPLY_BYTES
    headers = resp.headers
    declared = headers.get("Content-Length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise ResponseValidationError(
                f"{method} {path}: the reply declares {declared} bytes, more than the "
                f"{limit} bytes an API reply may have",
                status=resp.status,
            )
        if "Content-Encoding" not in headers:
            # the common reply: its length is known and within the limit, and aiohttp's
            # parser delivers no byte past it, so it is read in one go
            return await resp.read()
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ResponseValidationError(
                f"{method} {path}: reply larger than {limit} bytes", status=resp.status
            )
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class StreamReply:
    """A streaming reply: status, headers, and the body in chunks."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    def chunks(self, size: int) -> AsyncIterator[bytes]:
        """The body, each piece as it arrived; ``size``: the read buffer (see ``_pieces``)."""
        return _pieces(self._resp.content, size)


#: A body's piece smaller than this is joined with what else has arrived, up to _JOINED bytes.
_SMALL_PIECE = 16 * 1024
_JOINED = 256 * 1024


async def _pieces(content: aiohttp.StreamReader, size: int) -> AsyncIterator[bytes]:
    """The body as aiohttp received it, piece by piece: ``iter_chunked(n)`` joins what has
    arrived into pieces of ``n``, one more copy of every byte on the event loop (issue 16:
    downloads). Only a piece of a few bytes is joined, with what else has arrived. aiohttp
    stops reading the socket while twice ``size`` waits unread (where it can be raised:
    aiohttp 3.11 and later). An empty piece that ends an HTTP chunk is not the end of the
    body."""
    raise_limits = getattr(content, "set_read_chunk_size", None)
    if raise_limits is not None:
        raise_limits(size)
    while True:
        data, end_of_http_chunk = await content.readchunk()
        if data:
            if len(data) < _SMALL_PIECE:
                # a server sending its body in tiny pieces (HTTP chunks of a few bytes):
                # what else has arrived goes with it, joined, not as thousands of objects
                more = content.read_nowait(_JOINED)
                if more:
                    data += more
            yield data
        elif not end_of_http_chunk:
            return


def _url_path(url: str) -> str:
    return urlsplit(url).path[:200]


def _safe_str(exc: BaseException) -> str:
    """``str(exc)`` of a client error, which names the host and port but never headers."""
    text = str(exc)
    return text[:300]

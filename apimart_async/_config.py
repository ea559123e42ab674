"""Client configuration: timeouts, the secret key, the base URL."""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Final
from urllib.parse import urlsplit

import attrs

from ._checks import check_non_negative_seconds
from ._errors import ConfigurationError

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "LANGUAGES",
    "Secret",
    "Timeout",
    "check_base_url",
    "resolve_api_key",
]

DEFAULT_BASE_URL: Final = "https://api.apimart.ai"
LANGUAGES: Final = ("en", "zh", "ja", "ko")


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    check_non_negative_seconds(f"Timeout.{attribute.name}", value)


@attrs.frozen(kw_only=True)
class Timeout:
    """Per-phase timeouts in seconds for one attempt of one request; None (or 0, as aiohttp
    reads it) means no limit.

    ``connect``: to open a connection; ``read``: without a byte of the reply, once the
    request has its connection (before the first byte or between two); ``total``: the whole
    attempt, a wait for a free connection included. ``Timeout.of(5)`` sets all three to 5 s.

    API requests have ``read`` and ``total`` timed by the client's watchdog (one timer for
    all requests in flight): ``total`` exactly; ``read`` exactly for a reply that never
    starts, and within ``read / 8`` after the limit for one that stops halfway. Uploads
    (and submits carrying a file) and result downloads have aiohttp's timers.
    """

    connect: float | None = attrs.field(default=10.0, validator=_non_negative)
    """Seconds to open a connection."""
    read: float | None = attrs.field(default=30.0, validator=_non_negative)
    """Seconds without a byte of the reply (before the first, or between two)."""
    total: float | None = attrs.field(default=60.0, validator=_non_negative)
    """Seconds for the whole attempt."""

    @classmethod
    def of(cls, value: Timeout | float | None) -> Timeout:
        """A Timeout from a Timeout, a number of seconds (every phase) or None (no limits)."""
        if isinstance(value, Timeout):
            return value
        if value is None:
            return cls(connect=None, read=None, total=None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"timeout must be a Timeout, a number or None, got {value!r}")
        return cls(connect=float(value), read=float(value), total=float(value))


DEFAULT_TIMEOUT: Final = Timeout()


class Secret:
    """Holds the API key. Its repr, str and format never show it; only ``reveal()`` does."""

    __slots__ = ("_bytes", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._bytes: bytes | None = None

    def reveal(self) -> str:
        return self._value

    def reveal_bytes(self) -> bytes:
        """The key as the bytes a reply would quote it in (UTF-8, surrogates escaped): made
        once, kept here, where no repr shows it (every reply is searched for it)."""
        if self._bytes is None:
            self._bytes = self._value.encode("utf-8", "surrogateescape")
        return self._bytes

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("an API key is not pickled")


def resolve_api_key(api_key: str | None) -> Secret:
    key = api_key if api_key is not None else os.environ.get("APIMART_API_KEY")
    if key is None or (isinstance(key, str) and not key.strip()):
        raise ConfigurationError(
            "no API key: pass AsyncApimart(api_key=...) or set APIMART_API_KEY"
        )
    if not isinstance(key, str):
        raise ConfigurationError(f"api_key must be a string, got {type(key).__name__}")
    key = key.strip()
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
        raise ConfigurationError("api_key contains white space or control characters")
    return Secret(key)


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str | None) -> str:
    """The base URL to use (argument, then APIMART_BASE_URL, then the default), checked:
    https anywhere, plain http only to a loopback host (the emulator, a local proxy)."""
    url = base_url if base_url is not None else os.environ.get("APIMART_BASE_URL")
    if not url:
        url = DEFAULT_BASE_URL
    if not isinstance(url, str):
        raise ConfigurationError(f"base_url must be a string, got {type(url).__name__}")
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
    except ValueError:
        raise ConfigurationError(f"base_url is not a valid URL: {url!r}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigurationError(f"base_url must be an http(s) URL with a host, got {url!r}")
    if parts.username or parts.password:
        raise ConfigurationError("base_url must not carry credentials; pass api_key instead")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"base_url must not have a query or fragment, got {url!r}")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigurationError(
            f"refusing plain http to {host!r}: the API key would travel unencrypted; "
            "use https (http is allowed only for loopback hosts such as the emulator)"
        )
    return url.strip().rstrip("/")

"""The retry policy, in one place: what is retried, how long to wait, and the testing switch.

- Reads (task status GETs, the batch status POST, balance, uploads): retried on connection
  errors, timeouts, 408, 429, 5xx (not 501, not ``build_request_failed``) and on replies that
  are not even JSON.
- ``idempotency_unavailable`` (the service did NOT run the request) is retried whatever its
  status; ``build_request_failed`` (a validation error, often sent as a 500) never is.
- The submit POST: the same, plus 409 ``idempotency_in_progress``; it always carries an
  ``Idempotency-Key`` that stays the same on every retry, so a retry never bills twice.
- 400, 401, 402, 403, 404 and the other 409s are never retried.
- Waits: the server's ``Retry-After`` when it sent one (up to ``MAX_RETRY_AFTER``; a longer
  one is not waited for), else exponential backoff with full jitter, capped.
- ``set_testing(True)`` makes every wait zero, so retry paths run instantly in tests (but for
  a 50 ms pause while the service reports the same submit still in progress).
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Generator
from typing import Final

from ._errors import (
    APIConnectionError,
    ApimartError,
    APIStatusError,
    ConflictError,
    ResponseValidationError,
)

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "MAX_RETRY_AFTER",
    "RETRY_STATUSES",
    "is_retryable",
    "is_retryable_status",
    "is_testing",
    "parse_retry_after",
    "set_testing",
    "wait_gen",
]

RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_BASE: Final = 0.5
BACKOFF_CAP: Final = 8.0
MAX_RETRY_AFTER: Final = 120.0
#: The pause between retries of a submit the service reports in progress, under set_testing.
IN_PROGRESS_TEST_PAUSE: Final = 0.05

_testing = False


def set_testing(enabled: bool = True) -> None:
    """Make every retry wait zero (for tests of your code and ours). Off by default."""
    global _testing
    _testing = bool(enabled)


def is_testing() -> bool:
    return _testing


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def is_retryable(exc: BaseException, *, submit: bool = False) -> bool:
    """Whether one more attempt of the same request is safe and may succeed."""
    if isinstance(exc, APIConnectionError):
        return True
    if isinstance(exc, ResponseValidationError):
        return not exc.decodable
    if isinstance(exc, APIStatusError):
        if exc.retry_after is not None and exc.retry_after > MAX_RETRY_AFTER:
            return False
        if exc.sub_code == "idempotency_unavailable":
            return True
        if exc.sub_code == "build_request_failed":
            return False
        if isinstance(exc, ConflictError):
            return submit and _in_progress(exc)
        return is_retryable_status(exc.status)
    return False


def is_retryable_status(status: int) -> bool:
    """An HTTP status worth another attempt: 408, 429 and 5xx but 501 (not implemented)."""
    return status in RETRY_STATUSES or (status >= 500 and status != 501)


def backoff_delay(attempt: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th retry (1-based)."""
    return random.uniform(0.0, min(cap, base * 2 ** (attempt - 1)))


def wait_gen() -> Generator[float, BaseException | None, None]:
    """A backoff wait generator: it is sent the exception of each failed attempt."""
    attempt = 0
    exc = yield 0.0  # primed by backoff with None
    while True:
        attempt += 1
        if _testing:
            # Zero, except while the service says the same submit is still being processed:
            # a short real pause lets that first request finish (else retries burn at once).
            delay = IN_PROGRESS_TEST_PAUSE if _in_progress(exc) else 0.0
        elif isinstance(exc, APIStatusError) and exc.retry_after is not None:
            delay = min(exc.retry_after, MAX_RETRY_AFTER)
        else:
            delay = backoff_delay(attempt)
        exc = yield delay


def _in_progress(exc: BaseException | None) -> bool:
    return isinstance(exc, ConflictError) and exc.sub_code == "idempotency_in_progress"


def describe(exc: ApimartError) -> str:
    """One line for a retry log record (never includes headers)."""
    return f"{type(exc).__name__}: {exc}"

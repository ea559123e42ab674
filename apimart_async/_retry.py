"""The retry policy, in one place: what is retried, how long to wait, and the testing switch.

- Reads (task status GETs, the batch status POST, balance, uploads): retried on connection
  errors, timeouts, 408, 429, 5xx (not 501, not ``build_request_failed``) and on replies that
  are not even JSON.
- ``idempotency_unavailable`` (the service did NOT run the request) is retried whatever its
  status; ``build_request_failed`` (a validation error, often sent as a 500) never is.
- The submit POST: the same; it always carries an ``Idempotency-Key`` that stays the same on
  every retry, so a retry never bills twice. A 409 ``idempotency_in_progress`` (the service
  still works on an earlier attempt with that key) is not a failure: it is asked again after
  a pause (the server's ``Retry-After``, else 1 s doubling to 8 s) for up to
  ``IN_PROGRESS_MAX_WAIT`` seconds of pauses, without using up the retries for failures.
- 400, 401, 402, 403, 404 and the other 409s are never retried.
- Waits: the server's ``Retry-After`` when it sent one (up to ``MAX_RETRY_AFTER``; a longer
  one is not waited for), else exponential backoff with full jitter, capped.
- ``set_testing(True)`` makes every wait zero, so retry paths run instantly in tests (but for
  a 50 ms pause while the service reports the same submit still in progress: a real service
  needs real time to finish it).
"""

from __future__ import annotations

import email.utils
import math
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
#: Seconds of pauses a submit waits in all while the service reports it in progress.
IN_PROGRESS_MAX_WAIT = 300.0
IN_PROGRESS_BASE: Final = 1.0
IN_PROGRESS_CAP: Final = 8.0

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
    if not math.isfinite(seconds):  # NaN, "inf", "1e999": no number of seconds
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
            return submit and in_progress(exc)
        return is_retryable_status(exc.status)
    return False


def is_retryable_failure(exc: BaseException, *, submit: bool = False) -> bool:
    """``is_retryable`` but for ``idempotency_in_progress``, which is waited out on its own
    budget (``in_progress_delay``) instead of using up the retries for failures."""
    return is_retryable(exc, submit=submit) and not in_progress(exc)


def in_progress_delay(round_: int, exc: APIStatusError) -> float:
    """The pause before asking again about a submit the service reports in progress."""
    if _testing:
        return IN_PROGRESS_TEST_PAUSE
    if exc.retry_after is not None:
        return min(exc.retry_after, MAX_RETRY_AFTER)
    return min(IN_PROGRESS_CAP, IN_PROGRESS_BASE * 2.0 ** (round_ - 1))


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
            delay = 0.0
        elif isinstance(exc, APIStatusError) and exc.retry_after is not None:
            delay = min(exc.retry_after, MAX_RETRY_AFTER)
        else:
            delay = backoff_delay(attempt)
        exc = yield delay


def in_progress(exc: BaseException | None) -> bool:
    """A 409 ``idempotency_in_progress``: the service still works on a request with this key."""
    return isinstance(exc, ConflictError) and exc.sub_code == "idempotency_in_progress"


def describe(exc: ApimartError) -> str:
    """One line for a retry log record (never includes headers)."""
    return f"{type(exc).__name__}: {exc}"

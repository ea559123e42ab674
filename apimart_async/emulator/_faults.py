"""Fault injection for the emulator: scripted faults (exactly N times) and random ones (a rate).

Endpoint names: ``submit``, ``task``, ``batch``, ``balance``, ``upload``, ``file``; ``*`` is
any of them. Kinds:

- ``status``: an error reply (``status``, error ``type``, optional ``Retry-After``)
- ``drop``: the connection is closed with no reply at all; nothing was executed
- ``malformed``: HTTP 200 with a body that is not JSON; nothing was executed
- ``truncated``: the reply's headers promise more bytes than come; nothing was executed
- ``slow``: the reply is delayed by ``delay`` real seconds, then served normally
- ``reply``: a given status and body (JSON or bytes) instead of the real reply
- ``lost_reply``: the request is executed (a submit creates its task), then the connection is
  dropped before any reply: the case idempotency keys exist for
"""

from __future__ import annotations

import json
import random
import threading
from collections import deque
from collections.abc import Iterable
from typing import Final, Literal

import attrs

__all__ = ["ENDPOINTS", "Fault", "FaultPlan"]

ENDPOINTS: Final = ("submit", "task", "batch", "balance", "upload", "file")
"""The endpoints faults can target: ``"submit"``, ``"task"``, ``"batch"``, ``"balance"``,
``"upload"`` and ``"file"`` (result downloads)."""
FaultKind = Literal["status", "drop", "malformed", "truncated", "slow", "lost_reply", "reply"]


@attrs.frozen
class Fault:
    """What to do to one request instead of (or on top of) answering it; build one with the
    class methods (``Fault.rate_limited()``, ``Fault.lost_reply()``...)."""

    kind: FaultKind
    """``"status"``, ``"reply"``, ``"drop"``, ``"malformed"``, ``"truncated"``, ``"slow"`` or
    ``"lost_reply"``."""
    status: int = 503
    """The HTTP status of a ``"status"`` or ``"reply"`` fault."""
    type: str | None = None
    """The error type in the error body."""
    message: str | None = None
    """The error message in the error body."""
    retry_after: str | None = None
    """The ``Retry-After`` header to send."""
    delay: float = 0.0
    """Seconds a ``"slow"`` reply waits before it is sent."""
    body: bytes = b""
    """The body of a ``"reply"`` fault."""

    @classmethod
    def error(
        cls,
        status: int,
        type: str | None = None,
        *,
        message: str | None = None,
        retry_after: float | str | None = None,
    ) -> Fault:
        """Answer ``status`` with the service's error body (``type``, ``message``)."""
        ra = None if retry_after is None else str(retry_after)
        return cls("status", status=status, type=type, message=message, retry_after=ra)

    @classmethod
    def rate_limited(cls, retry_after: float | str | None = 1) -> Fault:
        """A 429 with ``Retry-After`` (seconds or an HTTP date; None: no header)."""
        return cls.error(
            429, "rate_limit_error", message="Too many requests", retry_after=retry_after
        )

    @classmethod
    def server_error(cls, status: int = 503) -> Fault:
        """A 5xx error."""
        return cls.error(status, "server_error", message="The service is temporarily unavailable")

    @classmethod
    def reply(cls, status: int, body: object) -> Fault:
        """Answer ``status`` with ``body`` (bytes as they are, anything else as JSON)."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return cls("reply", status=status, body=raw)

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection without a reply."""
        return cls("drop")

    @classmethod
    def malformed(cls) -> Fault:
        """A 200 whose body is not JSON."""
        return cls("malformed")

    @classmethod
    def truncated(cls) -> Fault:
        """A reply cut off in the middle of its body."""
        return cls("truncated")

    @classmethod
    def slow(cls, delay: float) -> Fault:
        """The normal reply, ``delay`` real seconds late."""
        return cls("slow", delay=delay)

    @classmethod
    def lost_reply(cls) -> Fault:
        """Do the work (a submit creates its task), then drop the connection."""
        return cls("lost_reply")


DEFAULT_RANDOM: Final = (
    Fault.server_error(500),
    Fault.server_error(502),
    Fault.server_error(503),
    Fault.rate_limited(0),
    Fault.drop(),
    Fault.malformed(),
    Fault.truncated(),
    Fault.lost_reply(),
)
"""What a random fault draws from, by default: every kind that the client must survive."""


class FaultPlan:
    """Which request gets which fault. Scripted faults come first, in the order injected."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._scripted: dict[str, deque[Fault]] = {}
        #: Random faults by endpoint: (rate, what to draw from).
        self._rates: dict[str, tuple[float, tuple[Fault, ...]]] = {}
        self._rng = random.Random(seed)
        self.served: dict[tuple[str, str], int] = {}
        """Faults served, by (endpoint, kind)."""

    def inject(self, endpoint: str, fault: Fault, *, times: int = 1) -> None:
        """The next ``times`` requests to ``endpoint`` (or ``*``) get ``fault``."""
        _check_endpoint(endpoint)
        with self._lock:
            self._scripted.setdefault(endpoint, deque()).extend([fault] * times)

    def set_rate(
        self,
        rate: float,
        *,
        endpoints: Iterable[str] = ENDPOINTS,
        faults: Iterable[Fault] | None = None,
    ) -> None:
        """A fraction ``rate`` of requests to ``endpoints`` get a fault drawn from ``faults``
        (by default every kind: 5xx, 429, drops, garbage, cut replies, lost submit replies).
        Calls for different endpoints add up; a later call for an endpoint replaces its rate."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        eps = frozenset(endpoints)
        for ep in eps:
            _check_endpoint(ep)
        drawn = tuple(faults) if faults is not None else DEFAULT_RANDOM
        with self._lock:
            for ep in eps:
                self._rates[ep] = (rate, drawn)

    def clear(self) -> None:
        """Forget every scripted fault and random rate."""
        with self._lock:
            self._scripted.clear()
            self._rates.clear()

    def pending(self) -> int:
        """Scripted faults not yet served."""
        with self._lock:
            return sum(len(q) for q in self._scripted.values())

    def total_served(self) -> int:
        """Faults served so far, of every kind."""
        return sum(self.served.values())

    def next(self, endpoint: str) -> Fault | None:
        """The fault for the next request to ``endpoint``, if any (the server asks)."""
        with self._lock:
            for key in (endpoint, "*"):
                queue = self._scripted.get(key)
                if queue:
                    return self._serve(endpoint, queue.popleft())
            rate, drawn = self._rates.get(endpoint, (0.0, ()))
            if rate and self._rng.random() < rate:
                choices = [f for f in drawn if f.kind != "lost_reply" or endpoint == "submit"]
                if choices:
                    return self._serve(endpoint, self._rng.choice(choices))
        return None

    def _serve(self, endpoint: str, fault: Fault) -> Fault:
        key = (endpoint, fault.kind)
        self.served[key] = self.served.get(key, 0) + 1
        return fault


def _check_endpoint(endpoint: str) -> None:
    if endpoint != "*" and endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)} or '*'")

"""Webhook callbacks as hints (issue 15), logic only: which task a callback names, the check of
a ``webhook_url``, and what the callbacks of a client came to.

APIMart POSTs the task object (the ``data`` of a status reply) to ``<webhook>/callback`` when a
task ends: unsigned, maybe more than once, from anyone who can reach the route. So a callback
is never a result: only its task id is read, and the shared poller reads that task itself in
its next round (``Poller.check_now``). The status, the URLs and everything else in the body
are ignored.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, cast
from urllib.parse import urlsplit

import attrs

from ._errors import FieldError, ValidationError, WebhookError
from ._models import VideoRequest, hide_userinfo, is_unicode_text, url_rule

__all__ = [
    "WebhookCounts",
    "check_webhook_url",
    "is_loopback_url",
    "task_id_of",
    "unreachable_reason",
    "with_webhook",
]

#: Longest callback body read (a task object is a few kB; anything far larger is not one).
MAX_BODY = 1 << 20
#: Longest task id taken from a callback.
_MAX_ID = 200


def check_webhook_url(value: object, field: str = "webhook_url") -> str | None:
    """``value`` if it is None or an http(s) URL, else a ``ValidationError`` naming ``field``."""
    if value is None:
        return None
    rule = url_rule(value)
    if rule is not None:
        raise ValidationError([FieldError(field, rule, hide_userinfo(value))])
    assert isinstance(value, str)
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        rule = "must have a port from 1 to 65535"
        raise ValidationError([FieldError(field, rule, hide_userinfo(value))])
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        rule = (
            "must have no query or fragment: the service calls <webhook_url>/callback, which"
            " would land inside them"
        )
        raise ValidationError([FieldError(field, rule, hide_userinfo(value))])
    return value


#: Host names only a private network resolves (RFC 6762, 6761, 8375, common practice).
_PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa", ".intranet")


def _host_ip(url: str) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    host = (urlsplit(url).hostname or "").lower()
    try:
        return host, ipaddress.ip_address(host)
    except ValueError:
        return host, None


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    host, ip = _host_ip(url)
    return host == "localhost" or (ip is not None and ip.is_loopback)


def unreachable_reason(url: str) -> str | None:
    """Why the real service would never call ``url`` (a checked ``webhook_url``) back: it
    calls public hosts on ports 80 and 443 only (apimart-api.md). None: it may."""
    host, ip = _host_ip(url)
    if ip is not None and not ip.is_global:
        return f"{host} is not a public address"
    if ip is None and (host == "localhost" or "." not in host or host.endswith(_PRIVATE_SUFFIXES)):
        return f"{host} is not a public host name"
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    if port not in (80, 443):
        return f"port {port}: it calls ports 80 and 443 only"
    return None


def with_webhook(request: VideoRequest, webhook_url: str | None) -> VideoRequest:
    """``request`` with its ``webhook`` set to ``webhook_url``, unless it has its own (or there
    is no ``webhook_url``)."""
    if webhook_url is None or request.webhook is not None:
        return request
    return attrs.evolve(request, webhook=webhook_url)


def task_id_of(body: bytes | bytearray | str | dict[str, Any]) -> str:
    """The task id a callback names. ``body``: the raw bytes or text of the POST, or the JSON
    object already decoded; the task object itself or wrapped as ``{"code": 200, "data":
    {...}}``, with ``id`` or ``task_id``. Raises ``WebhookError`` naming the problem."""
    data: Any = body
    if isinstance(body, (bytes, bytearray, str)):
        if len(body) > MAX_BODY:
            raise WebhookError(f"the body is larger than {MAX_BODY} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise WebhookError("the body is not JSON") from None
        except RecursionError:
            raise WebhookError("the body is not a task object (JSON nested too deeply)") from None
    elif not isinstance(body, dict):
        raise WebhookError(f"the body must be bytes, str or a dict, got {type(body).__name__}")
    if not isinstance(data, dict):
        raise WebhookError("the body is not a JSON object (a task object was expected)")
    obj = cast("dict[str, Any]", data)
    inner: Any = obj.get("data")
    if isinstance(inner, dict) and "id" not in obj and "task_id" not in obj:
        obj = cast("dict[str, Any]", inner)  # the status reply's shape: {"data": {task}}
    task_id: Any = obj.get("id", obj.get("task_id"))
    if not isinstance(task_id, str) or not task_id.strip():
        raise WebhookError("the body names no task (no string 'id' or 'task_id')")
    if (
        len(task_id) > _MAX_ID
        or any(c.isspace() or c == "/" for c in task_id)
        or not (task_id.isascii() or is_unicode_text(task_id))
    ):
        raise WebhookError("the task id in the body is not a task id")
    return task_id


@attrs.define
class WebhookCounts:
    """What the callbacks of a client came to (``client.tasks.webhook_counts()``)."""

    received: int = 0
    """Callbacks handed to ``tasks.notify`` (the aiohttp handler's included)."""
    checked: int = 0
    """Callbacks for a task this client follows: it is read in the next round."""
    ignored: int = 0
    """Callbacks for a task nobody here follows (unknown, or already ended: a repeat)."""
    malformed: int = 0
    """Callbacks refused with ``WebhookError`` (the handler's 400s)."""
    forwarded: int = 0
    """Of the ``ignored``: passed on to the other replicas of a shared (PostgreSQL) client
    journal, for a task of that journal still pending (a wait may follow it there)."""
    relayed: int = 0
    """Callbacks another replica passed on, for a task a wait of this client follows: it is
    read in the next round, as a ``checked`` one."""

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)

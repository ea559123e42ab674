"""``apimart-async doctor``: what this account's service does, and what the SDK will do about it.

Run it once before anything else, with the real key (or ``--emulate``, ``--base-url``). Each
check is one or a few requests; none spends money but ``--submit MODEL``, which submits one
cheap job twice with the same Idempotency-Key to prove a repeat is not billed twice.

::

    CHECK            RESULT  FOUND                                     SDK WILL
    connectivity     ok      https://api.apimart.ai answered in 84 ms
    tls              ok      certificate verified (system CAs)
    proxy            ok      none (direct connections)                 connect directly
    key              ok      accepted; balance 12.30 USD
    batch route      warn    refused (400: task_ids is required)       -> per-task reads (...)
    unknown task id  ok      404 (task does not exist or has expired)  end the wait: NotFound...

Exit status 0 when everything the SDK relies on works, 1 when something is missing (no
connection, an untrusted certificate, a refused key, a repeated key that made a second task).
The checks use the client's own transport (its key handling, proxy and TLS settings) to send
the raw requests whose full answers the typed API would hide.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import attrs

from . import _converter as conv
from ._api import is_unknown_task
from ._client import AsyncApimart
from ._errors import (
    APIConnectionError,
    ApimartError,
    APIStatusError,
    AuthenticationError,
    ConfigurationError,
    PermissionDeniedError,
    ResponseValidationError,
    excerpt,
)
from ._json import is_array, is_object
from ._models import VideoRequest
from ._poll_schedule import BATCH_IDS
from ._transport import Reply, _embedded_error, _error_from_reply

__all__ = ["Finding", "add_doctor_parser", "cmd_doctor", "diagnose", "render_table"]

Status = Literal["ok", "warn", "fail", "skip"]

#: A prompt for the ``--submit`` check: short, harmless, cheap.
SUBMIT_PROMPT: Final = "apimart-async doctor: a calm blue sky, 1 second"


@attrs.frozen
class Finding:
    """One line of the report: what was checked, how it went, what was seen, what the SDK does."""

    check: str
    status: Status
    found: str
    action: str = ""

    def to_dict(self) -> dict[str, str]:
        return attrs.asdict(self)


def _raw(reply: Reply) -> Reply:
    return reply


async def _send(
    client: AsyncApimart, method: str, path: str, body: Any = None
) -> tuple[int, Any, bytes]:
    """One raw request (retried like any read on 5xx, 429 and lost connections): (status,
    parsed JSON or None, body). Error statuses are returned, not raised; a connection that
    keeps failing raises ``APIConnectionError``."""
    try:
        reply = await client._transport.request(
            method, path, kind="doctor", retry="read", parse=_raw, json_body=body
        )
        status, raw = reply.status, reply.body
    except APIStatusError as exc:  # an error status, or an error inside a 2xx reply
        status, raw = exc.http_status, exc.body.encode()
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = None
    return status, payload, raw


def _shape(payload: Any) -> str:
    """A short description of a reply's shape: ``{"data": [task, ...]}`` and the like."""
    if not is_object(payload):
        return "not a JSON object"
    data = payload.get("data")
    if is_array(data):
        return '{"data": [task, ...]}'
    if is_object(data):
        if data and all(is_object(v) for v in data.values()):
            return '{"data": {id: task, ...}}'
        keys = ", ".join(sorted(data)[:4])
        return f'{{"data": {{{keys}}}}}'
    return "{" + ", ".join(sorted(payload)[:4]) + "}"


def _message(payload: Any, raw: bytes) -> str:
    if is_object(payload):
        err = payload.get("error")
        if is_object(err) and isinstance(err.get("message"), str):
            return excerpt(err["message"], 60)
        if isinstance(payload.get("message"), str):
            return excerpt(payload["message"], 60)
    return excerpt(raw, 60)


def _proxy_finding(client: AsyncApimart) -> Finding:
    proxy, _ = client._transport.proxies.for_url(client.base_url)
    if proxy is None:
        if client._transport.proxies.in_use:
            return Finding("proxy", "ok", "bypassed for this host (NO_PROXY)", "connect directly")
        return Finding("proxy", "ok", "none (direct connections)", "connect directly")
    shown = _shown_proxy(proxy)
    source = "proxy=" if client._transport._proxy is not None else "the environment"
    return Finding("proxy", "ok", f"{shown} (from {source})", "send every request through it")


def _tls_finding(client: AsyncApimart, connected: bool) -> Finding:
    if urlsplit(client.base_url).scheme != "https":
        return Finding("tls", "ok", "plain http to a loopback host (no TLS)", "")
    if client._transport._ssl_context is not None:
        trust = "the ssl context given"
    elif os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        trust = "SSL_CERT_FILE / SSL_CERT_DIR"
    else:
        trust = "system CAs"
    if connected:
        return Finding("tls", "ok", f"certificate verified ({trust})", "")
    return Finding("tls", "skip", "not reached", "")


async def diagnose(
    client: AsyncApimart,
    *,
    submit_model: str | None = None,
    batch_size: int = BATCH_IDS,
) -> list[Finding]:
    """Run every check against an open client and return the findings, in order."""
    findings: list[Finding] = [_proxy_finding(client)]
    started = time.perf_counter()
    try:
        balance = await client.balance()
    except (APIConnectionError, APIStatusError) as exc:
        failed = _proxy_failed(client, exc)
        if failed is not None:
            findings[0] = failed
            findings.insert(0, Finding("connectivity", "fail", "not reached (the proxy failed)"))
            return _ordered(findings)
        if isinstance(exc, APIStatusError):
            return await _answered(client, exc, findings, submit_model, batch_size)
        text = str(exc)
        if "certificate" in text.lower() or "SSLError" in text:
            findings.insert(0, Finding("connectivity", "ok", f"{client.base_url} reachable"))
            findings.append(
                Finding(
                    "tls",
                    "fail",
                    excerpt(text, 120),
                    "nothing works: pass ssl= (an ssl.SSLContext) or set SSL_CERT_FILE",
                )
            )
        else:
            findings.insert(
                0,
                Finding(
                    "connectivity",
                    "fail",
                    excerpt(text, 120),
                    "nothing works: check the address, the network or the proxy",
                ),
            )
        return _ordered(findings)
    except ApimartError as exc:
        return await _answered(client, exc, findings, submit_model, batch_size)
    else:
        ms = (time.perf_counter() - started) * 1000
        findings.insert(
            0, Finding("connectivity", "ok", f"{client.base_url} answered in {ms:.0f} ms")
        )
        findings.append(_tls_finding(client, connected=True))
        if balance.unlimited:
            shown = "unlimited"
        else:
            shown = f"{balance.remain_balance:.2f} USD"
        status: Status = "ok" if balance.unlimited or balance.remain_balance > 0 else "warn"
        action = "" if status == "ok" else "submits will fail with InsufficientBalanceError"
        findings.append(Finding("key", status, f"accepted; balance {shown}", action))
    return await _service_findings(client, findings, submit_model, batch_size)


async def _service_findings(
    client: AsyncApimart, findings: list[Finding], submit_model: str | None, batch_size: int
) -> list[Finding]:
    findings.extend(await _batch_findings(client, batch_size))
    findings.append(await _unknown_id_finding(client))
    if submit_model is not None:
        findings.append(await _idempotency_finding(client, submit_model))
    return _ordered(findings)


async def _answered(
    client: AsyncApimart,
    exc: ApimartError,
    findings: list[Finding],
    submit_model: str | None = None,
    batch_size: int = BATCH_IDS,
) -> list[Finding]:
    """The service answered the balance request with an error: a refused key ends the checks,
    anything else is a warning and the checks go on."""
    findings.insert(0, Finding("connectivity", "ok", f"{client.base_url} answered"))
    findings.append(_tls_finding(client, connected=True))
    if isinstance(exc, (AuthenticationError, PermissionDeniedError)):
        findings.append(
            Finding("key", "fail", f"refused (HTTP {exc.status})", "nothing works: check the key")
        )
        return _ordered(findings)
    findings.append(Finding("key", "warn", f"balance unreadable: {excerpt(str(exc), 80)}", ""))
    return await _service_findings(client, findings, submit_model, batch_size)


def _proxy_failed(client: AsyncApimart, exc: ApimartError) -> Finding | None:
    """The proxy row when the request failed at the proxy: it refused the credentials (407,
    on a tunnel or on a forwarded plain-http request) or could not be reached."""
    proxy, _ = client._transport.proxies.for_url(client.base_url)
    if proxy is None:
        return None
    text = str(exc)
    shown = _shown_proxy(proxy)
    if (isinstance(exc, APIStatusError) and exc.status == 407) or (
        "ClientHttpProxyError" in text and "407" in text
    ):
        return Finding(
            "proxy",
            "fail",
            f"{shown} answered 407 Proxy Authentication Required (credentials missing or wrong)",
            "nothing works: give the proxy's credentials (http://user:pass@host:port)",
        )
    if "ClientHttpProxyError" in text:
        return Finding(
            "proxy",
            "fail",
            f"{shown} refused: {excerpt(text, 80)}",
            "nothing works: check the proxy URL (proxy= or HTTPS_PROXY)",
        )
    if "ClientProxyConnectionError" in text:
        return Finding(
            "proxy",
            "fail",
            f"{shown}: cannot connect",
            "nothing works: check the proxy URL (proxy= or HTTPS_PROXY)",
        )
    return None


def _shown_proxy(proxy: str) -> str:
    parts = urlsplit(proxy)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 80}"


_ORDER: Final = ("connectivity", "tls", "proxy", "key")


def _ordered(findings: list[Finding]) -> list[Finding]:
    """Connectivity, TLS, proxy and key first (in that order), then the rest as found."""
    rank = {name: i for i, name in enumerate(_ORDER)}
    return sorted(findings, key=lambda f: rank.get(f.check, len(_ORDER)))


def _fake_ids(n: int) -> list[str]:
    return [f"task_doctor_{secrets.token_hex(6)}" for _ in range(n)]


async def _batch_findings(client: AsyncApimart, size: int) -> list[Finding]:
    status, payload, raw = await _send(
        client, "POST", "/v1/tasks/batch", {"task_ids": _fake_ids(2)}
    )
    per_task = "per-task reads (GET /v1/tasks/{id})"
    if status in (404, 405, 501):
        return [Finding("batch route", "warn", f"absent ({status})", f"-> {per_task}")]
    if status >= 400:
        return [
            Finding(
                "batch route",
                "warn",
                f"refused ({status}: {_message(payload, raw)})",
                f"-> {per_task}",
            )
        ]
    try:  # the SDK's own reader decides whether it can use this shape
        conv.parse_task_items(raw, status=status)  # an unreadable item is read by id
    except ResponseValidationError:
        return [
            Finding("batch route", "warn", f"answers another shape: {_shape(payload)}", per_task)
        ]
    found = [Finding("batch route", "ok", f"answers {_shape(payload)}", "batched status reads")]
    at_size, *_ = await _send(client, "POST", "/v1/tasks/batch", {"task_ids": _fake_ids(size)})
    if at_size >= 400:
        found.append(
            Finding(
                "batch size",
                "warn",
                f"refuses {size} ids ({at_size})",
                f"-> {per_task} (the SDK sends up to {size} ids)",
            )
        )
        return found
    over, *_ = await _send(client, "POST", "/v1/tasks/batch", {"task_ids": _fake_ids(size + 1)})
    limit = f"refuses {size + 1}" if over >= 400 else f"also takes {size + 1}"
    found.append(
        Finding("batch size", "ok", f"accepts {size} ids, {limit}", f"send up to {size} per read")
    )
    return found


async def _unknown_id_finding(client: AsyncApimart) -> Finding:
    task_id = _fake_ids(1)[0]
    status, payload, raw = await _send(client, "GET", f"/v1/tasks/{task_id}")
    message = _message(payload, raw)
    if status == 404:
        return Finding(
            "unknown task id", "ok", f"404 ({message})", "end the wait: NotFoundError (confirmed)"
        )
    if status == 400 or status < 300:  # the poller's own reading of the reply decides
        code = status if status == 400 else _embedded_error(status, raw)
        error = _error_from_reply(code, {}, raw) if code is not None else None
        if error is not None and not is_unknown_task(error):
            shown = f"400 ({message})" if status == 400 else f"{status} with {_shape(payload)}"
            return Finding(
                "unknown task id",
                "warn",
                shown,
                f"not read as 'no such task': a wait ends with {type(error).__name__} after "
                f"{client.poll_policy.hard_error_tries} reads",
            )
    if status == 400:
        return Finding(
            "unknown task id",
            "warn",
            f"400 ({message})",
            "confirm over a grace period before ending the wait as not found",
        )
    if status < 300:
        return Finding(
            "unknown task id",
            "warn",
            f"{status} with {_shape(payload)}: {message}",
            "read the error code in the body; confirm before ending the wait",
        )
    return Finding("unknown task id", "warn", f"{status} ({message})", "retry, then give up")


async def _idempotency_finding(client: AsyncApimart, model: str) -> Finding:
    request = VideoRequest(model, SUBMIT_PROMPT)
    key = f"doctor-{secrets.token_hex(12)}"
    first = await client.videos.submit(request, idempotency_key=key)
    second = await client.videos.submit(request, idempotency_key=key)
    if first == second:
        return Finding(
            "idempotency",
            "ok",
            f"a repeated key returned the same task ({first})",
            "retry submits with the same key: never billed twice",
        )
    return Finding(
        "idempotency",
        "fail",
        f"a repeated key made a second task ({first}, {second}; both billed)",
        "retried submits may bill twice: use a journal and max_retries=0 for submits",
    )


def render_table(findings: Sequence[Finding]) -> str:
    rows = [("CHECK", "RESULT", "FOUND", "SDK WILL")]
    rows += [(f.check, f.status, f.found, f.action) for f in findings]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip()
        for r in rows
    ]
    return "\n".join(lines)


def exit_code(findings: Sequence[Finding]) -> int:
    return 1 if any(f.status == "fail" for f in findings) else 0


# -- the CLI subcommand ---------------------------------------------------------------------


def add_doctor_parser(
    sub: Any,
    common: argparse.ArgumentParser,
    *,
    key: Callable[[argparse.Namespace], str] | None = None,
) -> None:
    """Add ``doctor`` to the CLI's subcommands (the hook in cli.py). Options that the shared
    ``common`` parser already has (``--emulate``, ``--json``) are taken from it."""
    siblings = list(sub.choices.values())  # format help as the other subcommands do
    formatter = siblings[0].formatter_class if siblings else argparse.HelpFormatter
    p = sub.add_parser(
        "doctor",
        parents=[common],
        formatter_class=formatter,
        help="check connectivity, TLS, proxy, key and the service's variants; run this first",
    )

    def add(*flags: str, **kwargs: Any) -> None:
        # already among the shared options: keep theirs
        with contextlib.suppress(argparse.ArgumentError):
            p.add_argument(*flags, **kwargs)

    add("--emulate", action="store_true", help="check the built-in emulator instead")
    add(
        "--submit",
        metavar="MODEL",
        help="also submit one cheap job of MODEL twice with one Idempotency-Key (spends money)",
    )
    add("--yes", action="store_true", help="do not ask before --submit spends money")
    add("--proxy", help="proxy URL (default: HTTPS_PROXY / HTTP_PROXY / NO_PROXY)")
    add("--ca-file", help="PEM file of extra CAs to trust (like SSL_CERT_FILE)")
    add("--json", dest="as_json", action="store_true", help="print JSON")
    # The CLI hands down its own key resolution (flags, environment): this module does not
    # import the CLI, which imports it.
    p.set_defaults(func=cmd_doctor, key_of=key)


def _confirm(model: str) -> bool:
    if not sys.stdin.isatty():
        return False
    answer = input(
        f"--submit submits one {model} job (billed once if idempotency works). Go? [y/N] "
    )
    return answer.strip().lower() in ("y", "yes")


async def cmd_doctor(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.submit and not args.yes and not _confirm(args.submit):
        print("error: --submit spends money: confirm, or pass --yes", file=sys.stderr)
        return 2
    ssl_context = None
    if args.ca_file:
        import ssl

        try:  # added to the CAs trusted already (system, SSL_CERT_FILE), not instead of them
            ssl_context = ssl.create_default_context()
            ssl_context.load_verify_locations(cafile=args.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"--ca-file: cannot load {args.ca_file!r}: {exc}") from None
    options: dict[str, Any] = {"ssl": ssl_context, "proxy": args.proxy}
    if args.emulate:
        from .emulator import Emulator

        async with (
            Emulator() as emu,
            AsyncApimart(emu.api_key, base_url=emu.base_url, **options) as client,
        ):
            findings = await diagnose(client, submit_model=args.submit)
    else:
        key_of: Callable[[argparse.Namespace], str] | None = getattr(args, "key_of", None)
        key = key_of(args) if key_of is not None else None
        async with AsyncApimart(key, base_url=args.base_url, **options) as client:
            findings = await diagnose(client, submit_model=args.submit)
    if args.as_json:
        data = {"ok": exit_code(findings) == 0, "findings": [f.to_dict() for f in findings]}
        print(json.dumps(data, ensure_ascii=False))
    else:
        print(render_table(findings))
    return exit_code(findings)

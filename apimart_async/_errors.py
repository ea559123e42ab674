"""The exceptions of apimart-async: one root, every foreign error translated at the boundary.

::

    ApimartError
    ├── ConfigurationError (ValueError)      bad client settings: no key, http to a remote host
    │   └── OptionError (ValidationError)    a count or number of seconds out of range, for the
    │                                        client, a batch, a method or a policy (``_checks``)
    ├── ValidationError (ValueError)         a request broke a model's rule; nothing was sent
    ├── JobsFileError (ValueError)           a jobs file has bad lines (listed by number)
    ├── JournalError                         the journal cannot be used
    │   └── JournalMismatchError             the input changed under the same journal
    ├── BatchStoppedError                    a job not submitted because the batch stopped
    │   └── BudgetExceededError              ... because it could pass max_cost
    ├── DownloadError                        a result file could not be fetched completely
    │   ├── DownloadExpiredError             its URL expired, also after a refresh
    │   └── DownloadTooLargeError            it is larger than max_bytes
    ├── ReplayedError                        an error recorded by an earlier run (journal)
    ├── UploadError                          a job's local reference file could not be uploaded
    ├── ClientClosedError                    the client is not open, or was closed meanwhile
    ├── APIConnectionError                   the request did not get a complete reply
    │   ├── APITimeoutError (TimeoutError)   ... because a timeout ran out
    │   └── SubmitIndeterminateError         a submit whose outcome is unknown: resubmit with
    │                                        its ``idempotency_key``
    ├── ResponseValidationError              a reply this SDK cannot read (carries an excerpt)
    │   └── NoVideoError                     a task reported completed with no video URL
    ├── APIStatusError                       the service answered with an error
    │   ├── BadRequestError                  400, 422, 500 build_request_failed
    │   ├── AuthenticationError              401
    │   ├── InsufficientBalanceError         402
    │   ├── PermissionDeniedError            403
    │   ├── NotFoundError                    404 (unknown route, task unknown or expired)
    │   ├── ConflictError                    409 (idempotency_in_progress / _key_reused / ...)
    │   ├── RateLimitError                   429 (``retry_after`` in seconds, when given)
    │   └── ServerError                      5xx
    ├── TaskFailedError                      the task ended failed, cancelled or expired
    ├── TaskTimeoutError (TimeoutError)      waiting for a task took longer than allowed
    ├── WebhookError (ValueError)            a webhook callback's body names no task
    │                                        (``tasks.notify``; the aiohttp handler answers 400)
    └── GalleryError                         a gallery could not be read or written (``report``)

    UsageError (Exception)                   a bad command line (``cli``: exit status 2); not an
                                             ApimartError, it never leaves the command line

No aiohttp or asyncio exception escapes the client. No exception of this module ever holds the
API key: requests are described by method and path only, never by their headers.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Any, Final

import attrs

if TYPE_CHECKING:
    from ._results import Task

__all__ = [
    "SUB_CODES",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "ApimartError",
    "ApimartWarning",
    "AuthenticationError",
    "BadRequestError",
    "ClientClosedError",
    "ConfigurationError",
    "ConflictError",
    "FieldError",
    "GalleryError",
    "InsufficientBalanceError",
    "NoVideoError",
    "NotFoundError",
    "OptionError",
    "PermissionDeniedError",
    "RateLimitError",
    "ResponseValidationError",
    "ServerError",
    "SubmitIndeterminateError",
    "TaskFailedError",
    "TaskTimeoutError",
    "UploadError",
    "UsageError",
    "ValidationError",
    "status_error_class",
]

EXCERPT_LIMIT = 200


def excerpt(body: bytes | str, limit: int = EXCERPT_LIMIT) -> str:
    """A short printable excerpt of a reply body, for error messages."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ApimartWarning(UserWarning):
    """Something the service would do silently that the caller probably did not intend."""


class ApimartError(Exception):
    """Root of every error raised by apimart-async."""

    submit_not_taken: bool = False
    """On the error of a submit: True when no attempt was taken by the service (none reached
    it, or each was answered 429), so no task exists and nothing was billed."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its state, not as ``cls(*args)`` (Exception's way): most of these take
        # other arguments than their message (``status=``, a ``Task``), so a worker process's
        # error failed to unpickle in its parent, or came back with its message doubled.
        return (rebuild_error, (type(self), self.args), self.__dict__)


def rebuild_error(cls: type[ApimartError], args: tuple[Any, ...]) -> ApimartError:
    """An ``ApimartError`` of ``cls`` with ``args``, without its ``__init__``; pickle then sets
    its attributes."""
    error = cls.__new__(cls, *args)
    error.args = args
    return error


class ConfigurationError(ApimartError, ValueError):
    """The client was configured in a way that cannot work (no key, insecure URL, ...)."""


class ClientClosedError(ApimartError):
    """The client is not open (use ``async with``), or was closed while work was running."""

    idempotency_key: str | None = None
    """On the error of a submit that the close cut off after it may have reached the service
    (``submit_not_taken`` False): its key. Submit again with it (from an open client) to get
    the task the service created, if it did, instead of a second one."""


@attrs.frozen
class FieldError:
    """One broken rule: the ``field`` (``image_urls[2]``), the ``rule`` in words, and the
    ``value`` (``has_value`` is False when there was none to show)."""

    field: str
    rule: str
    value: Any = attrs.field(default=None, repr=False)
    has_value: bool = attrs.field(default=True, repr=False)

    def __str__(self) -> str:
        if not self.has_value:
            return f"{self.field}: {self.rule}"
        return f"{self.field}: {self.rule}, got {_short_repr(self.value)}"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ValidationError(ApimartError, ValueError):
    """A request broke one or more rules of its model; raised before anything is sent.

    ``errors`` lists every broken rule; ``field`` and ``rule`` are those of the first.
    """

    def __init__(self, errors: list[FieldError]) -> None:
        if not errors:
            raise ValueError("ValidationError needs at least one FieldError")
        self.errors: tuple[FieldError, ...] = tuple(errors)
        super().__init__("; ".join(str(e) for e in self.errors))

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with its errors, not its message (which ``__init__`` would split into
        # one-character errors): it crosses process boundaries as it was.
        return (type(self), (list(self.errors),), self.__dict__)

    @property
    def field(self) -> str:
        return self.errors[0].field

    @property
    def rule(self) -> str:
        return self.errors[0].rule


class OptionError(ConfigurationError, ValidationError):
    """A setting or argument out of range: a count (``concurrency``, ``max_retries``...) or a
    number of seconds or a rate (``timeout``, ``requests_per_second``, a ``PollPolicy``
    field...), for the client, a batch, a method or a policy alike. Both a
    ``ConfigurationError`` and a ``ValidationError``: ``errors`` names the field and the rule."""


class APIConnectionError(ApimartError):
    """The request did not get a complete reply (refused, reset, dropped, TLS, ...).

    ``message`` says what happened; ``method`` and ``path`` name the request when known.
    """

    def __init__(self, message: str, *, method: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.path = path


class APITimeoutError(APIConnectionError, TimeoutError):
    """A connect, read or total timeout ran out."""


class SubmitIndeterminateError(APIConnectionError):
    """A submit whose outcome is unknown: the service may or may not have created the task.

    Raised when the service answers ``idempotency_result_indeterminate``, or when every
    attempt of a submit that reached the service ended without a reply (dropped connection,
    timeout after the request was sent). Submit again with the same ``idempotency_key``: the
    service then returns the original task, if there is one, instead of creating another.
    ``__cause__`` is the last error seen.
    """

    def __init__(
        self,
        message: str,
        *,
        idempotency_key: str,
        method: str | None = "POST",
        path: str | None = None,
    ) -> None:
        super().__init__(message, method=method, path=path)
        self.idempotency_key = idempotency_key


class ResponseValidationError(ApimartError):
    """The service replied with something this SDK cannot read.

    ``body`` is a short excerpt of what came back (never the request or its headers),
    ``status`` the HTTP status when there was one, ``message`` what could not be read;
    ``decodable`` is False when the body was not even JSON.
    """

    def __init__(
        self,
        message: str,
        *,
        body: bytes | str = b"",
        status: int | None = None,
        decodable: bool = True,
    ) -> None:
        self.body: str = excerpt(body)
        self.decodable = decodable
        """False when the body was not even JSON (a proxy page, a cut reply): worth a retry."""
        self.status = status
        self.message = message
        text = f"{message} (HTTP {status})" if status is not None else message
        super().__init__(f"{text}; body: {self.body!r}" if self.body else text)


class NoVideoError(ResponseValidationError):
    """The service reported the task ``completed`` but its reply has no video URL.

    ``task`` is the task as read, ``task_id`` its id. The task was billed; a journal keeps the
    job open, so a later run reads it again (nothing is downloaded, no file is written).
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.task_id: str = task.id
        super().__init__(f"task {task.id} is completed but its reply has no video URL")


class APIStatusError(ApimartError):
    """The service answered with an error status.

    ``status`` is the HTTP status, ``type`` and ``code`` come from the error body
    (``code`` may be an int or a string), ``param`` names the offending field when given,
    ``retry_after`` is the server's ``Retry-After`` in seconds when it sent one.
    ``sub_code`` is the APIMart sub-code this SDK acts on (one of
    ``idempotency_in_progress``, ``idempotency_key_reused``,
    ``idempotency_result_indeterminate``, ``idempotency_unavailable``,
    ``build_request_failed``), wherever the body carried it: ``error.code``, ``error.type``
    or the message; else None. ``http_status`` is the status on the wire: ``status`` but for
    an error sent inside a 2xx reply (``{"code": 404, ...}`` with HTTP 200).
    ``request_id`` is the service's id of the request, ``message`` its message, ``body`` a
    short excerpt of the reply.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str | None = None,
        code: int | str | None = None,
        param: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: bytes | str = b"",
        sub_code: str | None = None,
    ) -> None:
        self.message = message
        self.sub_code: str | None = sub_code or find_sub_code(code, type, message)
        self.http_status = status
        self.retry_after = retry_after
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.request_id = request_id
        self.body: str = excerpt(body)
        parts = [f"HTTP {status}"]
        if type:
            parts.append(type)
        if request_id:
            parts.append(f"request_id={request_id}")
        super().__init__(f"{message} ({', '.join(parts)})")


class BadRequestError(APIStatusError):
    """400/422 (or 500 ``build_request_failed``): the service refused the parameters."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class InsufficientBalanceError(APIStatusError):
    """402: the account cannot pay for this request."""


class PermissionDeniedError(APIStatusError):
    """403: this key may not use this model or endpoint."""


class NotFoundError(APIStatusError):
    """404: unknown route, or a task that does not exist or has expired."""


class ConflictError(APIStatusError):
    """409: an idempotency conflict; ``sub_code`` says which (``idempotency_key_reused``,
    ``idempotency_in_progress``, ...)."""


class RateLimitError(APIStatusError):
    """429: too many requests. ``retry_after`` is the server's wait in seconds, if it gave one."""


class ServerError(APIStatusError):
    """5xx: a fault at the service; usually transient."""


class TaskFailedError(ApimartError):
    """The task ended ``failed`` (or ``cancelled`` / ``expired``). ``task`` is the final task,
    ``task_id`` its id."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.task_id: str = task.id
        err = task.error
        if err is not None:
            detail = err.message or "no message"
            if err.code is not None:
                detail = f"{detail} (code {err.code})"
        else:
            detail = "no error details"
        super().__init__(f"task {task.id} {task.status.value}: {detail}")


class TaskTimeoutError(ApimartError, TimeoutError):
    """Waiting for a task took longer than allowed. The task may still finish (and be billed).

    ``task_id`` is the task, ``timeout`` the seconds waited, ``task`` its last status if read.
    A ``videos.generate(timeout=...)`` whose time ran out during its submit has no task id:
    ``task_id`` is None and ``idempotency_key`` the key of that POST, which the service may
    have acted on (submit the same request with that key to get the task, if there is one;
    with a client journal ``tasks.recover`` does).
    """

    def __init__(
        self,
        task_id: str | None,
        timeout: float,
        task: Task | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> None:
        self.task_id = task_id
        self.timeout = timeout
        self.task = task
        self.idempotency_key = idempotency_key
        if task_id is None:
            message = (
                f"submit not answered after {timeout:g} s (idempotency key {idempotency_key}):"
                " the service may have created the task"
            )
        else:
            last = f"; last status {task.status.value}" if task is not None else ""
            message = f"task {task_id} not finished after {timeout:g} s{last}"
        super().__init__(message)


class JobsFileError(ApimartError, ValueError):
    """The jobs file at ``path`` has bad lines. ``problems`` is a list of (line number,
    message)."""

    def __init__(self, path: str, problems: list[tuple[int, str]]) -> None:
        self.path = path
        self.problems = problems
        head = "\n".join(
            f"{path}:{n}: {msg}" if n else f"{path}: {msg}" for n, msg in problems[:50]
        )
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(head + more)


class JournalError(ApimartError):
    """The journal cannot be used (unreadable, from another tool, newer schema, ...) or
    cannot be written (disk full, ...). The message names the file and the problem."""


class JournalLockedError(JournalError):
    """Another run holds the journal (one run per journal at a time), or the CLI's output
    directory (``what``): ``pid`` is its process id and ``started`` when it took it (seconds
    since the epoch); either is None if the run had not written them yet. ``host``: the
    machine it runs on, when the journal records it (a PostgreSQL journal does)."""

    def __init__(
        self,
        path: str,
        pid: int | None,
        started: float | None,
        *,
        what: str = "journal",
        host: str | None = None,
    ) -> None:
        self.path = path
        """The journal (or directory) the other run holds."""
        self.pid = pid
        """The other run's process id (None if not known yet)."""
        self.started = started
        """When the other run took it, in seconds since the epoch (None if not known yet)."""
        self.host = host
        """The machine of the other run (None when the journal does not say: a file's lock
        is held on this machine)."""
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if started is not None
            else "at an unknown time"
        )
        who = f"pid {pid}" if pid is not None else "pid unknown"
        if host is not None:
            who += f" on {host}"
        here = host is None or host == _hostname()
        if what == "journal" and pid is not None and pid == os.getpid() and here:
            # opened twice in this process: a client's journal= given to a batch as well
            super().__init__(
                f"this process (pid {pid}) already uses this journal {path} (since {when}):"
                " a client's journal= and each batch's journal= need each its own file"
            )
            return
        super().__init__(f"another run ({who}, started {when}) is using this {what} {path}")


def _hostname() -> str:
    import socket

    return socket.gethostname()


class JournalMismatchError(JournalError):
    """The input changed under the same journal: job ``index`` now sends something else.

    ``expected`` is the fingerprint recorded in the journal, ``got`` the new one.
    """

    def __init__(self, index: int, expected: str, got: str) -> None:
        self.index = index
        self.expected = expected
        self.got = got
        super().__init__(
            f"job {index} differs from the one recorded in the journal "
            f"(request hash {_short(got)} vs {_short(expected)}); use a new journal for new"
            " input"
        )


def _short(fingerprint: str) -> str:
    """A request hash cut to 12 characters; a note such as ``(no such job now)`` whole."""
    return fingerprint if fingerprint.startswith("(") else fingerprint[:12]


class BatchStoppedError(ApimartError):
    """The job was not submitted because the batch stopped (an error with
    ``stop_on_error``, the batch deadline, ``stop()``, or a closed client)."""


class BudgetExceededError(BatchStoppedError):
    """Budget reached: submitting this job could pass ``max_cost``; it was not submitted."""


class UploadError(ApimartError):
    """A local reference file of a job could not be uploaded (after retries), or changed after
    it was checked. ``field`` is the request's entry (``image_urls[0]``), ``path`` the file and
    ``reason`` what went wrong (the error from the upload, when there is one)."""

    def __init__(self, field: str, path: str, reason: object) -> None:
        super().__init__(f"{field}: could not upload {path}: {reason}")
        self.field = field
        self.path = path
        self.reason = reason


class ReplayedError(ApimartError):
    """The recorded error of a job that ended in an earlier run (replayed from the journal).
    ``error_type`` names the original exception class."""

    def __init__(self, message: str, error_type: str | None) -> None:
        super().__init__(message)
        self.error_type = error_type


class DownloadError(ApimartError):
    """A result file could not be fetched completely. ``url`` is where it was fetched from,
    ``status`` the HTTP status of the failed fetch, when there was one."""

    def __init__(self, message: str, *, url: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class DownloadExpiredError(DownloadError):
    """The result URL expired, and a fresh status request gave no working one."""


class DownloadTooLargeError(DownloadError):
    """The file is larger than ``max_bytes``."""


class WebhookError(ApimartError, ValueError):
    """A webhook callback that cannot be used (``client.tasks.notify``): its body is not JSON,
    not a task object (nor ``{"data": <task object>}``), or names no task id. ``problem``
    says which; the body itself is never repeated (it comes from anyone who can reach the
    route)."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"webhook callback refused: {problem}")
        self.problem = problem


class GalleryError(ApimartError):
    """The gallery could not be read from its source or written to disk."""


class TakenOver(Exception):
    """Issue 15, internal: ``add`` of a job that another worker of the batch holds now (this
    worker's lease ran out while it waited to record it): nothing was recorded, and the job
    is not submitted here; the batch lets it go."""


class UsageError(Exception):
    """A bad command line (``apimart-async``): the message is printed, the exit status is 2."""


class DownloadGoneError(DownloadError):
    """Internal: a result URL answered 403/404/410; the downloader asks for a fresh one (it
    never reaches the caller: it becomes ``DownloadExpiredError``)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}", status=status)


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientBalanceError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: BadRequestError,
    429: RateLimitError,
}

#: The sub-codes the SDK acts on, found in ``error.code``, ``error.type`` or the message.
SUB_CODES: Final = (
    "idempotency_in_progress",
    "idempotency_key_reused",
    "idempotency_result_indeterminate",
    "idempotency_unavailable",
    "build_request_failed",
)
_SUB_CODE_IN_TEXT: Final = re.compile(r"\b(" + "|".join(SUB_CODES) + r")\b")


def find_sub_code(code: object, type: object, message: object) -> str | None:
    """The sub-code of an error body: ``code`` first (as the vendor's client reads it), then
    ``type``, then the first one named in the message; None when there is none."""
    for value in (code, type):
        if isinstance(value, str) and value in SUB_CODES:
            return value
    if isinstance(message, str):
        found = _SUB_CODE_IN_TEXT.search(message)
        if found is not None:
            return found.group(1)
    return None


#: Sub-codes (or error ``type`` values) that decide the class whatever the HTTP status says.
_BY_TYPE: dict[str, type[APIStatusError]] = {
    "build_request_failed": BadRequestError,  # validation reported as 500
    "idempotency_in_progress": ConflictError,
    "idempotency_key_reused": ConflictError,
    "idempotency_result_indeterminate": ConflictError,
}


def status_error_class(status: int, type: str | None = None) -> type[APIStatusError]:
    """The error class for an HTTP status and a sub-code or error type (the mapping table);
    ``idempotency_unavailable`` keeps its status's class (503: ``ServerError``)."""
    if type is not None and type in _BY_TYPE:
        return _BY_TYPE[type]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    return APIStatusError

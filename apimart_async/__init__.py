"""apimart-async: an asyncio SDK for APIMart's video-generation API.

Submit fast, watch cheaply, never pay twice, never lose a job. See README.md.
"""

# Imports are lazy (PEP 562): ``import apimart_async`` costs almost nothing, and a name's
# module (aiohttp with the client's) is imported when the name is first used, so the CLI's
# ``--help`` and the pytest plugin start fast (issue 16). Type checkers and the API reference
# see the real imports below.
import importlib as _importlib
import typing as _typing

from ._version import __version__ as _version

__version__ = _version
"""The version of this package."""

__all__ = [
    "MODEL_SPECS",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "Apimart",
    "ApimartError",
    "ApimartWarning",
    "AsyncApimart",
    "AuthenticationError",
    "BadRequestError",
    "Balance",
    "Batch",
    "BatchEvent",
    "BatchStats",
    "BatchStoppedError",
    "Budget",
    "BudgetExceededError",
    "ClientClosedError",
    "ConfigurationError",
    "ConflictError",
    "DownloadError",
    "DownloadExpiredError",
    "DownloadTooLargeError",
    "DownloadedFile",
    "Failure",
    "FieldError",
    "InsufficientBalanceError",
    "IntRange",
    "JobLine",
    "JobRecord",
    "JobsFileError",
    "Journal",
    "JournalError",
    "JournalLockedError",
    "JournalMismatchError",
    "LocalFile",
    "ModelSpec",
    "NoVideoError",
    "NotFoundError",
    "OptionError",
    "Outcome",
    "PermissionDeniedError",
    "PollPolicy",
    "PostgresJournal",
    "RateLimitError",
    "ReplayedError",
    "ResponseValidationError",
    "ServerError",
    "SqliteJournal",
    "SubmitIndeterminateError",
    "Success",
    "SyncBatch",
    "SyncTasks",
    "SyncUploads",
    "SyncVideos",
    "Task",
    "TaskError",
    "TaskFailedError",
    "TaskStatus",
    "TaskTimeoutError",
    "TaskWatch",
    "Tasks",
    "Throttle",
    "Timeout",
    "UnfinishedTask",
    "UploadError",
    "UploadStats",
    "UploadedImage",
    "Uploads",
    "ValidationError",
    "Video",
    "VideoRequest",
    "Videos",
    "WebhookError",
    "__version__",
    "read_jobs",
    "set_testing",
]

if _typing.TYPE_CHECKING:
    # (private names: pdoc runs this block in the module to read annotations)
    from collections.abc import Mapping as _Mapping

    from . import emulator as emulator
    from . import testing as testing
    from ._admission import Budget
    from ._client import AsyncApimart, Tasks, TaskWatch, Uploads, Videos
    from ._client_journal import UnfinishedTask
    from ._config import Timeout
    from ._errors import (
        APIConnectionError,
        ApimartError,
        ApimartWarning,
        APIStatusError,
        APITimeoutError,
        AuthenticationError,
        BadRequestError,
        BatchStoppedError,
        BudgetExceededError,
        ClientClosedError,
        ConfigurationError,
        ConflictError,
        DownloadError,
        DownloadExpiredError,
        DownloadTooLargeError,
        FieldError,
        InsufficientBalanceError,
        JobsFileError,
        JournalError,
        JournalLockedError,
        JournalMismatchError,
        NotFoundError,
        NoVideoError,
        OptionError,
        PermissionDeniedError,
        RateLimitError,
        ReplayedError,
        ResponseValidationError,
        ServerError,
        SubmitIndeterminateError,
        TaskFailedError,
        TaskTimeoutError,
        UploadError,
        ValidationError,
        WebhookError,
    )
    from ._handle import Batch
    from ._jobsfile import JobLine, read_jobs
    from ._journal import JobRecord, Journal, SqliteJournal
    from ._models import (
        Balance,
        DownloadedFile,
        Task,
        TaskError,
        TaskStatus,
        UploadedImage,
        Video,
        VideoRequest,
    )
    from ._outcomes import BatchEvent, BatchStats, Failure, Outcome, Success
    from ._pacing import Throttle
    from ._pg_journal import PostgresJournal
    from ._poll_schedule import PollPolicy
    from ._references import LocalFile, UploadStats
    from ._retry import set_testing
    from ._specs import IntRange, ModelSpec
    from ._sync import Apimart, SyncBatch, SyncTasks, SyncUploads, SyncVideos
else:
    # Each public name's module; ``MODEL_SPECS`` is ``_specs.MODEL_SPECS``.
    _LAZY: dict[str, str] = {
        "Budget": "_admission",
        "AsyncApimart": "_client",
        "Tasks": "_client",
        "TaskWatch": "_client",
        "Uploads": "_client",
        "Videos": "_client",
        "UnfinishedTask": "_client_journal",
        "Timeout": "_config",
        "APIConnectionError": "_errors",
        "ApimartError": "_errors",
        "ApimartWarning": "_errors",
        "APIStatusError": "_errors",
        "APITimeoutError": "_errors",
        "AuthenticationError": "_errors",
        "BadRequestError": "_errors",
        "BatchStoppedError": "_errors",
        "BudgetExceededError": "_errors",
        "ClientClosedError": "_errors",
        "ConfigurationError": "_errors",
        "ConflictError": "_errors",
        "DownloadError": "_errors",
        "DownloadExpiredError": "_errors",
        "DownloadTooLargeError": "_errors",
        "FieldError": "_errors",
        "InsufficientBalanceError": "_errors",
        "JobsFileError": "_errors",
        "JournalError": "_errors",
        "JournalLockedError": "_errors",
        "JournalMismatchError": "_errors",
        "NotFoundError": "_errors",
        "NoVideoError": "_errors",
        "OptionError": "_errors",
        "PermissionDeniedError": "_errors",
        "RateLimitError": "_errors",
        "ReplayedError": "_errors",
        "ResponseValidationError": "_errors",
        "ServerError": "_errors",
        "SubmitIndeterminateError": "_errors",
        "TaskFailedError": "_errors",
        "TaskTimeoutError": "_errors",
        "UploadError": "_errors",
        "ValidationError": "_errors",
        "WebhookError": "_errors",
        "Batch": "_handle",
        "JobLine": "_jobsfile",
        "read_jobs": "_jobsfile",
        "JobRecord": "_journal",
        "Journal": "_journal",
        "SqliteJournal": "_journal",
        "PostgresJournal": "_pg_journal",
        "Balance": "_models",
        "DownloadedFile": "_models",
        "Task": "_models",
        "TaskError": "_models",
        "TaskStatus": "_models",
        "UploadedImage": "_models",
        "Video": "_models",
        "VideoRequest": "_models",
        "BatchEvent": "_outcomes",
        "BatchStats": "_outcomes",
        "Failure": "_outcomes",
        "Outcome": "_outcomes",
        "Success": "_outcomes",
        "Throttle": "_pacing",
        "PollPolicy": "_poll_schedule",
        "LocalFile": "_references",
        "UploadStats": "_references",
        "set_testing": "_retry",
        "IntRange": "_specs",
        "ModelSpec": "_specs",
        "Apimart": "_sync",
        "SyncBatch": "_sync",
        "SyncTasks": "_sync",
        "SyncUploads": "_sync",
        "SyncVideos": "_sync",
        "MODEL_SPECS": "_specs",
    }

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is not None:
            value = getattr(_importlib.import_module(f".{module}", __name__), name)
            globals()[name] = value  # later uses skip this function
            return value
        if name in ("emulator", "testing", "webhooks") or (name[:1] == "_" and name[:2] != "__"):
            # ``apimart_async.emulator`` and ``.testing`` (and the private modules) after a
            # plain ``import apimart_async``, imported on first use
            try:
                return _importlib.import_module(f".{name}", __name__)
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":
                    raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__, "emulator", "testing", "webhooks"})


MODEL_SPECS: "_Mapping[str, ModelSpec]"  # ``_specs.MODEL_SPECS``, on first use
"""The rules of every model this SDK knows, by name; other models get generic checks only."""


# No NullHandler on "apimart_async" (issue 21): with one, a program that configures no logging
# (a bare script) or only its own loggers (uvicorn's default config) never sees the WARNINGs
# it must act on, as Python's last-resort handler (WARNING and up, to stderr) is used only
# when no handler at all is found. The SDK logs at WARNING only what a user must act on; an
# application still decides: any handler it configures takes over, and
# ``logging.getLogger("apimart_async").setLevel(...)`` quietens the SDK.

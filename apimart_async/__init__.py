"""apimart-async: an asyncio SDK for APIMart's video-generation API.

Submit fast, watch cheaply, never pay twice, never lose a job. See README.md.
"""

import importlib as _importlib
import typing as _typing

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
from ._poll_schedule import PollPolicy
from ._references import LocalFile, UploadStats
from ._retry import set_testing
from ._specs import MODEL_SPECS as _MODEL_SPECS
from ._specs import IntRange, ModelSpec
from ._sync import Apimart, SyncBatch, SyncTasks, SyncUploads, SyncVideos
from ._version import __version__ as _version

MODEL_SPECS = _MODEL_SPECS
"""The rules of every model this SDK knows, by name; other models get generic checks only."""
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
    "__version__",
    "read_jobs",
    "set_testing",
]

if _typing.TYPE_CHECKING:
    from . import emulator as emulator
    from . import testing as testing
else:

    def __getattr__(name: str) -> object:
        # ``apimart_async.emulator`` and ``apimart_async.testing`` after a plain
        # ``import apimart_async``, imported on first use (neither costs anything before).
        if name in ("emulator", "testing"):
            return _importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# No NullHandler on "apimart_async" (issue 21): with one, a program that configures no logging
# (a bare script) or only its own loggers (uvicorn's default config) never sees the WARNINGs
# it must act on, as Python's last-resort handler (WARNING and up, to stderr) is used only
# when no handler at all is found. The SDK logs at WARNING only what a user must act on; an
# application still decides: any handler it configures takes over, and
# ``logging.getLogger("apimart_async").setLevel(...)`` quietens the SDK.

"""What the service hands back, as models: ``Task`` (with its ``TaskStatus``, ``Video``s and
``TaskError``), ``Balance``, ``UploadedImage``, and the ``DownloadedFile`` of a fetched video.
Data only: they import nothing of the SDK, so the errors can carry them."""

from __future__ import annotations

import enum
import math
from typing import Any

import attrs

__all__ = [
    "Balance",
    "DownloadedFile",
    "Task",
    "TaskError",
    "TaskStatus",
    "UploadedImage",
    "Video",
]


class TaskStatus(enum.StrEnum):
    """A task's status, a ``str``: ``task.status == "completed"`` holds and it prints as
    ``completed``. ``UNKNOWN`` stands for any value this SDK has never seen (counted as still
    running); ``Task.raw_status`` keeps the string the service sent.

    Words other clients have seen map onto these: ``success``/``succeeded`` are COMPLETED,
    ``failure``/``error`` FAILED, ``canceled`` CANCELLED; ``expired`` ends a task, not ok.
    """

    SUBMITTED = "submitted"
    """Accepted, not started yet."""
    PENDING = "pending"
    """Queued at the service."""
    PROCESSING = "processing"
    """Being generated."""
    IN_PROGRESS = "in_progress"
    """Being generated (another spelling the service uses)."""
    COMPLETED = "completed"
    """Finished with videos: terminal."""
    FAILED = "failed"
    """Finished without videos (``Task.error`` says why): terminal."""
    CANCELLED = "cancelled"
    """Cancelled: terminal."""
    EXPIRED = "expired"
    """The result is gone: terminal, not ok."""
    UNKNOWN = "unknown"
    """A status this SDK does not know; treated as still running."""

    @classmethod
    def parse(cls, value: str) -> TaskStatus:
        """The member for a status string as the service sends it (case and spaces ignored);
        ``UNKNOWN`` for a value never seen."""
        member = _BY_WORD.get(value)  # as sent, most often
        if member is not None:
            return member
        return _BY_WORD.get(value.strip().lower(), cls.UNKNOWN)

    @property
    def is_terminal(self) -> bool:
        """True for ``COMPLETED``, ``FAILED`` and ``CANCELLED``: the task will not change."""
        return self in _TERMINAL


_TERMINAL = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.EXPIRED}
)
#: Status words seen in other clients of the service, and the status each one means.
_STATUS_SYNONYMS: dict[str, str] = {
    "success": "completed",
    "succeeded": "completed",
    "failure": "failed",
    "error": "failed",
    "canceled": "cancelled",
}
#: Every status word read, and its member (a dict look-up: an enum call costs more).
_BY_WORD: dict[str, TaskStatus] = {
    **{status.value: status for status in TaskStatus},
    **{word: TaskStatus(status) for word, status in _STATUS_SYNONYMS.items()},
}


@attrs.frozen
class Video:
    """One result video: its URLs (usually one) and when they expire (Unix seconds)."""

    urls: tuple[str, ...] = ()
    """Where to fetch the file (usually one URL)."""
    expires_at: int | None = None
    """When the URLs stop working, in Unix seconds (None: not said)."""

    @property
    def url(self) -> str | None:
        """The first URL, or None."""
        return self.urls[0] if self.urls else None

    def is_expired(self, now: float) -> bool:
        """Whether the URLs have expired at ``now`` (Unix seconds)."""
        return self.expires_at is not None and now >= self.expires_at

    def to_dict(self) -> dict[str, Any]:
        """``{"urls": [...], "expires_at": ...}``, ready for ``json.dumps``."""
        return {"urls": list(self.urls), "expires_at": self.expires_at}


@attrs.frozen
class TaskError:
    """Why a task failed. ``code`` may be an int or a string, as the service sends it."""

    code: int | str | None = None
    """The service's error code."""
    message: str | None = None
    """A human-readable reason."""
    type: str | None = None
    """The service's error type, e.g. ``"content_policy_violation"``."""

    def to_dict(self) -> dict[str, Any]:
        """``{"code", "message", "type"}``, ready for ``json.dumps``."""
        return {"code": self.code, "message": self.message, "type": self.type}


@attrs.frozen
class Task:
    """A generation task as the status endpoints report it."""

    id: str
    """The task id (``task_...``)."""
    status: TaskStatus
    """Where the task is in its life."""
    progress: int | None = None
    """Percent done (0 to 100), when the service says."""
    estimated_time: float | None = None
    """The service's estimate of the whole run, in seconds."""
    actual_time: float | None = None
    """How long the run took, in seconds (finished tasks)."""
    created: int | None = None
    """When the task was created, in Unix seconds."""
    completed: int | None = None
    """When the task finished, in Unix seconds."""
    cost: float | None = None
    """What the task cost, in USD."""
    credits_cost: float | None = None
    """What the task cost, in credits."""
    videos: tuple[Video, ...] = ()
    """The result videos (completed tasks)."""
    error: TaskError | None = None
    """Why the task failed (failed tasks)."""
    raw_status: str = attrs.field(default="", eq=False)
    """The status string as the service sent it (differs from ``status.value`` for UNKNOWN)."""

    @property
    def is_terminal(self) -> bool:
        """True once the task can no longer change (completed, failed or cancelled)."""
        return self.status.is_terminal

    @property
    def ok(self) -> bool:
        """True when the task completed."""
        return self.status is TaskStatus.COMPLETED

    @property
    def video_urls(self) -> list[str]:
        """Every URL of every result video, in order."""
        return [url for video in self.videos for url in video.urls]

    def to_dict(self) -> dict[str, Any]:
        """The task as plain JSON values (e.g. a web handler's response): ``status`` as its
        string, ``videos`` as ``{"urls", "expires_at"}``, ``video_urls`` flattened, ``error``
        as ``{"code", "message", "type"}`` or None."""
        return {
            "id": self.id,
            "status": str(self.status.value),
            "raw_status": self.raw_status,
            "progress": self.progress,
            "estimated_time": self.estimated_time,
            "actual_time": self.actual_time,
            "created": self.created,
            "completed": self.completed,
            "cost": self.cost,
            "credits_cost": self.credits_cost,
            "videos": [video.to_dict() for video in self.videos],
            "video_urls": self.video_urls,
            "error": self.error.to_dict() if self.error is not None else None,
        }


@attrs.frozen
class Balance:
    """Remaining and used money (USD) and credits. ``remain_balance`` is -1 when unlimited."""

    remain_balance: float
    """Money left, in USD (-1: unlimited)."""
    used_balance: float = 0.0
    """Money spent so far, in USD."""
    remain_credits: float | None = None
    """Credits left, when the account has credits."""
    used_credits: float | None = None
    """Credits spent so far."""
    unlimited_quota: bool = False
    """True when the account has no spending limit."""
    message: str = ""
    """The service's message, if any."""

    @property
    def unlimited(self) -> bool:
        """True when the account has no spending limit."""
        return self.unlimited_quota or self.remain_balance == -1

    def covers(self, amount: float) -> bool:
        """Whether ``amount`` USD can be spent."""
        return self.unlimited or (math.isfinite(amount) and self.remain_balance >= amount)


@attrs.frozen
class DownloadedFile:
    """A result file on disk: its path, size, sha256, and the URL it was fetched from."""

    path: str
    """Where the file is."""
    bytes: int
    """Its size in bytes."""
    sha256: str
    """The hex sha256 of its content."""
    url: str = ""
    """The URL it was downloaded from."""

    def to_dict(self) -> dict[str, Any]:
        """``{"path", "bytes", "sha256", "url"}``, ready for ``json.dumps``."""
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256, "url": self.url}


@attrs.frozen
class UploadedImage:
    """An uploaded image: ``url`` lives 72 h and can go into ``image_urls``."""

    url: str
    """The image's URL, for ``VideoRequest.image_urls``."""
    filename: str | None = None
    """The file name the service recorded."""
    content_type: str | None = None
    """The image's MIME type."""
    bytes: int | None = None
    """Its size in bytes."""
    created_at: int | None = None
    """When it was uploaded, in Unix seconds."""

"""The emulated service's state: clock, tasks and their lifecycle, idempotency, money, counters.

Plain synchronous code; the aiohttp handlers in ``_routes`` and the controls in ``_server`` call it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import heapq
import importlib.resources
import json
import random
import struct
import time
from collections.abc import Callable
from typing import Any, Final, Literal

import attrs

from ._realistic import Curve, RealisticProfile
from ._rules import price

__all__ = ["SAMPLE_VIDEO", "Clock", "EmuTask", "IdemRecord", "State", "file_bytes"]

Mode = Literal["auto", "manual"]
TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PATTERN_SIZE: Final = 1 << 20
_MP4_HEAD: Final = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"

#: A real video (4.3 KB): 3 s of moving colour gradients, 480x270, 15 fps, VP9 in MP4 with the
#: metadata first, no audio. VP9 plays in Chromium (also Debian's, which has no H.264),
#: Firefox and Safari. Made with ffmpeg 5.1 (Debian 12) by:
#:   ffmpeg -f lavfi -i "gradients=s=480x270:r=15:d=3:speed=0.03:c0=0x1d4ed8:c1=0xf97316:\
#:     c2=0x10b981:nb_colors=3:seed=7" -c:v libvpx-vp9 -crf 45 -b:v 0 -deadline good \
#:     -cpu-used 1 -g 45 -pix_fmt yuv420p -an -map_metadata -1 -fflags +bitexact \
#:     -flags:v +bitexact -movflags +faststart -f mp4 sample.mp4
SAMPLE_VIDEO: Final = (
    importlib.resources.files(__package__ or "apimart_async.emulator") / "sample.mp4"
).read_bytes()


class Clock:
    """Unix time of the emulated service. Runs with real time unless ``frozen``; ``advance()``
    moves it forward at once (tasks whose time has come finish at the next look).

    ``scale`` compresses time: with ``scale=20`` one real second is 20 s of the service. A
    client that should schedule on the same time reads ``monotonic()`` (and ``now()`` for wall
    time) and divides its real waits by ``scale``."""

    def __init__(
        self, *, frozen: bool = False, start: float | None = None, scale: float = 1.0
    ) -> None:
        if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
            raise ValueError(f"time_scale must be a positive number, got {scale!r}")
        self.frozen = frozen
        self.scale: float = float(scale)
        self._base = time.time() if start is None else start
        self._mono0 = time.monotonic()
        self._offset = 0.0

    def now(self) -> float:
        """The emulated Unix time."""
        running = 0.0 if self.frozen else (time.monotonic() - self._mono0) * self.scale
        return self._base + running + self._offset

    def monotonic(self) -> float:
        """Seconds of the emulator's time since it started (``advance()`` included)."""
        return self.now() - self._base

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward at once."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._offset += seconds

    def resume_from(self, when: float) -> None:
        """After a restart at the time the service had reached (``when``): a frozen clock goes
        on from exactly there; a running one never runs behind it, and the real time that
        passed while the emulator was down has passed for its tasks too (as at the service)."""
        behind = when - self.now()
        if self.frozen or behind > 0:
            self._offset += behind


@attrs.define
class EmuTask:
    id: str
    model: str
    body: dict[str, Any]
    created: float
    duration: float
    estimated: int
    price: float
    will_fail: bool
    idempotency_key: str | None
    status: str = "submitted"
    progress: int = 0
    finished_at: float | None = None
    cost: float | None = None
    error: dict[str, Any] | None = None
    expires_at: int | None = None
    videos: int = 1
    #: The realistic profile's progress curve, or None (the default straight line).
    curve: Curve | None = None


@attrs.define
class IdemRecord:
    body_hash: str
    task_id: str | None = None
    in_progress: bool = True


def _pattern(seed: int) -> bytes:
    return random.Random(seed).randbytes(_PATTERN_SIZE)


@functools.lru_cache(maxsize=64)
def _file_head(size: int) -> bytes:
    """The fixed start of every result file of ``size`` bytes: the sample video and the header
    of a ``free`` box that fills the rest (players skip it), or, when the sample does not fit,
    just an MP4 ``ftyp`` box (a file of that size cannot be a real video)."""
    free = size - len(SAMPLE_VIDEO)
    if free < 32:  # room for the box header and some bytes that differ per task
        return _MP4_HEAD
    if free <= 0xFFFFFFFF:
        return SAMPLE_VIDEO + struct.pack(">I4s", free, b"free")
    return SAMPLE_VIDEO + struct.pack(">I4sQ", 1, b"free", free)  # 64-bit "largesize"


def file_bytes(pattern: bytes, task_id: str, start: int, end: int, size: int) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of a task's result file of ``size`` bytes: a
    playable MP4 (``SAMPLE_VIDEO``), then a ``free`` box holding a pseudo-random pattern
    shifted by the task id, so files differ and are cheap to make at any size."""
    head = _file_head(size)
    out = bytearray()
    if start < len(head):
        out += head[start : min(end, len(head))]
        start = len(head)
    if start >= end:
        return bytes(out)
    shift = int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big")
    psize = len(pattern)
    pos = (start + shift) % psize
    remaining = end - start
    while remaining > 0:
        take = min(remaining, psize - pos)
        out += pattern[pos : pos + take]
        remaining -= take
        pos = 0
    return bytes(out)


class State:
    """Everything the emulated service knows."""

    def __init__(
        self,
        *,
        api_key: str,
        mode: Mode,
        task_duration: float | tuple[float, float],
        estimate_error: float,
        failure_rate: float,
        seed: int,
        balance: float | None,
        video_bytes: int,
        video_ttl: float,
        task_ttl: float,
        clock: Clock,
        blocked_words: tuple[str, ...],
        status_names: dict[str, str] | None = None,
        profile: RealisticProfile | None = None,
    ) -> None:
        self.api_key = api_key
        #: The realistic profile, or None for the default one.
        self.profile = profile
        self.mode: Mode = mode
        self.task_duration = task_duration
        self.estimate_error = estimate_error
        self.failure_rate = failure_rate
        self.rng: random.Random = random.Random(seed)
        self.unlimited: bool = balance is None
        self.remain_balance: float = 0.0 if balance is None else float(balance)
        self.used_balance: float = 0.0
        self.video_bytes = video_bytes
        self.video_ttl = video_ttl
        self.task_ttl = task_ttl
        self.clock = clock
        self.blocked_words = blocked_words
        #: The service's word for each status (a variant: ``{"completed": "success"}``).
        self.status_names: dict[str, str] = dict(status_names or {})
        self.pattern: bytes = _pattern(seed)
        self.tasks: dict[str, EmuTask] = {}
        self.idempotency: dict[str, IdemRecord] = {}
        self.uploads: dict[str, tuple[str, bytes, float]] = {}
        #: Seconds an uploaded image's URL lives [docs: 72 h].
        self.upload_ttl: float = 72 * 3600.0
        self._due: list[tuple[float, str]] = []
        self.unfinished: int = 0
        # -- counters --
        self.requests: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.tasks_per_key: collections.Counter[str] = collections.Counter()
        self.uploads_per_hash: collections.Counter[str] = collections.Counter()
        self.submits_without_key: int = 0
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.max_in_flight: collections.Counter[str] = collections.Counter()
        self.max_unfinished: int = 0
        self.file_requests_with_auth = 0
        self.finished_log: list[str] = []
        #: Called with a task each time it is created or changes (the state file's hook).
        self.on_change: Callable[[EmuTask], None] | None = None
        #: Called with an uploaded image's name once it is stored (the state file keeps it).
        self.on_upload: Callable[[str], None] | None = None
        self.seed = seed

    def _changed(self, task: EmuTask) -> None:
        if self.on_change is not None:
            self.on_change(task)

    def restore(self, tasks: dict[str, EmuTask], *, keep_for: float) -> None:
        """Take over the tasks of an earlier run (from a state file): their idempotency keys
        answer again, unfinished ones go on (auto mode: they end when their time comes, which
        may already have passed), and tasks older than ``keep_for`` seconds are dropped."""
        now = self.clock.now()
        for task in sorted(tasks.values(), key=lambda t: t.created):
            if now - task.created > keep_for:
                continue
            self.tasks[task.id] = task
            if task.idempotency_key is None:
                self.submits_without_key += 1
            else:
                self.tasks_per_key[task.idempotency_key] += 1
                self.idempotency[task.idempotency_key] = IdemRecord(
                    self.body_hash(task.body), task.id, in_progress=False
                )
            if task.status in TERMINAL:
                continue
            self.unfinished += 1
            if self.mode == "auto":
                heapq.heappush(self._due, (task.created + task.duration, task.id))
        self.max_unfinished = max(self.max_unfinished, self.unfinished)
        done = [t for t in self.tasks.values() if t.status in TERMINAL]
        self.finished_log = [t.id for t in sorted(done, key=lambda t: t.finished_at or 0.0)]

    # -- ids and helpers ---------------------------------------------------------------------

    def new_task_id(self) -> str:
        millis = int(self.clock.now() * 1000)
        head = "".join(_CROCKFORD[(millis >> (5 * i)) & 31] for i in reversed(range(10)))
        while True:  # unique also against the tasks of an earlier run (same seed)
            tail = "".join(self.rng.choice(_CROCKFORD) for _ in range(16))
            if f"task_{head}{tail}" not in self.tasks:
                return f"task_{head}{tail}"

    @staticmethod
    def body_hash(body: Any) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def _sample_duration(self) -> float:
        d = self.task_duration
        if isinstance(d, tuple):
            return self.rng.uniform(d[0], d[1])
        return float(d)

    def can_pay(self, amount: float) -> bool:
        return self.unlimited or self.remain_balance + 1e-9 >= amount

    # -- lifecycle ---------------------------------------------------------------------------

    def create_task(
        self, model: str, params: dict[str, Any], body: dict[str, Any], key: str | None
    ) -> EmuTask:
        now = self.clock.now()
        curve: Curve | None = None
        if self.profile is not None:
            duration, estimate, curve = self.profile.draw(
                self.rng, model, params.get("duration", body.get("duration"))
            )
        else:
            duration = self._sample_duration()
            err = self.estimate_error
            estimate = (
                max(1, round(duration * self.rng.uniform(1 - err, 1 + err))) if duration > 0 else 1
            )
        amount = price(model, params)
        task = EmuTask(
            id=self.new_task_id(),
            model=model,
            body=body,
            created=now,
            duration=duration,
            estimated=estimate,
            price=amount,
            will_fail=self.rng.random() < self.failure_rate,
            idempotency_key=key,
            curve=curve,
        )
        self.tasks[task.id] = task
        if key is None:
            self.submits_without_key += 1
        else:
            self.tasks_per_key[key] += 1
        if not self.unlimited:
            self.remain_balance -= amount
        self.used_balance += amount
        self.unfinished += 1
        self.max_unfinished = max(self.max_unfinished, self.unfinished)
        prompt = body.get("prompt")
        if isinstance(prompt, str) and any(w in prompt for w in self.blocked_words):
            self._finish(
                task,
                now,
                failed={
                    "code": "content_policy_violation",
                    "message": "The prompt was rejected by moderation",
                    "type": "moderation_error",
                },
            )
        elif self.mode == "auto":
            heapq.heappush(self._due, (now + duration, task.id))
        self._changed(task)
        return task

    def sweep(self) -> list[EmuTask]:
        """Finish every auto-mode task whose time has come; returns them."""
        now = self.clock.now()
        done: list[EmuTask] = []
        while self._due and self._due[0][0] <= now:
            when, task_id = heapq.heappop(self._due)
            task = self.tasks.get(task_id)
            if task is None or task.status in TERMINAL:
                continue
            if task.will_fail:
                self._finish(
                    task,
                    when,
                    failed={
                        "code": "generation_failed",
                        "message": "Video generation failed",
                        "type": "task_error",
                    },
                )
            else:
                self._finish(task, when)
            done.append(task)
        return done

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None

    def _finish(
        self,
        task: EmuTask,
        when: float,
        *,
        failed: dict[str, Any] | None = None,
        status: str | None = None,
    ) -> None:
        task.finished_at = when
        self.unfinished -= 1
        if failed is not None or status == "cancelled":
            task.status = status or "failed"
            task.error = failed
            task.cost = 0.0
            if not self.unlimited:
                self.remain_balance += task.price
            self.used_balance -= task.price
        else:
            task.status = "completed"
            task.progress = 100
            task.cost = task.price
            task.expires_at = int(when + self.video_ttl)
        self.finished_log.append(task.id)
        self._changed(task)

    def status_of(self, task: EmuTask) -> tuple[str, int]:
        """(status, progress) now; auto-mode tasks move with the clock."""
        if task.status in TERMINAL or self.mode == "manual":
            return task.status, task.progress
        age = self.clock.now() - task.created
        if task.curve is not None:
            status, progress = task.curve.status(age)
            # the clock may have passed the end before the sweep finished the task
            return ("processing", 99) if status == "completed" else (status, progress)
        frac = age / task.duration if task.duration > 0 else 1.0
        if frac < 0.05:
            return "submitted", 0
        if frac < 0.15:
            return "pending", 0
        return "processing", min(99, int(frac * 100))

    def expired(self, task: EmuTask) -> bool:
        return self.clock.now() - task.created > self.task_ttl

    # -- manual control ----------------------------------------------------------------------

    def get(self, task_id: str) -> EmuTask:
        try:
            return self.tasks[task_id]
        except KeyError:
            raise KeyError(f"no task {task_id!r} at the emulator") from None

    def unfinished_task(self, task_id: str) -> EmuTask:
        task = self.get(task_id)
        if task.status in TERMINAL:
            raise ValueError(f"task {task_id} already ended ({task.status})")
        return task

    def set_running(self, task_id: str, progress: int = 0, status: str = "processing") -> None:
        task = self.unfinished_task(task_id)
        task.status = status
        task.progress = progress
        self._changed(task)

    def complete(self, task_id: str, *, videos: int = 1) -> None:
        """End a task ``completed``; ``videos=0`` plays a completed task with no result URL."""
        task = self.unfinished_task(task_id)
        task.videos = videos
        self._finish(task, self.clock.now())

    def fail(
        self,
        task_id: str,
        *,
        code: int | str = "generation_failed",
        message: str = "Video generation failed",
        type: str = "task_error",
    ) -> None:
        task = self.unfinished_task(task_id)
        self._finish(
            task, self.clock.now(), failed={"code": code, "message": message, "type": type}
        )

    def cancel(self, task_id: str) -> None:
        task = self.unfinished_task(task_id)
        self._finish(task, self.clock.now(), status="cancelled")

    # -- the wire shape ----------------------------------------------------------------------

    def task_object(self, task: EmuTask, base_url: str) -> dict[str, Any]:
        status, progress = self.status_of(task)
        obj: dict[str, Any] = {
            "id": task.id,
            "status": self.status_names.get(status, status),
            "progress": progress,
            "created": int(task.created),
            "estimated_time": task.estimated,
        }
        if status in TERMINAL and task.finished_at is not None:
            obj["completed"] = int(task.finished_at)
            obj["actual_time"] = max(0, round(task.finished_at - task.created))
            obj["cost"] = task.cost
            obj["credits_cost"] = round((task.cost or 0.0) * 10, 4)
        if status == "completed":
            obj["result"] = {
                "videos": [
                    {"url": [f"{base_url}/files/{task.id}/{n}.mp4"], "expires_at": task.expires_at}
                    for n in range(task.videos)
                ]
            }
        if status == "failed" and task.error is not None:
            obj["error"] = task.error
        return obj

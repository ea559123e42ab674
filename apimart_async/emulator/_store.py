"""The emulator's state file: the service's memory across restarts of the emulator.

JSON lines. The first line is a header (format version, the seed and file size that make
result files, the clock, the balance, the random generator); then one line per task each time
it changes (created, running, finished), the last line of a task winning. Each change is
appended and flushed before the reply that reveals it is sent, so a task id a client has seen
survives even a killed process; a cut last line is ignored. Opening and closing rewrite the
file compactly (one line per task) through a temporary file and an atomic rename.

Kept: tasks (with their bodies, timings, results), the balance, idempotency keys (rebuilt from
the tasks), the clock, uploaded images until their URLs expire (one line each, the bytes in
base64: a client's journal keeps their URLs for a re-run). Not kept: request counters, injected
faults.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, Final

import attrs

from ._json import is_array, is_object
from ._realistic import Curve
from ._state import Clock, EmuTask, State, _pattern


def _tuple(value: Any) -> Any:
    """A JSON array as the tuple a ``Curve`` field holds; anything else as it is."""
    return tuple(value) if is_array(value) else value


__all__ = ["FORMAT", "Snapshot", "StateFile"]

Upload = tuple[str, bytes, float]
"""An uploaded image: its content type, its bytes, when it was uploaded."""

#: The header's key, with the format version as its value.
FORMAT: Final = "apimart_emulator_state"
VERSION: Final = 1


@attrs.define
class Snapshot:
    """What a state file holds."""

    seed: int
    video_bytes: int
    now: float
    unlimited: bool
    remain_balance: float
    used_balance: float
    rng: Any = None
    #: The port the emulator listened on (its result URLs name it).
    port: int = 0
    tasks: dict[str, EmuTask] = attrs.field(factory=dict[str, EmuTask])
    #: Uploaded images: name -> (content type, bytes, upload time).
    uploads: dict[str, Upload] = attrs.field(factory=dict[str, Upload])


def upload_to_json(name: str, upload: Upload) -> dict[str, Any]:
    content_type, data, at = upload
    return {"name": name, "content_type": content_type, "at": at, "data": _b64(data)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def upload_from_json(data: Any, where: str) -> tuple[str, Upload]:
    try:
        if not is_object(data):
            raise TypeError("not an object")
        upload = (str(data["content_type"]), base64.b64decode(data["data"]), float(data["at"]))
        return str(data["name"]), upload
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not an upload ({exc!r})") from None


def task_to_json(task: EmuTask) -> dict[str, Any]:
    data = attrs.asdict(task, recurse=False)
    if task.curve is not None:  # the realistic profile's progress curve, kept as numbers
        data["curve"] = attrs.asdict(task.curve)
    return data


def task_from_json(data: Any, where: str) -> EmuTask:
    if not is_object(data):
        raise ValueError(f"{where}: a task must be an object")
    try:
        curve = data.get("curve")
        if is_object(curve):
            data = {**data, "curve": Curve(**{k: _tuple(v) for k, v in curve.items()})}
        return EmuTask(**data)
    except TypeError as exc:
        raise ValueError(f"{where}: not a task ({exc})") from None


class StateFile:
    """Reads, appends to and rewrites one state file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._out: IO[str] | None = None

    def load(self) -> Snapshot | None:
        """The file's state, or None if there is no file yet. Raises ValueError (naming the
        file and line) for a file that is not an emulator state file."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"emulator state file {self.path}: cannot read it ({exc})") from None
        lines = text.split("\n")
        complete = lines[:-1]  # the part after the last newline is cut (or empty)
        if not complete:
            if not lines[-1].strip():
                return None
            raise ValueError(f"emulator state file {self.path}: not an emulator state file")
        snap: Snapshot | None = None
        for number, line in enumerate(complete, 1):
            where = f"emulator state file {self.path}, line {number}"
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{where}: not JSON") from None
            if not is_object(record):
                raise ValueError(f"{where}: not an object")
            if snap is None:
                snap = self._header(record, where)
                continue
            if "upload" in record:
                name, upload = upload_from_json(record["upload"], where)
                snap.uploads[name] = upload
                continue
            task = task_from_json(record.get("task"), where)
            snap.tasks[task.id] = task
            self._money(snap, record, where)
        return snap

    def _header(self, record: dict[str, Any], where: str) -> Snapshot:
        if record.get(FORMAT) != VERSION:
            raise ValueError(
                f"{where}: not an emulator state file of version {VERSION} "
                f"(first line has {FORMAT}={record.get(FORMAT)!r})"
            )
        try:
            snap = Snapshot(
                seed=int(record["seed"]),
                video_bytes=int(record["video_bytes"]),
                now=float(record["now"]),
                unlimited=bool(record["unlimited"]),
                remain_balance=0.0,
                used_balance=0.0,
                rng=record.get("rng"),
                port=int(record.get("port") or 0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad header ({exc!r})") from None
        self._money(snap, record, where)
        return snap

    @staticmethod
    def _money(snap: Snapshot, record: dict[str, Any], where: str) -> None:
        try:
            snap.now = max(snap.now, float(record.get("now", snap.now)))
            remain, used = record.get("balance", (snap.remain_balance, snap.used_balance))
            snap.remain_balance, snap.used_balance = float(remain), float(used)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad clock or balance ({exc!r})") from None

    def restore(self, state: State, clock: Clock) -> Snapshot | None:
        """Load the file into ``state`` and ``clock`` (tasks, balance, random generator, the
        seed and file size that made earlier result files); the snapshot, or None if there is
        no file yet."""
        snap = self.load()
        if snap is not None:
            if (snap.seed, snap.video_bytes) != (state.seed, state.video_bytes):
                state.seed, state.video_bytes = snap.seed, snap.video_bytes
                state.pattern = _pattern(snap.seed)
            rng = snap.rng
            if is_array(rng) and len(rng) == 3 and is_array(rng[1]):
                with contextlib.suppress(TypeError, ValueError):
                    state.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
            state.unlimited = snap.unlimited
            state.remain_balance, state.used_balance = snap.remain_balance, snap.used_balance
            clock.resume_from(snap.now)
            state.restore(snap.tasks, keep_for=state.task_ttl)
            now = clock.now()
            for name, upload in snap.uploads.items():
                if now - upload[2] <= state.upload_ttl:
                    state.uploads[name] = upload
        return snap

    # -- writing ---------------------------------------------------------------------------------

    def save(self, state: State, clock: Clock, port: int) -> None:
        """Rewrite the file compactly from ``state`` (atomic); later changes are appended."""
        header = {
            "seed": state.seed,
            "video_bytes": state.video_bytes,
            "now": clock.now(),
            "unlimited": state.unlimited,
            "balance": [state.remain_balance, state.used_balance],
            "rng": state.rng.getstate(),
            "port": port,
        }
        now = clock.now()
        uploads = {n: u for n, u in state.uploads.items() if now - u[2] <= state.upload_ttl}
        self.rewrite(header, list(state.tasks.values()), uploads)

    def rewrite(
        self, header: dict[str, Any], tasks: list[EmuTask], uploads: dict[str, Upload] | None = None
    ) -> None:
        """Replace the file with a header, one line per task and one per upload, atomically
        (temporary file, fsync, rename), and keep it open for appends."""
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                f.write(json.dumps({FORMAT: VERSION, **header}) + "\n")
                for task in tasks:
                    f.write(json.dumps({"task": task_to_json(task)}) + "\n")
                for name, upload in (uploads or {}).items():
                    f.write(json.dumps({"upload": upload_to_json(name, upload)}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        with contextlib.suppress(OSError):  # make the rename itself durable where possible
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._out = self.path.open("a", encoding="utf-8")

    def append(self, task: EmuTask, now: float, balance: tuple[float, float]) -> None:
        """Record one task's new state (and the clock and balance with it)."""
        if self._out is None:
            return
        line = {"task": task_to_json(task), "now": now, "balance": list(balance)}
        self._out.write(json.dumps(line) + "\n")
        self._out.flush()

    def append_upload(self, name: str, upload: Upload) -> None:
        """Record one uploaded image."""
        if self._out is None:
            return
        self._out.write(json.dumps({"upload": upload_to_json(name, upload)}) + "\n")
        self._out.flush()

    def close(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            out.close()

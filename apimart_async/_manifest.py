"""The JSONL manifest of a batch: one line per finished job, flushed as it is written."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import anyio

from ._errors import JournalError
from ._journal import JobRecord
from ._models import DownloadedFile
from ._outcomes import Outcome
from ._threads import run_sync

__all__ = ["Manifest", "manifest_line", "outcome_line", "record_line"]


class Manifest:
    """The JSONL manifest: one line per finished job, flushed as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None
        self._limiter = anyio.CapacityLimiter(1)

    async def _run(self, fn: Callable[[], None]) -> None:
        """``fn`` on a worker thread; the local disk's errors (full, read-only...) become a
        ``JournalError`` naming the manifest and the OS error."""
        try:
            await run_sync(fn, limiter=self._limiter)
        except OSError as exc:
            raise JournalError(
                f"cannot write the manifest {self.path}: {exc.strerror or exc}"
            ) from None

    async def open(self, lines: list[dict[str, Any]]) -> None:
        def run() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = self._fh = self.path.open("w", encoding="utf-8")
            for line in lines:
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            fh.flush()

        await self._run(run)

    async def write(self, line: dict[str, Any]) -> None:
        def run() -> None:
            if self._fh is not None:
                self._fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                self._fh.flush()

        await self._run(run)

    async def replace(self, index: int, line: dict[str, Any]) -> None:
        """Write job ``index``'s line in place of the one the manifest has: the file is
        rewritten without it (a rare path: a job taken up again after it was listed)."""

        def run() -> None:
            if self._fh is None:
                return
            self._fh.flush()
            tmp = self.path.with_name(self.path.name + ".tmp")
            with self.path.open(encoding="utf-8") as old, tmp.open("w", encoding="utf-8") as new:
                for text in old:
                    try:
                        if json.loads(text).get("index") == index:
                            continue
                    except (ValueError, AttributeError):
                        pass
                    new.write(text)
                new.write(json.dumps(line, ensure_ascii=False) + "\n")
            self._fh.close()
            os.replace(tmp, self.path)
            self._fh = self.path.open("a", encoding="utf-8")

        await self._run(run)

    async def close(self) -> None:
        def run() -> None:
            fh, self._fh = self._fh, None
            if fh is not None:
                try:
                    fh.flush()
                    os.fsync(fh.fileno())
                finally:
                    with contextlib.suppress(OSError):  # the flush failed: closed all the same
                        fh.close()

        await self._run(run)


def manifest_line(
    index: int,
    name: str | None,
    body: dict[str, Any] | None,
    task_id: str | None,
    status: str,
    cost: float | None,
    files: tuple[DownloadedFile, ...],
    error: str | None,
    times: tuple[int | None, int | None] = (None, None),
) -> dict[str, Any]:
    return {
        "index": index,
        "name": name,
        "request": body,
        "task_id": task_id,
        "status": status,
        "cost": cost,
        "files": [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in files],
        "error": error,
        # the task's created / completed times at the service (Unix seconds)
        "created": times[0],
        "completed": times[1],
    }


def record_line(record: JobRecord) -> dict[str, Any]:
    """The manifest line of a job a journal holds as done."""
    task = record.task or {}
    return manifest_line(
        record.index,
        record.name,
        record.request,
        record.task_id,
        record.status or "error",
        record.cost,
        record.files,
        record.error,
        (task.get("created"), task.get("completed")),
    )


def outcome_line(outcome: Outcome, status: str) -> dict[str, Any]:
    """The manifest line of an outcome, under its manifest ``status``."""
    task = outcome.task
    return manifest_line(
        outcome.index,
        outcome.name,
        outcome.request.to_body() if outcome.request is not None else None,
        outcome.task_id,
        status,
        task.cost if task is not None else None,
        outcome.files,
        str(outcome.error) if outcome.error is not None else None,
        (task.created, task.completed) if task is not None else (None, None),
    )

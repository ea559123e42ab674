"""The batch journal: a durable record of every job, so a crash never bills twice or loses one.

One row per job, moving through these states, each committed before the step it protects::

    submitting  the idempotency key is stored; the POST may or may not have reached the service
    pending     the task id is known; the task runs at the service
    downloading the task completed (its JSON is stored); files are not all on disk yet
    refused     the service refused the submit in a way that proves no task exists (a 4xx
                other than 408/409/429, or a local validation error)
    done        the outcome is final (completed with files, failed, or the task vanished)

Resuming reads the rows: ``done`` jobs are replayed (never resubmitted; with ``retry_failed``
a failed generation is submitted again, as a new task), ``downloading`` ones fetch what is
missing, ``pending`` ones are re-attached by task id (no POST), ``submitting`` ones are sent
again with the SAME idempotency key (the service returns the original task), and ``refused``
ones are sent again with a FRESH key (no task exists; a service may cache a refusal by key).
A job sent afresh is ``restart``-ed: its row gets the new key and request, state
``submitting``.

Schema 2 added ``refused``; a schema 1 file is migrated when opened (its refused submits were
stored as ``done`` with status ``error`` and no task id). Schema 3 added the table ``priors``
(what completed tasks taught the poll schedule, by kind: ``_priors``); older files get it
when opened.

``Journal`` is the interface the batch engine uses; ``SqliteJournal`` is the default store
(standard library sqlite3 in WAL mode, all calls on one worker thread so the event loop never
blocks). Another store (PostgreSQL for several machines) implements the same protocol.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import anyio.to_thread
import attrs

from ._errors import JournalError
from ._models import DownloadedFile
from ._priors import KindPrior

__all__ = ["JobRecord", "Journal", "SqliteJournal"]

JobState = Literal["submitting", "pending", "refused", "downloading", "done"]
SCHEMA_VERSION = 3


@attrs.frozen
class JobRecord:
    """One job as a journal holds it."""

    index: int
    """The job's position in the input."""
    fingerprint: str
    """``VideoRequest.fingerprint()`` of the job's request."""
    idempotency_key: str
    """The key its submit uses, recorded before the POST."""
    state: JobState
    """``"submitting"``, ``"pending"``, ``"downloading"`` or ``"done"``."""
    name: str | None = None
    """The job's name, for named input items."""
    task_id: str | None = None
    """The task's id, once the submit returned it."""
    status: str | None = None
    """The final status (``"completed"``, ``"failed"``, ``"error"``...), when done."""
    cost: float | None = None
    """What the task cost, in USD."""
    error: str | None = None
    """The error message of a job that did not succeed."""
    error_type: str | None = None
    """The class name of that error."""
    task: dict[str, Any] | None = None
    """The terminal task in its wire form."""
    files: tuple[DownloadedFile, ...] = ()
    """The downloaded files."""
    request: dict[str, Any] | None = None
    """The request body as it was sent (``VideoRequest.to_body()``)."""


class Journal(Protocol):
    """What the batch engine needs from a journal. Every method is durable on return."""

    async def open(self) -> dict[int, JobRecord]:
        """Open (creating if needed) and return every recorded job by index."""
        ...

    async def close(self) -> None:
        """Release the journal; a closed journal can be opened again."""
        ...

    async def add(
        self, index: int, fingerprint: str, key: str, name: str | None, body: dict[str, Any]
    ) -> None:
        """Record a job and its idempotency key (state ``submitting``) before its POST."""
        ...

    async def set_task(self, index: int, task_id: str) -> None:
        """The submit returned ``task_id`` (state ``pending``)."""
        ...

    async def set_downloading(self, index: int, task: dict[str, Any], cost: float | None) -> None:
        """The task completed; its files are still to be fetched."""
        ...

    async def refused(self, index: int, *, error: str, error_type: str) -> None:
        """The submit was refused and no task exists (state ``refused``): a later run sends
        the job again."""
        ...

    async def restart(
        self, index: int, fingerprint: str, key: str, name: str | None, body: dict[str, Any]
    ) -> None:
        """Send a recorded job afresh (refused, failed with ``retry_failed``, or changed
        before it became a task): new key and request, state ``submitting``, the rest cleared."""
        ...

    async def finish(
        self,
        index: int,
        *,
        status: str,
        cost: float | None,
        task: dict[str, Any] | None,
        files: tuple[DownloadedFile, ...],
        error: str | None,
        error_type: str | None,
    ) -> None:
        """The job's outcome is final (state ``done``)."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    idx INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    name TEXT,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    task_id TEXT,
    status TEXT,
    cost REAL,
    error TEXT,
    error_type TEXT,
    task TEXT,
    files TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS priors (
    kind TEXT PRIMARY KEY,
    samples INTEGER NOT NULL,
    duration_lo REAL NOT NULL,
    duration_hi REAL NOT NULL,
    ratio_lo REAL,
    ratio_hi REAL,
    updated_at REAL NOT NULL
);
"""


_SELECT = (
    "SELECT idx, fingerprint, idempotency_key, state, name, task_id, status, cost,"
    " error, error_type, task, files, body FROM jobs"
)


def _records(rows: list[Any], path: Path) -> dict[int, JobRecord]:
    out: dict[int, JobRecord] = {}
    for r in rows:
        try:
            files = tuple(DownloadedFile(**f) for f in json.loads(r[11])) if r[11] else ()
            task = json.loads(r[10]) if r[10] else None
            request = json.loads(r[12]) if r[12] else None
        except (ValueError, TypeError) as exc:
            raise JournalError(
                f"cannot use {path} as a journal: job {r[0]} is unreadable ({exc})"
            ) from None
        out[r[0]] = JobRecord(
            index=r[0],
            fingerprint=r[1],
            idempotency_key=r[2],
            state=r[3],
            name=r[4],
            task_id=r[5],
            status=r[6],
            cost=r[7],
            error=r[8],
            error_type=r[9],
            task=task,
            files=files,
            request=request,
        )
    return out


class SqliteJournal(Journal):
    """The default journal: one SQLite file (WAL), written on a single worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path: Path = Path(path)
        """The database file."""
        self._conn: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"<SqliteJournal {str(self.path)!r} {'open' if self._conn else 'closed'}>"

    async def _run(self, fn: Any, *args: Any) -> Any:
        # abandon_on_cancel=False: a write that has started always finishes (and commits or
        # rolls back as a whole) even if the caller is cancelled, so the file stays consistent.
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- sync parts, run on the worker thread --------------------------------------------------

    def _open_sync(self) -> dict[int, JobRecord]:
        if self._conn is not None:
            raise JournalError(f"{self.path} is already open in this journal")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot use {self.path} as a journal: {exc}") from None
        try:
            records = self._read_sync(conn)
        except BaseException:
            conn.close()  # every path that does not keep the connection closes it
            raise
        self._conn = conn
        return records

    def _read_sync(self, conn: sqlite3.Connection) -> dict[int, JobRecord]:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif not str(row[0]).isdigit():
                raise JournalError(f"cannot use {self.path} as a journal: schema {row[0]!r}")
            elif int(row[0]) > SCHEMA_VERSION:
                raise JournalError(
                    f"{self.path} was written by a newer apimart-async (schema {row[0]})"
                )
            elif int(row[0]) == 1:
                # Schema 1 stored a refused submit as a final error with no task id.
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "UPDATE jobs SET state='refused' WHERE state='done' AND task_id IS NULL"
                    " AND status='error'"
                )
                conn.execute("UPDATE meta SET value='2' WHERE key='schema'")
                conn.execute("COMMIT")
            if row is not None and int(row[0]) < 3:
                # Schema 3 added the table ``priors`` (created above): nothing else changes.
                conn.execute("UPDATE meta SET value='3' WHERE key='schema'")
            rows = conn.execute(_SELECT).fetchall()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot use {self.path} as a journal: {exc}") from None
        return _records(rows, self.path)

    @staticmethod
    def read(path: str | Path) -> dict[int, JobRecord]:
        """Every recorded job by index, read without changing the file (a running batch may
        be writing it). Blocking: call it from a worker thread in async code."""
        path = Path(path)
        try:
            with path.open("rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            raise JournalError(f"cannot read journal {path}: {exc.strerror or exc}") from None
        if head != b"SQLite format 3\x00":
            raise JournalError(f"{path} is not a journal (not an SQLite file)")
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot use {path} as a journal: {exc}") from None
        try:
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            rows = conn.execute(_SELECT).fetchall()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot use {path} as a journal: {exc}") from None
        finally:
            conn.close()
        return _records(rows, path)

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        if self._conn is None:
            raise JournalError("the journal is closed")
        self._conn.execute(sql, args)  # autocommit: one statement, one transaction

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # the WAL is folded in on the next open; the data is already committed
            finally:
                conn.close()

    # -- the protocol --------------------------------------------------------------------------

    async def open(self) -> dict[int, JobRecord]:
        result: dict[int, JobRecord] = await self._run(self._open_sync)
        return result

    async def close(self) -> None:
        await self._run(self._close_sync)

    async def add(
        self, index: int, fingerprint: str, key: str, name: str | None, body: dict[str, Any]
    ) -> None:
        await self._run(
            self._write,
            "INSERT INTO jobs (idx, fingerprint, idempotency_key, name, body, state, updated_at)"
            " VALUES (?, ?, ?, ?, ?, 'submitting', ?)",
            (index, fingerprint, key, name, json.dumps(body, sort_keys=True), time.time()),
        )

    async def set_task(self, index: int, task_id: str) -> None:
        await self._run(
            self._write,
            "UPDATE jobs SET state='pending', task_id=?, updated_at=? WHERE idx=?",
            (task_id, time.time(), index),
        )

    async def set_downloading(self, index: int, task: dict[str, Any], cost: float | None) -> None:
        await self._run(
            self._write,
            "UPDATE jobs SET state='downloading', status='completed', task=?, cost=?, updated_at=?"
            " WHERE idx=?",
            (json.dumps(task), cost, time.time(), index),
        )

    async def refused(self, index: int, *, error: str, error_type: str) -> None:
        await self._run(
            self._write,
            "UPDATE jobs SET state='refused', status='error', error=?, error_type=?,"
            " updated_at=? WHERE idx=?",
            (error, error_type, time.time(), index),
        )

    async def restart(
        self, index: int, fingerprint: str, key: str, name: str | None, body: dict[str, Any]
    ) -> None:
        await self._run(
            self._write,
            "UPDATE jobs SET fingerprint=?, idempotency_key=?, name=?, body=?,"
            " state='submitting', task_id=NULL, status=NULL, cost=NULL, error=NULL,"
            " error_type=NULL, task=NULL, files=NULL, updated_at=? WHERE idx=?",
            (fingerprint, key, name, json.dumps(body, sort_keys=True), time.time(), index),
        )

    # -- issue 22: learned poll priors (``_prior_store.PriorStore``) ------------------------

    def _load_priors_sync(self) -> dict[str, KindPrior]:
        if self._conn is None:
            raise JournalError("the journal is closed")
        try:
            rows = self._conn.execute(
                "SELECT kind, samples, duration_lo, duration_hi, ratio_lo, ratio_hi FROM priors"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot read the priors of {self.path}: {exc}") from None
        out: dict[str, KindPrior] = {}
        for kind, samples, d_lo, d_hi, r_lo, r_hi in rows:
            if not (isinstance(kind, str) and isinstance(samples, int) and samples >= 0):
                continue  # a row nobody could have written: pass over it
            if not _plausible_range(d_lo, d_hi, 0.0):
                continue
            if (r_lo is not None or r_hi is not None) and not _plausible_range(r_lo, r_hi, 1e-9):
                continue
            out[kind] = KindPrior(samples, float(d_lo), float(d_hi), r_lo, r_hi)
        return out

    def _save_priors_sync(self, priors: Mapping[str, KindPrior]) -> None:
        if self._conn is None:
            raise JournalError("the journal is closed")
        now = time.time()
        try:
            self._conn.executemany(
                "INSERT OR REPLACE INTO priors VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (k, p.samples, p.duration_lo, p.duration_hi, p.ratio_lo, p.ratio_hi, now)
                    for k, p in priors.items()
                    if p.samples > 0
                ],
            )
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot store the priors in {self.path}: {exc}") from None

    async def load_priors(self) -> dict[str, KindPrior]:
        """What completed tasks taught the poll schedule, by kind (``_priors``)."""
        result: dict[str, KindPrior] = await self._run(self._load_priors_sync)
        return result

    async def save_priors(self, priors: Mapping[str, KindPrior]) -> None:
        """Store these kinds' priors (replacing what was stored for them)."""
        await self._run(self._save_priors_sync, priors)

    async def finish(
        self,
        index: int,
        *,
        status: str,
        cost: float | None,
        task: dict[str, Any] | None,
        files: tuple[DownloadedFile, ...],
        error: str | None,
        error_type: str | None,
    ) -> None:
        await self._run(
            self._write,
            "UPDATE jobs SET state='done', status=?, cost=?, task=?, files=?, error=?,"
            " error_type=?, updated_at=? WHERE idx=?",
            (
                status,
                cost,
                json.dumps(task) if task is not None else None,
                json.dumps([attrs.asdict(f) for f in files]),
                error,
                error_type,
                time.time(),
                index,
            ),
        )


def _plausible_range(lo: object, hi: object, least: float) -> bool:
    """Whether a stored prior's ``lo``, ``hi`` are numbers a run could have learned: finite,
    ``least <= lo <= hi`` (a row from an edited or foreign file is passed over)."""
    return (
        all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
        and least <= float(lo) <= float(hi) < math.inf  # type: ignore[arg-type]
    )

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
when opened. Schema 4 added the progress trust of each kind to ``priors`` (three columns at
the end of the table); a schema 3 file gets them, empty, when opened. Schema 5 added the table
``submits``: the client's own submits (``AsyncApimart(journal=...)``, ``_client_journal``),
one row per idempotency key; older files get it, empty, when opened.

A journal is checked when opened: it must be one of ours (the row ``format`` of the table
``meta`` says ``apimart-async journal``; files from before that row are recognised by their
tables and get it), of a schema we know, undamaged, with rows that make sense. Anything else
is refused with a ``JournalError`` that names the file and the problem, and left unchanged.

One run at a time: ``SqliteJournal.open`` takes an OS lock (``fcntl.flock``; ``msvcrt`` on
Windows) on the file ``<journal>.lock`` beside it, held until ``close``. It holds the pid and
start time of the run, for the ``JournalLockedError`` a second run gets. The OS drops the
lock when the process ends however it ends (even SIGKILL), so no stale lock is ever left.

``Journal`` is the interface the batch engine uses; ``SqliteJournal`` is the default store
(standard library sqlite3 in WAL mode, all calls on one worker thread so the event loop never
blocks). Another store (PostgreSQL for several machines) implements the same protocol.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast

import anyio
import attrs

from ._errors import JournalError, JournalLockedError
from ._json import is_object
from ._models import DownloadedFile
from ._priors import KindPrior
from ._threads import run_sync

__all__ = ["JobRecord", "Journal", "RunLock", "SqliteJournal"]

T = TypeVar("T")
JobState = Literal["submitting", "pending", "refused", "downloading", "done"]
SCHEMA_VERSION = 5


def _json_text(value: dict[str, Any] | str | None) -> str | None:
    """A record's task or request as JSON text: a mapping is written out; text (a store's own
    column, checked when the store was opened) is kept as it is."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


@attrs.frozen
class JobRecord:
    """One job as a journal holds it.

    ``task`` and ``request`` are kept as JSON text and parsed afresh at each read (a new dict
    each time): a journal of 20,000 finished jobs would otherwise be some 200,000 dicts and
    lists for every full garbage collection to walk, a pause of tens of milliseconds on the
    event loop of whatever runs the batch (issue 21). Construct a record with dicts, as
    before; a ``Journal`` may also pass the JSON text it stores."""

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
    _task: str | None = attrs.field(default=None, alias="task", converter=_json_text)
    files: tuple[DownloadedFile, ...] = ()
    """The downloaded files."""
    _request: str | None = attrs.field(default=None, alias="request", converter=_json_text)

    @property
    def has_task(self) -> bool:
        """Whether a terminal task is recorded (without parsing it, as ``task`` does)."""
        return self._task is not None

    @property
    def task(self) -> dict[str, Any] | None:
        """The terminal task in its wire form."""
        return _parsed(self._task, self.index, "task")

    @property
    def request(self) -> dict[str, Any] | None:
        """The request body as it was sent (``VideoRequest.to_body()``)."""
        return _parsed(self._request, self.index, "request")


def _parsed(text: str | None, index: int, what: str) -> dict[str, Any] | None:
    """A record's JSON text as a dict; text that is not a JSON object (from a ``Journal`` of
    another kind) is a ``JournalError``, as any fault of a journal is."""
    if text is None:
        return None
    value: object = None
    with contextlib.suppress(ValueError, RecursionError):
        value = json.loads(text)
    if not isinstance(value, dict):
        raise JournalError(
            f"the journal's record of job {index} holds a {what} that is not a JSON object"
        )
    return cast("dict[str, Any]", value)


class Journal(Protocol):
    """What the batch engine needs from a journal. Every method is durable on return, and
    fails with a ``JournalError`` that names the store and the problem (the batch turns any
    other exception of a journal into one). ``open`` refuses a store that is not a journal or
    is in use by another run; a write that fails stops the batch (see ``_ledger``)."""

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
    ) -> bool | None:
        """The job's outcome is final (state ``done``). False: it was already (a batch run by
        workers, issue 15: another worker ended it first), and nothing was written."""
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
    updated_at REAL NOT NULL,
    progress_samples INTEGER NOT NULL DEFAULT 0,
    progress_lo REAL,
    progress_hi REAL
);
"""

#: Schema 5: the client's own submits (``_client_journal``), keyed by idempotency key. ``state``
#: is ``submitting`` (key stored before the POST), ``pending`` (task id known), ``refused`` (no
#: task exists) or ``done`` (a wait saw the end: ``status``, and ``task`` in its wire form).
SUBMITS_SCHEMA = """
CREATE TABLE IF NOT EXISTS submits (
    idempotency_key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    model TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    task_id TEXT,
    status TEXT,
    task TEXT,
    error TEXT,
    submitted_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS submits_by_task ON submits (task_id);
CREATE INDEX IF NOT EXISTS submits_by_state ON submits (state);
"""


_SELECT = (
    "SELECT idx, fingerprint, idempotency_key, state, name, task_id, status, cost,"
    " error, error_type, task, files, body FROM jobs"
)


MARKER = "apimart-async journal"
"""The value of the row ``format`` in the table ``meta`` of every journal."""

_KNOWN_SCHEMAS = {str(v) for v in range(1, SCHEMA_VERSION + 1)}
#: The columns schema 4 added to ``priors`` (a kind's progress trust, ``KindPrior``).
_PROGRESS_COLUMNS = (
    "progress_samples INTEGER NOT NULL DEFAULT 0",
    "progress_lo REAL",
    "progress_hi REAL",
)
_STATES = frozenset({"submitting", "pending", "refused", "downloading", "done"})
#: ``uploads``: the URLs of local reference files uploaded once by content (``_upload_cache``);
#: ``submits``: a client journal's submits (``_client_journal``)
_OUR_TABLES = frozenset({"meta", "jobs", "priors", "uploads", "sent_urls", "submits"})
_JOB_COLUMNS = frozenset(
    {
        "idx", "fingerprint", "idempotency_key", "name", "body", "state", "task_id", "status",
        "cost", "error", "error_type", "task", "files", "updated_at",
    }
)  # fmt: skip
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _cannot(path: Path, problem: str) -> JournalError:
    return JournalError(f"cannot use {path} as a journal: {problem}")


def _db_error(path: Path, exc: sqlite3.Error) -> JournalError:
    """A sqlite3 error met while reading a journal, as a ``JournalError``."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return _cannot(path, f"the file is damaged ({exc})")
    return _cannot(path, str(exc))


def _check_header(path: Path) -> None:
    """A file that exists and is not empty must be an SQLite database."""
    try:
        with path.open("rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _cannot(path, exc.strerror or str(exc)) from None
    if head and head != _SQLITE_MAGIC:
        raise _cannot(path, "it is not an SQLite file (not a journal)")


def _inspect(conn: sqlite3.Connection, path: Path) -> str | None:
    """Check that ``conn`` holds one of our journals, undamaged; return its schema version
    (``"1"`` to ``"5"``), or None for an empty database (a new journal). Reads only."""
    tables = sorted(
        name
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        if not name.startswith("sqlite_")
    )
    if not tables:
        return None
    columns = frozenset(
        str(row[1]) for row in (conn.execute("PRAGMA table_info(jobs)") if "jobs" in tables else ())
    )
    if not (
        {"meta", "jobs"} <= set(tables) <= _OUR_TABLES and columns == _JOB_COLUMNS
    ):  # another program's database: it is left as it is
        return _refuse_foreign(path, tables)
    meta_columns = [row[1] for row in conn.execute("PRAGMA table_info(meta)")]
    if meta_columns != ["key", "value"]:
        return _refuse_foreign(path, tables)
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    marker = meta.get("format")
    if marker is not None and marker != MARKER:
        return _refuse_foreign(path, tables)
    schema = meta.get("schema")
    if schema is None:
        raise _cannot(path, "it has no schema version (table meta, row schema)")
    schema = str(schema)
    if schema not in _KNOWN_SCHEMAS:
        if re.fullmatch(r"[0-9]{1,9}", schema) and int(schema) > SCHEMA_VERSION:
            raise JournalError(f"{path} was written by a newer apimart-async (schema {schema})")
        raise _cannot(
            path,
            f"unknown journal schema {schema!r} (known: 1 to {SCHEMA_VERSION})",
        )
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise _cannot(path, f"the file is damaged ({'; '.join(map(str, problems))})")
    return schema


def _refuse_foreign(path: Path, tables: list[str]) -> str:
    raise _cannot(
        path,
        f"it is not an apimart-async journal (another program's database; tables:"
        f" {', '.join(tables)}); it was left unchanged: give the batch another file",
    )


def _json(text: Any, what: str, kind: type) -> Any:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"{what} is not JSON text")
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(f"{what} is not valid JSON") from None
    if not isinstance(value, kind):
        raise ValueError(f"{what} is not a JSON {'object' if kind is dict else 'list'}")
    return value


def _file(value: object) -> DownloadedFile:
    if not is_object(value) or not {"path", "bytes", "sha256"} <= set(value) <= {
        "path",
        "bytes",
        "sha256",
        "url",
    }:
        raise ValueError("files: an entry is not a file (path, bytes, sha256, url)")
    ok = (
        isinstance(value["path"], str)
        and isinstance(value["bytes"], int)
        and not isinstance(value["bytes"], bool)
        and isinstance(value["sha256"], str)
        and isinstance(value.get("url", ""), str)
    )
    if not ok:
        raise ValueError("files: an entry has a field of the wrong type")
    return DownloadedFile(**value)


def _record(r: Any) -> JobRecord:
    """One row as a ``JobRecord``; ``ValueError`` says what is wrong with it."""
    idx, fingerprint, key, state, name, task_id, status, cost, error, error_type = r[:10]
    if state not in _STATES:
        raise ValueError(f"unknown state {state!r}")
    for what, value in [("fingerprint", fingerprint), ("idempotency_key", key)]:
        if not isinstance(value, str):
            raise ValueError(f"{what} is not text")
    for what, value in [
        ("name", name), ("task_id", task_id), ("status", status), ("error", error),
        ("error_type", error_type),
    ]:  # fmt: skip
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{what} is not text")
    if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float))):
        raise ValueError("cost is not a number")
    if state in ("pending", "downloading") and task_id is None:
        raise ValueError(f"state {state!r} without a task id")
    _json(r[10], "task", dict)  # checked; the record keeps the text (``JobRecord``)
    files = _json(r[11], "files", list)
    if _json(r[12], "body", dict) is None:
        raise ValueError("body is missing")
    return JobRecord(
        index=idx,
        fingerprint=fingerprint,
        idempotency_key=key,
        state=state,
        name=name,
        task_id=task_id,
        status=status,
        cost=cost,
        error=error,
        error_type=error_type,
        task=r[10],
        files=tuple(_file(f) for f in files or ()),
        request=r[12],
    )


def _records(rows: list[Any], path: Path) -> dict[int, JobRecord]:
    out: dict[int, JobRecord] = {}
    for r in rows:
        if not isinstance(r[0], int):
            raise _cannot(path, f"a job has the index {r[0]!r}, not a number")
        try:
            out[r[0]] = _record(r)
        except (ValueError, TypeError) as exc:
            raise _cannot(path, f"job {r[0]} is unreadable: {exc}") from None
    return out


# -- one run per journal: an OS lock on <journal>.lock -------------------------------------------


def lock_path(path: Path) -> Path:
    """The lock file of the journal ``path``."""
    return path.with_name(path.name + ".lock")


if sys.platform == "win32":  # pragma: no cover - not tested on Windows
    import msvcrt

    _FAR = 1 << 30  # lock a byte far past the holder's note, so others can still read it

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _FAR, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def _holder(path: Path) -> tuple[int | None, float | None]:
    """The pid and start time the holding run wrote into its lock file, if it did yet."""
    try:
        note: object = json.loads(path.read_text(encoding="utf-8").strip() or "{}")
    except (OSError, ValueError):
        return None, None
    if not is_object(note):
        return None, None
    pid, started = note.get("pid"), note.get("started")
    return (
        pid if isinstance(pid, int) else None,
        float(started) if isinstance(started, (int, float)) else None,
    )


def _real(path: Path) -> Path:
    """``path`` with its symlinks followed (as far as they lead)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: opening it fails with a clear error
        return path


class RunLock:
    """An OS lock held by one run for as long as it uses a journal (see the module doc)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(
        cls, target: Path, *, what: str = "journal", lock_file: Path | None = None
    ) -> RunLock:
        """Take the lock of ``target`` (a journal; or, with ``what`` and ``lock_file``,
        something else) now, or raise ``JournalLockedError`` naming the run that holds it.
        Never waits."""
        path = lock_file if lock_file is not None else lock_path(target)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise JournalError(
                    f"cannot lock the {what} {target}: {path}: {exc.strerror or exc}"
                ) from None
            try:
                if not _try_lock(fd):
                    pid, started = _holder(path)
                    raise JournalLockedError(str(target), pid, started, what=what)
                # The run that held it may have removed the file as it let go: the lock then
                # guards nothing; take the one on the file now there.
                try:
                    st, now = os.fstat(fd), os.stat(path)
                    same = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
                except FileNotFoundError:
                    same = False
                if same:
                    note = json.dumps({"pid": os.getpid(), "started": time.time()})
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.write(fd, note.encode() + b"\n")
                    return cls(path, fd)
            except BaseException as exc:
                os.close(fd)
                if isinstance(exc, OSError):
                    raise JournalError(
                        f"cannot lock the {what} {target}: {path}: {exc.strerror or exc}"
                    ) from None
                raise
            os.close(fd)

    def release(self) -> None:
        """Let go (removing the file first, while still holding it); harmless twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):  # e.g. on Windows, or gone: the file is harmless
            os.unlink(self.path)
        os.close(fd)


class SqliteJournal(Journal):
    """The default journal: one SQLite file (WAL), written on a single worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path: Path = Path(path)
        """The database file."""
        self._conn: sqlite3.Connection | None = None
        self._lock: RunLock | None = None
        self._limiter = anyio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"<SqliteJournal {str(self.path)!r} {'open' if self._conn else 'closed'}>"

    async def _run(self, fn: Any, *args: Any) -> Any:
        # abandon_on_cancel=False: a write that has started always finishes (and commits or
        # rolls back as a whole) even if the caller is cancelled, so the file stays consistent.
        return await run_sync(fn, *args, limiter=self._limiter)

    # -- sync parts, run on the worker thread --------------------------------------------------

    def _open_sync(self) -> dict[int, JobRecord]:
        if self._conn is not None:
            raise JournalError(f"{self.path} is already open in this journal")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cannot(self.path, exc.strerror or str(exc)) from None
        # one run at a time, before the file is even read; the lock sits beside the file
        # itself, so a symlink to the journal is locked as the journal
        lock = RunLock.acquire(self.path, lock_file=lock_path(_real(self.path)))
        try:
            _check_header(self.path)
            try:
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            except sqlite3.Error as exc:
                raise _db_error(self.path, exc) from None
            try:
                records = self._read_sync(conn)
            except BaseException:
                conn.close()  # every path that does not keep the connection closes it
                raise
        except BaseException:
            lock.release()
            raise
        self._conn = conn
        self._lock = lock
        return records

    def _read_sync(self, conn: sqlite3.Connection) -> dict[int, JobRecord]:
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            schema = _inspect(conn, self.path)  # nothing is written before this check
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if schema is None:  # a new journal
                conn.execute("BEGIN IMMEDIATE")
                for statement in (_SCHEMA + SUBMITS_SCHEMA).split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                conn.execute("INSERT INTO meta VALUES ('format', ?)", (MARKER,))
                conn.execute("COMMIT")
            elif schema != str(SCHEMA_VERSION) or self._needs_marker(conn):
                self._migrate(conn, schema)
            rows = conn.execute(_SELECT).fetchall()
        except sqlite3.Error as exc:
            raise _db_error(self.path, exc) from None
        return _records(rows, self.path)

    @staticmethod
    def _needs_marker(conn: sqlite3.Connection) -> bool:
        return conn.execute("SELECT 1 FROM meta WHERE key='format'").fetchone() is None

    @staticmethod
    def _migrate(conn: sqlite3.Connection, schema: str) -> None:
        """Bring one of our older journals to the current schema, in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            if schema == "1":
                # Schema 1 stored a refused submit as a final error with no task id.
                conn.execute(
                    "UPDATE jobs SET state='refused' WHERE state='done' AND task_id IS NULL"
                    " AND status='error'"
                )
            # Schema 3 added the table ``priors``; schema 4, its last three columns.
            conn.execute(_SCHEMA.split(";")[2])  # CREATE TABLE IF NOT EXISTS priors
            have = {str(row[1]) for row in conn.execute("PRAGMA table_info(priors)")}
            for column in _PROGRESS_COLUMNS:
                if column.split()[0] not in have:
                    conn.execute(f"ALTER TABLE priors ADD COLUMN {column}")
            # Schema 5 added the table ``submits`` (the client's own submits).
            for statement in SUBMITS_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (MARKER,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def read(path: str | Path) -> dict[int, JobRecord]:
        """Every recorded job by index, read without changing the file (a running batch may
        be writing it; no lock is taken). Blocking: call it from a worker thread in async
        code."""
        path = Path(path)
        try:
            with path.open("rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            raise JournalError(f"cannot read journal {path}: {exc.strerror or exc}") from None
        if head != _SQLITE_MAGIC:
            raise JournalError(f"{path} is not a journal (not an SQLite file)")
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise _db_error(path, exc) from None
        try:
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            if _inspect(conn, path) is None:
                return {}
            rows = conn.execute(_SELECT).fetchall()
        except sqlite3.Error as exc:
            raise _db_error(path, exc) from None
        finally:
            conn.close()
        return _records(rows, path)

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        if self._conn is None:
            raise JournalError(f"the journal {self.path} is closed")
        try:
            self._conn.execute(sql, args)  # autocommit: one statement, one transaction
        except sqlite3.Error as exc:
            raise self._write_error(exc) from None

    async def call(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` with the open connection on the journal's worker thread (the client
        journal's statements, ``_client_journal``); a sqlite3 error becomes a
        ``JournalError`` saying what could not be done (``what``: "write", "read")."""

        def run() -> T:
            if self._conn is None:
                raise JournalError(f"the journal {self.path} is closed")
            try:
                return fn(self._conn)
            except sqlite3.Error as exc:
                raise JournalError(f"cannot {what} the journal {self.path}: {exc}") from None

        result: T = await self._run(run)
        return result

    def _write_error(self, exc: sqlite3.Error) -> JournalError:
        return JournalError(f"cannot write the journal {self.path}: {exc}")

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        lock, self._lock = self._lock, None
        try:
            if conn is not None:
                try:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass  # the WAL is folded in on the next open; the data is already committed
                finally:
                    with contextlib.suppress(sqlite3.Error):  # every write is committed
                        conn.close()
        finally:
            if lock is not None:
                lock.release()

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
                "SELECT kind, samples, duration_lo, duration_hi, ratio_lo, ratio_hi,"
                " progress_samples, progress_lo, progress_hi FROM priors"
            ).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read the priors of {self.path}: {exc}") from None
        return priors_of(rows)

    def _save_priors_sync(self, priors: Mapping[str, KindPrior]) -> None:
        if self._conn is None:
            raise JournalError("the journal is closed")
        now = time.time()
        try:
            self._conn.executemany(
                "INSERT OR REPLACE INTO priors VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        k,
                        p.samples,
                        p.duration_lo,
                        p.duration_hi,
                        p.ratio_lo,
                        p.ratio_hi,
                        now,
                        p.progress_samples,
                        p.progress_lo,
                        p.progress_hi,
                    )
                    for k, p in priors.items()
                    if p.samples > 0
                ],
            )
        except sqlite3.Error as exc:
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
                *finish_text(task, files),
                error,
                error_type,
                time.time(),
                index,
            ),
        )


def finish_text(
    task: dict[str, Any] | None, files: tuple[DownloadedFile, ...]
) -> tuple[str | None, str]:
    """The ``task`` and ``files`` columns of a finished job, as every store writes them."""
    return (json.dumps(task) if task is not None else None), json.dumps(
        [attrs.asdict(f) for f in files]
    )


def priors_of(rows: Iterable[Sequence[Any]]) -> dict[str, KindPrior]:
    """The priors of a journal's ``priors`` rows (kind, samples, duration_lo, duration_hi,
    ratio_lo, ratio_hi, progress_samples, progress_lo, progress_hi), whatever the store; a row
    nobody could have written is passed over (it is learned again)."""
    out: dict[str, KindPrior] = {}
    for kind, samples, d_lo, d_hi, r_lo, r_hi, p_n, p_lo, p_hi in rows:
        if not (isinstance(kind, str) and isinstance(samples, int) and samples >= 0):
            continue
        if not _plausible_range(d_lo, d_hi, 0.0):
            continue
        if (r_lo is not None or r_hi is not None) and not _plausible_range(r_lo, r_hi, 1e-9):
            continue
        prior = KindPrior(samples, float(d_lo), float(d_hi), r_lo, r_hi)
        # progress trust: kept only when whole and plausible (else learned again)
        if isinstance(p_n, int) and p_n > 0 and _plausible_range(p_lo, p_hi, 1e-9):
            prior.progress_samples = p_n
            prior.progress_lo, prior.progress_hi = float(p_lo), float(p_hi)
        out[kind] = prior
    return out


def _plausible_range(lo: object, hi: object, least: float) -> bool:
    """Whether a stored prior's ``lo``, ``hi`` are numbers a run could have learned: finite,
    ``least <= lo <= hi`` (a row from an edited or foreign file is passed over)."""
    return (
        all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
        and least <= float(lo) <= float(hi) < math.inf  # type: ignore[arg-type]
    )

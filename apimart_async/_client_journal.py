"""The client's own journal (issue 21): no paid task is ever unreachable.

``AsyncApimart(journal=...)`` records every submit made through the client (``videos.submit``,
``videos.generate``, and the submits of its batches) in a table ``submits``, one row per
idempotency key: in an SQLite journal (the same file format as a batch's, ``_journal``;
``SqliteSubmits``) or in PostgreSQL (``_pg_submits.PgSubmits``, shared by the replicas of a
web app). The logic below is the same for both; a ``SubmitStore`` only reads and writes rows::

    submitting  the key (with the request's fingerprint, model and body) is durable BEFORE the
                POST: the POST may or may not have created a task
    pending     the reply gave the task id, recorded right after it (shielded from cancellation)
    refused     the service refused the submit in a way that proves no task exists
    done        a wait (or a status read) through this client saw the task's end (its
                status and the task)

``client.tasks.unfinished()`` lists the ``submitting`` and ``pending`` rows (``UnfinishedTask``):
the billed tasks whose end nobody saw, across restarts. A ``submitting`` row has no task id
(the reply was lost, or the first POST never arrived): ``client.tasks.recover(item)`` sends the
same request again with the SAME key, which the service dedupes (it answers with the original
task if there is one, else creates it now), and records the id.

Ends are seen by the shared poller (``Poller.on_end``, a synchronous callback) and written by
a small writer task in the client's task group, batched; ``flush`` writes what is waiting
(``unfinished()`` flushes first, and so does closing the client). An end seen just before a
crash may be lost: the task is then listed again, and a wait re-reads it once.

Journal faults become ``JournalError``: recording a key that fails stops the submit (nothing is
sent); recording a task id that fails is logged at WARNING with the id (the caller still gets
it, and the key stays listed: ``recover`` finds the task again by it); recording an end that
fails is logged (the task stays listed).

The API key never reaches this module: nothing of it is written.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

import anyio
import attrs

from ._checks import check_path
from ._converter import structure_task, task_to_wire
from ._errors import (
    ApimartError,
    ConfigurationError,
    JournalError,
    NotFoundError,
    NoVideoError,
)
from ._jobs import definitive
from ._journal import SqliteJournal
from ._models import Task, VideoRequest
from ._pg_journal import PostgresJournal, is_postgres_url, is_url, redact_url
from ._pg_submits import PgSubmits

__all__ = [
    "ClientJournal",
    "SqliteSubmits",
    "SubmitStore",
    "UnfinishedTask",
    "notify_submitted",
    "unfinished_of",
]

logger = logging.getLogger("apimart_async")


@attrs.frozen
class UnfinishedTask:
    """A submit made through a client with a journal whose task's end nobody saw
    (``client.tasks.unfinished()``). It may be running, or long finished at the service."""

    task_id: str | None
    """The task's id; None when the key was recorded but no reply was read (the reply was lost,
    or the POST never arrived): ``client.tasks.recover(item)`` settles it."""
    idempotency_key: str
    """The ``Idempotency-Key`` of its submit."""
    model: str
    """The request's model."""
    submitted_at: float
    """When the submit was recorded (Unix time, seconds)."""
    fingerprint: str
    """``VideoRequest.fingerprint()`` of the request."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of the fields (all of them are text, a number or None)."""
        return attrs.asdict(self)


def _end_of(result: Task | ApimartError) -> tuple[str, dict[str, Any] | None, str | None] | None:
    """What a watch's end says of its task: (status, task in wire form, error), or None when
    it says nothing (the waiter gave up, the client closed, the API was unreachable...)."""
    if isinstance(result, Task):
        return result.status.value, task_to_wire(result), None
    if isinstance(result, NoVideoError):
        return result.task.status.value, task_to_wire(result.task), str(result)
    if isinstance(result, NotFoundError):
        return "not_found", None, str(result)
    return None


#: An end to record: (task id, status, the task in wire form as JSON text or None, error).
EndRow = tuple[str, str, str | None, str | None]


class SubmitStore(Protocol):
    """Where a ``ClientJournal`` keeps its rows (one per idempotency key; the states of the
    module doc): ``SqliteSubmits`` (a file, one client at a time) or ``PgSubmits`` (a
    PostgreSQL schema shared by the replicas of an app). The logic (what is recorded when,
    what a fault does) is ``ClientJournal``'s; a store only reads and writes rows, every
    method durable on return or a ``JournalError`` naming the store."""

    where: str
    """The store, for messages (a path, or a URL without its password)."""
    shared: bool
    """Whether other clients (replicas) use the same rows at the same time."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def add(self, key: str, fingerprint: str, model: str, body: str, at: float) -> bool:
        """A ``submitting`` row for ``key``; nothing if the key has one already (False)."""
        ...

    async def set_task(self, key: str, task_id: str, at: float) -> None: ...
    async def set_refused(self, key: str, error: str, at: float) -> None:
        """``refused``, for a key still ``submitting``."""
        ...

    async def set_ends(self, rows: list[EndRow], at: float) -> None:
        """``done`` (with status, task, error), for tasks still ``pending``."""
        ...

    async def unfinished(
        self, build: Callable[[list[Any]], list[UnfinishedTask]]
    ) -> list[UnfinishedTask]:
        """``build`` of the ``submitting`` and ``pending`` rows (task_id, key, model,
        submitted_at, fingerprint), oldest first."""
        ...

    async def end_text(self, task_id: str) -> str | None:
        """The recorded end (``task``, JSON text) of a ``done`` task, or None."""
        ...

    async def body_text(self, key: str) -> str | None:
        """The request body (JSON text) recorded with ``key``, or None."""
        ...


def unfinished_of(rows: list[Any], where: str) -> list[UnfinishedTask]:
    """``UnfinishedTask``s of rows (task_id, key, model, submitted_at, fingerprint); a row
    that is not one is a ``JournalError`` naming the store."""
    try:
        return [
            UnfinishedTask(
                task_id=_text_or_none(task_id),
                idempotency_key=_text(key),
                model=_text(model),
                submitted_at=float(at),
                fingerprint=_text(fingerprint),
            )
            for task_id, key, model, at, fingerprint in rows
        ]
    except (TypeError, ValueError) as exc:
        raise JournalError(f"cannot read the journal {where}: {exc}") from None


class SqliteSubmits:
    """The table ``submits`` of an ``SqliteJournal`` (its lock: one client per file)."""

    shared = False

    def __init__(self, journal: SqliteJournal) -> None:
        self.journal = journal
        self.where: str = str(journal.path)

    async def open(self) -> None:
        await self.journal.open()

    async def close(self) -> None:
        await self.journal.close()

    async def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(sql, args)

        await self.journal.call("write", write)

    async def _one(self, sql: str, args: tuple[Any, ...]) -> str | None:
        def read(conn: sqlite3.Connection) -> Any:
            return conn.execute(sql, args).fetchone()

        row = await self.journal.call("read", read)
        value: str | None = None if row is None else row[0]  # checked by the caller's parse
        return value

    async def add(self, key: str, fingerprint: str, model: str, body: str, at: float) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "INSERT INTO submits (idempotency_key, fingerprint, model, body, state,"
                    " submitted_at, updated_at) VALUES (?, ?, ?, ?, 'submitting', ?, ?)"
                    " ON CONFLICT (idempotency_key) DO NOTHING",
                    (key, fingerprint, model, body, at, at),
                ).rowcount
                == 1
            )

        return await self.journal.call("write", write)

    async def set_task(self, key: str, task_id: str, at: float) -> None:
        # a key sent again after its task's end was seen gets that task back: it stays done
        await self._write(
            "UPDATE submits SET state='pending', task_id=?, updated_at=? WHERE idempotency_key=?"
            " AND NOT (state='done' AND task_id IS ?)",
            (task_id, at, key, task_id),
        )

    async def set_refused(self, key: str, error: str, at: float) -> None:
        await self._write(
            "UPDATE submits SET state='refused', error=?, updated_at=?"
            " WHERE idempotency_key=? AND state='submitting'",
            (error, at, key),
        )

    async def set_ends(self, rows: list[EndRow], at: float) -> None:
        args = [(status, task, error, at, task_id) for task_id, status, task, error in rows]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE submits SET state='done', status=?, task=?, error=?, updated_at=?"
                " WHERE task_id=? AND state='pending'",
                args,
            )

        await self.journal.call("write", write)

    async def unfinished(
        self, build: Callable[[list[Any]], list[UnfinishedTask]]
    ) -> list[UnfinishedTask]:
        def read(conn: sqlite3.Connection) -> list[UnfinishedTask]:
            rows = conn.execute(
                "SELECT task_id, idempotency_key, model, submitted_at, fingerprint FROM submits"
                " WHERE state IN ('submitting', 'pending') ORDER BY submitted_at, rowid"
            ).fetchall()
            return build(rows)  # built on the journal's thread

        return await self.journal.call("read", read)

    async def end_text(self, task_id: str) -> str | None:
        return await self._one(
            "SELECT task FROM submits WHERE task_id=? AND state='done' AND task IS NOT NULL",
            (task_id,),
        )

    async def body_text(self, key: str) -> str | None:
        return await self._one("SELECT body FROM submits WHERE idempotency_key=?", (key,))


class ClientJournal:
    """The submits of one client, in a ``SubmitStore``."""

    def __init__(self, store: SubmitStore, *, wall: Callable[[], float] = time.time) -> None:
        self.store: SubmitStore = store
        self._wall = wall
        self._ends: dict[str, tuple[str, dict[str, Any] | None, str | None]] = {}
        self._wake: anyio.Event = anyio.Event()
        self._flushing: anyio.Lock = anyio.Lock()
        #: Keys sent again (``recover``, a resumed batch, a caller's own key): recorded before
        #: this submit, whose failure proves nothing of the first POST (brk21c).
        self._resent: set[str] = set()
        self.is_open: bool = False
        self.on_relay: Callable[[str], object] | None = None
        """Given each task id another replica's callback named (a shared store only)."""
        if isinstance(store, PgSubmits):
            store.on_task = self._relayed

    @property
    def shared(self) -> bool:
        """Whether replicas share the store (PostgreSQL): callbacks are relayed among them."""
        return self.store.shared

    @classmethod
    def of(cls, journal: object) -> ClientJournal | None:
        """The journal of ``AsyncApimart(journal=...)``: a path, an ``SqliteJournal``, a
        ``postgresql://`` URL, a ``PostgresJournal`` (its schema; its ``name`` names the
        client: replicas of one app share it), or None."""
        if journal is None:
            return None
        if isinstance(journal, str) and is_url(journal):  # never a file named by the URL
            if not is_postgres_url(journal):
                raise ConfigurationError(
                    f"journal: a client's journal is an SQLite file (a path) or a"
                    f" postgresql:// URL; got {redact_url(journal)}"
                )
            return cls(PgSubmits(PostgresJournal(journal, name=PgSubmits.DEFAULT_CLIENT)))
        if isinstance(journal, (str, os.PathLike)):
            path = os.fspath(cast("str | os.PathLike[str]", journal))
            check_path("journal", path)  # a NUL, a lone surrogate: no file system takes one
            return cls(SqliteSubmits(SqliteJournal(path)))
        if isinstance(journal, SqliteJournal):
            return cls(SqliteSubmits(journal))
        if isinstance(journal, PostgresJournal):
            return cls(PgSubmits(journal))
        raise ConfigurationError(
            f"journal must be a path to an SQLite file, an SqliteJournal, a postgresql:// URL"
            f" or a PostgresJournal, got {type(journal).__name__}"
        )

    def __repr__(self) -> str:
        return f"<ClientJournal {self.store.where!r} {'open' if self.is_open else 'closed'}>"

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store (taking its lock: one client per journal file at a time)."""
        if not self.is_open:
            await self.store.open()
            self.is_open = True

    async def close(self) -> None:
        """Write the ends still waiting, then close the store."""
        if not self.is_open:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.flush()
            finally:
                self.is_open = False
                try:
                    await self.store.close()
                except Exception as exc:  # noqa: BLE001 - every write was committed before
                    logger.warning("the client journal did not close cleanly: %s", exc)

    async def run(self) -> None:
        """Write the ends the poller reports, as they come, and with a shared store relay
        the callbacks other replicas receive (the client's task group runs it)."""
        async with anyio.create_task_group() as tg:
            if isinstance(self.store, PgSubmits):
                tg.start_soon(self.store.listen)
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                await self.flush()

    def _relayed(self, task_id: str) -> None:
        if self.on_relay is not None:
            self.on_relay(task_id)

    async def publish(self, task_id: str) -> bool:
        """Hand a callback for a task nobody here follows to the other replicas (a shared
        store; only for a task of this journal still pending). Never raises: a callback is
        a hint, and polling the fallback."""
        if not self.is_open or not isinstance(self.store, PgSubmits):
            return False
        return await self.store.publish(task_id)

    # -- submits (``_api.SubmitLog``) ----------------------------------------------------------

    async def before_submit(self, key: str, request: VideoRequest) -> None:
        """Record ``key`` (state ``submitting``) before the POST; ``JournalError`` if not."""
        body = json.dumps(request.to_body(), sort_keys=True)
        # a key already recorded (``recover`` sends it again) keeps its row
        if not await self.store.add(key, request.fingerprint(), request.model, body, self._wall()):
            self._resent.add(key)

    async def submitted(self, key: str, task_id: str) -> None:
        """Record the task id (state ``pending``); a failure is logged with the id."""
        self._resent.discard(key)
        try:
            await self.store.set_task(key, task_id, self._wall())
        except JournalError as exc:
            logger.warning(
                "task %s was submitted but its id could not be recorded (%s); tasks.unfinished()"
                " lists its idempotency key %s, and tasks.recover() finds the task by it",
                task_id,
                exc,
                key,
            )

    async def submit_failed(self, key: str, exc: ApimartError) -> None:
        """A refusal that proves no task exists closes the key (state ``refused``). For a key
        sent again, only a refusal of the request itself does: an earlier POST with it may
        have made a task, whatever this one met (the service out of reach, a key it refuses
        now)."""
        resent = key in self._resent
        self._resent.discard(key)
        if not (definitive(exc, resent=resent) or (exc.submit_not_taken and not resent)):
            return  # the POST may have created a task: the key stays listed
        try:
            await self.store.set_refused(key, str(exc), self._wall())
        except JournalError as fault:
            logger.warning("the refused submit %s could not be recorded: %s", key, fault)

    # -- ends ----------------------------------------------------------------------------------

    def saw_end(self, task_id: str, result: Task | ApimartError) -> None:
        """A watch of ``task_id`` ended with ``result`` (``Poller.on_end``): written soon."""
        end = _end_of(result)
        if end is not None and self.is_open:
            self._ends[task_id] = end
            self._wake.set()

    async def flush(self) -> None:
        """Write the ends seen so far; a failure is logged (those tasks stay listed)."""
        async with self._flushing:
            ends, self._ends = self._ends, {}
            if not ends or not self.is_open:
                return
            rows: list[EndRow] = [
                (task_id, status, json.dumps(task) if task is not None else None, error)
                for task_id, (status, task, error) in ends.items()
            ]
            try:
                await self.store.set_ends(rows, self._wall())
            except Exception as exc:  # noqa: BLE001 - never ends the client's task group
                logger.warning(
                    "the end of tasks %s could not be recorded in the client journal (%s);"
                    " tasks.unfinished() still lists them",
                    ", ".join(sorted(ends)),
                    exc,
                )
            except BaseException:
                # cancelled (the client closing stops the writer): the ends go back for the
                # flush of ``close`` (writing one twice changes nothing)
                for task_id, end in ends.items():
                    self._ends.setdefault(task_id, end)
                raise

    # -- reading -------------------------------------------------------------------------------

    async def unfinished(self) -> list[UnfinishedTask]:
        """The submits whose end nobody saw, oldest first (with an SQLite store, read and
        built on the journal's thread: a long list never holds the event loop)."""
        await self.flush()
        where = self.store.where
        return await self.store.unfinished(lambda rows: unfinished_of(rows, where))

    async def end_of(self, task_id: str) -> Task | None:
        """The end of ``task_id`` as recorded (a task seen terminal), or None."""
        await self.flush()
        text = await self.store.end_text(task_id)
        if text is None:
            return None
        try:
            return structure_task(json.loads(text))
        except (ValueError, ApimartError):
            logger.warning("the recorded end of task %s is unreadable; reading it again", task_id)
            return None

    async def request_of(self, key: str) -> VideoRequest | None:
        """The request recorded with ``key`` (None if there is none)."""
        text = await self.store.body_text(key)
        if text is None:
            return None
        try:
            return VideoRequest.from_dict(json.loads(text))
        except (ValueError, TypeError, ApimartError) as exc:
            raise JournalError(
                f"cannot read the journal {self.store.where}: the request of {key} is"
                f" unreadable ({exc})"
            ) from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not text")
    return value


def _text_or_none(value: object) -> str | None:
    return None if value is None else _text(value)


async def notify_submitted(callback: Callable[[str], object], task_id: str) -> None:
    """Give ``task_id`` to ``on_submitted`` (a function or a coroutine function). If it raises,
    the id is logged at WARNING (the task runs on, and is billed) and the error propagates."""
    try:
        result = callback(task_id)
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        logger.warning(
            "the on_submitted callback failed for task %s (%s: %s); the task runs on at the"
            " service and is billed",
            task_id,
            type(exc).__name__,
            exc,
        )
        raise

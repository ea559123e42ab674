"""The client journal in PostgreSQL (issue 15): ``AsyncApimart(journal="postgresql://...")``.

The rows of ``_client_journal`` (one per idempotency key: ``submitting``, ``pending``,
``refused``, ``done``) in the table ``submits`` of the SDK's schema, keyed by the client's
name and the key::

    submits   (client, idempotency_key) key   fingerprint, model, body, state, task_id,
              status, task, error, submitted_at, updated_at

``client`` is the ``name`` of the ``PostgresJournal`` given as the journal (``"default"`` for a
bare URL): the replicas of one web app share it, so any replica lists (``tasks.unfinished()``)
and answers (``tasks.wait``) the tasks every replica submitted; another app on the same schema
takes another name. There is no lock: replicas use the rows at the same time, each write
setting one row to a state. The table is created with the schema's other tables (``meta``
holds its version, row ``submits``), under the schema's transaction-level advisory lock.

Callbacks across replicas: a callback that lands on a replica where no wait follows its task
is published (``publish``) with ``pg_notify`` on the schema's channel, but only for a task
this client's rows hold as ``pending`` (an unsigned callback naming anything else costs
nothing more); every replica listens (``listen``: one connection of its own, reconnecting)
and hands the task id to its poller, which reads it in its next batched status round. A
notification is a hint, never a result, and one missed (a replica reconnecting) leaves the
task to polling.

A lost database is waited for, ``reconnect_for`` seconds, as the batch journal's calls are;
``publish`` tries once (a callback's answer does not wait for a database away). Errors are
``JournalError``s naming the URL without its password.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from ._errors import JournalError
from ._pg_journal import PostgresJournal, _close_quietly, _Link

__all__ = ["SUBMITS_VERSION", "PgSubmits"]

logger = logging.getLogger("apimart_async")

T = TypeVar("T")

#: The version of the table ``submits`` this release writes (table ``meta``, row ``submits``).
SUBMITS_VERSION = 1


def _submits_sql(q: str) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS {q}.submits (
            client text NOT NULL,
            idempotency_key text NOT NULL,
            fingerprint text NOT NULL,
            model text NOT NULL,
            body text NOT NULL,
            state text NOT NULL,
            task_id text,
            status text,
            task text,
            error text,
            submitted_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            PRIMARY KEY (client, idempotency_key)
        )""",
        f"CREATE INDEX IF NOT EXISTS submits_by_task ON {q}.submits (task_id)",
        f"CREATE INDEX IF NOT EXISTS submits_by_state ON {q}.submits (client, state)",
    ]


class PgSubmits:
    """A client journal's rows in PostgreSQL (see the module doc); ``journal`` gives the
    database, the schema, the client's name and the reconnection settings (it is not
    opened: no batch is involved)."""

    DEFAULT_CLIENT = "default"
    shared = True

    def __init__(self, journal: PostgresJournal) -> None:
        self.journal = journal
        self.client: str = journal.name
        self.where: str = f"{journal.url} (client {journal.name!r}, schema {journal.schema})"
        self.channel: str = f"apimart_async_{journal.schema}"[:63]
        """The notification channel of the schema's callbacks."""
        self._q = journal._q
        self._link = _Link(
            journal._pg,
            journal._url,
            where=self.where,
            schema=journal.schema,
            name=journal.name,
            reconnect_for=journal.reconnect_for,
            connect_timeout=journal.connect_timeout,
            locked=False,
        )
        self._mutex = anyio.Lock()  # one statement at a time on the connection
        self.on_task: Callable[[str], object] | None = None
        """Given the task id of every notification on the channel (set before ``open``)."""
        self.listening = anyio.Event()
        """Set once the listener's ``LISTEN`` is in place (again after each reconnect)."""
        self.relayed = 0
        """Notifications received from the channel."""
        self._listener: Any = None
        self._lost = anyio.Event()

    def __repr__(self) -> str:
        return f"<PgSubmits {self.where}>"

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self._mutex:
            return await self._link.retrying(what, fn)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the tables (the schema's, and ``submits``) if they are not there."""
        q = self._q

        async def run(conn: Any) -> None:
            async with conn.transaction():
                await self.journal._ensure_tables(conn)  # takes the schema's lock
                version = await conn.fetchval(f"SELECT value FROM {q}.meta WHERE key='submits'")
                if version is not None and version != str(SUBMITS_VERSION):
                    raise JournalError(
                        f"the client journal {self.where} was written by another apimart-async"
                        f" (submits version {version}; this one knows {SUBMITS_VERSION})"
                    )
                for statement in _submits_sql(q):
                    await conn.execute(statement)
                await conn.execute(
                    f"INSERT INTO {q}.meta VALUES ('submits', $1) ON CONFLICT (key) DO NOTHING",
                    str(SUBMITS_VERSION),
                )

        try:
            await self._call("open", run)
            # listening before the client is open: a callback relayed from then on is seen
            await self._listen_again()
        except BaseException:
            await self.close()  # no connection left behind by a refused open
            raise

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            listener, self._listener = self._listener, None
            await _close_quietly(listener)
            async with self._mutex:
                await self._link.forget()

    # -- rows --------------------------------------------------------------------------------

    async def _execute(self, sql: str, *args: Any) -> None:
        async def run(conn: Any) -> None:
            await conn.execute(sql, *args)

        await self._call("write", run)

    async def add(self, key: str, fingerprint: str, model: str, body: str, at: float) -> bool:
        sql = (
            f"INSERT INTO {self._q}.submits (client, idempotency_key, fingerprint, model, body,"
            " state, submitted_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'submitting', $6, $6)"
            " ON CONFLICT (client, idempotency_key) DO NOTHING"
        )

        async def run(conn: Any) -> bool:
            status = await conn.execute(sql, self.client, key, fingerprint, model, body, at)
            return str(status).endswith(" 1")  # "INSERT 0 1": a new row; "INSERT 0 0": not

        inserted: bool = await self._call("write", run)
        return inserted

    async def set_task(self, key: str, task_id: str, at: float) -> None:
        await self._execute(
            f"UPDATE {self._q}.submits SET state='pending', task_id=$3, updated_at=$4"
            " WHERE client=$1 AND idempotency_key=$2"
            # a key sent again after its task's end was seen gets that task back: still done
            " AND NOT (state='done' AND task_id IS NOT DISTINCT FROM $3)",
            self.client,
            key,
            task_id,
            at,
        )

    async def set_refused(self, key: str, error: str, at: float) -> None:
        await self._execute(
            f"UPDATE {self._q}.submits SET state='refused', error=$3, updated_at=$4"
            " WHERE client=$1 AND idempotency_key=$2 AND state='submitting'",
            self.client,
            key,
            error,
            at,
        )

    async def set_ends(
        self, rows: list[tuple[str, str, str | None, str | None]], at: float
    ) -> None:
        args = [
            (self.client, task_id, status, task, error, at) for task_id, status, task, error in rows
        ]

        async def run(conn: Any) -> None:
            await conn.executemany(
                f"UPDATE {self._q}.submits SET state='done', status=$3, task=$4, error=$5,"
                " updated_at=$6 WHERE client=$1 AND task_id=$2 AND state='pending'",
                args,
            )

        await self._call("write", run)

    async def unfinished(self, build: Callable[[list[Any]], list[T]]) -> list[T]:
        async def run(conn: Any) -> list[Any]:
            rows: list[Any] = await conn.fetch(
                "SELECT task_id, idempotency_key, model, submitted_at, fingerprint"
                f" FROM {self._q}.submits WHERE client=$1 AND state IN ('submitting', 'pending')"
                " ORDER BY submitted_at, idempotency_key",
                self.client,
            )
            return rows

        return build([tuple(r) for r in await self._call("read", run)])

    async def _value(self, sql: str, *args: Any) -> str | None:
        async def run(conn: Any) -> str | None:
            value: str | None = await conn.fetchval(sql, *args)
            return value

        return await self._call("read", run)

    async def end_text(self, task_id: str) -> str | None:
        return await self._value(
            f"SELECT task FROM {self._q}.submits WHERE client=$1 AND task_id=$2"
            " AND state='done' AND task IS NOT NULL LIMIT 1",
            self.client,
            task_id,
        )

    async def body_text(self, key: str) -> str | None:
        return await self._value(
            f"SELECT body FROM {self._q}.submits WHERE client=$1 AND idempotency_key=$2",
            self.client,
            key,
        )

    # -- callbacks across replicas -----------------------------------------------------------

    async def publish(self, task_id: str) -> bool:
        """Notify the replicas of a callback for ``task_id``, if it is a pending task of this
        client (True: published). One try, within ``connect_timeout``; a failure is logged
        and False (polling ends the wait)."""
        sql = (
            f"SELECT count(pg_notify($1, task_id)) FROM {self._q}.submits"
            " WHERE client=$2 AND task_id=$3 AND state='pending'"
        )
        try:
            with anyio.fail_after(self.journal.connect_timeout):
                async with self._mutex:
                    conn = await self._link.ensure()
                    sent: int = await conn.fetchval(sql, self.channel, self.client, task_id)
        except Exception as exc:  # noqa: BLE001 - a hint not passed on: polling is the fallback
            shown = (
                self._link.error("publish a callback to", exc) if self._link.foreign(exc) else exc
            )
            logger.warning(
                "the callback of task %s was not passed on to the replicas: %s", task_id, shown
            )
            return False
        return sent > 0

    def _on_lost(self, _conn: Any) -> None:
        self._lost.set()

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.relayed += 1
        if self.on_task is None:
            return
        try:
            self.on_task(payload)
        except Exception as exc:  # noqa: BLE001 - never ends the listener
            logger.debug("a relayed callback for %s was not followed: %s", payload, exc)

    async def _listen_again(self) -> None:
        """A connection of its own that ``LISTEN``s on the channel (once connected, a lost
        connection sets ``_lost`` at once: asyncpg's termination listener)."""
        old, self._listener = self._listener, None
        with anyio.CancelScope(shield=True):
            await _close_quietly(old)
        self._lost = anyio.Event()
        conn = await self._link.connect()
        try:
            conn.add_termination_listener(self._on_lost)
            await conn.add_listener(self.channel, self._received)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _close_quietly(conn)
            raise
        self._listener = conn
        self.listening.set()

    async def listen(self) -> None:
        """Keep the listener's connection (the client's task group runs this while the
        client is open): a lost one is noticed at once (or by a ``SELECT 1`` every 10 s)
        and replaced, waiting a little longer between failed attempts (up to 5 s)."""
        pause = 0.05
        while True:
            try:
                if self._listener is None or self._listener.is_closed():
                    await self._listen_again()
                    pause = 0.05
                with anyio.move_on_after(10):
                    await self._lost.wait()
                listener: Any = self._listener
                if not self._lost.is_set() and listener is not None:
                    with anyio.fail_after(self.journal.connect_timeout):
                        await listener.fetchval("SELECT 1")
                    continue
            except Exception as exc:
                if not self._link.foreign(exc):
                    raise
                logger.debug(
                    "the callback listener of %s reconnects: %s", self.where, type(exc).__name__
                )
            self.listening = anyio.Event()  # a notification now would be missed
            old, self._listener = self._listener, None
            with anyio.CancelScope(shield=True):
                await _close_quietly(old)
            await anyio.sleep(pause)
            pause = min(pause * 2, 5.0)

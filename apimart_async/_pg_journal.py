"""``PostgresJournal``: the batch journal in PostgreSQL, for batches that outlive one machine.

It keeps the promises of ``SqliteJournal`` (``_journal``): the idempotency key is committed
before the POST, the task id right after the reply, and a resume replays, re-attaches or
resubmits with the same key, the input checked by fingerprint. The rows are ``JobRecord``s,
read by the same checks. One database holds many batches, each under its ``name``.

The SDK creates and migrates its tables in ``schema`` (default ``apimart``), in one
transaction under a transaction-level advisory lock (two processes starting together do not
race), and records its version in the table ``meta``; a newer version is refused with a
``JournalError`` naming it::

    meta      key, value                 'format' = 'apimart-async journal', 'schema' = '2'
    batches   name (key), fingerprints   the job list, when the caller gave it (``fingerprints=``)
              run_host, run_pid, run_started   the run holding the batch, for JournalLockedError
              max_pending, max_cost      the fleet's limits: the strictest its workers asked
                                         for (schema 2; a schema 1 is migrated when opened)
    jobs      (batch, idx) key           the columns of the SQLite journal's ``jobs``
    claims    (batch, idx) key           which worker holds each job of the list, until when
              worker, lease_until        (``_pg_claims``, for a batch run by workers)
    workers   (batch, worker) key        the workers of a batch: host, pid, last heartbeat
    priors    (batch, kind) key          what completed tasks taught the poll schedule

A batch whose job list is stored (``fingerprints=``) is ``shared``: run by as many workers as
are started (``_fleet``: claims, leases, fleet-wide limits asked in ``add``'s transaction);
no lock is taken, and no write goes over a job another worker ended (``done``). Otherwise, one
run per batch at a time: ``open`` takes a session-level advisory lock, on a connection of
its own, keyed by the schema and the batch name, and raises ``JournalLockedError`` (naming
the holder's pid) when another run holds it. PostgreSQL drops the lock when that connection
ends, however the run ends; a holder of this machine that is gone (killed a moment ago, its
connection not yet seen closed) is waited for, up to 5 s.

The database may go away (a restart, a failover): every call waits and reconnects, for up to
``reconnect_for`` seconds, then fails with a ``JournalError``. A statement that was sent is
finished even if its caller is cancelled; the waits between attempts can be cancelled (the
ledger shields the writes that must be made: the task id of a paid task). A write retried
after a lost reply is harmless: each one sets a row to a state, and ``add`` of a row already
there with the same key does nothing. ``outages`` counts the losses seen.

Every asyncpg error, OSError or timeout becomes a ``JournalError`` naming the store by its URL
with the password replaced by ``***``: the password appears in no message, repr or log.
asyncpg is imported when a journal is made (``pip install 'apimart-async[postgres]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import anyio

from ._errors import (
    ConfigurationError,
    FieldError,
    JournalError,
    JournalLockedError,
    JournalMismatchError,
    ValidationError,
)
from ._journal import MARKER, JobRecord, Journal, _record, finish_text, priors_of
from ._models import DownloadedFile
from ._priors import KindPrior

__all__ = [
    "PG_SCHEMA_VERSION",
    "PostgresJournal",
    "is_postgres_url",
    "is_url",
    "journal_url_problem",
    "redact_url",
]

logger = logging.getLogger("apimart_async")

T = TypeVar("T")

#: Asked of the server for every session: a machine that vanishes without closing its
#: connection (power cut, partition) is noticed in about 25 s, and the batch's lock (held by a
#: session) released, instead of after the server's default keepalive (about 2 h 11 min).
#: Any user may set them; a Unix-socket session ignores them.
_KEEPALIVES = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}

#: The version of the tables this release writes (table ``meta``, row ``schema``).
PG_SCHEMA_VERSION = 2

_SCHEMES = ("postgresql://", "postgres://")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


#: The database's clock, in seconds since the epoch: leases and heartbeats are timed by it, so
#: the machines' clocks need not agree.
DB_NOW = "extract(epoch from clock_timestamp())"


def is_postgres_url(value: object) -> bool:
    """Whether ``value`` is a ``postgresql://`` or ``postgres://`` URL (a journal in
    PostgreSQL, not a file path)."""
    return isinstance(value, str) and value.lower().startswith(_SCHEMES)


#: A URL's scheme: a journal given as ``<scheme>://...`` is never a file path.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: object) -> bool:
    """Whether ``value`` is a string that starts like a URL (``scheme://``): a journal that is
    not a file path, whether or not it is one this SDK can use."""
    return isinstance(value, str) and _URL.match(value) is not None


def journal_url_problem(url: str) -> str | None:
    """What keeps ``url`` (given as a journal) from being a PostgreSQL URL the SDK can read,
    or None. Never names the password."""
    scheme = url.split("://", 1)[0]
    if not is_postgres_url(url):
        return (
            f"is a {scheme}:// URL; a journal is a file path or a postgresql:// (postgres://)"
            " URL, with no driver suffix such as +asyncpg"
        )
    rest = url.split("://", 1)[1]
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in rest and "@" not in netloc:
        return (
            "cannot be read: a password with / # ? or @ in it must be percent-encoded"
            " (%2F %23 %3F %40), or given by PGPASSWORD"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        return "cannot be read as a URL (a port from 1 to 65535, balanced [ ] around IPv6)"
    if parts.port == 0:
        return "cannot be read as a URL (a port from 1 to 65535, balanced [ ] around IPv6)"
    return None


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (``postgresql://user:***@host/db``; a
    ``password=`` in the query too). The user part ends at the LAST ``@``: a password with an
    unencoded ``/``, ``#`` or ``?`` is hidden too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    user_part, at, after = rest.rpartition("@")
    if at:
        user = user_part.split(":", 1)[0]
        # a user part that cannot be one (a path before the @): the whole of it is hidden
        if any(c in user for c in "/?#"):
            user = "***"
        rest = f"{user}:***@{after}" if ":" in user_part or user == "***" else f"{user}@{after}"
    head, q, query = rest.partition("?")
    if q:
        fragment_sep = "#" if "#" in query else ""
        query, _, fragment = query.partition("#")
        query = "&".join(
            f"{key}=***" if key.lower() == "password" else item
            for item in query.split("&")
            for key in [item.partition("=")[0]]
        )
        rest = f"{head}?{query}{fragment_sep}{fragment}"
    return f"{scheme}://{rest}"


def _asyncpg() -> Any:
    """asyncpg, or the ``ConfigurationError`` that says how to get it."""
    try:
        return importlib.import_module("asyncpg")
    except ImportError:
        raise ConfigurationError(
            "a PostgreSQL journal needs asyncpg: pip install 'apimart-async[postgres]'"
        ) from None


#: What takes the tables of version N to N + 1 (index N - 1), ``{s}`` the schema.
_MIGRATIONS = [
    # 1 -> 2: the fleet's limits, kept with the batch (a worker's own cannot lift them)
    "ALTER TABLE {s}.batches ADD COLUMN IF NOT EXISTS max_pending integer,"
    " ADD COLUMN IF NOT EXISTS max_cost double precision",
]


def _schema_sql(s: str) -> list[str]:
    """The statements that create the tables of schema version 2 in the schema ``s``."""
    return [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS {s}.batches (
            name text PRIMARY KEY,
            created_at double precision NOT NULL,
            fingerprints text[],
            run_host text,
            run_pid integer,
            run_started double precision,
            max_pending integer,
            max_cost double precision
        )""",
        f"""CREATE TABLE IF NOT EXISTS {s}.jobs (
            batch text NOT NULL REFERENCES {s}.batches (name) ON DELETE CASCADE,
            idx integer NOT NULL,
            fingerprint text NOT NULL,
            idempotency_key text NOT NULL,
            name text,
            body text NOT NULL,
            state text NOT NULL,
            task_id text,
            status text,
            cost double precision,
            error text,
            error_type text,
            task text,
            files text,
            updated_at double precision NOT NULL,
            PRIMARY KEY (batch, idx),
            UNIQUE (batch, idempotency_key)
        )""",
        f"CREATE INDEX IF NOT EXISTS jobs_by_state ON {s}.jobs (batch, state)",
        f"""CREATE TABLE IF NOT EXISTS {s}.claims (
            batch text NOT NULL REFERENCES {s}.batches (name) ON DELETE CASCADE,
            idx integer NOT NULL,
            worker text,
            lease_until double precision,
            PRIMARY KEY (batch, idx)
        )""",
        f"""CREATE TABLE IF NOT EXISTS {s}.workers (
            batch text NOT NULL REFERENCES {s}.batches (name) ON DELETE CASCADE,
            worker text NOT NULL,
            host text,
            pid integer,
            started_at double precision,
            heartbeat_at double precision,
            PRIMARY KEY (batch, worker)
        )""",
        f"""CREATE TABLE IF NOT EXISTS {s}.priors (
            batch text NOT NULL REFERENCES {s}.batches (name) ON DELETE CASCADE,
            kind text NOT NULL,
            samples integer NOT NULL,
            duration_lo double precision NOT NULL,
            duration_hi double precision NOT NULL,
            ratio_lo double precision,
            ratio_hi double precision,
            progress_samples integer NOT NULL DEFAULT 0,
            progress_lo double precision,
            progress_hi double precision,
            updated_at double precision NOT NULL,
            PRIMARY KEY (batch, kind)
        )""",
    ]


_COLUMNS = (
    "idx, fingerprint, idempotency_key, state, name, task_id, status, cost, error, error_type,"
    " task, files, body"
)


class _Link:
    """A journal's connections to its database: one for its statements, one that holds the
    batch's advisory lock. A lost database is waited for (``reconnect_for``), reconnecting
    both (the lock taken again); errors become ``JournalError``s naming the redacted URL."""

    def __init__(
        self,
        pg: Any,
        url: str,
        *,
        where: str,
        schema: str,
        name: str,
        reconnect_for: float,
        connect_timeout: float,
        locked: bool = True,
    ) -> None:
        self.pg = pg
        self.locked = locked
        """Whether the link holds the batch's advisory lock (a journal's run does)."""
        self._secret_url = url
        self.shown = redact_url(url)
        self.where = where
        self.schema: str = schema
        self.name: str = name
        self.reconnect_for = reconnect_for
        self.connect_timeout = connect_timeout
        self._conn: Any = None
        self._lock_conn: Any = None
        self.outages = 0

    def error(self, what: str, exc: BaseException) -> JournalError:
        detail = str(exc).replace(self._secret_url, self.shown)
        for password in _passwords(self._secret_url):
            detail = detail.replace(password, "***")
        if not detail.strip() and isinstance(exc, TimeoutError):
            detail = (
                f"no answer within {self.connect_timeout:g} s (connect_timeout) or the"
                " statement's own limit"
            )
        return JournalError(
            f"cannot {what} the journal {self.where}: {type(exc).__name__}: {detail}"
        )

    def transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the database is out of reach (for now), not that a statement
        is wrong."""
        pg = self.pg
        if isinstance(exc, pg.ClientConfigurationError):  # a bad URL or option: never better
            return False
        return isinstance(
            exc,
            (
                OSError,
                TimeoutError,
                asyncio.TimeoutError,
                pg.PostgresConnectionError,  # class 08
                pg.CannotConnectNowError,  # 57P03: starting up or shutting down
                pg.AdminShutdownError,
                pg.CrashShutdownError,
                pg.InterfaceError,  # "connection is closed" and the like
            ),
        )

    def foreign(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the database's or asyncpg's (to become a ``JournalError``)."""
        return self.transient(exc) or type(exc).__module__.startswith("asyncpg")

    # -- connections -------------------------------------------------------------------------

    async def connect(self) -> Any:
        timeout = self.connect_timeout
        return await self.pg.connect(
            self._secret_url,
            timeout=timeout,
            command_timeout=max(timeout, 30.0),
            server_settings=_KEEPALIVES,
        )

    async def take_lock(self, conn: Any) -> bool:
        taken: bool = await conn.fetchval(
            "SELECT pg_try_advisory_lock(hashtext('apimart-async:' || $1), hashtext($2))",
            self.schema,
            self.name,
        )
        return taken

    async def ensure(self) -> Any:
        """The working connection, (re)connecting and (re)taking the batch's lock as needed."""
        if self.locked and (self._lock_conn is None or self._lock_conn.is_closed()):
            await _close_quietly(self._lock_conn)
            self._lock_conn = None
            conn = await self.connect()
            try:
                if not await self.take_lock(conn):
                    raise JournalError(
                        f"the journal {self.where} was taken by another run while the"
                        " database was out of reach: this run stops"
                    )
            except BaseException:
                await _close_quietly(conn)
                raise
            self._lock_conn = conn
        if self._conn is None or self._conn.is_closed():
            await _close_quietly(self._conn)
            self._conn = None
            self._conn = await self.connect()
        return self._conn

    def hold(self, lock_conn: Any) -> None:
        """``lock_conn`` is the connection that holds (or is about to hold) the lock."""
        self._lock_conn = lock_conn

    async def forget(self) -> None:
        conn, self._conn = self._conn, None
        lock, self._lock_conn = self._lock_conn, None
        for c in (conn, lock):
            await _close_quietly(c)

    async def retrying(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        give_up: float | None = None
        pause = 0.05
        while True:
            try:
                done: list[T] = []
                # a statement that started finishes (or fails) even if the caller is cancelled;
                # the waits between attempts below can be cancelled
                with anyio.CancelScope(shield=True):
                    done.append(await fn(await self.ensure()))
                return done[0]
            except JournalError:
                raise
            except Exception as exc:
                if not self.transient(exc):
                    if self.foreign(exc):
                        raise self.error(what, exc) from None
                    raise
                now = time.monotonic()
                if give_up is None:
                    give_up = now + self.reconnect_for
                    self.outages += 1
                    logger.warning(
                        "the journal %s is out of reach (%s); waiting up to %g s for it",
                        self.where,
                        type(exc).__name__,
                        self.reconnect_for,
                    )
                with anyio.CancelScope(shield=True):
                    await self.forget()
                if now >= give_up:
                    raise self.error(
                        f"{what} (out of reach for {self.reconnect_for:g} s)", exc
                    ) from None
                await anyio.sleep(min(pause, max(0.0, give_up - now)))
                pause = min(pause * 2, 1.0)


class PostgresJournal(Journal):
    """A batch journal in PostgreSQL (see the module doc): ``url`` is the database
    (``postgresql://user:password@host:5432/db``), ``name`` the batch (one database holds many),
    ``schema`` where the tables live. ``reconnect_for``: how long a call waits for a lost
    database to come back before it fails (seconds). ``fingerprints``: the request fingerprint
    of every job of the list, in order, when the caller knows the whole list (the CLI does):
    the first run stores it, and a different list under the same name is refused with
    ``JournalMismatchError`` when the journal is opened, before anything is submitted."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        schema: str = "apimart",
        reconnect_for: float = 60.0,
        connect_timeout: float = 10.0,
        fingerprints: Sequence[str] | None = None,
    ) -> None:
        bad: list[FieldError] = []
        if not isinstance(url, str) or not is_url(url):
            shown = redact_url(url) if isinstance(url, str) else url
            bad.append(FieldError("journal", "must be a postgresql:// URL", shown))
        elif (problem := journal_url_problem(url)) is not None:
            bad.append(FieldError("journal", problem, redact_url(url)))
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            rule = "must be a non-empty batch name (200 characters at most)"
            bad.append(FieldError("name", rule, name))
        if not isinstance(schema, str) or not _IDENTIFIER.fullmatch(schema):
            rule = (
                "must be a PostgreSQL name: a letter or _, then letters, digits or _ (63 at most)"
            )
            bad.append(FieldError("schema", rule, schema))
        for field, value in [
            ("reconnect_for", reconnect_for),
            ("connect_timeout", connect_timeout),
        ]:
            if not _positive(value):
                bad.append(FieldError(field, "must be a positive number of seconds", value))
        if bad:
            raise ValidationError(bad)
        self._pg = _asyncpg()
        self._url = url
        self.url: str = redact_url(url)
        """The database's URL, its password replaced by ``***``."""
        self.name = name
        """The batch's name."""
        self.schema = schema
        """The PostgreSQL schema of the tables."""
        self.reconnect_for: float = float(reconnect_for)
        """Seconds a call waits for a lost database to come back before it fails."""
        self.connect_timeout: float = float(connect_timeout)
        """Seconds one connection attempt may take."""
        self._fingerprints = list(fingerprints) if fingerprints is not None else None
        self.shared: bool = fingerprints is not None
        """Whether the batch is run by workers (its job list is stored): no lock, claims
        (``_fleet``); else one run at a time, under the batch's advisory lock."""
        self.admission: Callable[[Any, int], Awaitable[bool]] | None = None
        """Issue 15: with workers, ``admission(connection, index)`` is asked in the transaction
        that records job ``index`` before its submit (the fleet-wide limits, see
        ``_pg_claims.Claims.admits``): False, not yet (``add`` waits and asks again)."""
        self._q = f'"{schema}"'
        self._open = False
        self._mutex = anyio.Lock()
        self._link = _Link(
            self._pg,
            url,
            where=self._where(),
            schema=schema,
            name=name,
            reconnect_for=self.reconnect_for,
            connect_timeout=self.connect_timeout,
            locked=not self.shared,
        )

    @property
    def outages(self) -> int:
        """How many times a call found the database gone and waited for it to come back."""
        return self._link.outages

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<PostgresJournal {self.url!r} batch={self.name!r} schema={self.schema!r} {state}>"

    def _where(self) -> str:
        return f"{self.url} (batch {self.name!r}, schema {self.schema})"

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """``fn(connection)``, waiting out a lost database for up to ``reconnect_for``."""
        if not self._open:
            raise JournalError(f"the journal {self._where()} is closed")
        async with self._mutex:  # one statement at a time on the connection
            return await self._link.retrying(what, fn)

    # -- opening -----------------------------------------------------------------------------

    async def open(self) -> dict[int, JobRecord]:
        if self._open:
            raise JournalError(f"the journal {self._where()} is already open in this journal")
        self._open = True
        done: list[dict[int, JobRecord]] = []
        try:
            with anyio.CancelScope(shield=True):
                async with self._mutex:
                    done.append(await self._open_locked())
        except BaseException:
            self._open = False
            with anyio.CancelScope(shield=True):
                await self._link.forget()
            raise
        return done[0]

    async def _open_locked(self) -> dict[int, JobRecord]:
        if self.shared:  # workers of one batch: claims, not the lock (``_fleet``)
            return await self._link.retrying("open", self._prepare)
        try:
            lock_conn = await self._link.connect()
        except Exception as exc:
            if self._link.foreign(exc):
                raise self._link.error("open", exc) from None
            raise
        self._link.hold(lock_conn)
        try:
            if not await self._link.take_lock(lock_conn):
                pid, started, host = await self._holder(lock_conn)
                if not (host == socket.gethostname() and _gone(pid)) or not await self._lock_soon(
                    lock_conn
                ):
                    where = f"{self.url} (batch {self.name!r})"
                    raise JournalLockedError(where, pid, started, host=host)
        except JournalError:
            raise
        except Exception as exc:
            if self._link.foreign(exc):
                raise self._link.error("lock", exc) from None
            raise
        return await self._link.retrying("open", self._prepare)

    async def _holder(self, conn: Any) -> tuple[int | None, float | None, str | None]:
        """The pid, start time and host of the run that holds the batch (as it noted them)."""
        with contextlib.suppress(Exception):  # no table yet, or unreadable: unknown
            row = await conn.fetchrow(
                f"SELECT run_pid, run_started, run_host FROM {self._q}.batches WHERE name=$1",
                self.name,
            )
            if row is not None:
                return row["run_pid"], row["run_started"], row["run_host"]
        return None, None, None

    async def _lock_soon(self, conn: Any) -> bool:
        """The holder was a process of this machine that is gone (killed): the server drops
        its lock as soon as it sees its connection closed. Wait up to 5 s for that."""
        for _ in range(100):
            await anyio.sleep(0.05)
            if await self._link.take_lock(conn):
                return True
        return False

    async def _prepare(self, conn: Any) -> dict[int, JobRecord]:
        """Create or migrate the tables, check the batch's list, note this run, read the jobs."""
        q = self._q
        async with conn.transaction():
            await self._ensure_tables(conn)
            now = time.time()
            await conn.execute(
                f"INSERT INTO {q}.batches (name, created_at) VALUES ($1, $2)"
                " ON CONFLICT (name) DO NOTHING",
                self.name,
                now,
            )
            await self._check_list(conn)
            await conn.execute(
                f"UPDATE {q}.batches SET run_host=$2, run_pid=$3, run_started=$4 WHERE name=$1",
                self.name,
                socket.gethostname(),
                os.getpid(),
                now,
            )
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {q}.jobs WHERE batch=$1 ORDER BY idx", self.name
            )
        return self._records(rows)

    async def _ensure_tables(self, conn: Any) -> None:
        """Create (or migrate) the tables of the schema, under the schema's transaction-level
        advisory lock: call it inside a transaction."""
        q = self._q
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('apimart-async:schema'), hashtext($1))",
            self.schema,
        )
        version = await self._version(conn)
        if version is None:
            statements = _schema_sql(q)
            exists = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", self.schema
            )
            if exists:  # made by a DBA, maybe: creating it would need CREATE on the database
                statements = statements[1:]
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(
                f"INSERT INTO {q}.meta VALUES ('format', $1), ('schema', $2)"
                " ON CONFLICT (key) DO NOTHING",
                MARKER,
                str(PG_SCHEMA_VERSION),
            )
        elif version < PG_SCHEMA_VERSION:
            for statement in _MIGRATIONS[version - 1 :]:  # 1 -> 2, ...: in this transaction
                await conn.execute(statement.format(s=q))
            await conn.execute(
                f"UPDATE {q}.meta SET value = $1 WHERE key = 'schema'", str(PG_SCHEMA_VERSION)
            )

    async def _version(self, conn: Any) -> int | None:
        """The tables' version in the schema (None: no tables yet); refuses what is not ours."""
        tables = {  # from pg_catalog: information_schema hides what the role may not read
            r["relname"]
            for r in await conn.fetch(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
                self.schema,
            )
        }
        if not tables:
            return None
        if "meta" not in tables:
            names = sorted(tables)
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise JournalError(
                f"cannot use the schema {self.schema} of {self.url} as a journal: it holds"
                f" another program's tables ({', '.join(names[:5])}{more}); it was left"
                " unchanged: give the journal another schema="
            )
        meta = {r["key"]: r["value"] for r in await self._meta(conn)}
        if meta.get("format") != MARKER:
            raise JournalError(
                f"cannot use the schema {self.schema} of {self.url} as a journal: its table"
                " meta is not apimart-async's; it was left unchanged"
            )
        version = meta.get("schema", "")
        if not re.fullmatch(r"[0-9]{1,9}", version):
            raise JournalError(
                f"cannot use the schema {self.schema} of {self.url} as a journal: unknown"
                f" schema version {version!r}"
            )
        if int(version) > PG_SCHEMA_VERSION:
            raise JournalError(
                f"the journal {self._where()} was written by a newer apimart-async (schema"
                f" {version}; this one knows 1 to {PG_SCHEMA_VERSION})"
            )
        return int(version)  # an older one is migrated by _ensure_tables

    async def _meta(self, conn: Any) -> list[Any]:
        rows: list[Any] = await conn.fetch(f"SELECT key, value FROM {self._q}.meta")
        return rows

    async def _check_list(self, conn: Any) -> None:
        """The batch's job list, stored once: a different one is refused."""
        if self._fingerprints is None:
            return
        new = self._fingerprints
        old = await conn.fetchval(
            f"SELECT fingerprints FROM {self._q}.batches WHERE name=$1 FOR UPDATE", self.name
        )
        if old is None:
            # first time: the jobs already recorded (by a run without the list) must match
            for r in await conn.fetch(
                f"SELECT idx, fingerprint FROM {self._q}.jobs WHERE batch=$1 ORDER BY idx",
                self.name,
            ):
                idx: int = r["idx"]
                was: str = r["fingerprint"]
                got = new[idx] if idx < len(new) else "(no such job now)"
                if got != was:
                    raise JournalMismatchError(idx, was, got)
            await conn.execute(
                f"UPDATE {self._q}.batches SET fingerprints=$2 WHERE name=$1", self.name, new
            )
            return
        old = list(old)
        if old == new:
            return
        for i, (was, now) in enumerate(zip(old, new, strict=False)):
            if was != now:
                raise JournalMismatchError(i, was, now)
        i = min(len(old), len(new))
        was = old[i] if i < len(old) else "(no such job)"
        now = new[i] if i < len(new) else "(no such job now)"
        raise JournalMismatchError(i, was, now)

    def _records(self, rows: Sequence[Any]) -> dict[int, JobRecord]:
        out: dict[int, JobRecord] = {}
        for r in rows:
            try:
                out[r[0]] = _record(tuple(r))
            except (ValueError, TypeError) as exc:
                raise JournalError(
                    f"cannot use the journal {self._where()}: job {r[0]} is unreadable: {exc}"
                ) from None
        return out

    async def read(self) -> dict[int, JobRecord]:
        """Every recorded job of the batch by index, read without the batch's lock (a run may
        be writing it) and without creating anything; empty if there are no tables yet."""
        try:
            conn = await self._link.connect()
        except Exception as exc:
            if self._link.foreign(exc):
                raise self._link.error("read", exc) from None
            raise
        try:
            if await self._version(conn) is None:
                return {}
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {self._q}.jobs WHERE batch=$1 ORDER BY idx", self.name
            )
        except JournalError:
            raise
        except Exception as exc:
            if self._link.foreign(exc):
                raise self._link.error("read", exc) from None
            raise
        finally:
            await _close_quietly(conn)
        return self._records(rows)

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        with anyio.CancelScope(shield=True):
            async with self._mutex:
                await self._link.forget()  # the lock goes with its connection

    # -- the writes --------------------------------------------------------------------------

    async def _execute(self, what: str, sql: str, *args: Any) -> str:
        async def run(conn: Any) -> str:
            status: str = await conn.execute(sql, *args)
            return status

        return await self._call(what, run)

    async def add(
        self, index: int, fingerprint: str, key: str, name: str | None, body: dict[str, Any]
    ) -> None:
        q = self._q

        async def run(conn: Any) -> bool:
            if self.admission is None:
                await insert(conn)
                return True
            async with conn.transaction():
                if not await self.admission(conn, index):
                    return False
                await insert(conn)
            return True

        async def insert(conn: Any) -> None:
            # a retry after a lost reply finds its row there: nothing more to do
            status = await conn.execute(
                f"INSERT INTO {q}.jobs (batch, idx, fingerprint, idempotency_key, name, body,"
                " state, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'submitting', $7)"
                " ON CONFLICT (batch, idx) DO NOTHING",
                self.name,
                index,
                fingerprint,
                key,
                name,
                json.dumps(body, sort_keys=True),
                time.time(),
            )
            if status.endswith(" 0"):
                have = await conn.fetchval(
                    f"SELECT idempotency_key FROM {q}.jobs WHERE batch=$1 AND idx=$2",
                    self.name,
                    index,
                )
                if have != key:
                    raise JournalError(
                        f"cannot write the journal {self._where()}: job {index} is already"
                        " recorded with another key"
                    )

        pause = 0.02
        while not await self._call("write", run):  # the fleet is at its limits: wait
            await anyio.sleep(pause)
            pause = min(pause * 1.5, 0.5)

    async def set_task(self, index: int, task_id: str) -> None:
        await self._update("state='pending', task_id=$3", index, task_id)

    async def set_downloading(self, index: int, task: dict[str, Any], cost: float | None) -> None:
        await self._update(
            "state='downloading', status='completed', task=$3, cost=$4",
            index,
            json.dumps(task),
            cost,
        )

    async def refused(self, index: int, *, error: str, error_type: str) -> None:
        await self._update(
            "state='refused', status='error', error=$3, error_type=$4", index, error, error_type
        )

    async def restart(
        self, index: int, fingerprint: str, key: str, name: str | None, body: dict[str, Any]
    ) -> None:
        await self._update(
            "fingerprint=$3, idempotency_key=$4, name=$5, body=$6, state='submitting',"
            " task_id=NULL, status=NULL, cost=NULL, error=NULL, error_type=NULL, task=NULL,"
            " files=NULL",
            index,
            fingerprint,
            key,
            name,
            json.dumps(body, sort_keys=True),
            over_done=True,
        )

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
    ) -> bool:
        status = await self._update(
            "state='done', status=$3, cost=$4, task=$5, files=$6, error=$7, error_type=$8",
            index,
            status,
            cost,
            *finish_text(task, files),
            error,
            error_type,
        )
        return not status.endswith(" 0")  # 0 rows: another worker ended it (shared)

    async def _update(
        self, assignments: str, index: int, *values: Any, over_done: bool = False
    ) -> str:
        # with workers, a job ends once: no write over a job another worker ended; a retry of
        # this write after a lost reply (the same updated_at, $2) finds its own end there
        guard = " AND (state <> 'done' OR updated_at = $2)" if self.shared and not over_done else ""
        sql = (
            f"UPDATE {self._q}.jobs SET {assignments}, updated_at=$2 WHERE batch=$1"
            f" AND idx=${len(values) + 3}{guard}"
        )
        return await self._execute("write", sql, self.name, time.time(), *values, index)

    # -- learned poll priors (``_prior_store.PriorStore``) ----------------------------------

    async def load_priors(self) -> dict[str, KindPrior]:
        """What completed tasks taught the poll schedule, by kind (``_priors``)."""

        async def run(conn: Any) -> list[Any]:
            rows: list[Any] = await conn.fetch(
                "SELECT kind, samples, duration_lo, duration_hi, ratio_lo, ratio_hi,"
                f" progress_samples, progress_lo, progress_hi FROM {self._q}.priors"
                " WHERE batch=$1",
                self.name,
            )
            return rows

        return priors_of(await self._call("read the priors of", run))

    async def save_priors(self, priors: Mapping[str, KindPrior]) -> None:
        """Store these kinds' priors (replacing what was stored for them)."""
        now = time.time()
        rows = [
            (self.name, k, p.samples, p.duration_lo, p.duration_hi, p.ratio_lo, p.ratio_hi,
             p.progress_samples, p.progress_lo, p.progress_hi, now)
            for k, p in priors.items()
            if p.samples > 0
        ]  # fmt: skip

        async def run(conn: Any) -> None:
            await conn.executemany(
                f"INSERT INTO {self._q}.priors VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,"
                " $10, $11) ON CONFLICT (batch, kind) DO UPDATE SET samples=EXCLUDED.samples,"
                " duration_lo=EXCLUDED.duration_lo, duration_hi=EXCLUDED.duration_hi,"
                " ratio_lo=EXCLUDED.ratio_lo, ratio_hi=EXCLUDED.ratio_hi,"
                " progress_samples=EXCLUDED.progress_samples,"
                " progress_lo=EXCLUDED.progress_lo, progress_hi=EXCLUDED.progress_hi,"
                " updated_at=EXCLUDED.updated_at",
                rows,
            )

        if rows:
            await self._call("store the priors in", run)


def _positive(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    )


def _gone(pid: int | None) -> bool:
    """Whether no process ``pid`` runs on this machine."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's: it runs
        return False
    return False


def _passwords(url: str) -> list[str]:
    """The passwords ``url`` holds (in its user part, or as ``password=`` in its query)."""
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
    except ValueError:
        return []
    for item in parts.query.split("&"):
        key, _, value = item.partition("=")
        if key.lower() == "password" and value:
            found += [value, unquote(value)]
    return found


async def _close_quietly(conn: Any) -> None:
    """Close a connection that may be broken already (a lost server): never waits long."""
    if conn is None:
        return
    try:
        with anyio.fail_after(2):
            await conn.close()
    except Exception:  # noqa: BLE001 - gone already: nothing to release
        conn.terminate()

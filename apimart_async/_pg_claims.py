"""Claims on the jobs of a batch in PostgreSQL, for several workers of one batch (issue 15,
part 2): ``_fleet`` runs a worker on them (a batch whose job list is stored; one without it
is run by one process at a time, under the journal's advisory lock).

The batch's job list is stored once (``PostgresJournal(..., fingerprints=...)``); ``join``
gives each of its jobs a row in the table ``claims`` (idempotently) and records the worker
in ``workers``. Then, the way established PostgreSQL job queues do it:

- ``claim(n)`` takes up to ``n`` jobs that are not done and that no worker holds, or whose
  holder's lease ran out, in one statement (``FOR UPDATE SKIP LOCKED``: two workers claiming
  at once never get the same job, and neither waits for the other), each with a lease of
  ``lease`` seconds; it says which were taken over from another worker.
- ``heartbeat()`` renews the lease of every job the worker still holds and returns them: a
  job missing from the answer was taken over (its lease had run out) and must be left alone.
- ``release(indexes)`` lets jobs go at once (the worker stops, or a job ended).
- ``beat()``, the worker's heartbeat: lets go of its jobs that are done, renews the rest;
  ``outstanding()``: the jobs not done that others hold or nobody does; ``records(indexes)``:
  what the journal holds of them now.
- ``limit`` / ``admits``: ``max_pending`` and ``max_cost`` for all the workers together,
  asked in the transaction that records a job before its submit.

Times are the database's (``clock_timestamp()``, in seconds since the epoch), so the
machines' clocks need not agree. A lost database is waited for as the journal's calls are
(``reconnect_for``).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import anyio
import attrs

from ._errors import BudgetExceededError, FieldError, JournalError, TakenOver, ValidationError
from ._journal import JobRecord
from ._pg_journal import _COLUMNS, DB_NOW, PostgresJournal, _Link

logger = logging.getLogger("apimart_async")

__all__ = ["Claim", "Claims"]

T = TypeVar("T")

_NOW = DB_NOW


@attrs.frozen
class Claim:
    """A job a worker took: its index, and the worker that held it before (None if none did,
    or its lease had been let go)."""

    index: int
    previous: str | None = None


class Claims:
    """One worker's claims on the jobs of ``journal``'s batch (see the module doc). ``worker``
    names it (default ``host:pid:random``); ``lease`` is how long a claim holds without a
    heartbeat (seconds)."""

    def __init__(
        self, journal: PostgresJournal, *, worker: str | None = None, lease: float = 30.0
    ) -> None:
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 < lease < 1e9:
            rule = "must be a positive number of seconds"
            raise ValidationError([FieldError("lease", rule, lease)])
        if worker is not None and (not isinstance(worker, str) or not worker.strip()):
            raise ValidationError([FieldError("worker", "must be a non-empty name", worker)])
        self.journal = journal
        self.worker: str = worker or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        """This worker's name."""
        self.lease: float = float(lease)
        """Seconds a claim holds without a heartbeat."""
        self._link = _Link(
            journal._pg,
            journal._url,
            where=journal._where(),
            schema=journal.schema,
            name=journal.name,
            reconnect_for=journal.reconnect_for,
            connect_timeout=journal.connect_timeout,
            locked=False,
        )
        self._q = journal._q
        self._mutex = anyio.Lock()
        self.given_back: set[int] = set()
        """Jobs this worker gave back before their submit (``_unless_orphans``): the
        ``Fleet`` lets them go, and may claim them again."""
        self.not_mine: Callable[[], Iterable[int]] = tuple
        """The jobs this worker never claims again (the ``Fleet``'s: fed to it once): jobs in
        flight among them are not worth giving a waiting job back for."""
        self.max_pending: int | None = None
        self.max_cost: float | None = None
        self.estimate: float | None = None
        self.fleet_limits: tuple[int | None, float | None] = (None, None)
        """The batch's ``(max_pending, max_cost)`` as last read (``join``, ``admits``)."""

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """``fn(connection)``, one at a time on the connection (the heartbeat and the claim
        loop run at once), waiting out a lost database (``reconnect_for``)."""
        async with self._mutex:
            return await self._link.retrying(what, fn)

    def __repr__(self) -> str:
        return f"<Claims {self.journal.url!r} batch={self.journal.name!r} worker={self.worker!r}>"

    async def join(self) -> int:
        """Give every job of the batch's list its row in ``claims`` (once), and record this
        worker; returns the number of jobs in the list."""
        q, name = self._q, self.journal.name

        async def run(conn: Any) -> int:
            async with conn.transaction():
                size = await conn.fetchval(
                    f"SELECT cardinality(fingerprints) FROM {q}.batches WHERE name=$1", name
                )
                if size is None:
                    raise JournalError(
                        f"the journal {self.journal.url} has no job list for the batch"
                        f" {name!r}: open it once with fingerprints= (the CLI does)"
                    )
                await conn.execute(
                    f"INSERT INTO {q}.claims (batch, idx) SELECT $1, generate_series(0, $2 - 1)"
                    " ON CONFLICT DO NOTHING",
                    name,
                    size,
                )
                # this worker's limits join the batch's: the strictest of all holds (a
                # worker started with looser ones, or none, cannot lift the fleet's)
                row = await conn.fetchrow(
                    f"UPDATE {q}.batches SET max_pending = LEAST(max_pending, $2::integer),"
                    " max_cost = LEAST(max_cost, $3::double precision) WHERE name = $1"
                    " RETURNING max_pending, max_cost",
                    name,
                    self.max_pending,
                    self.max_cost,
                )
                self._told_limits(row["max_pending"], row["max_cost"])
                await conn.execute(
                    f"INSERT INTO {q}.workers (batch, worker, host, pid, started_at,"
                    f" heartbeat_at) VALUES ($1, $2, $3, $4, {_NOW}, {_NOW})"
                    " ON CONFLICT (batch, worker) DO UPDATE SET heartbeat_at=EXCLUDED.heartbeat_at",
                    name,
                    self.worker,
                    socket.gethostname(),
                    os.getpid(),
                )
            return int(size)

        return await self._call("join", run)

    async def claim(self, n: int, *, exclude: Iterable[int] = ()) -> list[Claim]:
        """Take up to ``n`` jobs that are not done and are free: never claimed, let go, or with
        a lease that ran out; none of ``exclude``. Jobs in flight first (a dead worker's tasks
        hold places of the fleet's limits until followed to their end), then lowest index."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValidationError([FieldError("n", "must be a whole number, 1 or more", n)])
        q = self._q
        skip = sorted(set(exclude))

        async def run(conn: Any) -> list[Claim]:
            rows = await conn.fetch(
                f"""WITH free AS (
                    SELECT c.idx, c.worker AS previous FROM {q}.claims c
                    WHERE c.batch = $1
                      AND (c.worker IS NULL OR c.lease_until < {_NOW})
                      AND NOT c.idx = ANY($5::integer[])
                      AND NOT EXISTS (
                          SELECT 1 FROM {q}.jobs j
                          WHERE j.batch = c.batch AND j.idx = c.idx AND j.state = 'done')
                    ORDER BY NOT EXISTS (
                          SELECT 1 FROM {q}.jobs j WHERE j.batch = c.batch AND j.idx = c.idx
                          AND j.state IN ('submitting', 'pending', 'downloading')), c.idx
                    LIMIT $3
                    FOR UPDATE OF c SKIP LOCKED
                )
                UPDATE {q}.claims c SET worker = $2, lease_until = {_NOW} + $4
                FROM free WHERE c.batch = $1 AND c.idx = free.idx
                RETURNING c.idx, free.previous""",
                self.journal.name,
                self.worker,
                n,
                self.lease,
                skip,
            )
            return [Claim(r["idx"], r["previous"]) for r in sorted(rows, key=_index)]

        return await self._call("claim jobs in", run)

    async def heartbeat(self) -> set[int]:
        """Renew the lease of every job this worker still holds; returns them (a job it
        claimed and that is missing here was taken over by another worker)."""

        async def run(conn: Any) -> set[int]:
            async with conn.transaction():
                return await self._renew(conn)

        return await self._call("renew the leases in", run)

    async def _renew(self, conn: Any) -> set[int]:
        """Renew the lease of every job this worker holds and its heartbeat (in the caller's
        transaction); the jobs it still holds."""
        q = self._q
        rows = await conn.fetch(
            f"UPDATE {q}.claims SET lease_until = {_NOW} + $3"
            " WHERE batch = $1 AND worker = $2 RETURNING idx",
            self.journal.name,
            self.worker,
            self.lease,
        )
        await conn.execute(
            f"UPDATE {q}.workers SET heartbeat_at = {_NOW} WHERE batch = $1 AND worker = $2",
            self.journal.name,
            self.worker,
        )
        return {int(r["idx"]) for r in rows}

    async def beat(self) -> set[int]:
        """The worker's heartbeat (issue 15): let go of the jobs it holds that are done (the
        journal's ``done`` state, written by whichever worker ended them), renew the lease of
        the others and return them. A job it claimed that is in neither was taken over."""
        q = self._q

        async def run(conn: Any) -> set[int]:
            async with conn.transaction():
                await conn.execute(
                    f"UPDATE {q}.claims c SET worker = NULL, lease_until = NULL"
                    " WHERE c.batch = $1 AND c.worker = $2 AND EXISTS (SELECT 1 FROM"
                    f" {q}.jobs j WHERE j.batch = c.batch AND j.idx = c.idx AND j.state = 'done')",
                    self.journal.name,
                    self.worker,
                )
                return await self._renew(conn)

        return await self._call("renew the leases in", run)

    async def outstanding(self, *, exclude: Iterable[int] = ()) -> int:
        """How many jobs of the batch are not done and not held by this worker (held by
        another, or free), none of ``exclude``."""
        q = self._q
        skip = sorted(set(exclude))

        async def run(conn: Any) -> int:
            n = await conn.fetchval(
                f"SELECT count(*) FROM {q}.claims c WHERE c.batch = $1"
                " AND c.worker IS DISTINCT FROM $2 AND NOT c.idx = ANY($3::integer[])"
                f" AND NOT EXISTS (SELECT 1 FROM {q}.jobs j WHERE j.batch = c.batch"
                " AND j.idx = c.idx AND j.state = 'done')",
                self.journal.name,
                self.worker,
                skip,
            )
            return int(n)

        return await self._call("count the jobs left in", run)

    async def records(self, indexes: Iterable[int]) -> dict[int, JobRecord]:
        """What the journal holds now of these jobs (written by any worker)."""
        wanted = sorted(set(indexes))
        q = self._q

        async def run(conn: Any) -> list[Any]:
            rows: list[Any] = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {q}.jobs WHERE batch = $1"
                " AND idx = ANY($2::integer[]) ORDER BY idx",
                self.journal.name,
                wanted,
            )
            return rows

        return self.journal._records(await self._call("read", run))

    def limit(
        self, *, max_pending: int | None, max_cost: float | None, estimate: float | None = None
    ) -> None:
        """Hold ``max_pending`` (tasks submitted and not ended) and ``max_cost`` (USD) for
        the whole batch, across all its workers: the journal asks ``admits`` in the
        transaction that records a job before its submit (limits or not: it also checks that
        this worker still holds the job). Call it before ``join``: the limits are the batch's,
        kept in its row, the strictest that any of its workers asked for."""
        self.max_pending = max_pending
        self.max_cost = max_cost
        self.estimate = estimate
        self.journal.admission = self.admits

    def _told_limits(self, max_pending: int | None, max_cost: float | None) -> None:
        """Say once when the batch's limits are stricter than this worker's own."""
        told = (max_pending, max_cost)
        if told == self.fleet_limits:
            return
        self.fleet_limits = told
        if (max_pending, max_cost) != (self.max_pending, self.max_cost):
            logger.warning(
                "the batch %s runs under max_pending=%s, max_cost=%s: the strictest limits"
                " its workers were started with (this one: max_pending=%s, max_cost=%s)",
                self.journal.name,
                max_pending,
                max_cost,
                self.max_pending,
                self.max_cost,
            )

    async def admits(self, conn: Any, index: int) -> bool:
        """Whether job ``index`` may be submitted now, fleet-wide (in the caller's
        transaction, under a transaction-level advisory lock of the batch, so two workers
        never both take the last place). In flight: the jobs recorded as ``submitting`` or
        ``pending`` (a killed worker's too, until they end). Money: what ended jobs cost,
        plus an estimate for each job in flight (``estimate``, else the dearest job so far;
        none known: one job at a time, to learn it); over ``max_cost`` with nothing in flight
        to free room: ``BudgetExceededError``. A job another worker holds now (this one's
        lease ran out while it waited) is ``TakenOver``: not recorded, not submitted here."""
        q = self._q
        # the claim, locked until the job is recorded (no other worker claims it meanwhile),
        # and the batch's limits (another worker may have tightened them), in one round trip
        limits = await conn.fetchrow(
            f"SELECT c.worker, b.max_pending, b.max_cost FROM {q}.claims c"
            f" JOIN {q}.batches b ON b.name = c.batch WHERE c.batch = $1 AND c.idx = $2"
            " FOR UPDATE OF c",
            self.journal.name,
            index,
        )
        if limits is None or limits["worker"] != self.worker:
            raise TakenOver(index)
        max_pending: int | None = limits["max_pending"]
        max_cost: float | None = limits["max_cost"]
        self._told_limits(max_pending, max_cost)
        if max_pending is None and max_cost is None:
            return True
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('apimart-async:admit:' || $1), hashtext($2))",
            self.journal.schema,
            self.journal.name,
        )
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE state IN ('submitting', 'pending')) AS flying,"
            " coalesce(sum(cost), 0) AS spent, max(cost) AS dearest"
            f" FROM {q}.jobs WHERE batch = $1 AND idx <> $2",
            self.journal.name,
            index,
        )
        flying: int = row["flying"]
        if max_pending is not None and flying >= max_pending:
            return await self._unless_orphans(conn, index)
        if max_cost is None:
            return True
        est = self.estimate if self.estimate is not None else row["dearest"]
        if est is None:  # nothing tells the price yet: one job at a time learns it
            return flying == 0 or await self._unless_orphans(conn, index)
        if float(row["spent"]) + (flying + 1) * float(est) <= max_cost + 1e-9:
            return True
        if flying:
            return await self._unless_orphans(conn, index)
        raise BudgetExceededError(
            f"budget reached: job {index} not submitted (${float(row['spent']):.2f} spent of"
            f" ${max_cost:.2f} by the batch's workers)"
        )

    async def _unless_orphans(self, conn: Any, index: int) -> bool:
        """The fleet is full: False (wait), unless some of the jobs in flight are held by no
        worker (a dead worker's, its lease run out) and this one may take them. Then job
        ``index`` is given back (``given_back``; raises ``TakenOver``): this worker's feeder,
        waiting for the place this job would take, is free to claim those jobs (in flight
        first) and follow them to their end."""
        orphans = await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {self._q}.jobs j JOIN {self._q}.claims c"
            " ON c.batch = j.batch AND c.idx = j.idx WHERE j.batch = $1 AND j.idx <> $2"
            " AND j.state IN ('submitting', 'pending') AND NOT j.idx = ANY($3::integer[])"
            f" AND (c.worker IS NULL OR c.lease_until < {_NOW}))",
            self.journal.name,
            index,
            sorted(self.not_mine()),
        )
        if not orphans:
            return False
        self.given_back.add(index)
        raise TakenOver(index)

    async def release(self, indexes: Iterable[int]) -> None:
        """Let these jobs go (those this worker holds): any worker may claim them at once."""
        wanted = sorted(set(indexes))
        q = self._q

        async def run(conn: Any) -> None:
            await conn.execute(
                f"UPDATE {q}.claims SET worker = NULL, lease_until = NULL"
                " WHERE batch = $1 AND worker = $2 AND idx = ANY($3::integer[])",
                self.journal.name,
                self.worker,
                wanted,
            )

        if wanted:
            await self._call("release jobs in", run)

    async def close(self) -> None:
        """Close the connection (the claims stay until released or their leases run out)."""
        await self._link.forget()


def _index(row: Any) -> int:
    index: int = row["idx"]
    return index

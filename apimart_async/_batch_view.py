"""What a batch's journal says of it, read without touching it (issue 15): the manifest rebuilt
at any time (``apimart-async manifest``), and the fleet's progress (``apimart-async status
--journal``): totals by state, the workers and the jobs each holds, the cost.

Nothing here writes to the journal, takes its lock or needs the API key. A PostgreSQL batch is
read in one read-only transaction (``REPEATABLE READ``: the totals, the workers and the claims
agree with each other), on a connection of its own, once (no waiting out a lost database: the
command says so and ends). An SQLite journal is read as ``SqliteJournal.read`` reads it (no
lock); its run, if one holds it, is the one line of its fleet (from its lock file's note).
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

from ._errors import JournalError
from ._journal import JobRecord, SqliteJournal, _holder, lock_path
from ._manifest import record_line
from ._pg_journal import _COLUMNS, DB_NOW, PostgresJournal, _close_quietly, _gone
from ._threads import run_sync

__all__ = [
    "BatchView",
    "WorkerView",
    "age_text",
    "manifest_lines",
    "read_batch",
    "write_manifest",
]

_NOW = DB_NOW


@attrs.frozen
class WorkerView:
    """One worker of a batch as the journal knows it."""

    worker: str
    """Its name (``host:pid:random`` for a worker of the CLI; the run's pid for SQLite)."""
    host: str | None
    pid: int | None
    heartbeat_age: float | None
    """Seconds since its last heartbeat (by the database's clock); None if none is kept."""
    held: int
    """The jobs it holds now (claims whose lease has not run out; for a single run, the jobs
    it has in flight)."""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class BatchView:
    """A batch read from its journal: its records, the size of its job list when the journal
    keeps it, and its workers."""

    journal: str
    """The journal, for people: a path, or the URL without its password and the batch."""
    records: dict[int, JobRecord]
    size: int | None
    """The number of jobs in the batch's list (None: the journal does not keep the list)."""
    workers: tuple[WorkerView, ...]

    def states(self) -> dict[str, int]:
        """How many jobs are in each state; ``done`` split by status (``completed``,
        ``failed``, ``error``...), and ``not started`` for the list's jobs not recorded yet."""
        counts: Counter[str] = Counter()
        for r in self.records.values():
            if r.state == "done":
                counts[r.status or "error"] += 1
            else:
                counts[r.state] += 1
        if self.size is not None:
            counts["not started"] = max(0, self.size - len(self.records))
        return dict(sorted(counts.items()))

    def cost(self) -> float:
        """What the batch's tasks cost, as recorded (USD; tasks of unknown cost count 0)."""
        return round(sum(r.cost or 0.0 for r in self.records.values()), 6)

    def to_dict(self) -> dict[str, Any]:
        done = sum(1 for r in self.records.values() if r.state == "done")
        return {
            "journal": self.journal,
            "jobs": self.size,
            "recorded": len(self.records),
            "done": done,
            "states": self.states(),
            "cost": self.cost(),
            "workers": [w.to_dict() for w in self.workers],
        }


def manifest_lines(records: dict[int, JobRecord]) -> list[dict[str, Any]]:
    """The manifest of a batch as its journal holds it, by index: a line per finished job, and
    per refused submit (``error``, as the run that saw it wrote it; a later run sends it
    again). Jobs still running have no line yet."""
    ended = sorted(
        (r for r in records.values() if r.state in ("done", "refused")), key=lambda r: r.index
    )
    return [record_line(r) for r in ended]


async def write_manifest(records: dict[int, JobRecord], path: Path) -> int:
    """Write ``path`` (through a temporary file beside it, then renamed: a reader never sees
    half of it); returns the number of lines. A disk error becomes a ``JournalError``."""
    lines = manifest_lines(records)

    def run() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    try:
        await run_sync(run)
    except OSError as exc:
        raise JournalError(f"cannot write the manifest {path}: {exc.strerror or exc}") from None
    return len(lines)


async def read_batch(journal: Path | PostgresJournal) -> BatchView:
    """The batch ``journal`` holds (a file, or a batch of a PostgreSQL database), read only.
    ``JournalError`` if there is no such journal or batch."""
    if isinstance(journal, PostgresJournal):
        return await _read_pg(journal)
    return await run_sync(_read_file, journal)


def _read_file(path: Path) -> BatchView:
    if not path.is_file():
        raise JournalError(f"no journal at {path}")
    records = SqliteJournal.read(path)
    workers: tuple[WorkerView, ...] = ()
    lock = lock_path(path)
    if lock.is_file():  # a run that ends removes it; one killed leaves it, its pid gone
        pid, _ = _holder(lock)
        if pid is not None and not _gone(pid):
            held = sum(1 for r in records.values() if r.state not in ("done", "refused"))
            host = socket.gethostname()
            workers = (WorkerView(f"{host}:{pid}", host, pid, None, held),)
    return BatchView(str(path), records, None, workers)


async def _read_pg(journal: PostgresJournal) -> BatchView:
    link = journal._link
    where = journal._where()
    try:
        conn = await link.connect()
    except Exception as exc:
        if link.foreign(exc):
            raise link.error("read", exc) from None
        raise
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            return await _read_pg_batch(journal, conn, where)
    except JournalError:
        raise
    except Exception as exc:
        if link.foreign(exc):
            raise link.error("read", exc) from None
        raise
    finally:
        await _close_quietly(conn)


async def _read_pg_batch(journal: PostgresJournal, conn: Any, where: str) -> BatchView:
    q, name = journal._q, journal.name
    if await journal._version(conn) is None:
        raise JournalError(f"no batch {name!r} in {journal.url}: schema {journal.schema} is empty")
    batch = await conn.fetchrow(
        f"SELECT cardinality(fingerprints) AS size, run_host, run_pid, run_started,"
        f" {_NOW} AS now FROM {q}.batches WHERE name=$1",
        name,
    )
    if batch is None:
        known = [r["name"] for r in await conn.fetch(f"SELECT name FROM {q}.batches ORDER BY 1")]
        shown = ", ".join(repr(k) for k in known[:10]) or "none"
        raise JournalError(
            f"no batch {name!r} in {journal.url} (schema {journal.schema}); batches there: {shown}"
        )
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM {q}.jobs WHERE batch=$1 ORDER BY idx", name)
    records = journal._records(rows)
    workers = await conn.fetch(
        f"""SELECT w.worker, w.host, w.pid, {_NOW} - w.heartbeat_at AS age,
               (SELECT count(*) FROM {q}.claims c WHERE c.batch = w.batch
                  AND c.worker = w.worker AND c.lease_until >= {_NOW}) AS held
           FROM {q}.workers w WHERE w.batch = $1 ORDER BY w.started_at, w.worker""",
        name,
    )
    views = [
        WorkerView(r["worker"], r["host"], r["pid"], _age(r["age"]), int(r["held"]))
        for r in workers
    ]
    if not views and await _run_holds(conn, journal):
        # one run (no claims): the holder of the batch's lock, as it noted itself
        held = sum(1 for r in records.values() if r.state not in ("done", "refused"))
        host, pid = batch["run_host"], batch["run_pid"]
        views = [WorkerView(f"{host}:{pid}", host, pid, None, held)]
    return BatchView(where, records, batch["size"], tuple(views))


async def _run_holds(conn: Any, journal: PostgresJournal) -> bool:
    """Whether a run holds the batch's advisory lock now (read from ``pg_locks``, not taken)."""
    held: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND classid = hashtext('apimart-async:' || $1)::oid"
        " AND objid = hashtext($2)::oid AND objsubid = 2)",
        journal.schema,
        journal.name,
    )
    return held


def _age(value: object) -> float | None:
    if isinstance(value, (int, float)):
        return max(0.0, round(float(value), 1))
    return None


def age_text(seconds: float | None) -> str:
    """``12 s ago``, ``3 min ago``, ``2.5 h ago``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"

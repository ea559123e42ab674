"""``apimart-async manifest`` and ``apimart-async status --journal`` (issue 15): a batch read
from its journal, PostgreSQL (the real server of tests/_pg.py) or SQLite, without the API key
and without writing to it (a PostgreSQL reader with SELECT rights only; an SQLite file
unchanged to the byte)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import apimart_async as am
from apimart_async._journal import RunLock
from apimart_async._pg_claims import Claims
from apimart_async._pg_journal import PostgresJournal
from apimart_async.emulator import Emulator

from ._pg import PgServer
from .test_cli import cli
from .test_journal import client_for
from .test_pg_journal import fetchval

pytestmark = pytest.mark.anyio


def requests(n: int) -> list[tuple[str, am.VideoRequest]]:
    return [(f"clip-{i}", am.VideoRequest("sora-2-preview", f"prompt {i}")) for i in range(n)]


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    """Tasks end at once; the third one created fails."""
    async with Emulator(mode="manual", frozen_clock=True) as emulator:
        yield emulator


async def run_batch(emu: Emulator, journal: object, out: Path, n: int = 5, **kw: Any) -> None:
    """A batch run to its end: one task fails, the others complete and are downloaded."""
    async with client_for(emu) as client:
        async with client.batch(requests(n), journal=journal, download_dir=out, **kw) as results:
            await emu.wait_until(lambda: emu.tasks_created == n)
            ids = sorted(emu.task_ids())
            emu.fail(ids[2])
            for task_id in ids[:2] + ids[3:]:
                emu.complete(task_id)
            outcomes = [o async for o in results]
    assert len(outcomes) == n


def lines_of(path: Path) -> list[dict[str, Any]]:
    return sorted(
        (json.loads(line) for line in path.read_text().splitlines()), key=lambda d: d["index"]
    )


async def reader_url(pg: PgServer, schema: str) -> str:
    """A role that may only read the schema's tables: a command that wrote would fail."""
    import asyncpg

    conn = await asyncpg.connect(pg.url)
    try:
        await conn.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'reader') THEN"
            " CREATE ROLE reader LOGIN PASSWORD 'r3ader-secret'; END IF; END $$"
        )
        await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO reader")
        await conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO reader")
    finally:
        await conn.close()
    return f"postgresql://reader:r3ader-secret@127.0.0.1:{pg.port}/postgres"


# -- manifest ---------------------------------------------------------------------------------


async def test_manifest_rebuilt_from_a_postgres_journal_is_the_runs(
    emu: Emulator, postgres: PgServer, pg_schema: str, tmp_path: Path
) -> None:
    j = PostgresJournal(postgres.url, name="spring", schema=pg_schema)
    await run_batch(emu, j, tmp_path / "run")
    written = lines_of(tmp_path / "run" / "manifest.jsonl")
    assert sorted(d["status"] for d in written) == ["completed"] * 4 + ["failed"]
    url = await reader_url(postgres, pg_schema)
    out = tmp_path / "rebuilt"
    code, stdout, stderr = await cli(
        "manifest", "--journal", url, "--name", "spring", "--schema", pg_schema, "--out", str(out)
    )
    assert code == 0, stderr
    assert lines_of(out / "manifest.jsonl") == written
    assert f"{out / 'manifest.jsonl'}: 5 line(s) from postgresql://reader:***@" in stdout
    assert "r3ader-secret" not in stdout + stderr
    assert not list(out.glob("*.tmp")) and not (out / ".apimart-run.lock").exists()
    # --json, and a batch still running: its unfinished jobs have no line yet
    sql = f"UPDATE {pg_schema}.jobs SET state='pending' WHERE idx=4"
    await fetchval(postgres.url, sql)
    code, stdout, stderr = await cli(
        "manifest", "--journal", url, "--name", "spring", "--schema", pg_schema,
        "--out", str(out), "--json",
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads(stdout)["lines"] == 4
    assert [d["index"] for d in lines_of(out / "manifest.jsonl")] == [0, 1, 2, 3]


async def test_manifest_rebuilt_from_an_sqlite_journal_leaves_it_unchanged(
    emu: Emulator, tmp_path: Path
) -> None:
    journal = tmp_path / "run" / "journal.sqlite"
    await run_batch(emu, journal, tmp_path / "run")
    before = hashlib.sha256(journal.read_bytes()).hexdigest()
    out = tmp_path / "rebuilt"
    code, _, stderr = await cli("manifest", "--journal", str(journal), "--out", str(out))
    assert code == 0, stderr
    assert lines_of(out / "manifest.jsonl") == lines_of(tmp_path / "run" / "manifest.jsonl")
    assert hashlib.sha256(journal.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in journal.parent.glob("journal.sqlite*")) == ["journal.sqlite"]


async def test_manifest_is_not_written_where_a_run_writes_its_own(
    postgres: PgServer, pg_schema: str, tmp_path: Path
) -> None:
    j = PostgresJournal(postgres.url, name="b", schema=pg_schema)
    await j.open()
    await j.close()
    out = tmp_path / "out"
    out.mkdir()
    lock = RunLock.acquire(out, what="output directory", lock_file=out / ".apimart-run.lock")
    try:
        code, _, stderr = await cli(
            "manifest", "--journal", postgres.url, "--name", "b", "--schema", pg_schema,
            "--out", str(out),
        )  # fmt: skip
    finally:
        lock.release()
    assert code == 1
    assert f"another run (pid {os.getpid()}" in stderr and "output directory" in stderr
    assert not (out / "manifest.jsonl").exists()


async def test_manifest_and_status_errors(
    postgres: PgServer, pg_schema: str, tmp_path: Path
) -> None:
    j = PostgresJournal(postgres.url, name="spring", schema=pg_schema)
    await j.open()
    await j.close()
    pg = ["--journal", postgres.url, "--schema", pg_schema]
    out = ["--out", str(tmp_path / "o")]
    cases: list[tuple[list[str], int, str]] = [
        (["manifest", *pg, *out], 2, "--name NAME is required with a postgresql:// journal"),
        (["status", *pg], 2, "--name NAME is required with a postgresql:// journal"),
        (["manifest", *pg, "--name", "autumn", *out], 1, "no batch 'autumn' in postgresql://"),
        (["status", *pg, "--name", "autumn"], 1, "batches there: 'spring'"),
        (["status", *pg, "--name", "spring", "task_1"], 2, "TASK_IDs or --journal, not both"),
        (["status", "--name", "spring"], 2, "--name and --schema go with --journal"),
        (["status"], 2, "give one or more TASK_IDs, or --journal J"),
        (["manifest", *out], 2, "the following arguments are required: --journal"),
        (["manifest", "--journal", str(tmp_path / "none.sqlite"), "--name", "x", *out], 2,
         "--name and --schema are for a --journal postgresql://... only"),
        (["manifest", "--journal", str(tmp_path / "none.sqlite"), *out], 1, "no journal at"),
        (["status", "--journal", "mysql://u:pw@h/db", "--name", "x"], 2, "journal: is a mysql://"),
        (["status", "--journal", postgres.url.replace(postgres.password, "wrong-pw-9"),
          "--name", "spring"], 1, "password authentication failed"),
        (["status", *pg, "--name", "spring", "--schema", "1bad"], 2, "schema: must be"),
    ]  # fmt: skip
    for argv, expected, message in cases:
        code, stdout, stderr = await cli(*argv)
        assert (code, message in stderr) == (expected, True), (argv, stderr)
        for secret in (postgres.password, "wrong-pw-9", ":pw@"):
            assert secret not in stdout + stderr
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


# -- status -----------------------------------------------------------------------------------


async def test_status_shows_the_fleet_its_workers_and_cost(
    postgres: PgServer, pg_schema: str
) -> None:
    n = 10
    fingerprints = [f"{i:064x}" for i in range(n)]
    j = PostgresJournal(postgres.url, name="spring", schema=pg_schema, fingerprints=fingerprints)
    await j.open()
    try:  # jobs 0-3 done (one failed), 4-5 running, 6 submitting, 7-9 not started
        for i in range(7):
            await j.add(i, fingerprints[i], f"key-{i}", f"clip-{i}", {"model": "m"})
        for i in range(6):
            await j.set_task(i, f"task_{i}")
        for i, status in enumerate(["completed", "completed", "failed", "completed"]):
            await j.finish(
                i, status=status, cost=0.25, task=None, files=(), error=None, error_type=None
            )
    finally:
        await j.close()
    workers = [Claims(j, worker=f"w{k}", lease=300) for k in range(3)]
    try:
        for w in workers:
            await w.join()
        await workers[0].claim(2)  # jobs 4, 5
        await workers[1].claim(1)  # job 6
        await workers[2].claim(1)  # job 7, then the lease runs out and the heartbeat stops
        await fetchval(
            postgres.url,
            f"UPDATE {pg_schema}.claims SET lease_until = lease_until - 1000 WHERE worker='w2'",
        )
        await fetchval(
            postgres.url,
            f"UPDATE {pg_schema}.workers SET heartbeat_at = heartbeat_at - 600 WHERE worker='w2'",
        )
    finally:
        for w in workers:
            await w.close()
    url = await reader_url(postgres, pg_schema)
    base = ["status", "--journal", url, "--name", "spring", "--schema", pg_schema]
    code, stdout, stderr = await cli(*base, "--json")
    assert code == 0, stderr
    view = json.loads(stdout)
    assert view["jobs"] == n and view["recorded"] == 7 and view["done"] == 4
    assert view["states"] == {
        "completed": 3, "failed": 1, "not started": 3, "pending": 2, "submitting": 1,
    }  # fmt: skip
    assert view["cost"] == 1.0
    host, pid = socket.gethostname(), os.getpid()
    got = {w["worker"]: (w["host"], w["pid"], w["held"]) for w in view["workers"]}
    assert got == {"w0": (host, pid, 2), "w1": (host, pid, 1), "w2": (host, pid, 0)}
    ages = {w["worker"]: w["heartbeat_age"] for w in view["workers"]}
    assert ages["w2"] >= 600 > ages["w0"]
    assert view["journal"].startswith("postgresql://reader:***@127.0.0.1")
    code, stdout, stderr = await cli(*base)
    assert code == 0, stderr
    assert "jobs      10: 3 completed, 1 failed, 3 not started, 2 pending, 1 submitting" in stdout
    assert "cost      $1.00 (recorded)" in stdout and "workers   3" in stdout
    assert f"  w0  host {host}  pid {pid}  heartbeat " in stdout and "holds 2" in stdout
    assert "heartbeat 10 min ago  holds 0" in stdout
    assert "r3ader-secret" not in stdout + stderr


async def test_status_of_a_single_run_is_one_line_or_none(
    emu: Emulator, postgres: PgServer, pg_schema: str, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.sqlite"
    await run_batch(emu, journal, tmp_path, n=3)
    code, stdout, stderr = await cli("status", "--journal", str(journal), "--json")
    assert code == 0, stderr
    view = json.loads(stdout)
    assert (view["jobs"], view["recorded"], view["workers"]) == (None, 3, [])
    assert view["states"] == {"completed": 2, "failed": 1}
    lock = RunLock.acquire(journal)  # a run holds it: this process, on this machine
    try:
        code, stdout, stderr = await cli("status", "--journal", str(journal), "--json")
    finally:
        lock.release()
    assert code == 0, stderr
    [worker] = json.loads(stdout)["workers"]
    assert (worker["host"], worker["pid"], worker["held"]) == (socket.gethostname(), os.getpid(), 0)
    # PostgreSQL without claims: the run holding the batch's lock is its one worker
    j = PostgresJournal(postgres.url, name="solo", schema=pg_schema)
    await j.open()
    try:
        code, stdout, stderr = await cli(
            "status", "--journal", postgres.url, "--name", "solo", "--schema", pg_schema, "--json"
        )
    finally:
        await j.close()
    assert code == 0, stderr
    [worker] = json.loads(stdout)["workers"]
    assert (worker["host"], worker["pid"]) == (socket.gethostname(), os.getpid())
    code, stdout, stderr = await cli(
        "status", "--journal", postgres.url, "--name", "solo", "--schema", pg_schema, "--json"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["workers"] == []


async def test_status_with_a_role_that_may_not_read_the_schema_says_so(
    postgres: PgServer, pg_schema: str
) -> None:
    """A role without USAGE on the schema sees no table of it in information_schema: status
    said 'schema ... is empty' (a batch that is there, with its jobs), sending the user to
    look for a wrong name instead of asking for the rights."""
    import asyncpg

    j = PostgresJournal(postgres.url, name="spring", schema=pg_schema)
    await j.open()
    await j.close()
    conn = await asyncpg.connect(postgres.url)
    try:
        await conn.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outsider') THEN"
            " CREATE ROLE outsider LOGIN PASSWORD 'outs1der-secret'; END IF; END $$"
        )
    finally:
        await conn.close()
    url = f"postgresql://outsider:outs1der-secret@127.0.0.1:{postgres.port}/postgres"
    for command in (["status"], ["manifest", "--out", "/nonexistent-dir/o"]):
        code, stdout, stderr = await cli(
            *command, "--journal", url, "--name", "spring", "--schema", pg_schema
        )
        assert code == 1, stderr
        assert "is empty" not in stderr
        assert f"permission denied for schema {pg_schema}" in stderr
        assert "outs1der-secret" not in stdout + stderr

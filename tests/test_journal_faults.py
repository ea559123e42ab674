"""Journals pushed the way real programs push them (issue 14): files that are not ours or are
damaged, two runs on one journal, a journal whose disk fills up."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import apimart_async as am
from apimart_async._journal import SqliteJournal
from apimart_async._priors import KindPrior
from apimart_async.emulator import Emulator

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def jobs(n: int) -> list[tuple[str, am.VideoRequest]]:
    return [(f"job{i}", am.VideoRequest("sora-2-preview", f"prompt {i}")) for i in range(n)]


def client_for(emu: Emulator, **kw: Any) -> am.AsyncApimart:
    return am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL, **kw)


def _sql(path: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for sql in statements:
            conn.execute(sql)
        conn.commit()


async def _our_journal(path: Path, n: int = 3) -> None:
    """A journal as this SDK writes it, with ``n`` jobs, two of them done with files."""
    journal = SqliteJournal(path)
    await journal.open()
    for i in range(n):
        await journal.add(i, f"fp{i}", f"key-{i}", f"job{i}", {"model": "sora-2-preview"})
        await journal.set_task(i, f"task_{i}")
    file = am.DownloadedFile(url="https://e/v.mp4", path="/tmp/v.mp4", bytes=3, sha256="ab")
    for i in range(min(n, 2)):
        await journal.finish(
            i, status="completed", cost=0.1, task={"id": f"task_{i}"}, files=(file,),
            error=None, error_type=None,
        )  # fmt: skip
    await journal.close()


def _other_program(path: Path) -> None:
    _sql(
        path,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)",
        "INSERT INTO users VALUES (1, 'a@example.com')",
    )


def _other_program_same_names(path: Path) -> None:
    # another program that happens to use tables called meta and jobs
    _sql(
        path,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta VALUES ('schema', '2')",
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, cron TEXT)",
        "INSERT INTO jobs VALUES (1, '* * * * *')",
    )


def _truncated(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.close()
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size // 2)


async def _big_journal(path: Path) -> None:
    journal = SqliteJournal(path)
    await journal.open()
    for i in range(300):
        await journal.add(i, f"fp{i}", f"key-{i}", None, {"prompt": "x" * 500})
    await journal.close()


def _cut_in_half(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size // 2)


def _scribble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for off in range(4096, len(data), 4096):  # every page after the first
        data[off : off + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))


OURS = "ours"  # the case starts from a journal written by this SDK

# case -> (start, damage, what the message must say)
CASES: dict[str, tuple[str, Callable[[Path], None] | None, str]] = {
    "schema 1.0-beta": (
        OURS,
        lambda p: _sql(p, "UPDATE meta SET value='1.0-beta' WHERE key='schema'"),
        "unknown journal schema '1.0-beta'",
    ),
    "schema superscript two": (
        OURS,
        lambda p: _sql(p, "UPDATE meta SET value='\u00b2' WHERE key='schema'"),
        "unknown journal schema",
    ),
    "schema 0": (
        OURS,
        lambda p: _sql(p, "UPDATE meta SET value='0' WHERE key='schema'"),
        "unknown journal schema '0'",
    ),
    "no schema": (OURS, lambda p: _sql(p, "DELETE FROM meta"), "no schema version"),
    "files not json": (
        OURS,
        lambda p: _sql(p, "UPDATE jobs SET files='{not json' WHERE idx=1"),
        "job 1 is unreadable",
    ),
    "files not a list of files": (
        OURS,
        lambda p: _sql(p, "UPDATE jobs SET files='[1, 2]' WHERE idx=1"),
        "job 1 is unreadable",
    ),
    "a file with wrong fields": (
        OURS,
        lambda p: _sql(p, "UPDATE jobs SET files='[{\"path\": 3}]' WHERE idx=0"),
        "job 0 is unreadable",
    ),
    "a file field of the wrong type": (
        OURS,
        lambda p: _sql(
            p,
            'UPDATE jobs SET files=\'[{"url": "u", "path": 3, "bytes": "x", "sha256": 1}]\''
            " WHERE idx=0",
        ),
        "job 0 is unreadable",
    ),
    "task not json": (
        OURS,
        lambda p: _sql(p, "UPDATE jobs SET task='nope' WHERE idx=0"),
        "job 0 is unreadable",
    ),
    "task not an object": (
        OURS,
        lambda p: _sql(p, "UPDATE jobs SET task='[1]' WHERE idx=0"),
        "job 0 is unreadable",
    ),
    "unknown state": (
        OURS,
        lambda p: _sql(p, "UPDATE jobs SET state='exploded' WHERE idx=2"),
        "job 2 is unreadable: unknown state 'exploded'",
    ),
    "body not json": (
        OURS,
        lambda p: _sql(p, "UPDATE jobs SET body='{' WHERE idx=2"),
        "job 2 is unreadable",
    ),
    "pending without a task id": (
        OURS,
        lambda p: _sql(p, "UPDATE jobs SET task_id=NULL WHERE idx=2"),
        "job 2 is unreadable",
    ),
    "another program": ("empty", _other_program, "not an apimart-async journal"),
    "another program with tables meta and jobs": (
        "empty",
        _other_program_same_names,
        "not an apimart-async journal",
    ),
    "not sqlite": (
        "empty",
        lambda p: p.write_bytes(b"this is not sqlite" * 100),
        "not an SQLite file",
    ),
    "sqlite header then garbage": (
        "empty",
        lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\x07" * 5000),
        "damaged",
    ),
    "truncated tiny file": ("empty", _truncated, "damaged"),
    "cut in half": ("big", _cut_in_half, "damaged"),
    "scribbled pages": ("big", _scribble, "damaged"),
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(CASES))
async def test_a_journal_that_is_not_ours_or_damaged_is_refused_and_nothing_is_sent(
    case: str, emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    start, damage, says = CASES[case]
    path = tmp_path / "run.sqlite"
    if start == OURS:
        await _our_journal(path)
    elif start == "big":
        await _big_journal(path)
    assert damage is not None
    damage(path)
    before = _digest(path)
    with pytest.raises(am.JournalError) as caught:
        async with client.batch(jobs(3), journal=path):
            pass
    message = str(caught.value)
    assert str(path) in message, message
    assert says in message, message
    assert type(caught.value) is am.JournalError
    assert emu.counters.get("submit", 0) == 0 and emu.tasks_created == 0
    assert _digest(path) == before  # a file that is not a usable journal is left as it was
    # the read-only reader (report, gallery) refuses it the same way
    with pytest.raises(am.JournalError, match=re.escape(str(path))):
        SqliteJournal.read(path)


async def test_another_programs_database_keeps_its_tables(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    path = tmp_path / "app.db"
    _other_program(path)
    with pytest.raises(am.JournalError, match="tables: users"):
        async with client.batch(jobs(1), journal=path):
            pass
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert tables == ["users"]
    assert emu.counters.get("submit", 0) == 0


@pytest.mark.parametrize("schema", ["1", "2", "3", "4"])
async def test_our_older_journals_without_the_marker_are_still_opened(
    schema: str, emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    """Journals written before the marker existed (schemas 1 to 4) are recognised by their
    tables and migrated; the marker is added."""
    path = tmp_path / "run.sqlite"
    async with client.batch(jobs(2), journal=path) as results:
        await emu.wait_until(lambda: emu.tasks_created == 2)
        emu.advance(10)
        first = [o async for o in results]
    assert all(o.ok for o in first)
    statements = ["DELETE FROM meta WHERE key != 'schema'", f"UPDATE meta SET value='{schema}'"]
    if schema in ("1", "2"):
        statements.append("DROP TABLE priors")
    statements.append("DROP TABLE submits")  # schema 5 added it
    _sql(path, *statements)
    async with client.batch(jobs(2), journal=path) as results:
        again = [o async for o in results]
    assert [o.replayed for o in again] == [True, True]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    assert meta["schema"] == "5" and meta["format"] == "apimart-async journal"
    assert emu.counters.get("submit", 0) == 2


async def test_an_empty_file_is_a_new_journal(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    path = tmp_path / "run.sqlite"
    path.touch()  # e.g. made by `touch` or mktemp
    async with client.batch(jobs(1), journal=path) as results:
        await emu.wait_until(lambda: emu.tasks_created == 1)
        emu.advance(10)
        assert [o.ok async for o in results] == [True]


# -- one run per journal -------------------------------------------------------------------


async def test_a_second_batch_on_the_same_journal_is_refused_at_once(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    path = tmp_path / "run.sqlite"
    async with client.batch(jobs(3), journal=path):
        await emu.wait_until(lambda: emu.tasks_created == 3)
        with pytest.raises(am.JournalLockedError) as caught:
            async with client.batch(jobs(3), journal=path):
                pass
        # the run holding it is this very process: said so, not "another run"
        message = str(caught.value)
        assert f"this process (pid {os.getpid()}) already uses this journal {path} (" in message
        assert caught.value.pid == os.getpid()
        assert isinstance(caught.value, am.JournalError)
        # an SqliteJournal opened by hand is refused the same way
        with pytest.raises(am.JournalLockedError):
            await SqliteJournal(path).open()
        assert emu.counters.get("submit", 0) == 3
    # the lock ends with the batch: the same journal resumes the three tasks, sending nothing
    async with client.batch(jobs(3), journal=path) as results:
        emu.advance(10)
        outcomes = [o async for o in results]
    assert sorted(o.index for o in outcomes if o.ok) == [0, 1, 2]
    assert emu.counters.get("submit", 0) == 3 and emu.tasks_created == 3


async def test_a_journal_reached_through_a_symlink_is_locked_as_the_same_journal(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    # a user keeps `latest.sqlite -> run-monday.sqlite` and starts the same command twice,
    # once with each name: one database, so one run
    path = tmp_path / "run-monday.sqlite"
    link = tmp_path / "latest.sqlite"
    link.symlink_to(path.name)
    async with client.batch(jobs(3), journal=link):
        await emu.wait_until(lambda: emu.tasks_created == 3)
        for other in (path, link):
            with pytest.raises(am.JournalLockedError) as caught:
                async with client.batch(jobs(3), journal=other):
                    pass
            assert str(other) in str(caught.value)
        assert emu.counters.get("submit", 0) == 3


HOLDER = """
import sys, anyio
from apimart_async import SqliteJournal

async def main():
    journal = SqliteJournal(sys.argv[1])
    await journal.open()
    print("holding", flush=True)
    await anyio.sleep(3600)

anyio.run(main)
"""


@contextlib.contextmanager
def _holder(path: Path) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


async def test_a_killed_run_leaves_no_stale_lock(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path
) -> None:
    path = tmp_path / "run.sqlite"
    with _holder(path) as proc:
        assert proc.stdout is not None
        assert await anyio.to_thread.run_sync(proc.stdout.readline) == "holding\n"
        with pytest.raises(am.JournalLockedError) as caught:
            async with client.batch(jobs(2), journal=path):
                pass
        assert f"another run (pid {proc.pid}, started " in str(caught.value)
        assert emu.counters.get("submit", 0) == 0
        os.kill(proc.pid, signal.SIGKILL)
        await anyio.to_thread.run_sync(proc.wait)
    async with client.batch(jobs(2), journal=path) as results:
        await emu.wait_until(lambda: emu.tasks_created == 2)
        emu.advance(10)
        assert sorted(o.index for o in [o async for o in results] if o.ok) == [0, 1]
    assert emu.counters.get("submit", 0) == 2


async def test_the_cli_refuses_a_second_run_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "videos"
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(
        "".join(json.dumps({"model": "sora-2-preview", "prompt": f"p{i}"}) + "\n" for i in range(3))
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with Emulator() as emu:
        env["APIMART_API_KEY"] = emu.api_key
        for journal, extra in [
            (out / ".apimart-journal.sqlite", []),  # the default journal, in the output folder
            (tmp_path / "elsewhere.sqlite", ["--journal", str(tmp_path / "elsewhere.sqlite")]),
        ]:
            with _holder(journal) as proc:
                assert proc.stdout is not None
                assert await anyio.to_thread.run_sync(proc.stdout.readline) == "holding\n"
                args = ["run", str(jobs_file), "--out", str(out), "--base-url", emu.base_url]
                result = await anyio.run_process(
                    [sys.executable, "-m", "apimart_async.cli", *args, *extra],
                    env=env,
                    check=False,
                )
            err = result.stderr.decode()
            assert result.returncode == 1, err
            assert f"another run (pid {proc.pid}, started " in err
            assert f"is using this journal {journal}" in err
            assert "Traceback" not in err
            assert emu.counters.get("submit", 0) == 0


# -- a journal that cannot write ---------------------------------------------------------------


_real_connect = sqlite3.connect


class _FullDisk:
    """Stands in for sqlite3.connect in ``_journal``: connections whose writes fail as on a
    full disk from the ``fail_at``-th write on (a full disk stays full), until ``freed``."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.writes = 0
        self.failed = 0
        self.freed = False

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        return _Conn(self, _real_connect(*args, **kwargs))

    def check(self, sql: str) -> None:
        words = sql.split()
        if words[0].upper() not in ("INSERT", "UPDATE") or not {
            "jobs",
            "priors",
            "submits",  # a client journal's
        } & set(words):
            return  # only the writes of a batch or a client, not the creation of the file
        self.writes += 1
        if not self.freed and self.writes >= self.fail_at:
            self.failed += 1
            raise sqlite3.OperationalError("database or disk is full")


class _Conn:
    def __init__(self, disk: _FullDisk, conn: sqlite3.Connection) -> None:
        self._disk = disk
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> Any:
        self._disk.check(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        self._disk.check(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


WRITES_PER_CLEAN_RUN = 12  # 3 jobs x (add, task id, downloading, done)


async def _run_to_the_end(
    client: am.AsyncApimart, path: Path, out: Path, n: int
) -> tuple[list[am.Success | am.Failure], BaseException | None, am.Batch]:
    """One batch, read to the end: its outcomes and what it raised (from the iteration or
    from leaving the block)."""
    outcomes: list[am.Success | am.Failure] = []
    raised: BaseException | None = None
    batch = client.batch(jobs(n), journal=path, download_dir=out, manifest=out / "manifest.jsonl")
    try:
        async with batch as results:
            async for outcome in results:
                outcomes.append(outcome)
    except Exception as exc:
        raised = exc
    return outcomes, raised, batch


@pytest.mark.parametrize("fail_at", range(1, WRITES_PER_CLEAN_RUN + 1))
async def test_a_full_journal_disk_stops_the_batch_cleanly_and_loses_nothing(
    fail_at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 3
    path, out = tmp_path / "run.sqlite", tmp_path / "videos"
    disk = _FullDisk(fail_at)
    monkeypatch.setattr("apimart_async._journal.sqlite3.connect", disk.connect)
    async with Emulator(task_duration=0.0) as emu, client_for(emu) as client:
        first, raised, batch = await _run_to_the_end(client, path, out, n)
        assert disk.writes >= fail_at, "the fault was never reached"
        paid = set(emu.task_ids())
        # the batch stopped with a JournalError that says what happened and how to resume
        assert type(raised) is am.JournalError, repr(raised)
        message = str(raised)
        assert f"cannot write the journal {path}: database or disk is full" in message
        assert "run the same batch again with the same journal" in message
        assert batch.stopped is not None and "journal" in batch.stopped
        # every paid task is findable now: handed out, listed as pending, or named
        findable = {o.task_id for o in first} | set(batch.pending_task_ids())
        assert paid <= findable, (paid - findable, message)
        assert all(t in message for t in batch.pending_task_ids())
        # the disk is freed; the same batch again finishes every job, paying for none twice
        disk.freed = True
        second, raised_again, _ = await _run_to_the_end(client, path, out, n)
        assert raised_again is None, repr(raised_again)
        assert sorted(o.index for o in second) == list(range(n))
        assert all(o.ok for o in second), [o.error for o in second]
        assert emu.tasks_created == n  # 0 duplicated
        assert all(count == 1 for count in emu.tasks_per_key.values())
        assert {o.task_id for o in second} == set(emu.task_ids())  # 0 lost
        lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert sorted(line["index"] for line in lines) == list(range(n))


async def test_no_raw_sqlite_error_leaves_any_journal_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = _FullDisk(fail_at=1)
    monkeypatch.setattr("apimart_async._journal.sqlite3.connect", disk.connect)
    disk.freed = True
    journal = SqliteJournal(tmp_path / "run.sqlite")
    await journal.open()
    await journal.add(0, "fp", "key-0", None, {"model": "m"})
    disk.freed = False
    calls = {
        "add": journal.add(1, "fp", "key-1", None, {"model": "m"}),
        "set_task": journal.set_task(0, "task_0"),
        "set_downloading": journal.set_downloading(0, {"id": "task_0"}, 0.1),
        "refused": journal.refused(0, error="no", error_type="BadRequestError"),
        "restart": journal.restart(0, "fp2", "key-2", None, {"model": "m"}),
        "finish": journal.finish(
            0, status="completed", cost=0.1, task=None, files=(), error=None, error_type=None
        ),
        "save_priors": journal.save_priors({"k": KindPrior(1, 1.0, 2.0, None, None)}),
    }
    for name, call in calls.items():
        with pytest.raises(am.JournalError, match="database or disk is full") as caught:
            await call
        assert str(tmp_path / "run.sqlite") in str(caught.value), name
    await journal.close()  # closing never raises: every write made was committed


async def test_leaving_the_block_raises_the_journal_error_not_a_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.sqlite"
    disk = _FullDisk(fail_at=5)  # a task id cannot be recorded
    monkeypatch.setattr("apimart_async._journal.sqlite3.connect", disk.connect)
    async with Emulator(frozen_clock=True, task_duration=10.0) as emu, client_for(emu) as client:
        with pytest.raises(am.JournalError, match="database or disk is full") as caught:
            async with client.batch(jobs(3), journal=path) as results:
                await emu.wait_until(lambda: disk.failed > 0 and results.stopped is not None)
        assert "the batch stopped" in str(caught.value)
        paid = set(emu.task_ids())
        # each paid task is listed: by its id, or by its key when leaving the block cut its
        # submit off before the reply was taken (a resubmit with that key is that task)
        cut_off = {key for _i, _r, key in results.unconfirmed_submissions()}
        by_key = {t for t in paid if emu.state.tasks[t].idempotency_key in cut_off}
        assert paid and paid <= set(results.pending_task_ids()) | by_key
        assert not by_key & set(results.pending_task_ids())  # never listed twice
        disk.freed = True
        async with client.batch(jobs(3), journal=path) as results:
            await emu.wait_until(lambda: emu.counters.get("submit", 0) >= 3)
            emu.advance(10)
            again = [o async for o in results]
        assert sorted(o.index for o in again if o.ok) == [0, 1, 2]
        assert emu.tasks_created == 3 and {o.task_id for o in again} == set(emu.task_ids())


@contextlib.contextmanager
def _small_disk(where: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs mounted at ``where`` (skips where the machine does not allow it)."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(
            "cannot mount a size-limited tmpfs here (needs root); the injected"
            " 'database or disk is full' tests cover the same paths"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


async def test_a_journal_on_a_disk_that_fills_up(tmp_path: Path) -> None:
    n = 6
    with _small_disk(tmp_path / "disk", "256k") as disk:
        path = disk / "run.sqlite"
        async with Emulator(frozen_clock=True, task_duration=10.0) as emu:
            async with client_for(emu) as client:
                first: list[am.Success | am.Failure] = []
                with pytest.raises(am.JournalError) as caught:
                    async with client.batch(jobs(n), journal=path, concurrency=1) as results:
                        await emu.wait_until(lambda: emu.tasks_created == 1)
                        filler = _fill(disk)
                        async for outcome in results:
                            first.append(outcome)
                message = str(caught.value)
                assert f"cannot write the journal {path}: database or disk is full" in message
                assert "run the same batch again with the same journal" in message
                paid = set(emu.task_ids())
                assert paid <= {o.task_id for o in first} | set(results.pending_task_ids())
                filler.unlink()  # space again: the same batch resumes
                async with client.batch(jobs(n), journal=path) as results:
                    await emu.wait_until(lambda: emu.tasks_created == n)
                    emu.advance(10)
                    again = [o async for o in results]
            assert sorted(o.index for o in again if o.ok) == list(range(n))
            assert emu.tasks_created == n  # 0 duplicated
            assert {o.task_id for o in again} == set(emu.task_ids())  # 0 lost


async def test_two_cli_runs_into_one_output_directory(tmp_path: Path) -> None:
    """The same command started twice: the second is refused before it sends anything; the
    first, killed with SIGKILL, leaves no stale lock: a third run resumes it."""
    out = tmp_path / "videos"
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(
        "".join(json.dumps({"model": "sora-2-preview", "prompt": f"p{i}"}) + "\n" for i in range(3))
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with Emulator(frozen_clock=True, task_duration=10.0) as emu:
        env["APIMART_API_KEY"] = emu.api_key
        command = [
            sys.executable, "-m", "apimart_async.cli", "run", str(jobs_file), "--out", str(out),
            "--base-url", emu.base_url,
        ]  # fmt: skip
        first = await anyio.open_process(command, env=env)
        try:
            await emu.wait_until(lambda: emu.tasks_created == 3, timeout=60)
            second = await anyio.run_process(
                [*command, "--journal", str(tmp_path / "other.sqlite")], env=env, check=False
            )
            err = second.stderr.decode()
            assert second.returncode == 1, err
            assert f"another run (pid {first.pid}, started " in err
            assert f"is using this output directory {out}" in err
            assert "Traceback" not in err
            assert emu.counters.get("submit", 0) == 3
        finally:
            first.kill()  # SIGKILL: no clean-up at all
            await first.wait()
            await first.aclose()
        emu.advance(10)
        third = await anyio.run_process(command, env=env, check=False)
        assert third.returncode == 0, third.stderr.decode()
    assert emu.tasks_created == 3 and emu.counters.get("submit", 0) == 3
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1, 2]
    assert not (out / ".apimart-run.lock").exists()  # a clean end removes its lock file


class _BrokenStore(SqliteJournal):
    """A journal of another kind that fails its own way (not with a JournalError)."""

    async def set_task(self, index: int, task_id: str) -> None:
        raise RuntimeError("connection to the store lost")

    async def close(self) -> None:
        await super().close()
        raise RuntimeError("close failed too")


async def test_another_journals_own_errors_become_journal_errors(
    emu: Emulator, client: am.AsyncApimart, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _BrokenStore(tmp_path / "run.sqlite")
    with pytest.raises(am.JournalError) as caught:
        async with client.batch(jobs(2), journal=store, concurrency=1) as results:
            [o async for o in results]
    message = str(caught.value)
    assert "RuntimeError: connection to the store lost" in message
    assert "run the same batch again with the same journal" in message
    assert set(emu.task_ids()) == set(results.pending_task_ids())  # 1 task, listed
    assert emu.tasks_created == 1  # nothing was sent after the fault
    assert "the journal did not close cleanly: close failed too" in caplog.text


def test_the_cli_reports_a_full_journal_disk_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from apimart_async import cli as cli_module

    out = tmp_path / "videos"
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(
        "".join(json.dumps({"model": "sora-2-preview", "prompt": f"p{i}"}) + "\n" for i in range(3))
    )
    disk = _FullDisk(fail_at=2)
    monkeypatch.setattr("apimart_async._journal.sqlite3.connect", disk.connect)
    code = cli_module.main(["run", str(jobs_file), "--out", str(out), "--emulate"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "error: JournalError: the batch stopped: cannot write the journal" in err
    assert "database or disk is full" in err and "Traceback" not in err
    disk.freed = True  # space again: the same command finishes the batch
    assert cli_module.main(["run", str(jobs_file), "--out", str(out), "--emulate"]) == 0
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1, 2]

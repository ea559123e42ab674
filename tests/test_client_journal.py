"""The client journal (issue 21): no paid task is ever unreachable. Every submit made through a
client with ``journal=`` is recorded (key before the POST, task id after), ``tasks.unfinished()``
lists what nobody saw end, across restarts, ``tasks.recover`` settles a lost reply with the same
key, ``tasks.wait`` answers from the journal, and a task handed to a caller that goes away is
never lost (``on_submitted``, the WARNING of a cancelled ``generate()``)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import apimart_async as am
from apimart_async.emulator import Emulator, Fault
from apimart_async.testing import follow_clock

from .conftest import FAST_POLL
from .test_journal_faults import _FullDisk

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
REQUEST = am.VideoRequest("sora-2-preview", "a cat on a skateboard")


def client_for(emu: Emulator, journal: Any, **kw: Any) -> am.AsyncApimart:
    return am.AsyncApimart(
        emu.api_key, base_url=emu.base_url, poll=FAST_POLL, journal=journal, **kw
    )


def status_reads(emu: Emulator) -> int:
    return emu.counters.get("task", 0) + emu.counters.get("batch", 0)


def rows(path: Path) -> list[tuple[Any, ...]]:
    """The submits table as another process reads it (committed rows only)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            "SELECT idempotency_key, state, task_id, status FROM submits ORDER BY rowid"
        ).fetchall()


class Store:
    """A client journal of either store: ``journal`` (what ``AsyncApimart(journal=)`` is
    given) and ``rows()``, its ``submits`` as another process reads them."""

    def __init__(self, journal: Any, rows: Callable[[], Awaitable[list[tuple[Any, ...]]]]):
        self.journal = journal
        self.rows = rows


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The client-journal contract runs against both stores (issue 15: PostgreSQL)."""
    if request.param == "sqlite":
        path = tmp_path / "client.sqlite"
        return Store(path, lambda: anyio.to_thread.run_sync(rows, path))
    from apimart_async._pg_journal import PostgresJournal

    server = request.getfixturevalue("postgres")
    schema = request.getfixturevalue("pg_schema")

    async def pg_rows() -> list[tuple[Any, ...]]:
        import asyncpg

        conn = await asyncpg.connect(server.url)
        try:
            found = await conn.fetch(
                f"SELECT idempotency_key, state, task_id, status FROM {schema}.submits"
                " ORDER BY submitted_at, idempotency_key"
            )
        finally:
            await conn.close()
        return [tuple(r) for r in found]

    return Store(PostgresJournal(server.url, name="web", schema=schema), pg_rows)


# -- unfinished() across restarts, wait() from the journal ---------------------------------------


async def test_the_end_a_wait_saw_right_before_a_clean_close_is_recorded(
    manual_emu: Emulator, store: Store
) -> None:
    """Closing cancelled the journal's writer in the middle of writing the last ends it had
    taken: they were lost, and the next process listed (and read again) a task whose end the
    wait had seen."""
    path = store.journal
    async with client_for(manual_emu, path) as client:
        task_id = await client.videos.submit(REQUEST)
        manual_emu.complete(task_id)
        assert (await client.tasks.wait(task_id)).ok
    assert [row[1:] for row in (await store.rows())] == [("done", task_id, "completed")]
    async with client_for(manual_emu, path) as client:
        before = status_reads(manual_emu)
        assert await client.tasks.unfinished() == []
        assert (await client.tasks.wait(task_id)).ok
        assert status_reads(manual_emu) == before


async def test_a_submit_is_listed_until_a_wait_sees_its_end_across_restarts(
    manual_emu: Emulator, store: Store
) -> None:
    path = store.journal
    async with client_for(manual_emu, path) as client:
        task_id = await client.videos.submit(REQUEST)
        [item] = await client.tasks.unfinished()
    assert item.task_id == task_id and item.model == "sora-2-preview"
    assert item.fingerprint == REQUEST.fingerprint() and item.submitted_at > 0
    assert manual_emu.tasks_per_key == {item.idempotency_key: 1}

    # a new process opens the same journal: the task is still listed, and followed to its end
    async with client_for(manual_emu, path) as client:
        assert await client.tasks.unfinished() == [item]
        manual_emu.complete(task_id)
        task = await client.tasks.wait(task_id)
        assert task.ok and task.id == task_id
        assert await client.tasks.unfinished() == []
    assert (await store.rows()) == [(item.idempotency_key, "done", task_id, "completed")]

    # and again: the end is known, so the wait answers from the journal with no request
    async with client_for(manual_emu, path) as client:
        before = status_reads(manual_emu)
        again = await client.tasks.wait(task_id)
        assert again.id == task_id and again.ok and again.video_urls == task.video_urls
        assert status_reads(manual_emu) == before
        assert client.request_counts().get("task", 0) == 0
        assert client.request_counts().get("batch", 0) == 0
    assert manual_emu.tasks_created == 1


async def test_a_key_sent_again_after_its_end_was_seen_is_not_listed_again(
    manual_emu: Emulator, store: Store
) -> None:
    """A web app passing its caller's Idempotency-Key on: the caller retries after the video
    is done, the service answers with the same task. Recording that task id put the row back
    to ``pending``: the finished task was listed by ``unfinished()`` again, across restarts."""
    async with client_for(manual_emu, store.journal) as client:
        task_id = await client.videos.submit(REQUEST, idempotency_key="order-42")
        manual_emu.complete(task_id)
        assert (await client.tasks.wait(task_id)).ok
        assert await client.tasks.unfinished() == []
        assert await client.videos.submit(REQUEST, idempotency_key="order-42") == task_id
        assert await client.tasks.unfinished() == []
    assert (await store.rows()) == [("order-42", "done", task_id, "completed")]
    assert manual_emu.tasks_created == 1


async def test_an_end_a_status_read_returned_is_not_listed_as_unseen(
    manual_emu: Emulator, store: Store
) -> None:
    """brk21c: a web backend that submits and then reads the status (the reference app's
    ``POST /videos`` + ``GET /videos/{id}``) handed every end to its caller, yet each task
    stayed in ``unfinished()`` for ever: the list grew by every submit, and said nothing."""
    path = store.journal
    async with client_for(manual_emu, path) as client:
        read, many, running = [await client.videos.submit(REQUEST) for _ in range(3)]
        manual_emu.complete(read)
        manual_emu.fail(many)
        assert (await client.tasks.get(read)).ok
        assert [t.is_terminal for t in await client.tasks.get_many([many, running])] == [
            True,
            False,
        ]
        assert [item.task_id for item in await client.tasks.unfinished()] == [running]
    async with client_for(manual_emu, path) as client:  # and after a restart
        assert [item.task_id for item in await client.tasks.unfinished()] == [running]
        before = status_reads(manual_emu)
        assert (await client.tasks.wait(read)).ok  # answered from the journal
        with pytest.raises(am.TaskFailedError):
            await client.tasks.wait(many)
        assert status_reads(manual_emu) == before


async def test_a_failed_end_is_recorded_and_answered_from_the_journal(
    manual_emu: Emulator, store: Store
) -> None:
    path = store.journal
    async with client_for(manual_emu, path) as client:
        task_id = await client.videos.submit(REQUEST)
        manual_emu.fail(task_id)
        with pytest.raises(am.TaskFailedError):
            await client.tasks.wait(task_id)
        assert await client.tasks.unfinished() == []
    async with client_for(manual_emu, path) as client:
        before = status_reads(manual_emu)
        with pytest.raises(am.TaskFailedError) as info:
            await client.tasks.wait(task_id)
        assert info.value.task_id == task_id
        assert status_reads(manual_emu) == before


async def test_generate_records_its_submit_and_its_end(emu: Emulator, store: Store) -> None:
    path = store.journal
    async with client_for(emu, path) as client:
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await client.videos.generate(REQUEST)

            tg.start_soon(run)
            await emu.wait_until(lambda: emu.tasks_created == 1)
            emu.advance(10)
        assert await client.tasks.unfinished() == []
    [(key, state, task_id, status)] = await store.rows()
    assert (state, task_id, status) == ("done", emu.task_ids()[0], "completed")
    assert emu.tasks_per_key == {key: 1}


async def test_the_key_is_committed_before_the_post(manual_emu: Emulator, store: Store) -> None:
    path = store.journal
    seen: list[list[tuple[Any, ...]]] = []
    async with client_for(manual_emu, path) as client:
        transport = client._transport
        real = transport.request

        async def spy(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("kind") == "submit":
                seen.append(await store.rows())
            return await real(*args, **kwargs)

        transport.request = spy  # type: ignore[method-assign]
        task_id = await client.videos.submit(REQUEST, idempotency_key="my-key-1")
    assert seen == [[("my-key-1", "submitting", None, None)]]
    assert (await store.rows()) == [("my-key-1", "pending", task_id, None)]


# -- settling a submit whose reply was never read -----------------------------------------------


@pytest.mark.parametrize(
    ("fault", "created_by_first_post"),
    [(Fault.lost_reply(), 1), (Fault.drop(), 0)],
    ids=["reply lost", "first POST never arrived"],
)
async def test_recover_settles_a_lost_submit_with_the_same_key_and_one_task(
    manual_emu: Emulator, store: Store, fault: Fault, created_by_first_post: int
) -> None:
    path = store.journal
    async with client_for(manual_emu, path, max_retries=0) as client:
        manual_emu.faults.inject("submit", fault, times=1)
        with pytest.raises(am.SubmitIndeterminateError) as info:
            await client.videos.submit(REQUEST)
    assert manual_emu.tasks_created == created_by_first_post

    async with client_for(manual_emu, path) as client:  # after a restart
        [item] = await client.tasks.unfinished()
        assert item.task_id is None and item.idempotency_key == info.value.idempotency_key
        task_id = await client.tasks.recover(item)
        assert manual_emu.tasks_created == 1  # the original task, or the one created now
        assert manual_emu.tasks_per_key == {item.idempotency_key: 1}
        [listed] = await client.tasks.unfinished()
        assert listed.task_id == task_id and listed.idempotency_key == item.idempotency_key
        assert await client.tasks.recover(listed) == task_id  # nothing sent for a known id
        assert manual_emu.counters["submit"] == 2
        manual_emu.complete(task_id)
        assert (await client.tasks.wait(task_id)).ok
        assert await client.tasks.unfinished() == []


async def test_a_recover_that_fails_keeps_the_lost_submit_listed(
    manual_emu: Emulator, store: Store
) -> None:
    """brk21c: a restart while the service is out of reach (or with a key that no longer
    works) made ``recover`` close the lost submit as refused: its POST never arrived (or got
    401), which proves nothing of the FIRST POST, which had created a billed task. The task
    was no longer listed anywhere. Only a resend's success settles a key recorded before."""
    path = store.journal
    async with client_for(manual_emu, path, max_retries=0) as client:
        manual_emu.faults.inject("submit", Fault.lost_reply(), times=1)
        with pytest.raises(am.SubmitIndeterminateError):
            await client.videos.submit(REQUEST)
    assert manual_emu.tasks_created == 1  # the first POST made the task; its reply was lost
    async with am.AsyncApimart(
        "sk-test-unreachable", base_url="http://127.0.0.1:9", journal=path, max_retries=0
    ) as client:  # a restart while the service is out of reach
        [item] = await client.tasks.unfinished()
        with pytest.raises(am.APIConnectionError):
            await client.tasks.recover(item)
        assert await client.tasks.unfinished() == [item]
    async with am.AsyncApimart(
        "sk-test-rotated-key", base_url=manual_emu.base_url, journal=path, max_retries=0
    ) as client:  # a restart with a key the service refuses
        with pytest.raises(am.AuthenticationError):
            await client.tasks.recover(item)
        assert await client.tasks.unfinished() == [item]
    async with client_for(manual_emu, path) as client:
        assert await client.tasks.recover(item) == manual_emu.task_ids()[0]
        [listed] = await client.tasks.unfinished()
        assert listed.task_id == manual_emu.task_ids()[0]
    assert manual_emu.tasks_created == 1


async def test_a_refused_submit_is_not_listed(manual_emu: Emulator, store: Store) -> None:
    path = store.journal
    async with client_for(manual_emu, path) as client:
        manual_emu.faults.inject("submit", Fault.error(400, "invalid_request_error"), times=1)
        with pytest.raises(am.BadRequestError):
            await client.videos.submit(REQUEST)
        assert await client.tasks.unfinished() == []
    assert [r[1] for r in (await store.rows())] == ["refused"]


async def test_unfinished_and_recover_need_a_journal(client: am.AsyncApimart) -> None:
    with pytest.raises(am.ConfigurationError, match="journal="):
        await client.tasks.unfinished()
    item = am.UnfinishedTask(None, "k", "sora-2-preview", 1.0, "fp")
    with pytest.raises(am.ConfigurationError, match="journal="):
        await client.tasks.recover(item)


async def test_recover_refuses_what_is_not_an_item_of_this_journal(
    manual_emu: Emulator, store: Store
) -> None:
    async with client_for(manual_emu, store.journal) as client:
        with pytest.raises(am.ValidationError, match="item"):
            await client.tasks.recover("k")  # type: ignore[arg-type]
        stranger = am.UnfinishedTask(None, "not-ours", "sora-2-preview", 1.0, "fp")
        with pytest.raises(am.ValidationError, match="not in this client's journal"):
            await client.tasks.recover(stranger)
    assert manual_emu.counters.get("submit", 0) == 0


def test_a_journal_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(am.ConfigurationError, match="journal must be a path"):
        am.AsyncApimart("sk-test", journal=42)  # type: ignore[arg-type]


# -- batches on a client with a journal ----------------------------------------------------------


async def test_a_batchs_billed_tasks_are_listed_when_it_is_left_early(
    manual_emu: Emulator, store: Store
) -> None:
    path = store.journal
    jobs = [am.VideoRequest("sora-2-preview", f"prompt {i}") for i in range(3)]
    async with client_for(manual_emu, path) as client:
        async with client.batch(jobs) as results:
            await manual_emu.wait_until(lambda: len(results.pending_task_ids()) == 3)
            pending = sorted(results.pending_task_ids())
    async with client_for(manual_emu, path) as client:  # after a restart
        listed = await client.tasks.unfinished()
        assert sorted(i.task_id for i in listed if i.task_id) == pending
        assert len(listed) == 3
        manual_emu.complete_all()
        async with client.tasks.watch(pending) as stream:
            assert sorted([t.id async for t in stream]) == pending
        assert await client.tasks.unfinished() == []
    assert manual_emu.tasks_created == 3


async def test_a_batch_that_ends_leaves_nothing_unfinished(
    emu: Emulator, store: Store, tmp_path: Path
) -> None:
    path = store.journal
    jobs = [am.VideoRequest("sora-2-preview", f"prompt {i}") for i in range(3)]
    async with client_for(emu, path) as client:
        async with client.batch(jobs, journal=tmp_path / "batch.sqlite") as results:
            await emu.wait_until(lambda: emu.tasks_created == 3)
            emu.advance(10)
            assert [o.ok async for o in results] == [True] * 3
        assert await client.tasks.unfinished() == []
    assert sorted(r[1] for r in (await store.rows())) == ["done"] * 3


# -- on_submitted ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["function", "coroutine function"])
async def test_on_submitted_gets_the_id_before_the_wait(
    manual_emu: Emulator, tmp_path: Path, kind: str
) -> None:
    got: list[tuple[str, int, str]] = []

    def note(task_id: str) -> None:
        got.append((task_id, status_reads(manual_emu), manual_emu.task(task_id)["status"]))

    async def note_async(task_id: str) -> None:
        await anyio.lowlevel.checkpoint()
        note(task_id)

    async with client_for(manual_emu, tmp_path / "c.sqlite") as client:
        callback = note if kind == "function" else note_async
        async with anyio.create_task_group() as tg:
            result: list[am.Task] = []

            async def run() -> None:
                result.append(await client.videos.generate(REQUEST, on_submitted=callback))

            tg.start_soon(run)
            await manual_emu.wait_until(lambda: manual_emu.tasks_created == 1)
            await manual_emu.wait_until(lambda: status_reads(manual_emu) >= 1)
            manual_emu.complete(manual_emu.task_ids()[0])
    [(task_id, reads_then, status_then)] = got
    assert result[0].id == task_id and reads_then == 0 and status_then != "completed"


async def test_on_submitted_that_raises_propagates_and_logs_the_id(
    manual_emu: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="apimart_async")

    def broken(task_id: str) -> None:
        raise RuntimeError("the database is down")

    async with client_for(manual_emu, tmp_path / "c.sqlite") as client:
        with pytest.raises(RuntimeError, match="the database is down"):
            await client.videos.generate(REQUEST, on_submitted=broken)
        [task_id] = manual_emu.task_ids()
        assert [i.task_id for i in await client.tasks.unfinished()] == [task_id]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(task_id in r.getMessage() and "on_submitted" in r.getMessage() for r in warnings)
    assert status_reads(manual_emu) == 0  # no wait started


async def test_on_submitted_must_be_callable(client: am.AsyncApimart, emu: Emulator) -> None:
    with pytest.raises(am.ValidationError, match="on_submitted"):
        await client.videos.generate(REQUEST, on_submitted="x")  # type: ignore[arg-type]
    assert emu.counters.get("submit", 0) == 0


# -- a cancelled generate() ------------------------------------------------------------------------


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no journal"])
async def test_a_generate_cancelled_after_its_submit_logs_the_task_id(
    manual_emu: Emulator, store: Store, caplog: pytest.LogCaptureFixture, journal: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="apimart_async")
    path = store.journal if journal else None
    async with client_for(manual_emu, path) as client:
        with anyio.CancelScope() as scope:  # the handler's scope, cancelled when its client leaves
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.videos.generate, REQUEST)
                await manual_emu.wait_until(lambda: status_reads(manual_emu) >= 1)  # waiting
                scope.cancel()
        assert scope.cancelled_caught
        [task_id] = manual_emu.task_ids()
        if journal:
            [item] = await client.tasks.unfinished()
            assert item.task_id == task_id
    assert manual_emu.tasks_created == 1
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.name == "apimart_async"
    assert task_id in record.getMessage() and "cancelled" in record.getMessage()
    assert ("unfinished()" in record.getMessage()) is journal


# -- faults of the journal itself -------------------------------------------------------------------


async def test_a_second_client_on_the_same_journal_is_refused(
    manual_emu: Emulator, tmp_path: Path
) -> None:
    path = tmp_path / "c.sqlite"
    async with client_for(manual_emu, path):
        other = client_for(manual_emu, path)
        with pytest.raises(am.JournalLockedError):
            await other.open()
        assert other._transport.is_open is False


async def test_a_batch_given_the_clients_own_journal_says_so_not_another_run(
    manual_emu: Emulator, tmp_path: Path
) -> None:
    """The same file as ``AsyncApimart(journal=)`` and ``client.batch(journal=)``: refused
    before anything is sent, naming this process, not "another run (pid <our own pid>)"."""
    path = tmp_path / "c.sqlite"
    async with client_for(manual_emu, path) as client:
        with pytest.raises(am.JournalLockedError) as caught:
            async with client.batch([am.VideoRequest("sora-2-preview", "x")], journal=path):
                pass
    assert caught.value.pid == os.getpid()
    message = str(caught.value)
    assert "another run" not in message
    assert f"this process (pid {os.getpid()}) already uses this journal {path}" in message
    assert "each its own file" in message
    assert manual_emu.tasks_created == 0


async def test_a_journal_that_is_not_ours_is_refused_when_the_client_opens(
    manual_emu: Emulator, tmp_path: Path
) -> None:
    path = tmp_path / "c.sqlite"
    path.write_text("hello, not a database\n")
    with pytest.raises(am.JournalError, match="not an SQLite file"):
        async with client_for(manual_emu, path):
            pass
    assert path.read_text() == "hello, not a database\n"


async def test_a_full_disk_refuses_the_submit_before_anything_is_sent(
    manual_emu: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = _FullDisk(fail_at=1)  # the key cannot be recorded
    monkeypatch.setattr("apimart_async._journal.sqlite3.connect", disk.connect)
    path = tmp_path / "c.sqlite"
    async with client_for(manual_emu, path) as client:
        with pytest.raises(am.JournalError) as info:
            await client.videos.generate(REQUEST)
        assert str(info.value) == f"cannot write the journal {path}: database or disk is full"
        assert info.value.__cause__ is None and info.value.__suppress_context__  # no raw sqlite3
        assert manual_emu.counters.get("submit", 0) == 0  # not recorded: not sent
        assert await client.tasks.unfinished() == []


async def test_a_task_id_that_cannot_be_recorded_is_still_returned_and_recoverable(
    manual_emu: Emulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="apimart_async")
    disk = _FullDisk(fail_at=2)  # the key is recorded, the task id is not
    monkeypatch.setattr("apimart_async._journal.sqlite3.connect", disk.connect)
    path = tmp_path / "c.sqlite"
    async with client_for(manual_emu, path) as client:
        task_id = await client.videos.submit(REQUEST)
        assert manual_emu.task_ids() == [task_id]
        [item] = await client.tasks.unfinished()
        assert item.task_id is None
        disk.freed = True
        assert await client.tasks.recover(item) == task_id  # the same task, by its key
        assert [i.task_id for i in await client.tasks.unfinished()] == [task_id]
    assert manual_emu.tasks_created == 1
    assert any(
        task_id in r.getMessage() and "could not be recorded" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )


# -- a replica killed mid-load -------------------------------------------------------------------


@pytest.mark.parametrize("kill_at", [1, 20, 39])
async def test_after_a_sigkill_mid_load_every_billed_task_is_found(
    tmp_path: Path, kill_at: int
) -> None:
    """40 awaiting ``generate()`` calls; the process is killed (SIGKILL) once the emulator has
    created ``kill_at`` tasks, some submits in flight. The journal finds every task the
    emulator created: by id, or by key through ``recover`` (no task created twice)."""
    calls = 40
    path = tmp_path / "client.sqlite"
    async with Emulator(task_duration=1000.0) as emu:
        cmd = [sys.executable, str(ROOT / "tests" / "client_journal_worker.py")]
        cmd += [emu.base_url, emu.api_key, str(path), str(calls)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        async with await anyio.open_process(cmd, env=env, stdout=subprocess.DEVNULL) as proc:
            with anyio.fail_after(60):
                await emu.wait_until(lambda: emu.tasks_created >= kill_at, timeout=60)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        created_at_kill = set(emu.task_ids())
        async with client_for(emu, path) as client:  # the restarted replica
            listed = await client.tasks.unfinished()
            by_id = {i.task_id for i in listed if i.task_id is not None}
            recovered = {await client.tasks.recover(i) for i in listed if i.task_id is None}
        assert not by_id & recovered
        found = by_id | recovered
        # every task created before the kill is found; a recovered key whose POST never
        # arrived created its task now, once (and it is found too)
        assert created_at_kill <= found and found == set(emu.task_ids())
        assert all(n == 1 for n in emu.tasks_per_key.values())
        assert emu.tasks_created == len(found) <= calls
        print(
            f"kill at {kill_at}: created before the kill {len(created_at_kill)}, found by id"
            f" {len(by_id)}, by key {len(recovered)} (created by recover:"
            f" {len(found - created_at_kill)})"
        )


async def test_an_edited_row_is_a_journal_error_naming_the_file(
    manual_emu: Emulator, tmp_path: Path
) -> None:
    path = tmp_path / "c.sqlite"
    async with client_for(manual_emu, path) as client:
        await client.videos.submit(REQUEST)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE submits SET submitted_at='soon'")
        conn.commit()
    async with client_for(manual_emu, path) as client:
        with pytest.raises(am.JournalError, match=f"cannot read the journal {path}: .*soon"):
            await client.tasks.unfinished()


@pytest.mark.parametrize("call", ["generate", "submit"])
@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no journal"])
async def test_a_generate_cancelled_during_its_submit_logs_the_key(
    manual_emu: Emulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    journal: bool,
    call: str,
) -> None:
    """The POST is held in flight (the service has not answered) when the caller goes away:
    the key is logged, and with a journal ``recover`` finds the one task by it. brk16h: a
    ``videos.submit`` cancelled so logged nothing (22 of 25 interrupted sync submits left a
    billed task that nobody could find)."""
    caplog.set_level(logging.WARNING, logger="apimart_async")
    path = tmp_path / "c.sqlite" if journal else None
    async with client_for(manual_emu, path) as client:
        transport = client._transport
        real = transport.request
        in_flight = anyio.Event()

        async def held(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("kind") == "submit":
                in_flight.set()
                await anyio.sleep_forever()  # no reply yet: cancelled here
            return await real(*args, **kwargs)

        transport.request = held  # type: ignore[method-assign]
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                given = None if journal else "held-key-1"
                method = getattr(client.videos, call)
                tg.start_soon(functools.partial(method, idempotency_key=given), REQUEST)
                await in_flight.wait()
                scope.cancel()
        transport.request = real  # type: ignore[method-assign]
        [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
        message = record.getMessage()
        assert "cancelled during its submit" in message
        if journal:
            [item] = await client.tasks.unfinished()
            assert item.task_id is None and item.idempotency_key in message
            await client.tasks.recover(item)
            assert manual_emu.tasks_per_key == {item.idempotency_key: 1}
        else:
            assert "held-key-1" in message and "idempotency_key" in message
    assert manual_emu.tasks_created == (1 if journal else 0)


async def test_a_submit_no_attempt_of_which_reached_the_service_is_not_listed(
    tmp_path: Path,
) -> None:
    """The API down (every connection refused): generate() raises APIConnectionError, not
    SubmitIndeterminateError, since nothing reached the service. The key stayed listed as a
    billed task nobody saw end, and ``recover`` (a web app's startup) then made and billed the
    task, long after its caller was answered 502 (brk21b 2)."""
    journal = tmp_path / "c.sqlite"
    async with Emulator(mode="manual") as gone:
        url, key = gone.base_url, gone.api_key  # closed below: its port refuses connections
    async with am.AsyncApimart(key, base_url=url, poll=FAST_POLL, journal=journal) as client:
        with pytest.raises(am.APIConnectionError) as caught:
            await client.videos.generate(am.VideoRequest("sora-2-preview", "x"))
        assert not isinstance(caught.value, am.SubmitIndeterminateError)
        assert await client.tasks.unfinished() == []


async def test_a_submit_every_attempt_of_which_was_answered_429_is_not_listed(
    tmp_path: Path,
) -> None:
    """Every attempt answered 429 (the service took none): RateLimitError, no task, and the
    key is closed, as after a 400 or a 402 (brk21b 3). One attempt answered 5xx may have
    made the task: then the key stays listed."""
    async with Emulator(mode="manual") as emu:
        emu.faults.inject("submit", Fault.rate_limited(0), times=3)
        async with client_for(emu, tmp_path / "c.sqlite", max_retries=2) as client:
            with pytest.raises(am.RateLimitError):
                await client.videos.submit(am.VideoRequest("sora-2-preview", "x"))
            assert emu.tasks_created == 0
            assert await client.tasks.unfinished() == []
            emu.faults.inject("submit", Fault.server_error(500), times=1)
            emu.faults.inject("submit", Fault.rate_limited(0), times=2)
            with pytest.raises(am.RateLimitError):
                await client.videos.submit(am.VideoRequest("sora-2-preview", "y"))
            assert len(await client.tasks.unfinished()) == 1  # the 500 may have made it


# -- generate(timeout=) bounds the whole call, the submit included (fix21 1) ----------------------


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no journal"])
async def test_generate_timeout_cuts_a_submit_the_service_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, journal: bool
) -> None:
    """brk21d: ``generate(timeout=3)`` on a service that held its POST took 122 s (the
    attempts' own timeouts times the retries) before the wait's timeout even started. The
    timeout is the whole call's: it ends with ``TaskTimeoutError`` while the service still
    holds the POST, and that POST, which may have been billed, is not lost: its key is logged,
    carried by the error, listed by ``unfinished()`` and settled by ``recover`` (one task).
    Time is the emulator's (ten times real time: 3 s of it are 0.3 real s); the submit is held
    for 2 real seconds (20 s of the emulator's)."""
    caplog.set_level(logging.WARNING, logger="apimart_async")
    path = tmp_path / "c.sqlite" if journal else None
    async with Emulator(mode="manual", time_scale=10.0) as emu:
        emu.faults.inject("submit", Fault.slow(2.0))
        async with client_for(emu, path) as client:
            follow_clock(client, emu)
            started = emu.clock.monotonic()
            with anyio.fail_after(30), pytest.raises(am.TaskTimeoutError) as caught:  # hang guard
                await client.videos.generate(REQUEST, timeout=3)
            took = emu.clock.monotonic() - started
            assert emu.state.in_flight["submit"] == 1  # ended while the service holds the POST
            assert 3 <= took < 15, took  # the emulator's seconds (before: 20 and more)
            error = caught.value
            key = error.idempotency_key
            assert error.task_id is None and error.timeout == 3 and key is not None
            assert f"idempotency key {key}" in str(error)
            [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert key in record.getMessage() and "timeout" in record.getMessage()
            await emu.wait_until(lambda: emu.tasks_created == 1, timeout=30)  # billed after all
            if journal:
                [item] = await client.tasks.unfinished()
                assert item.task_id is None and item.idempotency_key == key
                task_id = await client.tasks.recover(item)
            else:
                task_id = await client.videos.submit(REQUEST, idempotency_key=key)
            assert emu.tasks_per_key == {key: 1} and emu.task_ids() == [task_id]


async def test_generate_timeout_counts_the_submit_then_the_wait() -> None:
    """The submit took 4 s of the emulator's clock; a ``generate(timeout=6)`` then waits 2 s
    more, not 6: it ends 6 s after it started (before: 10), with the caller's ``timeout``."""
    async with Emulator(mode="manual", time_scale=10.0) as emu:
        emu.faults.inject("submit", Fault.slow(0.4))
        async with client_for(emu, None) as client:
            follow_clock(client, emu)
            started = emu.clock.monotonic()
            with anyio.fail_after(30), pytest.raises(am.TaskTimeoutError) as caught:
                await client.videos.generate(REQUEST, timeout=6)
            took = emu.clock.monotonic() - started
            assert 6 <= took < 9, took
            assert caught.value.timeout == 6
            assert caught.value.task_id == emu.task_ids()[0]
            assert caught.value.idempotency_key is None


# -- PostgreSQL: one journal shared by the replicas of a web app (issue 15) ------------------------


async def test_replicas_on_one_postgres_journal_list_and_wait_for_each_others_tasks(
    manual_emu: Emulator, postgres: Any, pg_schema: str
) -> None:
    from apimart_async._pg_journal import PostgresJournal

    def journal(name: str = "web") -> PostgresJournal:
        return PostgresJournal(postgres.url, name=name, schema=pg_schema)

    async with (
        client_for(manual_emu, journal()) as a,
        client_for(manual_emu, journal()) as b,  # no lock: both at once
        client_for(manual_emu, journal("other-app")) as other,
    ):
        task_id = await a.videos.submit(REQUEST)
        [item] = await b.tasks.unfinished()
        assert item.task_id == task_id
        assert await other.tasks.unfinished() == []  # another client name: its own rows
        manual_emu.complete(task_id)
        assert (await b.tasks.wait(task_id)).ok  # B follows A's task to its end
        assert await b.tasks.unfinished() == []  # the end B saw, written (flushed)...
        assert await a.tasks.unfinished() == []  # ...for A too
        before = status_reads(manual_emu)
        assert (await a.tasks.wait(task_id)).ok  # A is answered from the shared journal
        assert status_reads(manual_emu) == before
    assert manual_emu.tasks_created == 1


async def test_a_postgres_client_journal_keeps_the_password_out_and_refuses_what_it_cannot_use(
    postgres: Any, pg_schema: str
) -> None:
    from apimart_async._pg_journal import PostgresJournal

    with pytest.raises(am.ConfigurationError, match=r"postgresql:// URL; got mysql://u:\*\*\*@h"):
        am.AsyncApimart("sk-test", journal="mysql://u:s3cret@h/db")
    wrong = postgres.url.replace(postgres.password, "not-the-pw-77")
    client = am.AsyncApimart(
        "sk-test", journal=PostgresJournal(wrong, name="web", schema=pg_schema)
    )
    assert "not-the-pw-77" not in repr(client._journal)
    with pytest.raises(am.JournalError) as caught:
        await client.open()
    assert "not-the-pw-77" not in str(caught.value) and "postgres:***@127.0.0.1" in str(
        caught.value
    )
    assert client._transport.is_open is False
    # a submits table of a newer release is refused, left as it is
    good = PostgresJournal(postgres.url, name="web", schema=pg_schema)
    async with am.AsyncApimart("sk-test", journal=good):
        pass
    import asyncpg

    conn = await asyncpg.connect(postgres.url)
    try:
        await conn.execute(f"UPDATE {pg_schema}.meta SET value='2' WHERE key='submits'")
    finally:
        await conn.close()
    with pytest.raises(am.JournalError, match="submits version 2; this one knows 1"):
        async with am.AsyncApimart("sk-test", journal=good):
            pass

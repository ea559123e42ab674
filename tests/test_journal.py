"""Journal, resume, manifest and budget, in process against the emulator."""

from __future__ import annotations

import contextlib
import gc
import json
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import apimart_async as am
from apimart_async._journal import SqliteJournal
from apimart_async._pg_journal import PostgresJournal
from apimart_async.emulator import Emulator, Fault

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio


#: Where a test's journal lives: ``journal_at("run")`` is a file in the test's folder, or the
#: batch "run" in PostgreSQL (a schema of the test's own): the same contract, both stores.
JournalAt = Callable[[str], "Path | PostgresJournal"]


@pytest.fixture(params=["sqlite", "postgres"])
def journal_at(request: pytest.FixtureRequest, tmp_path: Path) -> JournalAt:
    if request.param == "sqlite":
        return lambda name: tmp_path / f"{name}.sqlite"
    server = request.getfixturevalue("postgres")
    schema = request.getfixturevalue("pg_schema")
    return lambda name: PostgresJournal(server.url, name=name, schema=schema)


def jobs(n: int, *, changed: int | None = None) -> list[tuple[str, am.VideoRequest]]:
    return [
        (f"job{i}", am.VideoRequest("sora-2-preview", f"prompt {i}{' v2' if i == changed else ''}"))
        for i in range(n)
    ]


def task_ids_by_index(emu: Emulator, n: int) -> list[str]:
    """The emulator's task of each of ``jobs(n)``, found by its prompt: concurrent submits
    reach the emulator in any order."""
    by_prompt = {emu.state.tasks[t].body["prompt"]: t for t in emu.task_ids()}
    return [by_prompt[f"prompt {i}"] for i in range(n)]


def client_for(emu: Emulator, **kw: object) -> am.AsyncApimart:
    return am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL, **kw)  # type: ignore[arg-type]


async def test_resume_never_resubmits_and_replays_finished(
    manual_emu: Emulator, tmp_path: Path, journal_at: JournalAt
) -> None:
    journal = journal_at("run")
    # the first submit to arrive is created last: creation order is not input order
    manual_emu.faults.inject("submit", Fault.slow(0.2))
    async with client_for(manual_emu) as client, client.batch(jobs(5), journal=journal) as results:
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 5)
        await manual_emu.wait_until(lambda: len(client._poller) == 5)
        t = task_ids_by_index(manual_emu, 5)  # the emulator may create them in any order
        manual_emu.complete(t[0])
        manual_emu.fail(t[1])
        first = [await results.__anext__(), await results.__anext__()]
    assert sorted(o.index for o in first) == [0, 1]
    submits = manual_emu.counters["submit"]
    # second run: nothing is posted again; the 3 running tasks are re-attached by id
    async with client_for(manual_emu) as client, client.batch(jobs(5), journal=journal) as results:
        await manual_emu.wait_until(lambda: len(client._poller) == 3)
        manual_emu.complete_all()
        second = [o async for o in results]
    assert manual_emu.counters["submit"] == submits
    assert manual_emu.tasks_created == 5
    assert sorted(o.index for o in second) == [0, 1, 2, 3, 4]
    replayed = {o.index: o for o in second if o.replayed}
    assert set(replayed) == {0, 1}
    assert replayed[0].ok and isinstance(replayed[1].error, am.TaskFailedError)
    assert replayed[1].task is not None and replayed[1].task.id == t[1]
    assert {o.task_id for o in second} == set(t)
    # third run: everything replayed, nothing sent but nothing lost
    async with client_for(manual_emu) as client, client.batch(jobs(5), journal=journal) as results:
        third = [o async for o in results]
    assert [o.replayed for o in third] == [True] * 5
    assert manual_emu.counters["submit"] == submits
    async with (
        client_for(manual_emu) as client,
        client.batch(jobs(5), journal=journal, replay_finished=False) as results,
    ):
        assert [o async for o in results] == []


async def test_unknown_submit_outcome_is_retried_with_the_same_key(
    emu: Emulator, tmp_path: Path, journal_at: JournalAt
) -> None:
    journal = journal_at("run")
    emu.faults.inject("submit", Fault.lost_reply())
    async with (
        client_for(emu, max_retries=0) as client,
        client.batch(jobs(1), journal=journal) as results,
    ):
        (outcome,) = [o async for o in results]
    assert isinstance(outcome.error, am.APIConnectionError)
    assert emu.tasks_created == 1  # the task exists; the client does not know its id
    async with client_for(emu) as client, client.batch(jobs(1), journal=journal) as results:
        emu.advance(10)
        (outcome,) = [o async for o in results]
    assert outcome.ok
    assert emu.tasks_created == 1
    assert emu.tasks_per_key == {outcome.idempotency_key: 1}
    assert emu.counters["submit"] == 2


async def test_a_lost_submit_resent_with_a_wrong_key_is_not_paid_twice(
    emu: Emulator, tmp_path: Path, journal_at: JournalAt
) -> None:
    """brk21c: a job whose submit reply was lost (its task exists) resumed with a key the
    service refuses (401: a rotated or mistyped key) was closed as refused; the run after,
    with the right key, sent it afresh with a NEW key: a second task, paid twice. A 401 to
    a key sent again proves nothing of the first POST: the job keeps its key."""
    journal = journal_at("run")
    emu.faults.inject("submit", Fault.lost_reply())
    async with (
        client_for(emu, max_retries=0) as client,
        client.batch(jobs(1), journal=journal) as results,
    ):
        (first,) = [o async for o in results]
    assert isinstance(first.error, am.APIConnectionError)
    assert emu.tasks_created == 1  # the task exists; the client does not know its id
    async with (
        am.AsyncApimart("sk-wrong-key", base_url=emu.base_url, poll=FAST_POLL) as client,
        client.batch(jobs(1), journal=journal) as results,
    ):
        (refused,) = [o async for o in results]
    assert isinstance(refused.error, am.AuthenticationError)
    async with client_for(emu) as client, client.batch(jobs(1), journal=journal) as results:
        await emu.wait_until(lambda: len(client._poller) == 1)  # submitted, followed
        emu.advance(10)
        (again,) = [o async for o in results]
    assert again.ok
    assert emu.tasks_created == 1  # before the fix: 2, the first one orphaned and billed
    assert again.idempotency_key == first.idempotency_key


async def test_refused_submits_are_retried_on_resume_with_a_fresh_key(
    emu: Emulator, tmp_path: Path, journal_at: JournalAt
) -> None:
    journal = journal_at("run")
    emu.faults.inject("submit", Fault.error(400, "invalid_request_error", message="bad"))
    async with client_for(emu) as client, client.batch(jobs(1), journal=journal) as results:
        (first,) = [o async for o in results]
    assert isinstance(first.error, am.BadRequestError)
    async with client_for(emu) as client, client.batch(jobs(1), journal=journal) as results:
        await emu.wait_until(lambda: emu.tasks_created == 1)
        emu.advance(10)
        (again,) = [o async for o in results]
    assert again.ok and not again.replayed
    assert again.idempotency_key != first.idempotency_key  # the refusal proved no task
    assert emu.counters["submit"] == 2 and emu.tasks_created == 1


async def test_changed_input_is_reported(
    emu: Emulator, tmp_path: Path, journal_at: JournalAt
) -> None:
    journal = journal_at("run")
    async with client_for(emu) as client, client.batch(jobs(3), journal=journal) as results:
        await emu.wait_until(lambda: emu.tasks_created == 3)
    async with (
        client_for(emu) as client,
        client.batch(jobs(3, changed=1), journal=journal) as results,
    ):
        emu.advance(10)  # jobs 0 and 2, re-attached, finish; job 1 is never mixed in
        outcomes = [o async for o in results]
    mismatch = [o for o in outcomes if isinstance(o.error, am.JournalMismatchError)]
    assert len(mismatch) == 1 and mismatch[0].index == 1
    assert "job 1 differs from the one recorded in the journal" in str(mismatch[0].error)
    assert sorted(o.index for o in outcomes if o.ok) == [0, 2]
    assert results.stopped is None
    assert emu.tasks_created == 3


async def test_not_a_journal(tmp_path: Path) -> None:
    bad = tmp_path / "x.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    async with Emulator() as emu, client_for(emu) as client:
        with pytest.raises(am.JournalError, match="cannot use"):
            async with client.batch(jobs(1), journal=bad):
                pass


async def test_downloads_and_manifest_exactly_once(tmp_path: Path, journal_at: JournalAt) -> None:
    out = tmp_path / "videos"
    journal = journal_at("run")
    async with Emulator(task_duration=0.0) as emu:
        items = [
            *jobs(3),
            ("../../escape", am.VideoRequest("sora-2-preview", "evil name")),
            am.VideoRequest("sora-2-preview", "no name"),
        ]
        async with (
            client_for(emu) as client,
            client.batch(items, journal=journal, download_dir=out) as results,
        ):
            outcomes = [o async for o in results]
        async with (
            client_for(emu) as client,
            client.batch(items, journal=journal, download_dir=out) as results,
        ):
            replayed = [o async for o in results]
        assert all(o.ok for o in outcomes) and all(o.replayed for o in replayed)
        names = sorted(p.name for p in out.iterdir())
        assert names == [
            "000004.mp4",
            "escape.mp4",
            "job0.mp4",
            "job1.mp4",
            "job2.mp4",
            "manifest.jsonl",
        ]
        for o in outcomes:
            (f,) = o.files
            assert Path(f.path).parent == out.resolve() or Path(f.path).parent == out
            assert f.sha256 == emu.file_sha256(o.task_id or "")
        lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert sorted(line["index"] for line in lines) == [0, 1, 2, 3, 4]
        by_index = {line["index"]: line for line in lines}
        assert by_index[3]["status"] == "completed"
        assert (
            by_index[3]["files"][0]["sha256"]
            == outcomes[[o.index for o in outcomes].index(3)].files[0].sha256
        )
        assert emu.tasks_created == 5


async def test_missing_files_are_fetched_again_on_resume(
    tmp_path: Path, journal_at: JournalAt
) -> None:
    out = tmp_path / "videos"
    journal = journal_at("run")
    async with Emulator(task_duration=0.0) as emu:
        async with (
            client_for(emu) as client,
            client.batch(jobs(2), journal=journal, download_dir=out) as results,
        ):
            [o async for o in results]
        (out / "job1.mp4").unlink()
        files_before = emu.counters["file"]
        async with (
            client_for(emu) as client,
            client.batch(jobs(2), journal=journal, download_dir=out) as results,
        ):
            again = {o.index: o async for o in results}
        assert emu.counters["file"] == files_before + 1
        assert again[0].replayed and not again[1].replayed and again[1].ok
        assert (out / "job1.mp4").exists()
        assert emu.tasks_created == 2


async def test_a_job_whose_video_was_deleted_is_listed_once_in_the_manifest(
    tmp_path: Path,
    journal_at: JournalAt,
) -> None:
    # issue 14: run, delete one video, run again: the manifest had that job twice (its done
    # record written up front, then its line again once fetched anew)
    out = tmp_path / "videos"
    journal = journal_at("run")
    async with Emulator(task_duration=0.0) as emu:
        for run in range(3):
            async with (
                client_for(emu) as client,
                client.batch(jobs(3), journal=journal, download_dir=out) as results,
            ):
                [o async for o in results]
            lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
            assert sorted(line["index"] for line in lines) == [0, 1, 2], run
            by_index = {line["index"]: line for line in lines}
            assert Path(by_index[1]["files"][0]["path"]).exists()
            assert by_index[1]["files"][0]["sha256"] == emu.file_sha256(by_index[1]["task_id"])
            (out / "job1.mp4").unlink()
        assert emu.tasks_created == 3


async def test_budget_with_an_estimate(tmp_path: Path) -> None:
    async with Emulator(task_duration=0.0) as emu, client_for(emu) as client:
        async with client.batch(jobs(6), max_cost=1.0, cost_estimate=lambda r: 0.4) as results:
            outcomes = sorted([o async for o in results], key=lambda o: o.index)
    assert [o.ok for o in outcomes] == [True, True, False, False, False, False]
    assert all(isinstance(o.error, am.BudgetExceededError) for o in outcomes[2:])
    assert str(outcomes[2].error).startswith(
        "budget reached: job 2 not submitted ($0.80 of $1.00 committed)"
    )
    assert emu.tasks_created == 2
    assert results.stats().cost == pytest.approx(0.8)


async def test_budget_learns_prices_from_a_probe() -> None:
    async with Emulator(task_duration=0.0) as emu, client_for(emu) as client:
        async with client.batch(jobs(5), max_cost=1.0, concurrency=5) as results:
            outcomes = [o async for o in results]
    assert sum(o.ok for o in outcomes) == 2
    assert emu.tasks_created == 2
    assert emu.state.max_unfinished == 1  # the first (probe) ran alone


async def test_budget_counts_what_earlier_runs_spent(tmp_path: Path, journal_at: JournalAt) -> None:
    journal = journal_at("run")
    async with Emulator(task_duration=0.0) as emu:
        async with client_for(emu) as client, client.batch(jobs(2), journal=journal) as results:
            [o async for o in results]
        async with (
            client_for(emu) as client,
            client.batch(
                jobs(4), journal=journal, max_cost=1.0, cost_estimate=lambda r: 0.4
            ) as results,
        ):
            outcomes = {o.index: o for o in [o async for o in results]}
        assert emu.tasks_created == 2  # 0.8 already spent: nothing else fits
        assert isinstance(outcomes[2].error, am.BudgetExceededError)


async def test_check_balance_refuses_to_start() -> None:
    async with Emulator(balance=0.0) as emu, client_for(emu) as client:
        with pytest.raises(am.InsufficientBalanceError, match="cannot cover any job"):
            async with client.batch(jobs(1), check_balance=True):
                pass
        assert emu.counters == {"balance": 1}


async def test_stop_with_grace_leaves_a_resumable_journal(
    manual_emu: Emulator, tmp_path: Path, journal_at: JournalAt
) -> None:
    journal = journal_at("run")

    def endless() -> Iterator[tuple[str, am.VideoRequest]]:
        i = 0
        while True:
            yield f"job{i}", am.VideoRequest("sora-2-preview", f"prompt {i}")
            i += 1

    async with (
        client_for(manual_emu) as client,
        client.batch(endless(), journal=journal, max_pending=3) as results,
    ):
        await manual_emu.wait_until(lambda: len(client._poller) == 3)
        await results.stop(grace=0.01)
        (held,) = [o async for o in results]  # nothing finished; the job in hand was not sent
        assert held.index == 3 and isinstance(held.error, am.BatchStoppedError)
        assert results.stopped == "stopped by the caller"
    async with client_for(manual_emu) as client, client.batch(jobs(3), journal=journal) as results:
        await manual_emu.wait_until(lambda: len(client._poller) == 3)
        manual_emu.complete_all()
        assert len([o async for o in results]) == 3
    assert manual_emu.tasks_created == 3


async def test_stop_while_a_submit_is_in_flight_still_ends_after_the_grace(
    manual_emu: Emulator, tmp_path: Path, journal_at: JournalAt
) -> None:
    """brk21c: ``stop(grace=...)`` waited for the pending tasks only: a submit in flight then
    (a web app shut down right after it started a batch) came back after the stop, its task
    was followed, and the iteration never ended (the server's shutdown hung until the task
    did). The submit in flight is waited for within the grace; what comes back after it is
    left to a resume (``pending_task_ids()``, the journal), not followed."""
    journal = journal_at("run")
    manual_emu.faults.inject("submit", Fault.slow(0.5))
    async with client_for(manual_emu) as client:
        with anyio.fail_after(20):  # before the fix: waited for the task, for ever
            async with client.batch(jobs(1), journal=journal) as results:
                await manual_emu.wait_until(lambda: manual_emu.counters.get("submit", 0) == 1)
                await results.stop(grace=0.05)  # the submit is still out
                assert [o async for o in results] == []
        assert results.pending_task_ids() == manual_emu.task_ids()
        assert len(client._poller) == 0  # not followed
    async with client_for(manual_emu) as client, client.batch(jobs(1), journal=journal) as results:
        await manual_emu.wait_until(lambda: len(client._poller) == 1)  # re-attached
        manual_emu.complete_all()
        assert [o.ok async for o in results] == [True]
    assert manual_emu.tasks_created == 1


# -- every SQLite connection the journal opens is closed, on every path ----------------------


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[sqlite3.Connection]]:
    """Every connection the journal opens during the test; at the end each must be closed, and
    dropping them must give no ``ResourceWarning`` (Python 3.13 reports unclosed ones)."""
    opened: list[sqlite3.Connection] = []
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    yield opened
    monkeypatch.undo()
    assert opened, "the test opened no journal"
    still_open = 0
    for conn in opened:
        try:
            conn.execute("SELECT 1")
            still_open += 1
        except sqlite3.ProgrammingError:  # "Cannot operate on a closed database."
            pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del conn
        opened.clear()  # the last references: an open connection warns as it is freed (3.13)
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert (still_open, leaks) == (0, [])


def _set_meta(path: Path, sql: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(sql)
        conn.commit()


async def _fresh_journal(path: Path) -> None:
    journal = SqliteJournal(path)
    await journal.open()
    await journal.add(0, "fp", "key-0", None, {"model": "sora-2-preview"})
    await journal.close()


@pytest.mark.parametrize(
    "how",
    [
        "not a database",
        "newer schema",
        "unreadable schema",
        "unreadable row",
        "opened twice",
        "opened and closed",
    ],
)
async def test_the_journal_closes_its_connection_on_every_path(
    how: str, tmp_path: Path, connections: list[sqlite3.Connection]
) -> None:
    path = tmp_path / "run.sqlite"
    if how == "not a database":  # an SQLite header, so that it gets as far as a connection
        path.write_bytes(b"SQLite format 3\x00" + b"\x07" * 5000)
    else:
        await _fresh_journal(path)
    if how == "newer schema":
        _set_meta(path, "UPDATE meta SET value='99' WHERE key='schema'")
    elif how == "unreadable schema":
        _set_meta(path, "UPDATE meta SET value='x' WHERE key='schema'")
    elif how == "unreadable row":
        _set_meta(path, "UPDATE jobs SET files='{not json' WHERE idx=0")
    journal = SqliteJournal(path)
    if how == "opened and closed":
        assert set(await journal.open()) == {0}
        await journal.close()
        await journal.close()  # a second close is harmless
        return
    if how == "opened twice":
        await journal.open()
        with pytest.raises(am.JournalError, match="already open"):
            await journal.open()
        await journal.close()
        return
    expected = {
        "not a database": "cannot use",
        "newer schema": "newer apimart-async",
        "unreadable schema": "cannot use",
        "unreadable row": "cannot use",
    }[how]
    with pytest.raises(am.JournalError, match=expected):
        await journal.open()
    assert "closed" in repr(journal)
    await journal.close()  # closing a journal that never opened is harmless


@pytest.mark.parametrize("how", ["manifest cannot be opened", "body raises", "newer schema"])
async def test_a_batch_closes_its_journal_on_every_path(
    how: str, emu: Emulator, client: am.AsyncApimart, tmp_path: Path,
    connections: list[sqlite3.Connection],
) -> None:  # fmt: skip
    path = tmp_path / "run.sqlite"
    if how == "newer schema":
        await _fresh_journal(path)
        _set_meta(path, "UPDATE meta SET value='99' WHERE key='schema'")
        with pytest.raises(am.JournalError, match="newer"):
            async with client.batch(jobs(1), journal=path):
                pass
    elif how == "manifest cannot be opened":
        (tmp_path / "manifest.jsonl").mkdir()  # a directory where the file should go
        with pytest.raises(am.ApimartError, match="manifest"):
            async with client.batch(jobs(1), journal=path, manifest=tmp_path / "manifest.jsonl"):
                pass
    else:
        with pytest.raises(KeyError, match="boom"):
            async with client.batch(jobs(1), journal=path):
                raise KeyError("boom")
    assert emu.tasks_created == 0


# -- issue 12: every outcome delivered with a journal; resume retries what never ran ---------


async def test_refused_submits_with_a_journal_yield_every_outcome(
    tmp_path: Path, journal_at: JournalAt
) -> None:
    journal = journal_at("run")
    manifest = tmp_path / "manifest.jsonl"
    async with Emulator() as emu:
        async with (
            am.AsyncApimart("sk-wrong", base_url=emu.base_url, poll=FAST_POLL) as client,
            client.batch(jobs(5), journal=journal, manifest=manifest, concurrency=5) as results,
        ):
            outcomes = [o async for o in results]
        stats = results.stats()
    assert sorted(o.index for o in outcomes) == [0, 1, 2, 3, 4]
    assert all(isinstance(o.error, am.AuthenticationError) for o in outcomes)
    assert stats.errored == 5 and stats.done == 5
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3, 4]


async def test_refused_submits_are_sent_again_on_the_next_run(
    tmp_path: Path, journal_at: JournalAt
) -> None:
    journal = journal_at("run")
    async with Emulator(balance=0.0, task_duration=0.0) as emu:
        async with client_for(emu) as client, client.batch(jobs(3), journal=journal) as results:
            first = [o async for o in results]
        assert all(isinstance(o.error, am.InsufficientBalanceError) for o in first)
        first_keys = {o.idempotency_key for o in first}
        assert emu.tasks_created == 0
        emu.state.remain_balance = 100.0  # topped up
        async with client_for(emu) as client, client.batch(jobs(3), journal=journal) as results:
            second = [o async for o in results]
        assert [o.ok for o in sorted(second, key=lambda o: o.index)] == [True] * 3
        assert not any(o.replayed for o in second)
        # the refusal proved no task existed: each job got a fresh key, one task each
        assert not first_keys & {o.idempotency_key for o in second}
        assert emu.tasks_created == 3 and set(emu.tasks_per_key.values()) == {1}
        async with client_for(emu) as client, client.batch(jobs(3), journal=journal) as results:
            third = [o async for o in results]
        assert all(o.replayed and o.ok for o in third)
        assert emu.tasks_created == 3


async def test_wrong_key_then_right_key_resumes(tmp_path: Path, journal_at: JournalAt) -> None:
    journal = journal_at("run")
    async with Emulator(task_duration=0.0) as emu:
        async with (
            am.AsyncApimart("sk-wrong", base_url=emu.base_url, poll=FAST_POLL) as client,
            client.batch(jobs(2), journal=journal) as results,
        ):
            first = [o async for o in results]
        assert all(isinstance(o.error, am.AuthenticationError) for o in first)
        async with client_for(emu) as client, client.batch(jobs(2), journal=journal) as results:
            second = [o async for o in results]
        assert [o.ok for o in second] == [True, True]
        assert emu.tasks_created == 2


async def test_a_changed_line_without_a_task_takes_the_new_line(
    tmp_path: Path, journal_at: JournalAt
) -> None:
    journal = journal_at("run")
    async with Emulator(task_duration=0.0) as emu:
        emu.faults.inject("submit", Fault.error(400, "invalid_request_error", message="bad"))
        async with client_for(emu) as client, client.batch(jobs(3), journal=journal) as results:
            first = {o.index: o for o in [o async for o in results]}
        refused = [i for i, o in first.items() if isinstance(o.error, am.BadRequestError)]
        assert len(refused) == 1
        (i,) = refused
        changed = jobs(3, changed=i)
        async with client_for(emu) as client, client.batch(changed, journal=journal) as results:
            second = {o.index: o for o in [o async for o in results]}
        assert second[i].ok and not second[i].replayed
        assert second[i].request == changed[i][1]
        assert emu.tasks_created == 3


async def test_a_changed_line_with_a_task_is_reported_and_the_others_go_on(
    tmp_path: Path,
    journal_at: JournalAt,
) -> None:
    journal = journal_at("run")
    async with Emulator(task_duration=0.0) as emu:
        async with client_for(emu) as client, client.batch(jobs(2), journal=journal) as results:
            [o async for o in results]
        async with (
            client_for(emu) as client,
            client.batch(jobs(4, changed=0), journal=journal) as results,
        ):
            outcomes = {o.index: o for o in [o async for o in results]}
    assert set(outcomes) == {0, 1, 2, 3}
    assert isinstance(outcomes[0].error, am.JournalMismatchError)
    assert "job 0" in str(outcomes[0].error)
    assert outcomes[1].replayed and outcomes[1].ok
    assert outcomes[2].ok and outcomes[3].ok and results.stopped is None
    assert emu.tasks_created == 4


async def test_retry_failed_resubmits_failed_generations_only_when_asked(
    manual_emu: Emulator, tmp_path: Path, journal_at: JournalAt
) -> None:
    journal = journal_at("run")
    async with client_for(manual_emu) as client, client.batch(jobs(2), journal=journal) as results:
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 2)
        await manual_emu.wait_until(lambda: len(client._poller) == 2)
        t = task_ids_by_index(manual_emu, 2)
        manual_emu.complete(t[0])
        manual_emu.fail(t[1])
        [o async for o in results]
    async with client_for(manual_emu) as client, client.batch(jobs(2), journal=journal) as results:
        again = [o async for o in results]
    assert all(o.replayed for o in again) and manual_emu.tasks_created == 2
    async with (
        client_for(manual_emu) as client,
        client.batch(jobs(2), journal=journal, retry_failed=True) as results,
    ):
        await manual_emu.wait_until(lambda: manual_emu.tasks_created == 3)
        manual_emu.complete_all()
        retried = {o.index: o for o in [o async for o in results]}
    assert retried[0].replayed and retried[0].ok
    assert not retried[1].replayed and retried[1].ok and retried[1].task_id not in t
    assert manual_emu.tasks_created == 3


async def test_a_version_1_journal_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    journal = tmp_path / "run.sqlite"
    async with Emulator(task_duration=0.0) as emu:
        async with client_for(emu) as client, client.batch(jobs(2), journal=journal) as results:
            [o async for o in results]
        # what version 1 wrote for a refused submit: done, status error, no task id
        conn = sqlite3.connect(journal)
        conn.execute("UPDATE meta SET value='1' WHERE key='schema'")
        conn.execute(
            "UPDATE jobs SET state='done', status='error', task_id=NULL, task=NULL,"
            " error='Insufficient balance', error_type='InsufficientBalanceError' WHERE idx=1"
        )
        conn.commit()
        conn.close()
        async with client_for(emu) as client, client.batch(jobs(2), journal=journal) as results:
            outcomes = {o.index: o for o in [o async for o in results]}
        assert outcomes[0].replayed and not outcomes[1].replayed and outcomes[1].ok
        conn = sqlite3.connect(journal)
        assert conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("5",)
        conn.close()


async def test_the_budget_is_never_exceeded_with_mixed_models() -> None:
    # emulator prices: $0.40, $0.30, $0.80, $1.00; probing all four at once spends $2.50
    kinds = [
        am.VideoRequest("sora-2-preview", "a", duration=4),
        am.VideoRequest("viduq3", "d", image_urls=["https://e/a.png"], duration=8),
        am.VideoRequest("sora-2-preview", "b", duration=8),
        am.VideoRequest("gemini-omni-flash-preview", "c"),
    ]
    requests = [kinds[i % 4] for i in range(12)]
    async with Emulator(task_duration=0.0) as emu, client_for(emu) as client:
        async with client.batch(requests, max_cost=1.0, concurrency=8) as results:
            outcomes = [o async for o in results]
        used = emu.state.used_balance
    assert len(outcomes) == 12
    assert used <= 1.0 + 1e-9, used
    assert results.stats().cost <= 1.0 + 1e-9
    assert any(o.ok for o in outcomes)
    assert emu.state.max_unfinished == 1  # price probes ran one at a time


async def test_an_opened_journal_gives_the_garbage_collector_a_few_objects_per_job(
    tmp_path: Path,
) -> None:
    """Issue 21: a replay of 20,000 finished jobs held every task and request as parsed JSON,
    ten containers a job, which every full collection walked (50 ms event-loop stalls). A
    record keeps them as JSON text (not tracked by the collector) and parses on each read."""
    journal = SqliteJournal(tmp_path / "j.sqlite")
    await journal.open()
    task = {"id": "task_1", "status": "completed", "result": {"videos": [{"url": ["u"]}]}}
    body = {"model": "sora-2-preview", "prompt": "a cat", "image_urls": ["https://e.x/a.png"]}
    file = am.DownloadedFile(path="/v/0.mp4", bytes=3, sha256="0" * 64)
    for i in range(50):
        await journal.add(i, f"fp{i}", f"key-{i}", None, body)
        await journal.set_task(i, f"task_{i}")
        await journal.finish(
            i, status="completed", cost=0.4, task=task, files=(file,), error=None, error_type=None
        )
    await journal.close()
    records = await journal.open()
    await journal.close()

    def tracked(root: object) -> int:
        seen: set[int] = set()
        todo = [root]
        while todo:
            obj = todo.pop()
            if id(obj) in seen or not gc.is_tracked(obj) or isinstance(obj, type):
                continue
            seen.add(id(obj))
            todo.extend(gc.get_referents(obj))
        return len(seen)

    # the record, its files tuple and the DownloadedFile: no dict or list of the task or body
    assert max(tracked(r) for r in records.values()) <= 3
    record = records[7]
    assert record.task == task and record.request == body  # as they were written
    record.task["status"] = "changed"  # type: ignore[index]  # a copy: the record is frozen
    assert record.task == task


@pytest.mark.parametrize("text", ["not json", "[1]", "5"])
async def test_a_journal_handing_back_a_task_that_is_not_a_json_object_is_a_journal_error(
    tmp_path: Path, text: str
) -> None:
    """A ``Journal`` may hand ``JobRecord`` the JSON text it stores; text that is not a JSON
    object broke the replay with a raw JSONDecodeError, an AttributeError, or a
    ResponseValidationError blaming a service reply that never was (brk21b 11)."""
    from apimart_async._journal import JobRecord

    class TextJournal(SqliteJournal):
        async def open(self) -> dict[int, JobRecord]:
            records = await super().open()
            return {i: JobRecord(**{**_fields(r), "task": text}) for i, r in records.items()}

    jobs = [am.VideoRequest("sora-2-preview", "x")]
    async with Emulator(task_duration=0.01) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client:
            async with client.batch(jobs, journal=tmp_path / "b.sqlite") as results:
                assert [o.ok async for o in results] == [True]
            with pytest.raises(am.JournalError, match="job 0 holds a task that is not a JSON"):
                journal = TextJournal(str(tmp_path / "b.sqlite"))
                async with client.batch(jobs, journal=journal) as results:
                    async for _ in results:
                        pass
        assert emu.tasks_created == 1


def _fields(record: Any) -> dict[str, Any]:
    names = ("index", "fingerprint", "idempotency_key", "state", "name", "task_id", "status")
    more = ("cost", "error", "error_type", "files", "request")
    return {name: getattr(record, name) for name in (*names, *more)}


async def test_a_job_whose_input_changed_under_the_journal_adds_no_old_cost(
    tmp_path: Path,
) -> None:
    """Reusing a journal with new input (the reference app does when a batch name is posted
    again): job 0 is refused as a mismatch, nothing sent, yet ``stats().cost`` added what
    the journal recorded for the OLD job 0 (0.8 reported, 0.4 paid: brk21b 15)."""
    journal = tmp_path / "j.sqlite"
    async with (
        Emulator(task_duration=0.01) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
    ):
        async with client.batch([am.VideoRequest("sora-2-preview", "cats")], journal=journal) as r:
            assert [o.ok async for o in r] == [True]
        jobs = [
            am.VideoRequest("sora-2-preview", "dogs"),
            am.VideoRequest("sora-2-preview", "birds"),
        ]
        async with client.batch(jobs, journal=journal) as results:
            outcomes = [o async for o in results]
    assert isinstance(outcomes[0].error, am.JournalMismatchError)
    paid = sum(o.task.cost or 0.0 for o in outcomes if o.task is not None)
    assert paid > 0 and results.stats().cost == pytest.approx(paid)

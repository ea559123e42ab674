"""``Apimart``: the synchronous facade, against an emulator running in a thread of its own
(the sync client blocks its caller, so the emulator cannot share the caller's loop)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

import apimart_async as am
from apimart_async.emulator import Emulator, Fault

from .conftest import FAST_POLL

T = TypeVar("T")

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class ThreadedEmulator:
    """An ``Emulator`` in its own event loop thread; ``call`` runs a control there."""

    def __init__(self, portal: BlockingPortal, emu: Emulator) -> None:
        self.portal = portal
        self.emu = emu

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        async def run() -> T:
            return fn(*args)

        return self.portal.call(run)

    def wait_until(self, predicate: Callable[[], bool]) -> None:
        self.portal.call(self.emu.wait_until, predicate)


def _threaded(**options: Any) -> Iterator[ThreadedEmulator]:
    with start_blocking_portal() as portal:
        emu = Emulator(**options)
        with portal.wrap_async_context_manager(emu):
            yield ThreadedEmulator(portal, emu)


@pytest.fixture
def temu() -> Iterator[ThreadedEmulator]:
    """Tasks end 50 ms after their submit (real time)."""
    yield from _threaded(task_duration=0.05)


@pytest.fixture
def manual_temu() -> Iterator[ThreadedEmulator]:
    yield from _threaded(mode="manual")


def sync_client(t: ThreadedEmulator) -> am.Apimart:
    return am.Apimart(t.emu.api_key, base_url=t.emu.base_url, poll=FAST_POLL)


def _watching(client: am.Apimart) -> list[str]:
    """Task ids the client's shared poller follows, read in the client's loop after letting
    anything already cancelled there finish (checkpoints, no timing)."""

    async def read() -> list[str]:
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        return client._target._poller.watching()

    return client._loop.call(read)


def _portal_threads() -> int:
    return sum(1 for t in threading.enumerate() if "portal" in t.name)


def test_every_endpoint_blocks_and_returns_what_the_async_client_returns(
    temu: ThreadedEmulator, tmp_path: Path
) -> None:
    with sync_client(temu) as client:
        assert repr(client) == f"<Apimart {temu.emu.base_url} [open]>"
        assert client.balance().remain_balance == 1000.0
        task_id = client.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
        task = client.tasks.wait(task_id)
        assert task.status == "completed"
        assert client.tasks.get(task_id) == task
        other = client.videos.generate(am.VideoRequest("sora-2-preview", "a dog", duration=8))
        assert other.ok
        assert client.tasks.get_many([other.id, task_id, "task_nope"]) == [other, task]
        url = client.uploads.image(PNG, filename="ref.png")
        assert url.startswith(temu.emu.base_url)
        (file,) = client.download(task, tmp_path)
        assert Path(file.path) == tmp_path / f"{task_id}.mp4"
        assert hashlib.sha256(Path(file.path).read_bytes()).hexdigest() == file.sha256
        assert file.sha256 == temu.emu.file_sha256(task_id)
        assert client.balance().used_balance == pytest.approx(0.4 + 0.8)
        assert client.request_counts()["submit"] == 2
    assert temu.emu.counters["submit"] == 2
    assert temu.emu.tasks_created == 2
    assert client.closed


def test_errors_come_through_typed(manual_temu: ThreadedEmulator) -> None:
    with sync_client(manual_temu) as client:
        with pytest.raises(am.ValidationError, match="duration"):
            client.videos.submit(am.VideoRequest("sora-2-preview", "a cat", duration=5))
        with pytest.raises(am.NotFoundError):
            client.tasks.get("task_nope")
        task_id = client.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
        manual_temu.call(manual_temu.emu.fail, task_id)
        with pytest.raises(am.TaskFailedError, match="Video generation failed"):
            client.tasks.wait(task_id)
    with pytest.raises(am.AuthenticationError):
        with am.Apimart("sk-wrong", base_url=manual_temu.emu.base_url) as bad:
            bad.balance()


def test_a_batch_iterated_with_a_for_loop_yields_every_job_once(temu: ThreadedEmulator) -> None:
    jobs = [am.VideoRequest("sora-2-preview", f"prompt {i}") for i in range(12)]
    with sync_client(temu) as client:
        indexes = [outcome.index for outcome in client.batch(jobs, concurrency=4)]
        assert all(isinstance(i, int) for i in indexes)
        assert sorted(indexes) == list(range(12))
        with client.batch(jobs[:3]) as results:
            outcomes = list(results)
            assert [o.ok for o in outcomes] == [True, True, True]
        stats = results.stats()
        assert (stats.submitted, stats.completed, stats.pending) == (3, 3, 0)
        assert repr(results).startswith("<Batch read=3 submitted=3 pending=0 | completed=3")
    assert temu.emu.tasks_created == 15
    assert max(temu.emu.tasks_per_key.values()) == 1


class SyncEvents:
    """A batch's ``on_event=`` for the sync facade (events arrive on the client's thread):
    ``wait_for(kind, n)`` blocks until ``n`` events of that kind were seen."""

    def __init__(self) -> None:
        self.seen: list[am.BatchEvent] = []
        self._changed = threading.Condition()

    def __call__(self, event: am.BatchEvent) -> None:
        with self._changed:
            self.seen.append(event)
            self._changed.notify_all()

    def wait_for(self, kind: str, n: int, timeout: float = 30.0) -> None:
        """``timeout`` only guards against a hang."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: sum(e.kind == kind for e in self.seen) >= n, timeout=timeout
            )
        assert ok, f"fewer than {n} {kind!r} events: {self.seen}"


def test_breaking_out_of_a_batch_leaves_it_and_the_client_goes_on(
    manual_temu: ThreadedEmulator,
) -> None:
    emu = manual_temu.emu
    jobs = [am.VideoRequest("sora-2-preview", f"prompt {i}") for i in range(5)]
    events = SyncEvents()
    with sync_client(manual_temu) as client:
        with client.batch(jobs, concurrency=5, on_event=events) as results:
            # every task id known to the client, not only created at the emulator
            events.wait_for("submitted", 5)
            first = emu.task_ids()[2]
            manual_temu.call(emu.complete, first)
            for outcome in results:
                assert outcome.task_id == first
                break
            assert sorted(_watching(client)) == sorted(set(emu.task_ids()) - {first})
        # Left: nothing is followed any more, the other four are reported as still running.
        assert results.stopped == "the batch was left"
        assert sorted(results.pending_task_ids()) == sorted(set(emu.task_ids()) - {first})
        assert _watching(client) == []
        assert client.tasks.get(first).ok  # the client is still usable

        # The short form: a plain for loop, left by break, leaves the batch too.
        def complete_the_next_one() -> None:
            manual_temu.wait_until(lambda: emu.tasks_created == 6)
            manual_temu.call(emu.complete_all)

        threading.Thread(target=complete_the_next_one, daemon=True).start()
        more = [am.VideoRequest("sora-2-preview", f"again {i}") for i in range(3)]
        for outcome in client.batch(more, max_pending=1):
            assert outcome.ok
            break
        assert _watching(client) == []
    # max_pending 1: the second job of the short form may have gone out before the break
    assert emu.counters["submit"] in (6, 7)


def test_works_inside_a_running_event_loop(temu: ThreadedEmulator) -> None:
    """As in Jupyter: the caller's thread already runs an event loop."""

    async def notebook_cell() -> tuple[am.Task, list[bool]]:
        asyncio.get_running_loop()  # a loop runs here
        with sync_client(temu) as client:
            task = client.videos.generate(am.VideoRequest("sora-2-preview", "a cat"))
            jobs = [am.VideoRequest("sora-2-preview", f"p{i}") for i in range(3)]
            return task, [o.ok for o in client.batch(jobs)]

    task, oks = asyncio.run(notebook_cell())
    assert task.status == am.TaskStatus.COMPLETED
    assert oks == [True, True, True]
    assert temu.emu.tasks_created == 4


def _interrupt_main_thread_when(t: ThreadedEmulator, predicate: Callable[[], bool]) -> None:
    """From a helper thread: once the emulator sees ``predicate`` hold (the main thread is then
    blocked in a call), deliver Ctrl-C to the main thread."""
    main = threading.main_thread().ident
    assert main is not None

    def run() -> None:
        t.wait_until(predicate)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=run, daemon=True).start()


def test_ctrl_c_while_waiting_cancels_the_wait_in_the_loop(
    manual_temu: ThreadedEmulator,
) -> None:
    assert threading.current_thread() is threading.main_thread()
    emu = manual_temu.emu
    with sync_client(manual_temu) as client:
        task_id = client.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
        reads = emu.counters.get("batch", 0)
        _interrupt_main_thread_when(manual_temu, lambda: emu.counters.get("batch", 0) >= reads + 2)
        with pytest.raises(KeyboardInterrupt):
            client.tasks.wait(task_id)
        assert _watching(client) == []
        manual_temu.call(emu.complete, task_id)
        assert client.tasks.wait(task_id).ok  # the client still works


def test_ctrl_c_while_iterating_a_batch_leaves_the_batch(manual_temu: ThreadedEmulator) -> None:
    emu = manual_temu.emu
    jobs = [am.VideoRequest("sora-2-preview", f"prompt {i}") for i in range(4)]
    with sync_client(manual_temu) as client:
        _interrupt_main_thread_when(manual_temu, lambda: emu.tasks_created == 4)
        with pytest.raises(KeyboardInterrupt):
            with client.batch(jobs, concurrency=4) as results:
                for _ in results:
                    pytest.fail("no task ends in manual mode")
        assert results.stopped == "the batch was left"
        assert sorted(results.pending_task_ids()) == sorted(emu.task_ids())
        assert _watching(client) == []
    assert client.closed


def test_close_stops_the_thread_and_later_calls_fail_typed(temu: ThreadedEmulator) -> None:
    before = _portal_threads()
    client = sync_client(temu)
    assert _portal_threads() == before + 1
    batch = client.batch([am.VideoRequest("sora-2-preview", "never run")])
    client.close()
    client.close()  # harmless
    assert _portal_threads() == before
    assert repr(client) == f"<Apimart {temu.emu.base_url} [closed]>"
    with pytest.raises(am.ClientClosedError):
        client.balance()
    with pytest.raises(am.ClientClosedError):
        client.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
    with pytest.raises(am.ClientClosedError):
        list(batch)
    with pytest.raises(am.ClientClosedError):
        client.batch([])
    assert temu.emu.counters.get("submit", 0) == 0


def test_a_client_used_without_a_name_stays_open_for_its_call(temu: ThreadedEmulator) -> None:
    """``Apimart(...).balance()``, ``Apimart(...).videos.generate(...)`` or ``for outcome in
    Apimart(...).batch(jobs)``: nothing names the client, yet it must not be collected (and
    closed) while its call, facade or batch is in use."""

    before = _portal_threads()

    def new() -> am.Apimart:
        return am.Apimart(temu.emu.api_key, base_url=temu.emu.base_url, poll=FAST_POLL)

    def collect_then(call: Callable[[], T]) -> T:
        gc.collect()
        return call()

    def use_unnamed_clients() -> None:
        assert new().balance().remain_balance == 1000.0
        videos = new().videos
        assert collect_then(lambda: videos.generate(am.VideoRequest("sora-2-preview", "a"))).ok
        tasks = new().tasks
        task_id = temu.emu.task_ids()[0]
        assert collect_then(lambda: tasks.get(task_id)).ok
        batch = new().batch([am.VideoRequest("sora-2-preview", f"p{i}") for i in range(2)])
        assert collect_then(lambda: [o.ok for o in batch]) == [True, True]

    use_unnamed_clients()
    gc.collect()
    assert _portal_threads() == before  # once nothing refers to them, the clients close


def test_bad_options_fail_at_once_and_leave_no_thread(temu: ThreadedEmulator) -> None:
    before = _portal_threads()
    with pytest.raises(am.ConfigurationError, match="max_retries"):
        am.Apimart("k", base_url=temu.emu.base_url, max_retries=-1)
    with pytest.raises(am.ConfigurationError, match="API key"):
        am.Apimart(base_url=temu.emu.base_url)
    assert _portal_threads() == before


def test_the_facade_takes_exactly_the_async_clients_arguments() -> None:
    def shape(fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(am.Apimart.__init__) == shape(am.AsyncApimart.__init__)
    from apimart_async._client import Tasks, Videos

    with am.Apimart("k", base_url="http://127.0.0.1:9") as client:
        # each method keeps the async method's parameters and documentation
        assert shape(client.batch) == shape(am.AsyncApimart.batch)[1:]
        assert shape(client.videos.generate) == shape(Videos.generate)[1:]
        assert shape(client.tasks.wait) == shape(Tasks.wait)[1:]
        assert client.tasks.wait.__doc__ == Tasks.wait.__doc__
        assert client.download.__doc__ == am.AsyncApimart.download.__doc__


def _until(predicate: Callable[[], bool]) -> None:
    """Wait for a condition another thread makes true (bounded; not a timing assertion)."""
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_sigint_grace_first_ctrl_c_stops_submitting_second_ends(
    manual_temu: ThreadedEmulator,
) -> None:
    emu = manual_temu.emu
    jobs = [am.VideoRequest("sora-2-preview", f"prompt {i}") for i in range(6)]
    main = threading.main_thread().ident
    assert main is not None
    before = signal.getsignal(signal.SIGINT)
    with sync_client(manual_temu) as client:
        results = client.batch(jobs, max_pending=2, sigint_grace=600)

        failed: list[BaseException] = []

        def press_ctrl_c_twice() -> None:
            try:
                manual_temu.wait_until(lambda: emu.tasks_created == 2)
                signal.pthread_kill(main, signal.SIGINT)
                _until(lambda: results.interrupted == 1)
                manual_temu.call(emu.complete, emu.task_ids()[0])  # still followed
                _until(lambda: results.stats().completed == 1)
            except BaseException as exc:  # the test fails with it instead of hanging
                failed.append(exc)
                signal.pthread_kill(main, signal.SIGINT)  # end the grace: list() returns
            signal.pthread_kill(main, signal.SIGINT)

        threading.Thread(target=press_ctrl_c_twice, daemon=True).start()
        with results:
            outcomes = list(results)  # no KeyboardInterrupt: the batch handles Ctrl-C
        assert not failed, failed
        assert signal.getsignal(signal.SIGINT) is before  # handler put back
        assert [o.task_id for o in outcomes if o.ok] == [emu.task_ids()[0]]
        assert results.interrupted == 2
        assert results.stopped == "interrupted"
        assert results.stats().submitted == 2
    assert emu.counters["submit"] == 2  # nothing submitted after the first Ctrl-C


def test_sigint_grace_handler_is_in_place_before_the_batch_starts_submitting(
    manual_temu: ThreadedEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C right after the batch starts is the batch's, never a KeyboardInterrupt: the
    handler went in only after the batch's submitters had started, and a Ctrl-C in between
    (CI under load: the first submits came before the main thread was scheduled again) hit
    Python's default handler, aborting the run and leaving the batch entered in the loop."""
    emu = manual_temu.emu
    import apimart_async._sync as sync_module

    started_when_installed: list[bool] = []
    real_signal = signal.signal

    def spy(signum: int, handler: Any) -> Any:
        # the batch's handler (not a call's, holding a Ctrl-C back while it is handed over)
        if signum == signal.SIGINT and getattr(handler, "__name__", "") == "on_sigint":
            started_when_installed.append(results._target._run._tg is not None)
        return real_signal(signum, handler)

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(sync_module.signal, "signal", spy)
    with sync_client(manual_temu) as client:
        results = client.batch([am.VideoRequest("sora-2-preview", "a cat")], sigint_grace=60)
        with results:
            manual_temu.wait_until(lambda: emu.tasks_created == 1)
    assert started_when_installed == [False]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_client_never_closed_is_closed_when_collected_and_at_exit(
    temu: ThreadedEmulator,
) -> None:
    """A notebook or script that forgets close(): no hang at exit, no unclosed session."""
    code = (
        "import gc, sys, threading\n"
        "import apimart_async as am\n"
        "def forgotten():\n"
        "    client = am.Apimart()\n"
        "    client.balance()\n"
        "forgotten()\n"
        "gc.collect()\n"
        "print([t.name for t in threading.enumerate()])\n"
        "kept = am.Apimart()  # still open at exit\n"
        "print(kept.balance().remain_balance)\n"
    )
    env = {
        **os.environ,
        "APIMART_API_KEY": temu.emu.api_key,
        "APIMART_BASE_URL": temu.emu.base_url,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,  # a bound for a hang at exit, not a timing assertion
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["['MainThread']", "1000.0"]
    assert proc.stderr == ""


def test_closing_the_client_inside_an_open_batch_leaves_the_batch(
    manual_temu: ThreadedEmulator,
) -> None:
    emu = manual_temu.emu
    with sync_client(manual_temu) as client:
        with client.batch([am.VideoRequest("sora-2-preview", "a cat")]) as results:
            manual_temu.wait_until(lambda: emu.tasks_created == 1)
            client.close()
        assert client.closed
    assert results.stopped == "the client was closed"
    assert results.stats().submitted == 1
    assert emu.counters["submit"] == 1


def test_a_sync_batch_shows_the_options_it_was_given() -> None:
    # Batch.options is new with this release; the sync facade's batch did not show it.
    with am.Apimart("sk-test", base_url="http://127.0.0.1:9") as client:
        results = client.batch([], timeout=5.0, concurrency=3)
        assert (results.options.timeout, results.options.concurrency) == (5.0, 3)


def test_a_sync_batch_lists_the_outcomes_left_unread(manual_temu: ThreadedEmulator) -> None:
    with sync_client(manual_temu) as client:
        with client.batch([am.VideoRequest("sora-2-preview", f"take {i}") for i in range(3)]) as b:
            manual_temu.wait_until(lambda: manual_temu.emu.tasks_created == 3)
            manual_temu.call(manual_temu.emu.complete_all)
            deadline = time.monotonic() + 20
            while b.stats().done < 3 and time.monotonic() < deadline:
                time.sleep(0.005)  # the batch runs on the client's loop thread
            first = next(iter(b))
    unread = b.unread()
    assert len(unread) == 2 and b.stats().unread == 2
    assert {o.index for o in unread} | {first.index} == {0, 1, 2}


def test_the_facade_lists_unfinished_tasks_of_its_journal(
    manual_temu: ThreadedEmulator, tmp_path: Path
) -> None:
    path = tmp_path / "client.sqlite"
    emu = manual_temu.emu
    with am.Apimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL, journal=path) as client:
        task_id = client.videos.submit(am.VideoRequest("sora-2-preview", "a"))
    with am.Apimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL, journal=path) as client:
        [item] = client.tasks.unfinished()
        assert item.task_id == task_id and client.tasks.recover(item) == task_id
        manual_temu.call(emu.complete, task_id)
        assert client.tasks.wait(task_id).ok
        assert client.tasks.unfinished() == []


@pytest.mark.parametrize("call", ["submit", "generate", "balance", "on_submitted"])
def test_closing_while_another_thread_calls_ends_that_call_with_client_closed_error(
    temu: ThreadedEmulator, call: str
) -> None:
    """A sync web endpoint (FastAPI's threadpool) calling the shared client while the app
    shuts down: its call ends with ``ClientClosedError``, not a bare ``CancelledError`` (the
    client's loop stops, cancelling what still runs there, once the client is closed)."""
    endpoint = "balance" if call == "balance" else "submit"
    if call != "on_submitted":  # held in the POST; else in the caller's own callback
        temu.call(temu.emu.faults.inject, endpoint, Fault.slow(30.0))
    client = sync_client(temu)
    request = am.VideoRequest("sora-2-preview", "a cat")
    run: Callable[[], object] = {
        "submit": lambda: client.videos.submit(request),
        "generate": lambda: client.videos.generate(request),
        "balance": client.balance,
        "on_submitted": lambda: client.videos.generate(request, on_submitted=never_done),
    }[call]
    raised: list[BaseException] = []

    async def never_done(task_id: str) -> None:  # where aclose() has nothing to end
        await anyio.Event().wait()

    def endpoint_thread() -> None:
        try:
            run()
        except BaseException as exc:  # what the endpoint sees
            raised.append(exc)

    thread = threading.Thread(target=endpoint_thread)
    thread.start()
    temu.wait_until(lambda: temu.emu.counters.get(endpoint, 0) == 1)
    client.close()
    thread.join(10)
    assert not thread.is_alive()
    assert len(raised) == 1
    assert isinstance(raised[0], am.ClientClosedError), repr(raised[0])


def test_a_call_or_a_batch_exit_meeting_the_loop_stopped_by_close_is_client_closed() -> None:
    # second break-it pass: ``close()`` from another thread stops the loop's portal before it
    # marks the loop closed; a call or a batch's exit in that moment raised anyio's bare
    # ``RuntimeError: This portal is not running`` (6 of 12 runs of a batch iterated by one
    # thread while another closed the client)
    from apimart_async._sync import SyncBatch, _Loop

    with start_blocking_portal() as portal:
        loop = _Loop(portal)

    async def nothing() -> None:
        return None

    loop.closing = True  # close() has begun, and stopped the portal; ``closed`` comes next
    with pytest.raises(am.ClientClosedError, match="closed"):
        loop.call(nothing)

    class _Exiting:
        def __exit__(self, *exc: object) -> None:
            raise RuntimeError("This portal is not running")

    batch = SyncBatch.__new__(SyncBatch)
    batch._loop = loop
    batch._cm = _Exiting()  # type: ignore[assignment]
    batch._sigint_installed = False
    with pytest.raises(am.ClientClosedError, match="closed"):
        batch.__exit__(None, None, None)
    batch._cm = _Exiting()  # type: ignore[assignment]
    batch.__exit__(ValueError, ValueError("the caller's"), None)  # theirs goes on: no raise


def test_a_second_close_returns_only_once_the_client_is_closed(temu: ThreadedEmulator) -> None:
    """brk16g: ``close()`` from a second thread while the first still closed returned at once,
    the client not yet closed: the next batch on the same journal (the first's batch still
    held it) failed with JournalLockedError. The second waits for the first."""
    client = sync_client(temu)
    target = client._target
    original = target.aclose
    entered, release = threading.Event(), threading.Event()

    async def slow_aclose() -> None:
        entered.set()
        await anyio.to_thread.run_sync(release.wait)
        await original()

    target.aclose = slow_aclose  # type: ignore[method-assign]
    first = threading.Thread(target=client.close)
    first.start()
    assert entered.wait(10)
    seen: list[bool] = []
    second = threading.Thread(target=lambda: (client.close(), seen.append(client.closed)))
    second.start()
    try:
        second.join(1.0)
        assert second.is_alive() and seen == []  # still waiting for the first close
    finally:
        release.set()
    first.join(10)
    second.join(10)
    assert seen == [True]
    assert not first.is_alive() and client.closed


def test_ctrl_c_during_a_download_returns_once_the_part_is_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """brk16f: Ctrl-C during the sync facade's ``download`` returned while the download was
    still stopping in the loop; the same download at once, from another client, found the
    ``.part`` locked (1 run in 2). The call returns once the download has let the part go
    (here its close is slowed to widen that moment); the retry then gets the file."""
    from apimart_async import _download

    closing = _download._PartFile.close_sync

    def slow_close(self: Any) -> None:
        time.sleep(0.5)  # in a worker thread: the moment a caller must not return in
        closing(self)

    monkeypatch.setattr(_download._PartFile, "close_sync", slow_close)
    size = 1 << 20
    threaded = contextlib.contextmanager(_threaded)
    with threaded(task_duration=0.05, video_bytes=size, file_chunk_delay=3600) as temu:
        emu = temu.emu
        with sync_client(temu) as client, sync_client(temu) as other:
            task = client.videos.generate(am.VideoRequest("sora-2-preview", "a cat"))
            _interrupt_main_thread_when(temu, lambda: emu.state.in_flight["file"] == 1)
            with pytest.raises(KeyboardInterrupt):
                client.download(task, tmp_path / "v.mp4")
            temu.call(setattr, emu, "file_chunk_delay", 0)
            (file,) = other.download(task, tmp_path / "v.mp4")  # was: DownloadError, busy
        data = (tmp_path / "v.mp4").read_bytes()
        assert file.bytes == len(data) == size
        assert file.sha256 == hashlib.sha256(data).hexdigest() == emu.file_sha256(task.id)
        assert emu.counters["file"] == 2
        assert not (tmp_path / "v.mp4.part").exists()


def test_close_from_a_callback_on_the_clients_own_thread_closes_it_once_the_callback_returns(
    temu: ThreadedEmulator, tmp_path: Path
) -> None:
    """brk16h: ``close()`` inside an ``on_event`` callback (which runs on the client's own
    thread) raised a raw ``RuntimeError('cannot join current thread')``, and the client was
    never closed: its journal stayed locked for the rest of the process. The close now
    happens on a thread of its own once the callback returns, and the journal is free for
    the next client."""
    journal = tmp_path / "j.sqlite"
    jobs = [am.VideoRequest("sora-2-preview", "a cat")]
    client = sync_client(temu)
    raised: list[BaseException] = []

    def on_event(event: am.BatchEvent) -> None:
        if event.kind == "submitted":
            try:
                client.close()
            except BaseException as exc:
                raised.append(exc)

    with contextlib.suppress(am.ClientClosedError):  # the batch may see the close, or end
        with client.batch(jobs, on_event=on_event, journal=journal) as results:
            for _ in results:
                pass
    assert raised == []
    client.close()  # from this thread: returns once the client is closed
    assert client.closed
    with sync_client(temu) as again, again.batch(jobs, journal=journal) as results:
        (outcome,) = list(results)
    assert outcome.ok and temu.emu.tasks_created == 1  # its task, followed again


def test_ctrl_c_as_a_sync_call_is_handed_to_the_loop_still_cancels_it(
    manual_temu: ThreadedEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """brk16h: a Ctrl-C landing while a sync call was being handed to the loop (anyio's
    ``start_task_soon``) lost the call's future: the call ran on in the loop (a generate()
    waited on, its task billed and never named; a download kept its part locked), 1 run in
    40. Ctrl-C is held back for that moment, then ends the call as at any other."""
    import logging

    caplog.set_level(logging.WARNING, logger="apimart_async")
    assert threading.current_thread() is threading.main_thread()
    with sync_client(manual_temu) as client:
        portal = client._loop.portal
        real = portal.start_task_soon

        def start_then_ctrl_c(*args: Any, **kwargs: Any) -> Any:
            future = real(*args, **kwargs)
            signal.raise_signal(signal.SIGINT)  # before the caller holds the future
            return future

        monkeypatch.setattr(portal, "start_task_soon", start_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            client.videos.generate(am.VideoRequest("sora-2-preview", "a cat"))
        monkeypatch.undo()
        assert _watching(client) == []  # the call ended in the loop: nothing waits there
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(said) == 1 and "generate() was cancelled" in said[0]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

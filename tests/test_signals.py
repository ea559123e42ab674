"""Signals belong to the application (issue 21): ``sigint_grace=`` installs a SIGINT handler
only on the main thread of a program that has not installed its own (Python's default, or
``asyncio.run``'s, which raises ``KeyboardInterrupt`` in the main task), and otherwise is a
no-op with one ``ApimartWarning`` and one WARNING log line. Whatever the SDK installs is
removed, and the handler found before put back, however the batch ends."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import warnings
from collections.abc import Coroutine
from typing import Any, Literal

import anyio
import pytest

import apimart_async as am
from apimart_async.emulator import Emulator

from .test_sync import _threaded, sync_client

FAST = am.PollPolicy(first_check=0.001, min_interval=0.001, max_interval=0.005, jitter=0.0)
End = Literal["normal", "exception", "cancelled"]


def _run_on_fresh_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on a new loop without ``asyncio.run`` (which installs a SIGINT handler of
    its own): the handler in force is the process's one."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class Boom(Exception):
    pass


async def _batch(end: End, seen: list[object], *, grace: float | None = 5.0) -> int:
    """Run a two-job batch with ``sigint_grace=grace``; record the SIGINT handler while it
    runs; end it the way ``end`` says. Returns the outcomes read."""
    read = 0
    async with Emulator(task_duration=0.0) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST) as client:
            jobs = [am.VideoRequest("sora-2-preview", f"p{i}") for i in range(2)]
            with anyio.CancelScope() as scope:
                try:
                    async with client.batch(jobs, sigint_grace=grace) as results:
                        seen.append(signal.getsignal(signal.SIGINT))
                        async for _ in results:
                            read += 1
                            if end == "exception":
                                raise Boom
                            if end == "cancelled":
                                scope.cancel()
                                await anyio.sleep_forever()
                except Boom:
                    pass
            assert scope.cancelled_caught == (end == "cancelled")
    return read


@pytest.mark.parametrize("end", ["normal", "exception", "cancelled"])
def test_default_handler_is_replaced_while_the_batch_runs_and_put_back(end: End) -> None:
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    seen: list[object] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", am.ApimartWarning)  # no warning: it is honoured
        read = _run_on_fresh_loop(_batch(end, seen))
    assert read == (2 if end == "normal" else 1)
    assert len(seen) == 1 and seen[0] is not signal.default_int_handler  # the SDK's
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("end", ["normal", "exception", "cancelled"])
def test_an_application_handler_is_left_alone_with_one_warning(
    end: End, caplog: pytest.LogCaptureFixture
) -> None:
    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGINT, mine)
    try:
        seen: list[object] = []
        with pytest.warns(am.ApimartWarning, match="sigint_grace") as record:
            with caplog.at_level(logging.WARNING, logger="apimart_async"):
                _run_on_fresh_loop(_batch(end, seen))
        ours = [w for w in record if issubclass(w.category, am.ApimartWarning)]
        assert len(ours) == 1
        assert ours[0].filename == __file__  # the caller's `async with client.batch(...)`
        assert seen == [mine]  # no SDK handler at all
        assert signal.getsignal(signal.SIGINT) is mine
        lines = [r for r in caplog.records if "sigint_grace" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        assert "own SIGINT handler" in lines[0].getMessage()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_off_the_main_thread_it_is_a_no_op_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[object] = []
    caught: list[warnings.WarningMessage] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                _run_on_fresh_loop(_batch("normal", seen))
            caught.extend(record)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="apimart_async"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert errors == []
    assert seen == [signal.default_int_handler]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ours = [w for w in caught if issubclass(w.category, am.ApimartWarning)]
    assert len(ours) == 1 and "main thread" in str(ours[0].message)
    assert ours[0].filename == __file__  # the caller's line, not the SDK's
    assert len([r for r in caplog.records if "sigint_grace" in r.getMessage()]) == 1


def test_under_asyncio_run_its_handler_counts_as_the_default_and_is_put_back() -> None:
    """``asyncio.run`` installs a handler that raises KeyboardInterrupt in the main task
    (Python's default, for asyncio programs): ``sigint_grace`` is honoured there, and that
    handler comes back after the batch."""
    seen: list[object] = []
    during_run: list[object] = []

    async def main() -> None:
        during_run.append(signal.getsignal(signal.SIGINT))
        await _batch("normal", seen)
        during_run.append(signal.getsignal(signal.SIGINT))

    with warnings.catch_warnings():
        warnings.simplefilter("error", am.ApimartWarning)
        asyncio.run(main())
    runner_handler, after = during_run
    assert runner_handler is not signal.default_int_handler  # asyncio.run's own
    assert after is runner_handler
    assert seen[0] is not runner_handler  # the SDK's, while the batch ran
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_reaches_the_batch_and_the_handler_is_put_back() -> None:
    """A real SIGINT during the batch is handled (first: stop submitting), not raised."""

    async def main() -> tuple[int, int]:
        async with Emulator(mode="manual", frozen_clock=True) as emu:
            async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST) as client:
                jobs = [am.VideoRequest("sora-2-preview", f"p{i}") for i in range(4)]
                async with client.batch(jobs, max_pending=1, sigint_grace=0.0) as results:
                    await emu.wait_until(lambda: emu.tasks_created >= 1)
                    signal.raise_signal(signal.SIGINT)
                    async for _ in results:
                        pass
                return results.interrupted, emu.counters["submit"]

    interrupted, submits = _run_on_fresh_loop(main())
    assert interrupted == 1
    assert submits == 1  # nothing submitted after Ctrl-C (no KeyboardInterrupt either)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_two_batches_side_by_side_both_get_ctrl_c_and_the_handler_is_put_back() -> None:
    """brk21c: a second batch with ``sigint_grace`` beside the first took the first's handler
    (the SDK's own) for the application's: it warned "the application has its own SIGINT
    handler (_sighandler_noop)" and got no Ctrl-C. The batches of a program share the SDK's
    handler: each one gets every Ctrl-C, and the last to end puts the old handler back."""

    async def main() -> tuple[list[int], int]:
        async with Emulator(mode="manual", frozen_clock=True) as emu:
            async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST) as client:

                async def batch(tag: str) -> int:
                    jobs = [am.VideoRequest("sora-2-preview", f"{tag}{i}") for i in range(4)]
                    async with client.batch(jobs, max_pending=1, sigint_grace=0.0) as results:
                        await emu.wait_until(lambda: emu.tasks_created >= 2)
                        inside.append(results)
                        async for _ in results:
                            pass
                    return results.interrupted

                inside: list[am.Batch] = []  # the batches inside their ``async with``
                interrupted: list[int] = []

                async def run(tag: str) -> None:
                    interrupted.append(await batch(tag))

                # bounded: a batch that missed the Ctrl-C would follow its task for ever
                with anyio.fail_after(20):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(run, "a")
                        tg.start_soon(run, "b")
                        # both inside, each with its task submitted (not a sleep-and-hope)
                        while not (  # noqa: ASYNC110 - no event to wait on
                            len(inside) == 2 and all(r.stats().pending == 1 for r in inside)
                        ):
                            await anyio.sleep(0.001)
                        signal.raise_signal(signal.SIGINT)
                return interrupted, emu.counters["submit"]

    with warnings.catch_warnings():
        warnings.simplefilter("error", am.ApimartWarning)  # honoured for both: no warning
        interrupted, submits = _run_on_fresh_loop(main())
    assert interrupted == [1, 1]
    assert submits == 2  # one each (max_pending=1), nothing after Ctrl-C
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("custom", [False, True], ids=["default handler", "own handler"])
def test_sync_client_follows_the_same_rule(custom: bool, caplog: pytest.LogCaptureFixture) -> None:
    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGINT, mine) if custom else None
    before = signal.getsignal(signal.SIGINT)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with caplog.at_level(logging.WARNING, logger="apimart_async"):
                for temu in _threaded(task_duration=0.0):
                    with sync_client(temu) as client:
                        jobs = [am.VideoRequest("sora-2-preview", f"p{i}") for i in range(2)]
                        with client.batch(jobs, sigint_grace=5) as results:
                            during = signal.getsignal(signal.SIGINT)
                            assert len(list(results)) == 2
        ours = [w for w in record if issubclass(w.category, am.ApimartWarning)]
        logged = [r for r in caplog.records if "sigint_grace" in r.getMessage()]
        if custom:
            assert during is mine
            assert len(ours) == 1 and "own SIGINT handler" in str(ours[0].message)
            assert ours[0].filename == __file__  # the caller's `with client.batch(...)`
            assert len(logged) == 1
        else:
            assert during is not before
            assert ours == [] and logged == []
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

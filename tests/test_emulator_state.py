"""The emulator's state file (``Emulator(state_path=...)``, ``--state``) and its options,
defined once for ``python -m apimart_async.emulator`` and ``apimart-async emulator``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import anyio
import anyio.lowlevel
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import apimart_async as am
from apimart_async import cli
from apimart_async.emulator import Emulator
from apimart_async.emulator import __main__ as emulator_main

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def frozen(path: Path, **options: object) -> Emulator:
    return Emulator(
        frozen_clock=True, task_duration=10.0, estimate_error=0.0, state_path=path, **options
    )


def client_of(emu: Emulator) -> am.AsyncApimart:
    return am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL)


async def test_tasks_balance_keys_and_clock_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "emu.jsonl"
    request = am.VideoRequest("sora-2-preview", "a cat")
    async with frozen(path) as emu, client_of(emu) as client:
        running = await client.videos.submit(request, idempotency_key="key-1")
        done = await client.videos.submit(am.VideoRequest("sora-2-preview", "a dog"))
        emu.advance(4)
        emu.complete(done)
        before = (emu.clock.now(), emu.stats()["remain_balance"], emu.task(running))
        sha = emu.file_sha256(done)
    assert before[2]["status"] == "processing"
    assert before[2]["progress"] == 40

    async with frozen(path, seed=7, video_bytes=1000) as emu, client_of(emu) as client:
        # the same time, the same money, the same task at the same point of its life
        assert (emu.clock.now(), emu.stats()["remain_balance"], emu.task(running)) == before
        assert emu.tasks_created == 2
        # the same key and body give the original task back: nothing billed twice
        assert await client.videos.submit(request, idempotency_key="key-1") == running
        assert emu.tasks_created == 2
        assert emu.tasks_per_key["key-1"] == 1
        with pytest.raises(am.ConflictError):
            await client.videos.submit(
                am.VideoRequest("sora-2-preview", "x"), idempotency_key="key-1"
            )
        # result files are the same bytes (the file's seed and size win over the new ones)
        assert emu.file_sha256(done) == sha
        (file,) = await client.download(await client.tasks.get(done), tmp_path / "out")
        assert file.sha256 == sha
        # the task created before goes on with the clock and ends when its time comes
        emu.advance(6)
        task = await client.tasks.get(running)
        assert task.ok
        assert task.completed == task.created + 10
        # a new task does not collide with old ids, and the balance keeps falling
        third = await client.videos.submit(am.VideoRequest("sora-2-preview", "a bird"))
        assert third not in (running, done)
        assert emu.stats()["remain_balance"] == pytest.approx(before[1] - 0.4)


async def test_uploaded_images_survive_a_restart_until_they_expire(tmp_path: Path) -> None:
    path = tmp_path / "emu.jsonl"
    png = b"\x89PNG\r\n\x1a\n" + b"a bear" * 100

    async def fetch(emu: Emulator, name: str) -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{emu.base_url}/uploads/{name}") as reply:
                return reply.status, await reply.read()

    async with frozen(path) as emu, client_of(emu) as client:
        url = await client.uploads.image(png, filename="bear.png")
        name = url.rsplit("/", 1)[1]
        assert '"upload"' in path.read_text()  # written at once: a killed emulator keeps it
    async with frozen(path) as emu, client_of(emu) as client:
        assert await fetch(emu, name) == (200, png)
        request = am.VideoRequest("viduq3", "a bear", image_urls=[f"{emu.base_url}/uploads/{name}"])
        await client.videos.submit(request)  # the service can fetch the reference
        emu.advance(72 * 3600 + 1)
    async with frozen(path) as emu:
        assert await fetch(emu, name) == (404, b"Not Found")
        assert '"upload"' not in path.read_text()  # expired: no longer kept


async def test_a_running_clock_never_goes_back_and_due_tasks_end_after_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "emu.jsonl"
    async with Emulator(task_duration=600.0, state_path=path) as emu, client_of(emu) as client:
        task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
        emu.advance(3600)  # an hour of the service's time
        ended = emu.clock.now()
        assert emu.task(task_id)["status"] == "completed"
        other = emu.create_tasks(1)[0]
    async with Emulator(task_duration=600.0, state_path=path) as emu:
        assert emu.clock.now() >= ended  # not back to the machine's time
        assert emu.task(task_id)["status"] == "completed"
        assert emu.task(other)["status"] in ("submitted", "pending", "processing")
        emu.advance(600)  # ended while the emulator was down, at its due time
        assert emu.task(other)["status"] == "completed"


async def test_a_submit_is_on_disk_before_its_reply(tmp_path: Path) -> None:
    """As after a SIGKILL: a copy of the file taken right after the reply knows the task."""
    path = tmp_path / "emu.jsonl"
    async with frozen(path) as emu, client_of(emu) as client:
        task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
        emu.advance(10)
        await client.tasks.get(task_id)  # the status read finishes it
        shutil.copy(path, tmp_path / "killed.jsonl")
    async with frozen(tmp_path / "killed.jsonl") as emu:
        assert emu.task_ids() == [task_id]
        assert emu.task(task_id)["status"] == "completed"


async def test_the_file_is_rewritten_compactly_and_atomically(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "emu.jsonl"
    async with frozen(path, mode="manual") as emu:
        ids = emu.create_tasks(3)
        emu.set_running(ids[0], 50)
        emu.complete(ids[1])
        assert len(path.read_text().splitlines()) == 1 + 3 + 2  # header, creations, changes
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 3
    assert json.loads(lines[0])["apimart_emulator_state"] == 1
    assert [json.loads(line)["task"]["id"] for line in lines[1:]] == ids
    assert sorted(p.name for p in path.parent.iterdir()) == ["emu.jsonl"]  # no temp file left


async def test_a_cut_last_line_is_ignored_and_garbage_is_named(tmp_path: Path) -> None:
    path = tmp_path / "emu.jsonl"
    async with frozen(path, mode="manual") as emu:
        ids = emu.create_tasks(2)
    text = path.read_text()
    path.write_text(text + '{"task": {"id": "task_cu')  # the process died mid-line
    async with frozen(path) as emu:
        assert emu.task_ids() == ids
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"emu\.jsonl, line 2: not JSON"):
        await frozen(path).start()
    path.write_text('{"jobs": 1}\n')
    with pytest.raises(ValueError, match="not an emulator state file"):
        await frozen(path).start()


async def test_an_interrupted_batch_resumes_against_the_same_tasks(tmp_path: Path) -> None:
    """The --emulate story: journal + state file; leave the batch half way, restart both."""
    state, journal = tmp_path / "emu.jsonl", tmp_path / "journal.sqlite"
    jobs = [am.VideoRequest("sora-2-preview", f"prompt {i}") for i in range(6)]
    async with Emulator(mode="manual", state_path=state) as emu, client_of(emu) as client:
        async with client.batch(jobs, concurrency=3, max_pending=3, journal=journal) as results:
            await emu.wait_until(lambda: emu.tasks_created == 3)
            emu.complete(emu.task_ids()[0])
            await emu.wait_until(lambda: emu.tasks_created == 4)  # its place taken
            async for _ in results:
                break  # Ctrl-C, as far as the journal and the service are concerned
        first_run = emu.task_ids()
    assert len(first_run) == 4

    async with Emulator(mode="auto", task_duration=0.0, state_path=state) as emu:
        async with client_of(emu) as client:
            async with client.batch(jobs, concurrency=3, journal=journal) as results:
                outcomes = [o async for o in results]
        assert sorted(o.index for o in outcomes) == list(range(6))
        assert all(o.ok for o in outcomes)
        assert sum(o.replayed for o in outcomes) == 1
        # the three earlier tasks still running were re-attached, not submitted again
        assert emu.counters["submit"] == 2
        assert emu.tasks_created == 6
        assert emu.task_ids()[:4] == first_run
        assert max(emu.tasks_per_key.values()) == 1


async def test_stop_right_after_a_change_ends_at_once() -> None:
    """Regression: asyncio.wait_for swallowed stop()'s cancel of the ticker when the wake
    event was set at the same moment, and stop() never returned."""
    emu = Emulator(frozen_clock=True)
    await emu.start()
    for _ in range(5):  # let the ticker reach its wait
        await anyio.lowlevel.checkpoint()
    emu.advance(1)
    with anyio.fail_after(30):  # a bound for a hang, not a timing assertion
        await emu.stop()


# -- the options: one parser ------------------------------------------------------------------


def _options(parser: object) -> dict[str, tuple[object, str | None]]:
    actions = parser._actions  # type: ignore[attr-defined]
    return {
        a.option_strings[-1]: (a.default, a.help)
        for a in actions
        if a.option_strings and a.dest != "help"
    }


def test_both_commands_take_the_same_options() -> None:
    standalone = _options(emulator_main.build_parser())
    sub = cli.build_parser()._subparsers._group_actions[0].choices["emulator"]  # type: ignore[union-attr]
    assert _options(sub) == standalone
    assert {
        "--batch-route",
        "--unknown-task",
        "--conflict-code-in",
        "--status-name",
        "--network",
        "--tls",
        "--mode",
        "--duration",
        "--failure-rate",
        "--fault-rate",
        "--balance",
        "--state",
        "--no-batch-route",
        "--video-bytes",
        "--seed",
        "--port",
        "--host",
        "--api-key",
        "--profile",
        "--model-duration",
        "--estimate-error",
        "--rtt",
        "--time-scale",
        "--webhook-loss",
        "--webhook-duplicates",
        "--webhook-delay",
    } == set(standalone)
    assert all(help_text for _, help_text in standalone.values())


async def test_apimart_async_emulator_with_options_and_state(tmp_path: Path) -> None:
    state = tmp_path / "emu.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "apimart_async.cli",
        "emulator",
        "--port",
        "0",
        "--mode",
        "manual",
        "--balance",
        "5",
        "--state",
        str(state),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with await anyio.open_process(cmd, env=env) as proc:
        assert proc.stdout is not None
        try:
            with anyio.fail_after(30):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 4096)
            info = json.loads(line)
            async with am.AsyncApimart(info["api_key"], base_url=info["base_url"]) as client:
                assert (await client.balance()).remain_balance == 5.0
                task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "x"))
                assert (await client.tasks.get(task_id)).status == "submitted"  # manual mode
        finally:
            proc.send_signal(signal.SIGINT)
            await proc.wait()
    assert proc.returncode == 0
    lines = state.read_text().splitlines()
    assert json.loads(lines[0])["balance"] == [4.6, 0.4]
    assert json.loads(lines[1])["task"]["id"] == task_id


def test_a_bad_state_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("hello\n")
    proc = subprocess.run(
        [sys.executable, "-m", "apimart_async.emulator", "--port", "0", "--state", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: emulator state file {bad}, line 1: not JSON\n"


def test_the_emulator_imports_nothing_of_the_sdk() -> None:
    import ast

    for path in (ROOT / "apimart_async" / "emulator").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}: from {'.' * node.level}{node.module}"
                assert node.level == 1 or not (node.module or "").startswith("apimart_async"), (
                    f"{path.name}: from {node.module}"
                )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("apimart_async"), f"{path.name}: {alias.name}"


async def test_a_restart_listens_on_the_same_port_when_it_is_free(tmp_path: Path) -> None:
    """Result URLs name the port: a download cut by a restart goes on from the same URL."""
    import socket

    path = tmp_path / "emu.jsonl"
    async with frozen(path) as emu, client_of(emu) as client:
        task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
        emu.advance(10)
        url = (await client.tasks.get(task_id)).video_urls[0]
        first = emu.base_url
    async with frozen(path) as emu, client_of(emu) as client:
        assert emu.base_url == first
        (file,) = await client.download(url, tmp_path / "a.mp4")
        assert file.sha256 == emu.file_sha256(task_id)
    with socket.socket() as taken:  # someone else has the port now: another one is fine
        taken.bind(("127.0.0.1", emu.port))
        taken.listen()
        async with frozen(path) as emu, client_of(emu) as client:
            assert emu.base_url != first
            assert (await client.tasks.get(task_id)).ok

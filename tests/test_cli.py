"""The CLI as a user runs it: a subprocess against the emulator."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import anyio
import pytest

import apimart_async as am
from apimart_async.cli import Progress
from apimart_async.emulator import Emulator

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "examples" / "jobs.jsonl"


async def cli(*args: str, key: str | None = None, check: int | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("APIMART_API_KEY", None)
    if key is not None:
        env["APIMART_API_KEY"] = key
    result = await anyio.run_process(
        [sys.executable, "-m", "apimart_async.cli", *args], env=env, check=False
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    if check is not None:
        assert result.returncode == check, err
    return result.returncode, out, err


def no_control_chars(text: str) -> bool:
    return all(c in "\n\t" or c >= " " for c in text)


async def test_run_emulated_batch_to_disk(tmp_path: Path) -> None:
    out = tmp_path / "videos"
    _code, stdout, stderr = await cli("run", str(JOBS), "--emulate", "--out", str(out), check=0)
    names = sorted(p.name for p in out.glob("*.mp4"))
    assert names == ["apple.mp4", "bear-hug.mp4", "lighthouse.mp4", "neon-cat.mp4", "waterfall.mp4"]
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3, 4]
    assert all(line["status"] == "completed" for line in lines)
    # off a terminal: plain lines, one per event, no control characters
    assert no_control_chars(stderr)
    assert stderr.count("submitted job ") == 5 and stderr.count("completed ") == 5
    assert "completed    5" in stdout.replace("completed   5", "completed    5")
    assert f"manifest    {out / 'manifest.jsonl'}" in stdout


async def test_bad_lines_are_listed_and_nothing_is_submitted(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(
        b'{"model": "sora-2-preview", "prompt": "ok"}\n'
        b'{"model": "viduq3", "prompt": "x", "image_urls": ["https://e/a.png"], "duration": 2}\n'
        b"# a comment\n"
        b'{"model": "sora-2-preview"\n'
        b'{"model": "sora-2-preview", "prompt": "\xff\xfe"}\n'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"\n"
        + b'{"model": "sora-2-preview", "prompt": "'
        + b"x" * (2 << 20)
        + b'"}\n'
        b'["not", "an", "object"]\n'
    )
    async with Emulator() as emu:
        code, _stdout, stderr = await cli(
            "run",
            str(jobs),
            "--out",
            str(tmp_path / "o"),
            "--base-url",
            emu.base_url,
            key=emu.api_key,
        )
        assert emu.counters == {}
    assert code == 2
    assert "problem(s) in" in stderr and "nothing was submitted" in stderr
    assert f"{jobs}:2: duration: viduq3 takes 3 to 16 seconds, got 2" in stderr
    assert f"{jobs}:4: not JSON:" in stderr
    assert f"{jobs}:5: not valid UTF-8" in stderr
    assert f"{jobs}:6: " in stderr and "Traceback" not in stderr
    assert f"{jobs}:7: line longer than 1024 KB" in stderr
    assert f"{jobs}:8: a job must be a JSON object, got list" in stderr
    assert f"{jobs}:1:" not in stderr


async def test_csv_jobs_and_dry_run(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        "name,model,prompt,image_urls,duration,generate_audio\n"
        "a,viduq3,they hug,https://e/a.png|https://e/b.png,5,\n"
        "b,veo3.1,a cat,,8,true\n"
    )
    code, stdout, _ = await cli(
        "run", str(jobs), "--out", str(tmp_path / "o"), "--dry-run", check=0
    )
    assert "2 job(s) valid; nothing submitted (--dry-run)" in stdout
    jobs.write_text("model,prompt,duration\nsora-2-preview,x,5\n")
    code, _, stderr = await cli("run", str(jobs), "--out", str(tmp_path / "o"), "--dry-run")
    assert (
        code == 2
        and f"{jobs}:2: duration: sora-2-preview takes only 4, 8 or 12 seconds, got 5" in stderr
    )


async def test_sigint_then_resume_without_duplicates(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(
            json.dumps({"name": f"j{i}", "model": "sora-2-preview", "prompt": f"p {i}"}) + "\n"
            for i in range(60)
        )
    )
    out = tmp_path / "out"
    async with Emulator(task_duration=(0.5, 1.5), seed=2) as emu:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "APIMART_API_KEY": emu.api_key}
        cmd = [
            sys.executable,
            "-m",
            "apimart_async.cli",
            "run",
            str(jobs),
            "--out",
            str(out),
            "--base-url",
            emu.base_url,
            "--concurrency",
            "2",
            "--grace",
            "0.5",
        ]
        async with await anyio.open_process(cmd, env=env) as proc:
            await emu.wait_until(lambda: emu.tasks_created >= 10, timeout=60)
            proc.send_signal(signal.SIGINT)
            with anyio.fail_after(60):
                await proc.wait()
            assert proc.stderr is not None
            stderr = (await proc.stderr.receive(1 << 20)).decode() if proc.returncode else ""
        assert proc.returncode == 130
        assert "interrupted; resume with:" in stderr and "apimart-async run" in stderr
        assert emu.tasks_created < 60
        code, stdout, stderr2 = await cli(
            "run", str(jobs), "--out", str(out), "--base-url", emu.base_url, key=emu.api_key
        )
        assert code == 0, stderr2
        assert emu.tasks_created == 60
        assert set(emu.tasks_per_key.values()) == {1}
        assert len(list(out.glob("*.mp4"))) == 60
        for text in (stderr, stderr2, stdout):
            assert emu.api_key not in text


async def test_single_task_commands(tmp_path: Path) -> None:
    async with Emulator(task_duration=0.0) as emu:
        base = ["--base-url", emu.base_url]
        code, stdout, _ = await cli(
            "submit",
            *base,
            "--model",
            "sora-2-preview",
            "--prompt",
            "a cat",
            "--duration",
            "8",
            key=emu.api_key,
            check=0,
        )
        task_id = stdout.strip()
        assert task_id in emu.task_ids()
        _, stdout, _ = await cli(
            "submit",
            *base,
            "--request",
            '{"model": "sora-2-preview", "prompt": "x"}',
            "--json",
            key=emu.api_key,
            check=0,
        )
        assert json.loads(stdout)["task_id"] in emu.task_ids()
        _, stdout, _ = await cli("status", *base, task_id, "--json", key=emu.api_key, check=0)
        (status,) = json.loads(stdout)
        assert status["id"] == task_id and status["status"] == "completed"
        code, _, stderr = await cli("status", *base, task_id, "task_gone", key=emu.api_key)
        assert code == 1 and "task task_gone does not exist" in stderr
        _, stdout, _ = await cli(
            "wait",
            *base,
            task_id,
            "--download",
            str(tmp_path / "w"),
            "--json",
            key=emu.api_key,
            check=0,
        )
        assert json.loads(stdout)[0]["files"] == [str(tmp_path / "w" / f"{task_id}.mp4")]
        _, stdout, _ = await cli(
            "download", *base, task_id, "--out", str(tmp_path / "d"), key=emu.api_key, check=0
        )
        assert f"sha256 {emu.file_sha256(task_id)}" in stdout
        _, stdout, _ = await cli("balance", *base, "--json", key=emu.api_key, check=0)
        assert json.loads(stdout)["used_balance"] == pytest.approx(1.2)
        img = tmp_path / "i.png"
        img.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
        _, stdout, _ = await cli("upload", *base, str(img), key=emu.api_key, check=0)
        assert stdout.startswith(f"{emu.base_url}/uploads/")


async def test_usage_errors_and_the_key_never_printed() -> None:
    code, _, stderr = await cli("run")
    assert code == 2
    code, _, stderr = await cli("balance", "--base-url", "http://127.0.0.1:9")
    assert code == 2 and "no API key" in stderr
    code, _, stderr = await cli(
        "balance", "--base-url", "http://example.com", "--api-key", "sk-secret-cli"
    )
    assert code == 2 and "refusing plain http" in stderr and "sk-secret-cli" not in stderr
    code, _, stderr = await cli(
        "submit", "--model", "sora-2-preview", "--duration", "5", "--api-key", "sk-secret-cli"
    )
    assert code == 2 and "duration: sora-2-preview takes only 4, 8 or 12 seconds, got 5" in stderr
    async with Emulator() as emu:
        code, _, stderr = await cli(
            "balance", "--base-url", emu.base_url, "--api-key", "sk-wrong-key"
        )
    assert code == 1 and "AuthenticationError" in stderr and "sk-wrong-key" not in stderr


async def test_models_lists_the_rules() -> None:
    _, stdout, _ = await cli("models", check=0)
    assert "viduq3: reference images to video, 3-16 s" in stdout
    assert "duration 3 to 16 s" in stdout and "duration 4/8/12 s" in stdout


def test_progress_bar_on_a_terminal_and_plain_lines_elsewhere() -> None:
    tty, plain = io.StringIO(), io.StringIO()
    for stream, is_tty in ((tty, True), (plain, False)):
        p = Progress(2, stream, tty=is_tty)
        p.event(am.BatchEvent("submitted", 0, "task_a"))
        task = am.Task(id="task_a", status=am.TaskStatus.COMPLETED, cost=0.5)
        p.outcome(am.Outcome(0, None, "task_a", task))
        p.close()
    assert (
        "\r\x1b[2K[############------------] 1/2 submitted 1 running 0 done 1 failed 0 $0.50"
        in tty.getvalue()
    )
    assert plain.getvalue() == "submitted job 0 as task_a\ncompleted job 0 task_a\n"


async def test_emulator_command() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "apimart_async.cli",
        "emulator",
        "--port",
        "0",
        "--api-key",
        "sk-cli-emu",
    ]
    async with await anyio.open_process(cmd, env=env) as proc:
        assert proc.stdout is not None
        try:
            from anyio.streams.buffered import BufferedByteReceiveStream

            with anyio.fail_after(30):
                info = json.loads(
                    await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 4096)
                )
            code, stdout, _ = await cli("balance", "--base-url", info["base_url"], key="sk-cli-emu")
            assert code == 0 and "left" in stdout
        finally:
            proc.terminate()
            await proc.wait()

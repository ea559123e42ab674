"""The CLI as a user runs it: a subprocess against the emulator."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest

import apimart_async as am
from apimart_async.cli import Progress, build_parser
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


async def read_rest(stream: anyio.abc.ByteReceiveStream) -> bytes:
    """Everything a stream still gives until it ends."""
    chunks = []
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            chunks.append(await stream.receive())
    return b"".join(chunks)


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
    assert stderr.count("submitted ") == 5 and stderr.count("completed ") == 5
    # one naming for every step of a job: its name (or its line number)
    assert "submitted neon-cat as task_" in stderr and "completed neon-cat task_" in stderr
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
        assert json.loads(stdout)["id"] in emu.task_ids()  # the key status --json uses
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
        p = Progress(3, stream, tty=is_tty)
        p.event(am.BatchEvent("submitted", 0, "task_a"))
        task = am.Task(id="task_a", status=am.TaskStatus.COMPLETED, cost=0.5)
        p.outcome(am.Outcome(0, None, "task_a", task))
        p.outcome(am.Outcome(1, None, error=am.BadRequestError("bad prompt", status=400)))
        p.outcome(am.Outcome(2, None, error=am.BudgetExceededError("budget reached")))
        p.close()
    shown = tty.getvalue()
    assert "] 3/3 running 0 completed 1 failed 0 errored 1 $0.50" in shown
    # a per-job error is printed above the live bar, not hidden in the manifest
    assert (
        "\r\x1b[2K\x1b[31merrored job 1: BadRequestError: bad prompt (HTTP 400)\x1b[0m\n[" in shown
    )
    assert "submitted job 0" not in shown  # steps only with -v on a terminal
    assert plain.getvalue() == (
        "submitted job 0 as task_a\n"
        "completed job 0 task_a\n"
        "errored job 1: BadRequestError: bad prompt (HTTP 400)\n"
        "not started job 2: budget reached\n"
    )


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


# -- issue 12 -------------------------------------------------------------------------------

SECRET = "sk-live-CliSecretKey0123456789abcdef"


async def _interrupted_run(
    tmp_path: Path, emu: Emulator, *key_args: str, stdin: bytes = b"", env_key: str | None = None
) -> str:
    """Start a run, Ctrl-C it once the first tasks exist, return its stdout + stderr."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(
            json.dumps({"name": f"j{i}", "model": "sora-2-preview", "prompt": f"p {i}"}) + "\n"
            for i in range(6)
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("APIMART_API_KEY", None)
    if env_key is not None:
        env["APIMART_API_KEY"] = env_key
    cmd = [sys.executable, "-m", "apimart_async.cli", "run", str(jobs), "-o", str(tmp_path / "o")]
    cmd += ["--base-url", emu.base_url, "--grace", "0", "--concurrency", "2", *key_args]
    before = emu.tasks_created
    async with await anyio.open_process(cmd, env=env) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        await proc.stdin.send(stdin)
        await proc.stdin.aclose()
        await emu.wait_until(lambda: emu.tasks_created >= before + 2, timeout=60)
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(60):
            await proc.wait()
        out = (await proc.stdout.receive(1 << 20)).decode()
        err = (await proc.stderr.receive(1 << 20)).decode()
    assert proc.returncode == 130, err
    return out + err


@pytest.mark.parametrize(
    "form", [("--api-key", SECRET), (f"--api-key={SECRET}",), ("--api-key", "-"), ("file",)]
)
async def test_the_resume_line_never_contains_the_key(
    tmp_path: Path, form: tuple[str, ...]
) -> None:
    stdin = b""
    if form == ("--api-key", "-"):
        stdin = SECRET.encode() + b"\n"
    if form == ("file",):
        keyfile = tmp_path / "key.txt"
        keyfile.write_text(SECRET + "\n")
        form = ("--api-key-file", str(keyfile))
    async with Emulator(api_key=SECRET, mode="manual") as emu:
        text = await _interrupted_run(tmp_path, emu, *form, stdin=stdin)
    assert "resume with:" in text
    resume = text.split("resume with:")[1]
    assert "apimart-async run" in resume
    assert SECRET not in text and SECRET[:12] not in text
    if form[0] == "--api-key-file":  # the file's path is no secret: the line keeps it
        assert f"--api-key-file {form[1]}" in resume
    else:
        assert "APIMART_API_KEY" in resume and "--api-key" not in resume
    assert "interrupted: " in text.split("resume with:")[0]  # what happens next, at once


async def test_a_key_given_to_api_key_file_is_not_printed_back(tmp_path: Path) -> None:
    """``--api-key-file sk-...`` (the key given where its file's path goes): the error says
    what is wrong without repeating the value; a path that exists is still named."""
    code, out, err = await cli(
        "balance", "--base-url", "http://127.0.0.1:9", "--api-key-file", SECRET
    )
    assert code == 2
    assert SECRET not in out + err
    assert "--api-key-file: cannot read it: no such file" in err
    code, _, err = await cli(
        "balance", "--base-url", "http://127.0.0.1:9", "--api-key-file", str(tmp_path)
    )
    assert code == 2 and f"--api-key-file: cannot read {tmp_path}" in err


async def test_api_key_from_stdin_and_file(tmp_path: Path) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_text(SECRET + "\n")
    async with Emulator(api_key=SECRET) as emu:
        code, out, err = await cli(
            "balance", "--base-url", emu.base_url, "--api-key-file", str(keyfile)
        )
        assert code == 0 and "left" in out, err
        code, _, err = await cli(
            "balance", "--base-url", emu.base_url, "--api-key-file", str(tmp_path / "nope")
        )
        assert code == 2 and "--api-key-file" in err and "cannot read" in err
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("APIMART_API_KEY", None)
        result = await anyio.run_process(
            [
                sys.executable,
                "-m",
                "apimart_async.cli",
                "balance",
                "--base-url",
                emu.base_url,
                "--api-key",
                "-",
            ],
            input=SECRET.encode() + b"\n",
            env=env,
            check=False,
        )
        assert result.returncode == 0 and b"left" in result.stdout
        assert SECRET.encode() not in result.stdout + result.stderr


async def test_wait_reports_missing_tasks_and_waits_for_the_others() -> None:
    async with (
        Emulator(task_duration=0.5) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client,
    ):
        task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "x"))
        base = ["--base-url", emu.base_url]
        # Absence is confirmed after PollPolicy.not_found_grace (10 s): the three commands run
        # side by side, so the test waits that out once.
        runs: dict[str, tuple[int, str, str]] = {}

        async def run(name: str, *args: str) -> None:
            runs[name] = await cli("wait", *base, *args, key=emu.api_key)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "both", task_id, "task_nope")
            tg.start_soon(run, "missing", "task_nope")
            tg.start_soon(run, "json", "task_nope", "--json")
        code, out, err = runs["both"]
        assert code == 1
        assert f"{task_id}  completed" in out
        assert "task task_nope does not exist or has expired" in err
        assert task_id not in err
        code, out, err = runs["missing"]
        assert code == 1 and out == ""
        assert "task task_nope does not exist or has expired" in err
        code, out, err = runs["json"]
        assert code == 1
        (entry,) = json.loads(out)
        assert entry["id"] == "task_nope" and entry["status"] == "not_found"


async def test_jobs_file_typos_are_caught_before_anything_is_sent(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        '{"model": "sora-2-preview", "prompt": "x", "duraton": 8, "aspectratio": "portrait"}\n'
        '{"model": "sora2-preview", "prompt": "x"}\n'
        '{"model": "sora-2-preview", "prompt": "x", "extra": {"new_field": 1}}\n'
        '{"model": "veo3.1", "prompt": "x", "generate_audio": true}\n'
    )
    code, _, err = await cli("run", str(jobs), "--dry-run")
    assert code == 2
    assert f"{jobs}:1: duraton: sora-2-preview takes no such field (did you mean 'duration'?" in err
    assert f"{jobs}:1: aspectratio: sora-2-preview takes no such field (did you mean" in err
    assert f"{jobs}:2: model: unknown model 'sora2-preview'; did you mean 'sora-2-preview'?" in err
    assert f"{jobs}:3" not in err and f"{jobs}:4" not in err  # extra, and a model we don't know
    jobs.write_text('{"model": "sora2-preview", "prompt": "x"}\n')
    code, out, err = await cli("run", str(jobs), "--dry-run", "--allow-unknown-model", check=0)
    assert "1 job(s) valid" in out
    code, _, err = await cli("run", str(tmp_path / "nope.jsonl"), "--dry-run")
    assert code == 2 and f"{tmp_path / 'nope.jsonl'}: cannot read" in err and ":0:" not in err


async def test_jobs_whose_videos_would_share_a_file_are_caught_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    """Two names that give one file (the same name, another case, a/b and a_b, a name that is
    another line's default 000001): the dry run says so, by line, and a run sends nothing."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        '{"model": "sora-2-preview", "prompt": "x", "name": "cat"}\n'
        '{"model": "sora-2-preview", "prompt": "y"}\n'
        '{"model": "sora-2-preview", "prompt": "z", "name": "Cat"}\n'
        '{"model": "sora-2-preview", "prompt": "w", "name": "a/b"}\n'
        '{"model": "sora-2-preview", "prompt": "v", "name": "a_b"}\n'
        '{"model": "sora-2-preview", "prompt": "u", "name": "000001"}\n'
    )
    code, _, err = await cli("run", str(jobs), "--dry-run")
    assert code == 2
    assert f"{jobs}:3: name: gives the same file as line 1 (cat.mp4); names must differ" in err
    assert f"{jobs}:5: name: gives the same file as line 4 (a_b.mp4); names must differ" in err
    assert f"{jobs}:6: name: gives the same file as line 2 (000001.mp4); names must differ" in err
    assert "3 problem(s)" in err
    async with Emulator() as emu:
        code, _, err = await cli(
            "run",
            str(jobs),
            "-o",
            str(tmp_path / "o"),
            "--base-url",
            emu.base_url,
            key=emu.api_key,
        )
        assert code == 2 and "nothing was submitted" in err
        assert emu.counters.get("submit", 0) == 0


async def test_bad_numbers_in_run_flags_name_the_flag_before_anything_runs(
    tmp_path: Path,
) -> None:
    for flag, value, rule in [
        ("--concurrency", "0", "must be a whole number >= 1"),
        ("--max-pending", "0", "must be a whole number >= 1"),
        ("--max-cost", "-1", "must be a number >= 0"),
        ("--max-cost", "nan", "must be a number >= 0"),
        ("--grace", "-5", "must be a number >= 0"),
    ]:
        code, _, err = await cli("run", str(JOBS), "--dry-run", flag, value)
        assert code == 2, (flag, value)
        assert f"argument {flag}: {rule}, got {value!r}" in err, err
    assert not (tmp_path / "o").exists()


async def test_submit_checks_keys_and_model_names_like_a_jobs_file() -> None:
    """``submit`` refuses what ``run`` refuses, before sending: a misspelled key in --request,
    a model name one typo from a known one (unless --allow-unknown-model), and field flags
    beside --request (which gives the whole request, so they would be ignored)."""
    async with Emulator() as emu:
        conn = ("--base-url", emu.base_url)
        code, _, err = await cli(
            "submit",
            *conn,
            "--request",
            '{"model": "sora-2-preview", "prompt": "x", "duraton": 8}',
            key=emu.api_key,
        )
        assert code == 2
        assert "duraton: sora-2-preview takes no such field (did you mean 'duration'?" in err
        code, _, err = await cli(
            "submit", *conn, "--model", "sora2-preview", "--prompt", "x", key=emu.api_key
        )
        assert code == 2
        assert "model: unknown model 'sora2-preview'; did you mean 'sora-2-preview'?" in err
        code, _, err = await cli(
            "submit",
            *conn,
            "--request",
            '{"model": "sora-2-preview", "prompt": "x"}',
            "--model",
            "viduq3",
            key=emu.api_key,
        )
        assert code == 2
        assert "--request gives the whole request; drop --model or put it in the JSON" in err
        assert emu.counters.get("submit", 0) == 0
        code, _, err = await cli(
            "submit",
            *conn,
            "--model",
            "sora2-preview",
            "--prompt",
            "x",
            "--allow-unknown-model",
            key=emu.api_key,
        )
        assert code == 1 and "does not exist" in err  # sent as written; the service says no
        assert emu.counters["submit"] == 1


async def test_dry_run_prints_the_estimated_cost_without_out(tmp_path: Path) -> None:
    _code, out, _ = await cli("run", str(JOBS), "--dry-run", check=0)
    assert "5 job(s) valid; nothing submitted (--dry-run)" in out
    assert "estimated cost: unknown (no price seen yet for" in out
    # after a run, the journal knows the prices: the estimate covers what is left to do
    async with Emulator(task_duration=0.0) as emu:
        o = tmp_path / "o"
        await cli("run", str(JOBS), "-o", str(o), "--base-url", emu.base_url, key=emu.api_key)
        _, out, _ = await cli("run", str(JOBS), "-o", str(o), "--dry-run", check=0)
        assert "5 already submitted or finished (journal); 0 to submit" in out
        assert "estimated cost: $0.00" in out
        _, out, _ = await cli("run", str(JOBS), "-o", str(o), "--dry-run", "--json", check=0)
        assert json.loads(out)["estimated_cost"] == 0


async def test_out_pointing_at_a_file_is_a_clean_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = await cli("run", str(JOBS), "--emulate", "-o", str(f))
    assert code == 2 and f"--out: {f} is a file, not a directory" in err
    assert "Traceback" not in err
    code, _, err = await cli("download", "task_x", "--emulate", "-o", str(f))
    assert code == 2 and "is a file, not a directory" in err and "Traceback" not in err


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return dict(parser._subparsers_by_name)  # type: ignore[attr-defined]


def test_every_network_command_takes_emulate_base_url_and_the_output_flags() -> None:
    for name, sub in _subparsers().items():
        flags = {s for a in sub._actions for s in a.option_strings}
        if name == "emulator":
            continue
        assert {"--json", "-q", "-v", "--no-progress", "--color"} <= flags, name
        if name not in ("models", "report", "manifest"):  # these read only local data
            assert {"--emulate", "--base-url", "--api-key", "--api-key-file"} <= flags, name


def test_every_flag_has_help_and_shows_its_default() -> None:
    for name, sub in _subparsers().items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, (name, action.option_strings)
            if action.default not in (None, False) and action.dest != "help":
                assert f"(default: {action.default})" in " ".join(text.split()), (
                    name,
                    action.option_strings,
                )
    run_help = _subparsers()["run"].format_help()
    assert '"extra"' in run_help or "extra: {...}" in run_help  # the jobs schema
    assert "separated" in run_help and "by |" in run_help


def test_the_no_key_hint_names_only_flags_that_exist() -> None:
    import re

    from apimart_async.cli import KEY_HELP

    named = set(re.findall(r"--[a-z-]+", KEY_HELP))
    assert named
    for name in ("balance", "status", "submit", "run", "wait", "download", "upload"):
        flags = {s for a in _subparsers()[name]._actions for s in a.option_strings}
        assert named <= flags, (name, named - flags)


async def test_usage_errors_show_the_subcommands_usage() -> None:
    code, _, err = await cli("run", str(JOBS), "--bogus")
    assert code == 2 and err.startswith("usage: apimart-async run") and "--bogus" in err
    code, _, err = await cli("wait")
    assert code == 2 and err.startswith("usage: apimart-async wait")


async def test_emulate_works_for_single_task_commands(tmp_path: Path) -> None:
    code, out, _ = await cli("balance", "--emulate", "--json", check=0)
    assert json.loads(out)["remain_balance"] > 0
    _, out, _ = await cli(
        "submit", "--emulate", "--model", "sora-2-preview", "--prompt", "x", "--json", check=0
    )
    assert json.loads(out)["id"].startswith("task_")
    code, _, err = await cli("balance", "--emulate", "--base-url", "http://127.0.0.1:9")
    assert code == 2 and "--emulate and --base-url" in err


async def test_json_everywhere(tmp_path: Path) -> None:
    _, out, _ = await cli("models", "--json", check=0)
    models = [json.loads(line) for line in out.splitlines()]
    assert {m["name"] for m in models} >= {"viduq3", "sora-2-preview"}
    _, out, _err = await cli(
        "run", str(JOBS), "--emulate", "-o", str(tmp_path / "o"), "--json", check=0
    )
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events].count("submitted") == 5
    assert [e["event"] for e in events].count("completed") == 5
    assert events[-1]["event"] == "summary" and events[-1]["completed"] == 5
    assert events[-1]["resume"] is None
    async with Emulator(task_duration=0.0) as emu:
        base = ["--base-url", emu.base_url]
        _, out, _ = await cli(
            "submit",
            *base,
            "--model",
            "sora-2-preview",
            "--prompt",
            "x",
            "--json",
            key=emu.api_key,
            check=0,
        )
        task_id = json.loads(out)["id"]
        _, out, _ = await cli(
            "download",
            *base,
            task_id,
            "-o",
            str(tmp_path / "d"),
            "--json",
            key=emu.api_key,
            check=0,
        )
        (f,) = json.loads(out)
        assert f["sha256"] == emu.file_sha256(task_id)
        img = tmp_path / "i.png"
        img.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
        _, out, _ = await cli("upload", *base, str(img), "--json", key=emu.api_key, check=0)
        assert json.loads(out)["url"].startswith(emu.base_url)
        # wait: -o is the flag download uses too; --download stays as an alias
        _, out, _ = await cli(
            "wait", *base, task_id, "-o", str(tmp_path / "w"), "--json", key=emu.api_key, check=0
        )
        assert json.loads(out)[0]["files"] == [str(tmp_path / "w" / f"{task_id}.mp4")]


async def test_summary_cost_leaves_out_jobs_paid_in_earlier_runs(tmp_path: Path) -> None:
    async with Emulator(task_duration=0.0) as emu:
        args = ["run", str(JOBS), "-o", str(tmp_path / "o"), "--base-url", emu.base_url]
        _, first, _ = await cli(*args, key=emu.api_key, check=0)
        _, again, _ = await cli(*args, key=emu.api_key, check=0)
    assert "cost        $3.65" in first
    assert "cost        $0.00 (earlier runs: $3.65)" in again
    assert "replayed    5 (finished in earlier runs)" in again


async def test_ctrl_c_when_everything_then_finishes_exits_0(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        '{"name": "a", "model": "sora-2-preview", "prompt": "a"}\n'
        '{"name": "b", "model": "sora-2-preview", "prompt": "b"}\n'
    )
    from anyio.streams.buffered import BufferedByteReceiveStream

    async with Emulator(mode="manual") as emu:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "APIMART_API_KEY": emu.api_key}
        cmd = [
            sys.executable,
            "-m",
            "apimart_async.cli",
            "run",
            str(jobs),
            "-o",
            str(tmp_path / "o"),
            "--base-url",
            emu.base_url,
            "--grace",
            "60",
        ]
        async with await anyio.open_process(cmd, env=env) as proc:
            assert proc.stderr is not None and proc.stdout is not None
            await emu.wait_until(lambda: emu.tasks_created == 2, timeout=60)
            proc.send_signal(signal.SIGINT)
            err = BufferedByteReceiveStream(proc.stderr)
            with anyio.fail_after(60):
                notice = await err.receive_until(b"resume", 1 << 16)
            assert b"interrupted: no new job will be submitted" in notice  # at once
            emu.complete_all()
            with anyio.fail_after(60):
                await proc.wait()
            rest = await read_rest(err)
            out = (await proc.stdout.receive(1 << 16)).decode()
    assert proc.returncode == 0, rest
    assert b"resume with" not in rest
    assert "completed   2" in out and "not started 0" in out


async def test_retry_failed_says_what_it_resubmits_and_costs(tmp_path: Path) -> None:
    async with Emulator(task_duration=0.0, failure_rate=1.0) as emu:
        args = ["run", str(JOBS), "-o", str(tmp_path / "o"), "--base-url", emu.base_url]
        code, out, err = await cli(*args, key=emu.api_key)
        assert code == 1 and "failed      5" in out
        assert err.count("failed ") == 5
        emu.state.failure_rate = 0.0
        code, out, _ = await cli(*args, key=emu.api_key)  # not without the flag: replayed
        assert code == 1 and "replayed    5" in out and emu.tasks_created == 5
        code, out, err = await cli(*args, "--retry-failed", key=emu.api_key)
        assert code == 0, err
        assert "--retry-failed: 5 failed job(s) submitted again, estimated" in err
        assert "retried     5 failed job(s) submitted again" in out
        assert "completed   5" in out and emu.tasks_created == 10


async def test_wait_shows_live_status_on_a_terminal() -> None:
    import pty

    async with (
        Emulator(mode="manual") as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client,
    ):
        task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "x"))
        master, slave = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "APIMART_API_KEY": emu.api_key}
        cmd = [
            sys.executable,
            "-m",
            "apimart_async.cli",
            "wait",
            task_id,
            "--base-url",
            emu.base_url,
        ]
        seen = b""
        async with await anyio.open_process(cmd, env=env, stderr=slave) as proc:
            os.close(slave)
            with anyio.fail_after(60):
                while b"waiting for 1 of 1 task(s); 0 ended" not in seen:
                    await anyio.wait_readable(master)
                    seen += os.read(master, 4096)
            emu.complete(task_id)
            with anyio.fail_after(60):
                await proc.wait()
        os.close(master)
    assert proc.returncode == 0
    assert seen.startswith(b"\r\x1b[2K")  # a status line redrawn in place


async def test_a_refused_run_is_retried_by_running_the_same_command_again(
    tmp_path: Path,
) -> None:
    async with Emulator(task_duration=0.0, balance=1.0) as emu:
        args = ["run", str(JOBS), "-o", str(tmp_path / "o"), "--base-url", emu.base_url]
        code, out, err = await cli(*args, key=emu.api_key)
        assert code == 1 and "InsufficientBalanceError" in err
        refused = int(out.split("to retry")[1].split()[0])
        assert refused >= 1 and "re-running the same command sends them again" in out
        emu.state.remain_balance = 100.0  # topped up
        code, out, err = await cli(*args, key=emu.api_key)
        assert code == 0, err
        assert "completed   5" in out and f"replayed    {5 - refused}" in out
        assert "ReplayedError" not in err
        assert emu.tasks_created == 5


def test_quiet_verbose_and_color() -> None:
    from apimart_async.cli import Ui

    def shown(**kw: object) -> str:
        stream = io.StringIO()
        ui = Ui(stream=stream, **kw)  # type: ignore[arg-type]
        ui.line("step", level="detail")
        ui.line("note", level="info")
        ui.line(ui.paint("bad", "31"), level="error")
        return stream.getvalue()

    assert shown(tty=False) == "step\nnote\nbad\n"
    assert shown(tty=False, quiet=True) == "bad\n"
    assert shown(tty=True, color="never") == "note\nbad\n"  # steps only with -v on a terminal
    assert shown(tty=True, color="never", verbose=1) == "step\nnote\nbad\n"
    assert shown(tty=False, color="always").endswith("\x1b[31mbad\x1b[0m\n")


def test_main_leaves_the_sdk_logger_as_it_found_it() -> None:
    import logging

    from apimart_async import cli as cli_module

    logger = logging.getLogger("apimart_async")
    before = (logger.level, list(logger.handlers))
    assert cli_module.main(["models", "--json", "-q"]) == 0
    assert (logger.level, list(logger.handlers)) == before


async def test_emulated_run_resumes_after_ctrl_c_as_the_readme_shows(tmp_path: Path) -> None:
    """README: `apimart-async run examples/jobs.jsonl --emulate --out videos/`, Ctrl-C, then
    the printed resume command: every video once, nothing submitted twice."""
    import shlex

    from anyio.streams.buffered import BufferedByteReceiveStream

    out = tmp_path / "videos"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("APIMART_API_KEY", None)
    cmd = ["run", str(JOBS), "--emulate", "--out", str(out), "--grace", "0"]
    async with await anyio.open_process(
        [sys.executable, "-m", "apimart_async.cli", *cmd], env=env
    ) as proc:
        assert proc.stderr is not None
        err = BufferedByteReceiveStream(proc.stderr)
        with anyio.fail_after(60):
            await err.receive_until(b"submitted ", 1 << 16)
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(60):
            await proc.wait()
        rest = await read_rest(err)
    stderr = rest.decode()
    assert proc.returncode == 130, stderr
    resume = stderr.split("resume with:\n")[1].splitlines()[0].strip()
    argv = shlex.split(resume)
    assert argv[0] == "apimart-async" and "--emulate" in argv
    state = out / ".apimart-journal-emulated.emulator-state.jsonl"
    assert state.exists()
    code, stdout, stderr2 = await cli(*argv[1:])
    assert code == 0, stderr2
    assert sorted(p.name for p in out.glob("*.mp4")) == [
        "apple.mp4",
        "bear-hug.mp4",
        "lighthouse.mp4",
        "neon-cat.mp4",
        "waterfall.mp4",
    ]
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3, 4]
    # the emulator's memory: one task per job across both runs (nothing billed twice)
    records = [json.loads(line) for line in state.read_text().splitlines()[1:]]
    assert len({r["task"]["id"] for r in records}) == 5, records
    assert "completed   5" in stdout


async def test_doctor_without_a_key_is_a_usage_error_when_run_as_a_module() -> None:
    # `python -m apimart_async.cli` runs cli.py as __main__; doctor imports apimart_async.cli,
    # a second copy whose UsageError the first one's main() did not catch (a traceback)
    code, out, err = await cli("doctor", "--base-url", "http://127.0.0.1:9")
    assert (code, out) == (2, ""), err
    assert err.startswith("error: no API key: ") and "Traceback" not in err, err


# -- start-up (issue 16): `--help` and usage errors import neither aiohttp nor the client ---

STARTUP_PROBE = """
import json, sys
from apimart_async.cli import main
code = main(sys.argv[1:])
heavy = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("aiohttp", "anyio", "asyncio", "yarl", "multidict", "cattrs")
    or m.startswith(("apimart_async._client", "apimart_async.emulator", "apimart_async._jobsfile"))
)
sys.stderr.write("\\nPROBE " + json.dumps({"code": code, "heavy": heavy}) + "\\n")
"""


def _startup_probe(*args: str) -> dict[str, object]:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", STARTUP_PROBE, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
        timeout=60,
    )
    probe = proc.stderr.rsplit("PROBE ", 1)
    assert len(probe) == 2, proc.stderr
    result: dict[str, object] = json.loads(probe[1])
    return result


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--help"], 0),
        (["--version"], 0),
        (["run", "--help"], 0),
        (["status", "--help"], 0),
        (["bogus"], 2),
        (["run"], 2),  # no jobs file
        (["run", "jobs.jsonl", "--concurrency", "0"], 2),
    ],
)
def test_help_and_usage_errors_import_no_aiohttp(args: list[str], code: int) -> None:
    assert _startup_probe(*args) == {"code": code, "heavy": []}


def test_importing_the_package_imports_no_aiohttp() -> None:
    import subprocess

    probe = (
        "import json, sys, apimart_async\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('aiohttp', 'anyio',"
        " 'apimart_async.')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        timeout=60,
    ).stdout
    assert json.loads(out) == ["apimart_async._version"]


def test_the_late_subcommands_list_as_in_full() -> None:
    # `emulator` and `doctor` get their options only when named; the command list that
    # `--help` prints is the same as with every subcommand defined in full.
    assert build_parser("").format_help() == build_parser().format_help()
    for name in ("emulator", "doctor"):
        full = _subparsers()[name]
        named = build_parser(name)._subparsers_by_name[name]  # type: ignore[attr-defined]
        assert named.format_help() == full.format_help()


def test_every_public_name_imports_lazily() -> None:
    import subprocess

    probe = (
        "import apimart_async as am\n"
        "for name in am.__all__:\n"
        "    exec(f'from apimart_async import {name}')\n"
        "    assert getattr(am, name) is not None, name\n"
        "assert set(am.__all__) <= set(dir(am))\n"
        "import apimart_async._errors\n"
        "assert am.emulator.Emulator and am.testing.emulated_api and am._outcomes.outcome_of\n"
    )
    subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True
    )
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        am.nothing  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute '_nothing'"):
        am._nothing  # noqa: B018


# -- the jobs file's check streams it (issue 16) ----------------------------------------------


def _dry_run_peak(tmp_path: Path, lines: int) -> int:
    import tracemalloc

    path = tmp_path / f"jobs-{lines}.jsonl"
    with path.open("w") as f:
        for i in range(lines):
            f.write(json.dumps({"model": "sora-2-preview", "prompt": f"cat {i}", "duration": 8}))
            f.write("\n")
    tracemalloc.start()
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = am.cli.main(["run", str(path), "--dry-run", "--no-progress"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 0 and f"{lines} job(s) valid" in out.getvalue()
    return peak


def test_dry_run_memory_is_flat_in_the_number_of_lines(tmp_path: Path) -> None:
    # The check streams the file and keeps no list of jobs: ten times the lines, about the
    # same peak of allocated memory (reading it whole and keeping the jobs: 5x here).
    _dry_run_peak(tmp_path, 100)  # imports and caches out of the way
    small, large = _dry_run_peak(tmp_path, 1_000), _dry_run_peak(tmp_path, 10_000)
    assert large < 1.5 * small, (small, large)


def test_file_name_clashes_are_found_as_the_file_streams(tmp_path: Path) -> None:
    lines = [
        {"prompt": "unnamed, index 0"},
        None,  # a blank line: line numbers and job indexes part
        {"name": "000003", "prompt": "index 1, the default name of index 3"},
        {"name": "000000", "prompt": "index 2, the default name of index 0"},
        {"prompt": "unnamed, index 3"},
        {"name": "Clip", "prompt": "index 4"},
        {"name": "clip", "prompt": "index 5"},
        {"name": "000007", "prompt": "index 6, the default name of a later index 7"},
        {"name": "000006", "prompt": "index 7, named"},
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        "\n".join(json.dumps({"model": "sora-2-preview", **line}) if line else "" for line in lines)
        + "\n"
    )
    with pytest.raises(am.JobsFileError) as caught:
        am.read_jobs(path)
    same = "name: gives the same file as line"
    assert caught.value.problems == [
        (4, f"{same} 1 (000000.mp4); names must differ, got '000000'"),
        (5, f"{same} 3 (000003.mp4); names must differ, got None"),
        (7, f"{same} 6 (clip.mp4); names must differ, got 'clip'"),
    ]


async def test_a_run_started_in_the_background_does_not_warn_about_sigint_grace(
    tmp_path: Path,
) -> None:
    """A shell starts a background job (``cmd &``, nohup, a service) with SIGINT ignored:
    ``run`` warned twice, a Python warning with its source line, that 'sigint_grace is
    ignored ... stop the batch with await results.stop(grace=...)', advice for Python code,
    not for a command. No Ctrl-C can reach such a run: nothing to warn about."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("APIMART_API_KEY", None)
    command = shlex.join(
        [sys.executable, "-m", "apimart_async.cli", "run", str(JOBS), "--emulate", "--out",
         str(tmp_path / "o"), "--no-progress"]
    )  # fmt: skip
    result = await anyio.run_process(["sh", "-c", f"trap '' INT; exec {command}"], env=env)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "sigint_grace" not in err and "ApimartWarning" not in err


def four_jobs(tmp_path: Path) -> Path:
    """A jobs file of four named jobs (``j0``..``j3``) in ``tmp_path``."""
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"name": f"j{i}", "model": "sora-2-preview", "prompt": f"p {i}"} for i in range(4)]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return jobs


async def ctrl_c_run(
    emu: Emulator, jobs: Path, out: Path, when: Callable[[], bool], *flags: str
) -> tuple[str, str]:
    """``run --json --grace 0`` against ``emu`` with its key, SIGINT once ``when()`` holds;
    its stdout and stderr (it must end with 130, interrupted)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "APIMART_API_KEY": emu.api_key}
    cmd = [sys.executable, "-m", "apimart_async.cli", "run", str(jobs), "-o", str(out)]
    cmd += ["--json", "--base-url", emu.base_url, "--grace", "0", *flags]
    async with await anyio.open_process(cmd, env=env) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        await emu.wait_until(when, timeout=60)
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(60):
            await proc.wait()
        stdout = (await read_rest(proc.stdout)).decode()
        stderr = (await read_rest(proc.stderr)).decode()
    assert proc.returncode == 130, stderr
    return stdout, stderr


async def test_ctrl_c_while_files_download_counts_the_paid_jobs_and_prints_a_resume(
    tmp_path: Path,
) -> None:
    """brk16g: Ctrl-C with ``--grace 0`` while every job's file was downloading: the summary
    said all 4 jobs 'not started', cost $0 and 'running 0', though all 4 were paid for and
    their files half here. Each is counted once, with its cost, as a file still to fetch;
    the resume line is printed and fetches them without a new task."""
    jobs, out = four_jobs(tmp_path), tmp_path / "o"
    async with Emulator(
        api_key="sk-cli-cut", task_duration=0.0, video_bytes=4 << 20, file_chunk_delay=60
    ) as emu:
        stdout, stderr = await ctrl_c_run(emu, jobs, out, lambda: emu.state.in_flight["file"] == 4)
        events = [json.loads(line) for line in stdout.splitlines()]
        summary = events[-1]
        assert summary["event"] == "summary"
        paid = emu.stats()["used_balance"]
        assert emu.stats()["tasks_created"] == 4 and paid > 0
        assert summary["not_started"] == 0 and summary["running"] == 0
        assert summary["to_download"] == 4 and summary["errored"] == 4
        assert summary["cost"] == pytest.approx(paid)
        ended = [e for e in events if e["event"] == "errored"]
        assert sorted(e["index"] for e in ended) == [0, 1, 2, 3]  # each job once
        assert all("cut off" in e["error"] for e in ended)
        assert summary["resume"] is not None and "resume with:" in stderr
        emu.file_chunk_delay = 0
        resume = shlex.split(summary["resume"])
        code, stdout, stderr = await cli(*resume[1:], key="sk-cli-cut")
        assert code == 0, stderr
        assert emu.stats()["tasks_created"] == 4  # nothing paid twice
    assert sorted(p.name for p in out.glob("*.mp4")) == ["j0.mp4", "j1.mp4", "j2.mp4", "j3.mp4"]
    assert all(p.stat().st_size == 4 << 20 for p in out.glob("*.mp4"))
    resumed = json.loads(stdout.splitlines()[-1])
    assert resumed["completed"] == 4 and resumed["to_download"] == 0
    # paid in the first run: this run spent nothing (it counted the $ again, brk16h)
    assert resumed["cost"] == 0 and resumed["earlier_cost"] == pytest.approx(paid)


async def test_a_download_the_file_server_keeps_refusing_counts_as_to_download(
    tmp_path: Path,
) -> None:
    """brk16h: a completed, paid job whose file server answered 503 on every attempt ended
    with an APIConnectionError, not a DownloadError, and the summary left it out of 'to
    download': nothing said a re-run fetches it."""
    from apimart_async.emulator import Fault

    jobs = tmp_path / "jobs.jsonl"
    lines = [{"name": f"j{i}", "model": "sora-2-preview", "prompt": f"p {i}"} for i in range(2)]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    async with Emulator(api_key="sk-cli-503", task_duration=0.0) as emu:
        emu.faults.inject("file", Fault.server_error(503), times=1000)
        code, stdout, stderr = await cli(
            "run", str(jobs), "-o", str(tmp_path / "o"), "--json", "--base-url", emu.base_url,
            key="sk-cli-503",
        )  # fmt: skip
        assert code == 1, stderr
        summary = json.loads(stdout.splitlines()[-1])
        assert summary["errored"] == 2 and summary["to_download"] == 2
        assert summary["cost"] == pytest.approx(emu.stats()["used_balance"])
        emu.faults.clear()
        code, stdout, stderr = await cli(
            "run", str(jobs), "-o", str(tmp_path / "o"), "--json", "--base-url", emu.base_url,
            key="sk-cli-503",
        )  # fmt: skip
        assert code == 0, stderr
        assert emu.tasks_created == 2
    resumed = json.loads(stdout.splitlines()[-1])
    assert resumed["completed"] == 2 and resumed["cost"] == 0


async def test_a_key_given_where_the_jobs_file_goes_is_not_printed_back(tmp_path: Path) -> None:
    """brk16h: ``apimart-async run sk-...`` (the key where the jobs file's path goes) printed
    'error: 1 problem(s) in sk-...': the key, on the terminal and in CI logs. A missing file
    whose name looks like a key is not named; any other missing file still is."""
    code, out, err = await cli("run", SECRET, "-o", str(tmp_path / "o"), key="sk-env-key-1234")
    assert code == 2
    assert SECRET not in out + err and SECRET[:12] not in out + err
    assert "the jobs file does not exist" in err and "looks like an API key" in err
    missing = tmp_path / "jobs.jsonl"
    code, _, err = await cli("run", str(missing), "-o", str(tmp_path / "o"), key="sk-env-1234")
    assert code == 2 and str(missing) in err  # a path is still named


async def test_submits_cut_off_by_ctrl_c_are_unconfirmed_not_running(tmp_path: Path) -> None:
    """brk16h: Ctrl-C (``--grace 0``) while two POSTs waited for their replies: the summary
    said 'running 2 (at the service...)' though the service had created no task yet. They
    are 'unconfirmed' (a task may exist), counted once; the resume sends each again with its
    key, and the service bills one task per job whatever the first POST became."""
    from apimart_async.emulator import Fault

    jobs, out = four_jobs(tmp_path), tmp_path / "o"
    async with Emulator(api_key="sk-cli-unconfirmed", task_duration=0.0) as emu:
        emu.faults.inject("submit", Fault.slow(2.0), times=2)  # the replies come late
        held = lambda: emu.state.in_flight["submit"] == 2  # noqa: E731
        stdout, stderr = await ctrl_c_run(emu, jobs, out, held, "--concurrency", "2")
        summary = json.loads(stdout.splitlines()[-1])
        assert summary["unconfirmed"] == 2 and summary["running"] == 0
        total = sum(summary[k] for k in ("completed", "failed", "errored", "not_started"))
        assert total + summary["unconfirmed"] == 4  # each job once
        assert summary["resume"] is not None
        await emu.wait_until(lambda: emu.tasks_created == 2, timeout=30)  # the late POSTs
        code, stdout, stderr = await cli(
            *shlex.split(summary["resume"])[1:], key="sk-cli-unconfirmed"
        )
        assert code == 0, stderr
        assert emu.tasks_created == 4 and set(emu.tasks_per_key.values()) == {1}
    assert json.loads(stdout.splitlines()[-1])["completed"] == 4

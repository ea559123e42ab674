"""The examples run as a user would run them, against the built-in emulator."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    """Run an example script as a user would, with only this checkout importable."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "", "PYTHONPATH": str(ROOT)},
    )


def test_quickstart_generates_one_video_per_seed_model() -> None:
    proc = run_example(str(ROOT / "examples" / "quickstart.py"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    done = [line.split()[0] for line in lines if " completed " in line]
    assert sorted(done) == sorted(
        [
            "gemini-omni-flash-preview",
            "viduq3",
            "viduq3-mix",
            "sora-2-preview",
            "sora-2-pro-preview",
        ]
    )
    assert "'submit': 5" in lines[-1]
    assert proc.stderr == ""


def test_batch_to_disk_example(tmp_path: Path) -> None:
    out = tmp_path / "videos"
    proc = run_example(str(ROOT / "examples" / "batch_to_disk.py"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.mp4")) == [f"clip-{i:02d}.mp4" for i in range(6)]
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 6
    assert "<Batch read=6 submitted=6 pending=0 | completed=6" in proc.stdout


def test_batch_to_disk_resumes_after_ctrl_c_without_submitting_twice(tmp_path: Path) -> None:
    out = tmp_path / "videos"
    script = str(ROOT / "examples" / "batch_to_disk.py")
    proc = subprocess.Popen(
        [sys.executable, script, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "", "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first job has ended: interrupt now
    assert first.startswith("clip-0"), first
    proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=120)
    # the SDK's WARNING (shown by Python's last-resort handler: the example configures no
    # logging), then the example's own line
    sdk, example = stderr.splitlines()
    assert sdk.startswith("interrupted: no new job will be submitted; following "), stderr
    assert example == "interrupted: run the same command again to resume"
    assert proc.returncode == 130
    first_run = [first, *rest.splitlines()]
    created = {
        json.loads(line)["task"]["id"]
        for line in (out / "emulator-state.jsonl").read_text().splitlines()[1:]
    }
    ended = [line for line in first_run if line.startswith("clip-") and ": ok " in line]
    assert 1 <= len(ended) <= len(created) <= 6

    proc2 = run_example(script, "--out", str(out))
    assert proc2.returncode == 0, proc2.stderr
    lines = proc2.stdout.splitlines()
    replayed = [line for line in lines if "(finished in an earlier run)" in line]
    assert len(replayed) == len(ended)
    # only the jobs that never became a task were submitted now; the others were re-attached
    summary = re.search(r"<Batch read=6 submitted=(\d+) pending=0 \| completed=6 ", proc2.stdout)
    assert summary is not None, proc2.stdout
    assert int(summary.group(1)) == 6 - len(created)
    state = [json.loads(line) for line in (out / "emulator-state.jsonl").read_text().splitlines()]
    assert len({line["task"]["id"] for line in state[1:]}) == 6  # six tasks, none twice
    assert sorted(p.name for p in out.glob("*.mp4")) == [f"clip-{i:02d}.mp4" for i in range(6)]
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 6


def test_my_app_example_runs_with_the_packaged_fixtures() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "examples" / "test_my_app.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout


def test_the_real_service_without_a_key_is_a_usage_error_not_a_traceback() -> None:
    """``--real`` (or web_backend without ``--emulate``) and no APIMART_API_KEY: the example
    says what to do and exits 2 before it starts anything."""
    for args in (
        ["quickstart.py", "--real"],
        ["batch_to_disk.py", "--real"],
        ["web_backend.py"],
        ["aiohttp_backend.py"],
    ):
        proc = run_example(str(ROOT / "examples" / args[0]), *args[1:])
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, args
        assert "set APIMART_API_KEY to your key" in proc.stderr, proc.stderr

"""The examples run as a user would run them, against the built-in emulator."""

from __future__ import annotations

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

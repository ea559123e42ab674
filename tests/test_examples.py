"""The examples run as a user would run them, against the built-in emulator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_generates_one_video_per_seed_model() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "", "PYTHONPATH": str(ROOT)},
    )
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

"""Instructions per job: the client overhead scenario counted by valgrind, not timed (issue 16).

On a machine shared with other work, CPU seconds per job move by 30 % from one run to the
next, the bare client's too. Instructions do not: each client runs under valgrind's callgrind
at ``--jobs`` and twice that many jobs (each against a fresh emulator in its own process),
and the difference of the two counts divided by ``--jobs`` is what one job costs, imports and
start-up excluded. Only the client's own user-space instructions are counted: not the
kernel's (system calls), nor the cache misses and stalls that time also pays.

    python benchmarks/instructions.py [--jobs 1000]

Needs ``valgrind`` (Debian: ``apt-get install valgrind``); each run takes about a minute.
Writes ``instructions.json`` beside this file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from _harness import HERE, emulator_process

WORKER = HERE / "_worker.py"
CLIENTS = (
    ("bare aiohttp (1 POST + 1 GET per job)", "bare-overhead", ["--no-batch-route"]),
    ("apimart-async, per-task GETs", "sdk-overhead", ["--no-batch-route"]),
    ("apimart-async, batch route", "sdk-overhead", []),
)


def collected(text: str) -> int:
    """The instruction count callgrind prints at the end of a run."""
    found = re.findall(r"Collected\s*:\s*(\d+)", text)
    if not found:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{text[-2000:]}")
    return int(found[-1])


async def count(kind: str, emu_args: list[str], jobs: int) -> int:
    """Instructions of one worker run of ``jobs`` jobs, against a fresh emulator."""
    async with emulator_process("--duration", "0", *emu_args) as emu:
        proc = await asyncio.create_subprocess_exec(
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            str(WORKER),
            kind,
            emu["base_url"],
            emu["api_key"],
            "--jobs",
            str(jobs),
            "--concurrency",
            "64",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} under valgrind exited with {proc.returncode}")
    return collected(err.decode(errors="replace"))


async def run(jobs: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, kind, emu_args in CLIENTS:
        print(f"instructions: {name}", file=sys.stderr, flush=True)
        small = await count(kind, emu_args, jobs)
        large = await count(kind, emu_args, 2 * jobs)
        rows[name] = {"per_job": (large - small) // jobs, "runs": [small, large]}
    bare = rows[CLIENTS[0][0]]["per_job"]
    for row in rows.values():
        row["x_bare"] = round(row["per_job"] / bare, 3)
    return {"jobs": jobs, "clients": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    ns = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    results = asyncio.run(run(ns.jobs))
    Path(HERE / "instructions.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| client | instructions / job | x bare |\n| --- | ---: | ---: |")
    for name, row in results["clients"].items():
        print(f"| {name} | {row['per_job']:,} | {row['x_bare']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

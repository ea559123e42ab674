"""Scenario 7 of ``run.py``, what users feel before any work (issue 16): the CLI's start-up, the
pytest plugin's import, and a jobs file of a million lines (the check that runs before anything
is sent, the time to the first submit, peak memory).

Every figure comes from a process of its own, started afresh for each repetition.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# -- targets (issue 16) --
HELP_S = 0.3
PLUGIN_IMPORT_MS = 20.0
LINES_PER_S = 100_000
#: "Flat" memory: ten times the lines may raise the check's peak RSS by at most this much.
FLAT_RSS_MB = 16.0

#: Runs a command and prints its wall time, CPU time and peak RSS (its own: the only child).
_MEASURE = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "rss_mb": usage.ru_maxrss / 1024, "code": proc.returncode,
                  "stderr": proc.stderr.decode()[-2000:]}))
"""

#: Imports the plugin as a pytest run does: pytest and its installed plugins are loaded first.
_PLUGIN = """
import importlib.util, json, sys, time
import pytest
for name in ("pytest_asyncio", "anyio.pytest_plugin"):
    if importlib.util.find_spec(name.split(".")[0]) is not None:
        __import__(name)
t0 = time.perf_counter()
import apimart_async.testing
took = time.perf_counter() - t0
print(json.dumps({"import_ms": took * 1000, "aiohttp": "aiohttp" in sys.modules}))
"""


#: Where the check's time goes: the jobs file's pass as ``run`` makes it (``check_jobs``)
#: under cProfile, each stage's cumulative time per line (the profiler's own cost inflates
#: all of them alike).
_PROFILE = """
import cProfile, json, pstats, sys
from apimart_async._jobsfile import check_jobs
path = sys.argv[1]
for _ in check_jobs(path):
    pass
profile = cProfile.Profile()
profile.enable()
lines = sum(1 for _ in check_jobs(path))
profile.disable()
stats = pstats.Stats(profile).stats
stages = {
    "the whole pass": ("_jobsfile.py", "check_jobs"),
    "reading and splitting lines": ("_jobsfile.py", "_jsonl_texts"),
    "json decoding": ("decoder.py", "raw_decode"),
    "the line's shape": ("_jobsfile.py", "_line_shape"),
    "full checks (VideoRequest) of lines of a new shape": ("_jobsfile.py", "_build_line"),
    "file-name clashes": ("_jobsfile.py", "add"),
}
out = {}
for stage, (file, func) in stages.items():
    cum = sum(v[3] for k, v in stats.items() if k[0].endswith(file) and k[2] == func)
    out[stage] = round(cum / lines * 1e6, 1)
print(json.dumps(out))
"""


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "apimart-async"
    if script.exists():
        return [str(script)]
    found = shutil.which("apimart-async")
    return [found] if found else [sys.executable, "-m", "apimart_async.cli"]


def _measure(cmd: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, Any] = json.loads(out)
    if result["code"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {result['code']}: {result['stderr']}")
    return result


def _best(cmd: list[str], reps: int) -> dict[str, Any]:
    """The fastest of ``reps`` runs (wall and CPU time each at their least): on a shared
    machine the noise only ever adds."""
    runs = [_measure(cmd) for _ in range(reps)]
    return {
        "wall_s": min(r["wall_s"] for r in runs),
        "cpu_s": min(r["cpu_s"] for r in runs),
        "rss_mb": max(r["rss_mb"] for r in runs),
    }


def _jobs_file(path: Path, lines: int) -> None:
    """``lines`` jobs of one model, unnamed (each video is named by its index), like a
    generated prompt sweep."""
    with path.open("w") as f:
        for i in range(lines):
            f.write(
                json.dumps(
                    {
                        "model": "sora-2-preview",
                        "prompt": f"a neon cat crossing a rainy street, take {i}",
                        "duration": 8,
                        "aspect_ratio": "portrait",
                    }
                )
                + "\n"
            )


def _import_time_ms() -> dict[str, float]:
    """``python -X importtime`` of ``apimart-async --help``: every module's own time, summed,
    and that of the CLI module with everything it imports."""
    code = "from apimart_async.cli import main; main(['--help'])"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True
    )
    total = cli = 0
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m is None:
            continue
        total += int(m.group(1))
        if m.group(4) == "apimart_async.cli":
            cli = int(m.group(2))
    return {"total_ms": round(total / 1000, 1), "cli_cumulative_ms": round(cli / 1000, 1)}


def _first_submit(cli: list[str], jobs: Path, out: Path) -> dict[str, Any]:
    """``run --emulate --json`` until its first ``submitted`` event: the time from start, and
    the process's peak RSS then (``VmHWM``). The run is then killed: its figures are taken."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cli, "run", str(jobs), "--emulate", "-o", str(out), "--json", "-q", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    took = None
    rss_mb = None
    try:
        for line in proc.stdout:
            if '"event": "submitted"' in line:
                took = time.perf_counter() - t0
                status = Path(f"/proc/{proc.pid}/status")
                if status.exists():
                    hwm = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
                    rss_mb = int(hwm.group(1)) / 1024 if hwm else None
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if took is None:
        raise RuntimeError("run --emulate ended before its first submit")
    return {"s": round(took, 2), "rss_mb": round(rss_mb, 1) if rss_mb else None}


async def startup(cfg: dict[str, Any]) -> dict[str, Any]:
    return await asyncio.to_thread(_startup, cfg)


def _startup(cfg: dict[str, Any]) -> dict[str, Any]:
    cli = _cli()
    reps = cfg["startup_reps"]
    baseline = _best([sys.executable, "-c", "pass"], reps)
    helps = _best([*cli, "--help"], reps)
    plugin = []
    for _ in range(reps):
        out = subprocess.run(
            [sys.executable, "-c", _PLUGIN], capture_output=True, text=True, check=True
        ).stdout
        plugin.append(json.loads(out))
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "load_average": round(os.getloadavg()[0], 2),
        "reps": reps,
        "python_bare_s": round(baseline["wall_s"], 3),
        "help_s": round(helps["wall_s"], 3),
        "help_cpu_s": round(helps["cpu_s"], 3),
        "help_importtime": _import_time_ms(),
        "plugin_import_ms": round(min(p["import_ms"] for p in plugin), 1),
        "plugin_imports_aiohttp": any(p["aiohttp"] for p in plugin),
    }
    with tempfile.TemporaryDirectory(prefix="apimart-startup-") as tmp:
        folder = Path(tmp)
        dry_lines = cfg["startup_dry_run_lines"]
        dry = folder / "dry.jsonl"
        _jobs_file(dry, dry_lines)
        dry_run = _best([*cli, "run", str(dry), "--dry-run", "-q"], reps)
        result["dry_run"] = {
            "lines": dry_lines,
            "wall_s": round(dry_run["wall_s"], 3),
            "cpu_s": round(dry_run["cpu_s"], 3),
        }
        one = folder / "one.jsonl"
        _jobs_file(one, 1)
        # the process's start-up and imports, taken off the big files' CPU time for the rate
        fixed = _best([*cli, "run", str(one), "--dry-run", "-q"], reps)
        result["dry_run_one_line"] = {
            "wall_s": round(fixed["wall_s"], 3),
            "cpu_s": round(fixed["cpu_s"], 3),
        }
        checks = {}
        for lines in cfg["startup_big_lines"]:  # the check alone: run --dry-run
            path = folder / f"jobs-{lines}.jsonl"
            _jobs_file(path, lines)
            r = _measure([*cli, "run", str(path), "--dry-run", "-q"])
            checks[str(lines)] = {
                "lines": lines,
                "bytes": path.stat().st_size,
                "wall_s": round(r["wall_s"], 2),
                "cpu_s": round(r["cpu_s"], 2),
                # CPU time: on a shared machine, wall time also counts the others' work
                "lines_per_s": round(lines / max(r["cpu_s"] - fixed["cpu_s"], 1e-3)),
                "peak_rss_mb": round(r["rss_mb"], 1),
            }
            if lines == min(cfg["startup_big_lines"]):
                out = subprocess.run(
                    [sys.executable, "-c", _PROFILE, str(path)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                result["check_profile_us_per_line"] = json.loads(out)
            if lines == max(cfg["startup_big_lines"]):
                checks[str(lines)]["first_submit"] = _first_submit(cli, path, folder / "out")
            path.unlink()
        result["jobs_files"] = checks
    return result


def verdicts(s: dict[str, Any], add: Any) -> None:
    add(
        f"start-up: `apimart-async --help` < {HELP_S:g} s",
        f"{s['help_s']} s (bare python {s['python_bare_s']} s)",
        s["help_s"] < HELP_S,
    )
    add(
        f"start-up: importing the pytest plugin < {PLUGIN_IMPORT_MS:g} ms, without aiohttp",
        f"{s['plugin_import_ms']} ms"
        + (", imports aiohttp" if s["plugin_imports_aiohttp"] else ", no aiohttp"),
        s["plugin_import_ms"] < PLUGIN_IMPORT_MS and not s["plugin_imports_aiohttp"],
    )
    files = sorted(s["jobs_files"].values(), key=lambda f: f["lines"])
    big = files[-1]
    add(
        f"jobs file: the check before sending reads >= {LINES_PER_S:,} lines/s "
        f"({big['lines']:,} lines)",
        f"{big['lines_per_s']:,} lines/s",
        big["lines_per_s"] >= LINES_PER_S,
    )
    if len(files) > 1:
        small = files[0]
        add(
            f"jobs file: the check's peak RSS flat in the file's size ({big['lines']:,} lines "
            f"<= {small['lines']:,} lines + {FLAT_RSS_MB:g} MB)",
            f"{small['peak_rss_mb']} MB -> {big['peak_rss_mb']} MB",
            big["peak_rss_mb"] <= small["peak_rss_mb"] + FLAT_RSS_MB,
        )


def section(s: dict[str, Any], table: Any) -> list[str]:
    files = sorted(s["jobs_files"].values(), key=lambda f: f["lines"])
    big = files[-1]
    first = big.get("first_submit") or {}
    it = s["help_importtime"]
    rows = [
        ["bare `python -c pass`", f"{s['python_bare_s']} s", ""],
        [
            "`apimart-async --help`",
            f"{s['help_s']} s",
            f"CPU {s['help_cpu_s']} s; `-X importtime`: {it['total_ms']} ms of imports in all, "
            f"{it['cli_cumulative_ms']} ms for `apimart_async.cli` and what it imports",
        ],
        [
            "`apimart-async run --dry-run`, 1 line (start-up and imports)",
            f"{s['dry_run_one_line']['wall_s']} s",
            f"CPU {s['dry_run_one_line']['cpu_s']} s",
        ],
        [
            f"`apimart-async run --dry-run`, {s['dry_run']['lines']:,} lines",
            f"{s['dry_run']['wall_s']} s",
            f"CPU {s['dry_run']['cpu_s']} s",
        ],
        [
            "`import apimart_async.testing` (the pytest plugin, pytest already loaded)",
            f"{s['plugin_import_ms']} ms",
            "imports aiohttp" if s["plugin_imports_aiohttp"] else "no aiohttp, no SDK",
        ],
    ]
    for f in files:
        rows.append(
            [
                f"the check (`run --dry-run`), {f['lines']:,} lines ({f['bytes'] / 1e6:.0f} MB)",
                f"{f['wall_s']} s",
                f"CPU {f['cpu_s']} s: {f['lines_per_s']:,} lines/s (CPU, start-up taken off), "
                f"peak RSS {f['peak_rss_mb']} MB",
            ]
        )
    if first:
        rows.append(
            [
                f"`run --emulate`, {big['lines']:,} lines: time to the first submit",
                f"{first['s']} s",
                f"peak RSS {first['rss_mb']} MB by then",
            ]
        )
    notes = []
    if first:
        notes += [
            "",
            f"`run` itself is not flat: after the check it reads the file again into a list of "
            f"its {big['lines']:,} jobs, which the batch's gallery, progress labels and journal "
            "matching all hold; hence the time and the peak RSS to its first submit "
            f"({first['s']} s, {first['rss_mb']} MB), against the check's "
            f"{big['peak_rss_mb']} MB.",
        ]
    profile = s.get("check_profile_us_per_line")
    if profile:
        notes += [
            "",
            f"Where the check's time goes ({files[0]['lines']:,} lines under cProfile, "
            "cumulative µs per line; the profiler inflates every stage alike): "
            + "; ".join(f"{stage} {us}" for stage, us in profile.items())
            + ". A line becomes a `VideoRequest`, checked against its model's rules, only "
            "when its shape (every field but the prompt's text) is new to the pass; the "
            "others take the verdict of the first line of their shape.",
        ]
    return [
        "",
        "## 7. Start-up and big jobs files",
        "",
        "What a user waits for before any work: each figure from a fresh process (the best of "
        f"{s['reps']} for the short ones; load average {s['load_average']} at the start). The "
        "jobs files hold unnamed jobs of one model, one line each. The check is "
        "`apimart-async run --dry-run`: every line read and validated, as `run` does before it "
        "sends anything, with the file streamed and no list of jobs kept. The first submit of "
        "`run` comes after that check and a second pass that builds the batch's jobs.",
        "",
        table(["what", "wall", "notes"], rows),
        *notes,
    ]

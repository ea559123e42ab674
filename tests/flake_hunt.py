"""Flake hunt: run the whole test suite N times on fresh checkouts and report every test that
ever failed, with its output. Not part of CI (20 runs take about four hours on 2 cores).

    python tests/flake_hunt.py                  # 20 runs of HEAD, Python 3 of this machine
    python tests/flake_hunt.py --runs 3 --python python3.13
    python tests/flake_hunt.py --venv .venv     # reuse an environment that has the test extra

How it works:

- ``git clone`` of the commit that was HEAD when the hunt started (uncommitted changes are not
  hunted: commit first) into a temporary directory, once per run, so no run sees anything an earlier one left behind
  (``.pytest_cache``, ``.hypothesis``, journals, videos, bytecode).
- One virtual environment for the whole hunt, made with ``--python`` and the project installed
  into it from the first clone with its ``test`` extra (a regular install, not editable, so
  nothing of the working tree leaks in); ``--venv`` reuses an existing one instead (faster,
  but it must hold the test extra and this commit's package, installed). As in CI, each run's
  clone loses its ``apimart_async/`` folder, so the tests import the installed package and
  nothing else (with two copies, pyright's strict check sees two of every class).
- Each run is the README's test command, ``python -m pytest -q``, plus a JUnit XML report
  from which the failures and their output are read. Runs go one after another by default.
  ``--jobs 2`` runs two at once: a run uses about 0.65 of a core (most of its time waits on
  subprocesses, sockets and timers), so two fit on 2 cores and the hunt takes about two hours
  instead of four. Three or more at once on 2 cores would hunt load, not flakes.

Exit status: 0 when every run passed, 1 when any test failed in any run, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


def clone(dest: Path, commit: str) -> None:
    """A fresh checkout of ``commit`` (the HEAD when the hunt started, however HEAD moves)."""
    _run(["git", "clone", "--quiet", "--no-hardlinks", "--no-checkout", str(ROOT), str(dest)])
    _run(["git", "-C", str(dest), "checkout", "--quiet", "--detach", commit])


def make_venv(python: str, where: Path, source: Path) -> Path:
    """A fresh environment made by ``python`` with the project and its test extra."""
    _run([python, "-m", "venv", str(where)])
    py = where / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", f"{source}[test]"])
    return py


def failures(report: Path) -> dict[str, str]:
    """Test id -> failure text (message, traceback, captured output) from a JUnit XML file."""
    out: dict[str, str] = {}
    if not report.exists():
        return out
    for case in ET.parse(report).getroot().iter("testcase"):
        problems = [c for c in case if c.tag in ("failure", "error")]
        if not problems:
            continue
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        parts = []
        for p in problems:
            parts.append(f"[{p.tag}] {p.get('message', '')}\n{p.text or ''}")
        for tag in ("system-out", "system-err"):
            for c in case.iter(tag):
                if c.text and c.text.strip():
                    parts.append(f"[{tag}]\n{c.text}")
        out[name] = "\n".join(parts)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=20, help="how many runs (default: 20)")
    parser.add_argument(
        "--python", default="python3", help="interpreter for the fresh venv (default: python3)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once (default: 1; see the note above)"
    )
    parser.add_argument("--venv", help="reuse this environment instead of making one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    if dirty.stdout.strip():
        print("note: uncommitted changes are not part of the hunt (it clones HEAD)")
    commit = _run(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).stdout.strip()
    head = commit[:10]

    hunt_started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="apimart-flake-hunt-"))
    failed_in: dict[str, list[int]] = defaultdict(list)
    first_output: dict[str, str] = {}
    durations: list[float] = []
    try:
        first = tmp / "run-1"
        clone(first, commit)
        if args.venv:
            py = Path(args.venv).absolute() / "bin" / "python"
            if not py.exists():
                print(f"no interpreter at {py}", file=sys.stderr)
                return 2
        else:
            print(f"making a venv with {args.python} and installing {head}[test] ...")
            try:
                py = make_venv(args.python, tmp / "venv", first)
            except (subprocess.CalledProcessError, FileNotFoundError) as exc:
                detail = getattr(exc, "stderr", "") or exc
                print(f"cannot make the environment: {detail}", file=sys.stderr)
                return 2
        version = _run([str(py), "--version"]).stdout.strip()
        print(
            f"hunting on {head} with {version}: {args.runs} runs of `python -m pytest -q`,"
            f" {args.jobs} at a time"
        )
        lock = threading.Lock()

        def one_run(n: int) -> None:
            src = tmp / f"run-{n}"
            if n > 1:
                clone(src, commit)
            # as in CI (.ci/run): the tests run against the installed package alone, not a
            # second copy in the tree (pyright would see two of every class)
            shutil.rmtree(src / "apimart_async", ignore_errors=True)
            report = tmp / f"report-{n}.xml"
            started = time.monotonic()
            proc = subprocess.run(
                # xunit1: the report of a test that records properties (xunit2 warns, and
                # the suite's warnings are errors)
                [
                    str(py),
                    "-m",
                    "pytest",
                    "-q",
                    f"--junitxml={report}",
                    "-o",
                    "junit_family=xunit1",
                    *args.pytest_args,
                ],
                cwd=src,
                text=True,
                capture_output=True,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            )
            took = time.monotonic() - started
            (tmp / f"output-{n}.txt").write_text(proc.stdout + proc.stderr)
            summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
            found = failures(report)
            if proc.returncode not in (0, 1) or (proc.returncode == 1 and not found):
                # a crash, an interrupted run or a collection error: keep its whole output
                found.setdefault(
                    f"<run {n}: pytest exit {proc.returncode}>",
                    proc.stdout[-20000:] + proc.stderr[-5000:],
                )
            with lock:
                durations.append(took)
                for test, text in found.items():
                    failed_in[test].append(n)
                    first_output.setdefault(test, text)
                print(f"run {n}/{args.runs}: {summary} ({took:.0f} s)", flush=True)
            if not args.keep:
                shutil.rmtree(src, ignore_errors=True)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for done in [pool.submit(one_run, n) for n in range(1, args.runs + 1)]:
                done.result()
    finally:
        if args.keep:
            print(f"kept {tmp} (output-N.txt: each run's whole output)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    wall = (time.monotonic() - hunt_started) / 60
    print(f"{args.runs} runs, {sum(durations) / 60:.1f} min of runs in {wall:.1f} min")
    if not failed_in:
        print(f"no test failed in any of the {args.runs} runs")
        return 0
    print(f"{len(failed_in)} test(s) failed at least once:")
    for test, runs in sorted(failed_in.items()):
        print(f"  {test}: failed in {len(runs)} of {args.runs} runs (runs {runs})")
    for test, runs in sorted(failed_in.items()):
        print()
        print(f"===== {test} (first failure, run {runs[0]}) =====")
        print(first_output[test])
    return 1


if __name__ == "__main__":
    sys.exit(main())

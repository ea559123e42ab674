"""The benchmarks never rot: ``benchmarks/run.py --quick`` runs every scenario end to end.

Nothing here times anything: the figures are the script's business. What is checked is that
each scenario ran, accounted for every job, and wrote its results, table and plot (the plot
needs matplotlib, which the ``bench`` and ``dev`` extras install and the ``test`` extra does
not: without it the run says so and writes no plot, checked by the last test here).

The smoke run takes about a minute and a half of two cores: CI runs it once, in its dev lane
(with matplotlib), and deselects it in the test suites (``APIMART_TESTS_BENCH_ELSEWHERE=1``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.static

ROOT = Path(__file__).resolve().parent.parent


#: A bound for a hang, not a timing: the smoke run takes about 140 s on an idle machine and
#: took over 230 s (the old bound) with four suites side by side on 2 cores (flake hunt).
SMOKE_HANG_S = 900


@pytest.mark.bench
@pytest.mark.timeout(SMOKE_HANG_S + 20)
def test_quick_benchmark_run_writes_every_scenario(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=SMOKE_HANG_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True
    scenarios = results["scenarios"]
    assert set(scenarios) == {
        "polling",
        "overhead",
        "scale",
        "downloads",
        "gallery",
        "web",
        "startup",
        "webhooks",
        "workers",
    }

    polling = scenarios["polling"]["runs"]
    jobs = scenarios["polling"]["jobs"]
    assert {
        "apimart-async, batch route",
        "apimart-async, per-task GETs",
        "apimart-async, batch route, real network",
        "apimart-async, per-task GETs, real network",
        "apimart-async, batch route, real network, target_lag 1 s",
        "apimart-async, per-task GETs, real network, target_lag 1 s",
        "fixed 0.5 s loop per job",
        "fixed 1 s loop per job",
        "fixed 2 s loop per job",
        "fixed 3 s loop per job",
        "lower bound (one check at completion)",
    } == set(polling)
    for name, run in polling.items():
        if not run.get("analytic"):
            assert run["outcomes"] == run["tasks_created"] == jobs, name
            assert run["status_requests"] > 0, name
    # The batch route carries up to 100 ids a request: far fewer requests than jobs.
    assert polling["apimart-async, batch route"]["status_requests"] < jobs
    assert polling["apimart-async, batch route, real network"]["status_requests"] < jobs

    overhead = scenarios["overhead"]["runs"]
    assert overhead["bare aiohttp (1 POST + 1 GET per job)"]["requests_per_job"] == 2.0
    assert all(run["cpu_s"] > 0 and run["peak_rss_mb"] > 0 for run in overhead.values())
    # issue 16's parts: the bare POST alone, and one status read each way
    assert overhead["bare aiohttp, POST only (half the floor)"]["requests_per_job"] == 1.0
    reads = scenarios["overhead"]["reads"]
    assert set(reads["median_us"]) == {"bare", "sdk"}
    assert all(len(runs) == 5 and min(runs) > 0 for runs in reads["us_per_read"].values())

    scale = scenarios["scale"]
    assert scale["pending"] == scale["tasks"]
    assert scale["rounds"] >= 2
    assert scale["bytes_per_task"] > 0

    downloads = scenarios["downloads"]["runs"]
    assert len(downloads) == 6  # bare, bare + sha256 + fsync + rename, the SDK; two sizes
    assert all(run["bytes"] == run["size_mb"] * 1_000_000 for run in downloads.values())

    gallery = scenarios["gallery"]
    assert gallery["jobs"] == 1000 and gallery["page_bytes"] > 100_000
    if gallery["browser"] is not None:  # figures from Chromium where it is installed
        assert gallery["load_ms"] > 0 and gallery["videos_in_place_at_load"] > 0

    web = scenarios["web"]  # the reference app under uvicorn (issue 21)
    assert web["ok"] == web["distinct_tasks"] == web["tasks_created"] == web["requests"]
    assert web["replay_outcomes"] == web["replayed_jobs"]
    assert web["lag_samples"] > 0 and web["status_requests"] > 0
    killed = web["sigkill"]
    assert killed["unfinished_found"] == killed["tasks_created"] > 0

    startup = scenarios["startup"]  # issue 16: fresh processes, figures present
    assert startup["help_s"] > 0 and startup["plugin_import_ms"] > 0
    assert startup["plugin_imports_aiohttp"] is False
    assert startup["dry_run"]["lines"] == 500
    files = startup["jobs_files"]
    assert [f["lines"] for f in files.values()] == [500, 2000]
    assert all(f["lines_per_s"] > 0 and f["peak_rss_mb"] > 0 for f in files.values())
    assert files["2000"]["first_submit"]["s"] > 0
    assert startup["check_profile_us_per_line"]["the whole pass"] > 0

    hooks = scenarios["webhooks"]["runs"]  # issue 15: webhooks on, and the same jobs polled
    assert {
        "webhooks on, batch route",
        "webhooks on, per-task GETs",
        "webhooks off (polling), batch route",
        "webhooks off (polling), per-task GETs",
    } == set(hooks)
    for name, run in hooks.items():
        assert run["outcomes"] == run["tasks_created"] == scenarios["webhooks"]["jobs"], name
        on = name.startswith("webhooks on")
        assert run["callbacks"]["received"] == (run["jobs"] if on else 0), name
        assert (run["callback_to_outcome_p99_s"] is not None) == on, name
    # a callback costs one read without the batch route; the polled jobs cost more
    per_task = hooks["webhooks on, per-task GETs"]["status_requests"]
    assert per_task < hooks["webhooks off (polling), per-task GETs"]["status_requests"]

    targets = results["targets"]
    assert len(targets) >= 12
    assert all(isinstance(t["met"], bool) and t["measured"] for t in targets)
    text = (tmp_path / "RESULTS.md").read_text()
    for heading in (
        "## Targets",
        "## 1. Polling",
        "## 2. Client overhead",
        "## 3. Scale",
        "## 4. Downloads",
        "## 5. Gallery",
        "## 6. Web",
        "## 7. Start-up",
        "## 8. Webhooks",
    ):
        assert heading in text
    if importlib.util.find_spec("matplotlib") is not None:  # the bench and dev extras
        assert results["plot"] == "polling.png"
        assert (tmp_path / "polling.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert "(polling.png)" in text
    else:  # the test extra: no plotting library, and the run says so instead of failing
        assert results["plot"] is None
        assert not (tmp_path / "polling.png").exists()
        assert "matplotlib is not installed" in proc.stderr
        assert "polling.png" not in text


def test_without_matplotlib_the_run_says_so_and_writes_no_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec.loader.exec_module(bench)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # ``import matplotlib`` fails
    assert bench.make_plot({"scenarios": {}}, tmp_path / "polling.png") is False
    assert not (tmp_path / "polling.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_instructions_reads_the_count_valgrind_prints_and_fails_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``benchmarks/instructions.py`` takes the last ``Collected :`` line of callgrind's
    output (a job's instructions are the difference of two such counts) and refuses an output
    without one rather than report nothing as zero."""
    path = ROOT / "benchmarks" / "instructions.py"
    spec = importlib.util.spec_from_file_location("bench_instructions", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec.loader.exec_module(module)
    output = "==12== Events    : Ir\n==12== Collected : 2575035872\n==12==\n==12== I   refs:"
    assert module.collected(output) == 2_575_035_872
    with pytest.raises(RuntimeError, match="no instruction count"):
        module.collected("valgrind: command failed")

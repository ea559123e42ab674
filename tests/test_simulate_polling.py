"""``benchmarks/simulate_polling.py`` never rots: a tiny run writes its JSON and its section of
RESULTS.md, accounting for every job on every row. No figure is judged here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "simulate_polling", ROOT / "benchmarks" / "simulate_polling.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["simulate_polling"] = module
    spec.loader.exec_module(module)
    return module


def test_a_tiny_simulation_writes_its_table_and_keeps_the_rest(tmp_path: Path) -> None:
    sim = load()
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n\n## 1. Polling\nkept\n")
    assert sim.main(["--jobs", "40", "--pending", "10", "--out", str(tmp_path)]) == 0
    assert sim.main(["--jobs", "40", "--pending", "10", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## 1. Polling\nkept\n" in text
    assert text.count(sim.TITLE) == 1  # a second run replaces its section
    results = json.loads((tmp_path / "simulate_polling.json").read_text())
    assert results["jobs"] == 40
    rows = results["rows"]
    routes = {r["route"] for r in rows}
    assert routes == {"batch route", "per-task reads"}
    for route in ("batch route", "per-task reads"):
        fixed = sorted(r["interval"] for r in rows if r["route"] == route and r["kind"] == "fixed")
        assert fixed == list(sim.LAGS)
        sdk = [r["interval"] for r in rows if r["route"] == route and r["kind"] == "sdk"]
        assert sdk == list(sim.LAGS)  # one SDK row per target_lag
        runs = [r["client"] for r in rows if r["route"] == route and r["kind"] == "priors"]
        assert [c.rsplit(", ", 1)[1] for c in runs] == ["first run", "second run"]
    for r in rows:
        assert r["requests_per_job"] > 0
        assert math.isfinite(r["lag_p99"]) and r["lag_p50"] <= r["lag_p99"] <= r["lag_max"]
        assert r["lag_p50"] >= 0  # every job was seen, none before its end
        if r["kind"] != "priors":
            assert f"| {r['route']} | {r['client']} |" in text
    assert text.count("| first run |") == 2 and text.count("| second run |") == 2

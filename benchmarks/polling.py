"""Polling cost and latency: this SDK's shared poller against fixed-interval per-job loops.

    python benchmarks/polling.py            # 1,000 jobs of 5-20 s (about 2 minutes)
    python benchmarks/polling.py --quick    # 200 jobs of 2-6 s

Each run gets a fresh emulator in its own process (durations uniform in the range,
``estimated_time`` within 20 %). Figures: status requests per job (counted at the emulator),
completion-to-outcome latency (the emulator's exact finish time to the moment the client
knows), wall time. Writes benchmarks/results/polling.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp
from _harness import HERE, admin, emulator_process, percentile

import apimart_async as am

PROMPT = "a cat on a skateboard"


async def run_sdk(jobs: int, duration: str, *, batch_route: bool) -> dict[str, Any]:
    args = ["--duration", duration, "--seed", "1"] + ([] if batch_route else ["--no-batch-route"])
    async with emulator_process(*args) as emu:
        known: dict[str, float] = {}
        start = time.monotonic()
        async with am.AsyncApimart(emu["api_key"], base_url=emu["base_url"]) as client:
            requests = (am.VideoRequest("sora-2-preview", f"{PROMPT} {i}") for i in range(jobs))
            async with client.batch(requests, concurrency=32) as results:
                async for outcome in results:
                    assert outcome.ok, outcome.error
                    known[outcome.task_id or ""] = time.time()
        wall = time.monotonic() - start
        return await _figures(emu, known, jobs, wall)


async def run_fixed(jobs: int, duration: str, interval: float) -> dict[str, Any]:
    """What other SDKs do: one loop per job, a GET every ``interval`` seconds."""
    async with emulator_process("--duration", duration, "--seed", "1") as emu:
        known: dict[str, float] = {}
        headers = {"Authorization": f"Bearer {emu['api_key']}"}
        start = time.monotonic()
        sem = asyncio.Semaphore(32)
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(
            emu["base_url"], headers=headers, connector=connector
        ) as http:

            async def one(i: int) -> None:
                async with sem:
                    body = {"model": "sora-2-preview", "prompt": f"{PROMPT} {i}"}
                    async with http.post("/v1/videos/generations", json=body) as r:
                        task_id = (await r.json())["data"][0]["task_id"]
                while True:
                    await asyncio.sleep(interval)
                    async with http.get(f"/v1/tasks/{task_id}") as r:
                        status = (await r.json())["data"]["status"]
                    if status in ("completed", "failed"):
                        known[task_id] = time.time()
                        return

            await asyncio.gather(*(one(i) for i in range(jobs)))
        wall = time.monotonic() - start
        return await _figures(emu, known, jobs, wall)


async def _figures(
    emu: dict[str, Any], known: dict[str, float], jobs: int, wall: float
) -> dict[str, Any]:
    stats = await admin(emu["base_url"], "/_emulator/stats")
    finished = await admin(emu["base_url"], "/_emulator/finished")
    latency = [known[t] - finished[t] for t in known if t in finished]
    status_requests = stats["requests"].get("task", 0) + stats["requests"].get("batch", 0)
    return {
        "jobs": jobs,
        "tasks_created": stats["tasks_created"],
        "status_requests": status_requests,
        "status_requests_per_job": round(status_requests / jobs, 3),
        "latency_p50_s": round(percentile(latency, 50), 3),
        "latency_p99_s": round(percentile(latency, 99), 3),
        "wall_s": round(wall, 1),
    }


async def main(quick: bool) -> dict[str, Any]:
    jobs, duration = (200, "2-6") if quick else (1000, "5-20")
    runs: dict[str, Any] = {}
    runs["apimart-async, batch route"] = await run_sdk(jobs, duration, batch_route=True)
    runs["apimart-async, per-task GETs"] = await run_sdk(jobs, duration, batch_route=False)
    runs["fixed 1 s loop per job"] = await run_fixed(jobs, duration, 1.0)
    runs["lower bound (one check at completion)"] = {
        "jobs": jobs,
        "status_requests_per_job": 1.0,
        "latency_p50_s": 0.0,
        "latency_p99_s": 0.0,
    }
    return {"scenario": "polling", "quick": quick, "durations_s": duration, "runs": runs}


TARGETS = {
    "apimart-async, batch route": 0.2,
    "apimart-async, per-task GETs": 3.0,
}
P99_TARGET_S = 1.5


def verdicts(result: dict[str, Any]) -> list[str]:
    out = []
    for name, limit in TARGETS.items():
        r = result["runs"][name]
        ok = r["status_requests_per_job"] <= limit and r["latency_p99_s"] <= P99_TARGET_S
        out.append(
            f"- {name}: {r['status_requests_per_job']} requests/job (target <= {limit}), "
            f"p99 {r['latency_p99_s']} s (target <= {P99_TARGET_S}): {'met' if ok else 'NOT met'}"
        )
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        "| policy | status requests / job | latency p50 (s) | latency p99 (s) | wall (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in result["runs"].items():
        lines.append(
            f"| {name} | {r['status_requests_per_job']} | {r['latency_p50_s']} | "
            f"{r['latency_p99_s']} | {r.get('wall_s', '')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    ns = parser.parse_args()
    result = asyncio.run(main(ns.quick))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = "polling-quick" if ns.quick else "polling"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join([table(result), "", *verdicts(result)])
    (out / f"{stem}.md").write_text(
        f"# Polling: {result['runs']['apimart-async, batch route']['jobs']} jobs of "
        f"{result['durations_s']} s\n\n{text}\n"
    )
    print(text)

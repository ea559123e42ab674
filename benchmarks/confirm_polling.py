"""Confirm the polling simulator over real sockets: the same jobs, run for real and simulated.

A client runs ``--jobs`` jobs against ``Emulator(profile="realistic", time_scale=S)`` (the
client follows the emulator's clock, ``testing.follow_clock``); then ``simulate_polling`` runs
the SDK's schedule over exactly those tasks (their submit times, durations, estimates and
progress curves, taken from the emulator). Status requests per job and lag p50/p99 of both are
printed side by side. A time scale above 1 turns each millisecond the machine stalls into S ms
of the emulator's time, so lags over sockets read high on a loaded machine; requests per job
do not depend on it.

``python benchmarks/confirm_polling.py --jobs 1000 --time-scale 10`` (per-task reads:
``--no-batch-route``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import simulate_polling as sim  # noqa: E402

import apimart_async as am  # noqa: E402
from apimart_async._priors import kind_of  # noqa: E402
from apimart_async.emulator import Emulator, RealisticProfile  # noqa: E402
from apimart_async.testing import follow_clock  # noqa: E402


async def run_real(n: int, scale: float, batch_route: bool, seed: int) -> dict[str, Any]:
    profile = RealisticProfile()
    async with Emulator(
        profile=profile, time_scale=scale, seed=seed, batch_route=batch_route, balance=None
    ) as emu:
        async with am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, status_concurrency=8
        ) as client:
            follow_clock(client, emu)
            # how late each check leaves after it fell due (the poller's clock)
            schedule = client._poller.schedule
            due = schedule.due
            late: list[float] = []

            def timed_due(now: float, **kw: Any) -> list[str]:
                ids = due(now, **kw)
                late.extend(now - (schedule.due_at(i) or now) for i in ids)
                return ids

            schedule.due = timed_due  # type: ignore[method-assign]
            jobs = [
                am.VideoRequest("sora-2-preview", f"a cat {i}", duration=8)
                if i % 2
                else am.VideoRequest(
                    "viduq3", f"a bear {i}", image_urls=["https://e.com/b.png"], duration=5
                )
                for i in range(n)
            ]
            seen: dict[str, float] = {}
            kinds: dict[str, str | None] = {}
            async with client.batch(jobs, concurrency=32, max_pending=n) as results:
                async for outcome in results:
                    if outcome.task is not None:
                        seen[outcome.task.id] = emu.clock.now()
                        req = outcome.request
                        kinds[outcome.task.id] = None if req is None else kind_of(req)
            reads = client._poller.reads
            window = reads.max_in_flight_seen
            rtts = (reads.min_rtt, reads.srtt, reads.cuts)
        state = emu.state
        reads = state.requests["batch"] + state.requests["task"]
        t0 = min(t.created for t in state.tasks.values())
        drawn = [
            sim.Job(t.id, t.created - t0, t.duration, t.estimated, t.curve, kinds[t.id])
            for t in sorted(state.tasks.values(), key=lambda t: t.created)
            if t.curve is not None
        ]
        lags = [seen[t.id] - (t.created + t.duration) for t in state.tasks.values()]
        return {
            "requests_per_job": reads / n,
            "lag_p50": sim.percentile(lags, 50),
            "lag_p99": sim.percentile(lags, 99),
            "jobs": drawn,
            "profile": profile,
            "max_in_flight": window,
            "late_p99": sim.percentile(late, 99),
            "late_max": max(late, default=0.0),
            "late_over_1s": sum(x > 1.0 for x in late) / max(1, len(late)),
            "window_rtt": rtts,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--time-scale", type=float, default=10.0)
    p.add_argument("--no-batch-route", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the comparison as JSON here")
    ns = p.parse_args(argv)
    batched = not ns.no_batch_route
    real = asyncio.run(run_real(ns.jobs, ns.time_scale, batched, ns.seed))
    simulated = sim.simulate_sdk(
        real["jobs"],
        am.PollPolicy(),
        batched=batched,
        profile=real["profile"],
        concurrency=1 if batched else 8,  # batch requests of a round: one after another
        max_concurrency=64,
        seed=ns.seed,
    )
    keys = ("requests_per_job", "lag_p50", "lag_p99", "max_in_flight", "late_p99", "late_max")
    rows = {
        "sockets": {k: real[k] for k in keys},
        "simulated": {k: simulated.get(k) for k in keys},
    }
    route = "batch route" if batched else "per-task reads"
    print(f"{ns.jobs} jobs, {route}, time scale {ns.time_scale:g}")
    print(
        "| run | status requests per job | lag p50 (s) | lag p99 (s) | reads in flight, most "
        "| check left after due, p99 / max (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        most = "" if batched or r["max_in_flight"] is None else r["max_in_flight"]
        late = "" if r["late_p99"] is None else f"{r['late_p99']:.2f} / {r['late_max']:.2f}"
        print(
            f"| {name} | {r['requests_per_job']:.3f} | {r['lag_p50']:.2f} | "
            f"{r['lag_p99']:.2f} | {most} | {late} |"
        )
    if not batched:
        lo, smooth, cuts = real["window_rtt"]
        print(
            f"sockets: reads' round trip fastest {lo or 0:.3f} s, smoothed {smooth or 0:.3f} s, "
            f"{cuts} cut(s); {real['late_over_1s']:.1%} of checks left over 1 s after due"
        )
    if ns.out is not None:
        ns.out.write_text(json.dumps({"jobs": ns.jobs, "route": route, **rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

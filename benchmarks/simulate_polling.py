"""Simulate polling on the realistic profile: the SDK's schedule against fixed loops.

No sockets and no real time: the SDK's logic-only ``PollSchedule`` runs on a fake clock over
jobs drawn from the emulator's ``RealisticProfile`` (the same durations, estimates, progress
curves and round trips the emulator serves with ``profile="realistic"``). It reports, per
route and per policy, status requests per job and the lag from a task's end to the moment the
client holds the reply that says so (p50, p99).

The model of the client (as ``_poller.Poller`` runs it):

- jobs arrive at a steady rate, so that about ``--pending`` are running at a time;
- the poller runs rounds one after another: a round takes the ids ``due`` now, sends them (the
  batch route: one request per 100 ids; per-task reads: one request per id, ``--concurrency``
  at a time), the service reads each task's state half a round trip after the request leaves,
  and the schedule hears about all of them when the round's last reply is back;
- a **fixed loop** of interval ``I`` (the vendor's client): per-task, each task checked every
  ``I`` s from its submit; on the batch route, every pending task in one round every ``I`` s.
  Fixed loops are computed in closed form (no schedule to run).

``python benchmarks/simulate_polling.py`` (100,000 jobs) writes ``simulate_polling.json`` and
the section "Polling on the realistic profile (simulated)" of ``RESULTS.md`` next to it;
``--jobs 300 --out DIR`` for a quick run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import apimart_async as am  # noqa: E402
from apimart_async._schedule import BATCH_IDS, PollSchedule  # noqa: E402
from apimart_async.emulator import RealisticProfile  # noqa: E402
from apimart_async.emulator._realistic import Curve  # noqa: E402

LAGS = (1.0, 2.0, 5.0, 10.0, 30.0)
#: (model, clip seconds) of the simulated jobs, drawn evenly.
KINDS = (("sora-2-preview", 8), ("viduq3", 5))
SECTION = "simulate_polling"
TITLE = "## Polling on the realistic profile (simulated)"


@attrs.define(slots=True)
class Job:
    id: str
    submit: float
    duration: float
    estimate: int
    curve: Curve

    @property
    def end(self) -> float:
        return self.submit + self.duration


def make_jobs(n: int, pending: int, seed: int, profile: RealisticProfile) -> list[Job]:
    rng = random.Random(seed)
    drawn = []
    for i in range(n):
        model, clip = KINDS[i % len(KINDS)]
        duration, estimate, curve = profile.draw(rng, model, clip)
        drawn.append((duration, estimate, curve))
    mean = sum(d for d, _, _ in drawn) / max(1, n)
    rate = pending / mean  # jobs per second that keeps about ``pending`` running
    return [Job(f"t{i}", i / rate, d, e, c) for i, (d, e, c) in enumerate(drawn)]


def status_at(job: Job, t: float) -> am.Task:
    status, progress = job.curve.status(t - job.submit)
    return am.Task(
        id=job.id,
        status=am.TaskStatus(status),
        progress=progress,
        estimated_time=float(job.estimate),
    )


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def summary(jobs: Sequence[Job], seen: dict[str, float], requests: int) -> dict[str, float]:
    lags = [seen[j.id] - j.end for j in jobs]
    return {
        "requests_per_job": requests / len(jobs),
        "lag_p50": percentile(lags, 50),
        "lag_p99": percentile(lags, 99),
        "lag_max": max(lags),
    }


def simulate_sdk(
    jobs: Sequence[Job],
    policy: am.PollPolicy,
    *,
    batched: bool,
    profile: RealisticProfile,
    concurrency: int,
    seed: int,
) -> dict[str, float]:
    """Run the SDK's schedule as the poller does, on a fake clock."""
    rng = random.Random(seed)
    schedule = PollSchedule(policy, seed=seed)
    by_id = {j.id: j for j in jobs}
    seen: dict[str, float] = {}
    requests = 0
    now = 0.0
    nxt = 0  # next job to arrive
    while len(seen) < len(jobs):
        while nxt < len(jobs) and jobs[nxt].submit <= now:
            j = jobs[nxt]
            schedule.add(j.id, now=now, submitted_at=j.submit)
            nxt += 1
        ids = schedule.due(now, batched=batched)
        if not ids:
            wake = schedule.next_wakeup()
            arrival = jobs[nxt].submit if nxt < len(jobs) else math.inf
            now = max(now, min(wake if wake is not None else math.inf, arrival))
            continue
        # one round: requests go out in waves of ``concurrency``
        if batched:
            chunks = [ids[i : i + BATCH_IDS] for i in range(0, len(ids), BATCH_IDS)]
        else:
            chunks = [[i] for i in ids]
        requests += len(chunks)
        end = now
        read: dict[str, float] = {}
        for w in range(0, len(chunks), concurrency):
            start = end
            longest = 0.0
            for chunk in chunks[w : w + concurrency]:
                rtt = profile.round_trip(rng)
                longest = max(longest, rtt)
                for task_id in chunk:
                    read[task_id] = start + rtt / 2
            end = start + longest
        now = end
        for task_id in ids:
            task = status_at(by_id[task_id], read[task_id])
            if schedule.on_status(task, now):
                seen[task_id] = now
    return summary(jobs, seen, requests)


def fixed_per_task(
    jobs: Sequence[Job], interval: float, profile: RealisticProfile, seed: int
) -> dict[str, float]:
    """Each task checked every ``interval`` s from its submit (one read per check)."""
    rng = random.Random(seed)
    seen: dict[str, float] = {}
    requests = 0
    half = profile.rtt / 2
    for j in jobs:
        # the k-th check leaves at submit + k*I and reads the task about half a trip later
        k = max(1, math.ceil((j.duration - half) / interval))
        while True:
            rtt = profile.round_trip(rng)
            if k * interval + rtt / 2 >= j.duration:
                break
            k += 1
        requests += k
        seen[j.id] = j.submit + k * interval + rtt
    return summary(jobs, seen, requests)


def fixed_batch(
    jobs: Sequence[Job], interval: float, profile: RealisticProfile, seed: int
) -> dict[str, float]:
    """One round every ``interval`` s over every pending task, 100 ids per request."""
    rng = random.Random(seed)
    seen: dict[str, float] = {}
    requests = 0
    # rounds at k*I; a task first in a round once submitted; seen in the first round whose
    # read (half a trip after it leaves) is at or after its end
    ends = sorted((j.end, j.id) for j in jobs)
    submits = [j.submit for j in jobs]  # ascending
    pos_end = 0
    pending_seen = 0
    last = ends[-1][0] + interval + 1
    k = 1
    while k * interval <= last + interval:
        t = k * interval
        rtt = profile.round_trip(rng)
        read = t + rtt / 2
        arrived = _count_le(submits, t)
        done_now = []
        while pos_end < len(ends) and ends[pos_end][0] <= read:
            done_now.append(ends[pos_end][1])
            pos_end += 1
        # pending at this round: arrived and not seen in an earlier round
        pending = arrived - pending_seen
        if pending > 0:
            requests += math.ceil(pending / BATCH_IDS)
        for task_id in done_now:
            seen[task_id] = t + rtt
        pending_seen += len(done_now)
        if len(seen) == len(jobs):
            break
        k += 1
    return summary(jobs, seen, requests)


def _count_le(values: Sequence[float], x: float) -> int:
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        if values[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def has_target_lag() -> bool:
    return any(f.name == "target_lag" for f in attrs.fields(am.PollPolicy))


def run(
    n: int, *, pending: int, seed: int, concurrency: int, wide: int, lags: Sequence[float]
) -> dict[str, Any]:
    profile = RealisticProfile()
    t0 = time.process_time()
    jobs = make_jobs(n, pending, seed, profile)
    rows: list[dict[str, Any]] = []
    sdk_policies: list[tuple[str, float | None, am.PollPolicy]]
    if has_target_lag():
        sdk_policies = [
            (f"SDK, target_lag {lag:g} s", lag, am.PollPolicy(target_lag=lag))  # type: ignore[call-arg]
            for lag in lags
        ]
    else:
        sdk_policies = [("SDK (PollPolicy defaults)", None, am.PollPolicy())]
    for route, batched, conc in (
        ("batch route", True, concurrency),
        ("per-task reads", False, concurrency),
        (f"per-task reads, {wide} at a time", False, wide),
    ):
        for name, lag, policy in sdk_policies:
            cpu = time.process_time()
            figures = simulate_sdk(
                jobs,
                policy,
                batched=batched,
                profile=profile,
                concurrency=conc,
                seed=seed,
            )
            rows.append(
                {
                    "route": route,
                    "client": name,
                    "kind": "sdk",
                    "interval": lag,
                    **figures,
                    "cpu_seconds": time.process_time() - cpu,
                }
            )
        if conc == wide:
            continue  # the fixed loops do not depend on the concurrency
        for lag in lags:
            fixed = fixed_batch if batched else fixed_per_task
            figures = fixed(jobs, lag, profile, seed)
            rows.append(
                {
                    "route": route,
                    "client": f"fixed loop, every {lag:g} s",
                    "kind": "fixed",
                    "interval": lag,
                    **figures,
                }
            )
    return {
        "jobs": n,
        "pending": pending,
        "seed": seed,
        "concurrency": concurrency,
        "wide": wide,
        "rtt": profile.rtt,
        "kinds": [f"{m} {c} s" for m, c in KINDS],
        "durations": {k: list(v) for k, v in profile.durations.items()},
        "estimate_error": profile.estimate_error,
        "rows": rows,
        "cpu_seconds": time.process_time() - t0,
    }


def table(results: dict[str, Any]) -> str:
    kinds = ", ".join(results["kinds"])
    lines = [
        TITLE,
        "",
        f"`benchmarks/simulate_polling.py`: {results['jobs']:,} jobs of the emulator's realistic "
        f"profile ({kinds}; sora-2 60-240 s, viduq3 30-120 s; `estimated_time` off by up to "
        f"{results['estimate_error']:.0%}; uneven progress; a {results['rtt']:g} s round trip, "
        f"jittered), about {results['pending']:,} running at a time, the SDK's `PollSchedule` on "
        f"a fake clock ({results['cpu_seconds']:.0f} s of CPU). Lag: from a task's end to the "
        "reply that says so in the client's hands.",
        "",
        "| route | client | status requests per job | lag p50 (s) | lag p99 (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['route']} | {r['client']} | {r['requests_per_job']:.3f} | "
            f"{r['lag_p50']:.2f} | {r['lag_p99']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    start, stop = f"<!-- {SECTION} -->", f"<!-- /{SECTION} -->"
    block = f"{start}\n{text}{stop}\n"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in old and stop in old:
        head, rest = old.split(start, 1)
        _, tail = rest.split(stop, 1)
        new = head + block + tail.lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--pending", type=int, default=1000, help="jobs running at a time")
    p.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="requests in flight per round (the client's status_concurrency, default 8)",
    )
    p.add_argument(
        "--wide", type=int, default=64, help="per-task reads again with this many in flight"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS.md and the JSON")
    ns = p.parse_args(argv)
    if ns.jobs < 1 or ns.pending < 1 or ns.concurrency < 1:
        p.error("--jobs, --pending and --concurrency must be >= 1")
    results = run(
        ns.jobs,
        pending=ns.pending,
        seed=ns.seed,
        concurrency=ns.concurrency,
        wide=ns.wide,
        lags=LAGS,
    )
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "simulate_polling.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    write_section(ns.out / "RESULTS.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

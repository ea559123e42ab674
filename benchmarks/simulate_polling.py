"""Simulate polling on the realistic profile: the SDK's schedule against fixed loops.

No sockets and no real time: the SDK's logic-only ``PollSchedule`` runs on a fake clock over
jobs drawn from the emulator's ``RealisticProfile`` (the same durations, estimates, progress
curves and round trips the emulator serves with ``profile="realistic"``). It reports, per
route and per policy, status requests per job and the lag from a task's end to the moment the
client holds the reply that says so (p50, p99).

The model of the client (as ``_poller.Poller`` runs it):

- jobs arrive at a steady rate, so that about ``--pending`` are running at a time;
- batch route: the poller runs rounds one after another: a round takes the ids ``due`` now and
  sends them, one request per 100 ids, one request after another (as ``Tasks._statuses``
  does); the service reads each task's state half a round trip after the request leaves, and
  the schedule hears about all of them when the round's last reply is back;
- per-task reads: each read leaves when it falls due, as long as the client's
  ``StatusWindow`` (AIMD, from ``--concurrency`` up to ``--max-concurrency`` in flight) has
  room, and its reply is reported alone when it is back (as ``Poller._read_one`` does);
- learned priors: at the default ``target_lag``, a run of 1,000 jobs (submitted at once) with a
  fresh schedule, then a second run of 1,000 others of the same kinds with the priors the
  first learned (a batch's journal carries them from one run to the next);
- a **fixed loop** of interval ``I`` (the vendor's client): per-task, each task checked every
  ``I`` s from its submit; on the batch route, every pending task in one round every ``I`` s.
  Fixed loops are computed in closed form (no schedule to run).

``python benchmarks/simulate_polling.py`` (100,000 jobs) writes ``simulate_polling.json``,
``simulate_polling.png`` (with matplotlib) and the section "Polling on the realistic profile
(simulated)" of ``RESULTS.md`` next to it; ``--jobs 300 --out DIR`` for a quick run.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import resource
import sys
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # a spawned worker imports this module by name

import apimart_async as am  # noqa: E402
from apimart_async._poll_schedule import BATCH_IDS, PollSchedule  # noqa: E402
from apimart_async._priors import Priors  # noqa: E402
from apimart_async._status_window import StatusWindow  # noqa: E402
from apimart_async.emulator import RealisticProfile  # noqa: E402
from apimart_async.emulator._realistic import Curve  # noqa: E402

LAGS = (1.0, 2.0, 5.0, 10.0, 30.0)
#: ``PollPolicy().target_lag``: where the learned priors are measured.
DEFAULT_LAG = 2.0
#: Jobs per run in the learned-priors comparison (the issue's 1,000-job runs).
RUN_JOBS = 1000
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
    kind: str | None = None
    #: ``estimate`` as ``Task.estimated_time`` holds it
    estimated: float = attrs.field(
        init=False, default=attrs.Factory(lambda job: float(job.estimate), takes_self=True)
    )
    #: what the last read of the job returned (``read``: one reply per job, updated at each
    #: read; the schedule keeps nothing of a reply)
    reply: Reply = attrs.field(
        init=False, default=attrs.Factory(lambda job: Reply(job.id, job.estimated), takes_self=True)
    )
    #: ``curve.status`` as ``read`` evaluates it: until when the job is ``submitted``, then
    #: ``pending``, the knots, and when it ends
    submitted_until: float = attrs.field(init=False)
    pending_until: float = attrs.field(init=False)
    ages: tuple[float, ...] = attrs.field(init=False)
    values: tuple[float, ...] = attrs.field(init=False)
    ends: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        curve = self.curve
        start = curve.queued * curve.duration
        self.submitted_until, self.pending_until = start / 3, start
        self.ages, self.values, self.ends = curve.ages, curve.values, curve.duration

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
    return [
        Job(f"t{i}", i / rate, d, e, c, kind_key(*KINDS[i % len(KINDS)]))
        for i, (d, e, c) in enumerate(drawn)
    ]


def kind_key(model: str, clip: int) -> str:
    """The kind of a job as ``_priors.kind_of`` names it (text prompt, no resolution)."""
    return f"{model}/{clip}//text"


class Reply:
    """What a status read returns, as much of an ``am.Task`` as ``PollSchedule.on_status``
    reads (a ``Task`` costs more to build than the schedule costs to run). Each job has one
    (``Job.reply``), which ``read`` updates. ``status_task`` makes it a ``Task``."""

    __slots__ = ("estimated_time", "id", "is_terminal", "ok", "progress", "status")
    created = None

    def __init__(self, task_id: str, estimated: float) -> None:
        self.id = task_id
        self.estimated_time = estimated
        self.status, self.is_terminal, self.ok = _READS["submitted"]
        self.progress = 0


#: ``TaskStatus`` by value, and its (``TaskStatus``, ``is_terminal``, ``ok``)
_STATUS = {status.value: status for status in am.TaskStatus}
_READS = {s.value: (s, s.is_terminal, s is am.TaskStatus.COMPLETED) for s in am.TaskStatus}


def read(job: Job, t: float) -> Reply:
    """``job.reply``, now what a read of ``job`` at time ``t`` returns: ``job.curve.status``
    at its age then (its steps spelled out on the job's fields: this runs at every check)."""
    reply = job.reply
    age = t - job.submit
    if age >= job.ends:
        reply.status, reply.is_terminal, reply.ok = _COMPLETED
        reply.progress = 100
        return reply
    if age < job.pending_until:
        reply.status, reply.is_terminal, reply.ok = (
            _SUBMITTED if age < job.submitted_until else _PENDING
        )
        reply.progress = 0
        return reply
    reply.status, reply.is_terminal, reply.ok = _PROCESSING
    ages = job.ages
    i = bisect_right(ages, age)
    if i <= 0:
        reply.progress = 0
        return reply
    values = job.values
    if i >= len(ages):
        reply.progress = int(values[-1])
        return reply
    a0, a1 = ages[i - 1], ages[i]
    v0 = values[i - 1]
    frac = 0.0 if a1 <= a0 else (age - a0) / (a1 - a0)
    reply.progress = int(v0 + (values[i] - v0) * frac)
    return reply


_COMPLETED, _SUBMITTED, _PENDING, _PROCESSING = (
    _READS[s] for s in ("completed", "submitted", "pending", "processing")
)


def status_at(job: Job, t: float) -> am.Task:
    """What a read of ``job`` at time ``t`` returns (a ``Reply`` standing in for the Task)."""
    return read(job, t)  # type: ignore[return-value]


def status_task(job: Job, t: float) -> am.Task:
    """The ``Task`` a read of ``job`` at time ``t`` returns (what ``Reply`` stands in for)."""
    status, progress = job.curve.status(t - job.submit)
    return am.Task(job.id, _STATUS[status], progress, job.estimated)


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
    max_concurrency: int = 64,
    priors: Priors | None = None,
    trace: list[tuple[float, str, float, float]] | None = None,
) -> dict[str, Any]:
    """Run the SDK's schedule as the poller does, on a fake clock. ``priors``: what an earlier
    run learned (the schedule starts from them and goes on learning into them); ``trace``:
    gets (left at, id, read at, back at) of every check, in the order they are reported."""
    rng = random.Random(seed)
    schedule = PollSchedule(policy, seed=seed)
    if priors is not None:
        schedule.priors = priors
    if not batched:
        return _per_task(jobs, schedule, profile, rng, concurrency, max_concurrency, trace)
    by_id = {j.id: j for j in jobs}
    seen: dict[str, float] = {}
    requests = 0
    now = 0.0
    nxt = 0  # next job to arrive
    n = len(jobs)
    done = 0
    add, due, next_wakeup = schedule.add, schedule.due, schedule.next_wakeup
    on_status, round_trip = schedule.on_status, _round_trip(profile, rng)
    while done < n:
        while nxt < n and jobs[nxt].submit <= now:
            j = jobs[nxt]
            add(j.id, now=now, submitted_at=j.submit, kind=j.kind)
            nxt += 1
        ids = due(now, batched=True)
        if not ids:
            wake = next_wakeup()
            arrival = jobs[nxt].submit if nxt < n else math.inf
            now = max(now, min(wake if wake is not None else math.inf, arrival))
            continue
        # one round: requests of up to 100 ids, ``concurrency`` at a time; the service reads
        # each id half a round trip after its request leaves
        requests += -(-len(ids) // BATCH_IDS)
        reads: list[float] = []
        start_at = end = now
        for wave in range(0, len(ids), BATCH_IDS * concurrency):
            start = end
            longest = 0.0
            for first in range(wave, min(len(ids), wave + BATCH_IDS * concurrency), BATCH_IDS):
                rtt = round_trip()
                if rtt > longest:
                    longest = rtt
                reads.extend([start + rtt / 2] * min(BATCH_IDS, len(ids) - first))
            end = start + longest
        now = end
        for task_id, read_at in zip(ids, reads, strict=True):
            if trace is not None:
                trace.append((start_at, task_id, read_at, now))
            if on_status(read(by_id[task_id], read_at), now):  # type: ignore[arg-type]
                seen[task_id] = now
                done += 1
    return {**summary(jobs, seen, requests), "priors": schedule.priors}


def _round_trip(profile: RealisticProfile, rng: random.Random) -> Callable[[], float]:
    """``profile.round_trip(rng)`` as a function of nothing, the same draw to the last bit
    (``rng.uniform(a, b)`` is ``a + (b - a) * rng.random()``)."""
    rtt, low = profile.rtt, 1 - profile.rtt_jitter
    width = (1 + profile.rtt_jitter) - low
    random_ = rng.random

    def round_trip() -> float:
        return rtt * (low + width * random_())

    return round_trip


def _per_task(
    jobs: Sequence[Job],
    schedule: PollSchedule,
    profile: RealisticProfile,
    rng: random.Random,
    start: int,
    maximum: int,
    trace: list[tuple[float, str, float, float]] | None = None,
) -> dict[str, Any]:
    """Per-task reads as ``Poller._read_one`` sends them: each leaves when due while the
    ``StatusWindow`` has room, and is reported when its own reply is back."""
    window = StatusWindow(start=start, maximum=maximum)
    by_id = {j.id: j for j in jobs}
    seen: dict[str, float] = {}
    requests = 0
    now = 0.0
    nxt = 0
    seq = 0
    n = len(jobs)
    done = 0
    replies: list[tuple[float, int, Job, float, Any]] = []  # (back at, seq, job, read at, ticket)
    late: list[float] = []  # how long after it fell due each read left
    add, due, due_at, next_wakeup = (
        schedule.add,
        schedule.due,
        schedule.due_at,
        schedule.next_wakeup,
    )
    on_status, round_trip = schedule.on_status, _round_trip(profile, rng)
    started, finished, free = window.started, window.finished, window.free
    push, pop = heapq.heappush, heapq.heappop
    inf = math.inf
    arrival = jobs[0].submit if n else inf
    room = free()
    wake = None
    changed = True  # whether the schedule changed since ``wake`` was asked
    while done < n:
        while arrival <= now:
            j = jobs[nxt]
            add(j.id, now=now, submitted_at=j.submit, kind=j.kind)
            nxt += 1
            arrival = jobs[nxt].submit if nxt < n else inf
            changed = True
        if replies and replies[0][0] <= now:
            while replies and replies[0][0] <= now:
                back, _, job, read_at, ticket = pop(replies)
                if trace is not None:
                    trace.append((ticket.sent_at, job.id, read_at, back))
                finished(ticket, back, congested=False)
                if on_status(read(job, read_at), back):  # type: ignore[arg-type]
                    seen[job.id] = back
                    done += 1
            room = free()  # the window changed
            changed = True
        # (``due`` hands out nothing when nothing is due or there is no room: not asked then)
        if changed:
            wake = next_wakeup()
            changed = False
        if room and wake is not None and wake <= now:
            ids = due(now, batched=False, limit=room)
            for task_id in ids:
                late.append(now - (due_at(task_id) or now))
                rtt = round_trip()
                push(replies, (now + rtt, seq, by_id[task_id], now + rtt / 2, started(now)))
                seq += 1
            requests += len(ids)
            room -= len(ids)  # free() now: each read that left took one place (only reads end)
            wake = next_wakeup()
        full = room == 0
        if full and wake is not None and wake <= now:
            window.held_back(now)
        soonest = replies[0][0] if replies else inf
        if wake is not None and not full and wake < soonest:
            soonest = wake
        if arrival < soonest:
            soonest = arrival
        if soonest == inf:
            break
        if soonest > now:
            now = soonest
    return {
        **summary(jobs, seen, requests),
        "priors": schedule.priors,
        "max_in_flight": window.max_in_flight_seen,
        "window_final": window.limit(),
        "late_p99": percentile(late, 99),
        "late_max": max(late, default=0.0),
    }


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


def _row(
    route: str, client: str, kind: str, interval: float | None, figures: dict[str, Any]
) -> dict[str, Any]:
    return {
        "route": route,
        "client": client,
        "kind": kind,
        "interval": interval,
        **{k: v for k, v in figures.items() if k != "priors"},
    }


#: The jobs of the run being simulated, by (count, pending, seed): made once per process.
_JOBS: dict[tuple[int, int, int], list[Job]] = {}


def _jobs(n: int, pending: int, seed: int) -> list[Job]:
    key = (n, pending, seed)
    if key not in _JOBS:
        _JOBS.clear()
        _JOBS[key] = make_jobs(n, pending, seed, RealisticProfile())
    return _JOBS[key]


def _rows_of(spec: tuple[Any, ...]) -> list[tuple[int, dict[str, Any]]]:
    """One independent piece of the run (see ``run``), as (place, row) pairs: the SDK at one
    ``target_lag`` on one route, the fixed loop of one interval on one route, or the
    learned-priors pair of runs on one route."""
    what, place, route, batched, lag, n, pending, seed, concurrency, max_concurrency = spec
    profile = RealisticProfile()
    window = 1 if batched else concurrency  # a round's batch requests go one after another
    if what == "fixed":
        fixed = fixed_batch if batched else fixed_per_task
        figures = fixed(_jobs(n, pending, seed), lag, profile, seed)
        return [(place, _row(route, f"fixed loop, every {lag:g} s", "fixed", lag, figures))]
    if what == "sdk":
        cpu = time.process_time()
        figures = simulate_sdk(
            _jobs(n, pending, seed),
            am.PollPolicy(target_lag=lag),
            batched=batched,
            profile=profile,
            concurrency=window,
            max_concurrency=max_concurrency,
            seed=seed,
        )
        row = _row(route, f"SDK, target_lag {lag:g} s", "sdk", lag, figures)
        row["cpu_seconds"] = time.process_time() - cpu
        return [(place, row)]
    # learned priors: a run of ``runs`` jobs of the same kinds, all submitted at once, with a
    # fresh schedule (first run), then another with what the first learned (second run)
    runs = min(n, RUN_JOBS)
    learned = None
    out = []
    for k, name in enumerate(("first run", "second run")):
        figures = simulate_sdk(
            make_jobs(runs, runs, seed + 1 + k, profile),
            am.PollPolicy(target_lag=DEFAULT_LAG),
            batched=batched,
            profile=profile,
            concurrency=window,
            max_concurrency=max_concurrency,
            seed=seed + 1,
            priors=learned,
        )
        learned = figures["priors"]
        client = f"SDK, target_lag {DEFAULT_LAG:g} s, {name}"
        out.append((place + k, _row(route, client, "priors", DEFAULT_LAG, figures)))
    return out


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its ended children (the workers), user and system."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(
    n: int,
    *,
    pending: int,
    seed: int,
    concurrency: int,
    max_concurrency: int,
    lags: Sequence[float],
    processes: int = 1,
) -> dict[str, Any]:
    """Every row of the tables. The SDK's runs (each route at each ``target_lag``, and the
    learned-priors pairs) are independent: with ``processes`` > 1 they run side by side in
    worker processes, each from the same jobs and seed, so the figures are the same."""
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    profile = RealisticProfile()
    routes = (("batch route", True), ("per-task reads", False))
    # rows in table order: per route, the SDK at each lag, then the fixed loops; then the
    # learned-priors pairs
    places: dict[int, dict[str, Any]] = {}
    specs = []
    place = 0
    for route, batched in routes:
        for lag in lags:
            specs.append(("sdk", place, route, batched, lag))
            place += 1
        for lag in lags:
            specs.append(("fixed", place, route, batched, lag))
            place += 1
    for route, batched in routes:
        specs.append(("priors", place, route, batched, DEFAULT_LAG))
        place += 2
    full = [(*spec, n, pending, seed, concurrency, max_concurrency) for spec in specs]
    # the costliest first (a short target_lag means more checks), so two workers end together;
    # each worker makes the jobs once (``_jobs``), this process not at all
    full.sort(key=lambda spec: (spec[0] != "sdk", spec[0] == "fixed", spec[4], spec[3]))
    if processes > 1:
        import multiprocessing

        # spawned, not forked: no fork of a process that may run threads (pytest's), the same
        # on every platform; each worker makes the jobs again from the seed (``_jobs``)
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            done = pool.imap_unordered(_rows_of, full)
            for pairs in done:
                places.update(pairs)
            pool.close()
            pool.join()
    else:
        for spec in full:
            places.update(_rows_of(spec))
    rows = [places[k] for k in sorted(places)]
    return {
        "jobs": n,
        "pending": pending,
        "seed": seed,
        "concurrency": concurrency,
        "max_concurrency": max_concurrency,
        "rtt": profile.rtt,
        "kinds": [f"{m} {c} s" for m, c in KINDS],
        "durations": {k: list(v) for k, v in profile.durations.items()},
        "estimate_error": profile.estimate_error,
        "run_jobs": min(n, RUN_JOBS),
        "rows": rows,
        "processes": processes,
        "cpu_seconds": _cpu_seconds() - cpu0,
        "wall_seconds": time.perf_counter() - wall0,
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
        f"a fake clock ({results['cpu_seconds']:.0f} s of CPU in all, "
        f"{results['wall_seconds']:.0f} s wall-clock in {results['processes']} processes). "
        "Per-task reads: the adaptive "
        f"window from {results['concurrency']} up to {results['max_concurrency']} in flight. "
        "Lag: from a task's end to the reply that says so in the client's hands.",
        "",
        "| route | client | status requests per job | lag p50 (s) | lag p99 (s) "
        "| reads in flight, most | read left after due, p99 (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        if r["kind"] == "priors":
            continue
        most = r.get("max_in_flight", "")
        late = f"{r['late_p99']:.3f}" if "late_p99" in r else ""
        lines.append(
            f"| {r['route']} | {r['client']} | {r['requests_per_job']:.3f} | "
            f"{r['lag_p50']:.2f} | {r['lag_p99']:.2f} | {most} | {late} |"
        )
    lines += [
        "",
        f"Learned priors: a run of {results['run_jobs']:,} jobs of the same kinds, all "
        "submitted at once, at the default `target_lag` with a fresh schedule (first run; it "
        "learns as its tasks end), then another such run starting from what the first learned "
        "(second run: what a batch's journal carries over).",
        "",
        "| route | run | status requests per job | lag p50 (s) | lag p99 (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results["rows"]:
        if r["kind"] == "priors":
            lines.append(
                f"| {r['route']} | {r['client'].rsplit(', ', 1)[1]} | "
                f"{r['requests_per_job']:.3f} | {r['lag_p50']:.2f} | {r['lag_p99']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    """Status requests per job against p99 lag, per route: the SDK at each target_lag and the
    fixed loops of the same intervals (needs matplotlib, the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    routes = ("batch route", "per-task reads")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for ax, route in zip(axes, routes, strict=True):
        for kind, style, label in (
            ("sdk", "*-", "SDK (target_lag)"),
            ("fixed", "o--", "fixed loop"),
        ):
            rs = sorted(
                (r for r in results["rows"] if r["route"] == route and r["kind"] == kind),
                key=lambda r: r["interval"],
            )
            xs = [r["requests_per_job"] for r in rs]
            ys = [r["lag_p99"] for r in rs]
            ax.plot(xs, ys, style, label=label, markersize=9 if kind == "sdk" else 6)
            for r, x, y in zip(rs, xs, ys, strict=True):
                ax.annotate(
                    f"{r['interval']:g} s",
                    (x, y),
                    textcoords="offset points",
                    xytext=(5, 4 if kind == "sdk" else -10),
                    fontsize=7,
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("status requests per job (log)")
        ax.set_ylabel("p99 lag, end to outcome (s, log)")
        ax.set_title(route)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{results['jobs']:,} realistic jobs, {results['pending']:,} at a time, "
        f"{results['rtt']:g} s round trip: cost against lag"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


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
        help="per-task reads in flight at first (the client's status_concurrency, default 8)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=64,
        help="per-task reads in flight at most (max_status_concurrency, default 64)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes for the SDK's runs (default: one per core; 1: none)",
    )
    p.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS.md and the JSON")
    ns = p.parse_args(argv)
    if ns.jobs < 1 or ns.pending < 1 or not 1 <= ns.concurrency <= ns.max_concurrency:
        p.error("--jobs, --pending and --concurrency must be >= 1, --max-concurrency >= it")
    if ns.processes < 1:
        p.error("--processes must be >= 1")
    results = run(
        ns.jobs,
        pending=ns.pending,
        seed=ns.seed,
        concurrency=ns.concurrency,
        max_concurrency=ns.max_concurrency,
        lags=LAGS,
        processes=ns.processes,
    )
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "simulate_polling.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    if plot(results, ns.out / "simulate_polling.png"):
        text += (
            "\n![status requests per job against p99 lag, the SDK at each target_lag and the "
            "fixed loops](simulate_polling.png)\n"
        )
    write_section(ns.out / "RESULTS.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Side-by-side benchmarks of apimart-async against the clients people write today.

    python benchmarks/run.py            # the full run, about 4 minutes on 2 cores
    python benchmarks/run.py --quick    # every scenario, small, under a minute (CI smoke)

Every measured client runs in a process of its own (``_worker.py``) and every run gets a fresh
emulator in another process, so CPU and memory figures are the client's alone. Writes
``RESULTS.md``, ``results.json`` and ``polling.png`` (with matplotlib, the ``bench`` extra)
to ``--out`` (default: this folder; ``quick/`` under it with ``--quick``) and prints the tables.

Scenarios:
1. Polling cost and latency: jobs of 5-20 s (``estimated_time`` within 20 %), this SDK with
   and without the batch status route, each also against the emulator's real-network profile
   (gzip, replies in small segments with pauses, sometimes chunked), there also at
   ``PollPolicy(target_lag=1.0)`` besides the default 2 s (a row's p99 target is its
   ``target_lag`` + 0.5 s), fixed-interval per-job
   loops at 0.5/1/2/3 s, and the lower bound (one check exactly at completion).
2. Client overhead: near-instant jobs, client CPU seconds per job and peak RSS, against a
   bare-aiohttp client doing exactly one POST and one GET per job at the same concurrency;
   the parts (issue 16): the bare POST alone, and one status read, bare GET against
   ``Api.get_task``.
3. Scale: pending tasks held by one poller (emulator in manual mode): memory per pending
   task, CPU per poll round.
4. Downloads: throughput against bare aiohttp ``iter_chunked`` and against a bare client
   doing the SDK's work by hand (sha256, fsync, rename), peak RSS by file size.
5. Gallery: the ``index.html`` of a 1,000-job batch (real video files beside it): its size,
   the time to render it in Python, and the time headless Chromium takes to load and paint it
   (needs ``chromium``; ``tests/ci_setup_browser.sh``).
6. Web: the reference app (``examples/web_backend.py``, FastAPI) under uvicorn in its own
   process, one replica: 500 concurrent requests that each await a generation, while a
   background batch replays a journal of 20,000 finished jobs; the app's event-loop lag (p99,
   max), status requests per awaited job, every request with its own task. Then the app is
   SIGKILLed mid-load and restarted on the same journal: the billed tasks it finds
   (``GET /videos/unfinished``) against the tasks created at the emulator.
8. Webhooks (issue 15): a batch whose tasks call back to an aiohttp route in the client's
   process (``webhooks.aiohttp_handler``, ``webhook_url=``), with and without the batch
   status route, beside the same jobs polled: status requests per job, and the p99 from a
   callback's arrival to the job's outcome (the full run adds a row where 5 % of the
   callbacks never come, ended by polling).
7. Start-up (``_startup.py``): ``apimart-async --help`` (wall time, ``-X importtime``),
   ``run --dry-run`` of 10,000 lines, the pytest plugin's import; jobs files of 100,000 and
   1,000,000 lines: the check before sending (lines per second, peak RSS) and the time to the
   first submit of ``run --emulate``.

``--only NAME`` runs one scenario and merges its figures into the results already in ``--out``.

Targets are reported as met or not; nothing here fails a build.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.resources
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from _harness import HERE, admin, emulator_process, percentile
from _startup import section as startup_section
from _startup import startup
from _startup import verdicts as startup_verdicts

import apimart_async as am

WORKER = HERE / "_worker.py"

FULL = {
    "poll_jobs": 1000,
    "poll_durations": "5-20",
    "fixed_intervals": (0.5, 1.0, 2.0, 3.0),
    "overhead_jobs": 10_000,
    "overhead_reps": 2,
    "scale_tasks": 100_000,
    "scale_rounds": 2,
    "download_sizes_mb": (10, 200),
    "download_reps": 5,
    "download_rounds": 3,
    "gallery_jobs": 1000,
    "gallery_reps": 9,
    "web_requests": 500,
    "web_replay_jobs": 20_000,
    "web_killed_requests": 200,
    "web_arrival_s": 2.0,
    "web_durations": "4-8",
    "startup_reps": 5,
    "startup_dry_run_lines": 10_000,
    "startup_big_lines": (100_000, 1_000_000),
    "webhook_jobs": 1000,
    "webhook_durations": "5-10",
    "webhook_lost_row": True,
    "fleet_jobs": 2000,
}
QUICK = {
    "poll_jobs": 100,
    "poll_durations": "1-3",
    "fixed_intervals": (0.5, 1.0, 2.0, 3.0),
    "overhead_jobs": 1000,
    "overhead_reps": 1,
    "scale_tasks": 5000,
    "scale_rounds": 2,
    "download_sizes_mb": (2, 20),
    "download_reps": 3,
    "download_rounds": 1,
    "gallery_jobs": 1000,
    "gallery_reps": 2,
    "web_requests": 60,
    "web_replay_jobs": 600,
    "web_killed_requests": 20,
    "web_arrival_s": 0.3,
    "web_durations": "1-2",
    "startup_reps": 2,
    "startup_dry_run_lines": 500,
    "startup_big_lines": (500, 2000),
    "webhook_jobs": 200,
    "webhook_durations": "2-4",
    "webhook_lost_row": False,
    "fleet_jobs": 300,
}
CONCURRENCY = 64

# -- targets (issue 6) --
REQ_PER_JOB_BATCH = 0.2
REQ_PER_JOB_PER_TASK = 3.0
P99_S = 1.5
#: The SDK's rows: the default schedule (PollPolicy.target_lag 2 s) and, on the real-network
#: profile, the latency setting (target_lag 1 s). A row's p99 target is its target_lag + 0.5 s:
#: 1.5 s at 1 s (issue 6's target), 2.5 s at the default 2 s (issue 22's).
LAG1 = "target_lag 1 s"
DEFAULT_TARGET_LAG = 2.0
LAG_SLACK = 0.5
CPU_RATIO = 1.5
BYTES_PER_TASK = 2048
# -- targets (issue 16) --
#: The per-task row's client CPU per job against the bare client (the batch row keeps 1.5).
CPU_RATIO_PER_TASK = 1.3
#: Download throughput against a bare client doing the same work (sha256, fsync, rename)...
DOWNLOAD_RATIO = 0.9
#: ...and against the bare client that only writes the bytes (an aim, reported).
DOWNLOAD_RAW_RATIO = 0.6
BARE_DL = "bare aiohttp iter_chunked"
VERIFIED_DL = "bare aiohttp + sha256 + fsync + rename"
#: This machine's CPUs: a download's CPU work takes at least its sum over them in wall time.
CPUS = os.cpu_count() or 1
#: "Flat" memory: the largest file may raise the peak RSS by at most this much over the smallest.
FLAT_RSS_MB = 16.0
# -- targets (issue 17) --
GALLERY_BYTES = 1_000_000
GALLERY_RENDER_S = 1.0
# -- targets (issue 21) --
#: No stretch of work may hold the web app's event loop longer than this (p99 and max of a
#: 5 ms sleep's lateness, during the awaiting requests and the journal replay).
WEB_LAG_MS = 20.0
WEB_REQ_PER_JOB = 3.0
# -- targets (issue 15) --
WEBHOOK_REQ_PER_JOB_BATCH = 0.02
WEBHOOK_REQ_PER_JOB_PER_TASK = 1.2
WEBHOOK_P99_S = 0.3
WEBHOOKS_ON = "webhooks on"
BARE_POST = "bare aiohttp, POST only (half the floor)"


async def worker(kind: str, emu: dict[str, Any], *args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        kind,
        emu["base_url"],
        emu["api_key"],
        *args,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {' '.join(args)} exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- 1. polling --------------------------------------------------------------------------------


async def polling(cfg: dict[str, Any]) -> dict[str, Any]:
    jobs, durations = cfg["poll_jobs"], cfg["poll_durations"]
    common = ["--duration", durations, "--seed", "1"]
    jobs_args = ["--jobs", str(jobs), "--concurrency", str(CONCURRENCY)]
    runs: dict[str, Any] = {}
    real = ["--network", "real"]  # gzip, small segments with pauses, sometimes chunked
    lag1 = ["--target-lag", "1"]
    for name, emu_args, sdk_args in (
        ("apimart-async, batch route", common, []),
        ("apimart-async, per-task GETs", [*common, "--no-batch-route"], []),
        ("apimart-async, batch route, real network", [*common, *real], []),
        ("apimart-async, per-task GETs, real network", [*common, "--no-batch-route", *real], []),
        # the latency setting (web backends): PollPolicy(target_lag=1.0)
        (f"apimart-async, batch route, real network, {LAG1}", [*common, *real], lag1),
        (
            f"apimart-async, per-task GETs, real network, {LAG1}",
            [*common, "--no-batch-route", *real],
            lag1,
        ),
    ):
        log(f"polling: {name}")
        async with emulator_process(*emu_args) as emu:
            figures = await worker("sdk-poll", emu, *jobs_args, *sdk_args)
            runs[name] = await _poll_figures(emu, jobs, figures)
            runs[name]["target_lag_s"] = 1.0 if sdk_args else DEFAULT_TARGET_LAG
    for interval in cfg["fixed_intervals"]:
        name = f"fixed {interval:g} s loop per job"
        log(f"polling: {name}")
        async with emulator_process(*common) as emu:
            figures = await worker("fixed-poll", emu, *jobs_args, "--interval", str(interval))
            runs[name] = await _poll_figures(emu, jobs, figures)
    runs["lower bound (one check at completion)"] = {
        "jobs": jobs,
        "status_requests_per_job": 1.0,
        "latency_p50_s": 0.0,
        "latency_p99_s": 0.0,
        "analytic": True,
    }
    return {"jobs": jobs, "durations_s": durations, "concurrency": CONCURRENCY, "runs": runs}


async def _poll_figures(emu: dict[str, Any], jobs: int, figures: dict[str, Any]) -> dict[str, Any]:
    stats = await admin(emu["base_url"], "/_emulator/stats")
    finished = await admin(emu["base_url"], "/_emulator/finished")
    known: dict[str, float] = figures["known"]
    latency = [known[t] - finished[t] for t in known if t in finished]
    status_requests = stats["requests"].get("task", 0) + stats["requests"].get("batch", 0)
    return {
        "jobs": jobs,
        "outcomes": len(known),
        "tasks_created": stats["tasks_created"],
        "status_requests": status_requests,
        "status_requests_per_job": round(status_requests / jobs, 3),
        "latency_p50_s": round(percentile(latency, 50), 3),
        "latency_p99_s": round(percentile(latency, 99), 3),
        "wall_s": round(figures["wall_s"], 1),
        "client_cpu_s": figures["cpu_s"],
    }


# -- 2. overhead -------------------------------------------------------------------------------


async def overhead(cfg: dict[str, Any]) -> dict[str, Any]:
    jobs = cfg["overhead_jobs"]
    args = ["--jobs", str(jobs), "--concurrency", str(CONCURRENCY)]
    variants = (
        ("bare aiohttp (1 POST + 1 GET per job)", "bare-overhead", []),
        ("apimart-async, batch route", "sdk-overhead", []),
        ("apimart-async, per-task GETs", "sdk-overhead", ["--no-batch-route"]),
        # issue 16: half the floor, so that a bare GET's share is the difference
        (BARE_POST, "bare-post-overhead", []),
    )
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    # Interleaved repetitions, best of each: the figures of a noisy 2-core machine.
    for rep in range(cfg["overhead_reps"]):
        for name, kind, emu_args in variants:
            log(f"overhead: {name} (run {rep + 1})")
            async with emulator_process("--duration", "0", *emu_args) as emu:
                figures = await worker(kind, emu, *args)
                stats = await admin(emu["base_url"], "/_emulator/stats")
            if figures["ok"] != jobs:
                raise RuntimeError(f"{name}: {figures['ok']} of {jobs} jobs completed")
            figures["requests_per_job"] = round(sum(stats["requests"].values()) / jobs, 3)
            samples[name].append(figures)
    runs: dict[str, Any] = {}
    for name, results in samples.items():
        best = min(results, key=lambda r: r["cpu_s"])
        runs[name] = {
            "jobs": jobs,
            "requests_per_job": best["requests_per_job"],
            "cpu_s": best["cpu_s"],
            "cpu_us_per_job": round(best["cpu_s"] / jobs * 1e6, 1),
            "cpu_s_all_runs": [r["cpu_s"] for r in results],
            "wall_s": best["wall_s"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "rss_growth_mb": round(max(r["peak_rss_mb"] - r["rss_start_mb"] for r in results), 1),
        }
    floor = runs[variants[0][0]]["cpu_s"]
    for name in runs:
        runs[name]["cpu_ratio_to_bare"] = round(runs[name]["cpu_s"] / floor, 2)
    # One status read alone: bare GET against Api.get_task, in turns in one process.
    log("overhead: status reads of completed tasks, bare GET and Api.get_task in turns")
    read_jobs = min(jobs, 2000)
    async with emulator_process("--duration", "0") as emu:
        reads = await worker(
            "get-overhead", emu, "--jobs", str(read_jobs), *args[2:], "--reps", "5"
        )
    return {"jobs": jobs, "concurrency": CONCURRENCY, "runs": runs, "reads": reads}


# -- 3. scale ----------------------------------------------------------------------------------


async def scale(cfg: dict[str, Any]) -> dict[str, Any]:
    tasks = cfg["scale_tasks"]
    log(f"scale: {tasks} pending tasks")
    async with emulator_process("--mode", "manual") as emu:
        figures = await worker(
            "scale", emu, "--tasks", str(tasks), "--rounds", str(cfg["scale_rounds"])
        )
        stats = await admin(emu["base_url"], "/_emulator/stats")
    figures["batch_requests"] = stats["requests"].get("batch", 0)
    return figures


# -- 4. downloads ------------------------------------------------------------------------------


async def downloads(cfg: dict[str, Any]) -> dict[str, Any]:
    """Each size: the clients take turns, ``download_rounds`` rounds of ``download_reps``
    downloads each (a process and an emulator of its own every time), so that a change in
    the load of a shared machine falls on all of them; a client's figure is the median of
    all its downloads."""
    runs: dict[str, Any] = {}
    clients = (
        (BARE_DL, "bare-download"),
        (VERIFIED_DL, "bare-verified-download"),
        ("apimart-async", "sdk-download"),
    )
    rounds = cfg.get("download_rounds", 1)
    for size_mb in cfg["download_sizes_mb"]:
        size = size_mb * 1_000_000
        got: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in clients}
        for round_ in range(1, rounds + 1):
            for name, kind in clients:
                log(f"downloads: {name}, {size_mb} MB (round {round_} of {rounds})")
                async with emulator_process("--duration", "0", "--video-bytes", str(size)) as emu:
                    figures = await worker(
                        kind,
                        emu,
                        "--reps",
                        str(cfg["download_reps"]),
                        "--server-pid",
                        str(emu["pid"]),
                    )
                if figures["bytes"] != size:
                    raise RuntimeError(f"{name}: got {figures['bytes']} of {size} bytes")
                got[name].append(figures)
        for name, _ in clients:
            runs[f"{name}, {size_mb} MB"] = {
                "client": name,
                "size_mb": size_mb,
                "rounds": rounds,
                **_merged_downloads(got[name]),
            }
    async with emulator_process() as emu:
        ceiling = await worker("ceilings", emu, "--reps", str(cfg["download_reps"]))
    return {
        "runs": runs,
        "sha256_mb_per_s": ceiling["sha256_mb_per_s"],
        "fsync_ms_per_100mb": ceiling["fsync_ms_per_100mb"],
    }


def _cpu_floor_ms(run: dict[str, Any]) -> float:
    """The least wall time a download's CPU (the client's every thread and the emulator's)
    can take on this machine's CPUs, however well it overlaps."""
    return round((run["cpu_ms"] + run["server_cpu_ms"]) / CPUS, 1)


def _merged_downloads(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """One client's rounds as one: the median of all its downloads, the highest peak RSS."""
    times = [t for f in figures for t in f["times_s"]]
    median = statistics.median(times)
    size = figures[0]["bytes"]
    return {
        **figures[0],
        "reps": len(times),
        "times_s": times,
        "median_s": round(median, 4),
        "mb_per_s": round(size / median / 1e6, 1),
        "peak_rss_mb": max(f["peak_rss_mb"] for f in figures),
        **{
            key: round(statistics.median(x for f in figures for x in f[f"{key}_each"]), 2)
            for key in ("cpu_ms", "server_cpu_ms")
        },
        "cpu_s": round(sum(f["cpu_s"] for f in figures), 3),
        "wall_s": round(sum(f["wall_s"] for f in figures), 3),
    }


# -- 5. gallery --------------------------------------------------------------------------------

_PROMPTS = (
    "a slow dolly shot along a lighthouse in a storm at night, waves crashing on the rocks",
    "a red apple on a wooden table, morning light, shallow depth of field, short clip",
    "a cyberpunk street in the rain, neon signs reflected in puddles, the cat walks by",
    "a majestic waterfall cascading down mossy cliffs, a rainbow in the mist, drone shot",
)
_MODELS = ("sora-2-preview", "sora-2-pro-preview", "viduq3", "gemini-omni-flash-preview")


def _gallery_jobs(folder: Path, n: int) -> list[Any]:
    """``n`` jobs as a batch leaves them: 9 in 10 completed with a real video file on disk,
    the rest failed with the service's message."""
    from apimart_async.report import GalleryJob

    sample = (importlib.resources.files("apimart_async.emulator") / "sample.mp4").read_bytes()
    jobs = []
    for i in range(n):
        ok = i % 10 != 9
        files: tuple[str, ...] = ()
        if ok:
            path = folder / f"{i:06d}.mp4"
            path.write_bytes(sample)
            files = (str(path),)
        jobs.append(
            GalleryJob(
                index=i,
                status="completed" if ok else "failed",
                name=f"shot-{i:04d}",
                prompt=f"{_PROMPTS[i % len(_PROMPTS)]} (take {i})",
                model=_MODELS[i % len(_MODELS)],
                duration=8,
                resolution="720p",
                aspect_ratio="16:9",
                seed=i,
                cost=0.4 if ok else 0.0,
                task_id=f"task_01KS1H7ZYSJWH1N779S2F{i:07d}",
                error=None
                if ok
                else f"task task_01KS1H7ZYSJWH1N779S2F{i:07d} failed: the prompt was rejected "
                "by moderation (code content_policy)",
                files=files,
                created=1_779_246_294 + i,
                completed=1_779_246_334 + i,
            )
        )
    return jobs


_TIMINGS = """new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const fcp = performance.getEntriesByName('first-contentful-paint')[0];
  done({dom_content_loaded_ms: nav.domContentLoadedEventEnd, load_ms: nav.loadEventEnd,
        first_contentful_paint_ms: fcp ? fcp.startTime : null,
        cards: document.querySelectorAll('article.card').length,
        videos_in_place: document.querySelectorAll('video').length});
})))"""


async def gallery(cfg: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    from _chromium import chromium, find_chromium

    from apimart_async import report

    n = cfg["gallery_jobs"]
    with tempfile.TemporaryDirectory(prefix="apimart-gallery-") as tmp:
        folder = Path(tmp)
        jobs = _gallery_jobs(folder, n)
        renders = []
        for _ in range(5):
            t0 = time.perf_counter()
            page = report.render_gallery(jobs, base_dir=folder)
            renders.append(time.perf_counter() - t0)
        index = report.write_gallery(jobs, folder)
        size = index.stat().st_size
        result: dict[str, Any] = {
            "date": datetime.date.today().isoformat(),
            "jobs": n,
            "page_bytes": size,
            "python_render_ms": round(sorted(renders)[len(renders) // 2] * 1000, 1),
            "page_chars": len(page),
        }
        binary = find_chromium()
        if binary is None:
            log("gallery: no Chromium installed; browser timings skipped")
            result["browser"] = None
            return result
        log(f"gallery: {n} jobs, {size} bytes, in {binary}")
        runs = []
        async with chromium(binary) as tab:
            version = await tab.send("Browser.getVersion")
            for rep in range(cfg["gallery_reps"] + 1):  # the first load warms the browser
                await tab.goto(index.as_uri() + f"?rep={rep}")
                figures = await tab.evaluate(_TIMINGS)
                if figures["cards"] != n:
                    raise RuntimeError(f"gallery: {figures['cards']} cards of {n}")
                runs.append(figures)
        result["browser"] = version.get("product")
        result["load_average"] = round(os.getloadavg()[0], 2)
        result["cold"] = runs[0]
        warm = runs[1:]

        def median(key: str) -> float:
            values = sorted(r[key] for r in warm if r[key] is not None)
            return round(values[len(values) // 2], 1)

        result["load_ms"] = median("load_ms")
        result["first_contentful_paint_ms"] = median("first_contentful_paint_ms")
        result["dom_content_loaded_ms"] = median("dom_content_loaded_ms")
        result["videos_in_place_at_load"] = warm[0]["videos_in_place"]
        result["reps"] = len(warm)
        return result


# -- 6. web ------------------------------------------------------------------------------------

EXAMPLE = HERE.parent / "examples" / "web_backend.py"


@contextlib.asynccontextmanager
async def web_app(
    emu: dict[str, Any], folder: Path
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """The reference app under uvicorn in its own process (its journal and batches in
    ``folder``: the same folder again is a restart); yields its URL and process. Logs go to
    ``folder/app.log``."""
    env = {**os.environ, "APIMART_API_KEY": emu["api_key"], "APIMART_BASE_URL": emu["base_url"]}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    args = ["--port", "0", "--journal", str(folder / "client.sqlite")]
    args += ["--batch-dir", str(folder / "batches"), "--poll-lag", "1"]
    with open(folder / "app.log", "ab") as logs:  # noqa: ASYNC230 (opened once, at start)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLE),
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=logs,
        )
    assert proc.stdout is not None
    drain: asyncio.Task[bytes] | None = None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        drain = asyncio.get_running_loop().create_task(proc.stdout.read())  # access logs
        yield json.loads(line)["url"], proc
    except BaseException:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 2)
        if proc.returncode != -9:  # not our SIGKILL: say what happened
            log(f"web: the app's exit status {proc.returncode}; its log ends with:")
            log((folder / "app.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        if proc.returncode is None:
            proc.terminate()
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(proc.wait(), 60)
        if drain is not None:
            await drain


async def _prefill_journal(path: Path, jobs: list[am.VideoRequest]) -> None:
    """A journal of ``jobs``, every one finished (against an emulator of its own)."""
    async with (
        emulator_process("--duration", "0") as emu,
        am.AsyncApimart(emu["api_key"], base_url=emu["base_url"]) as client,
        client.batch(jobs, journal=path, concurrency=CONCURRENCY) as results,
    ):
        ok = sum([outcome.ok async for outcome in results])
    if ok != len(jobs):
        raise RuntimeError(f"web: the journal to replay has {ok} of {len(jobs)} jobs completed")


async def _until(what: str, check: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"web: {what} did not happen in {timeout:g} s")
        await asyncio.sleep(0.05)
    return value


async def web(cfg: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    import aiohttp

    n, replayed, killed = cfg["web_requests"], cfg["web_replay_jobs"], cfg["web_killed_requests"]
    with tempfile.TemporaryDirectory(prefix="apimart-web-") as tmp:
        folder = Path(tmp)
        (folder / "batches").mkdir()
        replay = [am.VideoRequest("sora-2-preview", f"replayed {i}") for i in range(replayed)]
        log(f"web: a journal of {replayed} finished jobs")
        await _prefill_journal(folder / "batches" / "replay.sqlite", replay)
        # the same journal for the SDK alone (below): the app's replay may write to its own
        shutil.copyfile(folder / "batches" / "replay.sqlite", folder / "alone.sqlite")
        body = {"name": "replay", "jobs": [job.to_dict() for job in replay]}
        result: dict[str, Any] = {
            "requests": n,
            "replayed_jobs": replayed,
            "durations_s": cfg["web_durations"],
        }
        log(f"web: {n} awaiting requests, the replay at the same time")
        async with (
            emulator_process("--duration", cfg["web_durations"], "--seed", "3") as emu,
            web_app(emu, folder) as (url, _),
            # one connection per request: a kept-alive one that uvicorn closes after 5 s idle
            # can be picked again in that instant (a reset, nothing to do with the app)
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                timeout=aiohttp.ClientTimeout(total=600),
            ) as http,
        ):

            async def get(path: str) -> Any:
                async with http.get(url + path) as r:
                    return await r.json()

            async def generate(i: int) -> tuple[int, int, dict[str, Any]]:
                job = {"model": "sora-2-preview", "prompt": f"request {i}"}
                async with http.post(url + "/videos/generate", json=job) as r:
                    return i, r.status, await r.json()

            async def lag(reset: str) -> dict[str, Any]:
                return dict(await get(f"/debug/metrics?{reset}=true"))

            for _ in range(3):  # warm up: the app's first replies build what they need once
                await lag("reset_all")
                await get("/videos/unfinished")
            await lag("reset_all")
            started = time.monotonic()
            requests = []
            for i in range(n):  # arriving over a few seconds, all in flight together
                requests.append(asyncio.ensure_future(generate(i)))
                await asyncio.sleep(cfg["web_arrival_s"] / n)

            async def all_submitted() -> bool:
                stats = await admin(emu["base_url"], "/_emulator/stats")
                return bool(stats["tasks_created"] >= n)

            await _until("every submit", all_submitted)
            arrivals_metrics = await lag("reset_lag")
            arrivals = arrivals_metrics["loop_lag"]
            async with http.post(url + "/batches", json=body) as r:
                if r.status != 202:
                    raise RuntimeError(f"web: POST /batches answered {r.status}")

            async def replay_done() -> Any:
                b = await get("/batches/replay?limit=0")
                return None if b["running"] else b

            batch = await _until("the replay", replay_done)
            replay_s = time.monotonic() - started
            replay_metrics = await lag("reset_lag")
            during_replay = replay_metrics["loop_lag"]
            replies = await asyncio.gather(*requests)
            wall = time.monotonic() - started
            metrics = await lag("reset_lag")
            stats = await admin(emu["base_url"], "/_emulator/stats")
        ok = [(i, reply) for i, status, reply in replies if status == 200]
        ids = [reply["id"] for _, reply in ok]
        status_requests = stats["requests"].get("task", 0) + stats["requests"].get("batch", 0)
        whole = metrics["loop_lag_total"]
        result.update(
            {
                "ok": len(ok),
                "distinct_tasks": len(set(ids)),
                "tasks_created": stats["tasks_created"],
                "duplicate_keys": stats["duplicate_keys"],
                "status_requests": status_requests,
                "status_requests_per_job": round(status_requests / n, 3),
                "arrival_s": cfg["web_arrival_s"],
                "lag_p99_ms": whole["p99_ms"],
                "lag_max_ms": whole["max_ms"],
                "lag_samples": whole["samples"],
                "arrivals_lag_p99_ms": arrivals["p99_ms"],
                "arrivals_lag_max_ms": arrivals["max_ms"],
                "replay_lag_p99_ms": during_replay["p99_ms"],
                "replay_lag_max_ms": during_replay["max_ms"],
                # the cyclic GC's full collections hold the loop too (the app's heap, not a
                # stretch of SDK work): their count and longest pause, whole run
                "gc_full_collections": metrics["gc_full_collections_total"]["samples"],
                "gc_pause_max_ms": metrics["gc_full_collections_total"]["max_ms"],
                "replay_gc_pause_max_ms": replay_metrics["gc_full_collections"]["max_ms"],
                "arrivals_gc_full_collections": arrivals_metrics["gc_full_collections"]["samples"],
                "replay_gc_full_collections": replay_metrics["gc_full_collections"]["samples"],
                # the app's loop thread's CPU per wake-up window of its lag probe, the GC's
                # apart: what the app's own work held the loop for (the lag adds the time the
                # machine gave other processes)
                "arrivals_work_cpu_p99_ms": arrivals_metrics["loop_work_cpu"]["p99_ms"],
                "arrivals_work_cpu_max_ms": arrivals_metrics["loop_work_cpu"]["max_ms"],
                "replay_work_cpu_p99_ms": replay_metrics["loop_work_cpu"]["p99_ms"],
                "replay_work_cpu_max_ms": replay_metrics["loop_work_cpu"]["max_ms"],
                "replay_outcomes": batch["outcomes_count"],
                "replay_replayed": batch["stats"]["replayed"] if batch["stats"] else None,
                "replay_s": round(replay_s, 1),
                "wall_s": round(wall, 1),
                # the lag is the app process's: other work on the machine delays it too
                "load_average": round(os.getloadavg()[1], 2),
            }
        )
        log(f"web: the same load on the SDK alone (no web framework): {n} waits, the replay")
        async with emulator_process("--duration", cfg["web_durations"], "--seed", "3") as emu:
            alone = await worker(
                "sdk-replica",
                emu,
                "--jobs",
                str(n),
                "--tasks",
                str(replayed),
                "--journal",
                str(folder / "alone.sqlite"),
                "--arrival",
                str(cfg["web_arrival_s"]),
            )
        if not alone["ok"] == alone["distinct_tasks"] == n or alone["replay_outcomes"] != replayed:
            raise RuntimeError(f"web: the SDK alone accounted for {alone}")
        result["sdk_alone"] = alone
        result["sigkill"] = await _web_sigkill(folder / "killed", killed)
    return result


async def _web_sigkill(folder: Path, n: int) -> dict[str, Any]:
    """``n`` awaiting requests; SIGKILL once half the tasks exist; a restart on the same
    journal: the billed tasks it lists against those created at the emulator."""
    import aiohttp

    folder.mkdir()  # noqa: ASYNC240 (once, before anything runs)
    log(f"web: SIGKILL with {n} requests under way, then a restart")
    async with emulator_process("--mode", "manual") as emu:
        async with (
            web_app(emu, folder) as (url, proc),
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        ):

            async def generate(i: int) -> None:
                job = {"model": "sora-2-preview", "prompt": f"killed {i}"}
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.post(url + "/videos/generate", json=job) as r:
                        await r.read()

            requests = [asyncio.ensure_future(generate(i)) for i in range(n)]

            async def half() -> bool:
                stats = await admin(emu["base_url"], "/_emulator/stats")
                return bool(stats["tasks_created"] >= n // 2)

            await _until("half the submits", half)
            proc.kill()  # SIGKILL: no shutdown step runs
            await proc.wait()
            await asyncio.gather(*requests)
        at_kill = (await admin(emu["base_url"], "/_emulator/stats"))["tasks_created"]
        # the restart settles submits whose reply the kill cut off (``tasks.recover``: the same
        # key again; a POST that never reached the service creates its task only now)
        listed: list[dict[str, Any]] = []
        async with web_app(emu, folder) as (url, _), aiohttp.ClientSession() as http:
            while True:  # the list comes in pages of at most 1,000
                page = f"/videos/unfinished?offset={len(listed)}&limit=1000"
                async with http.get(url + page) as r:
                    found = await r.json()
                listed += found["tasks"]
                if not found["tasks"] or len(listed) >= found["count"]:
                    break
        created = (await admin(emu["base_url"], "/_emulator/stats"))["tasks_created"]
    with_id = sum(1 for t in listed if t.get("task_id"))
    return {
        "requests": n,
        "tasks_created": created,
        "tasks_created_at_kill": at_kill,
        "unfinished_found": found["count"],
        "unfinished_with_task_id": with_id,
    }


# -- 8. webhooks ---------------------------------------------------------------------------------


async def webhooks(cfg: dict[str, Any]) -> dict[str, Any]:
    jobs, durations = cfg["webhook_jobs"], cfg["webhook_durations"]
    common = ["--duration", durations, "--seed", "1"]
    args = ["--jobs", str(jobs), "--concurrency", str(CONCURRENCY)]
    per_task = ["--no-batch-route"]
    variants = [
        (f"{WEBHOOKS_ON}, batch route", common, []),
        (f"{WEBHOOKS_ON}, per-task GETs", [*common, *per_task], []),
        ("webhooks off (polling), batch route", common, ["--no-webhooks"]),
        ("webhooks off (polling), per-task GETs", [*common, *per_task], ["--no-webhooks"]),
    ]
    if cfg["webhook_lost_row"]:
        lost = ["--webhook-loss", "0.05"]
        variants.append(
            (f"{WEBHOOKS_ON}, batch route, 5 % of callbacks lost", [*common, *lost], [])
        )
    runs: dict[str, Any] = {}
    for name, emu_args, sdk_args in variants:
        log(f"webhooks: {name}")
        async with emulator_process(*emu_args) as emu:
            figures = await worker("sdk-webhooks", emu, *args, *sdk_args)
            run = await _poll_figures(emu, jobs, figures)
            arrived: dict[str, float] = figures["arrived"]
            known: dict[str, float] = figures["known"]
            after = [known[t] - arrived[t] for t in arrived if t in known]
            run["callbacks"] = figures["callbacks"]
            run["callback_to_outcome_p50_s"] = round(percentile(after, 50), 3) if after else None
            run["callback_to_outcome_p99_s"] = round(percentile(after, 99), 3) if after else None
            runs[name] = run
    return {"jobs": jobs, "durations_s": durations, "concurrency": CONCURRENCY, "runs": runs}


# -- 9. workers (issue 15) ------------------------------------------------------------------------

FLEET_SIZES = (1, 2, 4)


async def _pg_commits(url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        n: int = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        return n
    finally:
        await conn.close()


async def workers(cfg: dict[str, Any]) -> dict[str, Any]:
    """One batch of near-instant jobs run by 1, 2 and 4 worker processes sharing a journal in
    PostgreSQL (a real server, as the tests start it): submit throughput, and the database's
    cost per job (its committed transactions, from ``pg_stat_database``: every statement
    outside a transaction is one, a transaction of several is one)."""
    sys.path.insert(0, str(HERE.parent))
    from tests._pg import PgServer  # the test extra's PostgreSQL

    jobs = cfg["fleet_jobs"]
    runs: dict[str, Any] = {}
    server = PgServer()
    server.start()
    try:
        for n in FLEET_SIZES:
            name = f"{n} worker{'s' * (n > 1)}"
            log(f"workers: {name}")
            schema = f"bench_{n}"
            async with emulator_process("--duration", "0.01", "--seed", "1") as emu:
                before = await _pg_commits(server.url)
                procs = [
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        str(HERE / "_fleet_worker.py"),
                        emu["base_url"],
                        emu["api_key"],
                        server.url,
                        schema,
                        str(jobs),
                        stdout=asyncio.subprocess.PIPE,
                    )
                    for _ in range(n)
                ]
                outs = [await p.communicate() for p in procs]
                if any(p.returncode for p in procs):
                    raise RuntimeError(f"workers: a worker of {name} failed")
                await asyncio.sleep(1.0)  # the servers' statistics are flushed at session end
                commits = await _pg_commits(server.url) - before
                stats = await admin(emu["base_url"], "/_emulator/stats")
            figures = [json.loads(o.decode().strip().splitlines()[-1]) for o, _ in outs]
            wall = max(f["ended"] for f in figures) - min(f["started"] for f in figures)
            first = min(f["first_submit"] for f in figures if f["first_submit"] is not None)
            last = max(f["last_submit"] for f in figures if f["last_submit"] is not None)
            runs[name] = {
                "workers": n,
                "jobs": jobs,
                "tasks_created": stats["tasks_created"],
                "duplicate_keys": stats["duplicate_keys"],
                "jobs_per_worker": sorted(f["jobs"] for f in figures),
                "wall_s": round(wall, 2),
                "jobs_per_s": round(jobs / wall, 1),
                "submits_per_s": round(jobs / max(last - first, 1e-3), 1),
                "db_transactions_per_job": round(commits / jobs, 2),
            }
    finally:
        server.close()
    return {"jobs": jobs, "runs": runs}


# -- verdicts, tables, plot --------------------------------------------------------------------


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(target: str, value: str, met: bool) -> None:
        out.append({"target": target, "measured": value, "met": met})

    poll = results["scenarios"].get("polling")
    if poll:
        for name, limit in (
            ("apimart-async, batch route", REQ_PER_JOB_BATCH),
            ("apimart-async, per-task GETs", REQ_PER_JOB_PER_TASK),
            ("apimart-async, batch route, real network", REQ_PER_JOB_BATCH),
            ("apimart-async, per-task GETs, real network", REQ_PER_JOB_PER_TASK),
            (f"apimart-async, batch route, real network, {LAG1}", REQ_PER_JOB_BATCH),
            (f"apimart-async, per-task GETs, real network, {LAG1}", REQ_PER_JOB_PER_TASK),
        ):
            r = poll["runs"].get(name)
            if r is None:  # results of an older run
                continue
            add(
                f"{name}: <= {limit} status requests/job",
                f"{r['status_requests_per_job']}",
                r["status_requests_per_job"] <= limit,
            )
            p99_limit = r.get("target_lag_s", 1.0) + LAG_SLACK
            add(
                f"{name}: p99 latency <= {p99_limit:g} s",
                f"{r['latency_p99_s']} s",
                r["latency_p99_s"] <= p99_limit,
            )
            add(
                f"{name}: one outcome and one task per job",
                f"{r['outcomes']} outcomes, {r['tasks_created']} tasks, {r['jobs']} jobs",
                r["outcomes"] == r["tasks_created"] == r["jobs"],
            )
    ovh = results["scenarios"].get("overhead")
    if ovh:
        for name, r in ovh["runs"].items():
            if name.startswith("apimart-async"):
                limit = CPU_RATIO_PER_TASK if "per-task" in name else CPU_RATIO
                add(
                    f"{name}: client CPU/job <= {limit}x bare aiohttp",
                    f"{r['cpu_ratio_to_bare']}x ({r['cpu_us_per_job']} us/job)",
                    r["cpu_ratio_to_bare"] <= limit,
                )
    sc = results["scenarios"].get("scale")
    if sc:
        add(
            f"scale: <= {BYTES_PER_TASK} bytes per pending task",
            f"{sc['bytes_per_task']} bytes ({sc['tasks']} tasks)",
            sc["bytes_per_task"] <= BYTES_PER_TASK and sc["pending"] == sc["tasks"],
        )
    dl = results["scenarios"].get("downloads")
    if dl:
        runs = dl["runs"]
        sizes = sorted({r["size_mb"] for r in runs.values()})
        for size in sizes:
            sdk = runs[f"apimart-async, {size} MB"]
            bare = runs[f"{BARE_DL}, {size} MB"]
            verified = runs.get(f"{VERIFIED_DL}, {size} MB")
            raw = sdk["mb_per_s"] / bare["mb_per_s"]
            costs = (
                f"sha256 alone {dl['sha256_mb_per_s']} MB/s, fsync "
                f"{dl['fsync_ms_per_100mb']} ms/100 MB"
            )
            if verified is None:  # results of an older run: only the raw comparison
                add(
                    f"downloads, {size} MB: >= {DOWNLOAD_RATIO}x bare aiohttp throughput",
                    f"{raw:.2f}x ({sdk['mb_per_s']} vs {bare['mb_per_s']} MB/s; {costs})",
                    raw >= DOWNLOAD_RATIO,
                )
                continue
            ratio = sdk["mb_per_s"] / verified["mb_per_s"]
            add(
                f"downloads, {size} MB: >= {DOWNLOAD_RATIO}x {VERIFIED_DL} throughput",
                f"{ratio:.2f}x ({sdk['mb_per_s']} vs {verified['mb_per_s']} MB/s)",
                ratio >= DOWNLOAD_RATIO,
            )
            if "cpu_ms" in sdk:  # the CPU the SDK's download and the emulator's sending took
                allowed = bare["median_s"] * 1e3 / DOWNLOAD_RAW_RATIO
                costs += (
                    f"; CPU per download: the SDK {sdk['cpu_ms']} ms, the emulator "
                    f"{sdk['server_cpu_ms']} ms, on {CPUS} CPUs at least "
                    f"{_cpu_floor_ms(sdk)} ms of wall time, against the {allowed:.1f} ms "
                    "the aim allows"
                )
            add(
                f"downloads, {size} MB: >= {DOWNLOAD_RAW_RATIO}x {BARE_DL} throughput (aim)",
                f"{raw:.2f}x ({sdk['mb_per_s']} vs {bare['mb_per_s']} MB/s; {costs})",
                raw >= DOWNLOAD_RAW_RATIO,
            )
        small = runs[f"apimart-async, {sizes[0]} MB"]["peak_rss_mb"]
        large = runs[f"apimart-async, {sizes[-1]} MB"]["peak_rss_mb"]
        add(
            f"downloads: flat memory (peak RSS {sizes[-1]} MB file <= {sizes[0]} MB file "
            f"+ {FLAT_RSS_MB:g} MB)",
            f"{small} MB -> {large} MB",
            large <= small + FLAT_RSS_MB,
        )
    gal = results["scenarios"].get("gallery")
    if gal:
        add(
            f"gallery: a {gal['jobs']}-job page < {GALLERY_BYTES / 1e6:g} MB",
            f"{gal['page_bytes']} bytes",
            gal["page_bytes"] < GALLERY_BYTES,
        )
        if gal.get("browser"):
            slowest = max(gal["load_ms"], gal["first_contentful_paint_ms"])
            add(
                f"gallery: a {gal['jobs']}-job page loads and paints in Chromium "
                f"in < {GALLERY_RENDER_S:g} s",
                f"{slowest:g} ms (load event {gal['load_ms']:g} ms, first paint "
                f"{gal['first_contentful_paint_ms']:g} ms)",
                slowest < GALLERY_RENDER_S * 1000,
            )
    w = results["scenarios"].get("web")
    if w:
        n = w["requests"]
        add(
            f"web: {n} concurrent awaiting requests each get their own task",
            f"{w['ok']} answered 200, {w['distinct_tasks']} distinct tasks, "
            f"{w['tasks_created']} created, {w['duplicate_keys']} duplicate keys",
            w["ok"] == w["distinct_tasks"] == w["tasks_created"] == n,
        )
        add(
            f"web: event-loop lag p99 and max <= {WEB_LAG_MS:g} ms while a journal of "
            f"{w['replayed_jobs']} jobs replays beside {n} awaiting requests",
            f"p99 {w['replay_lag_p99_ms']} ms, max {w['replay_lag_max_ms']} ms (whole run: "
            f"p99 {w['lag_p99_ms']} ms, max {w['lag_max_ms']} ms)",
            max(w["replay_lag_p99_ms"], w["replay_lag_max_ms"]) <= WEB_LAG_MS,
        )
        a = w.get("sdk_alone")
        if a and "work_cpu_max_ms" in a["replay"]:
            phases = ("arrivals", "replay")
            work = max(a[p]["work_cpu_max_ms"] for p in phases)
            gc_max = max(a[p]["gc_pause_max_ms"] for p in phases)
            add(
                f"web, the SDK alone: no stretch of its work holds the loop over {WEB_LAG_MS:g} "
                "ms (the loop thread's CPU time in any one wake-up window of the lag probe, "
                "the GC's apart, while the requests arrive and while the journal replays; "
                "and no full collection over it)",
                f"work max {work} ms (p99 {max(a[p]['work_cpu_p99_ms'] for p in phases)} ms); "
                f"GC: {sum(a[p]['gc_full_collections'] for p in phases)} full collections, "
                f"longest {gc_max} ms; lag p99 {max(a[p]['lag_p99_ms'] for p in phases)} ms, "
                f"max {max(a[p]['lag_max_ms'] for p in phases)} ms (load average "
                f"{w['load_average']})",
                work <= WEB_LAG_MS and gc_max <= WEB_LAG_MS,
            )
        add(
            f"web: <= {WEB_REQ_PER_JOB:g} status requests per awaited job",
            f"{w['status_requests_per_job']}",
            w["status_requests_per_job"] <= WEB_REQ_PER_JOB,
        )
        add(
            "web: the replay hands out every journalled job",
            f"{w['replay_outcomes']} of {w['replayed_jobs']}",
            w["replay_outcomes"] == w["replayed_jobs"],
        )
        k = w["sigkill"]
        add(
            "web: after a SIGKILL mid-load, a restart finds every billed task",
            f"{k['unfinished_found']} found ({k['unfinished_with_task_id']} with their task id), "
            f"{k['tasks_created']} created at the emulator ({k['tasks_created_at_kill']} at the "
            "kill, the rest by the restart's recover of submits whose POST had not arrived)",
            k["unfinished_found"] == k["tasks_created"],
        )
    fleet = results["scenarios"].get("workers")
    if fleet:
        for name, r in fleet["runs"].items():
            add(
                f"workers: {name}: each job handed out once, one task per job",
                f"{sum(r['jobs_per_worker'])} outcomes, {r['tasks_created']} tasks,"
                f" {r['duplicate_keys']} duplicate keys",
                sum(r["jobs_per_worker"]) == r["tasks_created"] == r["jobs"]
                and r["duplicate_keys"] == 0,
            )
    hooks = results["scenarios"].get("webhooks")
    if hooks:
        for name, r in hooks["runs"].items():
            if not name.startswith(WEBHOOKS_ON):
                continue
            limit = (
                WEBHOOK_REQ_PER_JOB_PER_TASK if "per-task" in name else WEBHOOK_REQ_PER_JOB_BATCH
            )
            add(
                f"{name}: <= {limit:g} status requests/job",
                f"{r['status_requests_per_job']}",
                r["status_requests_per_job"] <= limit,
            )
            p99 = r["callback_to_outcome_p99_s"]
            add(
                f"{name}: p99 from a callback's arrival to the outcome <= {WEBHOOK_P99_S:g} s",
                f"{p99} s ({r['callbacks']['received']} callbacks)",
                p99 is not None and p99 <= WEBHOOK_P99_S,
            )
        for name, r in hooks["runs"].items():
            add(
                f"webhooks: {name}: one outcome and one task per job",
                f"{r['outcomes']} outcomes, {r['tasks_created']} tasks, {r['jobs']} jobs",
                r["outcomes"] == r["tasks_created"] == r["jobs"],
            )
    if "startup" in results["scenarios"]:
        startup_verdicts(results["scenarios"]["startup"], add)
    return out


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(results: dict[str, Any], plot: str | None) -> str:
    sc = results["scenarios"]
    m = results["machine"]
    parts = [
        "# Benchmark results"
        + (" (quick run: small sizes, a smoke test)" if results["quick"] else ""),
        "",
        f"`python benchmarks/run.py{' --quick' if results['quick'] else ''}` on "
        f"{results['date']}: {m['cpus']} CPUs, Python {m['python']}, {m['platform']}, "
        f"apimart-async {m['version']}; {results['wall_s']} s in all. Every client ran in "
        "its own process against a fresh emulator in another process.",
        "",
        "## Targets",
        "",
        _table(
            ["target", "measured", "met"],
            [
                [v["target"], v["measured"], "yes" if v["met"] else "**NO**"]
                for v in results["targets"]
            ],
        ),
    ]
    if "polling" in sc:
        p = sc["polling"]
        parts += [
            "",
            f"## 1. Polling: {p['jobs']} jobs of {p['durations_s']} s, "
            f"concurrency {p['concurrency']}",
            "",
            "Status requests counted at the emulator; latency from the emulator's exact finish "
            "time to the moment the client has the outcome. The lower bound is analytic. The "
            "SDK's rows use the default schedule (`PollPolicy.target_lag` 2 s: checks at most "
            "2 s apart once a task may have ended) unless they say `target_lag 1 s`; a row's p99 "
            "target is its target_lag + 0.5 s.",
            "",
            _table(
                [
                    "policy",
                    "status requests / job",
                    "p50 latency (s)",
                    "p99 latency (s)",
                    "wall (s)",
                    "client CPU (s)",
                ],
                [
                    [
                        name,
                        r["status_requests_per_job"],
                        r["latency_p50_s"],
                        r["latency_p99_s"],
                        r.get("wall_s", ""),
                        r.get("client_cpu_s", ""),
                    ]
                    for name, r in p["runs"].items()
                ],
            ),
        ]
        if plot:
            parts += ["", f"![status requests per job against p99 latency]({plot})"]
    if "overhead" in sc:
        o = sc["overhead"]
        parts += [
            "",
            f"## 2. Client overhead: {o['jobs']} near-instant jobs, concurrency {o['concurrency']}",
            "",
            "Client process CPU (user + system) from after the imports; best of the runs listed.",
            "",
            _table(
                [
                    "client",
                    "requests / job",
                    "CPU (s)",
                    "CPU / job (us)",
                    "x bare",
                    "all runs (s)",
                    "peak RSS (MB)",
                    "RSS growth (MB)",
                    "wall (s)",
                ],
                [
                    [
                        name,
                        r["requests_per_job"],
                        r["cpu_s"],
                        r["cpu_us_per_job"],
                        r["cpu_ratio_to_bare"],
                        ", ".join(str(c) for c in r["cpu_s_all_runs"]),
                        r["peak_rss_mb"],
                        r["rss_growth_mb"],
                        r["wall_s"],
                    ]
                    for name, r in o["runs"].items()
                ],
            ),
        ]
        if "reads" in o:
            rd = o["reads"]
            parts += [
                "",
                f"One status read of a completed task, {rd['jobs']} reads {o['concurrency']} at"
                " a time, the two in turns (CPU per read, us; median of the runs listed):",
                "",
                _table(
                    ["read", "median (us)", "runs (us)"],
                    [
                        [
                            name,
                            rd["median_us"][key],
                            ", ".join(str(v) for v in rd["us_per_read"][key]),
                        ]
                        for name, key in (
                            ("bare aiohttp GET, JSON decoded", "bare"),
                            ("Api.get_task (the poller's read)", "sdk"),
                        )
                    ],
                ),
            ]
    if "scale" in sc:
        s = sc["scale"]
        parts += [
            "",
            f"## 3. Scale: {s['tasks']} pending tasks in one poller (emulator in manual mode)",
            "",
            "Memory: Python allocations held (tracemalloc) after every task was checked once, "
            "divided by the tasks. CPU: client CPU for whole poll rounds (every task checked "
            "once), tracing off.",
            "",
            _table(
                [
                    "tasks",
                    "bytes / pending task",
                    "peak bytes / task (first round)",
                    "process RSS (MB)",
                    "CPU / round (s)",
                    "CPU / status read (us)",
                    "wall / round (s)",
                    "batch requests",
                ],
                [
                    [
                        s["tasks"],
                        s["bytes_per_task"],
                        s["peak_bytes_per_task_first_round"],
                        s["rss_mb"],
                        s["cpu_s_per_round"],
                        s["cpu_us_per_check"],
                        s["wall_s_per_round"],
                        s["batch_requests"],
                    ]
                ],
            ),
        ]
    if "downloads" in sc:
        d = sc["downloads"]
        parts += [
            "",
            "## 4. Downloads on loopback",
            "",
            "Median of the repetitions; each client in its own process, the three taking "
            "turns (rounds of a few downloads each, a fresh process and emulator each time) "
            "so that the load of the shared machine falls on all of them. The SDK streams to "
            "`.part`: the event loop takes the body as it arrives, one thread writes it "
            "(and starts each batch's write-back to the disk as it is written), another "
            "hashes it (sha256); then fsync and rename. "
            f"`{BARE_DL}` only writes the chunks from the event loop; `{VERIFIED_DL}` does the "
            "SDK's work by hand (each chunk written and hashed on the event loop, then fsync "
            f"and rename). On this machine sha256 alone runs at {d['sha256_mb_per_s']} "
            f"MB/s and fsync of a fresh file takes {d['fsync_ms_per_100mb']} ms per 100 MB: "
            "the price of verified, durable files, which loopback makes visible (a real "
            "network is 10 to 100 times slower than either). CPU per download (medians): the "
            "client process's, all its threads, and the emulator's, sending the file; the "
            f"floor: their sum over the {CPUS} CPUs, the least wall time that work can take "
            "here however well it overlaps.",
            "",
            _table(
                [
                    "client",
                    "file (MB)",
                    "reps",
                    "median (s)",
                    "MB/s",
                    "peak RSS (MB)",
                    "client CPU (ms)",
                    "emulator CPU (ms)",
                    f"floor on {CPUS} CPUs (ms)",
                ],
                [
                    [
                        r["client"],
                        r["size_mb"],
                        r["reps"],
                        r["median_s"],
                        r["mb_per_s"],
                        r["peak_rss_mb"],
                        r.get("cpu_ms", ""),
                        r.get("server_cpu_ms", ""),
                        _cpu_floor_ms(r) if "cpu_ms" in r else "",
                    ]
                    for r in d["runs"].values()
                ],
            ),
        ]
    if "gallery" in sc:
        g = sc["gallery"]
        parts += [
            "",
            f"## 5. Gallery: the index.html of a {g['jobs']}-job batch",
            "",
            f"Measured on {g['date']} (load average {g.get('load_average', '?')} on "
            f"{results['machine']['cpus']} CPUs shared with other work). 9 in 10 jobs "
            'completed (a real 4.3 KB video file each; its `<video preload="metadata">` is '
            "put in place as the card nears the screen), 1 in 10 failed. Python: median of 5 "
            "renders. Browser: "
            "a page opened from `file://` in headless Chromium, median of the loads after a "
            "first (cold) one; times from navigation start, read from the Navigation Timing "
            "and Paint Timing entries.",
            "",
        ]
        if g.get("browser"):
            parts += [
                _table(
                    [
                        "page (bytes)",
                        "Python render (ms)",
                        "browser",
                        "DOMContentLoaded (ms)",
                        "first paint (ms)",
                        "load event (ms)",
                        "cold load event (ms)",
                    ],
                    [
                        [
                            g["page_bytes"],
                            g["python_render_ms"],
                            g["browser"],
                            g["dom_content_loaded_ms"],
                            g["first_contentful_paint_ms"],
                            g["load_ms"],
                            round(g["cold"]["load_ms"], 1),
                        ]
                    ],
                )
            ]
        else:
            parts += [
                f"Page {g['page_bytes']} bytes, Python render {g['python_render_ms']} ms; "
                "no Chromium on this machine, so no browser figures."
            ]
    if "web" in sc:
        w = sc["web"]
        k = w["sigkill"]
        parts += [
            "",
            f"## 6. Web: {w['requests']} awaiting requests on one replica, with a journal replay "
            f"of {w['replayed_jobs']} jobs",
            "",
            "The reference app (`examples/web_backend.py`, FastAPI) under uvicorn in its own "
            "process, `PollPolicy(target_lag=1)`, against an emulator in another (jobs of "
            f"{w['durations_s']} s, batch status route on). The requests arrive over "
            f"{w['arrival_s']:g} s and each awaits its generation (`POST /videos/generate`); "
            "once every task exists, "
            "`POST /batches` starts a batch over a journal in which every job finished "
            "(`replay_finished`). Lag: how late a 5 ms sleep in the app wakes up (the app's, "
            "FastAPI's and uvicorn's work included, not only the SDK's): while the requests "
            "arrive, while the journal replays (the awaiting requests polled meanwhile), and "
            f"over the whole run (load average {w.get('load_average', '?')} over the 5 minutes "
            f"before its end, on {results['machine']['cpus']} CPUs). Then {k['requests']} "
            "awaiting requests, a SIGKILL once half "
            "their tasks exist, and a restart on the same journal: `GET /videos/unfinished` "
            "against the tasks created at the emulator.",
            "",
            _table(
                [
                    "requests",
                    "answered 200 / distinct tasks / created",
                    "status requests / job",
                    "lag p99 / max (ms): arrivals",
                    "replay",
                    "whole run",
                    "replayed outcomes",
                    "replay (s)",
                    "wall (s)",
                    "after SIGKILL: found / created",
                ],
                [
                    [
                        w["requests"],
                        f"{w['ok']} / {w['distinct_tasks']} / {w['tasks_created']}",
                        w["status_requests_per_job"],
                        f"{w['arrivals_lag_p99_ms']} / {w['arrivals_lag_max_ms']}",
                        f"{w['replay_lag_p99_ms']} / {w['replay_lag_max_ms']}",
                        f"{w['lag_p99_ms']} / {w['lag_max_ms']}",
                        w["replay_outcomes"],
                        w["replay_s"],
                        w["wall_s"],
                        f"{k['unfinished_found']} / {k['tasks_created']}",
                    ]
                ],
            ),
            "",
            "Where the lag comes from. The app's full garbage collections (the cyclic GC walks "
            "every container object of the process, holding the loop): "
            f"{w.get('gc_full_collections', '?')}, the longest {w.get('gc_pause_max_ms', '?')} "
            f"ms ({w.get('arrivals_gc_full_collections', '?')} while the requests arrive, "
            f"{w.get('replay_gc_full_collections', '?')} during the replay). The app's own work "
            "(its loop thread's CPU time in a wake-up window of its lag probe, the GC's apart: "
            "other processes on the machine do not inflate it), p99 / max: "
            f"{w.get('arrivals_work_cpu_p99_ms', '?')} / {w.get('arrivals_work_cpu_max_ms', '?')} "
            f"ms while the requests arrive, {w.get('replay_work_cpu_p99_ms', '?')} / "
            f"{w.get('replay_work_cpu_max_ms', '?')} ms during the replay. The same load on "
            "the SDK alone (`_worker.py sdk-replica`: the awaiting "
            "`generate()` calls and the replay in one process, no web framework, `gc.freeze()` "
            "after startup as the app does), lag p99 / max in ms, the max of what is left "
            "once the GC's pauses in each window are taken out, and the loop thread's CPU time "
            "in a window, the GC's apart (the work that held the loop: unlike the lag, other "
            "processes on the machine do not inflate it):",
            "",
        ]
        a = w.get("sdk_alone")
        if a:
            parts.append(
                _table(
                    [
                        "SDK alone",
                        "lag p99 / max (ms)",
                        "beyond GC: max",
                        "work CPU p99 / max (ms)",
                        "GC: full / longest",
                    ],
                    [
                        [
                            phase,
                            f"{a[phase]['lag_p99_ms']} / {a[phase]['lag_max_ms']}",
                            a[phase]["beyond_gc_max_ms"],
                            f"{a[phase].get('work_cpu_p99_ms')} / "
                            f"{a[phase].get('work_cpu_max_ms')}",
                            f"{a[phase]['gc_full_collections']} / {a[phase]['gc_pause_max_ms']}",
                        ]
                        for phase in ("arrivals", "replay")
                    ],
                )
            )
    if "startup" in sc:
        parts += startup_section(sc["startup"], _table)
    if "webhooks" in sc:
        h = sc["webhooks"]
        parts += [
            "",
            "## 8. Webhooks",
            "",
            f"{h['jobs']} jobs of {h['durations_s']} s, submitted {h['concurrency']} at a time; "
            "the emulator calls `<webhook_url>/callback` on loopback when each task ends, an "
            "aiohttp route in the client's process hands each callback to "
            "`webhooks.aiohttp_handler(client)`. The callback is a hint: the task is read in "
            "the poller's next status round (on the batch route, the callbacks of a "
            f"`PollPolicy.webhook_gather` window of {am.PollPolicy().webhook_gather:g} s share "
            "one request). Tasks with a "
            "webhook are polled only as a fallback: a safety check 10 s past the latest "
            "plausible end, then every 120 s. The same jobs polled, for the baseline.",
            "",
            _table(
                [
                    "client",
                    "status requests / job",
                    "callback to outcome p50 / p99 (s)",
                    "end to outcome p50 / p99 (s)",
                    "callbacks (checked / ignored)",
                ],
                [
                    [
                        name,
                        r["status_requests_per_job"],
                        "-"
                        if r["callback_to_outcome_p99_s"] is None
                        else f"{r['callback_to_outcome_p50_s']} / {r['callback_to_outcome_p99_s']}",
                        f"{r['latency_p50_s']} / {r['latency_p99_s']}",
                        f"{r['callbacks']['checked']} / {r['callbacks']['ignored']}",
                    ]
                    for name, r in h["runs"].items()
                ],
            ),
            "",
            "On the batch route, status requests per job fall with the rate at which callbacks "
            f"come: a request carries the callbacks of one {am.PollPolicy().webhook_gather:g} s "
            "window (100 at most), so 0.02 requests per job needs about "
            f"{50 / am.PollPolicy().webhook_gather:.0f} callbacks a second; fewer, and each "
            "window's request carries fewer. Without the route, each callback costs one read. "
            "The window is the trade: a callback's outcome comes at most a window and a read "
            "after it; the default (0.27 s) leaves 30 ms of the 0.3 s latency target to the read.",
        ]
    if "workers" in sc:
        w = sc["workers"]
        parts += [
            "",
            "## 9. Workers",
            "",
            f"One batch of {w['jobs']} near-instant jobs (0.01 s tasks, no downloads) in a "
            "PostgreSQL journal, run by 1, 2 and 4 worker processes at once on this machine "
            "(each with its own client and poller, claiming jobs in chunks of 32). Submit "
            "throughput: jobs over the time from the fleet's first submit to its last; jobs / s: "
            "from the first worker's start to the last one's end (a worker with nothing left to "
            "claim looks again every second until the others' jobs are done). "
            "Database cost: transactions committed per job (`pg_stat_database.xact_commit`; a "
            "statement outside a transaction counts one).",
            "",
            _table(
                [
                    "workers",
                    "submits / s",
                    "jobs / s",
                    "wall (s)",
                    "jobs per worker",
                    "DB transactions / job",
                ],
                [
                    [
                        r["workers"],
                        r["submits_per_s"],
                        r["jobs_per_s"],
                        r["wall_s"],
                        " / ".join(map(str, r["jobs_per_worker"])),
                        r["db_transactions_per_job"],
                    ]
                    for r in w["runs"].values()
                ],
            ),
        ]
    return "\n".join(parts) + "\n"


def make_plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    poll = results["scenarios"]["polling"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, r in poll["runs"].items():
        x, y = r["status_requests_per_job"], r["latency_p99_s"]
        ours = name.startswith("apimart-async")
        marker = "*" if ours else ("x" if r.get("analytic") else "o")
        ax.scatter([x], [y], s=160 if ours else 60, marker=marker, zorder=3)
        below = name.startswith("fixed 0.5")  # it sits next to the per-task GETs point
        ax.annotate(
            name, (x, y), textcoords="offset points", xytext=(6, -12 if below else 6), fontsize=8
        )
    ax.axhline(P99_S, color="grey", linestyle="--", linewidth=0.8)
    ax.text(0.012, P99_S, " p99 target at target_lag 1 s", va="bottom", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_xlim(0.01, 100)
    ax.set_xlabel("status requests per job (log scale)")
    ax.set_ylabel("p99 completion-to-outcome latency (s)")
    ax.set_title(f"Polling {poll['jobs']} jobs of {poll['durations_s']} s: cost against latency")
    ax.grid(True, which="both", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


SCENARIOS = {
    "polling": polling,
    "overhead": overhead,
    "scale": scale,
    "downloads": downloads,
    "gallery": gallery,
    "web": web,
    "startup": startup,
    "webhooks": webhooks,
    "workers": workers,
}


async def run(quick: bool, only: list[str]) -> dict[str, Any]:
    cfg = QUICK if quick else FULL
    started = time.monotonic()
    scenarios: dict[str, Any] = {}
    for name in only:
        scenarios[name] = await SCENARIOS[name](cfg)
    return {
        "date": datetime.date.today().isoformat(),
        "quick": quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
            "version": am.__version__,
        },
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "scenarios": scenarios,
        "wall_s": round(time.monotonic() - started, 1),
    }


def _kept_sections(path: Path) -> str:
    """Sections other scripts wrote into RESULTS.md (between ``<!-- name -->`` and
    ``<!-- /name -->``, e.g. simulate_polling.py's), carried over when this run rewrites it."""
    if not path.exists():
        return ""
    old = path.read_text()
    kept = []
    for name in ("simulate_polling", "simulate_polling_notes", "issue16_notes"):
        start, stop = f"<!-- {name} -->", f"<!-- /{name} -->"
        if start in old and stop in old:
            kept.append(start + old.split(start, 1)[1].split(stop, 1)[0] + stop + "\n")
    return "".join("\n" + k for k in kept)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--out", type=Path, default=None, help="folder for the results")
    parser.add_argument(
        "--only", action="append", choices=list(SCENARIOS), help="run only this scenario"
    )
    ns = parser.parse_args()
    out: Path = ns.out or (HERE / "quick" if ns.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(ns.quick, ns.only or list(SCENARIOS)))
    previous = out / "results.json"
    if ns.only and previous.exists():
        # one scenario again: keep the other scenarios' figures of the earlier run
        earlier = json.loads(previous.read_text())
        if earlier.get("quick") == ns.quick:
            earlier.pop("targets", None)
            earlier["scenarios"] = {**earlier["scenarios"], **results["scenarios"]}
            results = earlier
    results["targets"] = verdicts(results)
    plot = None
    if "polling" in results["scenarios"] and make_plot(results, out / "polling.png"):
        plot = "polling.png"
    results["plot"] = plot
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results, plot) + _kept_sections(out / "RESULTS.md")
    (out / "RESULTS.md").write_text(text)
    print(text)
    missed = [v for v in results["targets"] if not v["met"]]
    print(
        f"{len(results['targets']) - len(missed)} of {len(results['targets'])} targets met; "
        f"results in {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

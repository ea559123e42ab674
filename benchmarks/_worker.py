"""One measured client, run in a process of its own by ``run.py`` (the emulator runs in another).

    python benchmarks/_worker.py KIND BASE_URL API_KEY [options]

Prints one JSON line: the figures of that client alone (CPU seconds and peak RSS of this
process, counted from after the imports). Kinds:

- ``sdk-poll`` / ``fixed-poll``: submit jobs and follow them; report when each task's end
  became known (Unix time), for latency against the emulator's exact finish times.
- ``sdk-overhead`` / ``bare-overhead``: many near-instant jobs, CPU and memory per job;
  ``bare-post-overhead``: the bare client's POSTs alone; ``get-overhead``: status reads of
  completed tasks, a bare aiohttp GET against ``Api.get_task``, in turns (issue 16's parts).
- ``scale``: hold many pending tasks in the poller; memory per task, CPU per poll round.
- ``sdk-download`` / ``bare-download`` / ``bare-verified-download``: one result file fetched
  several times (the last: by hand, with the SDK's sha256, fsync and rename).
- ``sdk-webhooks``: a batch whose tasks call back (``webhook_url``) to this process's aiohttp
  route (``webhooks.aiohttp_handler``); when each callback arrived and each outcome came out
  (``--no-webhooks``: the same jobs, polled).
- ``sdk-replica``: the web row's load without the web framework: awaiting ``generate()``
  calls and a journal replay in one process; the event loop's lag and the GC's pauses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio._backends._asyncio  # noqa: F401 - anyio imports its backend on first use

import apimart_async as am
import apimart_async._client  # the package imports it lazily, on first use

# Every figure is from after the imports, the lazy ones of the SDK and anyio too (issue 16):
# the SDK's first use imported the client, the poller and the rest inside a client's Meter,
# about 0.1 s of CPU charged to the jobs, while the bare clients' imports came before theirs.

PROMPT = "a cat on a skateboard"
MODEL = "sora-2-preview"
CHUNK = 1 << 20


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class Meter:
    """CPU seconds and wall time since it was made, and the process's RSS figures."""

    def __init__(self) -> None:
        self.cpu0 = cpu_seconds()
        self.sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        self.wall0 = time.monotonic()
        self.rss0 = current_rss_mb()

    def figures(self) -> dict[str, float]:
        return {
            "cpu_s": round(cpu_seconds() - self.cpu0, 3),
            "sys_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_stime - self.sys0, 3),
            "wall_s": round(time.monotonic() - self.wall0, 3),
            "rss_start_mb": round(self.rss0, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }


# -- polling ---------------------------------------------------------------------------------


async def sdk_poll(
    base_url: str, key: str, jobs: int, concurrency: int, target_lag: float | None
) -> dict[str, Any]:
    known: dict[str, float] = {}
    meter = Meter()
    poll = am.PollPolicy() if target_lag is None else am.PollPolicy(target_lag=target_lag)
    async with am.AsyncApimart(key, base_url=base_url, poll=poll) as client:
        requests = (am.VideoRequest(MODEL, f"{PROMPT} {i}") for i in range(jobs))
        async with client.batch(requests, concurrency=concurrency) as results:
            async for outcome in results:
                if not outcome.ok:
                    raise SystemExit(f"job {outcome.index} failed: {outcome.error}")
                known[outcome.task_id or ""] = time.time()
    return {"known": known, **meter.figures()}


async def sdk_webhooks(
    base_url: str, key: str, jobs: int, concurrency: int, with_webhooks: bool
) -> dict[str, Any]:
    from aiohttp import web

    from apimart_async import webhooks

    known: dict[str, float] = {}
    arrived: dict[str, float] = {}  # task id -> its first callback's arrival (Unix time)
    meter = Meter()
    async with am.AsyncApimart(key, base_url=base_url) as client:
        handler = webhooks.aiohttp_handler(client)

        async def timed(request: web.Request) -> web.Response:
            at = time.time()
            body = await request.read()  # cached: the SDK's handler reads it again
            task_id = json.loads(body).get("id")
            if isinstance(task_id, str):
                arrived.setdefault(task_id, at)
            return await handler(request)

        app = web.Application()
        app.router.add_post("/apimart/callback", timed)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/apimart" if with_webhooks else None
        try:
            requests = (am.VideoRequest(MODEL, f"{PROMPT} {i}") for i in range(jobs))
            async with client.batch(requests, concurrency=concurrency, webhook_url=url) as results:
                async for outcome in results:
                    if not outcome.ok:
                        raise SystemExit(f"job {outcome.index} failed: {outcome.error}")
                    known[outcome.task_id or ""] = time.time()
            counts = client.tasks.webhook_counts()
        finally:
            await runner.cleanup()
    return {"known": known, "arrived": arrived, "callbacks": counts, **meter.figures()}


async def fixed_poll(
    base_url: str, key: str, jobs: int, concurrency: int, interval: float
) -> dict[str, Any]:
    """What other SDKs and hand-written clients do: one loop per job, a GET every
    ``interval`` seconds until the task ends."""
    known: dict[str, float] = {}
    meter = Meter()
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=100)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(base_url, headers=headers, connector=connector) as http:

        async def one(i: int) -> None:
            async with sem:
                body = {"model": MODEL, "prompt": f"{PROMPT} {i}"}
                async with http.post("/v1/videos/generations", json=body) as r:
                    task_id = (await r.json())["data"][0]["task_id"]
            while True:
                await asyncio.sleep(interval)
                async with http.get(f"/v1/tasks/{task_id}") as r:
                    status = (await r.json())["data"]["status"]
                if status in ("completed", "failed", "cancelled"):
                    known[task_id] = time.time()
                    return

        await asyncio.gather(*(one(i) for i in range(jobs)))
    return {"known": known, **meter.figures()}


# -- overhead --------------------------------------------------------------------------------


async def sdk_overhead(base_url: str, key: str, jobs: int, concurrency: int) -> dict[str, Any]:
    meter = Meter()
    ok = 0
    policy = am.PollPolicy(first_check=0.5)  # near-instant jobs: look soon after submitting
    async with am.AsyncApimart(key, base_url=base_url, poll=policy) as client:
        requests = (am.VideoRequest(MODEL, f"{PROMPT} {i}") for i in range(jobs))
        async with client.batch(requests, concurrency=concurrency) as results:
            async for outcome in results:
                ok += outcome.ok
    return {"jobs": jobs, "ok": ok, **meter.figures()}


async def bare_overhead(
    base_url: str, key: str, jobs: int, concurrency: int, *, read: bool = True
) -> dict[str, Any]:
    """The floor: exactly one POST and one GET per job, nothing else. ``read=False``: half
    the floor, the POST alone (the GET costs the difference)."""
    meter = Meter()
    ok = 0
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=100)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(base_url, headers=headers, connector=connector) as http:

        async def one(i: int) -> None:
            nonlocal ok
            async with sem:
                body = {"model": MODEL, "prompt": f"{PROMPT} {i}"}
                async with http.post("/v1/videos/generations", json=body) as r:
                    task_id = (await r.json())["data"][0]["task_id"]
                if not read:
                    ok += bool(task_id)
                    return
                async with http.get(f"/v1/tasks/{task_id}") as r:
                    ok += (await r.json())["data"]["status"] == "completed"

        await asyncio.gather(*(one(i) for i in range(jobs)))
    return {"jobs": jobs, "ok": ok, **meter.figures()}


async def get_overhead(
    base_url: str, key: str, jobs: int, concurrency: int, reps: int
) -> dict[str, Any]:
    """CPU per status read of a completed task, ``concurrency`` at a time: a bare aiohttp GET
    (its JSON decoded) against the SDK's ``Api.get_task`` (transport, retries' first
    attempt, typed parse), the two in turns ``reps`` times over the same ``jobs`` tasks."""
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession(base_url, headers=headers) as http,
        am.AsyncApimart(key, base_url=base_url) as client,
    ):
        ids: list[str] = []

        async def submit(i: int) -> None:
            body = {"model": MODEL, "prompt": f"{PROMPT} {i}"}
            async with sem, http.post("/v1/videos/generations", json=body) as r:
                ids.append((await r.json())["data"][0]["task_id"])

        async def bare(task_id: str) -> bool:
            async with sem, http.get(f"/v1/tasks/{task_id}") as r:
                return bool((await r.json())["data"]["status"] == "completed")

        async def sdk(task_id: str) -> bool:
            async with sem:
                return (await client._api.get_task(task_id)).ok  # the poller's read

        await asyncio.gather(*(submit(i) for i in range(jobs)))
        cpu: dict[str, list[float]] = {"bare": [], "sdk": []}
        for rep in range(reps + 1):  # the first round of each warms up, uncounted
            for name, read in (("bare", bare), ("sdk", sdk)):
                cpu0 = cpu_seconds()
                ok = sum(await asyncio.gather(*(read(t) for t in ids)))
                if ok != jobs:
                    raise RuntimeError(f"{name}: {ok} of {jobs} reads saw a completed task")
                if rep:
                    cpu[name].append(round((cpu_seconds() - cpu0) / jobs * 1e6, 1))
    return {
        "jobs": jobs,
        "us_per_read": cpu,
        "median_us": {k: statistics.median(v) for k, v in cpu.items()},
    }


# -- scale -----------------------------------------------------------------------------------


async def scale(base_url: str, key: str, tasks: int, rounds: int) -> dict[str, Any]:
    """Hold ``tasks`` pending tasks (the emulator is in manual mode, so none ends) in one
    client's poller. Memory: traced Python allocations held per pending task after every task
    was checked once. CPU: seconds per poll round (one status check of every task)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(base_url + "/_emulator/tasks", json={"count": tasks}) as r,
    ):
        ids: list[str] = (await r.json())["task_ids"]
    # Checks come as fast as the emulator answers, so a round is as short as it can be.
    policy = am.PollPolicy(first_check=0.05, min_interval=0.05, max_interval=0.05, jitter=0.0)
    async with am.AsyncApimart(key, base_url=base_url, poll=policy) as client:
        poller = client._poller  # benchmarks read the poller's counters
        gc.collect()
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        async with client.tasks.watch(ids) as watch:
            while poller.checks < tasks:  # noqa: ASYNC110 - sampling a counter, not waiting
                await asyncio.sleep(0.01)
            gc.collect()
            held, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            rss_held = current_rss_mb()
            # CPU per round, with nothing traced: count checks over whole rounds.
            checks0, cpu0, wall0 = poller.checks, cpu_seconds(), time.monotonic()
            while poller.checks < checks0 + rounds * tasks:  # noqa: ASYNC110 - as above
                await asyncio.sleep(0.01)
            cpu = cpu_seconds() - cpu0
            wall = time.monotonic() - wall0
            done_rounds = (poller.checks - checks0) / tasks
            pending = len(watch.remaining)
    return {
        "tasks": tasks,
        "pending": pending,
        "bytes_per_task": round((held - base) / tasks),
        "peak_bytes_per_task_first_round": round((peak - base) / tasks),
        "rss_mb": round(rss_held, 1),
        "rounds": round(done_rounds, 2),
        "cpu_s_per_round": round(cpu / done_rounds, 3),
        "cpu_us_per_check": round(cpu / (done_rounds * tasks) * 1e6, 2),
        "wall_s_per_round": round(wall / done_rounds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


# -- downloads -------------------------------------------------------------------------------


async def _completed_task(base_url: str, key: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.post(base_url + "/_emulator/tasks", json={"count": 1}) as r:
            task_id: str = (await r.json())["task_ids"][0]
        headers = {"Authorization": f"Bearer {key}"}
        for _ in range(500):
            async with http.get(f"{base_url}/v1/tasks/{task_id}", headers=headers) as r:
                if (await r.json())["data"]["status"] == "completed":
                    return task_id
            await asyncio.sleep(0.01)
    raise SystemExit("the emulator did not complete the download task")


class DownloadMeter:
    """Each download's wall time, the client process's CPU (every thread) and the emulator
    process's CPU (``server_pid``; Linux's ``/proc``, else nan)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.times: list[float] = []
        self.cpu_ms: list[float] = []
        self.server_cpu_ms: list[float] = []

    def server_cpu(self) -> float:
        """The emulator's CPU seconds, every thread, to the nanosecond (``schedstat``: the
        ``stat`` file counts in 10 ms ticks, as long as a 10 MB download)."""
        try:
            threads = Path(f"/proc/{self.server_pid}/task").iterdir()
            return sum(int((t / "schedstat").read_text().split()[0]) for t in threads) / 1e9
        except (OSError, ValueError, IndexError):
            return math.nan  # not Linux: shown as nan, never as a cost of 0

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        s0 = self.server_cpu()  # read outside the timed window, as at its end
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.times.append(time.perf_counter() - t0)
        self.cpu_ms.append((time.process_time() - c0) * 1e3)
        self.server_cpu_ms.append((self.server_cpu() - s0) * 1e3)


async def sdk_download(base_url: str, key: str, reps: int, server_pid: int) -> dict[str, Any]:
    task_id = await _completed_task(base_url, key)
    size = 0
    meter, each = Meter(), DownloadMeter(server_pid)
    with tempfile.TemporaryDirectory(prefix="apimart-bench-") as tmp:
        dest = Path(tmp) / "video.mp4"
        async with am.AsyncApimart(key, base_url=base_url) as client:
            task = await client.tasks.get(task_id)
            for _ in range(reps):
                with each.one():
                    [file] = await client.download(task, dest)
                size = file.bytes
                dest.unlink()
    return _download_figures(size, each, meter)


async def bare_download(
    base_url: str, key: str, reps: int, server_pid: int, *, verified: bool = False
) -> dict[str, Any]:
    """The floor: ``iter_chunked`` into a file, as a hand-written client does. ``verified``:
    the same work as the SDK's, by hand: into ``<name>.part``, sha256 of every chunk, fsync,
    rename into place (hashing and writing on the event loop)."""
    task_id = await _completed_task(base_url, key)
    size = 0
    meter, each = Meter(), DownloadMeter(server_pid)
    headers = {"Authorization": f"Bearer {key}"}
    with tempfile.TemporaryDirectory(prefix="apimart-bench-") as tmp:
        dest = Path(tmp) / "video.mp4"
        part = Path(tmp) / "video.mp4.part" if verified else dest
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base_url}/v1/tasks/{task_id}", headers=headers) as r:
                url = (await r.json())["data"]["result"]["videos"][0]["url"][0]
            for _ in range(reps):
                with each.one():
                    size = 0
                    digest = hashlib.sha256()
                    async with http.get(url) as r:
                        r.raise_for_status()
                        with part.open("wb") as fh:
                            async for chunk in r.content.iter_chunked(CHUNK):
                                fh.write(chunk)
                                if verified:
                                    digest.update(chunk)
                                size += len(chunk)
                            if verified:
                                fh.flush()
                                os.fsync(fh.fileno())
                    if verified:
                        os.replace(part, dest)
                        digest.hexdigest()
                dest.unlink()
    return _download_figures(size, each, meter)


async def ceilings(reps: int) -> dict[str, Any]:
    """What the SDK's download guarantees cost on this machine, apart from any network: sha256
    of every byte (the SDK hashes each file as it arrives) and fsync of a freshly written file
    (the SDK makes a file durable before it takes its final name). 200 MiB each."""
    block = os.urandom(CHUNK)
    hash_times, sync_times = [], []
    with tempfile.TemporaryDirectory(prefix="apimart-bench-") as tmp:
        path = Path(tmp) / "f.bin"
        for _ in range(reps):
            digest = hashlib.sha256()
            t0 = time.perf_counter()
            for _ in range(200):
                digest.update(block)
            hash_times.append(time.perf_counter() - t0)
            with path.open("wb") as fh:
                for _ in range(200):
                    fh.write(block)
                fh.flush()
                t0 = time.perf_counter()
                os.fsync(fh.fileno())
                sync_times.append(time.perf_counter() - t0)
            path.unlink()
    size = 200 * CHUNK
    return {
        "bytes": size,
        "reps": reps,
        "sha256_mb_per_s": round(size / statistics.median(hash_times) / 1e6, 1),
        "fsync_ms_per_100mb": round(statistics.median(sync_times) / size * 1e8 * 1e3, 1),
    }


def _download_figures(size: int, each: DownloadMeter, meter: Meter) -> dict[str, Any]:
    median = statistics.median(each.times)
    return {
        "bytes": size,
        "reps": len(each.times),
        "median_s": round(median, 4),
        "mb_per_s": round(size / median / 1e6, 1),
        "times_s": [round(t, 5) for t in each.times],
        "cpu_ms_each": [round(t, 2) for t in each.cpu_ms],
        "server_cpu_ms_each": [round(t, 2) for t in each.server_cpu_ms],
        **meter.figures(),
    }


# -- the web row's load on the SDK alone -----------------------------------------------------


class Lag:
    """How late a 5 ms sleep wakes up, and the cyclic GC's full collections (which hold the
    loop too: they walk the process's heap, whoever made it)."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self.beyond_gc: list[float] = []  # lateness not covered by a GC pause in its window
        # The loop thread's CPU time in each window (time.thread_time: work done, not time
        # the OS gave other processes), without the GC's: the most any stretch of work in
        # it can have held the loop, a figure a loaded machine does not inflate as the lag.
        self.work_cpu: list[float] = []
        self.gc: list[float] = []
        self._gc_started = 0.0
        self._gc_cpu_started = 0.0
        self._gc_in_window = 0.0
        self._gc_cpu_in_window = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            self._gc_cpu_started = time.thread_time()
            return
        pause = time.perf_counter() - self._gc_started
        self._gc_in_window += pause
        self._gc_cpu_in_window += time.thread_time() - self._gc_cpu_started
        if info.get("generation") == 2:
            self.gc.append(pause)

    async def run(self) -> None:
        gc.callbacks.append(self._on_gc)
        try:
            while True:
                self._gc_in_window = self._gc_cpu_in_window = 0.0
                start, start_cpu = time.perf_counter(), time.thread_time()
                await asyncio.sleep(0.005)
                late = time.perf_counter() - start - 0.005
                cpu = time.thread_time() - start_cpu
                self.late.append(late)
                self.beyond_gc.append(max(0.0, late - self._gc_in_window))
                self.work_cpu.append(max(0.0, cpu - self._gc_cpu_in_window))
        finally:
            gc.callbacks.remove(self._on_gc)

    def reset(self) -> None:
        self.late, self.beyond_gc, self.work_cpu, self.gc = [], [], [], []

    def figures(self) -> dict[str, Any]:
        def p99(xs: list[float]) -> float | None:
            xs = sorted(xs)
            return round(xs[round(0.99 * (len(xs) - 1))] * 1000, 2) if xs else None

        return {
            "lag_p99_ms": p99(self.late),
            "lag_max_ms": round(max(self.late, default=0.0) * 1000, 2),
            "beyond_gc_p99_ms": p99(self.beyond_gc),
            "beyond_gc_max_ms": round(max(self.beyond_gc, default=0.0) * 1000, 2),
            "work_cpu_p99_ms": p99(self.work_cpu),
            "work_cpu_max_ms": round(max(self.work_cpu, default=0.0) * 1000, 2),
            "gc_full_collections": len(self.gc),
            "gc_pause_max_ms": round(max(self.gc, default=0.0) * 1000, 2),
            "samples": len(self.late),
        }


async def sdk_replica(
    base_url: str, key: str, requests: int, replayed: int, journal: str, arrival_s: float
) -> dict[str, Any]:
    """``requests`` awaiting ``generate()`` calls arriving over ``arrival_s`` seconds, then a
    batch replaying ``journal`` (``replayed`` finished jobs) while they wait: the web row's
    load with no web framework, so that what holds the loop is the SDK's (or the GC's)."""
    lag = Lag()
    meter = Meter()
    poll = am.PollPolicy(target_lag=1.0, first_check=1.0, min_interval=1.0)
    async with am.AsyncApimart(key, base_url=base_url, poll=poll) as client:
        monitor = asyncio.get_running_loop().create_task(lag.run())
        await client.balance()  # warm up: the session, the first connection
        gc.collect()
        gc.freeze()  # as the reference app does after its startup
        await asyncio.sleep(0.1)
        lag.reset()

        async def one(i: int) -> str:
            video = await client.videos.generate(am.VideoRequest(MODEL, f"request {i}"))
            return video.id

        waits = []
        for i in range(requests):
            waits.append(asyncio.ensure_future(one(i)))
            await asyncio.sleep(arrival_s / requests)
        arrivals = lag.figures()
        lag.reset()
        # lazily: the batch reads its input as it goes (a list of 20,000 requests built
        # here would hold the loop for ~0.3 s, checking each one)
        jobs = (am.VideoRequest(MODEL, f"replayed {i}") for i in range(replayed))
        kept: list[str] = []
        async with client.batch(jobs, journal=journal, concurrency=16) as results:
            async for outcome in results:
                kept.append(json.dumps(outcome.to_dict()))
        replay = lag.figures()
        ids = await asyncio.gather(*waits)
        whole = lag.figures()
        monitor.cancel()
    return {
        "ok": len(ids),
        "distinct_tasks": len(set(ids)),
        "replay_outcomes": len(kept),
        "arrivals": arrivals,
        "replay": replay,
        "replay_to_end": whole,
        **meter.figures(),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind")
    p.add_argument("base_url")
    p.add_argument("api_key")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--target-lag", type=float, default=None)
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--journal")
    p.add_argument("--arrival", type=float, default=2.0)
    p.add_argument("--no-webhooks", action="store_true")
    p.add_argument("--server-pid", type=int, default=0, help="the emulator's, for its CPU")
    a = p.parse_args()
    u, k = a.base_url, a.api_key
    runs = {
        "sdk-poll": lambda: sdk_poll(u, k, a.jobs, a.concurrency, a.target_lag),
        "fixed-poll": lambda: fixed_poll(u, k, a.jobs, a.concurrency, a.interval),
        "sdk-overhead": lambda: sdk_overhead(u, k, a.jobs, a.concurrency),
        "bare-overhead": lambda: bare_overhead(u, k, a.jobs, a.concurrency),
        "bare-post-overhead": lambda: bare_overhead(u, k, a.jobs, a.concurrency, read=False),
        "get-overhead": lambda: get_overhead(u, k, a.jobs, a.concurrency, a.reps),
        "scale": lambda: scale(u, k, a.tasks, a.rounds),
        "sdk-download": lambda: sdk_download(u, k, a.reps, a.server_pid),
        "bare-download": lambda: bare_download(u, k, a.reps, a.server_pid),
        "bare-verified-download": lambda: bare_download(u, k, a.reps, a.server_pid, verified=True),
        "ceilings": lambda: ceilings(a.reps),
        "sdk-webhooks": lambda: sdk_webhooks(u, k, a.jobs, a.concurrency, not a.no_webhooks),
        "sdk-replica": lambda: sdk_replica(u, k, a.jobs, a.tasks, a.journal, a.arrival),
    }
    same_allocator_state()
    result = asyncio.run(runs[a.kind]())
    sys.stdout.write(json.dumps(result) + "\n")


def same_allocator_state() -> None:
    """Every client starts with glibc's malloc in the same state (issue 16). glibc serves a
    block of 128 KiB or more by ``mmap`` until the first such block is freed; then its
    threshold rises to that block's size. asyncio asks for a 256 KiB buffer on every socket
    read: below the threshold it comes from the heap, above it each read maps fresh pages.
    Which client had freed a big block before its first read was an accident of its imports:
    the SDK's worker had not, and paid 4.6 page faults per job against the bare client's 1.2
    (45,785 against 12,115 for 10,000 jobs), about 25 us per job of system time. One block of
    1 MiB made and freed here puts every client past that threshold."""
    block = bytearray(1 << 20)
    del block


if __name__ == "__main__":
    main()

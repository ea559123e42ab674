"""One worker of a batch run by several, for the ``workers`` row of run.py (issue 15).

    python benchmarks/_fleet_worker.py BASE_URL API_KEY PG_URL SCHEMA JOBS

Runs the batch "bench" of JOBS near-instant jobs in PostgreSQL as one of its workers (no
downloads: the row measures submits and the database's share) and prints one JSON line: when
it started working and ended, its first and last submit (wall clock), and the jobs it
handed out.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import apimart_async as am

FAST = am.PollPolicy(first_check=0.05, min_interval=0.05, max_interval=0.2, jitter=0.0)


async def main(base_url: str, key: str, url: str, schema: str, n: int) -> None:
    jobs = [am.VideoRequest("sora-2-preview", f"bench {i}") for i in range(n)]
    journal = am.PostgresJournal(
        url, name="bench", schema=schema, fingerprints=[r.fingerprint() for r in jobs]
    )
    ended = 0
    submits: list[float] = []

    def on_event(event: am.BatchEvent) -> None:
        if event.kind == "submitted":
            submits.append(time.time())

    client = am.AsyncApimart(key, base_url=base_url, poll=FAST)
    async with (
        client,
        client.batch(jobs, concurrency=64, journal=journal, on_event=on_event) as results,
    ):
        started = time.time()
        async for _ in results:
            ended += 1
    line = {
        "started": started,
        "ended": time.time(),
        "jobs": ended,
        "first_submit": min(submits, default=None),
        "last_submit": max(submits, default=None),
        "submits": len(submits),
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    base, api_key, pg_url, pg_schema, count = sys.argv[1:6]
    asyncio.run(main(base, api_key, pg_url, pg_schema, int(count)))

"""One worker of a batch run by several (issue 15): the subject of test_fleet.py.

    python tests/fleet_worker.py BASE_URL API_KEY PG_URL SCHEMA OUT_DIR JOBS LEASE MAX_PENDING

Runs the batch "fleet" of JOBS jobs (``prompt <i>``) in PostgreSQL as one of its workers
(the job list stored: ``fingerprints=``), its files in OUT_DIR, until no job is left to it
(or it is killed). Prints one JSON line per outcome it hands out. Exit code 0.
"""

from __future__ import annotations

import asyncio
import json
import sys

import apimart_async as am

FAST = am.PollPolicy(first_check=0.05, min_interval=0.05, max_interval=0.2, jitter=0.0)


def jobs(n: int) -> list[tuple[str, am.VideoRequest]]:
    return [(f"job{i}", am.VideoRequest("sora-2-preview", f"prompt {i}")) for i in range(n)]


async def main(
    base_url: str, key: str, url: str, schema: str, out: str, n: int, lease: float, pending: int
) -> int:
    am.set_testing(True)
    items = jobs(n)
    store = am.PostgresJournal(
        url, name="fleet", schema=schema, fingerprints=[r.fingerprint() for _, r in items]
    )
    async with am.AsyncApimart(key, base_url=base_url, poll=FAST, max_retries=8) as client:
        async with client.batch(
            items,
            concurrency=8,
            max_pending=pending,
            journal=store,
            download_dir=out,
            lease=lease,
        ) as results:
            async for outcome in results:
                line = {"index": outcome.index, "ok": outcome.ok, "replayed": outcome.replayed}
                print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    base, api_key, pg_url, pg_schema, out_dir, count, lease_s, max_pending = sys.argv[1:9]
    raise SystemExit(
        asyncio.run(
            main(
                base,
                api_key,
                pg_url,
                pg_schema,
                out_dir,
                int(count),
                float(lease_s),
                int(max_pending),
            )
        )
    )

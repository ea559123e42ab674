"""Run one durable batch to the end (or until killed): the subject of test_crash.py.

    python tests/crash_worker.py BASE_URL API_KEY JOURNAL OUT_DIR JOBS [SIGINT_GRACE]

JOURNAL is a file, or a postgresql:// URL (the batch "crash" in the schema named by
CRASH_PG_SCHEMA).

Exit code: 0 all jobs ok, 1 some not, 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import apimart_async as am

FAST = am.PollPolicy(first_check=0.05, min_interval=0.05, max_interval=0.2, jitter=0.0)


async def main(base_url: str, key: str, journal: str, out: str, n: int, grace: float | None) -> int:
    am.set_testing(True)
    jobs = [(f"job{i}", am.VideoRequest("sora-2-preview", f"prompt {i}")) for i in range(n)]
    ok = 0
    store: str | Path | am.PostgresJournal = journal
    if journal.startswith("postgresql://"):
        store = am.PostgresJournal(journal, name="crash", schema=os.environ["CRASH_PG_SCHEMA"])
    async with am.AsyncApimart(key, base_url=base_url, poll=FAST, max_retries=5) as client:
        async with client.batch(
            jobs, concurrency=8, journal=store, download_dir=out, sigint_grace=grace
        ) as results:
            async for outcome in results:
                ok += outcome.ok
                print(
                    json.dumps(
                        {"index": outcome.index, "ok": outcome.ok, "replayed": outcome.replayed}
                    ),
                    flush=True,
                )
    if results.interrupted:
        return 130
    return 0 if ok == n else 1


if __name__ == "__main__":
    url, api_key, journal_path, out_dir, count = sys.argv[1:6]
    grace_arg = float(sys.argv[6]) if len(sys.argv) > 6 else None
    raise SystemExit(asyncio.run(main(url, api_key, journal_path, out_dir, int(count), grace_arg)))

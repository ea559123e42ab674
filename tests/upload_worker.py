"""Run one durable batch of jobs with local reference images (or until killed): the subject
of test_references.py's SIGKILL test.

    python tests/upload_worker.py BASE_URL API_KEY JOURNAL MEDIA_ROOT JOBS MAX_PENDING

Job i uses the i-th image (cycling) of MEDIA_ROOT/images.txt, one path a line. Exit code: 0
all jobs ok, 1 some not.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import apimart_async as am

FAST = am.PollPolicy(first_check=0.05, min_interval=0.05, max_interval=0.2, jitter=0.0)


async def main(base_url: str, key: str, journal: str, root: str, n: int, max_pending: int) -> int:
    am.set_testing(True)
    images = (Path(root) / "images.txt").read_text().split("\n")
    jobs = [
        am.VideoRequest("viduq3", f"shot {i}", image_urls=[images[i % len(images)]])
        for i in range(n)
    ]
    ok = 0
    async with am.AsyncApimart(key, base_url=base_url, poll=FAST, max_retries=5) as client:
        async with client.batch(
            jobs, concurrency=8, max_pending=max_pending, journal=journal, media_root=root
        ) as results:
            async for outcome in results:
                ok += outcome.ok
    print(results.uploads, flush=True)
    return 0 if ok == n else 1


if __name__ == "__main__":
    url, api_key, journal_path, media, count, pending = sys.argv[1:7]
    raise SystemExit(asyncio.run(main(url, api_key, journal_path, media, int(count), int(pending))))

"""Await many ``generate()`` calls on one client with a journal, until killed: the subject of
test_client_journal.py's SIGKILL test (a web app's replica dying mid-load).

    python tests/client_journal_worker.py BASE_URL API_KEY JOURNAL CALLS
"""

from __future__ import annotations

import sys

import anyio

import apimart_async as am

POLL = am.PollPolicy(first_check=0.05, min_interval=0.05, max_interval=0.2, jitter=0.0)


async def main(base_url: str, key: str, journal: str, calls: int) -> None:
    am.set_testing(True)
    async with am.AsyncApimart(key, base_url=base_url, poll=POLL, journal=journal) as client:
        async with anyio.create_task_group() as tg:
            for i in range(calls):
                request = am.VideoRequest("sora-2-preview", f"request {i}")
                tg.start_soon(client.videos.generate, request)


if __name__ == "__main__":
    url, api_key, journal_path, count = sys.argv[1:5]
    anyio.run(main, url, api_key, journal_path, int(count))

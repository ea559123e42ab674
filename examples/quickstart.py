"""Generate one video with each of the five seed models, against the built-in emulator.

python examples/quickstart.py              # no API key, no network: the emulator
APIMART_API_KEY=sk-... python examples/quickstart.py --real   # the real service (billed!)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import apimart_async as am
from apimart_async.emulator import Emulator

REF = "https://example.com/bear.png"

REQUESTS = [
    am.VideoRequest(
        "gemini-omni-flash-preview", "a red apple on a wooden table, cinematic", aspect_ratio="16:9"
    ),
    am.VideoRequest("viduq3", "the bear waves at the camera", image_urls=[REF], duration=5),
    am.VideoRequest(
        "viduq3-mix", "the bear spins around", image_urls=[REF], duration=2, resolution="1080p"
    ),
    am.VideoRequest("sora-2-preview", "a waterfall with a rainbow in the mist", duration=4),
    am.VideoRequest("sora-2-pro-preview", "a lighthouse in a storm", duration=8, resolution="high"),
]


@contextlib.asynccontextmanager
async def open_client(real: bool) -> AsyncIterator[am.AsyncApimart]:
    if real:
        async with am.AsyncApimart() as client:
            yield client
        return
    async with Emulator(task_duration=(1.0, 3.0)) as emu:
        print(f"emulator listening on {emu.base_url}")
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client:
            yield client


async def one(client: am.AsyncApimart, request: am.VideoRequest) -> None:
    try:
        task = await client.videos.generate(request, timeout=600)
    except am.TaskFailedError as exc:
        print(f"{request.model:<27} FAILED  {exc}")
        return
    print(
        f"{request.model:<27} {task.status.value:<9} {task.actual_time or 0:>4.0f} s  "
        f"${task.cost or 0:.2f}  {task.video_urls[0]}"
    )


async def main(real: bool) -> None:
    async with open_client(real) as client:
        async with asyncio.TaskGroup() as tg:
            for request in REQUESTS:
                tg.create_task(one(client, request))
        balance = await client.balance()
        print(f"balance left: ${balance.remain_balance:.2f} (used ${balance.used_balance:.2f})")
        print(f"HTTP requests: {client.request_counts()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--real", action="store_true", help="use the real service (APIMART_API_KEY)"
    )
    real = parser.parse_args().real
    if real and not os.environ.get("APIMART_API_KEY"):
        parser.error("--real: set APIMART_API_KEY to your key (without --real: the emulator)")
    asyncio.run(main(real))

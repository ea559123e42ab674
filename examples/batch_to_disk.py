"""A durable batch: journal, downloads, manifest and a budget, against the built-in emulator.

python examples/batch_to_disk.py --out videos/          # run it; Ctrl-C and run it again:
                                                        # it resumes, nothing submitted twice
APIMART_API_KEY=sk-... python examples/batch_to_disk.py --out videos/ --real   # billed!
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import apimart_async as am
from apimart_async.emulator import Emulator

PROMPTS = [
    "a paper boat drifting down a rainy street",
    "a hummingbird hovering at a red flower, slow motion",
    "a lighthouse beam sweeping over a stormy sea",
    "a fox walking through fresh snow at dawn",
    "a city skyline time-lapse from day to night",
    "a steaming cup of coffee on a windowsill",
]


@contextlib.asynccontextmanager
async def open_client(real: bool, out: Path) -> AsyncIterator[am.AsyncApimart]:
    if real:
        async with am.AsyncApimart() as client:
            yield client
        return
    # The emulator keeps its tasks in a state file next to the journal, so a re-run resumes
    # against the same tasks, as it would against the real service.
    async with (
        Emulator(task_duration=(1.0, 3.0), state_path=out / "emulator-state.jsonl") as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client,
    ):
        yield client


async def main(out: Path, real: bool, max_cost: float) -> int:
    jobs = [
        (f"clip-{i:02d}", am.VideoRequest("sora-2-preview", p, duration=4))
        for i, p in enumerate(PROMPTS)
    ]
    journal = out / ("journal.sqlite" if real else "journal-emulated.sqlite")
    async with open_client(real, out) as client:
        async with client.batch(
            jobs,
            concurrency=4,
            journal=journal,
            download_dir=out,
            max_cost=max_cost,
            sigint_grace=10,
        ) as results:
            async for outcome in results:
                state = "ok" if outcome.ok else f"error: {outcome.error}"
                if outcome.replayed:
                    state += " (finished in an earlier run)"
                files = ", ".join(f"{f.path} ({f.bytes} bytes)" for f in outcome.files)
                print(f"{outcome.name}: {state} {files}", flush=True)
        print(results)
        print(f"manifest: {out / 'manifest.jsonl'}")
        if results.interrupted:
            print("interrupted: run the same command again to resume", file=sys.stderr)
            return 130
        return 0 if results.stats().completed == len(jobs) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("videos"))
    parser.add_argument(
        "--real", action="store_true", help="use the real service (APIMART_API_KEY)"
    )
    parser.add_argument("--max-cost", type=float, default=10.0, help="USD budget")
    ns = parser.parse_args()
    if ns.real and not os.environ.get("APIMART_API_KEY"):
        parser.error("--real: set APIMART_API_KEY to your key (without --real: the emulator)")
    raise SystemExit(asyncio.run(main(ns.out, ns.real, ns.max_cost)))

"""``python -m apimart_async.emulator``: run the emulator until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys

from ._network import NETWORK_PROFILES
from ._server import BATCH_ROUTES, CONFLICT_PLACEMENTS, UNKNOWN_TASK_REPLIES, Emulator


def _parse_duration(text: str) -> float | tuple[float, float]:
    if "-" in text.strip("-"):
        low, high = text.split("-", 1)
        return float(low), float(high)
    return float(text)


def _status_name(text: str) -> tuple[str, str]:
    status, sep, word = text.partition("=")
    if not sep or not status or not word:
        raise argparse.ArgumentTypeError("expected STATUS=WORD, e.g. completed=success")
    return status, word


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apimart_async.emulator", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    p.add_argument("--api-key", default=None, help="key to accept (default: a random one)")
    p.add_argument("--mode", choices=("auto", "manual"), default="auto")
    p.add_argument(
        "--duration", type=_parse_duration, default=(2.0, 6.0), help="task seconds, N or LOW-HIGH"
    )
    p.add_argument("--failure-rate", type=float, default=0.0)
    p.add_argument(
        "--fault-rate", type=float, default=0.0, help="fraction of requests given a random fault"
    )
    p.add_argument(
        "--no-batch-route", action="store_true", help="answer 404 on POST /v1/tasks/batch"
    )
    p.add_argument(
        "--batch-route",
        choices=BATCH_ROUTES,
        default="ok",
        help="how POST /v1/tasks/batch behaves: ok, absent (404), refuse (400), partial "
        "(leaves live tasks out), nested ({data: {tasks: [...]}}), keyed ({data: {id: task}})",
    )
    p.add_argument(
        "--unknown-task",
        choices=UNKNOWN_TASK_REPLIES,
        default="404",
        help="how an unknown task id is answered: 404, 400 (invalid task ID) or 200 with "
        '{"code": 404}',
    )
    p.add_argument(
        "--conflict-code-in",
        choices=CONFLICT_PLACEMENTS,
        default="both",
        help="where a 409 sub-code goes: both, type (error.type) or code (error.code)",
    )
    p.add_argument(
        "--status-name",
        type=_status_name,
        action="append",
        default=[],
        metavar="STATUS=WORD",
        help="the service's word for a status, e.g. completed=success (repeatable)",
    )
    p.add_argument(
        "--balance", type=float, default=1000.0, help="starting USD balance (-1: unlimited)"
    )
    p.add_argument(
        "--network",
        choices=NETWORK_PROFILES,
        default="loopback",
        help="real: gzip when accepted, replies in small segments with pauses, sometimes chunked",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve https with a private CA (needs trustme); its PEM file is printed as ca_file",
    )
    p.add_argument("--video-bytes", type=int, default=64 * 1024)
    p.add_argument("--seed", type=int, default=0)
    return p


async def serve(args: argparse.Namespace) -> None:
    emu = Emulator(
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        mode=args.mode,
        task_duration=args.duration,
        failure_rate=args.failure_rate,
        batch_route="absent" if args.no_batch_route else args.batch_route,
        unknown_task=args.unknown_task,
        conflict_code_in=args.conflict_code_in,
        status_names=dict(args.status_name),
        balance=None if args.balance == -1 else args.balance,
        video_bytes=args.video_bytes,
        seed=args.seed,
        network=args.network,
        tls=args.tls,
    )
    if args.fault_rate:
        emu.faults.set_rate(args.fault_rate)
    async with emu:
        # One JSON line first, so a parent process can read where to connect.
        first = {"base_url": emu.base_url, "api_key": emu.api_key}
        if emu.ca_file is not None:
            first["ca_file"] = emu.ca_file
        print(json.dumps(first), flush=True)
        trust = f"  export SSL_CERT_FILE={emu.ca_file}\n" if emu.ca_file else ""
        print(
            f"APIMart emulator on {emu.base_url} (network: {emu.network})\n"
            f"  export APIMART_BASE_URL={emu.base_url}\n"
            f"  export APIMART_API_KEY={emu.api_key}\n"
            f"{trust}"
            "Ctrl-C to stop.",
            file=sys.stderr,
            flush=True,
        )
        stop = asyncio.Event()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()  # then the emulator stops cleanly (its CA file is removed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

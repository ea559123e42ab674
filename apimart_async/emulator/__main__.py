"""Run the APIMart emulator on loopback until interrupted (Ctrl-C).

It prints one JSON line with ``base_url`` and ``api_key`` first, then how to point the SDK or
the CLI at it (APIMART_BASE_URL, APIMART_API_KEY). ``python -m apimart_async.emulator`` and
``apimart-async emulator`` take the same options: both are built by ``add_arguments`` here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys

from ._network import NETWORK_PROFILES
from ._realistic import DEFAULT_DURATIONS, PROFILES, RealisticProfile
from ._server import Emulator
from ._service import BATCH_ROUTES, CONFLICT_PLACEMENTS, UNKNOWN_TASK_REPLIES

__all__ = ["DESCRIPTION", "add_arguments", "build_parser", "emulator_from_args", "main", "run"]

DESCRIPTION = "Run the APIMart emulator on loopback until interrupted (Ctrl-C)."


def _parse_duration(text: str) -> float | tuple[float, float]:
    try:
        if "-" in text.strip("-"):
            low, high = text.split("-", 1)
            return float(low), float(high)
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH seconds, got {text!r}") from None


def _model_duration(text: str) -> tuple[str, tuple[float, float]]:
    key, sep, span = text.partition("=")
    try:
        value = _parse_duration(span) if sep and key else None
    except (ValueError, argparse.ArgumentTypeError):
        value = None
    if value is None:
        raise argparse.ArgumentTypeError("expected MODEL[:LENGTH]=LOW-HIGH, e.g. sora-2=60-240")
    return key, value if isinstance(value, tuple) else (value, value)


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError("the time scale must be a number > 0")
    return value


def _status_name(text: str) -> tuple[str, str]:
    status, sep, word = text.partition("=")
    if not sep or not status or not word:
        raise argparse.ArgumentTypeError("expected STATUS=WORD, e.g. completed=success")
    return status, word


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 65535, got {text!r}")
    return port


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of the emulator, on ``p`` (the one definition both commands use)."""
    p.add_argument(
        "--host", default="127.0.0.1", help="loopback address to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--port", type=_port, default=8000, help="port; 0 picks a free one (default: %(default)s)"
    )
    p.add_argument(
        "--api-key", default=None, help="key to accept (default: a random one, printed at start)"
    )
    p.add_argument(
        "--mode",
        choices=("auto", "manual"),
        default="auto",
        help="auto: tasks end after --duration; manual: they stay pending (default: %(default)s)",
    )
    p.add_argument(
        "--duration",
        type=_parse_duration,
        default=(2.0, 6.0),
        metavar="SECONDS",
        help="how long a task runs: N, or LOW-HIGH drawn per task (default: 2-6)",
    )
    p.add_argument(
        "--failure-rate",
        type=_fraction,
        default=0.0,
        help="fraction of tasks that end failed (default: %(default)s)",
    )
    p.add_argument(
        "--fault-rate",
        type=_fraction,
        default=0.0,
        help="fraction of requests given a random fault (default: %(default)s)",
    )
    p.add_argument(
        "--webhook-loss",
        type=_fraction,
        default=0.0,
        help="fraction of webhook callbacks never delivered (default: %(default)s)",
    )
    p.add_argument(
        "--webhook-duplicates",
        type=_fraction,
        default=0.0,
        help="fraction of webhook callbacks delivered twice (default: %(default)s)",
    )
    p.add_argument(
        "--webhook-delay",
        type=_seconds,
        default=0.0,
        help="seconds between a task's end and its webhook callback (default: %(default)s)",
    )
    p.add_argument(
        "--no-batch-route",
        action="store_true",
        help="answer 404 on POST /v1/tasks/batch (the same as --batch-route absent)",
    )
    p.add_argument(
        "--batch-route",
        choices=BATCH_ROUTES,
        default="ok",
        help="how POST /v1/tasks/batch behaves: ok, absent (404), refuse (400), partial "
        "(leaves live tasks out), nested ({data: {tasks: [...]}}), keyed ({data: {id: task}}) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--unknown-task",
        choices=UNKNOWN_TASK_REPLIES,
        default="404",
        help="how an unknown task id is answered: 404, 400 (invalid task ID) or 200 with "
        '{"code": 404} (default: %(default)s)',
    )
    p.add_argument(
        "--conflict-code-in",
        choices=CONFLICT_PLACEMENTS,
        default="both",
        help="where a 409 sub-code goes: both, type (error.type) or code (error.code) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--status-name",
        type=_status_name,
        action="append",
        default=[],
        metavar="STATUS=WORD",
        help="the service's word for a status, e.g. completed=success (repeatable; default: "
        "the documented words)",
    )
    p.add_argument(
        "--balance",
        type=float,
        default=1000.0,
        help="starting balance in USD; -1 for unlimited (default: %(default)s)",
    )
    p.add_argument(
        "--network",
        choices=NETWORK_PROFILES,
        default="loopback",
        help="real: gzip when accepted, replies in small segments with pauses, sometimes "
        "chunked (default: %(default)s)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve https with a private CA (needs trustme); its PEM file is printed as ca_file",
    )
    p.add_argument(
        "--video-bytes",
        type=int,
        default=64 * 1024,
        help="size of each result file in bytes (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="makes ids, durations and faults repeatable (default: %(default)s)",
    )
    p.add_argument(
        "--profile",
        choices=PROFILES,
        default="default",
        help="realistic: minute-long jobs per model, estimated_time off by up to 25%%, uneven "
        "progress, a round trip on every reply (--duration is then ignored)",
    )
    p.add_argument(
        "--model-duration",
        type=_model_duration,
        action="append",
        default=[],
        metavar="MODEL[:LENGTH]=LOW-HIGH",
        help="realistic profile: seconds for a model family (and clip length), repeatable; "
        "defaults: " + ", ".join(f"{k}={lo:g}-{hi:g}" for k, (lo, hi) in DEFAULT_DURATIONS.items()),
    )
    p.add_argument(
        "--estimate-error",
        type=float,
        default=None,
        help="estimated_time is the true duration times 1 +/- this (default 0.2; realistic 0.25)",
    )
    p.add_argument(
        "--rtt", type=float, default=0.2, help="realistic profile: seconds added to every reply"
    )
    p.add_argument(
        "--time-scale",
        type=_scale,
        default=1.0,
        help="the emulator's clock runs this many times faster than real time",
    )
    p.add_argument(
        "--state",
        metavar="PATH",
        default=None,
        help=(
            "keep tasks, balance, idempotency keys and the clock in this file across "
            "restarts (default: nothing kept)"
        ),
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def build_parser(prog: str = "python -m apimart_async.emulator") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    return p


def _profile(args: argparse.Namespace) -> str | RealisticProfile:
    if args.profile != "realistic":
        return str(args.profile)
    durations = dict(DEFAULT_DURATIONS)
    durations.update(dict(args.model_duration))
    extra = {} if args.estimate_error is None else {"estimate_error": args.estimate_error}
    return RealisticProfile(durations=durations, rtt=args.rtt, **extra)


def emulator_from_args(args: argparse.Namespace) -> Emulator:
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
        state_path=args.state,
        profile=_profile(args),
        time_scale=args.time_scale,
        webhook_loss=args.webhook_loss,
        webhook_duplicates=args.webhook_duplicates,
        webhook_delay=args.webhook_delay,
        **({} if args.estimate_error is None else {"estimate_error": args.estimate_error}),
    )
    if args.fault_rate:
        emu.faults.set_rate(args.fault_rate)
    return emu


async def serve(args: argparse.Namespace) -> None:
    async with emulator_from_args(args) as emu:
        # One JSON line first, so a parent process can read where to connect.
        first = {"base_url": emu.base_url, "api_key": emu.api_key}
        if emu.ca_file is not None:
            first["ca_file"] = emu.ca_file
        print(json.dumps(first), flush=True)
        trust = f"  export SSL_CERT_FILE={emu.ca_file}\n" if emu.ca_file else ""
        kept = f"  state kept in {emu.state_path}\n" if emu.state_path is not None else ""
        print(
            f"APIMart emulator on {emu.base_url} (network: {emu.network})\n"
            f"  export APIMART_BASE_URL={emu.base_url}\n"
            f"  export APIMART_API_KEY={emu.api_key}\n"
            f"{trust}"
            f"{kept}"
            "Ctrl-C to stop.",
            file=sys.stderr,
            flush=True,
        )
        stop = asyncio.Event()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()  # then the emulator stops cleanly (CA file removed, state saved)


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM (then save the state file, if any); the exit code."""
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args))
    except (OSError, ValueError) as exc:  # port taken, unreadable state file, bad option
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m apimart_async.emulator`` runs standalone and serves a real client."""

from __future__ import annotations

import json
import os
import sys

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import apimart_async as am

pytestmark = pytest.mark.anyio

CMD = [
    sys.executable,
    "-m",
    "apimart_async.emulator",
    "--port",
    "0",
    "--duration",
    "0",
    "--api-key",
    "sk-test",
]


async def test_standalone_emulator() -> None:
    async with await anyio.open_process(CMD) as proc:
        assert proc.stdout is not None
        try:
            with anyio.fail_after(30):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 4096)
            info = json.loads(line)
            assert info["api_key"] == "sk-test"
            assert info["base_url"].startswith("http://127.0.0.1:")
            async with am.AsyncApimart(
                info["api_key"], base_url=info["base_url"], poll=am.PollPolicy(first_check=0.01)
            ) as client:
                task = await client.videos.generate(am.VideoRequest("sora-2-preview", "x"))
            assert task.ok
        finally:
            proc.terminate()
            await proc.wait()


def test_variant_flags() -> None:
    from apimart_async.emulator.__main__ import build_parser

    args = build_parser().parse_args(
        [
            "--batch-route",
            "keyed",
            "--unknown-task",
            "400",
            "--conflict-code-in",
            "code",
            "--status-name",
            "completed=success",
            "--status-name",
            "failed=failure",
        ]
    )
    assert (args.batch_route, args.unknown_task, args.conflict_code_in) == ("keyed", "400", "code")
    assert dict(args.status_name) == {"completed": "success", "failed": "failure"}
    defaults = build_parser().parse_args([])
    assert (defaults.batch_route, defaults.unknown_task, defaults.conflict_code_in) == (
        "ok",
        "404",
        "both",
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--status-name", "completed"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--batch-route", "sometimes"])


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_a_port_out_of_range_is_a_usage_error_naming_the_flag(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not an OverflowError traceback from bind() once the server starts."""
    from apimart_async.emulator.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--port", port])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --port: must be a whole number from 0 to 65535, got {port!r}" in err


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--failure-rate", "2"),
        ("--failure-rate", "-0.1"),
        ("--fault-rate", "5"),
        ("--fault-rate", "nan"),
    ],
)
def test_a_rate_outside_0_to_1_is_a_usage_error_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--failure-rate 2 was taken (every task failed); --fault-rate 5 was refused without
    naming the flag."""
    from apimart_async.emulator.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main([flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a number from 0 to 1, got {value!r}" in err


async def test_standalone_emulator_plays_variants() -> None:
    flags = ["--batch-route", "refuse", "--unknown-task", "400", "--status-name", "completed=ok!"]
    async with await anyio.open_process([*CMD, *flags]) as proc:
        assert proc.stdout is not None
        try:
            with anyio.fail_after(30):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 4096)
            info = json.loads(line)
            async with am.AsyncApimart(
                info["api_key"], base_url=info["base_url"], poll=am.PollPolicy(first_check=0.01)
            ) as client:
                task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "x"))
                with anyio.fail_after(30):
                    (task,) = await client.tasks.get_many([task_id])
                    while task.status is not am.TaskStatus.UNKNOWN:  # "ok!" is no known word
                        (task,) = await client.tasks.get_many([task_id])
                assert task.raw_status == "ok!"
                assert client.batch_route_available is False  # refused
                with pytest.raises(am.BadRequestError, match="^invalid task ID"):
                    await client.tasks.get("task_nope")
        finally:
            proc.terminate()
            await proc.wait()


async def test_standalone_emulator_over_https_on_the_real_network_profile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    async with await anyio.open_process([*CMD, "--network", "real", "--tls"]) as proc:
        assert proc.stdout is not None
        try:
            with anyio.fail_after(30):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 4096)
            info = json.loads(line)
            assert info["base_url"].startswith("https://127.0.0.1:")
            monkeypatch.setenv("SSL_CERT_FILE", info["ca_file"])
            async with am.AsyncApimart(
                info["api_key"], base_url=info["base_url"], poll=am.PollPolicy(first_check=0.01)
            ) as client:
                task = await client.videos.generate(am.VideoRequest("sora-2-preview", "x"))
            assert task.ok
        finally:
            proc.terminate()
            await proc.wait()
    assert proc.returncode == 0
    assert not os.path.exists(info["ca_file"])  # removed when the emulator stopped

"""``apimart-async doctor``: what it finds against the emulator's variants, and its exit status."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import apimart_async as am
from apimart_async import cli
from apimart_async._doctor import Finding, diagnose, exit_code, render_table
from apimart_async.emulator import Emulator, Fault

from ._proxy import ConnectProxy

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _no_env_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def doc_client(emu: Emulator) -> AsyncIterator[am.AsyncApimart]:
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=0) as c:
        yield c


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


async def test_default_emulator_everything_ok(emu: Emulator, doc_client: am.AsyncApimart) -> None:
    findings = await diagnose(doc_client)
    assert [f.check for f in findings] == [
        "connectivity",
        "tls",
        "proxy",
        "key",
        "batch route",
        "batch size",
        "unknown task id",
    ]
    assert {f.status for f in findings} == {"ok"}
    got = by_check(findings)
    assert got["key"].found == "accepted; balance 1000.00 USD"
    assert got["batch route"].found == 'answers {"data": [task, ...]}'
    assert got["batch size"].found == "accepts 100 ids, refuses 101"
    assert got["unknown task id"].found.startswith("404 (")
    assert exit_code(findings) == 0
    assert emu.tasks_created == 0  # nothing was spent
    assert emu.api_key not in render_table(findings)


async def test_batch_route_absent_means_per_task_reads(doc_client: am.AsyncApimart) -> None:
    async with Emulator(batch_route=False) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client:
            got = by_check(await diagnose(client))
    assert got["batch route"] == Finding(
        "batch route", "warn", "absent (404)", "-> per-task reads (GET /v1/tasks/{id})"
    )
    assert "batch size" not in got


async def test_batch_route_refused_with_400(emu: Emulator, doc_client: am.AsyncApimart) -> None:
    body = {"error": {"message": "ids is required", "type": "invalid_request_error"}}
    emu.faults.inject("batch", Fault.reply(400, body))
    findings = await diagnose(doc_client)
    got = by_check(findings)
    assert got["batch route"].status == "warn"
    assert got["batch route"].found == "refused (400: ids is required)"
    assert got["batch route"].action == "-> per-task reads (GET /v1/tasks/{id})"
    assert exit_code(findings) == 0  # the SDK can do without it


async def test_batch_route_with_a_shape_the_sdk_cannot_read(
    emu: Emulator, doc_client: am.AsyncApimart
) -> None:
    emu.faults.inject("batch", Fault.reply(200, {"code": 200, "results": []}))
    got = by_check(await diagnose(doc_client))
    assert got["batch route"] == Finding(
        "batch route",
        "warn",
        "answers another shape: {code, results}",
        "per-task reads (GET /v1/tasks/{id})",
    )


async def test_batch_route_with_a_nested_shape_the_sdk_reads(
    emu: Emulator, doc_client: am.AsyncApimart
) -> None:
    emu.faults.inject("batch", Fault.reply(200, {"code": 200, "data": {"tasks": [], "total": 0}}))
    got = by_check(await diagnose(doc_client))
    assert got["batch route"] == Finding(
        "batch route", "ok", 'answers {"data": {tasks, total}}', "batched status reads"
    )


async def test_batch_route_refusing_100_ids(emu: Emulator, doc_client: am.AsyncApimart) -> None:
    emu.faults.inject("batch", Fault.reply(200, {"code": 200, "data": []}))
    emu.faults.inject("batch", Fault.reply(400, {"error": {"message": "at most 50 ids"}}))
    got = by_check(await diagnose(doc_client))
    assert got["batch size"].status == "warn"
    assert got["batch size"].found == "refuses 100 ids (400)"


@pytest.mark.parametrize(
    ("status", "body", "found"),
    [
        (
            400,
            {"error": {"message": "task expired or not exist"}},
            "400 (task expired or not exist)",
        ),
        (
            200,
            {"code": 404, "message": "task not found"},
            "200 with {code, message}: task not found",
        ),
    ],
    ids=["400", "200-with-error-code"],
)
async def test_what_an_unknown_task_id_answers(
    emu: Emulator, doc_client: am.AsyncApimart, status: int, body: object, found: str
) -> None:
    emu.faults.inject("task", Fault.reply(status, body))
    got = by_check(await diagnose(doc_client))
    assert got["unknown task id"].status == "warn"
    assert got["unknown task id"].found == found


async def test_a_400_for_an_unknown_id_the_sdk_cannot_recognise_says_what_the_sdk_does(
    emu: Emulator, doc_client: am.AsyncApimart
) -> None:
    # the poller takes a 400 for "no such task" only when its message says so; any other 400
    # ends a wait as a refused read after PollPolicy.hard_error_tries: the table must say that
    emu.faults.inject("task", Fault.reply(400, {"error": {"message": "bad request"}}))
    got = by_check(await diagnose(doc_client))
    assert got["unknown task id"].status == "warn"
    assert got["unknown task id"].found == "400 (bad request)"
    assert "BadRequestError" in got["unknown task id"].action
    assert "grace" not in got["unknown task id"].action


async def test_refused_key_fails(emu: Emulator) -> None:
    async with am.AsyncApimart("sk-wrong", base_url=emu.base_url) as client:
        findings = await diagnose(client)
    got = by_check(findings)
    assert got["key"] == Finding(
        "key", "fail", "refused (HTTP 401)", "nothing works: check the key"
    )
    assert exit_code(findings) == 1
    assert "sk-wrong" not in render_table(findings)


async def test_no_connection_fails() -> None:
    async with Emulator() as emu:
        base_url = emu.base_url
    async with am.AsyncApimart("sk-test", base_url=base_url, max_retries=0) as client:
        findings = await diagnose(client)
    assert findings[0].check == "connectivity" and findings[0].status == "fail"
    assert exit_code(findings) == 1


async def test_untrusted_certificate_fails_and_says_what_to_do() -> None:
    async with Emulator(tls=True) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=0) as client:
            bad = by_check(await diagnose(client))
        ctx = emu.client_ssl_context()
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, ssl=ctx) as client:
            good = by_check(await diagnose(client))
    assert bad["tls"].status == "fail"
    assert "SSL_CERT_FILE" in bad["tls"].action
    assert good["tls"] == Finding("tls", "ok", "certificate verified (the ssl context given)", "")


async def test_proxy_in_use_is_reported_without_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Emulator(tls=True) as emu, ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://u:secret@"))
        ctx = emu.client_ssl_context()
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, ssl=ctx) as client:
            findings = await diagnose(client)
    got = by_check(findings)
    assert got["proxy"].found == f"{proxy.url} (from the environment)"
    assert "secret" not in render_table(findings)
    assert proxy.tunnels >= 1
    assert exit_code(findings) == 0


@pytest.mark.parametrize("tls", [True, False], ids=["https-tunnel", "plain-http"])
async def test_a_proxy_that_refuses_the_credentials_is_the_failing_row(tls: bool) -> None:
    async with Emulator(tls=tls) as emu, ConnectProxy(proxy_auth="Basic dTpwdw==") as proxy:
        ctx = emu.client_ssl_context() if tls else None
        bad = proxy.url.replace("http://", "http://u:hunter2@")
        async with am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, ssl=ctx, proxy=bad, max_retries=0
        ) as client:
            findings = await diagnose(client)
    got = by_check(findings)
    assert got["proxy"].status == "fail", render_table(findings)
    assert "407" in got["proxy"].found and proxy.url in got["proxy"].found
    assert "credentials" in got["proxy"].action
    assert "hunter2" not in render_table(findings)
    assert exit_code(findings) == 1


async def test_an_unreachable_proxy_is_the_failing_row() -> None:
    async with Emulator() as emu:
        async with am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, proxy="http://127.0.0.1:9", max_retries=0
        ) as client:
            findings = await diagnose(client)
    got = by_check(findings)
    assert got["proxy"].status == "fail", render_table(findings)
    assert "cannot connect" in got["proxy"].found
    assert exit_code(findings) == 1


async def test_submit_check_proves_a_repeated_key_returns_the_same_task(
    emu: Emulator, doc_client: am.AsyncApimart
) -> None:
    got = by_check(await diagnose(doc_client, submit_model="sora-2-preview"))
    assert got["idempotency"].status == "ok"
    assert emu.tasks_created == 1
    assert emu.counters["submit"] == 2


# -- the command line -------------------------------------------------------------------------


def test_cli_doctor_emulate_prints_a_table_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--emulate"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["CHECK", "RESULT", "FOUND", "SDK", "WILL"]
    assert "batch route" in out and "unknown task id" in out


def test_cli_doctor_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--emulate", "--json", "--submit", "sora-2-preview", "--yes"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True
    assert [f["check"] for f in data["findings"]][-1] == "idempotency"


def test_cli_doctor_submit_asks_first(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert cli.main(["doctor", "--emulate", "--submit", "sora-2-preview"]) == 2
    assert "--yes" in capsys.readouterr().err


def test_cli_doctor_without_a_key_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor"]) == 2
    assert "no API key" in capsys.readouterr().err


async def test_cli_doctor_base_url_exits_1_when_the_key_is_refused(
    emu: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    # cli.main runs its own event loop: call the coroutine it would run, in this one
    from apimart_async._doctor import cmd_doctor

    args = cli.build_parser().parse_args(
        ["doctor", "--base-url", emu.base_url, "--api-key", "sk-wrong"]
    )
    assert await cmd_doctor(args, []) == 1
    out = capsys.readouterr().out
    assert "refused (HTTP 401)" in out and "sk-wrong" not in out


class _Forgetful(dict[str, object]):
    """An idempotency store that remembers nothing: a service that ignores the key."""

    def __setitem__(self, key: str, value: object) -> None:
        pass


async def test_submit_check_fails_when_a_repeated_key_makes_a_second_task(
    emu: Emulator, doc_client: am.AsyncApimart
) -> None:
    emu.state.idempotency = _Forgetful()  # type: ignore[assignment]
    findings = await diagnose(doc_client, submit_model="sora-2-preview")
    got = by_check(findings)
    assert got["idempotency"].status == "fail"
    assert "second task" in got["idempotency"].found
    assert emu.tasks_created == 2
    assert exit_code(findings) == 1


def test_doctor_options_leave_the_shared_ones_alone() -> None:
    import argparse

    from apimart_async._doctor import add_doctor_parser

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--emulate", action="store_true")
    common.add_argument("--json", dest="as_json", action="store_true")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", parents=[common])
    add_doctor_parser(sub, common)
    assert run.parse_args(["--emulate", "--json"]).emulate is True
    args = parser.parse_args(["doctor", "--emulate", "--json", "--yes"])
    assert (args.emulate, args.as_json, args.yes) == (True, True, True)


async def test_cli_doctor_ca_file_adds_to_the_trusted_cas(tmp_path: Path) -> None:
    # --ca-file is "extra CAs to trust": the CAs trusted already (here SSL_CERT_FILE, the
    # emulator's) must still be, e.g. a proxy's CA added while the API's stays trusted
    trustme = pytest.importorskip("trustme")
    other = tmp_path / "other-ca.pem"
    other.write_bytes(trustme.CA().cert_pem.bytes())
    async with Emulator(tls=True) as emu:
        assert emu.ca_file is not None
        env = {**os.environ, "APIMART_API_KEY": emu.api_key, "SSL_CERT_FILE": emu.ca_file}
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
            env.pop(name, None)
        args = ["doctor", "--json", "--base-url", emu.base_url, "--ca-file", str(other)]
        result = await anyio.run_process(
            [sys.executable, "-m", "apimart_async.cli", *args],
            env=env,
            check=False,
        )
    data = json.loads(result.stdout)
    assert {f["check"]: f["status"] for f in data["findings"]}["tls"] == "ok", data
    assert result.returncode == 0

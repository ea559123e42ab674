"""The API key never appears in a log record, repr, exception message or args."""

from __future__ import annotations

import contextlib
import logging
import pickle
import sqlite3
from pathlib import Path

import anyio
import pytest

import apimart_async as am
from apimart_async._config import Secret
from apimart_async.emulator import Emulator, Fault

pytestmark = pytest.mark.anyio

KEY = "sk-live-SECRETSECRET0123456789"
PREFIX = KEY[:12]


def _all_text(exc: BaseException) -> str:
    parts = [str(exc), repr(exc), *map(repr, exc.args), repr(vars(exc))]
    if exc.__cause__ is not None:
        parts.append(_all_text(exc.__cause__))
    if exc.__context__ is not None and exc.__context__ is not exc.__cause__:
        parts.append(_all_text(exc.__context__))
    return "\n".join(parts)


async def test_key_absent_everywhere_under_faults(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    async with Emulator(api_key=KEY, frozen_clock=True) as emu:
        client = am.AsyncApimart(KEY, base_url=emu.base_url, max_retries=1)
        async with client:
            for fault in (
                Fault.drop(),
                Fault.malformed(),
                Fault.truncated(),
                Fault.server_error(),
                Fault.rate_limited(0),
                Fault.lost_reply(),
                Fault.error(400, "invalid_request_error"),
            ):
                emu.faults.inject("submit", fault, times=2)
                try:
                    await client.videos.submit(am.VideoRequest("sora-2-preview", "x"))
                except am.ApimartError as exc:
                    errors.append(exc)
            for endpoint in ("task", "batch", "balance"):
                emu.faults.inject(endpoint, Fault.server_error(), times=2)
            for call in (
                client.tasks.get("task_x"),
                client.tasks.get_many(["task_x"]),
                client.balance(),
            ):
                try:
                    await call
                except am.ApimartError as exc:
                    errors.append(exc)
            texts = [repr(client), str(client), repr(client._transport.__dict__)]
        async with am.AsyncApimart("wrong-key", base_url=emu.base_url) as other:
            with pytest.raises(am.AuthenticationError) as info:
                await other.balance()
        assert "wrong-key" not in _all_text(info.value)
    assert len(errors) >= 4
    texts += [_all_text(e) for e in errors]
    texts += [r.getMessage() + repr(r.args) + repr(r.__dict__) for r in caplog.records]
    assert caplog.records  # there was something to scan
    for text in texts:
        assert KEY not in text
        assert PREFIX not in text


@pytest.mark.parametrize("status", [401, 400, 500, 200])
async def test_a_service_echoing_the_key_does_not_put_it_in_the_error(status: int) -> None:
    """Some gateways quote the key in their error ("invalid key sk-..."): the SDK's error
    carried it in its message and body, and a web app answering ``str(exc)`` (as the
    examples do) handed the server's key to whoever called it."""
    echo = {"error": {"message": f"Incorrect API key provided: {KEY}", "type": "x"}}
    if status == 200:  # an error inside a 200, and a 200 that is no JSON
        echo = {"code": 401, "message": f"bad token {KEY}", "data": None}
    async with Emulator(api_key=KEY, frozen_clock=True) as emu:
        async with am.AsyncApimart(KEY, base_url=emu.base_url, max_retries=0) as client:
            errors = []
            for body in (echo, f"<html>bad key {KEY}</html>".encode()):
                emu.faults.inject("balance", Fault.reply(status, body))
                with pytest.raises(am.ApimartError) as info:
                    await client.balance()
                errors.append(info.value)
    for exc in errors:
        text = _all_text(exc) + repr(getattr(exc, "body", b""))
        assert PREFIX not in text, text


def test_secret_never_shows() -> None:
    s = Secret(KEY)
    assert KEY not in f"{s} {s!r} {s:>40}"
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(s)
    assert s.reveal() == KEY


def test_configuration_errors_do_not_echo_the_key() -> None:
    with pytest.raises(am.ConfigurationError) as info:
        am.AsyncApimart(KEY + "\nX-Injected: 1")
    assert KEY not in _all_text(info.value)
    with pytest.raises(am.ConfigurationError) as info:
        am.AsyncApimart(KEY, base_url="http://evil.example.com")
    assert KEY not in _all_text(info.value)


async def test_redirects_are_not_followed(emu: Emulator) -> None:
    emu.faults.inject("balance", Fault.reply(302, {"moved": True}))
    async with am.AsyncApimart(emu.api_key, base_url=emu.base_url) as c:
        with pytest.raises(am.APIStatusError, match="redirects are not followed") as info:
            await c.balance()
    assert info.value.status == 302
    assert emu.counters["balance"] == 1


# -- the CLI: every path that prints (part of) a command line ------------------------------


@pytest.mark.parametrize(
    "key_args",
    [
        ["--api-key", KEY],
        [f"--api-key={KEY}"],
        [f"--api-kye={KEY}"],  # a typo: argparse would echo it back
        ["--api_key", KEY],
        ["--api", KEY],  # an abbreviation: argparse would list the choices with the value
        [KEY],  # a stray positional
    ],
)
async def test_cli_usage_errors_never_echo_the_key(key_args: list[str]) -> None:
    from tests.test_cli import cli

    for command in (["balance"], ["status", "task_x"], ["run", "jobs.jsonl", "--dry-run"]):
        code, out, err = await cli(*command, "--base-url", "http://127.0.0.1:9", *key_args)
        text = out + err
        assert KEY not in text and PREFIX not in text, (command, key_args, text)
        if key_args[0].startswith("--api-key"):
            continue
        assert code == 2 and "usage: apimart-async" in err


@pytest.mark.parametrize("form", ["flag", "equals", "stdin", "env"])
async def test_cli_resume_line_never_contains_the_key(tmp_path: Path, form: str) -> None:
    from tests.test_cli import _interrupted_run

    key_args, stdin, env_key = {
        "flag": (["--api-key", KEY], b"", None),
        "equals": ([f"--api-key={KEY}"], b"", None),
        "stdin": (["--api-key", "-"], KEY.encode() + b"\n", None),
        "env": ([], b"", KEY),
    }[form]
    async with Emulator(api_key=KEY, mode="manual") as emu:
        text = await _interrupted_run(tmp_path, emu, *key_args, stdin=stdin, env_key=env_key)
    assert "resume with:" in text and "APIMART_API_KEY" in text.split("resume with:")[1]
    assert KEY not in text and PREFIX not in text


async def test_key_never_reaches_the_client_journal_or_a_batch_journal(tmp_path: Path) -> None:
    """Every file a client journal and a batch journal leave (the database, its WAL while it
    is open, the lock file) is scanned for the key and its prefix, during and after a run."""
    from .conftest import FAST_POLL

    seen: dict[str, bytes] = {}

    def scan() -> None:
        for path in tmp_path.iterdir():
            seen[f"{path.name}@{len(seen)}"] = path.read_bytes()

    async with Emulator(api_key=KEY, frozen_clock=True, task_duration=10.0) as emu:
        client = am.AsyncApimart(
            KEY, base_url=emu.base_url, poll=FAST_POLL, journal=tmp_path / "client.sqlite"
        )
        async with client:
            emu.faults.inject("submit", Fault.lost_reply(), times=1)  # retried with its key
            first = await client.videos.submit(am.VideoRequest("sora-2-preview", "x"))
            jobs = [am.VideoRequest("sora-2-preview", f"job {i}") for i in range(2)]
            async with client.batch(jobs, journal=tmp_path / "batch.sqlite") as results:
                await emu.wait_until(lambda: emu.tasks_created == 3)
                scan()  # while both journals are open: WAL and lock files too
                emu.advance(10)
                assert [o.ok async for o in results] == [True, True]
            assert (await client.tasks.wait(first)).ok
            scan()
        assert await anyio.Path(tmp_path / "client.sqlite.lock").exists() is False
        scan()
    names = {name.partition("@")[0] for name in seen}
    assert {"client.sqlite", "client.sqlite-wal", "client.sqlite.lock", "batch.sqlite"} <= names
    with contextlib.closing(sqlite3.connect(tmp_path / "client.sqlite")) as conn:
        assert conn.execute("SELECT count(*) FROM submits").fetchone() == (3,)  # not empty
    for name, data in seen.items():
        assert KEY.encode() not in data, name
        assert PREFIX.encode() not in data, name

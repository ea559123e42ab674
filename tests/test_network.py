"""Replies as a real network delivers them (segments, gzip, chunked, cut), TLS and proxies.

Against ``Emulator(network="real")``, ``Emulator(tls=True)`` (a private CA made by trustme) and
``tests/_proxy.py`` (an HTTP CONNECT proxy on loopback that counts its tunnels).
"""

from __future__ import annotations

import base64
import gzip
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

import apimart_async as am
from apimart_async import _transport
from apimart_async.emulator import Emulator

from ._proxy import ConnectProxy
from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY")


@pytest.fixture(autouse=True)
def _no_env_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)


def real_emu(**kwargs: object) -> Emulator:
    return Emulator(
        network="real",
        mode="manual",
        frozen_clock=True,
        **kwargs,  # type: ignore[arg-type]
    )


# -- replies in pieces --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("use_gzip", "chunked_share"),
    [(False, 0.0), (True, 0.0), (False, 1.0), (True, 1.0)],
    ids=["segments-sized", "gzip-sized", "segments-chunked", "gzip-chunked"],
)
async def test_batch_status_reply_of_100_tasks_in_many_pieces_is_read_whole(
    use_gzip: bool, chunked_share: float
) -> None:
    async with real_emu() as emu:
        assert emu.network_profile is not None
        emu.network_profile.gzip = use_gzip
        emu.network_profile.chunked_share = chunked_share
        ids = emu.create_tasks(100)
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=2) as client:
            tasks = await client.tasks.get_many(ids)
            assert sorted(t.id for t in tasks) == sorted(ids)
            assert client.request_counts() == {"batch": 1}
        counts = emu.network_profile.counts
        assert counts["replies"] == 1
        assert counts["segments"] >= 5  # the reply really came in many pieces
        assert counts["gzip"] == (1 if use_gzip else 0)
        assert counts["chunked"] == (1 if chunked_share else 0)


async def test_every_endpoint_works_over_the_real_network_profile() -> None:
    async with real_emu(video_bytes=3000) as emu:
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client:
            balance = await client.balance()
            assert balance.remain_balance == 1000.0
            task_id = await client.videos.submit(am.VideoRequest("sora-2-preview", "a cat"))
            emu.complete(task_id)
            task = await client.tasks.wait(task_id, timeout=30)
            assert task.status is am.TaskStatus.COMPLETED
            with pytest.raises(am.NotFoundError):
                await client.tasks.get("task_nope")
            assert client.request_counts().get("retries", 0) == 0


# -- replies cut short or too large (a raw server, to write exactly what a test needs) ------


@pytest.fixture
async def raw_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A server whose replies are chosen by path; returns its base URL and the paths hit."""
    hits: list[str] = []
    full = gzip.compress(b'{"code": 200, "data": {"remain_balance": 5, "used_balance": 1}}' * 40)

    async def cut_gzip(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        resp = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
        resp.content_length = len(full)
        await resp.prepare(request)
        await resp.write(full[: len(full) // 2])
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def cut_chunked(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b'{"code": 200, "data": {"remain_')
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def declared_big(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 5000
        await resp.prepare(request)
        await resp.write(b"{" + b" " * 4998 + b"}")
        return resp

    async def undeclared_big(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(50):
            await resp.write(b" " * 100)
        return resp

    async def gzip_bomb(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        body = gzip.compress(b" " * 5000)
        return web.Response(
            body=body,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    app = web.Application()
    app.router.add_get("/v1/balance/cut-gzip", cut_gzip)
    app.router.add_get("/v1/balance/cut-chunked", cut_chunked)
    app.router.add_get("/v1/balance/declared-big", declared_big)
    app.router.add_get("/v1/balance/undeclared-big", undeclared_big)
    app.router.add_get("/v1/balance/gzip-bomb", gzip_bomb)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", hits
    finally:
        await runner.cleanup()


async def _balance_at(client: am.AsyncApimart, path: str) -> object:
    return await client._transport.request(
        "GET", path, kind="balance", retry="read", parse=lambda r: r.body
    )


@pytest.mark.parametrize("path", ["/v1/balance/cut-gzip", "/v1/balance/cut-chunked"])
async def test_truncated_reply_is_retried_then_a_typed_connection_error(
    raw_server: tuple[str, list[str]], path: str
) -> None:
    base_url, hits = raw_server
    async with am.AsyncApimart("sk-test", base_url=base_url, max_retries=2) as client:
        with pytest.raises(am.APIConnectionError) as info:
            await _balance_at(client, path)
    assert hits == [path] * 3
    assert client.request_counts() == {"balance": 3, "retries": 2}
    assert "sk-test" not in str(info.value)


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/v1/balance/declared-big", "declares 5000 bytes"),
        ("/v1/balance/undeclared-big", "larger than 1000 bytes"),
        ("/v1/balance/gzip-bomb", "larger than 1000 bytes"),
    ],
)
async def test_reply_over_the_size_limit_is_refused_with_a_typed_error(
    raw_server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch, path: str, words: str
) -> None:
    monkeypatch.setattr(_transport, "MAX_REPLY_BYTES", 1000)
    base_url, hits = raw_server
    async with am.AsyncApimart("sk-test", base_url=base_url, max_retries=2) as client:
        with pytest.raises(am.ResponseValidationError, match=words):
            await _balance_at(client, path)
    assert hits == [path]  # a reply too large is not asked for again


async def test_the_default_emulator_replies_in_one_piece() -> None:
    async with Emulator() as emu:
        assert emu.network == "loopback" and emu.network_profile is None
        assert emu.base_url.startswith("http://")


# -- TLS ------------------------------------------------------------------------------------


async def test_https_with_a_private_ca_through_ssl_context() -> None:
    async with Emulator(tls=True) as emu:
        assert emu.base_url.startswith("https://127.0.0.1:")
        ctx = emu.client_ssl_context()
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, ssl=ctx) as client:
            assert (await client.balance()).remain_balance == 1000.0
        # without the CA the certificate is refused with a typed error, not an ssl exception
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, max_retries=0) as client:
            with pytest.raises(am.APIConnectionError, match="(?i)certificate"):
                await client.balance()


async def test_https_with_a_private_ca_through_ssl_cert_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Emulator(tls=True) as emu:
        assert emu.ca_file is not None
        monkeypatch.setenv("SSL_CERT_FILE", emu.ca_file)
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client:
            assert (await client.balance()).remain_balance == 1000.0


def test_ssl_must_be_an_ssl_context() -> None:
    with pytest.raises(am.ConfigurationError, match="ssl must be an ssl.SSLContext"):
        am.AsyncApimart("sk-test", ssl="yes")  # type: ignore[arg-type]


# -- proxies --------------------------------------------------------------------------------


async def test_https_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    async with Emulator(tls=True) as emu, ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        ctx = emu.client_ssl_context()
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, ssl=ctx) as client:
            await client.balance()
            await client.balance()
        assert proxy.tunnels == 1  # one tunnel, kept alive for both requests
        assert proxy.targets == {f"127.0.0.1:{emu.port}": 1}
        assert emu.counters["balance"] == 2


async def test_http_proxy_from_the_environment_forwards_plain_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Emulator() as emu, ConnectProxy() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url) as client:
            await client.balance()
        assert proxy.forwarded == 1 and proxy.tunnels == 0


async def test_proxy_argument_names_one_with_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "Basic " + base64.b64encode(b"user:pw").decode()
    async with Emulator(tls=True) as emu, ConnectProxy(proxy_auth=token) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # the argument wins
        proxy_url = proxy.url.replace("http://", "http://user:pw@")
        ctx = emu.client_ssl_context()
        client = am.AsyncApimart(emu.api_key, base_url=emu.base_url, ssl=ctx, proxy=proxy_url)
        assert "pw" not in repr(client)
        async with client:
            await client.balance()
        assert proxy.tunnels == 1 and proxy.refused == 0
        # a proxy that refuses the credentials is a typed error that does not show them
        bad = proxy.url.replace("http://", "http://user:wrong@")
        async with am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, ssl=ctx, proxy=bad, max_retries=0
        ) as client:
            with pytest.raises(am.APIConnectionError) as info:
                await client.balance()
        assert "wrong" not in str(info.value)
        assert proxy.refused == 1


async def test_no_proxy_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    async with Emulator(tls=True) as emu, ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        ctx = emu.client_ssl_context()
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, ssl=ctx) as client:
            await client.balance()
        assert proxy.tunnels == 0
        assert emu.counters["balance"] == 1


async def test_trust_env_false_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async with Emulator(tls=True) as emu, ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        ctx = emu.client_ssl_context()
        async with am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, ssl=ctx, trust_env=False
        ) as client:
            await client.balance()
        assert proxy.tunnels == 0


async def test_scheme_less_proxy_from_the_environment_is_read_as_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # HTTPS_PROXY=proxy.corp:3128 (no scheme) is common; requests and httpx read it as http://
    async with Emulator(tls=True) as emu, ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url.removeprefix("http://"))
        ctx = emu.client_ssl_context()
        async with am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, ssl=ctx, max_retries=0
        ) as client:
            await client.balance()
        assert proxy.tunnels == 1


@pytest.mark.parametrize(
    ("no_proxy", "url", "bypassed"),
    [
        ("127.0.0.1:8443", "https://127.0.0.1:8443/v1/balance", True),
        ("127.0.0.1:8443", "https://127.0.0.1:9443/v1/balance", False),
        ("api.example.com:443", "https://api.example.com/v1/balance", True),
        ("127.0.0.0/8", "https://127.0.0.2:8443/v1/balance", True),
        ("10.0.0.0/8", "https://127.0.0.1:8443/v1/balance", False),
        ("*.example.com", "https://api.example.com/v1/balance", True),
        (".example.com", "https://api.example.com/v1/balance", True),
        ("example.com", "https://api.example.com/v1/balance", True),
        ("example.com", "https://badexample.com/v1/balance", False),
        ("[::1]:8443", "https://[::1]:8443/v1/balance", True),
        ("::1", "https://[::1]:8443/v1/balance", True),
        (" other.org , *.example.com ", "https://cdn.example.com/f.mp4", True),
        ("*", "https://api.apimart.ai/v1/balance", True),
    ],
)
def test_no_proxy_entries_with_ports_networks_and_wildcards(
    monkeypatch: pytest.MonkeyPatch, no_proxy: str, url: str, bypassed: bool
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    proxy, _ = _transport._Proxies(None, trust_env=True).for_url(url)
    assert (proxy is None) is bypassed


async def test_no_proxy_with_the_emulators_port_bypasses_the_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Emulator(tls=True) as emu, ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", f"127.0.0.1:{emu.port}")
        ctx = emu.client_ssl_context()
        async with am.AsyncApimart(emu.api_key, base_url=emu.base_url, ssl=ctx) as client:
            await client.balance()
        assert proxy.tunnels == 0
        assert emu.counters["balance"] == 1


async def test_plain_http_through_a_proxy_that_wants_credentials() -> None:
    # plain http goes through the proxy as a forwarded request (no tunnel): the credentials
    # must travel in that request's Proxy-Authorization (result files may be http URLs)
    token = "Basic " + base64.b64encode(b"user:pw").decode()
    async with Emulator() as emu, ConnectProxy(proxy_auth=token) as proxy:
        proxy_url = proxy.url.replace("http://", "http://user:pw@")
        async with am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, proxy=proxy_url, max_retries=0
        ) as client:
            await client.balance()
        assert proxy.forwarded == 1 and proxy.refused == 0


@pytest.mark.parametrize("proxy", ["socks5://127.0.0.1:1080", "127.0.0.1:3128", ""])
def test_proxy_must_be_an_http_url(proxy: str) -> None:
    with pytest.raises(am.ConfigurationError, match="proxy must be an http"):
        am.AsyncApimart("sk-test", proxy=proxy)


def test_trust_env_must_be_a_bool() -> None:
    with pytest.raises(am.ConfigurationError, match="trust_env must be True or False"):
        am.AsyncApimart("sk-test", trust_env="no")  # type: ignore[arg-type]


# -- a whole batch, the way a user far away would run it ------------------------------------


@pytest.mark.parametrize("batch_route", [True, False], ids=["batch-route", "per-task"])
async def test_batch_of_50_over_https_through_a_proxy_on_the_real_network_profile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, batch_route: bool
) -> None:
    jobs = [am.VideoRequest("sora-2-preview", f"scene {i}") for i in range(50)]
    async with (
        Emulator(
            network="real",
            tls=True,
            task_duration=(0.01, 0.2),
            seed=11,
            batch_route=batch_route,
            video_bytes=4096,
        ) as emu,
        ConnectProxy() as proxy,
    ):
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        emu.faults.set_rate(0.1, endpoints=("submit", "batch", "task"))
        ctx = emu.client_ssl_context()
        async with am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, ssl=ctx, poll=FAST_POLL, max_retries=8
        ) as client:
            async with client.batch(jobs, concurrency=8, download_dir=tmp_path) as results:
                outcomes = [o async for o in results]
        assert sorted(o.index for o in outcomes) == list(range(50))
        assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
        assert emu.tasks_created == 50
        assert sorted(emu.tasks_per_key.values()) == [1] * 50
        assert proxy.tunnels >= 1
        assert emu.network_profile is not None
        assert emu.network_profile.counts["gzip"] > 0
        assert emu.network_profile.counts["chunked"] > 0
        assert emu.faults.total_served() > 0
        # every video downloaded through the tunnel too, and verified
        for o in outcomes:
            assert o.task is not None
            assert [f.sha256 for f in o.files] == [emu.file_sha256(o.task.id)]


def test_unknown_network_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="network must be one of loopback, real"):
        Emulator(network="lossy")  # type: ignore[arg-type]

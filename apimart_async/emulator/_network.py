"""How the emulator's replies travel: the default loopback profile, or one like the Internet.

``network="real"`` makes every API reply look like it came from a server far away, behind
the usual front end:

- gzip-compressed when the request's ``Accept-Encoding`` names gzip;
- written in small segments (16 to 256 bytes) with short pauses (0.5 to 3 ms) between some
  of them, so a client sees the body arrive in many reads, as over TLS or through a proxy;
- sometimes chunked (no ``Content-Length``), sometimes sized, drawn per reply.

Draws come from a ``random.Random(seed)``, so a run with the same seed and the same order of
requests is the same. Result files (``/files/...``) and replies already written by a fault
(a dropped or truncated reply) pass through untouched. The pauses are real time inside the
server, a few milliseconds per reply, and have nothing to do with the emulator's clock.

TLS: ``LocalCA`` (needs the ``trustme`` package, in the ``test`` extra) makes a private CA and
a certificate for ``127.0.0.1`` and ``localhost``; ``Emulator(tls=True)`` serves https with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import random
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

from aiohttp import web

__all__ = ["NETWORK_PROFILES", "LocalCA", "Network", "NetworkProfile"]

Network = Literal["loopback", "real"]
NETWORK_PROFILES: Final = ("loopback", "real")

#: Replies shorter than this are never compressed (as most front ends do).
GZIP_MIN_BYTES: Final = 256


class NetworkProfile:
    """The ``real`` profile: an aiohttp middleware that rewrites how replies are written."""

    def __init__(
        self,
        seed: int = 0,
        *,
        segment: tuple[int, int] = (16, 256),
        pause: tuple[float, float] = (0.0005, 0.003),
        pause_every: int = 4,
        chunked_share: float = 0.5,
        gzip: bool = True,
    ) -> None:
        self._random = random.Random(seed)
        #: Compress when the client accepts gzip (tests turn it off to see segments alone).
        self.gzip = gzip
        self.segment = segment
        self.pause = pause
        self.pause_every = pause_every
        self.chunked_share = chunked_share
        #: Replies written by this profile: total, gzip, chunked, segments.
        self.counts: dict[str, int] = {"replies": 0, "gzip": 0, "chunked": 0, "segments": 0}

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        resp = await handler(request)
        if not isinstance(resp, web.Response) or resp.prepared or request.path.startswith("/_"):
            return resp
        body = resp.body
        if not isinstance(body, bytes):
            return resp
        return await self.write(request, resp, body)

    async def write(
        self, request: web.Request, resp: web.Response, body: bytes
    ) -> web.StreamResponse:
        rnd = self._random
        headers: dict[str, Any] = {
            k: v
            for k, v in resp.headers.items()
            if k.lower() not in ("content-length", "content-encoding", "transfer-encoding")
        }
        if resp.content_type and "Content-Type" not in headers:
            headers["Content-Type"] = resp.content_type
        wire = body
        accept = request.headers.get("Accept-Encoding", "").lower()
        if self.gzip and "gzip" in accept and len(body) >= GZIP_MIN_BYTES:
            wire = gzip.compress(body, compresslevel=5, mtime=0)
            headers["Content-Encoding"] = "gzip"
            headers["Vary"] = "Accept-Encoding"
            self.counts["gzip"] += 1
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        chunked = rnd.random() < self.chunked_share
        if chunked:
            out.enable_chunked_encoding()
            self.counts["chunked"] += 1
        else:
            out.content_length = len(wire)
        self.counts["replies"] += 1
        await out.prepare(request)
        pos = 0
        n = 0
        try:
            while pos < len(wire):
                size = rnd.randint(*self.segment)
                await out.write(wire[pos : pos + size])
                pos += size
                n += 1
                if n % self.pause_every == 0 and pos < len(wire):
                    await asyncio.sleep(rnd.uniform(*self.pause))
            await out.write_eof()
        except ConnectionError:  # the client went away mid-reply, as clients do
            pass
        self.counts["segments"] += n
        return out


class LocalCA:
    """A private certificate authority and a loopback server certificate, made with trustme.

    ``server_context()`` for the emulator, ``client_context()`` for a client that trusts it,
    ``ca_file`` a PEM file of the CA (for ``SSL_CERT_FILE``), removed by ``cleanup()``.
    """

    def __init__(self) -> None:
        try:
            import trustme
        except ImportError:  # pragma: no cover - the test extra installs it
            raise RuntimeError(
                "https on loopback needs the 'trustme' package (pip install 'apimart-async[test]')"
            ) from None
        self._ca = trustme.CA()
        self._cert = self._ca.issue_cert("127.0.0.1", "localhost")
        fd, path = tempfile.mkstemp(prefix="apimart-emulator-ca-", suffix=".pem")
        with os.fdopen(fd, "wb") as fh:
            fh.write(self._ca.cert_pem.bytes())
        self.ca_file = path

    def server_context(self) -> ssl.SSLContext:
        # what trustme's configure_cert does for the stdlib, typed (its signature names
        # pyOpenSSL, which may not be installed)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        pem: bytes = self._cert.private_key_and_cert_chain_pem.bytes()
        fd, path = tempfile.mkstemp(prefix="apimart-emulator-cert-", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.load_verify_locations(cadata=self._ca.cert_pem.bytes().decode("ascii"))
        return ctx

    def cleanup(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ca_file)

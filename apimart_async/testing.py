"""Test your own code against the built-in emulator, with retry waits switched off.

A plain async context manager::

    async with emulated_api(mode="manual") as api:
        task_id = await api.client.videos.submit(VideoRequest("sora-2-preview", "a cat"))
        api.emulator.complete(task_id)

and a pytest plugin, which you opt into (nothing is loaded into pytest runs that do not ask)::

    # conftest.py
    pytest_plugins = ["apimart_async.testing"]

or ``pytest -p apimart_async.testing``. Its fixtures:

- ``apimart_emulator``: a running ``apimart_async.emulator.Emulator`` (tasks finish at
  once; ``advance()``, ``complete()``, ``faults``, ``counters`` and the rest are yours);
- ``apimart_client``: an open ``apimart_async.AsyncApimart`` pointed at it, polling every few
  milliseconds;
- ``apimart_api``: both, as an ``EmulatedAPI``.

They are async: run the tests that use them with anyio's plugin (``@pytest.mark.anyio``;
installed with apimart-async) or with pytest-asyncio (``@pytest.mark.asyncio`` in strict
mode, or auto mode). They run on asyncio (aiohttp needs it): the plugin pins anyio's
``anyio_backend`` to ``"asyncio"``, so an installed trio adds no trio variants; define your own
``anyio_backend`` fixture to choose otherwise.
"""

from __future__ import annotations

# Import cost (issue 16): a pytest run that loads this plugin pays for its import before its
# first test, so the module imports only what pytest has already imported. The SDK and the
# emulator (aiohttp) are imported by the fixtures and ``emulated_api``, when used
# (tests/test_pytest_plugin.py::test_importing_the_plugin_imports_no_sdk).
import contextlib
import dataclasses
import functools
import types
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, Literal, TypedDict

if TYPE_CHECKING:
    import os
    import ssl

    from ._client import AsyncApimart
    from ._config import Timeout
    from ._poll_schedule import PollPolicy
    from .emulator import Emulator
    from .emulator._realistic import RealisticProfile

__all__ = ["FAST_POLL", "ClientOptions", "EmulatedAPI", "emulated_api", "follow_clock"]

FAST_POLL: PollPolicy  # made on first use (module ``__getattr__``)
"""A poll policy for tests: checks within milliseconds."""


@functools.cache
def _fast_poll() -> PollPolicy:
    from ._poll_schedule import PollPolicy

    return PollPolicy(first_check=0.001, min_interval=0.001, max_interval=0.01, jitter=0.0)


if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        if name == "FAST_POLL":
            return _fast_poll()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class EmulatedAPI:
    """A client and the emulator it talks to."""

    client: AsyncApimart
    """An open client pointed at ``emulator``."""
    emulator: Emulator
    """The running emulator."""


class ClientOptions(TypedDict, total=False):
    """Keyword arguments of ``apimart_async.AsyncApimart`` that ``emulated_api`` passes on."""

    timeout: Timeout | float | None
    """Per-attempt timeouts (``apimart_async.AsyncApimart``'s ``timeout``)."""
    max_retries: int
    """Retries after the first attempt."""
    language: str
    """Language of the service's error messages."""
    status_concurrency: int
    """Per-task status GETs in flight at first when the batch route is missing."""
    max_status_concurrency: int | None
    """The most per-task status GETs in flight (the window adapts up to it)."""
    requests_per_second: float | None
    """A cap on all requests of the client."""
    download_concurrency: int
    """Result files downloaded at once."""
    wait_unreachable: float | None
    """Seconds of failed status reads after which waits end (``apimart_async.AsyncApimart``'s
    ``wait_unreachable``)."""


def follow_clock(client: AsyncApimart, emulator: Emulator) -> None:
    """Make the client's poller schedule on the emulator's clock: its time, its wall time
    (for ``created``) and its ``time_scale`` (real waits shrink by it). Needed when the
    emulator runs with ``time_scale`` != 1 or when a test ``advance()``s its clock."""
    clock = emulator.clock
    client._poller.use_clock(clock.monotonic, clock.now, clock.scale)


@contextlib.asynccontextmanager
async def emulated_api(
    *,
    poll: PollPolicy | None = None,
    client_options: ClientOptions | None = None,
    mode: Literal["auto", "manual"] = "auto",
    task_duration: float | tuple[float, float] = 0.0,
    estimate_error: float = 0.2,
    failure_rate: float = 0.0,
    seed: int = 0,
    balance: float | None = 1000.0,
    video_bytes: int = 64 * 1024,
    video_ttl: float = 24 * 3600,
    task_ttl: float = 3 * 24 * 3600,
    frozen_clock: bool = False,
    batch_route: bool | Literal["ok", "absent", "refuse", "partial", "nested", "keyed"] = True,
    unknown_task: Literal["404", "400", "200"] = "404",
    conflict_code_in: Literal["both", "type", "code"] = "both",
    status_names: dict[str, str] | None = None,
    network: Literal["loopback", "real"] = "loopback",
    tls: bool | ssl.SSLContext = False,
    blocked_words: tuple[str, ...] = ("[blocked]",),
    webhook_retry_delays: tuple[float, ...] = (10.0, 30.0, 60.0),
    webhook_loss: float = 0.0,
    webhook_duplicates: float = 0.0,
    webhook_delay: float = 0.0,
    file_chunk_delay: float = 0.0,
    state_path: str | os.PathLike[str] | None = None,
    profile: str | RealisticProfile = "default",
    time_scale: float = 1.0,
) -> AsyncGenerator[EmulatedAPI, None]:
    """Start an emulator, open a client on it, and make retry waits zero meanwhile.

    The emulator's options are ``apimart_async.emulator.Emulator``'s, with the same defaults
    except ``task_duration``: tasks finish at once unless you say otherwise. ``poll`` and
    ``client_options`` go to ``apimart_async.AsyncApimart``. With a ``time_scale``, the
    client schedules on the emulator's clock (``follow_clock``). ``poll`` None: ``FAST_POLL``.
    """
    from ._client import AsyncApimart  # the SDK and the aiohttp server: imported when used
    from ._retry import is_testing, set_testing
    from .emulator import Emulator

    if poll is None:
        poll = _fast_poll()

    was_testing = is_testing()
    set_testing(True)
    try:
        async with (
            Emulator(
                mode=mode,
                task_duration=task_duration,
                estimate_error=estimate_error,
                failure_rate=failure_rate,
                seed=seed,
                balance=balance,
                video_bytes=video_bytes,
                video_ttl=video_ttl,
                task_ttl=task_ttl,
                frozen_clock=frozen_clock,
                batch_route=batch_route,
                unknown_task=unknown_task,
                conflict_code_in=conflict_code_in,
                status_names=status_names,
                network=network,
                tls=tls,
                blocked_words=blocked_words,
                webhook_retry_delays=webhook_retry_delays,
                webhook_loss=webhook_loss,
                webhook_duplicates=webhook_duplicates,
                webhook_delay=webhook_delay,
                file_chunk_delay=file_chunk_delay,
                state_path=state_path,
                profile=profile,
                time_scale=time_scale,
            ) as emu,
            AsyncApimart(
                emu.api_key, base_url=emu.base_url, poll=poll, **(client_options or {})
            ) as client,
        ):
            if emu.clock.scale != 1.0:
                follow_clock(client, emu)
            yield EmulatedAPI(client, emu)
    finally:
        set_testing(was_testing)


try:  # the pytest plugin, when pytest is there (loaded only by those who opt in)
    import pytest
except ImportError:  # pragma: no cover - the context manager works without pytest
    pass
else:

    async def _apimart_api(**_plugin_arguments: Any) -> AsyncIterator[EmulatedAPI]:
        # _plugin_arguments: what async plugins add to the fixture's arguments for their own
        # use (pytest-asyncio before 1.0 adds ``event_loop`` and ``request``)
        async with emulated_api() as api:
            yield api

    async def apimart_api() -> AsyncIterator[EmulatedAPI]:
        """A running emulator and an open client on it (``api.emulator``, ``api.client``)."""
        async for api in _apimart_api():
            yield api

    try:  # pytest-asyncio in strict mode runs only the async fixtures made with its decorator
        import pytest_asyncio
    except ImportError:
        apimart_api = pytest.fixture(apimart_api)
    else:
        apimart_api = pytest_asyncio.fixture(apimart_api)

    @pytest.fixture
    def apimart_emulator(apimart_api: EmulatedAPI) -> Emulator:
        """The running emulator of ``apimart_api``."""
        return apimart_api.emulator

    @pytest.fixture
    def apimart_client(apimart_api: EmulatedAPI) -> AsyncApimart:
        """An open ``AsyncApimart`` on ``apimart_emulator``."""
        return apimart_api.client

    def _asyncio_backend() -> str:
        return "asyncio"

    def pytest_configure(config: pytest.Config) -> None:
        """anyio's tests run on asyncio (aiohttp needs it), not on every installed backend.

        The ``anyio_backend`` fixture saying so is registered as a plugin of its own, here, so
        after anyio's plugin however this one was loaded (``-p`` loads it before anyio's): it
        wins over anyio's default, and a project's own ``anyio_backend`` fixture (conftest or
        test module) still wins over both."""
        name = "apimart_async.testing.anyio_backend"
        if config.pluginmanager.get_plugin(name) is None:
            holder = types.ModuleType(name)
            holder.anyio_backend = pytest.fixture(  # type: ignore[attr-defined]
                _asyncio_backend, scope="module", name="anyio_backend"
            )
            config.pluginmanager.register(holder, name)

    @pytest.hookimpl(tryfirst=True, hookwrapper=True)
    def pytest_fixture_setup(fixturedef: Any, request: Any) -> Any:
        """For a test that anyio's plugin runs (it uses ``anyio_backend``), set
        ``apimart_api`` up as a plain async fixture, which anyio runs on the test's event loop
        (and pytest-asyncio, whose fixture it otherwise is, leaves alone)."""
        if fixturedef.argname != "apimart_api" or "anyio_backend" not in request.fixturenames:
            yield
            return
        original = fixturedef.func, fixturedef.argnames
        fixturedef.func = _apimart_api
        try:
            yield
        finally:  # anyio before 4.12 leaves its own wrapper and argument in place
            fixturedef.func, fixturedef.argnames = original

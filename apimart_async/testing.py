"""Test your own code against the built-in emulator, with retry waits switched off.

A plain async context manager::

    async with emulated_api(mode="manual") as api:
        task_id = await api.client.videos.submit(VideoRequest("sora-2-preview", "a cat"))
        api.emulator.complete(task_id)

and pytest fixtures (registered automatically when apimart-async is installed; async tests
need an async plugin such as anyio's ``@pytest.mark.anyio``):

- ``apimart_emulator``: a running ``Emulator`` (tasks finish at once; ``advance()``,
  ``complete()``, ``faults``, ``counters`` and the rest are yours);
- ``apimart_client``: an open ``AsyncApimart`` pointed at it, polling every few milliseconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import attrs

from ._client import AsyncApimart
from ._retry import is_testing, set_testing
from ._schedule import PollPolicy
from .emulator import Emulator

__all__ = ["FAST_POLL", "EmulatedAPI", "emulated_api"]

#: A poll policy for tests: checks within milliseconds.
FAST_POLL = PollPolicy(first_check=0.001, min_interval=0.001, max_interval=0.01, jitter=0.0)


@attrs.frozen
class EmulatedAPI:
    """A client and the emulator it talks to."""

    client: AsyncApimart
    emulator: Emulator


@contextlib.asynccontextmanager
async def emulated_api(
    *,
    poll: PollPolicy = FAST_POLL,
    client_options: dict[str, Any] | None = None,
    **emulator_options: Any,
) -> AsyncIterator[EmulatedAPI]:
    """Start an emulator (``emulator_options`` go to ``Emulator``; tasks finish at once unless
    you say otherwise), open a client on it, and make retry waits zero meanwhile."""
    emulator_options.setdefault("task_duration", 0.0)
    was_testing = is_testing()
    set_testing(True)
    try:
        async with Emulator(**emulator_options) as emu:
            options = {"poll": poll, **(client_options or {})}
            async with AsyncApimart(emu.api_key, base_url=emu.base_url, **options) as client:
                yield EmulatedAPI(client, emu)
    finally:
        set_testing(was_testing)


try:  # pytest fixtures, when pytest is there
    import pytest
except ImportError:  # pragma: no cover - the context manager works without pytest
    pass
else:

    @pytest.fixture
    async def apimart_api() -> AsyncIterator[EmulatedAPI]:
        async with emulated_api() as api:
            yield api

    @pytest.fixture
    def apimart_emulator(apimart_api: EmulatedAPI) -> Emulator:
        return apimart_api.emulator

    @pytest.fixture
    def apimart_client(apimart_api: EmulatedAPI) -> AsyncApimart:
        return apimart_api.client

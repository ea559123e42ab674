"""How to test your own code with apimart-async's fixtures (no key, no network).

    pip install "apimart-async[testing]" && python -m pytest examples/test_my_app.py

The fixtures ``apimart_client`` and ``apimart_emulator`` come with the package, in a pytest
plugin you opt into: ``pytest_plugins = ["apimart_async.testing"]`` in your top-level
``conftest.py`` (here, in the test module itself, so that the example stands alone), or
``pytest -p apimart_async.testing``. anyio's marker runs the async tests, on asyncio.
"""

from __future__ import annotations

import pytest

import apimart_async as am
from apimart_async.emulator import Emulator, Fault

pytest_plugins = ["apimart_async.testing"]
pytestmark = pytest.mark.anyio


# -- your code ------------------------------------------------------------------------------


async def make_trailers(client: am.AsyncApimart, prompts: list[str]) -> dict[str, str]:
    """Your application: a video per prompt; returns prompt -> video URL (failures skipped)."""
    urls: dict[str, str] = {}
    jobs = [am.VideoRequest("sora-2-preview", p, duration=8) for p in prompts]
    async with client.batch(jobs, concurrency=4) as results:
        async for outcome in results:
            if outcome.ok and outcome.task is not None:
                urls[prompts[outcome.index]] = outcome.task.video_urls[0]
    return urls


# -- your tests -----------------------------------------------------------------------------


async def test_every_prompt_gets_a_video(
    apimart_client: am.AsyncApimart, apimart_emulator: Emulator
) -> None:
    urls = await make_trailers(apimart_client, ["a cat", "a dog", "a fox"])
    assert set(urls) == {"a cat", "a dog", "a fox"}
    assert all(url.startswith(apimart_emulator.base_url) for url in urls.values())
    assert apimart_emulator.counters["submit"] == 3  # exactly one paid submit each


async def test_survives_a_flaky_service(
    apimart_client: am.AsyncApimart, apimart_emulator: Emulator
) -> None:
    apimart_emulator.faults.inject("submit", Fault.server_error(503), times=2)
    apimart_emulator.faults.inject("submit", Fault.lost_reply())
    urls = await make_trailers(apimart_client, ["a cat"])
    assert list(urls) == ["a cat"]
    assert apimart_emulator.tasks_created == 1  # retried, never billed twice


async def test_a_failed_video_is_skipped(
    apimart_client: am.AsyncApimart, apimart_emulator: Emulator
) -> None:
    urls = await make_trailers(apimart_client, ["a cat", "[blocked] content"])
    assert list(urls) == ["a cat"]

"""The gallery in real headless Chromium, driven over the DevTools protocol.

An emulated batch with failures, a multi-video task, a hostile prompt and a file whose path
needs URL-encoding is written to disk, its gallery opened from ``file://``, and the page is
checked as a user sees it. Skipped, with the reason, where no Chromium is installed
(``tests/ci_setup_browser.sh`` installs Debian's).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest

import apimart_async as am
from apimart_async import report
from apimart_async.emulator import Emulator

from .conftest import FAST_POLL

ROOT = Path(__file__).resolve().parent.parent


def _load_chromium_helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "apimart_bench_chromium", ROOT / "benchmarks" / "_chromium.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cdp = _load_chromium_helper()
CHROMIUM: str | None = cdp.find_chromium()

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium installed: run tests/ci_setup_browser.sh "
        "(apt-get install -y chromium) or set APIMART_CHROMIUM",
    ),
]

#: Resolves when no card on the page still holds its video in a <template> (they are put in
#: place when they near the screen), checked once per frame.
ALL_MEDIA_IN_PLACE = (
    "new Promise(done => { const check = () => document.querySelector('.media template')"
    " ? requestAnimationFrame(check) : done(true); check(); })"
)
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"
ODD_FILE = "odd name #2 ?é 視頻.mp4"


async def _emulated_batch(out: Path) -> list[am.Outcome]:
    """Six jobs: three completed (one of them with two videos, one with the hostile prompt),
    two failed with their own messages, one completed whose file gets an awkward name."""
    jobs = [
        ("apple", am.VideoRequest("sora-2-preview", "a red apple on a table", duration=8)),
        ("hostile", am.VideoRequest("sora-2-preview", HOSTILE)),
        ("storm", am.VideoRequest("sora-2-preview", "a storm at sea")),
        (
            "two",
            am.VideoRequest(
                "viduq3",
                "the bear waves twice",
                image_urls=["https://example.com/bear.png"],
                duration=4,
                seed=42,
            ),
        ),
        ("broken", am.VideoRequest("sora-2-pro-preview", "a city at night", resolution="high")),
        ("odd", am.VideoRequest("sora-2-preview", "a file name with spaces")),
    ]
    async with (
        Emulator(mode="manual", frozen_clock=True) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
        client.batch(jobs, download_dir=out, journal=out / "journal.sqlite") as results,
    ):
        await emu.wait_until(lambda: emu.tasks_created == 6)
        await emu.wait_until(lambda: len(client._poller) == 6)
        ids = {emu.state.tasks[t].body["prompt"]: t for t in emu.task_ids()}
        emu.fail(ids["a storm at sea"], message="the prompt was rejected by moderation")
        emu.fail(ids["a city at night"], code=500, message="upstream generation timed out")
        emu.complete(ids["the bear waves twice"], videos=2)
        emu.complete_all()
        return [o async for o in results]


@pytest.fixture
async def page() -> Any:
    assert CHROMIUM is not None
    async with cdp.chromium(CHROMIUM) as p:
        yield p


async def test_gallery_in_chromium(page: Any, tmp_path: Path, record_property: Any) -> None:
    out = tmp_path / "my vidéos #1"  # the page's own folder needs encoding in its URL too
    outcomes = await _emulated_batch(out)
    assert sorted(o.ok for o in outcomes) == [False, False, True, True, True, True]
    cards = report.read_manifest(out / "manifest.jsonl")
    odd = next(c for c in cards if c.name == "odd")
    moved = out / ODD_FILE
    os.replace(odd.files[0], moved)
    cards = [attrs.evolve(c, files=(str(moved),)) if c.name == "odd" else c for c in cards]
    index = report.write_gallery(cards, out)

    await page.goto(index.as_uri())

    # one card per job, in job order
    assert await page.evaluate("[...document.querySelectorAll('article.card')].map(c => c.id)") == [
        f"job-{i}" for i in range(6)
    ]
    # failed jobs show their error instead of a video
    failed = await page.evaluate(
        "[...document.querySelectorAll('.card.g-failed')].map(c => "
        "[c.id, c.querySelector('.err').textContent, c.querySelectorAll('video').length])"
    )
    assert [f[0] for f in failed] == ["job-2", "job-4"]
    assert "the prompt was rejected by moderation" in failed[0][1]
    assert "upstream generation timed out (code 500)" in failed[1][1]
    assert [f[2] for f in failed] == [0, 0]
    # the hostile prompt is text; nothing of it ran or was loaded
    assert await page.evaluate("document.querySelector('#job-1 .prompt').textContent") == HOSTILE
    assert await page.evaluate("document.images.length") == 0
    assert await page.evaluate("document.scripts.length") == 1
    assert "Page.javascriptDialogOpening" not in page.events
    # the page's own script runs under its CSP (the filter works) and nothing was refused
    shown = await page.evaluate(
        "(() => { const s = document.getElementById('f-status'); s.value = 'failed';"
        " s.dispatchEvent(new Event('change'));"
        " const n = [...document.querySelectorAll('.card')].filter(c => !c.hidden).length;"
        " const r = [n, document.getElementById('shown').textContent, location.hash];"
        " s.value = ''; s.dispatchEvent(new Event('change')); return r; })()"
    )
    assert shown == [2, "2", "#status=failed"]
    logs = [e["entry"]["text"] for e in page.events.get("Log.entryAdded", [])]
    assert not [t for t in logs if "Content Security Policy" in t], logs
    # every video, both of the two-video task and the awkwardly named one, loads its metadata
    await page.evaluate(ALL_MEDIA_IN_PLACE)
    states = await page.evaluate(
        "Promise.all([...document.querySelectorAll('video')].map(v => v.readyState >= 1"
        " ? [v.readyState, v.duration] : new Promise((ok, bad) => {"
        " v.addEventListener('loadedmetadata', () => ok([v.readyState, v.duration]));"
        " v.addEventListener('error', () => bad(new Error('cannot load ' + v.currentSrc)));"
        " })))",
        timeout=90,
    )
    assert len(states) == 5  # 3 single-video jobs + 2 videos of one job; failed jobs: none
    assert all(state >= 1 and duration > 2.9 for state, duration in states), states
    assert await page.evaluate("document.querySelectorAll('#job-3 video').length") == 2
    assert (
        await page.evaluate("decodeURIComponent(document.querySelector('#job-5 video').src)")
    ).endswith("/my vidéos #1/" + ODD_FILE)

    shot = await page.screenshot(tmp_path / "gallery.png")
    record_property("screenshot", str(shot))
    print(f"\ngallery screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    # a phone: one column, nothing wider than the screen
    await page.send(
        "Emulation.setDeviceMetricsOverride",
        width=390,
        height=844,
        deviceScaleFactor=1,
        mobile=True,
    )
    await page.send(
        "Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "dark"}]
    )
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(18, 18, 18)"  # dark mode follows the system
    phone = await page.screenshot(tmp_path / "gallery-phone-dark.png")
    print(f"phone, dark: {phone}")


async def test_videos_are_put_in_place_as_cards_near_the_screen(page: Any, tmp_path: Path) -> None:
    from apimart_async.emulator._state import SAMPLE_VIDEO

    cards = []
    for i in range(60):
        (tmp_path / f"{i:06d}.mp4").write_bytes(SAMPLE_VIDEO)
        cards.append(
            report.GalleryJob(
                index=i, status="completed", prompt=f"p{i}", files=(str(tmp_path / f"{i:06d}.mp4"),)
            )
        )
    index = report.write_gallery(cards, tmp_path)
    await page.goto(index.as_uri())
    live = await page.evaluate(
        "new Promise(done => { const check = () => { const n ="
        " document.querySelectorAll('video').length; n ? done(n) : requestAnimationFrame(check)"
        " }; check(); })"
    )
    assert live < 60  # the first screens only
    assert await page.evaluate("document.querySelector('#job-59 video')") is None
    await page.evaluate("document.getElementById('job-59').scrollIntoView()")
    state = await page.evaluate(
        "new Promise((done, bad) => { const check = () => {"
        " const v = document.querySelector('#job-59 video');"
        " if (!v) return requestAnimationFrame(check);"
        " if (v.readyState >= 1) return done(v.readyState);"
        " v.addEventListener('loadedmetadata', () => done(v.readyState));"
        " v.addEventListener('error', () => bad(new Error('cannot load ' + v.currentSrc)));"
        " }; check(); })",
        timeout=60,
    )
    assert state >= 1


async def test_the_policy_alone_stops_injected_markup(page: Any, tmp_path: Path) -> None:
    """Defence in depth: were a text ever left unescaped, the page's CSP still runs nothing."""
    index = report.write_gallery([report.GalleryJob(index=0, status="failed", error="x")], tmp_path)
    text = index.read_text()
    injected = text.replace('<p class="err">x</p>', f'<p class="err">{HOSTILE}</p>')
    assert injected != text
    index.write_text(injected)
    await page.goto(index.as_uri())
    assert await page.evaluate("document.images.length") == 1  # the markup is there...
    assert await page.evaluate("document.scripts.length") == 2
    assert "Page.javascriptDialogOpening" not in page.events  # ...and none of it ran
    logs = [e["entry"]["text"] for e in page.events.get("Log.entryAdded", [])]
    refused = [t for t in logs if "Content Security Policy" in t]
    assert len(refused) >= 2, logs  # the inline script and the onerror handler

"""The gallery page (apimart_async.report): rendering, reading manifests and journals,
atomic writes, live updates during a batch, and the ``report`` command."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import sys
import threading
import webbrowser
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import anyio
import pytest

import apimart_async as am
from apimart_async import cli, report
from apimart_async.emulator import Emulator
from apimart_async.report import GalleryJob

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"
NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


class Page(HTMLParser):
    """The parts of a page the tests look at: tags with their attributes, scripts, texts."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.texts: list[str] = []
        self._in: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.scripts.append(data)
        elif self._in == "style":
            self.styles.append(data)
        else:
            self.texts.append(data)

    def all(self, tag: str, **match: str) -> list[dict[str, str | None]]:
        return [
            a
            for t, a in self.tags
            if t == tag and all(m in (a.get(k) or "").split() for k, m in match.items())
        ]


def render(jobs: list[GalleryJob], **kw: Any) -> str:
    return report.render_gallery(jobs, now=NOW, **kw)


def job(index: int, status: str = "completed", **kw: Any) -> GalleryJob:
    defaults: dict[str, Any] = {"model": "sora-2-preview", "prompt": f"prompt {index}"}
    if status == "completed":
        defaults["files"] = (f"{index:06d}.mp4",)
    return GalleryJob(index=index, status=status, **{**defaults, **kw})


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# -- rendering ------------------------------------------------------------------------------


def test_hostile_texts_are_escaped_everywhere() -> None:
    page_text = render(
        [
            job(
                0,
                prompt=HOSTILE,
                name=HOSTILE,
                model='m"><script>alert(3)</script>',
                task_id="<b>t</b>",
            ),
            job(1, "failed", error=HOSTILE, resolution="<i>x</i>", aspect_ratio="&amp;"),
        ],
        title=HOSTILE,
    )
    page = Page(page_text)
    assert len(page.scripts) == 1  # the page's own, nothing else
    assert page.all("img") == []
    assert not [a for _, a in page.tags if any(k.startswith("on") for k in a)]
    assert HOSTILE in page.texts  # shown as text, exactly
    assert "<i>x</i>" in page.texts and "&amp;" in page.texts
    assert 'data-model="m&quot;&gt;&lt;script&gt;alert(3)&lt;/script&gt;"' in page_text
    assert "<script>alert" not in page_text


def test_direction_overrides_and_control_characters_are_shown_not_obeyed() -> None:
    """An unclosed right-to-left override (U+202E) in a model name, echoed by the service in
    its error, turned the rest of the error text backwards ("Trojan Source"); a NUL made the
    page a binary file. They are shown as their code point; natural RTL text and marks stay."""
    page_text = render(
        [
            job(0, name="rtl \u202eevil\u2069 name", prompt="שלום \u200f ok\x00\x07 end"),
            job(1, "error", model="m\u202e", error="model m\u202e does not exist (HTTP 400)"),
        ]
    )
    for char in ("\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2069"):
        assert char not in page_text
    assert "\x00" not in page_text and "\x07" not in page_text
    page = Page(page_text)
    assert "rtl [U+202E]evil[U+2069] name" in page.texts
    assert "model m[U+202E] does not exist (HTTP 400)" in page.texts
    assert "שלום \u200f ok[U+0000][U+0007] end" in page.texts
    assert 'data-model="m[U+202E]"' in page_text
    assert '<option value="m[U+202E]">' in page_text


def test_content_security_policy_allows_only_the_pages_own_script_and_style() -> None:
    page_text = render([job(0)])
    page = Page(page_text)
    (meta,) = [a for a in page.all("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    policy = {part.split()[0]: part.split()[1:] for part in (meta["content"] or "").split("; ")}
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == [sha256_source(page.scripts[0])]
    assert policy["style-src"] == [sha256_source(page.styles[0])]
    assert policy["media-src"] == ["'self'"]
    assert "'unsafe-inline'" not in (meta["content"] or "")
    # the policy comes before any style or script, or it would not cover them
    assert page_text.index("Content-Security-Policy") < page_text.index("<style>")
    # nothing is fetched from elsewhere: no http(s) URL anywhere in the page
    assert not re.search(r"https?://", page_text)


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("plain.mp4", "plain.mp4"),
        ("with space.mp4", "with%20space.mp4"),
        ("hash#1.mp4", "hash%231.mp4"),
        ("what?.mp4", "what%3F.mp4"),
        ("100%.mp4", "100%25.mp4"),
        ("vidéo 視頻.mp4", "vid%C3%A9o%20%E8%A6%96%E9%A0%BB.mp4"),
        ('q"uote<&>.mp4', "q%22uote%3C%26%3E.mp4"),
        ("javascript:alert(1).mp4", "javascript%3Aalert%281%29.mp4"),
    ],
)
def test_video_paths_are_relative_and_url_encoded(tmp_path: Path, name: str, url: str) -> None:
    out = tmp_path / "out dir #1"
    out.mkdir()
    (out / "sub dir").mkdir()
    (out / name).write_bytes(b"x")
    (out / "sub dir" / name).write_bytes(b"x")
    page = Page(
        render(
            [job(0, files=(str(out / name),)), job(1, files=(str(out / "sub dir" / name),))],
            base_dir=out,
        )
    )
    srcs = [v["src"] for v in page.all("video")]
    assert srcs == [url, "sub%20dir/" + url]
    for video in page.all("video"):
        assert "controls" in video and video["preload"] == "metadata"


def test_a_moved_folder_links_the_video_next_to_the_page(tmp_path: Path) -> None:
    (tmp_path / "000000.mp4").write_bytes(b"x")
    page = Page(render([job(0, files=("/gone/elsewhere/000000.mp4",))], base_dir=tmp_path))
    assert [v["src"] for v in page.all("video")] == ["000000.mp4"]


def test_a_copied_folder_links_its_own_videos_not_the_originals(tmp_path: Path) -> None:
    """``cp -r videos backup && apimart-async report backup``: the manifest names the files
    in ``videos/``; the backup's page must show the backup's files (the original may be
    deleted next), while a file kept elsewhere on purpose stays linked where it is."""
    original, backup = tmp_path / "videos", tmp_path / "backup"
    for folder in (original, backup):
        folder.mkdir()
        (folder / "000000.mp4").write_bytes(b"x")
    (tmp_path / "kept.mp4").write_bytes(b"x")
    files = (str(original / "000000.mp4"), str(tmp_path / "kept.mp4"))
    page = Page(render([job(0, files=files)], base_dir=backup))
    assert [v["src"] for v in page.all("video")] == ["000000.mp4", "../kept.mp4"]


def test_a_deleted_video_is_said_missing_not_shown_as_a_dead_player(tmp_path: Path) -> None:
    """Delete a video, run ``report``: the card showed a player that loads nothing, with no
    word why; it says the file is missing (the job stays done: it was made and paid for)."""
    (tmp_path / "kept.mp4").write_bytes(b"x")
    files = (str(tmp_path / "kept.mp4"), str(tmp_path / "gone <1>.mp4"))
    page_text = render([job(0, files=files)], base_dir=tmp_path)
    page = Page(page_text)
    assert [v["src"] for v in page.all("video")] == ["kept.mp4"]
    assert "video file not found: gone <1>.mp4" in page.texts
    assert page.all("article")[0]["class"] == "card g-done"


def test_every_video_of_a_multi_video_task_and_failed_cards() -> None:
    page = Page(
        render(
            [
                job(0, files=("a.mp4", "a~2.mp4", "a~3.mp4"), name="three"),
                job(1, "failed", error="task t failed: rejected (code 400)"),
                job(2, "error", error="DownloadError: gone"),
                job(3, "pending"),
            ]
        )
    )
    cards = page.all("article")
    assert [c["id"] for c in cards] == ["job-0", "job-1", "job-2", "job-3"]
    assert [v["src"] for v in page.all("video")] == ["a.mp4", "a~2.mp4", "a~3.mp4"]
    assert [v["title"] for v in page.all("video")] == ["three (1/3)", "three (2/3)", "three (3/3)"]
    assert "task t failed: rejected (code 400)" in page.texts
    assert "DownloadError: gone" in page.texts
    assert [c["class"] for c in cards] == [
        "card g-done",
        "card g-failed",
        "card g-failed",
        "card g-pending",
    ]


def test_card_fields_and_header_totals() -> None:
    jobs = [
        job(
            0,
            model="viduq3",
            duration=8,
            resolution="720p",
            aspect_ratio="16:9",
            seed=42,
            cost=0.3,
            task_id="task_A",
            created=1000,
            completed=1040,
        ),
        job(1, "failed", cost=0.0, error="nope", created=1010, completed=1100),
        job(2, "cancelled", error="cancelled"),
        job(3, "submitted"),
        job(4, "completed", cost=1.25),
    ]
    page = Page(render(jobs))
    first = render([jobs[0]])
    dl = re.search(r"<dl>(.*?)</dl>", first)
    assert dl is not None
    assert re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", dl.group(1)) == [
        ("model", "viduq3"),
        ("duration", "8 s"),
        ("resolution", "720p"),
        ("aspect", "16:9"),
        ("seed", "42"),
        ("cost", "$0.30"),
        ("task", "<code>task_A</code>"),
        ("file", '<a href="000000.mp4">000000.mp4</a>'),
    ]
    assert [li["id"] for li in page.all("li")] == [
        "t-jobs",
        "t-done",
        "t-failed",
        "t-pending",
        "t-cost",
        "t-elapsed",
    ]
    header = re.sub(r"\s+", " ", "".join(page.texts[: page.texts.index("status ")]))
    assert "jobs 5" in header and "done 2" in header and "failed 2" in header
    assert "pending 1" in header and "cost $1.55" in header
    assert "elapsed 1:40" in header  # first created 1000 to last completed 1100


def test_filters_list_each_status_and_model_with_counts() -> None:
    jobs = [
        job(0, model="b-model"),
        job(1, "failed", model="a-model", error="x"),
        job(2, model="a-model"),
    ]
    page = Page(render(jobs))
    options: dict[str, list[str | None]] = {}
    current = None
    for tag, a in page.tags:
        if tag == "select":
            current = a["id"]
        elif tag == "option" and current:
            options.setdefault(current, []).append(a["value"])
    assert options == {
        "f-status": ["", "completed", "failed"],
        "f-model": ["", "a-model", "b-model"],
    }
    assert "completed (2)" in page.texts and "a-model (2)" in page.texts
    cards = page.all("article")
    assert [(c["data-status"], c["data-model"]) for c in cards] == [
        ("completed", "b-model"),
        ("failed", "a-model"),
        ("completed", "a-model"),
    ]


def test_live_pages_reload_and_finished_ones_do_not() -> None:
    assert Page(render([job(0)], refresh=5)).all("body")[0]["data-refresh"] == "5"
    assert "data-refresh" not in Page(render([job(0)])).all("body")[0]


def test_phone_and_dark_mode_markup() -> None:
    page_text = render([job(0)])
    page = Page(page_text)
    assert any(a.get("name") == "viewport" for a in page.all("meta"))
    assert "@media (prefers-color-scheme:dark)" in page.styles[0]


def test_a_thousand_job_page_stays_under_a_megabyte() -> None:
    jobs = [
        job(
            i,
            "completed" if i % 10 else "failed",
            prompt="a slow dolly shot of a lighthouse in a storm at night, waves crashing " * 2,
            duration=8,
            resolution="720p",
            seed=i,
            cost=0.4,
            task_id=f"task_01KS1H7ZYSJWH1N779S2FS{i:06d}",
            error=None if i % 10 else "task failed: the prompt was rejected (code 400)",
        )
        for i in range(1000)
    ]
    assert len(render(jobs).encode()) < 1_000_000


# -- reading sources ------------------------------------------------------------------------


async def _batch_to_disk(out: Path, journal: Path) -> list[am.Outcome]:
    jobs = [
        ("first", am.VideoRequest("sora-2-preview", HOSTILE, duration=8)),
        ("second", am.VideoRequest("sora-2-preview", "a storm")),
        ("third", am.VideoRequest("viduq3-mix", "a cat", image_urls=["https://e.com/a.png"])),
    ]
    async with (
        Emulator(mode="manual", frozen_clock=True) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
        client.batch(jobs, download_dir=out, journal=journal) as results,
    ):
        await emu.wait_until(lambda: emu.tasks_created == 3)
        await emu.wait_until(lambda: len(client._poller) == 3)
        ids = {emu.state.tasks[t].body["prompt"]: t for t in emu.task_ids()}
        emu.fail(ids["a storm"], message="moderation said no")
        emu.complete(ids[HOSTILE])
        emu.advance(30)
        emu.complete(ids["a cat"])
        return [o async for o in results]


async def test_manifest_and_journal_give_the_same_cards(tmp_path: Path) -> None:
    out, journal = tmp_path / "videos", tmp_path / "j.sqlite"
    await _batch_to_disk(out, journal)
    from_manifest = sorted(report.read_manifest(out / "manifest.jsonl"), key=lambda j: j.index)
    from_journal = sorted(report.read_journal(journal), key=lambda j: j.index)
    assert from_manifest == from_journal
    first, second, third = from_manifest
    assert (first.name, first.prompt, first.model, first.duration) == (
        "first",
        HOSTILE,
        "sora-2-preview",
        8,
    )
    assert first.status == "completed" and first.files == (str((out / "first.mp4").resolve()),)
    assert second.status == "failed" and "moderation said no" in (second.error or "")
    assert third.completed is not None and first.created is not None
    assert third.completed - first.created >= 30


async def test_a_resumed_batch_keeps_the_prompts_in_its_manifest(tmp_path: Path) -> None:
    """Regression: lines of jobs replayed from the journal had ``request: null``, so a gallery
    of a resumed batch lost every earlier prompt."""
    out, journal = tmp_path / "videos", tmp_path / "j.sqlite"
    await _batch_to_disk(out, journal)
    jobs = [
        ("first", am.VideoRequest("sora-2-preview", HOSTILE, duration=8)),
        ("second", am.VideoRequest("sora-2-preview", "a storm")),
        ("third", am.VideoRequest("viduq3-mix", "a cat", image_urls=["https://e.com/a.png"])),
    ]
    async with (
        Emulator(mode="manual", frozen_clock=True) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
        client.batch(jobs, download_dir=out, journal=journal) as results,
    ):
        replayed = [o async for o in results]
    assert all(o.replayed for o in replayed)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [line["request"]["prompt"] for line in sorted(lines, key=lambda x: x["index"])] == [
        HOSTILE,
        "a storm",
        "a cat",
    ]
    assert all(line["created"] is not None for line in lines)


async def test_the_journal_shows_pending_jobs_and_is_not_changed_by_reading(
    manual_emu: Emulator, tmp_path: Path
) -> None:
    journal = tmp_path / "j.sqlite"
    jobs = [am.VideoRequest("sora-2-preview", f"p{i}") for i in range(3)]
    async with (
        am.AsyncApimart(manual_emu.api_key, base_url=manual_emu.base_url, poll=FAST_POLL) as c,
        c.batch(jobs, journal=journal) as results,
    ):
        await manual_emu.wait_until(lambda: len(c._poller) == 3)
        manual_emu.complete(manual_emu.task_ids()[0])
        await results.__anext__()
        before = journal.read_bytes()
        cards = sorted(
            await anyio.to_thread.run_sync(report.read_journal, journal), key=lambda j: j.index
        )
        assert journal.read_bytes() == before
    assert [(c.status, c.group, c.prompt) for c in cards] == [
        ("completed", "done", "p0"),
        ("pending", "pending", "p1"),
        ("pending", "pending", "p2"),
    ]
    assert all(c.task_id for c in cards)


def test_unreadable_sources_are_typed_errors(tmp_path: Path) -> None:
    bad = tmp_path / "manifest.jsonl"
    bad.write_text('{"index": 0, "status": "completed"}\nnot json\n{"index": 2}\n')
    with pytest.raises(report.GalleryError, match=r"manifest.jsonl:2: not a manifest line"):
        report.write_gallery(bad, tmp_path)
    with pytest.raises(report.GalleryError, match="cannot read"):
        report.write_gallery(tmp_path / "missing", tmp_path)
    not_a_journal = tmp_path / "x.sqlite"
    not_a_journal.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    with pytest.raises(am.JournalError):
        report.write_gallery(not_a_journal, tmp_path)
    assert issubclass(report.GalleryError, am.ApimartError)


def test_a_cut_off_last_manifest_line_is_skipped(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"index": 0, "status": "completed", "files": []}\n{"index": 1, "sta')
    assert [j.index for j in report.read_manifest(manifest)] == [0]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"index": 0, "status": "completed", "files": 5}', "files"),
        ('{"index": 0, "status": "completed", "files": [{"path": 7}], "request": 3}', None),
        ("[" * 100_000 + "]" * 100_000, "nested"),
    ],
    ids=["files-not-a-list", "odd-values", "deeply-nested"],
)
def test_a_corrupt_manifest_line_is_an_error_naming_it_or_is_read_leniently(
    tmp_path: Path, line: str, problem: str | None
) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(line + "\n")
    if problem is None:
        (card,) = report.read_manifest(manifest)
        assert card.files == () and card.prompt is None
        return
    with pytest.raises(
        report.GalleryError, match=rf"manifest.jsonl:1: not a manifest line.*{problem}"
    ):
        report.write_gallery(manifest, tmp_path)


def test_absurd_times_and_costs_do_not_break_the_header(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    lines = [
        {"index": 0, "status": "completed", "created": -1e308, "completed": 1e308, "cost": 1e308},
        {"index": 1, "status": "completed", "cost": 1e308},
    ]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    page = report.write_gallery(manifest, tmp_path).read_text()
    totals = dict(re.findall(r'<li id="t-(\w+)">\w+ <b>([^<]*)</b>', page))
    assert totals["elapsed"] == "–"
    assert "inf" not in totals["cost"]


# -- writing --------------------------------------------------------------------------------


def test_writes_replace_the_page_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = report.write_gallery([job(0)], tmp_path)
    old = target.read_text()
    seen: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        # at the rename, the new page is whole in a file beside the old one, which is intact
        seen.append((Path(src).read_text(), Path(dst).read_text()))
        assert Path(src).parent == Path(dst).parent
        real_replace(src, dst)

    monkeypatch.setattr(report.os, "replace", replace)
    report.write_gallery([job(0), job(1)], tmp_path)
    ((new, at_rename),) = seen
    assert at_rename == old and new.endswith("</html>\n") and 'id="job-1"' in new
    assert target.read_text() == new

    def fail_sync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report.os, "fsync", fail_sync)
    with pytest.raises(report.GalleryError, match="No space left on device"):
        report.write_gallery([job(0), job(1), job(2)], tmp_path)
    assert target.read_text() == new  # the last good page stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]  # no temp file left


def test_the_throttle_writes_at_once_then_at_most_once_per_interval() -> None:
    t = report._Throttle(1.0)
    assert t.wait(100.0) == 0.0
    t.wrote(100.0)
    assert t.wait(100.2) == pytest.approx(0.8)
    assert t.wait(101.5) == 0.0


def test_the_throttle_spaces_writes_by_ten_times_what_the_last_one_took() -> None:
    """A page of 200,000 jobs took 1.5 s to render, and was rendered every second on the
    event loop: a large batch's loop was busy with its gallery most of the time. The next
    write now waits at least ten times what the last took (the gallery's share <= 10 %)."""
    t = report._Throttle(1.0)
    t.wrote(100.0, took=0.5)
    assert t.wait(100.6) == pytest.approx(4.4)  # 5 s after the last write
    assert t.wait(105.0) == 0.0
    t.wrote(105.0, took=0.01)  # a small page again: the interval rules
    assert t.wait(105.5) == pytest.approx(0.5)


async def test_the_live_gallery_renders_and_writes_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    rendered: list[int] = []
    render = report.render_gallery

    def spy(*args: Any, **kwargs: Any) -> str:
        rendered.append(threading.get_ident())
        return render(*args, **kwargs)

    monkeypatch.setattr(report, "render_gallery", spy)
    requests = [am.VideoRequest("sora-2-preview", f"p{i}") for i in range(3)]
    async with report.LiveGallery(tmp_path, requests) as gallery:
        task = am.Task("task_0", am.TaskStatus.COMPLETED, cost=0.1)
        gallery.outcome(am.Outcome(0, requests[0], task.id, task))
    assert len(rendered) == gallery.writes == 2  # on entry, and the final page
    assert loop_thread not in rendered
    cards = Page(gallery.path.read_text()).all("article")
    assert [c["data-status"] for c in cards] == ["completed", "queued", "queued"]


async def test_live_gallery_follows_the_batch(manual_emu: Emulator, tmp_path: Path) -> None:
    out = tmp_path / "videos"
    jobs = [("a", am.VideoRequest("sora-2-preview", f"prompt {i}")) for i in range(3)]
    jobs = [(f"job{i}", r) for i, (_, r) in enumerate(jobs)]
    gallery = report.LiveGallery(out, jobs, interval=0.0)

    def cards() -> dict[str, str]:
        page = Page(gallery.path.read_text())
        return {str(c["id"]): str(c["data-status"]) for c in page.all("article")}

    async with (
        am.AsyncApimart(manual_emu.api_key, base_url=manual_emu.base_url, poll=FAST_POLL) as c,
        gallery,
        c.batch(jobs, download_dir=out, on_event=gallery.event) as results,
    ):
        assert set(cards().values()) <= {"queued", "submitted"}  # written on entry
        await manual_emu.wait_until(lambda: len(c._poller) == 3)
        first, second, _ = manual_emu.task_ids()
        manual_emu.complete(first)
        outcome = await results.__anext__()
        gallery.outcome(outcome)
        await manual_emu.wait_until(lambda: cards().get("job-0") == "completed")
        assert Page(gallery.path.read_text()).all("video")[0]["src"] == "job0.mp4"
        assert "data-refresh" in Page(gallery.path.read_text()).all("body")[0]
        manual_emu.fail(second, message="nope")
        gallery.outcome(await results.__anext__())
        await manual_emu.wait_until(lambda: cards().get("job-1") == "failed")
        assert cards()["job-2"] in ("submitted", "running")
        manual_emu.complete_all()
        gallery.outcome(await results.__anext__())
    final = Page(gallery.path.read_text())
    assert {str(c["id"]): c["data-status"] for c in final.all("article")} == {
        "job-0": "completed",
        "job-1": "failed",
        "job-2": "completed",
    }
    assert "data-refresh" not in final.all("body")[0]  # finished: no more reloads
    assert gallery.error is None
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".index-")) == []


async def test_a_burst_of_outcomes_is_one_write_not_one_each(tmp_path: Path) -> None:
    requests = [am.VideoRequest("sora-2-preview", f"p{i}") for i in range(1000)]
    gallery = report.LiveGallery(tmp_path, requests)  # interval 1 s
    async with gallery:
        assert gallery.writes == 1
        for i, request in enumerate(requests):  # no await in between: one burst
            task = am.Task(f"task_{i}", am.TaskStatus.COMPLETED, cost=0.1)
            gallery.outcome(am.Outcome(i, request, task.id, task))
    # the page on entry and the final page: the burst itself cost no write of its own
    assert gallery.writes == 2
    page = Page(gallery.path.read_text())
    assert len([c for c in page.all("article") if c["data-status"] == "completed"]) == 1000
    assert "$100.00" in "".join(page.texts)


async def test_a_job_the_batch_never_submitted_is_not_counted_as_failed(tmp_path: Path) -> None:
    """Ctrl-C (or a deadline, or stop_on_error) ends a batch before some jobs are sent: the one
    the feeder held gets a BatchStoppedError outcome. Like the jobs never read, it is still to
    do (a re-run does it), not a failure: after Ctrl-C the page said "failed" for it."""
    requests = [am.VideoRequest("sora-2-preview", f"p{i}") for i in range(3)]
    gallery = report.LiveGallery(tmp_path, requests)
    async with gallery:
        task = am.Task("task_0", am.TaskStatus.COMPLETED, cost=0.1)
        gallery.outcome(am.Outcome(0, requests[0], task.id, task))
        stopped = am.BatchStoppedError("job 1 not submitted: interrupted")
        gallery.outcome(am.Outcome(1, requests[1], error=stopped))
    cards = {c.index: c for c in gallery.jobs}
    assert [cards[i].status for i in range(3)] == ["completed", "not submitted", "queued"]
    assert [cards[i].group for i in range(3)] == ["done", "pending", "pending"]
    assert cards[1].error == "job 1 not submitted: interrupted"
    totals = dict(re.findall(r'<li id="t-(\w+)">\w+ <b>([^<]*)</b>', gallery.path.read_text()))
    assert (totals["done"], totals["failed"], totals["pending"]) == ("1", "0", "2")


async def test_a_resumed_run_shows_how_long_the_batch_took_not_zero(tmp_path: Path) -> None:
    """Re-running a finished batch replays every job from the journal in no time: the live
    page said "elapsed 0:00" where ``report`` says how long the tasks took."""
    requests = [am.VideoRequest("sora-2-preview", f"p{i}") for i in range(2)]
    gallery = report.LiveGallery(tmp_path, requests, clock=lambda: 50.0)  # no time passes
    async with gallery:
        for i, request in enumerate(requests):
            task = am.Task(f"t{i}", am.TaskStatus.COMPLETED, created=1000 + i, completed=1040 + i)
            gallery.outcome(am.Outcome(i, request, task.id, task, replayed=True))
    totals = dict(re.findall(r'<li id="t-(\w+)">\w+ <b>([^<]*)</b>', gallery.path.read_text()))
    assert totals["elapsed"] == "0:41"


async def test_a_failed_write_never_stops_the_batch(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    gallery = report.LiveGallery(blocker / "sub", [am.VideoRequest("sora-2-preview", "p")])
    async with gallery:
        gallery.outcome(am.Outcome(0, None, error=am.ApimartError("boom")))
    assert isinstance(gallery.error, report.GalleryError)
    assert gallery.writes == 0


# -- the command line -----------------------------------------------------------------------


async def _cli(*args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = await anyio.run_process(
        [sys.executable, "-m", "apimart_async.cli", *args], env=env, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_report_command_from_manifest_and_from_journal(tmp_path: Path) -> None:
    out, journal = tmp_path / "videos", tmp_path / "j.sqlite"
    await _batch_to_disk(out, journal)
    code, stdout, stderr = await _cli("report", str(out))
    assert code == 0, stderr
    assert stdout.strip() == str(out / "index.html")
    from_manifest = (out / "index.html").read_text()
    assert len(Page(from_manifest).all("article")) == 3
    (out / "index.html").unlink()
    (out / "manifest.jsonl").unlink()
    code, stdout, stderr = await _cli("report", str(out), "--journal", str(journal))
    assert code == 0, stderr
    from_journal = (out / "index.html").read_text()
    strip = re.compile(r"<footer>.*?</footer>")
    assert strip.sub("", from_journal) == strip.sub("", from_manifest)
    code, _, stderr = await _cli("report", str(tmp_path / "nothing"))
    assert code == 2 and "error: cannot read" in stderr


def test_report_open_opens_the_page_in_the_browser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"index": 0, "status": "failed", "error": "x", "files": []}) + "\n"
    )
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    assert cli.main(["report", str(tmp_path), "--open"]) == 0
    assert opened == [(tmp_path / "index.html").resolve().as_uri()]
    assert capsys.readouterr().out.strip() == str(tmp_path / "index.html")


@pytest.mark.parametrize("failure", ["returns False", "raises"])
def test_report_open_without_a_browser_says_so(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: str,
) -> None:
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"index": 0, "status": "failed", "error": "x", "files": []}) + "\n"
    )

    def no_browser(url: str) -> bool:
        if failure == "raises":
            raise webbrowser.Error("could not locate runnable browser")
        return False

    monkeypatch.setattr(webbrowser, "open", no_browser)
    assert cli.main(["report", str(tmp_path), "--open"]) == 0  # the page was written
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "index.html")
    uri = (tmp_path / "index.html").resolve().as_uri()
    assert f"no browser could be opened; open {uri} yourself" in err


async def test_run_writes_the_gallery_of_its_batch(tmp_path: Path) -> None:
    out = tmp_path / "videos"
    jobs = Path(__file__).resolve().parent.parent / "examples" / "jobs.jsonl"
    code, stdout, stderr = await _cli("run", str(jobs), "--emulate", "--out", str(out))
    assert code == 0, stderr
    assert f"gallery     {out / 'index.html'}" in stdout
    page = Page((out / "index.html").read_text())
    videos = sorted(str(v["src"]) for v in page.all("video"))
    assert videos == sorted(p.name for p in out.glob("*.mp4"))
    assert len(videos) == 5
    assert "data-refresh" not in page.all("body")[0]

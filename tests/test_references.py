"""Local reference files in a batch (issue 18): checked before anything is sent, uploaded once
per distinct content, reused from the journal until they expire, upload faults survived."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

import apimart_async as am
from apimart_async._references import MediaPolicy, References
from apimart_async.emulator import Emulator, Fault
from apimart_async.testing import follow_clock

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff\xe0"
GIF = b"GIF89a"
MP4 = b"\x00\x00\x00\x18ftypmp42"


def image(folder: Path, name: str, content: int, magic: bytes = PNG) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(magic + f"image {content} ".encode() * 50)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shared_images(root: Path) -> list[Path]:
    """40 paths to 20 distinct contents: content i as refs/NN.png, followed by the same content
    under another name and folder (a copy for even i, a symlink for odd i), so that jobs
    running side by side need the same content under two names."""
    paths: list[Path] = []
    for i in range(20):
        original = image(root, f"refs/{i:02d}.png", i)
        if i % 2 == 0:
            alias = root / "copies" / f"same-as-{i}.png"
            alias.parent.mkdir(exist_ok=True)
            shutil.copyfile(original, alias)
        else:
            alias = root / "links" / f"link-{i}.png"
            alias.parent.mkdir(exist_ok=True)
            alias.symlink_to(original)
        paths += [original, alias]
    return paths


def distinct(images: list[Path]) -> list[Path]:
    return images[::2]


def jobs_over(images: list[Path], n: int) -> list[am.VideoRequest]:
    """``n`` viduq3 jobs, job i using image i mod len(images) (so the first len(images) jobs
    need every content)."""
    out = []
    for i in range(n):
        ref: str | Path = images[i % len(images)]
        if i % 3 == 1:
            ref = str(ref)  # a path string
        elif i % 3 == 2:
            ref = Path(ref).as_uri()  # a file:// URL
        out.append(am.VideoRequest("viduq3", f"shot {i}", image_urls=[ref]))
    return out


async def drain(results: am.Batch) -> list[am.Outcome]:
    return [o async for o in results]


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(task_duration=0.0) as emulator:
        yield emulator


@pytest.fixture
async def client(emu: Emulator) -> AsyncIterator[am.AsyncApimart]:
    async with am.AsyncApimart(
        emu.api_key, base_url=emu.base_url, poll=FAST_POLL, max_retries=6
    ) as c:
        yield c


def slow_link_client(emu: Emulator) -> am.AsyncApimart:
    """A client whose attempts may last 1 s in all (a slow uplink's uploads take longer)."""
    timeout = am.Timeout(connect=10, read=10, total=1.0)
    return am.AsyncApimart(
        emu.api_key, base_url=emu.base_url, poll=FAST_POLL, max_retries=1, timeout=timeout
    )


def upload_prefix(emu: Emulator) -> str:
    return f"{emu.base_url}/uploads/"


def assert_sent_urls_only(emu: Emulator) -> None:
    """Every task's image_urls are uploads of the emulator: no local path was sent."""
    for task in emu.state.tasks.values():
        for url in task.body.get("image_urls", []):
            assert url.startswith(upload_prefix(emu)), url


# -- the request model ------------------------------------------------------------------------


def test_request_takes_local_paths_and_refuses_other_schemes(tmp_path: Path) -> None:
    req = am.VideoRequest(
        "viduq3",
        "a bear",
        image_urls=[tmp_path / "a.png", "./refs/b.png", "file:///tmp/c.jpg", "https://x.io/d.png"],
    )
    assert req.image_urls == (
        str(tmp_path / "a.png"),
        "./refs/b.png",
        "file:///tmp/c.jpg",
        "https://x.io/d.png",
    )
    with pytest.raises(am.ValidationError) as info:
        am.VideoRequest("viduq3", "a bear", image_urls=["ftp://host/a.png"])
    assert info.value.errors[0].field == "image_urls[0]"
    assert "local file path" in info.value.errors[0].rule
    # A local file's type is judged by its content, not its name: no extension rule here.
    am.VideoRequest("viduq3", "a bear", image_urls=["refs/scan.bmp"])


async def test_a_local_path_is_never_sent_by_a_direct_submit(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart
) -> None:
    path = image(tmp_path, "a.png", 1)
    with pytest.raises(am.ValidationError, match=r"image_urls\[0\]: is a local file"):
        await client.videos.submit(am.VideoRequest("viduq3", "a bear", image_urls=[path]))
    assert sum(emu.counters.values()) == 0


# -- uploads once per content -----------------------------------------------------------------


async def test_200_jobs_sharing_20_files_make_exactly_20_uploads(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart
) -> None:
    images = shared_images(tmp_path)
    async with client.batch(jobs_over(images, 200), concurrency=16, media_root=tmp_path) as res:
        outcomes = await drain(res)
    assert [o.ok for o in outcomes] == [True] * 200
    assert sorted(o.index for o in outcomes) == list(range(200))
    assert emu.uploads_per_hash == {sha(p): 1 for p in distinct(images)}
    assert emu.counters["upload"] == 20
    assert res.uploads.uploaded == 20 and res.uploads.reused == 0
    assert emu.tasks_created == 200 and set(emu.tasks_per_key.values()) == {1}
    assert_sent_urls_only(emu)
    # the same content under two names got the same URL
    by_prompt = {t.body["prompt"]: t.body["image_urls"][0] for t in emu.state.tasks.values()}
    assert by_prompt["shot 0"] == by_prompt["shot 1"]  # refs/00.png and copies/same-as-0.png
    assert by_prompt["shot 2"] == by_prompt["shot 3"]  # refs/01.png and links/link-1.png
    assert len(set(by_prompt.values())) == 20


@pytest.mark.parametrize("concurrency", [8, 1])
async def test_upload_faults_are_retried_and_never_fail_or_double_a_job(
    tmp_path: Path, emu: Emulator, concurrency: int
) -> None:
    images = [image(tmp_path, f"{i}.png", i) for i in range(5)]
    emu.faults.inject("upload", Fault.server_error(503), times=2)
    emu.faults.inject("upload", Fault.drop(), times=2)
    emu.faults.inject("upload", Fault.rate_limited(0), times=2)
    emu.faults.inject("upload", Fault.server_error(502), times=1)
    # The 7 faults go to the first 7 attempts, whichever uploads make them: when one upload
    # runs alone (concurrency 1 always; with 8 when the machine is loaded and the others'
    # file reads lag), it meets all 7 in a row. So the client may retry 7 times: with 6, that
    # upload failed its job (hunt run 4 of a80ea82: 39 of 40 ok, retries=6).
    async with (
        am.AsyncApimart(
            emu.api_key, base_url=emu.base_url, poll=FAST_POLL, max_retries=7
        ) as client,
        client.batch(jobs_over(images, 40), concurrency=concurrency, media_root=tmp_path) as res,
    ):
        outcomes = await drain(res)
    assert Counter(o.ok for o in outcomes) == {True: 40}, [o.error for o in outcomes]
    assert client.request_counts()["retries"] == 7  # each fault retried once, none more
    assert emu.uploads_per_hash == {sha(p): 1 for p in images}
    assert emu.counters["upload"] == 5 + 7  # every fault answered one attempt
    assert emu.tasks_created == 40 and set(emu.tasks_per_key.values()) == {1}
    assert_sent_urls_only(emu)


async def test_200_jobs_under_random_upload_and_submit_faults_still_make_20_uploads(
    tmp_path: Path, emu: Emulator
) -> None:
    images = shared_images(tmp_path)
    # a third of uploads and a tenth of submits fail (5xx, 429, dropped connections, cut or
    # garbled replies); lost submit replies too: the submit's key makes its retry safe.
    emu.faults.set_rate(
        0.3,
        endpoints=["upload"],
        faults=[
            Fault.server_error(500),
            Fault.server_error(503),
            Fault.rate_limited(0),
            Fault.drop(),
            Fault.malformed(),
            Fault.truncated(),
        ],
    )
    emu.faults.set_rate(0.1, endpoints=["submit"])
    async with am.AsyncApimart(
        emu.api_key, base_url=emu.base_url, poll=FAST_POLL, max_retries=12
    ) as client:
        async with client.batch(jobs_over(images, 200), concurrency=16, media_root=tmp_path) as res:
            outcomes = await drain(res)
    assert sorted(o.index for o in outcomes) == list(range(200))
    assert all(o.ok for o in outcomes), [str(o.error) for o in outcomes if not o.ok][:3]
    assert emu.uploads_per_hash == {sha(p): 1 for p in distinct(images)}
    assert emu.stats()["faults_served"]  # faults were served
    assert emu.tasks_created == 200 and set(emu.tasks_per_key.values()) == {1}
    assert_sent_urls_only(emu)


async def test_an_upload_that_fails_for_good_is_a_typed_error_naming_the_file(
    tmp_path: Path, emu: Emulator
) -> None:
    bad = image(tmp_path, "bad.png", 1)
    async with am.AsyncApimart(
        emu.api_key, base_url=emu.base_url, poll=FAST_POLL, max_retries=2
    ) as client:
        emu.faults.inject("upload", Fault.server_error(503), times=3)
        jobs = [am.VideoRequest("viduq3", "a bear", image_urls=[bad])]
        async with client.batch(jobs, media_root=tmp_path) as res:
            (outcome,) = await drain(res)
    assert isinstance(outcome.error, am.UploadError)
    assert outcome.error.path == str(bad) and outcome.error.field == "image_urls[0]"
    assert str(bad) in str(outcome.error)
    assert emu.counters["upload"] == 3  # the first try and 2 retries
    assert emu.counters.get("submit", 0) == 0 and emu.tasks_created == 0
    assert res.uploads.failed == 1 and res.uploads.uploaded == 0


async def test_after_a_failed_upload_a_later_job_tries_again(tmp_path: Path, emu: Emulator) -> None:
    path = image(tmp_path, "a.png", 1)
    async with am.AsyncApimart(
        emu.api_key, base_url=emu.base_url, poll=FAST_POLL, max_retries=0
    ) as client:
        emu.faults.inject("upload", Fault.server_error(503), times=1)
        jobs = [am.VideoRequest("viduq3", f"take {i}", image_urls=[path]) for i in range(2)]
        async with client.batch(jobs, concurrency=1, media_root=tmp_path) as res:
            outcomes = sorted(await drain(res), key=lambda o: o.index)
    assert isinstance(outcomes[0].error, am.UploadError)
    assert outcomes[1].ok
    assert emu.uploads_per_hash == {sha(path): 1}


class GatedUploads:
    """``Api.upload_image`` on a fake: each upload waits for ``gate``; the first one fails."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def upload_image(self, data: bytes, *, filename: str | None = None) -> am.UploadedImage:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            if self.calls == 1:
                raise am.ServerError("the service is down", status=503)
            return am.UploadedImage(f"https://files.example/{self.calls}.png")
        finally:
            self.in_flight -= 1


async def test_jobs_waiting_on_a_failed_upload_upload_it_again_once(tmp_path: Path) -> None:
    path = image(tmp_path, "a.png", 1)
    api = GatedUploads()
    fake: Any = api
    refs = References(fake, MediaPolicy.of(tmp_path))
    request = await refs.prepare(am.VideoRequest("viduq3", "a bear", image_urls=[path]))
    sent: list[am.VideoRequest | BaseException] = []

    async def job() -> None:
        try:
            sent.append(await refs.materialize(request))
        except am.ApimartError as exc:
            sent.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(job)
        await anyio.wait_all_tasks_blocked()  # one job uploads, four wait for it
        assert api.calls == 1
        api.gate.set()  # the upload fails: the next job uploads again, the others wait for it
    errors = [s for s in sent if isinstance(s, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], am.UploadError)
    assert str(path) in str(errors[0])
    urls = [s.image_urls for s in sent if isinstance(s, am.VideoRequest)]
    assert urls == [("https://files.example/2.png",)] * 4
    assert api.calls == 2 and api.most_in_flight == 1
    assert (refs.stats.uploaded, refs.stats.failed) == (1, 1)


async def test_a_file_changed_or_gone_after_its_check_is_never_uploaded(tmp_path: Path) -> None:
    changed, gone = image(tmp_path, "changed.png", 1), image(tmp_path, "gone.png", 2)
    api = GatedUploads()
    api.gate.set()
    fake: Any = api
    refs = References(fake, MediaPolicy.of(tmp_path))
    url = "https://x.io/first.png"
    for path in (changed, gone):
        request = am.VideoRequest("viduq3", "a bear", image_urls=[url, path])
        prepared = await refs.prepare(request)
        if path == changed:
            image(tmp_path, "changed.png", 3)  # other bytes under the checked name
        else:
            path.unlink()
        with pytest.raises(am.UploadError) as info:
            await refs.materialize(prepared)
        assert (info.value.field, info.value.path) == ("image_urls[1]", str(path))
        assert str(info.value).startswith(f"image_urls[1]: could not upload {path}: ")
    assert api.calls == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
async def test_a_file_swapped_for_a_fifo_after_its_check_is_refused_not_waited_on(
    tmp_path: Path,
) -> None:
    path = image(tmp_path, "a.png", 1)
    api = GatedUploads()
    fake: Any = api
    refs = References(fake, MediaPolicy.of(tmp_path))
    prepared = await refs.prepare(am.VideoRequest("viduq3", "a bear", image_urls=[path]))
    path.unlink()
    os.mkfifo(path)  # reading it would wait for a writer that never comes
    with anyio.fail_after(30), pytest.raises(am.UploadError) as info:  # a guard, not a timing
        await refs.materialize(prepared)
    assert (info.value.field, info.value.path) == ("image_urls[0]", str(path))
    assert str(info.value).endswith("is no longer a regular file")
    assert api.calls == 0


# -- bad local files fail early ---------------------------------------------------------------


async def test_bad_local_files_are_refused_before_anything_is_sent(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart
) -> None:
    root = tmp_path / "media"
    good = image(root, "good.png", 1)
    (root / "notes.png").write_text("not an image at all")
    (root / "folder.png").mkdir()
    big = root / "big.png"
    with big.open("wb") as fh:
        fh.write(PNG)
        fh.truncate(20 * 1024 * 1024 + 1)
    (root / "empty.png").write_bytes(b"")
    outside = image(tmp_path, "outside.png", 2)
    (root / "sneaky.png").symlink_to(outside)
    gif = image(root, "anim.gif", 3, GIF)
    cases = {
        "missing.png": "file not found",
        "notes.png": "is not a JPEG, PNG, WebP or GIF image",
        "folder.png": "is not a regular file",
        "big.png": "at most 20 MB",
        "empty.png": "is empty",
        "../outside.png": "outside",
        "sneaky.png": "outside",  # a symlink is followed before the root check
        "anim.gif": "viduq3 takes JPEG, JPG, PNG, WEBP images; this file is GIF",
        "file://otherhost/a.png": "names a file on another host",
        "nul\x00.png": "is not a valid path",
    }
    jobs = [
        am.VideoRequest("viduq3", f"job {i}", image_urls=[str(good), name])
        for i, name in enumerate(cases)
    ]
    async with client.batch(jobs, media_root=root) as res:
        outcomes = sorted(await drain(res), key=lambda o: o.index)
    for outcome, (name, rule) in zip(outcomes, cases.items(), strict=True):
        assert isinstance(outcome.error, am.ValidationError), name
        (error,) = outcome.error.errors
        assert error.field == "image_urls[1]" and error.value == name
        assert rule in error.rule, (name, error.rule)
    assert sum(emu.counters.values()) == 0  # not even the good file was uploaded
    assert gif.exists()


async def test_a_path_no_file_system_can_hold_is_refused_naming_the_field(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart
) -> None:
    # A lone surrogate (a JSON jobs file may hold "\ud83d") has no bytes to name a file with.
    jobs = [am.VideoRequest("viduq3", "a bear", image_urls=["https://x.io/a.png", "b\ud83d.png"])]
    async with client.batch(jobs, media_root=tmp_path) as res:
        (outcome,) = await drain(res)
    assert isinstance(outcome.error, am.ValidationError)
    assert str(outcome.error).startswith("image_urls[1]: is not a valid path")
    assert sum(emu.counters.values()) == 0


async def test_a_model_size_limit_is_checked_for_local_files(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart
) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(PNG + b"x" * (10 * 1024 * 1024))  # under the endpoint's 20 MB
    jobs = [
        am.VideoRequest("sora-2-preview", "a bear", image_urls=[big]),
        am.VideoRequest("viduq3", "a bear", image_urls=[big]),  # viduq3 takes up to 50 MB
    ]
    async with client.batch(jobs, media_root=tmp_path) as res:
        sora, vidu = sorted(await drain(res), key=lambda o: o.index)
    assert isinstance(sora.error, am.ValidationError)
    assert "sora-2-preview takes images up to 10 MB; this file is 10485768 bytes" in str(sora.error)
    assert vidu.ok and emu.counters["upload"] == 1


async def test_relative_paths_start_at_media_root_and_any_path_can_be_allowed(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart
) -> None:
    root = tmp_path / "media"
    image(root, "refs/a.png", 1)
    outside = image(tmp_path, "elsewhere/b.png", 2)
    jobs = [
        am.VideoRequest("viduq3", "relative", image_urls=["refs/a.png"]),
        am.VideoRequest("viduq3", "outside", image_urls=[outside]),
    ]
    async with client.batch(jobs, media_root=root, allow_any_path=True) as res:
        outcomes = await drain(res)
    assert all(o.ok for o in outcomes)
    assert len(emu.uploads_per_hash) == 2


async def test_the_default_root_is_the_current_folder(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path / "..")
    inside = image(tmp_path, "a.png", 1)
    monkeypatch.chdir(tmp_path)
    outside = image(tmp_path.parent, f"{tmp_path.name}-other.png", 2)
    jobs = [
        am.VideoRequest("viduq3", "in", image_urls=["a.png"]),
        am.VideoRequest("viduq3", "out", image_urls=[outside]),
    ]
    async with client.batch(jobs) as res:
        outcomes = sorted(await drain(res), key=lambda o: o.index)
    assert outcomes[0].ok
    assert isinstance(outcomes[1].error, am.ValidationError)
    assert emu.uploads_per_hash == {sha(inside): 1}
    outside.unlink()


async def test_a_file_name_that_is_not_utf8_is_uploaded_from_its_own_path(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart
) -> None:
    try:  # a Linux file name may be any bytes; Python holds b"\xff" as the surrogate "\udcff"
        path = image(tmp_path, os.fsdecode(b"caf\xe9-latin1.png"), 1)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes UTF-8 names only")
    jobs = [
        am.VideoRequest("viduq3", "a path", image_urls=[path]),
        am.VideoRequest("viduq3", "its file:// URL", image_urls=[path.as_uri()]),
    ]
    async with client.batch(jobs, media_root=tmp_path) as res:
        outcomes = await drain(res)
    assert [o.error for o in outcomes] == [None, None]
    assert emu.uploads_per_hash == {sha(path): 1}
    url = await client.uploads.image(path)  # the form sends the name as UTF-8
    assert url.startswith(upload_prefix(emu))


async def test_a_local_video_goes_as_a_data_uri_for_gemini(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart
) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(MP4 + b"\x00" * 100)
    req = am.VideoRequest("gemini-omni-flash-preview", "extend it", video_urls=[clip])
    async with client.batch([req], media_root=tmp_path) as res:
        (outcome,) = await drain(res)
    assert outcome.ok
    (task,) = emu.state.tasks.values()
    assert task.body["video_urls"][0].startswith("data:video/mp4;base64,")
    assert emu.counters.get("upload", 0) == 0


async def test_a_submit_carrying_a_local_video_is_not_cut_by_the_total_timeout(
    tmp_path: Path, emu: Emulator
) -> None:
    """A local video goes inside the submit's body (a data: URI, up to 10 MB, 13 MB as base64):
    over a slow uplink that takes longer than the total timeout of an attempt, so every
    attempt was cut and the job ended unknown (``SubmitIndeterminateError``), again on every
    resume. Such a submit's attempt may last as long as the URI takes at 10 KiB/s. Here: a
    total of 1 s, a submit taking 2.5 s, a 100 KB clip (13 s at 10 KiB/s)."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(MP4 + bytes(100 * 1024))
    async with slow_link_client(emu) as client:
        emu.faults.inject("submit", Fault.slow(2.5), times=2)
        req = am.VideoRequest("gemini-omni-flash-preview", "extend it", video_urls=[clip])
        async with client.batch([req], media_root=tmp_path) as res:
            (outcome,) = await drain(res)
    assert outcome.ok, outcome.error
    assert emu.counters["submit"] == 1 and emu.tasks_created == 1


# -- the journal: fingerprint, resume, expiry -------------------------------------------------


async def test_the_fingerprint_keeps_path_and_hash(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart
) -> None:
    path = image(tmp_path, "a.png", 1)
    journal = tmp_path / "run.sqlite"
    jobs = [am.VideoRequest("viduq3", "a bear", image_urls=[path])]
    async with client.batch(jobs, journal=journal, media_root=tmp_path) as res:
        await drain(res)
    (record,) = am.SqliteJournal.read(journal).values()
    assert record.request is not None
    (entry,) = record.request["image_urls"]
    assert entry == f"{path.as_uri()}#sha256={sha(path)}"
    path.write_bytes(PNG + b"another picture")  # same path, new content: a changed job
    async with client.batch(jobs, journal=journal, media_root=tmp_path) as res:
        (outcome,) = await drain(res)
    assert isinstance(outcome.error, am.JournalMismatchError)
    assert emu.counters["upload"] == 1


async def test_a_rerun_reuses_uploads_until_they_expire(tmp_path: Path) -> None:
    images = shared_images(tmp_path)
    journal = tmp_path / "run.sqlite"
    async with (
        Emulator(task_duration=0.0) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
    ):
        follow_clock(client, emu)  # the client's wall clock is the emulator's

        async def run(n: int) -> am.Batch:
            async with client.batch(
                jobs_over(images, n), concurrency=16, journal=journal, media_root=tmp_path
            ) as res:
                outcomes = await drain(res)
            assert sorted(o.index for o in outcomes) == list(range(n))
            assert all(o.ok for o in outcomes)
            return res

        first = await run(200)
        assert sum(emu.uploads_per_hash.values()) == 20
        assert (first.uploads.uploaded, first.uploads.reused) == (20, 0)

        second = await run(400)  # 200 replayed, 200 new jobs on the same files
        assert sum(emu.uploads_per_hash.values()) == 20  # 0 more
        assert (second.uploads.uploaded, second.uploads.reused) == (0, 20)

        emu.advance(73 * 3600)  # every upload's URL has expired
        third = await run(600)
        assert emu.uploads_per_hash == {sha(p): 2 for p in distinct(images)}  # exactly 20 again
        assert (third.uploads.uploaded, third.uploads.reused) == (20, 0)
        assert emu.tasks_created == 600 and set(emu.tasks_per_key.values()) == {1}
        assert_sent_urls_only(emu)


async def test_a_remembered_url_the_service_refuses_is_uploaded_again(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart
) -> None:
    path = image(tmp_path, "a.png", 1)
    journal = tmp_path / "run.sqlite"

    async def run(n: int) -> list[am.Outcome]:
        jobs = [am.VideoRequest("viduq3", f"take {i}", image_urls=[path]) for i in range(n)]
        async with client.batch(jobs, concurrency=1, journal=journal, media_root=tmp_path) as res:
            return sorted(await drain(res), key=lambda o: o.index)

    assert [o.ok for o in await run(1)] == [True]
    emu.state.uploads.clear()  # the service lost the upload before its 72 h were over
    second = await run(3)
    # The first job sent the journal's URL and was refused; the URL is forgotten, so the next
    # job uploads the file again, and so does a re-run (not 72 h of the same refusal).
    assert [o.ok for o in second] == [True, False, True]
    assert isinstance(second[1].error, am.BadRequestError)
    assert emu.uploads_per_hash == {sha(path): 2}
    third = await run(3)
    assert [o.ok for o in third] == [True, True, True]
    assert emu.uploads_per_hash == {sha(path): 2}  # the new URL is reused


async def test_sigkill_then_resume_makes_no_more_uploads(tmp_path: Path) -> None:
    images = shared_images(tmp_path)
    (tmp_path / "images.txt").write_text("\n".join(str(p) for p in images))
    journal = tmp_path / "run.sqlite"
    root = Path(__file__).resolve().parent.parent

    def command(max_pending: int) -> list[str]:
        script = root / "tests" / "upload_worker.py"
        args = [emu.base_url, emu.api_key, str(journal), str(tmp_path), "200", str(max_pending)]
        return [sys.executable, str(script), *args]

    env = {**os.environ, "PYTHONPATH": str(root)}
    # Tasks take 10 s on a frozen clock: after 40 submits the worker can only wait (max_pending),
    # every content has been needed by then, and it is killed there.
    async with Emulator(frozen_clock=True, task_duration=10.0) as emu:
        async with await anyio.open_process(command(40), env=env, stderr=None) as proc:
            with anyio.fail_after(120):
                await emu.wait_until(
                    lambda: emu.tasks_created >= 40 or proc.returncode is not None, timeout=120
                )
            proc.send_signal(signal.SIGKILL)
            with anyio.fail_after(60):
                assert await proc.wait() == -signal.SIGKILL
        assert emu.tasks_created == 40
        assert emu.uploads_per_hash == {sha(p): 1 for p in distinct(images)}

        emu.state.task_duration = 0.0  # the resume's tasks end at once
        emu.advance(10)  # ... and so do the killed run's
        with anyio.fail_after(120):
            result = await anyio.run_process(command(200), env=env, check=False, stderr=None)
        assert result.returncode == 0, result.stdout
        assert b"uploaded=0, reused=20" in result.stdout
        assert sum(emu.uploads_per_hash.values()) == 20  # 0 more uploads
        assert emu.tasks_created == 200 and set(emu.tasks_per_key.values()) == {1}
        prompts = Counter(t.body["prompt"] for t in emu.state.tasks.values())
        assert len(prompts) == 200 and set(prompts.values()) == {1}
        assert_sent_urls_only(emu)


async def test_an_upload_whose_reply_is_lost_leaves_an_orphan_never_a_broken_job(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart
) -> None:
    path = image(tmp_path, "a.png", 1)
    emu.faults.inject("upload", Fault.lost_reply(), times=1)  # stored, then the reply is lost
    jobs = [am.VideoRequest("viduq3", f"take {i}", image_urls=[path]) for i in range(3)]
    async with client.batch(jobs, media_root=tmp_path) as res:
        outcomes = await drain(res)
    assert all(o.ok for o in outcomes)
    assert emu.uploads_per_hash == {sha(path): 2}  # the first is an orphan at the service
    assert res.uploads.uploaded == 1
    (url,) = {t.body["image_urls"][0] for t in emu.state.tasks.values()}
    assert url.startswith(upload_prefix(emu))  # every job names the upload that answered


@pytest.mark.parametrize("url", ["", "uploads/img_1.png", "/etc/passwd", "ftp://cdn.example/a.png"])
async def test_an_upload_reply_without_an_http_url_is_a_bad_reply_never_sent_or_kept(
    tmp_path: Path, emu: Emulator, client: am.AsyncApimart, url: str
) -> None:
    """An upload reply whose ``url`` is no http(s) URL is a bad reply: the job ends with an
    UploadError naming the file, and the next job uploads again. Taken as the URL, it failed
    the job with a ValidationError about a "local file" and was kept in the journal: every job
    needing the file failed the same way for 72 h, in this run and the next."""
    path = image(tmp_path, "a.png", 1)
    journal = tmp_path / "run.sqlite"
    emu.faults.inject("upload", Fault.reply(200, {"url": url}), times=1)

    async def run(n: int) -> list[am.Outcome]:
        jobs = [am.VideoRequest("viduq3", f"take {i}", image_urls=[path]) for i in range(n)]
        async with client.batch(jobs, concurrency=1, journal=journal, media_root=tmp_path) as res:
            return sorted(await drain(res), key=lambda o: o.index)

    first = await run(2)
    assert isinstance(first[0].error, am.UploadError)
    assert first[0].error.path == str(path) and "upload reply: url" in str(first[0].error)
    assert first[1].ok, first[1].error
    assert [o.error for o in await run(4)] == [None] * 4  # the errored job is sent again
    assert emu.counters["upload"] == 2  # the bad reply, then the next job's upload
    assert emu.counters["submit"] == 4 and emu.tasks_created == 4
    assert_sent_urls_only(emu)


@pytest.mark.parametrize("created_at", ["ISO 8601", "milliseconds", "zero", "a month ahead"])
async def test_an_upload_time_in_another_shape_neither_fails_the_upload_nor_pins_its_url(
    tmp_path: Path, created_at: str
) -> None:
    """The upload reply's ``created_at`` is not documented beyond its name. Read as Unix
    seconds only, an ISO 8601 date failed every upload (each job an UploadError, an orphan per
    attempt); milliseconds (or a clock far ahead) kept the URL for ever, so the service refused
    it after 72 h; 0 made the URL expired at once, so every job uploaded the file again."""
    path = image(tmp_path, "a.png", 1)
    journal = tmp_path / "run.sqlite"
    async with (
        Emulator(task_duration=0.0) as emu,
        am.AsyncApimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
    ):
        follow_clock(client, emu)
        now = emu.clock.now()
        value: object = {
            "ISO 8601": datetime.fromtimestamp(now, UTC).isoformat(),
            "milliseconds": int(now * 1000),
            "zero": 0,
            "a month ahead": int(now) + 30 * 24 * 3600,
        }[created_at]
        reply = {"url": "https://cdn.example/a.png", "created_at": value}
        emu.faults.inject("upload", Fault.reply(200, reply), times=2)

        async def run(n: int) -> list[am.Outcome]:
            jobs = [am.VideoRequest("viduq3", f"take {i}", image_urls=[path]) for i in range(n)]
            async with client.batch(
                jobs, concurrency=1, journal=journal, media_root=tmp_path
            ) as res:
                return await drain(res)

        assert [o.error for o in await run(3)] == [None] * 3
        assert emu.counters["upload"] == 1
        assert [o.error for o in await run(6)] == [None] * 6  # 3 replayed, 3 reuse the URL
        assert emu.counters["upload"] == 1
        emu.advance(73 * 3600)  # the URL has expired
        assert [o.error for o in await run(9)] == [None] * 9
        assert emu.counters["upload"] == 2  # uploaded again, once


async def test_an_upload_slower_than_the_total_timeout_is_not_cut(
    tmp_path: Path, emu: Emulator
) -> None:
    """The client's total timeout (60 s by default) bounds one attempt of every request; an
    image of a few MB over a slow uplink takes longer (10 MB at 150 KB/s: 70 s), so each
    attempt was cut and started again from zero and the job ended with an UploadError. An
    upload's attempt may last as long as its bytes take at 10 KiB/s. Here: a total of 1 s, an
    upload taking 2.5 s, a 100 KB file (10 s at 10 KiB/s)."""
    path = tmp_path / "big.png"
    path.write_bytes(PNG + bytes(100 * 1024))
    async with slow_link_client(emu) as client:
        emu.faults.inject("upload", Fault.slow(2.5), times=2)
        jobs = [am.VideoRequest("viduq3", "a bear", image_urls=[path])]
        async with client.batch(jobs, media_root=tmp_path) as res:
            (outcome,) = await drain(res)
    assert outcome.ok, outcome.error
    assert emu.counters["upload"] == 1  # not cut, so not sent twice
    assert emu.uploads_per_hash == {sha(path): 1}


def test_the_sync_batch_reports_uploads(tmp_path: Path) -> None:
    path = image(tmp_path, "a.png", 1)
    with start_blocking_portal() as portal:
        emu = Emulator(task_duration=0.0)
        with (
            portal.wrap_async_context_manager(emu),
            am.Apimart(emu.api_key, base_url=emu.base_url, poll=FAST_POLL) as client,
        ):
            jobs = [am.VideoRequest("viduq3", f"take {i}", image_urls=[path]) for i in range(3)]
            with client.batch(jobs, media_root=tmp_path) as results:
                assert all(o.ok for o in results)
            assert results.uploads.uploaded == 1


@pytest.mark.parametrize("first_post", ["reply lost", "never arrived"])
async def test_a_resubmit_after_its_uploads_expired_sends_the_same_body(
    tmp_path: Path, first_post: str
) -> None:
    """A submit whose outcome is unknown is sent again, in a later run, with the same key. If
    its file's upload URL expired meanwhile, the resubmit must still carry the URLs the first
    attempt carried: the same key with another body is a 409 (``idempotency_key_reused``)
    while the task the first attempt created is billed and nobody finds it. With the same
    body the service answers the original task (reply lost). When the first POST never
    arrived, the expired URL is refused (400): then no task exists under the key, and the
    job uploads the file again and submits, still under its key."""
    path = image(tmp_path, "a.png", 1)
    journal = tmp_path / "run.sqlite"
    jobs = [am.VideoRequest("viduq3", "a", image_urls=[path])]
    # tasks kept a week: the original task outlives its upload's 72 h
    async with Emulator(task_duration=0.0, task_ttl=7 * 24 * 3600) as emu:

        async def run() -> tuple[am.Outcome, am.Batch]:
            async with am.AsyncApimart(
                emu.api_key, base_url=emu.base_url, poll=FAST_POLL, max_retries=0
            ) as client:
                follow_clock(client, emu)
                async with client.batch(jobs, journal=journal, media_root=tmp_path) as res:
                    (outcome,) = await drain(res)
            return outcome, res

        fault = Fault.lost_reply() if first_post == "reply lost" else Fault.drop()
        emu.faults.inject("submit", fault, times=1)
        first, _ = await run()
        assert isinstance(first.error, am.SubmitIndeterminateError)
        assert emu.tasks_created == (1 if first_post == "reply lost" else 0)
        first_url = f"{upload_prefix(emu)}{next(iter(emu.state.uploads))}"
        emu.advance(73 * 3600)  # the upload's URL has expired

        second, res = await run()
        assert second.ok, second.error
        assert second.idempotency_key == first.idempotency_key
        assert emu.tasks_created == 1 and set(emu.tasks_per_key.values()) == {1}
        assert second.task_id == next(iter(emu.state.tasks))
        (task,) = emu.state.tasks.values()
        refused = emu.state.statuses[("submit", 400)]
        assert emu.state.statuses[("submit", 409)] == 0  # never the same key with another body
        if first_post == "reply lost":  # the original task, from the first body
            assert task.body["image_urls"] == [first_url]
            assert refused == 0
            assert sum(emu.uploads_per_hash.values()) == 1  # nothing uploaded again
            assert res.uploads.uploaded == 0
        else:  # refused (400: cannot fetch), uploaded again, created under the same key
            assert refused == 1
            assert task.body["image_urls"] != [first_url]
            assert sum(emu.uploads_per_hash.values()) == 2
            assert res.uploads.uploaded == 1

"""The CLI with local reference images in a jobs file (issue 18): line-numbered errors before
anything is sent, --dry-run lists the uploads, each file uploaded once, reused on a re-run."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

import apimart_async as am
from apimart_async import cli as cli_module
from apimart_async.cli import Progress
from apimart_async.emulator import Emulator

from .test_cli import ROOT, cli

EXAMPLE = ROOT / "examples" / "local-images" / "jobs.jsonl"

pytestmark = pytest.mark.anyio

PNG = b"\x89PNG\r\n\x1a\n"


def write_jobs(folder: Path, lines: list[dict[str, object]]) -> Path:
    jobs = folder / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return jobs


def images(folder: Path, n: int) -> list[str]:
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        (folder / "refs" / f"{i}.png").write_bytes(PNG + f"picture {i} ".encode() * 40)
        names.append(f"refs/{i}.png")
    return names


async def test_bad_local_files_get_line_numbered_errors_and_nothing_is_sent(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    good = images(project, 1)[0]
    (project / "refs" / "notes.png").write_text("hello")
    (tmp_path / "secret.png").write_bytes(PNG + b"not yours")
    (project / "big.png").write_bytes(PNG)
    os.truncate(project / "big.png", 20 * 1024 * 1024 + 1)
    jobs = write_jobs(
        project,
        [
            {"model": "viduq3", "prompt": "ok", "image_urls": [good]},
            {"model": "viduq3", "prompt": "a", "image_urls": ["refs/missing.png"]},
            {"model": "viduq3", "prompt": "b", "image_urls": ["refs/notes.png"]},
            {"model": "viduq3", "prompt": "c", "image_urls": ["../secret.png"]},
            {"model": "viduq3", "prompt": "d", "image_urls": ["big.png"]},
        ],
    )
    async with Emulator() as emu:
        base = ["--base-url", emu.base_url]
        code, _, err = await cli(
            "run", str(jobs), "-o", str(tmp_path / "o"), *base, key=emu.api_key
        )
        assert code == 2, err
        assert f"{jobs}:2: image_urls[0]: file not found" in err
        assert f"{jobs}:3: image_urls[0]: is not a JPEG, PNG, WebP or GIF image" in err
        assert f"{jobs}:4: image_urls[0]: resolves to {tmp_path / 'secret.png'}, outside" in err
        assert f"{jobs}:5: image_urls[0]: is 20971521 bytes" in err
        assert ":1:" not in err
        assert sum(emu.counters.values()) == 0  # nothing sent, not even the good file
        # The user names the folder: the file outside is now theirs to send.
        jobs.write_text(
            json.dumps({"model": "viduq3", "prompt": "c", "image_urls": ["../secret.png"]})
        )
        code, _, err = await cli(
            "run", str(jobs), "--media-root", str(tmp_path), "--dry-run", *base, key=emu.api_key
        )
        assert code == 0, err
        code, _, err = await cli("run", str(jobs), "--allow-any-path", "--dry-run")
        assert code == 0, err
        assert sum(emu.counters.values()) == 0


async def test_dry_run_lists_the_files_to_upload(tmp_path: Path) -> None:
    refs = images(tmp_path, 3)
    (tmp_path / "refs" / "copy-of-0.png").write_bytes((tmp_path / refs[0]).read_bytes())
    lines: list[dict[str, object]] = [
        {"model": "viduq3", "prompt": f"p{i}", "image_urls": [refs[i % 3]]} for i in range(9)
    ]
    lines.append({"model": "viduq3", "prompt": "copy", "image_urls": ["refs/copy-of-0.png"]})
    jobs = write_jobs(tmp_path, lines)
    _, out, _ = await cli("run", str(jobs), "--dry-run", check=0)
    size = sum((tmp_path / r).stat().st_size for r in refs)
    assert "3 local file(s) to upload" in out
    assert f"{size / 1024:.1f} KB in all" in out
    assert str(tmp_path / "refs" / "0.png") in out and "copy-of-0" not in out
    _, out, _ = await cli("run", str(jobs), "--dry-run", "--json", check=0)
    report = json.loads(out.splitlines()[-1])
    assert len(report["uploads"]) == 3 and report["upload_bytes"] == size


async def test_run_uploads_each_file_once_and_a_rerun_reuses_them(tmp_path: Path) -> None:
    refs = images(tmp_path, 4)
    jobs = write_jobs(
        tmp_path,
        [
            {"name": f"j{i}", "model": "viduq3", "prompt": f"p{i}", "image_urls": [refs[i % 4]]}
            for i in range(12)
        ],
    )
    out = tmp_path / "out"
    async with Emulator(task_duration=0.0) as emu:
        base = ["--base-url", emu.base_url, "--json"]
        code, stdout, err = await cli("run", str(jobs), "-o", str(out), *base, key=emu.api_key)
        assert code == 0, err
        summary = json.loads(stdout.splitlines()[-1])
        assert (summary["uploads"], summary["uploads_reused"]) == (4, 0)
        assert sum(emu.uploads_per_hash.values()) == 4 and emu.tasks_created == 12
        # One more line on the same files: nothing uploaded again.
        lines = jobs.read_text()
        extra = {"name": "j12", "model": "viduq3", "prompt": "p12", "image_urls": [refs[0]]}
        jobs.write_text(lines + json.dumps(extra) + "\n")
        code, stdout, err = await cli("run", str(jobs), "-o", str(out), *base, key=emu.api_key)
        assert code == 0, err
        summary = json.loads(stdout.splitlines()[-1])
        assert (summary["uploads"], summary["uploads_reused"]) == (0, 1)
        assert sum(emu.uploads_per_hash.values()) == 4 and emu.tasks_created == 13
        code, stdout, err = await cli(
            "run", str(jobs), "-o", str(out), "--base-url", emu.base_url, key=emu.api_key
        )
        assert code == 0, err
        assert "uploads     0 made (0 B), 0 reused" in stdout


def test_the_progress_line_shows_the_upload_phase() -> None:
    progress = Progress(10, io.StringIO(), tty=False)
    progress.files = 3
    progress.uploads = am.UploadStats(uploaded=1, reused=0, uploading=2)
    assert progress.bar() == "uploads 1/3 (2 now) | 0/10 submitted 0"
    progress.uploads = am.UploadStats(uploaded=2, reused=1)
    assert progress.bar().startswith("[------------------------] 0/10 running 0")


def test_the_upload_phase_ends_when_every_file_to_upload_is_accounted_for() -> None:
    progress = Progress(10, io.StringIO(), tty=False)
    progress.files = 3
    progress.uploads = am.UploadStats(uploaded=2, failed=1)  # one file failed for good
    assert progress.bar().startswith("[------------------------] 0/10 running 0")


async def test_the_example_jobs_file_uploads_its_three_images_once(tmp_path: Path) -> None:
    out = tmp_path / "videos"
    _, stdout, _ = await cli("run", str(EXAMPLE), "--emulate", "--out", str(out), check=0)
    assert "uploads     3 made (1.7 KB), 0 reused" in stdout
    assert sorted(p.name for p in out.glob("*.mp4")) == [
        "bear-walk.mp4",
        "cat-and-bear.mp4",
        "cat-street.mp4",
        "hug.mp4",
        "santa-wave.mp4",
    ]


async def test_an_emulated_rerun_reuses_the_uploads_of_the_emulator_it_resumes(
    tmp_path: Path,
) -> None:
    refs = images(tmp_path, 2)
    lines: list[dict[str, object]] = [
        {"name": f"j{i}", "model": "viduq3", "prompt": f"p{i}", "image_urls": [refs[i % 2]]}
        for i in range(3)
    ]
    jobs = write_jobs(tmp_path, lines)
    out = tmp_path / "out"
    _, stdout, _ = await cli("run", str(jobs), "--emulate", "-o", str(out), "--json", check=0)
    summary = json.loads(stdout.splitlines()[-1])
    assert (summary["uploads"], summary["uploads_reused"]) == (2, 0)
    # One more line on the same file: the journal's URL is sent, and the emulator the re-run
    # starts (from its state file, beside the journal) still has the image.
    lines.append({"name": "j3", "model": "viduq3", "prompt": "p3", "image_urls": [refs[0]]})
    write_jobs(tmp_path, lines)
    _, stdout, _ = await cli("run", str(jobs), "--emulate", "-o", str(out), "--json", check=0)
    summary = json.loads(stdout.splitlines()[-1])
    assert (summary["uploads"], summary["uploads_reused"]) == (0, 1)
    assert (summary["completed"], summary["errored"], summary["replayed"]) == (4, 0, 3)


def test_the_upload_phase_counts_only_images_the_run_will_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the files of jobs the journal has done, nor a video (sent as a data: URI): else the
    phase never ends on a re-run, nor on a run with a local video."""
    files_seen: list[int] = []

    class Recorded(Progress):
        def close(self) -> None:
            files_seen.append(self.files)
            super().close()

    monkeypatch.setattr(cli_module, "Progress", Recorded)
    refs = images(tmp_path, 3)
    (tmp_path / "refs" / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"v" * 100)
    gemini = {"model": "gemini-omni-flash-preview", "video_urls": ["refs/clip.mp4"]}
    lines: list[dict[str, object]] = [
        {"model": "viduq3", "prompt": "a", "image_urls": [refs[0], refs[1]]},
        {**gemini, "prompt": "b", "image_urls": [refs[1]]},
    ]
    jobs = write_jobs(tmp_path, lines)
    run = ["run", str(jobs), "--emulate", "-o", str(tmp_path / "out"), "-q", "--no-progress"]
    assert cli_module.main(run) == 0
    lines.append({"model": "viduq3", "prompt": "c", "image_urls": [refs[2]]})
    write_jobs(tmp_path, lines)
    assert cli_module.main(run) == 0
    assert files_seen == [2, 1]  # 2 images (not the video); then the new line's image only


@pytest.mark.parametrize("change", ["file edited", "folder moved"])
async def test_a_line_whose_file_changed_since_the_journal_names_the_file(
    tmp_path: Path, change: str
) -> None:
    """The line is as it was, but a file it names is not: the error says which file, and how
    (it told the user to restore the line)."""
    project = tmp_path / "shoot"
    project.mkdir()
    refs = images(project, 2)
    lines = [
        {"name": f"j{i}", "model": "viduq3", "prompt": f"p{i}", "image_urls": [refs[i]]}
        for i in range(2)
    ]
    jobs = write_jobs(project, lines)
    async with Emulator(task_duration=0.0) as emu:
        base = ["--base-url", emu.base_url]
        code, _, err = await cli(
            "run", str(jobs), "-o", str(project / "out"), *base, key=emu.api_key
        )
        assert code == 0, err
        old = os.path.realpath(project / refs[0])
        if change == "file edited":
            (project / refs[0]).write_bytes(PNG + b"retouched" * 40)
            expected = f"jobs.jsonl:1: {old} changed since the journal recorded"
        else:
            project = project.rename(tmp_path / "shoot-2026")
            jobs = project / "jobs.jsonl"
            new = os.path.realpath(project / refs[0])
            expected = f"jobs.jsonl:1: image_urls[0] is now {new}, was {old} when the journal"
        code, _, err = await cli(
            "run", str(jobs), "-o", str(project / "out"), *base, key=emu.api_key
        )
        assert code != 0
        assert expected in err, err
        assert "restore the line" not in err
        assert emu.tasks_created == 2 and sum(emu.uploads_per_hash.values()) == 2

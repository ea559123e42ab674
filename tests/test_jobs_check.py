"""The jobs file's check (``check_jobs``, what ``apimart-async run`` does before sending
anything) against the full way (``iter_jobs``: a ``VideoRequest`` built and checked per line):
the same lines accepted and refused, with the same problems, line numbers and warnings
(issue 16: the check skips the request of a line whose shape passed already)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any
from unittest import mock

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import apimart_async as am
from apimart_async import _jobsfile, _models
from apimart_async._jobsfile import check_jobs, iter_jobs

IMG = "https://example.com/a.png"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
_ABSENT = object()

MODELS = [
    *am.MODEL_SPECS,
    "some-new-model",  # unknown: generic checks, other keys go out as extra fields
    "sora2-preview",  # a typo of a known model: refused unless allow_unknown_model
    "",
    5,
    None,
    ["sora-2-preview"],
    _ABSENT,
]
FIELDS: dict[str, list[Any]] = {
    "image_urls": [
        _ABSENT, [], [IMG], [IMG, IMG], ["https://example.com/a.gif"], [IMG] * 8, IMG, None,
        [5], ["ftp://example.com/a.png"], ["refs/a.png"], ["missing.png"], "\ud800",
        ["https://example.com/\ud800.png"],
    ],
    "video_urls": [
        _ABSENT, [], ["https://example.com/v.mp4"], ["data:video/mp4;base64,AAAA"], [None],
        ["https://example.com/v.mp4"] * 2,
    ],
    "duration": [_ABSENT, None, 1, 3, 4, 5, 8, 12, 16, 17, 0, -1, True, 8.0, "8", [8]],
    "resolution": [_ABSENT, None, "720p", "1080p", "540p", "standard", "high", "", " ", 5],
    "aspect_ratio": [_ABSENT, None, "16:9", "9:16", "portrait", "1:1", "3:2", "", "\ud800"],
    "seed": [_ABSENT, None, 1, -3, True, "1", 1.5],
    "extend_from_task_id": [_ABSENT, None, "task_1", "", 5],
    "webhook": [
        _ABSENT, None, "https://hooks.example.com/x", "ftp://h/x",
        "https://user:secret@hooks.example.com/x", "http://h/ x", 5,
    ],
    "name": [_ABSENT, None, "a", "A", "000003", "a/b", "a_b", "", 5],
}  # fmt: skip
PROMPTS = [
    _ABSENT, None, "a cat", "a dog", "", "   ", "x" * 5000, "x" * 5001, "\ud800 lone",
    "é, unicode", 5, ["a cat"],
]  # fmt: skip
OTHER_KEYS = [
    {}, {}, {}, {"extra": {"fps": 24}}, {"extra": {}}, {"extra": 5}, {"durration": 8},
    {"fps": 24}, {"extra": {"model": "x"}}, {"extra": {"duration": 8}},
]  # fmt: skip
RAW_LINES = [
    "", "# a comment", "not json", "[1]", "5", '{"model": "sora-2-preview"} 5',
    '{"model": "sora-2-preview", "prompt": "x"', "[" * 100_000 + "]" * 100_000,
    '{"model": "sora-2-preview", "prompt": "a", "prompt": 5}',
]  # fmt: skip


def _template(draw: st.DrawFn) -> dict[str, Any]:
    line: dict[str, Any] = {}
    model = draw(st.sampled_from(MODELS))
    if model is not _ABSENT:
        line["model"] = model
    for key, options in FIELDS.items():
        # mostly absent, so that the lines look like real jobs and many pass
        if draw(st.integers(0, 3)) == 0:
            value = draw(st.sampled_from(options))
            if value is not _ABSENT:
                line[key] = value
    line.update(draw(st.sampled_from(OTHER_KEYS)))
    return line


@st.composite
def jobs_files(draw: st.DrawFn) -> list[str]:
    """Lines from a few templates (so shapes repeat, as in a real file), each with a prompt
    of its own, among raw lines of every kind."""
    templates = draw(st.lists(st.composite(lambda d: _template(d))(), min_size=1, max_size=6))
    lines = []
    for _ in range(draw(st.integers(1, 40))):
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from(RAW_LINES)))
            continue
        line = dict(draw(st.sampled_from(templates)))
        prompt = draw(st.sampled_from(PROMPTS))
        if prompt is _ABSENT:
            line.pop("prompt", None)
        else:
            line["prompt"] = prompt
        lines.append(json.dumps(line))
    return lines


def _outcome(jobs: Any) -> tuple[list[tuple[Any, ...]], list[tuple[int, str]] | None]:
    """What a pass tells: the jobs it let through (with their fields' types), and the
    problems of its JobsFileError, if it raised one."""
    seen = []
    try:
        for job in jobs:
            request = getattr(job, "request", None)
            model = job.model if isinstance(job, _jobsfile.JobCheck) else request.model
            duration = job.duration if isinstance(job, _jobsfile.JobCheck) else request.duration
            resolution = (
                job.resolution if isinstance(job, _jobsfile.JobCheck) else request.resolution
            )
            seen.append(
                (
                    job.line, job.name, model, duration, type(duration), resolution,
                    job.warnings, job.files,
                )
            )  # fmt: skip
    except am.JobsFileError as exc:
        return seen, exc.problems
    return seen, None


def _compare(path: Path, **options: Any) -> tuple[Any, Any]:
    """The check and the full way (every request checked in full: no shape cache) tell the
    same; returns what they told."""
    fast = _outcome(check_jobs(path, **options))
    with mock.patch.object(_models, "_shape", return_value=None):
        full = _outcome(iter_jobs(path, **options))
    assert fast == full
    assert _outcome(check_jobs(path, **options, requests=True)) == full
    return fast


def _write(folder: Path, lines: list[str], name: str = "jobs.jsonl") -> Path:
    refs = folder / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "a.png").write_bytes(PNG)
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    return path


@given(lines=jobs_files(), allow_unknown_model=st.booleans())
def test_the_check_tells_what_the_full_way_tells(
    tmp_path_factory: pytest.TempPathFactory, lines: list[str], allow_unknown_model: bool
) -> None:
    path = _write(tmp_path_factory.mktemp("jobs"), lines)
    _compare(path, allow_unknown_model=allow_unknown_model)


def test_many_lines_of_few_shapes(tmp_path: Path) -> None:
    """Thousands of lines, valid and not, of every seed model and unknown ones: the check's
    remembered shapes decide most of them, and still agree line by line."""
    rng = random.Random(16)
    lines = []
    for i in range(3000):
        model = rng.choice([*am.MODEL_SPECS, "some-new-model"])
        line: dict[str, Any] = {"model": model, "prompt": f"take {i}"}
        for key, options in FIELDS.items():
            if rng.random() < 0.15:
                value = rng.choice(options)
                if value is not _ABSENT and not (key == "name" and value not in (None, 5)):
                    line[key] = value
        if rng.random() < 0.02:
            line["prompt"] = rng.choice(PROMPTS[1:])
        if model == "some-new-model" and rng.random() < 0.3:
            line["fps"] = 24  # passed through as an extra field
        lines.append(json.dumps(line))
    path = _write(tmp_path, lines)
    fast, problems = _compare(path)
    assert problems  # some lines are bad: every one of them is listed, by line
    bad = {n for n, _ in problems}
    assert len(fast) < min(bad)  # the good jobs before the first bad line, as iter_jobs
    kept = [ln for n, ln in enumerate(lines, 1) if n not in bad]
    fast, problems = _compare(_write(tmp_path, kept, "good.jsonl"))
    assert problems is None
    assert len(fast) == len(kept) > 800


def test_a_full_table_of_shapes_is_emptied_and_still_agrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_jobsfile, "_PASSED_MAX", 2)
    lines = [
        json.dumps({"model": "viduq3", "prompt": f"p{i}", "image_urls": [IMG], "duration": d})
        for i, d in enumerate([3, 4, 5, 3, 16, 4, 17, 5] * 5)
    ]
    _, problems = _compare(_write(tmp_path, lines))
    assert problems == [
        (n, "duration: viduq3 takes 3 to 16 seconds, got 17") for n in range(7, 41, 8)
    ]


def test_a_repeated_shape_is_still_refused_for_what_the_shape_leaves_out(tmp_path: Path) -> None:
    ok = {"model": "sora-2-preview", "prompt": "a cat", "duration": 4, "image_urls": [IMG, IMG]}
    lines = [
        json.dumps(ok),
        json.dumps({**ok, "duration": True}),  # True == 4? no, but True == 1: types count
        json.dumps({**ok, "prompt": "   "}),
        json.dumps({**ok, "name": 5}),
        json.dumps({**ok, "extra": 5}),
        json.dumps({**ok, "durration": 4}),
        json.dumps({**ok, "prompt": "b"}),
    ]
    _, problems = _compare(_write(tmp_path, lines))
    assert [n for n, _ in problems or []] == [2, 3, 4, 5, 6]
    one = {"model": "viduq3-mix", "prompt": "a", "image_urls": [IMG], "duration": 1}
    _, problems = _compare(
        _write(tmp_path, [json.dumps(one), json.dumps({**one, "duration": True})])
    )
    assert problems == [
        (2, "duration: must be a positive whole number of seconds, got True"),
    ]


def test_the_warnings_of_a_remembered_shape_come_with_every_line(tmp_path: Path) -> None:
    line = {"model": "sora-2-preview", "image_urls": [IMG, IMG]}
    lines = [json.dumps({**line, "prompt": f"p{i}"}) for i in range(3)]
    fast, problems = _compare(_write(tmp_path, lines))
    assert problems is None
    note = (
        "image_urls: sora-2-preview uses only the first image; the other 1 will be ignored"
        " by the service"
    )
    assert [job[6] for job in fast] == [(note,)] * 3


def test_the_shape_holds_every_field_of_a_request() -> None:
    # two requests of one shape share a verdict: a field left out of the shape would let a
    # line through on the verdict of another (VideoRequest's cache and the jobs file's check)
    import inspect

    assert list(inspect.signature(_models.request_shape).parameters) == [
        "spec",
        "model",
        *_models._TYPED_FIELDS,  # pyright: ignore[reportPrivateUsage]
    ]
    assert {f.name for f in attrs.fields(am.VideoRequest)} == {
        "model",
        "extra",
        *_models._TYPED_FIELDS,  # pyright: ignore[reportPrivateUsage]
    }
    assert {"model", "name", *_models._TYPED_FIELDS} == _jobsfile._PLAIN_KEYS  # pyright: ignore[reportPrivateUsage]

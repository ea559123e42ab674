"""Every rule of the seed models, accepted and rejected, and the generic checks."""

from __future__ import annotations

import gc
import json
import warnings
from typing import Any

import pytest

import apimart_async as am
from apimart_async._models import MAX_EXTRA_FIELDS, MAX_EXTRA_VALUES

IMG = "https://example.com/a.png"
VIDU = {"prompt": "they hug", "image_urls": [IMG]}


def make(model: str, prompt: str | None = None, **kw: Any) -> am.VideoRequest:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", am.ApimartWarning)
        return am.VideoRequest(model, prompt, **kw)


def rejected(model: str, prompt: str | None = None, **kw: Any) -> am.ValidationError:
    with pytest.raises(am.ValidationError) as info:
        make(model, prompt, **kw)
    return info.value


# -- accepted ---------------------------------------------------------------------------------

ACCEPTED = [
    ("gemini-omni-flash-preview", "a red apple", {}),
    ("gemini-omni-flash-preview", None, {"image_urls": [IMG]}),
    ("gemini-omni-flash-preview", None, {"video_urls": ["https://e.com/v.mp4"]}),
    ("gemini-omni-flash-preview", "x", {"video_urls": ["data:video/mp4;base64,AAAA"]}),
    ("gemini-omni-flash-preview", "x", {"image_urls": [IMG] * 16}),
    ("gemini-omni-flash-preview", "x", {"aspect_ratio": "9:16", "resolution": "720p"}),
    ("gemini-omni-flash-preview", "x", {"extend_from_task_id": "task_1"}),
    (
        "gemini-omni-flash-preview",
        "x",
        {"image_urls": ["https://e.com/a.JPEG", "https://e.com/noext"]},
    ),
    ("viduq3", "x", {"image_urls": [IMG], "duration": 3}),
    ("viduq3", "x", {"image_urls": [IMG] * 7, "duration": 16, "resolution": "540p"}),
    (
        "viduq3",
        "x" * 5000,
        {"image_urls": ["https://e.com/a.webp"], "aspect_ratio": "1:1", "seed": 42},
    ),
    ("viduq3-mix", "x", {"image_urls": [IMG], "duration": 1, "resolution": "1080p"}),
    ("viduq3-mix", "x", {"image_urls": [IMG], "aspect_ratio": "3:4"}),
    ("sora-2-preview", "x", {}),
    ("sora-2-preview", "x", {"duration": 12, "aspect_ratio": "portrait"}),
    ("sora-2-preview", "x", {"duration": 4, "aspect_ratio": "16:9"}),
    ("sora-2-pro-preview", "x", {"duration": 8, "resolution": "high", "aspect_ratio": "9:16"}),
    ("sora-2-pro-preview", "x", {"resolution": "standard", "image_urls": ["https://e.com/a.jpg"]}),
    ("veo3.1", "anything", {"duration": 99, "extra": {"generate_audio": True, "size": "1280x720"}}),
]


@pytest.mark.parametrize(("model", "prompt", "kw"), ACCEPTED)
def test_accepted(model: str, prompt: str | None, kw: dict[str, Any]) -> None:
    req = make(model, prompt, **kw)
    body = req.to_body()
    assert body["model"] == model
    for name, value in kw.items():
        if name == "extra":
            for k, v in value.items():
                assert body[k] == v
        else:
            assert body[name] == (list(value) if isinstance(value, list) else value)


# -- rejected, with the exact message -----------------------------------------------------------

REJECTED = [
    # gemini
    (
        "gemini-omni-flash-preview",
        None,
        {},
        "prompt: gemini-omni-flash-preview needs a prompt or reference media (image_urls / video_urls), got None",
    ),
    (
        "gemini-omni-flash-preview",
        "  ",
        {},
        "prompt: gemini-omni-flash-preview needs a prompt or reference media (image_urls / video_urls), got '  '",
    ),
    (
        "gemini-omni-flash-preview",
        "x",
        {"image_urls": [IMG] * 17},
        "image_urls: gemini-omni-flash-preview takes at most 16 images, got 17",
    ),
    (
        "gemini-omni-flash-preview",
        "x",
        {"image_urls": ["https://e.com/a.webp"]},
        "image_urls[0]: gemini-omni-flash-preview takes JPEG, JPG, PNG images, got 'https://e.com/a.webp'",
    ),
    (
        "gemini-omni-flash-preview",
        "x",
        {"video_urls": ["https://e/a.mp4", "https://e/b.mp4"]},
        "video_urls: gemini-omni-flash-preview takes at most 1 video, got 2",
    ),
    (
        "gemini-omni-flash-preview",
        "x",
        {"video_urls": ["ftp://e/a.mp4"]},
        "video_urls[0]: must be an http(s) URL or a data:video/ URI or a local file path,"
        " got 'ftp://e/a.mp4'",
    ),
    (
        "gemini-omni-flash-preview",
        "x",
        {"video_urls": ["data:image/png;base64,AA"]},
        "video_urls[0]: must be an http(s) URL or a data:video/ URI or a local file path,"
        " got 'data:image/png;base64,AA'",
    ),
    (
        "gemini-omni-flash-preview",
        "x",
        {"resolution": "1080p"},
        "resolution: gemini-omni-flash-preview takes '720p', got '1080p'",
    ),
    (
        "gemini-omni-flash-preview",
        "x",
        {"aspect_ratio": "1:1"},
        "aspect_ratio: gemini-omni-flash-preview takes '16:9' or '9:16' (the service would silently use 16:9), got '1:1'",
    ),
    (
        "gemini-omni-flash-preview",
        "x",
        {"duration": 5},
        "duration: gemini-omni-flash-preview does not take a duration, got 5",
    ),
    (
        "gemini-omni-flash-preview",
        "x",
        {"seed": 1},
        "seed: gemini-omni-flash-preview does not take a seed, got 1",
    ),
    (
        "gemini-omni-flash-preview",
        "x",
        {"video_urls": ["https://e/a.mp4"], "extend_from_task_id": "t1"},
        "extend_from_task_id: cannot be combined with video_urls, got 't1'",
    ),
    # vidu
    ("viduq3", None, {"image_urls": [IMG]}, "prompt: viduq3 requires a prompt, got None"),
    (
        "viduq3",
        "x" * 5001,
        {"image_urls": [IMG]},
        "prompt: viduq3 takes at most 5000 characters, got '5001 characters'",
    ),
    ("viduq3", "x", {}, "image_urls: viduq3 takes 1 to 7 images, got 0"),
    ("viduq3", "x", {"image_urls": [IMG] * 8}, "image_urls: viduq3 takes 1 to 7 images, got 8"),
    (
        "viduq3",
        "x",
        {"image_urls": ["https://e.com/a.gif"]},
        "image_urls[0]: viduq3 takes JPEG, JPG, PNG, WEBP images, got 'https://e.com/a.gif'",
    ),
    (
        "viduq3",
        "x",
        {"image_urls": [IMG], "duration": 2},
        "duration: viduq3 takes 3 to 16 seconds, got 2",
    ),
    (
        "viduq3",
        "x",
        {"image_urls": [IMG], "duration": 17},
        "duration: viduq3 takes 3 to 16 seconds, got 17",
    ),
    (
        "viduq3-mix",
        "x",
        {"image_urls": [IMG], "duration": 0},
        "duration: must be a positive whole number of seconds, got 0",
    ),
    (
        "viduq3-mix",
        "x",
        {"image_urls": [IMG], "duration": 17},
        "duration: viduq3-mix takes 1 to 16 seconds, got 17",
    ),
    (
        "viduq3",
        "x",
        {"image_urls": [IMG], "resolution": "4k"},
        "resolution: viduq3 takes '540p', '720p' or '1080p', got '4k'",
    ),
    (
        "viduq3-mix",
        "x",
        {"image_urls": [IMG], "resolution": "540p"},
        "resolution: viduq3-mix takes '720p' or '1080p', got '540p'",
    ),
    (
        "viduq3",
        "x",
        {"image_urls": [IMG], "aspect_ratio": "21:9"},
        "aspect_ratio: viduq3 takes '16:9', '9:16', '4:3', '3:4' or '1:1', got '21:9'",
    ),
    ("viduq3", "x", {"image_urls": [IMG], "seed": 1.5}, "seed: must be an integer, got 1.5"),
    (
        "viduq3",
        "x",
        {"image_urls": [IMG], "video_urls": ["https://e/v.mp4"]},
        "video_urls: viduq3 takes no reference videos, got 1",
    ),
    (
        "viduq3",
        "x",
        {"image_urls": [IMG], "extend_from_task_id": "t"},
        "extend_from_task_id: viduq3 cannot extend an earlier task, got 't'",
    ),
    # sora
    ("sora-2-preview", None, {}, "prompt: sora-2-preview requires a prompt, got None"),
    (
        "sora-2-preview",
        "x",
        {"duration": 5},
        "duration: sora-2-preview takes only 4, 8 or 12 seconds, got 5",
    ),
    (
        "sora-2-pro-preview",
        "x",
        {"duration": 10},
        "duration: sora-2-pro-preview takes only 4, 8 or 12 seconds, got 10",
    ),
    (
        "sora-2-preview",
        "x",
        {"aspect_ratio": "1:1"},
        "aspect_ratio: sora-2-preview takes 'landscape', '16:9', 'portrait' or '9:16', got '1:1'",
    ),
    (
        "sora-2-preview",
        "x",
        {"aspect_ratio": "square"},
        "aspect_ratio: sora-2-preview takes 'landscape', '16:9', 'portrait' or '9:16', got 'square'",
    ),
    (
        "sora-2-preview",
        "x",
        {"resolution": "high"},
        "resolution: sora-2-preview does not take a resolution, got 'high'",
    ),
    (
        "sora-2-pro-preview",
        "x",
        {"resolution": "ultra"},
        "resolution: sora-2-pro-preview takes 'standard' or 'high', got 'ultra'",
    ),
    (
        "sora-2-preview",
        "x",
        {"image_urls": ["https://e.com/a.bmp"]},
        "image_urls[0]: sora-2-preview takes JPEG, JPG, PNG, WEBP images, got 'https://e.com/a.bmp'",
    ),
    ("sora-2-preview", "x", {"seed": 7}, "seed: sora-2-preview does not take a seed, got 7"),
    (
        "sora-2-preview",
        "x",
        {"video_urls": ["https://e/v.mp4"]},
        "video_urls: sora-2-preview takes no reference videos, got 1",
    ),
    # generic, any model
    ("", "x", {}, "model: must be a non-empty string, got ''"),
    (
        "veo3.1",
        "x",
        {"image_urls": "https://e.com/a.png"},
        "image_urls: takes a list of URLs, not a single string, got 'https://e.com/a.png'",
    ),
    (
        "veo3.1",
        "x",
        {"image_urls": ["javascript:alert(1)"]},
        "image_urls[0]: must be an http(s) URL or a local file path, got 'javascript:alert(1)'",
    ),
    (
        "veo3.1",
        "x",
        {"image_urls": ["https://e.com/a b.png"]},
        "image_urls[0]: must not contain white space, got 'https://e.com/a b.png'",
    ),
    (
        "veo3.1",
        "x",
        {"duration": True},
        "duration: must be a positive whole number of seconds, got True",
    ),
    (
        "veo3.1",
        "x",
        {"duration": "5"},
        "duration: must be a positive whole number of seconds, got '5'",
    ),
    ("veo3.1", 5, {}, "prompt: must be a string, got 5"),
    (
        "veo3.1",
        "x",
        {"webhook": "ftp://e.com/hook"},
        "webhook: must be an http(s) URL, got 'ftp://e.com/hook'",
    ),
    ("veo3.1", "x", {"resolution": ""}, "resolution: must be a non-empty string, got ''"),
    (
        "veo3.1",
        "x",
        {"extra": {"model": "other"}},
        "extra['model']: set the model with model=, got 'other'",
    ),
    (
        "veo3.1",
        "x",
        {"duration": 5, "extra": {"duration": 6}},
        "extra['duration']: duration is already set as a field, got 6",
    ),
    (
        "veo3.1",
        "x",
        {"extra": {"blob": b"bytes"}},
        "extra['blob']: must be JSON-serialisable, got b'bytes'",
    ),
    (
        "veo3.1",
        "x",
        {"extra": {"n": float("nan")}},
        "extra['n']: must be JSON-serialisable, got nan",
    ),
]


@pytest.mark.parametrize(("model", "prompt", "kw", "message"), REJECTED)
def test_rejected(model: str, prompt: Any, kw: dict[str, Any], message: str) -> None:
    err = rejected(model, prompt, **kw)
    assert str(err) == message
    assert isinstance(err, ValueError)
    assert err.field == message.split(":", 1)[0]


def test_all_errors_reported_at_once() -> None:
    err = rejected("sora-2-preview", None, duration=5, seed=1)
    assert [e.field for e in err.errors] == ["prompt", "duration", "seed"]
    assert str(err).count(";") == 2


@pytest.mark.parametrize(
    ("model", "kw", "expected"),
    [
        (
            "sora-2-preview",
            {"image_urls": [IMG, "https://e.com/b.png"]},
            [
                "image_urls: sora-2-preview uses only the first image; the other 1 will be ignored by the service"
            ],
        ),
        (
            "sora-2-pro-preview",
            {"image_urls": [IMG], "aspect_ratio": "portrait"},
            [
                "aspect_ratio: sora-2-pro-preview takes the aspect ratio of the reference image; aspect_ratio='portrait' will be ignored by the service"
            ],
        ),
        (
            "gemini-omni-flash-preview",
            {"video_urls": ["https://e/v.mp4"], "aspect_ratio": "9:16"},
            [
                "aspect_ratio: gemini-omni-flash-preview ignores aspect_ratio when a reference video is given; aspect_ratio='9:16' will be ignored by the service"
            ],
        ),
    ],
)
def test_warnings_where_the_service_would_ignore(
    model: str, kw: dict[str, Any], expected: list[str]
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        am.VideoRequest(model, "x", **kw)
    assert [str(w.message) for w in caught] == expected
    assert all(w.category is am.ApimartWarning for w in caught)
    assert all(w.filename == __file__ for w in caught)  # points at the caller's line


def test_no_warning_for_a_plain_request() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        am.VideoRequest("sora-2-preview", "x", image_urls=[IMG])


def test_unset_fields_are_not_sent() -> None:
    assert am.VideoRequest("sora-2-preview", "a cat").to_body() == {
        "model": "sora-2-preview",
        "prompt": "a cat",
    }


def test_extra_is_merged_and_frozen() -> None:
    extra = {"generate_audio": True}
    req = am.VideoRequest("kling-v3", "x", extra=extra)
    extra["generate_audio"] = False  # the caller's dict is copied
    assert req.to_body() == {"model": "kling-v3", "prompt": "x", "generate_audio": True}
    with pytest.raises(TypeError):
        req.extra["x"] = 1  # type: ignore[index]


def test_requests_are_frozen_comparable_and_hashable() -> None:
    a = am.VideoRequest("viduq3", "x", image_urls=[IMG], extra={"k": [1, 2]})
    b = am.VideoRequest("viduq3", "x", image_urls=(IMG,), extra={"k": [1, 2]})
    assert a == b
    assert hash(a) == hash(b)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != am.VideoRequest("viduq3", "y", image_urls=[IMG]).fingerprint()
    with pytest.raises(AttributeError):
        a.prompt = "y"  # type: ignore[misc]


def test_from_dict_routes_unknown_keys_to_extra() -> None:
    req = am.VideoRequest.from_dict(
        {"model": "veo3.1", "prompt": "x", "duration": 8, "size": "720x1280"}
    )
    assert req.duration == 8
    assert dict(req.extra) == {"size": "720x1280"}
    with pytest.raises(am.ValidationError, match=r"^model: is required$"):
        am.VideoRequest.from_dict({"prompt": "x"})
    with pytest.raises(am.ValidationError, match=r"^request: must be a JSON object"):
        am.VideoRequest.from_dict(["x"])  # type: ignore[arg-type]


def test_repr_is_short() -> None:
    req = am.VideoRequest("sora-2-preview", "p" * 100, duration=8)
    assert repr(req) == f"VideoRequest(model='sora-2-preview', prompt='{'p' * 39}…', duration=8)"


def test_specs_table_has_a_row_per_seed_model() -> None:
    assert set(am.MODEL_SPECS) == {
        "gemini-omni-flash-preview",
        "viduq3",
        "viduq3-mix",
        "sora-2-preview",
        "sora-2-pro-preview",
    }
    assert am.MODEL_SPECS["viduq3"].durations == am.IntRange(3, 16)


# -- requests of one shape are checked once (issue 16: a jobs file's lines differ in their
# prompt only); the verdict must stay the one a full check gives --


def test_a_request_of_a_known_shape_is_still_refused_for_what_the_shape_leaves_out() -> None:
    ok = am.VideoRequest("viduq3-mix", "a cat", image_urls=[IMG], duration=1)
    assert ok.duration == 1
    # True == 1 and hash(True) == hash(1): a shape keyed on values alone would let it through
    with pytest.raises(am.ValidationError) as info:
        am.VideoRequest("viduq3-mix", "a cat", image_urls=[IMG], duration=True)  # type: ignore[arg-type]
    assert "duration: must be a positive whole number of seconds" in str(info.value)
    # the prompt's length is part of the shape where the model has a limit
    with pytest.raises(am.ValidationError) as info:
        am.VideoRequest("viduq3-mix", "a" * 5001, image_urls=[IMG], duration=1)
    assert "prompt: viduq3-mix takes at most 5000 characters" in str(info.value)
    with pytest.raises(am.ValidationError) as info:
        am.VideoRequest("viduq3-mix", "   ", image_urls=[IMG], duration=1)
    assert "prompt: viduq3-mix requires a prompt" in str(info.value)


def test_a_request_of_a_known_shape_warns_every_time() -> None:
    for _ in range(3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            am.VideoRequest("sora-2-preview", "x", image_urls=[IMG, IMG])
        assert [str(w.message) for w in caught] == [
            "image_urls: sora-2-preview uses only the first image; the other 1 will be ignored"
            " by the service"
        ]
        assert caught[0].filename == __file__  # still points at the caller's line


def test_a_changed_spec_is_checked_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    import attrs

    am.VideoRequest("viduq3-mix", "a cat", image_urls=[IMG], duration=1)
    stricter = attrs.evolve(am.MODEL_SPECS["viduq3-mix"], durations=am.IntRange(2, 16))
    monkeypatch.setitem(am.MODEL_SPECS, "viduq3-mix", stricter)  # type: ignore[arg-type]
    with pytest.raises(am.ValidationError) as info:
        am.VideoRequest("viduq3-mix", "a cat", image_urls=[IMG], duration=1)
    assert "duration: viduq3-mix takes 2 to 16 seconds" in str(info.value)


def test_a_jobs_file_reads_the_warnings_of_its_lines_without_warning(tmp_path: Any) -> None:
    path = tmp_path / "jobs.jsonl"
    line = json.dumps({"model": "sora-2-preview", "prompt": "x", "image_urls": [IMG, IMG]}) + "\n"
    path.write_text(line * 2 + '{"model": "sora-2-preview", "prompt": "x"} 5\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(am.JobsFileError) as info:
            am.read_jobs(path)
    assert info.value.problems == [(3, "not JSON: Extra data at column 44")]
    jobs = am.read_jobs(_first_lines(path, 2))
    assert [j.warnings for j in jobs] == [
        (
            "image_urls: sora-2-preview uses only the first image; the other 1 will be ignored"
            " by the service",
        )
    ] * 2


def _first_lines(path: Any, n: int) -> Any:
    out = path.with_name("first.jsonl")
    out.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return out


@pytest.mark.parametrize("model", [["sora-2-preview"], {"name": "x"}, 5, None])
def test_a_model_that_is_not_a_string_is_refused_by_name(model: Any) -> None:
    # an unhashable model once escaped as TypeError from the cache of checked shapes
    with pytest.raises(am.ValidationError) as info:
        am.VideoRequest.from_dict({"model": model, "prompt": "a cat"})
    assert str(info.value).startswith("model: must be a non-empty string")


def test_requests_without_extra_fields_share_one_empty_mapping() -> None:
    """A request with no ``extra`` holds no mapping of its own: 20,000 jobs of a web app's
    batch were 40,000 more objects (a dict and its read-only view each) for every full
    garbage collection to walk, holding the event loop (issue 21)."""
    before = len(gc.get_objects())
    jobs = [am.VideoRequest("sora-2-preview", f"a cat {i}") for i in range(1000)]
    assert len(gc.get_objects()) - before < 1100  # the requests and the list: ~1 each
    assert jobs[0].extra is jobs[1].extra and dict(jobs[0].extra) == {}
    with pytest.raises(TypeError):
        jobs[0].extra["x"] = 1  # type: ignore[index]
    given: dict[str, Any] = {"mode": "fast"}
    own = am.VideoRequest("some-new-model", "a cat", extra=given)
    given["mode"] = "slow"  # the caller's dict is copied, not shared
    assert dict(own.extra) == {"mode": "fast"}


LONE = json.loads('"\\ud800"')  # a lone surrogate: valid JSON, not encodable as UTF-8


@pytest.mark.parametrize(
    ("field", "data"),
    [
        ("prompt", {"prompt": f"a {LONE} cat"}),
        ("resolution", {"prompt": "a cat", "resolution": f"720p{LONE}"}),
        ("image_urls[0]", {"prompt": "a cat", "image_urls": [f"https://e.example/{LONE}.png"]}),
        ("extra['mode']", {"prompt": "a cat", "extra": {"mode": [f"x{LONE}"]}}),
    ],
)
def test_text_with_a_lone_surrogate_is_refused_by_name(field: str, data: dict[str, Any]) -> None:
    """JSON lets "\\ud800" through; no UTF-8 body, file or URL can carry it. Accepted, the
    job was billed, then its manifest line failed (a raw ExceptionGroup ended the batch) and
    a web app's JSON reply of it was a 500 (brk21b 3, 5)."""
    am.VideoRequest("sora-2-preview", "a cat")  # a request of the same shape checked before
    with pytest.raises(am.ValidationError) as info:
        am.VideoRequest.from_dict({"model": "sora-2-preview", **data})
    unicode_errors = [e for e in info.value.errors if "valid Unicode text" in e.rule]
    assert [e.field for e in unicode_errors] == [field]
    str(info.value).encode("utf-8")  # the message itself can be printed and logged


def test_a_url_list_longer_than_any_model_takes_is_refused_before_each_url_is_checked() -> None:
    """An untrusted body of 50,000 ``image_urls`` (1 MB) was checked URL by URL, accepted
    with a warning and would have been sent (brk21b 10): a list over ``MAX_URLS`` is refused
    at once by its length."""
    body = {"model": "sora-2-preview", "prompt": "x", "image_urls": ["http://a/b.png"] * 50_000}
    with pytest.raises(am.ValidationError) as info:
        am.VideoRequest.from_dict(body)
    (error,) = info.value.errors
    assert (error.field, error.rule) == ("image_urls", "must hold at most 100 URLs")
    assert "50000 URLs" in str(error)
    with pytest.raises(am.ValidationError, match="video_urls: must hold at most 100 URLs"):
        am.VideoRequest("some-new-model", "x", video_urls=["http://a/b.mp4"] * 101)
    am.VideoRequest("some-new-model", "x", image_urls=["http://a/b.png"] * 100)  # the limit


# -- a JSON body nested deep enough for json.loads but not for the submit's own encoding (a
# web backend's request handler runs a few hundred frames down): refused by name up front --


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_extra_nested_too_deep_is_a_validation_error_naming_the_field() -> None:
    # json.loads parses ~900 levels; encoding them again from deep in a server did not
    for depth in (900, 5000):
        with pytest.raises(am.ValidationError) as caught:
            am.VideoRequest.from_dict({"model": "veo3.1", "prompt": "x", "k": _nested(depth)})
        assert str(caught.value) == (
            "extra['k']: must be JSON at most 64 levels deep, got 'more than 64 levels'"
        )
    # as deep as any machine-made body is: accepted, and encodable from a deep stack
    ok = am.VideoRequest("veo3.1", "x", extra={"k": _nested(64)})
    assert json.loads(json.dumps(ok.to_body()))["k"] == _nested(64)
    with pytest.raises(am.ValidationError, match=r"^extra\['k'\]: must be JSON at most 64"):
        am.VideoRequest("veo3.1", "x", extra={"k": {"a": _nested(64)}})


def test_an_extra_too_large_is_refused_by_its_size_not_walked_value_by_value() -> None:
    """An untrusted body of 50,000 unknown keys (800 KB) or a list of 200,000 numbers held
    the event loop 250-500 ms in ``from_dict`` (each value checked and encoded, on the
    server's loop, for every such request); it is refused by its size, as image_urls is."""
    many_keys = {"model": "veo3.1", "prompt": "x", **{f"k{i}": i for i in range(50_000)}}
    with pytest.raises(am.ValidationError) as caught:
        am.VideoRequest.from_dict(many_keys)
    assert str(caught.value) == (
        f"extra: must hold at most {MAX_EXTRA_FIELDS} fields, got '50000 fields'"
    )
    assert len(caught.value.errors) == 1  # one error, not 50,000 (a reply of megabytes)
    big = {"model": "veo3.1", "prompt": "x", "k": list(range(200_000))}
    with pytest.raises(am.ValidationError) as caught:
        am.VideoRequest.from_dict(big)
    assert str(caught.value) == (
        f"extra['k']: must hold at most {MAX_EXTRA_VALUES} JSON values in all,"
        " got 'more than 10000'"
    )
    spread = {f"k{i}": list(range(100)) for i in range(150)}  # 15,150 values over the keys
    with pytest.raises(am.ValidationError, match=r"^extra\['k\d+'\]: must hold at most"):
        am.VideoRequest("veo3.1", "x", extra=spread)
    # as large as any real model's fields are: accepted
    fine = {f"k{i}": list(range(40)) for i in range(MAX_EXTRA_FIELDS)}
    am.VideoRequest("veo3.1", "x", extra=fine)


def test_extra_shared_and_self_referencing_values_are_measured_once() -> None:
    shared: list[Any] = []
    for _ in range(12):
        shared = [shared, shared]  # 4,096 paths, 12 containers
    am.VideoRequest("veo3.1", "x", extra={"k": shared})
    deep = _nested(60)
    with pytest.raises(am.ValidationError, match=r"^extra\['k'\]: must be JSON at most 64"):
        am.VideoRequest("veo3.1", "x", extra={"k": [deep, [[[[[deep]]]]]]})
    loop: list[Any] = []
    loop.append([loop])
    with pytest.raises(am.ValidationError, match=r"^extra\['k'\]: must be JSON at most 64"):
        am.VideoRequest("veo3.1", "x", extra={"k": loop})

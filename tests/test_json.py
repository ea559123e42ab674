"""JSON in and out (issue 21): ``to_dict()`` of tasks, outcomes and stats is JSON-safe, and
``VideoRequest.from_dict`` takes any JSON value without raising anything but
``ValidationError`` (naming the field), round-tripping ``VideoRequest.to_dict()``."""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import apimart_async as am
from apimart_async._outcomes import outcome_of

IMG = "https://example.com/a.png"

TASK = am.Task(
    id="task_1",
    status=am.TaskStatus.COMPLETED,
    progress=100,
    estimated_time=60.0,
    actual_time=40.0,
    created=1779246294,
    completed=1779246334,
    cost=1.0,
    credits_cost=10,
    videos=(am.Video(urls=("https://cdn.example.com/a.mp4",), expires_at=1779332760),),
    raw_status="success",
)
FAILED_TASK = am.Task(
    id="task_2",
    status=am.TaskStatus.FAILED,
    error=am.TaskError(code=1301, message="blocked", type="content_policy_violation"),
    raw_status="failed",
)


def _json_round_trip(value: Any) -> Any:
    return json.loads(json.dumps(value, allow_nan=False))


def test_task_to_dict_is_json_safe() -> None:
    d = TASK.to_dict()
    assert _json_round_trip(d) == d
    assert d == {
        "id": "task_1",
        "status": "completed",
        "raw_status": "success",
        "progress": 100,
        "estimated_time": 60.0,
        "actual_time": 40.0,
        "created": 1779246294,
        "completed": 1779246334,
        "cost": 1.0,
        "credits_cost": 10,
        "videos": [{"urls": ["https://cdn.example.com/a.mp4"], "expires_at": 1779332760}],
        "video_urls": ["https://cdn.example.com/a.mp4"],
        "error": None,
    }
    assert type(d["status"]) is str  # not the StrEnum: plain JSON
    f = FAILED_TASK.to_dict()
    assert f["status"] == "failed"
    assert f["error"] == {"code": 1301, "message": "blocked", "type": "content_policy_violation"}
    assert _json_round_trip(f) == f


def test_success_to_dict_is_json_safe() -> None:
    req = am.VideoRequest("sora-2-preview", "a cat", duration=8)
    file = am.DownloadedFile(path="/tmp/v/a.mp4", bytes=12, sha256="ab" * 32, url="https://x/a")
    out = outcome_of(3, req, "task_1", TASK, None, "key-1", "cat", (file,))
    assert isinstance(out, am.Success)
    d = out.to_dict()
    assert _json_round_trip(d) == d
    assert d == {
        "index": 3,
        "name": "cat",
        "ok": True,
        "task_id": "task_1",
        "idempotency_key": "key-1",
        "replayed": False,
        "request": req.to_dict(),
        "task": TASK.to_dict(),
        "error": None,
        "files": [{"path": "/tmp/v/a.mp4", "bytes": 12, "sha256": "ab" * 32, "url": "https://x/a"}],
    }


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            am.TaskFailedError(FAILED_TASK),
            {
                "type": "TaskFailedError",
                "message": "task task_2 failed: blocked (code 1301)",
                "status": None,
            },
        ),
        (
            am.RateLimitError("slow down", status=429),
            {"type": "RateLimitError", "message": None, "status": 429},
        ),
        (
            am.APIConnectionError("connection refused"),
            {"type": "APIConnectionError", "message": "connection refused", "status": None},
        ),
    ],
)
def test_failure_to_dict_gives_the_error_as_type_message_status(
    error: am.ApimartError, expected: dict[str, Any]
) -> None:
    req = am.VideoRequest("sora-2-preview", "a cat")
    out = outcome_of(0, req, "task_2", FAILED_TASK, error, None)
    assert isinstance(out, am.Failure)
    d = out.to_dict()
    assert _json_round_trip(d) == d
    assert d["ok"] is False
    if expected["message"] is None:
        expected = {**expected, "message": str(error)}
    assert d["error"] == expected
    no_request = outcome_of(1, None, None, None, error)
    assert no_request.to_dict()["request"] is None
    assert no_request.to_dict()["task"] is None


def test_batch_stats_to_dict_is_json_safe() -> None:
    stats = am.BatchStats(
        read=5,
        submitting=1,
        submitted=4,
        pending=2,
        completed=1,
        failed=1,
        errored=1,
        cost=2.5,
        elapsed=3.25,
        requests={"submit": 4, "task": 7},
        replayed=1,
        downloading=0,
        unread=2,
    )
    d = stats.to_dict()
    assert _json_round_trip(d) == d
    assert d == {
        "read": 5,
        "submitting": 1,
        "submitted": 4,
        "pending": 2,
        "completed": 1,
        "failed": 1,
        "errored": 1,
        "done": 3,
        "cost": 2.5,
        "elapsed": 3.25,
        "requests": {"submit": 4, "task": 7},
        "replayed": 1,
        "downloading": 0,
        "unread": 2,
    }
    d["requests"]["task"] = 0  # a copy: the stats stay as they were
    assert stats.requests["task"] == 7


# -- VideoRequest: to_dict / from_dict ---------------------------------------------------------


def test_to_dict_round_trips_through_from_dict() -> None:
    reqs = [
        am.VideoRequest("sora-2-preview", "a cat", duration=8, aspect_ratio="16:9"),
        am.VideoRequest("viduq3", "x", image_urls=[IMG], duration=8, seed=3),
        # an extra key that is also a field name (unset as a field) stays in extra
        am.VideoRequest("some-new-model", "x", extra={"duration": 5, "extra": {"a": [1]}}),
    ]
    for req in reqs:
        d = req.to_dict()
        assert _json_round_trip(d) == d
        again = am.VideoRequest.from_dict(_json_round_trip(d))
        assert again == req
        assert again.to_body() == req.to_body()
    assert reqs[0].to_dict() == {
        "model": "sora-2-preview",
        "prompt": "a cat",
        "duration": 8,
        "aspect_ratio": "16:9",
    }
    assert reqs[2].to_dict()["extra"] == {"duration": 5, "extra": {"a": [1]}}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": "sora-2-preview", "prompt": "x", "extra": 5}, "extra"),
        ({"model": "sora-2-preview", "prompt": "x", "extra": "ab"}, "extra"),
        ({"model": "sora-2-preview", "prompt": "x", "extra": [["a", 1]]}, "extra"),
        ({"model": "sora-2-preview", "prompt": "x", "extra": {"model": "y"}}, "extra['model']"),
        ({"model": 5, "prompt": "x"}, "model"),
        ({"model": "sora-2-preview", "prompt": ["x"]}, "prompt"),
        ({"model": "sora-2-preview", "prompt": "x", "duration": "8"}, "duration"),
        ({"model": "viduq3", "prompt": "x", "image_urls": {"a": 1}}, "image_urls"),
        ({"model": "viduq3", "prompt": "x", "image_urls": [{"a": 1}]}, "image_urls[0]"),
        # brk21c: the only text field that let a lone surrogate through to the POST
        ({"model": "sora-2-preview", "prompt": "x", "webhook": "https://e.com/\ud800"}, "webhook"),
    ],
)
def test_from_dict_bad_values_name_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(am.ValidationError) as info:
        am.VideoRequest.from_dict(data)
    assert info.value.field == field


def test_from_dict_unknown_key_of_a_known_model_goes_to_extra() -> None:
    # README "models we don't know yet": keys that are not fields are sent as they are
    req = am.VideoRequest.from_dict({"model": "sora-2-preview", "prompt": "x", "watermark": 0})
    assert dict(req.extra) == {"watermark": 0}
    assert req.to_body()["watermark"] == 0


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
KEYS = [
    "model", "prompt", "image_urls", "video_urls", "duration", "resolution", "aspect_ratio",
    "seed", "extend_from_task_id", "webhook", "extra", "size", "",
]  # fmt: skip
MODELS = [*am.MODEL_SPECS, "some-new-model", ""]
plausible = st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=8),
    json_values
    | st.sampled_from(MODELS)
    | st.lists(st.sampled_from([IMG, "ftp://x", "https://e.com/v.mp4"]), max_size=3)
    | st.integers(min_value=-2, max_value=30)
    | st.sampled_from(["720p", "1080p", "16:9", "9:16", "https://hook.example/x"]),
    max_size=8,
)
_REQUEST_FIELDS = frozenset(f.name for f in attrs.fields(am.VideoRequest))
#: What a ValidationError may name: a key of the input (or an item of it), or ``request``.
_FIELD = re.compile(r"^(?P<key>[^\[]*)(\[.*\])?$")


@given(data=json_values | plausible)
@example(data={"model": "sora-2-preview", "prompt": "x", "extra": 5})
@example(data={"model": "sora-2-preview", "prompt": "x", "extra": None})
@example(data={"model": "sora-2-preview", "prompt": "x", "extra": [["prompt", "y"]]})
@example(data=[])
@example(data={"model": "viduq3"})  # a required field not given: named all the same
def test_from_dict_any_json_is_a_request_or_a_validation_error(data: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", am.ApimartWarning)
        try:
            req = am.VideoRequest.from_dict(data)
        except am.ValidationError as exc:
            for err in exc.errors:
                match = _FIELD.match(err.field)
                assert match is not None
                key = match.group("key")
                # a key it was given, or a field of the request that the model requires and
                # it was not given (gemini with neither a prompt nor references: "prompt";
                # viduq3 with no image: "image_urls")
                assert key in ("request", "extra") or key in data or key in _REQUEST_FIELDS, exc
            return
    assert isinstance(data, dict)
    assert req.model == data["model"]
    d = req.to_dict()
    assert _json_round_trip(d) == d
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", am.ApimartWarning)
        assert am.VideoRequest.from_dict(_json_round_trip(d)) == req

"""Reply parsing: documented shapes, tolerance, and fuzzed garbage giving only typed errors."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apimart_async as am
from apimart_async import _converter as conv

DOC_TASK = {
    "code": 200,
    "data": {
        "id": "task_01KS1H7ZYSJWH1N779S2FSHTKA",
        "status": "completed",
        "progress": 100,
        "created": 1779246294,
        "completed": 1779246334,
        "actual_time": 40,
        "estimated_time": 60,
        "cost": 1.0,
        "credits_cost": 10,
        "result": {
            "videos": [
                {"url": ["https://cdn.example.com/gemini_omni_xxx.mp4"], "expires_at": 1779332760}
            ]
        },
    },
}


def b(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_documented_task() -> None:
    task = conv.parse_task(b(DOC_TASK))
    assert task == am.Task(
        id="task_01KS1H7ZYSJWH1N779S2FSHTKA",
        status=am.TaskStatus.COMPLETED,
        progress=100,
        estimated_time=60,
        actual_time=40,
        created=1779246294,
        completed=1779246334,
        cost=1.0,
        credits_cost=10,
        videos=(
            am.Video(urls=("https://cdn.example.com/gemini_omni_xxx.mp4",), expires_at=1779332760),
        ),
    )
    assert task.is_terminal
    assert task.ok
    assert task.video_urls == ["https://cdn.example.com/gemini_omni_xxx.mp4"]


def test_failed_task_with_string_or_int_code() -> None:
    for code in ("content_policy", 1301):
        data = {
            "id": "t",
            "status": "failed",
            "error": {"code": code, "message": "no", "type": "x"},
        }
        task = conv.parse_task(b({"data": data}))
        assert task.error == am.TaskError(code=code, message="no", type="x")
        assert task.is_terminal
        assert not task.ok


@pytest.mark.parametrize(
    "status", ["submitted", "pending", "processing", "in_progress", "QUEUED", "rendering"]
)
def test_running_and_unknown_statuses_are_not_terminal(status: str) -> None:
    task = conv.parse_task(b({"data": {"id": "t", "status": status}}))
    assert not task.is_terminal
    assert task.raw_status == status
    if status in ("QUEUED", "rendering"):
        assert task.status is am.TaskStatus.UNKNOWN


def test_task_status_is_a_string() -> None:
    task = conv.parse_task(b(DOC_TASK))
    assert task.status == "completed"
    assert isinstance(task.status, str)
    assert str(task.status) == "completed"
    assert f"{task.status}" == "completed"
    assert repr(task.status) == "<TaskStatus.COMPLETED: 'completed'>"
    assert json.dumps({"status": task.status}) == '{"status": "completed"}'
    assert am.TaskStatus("in_progress") is am.TaskStatus.IN_PROGRESS
    # An unknown status still parses (as UNKNOWN), and the service's word is kept.
    odd = conv.parse_task(b({"data": {"id": "t", "status": "Rendering"}}))
    assert odd.status is am.TaskStatus.UNKNOWN
    assert odd.status == "unknown"
    assert odd.raw_status == "Rendering"
    assert not odd.is_terminal


def test_tolerates_extra_fields_and_numeric_strings() -> None:
    data = {
        "id": "t",
        "status": "processing",
        "progress": "42",
        "cost": "0.5",
        "new_field": {"x": 1},
    }
    task = conv.parse_task(b({"data": data, "extra": True}))
    assert (task.progress, task.cost) == (42, 0.5)


def test_video_url_as_plain_string() -> None:
    data = {"id": "t", "status": "completed", "result": {"videos": [{"url": "https://x/v.mp4"}]}}
    assert conv.parse_task(b({"data": data})).video_urls == ["https://x/v.mp4"]


def test_submit_both_shapes() -> None:
    assert (
        conv.parse_submit(b({"code": 200, "data": [{"status": "submitted", "task_id": "task_a"}]}))
        == "task_a"
    )
    assert (
        conv.parse_submit(b({"code": 200, "data": {"id": "task_b", "status": "submitted"}}))
        == "task_b"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>502</html>", "reply is not JSON"),
        (b'{"code":200}', "cannot read task: reply has no 'data'"),
        (b'{"data":{"status":"completed"}}', "cannot read task: task has no id"),
        (b'{"data":{"id":"t"}}', "cannot read task: task has no status"),
        (b'{"data":{"id":"t","status":5}}', "cannot read task: status must be a string, got int"),
        (
            b'{"data":{"id":"t","status":"x","cost":[1]}}',
            "cannot read task: expected a number, got list",
        ),
        (
            b'{"data":{"id":"t","status":"x","result":{"videos":{}}}}',
            "cannot read task: videos must be a list, got dict",
        ),
        (
            b'{"data":{"id":"t","status":"x","cost":"NaN"}}',
            "cannot read task: expected a finite number",
        ),
    ],
)
def test_unreadable_task_replies(body: bytes, message: str) -> None:
    with pytest.raises(am.ResponseValidationError) as info:
        conv.parse_task(body, status=200)
    assert str(info.value).startswith(message)
    assert info.value.body  # carries an excerpt


def test_excerpt_is_short() -> None:
    with pytest.raises(am.ResponseValidationError) as info:
        conv.parse_task(b"x" * 10_000)
    assert len(info.value.body) <= 200


def test_balance_success_and_failure() -> None:
    doc = {
        "success": True,
        "remain_balance": 12.5,
        "used_balance": 3.0,
        "remain_credits": 125,
        "used_credits": 30,
        "unlimited_quota": False,
        "message": "",
    }
    bal = conv.parse_balance(b(doc))
    assert bal == am.Balance(12.5, 3.0, 125, 30, False, "")
    assert not bal.unlimited
    assert bal.covers(12.5)
    assert not bal.covers(13)
    assert conv.parse_balance(b({**doc, "remain_balance": -1})).unlimited
    with pytest.raises(am.APIStatusError, match="quota exhausted") as info:
        conv.parse_balance(b({"success": False, "message": "quota exhausted"}), status=200)
    assert info.value.status == 200


def test_upload_reply() -> None:
    up = conv.parse_upload(
        b(
            {
                "url": "https://x/i.png",
                "filename": "i.png",
                "content_type": "image/png",
                "bytes": 10,
                "created_at": 1,
            }
        )
    )
    assert up == am.UploadedImage("https://x/i.png", "i.png", "image/png", 10, 1)


def test_an_upload_reply_field_in_another_shape_does_not_fail_the_upload() -> None:
    """Only ``url`` is needed: ``created_at`` as an ISO 8601 date is read, other shapes of the
    other fields are dropped (they failed the upload, after it worked)."""
    iso = conv.parse_upload(b({"url": "https://x/i.png", "created_at": "1970-01-01T00:01:40Z"}))
    assert iso.created_at == 100
    odd = conv.parse_upload(
        b({"url": "https://x/i.png", "created_at": "soon", "bytes": "12 KB", "filename": []})
    )
    assert odd == am.UploadedImage("https://x/i.png")


# -- fuzz: any bytes, any JSON: a typed result or ResponseValidationError, nothing else ----------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
keys = st.sampled_from(
    [
        "id",
        "task_id",
        "status",
        "progress",
        "estimated_time",
        "actual_time",
        "created",
        "completed",
        "cost",
        "credits_cost",
        "result",
        "error",
        "url",
        "videos",
        "expires_at",
        "code",
        "message",
        "type",
        "data",
        "success",
        "remain_balance",
    ]
)
shaped = st.recursive(
    json_values,
    lambda children: st.dictionaries(keys, children, max_size=8) | st.lists(children, max_size=3),
    max_leaves=40,
)
PARSERS = [
    conv.parse_task,
    conv.parse_task_list,
    conv.parse_task_items,
    conv.parse_submit,
    conv.parse_balance,
    conv.parse_upload,
]


def _check_all(body: bytes) -> None:
    for parse in PARSERS:
        with contextlib.suppress(am.ResponseValidationError, am.APIStatusError):
            parse(body, status=200)


@settings(suppress_health_check=[HealthCheck.too_slow])  # examples: the profile (conftest)
@given(st.binary(max_size=200))
def test_fuzz_bytes(body: bytes) -> None:
    _check_all(body)


@settings(suppress_health_check=[HealthCheck.too_slow])  # examples: the profile (conftest)
@given(shaped)
def test_fuzz_json(value: Any) -> None:
    _check_all(json.dumps(value).encode())
    _check_all(json.dumps({"code": 200, "data": value}).encode())


def test_deeply_nested_json_is_a_typed_error() -> None:
    with pytest.raises(am.ResponseValidationError):
        conv.parse_task(b"[" * 100_000 + b"]" * 100_000)


# -- error bodies: any status, any body: a typed APIStatusError ---------------------------------

from apimart_async._transport import _embedded_error, _error_from_reply  # noqa: E402


@settings(suppress_health_check=[HealthCheck.too_slow])  # examples: the profile (conftest)
@given(
    st.integers(min_value=200, max_value=599),
    st.one_of(st.binary(max_size=100), shaped.map(lambda v: json.dumps(v).encode())),
    st.dictionaries(
        st.sampled_from(["Retry-After", "X-Request-Id"]), st.text(max_size=30), max_size=2
    ),
)
def test_fuzz_error_bodies(status: int, body: bytes, headers: dict[str, str]) -> None:
    err = _error_from_reply(max(400, status), headers, body)
    assert isinstance(err, am.APIStatusError)
    assert err.status == max(400, status)
    assert err.retry_after is None or err.retry_after >= 0
    embedded = _embedded_error(status, body)
    assert embedded is None or 400 <= embedded <= 599


def test_documented_error_body() -> None:
    body = b(
        {
            "error": {
                "code": 400,
                "message": "bad duration",
                "type": "invalid_request_error",
                "param": "duration",
            },
            "request_id": "req_1",
        }
    )
    err = _error_from_reply(400, {}, body)
    assert type(err) is am.BadRequestError
    assert (err.message, err.type, err.code, err.param, err.request_id) == (
        "bad duration",
        "invalid_request_error",
        400,
        "duration",
        "req_1",
    )
    assert str(err) == "bad duration (HTTP 400, invalid_request_error, request_id=req_1)"


def test_error_inside_a_200_reply_is_an_error() -> None:
    assert _embedded_error(200, b(DOC_TASK)) is None
    assert _embedded_error(200, b({"error": {"code": 402, "message": "no money"}})) == 402
    assert _embedded_error(200, b({"error": {"message": "x"}})) == 400
    assert _embedded_error(200, b({"code": 500, "msg": "x"})) == 500

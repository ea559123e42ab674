"""The private cattrs converter: wire JSON to models, tolerant of what the service may add.

Unknown fields are ignored, unknown statuses become ``TaskStatus.UNKNOWN``, numbers sent as
strings are read as numbers. Anything else that does not fit raises
``ResponseValidationError`` with an excerpt of the body: never a KeyError or TypeError.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable
from typing import Any, Final, TypeVar

import cattrs

from ._errors import APIStatusError, ResponseValidationError, status_error_class
from ._json import is_array, is_object
from ._models import Balance, Task, TaskError, TaskStatus, UploadedImage, Video, _url_error

__all__ = [
    "load_json",
    "parse_balance",
    "parse_submit",
    "parse_task",
    "parse_task_items",
    "parse_task_list",
    "parse_upload",
]

T = TypeVar("T")

_conv = cattrs.Converter(forbid_extra_keys=False, detailed_validation=False)


def _number(value: Any) -> float:
    # the common cases first, exactly (bool, an int subclass, is not one of them)
    if type(value) is int:
        return float(value)  # finite, or OverflowError
    if type(value) is float:
        if value - value == 0.0:  # finite: inf - inf and nan - nan are nan
            return float(value)
        raise ValueError(f"expected a finite number, got {value!r}")
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        number = float(value.strip())
    else:
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _opt_float(value: Any, _: Any) -> float | None:
    return None if value is None else _number(value)


def _opt_int(value: Any, _: Any) -> int | None:
    return None if value is None else round(_number(value))


_EXACT: Final = 2**53  # ints up to this are exact as floats


def _int(value: Any) -> int:
    """``round(_number(value))``, without the float for an int it would not change."""
    if type(value) is int and -_EXACT <= value <= _EXACT:
        return value
    return round(_number(value))


def _opt_str(value: Any, _: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"expected a string, got {type(value).__name__}")


def _str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _code(value: Any, _: Any) -> int | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise TypeError(f"expected an int or string code, got {type(value).__name__}")


def _bool(value: Any, _: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1, None):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise TypeError(f"expected a boolean, got {value!r}")


def _status(value: Any, _: Any) -> TaskStatus:
    if not isinstance(value, str):
        raise TypeError(f"status must be a string, got {type(value).__name__}")
    return TaskStatus.parse(value)


def _plain_video(value: Any) -> Video | None:
    """A video of the common shape, exactly ``{"url": [str, ...], "expires_at": n}``, read
    without the general checks of ``_video``; None for any other."""
    if type(value) is not dict:
        return None
    shape: dict[str, Any] = value  # pyright: ignore[reportUnknownVariableType]
    given: Any = shape.get("url")
    if type(given) is not list:
        return None
    urls: list[Any] = given  # pyright: ignore[reportUnknownVariableType]
    for url in urls:
        if type(url) is not str:
            return None
    expires: Any = shape.get("expires_at")
    return Video(urls=tuple(urls), expires_at=None if expires is None else _int(expires))


def _video(value: Any, _: Any) -> Video:
    plain = _plain_video(value)
    if plain is not None:
        return plain
    if isinstance(value, str):  # a bare URL
        return Video(urls=(value,))
    if not is_object(value):
        raise TypeError(f"video must be an object, got {type(value).__name__}")
    urls = value.get("url", value.get("urls"))
    if urls is None:
        urls = []
    elif isinstance(urls, str):
        urls = [urls]
    if not is_array(urls) or not all(isinstance(u, str) for u in urls):
        raise TypeError("video url must be a string or a list of strings")
    return Video(urls=tuple(urls), expires_at=_opt_int(value.get("expires_at"), None))


def _videos(value: Any, _: Any) -> tuple[Video, ...]:
    if value is None:
        return ()
    if not is_array(value):
        raise TypeError(f"videos must be a list, got {type(value).__name__}")
    return tuple(_video(v, None) for v in value)


def _task_error(value: Any, _: Any) -> TaskError | None:
    if value is None:
        return None
    if isinstance(value, str):
        return TaskError(message=value)
    if not is_object(value):
        raise TypeError(f"error must be an object, got {type(value).__name__}")
    return TaskError(
        code=_code(value.get("code"), None),
        message=_opt_str(value.get("message"), None),
        type=_opt_str(value.get("type"), None),
    )


_conv.register_structure_hook(float | None, _opt_float)
_conv.register_structure_hook(int | None, _opt_int)
_conv.register_structure_hook(str | None, _opt_str)
_conv.register_structure_hook(str, _str)
_conv.register_structure_hook(float, lambda v, _: _number(v))
_conv.register_structure_hook(int, lambda v, _: round(_number(v)))  # cattrs 23.2: optional ints
_conv.register_structure_hook(bool, _bool)
_conv.register_structure_hook(TaskStatus, _status)
_conv.register_structure_hook_func(lambda t: t == tuple[Video, ...], _videos)
_conv.register_structure_hook(TaskError | None, _task_error)
# Older cattrs (23.2) structures an optional attrs field through the class's own hook, not the
# union's: register the class too, so ``error.code`` as an int or a string reads the same.
_conv.register_structure_hook(TaskError, _task_error)


def _structure_task(value: Any, _: Any) -> Task:
    """A task object of a status reply, field by field with the hooks above (as cattrs'
    generated function for ``Task`` would call them, without copying the object first)."""
    if not is_object(value):
        raise TypeError(f"task must be an object, got {type(value).__name__}")
    task_id = value["id"] if "id" in value else value.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise TypeError("task has no id")
    if "status" not in value:
        raise TypeError("task has no status")
    status = value["status"]
    if not isinstance(status, str):
        raise TypeError(f"status must be a string, got {type(status).__name__}")
    result = value.get("result")
    if is_object(result) and "videos" in result:
        videos = result["videos"]
    elif result is not None and not is_object(result):
        raise TypeError(f"result must be an object, got {type(result).__name__}")
    else:
        videos = value.get("videos")
    hints: dict[str, float | int] = {}
    for name, whole in _HINTS:
        # only hints (the schedule's, a report's): one written as "60s", "50%" or an ISO
        # date is dropped, not allowed to make a running or finished task unreadable
        raw = value.get(name)
        if raw is None:
            continue
        try:
            hints[name] = _int(raw) if whole else _number(raw)
        except (TypeError, ValueError, OverflowError):  # an int no float holds: dropped too
            continue
    # one video of the common shape (the common result), as _videos reads it
    plain = None
    if type(videos) is list and len(videos) == 1:  # pyright: ignore[reportUnknownArgumentType]
        plain = _plain_video(videos[0])
    found = (plain,) if plain is not None else _videos(videos, None)
    error = value.get("error")
    return Task(
        task_id,
        TaskStatus.parse(status),
        cost=_opt_float(value.get("cost"), None),
        credits_cost=_opt_float(value.get("credits_cost"), None),
        videos=found,
        error=None if error is None else _task_error(error, None),
        raw_status=status,
        **hints,  # type: ignore[arg-type]
    )


#: Task fields that only steer the schedule or fill a report, and whether each is whole.
_HINTS: Final = (
    ("progress", True),
    ("estimated_time", False),
    ("actual_time", False),
    ("created", True),
    ("completed", True),
)


_conv.register_structure_hook(Task, _structure_task)


def _rve(message: str, body: bytes | str, status: int | None) -> ResponseValidationError:
    return ResponseValidationError(message, body=body, status=status)


def load_json(body: bytes, *, status: int | None = None) -> Any:
    """Decode a reply body as JSON, or raise ResponseValidationError."""
    try:
        if body[:1] == b"{" and body[1:2] != b"\x00":
            # UTF-8, as json.loads finds for bytes that start so: decoded without its search
            return json.loads(body.decode("utf-8", "surrogatepass"))
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ResponseValidationError(
            "reply is not JSON", body=body, status=status, decodable=False
        ) from None


def _structure(data: Any, cls: type[T], what: str, body: bytes, status: int | None) -> T:
    try:
        return _conv.structure(data, cls)
    except Exception as exc:  # noqa: BLE001 - every structuring failure is one typed error
        raise _rve(f"cannot read {what}: {exc}", body, status) from None


def _data(payload: Any, what: str, body: bytes, status: int | None) -> Any:
    if not is_object(payload):
        raise _rve(f"cannot read {what}: reply is not a JSON object", body, status)
    data = payload.get("data")
    code = payload.get("code")
    if data is None and isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        # HTTP 200 carrying an error (``{"code": 404, "message": ..., "data": null}``): read
        # it as if the body's code were the HTTP status
        message = payload.get("message") or payload.get("msg")
        text = message if isinstance(message, str) and message else f"error code {code}"
        raise status_error_class(code)(text, status=code, body=body)
    if "data" not in payload:
        raise _rve(f"cannot read {what}: reply has no 'data'", body, status)
    return data


def parse_submit(body: bytes, *, status: int | None = None) -> str:
    """The task id of a submit reply: ``data`` as a list of ``{task_id}`` or an object ``{id}``."""
    data = _data(load_json(body, status=status), "submit reply", body, status)
    item = data[0] if is_array(data) and data else data
    if is_object(item):
        task_id = item.get("task_id", item.get("id"))
        if isinstance(task_id, str) and task_id:
            return task_id
    raise _rve("cannot read submit reply: no task id", body, status)


def parse_task(body: bytes, *, status: int | None = None) -> Task:
    data = _data(load_json(body, status=status), "task", body, status)
    try:  # the hook ``_structure`` would find for Task, called without cattrs' dispatch
        return _structure_task(data, Task)
    except Exception as exc:  # noqa: BLE001 - every structuring failure is one typed error
        raise _rve(f"cannot read task: {exc}", body, status) from None


def _task_items(body: bytes, status: int | None) -> list[Any]:
    """The task objects of a batch status reply: ``data`` as a list, as ``{"tasks": [...]}``
    (or ``items`` / ``list``), or as an object keyed by task id."""
    data = _data(load_json(body, status=status), "batch status", body, status)
    if is_object(data):
        for key in ("tasks", "items", "list"):
            if is_array(data.get(key)):
                return list(data[key])
        if all(isinstance(k, str) and is_object(v) for k, v in data.items()):
            return [
                {"id": k, **v} if "id" not in v and "task_id" not in v else v
                for k, v in data.items()
            ]
    if not is_array(data):
        raise _rve("cannot read batch status: 'data' is not a list", body, status)
    return data


def parse_task_list(body: bytes, *, status: int | None = None) -> list[Task]:
    """The tasks of a batch status reply (see ``parse_task_items``); any unreadable item
    makes the whole reply unreadable."""
    return [
        _structure(item, Task, "task in batch", body, status) for item in _task_items(body, status)
    ]


def parse_task_items(
    body: bytes, *, status: int | None = None
) -> tuple[list[Task], dict[str, ResponseValidationError]]:
    """A batch status reply read item by item: the tasks read, and for each item that names
    its id but cannot be read, the error (items without a readable id are skipped: their ids
    are simply absent). Raises ResponseValidationError only for a reply of unknown shape."""
    tasks: list[Task] = []
    bad: dict[str, ResponseValidationError] = {}
    for item in _task_items(body, status):
        try:
            tasks.append(_conv.structure(item, Task))
        except Exception as exc:  # noqa: BLE001 - every structuring failure is one typed error
            task_id = item.get("id", item.get("task_id")) if is_object(item) else None
            if isinstance(task_id, str) and task_id:
                raw = json.dumps(item, default=str).encode()
                bad[task_id] = _rve(f"cannot read task in batch: {exc}", raw, status)
    return tasks, bad


def parse_balance(body: bytes, *, status: int | None = None) -> Balance:
    payload = load_json(body, status=status)
    wrapped = is_object(payload) and is_object(payload.get("data"))
    if wrapped and "remain_balance" not in payload:
        payload = payload["data"]
    if not is_object(payload):
        raise _rve("cannot read balance: reply is not a JSON object", body, status)
    if payload.get("success") is False:
        message = payload.get("message")
        raise APIStatusError(
            message if isinstance(message, str) and message else "balance query failed",
            status=status or 200,
            type="balance_error",
            body=body,
        )
    if "remain_balance" not in payload:
        raise _rve("cannot read balance: no remain_balance", body, status)
    return _structure(payload, Balance, "balance", body, status)


def parse_upload(body: bytes, *, status: int | None = None) -> UploadedImage:
    payload = load_json(body, status=status)
    if is_object(payload) and is_object(payload.get("data")):
        payload = payload["data"]
    if not is_object(payload) or not isinstance(payload.get("url"), str):
        raise _rve("cannot read upload reply: no url", body, status)
    # a URL a request cannot carry (empty, relative, another scheme) is a bad reply, retried
    # like one: a batch would send it in place of a file, and keep it in the journal
    if (rule := _url_error(payload["url"])) is not None:
        raise _rve(f"cannot read upload reply: url {rule}", body, status)
    # Only the URL is needed: the other fields' shapes are not documented, and one the SDK
    # does not read (created_at as an ISO 8601 date) must not fail an upload that worked.
    return UploadedImage(
        payload["url"],
        filename=_lenient(_opt_str, payload.get("filename")),
        content_type=_lenient(_opt_str, payload.get("content_type")),
        bytes=_lenient(_opt_int, payload.get("bytes")),
        created_at=_lenient(_unix_seconds, payload.get("created_at")),
    )


def _lenient(hook: Callable[[Any, Any], T | None], value: Any) -> T | None:
    """``hook(value)``, or None when the value has another shape."""
    try:
        return hook(value, None)
    except (TypeError, ValueError, OverflowError):
        return None


def _unix_seconds(value: Any, _: Any) -> int | None:
    """A time as Unix seconds: a number, or an ISO 8601 date (UTC unless it says)."""
    try:
        return _opt_int(value, None)
    except ValueError:
        if not isinstance(value, str):
            raise
    when = datetime.datetime.fromisoformat(value.strip())
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return round(when.timestamp())


def structure_task(data: Any) -> Task:
    """Structure one task object (webhook payloads, journals). Raises ResponseValidationError."""
    try:
        return _conv.structure(data, Task)
    except Exception as exc:  # noqa: BLE001 - as _structure; the body is shaped only now
        raw = json.dumps(data, default=str).encode() if data is not None else b""
        raise _rve(f"cannot read task: {exc}", raw, None) from None


def task_to_wire(task: Task) -> dict[str, Any]:
    """A task as the status endpoint shapes it (for journals); ``structure_task`` reads it."""
    data: dict[str, Any] = {"id": task.id, "status": task.raw_status or task.status.value}
    for name in (
        "progress",
        "estimated_time",
        "actual_time",
        "created",
        "completed",
        "cost",
        "credits_cost",
    ):
        value = getattr(task, name)
        if value is not None:
            data[name] = value
    if task.videos:
        data["result"] = {
            "videos": [{"url": list(v.urls), "expires_at": v.expires_at} for v in task.videos]
        }
    if task.error is not None:
        data["error"] = {
            "code": task.error.code,
            "message": task.error.message,
            "type": task.error.type,
        }
    return data

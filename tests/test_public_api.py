from __future__ import annotations

import pickle
import subprocess
import sys
from typing import Any

import pytest

import apimart_async as am
from apimart_async import emulator


def test_all_is_exactly_the_public_names() -> None:
    # "@py_*": names pytest adds when it rewrites asserts in a package that hosts a plugin
    public = {n for n in dir(am) if not n.startswith(("_", "@"))} - {
        "emulator",
        "cli",
        "testing",
        "report",
        "webhooks",
    }
    assert set(am.__all__) == public | {"__version__"}
    assert set(emulator.__all__) == {
        "ENDPOINTS",
        "Clock",
        "Curve",
        "Emulator",
        "Fault",
        "FaultPlan",
        "RealisticProfile",
        "RttMiddleware",
    }


def test_error_tree() -> None:
    for name in am.__all__:
        obj = getattr(am, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            if obj is am.ApimartError:
                continue
            assert issubclass(obj, am.ApimartError), name
    assert issubclass(am.ValidationError, ValueError)
    assert issubclass(am.APITimeoutError, am.APIConnectionError)
    assert issubclass(am.APITimeoutError, TimeoutError)
    assert issubclass(am.NoVideoError, am.ResponseValidationError)
    assert issubclass(am.SubmitIndeterminateError, am.APIConnectionError)
    for name in am._errors.__all__:  # the drawn tree names every error class of _errors
        obj = getattr(am._errors, name)
        if isinstance(obj, type) and issubclass(obj, am.ApimartError):
            assert name in (am._errors.__doc__ or ""), name
    for cls in (
        am.BadRequestError,
        am.AuthenticationError,
        am.InsufficientBalanceError,
        am.PermissionDeniedError,
        am.NotFoundError,
        am.ConflictError,
        am.RateLimitError,
        am.ServerError,
    ):
        assert issubclass(cls, am.APIStatusError)
    assert am._errors.__doc__ is not None
    assert "ApimartError" in am._errors.__doc__


def test_status_table() -> None:
    from apimart_async._errors import status_error_class as cls

    assert [cls(s) for s in (400, 401, 402, 403, 404, 409, 422, 429, 500, 502, 503, 418)] == [
        am.BadRequestError,
        am.AuthenticationError,
        am.InsufficientBalanceError,
        am.PermissionDeniedError,
        am.NotFoundError,
        am.ConflictError,
        am.BadRequestError,
        am.RateLimitError,
        am.ServerError,
        am.ServerError,
        am.ServerError,
        am.APIStatusError,
    ]
    assert cls(500, "build_request_failed") is am.BadRequestError


def test_py_typed_is_shipped() -> None:
    import importlib.resources

    assert importlib.resources.files("apimart_async").joinpath("py.typed").is_file()


def test_sync_client_is_public() -> None:
    assert am.Apimart.__module__ == "apimart_async._sync"
    assert {"Apimart", "SyncBatch"} <= set(am.__all__)


def test_emulator_and_testing_are_reachable_after_a_plain_import() -> None:
    code = (
        "import sys, apimart_async as am\n"
        "assert 'apimart_async.testing' not in sys.modules\n"
        "assert 'apimart_async.emulator' not in sys.modules\n"
        "print(am.testing.emulated_api.__name__, am.emulator.Emulator.__name__)\n"
        "try:\n"
        "    am.nothing_here\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "emulated_api Emulator",
        "module 'apimart_async' has no attribute 'nothing_here'",
    ]


@pytest.mark.anyio
async def test_the_resources_users_hold_have_public_names() -> None:
    async with am.AsyncApimart("sk-test", base_url="http://127.0.0.1:9") as client:
        assert type(client.videos) is am.Videos
        assert type(client.tasks) is am.Tasks
        assert type(client.uploads) is am.Uploads
        assert type(client.throttle) is am.Throttle
        async with client.batch([], max_cost=1.0) as results:
            assert type(results.budget) is am.Budget
            assert [outcome async for outcome in results] == []
    for cls in (am.Success, am.Failure):
        assert issubclass(cls, am.Outcome)


def test_outcome_kinds() -> None:
    task = am.Task("task_1", am.TaskStatus.COMPLETED)
    failed = am.Task("task_2", am.TaskStatus.FAILED)
    success = am._outcomes.outcome_of(0, None, "task_1", task)
    assert type(success) is am.Success
    assert success.ok
    failure = am._outcomes.outcome_of(1, None, "task_2", failed, am.TaskFailedError(failed))
    assert type(failure) is am.Failure
    assert not failure.ok
    # a finished job whose task cannot be read is not a success
    unread = am._outcomes.outcome_of(2, None, "task_3")
    assert type(unread) is am.Failure
    assert isinstance(unread.error, am.ReplayedError)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: am.Timeout(total=-1),
        lambda: am.AsyncApimart("sk-test", max_retries=-1),
        lambda: am.Budget(-1),
        lambda: am.PollPolicy(target_lag=0),
        lambda: am.VideoRequest("sora-2-preview", ""),
    ],
)
def test_a_bad_setting_error_survives_pickling_as_it_was(bad: Any) -> None:
    # Errors cross process boundaries (ProcessPoolExecutor, multiprocessing): a ValidationError
    # (OptionError now, for settings that raised ConfigurationError or ValueError before) came
    # back with its message split into one-character "errors".
    with pytest.raises(am.ValidationError) as caught:
        bad()
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is type(caught.value)
    assert str(copy) == str(caught.value)
    assert copy.errors == caught.value.errors


def test_unfinished_task_is_a_frozen_public_record_with_a_json_dict() -> None:
    import json

    import attrs

    item = am.UnfinishedTask(
        task_id=None, idempotency_key="k-1", model="sora-2-preview", submitted_at=1.5,
        fingerprint="ab",
    )  # fmt: skip
    assert "UnfinishedTask" in am.__all__ and am.UnfinishedTask.__module__.startswith("apimart")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        item.task_id = "task_1"  # type: ignore[misc]
    assert json.loads(json.dumps(item.to_dict())) == {
        "task_id": None,
        "idempotency_key": "k-1",
        "model": "sora-2-preview",
        "submitted_at": 1.5,
        "fingerprint": "ab",
    }


_FAILED = am.Task(
    id="task_2",
    status=am.TaskStatus.FAILED,
    error=am.TaskError(code=1301, message="blocked", type="content_policy_violation"),
    raw_status="failed",
)
_STATUS = {"status": 429, "type": "rate_limit", "code": 42, "request_id": "r1", "body": b"{}"}

#: One instance of every public exception, built as the SDK builds it.
_EXCEPTIONS: list[BaseException] = [
    am.ApimartError("x"),
    am.ConfigurationError("no key"),
    am.ClientClosedError("closed"),
    am.ValidationError([am.FieldError("prompt", "must not be empty", "")]),
    am.OptionError([am.FieldError("concurrency", "must be at least 1", 0)]),
    am.APIConnectionError("refused", method="GET", path="/v1/tasks/t"),
    am.APITimeoutError("slow", method="GET", path="/v1/tasks/t"),
    am.SubmitIndeterminateError("lost", idempotency_key="k-1", path="/v1/videos/generations"),
    am.ResponseValidationError("bad body", body=b"<html>", status=200, decodable=False),
    am.NoVideoError(_FAILED),
    am.APIStatusError("teapot", **{**_STATUS, "status": 418}),
    am.BadRequestError("bad", **{**_STATUS, "status": 400, "param": "prompt"}),
    am.AuthenticationError("key", **{**_STATUS, "status": 401}),
    am.InsufficientBalanceError("money", **{**_STATUS, "status": 402}),
    am.PermissionDeniedError("no", **{**_STATUS, "status": 403}),
    am.NotFoundError("gone", **{**_STATUS, "status": 404}),
    am.ConflictError("busy", **{**_STATUS, "status": 409, "sub_code": "idempotency_in_progress"}),
    am.RateLimitError("slow down", **_STATUS, retry_after=3.0),
    am.ServerError("oops", **{**_STATUS, "status": 503}),
    am.TaskFailedError(_FAILED),
    am.TaskTimeoutError("task_1", 30.0, _FAILED),
    am.TaskTimeoutError(None, 3.0, idempotency_key="k-2"),
    am.JobsFileError("jobs.jsonl", [(3, "prompt: must not be empty")]),
    am.JournalError("disk full"),
    am.JournalLockedError("run.sqlite", 1234, 1779246294.0, host="box"),
    am.JournalMismatchError(2, "ab", "cd"),
    am.BatchStoppedError("stopped"),
    am.BudgetExceededError("budget"),
    am.UploadError("image_urls[0]", "a.png", "too large"),
    am.ReplayedError("blocked", "TaskFailedError"),
    am.DownloadError("reset", url="https://cdn.example.com/a.mp4", status=None),
    am.DownloadExpiredError("expired", url="https://cdn.example.com/a.mp4", status=403),
    am.DownloadTooLargeError("big", url="https://cdn.example.com/a.mp4"),
    am.WebhookError("no task id"),
]


def test_the_pickle_list_names_every_public_exception() -> None:
    public = {
        obj
        for name in am.__all__
        if isinstance(obj := getattr(am, name, None), type) and issubclass(obj, BaseException)
    } - {am.ApimartWarning}
    assert public == {type(e) for e in _EXCEPTIONS}


@pytest.mark.parametrize("error", _EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_every_public_exception_survives_pickle(error: BaseException) -> None:
    """A worker process (multiprocessing, concurrent.futures, Celery) sends its exception to
    the parent pickled; built as ``cls(*args)``, a class whose ``__init__`` takes other
    arguments than its message failed to unpickle (``TypeError``) or came back different."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)

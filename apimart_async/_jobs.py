"""The life of a batch's jobs as decisions, logic only (no I/O, no task group, no clock).

- ``Stop``: why a batch stopped submitting.
- ``Counts``: what the batch has done so far; ``BatchStats`` is built from it.
- ``resume_plan``: what to do with a job an earlier run recorded in the journal.
- ``conclude``: how an ended job is counted, what its outcome is, whether the journal closes
  it, and the event to report.
- ``Intake``: what to do with each input item (refuse it, pick it up from the journal, or
  submit it).

``_batch`` drives these (task group, feeder, submitters, deadline, Ctrl-C, the outcome
stream); everything here is tested with plain values.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable
from typing import Literal, cast

import attrs

from ._converter import structure_task
from ._download import safe_name
from ._errors import (
    ApimartError,
    APIStatusError,
    AuthenticationError,
    ClientClosedError,
    DownloadError,
    FieldError,
    InsufficientBalanceError,
    JournalMismatchError,
    NotFoundError,
    NoVideoError,
    ReplayedError,
    TaskFailedError,
    ValidationError,
)
from ._hints import with_webhook
from ._journal import JobRecord
from ._models import DownloadedFile, Task, VideoRequest
from ._outcomes import BatchEvent, BatchStats, EventKind, Failure, Success, outcome_of
from ._slices import let_the_loop_run

__all__ = [
    "Conclusion",
    "Counts",
    "Ended",
    "FileNames",
    "Intake",
    "Job",
    "ResumePlan",
    "Stop",
    "Take",
    "conclude",
    "definitive",
    "file_stem",
    "files_complete",
    "read_inputs",
    "resume_plan",
    "unpack",
]


class Stop(enum.Enum):
    """Why a batch stopped submitting; ``Batch.stopped`` is its description."""

    LEFT = "the batch was left"
    CALLER = "stopped by the caller"
    INTERRUPTED = "interrupted"
    DEADLINE = "the batch deadline passed"
    CLIENT_CLOSED = "the client was closed"
    JOB_FAILED = "a job failed"
    INPUT_FAILED = "reading the requests failed"
    JOURNAL_FAILED = "the journal cannot be written"
    ACCOUNT = "the service refused the account"

    def describe(self, detail: str | None = None) -> str:
        """The description ``Batch.stopped`` shows: a failed job's own words, the input's
        error after ours, or the reason alone."""
        if detail is None:
            return self.value
        if self is Stop.INPUT_FAILED:
            return f"{self.value}: {detail}"
        return detail


@attrs.define
class Job:
    """One job of a batch while it is submitted or followed."""

    index: int
    request: VideoRequest
    key: str
    name: str | None = None
    #: When its task was submitted (the poller's clock); None: not in this run.
    submitted_at: float | None = None
    journaled: bool = False
    #: Recorded in an earlier run and sent afresh (new key, maybe a new request).
    restart: bool = False
    #: Sent again with the key an earlier run recorded (its POST may have made the task).
    resent: bool = False
    #: issue 15: its request carries the batch's ``webhook_url`` (polled as a fallback only)
    webhook: bool = False


@attrs.define
class Counts:
    """What a batch has done so far (``Batch.stats()`` adds what is in flight)."""

    read: int = 0
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    errored: int = 0
    replayed: int = 0
    cost: float = 0.0

    def count(self, kind: Ended, n: int = 1) -> None:
        """``n`` more jobs ended as ``kind`` (-1: one less)."""
        if kind == "completed":
            self.completed += n
        elif kind == "failed":
            self.failed += n
        else:
            self.errored += n

    def stats(
        self,
        *,
        submitting: int,
        pending: int,
        downloading: int,
        elapsed: float,
        requests: dict[str, int],
    ) -> BatchStats:
        return BatchStats(
            read=self.read,
            submitting=submitting,
            submitted=self.submitted,
            pending=pending,
            completed=self.completed,
            failed=self.failed,
            errored=self.errored,
            cost=round(self.cost, 6),
            elapsed=elapsed,
            requests=requests,
            replayed=self.replayed,
            downloading=downloading,
        )


#: How a job ended, for the counts.
Ended = Literal["completed", "failed", "errored"]


def definitive(exc: ApimartError, *, resent: bool = False) -> bool:
    """A submit error after which the task surely does not exist (the job can be closed);
    otherwise the POST may have created it and a resume retries with the same key. For a
    key sent again (``resent``), only a refusal of the request itself (400, 413, 422)
    proves it: a 401, 402 or 403 says nothing of the first POST, which may have made the
    task (brk21c: closed, the job was sent afresh with a new key and paid twice)."""
    if isinstance(exc, ValidationError):
        return True
    if isinstance(exc, APIStatusError):
        if resent:
            return exc.status in (400, 413, 422)
        return 400 <= exc.status < 500 and exc.status not in (408, 409, 429)
    return False


# -- the end of a job ---------------------------------------------------------------------------


@attrs.frozen
class Conclusion:
    """How one ended job is accounted for."""

    outcome: Success | Failure
    """What the caller gets."""
    status: str
    """Its status in the manifest (``completed``, ``failed``, ``error``, ``download_failed``...)."""
    closes: bool
    """Whether the journal closes the job (False: a later run picks it up again)."""
    event_kind: EventKind
    """The kind of event to report."""
    ended: Ended
    """What it counts as."""
    cost: float | None
    """What to settle the budget with: None when no task ended (an error)."""
    abandoned: bool = False
    """Its end was not seen here (a timeout, the client closed) and it may still run, billed,
    at the service."""

    @property
    def event(self) -> BatchEvent:
        """The event to report (made when asked: most batches have no ``on_event``)."""
        out = self.outcome
        return BatchEvent(self.event_kind, out.index, out.task_id, out.task, out.error)


def conclude(
    job: Job,
    task_id: str,
    result: Task | ApimartError,
    files: tuple[DownloadedFile, ...] = (),
    download_error: ApimartError | None = None,
) -> Conclusion:
    """The conclusion of a job whose task ended with ``result`` (the terminal task or the
    error that ended the wait), after its files were fetched (``files``) or not
    (``download_error``)."""
    if isinstance(result, ApimartError):
        outcome = outcome_of(job.index, job.request, task_id, None, result, job.key, job.name)
        return Conclusion(
            outcome,
            "error",
            isinstance(result, NotFoundError),  # the service forgot the task
            "errored",
            "errored",
            None,
            # its end unseen (timed out, the client closed...): running on, billed, and
            # listed by ``pending_task_ids()``; not a task the service forgot, nor one that
            # completed without a video
            abandoned=not isinstance(result, (NotFoundError, NoVideoError)),
        )
    task = result
    cost = task.cost or 0.0
    if not task.ok:
        error = TaskFailedError(task)
        outcome = outcome_of(job.index, job.request, task_id, task, error, job.key, job.name)
        return Conclusion(outcome, task.status.value, True, "failed", "failed", cost)
    if download_error is not None:
        # Paid and completed, files missing: the journal keeps it for a resume.
        outcome = outcome_of(
            job.index, job.request, task_id, task, download_error, job.key, job.name
        )
        return Conclusion(outcome, "download_failed", False, "errored", "errored", cost)
    outcome = outcome_of(job.index, job.request, task_id, task, None, job.key, job.name, files)
    return Conclusion(outcome, "completed", True, "completed", "completed", cost)


# -- a job an earlier run recorded ---------------------------------------------------------------


@attrs.frozen
class ResumePlan:
    """What to do with a recorded job.

    - ``"afresh"``: submit it again as a new task (a fresh key, the request as it reads now):
      its submit was refused, or its generation failed and ``retry_failed`` asks for another.
    - ``"mismatch"``: the input changed under the journal; ``outcome`` says so, nothing is sent.
    - ``"resubmit"``: its submit may have created a task: submit again with the same key.
    - ``"reattach"``: its task is pending: follow ``task_id``.
    - ``"refetch"``: its task completed but its files are missing: fetch them (``task``).
    - ``"replay"``: it ended: ``outcome`` (replayed) counts as ``ended``.
    """

    action: Literal["afresh", "mismatch", "resubmit", "reattach", "refetch", "replay"]
    job: Job | None = None
    task_id: str | None = None
    task: Task | None = None
    outcome: Success | Failure | None = None
    ended: Ended | None = None
    carried: float = 0.0
    """A ``mismatch``: what the recorded job (another input's) cost, counted at the start
    among this batch's costs and taken out again."""


def reopens(
    record: JobRecord,
    *,
    retry_failed: bool,
    downloads: bool,
    files_complete: Callable[[tuple[DownloadedFile, ...]], bool],
) -> bool:
    """Whether a job the journal holds as done is taken up again when its input comes by: its
    generation failed and ``retry_failed`` asks for another, or its task completed and its
    files are missing (``resume_plan``: ``afresh`` or ``refetch``). The manifest holds back
    the line of such a job until it ends again (issue 14: a job listed twice)."""
    task = record.task if record.state == "done" else None  # parsed once
    if task is None:
        return False
    if _retried(record, retry_failed):
        return True
    return downloads and not files_complete(record.files) and structure_task(task).ok


def _retried(record: JobRecord, retry_failed: bool) -> bool:
    """Whether a done job whose generation failed is submitted again (``retry_failed``)."""
    return (
        retry_failed
        and record.state == "done"
        and record.has_task
        and record.status in ("failed", "cancelled")
    )


def resume_plan(
    record: JobRecord,
    request: VideoRequest,
    name: str | None,
    *,
    retry_failed: bool,
    downloads: bool,
    files_complete: Callable[[tuple[DownloadedFile, ...]], bool],
) -> ResumePlan:
    """The plan for job ``record.index``, read again as ``(name, request)``. ``downloads``:
    the batch fetches files; ``files_complete`` tells whether recorded files are all there."""
    if record.state == "refused" or _retried(record, retry_failed):
        return ResumePlan("afresh")
    fingerprint = request.fingerprint()
    if record.fingerprint != fingerprint:
        # This job may have a task for the old request: leave it alone, report it.
        mismatch = JournalMismatchError(record.index, record.fingerprint, fingerprint)
        return ResumePlan(
            "mismatch",
            outcome=outcome_of(record.index, request, error=mismatch, name=name),
            carried=(record.cost or 0.0) if record.state in ("done", "downloading") else 0.0,
        )
    job = Job(
        record.index,
        request,
        record.idempotency_key,
        name or record.name,
        journaled=True,
        resent=True,
    )
    if record.state == "submitting":
        return ResumePlan("resubmit", job)
    if record.state == "pending" and record.task_id:
        return ResumePlan("reattach", job, record.task_id)
    raw = record.task  # parsed once (a record keeps it as JSON text)
    task = structure_task(raw) if raw is not None else None
    files_missing = downloads and task is not None and task.ok and not files_complete(record.files)
    if record.state == "downloading" or (record.state == "done" and files_missing):
        if task is None:
            return ResumePlan("resubmit", job)
        return ResumePlan("refetch", job, record.task_id or task.id, task)
    # done: replay
    error: ApimartError | None = None
    ended: Ended
    if record.status == "completed":
        ended = "completed"
    elif task is not None and record.status in ("failed", "cancelled", "expired"):
        ended = "failed"
        error = TaskFailedError(task)
    else:
        ended = "errored"
        error = ReplayedError(record.error or "failed in an earlier run", record.error_type)
    outcome = outcome_of(
        record.index,
        request,
        record.task_id,
        task,
        error,
        record.idempotency_key,
        job.name,
        record.files,
        replayed=True,
    )
    return ResumePlan("replay", job, record.task_id, task, outcome, ended)


# -- the input ----------------------------------------------------------------------------------


async def read_inputs(
    requests: Iterable[object] | AsyncIterable[object],
) -> AsyncGenerator[object, None]:
    """The input items, read lazily from an iterable or an async iterable; the event loop
    runs at least every ``LOOP_SLICE`` seconds of work between two items."""
    last = time.perf_counter()
    if isinstance(requests, AsyncIterable):
        async for item in requests:
            last = await let_the_loop_run(last, time.perf_counter)
            yield item
        return
    for item in requests:  # not wrapped in a generator of its own: one frame less per item
        last = await let_the_loop_run(last, time.perf_counter)
        yield item


def unpack(index: int, item: object) -> tuple[str | None, VideoRequest] | ValidationError:
    """An input item as ``(name, request)``, or the error that refuses it."""
    name: str | None = None
    if isinstance(item, tuple):
        pair = cast("tuple[object, ...]", item)
        if len(pair) == 2 and isinstance(pair[0], str):
            name, item = pair[0], pair[1]
    if not isinstance(item, VideoRequest):
        rule = "must be a VideoRequest or (name, VideoRequest) (see VideoRequest.from_dict)"
        return ValidationError([FieldError(f"requests[{index}]", rule, item)])
    return name, item


def file_stem(index: int, name: str | None) -> str:
    """The file name (without ``.mp4``) of a job's video: its sanitised name, else its index."""
    return safe_name(name) if name else f"{index:06d}"


def files_complete(files: tuple[DownloadedFile, ...]) -> bool:
    """Whether every recorded file is on disk with its recorded size."""
    if not files:
        return False
    for f in files:
        try:
            if os.path.getsize(f.path) != f.bytes:
                return False
        except OSError:
            return False
    return True


class FileNames:
    """With downloads, every job needs a file name of its own: two names that sanitise to the
    same file (``a/b`` and ``a_b``, or a name used twice) would overwrite each other's video.
    The later job is refused, the same way on every run of the same input."""

    def __init__(self, *, downloads: bool) -> None:
        self.downloads = downloads
        #: File stems claimed so far (lower-cased), with the job that claimed each.
        self._stems: dict[str, int] = {}

    def claim(self, index: int, name: str | None) -> ValidationError | None:
        if not self.downloads:
            return None
        stem = file_stem(index, name).lower()  # case-insensitive file systems too
        first = self._stems.setdefault(stem, index)
        if first == index:
            return None
        rule = f"gives the same file name as job {first} ({stem}.mp4); names must differ"
        return ValidationError([FieldError(f"requests[{index}].name", rule, name)])


# -- one input item -------------------------------------------------------------------------------


@attrs.frozen
class Take:
    """What to do with one input item (see ``Intake.take``)."""

    index: int
    request: VideoRequest | None = None
    name: str | None = None
    refused: Success | Failure | None = None
    """The outcome to hand out now, nothing sent: a bad item, a file name another job has, a
    request that changed under the journal."""
    plan: ResumePlan | None = None
    """How to pick up the job an earlier run recorded (None: none was recorded)."""
    key: str | None = None
    """The recorded idempotency key to submit with again (``resubmit``)."""
    webhook: bool = False
    """Whether the request carries the batch's ``webhook_url`` (issue 15)."""

    @property
    def carried(self) -> float:
        """The recorded cost of a job refused as a mismatch (see ``ResumePlan.carried``)."""
        return self.plan.carried if self.plan is not None else 0.0

    @property
    def submits(self) -> bool:
        """Whether the job is to be submitted (new, afresh, or again with its recorded key)."""
        return self.refused is None and (
            self.plan is None or self.plan.action in ("afresh", "resubmit")
        )

    def not_admitted(self, error: ApimartError) -> Failure:
        """The outcome of the job when admission refused it (over budget, batch stopped)."""
        assert self.request is not None
        outcome = outcome_of(self.index, self.request, error=error, name=self.name)
        assert isinstance(outcome, Failure)
        return outcome

    def job(self, new_key: Callable[[], str]) -> Job:
        """The job to submit: with its recorded key (``resubmit``), else a fresh one."""
        assert self.request is not None
        if self.key is not None:
            return Job(
                self.index,
                self.request,
                self.key,
                self.name,
                journaled=True,
                resent=True,
                webhook=self.webhook,
            )
        afresh = self.plan is not None and self.plan.action == "afresh"
        return Job(
            self.index, self.request, new_key(), self.name, restart=afresh, webhook=self.webhook
        )


class Intake:
    """The input items of one batch, in order, as decisions: refuse an item (not a request,
    a file name another job has), pick it up from the journal (``records``, by index), or
    submit it. ``webhook``: the batch's ``webhook_url`` (issue 15), set on every request
    without a ``webhook`` of its own; it is not what a job pays for, so a job recorded with
    another webhook is the same job (a resend with its key carries the recorded one)."""

    def __init__(
        self,
        records: dict[int, JobRecord],
        *,
        downloads: bool,
        retry_failed: bool,
        webhook: str | None = None,
    ) -> None:
        self.records = records
        self.downloads = downloads
        self.retry_failed = retry_failed
        self.webhook = webhook
        self._names = FileNames(downloads=downloads)

    def take(self, index: int, item: object) -> Take:
        unpacked = unpack(index, item)
        if isinstance(unpacked, ValidationError):
            return Take(index, refused=outcome_of(index, None, error=unpacked))
        name, request = unpacked
        clash = self._names.claim(index, name)
        if clash is not None:
            return Take(index, request, name, outcome_of(index, request, error=clash, name=name))
        mine = with_webhook(request, self.webhook)
        record = self.records.pop(index, None)
        if record is None:
            return Take(index, mine, name, webhook=self._covers(mine))
        sent = as_recorded(mine, record)
        plan = resume_plan(
            record,
            sent,
            name,
            retry_failed=self.retry_failed,
            downloads=self.downloads,
            files_complete=files_complete,
        )
        if plan.action == "mismatch":
            return Take(index, request, name, plan.outcome, plan)
        if plan.action == "afresh":  # a new task: this run's webhook
            return Take(index, mine, name, None, plan, webhook=self._covers(mine))
        key = record.idempotency_key if plan.action == "resubmit" else None
        return Take(index, sent, name, None, plan, key, webhook=self._covers(sent))

    def _covers(self, request: VideoRequest) -> bool:
        """Whether callbacks of ``request``'s task come to this batch's ``webhook_url``."""
        return self.webhook is not None and request.webhook == self.webhook


def as_recorded(request: VideoRequest, record: JobRecord) -> VideoRequest:
    """``request`` as job ``record`` sent it: the same request with the ``webhook`` it was
    recorded with, when only the webhook differs (issue 15: a resume with another
    ``webhook_url`` is the same job, and a resend with its key must carry the same body);
    else ``request`` itself (``resume_plan`` decides about a changed input)."""
    if request.fingerprint() == record.fingerprint:
        return request
    body = record.request  # parsed from the journal's text: only when the two differ
    if body is None:
        return request
    recorded = body.get("webhook")
    same = attrs.evolve(request, webhook=recorded if isinstance(recorded, str) else None)
    return same if same.fingerprint() == record.fingerprint else request


def stop_after(
    result: Task | ApimartError, *, stop_on_error: bool, what: str
) -> tuple[Stop, str | None] | None:
    """Whether a job's end (a task, or an error) stops the batch, and why: the client was
    closed; the key was refused (401) or the balance is too low (402), which every later
    submit would meet too (brk16h: a wrong key sent every job's POST); or the job failed
    under ``stop_on_error`` (``what`` says which). None: go on."""
    if isinstance(result, ClientClosedError):
        return Stop.CLIENT_CLOSED, None
    if isinstance(result, AuthenticationError):
        return Stop.ACCOUNT, f"the API key was refused ({result}); fix it and run again"
    if isinstance(result, InsufficientBalanceError):
        return Stop.ACCOUNT, f"the balance is too low ({result}); top it up and run again"
    if stop_on_error and (isinstance(result, ApimartError) or not result.ok):
        return Stop.JOB_FAILED, what
    return None


def cut_off(task_id: str) -> DownloadError:
    """The end of a job whose files were being fetched when the caller left the batch: it is
    handed out (``unread()``, with its task id) and the journal keeps it open, so the next
    run fetches the rest of the ``.part``."""
    return DownloadError(
        f"download of task {task_id} cut off: the batch was left; what arrived is kept"
        " and a resume fetches the rest"
    )


def download_deadline(
    timeout: float | None,
    job_timeout: float | None,
    *,
    now: float,
    batch_ends_at: float,
    since_submit: float | None,
    time_scale: float,
) -> tuple[float, str]:
    """When a job's download must end (on the clock of ``now``; inf: never) and which limit
    says so: the batch's ``timeout`` (at ``batch_ends_at``) or the job's ``job_timeout``,
    counted from its submit in this run (``since_submit``: the submit's time minus now on the
    poller's clock, which runs ``time_scale`` times faster; None: submitted in an earlier
    run)."""
    ends = [(float("inf"), "")]
    if timeout is not None:
        ends.append((batch_ends_at, f"batch deadline (timeout={timeout:g}s)"))
    if job_timeout is not None and since_submit is not None:
        left = max(0.0, since_submit + job_timeout) / time_scale
        ends.append((now + left, f"job deadline (job_timeout={job_timeout:g}s)"))
    return min(ends)

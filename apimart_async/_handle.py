"""``Batch``: the caller's handle on one ``client.batch(...)`` (a context manager, an async
iterator of outcomes, its stats, ``stop``); ``BatchRun`` in ``_batch`` drives the jobs."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import attrs

from ._admission import Budget
from ._api import Api
from ._batch import BatchRun
from ._download import Downloader
from ._errors import FieldError, ValidationError
from ._models import VideoRequest
from ._outcomes import BatchStats, Failure, JobInput, Success
from ._pacing import Pacing
from ._poller import Poller
from ._references import UploadStats

if TYPE_CHECKING:
    from ._options import BatchOptions

__all__ = ["Batch"]


class Batch:
    """Run many jobs; iterate the outcomes in completion order::

        async with client.batch(jobs, concurrency=16) as results:
            async for outcome in results:
                ...

    Leaving the block early stops submitting and polling at once; the tasks already
    submitted keep running (and are billed) at the service: ``pending_task_ids()`` lists them
    and ``unconfirmed_submissions()`` lists submits cut off before their reply. With a
    journal, running the same batch again picks all of them up.
    """

    def __init__(
        self,
        requests: Iterable[JobInput] | AsyncIterable[JobInput],
        options: BatchOptions,
        *,
        api: Api,
        poller: Poller,
        downloader: Downloader,
        pacing: Pacing,
    ) -> None:
        if not isinstance(requests, (Iterable, AsyncIterable)):
            raise ValidationError(
                [FieldError("requests", "must be an iterable of VideoRequest", requests)]
            )
        self._run = BatchRun(
            requests, options, api=api, poller=poller, downloader=downloader, pacing=pacing
        )
        self.options = options
        """What this batch was asked to do."""
        self._entered = False

    async def __aenter__(self) -> Batch:
        await self._run.enter()
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self._run.exit()
        error = self._run.journal_error()
        if error is not None and exc is None:  # not raised by the iteration: raised here
            raise error
        return None

    def __aiter__(self) -> AsyncIterator[Success | Failure]:
        return self

    async def __anext__(self) -> Success | Failure:
        if not self._entered:  # it would end at once: nothing runs before async with
            raise RuntimeError(
                "a batch runs inside 'async with client.batch(...) as results:'; iterate"
                " 'async for outcome in results' there"
            )
        return await self._run.next()

    @property
    def job_timeout(self) -> float | None:
        """Seconds one job may take from its submit to its end (None: no limit)."""
        return self.options.job_timeout

    @property
    def timeout(self) -> float | None:
        """Seconds the whole batch may take (None: no limit)."""
        return self.options.timeout

    @property
    def stop_on_error(self) -> bool:
        """Whether the first error stops submitting."""
        return self.options.stop_on_error

    @property
    def replay_finished(self) -> bool:
        """Whether jobs finished in an earlier run are handed out again."""
        return self.options.replay_finished

    @property
    def retry_failed(self) -> bool:
        """Whether jobs whose generation failed are submitted again (costs money)."""
        return self.options.retry_failed

    @property
    def download_dir(self) -> Path | None:
        """Where result videos go (None: not downloaded)."""
        return self._run.download_dir

    @property
    def manifest_path(self) -> Path | None:
        """The JSONL manifest, one line per finished job (None: none)."""
        return self._run.manifest_path

    @property
    def max_bytes(self) -> int | None:
        """The largest result file accepted, in bytes (None: no limit)."""
        return self.options.max_bytes

    @property
    def sigint_grace(self) -> float | None:
        """Seconds the first Ctrl-C leaves running tasks to finish (None: no handler)."""
        return self.options.sigint_grace

    @property
    def interrupted(self) -> int:
        """How many times Ctrl-C reached this batch (with ``sigint_grace``)."""
        return self._run.interrupts

    @property
    def uploads(self) -> UploadStats:
        """What this batch did with local reference files: uploaded, reused, failed."""
        return self._run.refs.stats

    def pending_task_ids(self) -> list[str]:
        """Tasks submitted by this batch whose end it has not seen: still running (and billed)
        at the service. Re-attach with ``client.tasks.watch`` or ``client.tasks.wait``."""
        return [*self._run.roster.pending, *self._run.roster.abandoned]

    def unconfirmed_submissions(self) -> list[tuple[int, VideoRequest, str]]:
        """(index, request, idempotency key) of submits cut off before their reply (by leaving
        the batch): the task may exist. Submitting again with the same key is always safe."""
        return [(j.index, j.request, j.key) for j in self._run.roster.unconfirmed]

    @property
    def stopped(self) -> str | None:
        """Why the batch stopped submitting, if it did."""
        return self._run.stopped

    @property
    def budget(self) -> Budget | None:
        """The ``max_cost`` budget and what it has committed (None without ``max_cost``)."""
        return self._run.roster.budget

    def stats(self) -> BatchStats:
        """The batch's counts now."""
        return attrs.evolve(self._run.stats(), unread=self._run.outbox.unread)

    def unread(self) -> list[Success | Failure]:
        """Outcomes that ended and were not read, oldest first: after leaving ``async for``
        early (``break``, a cancel scope, an error), they are still here, each with its
        ``task_id`` and files; the journal, if any, holds them as done. Jobs still running
        are in ``pending_task_ids()``. Nothing a batch paid for is lost between the two."""
        return self._run.outbox.unread_outcomes()

    def __repr__(self) -> str:
        s = self.stats()
        reqs = " ".join(f"{k}={v}" for k, v in sorted(s.requests.items())) or "none"
        stop = f" stopped: {self.stopped}" if self.stopped else ""
        unread = f" unread={s.unread}" if s.unread else ""
        return (
            f"<Batch read={s.read} submitted={s.submitted} pending={s.pending} | "
            f"completed={s.completed} failed={s.failed} errored={s.errored}{unread} | "
            f"cost=${s.cost:.2f} | requests: {reqs}{stop}>"
        )

    async def stop(self, *, grace: float = 0.0) -> None:
        """Stop submitting now; keep following the tasks already submitted for up to ``grace``
        seconds, then end the iteration. Unfinished jobs stay in the journal for a resume."""
        await self._run.stop(grace=grace)

    def _on_sigint(self) -> None:  # the sync facade forwards its Ctrl-C here
        self._run.on_sigint()

    def _forward_sigint(self) -> None:  # the sync facade handles Ctrl-C on its own thread
        self._run._sigint.forwarded = True

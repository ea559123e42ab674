"""What a batch writes down, and when: the journal (every step before it is taken) and the
JSONL manifest (one line per finished job). The batch calls these at each step of a job;
none of them decides anything (``_jobs`` does)."""

from __future__ import annotations

from pathlib import Path

import anyio

from ._converter import task_to_wire
from ._errors import ApimartError
from ._jobs import Conclusion, Job, definitive
from ._journal import JobRecord, Journal
from ._manifest import Manifest, outcome_line, record_line
from ._models import DownloadedFile, Task
from ._outcomes import Outcome
from ._prior_store import load_priors, save_priors
from ._priors import Priors

__all__ = ["Ledger"]


class Ledger:
    """The journal and the manifest of one batch (either may be None)."""

    def __init__(
        self, journal: Journal | None, manifest_path: Path | None, *, priors: Priors | None = None
    ) -> None:
        self.journal = journal
        self.manifest_path = manifest_path
        #: The poll schedule's learned priors, loaded from the journal and saved back to it.
        self.priors = priors
        self._manifest: Manifest | None = None
        self._opened = False

    @property
    def keeps_records(self) -> bool:
        """Whether an ended job has anything to write down."""
        return self.journal is not None or self.manifest_path is not None

    async def open(self) -> dict[int, JobRecord]:
        """Open the journal (its records by index) and start the manifest with the jobs it
        holds as done; on failure, close what was opened."""
        records: dict[int, JobRecord] = {}
        try:
            if self.journal is not None:
                records = await self.journal.open()
                self._opened = True
                if self.priors is not None:
                    await load_priors(self.journal, self.priors)
            if self.manifest_path is not None:
                self._manifest = Manifest(self.manifest_path)
                done = sorted((r for r in records.values() if r.state == "done"), key=_index)
                await self._manifest.open([record_line(r) for r in done])
        except BaseException:
            await self.close(keep_priors=False)
            raise
        return records

    async def close(self, *, keep_priors: bool = True) -> None:
        """Close the manifest and the journal (saving the priors to it, with ``keep_priors``)."""
        with anyio.CancelScope(shield=True):
            if self._manifest is not None:
                await self._manifest.close()
            if self.journal is not None and self._opened:
                self._opened = False
                try:
                    if keep_priors and self.priors is not None:
                        await save_priors(self.journal, self.priors)
                finally:
                    await self.journal.close()

    async def write_manifest(self, outcome: Outcome, status: str) -> None:
        if self._manifest is not None:
            with anyio.CancelScope(shield=True):
                await self._manifest.write(outcome_line(outcome, status))

    # -- the steps of a job ------------------------------------------------------------------

    async def before_submit(self, job: Job) -> None:
        """Record the job (with its key) before its submit is sent."""
        if self.journal is not None and not job.journaled:
            record = self.journal.restart if job.restart else self.journal.add
            body = job.request.to_body()
            await record(job.index, job.request.fingerprint(), job.key, job.name, body)
            job.journaled = True

    async def submit_failed(self, job: Job, exc: ApimartError, outcome: Outcome) -> None:
        """A submit ended with ``exc``: without a journal, the manifest says so; with one, a
        job whose task surely does not exist is closed as refused (the next run submits it
        again, with a fresh key); any other stays open for a resume with the same key."""
        with anyio.CancelScope(shield=True):
            if self.journal is None:
                await self.write_manifest(outcome, "error")
            elif job.journaled and definitive(exc):
                await self.journal.refused(job.index, error=str(exc), error_type=type(exc).__name__)
                await self.write_manifest(outcome, "error")

    async def submitted(self, job: Job, task_id: str) -> None:
        if self.journal is not None:
            with anyio.CancelScope(shield=True):  # the id of a paid task is never lost
                await self.journal.set_task(job.index, task_id)

    async def downloading(self, job: Job, task: Task) -> None:
        if self.journal is not None:
            await self.journal.set_downloading(job.index, task_to_wire(task), task.cost)

    async def finished(self, job: Job, end: Conclusion, files: tuple[DownloadedFile, ...]) -> None:
        """Record an ended job: the journal closes it if ``end.closes`` (else a later run picks
        it up again), and the manifest gets its line when the journal closes it or there is
        no journal."""
        outcome = end.outcome
        if end.closes and self.journal is not None:
            task = outcome.task
            error = outcome.error
            await self.journal.finish(
                job.index,
                status=end.status,
                cost=task.cost if task is not None else None,
                task=task_to_wire(task) if task is not None else None,
                files=files,
                error=str(error) if error is not None else None,
                error_type=type(error).__name__ if error is not None else None,
            )
        if end.closes or self.journal is None:
            await self.write_manifest(outcome, end.status)


def _index(record: JobRecord) -> int:
    return record.index

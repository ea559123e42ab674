"""Where each job of a batch is and what the batch has counted, logic only (no I/O, no task
group, no clock: times are given).

A job is read, then being submitted (``submitting``, by index), then pending at the service
(``pending``, by task id), then finishing (its files, journal and manifest; ``finishing``
counts them), then ended. ``Roster`` keeps those sets, the submit scheduler's and the
budget's books in step with them, and the ``Counts`` that ``BatchStats`` is built from.
``_batch`` calls it at each step; each step is tested with plain values.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._admission import Budget, SubmitScheduler
from ._errors import ApimartError
from ._jobs import Conclusion, Counts, Ended, Job, conclude
from ._journal import JobRecord
from ._models import DownloadedFile, Task
from ._outcomes import BatchStats

__all__ = ["Roster"]


class Roster:
    """The jobs of one batch by where they are, the counts, and the budget's settlements."""

    def __init__(self, sched: SubmitScheduler, budget: Budget | None) -> None:
        self.sched = sched
        self.budget = budget
        self.counts = Counts()
        #: Jobs whose submit is in flight, by index.
        self.submitting: dict[int, Job] = {}
        #: Jobs whose task is running at the service, by task id.
        self.pending: dict[str, Job] = {}
        #: Ended jobs whose files, journal and manifest are being written.
        self.finishing = 0
        #: Submits cut off before their reply by leaving the batch: the task may exist.
        self.unconfirmed: list[Job] = []
        #: Tasks timed out or no longer followed here (a stop, Ctrl-C, a failed journal), still
        #: running (and billed) at the service.
        self.abandoned: list[str] = []
        #: After a stop's grace: a task whose submit comes back now is left running, not
        #: followed (brk21c: one in flight at the stop kept the batch going for ever).
        self.letting_go = False
        #: The client's request counts when the batch started (``stats`` shows the batch's).
        self.baseline: dict[str, int] = {}

    @property
    def in_flight(self) -> int:
        """Jobs submitted or being submitted whose end the batch has not seen."""
        return len(self.pending) + len(self.submitting)

    @property
    def idle(self) -> bool:
        """Nothing submitting, pending or finishing."""
        return not self.submitting and not self.pending and not self.finishing

    def carry_costs(self, records: Iterable[JobRecord]) -> None:
        """What jobs paid for in an earlier run (done or downloading) counts again, and
        against ``max_cost``."""
        for rec in records:
            if rec.cost and rec.state in ("done", "downloading"):
                self.counts.cost += rec.cost
                if self.budget is not None:
                    self.budget.spent += rec.cost

    def read(self) -> int:
        """One more input item read; its index."""
        index = self.counts.read
        self.counts.read += 1
        return index

    def refused(self, carried: float = 0.0) -> None:
        """A job ended before any submit (bad input, a name clash, the budget, a stop...);
        ``carried``: the cost counted for it at the start, another input's (a mismatch)."""
        self.counts.errored += 1
        self.counts.cost -= carried

    # -- submitting ----------------------------------------------------------------------------

    def admitted(self, job: Job) -> None:
        """Job admitted: its submit starts."""
        self.sched.started()
        self.submitting[job.index] = job

    def submit_failed(self, job: Job) -> None:
        """Its submit failed: the slot is free and its reserve released (the job stays in
        ``submitting`` until ``dropped``, while its outcome is recorded)."""
        self.sched.submitted(ok=False)
        if self.budget is not None:
            self.budget.settle(job.index, job.request, None)

    def taken_over(self, job: Job) -> None:
        """Another worker of the batch took the job over before its submit (issue 15): it
        is not sent here and ends elsewhere; its slot and reserve are free."""
        self.submit_failed(job)
        self.submitting.pop(job.index, None)

    def dropped(self, job: Job) -> None:
        """A failed submit's outcome is out: the job ended as an error."""
        self.submitting.pop(job.index, None)
        self.counts.errored += 1

    def running(self, job: Job, task_id: str, now: float) -> None:
        """Its task exists and is running (``now`` on the poller's clock): count it, and keep
        it by its task id."""
        self.submitting.pop(job.index, None)
        self.sched.submitted(ok=True)
        self.counts.submitted += 1
        job.submitted_at = now
        self.pending[task_id] = job

    def left(self) -> None:
        """The batch was left: submits in flight may have created tasks."""
        self.unconfirmed.extend(self.submitting.values())

    def confirmed(self, job: Job) -> None:
        """A submit listed as unconfirmed got its reply after all."""
        self.unconfirmed = [j for j in self.unconfirmed if j is not job]

    # -- recorded in an earlier run -------------------------------------------------------------

    def reattached(self, job: Job, task_id: str, now: float) -> None:
        """A job recorded as pending is followed again (its estimate held in the budget)."""
        self.sched.started()
        self.running(job, task_id, now)
        if self.budget is not None:
            est = self.budget.estimate(job.request) or 0.0
            self.budget.reserve(job.index, job.request, est)

    def refetching(self) -> None:
        """A job whose task completed in an earlier run gets its files now."""
        self.counts.submitted += 1
        self.finishing += 1

    def replayed(self, ended: Ended) -> None:
        """A job that ended in an earlier run is counted (and maybe handed out) again."""
        self.counts.replayed += 1
        self.counts.count(ended)

    # -- the end ---------------------------------------------------------------------------------

    def ended(self, task_id: str) -> Job | None:
        """The task ``task_id`` ended (or stopped being waited for): its job, if pending."""
        job = self.pending.pop(task_id, None)
        if job is not None:
            self.sched.task_done()
        return job

    def conclude(
        self,
        job: Job,
        task_id: str,
        result: Task | ApimartError,
        files: tuple[DownloadedFile, ...] = (),
        download_error: ApimartError | None = None,
    ) -> Conclusion:
        """Count one ended job (see ``_jobs.conclude``) and settle its budget."""
        end = conclude(job, task_id, result, files, download_error)
        self.counts.count(end.ended)
        if end.cost:
            self.counts.cost += end.cost
        if self.budget is not None:
            self.budget.settle(job.index, job.request, end.cost)
        if end.abandoned:
            self.abandoned.append(task_id)
        return end

    def uncount(self, end: Conclusion) -> None:
        """Another worker of the batch ended the job first (issue 15): what ``conclude``
        counted is taken back (its budget stays settled: the task's cost was spent)."""
        self.counts.count(end.ended, -1)
        if end.cost:
            self.counts.cost -= end.cost

    def stats(self, *, elapsed: float, requests: dict[str, int]) -> BatchStats:
        """The counts now; ``requests`` are the client's counts (the batch's are shown)."""
        base = self.baseline
        return self.counts.stats(
            submitting=len(self.submitting),
            pending=len(self.pending),
            downloading=self.finishing,
            elapsed=elapsed,
            requests={k: v - base.get(k, 0) for k, v in requests.items() if v - base.get(k, 0)},
        )

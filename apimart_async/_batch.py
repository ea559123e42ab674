"""The batch driver: ``BatchRun`` runs the jobs of one ``client.batch(...)``, submitted under
limits and watched by the shared poller (``Batch``, in ``_handle``, is the caller's handle).

It owns an anyio task group (the feeder, which reads the input lazily; a pool of submitters;
the deadline; one task per job being finalised) and hands out outcomes through an ``Outbox``,
in completion order. The client's single poller calls back when each pending task ends. What
to do with an item or a job is decided in ``_jobs`` and ``_admission``; where each job is, in
``_roster``; what is written down, in ``_ledger``; a worker's claims (issue 15), in ``_fleet``.

With a journal, every step is recorded before it is taken (see ``_journal``), so running the
same batch again resumes it: nothing is submitted twice and nothing is lost. With a download
directory, each completed job's files are fetched, verified and recorded before its outcome
is handed out; a JSONL manifest gets one line per finished job.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from collections.abc import AsyncIterable, Iterable
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.abc

from ._admission import SubmitScheduler, admit_job, require_balance
from ._api import Api, new_idempotency_key
from ._channel import Channel
from ._download import Cuts, Downloader
from ._errors import ApimartError, BatchStoppedError, JournalError, TaskTimeoutError
from ._fleet import Solo, fleet_for, unclaim
from ._interrupt import SigintHandler, announce_interrupt
from ._jobs import Conclusion, Job, ResumePlan, Stop, cut_off, file_stem, read_inputs, stop_after
from ._journal import JobRecord
from ._ledger import Ledger
from ._models import DownloadedFile, Task, VideoRequest
from ._outcomes import BatchStats, Failure, JobInput, Outbox, Reporter, Success, outcome_of
from ._pacing import Pacing, RateLimiter
from ._poller import Poller
from ._priors import kind_of
from ._references import MediaPolicy, References, has_local_refs
from ._roster import Roster
from ._transport import counting_into, request_tally
from ._upload_cache import cache_for

if TYPE_CHECKING:
    from ._options import BatchOptions

__all__ = ["MAX_UNREAD_OUTCOMES", "BatchRun"]

MAX_UNREAD_OUTCOMES = 10_000
"""Outcomes the caller has not read yet beyond which no new job is submitted (memory bound)."""


class BatchRun:
    """The machinery of one batch: a task group with the feeder, the submitters and the
    deadline; the poller's callbacks; the end of each job (files, journal, manifest); Ctrl-C.
    ``Batch`` is the caller's handle on it; ``roster`` keeps where each job is."""

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
        self.options = options
        self._api = api
        self._poller = poller
        self._downloader = downloader
        self._pacing = pacing
        self._requests = requests
        self.roster = Roster(SubmitScheduler.of(options, pacing.throttle), options.budget())
        #: This batch's own requests-per-second cap, in force while it runs.
        rps = options.requests_per_second
        self._limiter = RateLimiter(rps) if rps is not None else None
        self.download_dir, self.manifest_path = options.paths()
        priors = poller.schedule.priors  # issue 22: learned priors, kept in the journal
        self._ledger = Ledger.for_batch(
            options, self.manifest_path, priors=priors, on_fault=self.journal_fault
        )
        #: Local reference files (issue 18): checked when read, uploaded once by content.
        policy = MediaPolicy.of(options.media_root, allow_any_path=options.allow_any_path)
        self.refs = References(api, policy, wall=poller.wall)
        self.report = Reporter(options.on_event)
        self.interrupts = 0
        self._sigint = SigintHandler(self.on_sigint)
        self._records: dict[int, JobRecord] = {}
        self._fleet = Solo()  # issue 15: a Fleet when it is one of the batch's workers
        self.outbox = Outbox()  # public to the handle: ``unread()``
        self._feeding = True
        self._finished = False
        self._stop_reason: Stop | None = None
        self.stopped: str | None = None
        self._changed = anyio.Event()
        self._awaited = False  # whether it is (``_notify`` sets it only then: two calls less)
        self._tg: anyio.abc.TaskGroup | None = None
        self._started = 0.0
        self._ends_at = math.inf  # the batch deadline on anyio's clock
        self._floor = options.download_floor()
        self._cuts = Cuts()  # the downloads in flight, cut when a stop's grace is over
        #: This batch's own requests by kind (its tasks and its reads count them here).
        self._tally: collections.Counter[str] = collections.Counter()
        #: Admitted jobs for the submitters (issue 16: a Channel, not an anyio stream).
        self._to_submit: Channel[Job] = Channel()

    # -- context manager -----------------------------------------------------------------------

    async def enter(self) -> None:
        if self._tg is not None:
            raise RuntimeError("a Batch can be entered only once")
        self._api.ensure_open()  # raises ClientClosedError if the client is not open
        if self.options.check_balance:
            with counting_into(self._tally):
                require_balance(await self._api.balance(), self.roster.budget)
        self._records = await self._ledger.open()
        self.refs.attach(cache_for(self._ledger.journal))
        try:
            self._fleet = await fleet_for(self._ledger.journal, self)
            await self._enter()
        except BaseException:
            await self._ledger.close(keep_priors=False)  # exit will not run: close what it opened
            raise

    async def _enter(self) -> None:
        self.roster.carry_costs(self._records.values())
        self.outbox.open()
        # A pool of submitters (concurrency at most, not a task per job) takes admitted jobs.
        self._started = time.monotonic()
        self._ends_at = anyio.current_time() + (self.options.timeout or math.inf)
        if self._limiter is not None:
            self._pacing.add(self._limiter)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._feed, name="apimart-async batch feeder")
        tg.start_soon(self._fleet.heartbeats, name="apimart-async worker heartbeat")
        for _ in range(self.roster.sched.concurrency):
            tg.start_soon(self._submitter, name="apimart-async batch submitter")
        if self.options.sigint_grace is not None:
            self._sigint.install()
        if self.options.timeout is not None:
            tg.start_soon(self._deadline, self.options.timeout, name="apimart-async batch deadline")

    async def exit(self) -> None:
        self._sigint.remove()
        tg, self._tg = self._tg, None
        if not self._finished:
            self._stop(Stop.LEFT)
        for task_id in list(self.roster.pending):
            self._poller.unwatch(task_id, self._on_done)
        self.roster.left()
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            self._to_submit.close()
            if self._limiter is not None:
                self._pacing.remove(self._limiter)
            self.outbox.close_all()
            await self._fleet.close()
            await self._ledger.close()

    # -- Ctrl-C ----------------------------------------------------------------------------------

    def on_sigint(self) -> None:
        """First Ctrl-C: stop submitting and follow running tasks for ``sigint_grace`` s.
        Second: end the iteration now. The journal is consistent either way."""
        self.interrupts += 1
        tg = self._tg
        grace = self.options.sigint_grace if self.interrupts == 1 and tg is not None else None
        self._stop(Stop.INTERRUPTED, notify=False)
        announce_interrupt(running=self.roster.in_flight, grace=grace)
        if tg is not None and grace:
            tg.start_soon(functools.partial(self.stop, grace=grace))
            return
        self._unfollow_all()
        self._finished = True
        self.outbox.close()

    def stats(self) -> BatchStats:
        """The batch's counts now."""
        elapsed = (time.monotonic() - self._started) if self._started else 0.0
        return self.roster.stats(elapsed=elapsed, requests=dict(self._tally))

    async def next(self) -> Success | Failure:
        try:
            outcome = await self.outbox.get()
        except JournalError as exc:
            self._ledger.raised(exc)
            raise
        self._notify()
        return outcome

    async def stop(self, *, grace: float = 0.0) -> None:
        """Stop submitting now; keep following the tasks submitted (or being submitted) for up
        to ``grace`` seconds, then end the iteration. Unfinished jobs stay for a resume."""
        self._stop(Stop.CALLER)
        if grace > 0 and not self.roster.idle:
            self._notify()
            with anyio.move_on_after(grace):
                while not self.roster.idle:  # files being fetched too
                    await self._changed_wait()
        self._cuts.cut()  # a download still going stops: a resume fetches the rest
        self.roster.letting_go = True  # a submit still out: its task is left, not followed
        self._unfollow_all()
        self._maybe_close()

    # -- workers ---------------------------------------------------------------------------------

    def _notify(self) -> None:
        if self._awaited:
            self._awaited = False
            self._changed.set()

    async def _changed_wait(self, timeout: float = math.inf) -> None:
        self._changed, self._awaited = anyio.Event(), True  # a change before is not waited for
        with anyio.move_on_after(timeout):
            await self._changed.wait()

    async def _feed(self) -> None:
        request_tally.set((self._tally,))  # in this task: its requests are the batch's
        inputs = read_inputs(self._fleet.items(self._requests, self._records))  # issue 15
        intake = self.options.intake(self._records, downloads=self.download_dir is not None)
        try:
            while not self.stopped:
                try:
                    item = await inputs.__anext__()
                except StopAsyncIteration:
                    break
                index, item = unclaim(self.roster.read(), item)  # a worker's: its own index
                item, refused = await self.refs.prepare_item(index, item)  # local files
                if refused is not None:
                    self._refuse(refused)
                    continue
                take = intake.take(index, item)
                if take.refused is not None:
                    self._refuse(take.refused, carried=take.carried)
                    continue
                if take.plan is not None and not take.submits:
                    while self.outbox.replays_full and not self.stopped:
                        await self._changed_wait()  # a replay waits for the reader (next())
                    self._resume(take.plan)
                    continue
                index, request = take.index, take.request
                assert request is not None
                verdict = await self._admit(index, request)
                if verdict == "over" and self.roster.budget is not None:
                    self._refuse(take.not_admitted(self.roster.budget.exceeded(index)))
                    continue
                if verdict == "stopped":
                    why = f"job {index} not submitted: {self.stopped or 'stopped'}"
                    self._refuse(take.not_admitted(BatchStoppedError(why)))
                    break
                job = take.job(new_idempotency_key)
                self.roster.admitted(job)
                self._to_submit.put(job)
        except Exception as exc:  # noqa: BLE001 - the caller's iterable failed: re-raised to them
            self.outbox.error = exc
            self._stop(Stop.INPUT_FAILED, f"{exc!r}")
        finally:
            self._feeding = False
            self._to_submit.close()  # the submitters end once the queue is empty
            await inputs.aclose()
            self._maybe_close()

    def _resume(self, plan: ResumePlan) -> None:
        """Pick up a job recorded in an earlier run (see ``_jobs.resume_plan``): follow its
        task again, fetch its files, or hand its outcome out again."""
        job, task_id = plan.job, plan.task_id
        if plan.action == "reattach" and job is not None and task_id is not None:
            self.roster.reattached(job, task_id, self._poller.now())
            job.submitted_at = None  # submitted in an earlier run: no job_timeout here
            self._follow(task_id, job, reattach=True)
        elif plan.action == "refetch" and job and task_id is not None and plan.task is not None:
            assert self._tg is not None
            self.roster.refetching()
            self._tg.start_soon(self._finalize, job, task_id, plan.task)
        elif plan.action == "replay" and plan.outcome is not None and plan.ended is not None:
            self.roster.replayed(plan.ended)
            if self.options.replay_finished:
                self._emit(plan.outcome)

    async def _admit(self, index: int, request: VideoRequest) -> Literal["ok", "over", "stopped"]:
        """Wait until job ``index`` may be submitted (see ``_admission.admit_job``)."""
        while not self.stopped:
            backlog_full = self.outbox.unread >= MAX_UNREAD_OUTCOMES
            now = time.monotonic()
            sched, budget = self.roster.sched, self.roster.budget
            wait = admit_job(sched, budget, index, request, now, backlog_full=backlog_full)
            if wait == "over":
                return "over"
            if wait == 0.0:
                return "ok"
            await self._changed_wait(math.inf if wait is None else wait)
        return "stopped"

    async def _submitter(self) -> None:
        request_tally.set((self._tally,))  # in this task: its requests are the batch's
        async for job in self._to_submit:
            await self._submit(job)

    async def _submit(self, job: Job) -> None:
        try:
            sent = job.request  # local files -> uploaded URLs (a resend: those sent before)
            if has_local_refs(sent):  # else no coroutine (issue 16), nor without a journal:
                sent = await self.refs.materialize(sent, key=job.key, resend=job.journaled)
            if (ledger := self._ledger).journal is not None and not await ledger.before_submit(job):
                self.roster.taken_over(job)  # another worker's now (issue 15)
                self.let_go({job.index})
                return
            task_id = await self.refs.submit(job.request, sent, job.key)  # Api.submit, see there
        except ApimartError as exc:
            self.roster.submit_failed(job)
            outcome = outcome_of(
                job.index, job.request, error=exc, idempotency_key=job.key, name=job.name
            )
            # still submitting until its outcome is out: no other job closes the stream meanwhile
            await self._ledger.submit_failed(job, exc, outcome)
            self.roster.dropped(job)
            self._emit(outcome)
            self.report.step("errored", job.index, error=exc)
            what = f"job {job.index} could not be submitted: {exc}"
            if stop := stop_after(exc, stop_on_error=self.options.stop_on_error, what=what):
                self._stop(*stop)
            self._maybe_close()
            return
        if ledger.journal is not None:
            await ledger.submitted(job, task_id)
        self.roster.running(job, task_id, self._poller.now())
        self._notify()
        self.report.step("submitted", job.index, task_id=task_id)
        if self._tg is None or self._ledger.fault is not None or self.roster.letting_go:
            self.roster.confirmed(job)  # listed, not followed
            if self._ledger.fault is not None or self.roster.letting_go:
                self._unfollow_all()
                self._maybe_close()
            return
        if self._stop_reason is Stop.DEADLINE:
            self._on_done(task_id, TaskTimeoutError(task_id, self.options.timeout or 0.0))
            return
        self._follow(task_id, job, timeout=self.options.job_timeout)

    def let_go(self, indexes: set[int]) -> None:
        """Another worker took these jobs over (``_fleet``): no longer followed here."""
        for task_id, job in list(self.roster.pending.items()):
            if job.index in indexes:
                self._poller.unwatch(task_id, self._on_done)
                self.roster.ended(task_id)
        self._notify()  # their places are free: the feeder may admit another job
        self._maybe_close()

    def _unfollow_all(self) -> None:
        """Stop following every pending task (billed, running on: ``pending_task_ids()``)."""
        for task_id in list(self.roster.pending):
            self._poller.unwatch(task_id, self._on_done)
        self.roster.abandoned.extend(self.roster.pending)
        self.roster.pending.clear()

    def _follow(
        self, task_id: str, job: Job, *, reattach: bool = False, timeout: float | None = None
    ) -> None:
        """Have the poller follow a submitted job's task until it ends (``_on_done``)."""
        self._poller.watch(
            task_id, self._on_done, on_progress=self._on_progress, timeout=timeout,
            submitted_at=None if reattach else job.submitted_at, reattach=reattach,
            policy=self.options.poll,
            kind=kind_of(job.request),  # issue 22: learned priors by kind
            webhook=job.webhook,  # issue 15: a callback will come; polled as a fallback
        )  # fmt: skip

    async def _deadline(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        if self._finished:
            return
        self._stop(Stop.DEADLINE)
        for task_id in list(self.roster.pending):
            self._poller.unwatch(task_id, self._on_done)
            self._on_done(task_id, TaskTimeoutError(task_id, seconds))

    # -- callbacks from the poller ---------------------------------------------------------------

    def _on_progress(self, task: Task) -> None:
        job = self.roster.pending.get(task.id)
        if job is not None:
            self.report.step("progress", job.index, task_id=task.id, task=task)

    def _on_done(self, task_id: str, result: Task | ApimartError) -> None:
        job = self.roster.ended(task_id)
        if job is None:
            return
        # Decide about stopping now, before the feeder can admit another job.
        what = f"task {task_id} (job {job.index}) failed"
        if stop := stop_after(result, stop_on_error=self.options.stop_on_error, what=what):
            self._stop(*stop)
        self._notify()
        tg = self._tg
        if tg is None:
            return
        needs_io = self._ledger.keeps_records or (
            self.download_dir is not None and isinstance(result, Task) and result.ok
        )
        if not needs_io:  # nothing to record or fetch: hand it out now, no task needed
            self._publish(self.roster.conclude(job, task_id, result))
            self._maybe_close()
            return
        self.roster.finishing += 1
        tg.start_soon(self._finalize, job, task_id, result)

    async def _finalize(self, job: Job, task_id: str, result: Task | ApimartError) -> None:
        """Download, record and hand out one ended job."""
        request_tally.set((self._tally,))  # in this task: its requests are the batch's
        concluded = False
        try:
            files: tuple[DownloadedFile, ...] = ()
            download_error: ApimartError | None = None
            if isinstance(result, Task) and result.ok and self.download_dir is not None:
                await self._ledger.downloading(job, result)
                poller = self._poller
                since = None if job.submitted_at is None else job.submitted_at - poller.now()
                deadline = self.options.download_deadline(since, poller.time_scale, self._ends_at)
                with self._cuts.scope() as cut:
                    files, download_error = await self._downloader.task_files_by(
                        deadline,
                        result,
                        self.download_dir,
                        file_stem(job.index, job.name),
                        max_bytes=self.options.max_bytes,
                        floor=self._floor,
                    )
                if cut.cancelled_caught:  # a stop's grace is over: the part stays
                    download_error = cut_off(task_id)
            end = self.roster.conclude(job, task_id, result, files, download_error)
            concluded = True
            self._publish(end, here=await self._ledger.finished(job, end, files))
        except anyio.get_cancelled_exc_class():
            if not concluded:  # left mid-download: handed out (unread()), the journal keeps it
                end = self.roster.conclude(job, task_id, result, (), cut_off(task_id))
                await self._ledger.finished(job, end, ())  # shielded inside
                self._publish(end)
            raise
        finally:
            self.roster.finishing -= 1
            self._notify()  # a stop's grace may wait for it
            self._maybe_close()

    def _publish(self, end: Conclusion, *, here: bool = True) -> None:
        if here:
            self._emit(end.outcome)
            if self.report.on_event is not None:  # else no event is made
                self.report(end.event)
        else:  # another worker ended it first (issue 15): that one hands it out
            self.roster.uncount(end)

    def _refuse(self, outcome: Success | Failure, *, carried: float = 0.0) -> None:
        """Hand out the outcome of a job that ended before any submit."""
        self.roster.refused(carried)
        self._emit(outcome)

    def _emit(self, outcome: Success | Failure) -> None:
        self.outbox.put(outcome)
        self._notify()

    def _stop(self, reason: Stop, detail: str | None = None, *, notify: bool = True) -> None:
        """Stop submitting, for ``reason`` (the first reason given stays)."""
        if self._stop_reason is None:
            self._stop_reason = reason
            self.stopped = reason.describe(detail)
        if notify:
            self._notify()

    def _maybe_close(self) -> None:
        if not self._feeding and self.roster.idle:
            self._finished = True
            if self._ledger.fault is not None and self.outbox.error is None:
                self.outbox.error = self.journal_error()
            self.outbox.close()

    def journal_fault(self, fault: JournalError) -> None:
        """The journal could not record a step (``Ledger.fault``): stop submitting and following
        the tasks (``pending_task_ids()``); end with ``journal_error()`` once all is out."""
        self._stop(Stop.JOURNAL_FAILED, str(fault))
        self._unfollow_all()
        self._maybe_close()

    def journal_error(self) -> JournalError | None:
        """The error that ends a batch whose journal failed, naming the tasks left running
        (None if the journal did not fail, or once the error reached the caller)."""
        left = [*self.roster.abandoned, *(j.key for j in self.roster.unconfirmed)]
        return self._ledger.batch_error(left, final=self._finished)

"""Many workers, one batch (issue 15, part 2): one worker's claim loop.

A batch whose job list is stored in a PostgreSQL journal (``PostgresJournal(...,
fingerprints=...)``, as the CLI opens it) is run by every process that runs it, at once,
each a worker. ``Fleet`` is one worker's side, made of small callables (``_pg_claims.Claims``
gives them; the unit tests give fakes):

- ``items`` feeds the batch only the jobs this worker claimed, a chunk at a time, as the
  batch asks for them (its admission holds the feeder back, so a worker never holds much more
  than it can run). Before a claimed job is fed, what the journal holds of it now is read
  again: a job another worker left with a task id is re-attached, one with only a key is
  resubmitted with that same key (``_jobs.resume_plan``). With nothing to claim, it waits
  while other workers hold jobs that are not done (their leases may run out: then it takes
  them over), and ends when no job is left but its own.
- ``heartbeats`` renews this worker's leases every third of ``lease``; a job missing from the
  answer was taken over by another worker (its lease had run out): ``let_go`` tells the batch
  to stop following it, and this worker writes nothing more of it. Jobs that ended here are
  let go at the next heartbeat; one that ended without being done (its files could not be
  fetched, its submit may have made a task) is not taken again by this worker (another may).
- ``close`` lets go of every job still held, so others take them at once.

The journal's ``done`` state is the single truth: a worker never writes over a job another
ended (``PostgresJournal`` guards its writes).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import anyio
import attrs

from ._errors import FieldError, JournalError, ValidationError
from ._journal import JobRecord
from ._outcomes import BatchEvent, Reporter

if TYPE_CHECKING:
    from ._options import BatchOptions
    from ._pg_claims import Claims

__all__ = ["Claimed", "Fleet", "Solo", "fleet_for", "unclaim"]

#: Events that say a job ended in this worker.
_ENDS = ("completed", "failed", "errored")


@attrs.frozen
class Claimed:
    """An input item this worker claimed, with its index in the batch's list."""

    index: int
    item: object


class Solo:
    """A batch run by one process: fed its whole input, nothing to renew or let go."""

    def items(
        self, requests: Iterable[object] | AsyncIterable[object], known: dict[int, JobRecord]
    ) -> Iterable[object] | AsyncIterable[object]:
        """The input items to feed: all of them."""
        return requests

    async def heartbeats(self) -> None:
        """Nothing to renew."""

    async def close(self) -> None:
        """Nothing to let go."""


class Fleet(Solo):
    """One worker of a batch run by several (see the module doc)."""

    def __init__(
        self,
        *,
        claim: Callable[[int, set[int]], Awaitable[list[int]]],
        beat: Callable[[], Awaitable[set[int]]],
        outstanding: Callable[[set[int]], Awaitable[int]],
        records: Callable[[list[int]], Awaitable[dict[int, JobRecord]]],
        release: Callable[[set[int]], Awaitable[None]],
        lease: float,
        chunk: int = 8,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._claim = claim
        self._beat = beat
        self._outstanding = outstanding
        self._records = records
        self._release = release
        self._sleep = sleep
        self.lease = lease
        self.chunk = chunk
        self.held: set[int] = set()
        """The jobs this worker holds (as far as it knows: a heartbeat may say otherwise)."""
        self.tried: set[int] = set()
        """The jobs that ended in this worker: never claimed by it again."""
        self.fed: set[int] = set()
        """The jobs fed to the batch here: never fed twice (a lease of this worker that ran
        out while it was slow is not claimed back by it, but renewed; a job taken over from
        it is left to the others: its submit or download here may still be under way)."""
        self.taken_over = 0
        """Jobs other workers took from this one (its lease had run out)."""
        self.claimed = 0
        """Jobs this worker claimed."""
        self._ended: set[int] = set()
        self.let_go: Callable[[set[int]], None] = lambda indexes: None
        """Told which jobs were taken over (the batch stops following them)."""
        self.fault: Callable[[JournalError], None] = lambda exc: None
        """Told when the heartbeat cannot reach the journal (the batch stops)."""
        self.given_back: Callable[[], set[int]] = set
        """The jobs given back since last asked (the fleet was full of a dead worker's jobs:
        ``Claims.admits``), to let go and claim again."""

    @property
    def interval(self) -> float:
        """Seconds between two heartbeats (a third of the lease)."""
        return self.lease / 3

    def items(
        self, requests: Iterable[object] | AsyncIterable[object], known: dict[int, JobRecord]
    ) -> AsyncIterable[object]:
        """The items of the jobs this worker claims, as ``Claimed``; ``known`` (the batch's
        records, by index) is brought up to date for each before it is fed. The requests
        must be a list (a sequence): a worker reads the job it claims by its index."""
        if not isinstance(requests, Sequence):
            rule = "must be a list (a sequence) when the batch is run by workers (fingerprints=)"
            raise ValidationError([FieldError("requests", rule, type(requests).__name__)])
        return self._claimed(requests, known)

    async def _claimed(
        self, items: Sequence[object], known: dict[int, JobRecord]
    ) -> AsyncGenerator[object, None]:
        while True:
            if back := self.given_back():  # given back before their submit: claimable again
                await self._release(back)
                self.fed -= back
                self.held -= back
            got = [i for i in await self._claim(self.chunk, set(self.fed)) if i < len(items)]
            if not got:
                if not await self._outstanding(self.fed | self.held):
                    return
                await self._sleep(min(self.interval, 1.0))  # a lease may run out meanwhile
                continue
            self.claimed += len(got)
            self.held.update(got)
            fresh = await self._records(got)
            for index in got:
                record = fresh.get(index)
                if record is None:
                    known.pop(index, None)
                else:
                    known[index] = record
            for index in got:
                if index in self.held and index not in self.fed:  # not taken over meanwhile
                    self.fed.add(index)
                    yield Claimed(index, items[index])

    def observe(
        self, on_event: Callable[[BatchEvent], None] | None
    ) -> Callable[[BatchEvent], None]:
        """``on_event``, also noting which jobs end here (let go at the next heartbeat)."""

        def seen(event: BatchEvent) -> None:
            if event.kind in _ENDS:
                self._ended.add(event.index)
            if on_event is not None:
                on_event(event)

        return seen

    async def beat_once(self) -> None:
        """Let go of the jobs that ended here, renew the others' leases, and let the batch
        drop those taken over."""
        ended, self._ended = self._ended, set()
        if ended:
            self.tried |= ended
            self.held -= ended
            await self._release(ended)
        renewed = await self._beat()
        lost = self.held - renewed
        if lost:
            self.held -= lost
            self.taken_over += len(lost)
            self.let_go(lost)

    async def heartbeats(self) -> None:
        """``beat_once`` every ``interval`` seconds, until cancelled; a journal out of reach
        for longer than it waits is the batch's ``fault``."""
        while True:
            await self._sleep(self.interval)
            try:
                await self.beat_once()
            except JournalError as exc:
                self.fault(exc)
                return

    async def close(self) -> None:
        """Let go of every job still held (others may take them at once)."""
        held = self.held | self._ended
        self.held, self._ended = set(), set()
        with anyio.CancelScope(shield=True):
            if held:
                await self._release(held)


class _ClaimsFleet(Fleet):
    """A ``Fleet`` on ``Claims`` (closing them with it)."""

    def __init__(self, claims: Claims, *, chunk: int) -> None:
        async def claim(n: int, exclude: set[int]) -> list[int]:
            return [c.index for c in await claims.claim(n, exclude=exclude)]

        async def outstanding(exclude: set[int]) -> int:
            return await claims.outstanding(exclude=exclude)

        async def release(indexes: set[int]) -> None:
            await claims.release(indexes)

        super().__init__(
            claim=claim,
            beat=claims.beat,
            outstanding=outstanding,
            records=claims.records,
            release=release,
            lease=claims.lease,
            chunk=chunk,
        )
        self.claims = claims

        def given_back() -> set[int]:
            back, claims.given_back = claims.given_back, set()
            return back

        self.given_back = given_back
        claims.not_mine = lambda: self.fed

    async def close(self) -> None:
        try:
            await super().close()
        except JournalError:  # out of reach: the leases run out instead
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await self.claims.close()


class _Run(Protocol):
    """What ``fleet_for`` needs of the batch (``_batch.BatchRun``)."""

    options: BatchOptions
    report: Reporter

    def let_go(self, indexes: set[int]) -> None: ...

    def journal_fault(self, fault: JournalError) -> None: ...


async def fleet_for(journal: object, run: _Run) -> Solo:
    """This worker's ``Fleet`` when ``journal`` is a PostgreSQL journal run by workers (its
    job list stored), joined to the batch and tied to ``run``; else a ``Solo``."""
    from ._pg_journal import PostgresJournal

    if not isinstance(journal, PostgresJournal) or not journal.shared:
        return Solo()
    from ._pg_claims import Claims

    options = run.options
    claims = Claims(journal, lease=options.lease)
    claims.limit(max_pending=options.max_pending, max_cost=options.max_cost)
    try:
        await claims.join()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await claims.close()
        raise
    # a chunk of what it may run at once: no more claimed than submitted soon (issue 15)
    max_pending = claims.fleet_limits[0]  # the batch's: the strictest of its workers'
    chunk = min(options.concurrency, max_pending or options.concurrency, 32)
    fleet = _ClaimsFleet(claims, chunk=max(1, chunk))
    fleet.let_go, fleet.fault = run.let_go, run.journal_fault
    run.report.on_event = fleet.observe(run.report.on_event)
    return fleet


def unclaim(index: int, item: object) -> tuple[int, object]:
    """An input item and its index: a claimed one's own (a worker is fed some jobs of the
    list), else ``index`` (the next one read)."""
    if isinstance(item, Claimed):
        return item.index, item.item
    return index, item

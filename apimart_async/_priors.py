"""What finished tasks of a kind teach the poll schedule (issue 22): logic only, no I/O.

A kind is what makes tasks take alike: model, clip duration, resolution, and whether the job
has references (images or videos). For each kind, completed tasks teach:

- how long such tasks take (seconds from submit to end), and
- how far the service's ``estimated_time`` can be trusted: the range of
  ``duration / estimated_time``;
- how far its ``progress`` can be trusted (issue 11): a check that sees progress p at age a
  implies an end between ``a*100/(p+1)`` and ``a*100/p`` if progress moves in a straight line;
  the kind learns how far real ends fell outside that (``KindPrior.progress_lo``). Straight
  progress keeps the window at the rounding's width; uneven progress makes it wide, and then it
  is not used.

A task's end lies between the last check that saw it running and the first that saw it done;
the end the last running check's progress implied, held between the two, is what is learned
when they were at most ``WIDE`` of its age apart (exact for straight progress); without
progress, the midpoint when they were close (``NARROW``); when they were
far apart, a range that must be wider (the task ended before the earliest end learned, or ran
past the latest) is widened to the bound that proves it. A task its first check found done is no
sample (nothing bounds it from below); it only lowers the kind's shortest duration to half its
age then. After ``min_samples`` tasks of a kind the schedule uses what
was learned, widened on each side by the range divided by the samples (the expected gap between
the extremes of a sample and those of the whole population):

- no first check ``first_check`` seconds after the submit: the first check is at the
  earliest end seen for the kind (it learns ``estimated_time`` then);
- the window of plausible ends is ``estimated_time`` times the learned range instead of the
  policy's ``estimate_margin`` either way; a ratio far outside the range (``OUTLIER``, an
  absurd ``estimated_time``) is set aside rather than learned;
- after ``min_samples`` tasks that reported progress (``Priors.progress_trust``), the window
  the last progress implies (widened by what was learned) is used when it is the narrower one
  (and while no task in flight shows progress that is not straight: ``_poll_schedule``).

A batch with a journal loads the kinds' priors when it starts and stores them when it ends
(``SqliteJournal`` table ``priors``: durations and estimate ratios since schema 3, progress
trust since schema 4), so the next run starts from them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = ["MIN_SAMPLES", "KindPrior", "Priors", "Usable", "kind_of"]

#: Completed tasks of a kind before what they taught is used.
MIN_SAMPLES: Final = 20
#: A sample: a task whose last running and first done checks were at most this fraction of
#: its age apart.
NARROW: Final = 0.1
#: ... or at most this fraction apart when the last running check reported progress: the end
#: it implied, held within the two checks, is then the sample.
WIDE: Final = 0.5
#: A ratio ``duration / estimated_time`` this many times beyond the kind's range is the
#: estimate's slip (an absurd ``estimated_time``), not the kind's: it does not widen the range,
#: for at most one sample in ten (more of them are a shift, and are learned).
OUTLIER: Final = 4.0


def kind_of(request: Any) -> str:
    """The kind of a ``VideoRequest``: ``model/duration/resolution/refs|text``."""
    refs = bool(getattr(request, "image_urls", ()) or getattr(request, "video_urls", ()))
    duration = getattr(request, "duration", None)
    resolution = getattr(request, "resolution", None)
    return (
        f"{request.model}/{'' if duration is None else duration}/{resolution or ''}/"
        f"{'refs' if refs else 'text'}"
    )


@attrs.define(slots=True)
class KindPrior:
    """What the completed tasks of one kind showed (seconds; ratios of duration to estimate)."""

    samples: int = 0
    duration_lo: float = math.inf
    duration_hi: float = 0.0
    ratio_lo: float | None = None
    ratio_hi: float | None = None
    #: Progress trust: samples that reported progress, and how far the end progress implied
    #: held. A check that sees progress p (0 < p < 100) at age a implies an end between
    #: ``floor = a*100/(p+1)`` and ``ceiling = a*100/p`` if progress moves in a straight line;
    #: ``progress_lo`` is the least ``duration / floor`` and ``progress_hi`` the most ``duration
    #: / ceiling`` seen, so that a check's window is ``floor * progress_lo .. ceiling *
    #: progress_hi``. Straight progress keeps both near 1 (the window is the rounding's).
    progress_samples: int = 0
    progress_lo: float | None = None
    progress_hi: float | None = None
    #: Ratios set aside as the estimate's slip (``OUTLIER``); not stored in the journal.
    ratio_outliers: int = 0

    def slipped(self, ratio: float) -> bool:
        """Whether ``ratio`` is an estimate's slip, set aside (and counted as one): far beyond
        the range of a kind that has ``MIN_SAMPLES``, and fewer than one sample in ten so."""
        lo, hi = self.ratio_lo, self.ratio_hi
        if lo is None or hi is None or self.samples < MIN_SAMPLES:
            return False
        if lo / OUTLIER <= ratio <= hi * OUTLIER:
            return False
        if self.ratio_outliers >= max(1, self.samples // 10):
            return False  # the estimates changed: learn it
        self.ratio_outliers += 1
        return True

    def add(
        self,
        duration: float,
        estimate: float | None,
        extrapolated: tuple[float, float] | None = None,
    ) -> None:
        self.samples += 1
        self.duration_lo = min(self.duration_lo, duration)
        self.duration_hi = max(self.duration_hi, duration)
        if estimate is not None and estimate > 0 and not self.slipped(duration / estimate):
            ratio = duration / estimate
            self.ratio_lo = ratio if self.ratio_lo is None else min(self.ratio_lo, ratio)
            self.ratio_hi = ratio if self.ratio_hi is None else max(self.ratio_hi, ratio)
        if extrapolated is not None:
            self.add_progress(duration, extrapolated)

    def add_progress(self, duration: float, extrapolated: tuple[float, float]) -> None:
        """A progress sample: the task took ``duration``; ``extrapolated``: the least ceiling
        and the greatest floor its checks' progress implied (see ``progress_lo``)."""
        shortest, longest = extrapolated
        self.progress_samples += 1
        lo, hi = duration / longest, duration / shortest
        self.progress_lo = lo if self.progress_lo is None else min(self.progress_lo, lo)
        self.progress_hi = hi if self.progress_hi is None else max(self.progress_hi, hi)

    def merged(self, other: KindPrior) -> KindPrior:
        """Both: extremes of both; samples, the larger (merging the same store twice counts
        it once)."""

        def lo(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else min(a, b)

        def hi(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else max(a, b)

        return KindPrior(
            samples=max(self.samples, other.samples),
            duration_lo=min(self.duration_lo, other.duration_lo),
            duration_hi=max(self.duration_hi, other.duration_hi),
            ratio_lo=lo(self.ratio_lo, other.ratio_lo),
            ratio_hi=hi(self.ratio_hi, other.ratio_hi),
            progress_samples=max(self.progress_samples, other.progress_samples),
            progress_lo=lo(self.progress_lo, other.progress_lo),
            progress_hi=hi(self.progress_hi, other.progress_hi),
        )

    def durations(self) -> tuple[float, float]:
        """The plausible durations of the kind, widened (see the module docstring)."""
        pad = (self.duration_hi - self.duration_lo) / max(1, self.samples)
        return max(0.0, self.duration_lo - pad), self.duration_hi + pad

    def ratios(self) -> tuple[float, float] | None:
        """The plausible ``duration / estimated_time``, widened; None without estimates."""
        if self.ratio_lo is None or self.ratio_hi is None:
            return None
        pad = (self.ratio_hi - self.ratio_lo) / max(1, self.samples)
        return max(0.0, self.ratio_lo - pad), self.ratio_hi + pad

    def progress_ratios(self, min_samples: int = 1) -> tuple[float, float] | None:
        """The plausible ``duration / extrapolated`` (see ``progress_lo``), widened; None
        before ``min_samples`` tasks with progress taught it."""
        if self.progress_lo is None or self.progress_hi is None:
            return None
        if self.progress_samples < min_samples:
            return None
        pad = abs(self.progress_hi - self.progress_lo) / max(1, self.progress_samples)
        return max(0.0, self.progress_lo - pad), self.progress_hi + pad


#: What a kind offers the schedule: its prior (None before ``min_samples``), the prior's
#: ``ratios()``, and its progress trust (``Priors.progress_trust``).
Usable = tuple[KindPrior | None, tuple[float, float] | None, tuple[float, float] | None]


class Priors:
    """The priors of every kind a client has seen finish (see the module docstring). The
    ``KindPrior`` objects it holds change only through ``observe`` and ``merge``: what it
    derives from them is remembered until then (or until ``min_samples`` changes)."""

    def __init__(self, *, min_samples: int = MIN_SAMPLES) -> None:
        self._min_samples = min_samples
        self._kinds: dict[str, KindPrior] = {}
        #: ``usable`` by kind, as of the last change (``observe`` and ``merge`` clear it).
        self._usable: dict[str | None, Usable] = {}

    @property
    def min_samples(self) -> int:
        """Completed tasks of a kind before what they taught is used."""
        return self._min_samples

    @min_samples.setter
    def min_samples(self, value: int) -> None:
        self._min_samples = value
        self._usable.clear()

    def __len__(self) -> int:
        return len(self._kinds)

    def __repr__(self) -> str:
        return f"<Priors kinds={len(self._kinds)}>"

    def observe(
        self,
        kind: str,
        *,
        seen_running: float | None,
        seen_done: float,
        estimate: float | None,
        extrapolated: tuple[float, float] | None = None,
        implied: float | None = None,
    ) -> None:
        """A task of ``kind`` completed: last seen running ``seen_running`` seconds after its
        start (None: its first check already found it done), first seen done ``seen_done``
        seconds after it; ``estimate``: its last ``estimated_time`` (None if none);
        ``extrapolated``: the least ceiling and the greatest floor of the ends its progress
        reports implied (see ``KindPrior.progress_lo``; None if it reported none);
        ``implied``: the end the last check that saw it running implied (None if that check
        had no progress)."""
        if not (0 <= (seen_running or 0.0) <= seen_done and math.isfinite(seen_done)):
            return
        self._usable.clear()
        prior = self._kinds.get(kind)
        if seen_running is None:
            # It ended before its first check: it says only that such tasks can be that short
            # (the first check of the kind comes earlier from now on); it is no sample.
            if prior is not None:
                prior.duration_lo = min(prior.duration_lo, seen_done / 2)
            return
        if prior is None:
            prior = self._kinds[kind] = KindPrior()
        mid = (seen_running + seen_done) / 2
        if extrapolated is not None and not (extrapolated[0] > 0 and extrapolated[1] > 0):
            extrapolated = None
        gap = seen_done - seen_running
        end = mid
        has_implied = implied is not None and math.isfinite(implied)
        if implied is not None and has_implied:
            # the end the last progress implied, within what the checks prove: exact for
            # progress in a straight line, never further off than the two checks are apart
            end = min(max(implied, seen_running), seen_done)
        # progress trust learns from the end progress implied (for progress that proves
        # uneven, that end may be off by up to the gap, and the range comes out wide, as it
        # should); durations and estimates learn from the midpoint, which assumes nothing
        progress_sample = extrapolated is not None and has_implied and gap <= WIDE * mid
        if progress_sample and extrapolated is not None:
            prior.add_progress(end, extrapolated)
        if gap <= NARROW * mid:
            prior.add(mid, estimate)
            if extrapolated is not None and not has_implied:
                prior.add_progress(mid, extrapolated)
            return
        # Checks far apart (before the window): the midpoint may be far off, so only the
        # bound that proves the range too narrow moves it, and only as far as that bound.
        prior.duration_lo = min(prior.duration_lo, seen_done)
        prior.duration_hi = max(prior.duration_hi, seen_running)
        if estimate is not None and estimate > 0:
            if prior.ratio_lo is not None and not prior.slipped(seen_done / estimate):
                prior.ratio_lo = min(prior.ratio_lo, seen_done / estimate)
            if prior.ratio_hi is not None and not prior.slipped(seen_running / estimate):
                prior.ratio_hi = max(prior.ratio_hi, seen_running / estimate)
        if extrapolated is not None and not progress_sample:
            shortest, longest = extrapolated
            if prior.progress_lo is not None:
                prior.progress_lo = min(prior.progress_lo, seen_done / longest)
            if prior.progress_hi is not None:
                prior.progress_hi = max(prior.progress_hi, seen_running / shortest)

    def usable(self, kind: str | None) -> Usable:
        """``(get(kind), its ratios(), progress_trust(kind))``, remembered until the next
        ``observe`` or ``merge`` (the poll schedule asks at every check)."""
        found = self._usable.get(kind)
        if found is None:
            prior = self.get(kind)
            ratios = None if prior is None else prior.ratios()
            found = self._usable[kind] = (prior, ratios, self.progress_trust(kind))
        return found

    def get(self, kind: str | None) -> KindPrior | None:
        """The prior of ``kind`` once it has ``min_samples`` tasks, else None."""
        if kind is None:
            return None
        prior = self._kinds.get(kind)
        return prior if prior is not None and prior.samples >= self.min_samples else None

    def progress_trust(self, kind: str | None) -> tuple[float, float] | None:
        """The range of ``duration / extrapolated`` the kind's progress earned once
        ``min_samples`` tasks with progress taught it (``KindPrior.progress_ratios``), else
        None."""
        prior = None if kind is None else self._kinds.get(kind)
        return None if prior is None else prior.progress_ratios(self.min_samples)

    def export(self) -> dict[str, KindPrior]:
        """Every kind's prior (copies), for a store."""
        return {k: attrs.evolve(v) for k, v in self._kinds.items()}

    def merge(self, priors: Mapping[str, KindPrior]) -> None:
        """Take in priors from a store (an earlier run)."""
        self._usable.clear()
        for kind, prior in priors.items():
            mine = self._kinds.get(kind)
            self._kinds[kind] = attrs.evolve(prior) if mine is None else mine.merged(prior)

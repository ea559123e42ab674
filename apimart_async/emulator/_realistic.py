"""The ``realistic`` profile: jobs and replies as a user's machine sees the real service.

``Emulator(profile="realistic")`` (``--profile realistic``), or a ``RealisticProfile`` with
other numbers, changes three things against the default profile:

- **durations per model and length**: each task draws its duration from the range of the most
  specific entry of ``durations`` that matches it (``"sora-2:12"`` for a 12 s sora-2 clip,
  else ``"sora-2"`` for any sora-2 model, else ``default_duration``);
- **estimated_time** is the true duration times ``1 +/- estimate_error`` (uniform; default
  25 %), rounded to whole seconds;
- **uneven progress**: a slow start (``queued`` share of the time at 0 %, as ``submitted`` then
  ``pending``), then a curve that lags behind elapsed time (an exponent drawn per task), with
  noise and plateaus, capped below 100 until the end, where it jumps to 100. Progress never
  goes backwards;
- **a round trip** added to every reply: ``rtt`` seconds, jittered by ``+/- rtt_jitter`` (a
  fraction), as an aiohttp middleware.

Every draw comes from the emulator's seed: the same seed and the same order of submits give the
same tasks. ``time_scale`` compresses the emulator's clock (see ``Clock``); the round trip is
compressed with it, so it stays ``rtt`` seconds of the emulator's time.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import attrs
from aiohttp import web

__all__ = ["DEFAULT_DURATIONS", "PROFILES", "Curve", "RealisticProfile", "RttMiddleware"]

PROFILES: Final = ("default", "realistic")

#: Seconds per model family (prefix of the model name), optionally ``:clip length``.
DEFAULT_DURATIONS: Final[Mapping[str, tuple[float, float]]] = {
    "sora-2": (60.0, 240.0),
    "viduq3": (30.0, 120.0),
    "veo3": (45.0, 180.0),
    "kling": (60.0, 180.0),
}


def _range(_: object, attribute: attrs.Attribute[Any], value: tuple[float, float]) -> None:
    low, high = value
    if not (0 < low <= high and math.isfinite(high)):
        raise ValueError(f"{attribute.name} must be 0 < low <= high seconds, got {value!r}")


def _durations(
    _: object, attribute: attrs.Attribute[Any], value: Mapping[str, tuple[float, float]]
) -> None:
    for key, rng in value.items():
        low, high = rng
        if not (0 < low <= high and math.isfinite(high)):
            raise ValueError(f"durations[{key!r}] must be 0 < low <= high seconds, got {rng!r}")


def _unit(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (0 <= value < 1):
        raise ValueError(f"{attribute.name} must be in [0, 1), got {value!r}")


def _non_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be >= 0 seconds, got {value!r}")


@attrs.frozen(kw_only=True)
class Curve:
    """One task's progress over its life: piecewise linear through ``(age, percent)`` knots,
    non-decreasing, below 100 until ``duration``."""

    duration: float
    """Seconds from submit to the end (emulator time)."""
    queued: float
    """Share of the duration spent queued (``submitted`` for the first third of it)."""
    ages: tuple[float, ...]
    """The knots' ages, in seconds since submit, increasing."""
    values: tuple[float, ...]
    """The knots' percentages, non-decreasing, each below 100."""

    def progress(self, age: float) -> int:
        """The percentage shown ``age`` seconds after submit (100 from ``duration`` on)."""
        if age >= self.duration:
            return 100
        i = bisect.bisect_right(self.ages, age)
        if i <= 0:
            return 0
        if i >= len(self.ages):
            return int(self.values[-1])
        a0, a1 = self.ages[i - 1], self.ages[i]
        v0, v1 = self.values[i - 1], self.values[i]
        frac = 0.0 if a1 <= a0 else (age - a0) / (a1 - a0)
        return int(v0 + (v1 - v0) * frac)

    def status(self, age: float) -> tuple[str, int]:
        """(status, progress) at ``age`` seconds (``completed`` from ``duration`` on)."""
        duration = self.duration
        if age >= duration:
            return "completed", 100
        start = self.queued * duration
        if age < start / 3:
            return "submitted", 0
        if age < start:
            return "pending", 0
        # ``progress(age)``, inline (a simulator asks this millions of times)
        ages = self.ages
        i = bisect.bisect_right(ages, age)
        if i <= 0:
            return "processing", 0
        values = self.values
        if i >= len(ages):
            return "processing", int(values[-1])
        a0, a1 = ages[i - 1], ages[i]
        v0 = values[i - 1]
        frac = 0.0 if a1 <= a0 else (age - a0) / (a1 - a0)
        return "processing", int(v0 + (values[i] - v0) * frac)


@attrs.frozen(kw_only=True)
class RealisticProfile:
    """The numbers of the ``realistic`` profile (see the module docstring)."""

    durations: Mapping[str, tuple[float, float]] = attrs.field(
        factory=lambda: dict(DEFAULT_DURATIONS), validator=_durations
    )
    """Seconds (low, high) per model family, optionally ``"family:clip seconds"``."""
    default_duration: tuple[float, float] = attrs.field(default=(60.0, 120.0), validator=_range)
    """Seconds (low, high) for a model no entry of ``durations`` matches."""
    estimate_error: float = attrs.field(default=0.25, validator=_unit)
    """``estimated_time`` is the true duration times ``1 +/- this`` (uniform)."""
    queued: tuple[float, float] = (0.05, 0.25)
    """Share of the duration at 0 % before work starts, drawn per task."""
    exponent: tuple[float, float] = (1.0, 1.8)
    """Progress follows ``u ** exponent`` of the working time: > 1 lags early."""
    plateau_chance: float = attrs.field(default=0.2, validator=_unit)
    """Per knot of the curve: the chance that progress holds still."""
    noise: float = 4.0
    """Per knot: the standard deviation of the noise, in percentage points."""
    cap: tuple[float, float] = (85.0, 99.0)
    """Progress stops rising at this level (drawn per task) until the end, then jumps to 100."""
    knots: int = 24
    """Points of each progress curve."""
    rtt: float = attrs.field(default=0.2, validator=_non_negative)
    """Seconds of round trip added to every reply (0: none)."""
    rtt_jitter: float = attrs.field(default=0.5, validator=_unit)
    """The round trip is ``rtt`` times ``1 +/- this`` (uniform)."""

    def duration_range(self, model: str, length: object = None) -> tuple[float, float]:
        """The range for ``model`` (and clip ``length`` in seconds, if any)."""
        best: tuple[int, tuple[float, float]] | None = None
        for key, rng in self.durations.items():
            family, sep, clip = key.partition(":")
            if not model.startswith(family):
                continue
            if sep and str(length) != clip:
                continue
            score = len(family) * 2 + (1 if sep else 0)
            if best is None or score > best[0]:
                best = (score, rng)
        return best[1] if best is not None else self.default_duration

    def draw(
        self, rng: random.Random, model: str, length: object = None
    ) -> tuple[float, int, Curve]:
        """(duration, estimated_time, curve) of a new task."""
        low, high = self.duration_range(model, length)
        duration = rng.uniform(low, high)
        err = self.estimate_error
        estimate = max(1, round(duration * rng.uniform(1 - err, 1 + err)))
        return duration, estimate, self.curve(rng, duration)

    def curve(self, rng: random.Random, duration: float) -> Curve:
        """A progress curve for a task of ``duration`` seconds."""
        queued = rng.uniform(*self.queued)
        exponent = rng.uniform(*self.exponent)
        cap = rng.uniform(*self.cap)
        start = queued * duration
        work = duration - start
        ages = [start]
        values = [0.0]
        n = max(2, self.knots)
        # Each draw and each value as ``rng.uniform(-0.3, 0.3)``, ``min`` and ``max`` give
        # them, spelled out (a simulator draws 100,000 curves): ``uniform(a, b)`` is
        # ``a + (b - a) * random()``; ``max(a, b)`` is ``b if b > a else a``; ``min(a, b)``
        # is ``b if b < a else a``.
        random_, gauss, plateau, noise = rng.random, rng.gauss, self.plateau_chance, self.noise
        spread = 0.3 - -0.3
        age = start
        value = 0.0
        for k in range(1, n):
            u = k / n
            x = u + (-0.3 + spread * random_()) / n
            x = x if x > 0.0 else 0.0
            x = x if x < 1.0 else 1.0
            at = start + work * x
            age = at if at > age else age
            if random_() < plateau:
                drawn = value
            else:
                drawn = 100.0 * u**exponent + gauss(0.0, noise)
            drawn = drawn if drawn > value else value
            value = drawn if drawn < cap else cap
            values.append(value)
            ages.append(age)
        return Curve(duration=duration, queued=queued, ages=tuple(ages), values=tuple(values))

    def round_trip(self, rng: random.Random) -> float:
        """One round trip, in seconds of the emulator's time."""
        j = self.rtt_jitter
        return self.rtt * rng.uniform(1 - j, 1 + j)


class RttMiddleware:
    """Holds every reply for one jittered round trip of the emulator's time (``/_emulator``
    admin routes excepted). Real seconds are the round trip divided by the clock's scale."""

    def __init__(self, profile: RealisticProfile, seed: int, scale: Callable[[], float]) -> None:
        self.profile = profile
        """The profile whose ``rtt`` and ``rtt_jitter`` each reply is held for."""
        self._random = random.Random(seed ^ 0x5EED)
        self._scale = scale
        self.replies: int = 0
        """Replies held so far."""
        self.added: float = 0.0
        """Emulator seconds added to those replies in all."""

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """The aiohttp middleware: half the round trip before the handler, half after."""
        if request.path.startswith("/_"):
            return await handler(request)
        delay = self.profile.round_trip(self._random)
        self.replies += 1
        self.added += delay
        # Half on the way in, half on the way out: the state is read mid-trip, as it is.
        await asyncio.sleep(delay / 2 / self._scale())
        resp = await handler(request)
        await asyncio.sleep(delay / 2 / self._scale())
        return resp

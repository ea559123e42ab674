"""A faithful local emulator of the APIMart video API, for tests, demos and benchmarks.

It needs no key and no network: ``async with Emulator() as emu:`` listens on a free loopback
port and exposes ``emu.base_url`` and ``emu.api_key``. It runs standalone as
``python -m apimart_async.emulator --port 8000``.

It knows nothing of the SDK's internals: its validation rules and reply shapes are written
from apimart-api.md alone, so the SDK is tested against an independent implementation.
"""

from ._faults import ENDPOINTS as _ENDPOINTS
from ._faults import Fault, FaultPlan
from ._realistic import Curve, RealisticProfile, RttMiddleware
from ._server import Emulator
from ._state import Clock

__all__ = [
    "ENDPOINTS",
    "Clock",
    "Curve",
    "Emulator",
    "Fault",
    "FaultPlan",
    "RealisticProfile",
    "RttMiddleware",
]

ENDPOINTS = _ENDPOINTS
"""The endpoints faults can target: ``"submit"``, ``"task"``, ``"batch"``, ``"balance"``,
``"upload"`` and ``"file"`` (result downloads)."""

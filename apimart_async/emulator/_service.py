"""What the emulator's parts read of it: its live settings and state (``Service``), and the
service variants a test may switch between (see ``_server``'s docstring).

``Emulator`` is the one ``Service``; ``Routes`` and ``Background`` take it as this protocol,
so they read what a test changes while the emulator runs, and import nothing of ``_server``.
"""

from __future__ import annotations

from typing import Any, Final, Literal, Protocol

from ._faults import FaultPlan
from ._state import Clock, State

__all__ = [
    "BATCH_ROUTES",
    "CONFLICT_PLACEMENTS",
    "UNKNOWN_TASK_REPLIES",
    "BatchRoute",
    "ConflictPlacement",
    "Service",
    "UnknownTask",
]

BatchRoute = Literal["ok", "absent", "refuse", "partial", "nested", "keyed"]
BATCH_ROUTES: Final = ("ok", "absent", "refuse", "partial", "nested", "keyed")
UnknownTask = Literal["404", "400", "200"]
UNKNOWN_TASK_REPLIES: Final = ("404", "400", "200")
ConflictPlacement = Literal["both", "type", "code"]
CONFLICT_PLACEMENTS: Final = ("both", "type", "code")


class Service(Protocol):
    """The emulator as its routes and its background work see it."""

    api_key: str
    base_url: str
    state: State
    clock: Clock
    faults: FaultPlan
    unknown_task: UnknownTask
    conflict_code_in: ConflictPlacement
    batch_hidden: set[str]
    webhook_retry_delays: tuple[float, ...]
    webhook_loss: float
    webhook_duplicates: float
    webhook_delay: float
    seed: int
    webhook_deliveries: list[tuple[str, str, int | str]]

    @property
    def batch_route(self) -> BatchRoute: ...

    @property
    def file_chunk_delay(self) -> float: ...

    def advance(self, seconds: float) -> None: ...

    def create_tasks(self, count: int, body: dict[str, Any] | None = None) -> list[str]: ...

    def stats(self) -> dict[str, Any]: ...

    async def file_chunk_pause(self) -> None: ...

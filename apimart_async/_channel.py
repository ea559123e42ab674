"""``Channel``: an unbounded first-in, first-out queue between tasks of one event loop.

A batch hands every job to its submitters through one (issue 16). anyio's memory object
streams did that job at a cost paid per job: a checkpoint (a trip round the event loop) on
every receive, even with an item ready, and an event and a generic receiver object made for
every wait. Here an item ready is taken at once, and a wait is one asyncio future.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Generic, TypeVar

__all__ = ["Channel"]

T = TypeVar("T")


class Channel(Generic[T]):
    """``put`` never waits; ``get`` waits for an item, or raises ``StopAsyncIteration`` once
    the channel is closed and empty. Iterating it gets until then. Waiters are woken in the
    order they came; a waiter cancelled just after its wake-up hands it on, so no item is left
    waiting while another task waits for it."""

    __slots__ = ("_closed", "_items", "_waiters")

    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> None:
        """Add ``item`` (``RuntimeError`` once closed: nobody would take it)."""
        if self._closed:
            raise RuntimeError("put on a closed Channel")
        self._items.append(item)
        self._wake_one()

    def close(self, *, drop: bool = False) -> None:
        """No more items: every getter ends once those already put are taken (``drop``: at
        once, the items not taken are dropped)."""
        self._closed = True
        if drop:
            self._items.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def get(self) -> T:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if not waiter.cancelled():
                    if self._items:
                        self._wake_one()  # woken, then cancelled: another waiter takes it
                else:  # gave up waiting: its future goes (a reader that times out again and
                    with contextlib.suppress(ValueError):  # again would pile them up)
                        self._waiters.remove(waiter)
                raise
        return self._items.popleft()

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> T:
        return await self.get()

"""``Channel``: the queue a batch hands its jobs and outcomes through (issue 16)."""

from __future__ import annotations

import asyncio

import pytest

from apimart_async._channel import Channel

pytestmark = pytest.mark.anyio


async def test_items_come_out_in_the_order_put_and_a_getter_waits_for_one() -> None:
    channel: Channel[int] = Channel()
    getter = asyncio.create_task(channel.get())
    await asyncio.sleep(0)
    assert not getter.done()  # nothing put yet
    channel.put(1)
    channel.put(2)
    assert await getter == 1
    assert await channel.get() == 2
    assert len(channel) == 0


async def test_close_ends_the_getters_after_the_items_already_put() -> None:
    channel: Channel[int] = Channel()
    waiting = asyncio.create_task(channel.get())
    await asyncio.sleep(0)
    channel.close()
    with pytest.raises(StopAsyncIteration):
        await waiting
    channel = Channel()
    channel.put(1)
    channel.put(2)
    channel.close()
    assert [item async for item in channel] == [1, 2]
    with pytest.raises(RuntimeError, match="closed Channel"):
        channel.put(3)


async def test_close_with_drop_ends_the_getters_at_once() -> None:
    channel: Channel[int] = Channel()
    channel.put(1)
    channel.close(drop=True)
    assert channel.closed
    assert [item async for item in channel] == []


async def test_a_getter_cancelled_after_its_wake_up_hands_the_item_to_the_next() -> None:
    channel: Channel[str] = Channel()
    first = asyncio.create_task(channel.get())
    second = asyncio.create_task(channel.get())
    await asyncio.sleep(0)  # both wait, first in line
    channel.put("job")  # wakes the first...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 5) == "job"


async def test_a_getter_cancelled_while_waiting_takes_no_wake_up() -> None:
    channel: Channel[str] = Channel()
    first = asyncio.create_task(channel.get())
    second = asyncio.create_task(channel.get())
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    channel.put("job")
    assert await asyncio.wait_for(second, 5) == "job"


async def test_a_getter_takes_an_item_ready_without_leaving_the_task() -> None:
    """No trip round the event loop when an item is ready (anyio's streams made one)."""
    channel: Channel[int] = Channel()
    channel.put(7)
    other_ran = False

    async def other() -> None:
        nonlocal other_ran
        other_ran = True

    task = asyncio.create_task(other())
    assert await channel.get() == 7
    assert not other_ran  # the get did not yield to the loop
    await task


async def test_getters_that_gave_up_leave_nothing_behind() -> None:
    """A reader that waits with a timeout, again and again, while nothing comes (a progress
    display's loop, say) leaves no future per wait in the channel (anyio's stream dropped its
    waiter on cancellation; brk16: these piled up until the next item)."""
    channel: Channel[int] = Channel()
    for _ in range(100):
        getter = asyncio.create_task(channel.get())
        await asyncio.sleep(0)  # it waits
        getter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await getter
    assert len(channel._waiters) == 0
    channel.put(1)
    assert await channel.get() == 1

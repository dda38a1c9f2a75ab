"""MemoryBroker specifics the contract does not cover."""

from __future__ import annotations

import asyncio

import pytest

from ssehub.broker import Retention
from ssehub.broker.memory import MemoryBroker

pytestmark = pytest.mark.anyio


async def test_placeholders_of_abandoned_tails_are_dropped() -> None:
    broker = MemoryBroker()
    tails = [broker.tail(f"ghost{i}", None) for i in range(100)]
    waiters = [asyncio.ensure_future(t.__anext__()) for t in tails]
    await asyncio.sleep(0.01)
    assert len(broker._logs) == 100
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    for t in tails:
        await t.aclose()  # type: ignore[attr-defined]
    assert broker._logs == {}


async def test_a_placeholder_shared_by_two_tails_stays_until_both_leave() -> None:
    broker = MemoryBroker()
    first, second = broker.tail("s", None), broker.tail("s", None)
    w1 = asyncio.ensure_future(first.__anext__())
    w2 = asyncio.ensure_future(second.__anext__())
    await asyncio.sleep(0.01)
    w1.cancel()
    await asyncio.gather(w1, return_exceptions=True)
    await first.aclose()  # type: ignore[attr-defined]
    await broker.append("s", [("message", "x")])
    batch = await asyncio.wait_for(w2, 5)
    assert [e.data for e in batch.entries] == ["x"]
    await second.aclose()  # type: ignore[attr-defined]


async def test_trimming_compacts_the_entry_list() -> None:
    broker = MemoryBroker(Retention(max_len=10, max_age=None))
    for i in range(5000):
        await broker.append("s", [("message", str(i))])
    log = broker._logs["s"]
    assert len(log.entries) < 3000  # compacted, not 5000 slots with a moving head
    batch = await broker.read("s", None)
    assert [e.data for e in batch.entries] == [str(i) for i in range(4990, 5000)]


async def test_a_cursor_from_an_earlier_process_is_a_gap() -> None:
    """Ids carry wall time: one older than this broker is another process's, and what
    followed it there is gone, so the reader is told."""
    old = MemoryBroker()
    (before,) = await old.append("s", [("message", "from the old process")])
    await asyncio.sleep(0.01)  # the next process starts at a later millisecond
    new = MemoryBroker()
    assert (await new.read("s", before.id)).gap  # no stream yet
    await new.append("s", [("message", "new")])
    batch = await new.read("s", before.id)
    assert batch.gap
    assert [e.data for e in batch.entries] == ["new"]
    # `0-0` means "from the start": never a gap.
    assert not (await new.read("s", "0-0")).gap

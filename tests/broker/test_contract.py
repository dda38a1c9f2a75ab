"""The broker contract (`ssehub.broker.base`), run against every broker in conftest.BROKERS."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from ssehub.broker import Batch, Broker, Retention, StreamClosed, parse_id
from ssehub.protocol import ServerSentEvent, encode

pytestmark = pytest.mark.anyio


async def until(condition: Callable[[], Awaitable[bool] | bool], limit: float = 5.0) -> None:
    """Poll `condition` until it holds; fail after `limit` seconds."""
    with anyio.fail_after(limit):
        for _ in iter(int, 1):
            result = condition()
            if result if isinstance(result, bool) else await result:
                return
            await anyio.sleep(0.01)


async def test_append_assigns_increasing_ids_and_wire(broker: Broker) -> None:
    entries = await broker.append("s", [("message", f"e{i}") for i in range(50)])
    more = await broker.append("s", [("tick", "x\ny")])
    keys = [e.key for e in entries + more]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    for e in entries + more:
        assert parse_id(e.id) == e.key
        assert e.wire == encode(ServerSentEvent(data=e.data, event=e.event, id=e.id))
    assert more[0].wire.startswith(b"event: tick\nid: ")


async def test_read_after_cursor_and_limit(broker: Broker) -> None:
    entries = await broker.append("s", [("message", str(i)) for i in range(10)])
    batch = await broker.read("s", None)
    assert [e.data for e in batch.entries] == [str(i) for i in range(10)]
    assert not batch.gap
    assert not batch.closed
    batch = await broker.read("s", entries[3].id, limit=4)
    assert [e.data for e in batch.entries] == ["4", "5", "6", "7"]
    batch = await broker.read("s", entries[-1].id)
    assert list(batch.entries) == []
    assert not batch.gap


async def test_read_missing_stream(broker: Broker) -> None:
    assert list((await broker.read("nope", None)).entries) == []
    assert await broker.info("nope") is None


@pytest.mark.parametrize("cursor", ["garbage", "12", "1-2-3", "-1-0", ""])
async def test_malformed_cursor_is_a_gap_from_oldest(broker: Broker, cursor: str) -> None:
    await broker.append("s", [("message", "a"), ("message", "b")])
    batch = await broker.read("s", cursor)
    assert batch.gap
    assert [e.data for e in batch.entries] == ["a", "b"]


async def test_cursor_from_the_future_is_a_gap(broker: Broker) -> None:
    entries = await broker.append("s", [("message", "a")])
    ms, _ = entries[0].key
    batch = await broker.read("s", f"{ms + 10_000}-0")
    assert batch.gap
    assert [e.data for e in batch.entries] == ["a"]


async def test_trim_by_count_makes_old_cursors_gaps(broker: Broker) -> None:
    first = await broker.append("s", [("message", str(i)) for i in range(5)])
    rest = await broker.append(
        "s", [("message", str(i)) for i in range(5, 10)], retention=Retention(max_len=3)
    )
    info = await broker.info("s")
    assert info is not None
    assert info.length == 3
    assert info.first_id == rest[2].id
    assert info.last_id == rest[4].id
    # Older than the last trimmed entry: entries were lost.
    batch = await broker.read("s", first[0].id)
    assert batch.gap
    assert [e.data for e in batch.entries] == ["7", "8", "9"]
    # Exactly the last trimmed entry: nothing was lost.
    batch = await broker.read("s", rest[1].id)
    assert not batch.gap
    assert [e.data for e in batch.entries] == ["7", "8", "9"]


async def test_trim_by_age(make_broker: Any) -> None:
    async with make_broker(retention=Retention(max_len=None, max_age=0.2)) as broker:
        old = await broker.append("s", [("message", "old")])
        await anyio.sleep(0.3)  # the age bound itself is what is under test
        await broker.append("s", [("message", "new")])
        batch = await broker.read("s", None)
        assert [e.data for e in batch.entries] == ["new"]
        assert (await broker.read("s", old[0].id)).gap is False  # the trimmed one was seen


async def test_tail_batches_everything_since_the_last_batch(broker: Broker) -> None:
    await broker.append("s", [("message", "r0"), ("message", "r1")])
    batches: list[Batch] = []
    got_first = anyio.Event()
    release = anyio.Event()

    async def reader() -> None:
        async for batch in broker.tail("s", None):
            batches.append(batch)
            if len(batches) == 1:
                got_first.set()
                await release.wait()  # busy: appends land meanwhile
            if batch.closed:
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await got_first.wait()
        for i in range(20):
            await broker.append("s", [("message", f"n{i}")])
        release.set()
        await until(lambda: sum(len(b.entries) for b in batches) >= 22)
        await broker.close("s")
    assert [e.data for e in batches[0].entries] == ["r0", "r1"]
    assert [e.data for e in batches[1].entries] == [f"n{i}" for i in range(20)]
    assert batches[-1].closed


async def test_tail_from_live_and_waits_for_creation(broker: Broker) -> None:
    received: list[str] = []
    async with anyio.create_task_group() as tg:

        async def reader() -> None:
            async for batch in broker.tail("later", None):
                received.extend(e.data for e in batch.entries)
                if batch.closed:
                    return

        tg.start_soon(reader)
        await anyio.sleep(0.05)  # let the reader park before the stream exists
        await broker.append("later", [("message", "x")])
        await until(lambda: received == ["x"])
        await broker.close("later")
    assert received == ["x"]


async def test_tail_gap_then_entries(broker: Broker) -> None:
    await broker.append("s", [("message", "a")])
    it = broker.tail("s", "bogus")
    with anyio.fail_after(5):
        batch = await it.__anext__()
    assert batch.gap
    assert [e.data for e in batch.entries] == ["a"]
    await it.aclose()  # type: ignore[attr-defined]


async def test_close_ends_tails_and_refuses_appends(broker: Broker) -> None:
    entries = await broker.append("s", [("message", "a")])
    await broker.close("s")
    with pytest.raises(StreamClosed):
        await broker.append("s", [("message", "b")])
    info = await broker.info("s")
    assert info is not None
    assert info.closed
    assert info.last_id == entries[0].id
    batches = [b async for b in broker.tail("s", None)]
    assert batches[-1].closed
    assert [e.data for b in batches for e in b.entries] == ["a"]
    batch = await broker.read("s", None)
    assert batch.closed


async def test_closed_stream_expires(broker: Broker) -> None:
    await broker.append("s", [("message", "a")])
    await broker.close("s", expire_after=0.1)

    async def gone() -> bool:
        return await broker.info("s") is None

    await until(gone)
    # Gone entirely: a new stream of that name can start.
    await broker.append("s", [("message", "b")])


async def test_delete_forgets_and_ends_tails(broker: Broker) -> None:
    await broker.append("s", [("message", "a")])
    ended = anyio.Event()

    async def reader() -> None:
        async for batch in broker.tail("s", None):
            if batch.closed:
                ended.set()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.sleep(0.05)
        await broker.delete("s")
        with anyio.fail_after(5):
            await ended.wait()
    assert await broker.info("s") is None


async def test_concurrent_appends_keep_order(broker: Broker) -> None:
    async def writer(n: int) -> None:
        for i in range(50):
            await broker.append("s", [("message", f"{n}:{i}")])

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(writer, n)
    batch = await broker.read("s", None, limit=1000)
    assert len(batch.entries) == 200
    keys = [e.key for e in batch.entries]
    assert keys == sorted(set(keys))
    for n in range(4):
        assert [e.data for e in batch.entries if e.data.startswith(f"{n}:")] == [
            f"{n}:{i}" for i in range(50)
        ]


async def test_a_stream_waited_for_but_never_written_leaves_nothing(broker: Broker) -> None:
    it = broker.tail("ghost", None)
    waiter = asyncio.ensure_future(it.__anext__())
    await anyio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await it.aclose()  # type: ignore[attr-defined]
    assert await broker.info("ghost") is None
    # A later stream of that name works as any other.
    await broker.append("ghost", [("message", "boo")])
    assert [e.data for e in (await broker.read("ghost", None)).entries] == ["boo"]


async def test_tail_busy_reader_still_gets_the_end_of_a_closed_stream(broker: Broker) -> None:
    """Entries and the close that land while the reader handles a batch are not lost."""
    tail = broker.tail("busy", None)
    await broker.append("busy", [("message", "a")])
    first = await anext(tail)
    assert [e.data for e in first.entries] == ["a"]
    assert not first.closed
    # The reader is "busy" with `first`: the stream gets its last entry and is closed.
    await broker.append("busy", [("message", "b")])
    await broker.close("busy")
    rest: list[str] = []
    with anyio.fail_after(5):
        async for batch in tail:
            rest.extend(e.data for e in batch.entries)
            if batch.closed:
                break
        else:
            pytest.fail("the tail ended without a closed batch")
    assert rest == ["b"]


async def test_request_stop_reaches_the_lease_holder(broker: Broker) -> None:
    stopped = anyio.Event()
    assert not await broker.request_stop("held")  # nobody holds it yet
    async with broker.lease("held", ttl=30.0, on_stop=stopped.set):
        await broker.append("held", [("message", "a")])
        assert await broker.request_stop("held")
        with anyio.fail_after(5):
            await stopped.wait()
        await broker.close("held")
    assert not await broker.request_stop("held")  # ended: nobody to ask
    assert not await broker.request_stop("never")


async def test_cursor_older_than_the_first_entry_ever_is_a_gap(broker: Broker) -> None:
    """Such a cursor is not one of this stream's ids: whatever followed it where it came
    from is not here, so the reader is told (issue #3: never silently skips)."""
    entries = await broker.append("s", [("message", "a"), ("message", "b")])
    ms, _ = entries[0].key
    batch = await broker.read("s", f"{ms - 1}-0")
    assert batch.gap
    assert [e.data for e in batch.entries] == ["a", "b"]
    # At or after the first entry: an id of this stream, no gap.
    batch = await broker.read("s", entries[0].id)
    assert not batch.gap
    assert [e.data for e in batch.entries] == ["b"]
    # `0-0` is the start of every stream: everything retained, never a gap by itself.
    batch = await broker.read("s", "0-0")
    assert not batch.gap
    assert [e.data for e in batch.entries] == ["a", "b"]


async def test_cursor_of_an_earlier_stream_of_the_same_name_is_a_gap(broker: Broker) -> None:
    (old,) = await broker.append("s", [("message", "old")])
    await broker.close("s", expire_after=0.1)

    async def gone() -> bool:
        return await broker.info("s") is None

    await until(gone)
    await broker.append("s", [("message", "new")])
    batch = await broker.read("s", old.id)
    assert batch.gap
    assert [e.data for e in batch.entries] == ["new"]
    tail = broker.tail("s", old.id)
    with anyio.fail_after(5):
        first = await anext(tail)
    assert first.gap
    assert [e.data for e in first.entries] == ["new"]
    await tail.aclose()  # type: ignore[attr-defined]


async def test_cursor_on_a_stream_that_does_not_exist_is_a_gap(broker: Broker) -> None:
    cursor = "1700000000000-0"
    assert (await broker.read("nope", cursor)).gap
    assert not (await broker.read("nope", "0-0")).gap
    assert not (await broker.read("nope", None)).gap
    # A tail is told at once, then gets the stream from its start when it comes.
    tail = broker.tail("later", cursor)
    with anyio.fail_after(5):
        first = await anext(tail)
        assert first.gap
        assert list(first.entries) == []
        await broker.append("later", [("message", "x")])
        second = await anext(tail)
    assert not second.gap
    assert [e.data for e in second.entries] == ["x"]
    await tail.aclose()  # type: ignore[attr-defined]
    # A tail without a cursor (a live subscriber) is never told of a gap.
    live = broker.tail("quiet", None)
    waiter = asyncio.ensure_future(anext(live))
    await broker.append("quiet", [("message", "y")])
    with anyio.fail_after(5):
        batch = await waiter
    assert not batch.gap
    assert [e.data for e in batch.entries] == ["y"]
    await live.aclose()  # type: ignore[attr-defined]

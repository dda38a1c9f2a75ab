"""RedisBroker beyond the contract suite: several brokers (processes) on one Redis, one
reader per process, leases of dying producers, Redis going away and coming back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator

import pytest
import redis.asyncio as aioredis

from redis_server import RedisServer, redis_server
from ssehub.broker import Batch, BrokerUnavailable, Entry, Retention, StreamClosed
from ssehub.broker import redis as redis_broker
from ssehub.broker.redis import RedisBroker

pytestmark = [pytest.mark.redis, pytest.mark.anyio]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s


@pytest.fixture
async def pair(server: RedisServer) -> AsyncIterator[tuple[RedisBroker, RedisBroker]]:
    """Two brokers sharing one Redis and one key prefix: two nodes of one deployment."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    a = RedisBroker(server.url, prefix=prefix, lease_check=0.2)
    b = RedisBroker(server.url, prefix=prefix, lease_check=0.2)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def collect(
    tail: AsyncIterator[Batch], count: int, within: float = 10.0
) -> tuple[list[Entry], list[Batch]]:
    """Entries from `tail` until `count` of them or a closed batch."""
    entries: list[Entry] = []
    batches: list[Batch] = []
    async with asyncio.timeout(within):
        async for batch in tail:
            batches.append(batch)
            entries.extend(batch.entries)
            if len(entries) >= count or batch.closed:
                break
    return entries, batches


async def test_a_log_written_on_one_node_is_read_and_tailed_on_another(
    pair: tuple[RedisBroker, RedisBroker],
) -> None:
    a, b = pair
    written = await a.append("channel:news", [("message", "one"), ("update", "two")])
    batch = await b.read("channel:news", None)
    assert [e.id for e in batch.entries] == [e.id for e in written]
    assert [e.wire for e in batch.entries] == [e.wire for e in written]
    # An id handed out by node a is a cursor on node b.
    after_first = await b.read("channel:news", written[0].id)
    assert [e.data for e in after_first.entries] == ["two"]
    assert not after_first.gap

    tail = b.tail("channel:news", written[-1].id)
    waiting = asyncio.ensure_future(collect(tail, 3))
    await asyncio.sleep(0.05)
    await a.append("channel:news", [("message", "3")])
    await a.append("channel:news", [("message", "4"), ("message", "5")])
    entries, _ = await waiting
    assert [e.data for e in entries] == ["3", "4", "5"]
    await a.close("channel:news")
    with pytest.raises(StreamClosed):
        await b.append("channel:news", [("message", "late")])
    info = await b.info("channel:news")
    assert info is not None
    assert info.closed
    assert info.last_id == entries[-1].id


async def test_one_redis_connection_per_process_however_many_tails(
    server: RedisServer,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    producer = RedisBroker(server.url, prefix=prefix, max_connections=2)
    consumer = RedisBroker(server.url, prefix=prefix, max_connections=2)
    admin = aioredis.Redis.from_url(server.url)
    try:
        before = len(await admin.client_list())
        streams = [f"channel:c{i}" for i in range(10)]
        tails = [consumer.tail(s, None) for s in streams for _ in range(10)]
        tasks = [asyncio.ensure_future(collect(t, 2)) for t in tails]
        await asyncio.sleep(0.3)
        for s in streams:
            await producer.append(s, [("message", "x"), ("message", "y")])
        results = await asyncio.gather(*tasks)
        assert all([e.data for e in entries] == ["x", "y"] for entries, _ in results)
        # 100 tails: the consumer holds its reader plus a bounded pool, the producer its pool.
        opened = len(await admin.client_list()) - before
        assert opened <= 2 + 1 + 2, opened
    finally:
        await admin.aclose()
        await producer.aclose()
        await consumer.aclose()


async def test_a_tail_that_falls_out_of_the_feed_window_reads_the_log(
    pair: tuple[RedisBroker, RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_broker, "_FEED_WINDOW", 8)
    a, b = pair
    fast = b.tail("channel:w", None)
    slow = b.tail("channel:w", None)
    fast_task = asyncio.ensure_future(collect(fast, 100))
    await asyncio.sleep(0.1)
    for i in range(50):
        await a.append("channel:w", [("message", f"{2 * i}"), ("message", f"{2 * i + 1}")])
    fast_entries, _ = await fast_task
    # The slow tail starts reading only now, far behind the 8-entry window.
    slow_entries, batches = await collect(slow, 100)
    assert [e.data for e in fast_entries] == [str(i) for i in range(100)]
    assert [e.data for e in slow_entries] == [str(i) for i in range(100)]
    assert not any(b.gap for b in batches)


PRODUCER = """
import asyncio, sys
from ssehub.broker.redis import RedisBroker

async def main():
    broker = RedisBroker(sys.argv[1], prefix=sys.argv[2])
    lost = [("message", '{"error": {"message": "gone"}}'), ("message", "[DONE]")]
    async with broker.lease("run:r1", ttl=0.6, lost=lost):
        await broker.append("run:r1", [("message", "token")])
        print("producing", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def start_producer(url: str, prefix: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", PRODUCER, url, prefix],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_a_producer_killed_mid_stream_ends_it_for_readers_elsewhere(
    pair: tuple[RedisBroker, RedisBroker], server: RedisServer
) -> None:
    _, reader = pair
    proc = start_producer(server.url, reader.prefix)
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line == b"producing\n"
        tail = reader.tail("run:r1", None)
        first, _ = await collect(tail, 1)
        assert [e.data for e in first] == ["token"]
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        rest, batches = await collect(tail, 10, within=15)
        assert [e.data for e in rest] == ['{"error": {"message": "gone"}}', "[DONE]"]
        assert batches[-1].closed
        # The lease was 0.6 s, readers check every 0.2 s when idle: about a second, far
        # less on a machine that is not busy.
        assert time.monotonic() - killed < 10
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    with pytest.raises(StreamClosed):
        await reader.append("run:r1", [("message", "late")])


async def test_a_held_lease_keeps_an_idle_stream_open_and_closing_ends_it_cleanly(
    pair: tuple[RedisBroker, RedisBroker],
) -> None:
    producer, reader = pair
    tail = reader.tail("run:slow", None)
    async with producer.lease("run:slow", ttl=1.0):
        await producer.append("run:slow", [("message", "a")])
        first, _ = await collect(tail, 1)
        # Several lease periods with no event: the stream must stay open.
        waiting = asyncio.ensure_future(collect(tail, 1, within=10))
        await asyncio.sleep(2.5)
        assert not waiting.done()
        await producer.append("run:slow", [("message", "b")])
        await producer.close("run:slow", expire_after=60)
    rest, batches = await waiting
    assert [e.data for e in first + rest] == ["a", "b"]
    assert batches[-1].closed or (await collect(tail, 1))[1][-1].closed


async def test_leaving_a_lease_without_closing_ends_the_stream_with_the_lost_events(
    pair: tuple[RedisBroker, RedisBroker],
) -> None:
    producer, reader = pair

    async def produce_then_fail() -> None:
        async with producer.lease("run:crash", lost=[("message", "oops"), ("message", "bye")]):
            await producer.append("run:crash", [("message", "a")])
            raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError):
        await produce_then_fail()
    batch = await reader.read("run:crash", None)
    assert [e.data for e in batch.entries] == ["a", "oops", "bye"]
    assert batch.closed


async def test_redis_going_away_keeps_tails_and_fails_appends_fast() -> None:
    with redis_server(persist=True) as server:
        prefix = "restart:"
        a = RedisBroker(server.url, prefix=prefix)
        b = RedisBroker(server.url, prefix=prefix)
        try:
            first = await a.append("channel:r", [("message", "before")])
            tail = b.tail("channel:r", None)
            got, _ = await collect(tail, 1)
            assert [e.data for e in got] == ["before"]
            # The tail is now waiting on the feed; the next batch is taken after the outage.
            pending = asyncio.ensure_future(collect(tail, 2, within=30))

            server.stop()
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await a.append("channel:r", [("message", "lost")])
            assert time.monotonic() - started < 3
            assert not await a.ping()
            assert not a.available
            await asyncio.sleep(0.3)
            assert not b.available  # the reader noticed too
            assert not pending.done()

            server.start()
            await _until(lambda: a.ping())
            more = await a.append("channel:r", [("message", "after-1"), ("message", "after-2")])
            entries, batches = await pending
            assert [e.data for e in entries] == ["after-1", "after-2"]
            assert [e.id for e in entries] == [e.id for e in more]
            assert not any(x.gap for x in batches)
            assert b.available
            # Redis kept what it had (AOF): the first id is still a valid cursor.
            again = await b.read("channel:r", first[0].id)
            assert not again.gap
            assert [e.data for e in again.entries] == ["after-1", "after-2"]
        finally:
            await a.aclose()
            await b.aclose()


async def test_delivery_continues_after_a_redis_that_lost_everything_restarts() -> None:
    with redis_server(persist=False) as server:
        a = RedisBroker(server.url)
        b = RedisBroker(server.url)
        try:
            await a.append("channel:v", [("message", "1")])
            tail = b.tail("channel:v", None)
            got, _ = await collect(tail, 1)
            pending = asyncio.ensure_future(collect(tail, 1, within=30))
            server.restart()
            await _until(lambda: a.ping())
            await a.append("channel:v", [("message", "2")])
            entries, _ = await pending
            assert [e.data for e in got + entries] == ["1", "2"]
        finally:
            await a.aclose()
            await b.aclose()


async def _until(check: object, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


async def test_a_feed_trimmed_faster_than_it_reads_reports_the_gap(
    pair: tuple[RedisBroker, RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_broker, "_READ_COUNT", 2)
    a, b = pair
    first = await a.append("channel:t", [("message", "0")])
    tail = b.tail("channel:t", first[0].id)
    waiting = asyncio.ensure_future(collect(tail, 4))
    await asyncio.sleep(0.2)  # the tail is live, blocked in the reader's XREAD
    # Six at once, four kept: two were trimmed before any reader could see them.
    await a.append("channel:t", [("message", str(i)) for i in range(1, 7)], Retention(max_len=4))
    entries, batches = await waiting
    assert any(x.gap for x in batches)
    assert [e.data for e in entries][-4:] == ["3", "4", "5", "6"]


async def test_a_producer_sees_tails_in_other_processes(
    pair: tuple[RedisBroker, RedisBroker],
) -> None:
    producer, reader = pair
    async with producer.lease("run:seen"):
        await producer.append("run:seen", [("message", "a")])
        assert not await producer.tailed_elsewhere("run:seen")
        tail = reader.tail("run:seen", None)
        await collect(tail, 1)
        following = asyncio.ensure_future(collect(tail, 1))  # live now, waiting for more
        await _until(lambda: producer.tailed_elsewhere("run:seen"), within=5)
        assert not await reader.tailed_elsewhere("run:seen")  # its own tail does not count
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        await tail.aclose()  # type: ignore[attr-defined]
        # Gone within three refresh periods (0.2 s each here).
        await _until(lambda: _not(producer.tailed_elsewhere("run:seen")), within=5)
        await producer.close("run:seen")


async def _not(check: Awaitable[bool]) -> bool:
    return not await check


async def test_foreign_data_in_redis_never_stalls_other_tails(
    pair: tuple[RedisBroker, RedisBroker], server: RedisServer
) -> None:
    a, b = pair
    raw = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        good = b.tail("channel:good", None)
        bad_entry = b.tail("channel:odd", None)
        clobbered = b.tail("channel:clobbered", None)
        tasks = [
            asyncio.ensure_future(collect(good, 1)),
            asyncio.ensure_future(collect(bad_entry, 1)),
            asyncio.ensure_future(collect(clobbered, 1)),
        ]
        await asyncio.sleep(0.2)
        # An entry no encoder would write, and a stream key overwritten by a string.
        await raw.xadd(f"{a.prefix}s:channel:odd", {"e": "two\nlines", "d": "x"})
        await raw.set(f"{a.prefix}s:channel:clobbered", "not a stream")
        await a.append("channel:odd", [("message", "fine")])
        await a.append("channel:good", [("message", "still delivered")])
        (good_entries, _), (odd_entries, _), (_, clobbered_batches) = await asyncio.gather(*tasks)
        assert [e.data for e in good_entries] == ["still delivered"]
        assert [e.data for e in odd_entries] == ["fine"]
        assert clobbered_batches[-1].closed
    finally:
        await raw.aclose()


async def test_a_url_that_is_not_redis_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisBroker("localhost:6379")


async def test_an_idle_stream_is_trimmed_by_age_when_read(server: RedisServer) -> None:
    broker = RedisBroker(server.url, retention=Retention(max_len=None, max_age=0.3), prefix="age:")
    try:
        old = await broker.append("channel:idle", [("message", "stale")])
        await asyncio.sleep(0.5)  # nothing appended since: only a read can trim it
        assert (await broker.read("channel:idle", None)).entries == []
        # The newest trimmed id still resumes without a gap (nothing after it was lost).
        caught_up = await broker.read("channel:idle", old[0].id)
        assert not caught_up.gap
        assert (await broker.read("channel:idle", "0-0")).gap
    finally:
        await broker.aclose()


async def test_a_gap_with_nothing_retained_is_reported_once(server: RedisServer) -> None:
    broker = RedisBroker(
        server.url, retention=Retention(max_len=None, max_age=0.3), prefix="gap-once:"
    )
    try:
        (a,) = await broker.append("channel:g", [("message", "a")])
        (b,) = await broker.append("channel:g", [("message", "b")])
        await asyncio.sleep(0.5)
        # Another tail makes the process's feed start after "b".
        live = broker.tail("channel:g", b.id)
        live_task = asyncio.ensure_future(collect(live, 1))
        await asyncio.sleep(0.2)
        behind = broker.tail("channel:g", a.id)
        first = await asyncio.wait_for(anext(behind), 10)
        assert first.gap
        assert not first.entries
        following = asyncio.ensure_future(anext(behind))
        await asyncio.sleep(0.2)
        await broker.append("channel:g", [("message", "c")])
        second = await asyncio.wait_for(following, 10)
        assert not second.gap
        assert [e.data for e in second.entries] == ["c"]
        assert [e.data for e in (await live_task)[0]] == ["c"]
    finally:
        await broker.aclose()


async def test_a_redis_outage_longer_than_a_lease_does_not_end_its_stream() -> None:
    with redis_server(persist=True) as server:
        producer = RedisBroker(server.url, prefix="outage:", lease_check=0.2)
        reader = RedisBroker(server.url, prefix="outage:", lease_check=0.2)
        try:
            async with producer.lease("run:o", ttl=1.0, lost=[("message", "LOST")]):
                await producer.append("run:o", [("message", "a")])
                tail = reader.tail("run:o", None)
                await collect(tail, 1)
                waiting = asyncio.ensure_future(collect(tail, 1, within=30))
                server.stop()
                await asyncio.sleep(2.0)  # twice the lease: its deadline passes
                server.start()
                await _until(lambda: producer.ping())
                await asyncio.sleep(1.5)  # readers check every 0.2 s
                assert not waiting.done()
                await producer.append("run:o", [("message", "b")])
                await producer.close("run:o")
            entries, _ = await waiting
            assert [e.data for e in entries] == ["b"]
            rest = await reader.read("run:o", None)
            assert [e.data for e in rest.entries] == ["a", "b"]
        finally:
            await producer.aclose()
            await reader.aclose()

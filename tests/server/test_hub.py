"""The Hub in process: joins racing with publishers, the pump's batching, the Python API."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from ssehub.broker import StreamClosed
from ssehub.server import Hub, InvalidChannel, InvalidEvent
from ssehub.server.fanout import Subscriber

pytestmark = pytest.mark.anyio

_EVENT = re.compile(rb"id: (\S+)\ndata: (\S+)\n\n")


class Sink:
    """An ASGI `send` that keeps what was written, and how many writes it took."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0
        self.ended = False

    async def __call__(self, message: dict[str, Any]) -> None:
        self.writes += 1
        self.data += message.get("body", b"")
        if not message.get("more_body", False):
            self.ended = True

    def events(self) -> list[tuple[str, str]]:
        return [(i.decode(), d.decode()) for i, d in _EVENT.findall(bytes(self.data))]


async def settle(condition: Any, rounds: int = 2000) -> None:
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_resuming_subscribers_race_a_publisher() -> None:
    """Subscribers keep dropping and resuming at their cursor while a publisher runs:
    the concatenation of what they got is the log, exactly once, in order."""
    hub = Hub()
    await hub.start()
    total = 2000

    async def publisher() -> None:
        for i in range(total):
            await hub.publish("race", f"e{i}")
            if i % 3 == 0:
                await asyncio.sleep(0)

    await hub.publish("race", "start")
    task = asyncio.create_task(publisher())
    received: list[str] = []
    cursor: str | None = None
    kept: list[Subscriber] = []
    step = 0
    while len(received) < total + 1:
        sink = Sink()
        sub = hub.new_subscriber("race", sink, "peer", "ua")
        await hub.attach(sub, cursor, cursor is None)
        want = 1 + step % 17
        await settle(lambda s=sink, w=want: len(s.events()) >= w or task.done())  # type: ignore[misc]
        events = sink.events()[:want]
        received.extend(d for _, d in events)
        if events:
            cursor = events[-1][0]
        # Keep some subscribers around so new ones join a busy pump, drop others.
        if step % 2:
            hub.detach(sub)
        else:
            kept.append(sub)
            if len(kept) > 3:
                hub.detach(kept.pop(0))
        step += 1
    await task
    assert received == ["start"] + [f"e{i}" for i in range(total)]
    await hub.stop()


async def test_one_write_per_subscriber_per_batch() -> None:
    hub = Hub()
    await hub.start()
    sinks = [Sink() for _ in range(50)]
    for sink in sinks:
        await hub.attach(hub.new_subscriber("b", sink, "", ""), None, False)
    # 100 events appended with no chance for the pump to run in between: one batch.
    for i in range(100):
        await hub.broker.append(hub.stream("b"), [("message", str(i))])
    await settle(lambda: all(len(s.events()) == 100 for s in sinks))
    assert {s.writes for s in sinks} == {1}
    assert hub.stats().delivered == 5000
    await hub.stop()


async def test_python_api() -> None:
    hub = Hub()
    await hub.start()
    sink = Sink()
    sub = hub.new_subscriber("api", sink, "1.2.3.4:5", "ua")
    await hub.attach(sub, None, False)
    first = await hub.publish("api", {"k": [1, 2]}, event="obj")
    ids = await hub.publish_batch("api", ["a", ("t", "b"), {"data": 3}])
    await settle(lambda: len(sink.data.split(b"\n\n")) > 4)
    assert sink.data.decode().count("id: ") == 4
    assert f'event: obj\nid: {first}\ndata: {{"k":[1,2]}}\n\n' in sink.data.decode()
    assert len(ids) == 3
    (conn,) = hub.connections("api")
    assert (conn.peer, conn.user_agent, conn.events_sent) == ("1.2.3.4:5", "ua", 4)
    with pytest.raises(InvalidChannel):
        await hub.publish("bad name", "x")
    with pytest.raises(InvalidEvent):
        await hub.publish("api", "x", event="close")
    close_id = await hub.close_channel("api", "bye")
    await settle(lambda: sink.ended)
    assert sink.data.endswith(f"event: close\nid: {close_id}\ndata: bye\n\n".encode())
    with pytest.raises(StreamClosed):
        await hub.publish("api", "late")
    hub.detach(sub)
    assert hub.stats().connections == 0
    await hub.stop()

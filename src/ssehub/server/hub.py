"""`Hub`: channels over a broker, the fan-out to local subscribers, the connection registry.

Use it from anywhere on the server's event loop (request handlers, background tasks):
`await hub.publish("news", "hello")`, `hub.connections()`, `hub.disconnect(id)`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ssehub.broker import Broker, Entry, Retention, StreamClosed, StreamInfo, parse_id
from ssehub.broker.memory import MemoryBroker
from ssehub.protocol import ServerSentEvent, encode
from ssehub.server.fanout import (
    HEARTBEAT,
    ChannelPump,
    Subscriber,
    as_coroutine_send,
    uvicorn_cycle,
)

logger = logging.getLogger("ssehub.server")

CHANNEL_NAME = re.compile(r"[A-Za-z0-9_\-.:@/]{1,200}\Z")
# Event types the hub writes itself; a publisher may not forge them.
GAP_EVENT = "ssehub.gap"
CLOSE_EVENT = "close"
_EVENT_TYPE = re.compile(r"[^\r\n\0]{1,200}\Z")
_READ_PAGE = 1000

EventLike = str | ServerSentEvent | tuple[str, str] | Mapping[str, Any]


class InvalidChannel(ValueError):
    """A channel name outside 1-200 characters of letters, digits and `_ - . : @ /`."""


class InvalidEvent(ValueError):
    """An event the hub will not publish (bad or reserved type, bad shape)."""


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """One subscriber connection as the registry reports it."""

    id: str
    channel: str
    peer: str
    user_agent: str
    connected_since: float  # Unix time
    events_sent: int
    bytes_sent: int
    pending_bytes: int
    live: bool  # False while it still replays from the log


@dataclass(frozen=True, slots=True)
class HubStats:
    """Counters since the hub started (per process)."""

    connections: int
    channels: int  # channels with subscribers in this process
    published: int  # events appended through this hub
    delivered: int  # event deliveries to subscribers (one event to 3 subscribers: 3)
    slow_consumer_disconnects: int
    send_timeouts: int


def check_channel(name: str) -> str:
    if not CHANNEL_NAME.match(name):
        raise InvalidChannel(
            "channel names are 1-200 characters of letters, digits and _ - . : @ /"
        )
    return name


def as_data(value: Any) -> str:
    """Event data from a JSON value: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def to_pair(item: EventLike) -> tuple[str, str]:
    """`(event type, data)` for one publishable item, validated."""
    if isinstance(item, str):
        event, data = "message", item
    elif isinstance(item, ServerSentEvent):
        event, data = item.event, item.data
    elif isinstance(item, tuple):
        event, data = item
    elif isinstance(item, Mapping):
        unknown = set(item) - {"data", "event"}
        if unknown:
            raise InvalidEvent(f"unknown event fields: {sorted(unknown)} (ids are assigned)")
        if "data" not in item:
            raise InvalidEvent('an event needs "data"')
        event = item.get("event", "message")
        data = as_data(item["data"])
    else:
        raise InvalidEvent(f"not an event: {type(item).__name__}")
    if not isinstance(event, str) or not _EVENT_TYPE.match(event):
        raise InvalidEvent("event type must be 1-200 characters without CR, LF or NUL")
    if event == CLOSE_EVENT or event.startswith("ssehub."):
        raise InvalidEvent(f"event type {event!r} is reserved")
    if not isinstance(data, str):
        raise InvalidEvent("event data must be a string")
    return event, data


def gap_event(cursor: str | None, oldest: Entry | None) -> bytes:
    """The in-band notice that events after `cursor` may be missing (no `id:`, so the
    client's last event id stays as it was)."""
    data = json.dumps({"last_event_id": cursor, "oldest_id": oldest.id if oldest else None})
    return encode(ServerSentEvent(data=data, event=GAP_EVENT))


class Hub:
    """Publish to channels and manage the SSE connections subscribed to them."""

    def __init__(
        self,
        broker: Broker | None = None,
        *,
        retention: Retention | None = None,
        heartbeat: float = 15.0,
        max_pending: int = 1_048_576,
        send_timeout: float = 30.0,
        closed_ttl: float = 3600.0,
    ) -> None:
        self.broker = broker if broker is not None else MemoryBroker(retention)
        self.retention = retention
        self.heartbeat = heartbeat
        self.max_pending = max_pending
        self.send_timeout = send_timeout
        self.closed_ttl = closed_ttl
        self.published = 0
        self.delivered = 0
        self.slow_consumer_disconnects = 0
        self.send_timeouts = 0
        # Set when the server begins to shut down: streams end instead of waiting.
        self.shutting_down = asyncio.Event()
        self._ids = itertools.count(1)
        # Ids name a connection among every process sharing the broker: `c12@<process>`.
        self._id_suffix = f"@{self.broker.process}" if self.broker.process else ""
        self._subscribers: dict[str, Subscriber] = {}
        self._pumps: dict[str, ChannelPump] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start the heartbeat and send-timeout ticker (idempotent)."""
        if self.shutting_down.is_set():
            # Served again after a shutdown (tests do that): a fresh event for this loop.
            self.shutting_down = asyncio.Event()
        if self._ticker is None:
            self._ticker = self.spawn(self._tick())

    def begin_shutdown(self) -> None:
        """End every open stream now (clients reconnect elsewhere with Last-Event-ID)."""
        self.shutting_down.set()
        for sub in list(self._subscribers.values()):
            self.drop(sub, "shutdown")

    async def stop(self) -> None:
        """End streams, stop pumps and the ticker. The broker is the caller's to close."""
        self.begin_shutdown()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        self._ticker = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("hub task failed", exc_info=task.exception())

    # -- publishing ----------------------------------------------------------------

    @staticmethod
    def stream(channel: str) -> str:
        """The broker stream behind a channel."""
        return "channel:" + channel

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        event: str = "message",
        retention: Retention | None = None,
    ) -> str:
        """Append one event to `channel`; returns its id. Non-string data is sent as JSON."""
        (entry_id,) = await self.publish_batch(channel, [(event, as_data(data))], retention)
        return entry_id

    async def publish_batch(
        self, channel: str, events: Iterable[EventLike], retention: Retention | None = None
    ) -> list[str]:
        """Append events in order in one broker call; returns their ids.

        Items are strings (`message` events), `ServerSentEvent`s, `(event, data)` pairs or
        mappings `{"data": ..., "event": ...}`. `retention` overrides the hub's for this
        append (a state channel can keep only its latest event). Raises `InvalidChannel`,
        `InvalidEvent`, `StreamClosed` (the channel was closed) or `BrokerUnavailable`.
        """
        check_channel(channel)
        pairs = [to_pair(item) for item in events]
        if not pairs:
            return []
        entries = await self.broker.append(self.stream(channel), pairs, retention or self.retention)
        self.published += len(entries)
        return [e.id for e in entries]

    async def close_channel(self, channel: str, data: Any = "") -> str | None:
        """Close `channel`: subscribers get a final `close` event (with `data`), then the
        stream ends; later subscribers get HTTP 204. Returns the close event's id, or None
        when the channel was already closed."""
        check_channel(channel)
        stream = self.stream(channel)
        try:
            (entry,) = await self.broker.append(stream, [(CLOSE_EVENT, as_data(data))])
        except StreamClosed:
            return None
        await self.broker.close(stream, expire_after=self.closed_ttl)
        return entry.id

    async def channel_info(self, channel: str) -> StreamInfo | None:
        return await self.broker.info(self.stream(check_channel(channel)))

    # -- the registry ----------------------------------------------------------------

    def connections(self, channel: str | None = None) -> list[ConnectionInfo]:
        # list() copies in one step, so reading from another thread (tests) is safe too.
        return [
            self._describe(sub)
            for sub in list(self._subscribers.values())
            if channel is None or sub.channel == channel
        ]

    def connection(self, id: str) -> ConnectionInfo | None:
        sub = self._subscribers.get(id)
        return None if sub is None else self._describe(sub)

    def disconnect(self, id: str) -> bool:
        """End connection `id` (its client may reconnect and resume); False if unknown."""
        sub = self._subscribers.get(id)
        if sub is None:
            return False
        self.drop(sub, "disconnected")
        return True

    def stats(self) -> HubStats:
        return HubStats(
            connections=len(self._subscribers),
            channels=len(self._pumps),
            published=self.published,
            delivered=self.delivered,
            slow_consumer_disconnects=self.slow_consumer_disconnects,
            send_timeouts=self.send_timeouts,
        )

    @staticmethod
    def _describe(sub: Subscriber) -> ConnectionInfo:
        return ConnectionInfo(
            id=sub.id,
            channel=sub.channel,
            peer=sub.peer,
            user_agent=sub.user_agent,
            connected_since=sub.since,
            events_sent=sub.events_sent,
            bytes_sent=sub.bytes_sent,
            pending_bytes=sub.pending_bytes,
            live=sub.live,
        )

    # -- subscribers ------------------------------------------------------------------

    def new_subscriber(
        self,
        channel: str,
        send: Callable[[dict[str, Any]], Awaitable[None]],
        peer: str,
        user_agent: str,
        cycle: Any | None = None,
    ) -> Subscriber:
        """A subscriber writing with the ASGI `send` of a started response.

        `cycle`: an object with `transport`, `flow.write_paused` and `disconnected` that
        the pump may write body chunks to directly (see `fanout.uvicorn_cycle`); found
        by itself behind uvicorn's httptools `send`."""
        return Subscriber(
            self,
            f"c{next(self._ids)}{self._id_suffix}",
            channel,
            as_coroutine_send(send),
            peer,
            user_agent,
            cycle if cycle is not None else uvicorn_cycle(send),
        )

    async def attach(self, sub: Subscriber, cursor: str | None, from_oldest: bool) -> None:
        """Replay `sub`'s channel after `cursor` (or from the oldest retained entry, or
        nothing when neither is given), then make it live on the channel's pump.

        The response must have started. Ends the response when the channel is closed.
        """
        channel = sub.channel
        pump = self._pumps.get(channel)
        if pump is None or pump.closed:
            pump = self._pumps[channel] = ChannelPump(self, channel)
        pump.subscribers[sub.id] = sub
        self._subscribers[sub.id] = sub
        # The pump's starting point must be fixed before we read, or an entry appended
        # between our read and its start would reach neither.
        await asyncio.shield(pump.ready)
        stream = self.stream(channel)
        last: tuple[int, int] | None = None
        closed = False
        if cursor is None and not from_oldest:
            info = await self.broker.info(stream)
            if info is not None and info.last_id is not None:
                last = parse_id(info.last_id)
        else:
            after = None if from_oldest else cursor
            first = True
            while True:
                batch = await self.broker.read(stream, after, _READ_PAGE)
                entries = batch.entries
                if first and batch.gap:
                    sub.write(gap_event(cursor, entries[0] if entries else None))
                first = False
                if entries:
                    sub.write(b"".join(e.wire for e in entries), len(entries))
                    after = entries[-1].id
                    last = entries[-1].key
                    self.delivered += len(entries)
                elif after is not None and not batch.gap:
                    last = parse_id(after)
                closed = batch.closed
                if closed or len(entries) < _READ_PAGE:
                    break
        if closed:
            sub.end()
            return
        sub.join(last)
        if pump.closed:
            sub.end()

    def detach(self, sub: Subscriber) -> None:
        """Forget a subscriber whose connection ended."""
        self._subscribers.pop(sub.id, None)
        sub.done = True
        sub.ending = True
        # Not the drainer detaching from inside its own final write (connection.py).
        if sub.drainer is not None and sub.drainer is not asyncio.current_task():
            sub.drainer.cancel()
        pump = self._pumps.get(sub.channel)
        if (
            pump is not None
            and pump.subscribers.pop(sub.id, None) is not None
            and not pump.subscribers
        ):
            del self._pumps[sub.channel]
            pump.task.cancel()

    def drop(self, sub: Subscriber, reason: str) -> None:
        """Disconnect a subscriber: cleanly when its writes go through, else abort."""
        if sub.done:
            return
        if sub.reason is None:
            sub.reason = reason
            if reason == "slow":
                self.slow_consumer_disconnects += 1
                logger.info("disconnecting slow subscriber %s on %s", sub.id, sub.channel)
            elif reason == "timeout":
                self.send_timeouts += 1
                logger.info("disconnecting subscriber %s on %s: send timeout", sub.id, sub.channel)
        if sub.drainer is None:
            sub.end()  # the final chunk completes the response and wakes its handler
            return
        # Writes are stuck on a client that stopped reading: abort the connection.
        sub.pending = None
        sub.pending_bytes = 0
        sub.done = True
        if sub.drainer is not None:
            sub.drainer.cancel()
        if sub.cycle is not None:
            # Drop the connection and what its buffers hold; uvicorn sees a disconnect
            # and the handler returns as for any client that left.
            sub.cycle.transport.abort()
        elif sub.task is not None and sub.task is not asyncio.current_task():
            # Any other server: end the handler; the server closes the connection (and
            # logs that the response was not completed).
            sub.task.cancel()

    def pump_ended(self, pump: ChannelPump) -> None:
        if self._pumps.get(pump.channel) is pump:
            del self._pumps[pump.channel]

    async def _tick(self) -> None:
        """One ticker for all connections: heartbeats on idle ones, send timeouts."""
        bounds = [b for b in (self.heartbeat, self.send_timeout) if b and b > 0]
        interval = min(1.0, max(0.005, min(bounds) / 4)) if bounds else 1.0
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            heartbeat = self.heartbeat
            for sub in list(self._subscribers.values()):
                if sub.drainer is not None:
                    if self.send_timeout > 0 and now - sub.stalled_since > self.send_timeout:
                        self.drop(sub, "timeout")
                elif heartbeat > 0 and sub.live and now - sub.last_write >= heartbeat:
                    sub.write(HEARTBEAT)

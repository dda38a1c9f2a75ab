"""Fan-out: one pump per channel hands each batch's bytes to every local subscriber.

Per-delivery cost is wake-ups and syscalls, so a batch (everything appended since the
previous one) is joined into one `bytes` once, and one pass over the channel's
subscribers writes it to each: no task per subscriber wakes up.

On uvicorn with httptools the pass writes the batch, framed as one HTTP/1.1 chunk once,
straight to each connection's transport (see `uvicorn_cycle`). Elsewhere a write drives
the server's ASGI `send(...)` coroutine by hand (`coro.send(None)`): a body chunk's
`send` only suspends when the transport is paused by flow control (the client is not
reading); otherwise it writes and returns at once, so `StopIteration` means "written",
with no task switch. Either way, a paused transport makes the write wait in a small
task (`Subscriber._finish`) while later batches pile up in the subscriber's pending
bytes; past `max_pending` the subscriber is disconnected and resumes from the log with
Last-Event-ID. Any ASGI server works: a `send` that suspends for another reason is
finished the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from ssehub.broker import Batch, Entry

if TYPE_CHECKING:
    from ssehub.server.hub import Hub

logger = logging.getLogger("ssehub.server")

Send = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]
HEARTBEAT = b":\n\n"
# Subscribers written between turns of the event loop in one pass (see `deliver`).
PASS_SLICE = 25
_END: dict[str, Any] = {"type": "http.response.body", "body": b"", "more_body": False}


def as_coroutine_send(send: Callable[[dict[str, Any]], Awaitable[None]]) -> Send:
    """`send` as a function returning coroutines (which the pump drives by hand)."""
    if inspect.iscoroutinefunction(send):
        return send

    async def wrapped(message: dict[str, Any]) -> None:
        await send(message)

    return wrapped


def uvicorn_cycle(send: Callable[..., Any]) -> Any | None:
    """uvicorn's httptools request cycle behind `send`, or None for any other server.

    Writing a chunk costs uvicorn's ASGI `send` ~4 us of Python per call (a coroutine,
    message checks, chunk framing) against ~1 us for `transport.write` of a chunk framed
    once per batch (docs/benchmarks.md), and the fan-out makes one call per subscriber.
    For a body chunk of a chunked response that `send` only writes to the transport,
    so the pump writes there itself while the transport is not paused; anything else
    (the response start, the end, a paused transport) still goes through `send`. Only
    the httptools cycle qualifies: h11's keeps protocol state that `send` must update.
    """
    cycle = getattr(send, "__self__", None)
    if cycle is None or type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl":
        return None
    try:
        ok = (
            cycle.chunked_encoding is True
            and cycle.response_started
            and not cycle.response_complete
            and callable(cycle.transport.write)
            and isinstance(cycle.flow.write_paused, bool)
            and isinstance(cycle.disconnected, bool)
            and cycle.scope["method"] == "GET"
        )
    except (AttributeError, KeyError):
        return None
    return cycle if ok else None


def chunk(data: bytes) -> bytes:
    """`data` framed as one HTTP/1.1 chunk (RFC 9112, 7.1); nothing for no data, as a
    zero-size chunk would end the body."""
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def body(data: bytes) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": True}


class Subscriber:
    """One SSE connection on a channel: a reader at a cursor, plus what it has pending.

    Kept small on purpose (one per idle connection): slots, no task of its own unless a
    write is stuck on flow control.
    """

    __slots__ = (
        "backlog",
        "bytes_sent",
        "channel",
        "cycle",
        "done",
        "drainer",
        "ending",
        "events_sent",
        "floor",
        "hub",
        "id",
        "last_write",
        "live",
        "peer",
        "pending",
        "pending_bytes",
        "reason",
        "send",
        "since",
        "stalled_since",
        "task",
        "user_agent",
    )

    def __init__(
        self,
        hub: Hub,
        id: str,
        channel: str,
        send: Send,
        peer: str,
        user_agent: str,
        cycle: Any | None = None,
    ) -> None:
        self.hub = hub
        self.id = id
        self.channel = channel
        self.send = send
        self.cycle = cycle
        self.peer = peer
        self.user_agent = user_agent
        self.since = time.time()
        self.events_sent = 0
        self.bytes_sent = 0
        self.last_write = time.monotonic()
        # Bytes waiting behind a write stuck on flow control (None: nothing waits).
        self.pending: list[bytes] | None = None
        self.pending_bytes = 0
        self.drainer: asyncio.Task[None] | None = None
        self.stalled_since = 0.0
        # Batches the pump delivered while this subscriber was still replaying.
        self.backlog: list[Sequence[Entry]] | None = []
        self.live = False
        # Replay wrote up to this key; the pump may still be behind it (None: it is not).
        self.floor: tuple[int, int] | None = None
        self.ending = False  # the final chunk is queued: nothing more may be written
        self.done = False  # the final chunk was written or the connection was dropped
        self.reason: str | None = None
        self.task: asyncio.Task[Any] | None = asyncio.current_task()

    def write(self, data: bytes, events: int = 0) -> None:
        """Write `data` now if the transport takes it, else queue it behind the stuck write."""
        if self.ending or self.done:
            return
        self.events_sent += events
        if self.drainer is not None:
            if self.pending is None:
                self.pending = [data]
            else:
                self.pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes > self.hub.max_pending:
                self.hub.drop(self, "slow")
            return
        self._drive(body(data), len(data))

    def write_message(self, message: dict[str, Any], size: int, events: int) -> None:
        """`write` for a message dict shared by every subscriber of a batch."""
        if self.ending or self.done:
            return
        if self.drainer is not None:
            self.write(message["body"], events)
            return
        self.events_sent += events
        self._drive(message, size)

    def end(self) -> None:
        """Finish the response after what is pending: the client sees the stream end."""
        if self.ending or self.done:
            return
        self.ending = True
        if self.drainer is None:
            self._drive(_END, 0)

    def _drive(self, message: dict[str, Any], size: int) -> None:
        cycle = self.cycle
        if cycle is not None and message is not _END and not cycle.flow.write_paused:
            if not cycle.disconnected:
                cycle.transport.write(chunk(message["body"]))
                self._wrote(size, False)
            return
        coro = self.send(message)
        try:
            yielded = coro.send(None)
        except StopIteration:
            self._wrote(size, message is _END)
            return
        except Exception:
            logger.debug("write to subscriber %s failed", self.id, exc_info=True)
            self.hub.drop(self, "error")
            return
        self.suspended(coro, yielded, size, message is _END)

    def suspended(
        self, coro: Coroutine[Any, Any, None], yielded: Any, size: int, final: bool
    ) -> None:
        """A write suspended on flow control: finish it in a task, queue the rest behind."""
        self.stalled_since = time.monotonic()
        self.drainer = self.hub.spawn(self._finish(coro, yielded, size, final))

    def _wrote(self, size: int, final: bool) -> None:
        self.bytes_sent += size
        self.last_write = time.monotonic()
        if final:
            self.done = True

    def _next(self) -> tuple[dict[str, Any], int, bool] | None:
        if self.pending is not None:
            data = b"".join(self.pending)
            self.pending = None
            self.pending_bytes = 0
            return body(data), len(data), False
        if self.ending and not self.done:
            return _END, 0, True
        return None

    async def _finish(
        self, coro: Coroutine[Any, Any, None], yielded: Any, size: int, final: bool
    ) -> None:
        """Finish a write that suspended, then write what piled up meanwhile in one go."""
        try:
            while True:
                while True:
                    if isinstance(yielded, asyncio.Future):
                        # wait(), not await: the future's outcome is the write's to see.
                        await asyncio.wait([yielded])
                    else:
                        await asyncio.sleep(0)  # a bare yield: "run me again soon"
                    try:
                        yielded = coro.send(None)
                    except StopIteration:
                        break
                self._wrote(size, final)
                while True:
                    step = self._next()
                    if step is None:
                        return
                    message, size, final = step
                    coro = self.send(message)
                    try:
                        yielded = coro.send(None)
                    except StopIteration:
                        self._wrote(size, final)
                        continue
                    self.stalled_since = time.monotonic()
                    break
        except asyncio.CancelledError:
            coro.close()
            raise
        except Exception:
            coro.close()
            logger.debug("write to subscriber %s failed", self.id, exc_info=True)
            self.drainer = None
            self.hub.drop(self, "error")
        finally:
            if self.drainer is asyncio.current_task():
                self.drainer = None

    def join(self, last: tuple[int, int] | None) -> None:
        """Go live: write the pump's batches that came during replay, past key `last`.

        The subscriber registered with the pump before it read the log, so an entry
        appended meanwhile is in the replay, in the backlog or in both: keys decide.
        """
        backlog, self.backlog = self.backlog, None
        self.live = True
        self.floor = last
        for batch in backlog or ():
            self.take(batch)

    def take(self, entries: Sequence[Entry]) -> bool:
        """Write the part of a pump batch past `floor`; False when all of it was old.

        The pump can lag behind the log (it was busy), so a subscriber that replayed up
        to key K may still be handed entries up to K: skip them.
        """
        floor = self.floor
        if floor is not None and entries[0].key <= floor:
            fresh = [e for e in entries if e.key > floor]
            if not fresh:
                return False
            entries = fresh
        self.floor = None
        self.write(b"".join(e.wire for e in entries), len(entries))
        return True


class ChannelPump:
    """Consumes `broker.tail` for one channel and writes each batch to its subscribers."""

    def __init__(self, hub: Hub, channel: str) -> None:
        self.hub = hub
        self.channel = channel
        self.subscribers: dict[str, Subscriber] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.task = hub.spawn(self._run())

    async def _run(self) -> None:
        stream = self.hub.stream(self.channel)
        try:
            info = await self.hub.broker.info(stream)
            after = info.last_id if info is not None else None
        except Exception as exc:
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved: the joiners waiting on it get it raised
            self.hub.pump_ended(self)
            raise
        self.ready.set_result(None)
        try:
            async for batch in self.hub.broker.tail(stream, after):
                if not self.subscribers:
                    # Retired (the hub made a new pump for any later subscriber), but
                    # its cancel was lost: Python 3.11's `wait_for`, in redis-py, can drop
                    # one (CPython gh-86296).
                    break
                await self.deliver(batch)
                if batch.closed:
                    break
        finally:
            self.closed = True
            self.hub.pump_ended(self)
            for sub in list(self.subscribers.values()):
                if sub.live:
                    sub.end()

    async def deliver(self, batch: Batch) -> None:
        """One pass over the subscribers, writing the whole batch to each.

        The pass gives the loop a turn every `PASS_SLICE` subscribers. Publishers are
        served meanwhile, so their events wait in the log and the next batch carries all of
        them. With one event per pass, every event would cost one write per subscriber.
        Without the turns, a pass over 10,000 subscribers would also hold up every request
        for its whole length. Subscribers that join or leave during a turn are handled as
        they are (`take`, `backlog`, `done`). The next batch starts after this pass, so
        each subscriber still gets events in order.
        """
        entries = batch.entries
        if not entries and not batch.closed:
            return
        if entries:
            data = b"".join(e.wire for e in entries)
            # One message dict for all: ASGI servers only read it.
            message = body(data)
            size = len(data)
            n = len(entries)
            live = 0
            now = time.monotonic()
            framed: bytes | None = None
            for i, sub in enumerate(list(self.subscribers.values())):
                if i and not i % PASS_SLICE:
                    await asyncio.sleep(0)
                    now = time.monotonic()
                if (
                    sub.live
                    and sub.floor is None
                    and sub.drainer is None
                    and not sub.ending
                    and not sub.done
                ):
                    # The common case, inlined: this loop is the per-delivery cost.
                    cycle = sub.cycle
                    if cycle is not None and not cycle.flow.write_paused:
                        if not cycle.disconnected:
                            if framed is None:
                                framed = chunk(data)
                            cycle.transport.write(framed)
                            sub.events_sent += n
                            sub.bytes_sent += size
                            sub.last_write = now
                            live += 1
                        continue
                    coro = sub.send(message)
                    try:
                        yielded = coro.send(None)
                    except StopIteration:
                        sub.events_sent += n
                        sub.bytes_sent += size
                        sub.last_write = now
                        live += 1
                        continue
                    except Exception:
                        logger.debug("write to subscriber %s failed", sub.id, exc_info=True)
                        self.hub.drop(sub, "error")
                        continue
                    sub.events_sent += n
                    sub.suspended(coro, yielded, size, False)
                    live += 1
                elif sub.live:
                    if sub.floor is None:
                        sub.write_message(message, size, n)
                        live += 1
                    elif sub.take(entries):
                        live += 1
                elif sub.backlog is not None:
                    sub.backlog.append(entries)
            self.hub.delivered += n * live
        if batch.closed:
            self.closed = True
            for sub in list(self.subscribers.values()):
                if sub.live:
                    sub.end()


async def call_hook(hook: Callable[..., Any] | None, *args: Any) -> None:
    """Run a user callback (sync or async); its errors are logged, never raised."""
    if hook is None:
        return
    try:
        result = hook(*args)
        if asyncio.iscoroutine(result):
            await result
    except Exception:
        logger.exception("callback %r failed", hook)

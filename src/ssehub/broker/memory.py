"""`MemoryBroker`: the broker contract kept in process memory (the embedded default).

Each stream is a list of entries in id order plus a start offset, so trimming the head is
O(1) and a cursor is found by bisection. Waiting tails share one future per stream that
is resolved (and replaced) by the next append or close: a burst of appends while a tail is
busy wakes it once, and it then takes everything since its cursor as one batch.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator, Sequence

from ssehub.broker.base import (
    Batch,
    Broker,
    Entry,
    Retention,
    StreamClosed,
    StreamInfo,
    format_id,
    parse_id,
)

# Compact the entry list once this many trimmed slots sit at its head.
_COMPACT_AT = 1024


def _entry_key(entry: Entry) -> tuple[int, int]:
    return entry.key


class _Log:
    __slots__ = (
        "changed",
        "closed",
        "entries",
        "expiry",
        "first_key",
        "head",
        "last_key",
        "tails",
        "trimmed_key",
    )

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.head = 0  # entries[:head] are trimmed
        self.last_key: tuple[int, int] | None = None
        # The first id this stream ever had (trimming does not change it): a cursor older
        # than it is not one of this stream's, e.g. from an earlier stream of that name.
        self.first_key: tuple[int, int] | None = None
        # The newest id dropped by trimming: a cursor older than it missed something.
        self.trimmed_key: tuple[int, int] | None = None
        self.closed = False
        self.changed: asyncio.Future[None] | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.tails = 0  # tails following this log object

    @property
    def placeholder(self) -> bool:
        """Made by a tail waiting for a stream that was never appended to."""
        return self.last_key is None and not self.closed and self.trimmed_key is None

    def __len__(self) -> int:
        return len(self.entries) - self.head

    def wake(self) -> None:
        if self.changed is not None:
            if not self.changed.done():
                self.changed.set_result(None)
            self.changed = None

    def trim(self, retention: Retention, now_ms: int) -> None:
        drop = self.head
        end = len(self.entries)
        if retention.max_len is not None and end - drop > retention.max_len:
            drop = end - retention.max_len
        if retention.max_age is not None:
            oldest_ms = now_ms - int(retention.max_age * 1000)
            # Entry ids carry their append time in ms, so age is read off the id.
            drop = max(
                drop, bisect.bisect_left(self.entries, (oldest_ms, 0), drop, end, key=_entry_key)
            )
        if drop > self.head:
            self.trimmed_key = self.entries[drop - 1].key
            self.head = drop
            if self.head >= _COMPACT_AT and self.head * 2 >= len(self.entries):
                del self.entries[: self.head]
                self.head = 0

    def after(self, key: tuple[int, int] | None, limit: int) -> list[Entry]:
        start = self.head
        if key is not None:
            start = bisect.bisect_right(self.entries, key, self.head, key=_entry_key)
        return self.entries[start : start + limit]

    def resolve(
        self, cursor: str | None, born: tuple[int, int]
    ) -> tuple[tuple[int, int] | None, bool]:
        """The key to read after for `cursor`, and whether the reader has a gap."""
        if cursor is None:
            return None, False
        key = parse_id(cursor)
        if key is None:
            return None, True
        if key < born and key != (0, 0):
            # An id from before this broker existed (an earlier process): what followed
            # it there is gone. `0-0` is the explicit "from the start", never a gap.
            return None, True
        if key != (0, 0) and (self.first_key is None or key < self.first_key):
            # Not an id this stream ever had: older than its first (an earlier stream of
            # that name, expired and begun again), or given before it had any. What
            # followed the cursor where it came from is not here: the reader is told.
            return None, True
        if self.last_key is not None and key > self.last_key:
            return None, True  # from the future: not an id of this stream
        if self.trimmed_key is not None and key < self.trimmed_key:
            return None, True  # entries after the cursor were trimmed away
        return key, False


class MemoryBroker(Broker):
    """Named logs in this process's memory; ids are `<wall ms>-<seq>`.

    `retention` applies when `append` is given none; a closed stream is deleted
    `closed_ttl` seconds after `close` unless told otherwise.
    """

    def __init__(self, retention: Retention | None = None, closed_ttl: float = 3600.0) -> None:
        self.retention = retention or Retention()
        self.closed_ttl = closed_ttl
        self._logs: dict[str, _Log] = {}
        # Ids before this are another process's: its entries died with it.
        self._born = (self._now_ms(), 0)

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    def _trimmed(self, stream: str) -> _Log | None:
        log = self._logs.get(stream)
        if log is not None and self.retention.max_age is not None and not log.closed:
            # Age trimming also happens on reads, so an idle stream does not serve stale
            # entries; closed streams keep their ending until they expire.
            log.trim(Retention(max_len=None, max_age=self.retention.max_age), self._now_ms())
        return log

    async def append(
        self,
        stream: str,
        events: Sequence[tuple[str, str]],
        retention: Retention | None = None,
    ) -> list[Entry]:
        log = self._logs.get(stream)
        if log is None:
            log = self._logs[stream] = _Log()
        elif log.closed:
            raise StreamClosed(f"stream {stream!r} is closed")
        # Build every entry before storing any, so a bad event type stores nothing.
        now = self._now_ms()
        ms, seq = log.last_key if log.last_key is not None else (0, -1)
        new: list[Entry] = []
        for event, data in events:
            if now > ms:
                ms, seq = now, 0
            else:
                seq += 1  # same ms (or the clock stepped back): keep ids increasing
            new.append(Entry.make(format_id((ms, seq)), event, data))
        if not new:
            return new
        log.entries.extend(new)
        if log.first_key is None:
            log.first_key = new[0].key
        log.last_key = new[-1].key
        log.trim(retention or self.retention, now)
        log.wake()
        return new

    async def read(self, stream: str, after: str | None, limit: int = 1000) -> Batch:
        log = self._trimmed(stream)
        if log is None:
            return Batch((), gap=_Log().resolve(after, self._born)[1])
        key, gap = log.resolve(after, self._born)
        entries = log.after(key, limit)
        closed = log.closed and (not entries or entries[-1].key == log.last_key)
        return Batch(entries, gap=gap, closed=closed)

    async def tail(self, stream: str, after: str | None) -> AsyncIterator[Batch]:
        log = self._trimmed(stream)
        if log is None:
            # Not there yet: follow a placeholder that the first append fills.
            log = self._logs[stream] = _Log()
        key, gap = log.resolve(after, self._born)
        log.tails += 1
        try:
            while True:
                entries = log.after(key, len(log.entries))
                # A reader whose cursor was trimmed away while it waited lost entries too.
                if key is not None and log.trimmed_key is not None and key < log.trimmed_key:
                    gap = True
                if entries or gap or log.closed:
                    if entries:
                        key = entries[-1].key
                    # Closed also covers a deleted or expired stream: the log object is gone.
                    # Decided before the yield: entries appended while the reader was busy
                    # with this batch, then the close, belong to the next batch.
                    closed = log.closed
                    yield Batch(entries, gap=gap, closed=closed)
                    if closed:
                        return
                    gap = False
                    continue
                loop = asyncio.get_running_loop()
                # (A future of another loop is left from an app served before, then stopped.)
                if log.changed is None or log.changed.get_loop() is not loop:
                    log.changed = loop.create_future()
                # Shielded: a cancelled tail must not resolve the future other tails share.
                await asyncio.shield(log.changed)
        finally:
            log.tails -= 1
            # Nobody waits for a stream that never came: do not keep its placeholder.
            if not log.tails and log.placeholder and self._logs.get(stream) is log:
                del self._logs[stream]

    async def close(self, stream: str, expire_after: float | None = None) -> None:
        log = self._logs.get(stream)
        if log is None:
            log = self._logs[stream] = _Log()
        log.closed = True
        log.wake()
        ttl = self.closed_ttl if expire_after is None else expire_after
        if log.expiry is not None:
            log.expiry.cancel()
        log.expiry = asyncio.get_running_loop().call_later(ttl, self._expire, stream, log)

    def _expire(self, stream: str, log: _Log) -> None:
        if self._logs.get(stream) is log:
            del self._logs[stream]
            log.wake()

    async def info(self, stream: str) -> StreamInfo | None:
        log = self._trimmed(stream)
        if log is None or log.placeholder:
            return None
        length = len(log)
        return StreamInfo(
            first_id=log.entries[log.head].id if length else None,
            last_id=format_id(log.last_key) if log.last_key is not None else None,
            length=length,
            closed=log.closed,
        )

    async def delete(self, stream: str) -> None:
        log = self._logs.pop(stream, None)
        if log is not None:
            if log.expiry is not None:
                log.expiry.cancel()
            log.closed = True  # tails of the deleted stream end
            log.wake()

    async def aclose(self) -> None:
        for log in self._logs.values():
            if log.expiry is not None:
                log.expiry.cancel()
            log.closed = True
            log.wake()
        self._logs.clear()

"""`RedisBroker`: the broker contract on Redis Streams, shared by every process and node.

Each log is one Redis stream (`<prefix>s:<stream>`), so ids are the ids Redis hands out
and a cursor from any node is a cursor on every other. Retention trims with exact `MAXLEN`
and `MINID` (Redis time minus `max_age`), exact because `Retention` is an upper bound.

A closed stream ends with a tombstone entry (field `c`) and an expiry on its key: the
tombstone travels through the same `XREAD` as the events, so a tail on any node sees
"closed" right after the last event, in order, with no second channel to race.

Live delivery: one reader task per process blocks in a single `XREAD` over every stream
tailed here and fans each fetch out to the local tails through a shared `_Feed` (the
entries are decoded and SSE-encoded once per process). A new stream wakes the blocked
read through a private wake stream. Tails never hold a Redis connection; a tail that
falls behind the feed's window reads the log itself, which is also where gaps are found.

Leases: a producer (a completion run) holds `lease(stream)`; if its process dies, the
lease deadline passes, and the first idle reader anywhere appends the producer's `lost`
event and closes the stream, so readers never hang on a stream nobody writes.

Members: a process that `join`s renews its entry in a sorted set with a deadline, as tails
announce themselves, and answers questions that come on its pub/sub connection, the one
stop requests come on; `ask` publishes a question and collects the answers there.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ssehub.broker.base import (
    PRODUCER_LOST,
    Answerer,
    Answers,
    Batch,
    Broker,
    BrokerError,
    BrokerUnavailable,
    Entry,
    Member,
    Retention,
    StreamClosed,
    StreamInfo,
    format_id,
    parse_id,
)

log = logging.getLogger("ssehub.broker.redis")

_EVENT, _DATA, _CLOSED = "e", "d", "c"
_CLOSED_ERROR = "SSEHUB_CLOSED"
_ZERO = "0-0"
# Entries a feed keeps for its tails; a tail further behind reads the log in Redis.
_FEED_WINDOW = 1024
# Entries one XREAD takes per stream; a stream with more waiting is read again at once.
_READ_COUNT = 1000
# An idle stream found without a lease is asked again less and less often, up to this.
_LEASE_CHECK_MAX = 30.0
# After this process could not reach Redis, its producers could not either: it gives them
# this long (the default lease time) to renew before it ends their streams as orphans.
_REAP_GRACE = 5.0

# The Lua scripts run atomically in Redis: "is it closed?" and the write that depends on
# the answer cannot be split by another node's close. Ages use Redis's clock (TIME), the
# same clock that makes the ids, so nodes with skewed clocks still agree.
_NOW_MS = (
    "local t = redis.call('TIME') "
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"
)
_IS_CLOSED = (
    "local function is_closed(key) "
    "local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1) "
    "return #last > 0 and last[1][2][1] == 'c' end"
)

# KEYS: stream. ARGV: max_len ('' = none), max_age ms ('' = none), then event, data pairs.
_APPEND = f"""
{_IS_CLOSED}
if is_closed(KEYS[1]) then return redis.error_reply('{_CLOSED_ERROR}') end
local ids = {{}}
for i = 3, #ARGV, 2 do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'e', ARGV[i], 'd', ARGV[i + 1])
end
-- XTRIM does not record what it removed, so the newest removed id is looked up first
-- and kept as the stream's max-deleted-entry-id: `read` tells a gap by it.
local deleted = nil
if ARGV[1] ~= '' then
  local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[1])
  if excess > 0 then
    local old = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)
    deleted = old[#old][1]
    redis.call('XTRIM', KEYS[1], 'MAXLEN', '=', ARGV[1])
  end
end
if ARGV[2] ~= '' then
  {_NOW_MS}
  local oldest = string.format('%d', now - tonumber(ARGV[2]))
  if tonumber(oldest) > 0 then
    local old = redis.call('XREVRANGE', KEYS[1], '(' .. oldest .. '-0', '-', 'COUNT', 1)
    if #old > 0 then
      deleted = old[1][1]
      redis.call('XTRIM', KEYS[1], 'MINID', '=', oldest .. '-0')
    end
  end
end
if deleted then redis.call('XSETID', KEYS[1], ids[#ids], 'MAXDELETEDID', deleted) end
return ids
"""

# KEYS: stream. ARGV: max_age ms ('' = none), cursor ('' = from the oldest), count.
# Trims by age first (as appends do), so an idle stream does not replay stale entries.
# Returns nil for no stream, else {last generated id, max deleted id, items, first id}.
# With nothing ever deleted, the first entry is the first the stream ever had.
_READ = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
{_IS_CLOSED}
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last, deleted
local first = ''
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] end
  if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
  if info[i] == 'first-entry' and info[i + 1] then first = info[i + 1][1] end
end
if ARGV[1] ~= '' and not is_closed(KEYS[1]) then
  {_NOW_MS}
  local oldest = string.format('%d', now - tonumber(ARGV[1]))
  if tonumber(oldest) > 0 then
    local old = redis.call('XREVRANGE', KEYS[1], '(' .. oldest .. '-0', '-', 'COUNT', 1)
    if #old > 0 then
      deleted = old[1][1]
      redis.call('XTRIM', KEYS[1], 'MINID', '=', oldest .. '-0')
      redis.call('XSETID', KEYS[1], last, 'MAXDELETEDID', deleted)
    end
  end
end
local start = '-'
if ARGV[2] ~= '' then start = '(' .. ARGV[2] end
return {{last, deleted, redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', ARGV[3]), first}}
"""

# KEYS: stream, lease. ARGV: expire ms.
_CLOSE = f"""
{_IS_CLOSED}
if not is_closed(KEYS[1]) then redis.call('XADD', KEYS[1], '*', 'c', '1') end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: stream, lease. ARGV: ttl ms, keep ms, the lost events as a JSON list of pairs.
# Returns 0 when the stream is already closed: the holder lost it and should stop;
# 2 when someone asked the holder to stop (`_STOP`), else 1.
_RENEW = f"""
{_IS_CLOSED}
if is_closed(KEYS[1]) then return 0 end
local stop = redis.call('HGET', KEYS[2], 'stop')
{_NOW_MS}
local deadline = string.format('%d', now + tonumber(ARGV[1]))
redis.call('HSET', KEYS[2], 'deadline', deadline, 'lost', ARGV[3])
local keep = tonumber(ARGV[1]) + tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[2], keep)
-- Should the holder die and nobody come to read, the stream still goes away.
redis.call('PEXPIRE', KEYS[1], keep)
if stop then return 2 end
return 1
"""

# KEYS: stream, lease. ARGV: the stop channel, the stream's name.
# Asks a live lease holder to stop: a flag its next renewal finds (never lost) and a
# message its process's subscription gets at once (prompt). Returns 1 when there is a
# live holder to ask, else 0 (no lease, lapsed, or the stream is closed).
_STOP = f"""
local deadline = redis.call('HGET', KEYS[2], 'deadline')
if not deadline then return 0 end
{_NOW_MS}
if tonumber(deadline) < now then return 0 end
{_IS_CLOSED}
if is_closed(KEYS[1]) then return 0 end
redis.call('HSET', KEYS[2], 'stop', '1')
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

# KEYS: stream, lease. ARGV: keep ms, '1' to end it now (the holder left without closing).
# Returns 1 when it ended the stream with the holder's `lost` events, 0 when the lease
# holds, -1 when there is no lease.
_REAP = f"""
local lease = redis.call('HMGET', KEYS[2], 'deadline', 'lost')
if not lease[1] then return -1 end
if ARGV[2] ~= '1' then
  {_NOW_MS}
  if tonumber(lease[1]) >= now then return 0 end
end
redis.call('DEL', KEYS[2])
{_IS_CLOSED}
if is_closed(KEYS[1]) then return 0 end
for _, pair in ipairs(cjson.decode(lease[2])) do
  redis.call('XADD', KEYS[1], '*', 'e', pair[1], 'd', pair[2])
end
redis.call('XADD', KEYS[1], '*', 'c', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


# Presence: which processes tail a leased stream, so that its producer can tell that it
# is read elsewhere. A sorted set per stream, process id -> deadline (Redis ms).
# KEYS: presence keys. ARGV: process id, ttl ms, then '1'/'0' per key: only if leased.
_PRESENT = f"""
{_NOW_MS}
local n = 0
for i, key in ipairs(KEYS) do
  if ARGV[2 + i] == '0' or redis.call('EXISTS', ARGV[2 + #KEYS + i]) == 1 then
    redis.call('ZADD', key, now + tonumber(ARGV[2]), ARGV[1])
    redis.call('PEXPIRE', key, ARGV[2])
    n = n + 1
  end
end
return n
"""

# KEYS: presence key. ARGV: this process's id. Returns how many other processes tail it.
_ELSEWHERE = f"""
{_NOW_MS}
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if member ~= ARGV[1] then n = n + 1 end
end
return n
"""

# Members: the processes that joined, process id -> deadline (Redis ms), and what each
# said of itself. KEYS: members, abouts. ARGV: process id, ttl ms, about (JSON).
# Renewing also forgets members that died, so neither key grows with restarts.
_FORGET_DEAD = (
    "for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do "
    "redis.call('HDEL', KEYS[2], dead) end "
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)"
)
_JOIN = f"""
{_NOW_MS}
{_FORGET_DEAD}
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
-- Both go away should every member die.
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: members, abouts. Returns the live members as a flat list: id, about, id, about...
_MEMBERS = f"""
{_NOW_MS}
{_FORGET_DEAD}
local flat = {{}}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  flat[#flat + 1] = member
  flat[#flat + 1] = redis.call('HGET', KEYS[2], member) or '{{}}'
end
return flat
"""

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    OSError,
)


_Items = Sequence[tuple[str, dict[str, str]]]


def _about(value: Any) -> dict[str, Any]:
    """A member's self-description, from JSON text or as received."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    return value if isinstance(value, dict) else {}


def _key_of(entry: Entry) -> tuple[int, int]:
    return entry.key


def _after(entries: Sequence[Entry], key: tuple[int, int]) -> Sequence[Entry]:
    return entries[bisect.bisect_right(entries, key, key=_key_of) :]


def _entries(items: Sequence[tuple[str, dict[str, str]]]) -> tuple[list[Entry], bool]:
    """Stream items as entries, and whether the tombstone was among them."""
    entries: list[Entry] = []
    for entry_id, fields in items:
        if _CLOSED in fields:
            return entries, True
        try:
            entry = Entry.make(entry_id, fields.get(_EVENT, "message"), fields.get(_DATA, ""))
        except ValueError as exc:
            # Not written by `append` (which checks first): skipped, never fatal to readers.
            log.warning("skipping stream entry %s: %s", entry_id, exc)
            continue
        entries.append(entry)
    return entries, False


class _Feed:
    """One stream tailed in this process: the reader's cursor and the entries it fetched.

    `entries` hold every entry after `covered` up to `cursor`; a tail at or past
    `covered` takes its batch from here, one further behind reads Redis.
    """

    __slots__ = (
        "changed",
        "check_at",
        "check_every",
        "closed",
        "covered",
        "cursor",
        "entries",
        "epoch",
        "idle_since",
        "key",
        "leased",
        "stream",
        "tails",
    )

    def __init__(self, stream: str, key: str, cursor: str) -> None:
        self.stream = stream
        self.key = key
        self.tails = 0
        self.leased = False
        self.cursor = cursor
        self.covered = parse_id(cursor) or (0, 0)
        self.entries: list[Entry] = []
        self.closed = False
        # Bumped when Redis came back: tails re-check their cursor against the log.
        self.epoch = 0
        self.idle_since = time.monotonic()
        self.check_at = 0.0
        self.check_every = 0.0
        self.changed = asyncio.Event()

    def push(self, entries: list[Entry], closed: bool) -> None:
        self.entries.extend(entries)
        if len(self.entries) > _FEED_WINDOW:
            drop = len(self.entries) - _FEED_WINDOW // 2
            self.covered = self.entries[drop - 1].key
            del self.entries[:drop]
        self.closed = self.closed or closed
        self.idle_since = time.monotonic()
        self.wake()

    def reset(self) -> None:
        self.entries.clear()
        self.covered = parse_id(self.cursor) or (0, 0)
        self.epoch += 1
        self.wake()

    def wake(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class RedisBroker(Broker):
    """Logs as Redis Streams at `url` (`redis://host:port/db`); see the module docstring.

    `retention` applies when `append` is given none; a closed stream is deleted
    `closed_ttl` seconds after `close` unless told otherwise. `prefix` starts every key.
    `lease_check` is how often idle tails ask whether a stream's producer is still alive.
    """

    def __init__(
        self,
        url: str,
        *,
        retention: Retention | None = None,
        closed_ttl: float = 3600.0,
        prefix: str = "ssehub:",
        max_connections: int = 32,
        timeout: float = 5.0,
        block: float = 5.0,
        lease_check: float = 1.0,
    ) -> None:
        self.url = url
        self.retention = retention or Retention()
        self.closed_ttl = closed_ttl
        self.prefix = prefix
        self.lease_check = lease_check
        self._presence_ms = int(lease_check * 3000)
        self._block_ms = int(block * 1000)
        # One retry covers a pooled connection that died with a Redis restart; when Redis
        # is down the connect is refused at once and the caller hears it fast.
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"not a Redis URL: {url!r} (redis://host:port/db, rediss://... or unix:///path)"
            )
        retry = Retry(ExponentialBackoff(cap=0.2, base=0.02), 1)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            decode_responses=True,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=retry,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        # The reader's blocking XREAD holds its own connection for as long as it blocks.
        self._reader_redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=timeout,
            socket_timeout=block + timeout,
            single_connection_client=True,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 0),
        )
        self._append = self._redis.register_script(_APPEND)
        self._close = self._redis.register_script(_CLOSE)
        self._renew = self._redis.register_script(_RENEW)
        self._reap = self._redis.register_script(_REAP)
        self._read = self._redis.register_script(_READ)
        self._present = self._redis.register_script(_PRESENT)
        self._elsewhere = self._redis.register_script(_ELSEWHERE)
        self._stop = self._redis.register_script(_STOP)
        self._join_script = self._redis.register_script(_JOIN)
        self._members = self._redis.register_script(_MEMBERS)
        self._process = uuid.uuid4().hex[:12]
        self.process = self._process
        # One pub/sub connection per process, once it needs one: stop requests for leases
        # held here (`_STOP`), questions to every member, and questions to this process
        # and answers to its own questions (its inbox).
        self._stop_channel = f"{prefix}stop"
        self._ask_channel = f"{prefix}ask"
        self._inbox = self._inbox_of(self._process)
        # (Named for what it did first; tests reach for it by this name.)
        self._stop_listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._membership: asyncio.Task[None] | None = None
        self._about_json = "{}"
        self._asking: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self._wake_key = f"{prefix}w:{self._process}"
        self._feeds: dict[str, _Feed] = {}
        self._feeds_changed = asyncio.Event()
        self._available = True
        self._back_at = -_REAP_GRACE
        self._back = asyncio.Event()
        self._back.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # -- keys and errors --------------------------------------------------------------

    def _stream_key(self, stream: str) -> str:
        return f"{self.prefix}s:{stream}"

    def _lease_key(self, stream: str) -> str:
        return f"{self.prefix}l:{stream}"

    def _presence_key(self, stream: str) -> str:
        return f"{self.prefix}t:{stream}"

    def _member_keys(self) -> list[str]:
        return [f"{self.prefix}members", f"{self.prefix}members:about"]

    def _inbox_of(self, process: str) -> str:
        return f"{self.prefix}to:{process}"

    @property
    def available(self) -> bool:
        """False from a failed Redis call until the next one that succeeds."""
        return self._available

    def _up(self) -> None:
        if not self._available:
            log.warning("redis at %s is reachable again", self.url)
            self._back_at = time.monotonic()
        self._available = True
        self._back.set()

    def _down(self, exc: BaseException) -> None:
        if self._available:
            log.warning("redis at %s is unavailable: %r", self.url, exc)
        self._available = False
        self._back.clear()

    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        """Redis errors as broker errors; track whether Redis answers."""
        try:
            yield
        except _UNAVAILABLE as exc:
            self._down(exc)
            raise BrokerUnavailable(f"redis at {self.url} is unavailable: {exc}") from exc
        except redis_errors.ResponseError as exc:
            if str(exc).startswith("LOADING"):
                self._down(exc)
                raise BrokerUnavailable(f"redis at {self.url} is loading its data") from exc
            if _CLOSED_ERROR in str(exc):
                raise StreamClosed("stream is closed") from None
            raise BrokerError(f"redis at {self.url} refused: {exc}") from exc
        self._up()

    async def ping(self) -> bool:
        """Whether Redis answers now."""
        try:
            with self._calling():
                await self._redis.ping()
        except BrokerError:
            return False
        return True

    async def tailed_elsewhere(self, stream: str) -> bool:
        """Whether a tail in another process follows `stream`, a stream with a lease.

        Tails announce themselves when they start and every `lease_check` seconds after;
        an announcement lasts three of those.
        """
        with self._calling():
            others = await self._elsewhere(keys=[self._presence_key(stream)], args=[self._process])
        return bool(others)

    # -- the contract -----------------------------------------------------------------

    async def append(
        self,
        stream: str,
        events: Sequence[tuple[str, str]],
        retention: Retention | None = None,
    ) -> list[Entry]:
        if not events:
            return []
        # Encode before writing, so an event the encoder refuses stores nothing.
        checked = [Entry.make(_ZERO, event, data) for event, data in events]
        retention = retention or self.retention
        args: list[str] = [
            "" if retention.max_len is None else str(retention.max_len),
            "" if retention.max_age is None else str(int(retention.max_age * 1000)),
        ]
        for entry in checked:
            args += (entry.event, entry.data)
        try:
            with self._calling():
                ids = await self._append(keys=[self._stream_key(stream)], args=args)
        except StreamClosed:
            raise StreamClosed(f"stream {stream!r} is closed") from None
        return [Entry.make(i, e.event, e.data) for i, e in zip(ids, checked, strict=True)]

    async def read(self, stream: str, after: str | None, limit: int = 1000) -> Batch:
        batch, _ = await self._read_log(stream, after, limit)
        return batch

    async def _read_log(self, stream: str, after: str | None, limit: int) -> tuple[Batch, str]:
        """`read`, and the cursor to go on from: the last entry's id, or with no entry
        the stream's newest id (everything up to it is gone), so a reader that got a gap
        and nothing else does not ask again from before the gap."""
        cursor = parse_id(after) if after is not None else None
        valid = after if after is not None and cursor is not None else None
        # Malformed: the reader is told, then gets everything from the oldest.
        malformed = after is not None and cursor is None
        max_age = self.retention.max_age
        with self._calling():
            reply = await self._read(
                keys=[self._stream_key(stream)],
                args=["" if max_age is None else int(max_age * 1000), valid or "", limit + 1],
            )
        if reply is None:
            # No such stream (yet): a cursor other than the start's is not one of its ids
            # (from an earlier stream of that name, or a Redis that lost it), so the
            # reader is told, then reads the stream from its start once it is there.
            return Batch((), gap=malformed or cursor not in (None, (0, 0))), _ZERO
        last_id, deleted_id, raw, first_id = reply
        # Lua hands back an entry's fields as a flat list.
        items: _Items = [(i, dict(zip(f[::2], f[1::2], strict=True))) for i, f in raw]
        gap = malformed
        if cursor is not None:
            last = parse_id(last_id) or (0, 0)
            deleted = parse_id(deleted_id) or (0, 0)
            # As MemoryBroker: a cursor past the newest id is not of this stream, one
            # older than the newest trimmed id missed what was trimmed, and one older
            # than the first id the stream ever had (the first entry when nothing was
            # ever trimmed, else older than the trimmed: caught by that) is not of this
            # stream either. `0-0` is the start: never unknown.
            first = parse_id(first_id) if first_id else None
            unknown = cursor != (0, 0) and deleted == (0, 0) and (first is None or cursor < first)
            if cursor > last or cursor < deleted or unknown:
                gap = True
                with self._calling():
                    items = cast(
                        _Items,
                        await self._redis.xrange(
                            self._stream_key(stream), "-", "+", count=limit + 1
                        ),
                    )
        batch = self._batch(items, limit)
        end = batch.entries[-1].id if batch.entries else last_id
        return Batch(batch.entries, gap=gap, closed=batch.closed), end

    def _batch(self, items: Sequence[tuple[str, dict[str, str]]], limit: int) -> Batch:
        entries, closed = _entries(items[: limit + 1])
        if len(entries) > limit:
            return Batch(entries[:limit])
        return Batch(entries, closed=closed)

    async def tail(self, stream: str, after: str | None) -> AsyncIterator[Batch]:
        page = 1000
        batch, cursor = await self._read_log(stream, after, page)
        key = self._stream_key(stream)
        # Catch up from the log itself, a page at a time, before joining the live feed.
        while True:
            if batch.entries or batch.gap or batch.closed:
                yield batch
            if batch.closed:
                return
            if len(batch.entries) < page:
                break
            batch, cursor = await self._read_log(stream, cursor, page)
        feed = await self._join(stream, key, cursor)
        try:
            epoch = feed.epoch
            position = parse_id(cursor) or (0, 0)
            while True:
                changed = feed.changed
                if feed.epoch != epoch or position < feed.covered:
                    # Behind the feed's window, or Redis came back: ask the log, which
                    # also tells whether anything after the cursor was lost.
                    epoch = feed.epoch
                    try:
                        batch, cursor = await self._read_log(stream, cursor, page)
                    except BrokerUnavailable:
                        await self._back.wait()
                        continue
                    position = parse_id(cursor) or (0, 0)
                    if len(batch.entries) < page and position < feed.covered:
                        # The log has nothing more: what the feed dropped from its window
                        # is in this read or gone with a Redis that lost it. Never ask again.
                        position = feed.covered
                        cursor = format_id(position)
                    if batch.entries or batch.gap or batch.closed:
                        yield batch
                    if batch.closed:
                        return
                    if len(batch.entries) == page:
                        continue
                else:
                    entries = _after(feed.entries, position)
                    if entries:
                        closed = feed.closed and entries[-1] is feed.entries[-1]
                        cursor, position = entries[-1].id, entries[-1].key
                        yield Batch(entries, closed=closed)
                        if closed:
                            return
                        continue
                    if feed.closed:
                        yield Batch((), closed=True)
                        return
                await changed.wait()
        finally:
            feed.tails -= 1
            if feed.tails == 0 and self._feeds.get(key) is feed:
                del self._feeds[key]

    async def close(self, stream: str, expire_after: float | None = None) -> None:
        ttl = self.closed_ttl if expire_after is None else expire_after
        with self._calling():
            await self._close(
                keys=[self._stream_key(stream), self._lease_key(stream)],
                args=[max(1, int(ttl * 1000))],
            )

    async def info(self, stream: str) -> StreamInfo | None:
        key = self._stream_key(stream)
        with self._calling():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xinfo_stream(key)
                pipe.xrevrange(key, "+", "-", count=2)
                info, newest = await pipe.execute(raise_on_error=False)
        if isinstance(info, BaseException):
            return None
        assert not isinstance(newest, BaseException), newest
        closed = bool(newest) and _CLOSED in newest[0][1]
        length: int = info["length"] - closed
        first = info["first-entry"]
        last_id: str | None = info["last-generated-id"]
        if closed:
            last_id = newest[1][0] if len(newest) > 1 else None
            if last_id is None and info["max-deleted-entry-id"] != _ZERO:
                last_id = info["max-deleted-entry-id"]
        elif last_id == _ZERO:
            last_id = None
        first_id = first[0] if first and length else None
        return StreamInfo(first_id=first_id, last_id=last_id, length=length, closed=closed)

    async def delete(self, stream: str) -> None:
        key = self._stream_key(stream)
        with self._calling():
            # The tombstone wakes tails on other nodes before the key goes.
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(key, {_CLOSED: "1"})
                pipe.delete(key, self._lease_key(stream))
                await pipe.execute()
        feed = self._feeds.get(key)
        if feed is not None:
            feed.push([], closed=True)

    async def aclose(self) -> None:
        if self._membership is not None:
            await self.leave()
        self._closing = True
        if self._stop_listener is not None:
            self._tasks.append(self._stop_listener)
            self._stop_listener = None
        self._tasks += self._answering
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for feed in self._feeds.values():
            feed.push([], closed=True)
        with contextlib.suppress(Exception):
            await self._reader_redis.aclose()
        with contextlib.suppress(Exception):
            await self._redis.aclose()
            await self._redis.connection_pool.disconnect()

    # -- leases -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self,
        stream: str,
        ttl: float = 5.0,
        lost: Sequence[tuple[str, str]] | None = None,
        on_stop: Callable[[], object] | None = None,
    ) -> AsyncIterator[None]:
        """Hold `stream` as its producer; see `Broker.lease`.

        The lease is renewed every `ttl / 3` seconds; readers anywhere end the stream with
        `lost` once it has not been renewed for `ttl` seconds. A stop request from any
        node reaches `on_stop` through this process's subscription to the stop channel
        at once, or at the next renewal should that message be missed.
        """
        if on_stop is not None:
            self._listen()
        # Checked by the encoder here, so a reader never trips on them later.
        pairs = [[e.event, e.data] for e in (Entry.make(_ZERO, *p) for p in lost or PRODUCER_LOST)]
        keys = [self._stream_key(stream), self._lease_key(stream)]
        args: list[str | int] = [
            int(ttl * 1000),
            int(self.closed_ttl * 1000),
            json.dumps(pairs),
        ]
        try:
            with self._calling():
                await self._renew(keys=keys, args=args)
        except BrokerError as exc:
            # The producer goes on (its appends will tell it if Redis stays away); the
            # renewals below keep trying.
            log.warning("could not take the lease on %s: %s", keys[0], exc)
        renewing = asyncio.create_task(self._renew_lease(stream, keys, args, ttl / 3))
        try:
            with self._stopper(stream, on_stop):
                yield
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            # Leaving without closing ends the stream with `lost` now: never one that hangs.
            with contextlib.suppress(BrokerError), self._calling():
                await self._reap(keys=keys, args=[int(self.closed_ttl * 1000), "1"])

    async def _renew_lease(
        self, stream: str, keys: list[str], args: list[str | int], every: float
    ) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                with self._calling():
                    renewed = await self._renew(keys=keys, args=args)
            except BrokerError as exc:
                log.warning("could not renew the lease on %s: %s", keys[0], exc)
                continue
            if not renewed:
                return  # closed, by us or by a reader that found the lease lapsed
            if renewed == 2:
                self._stop_here(stream)  # a stop request whose message did not come

    async def request_stop(self, stream: str) -> bool:
        """Ask the lease holder of `stream`, on any node, to stop; see `Broker.request_stop`.

        A flag in the lease plus a PUBLISH in one script: the holder's process hears the
        message at once; the flag is what its next renewal (every `ttl / 3`) finds should
        the message be lost with a broken subscription. Polling the flag alone would
        answer a user's Stop seconds late; the message alone could be lost.
        """
        with self._calling():
            asked = await self._stop(
                keys=[self._stream_key(stream), self._lease_key(stream)],
                args=[self._stop_channel, stream],
            )
        if asked:
            self._stop_here(stream)  # held here: no need to wait for the message
        return bool(asked)

    def _listen(self) -> None:
        """Start this process's pub/sub listener unless it runs."""
        listener = self._stop_listener
        if (listener is None or listener.done()) and not self._closing:
            self._stop_listener = asyncio.create_task(
                self._listen_loop(), name="ssehub-redis-pubsub"
            )

    async def _listen_loop(self) -> None:
        """Hand stop requests for leases held here to their `on_stop` (see `_STOP`), and
        questions and answers to `_received`."""
        backoff = 0.05
        task = asyncio.current_task()
        assert task is not None
        channels = (self._stop_channel, self._ask_channel, self._inbox)
        while not self._closing:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(*channels)
                backoff = 0.05
                confirmed = 0
                while not self._closing:
                    # redis-py's read timeout can swallow a cancel that lands with it.
                    if task.cancelling():
                        raise asyncio.CancelledError
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message.get("type") == "subscribe":
                        # Only once Redis confirmed them can `ask` count on its answers.
                        confirmed += 1
                        if confirmed >= len(channels):
                            self._listening.set()
                    elif message.get("type") == "message":
                        self._received(str(message["channel"]), str(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Stop requests made meanwhile are found by the lease renewals; questions
                # go unanswered, and the asker says so.
                log.debug("the pub/sub subscription failed: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                self._listening.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _received(self, channel: str, data: str) -> None:
        if channel == self._stop_channel:
            self._stop_here(data)
            return
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("from"), str):
            log.warning("ignoring a malformed message on %s", channel)
            return
        if "re" in message:
            waiting = self._asking.get(str(message["re"]))
            if waiting is not None:
                waiting.put_nowait(message)
        elif self._member is not None and not self._closing:
            task = asyncio.create_task(self._answer(message))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    async def _answer(self, question: dict[str, Any]) -> None:
        if self._member is None:
            return
        answerer, about = self._member
        try:
            body = await answerer(question.get("body") or {})
            answer = {"re": question.get("q"), "from": self._process, "about": about, "body": body}
            with self._calling():
                await self._redis.publish(self._inbox_of(question["from"]), json.dumps(answer))
        except BrokerError as exc:
            log.debug("could not answer a question: %s", exc)
        except Exception:
            log.exception("answering %r failed", question.get("body"))

    # -- members ----------------------------------------------------------------------

    async def join(self, answerer: Answerer, about: Mapping[str, Any]) -> None:
        """Become a member; see `Broker.join`.

        The membership is renewed every `lease_check` seconds and lapses three of those
        after the last renewal: a process killed drops out of `ask` within that.
        """
        await super().join(answerer, about)
        self._about_json = json.dumps(about)
        self._listen()
        if self._membership is None and not self._closing:
            with contextlib.suppress(BrokerError):
                await self._announce()
            self._membership = asyncio.create_task(
                self._renew_membership(), name="ssehub-redis-membership"
            )

    async def _announce(self) -> None:
        with self._calling():
            await self._join_script(
                keys=self._member_keys(),
                args=[self._process, self._presence_ms, self._about_json],
            )

    async def _renew_membership(self) -> None:
        # Checked as well as cancelled: Python 3.11's `wait_for`, in redis-py, can drop a
        # cancel (CPython gh-86296), and `leave` waits for this task to end.
        while self._membership is asyncio.current_task():
            await asyncio.sleep(self.lease_check)
            try:
                await self._announce()
            except BrokerError as exc:
                log.debug("could not renew the membership: %s", exc)

    async def leave(self) -> None:
        await super().leave()
        task, self._membership = self._membership, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        members, abouts = self._member_keys()
        with contextlib.suppress(BrokerError), self._calling():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(members, self._process)
                pipe.hdel(abouts, self._process)
                await pipe.execute()

    async def ask(
        self, question: Mapping[str, Any], *, to: str | None = None, wait: float = 0.5
    ) -> Answers:
        """Ask the live members, or member `to`; see `Broker.ask`.

        The question is published on the channel every member listens to (or on `to`'s
        inbox); each answers on the asker's inbox. Who should answer is read from the
        members' set first, so a member that died is waited for until its membership
        lapses, and reported as unanswered meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        self._listen()
        with self._calling():
            flat = await self._members(keys=self._member_keys())
        pairs = zip(flat[::2], flat[1::2], strict=True)
        members = {str(p): Member(str(p), _about(a)) for p, a in pairs}
        if to is not None:
            members = {to: members[to]} if to in members else {}
        if not members:
            return Answers((), ())
        qid = uuid.uuid4().hex
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._asking[qid] = inbox
        got: dict[str, tuple[Member, Mapping[str, Any]]] = {}
        try:
            # The answers come on the subscription: it must be there before asking.
            await asyncio.wait_for(self._listening.wait(), max(0.0, deadline - loop.time()))
            message = json.dumps({"q": qid, "from": self._process, "body": question})
            with self._calling():
                await self._redis.publish(
                    self._ask_channel if to is None else self._inbox_of(to), message
                )
            while not members.keys() <= got.keys():
                answer = await asyncio.wait_for(inbox.get(), max(0.0, deadline - loop.time()))
                sender = str(answer["from"])
                body = answer.get("body")
                if (to is None or sender == to) and isinstance(body, dict):
                    # One that joined after the members were read answers too.
                    got[sender] = (Member(sender, _about(answer.get("about"))), body)
        except TimeoutError:
            pass
        finally:
            del self._asking[qid]
        unanswered = [m for p, m in members.items() if p not in got]
        return Answers(list(got.values()), unanswered)

    # -- the reader -------------------------------------------------------------------

    async def _join(self, stream: str, key: str, cursor: str) -> _Feed:
        feed = self._feeds.get(key)
        # A closed feed is stale here: this tail's own read found the stream open (it was
        # deleted and begun again), so it needs a feed of its own.
        if feed is not None and not feed.closed:
            feed.tails += 1
            return feed
        feed = self._feeds[key] = _Feed(stream, key, cursor)
        feed.tails += 1
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._read_feeds(), name="ssehub-redis-reader"),
                asyncio.create_task(self._watch_leases(), name="ssehub-redis-leases"),
            ]
        self._feeds_changed.set()
        # Interrupt the blocked XREAD so that the next one includes this stream.
        with contextlib.suppress(BrokerError), self._calling():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
                pipe.expire(self._wake_key, 3600)
                # Announced at once when it has a producer, who may be deciding whether
                # anyone still reads (see `tailed_elsewhere`).
                await self._present(
                    keys=[self._presence_key(stream)],
                    args=[self._process, self._presence_ms, "1", self._lease_key(stream)],
                    client=pipe,
                )
                *_, announced = await pipe.execute()
                feed.leased = bool(announced)
        return feed

    async def _read_feeds(self) -> None:
        resync = False
        while not self._closing:
            try:
                await self._read_loop(resync)
            except Exception:
                # A bug here would silently stall every tail of the process: log, go on.
                log.exception("the redis reader failed; starting it again")
                resync = True
                await asyncio.sleep(1.0)

    async def _read_loop(self, lost: bool) -> None:
        wake_cursor = _ZERO
        backoff = 0.05
        while not self._closing:
            if not self._feeds:
                self._feeds_changed.clear()
                await self._feeds_changed.wait()
                continue
            streams = {f.key: f.cursor for f in self._feeds.values() if not f.closed}
            streams[self._wake_key] = wake_cursor
            try:
                if lost:
                    await self._reader_redis.ping()
                    lost = False
                    self._up()
                    # Redis is back: every tail checks its cursor against the log once,
                    # which finds what Redis kept and tells of what it lost.
                    for feed in self._feeds.values():
                        feed.reset()
                reply = await self._reader_redis.xread(
                    streams,  # type: ignore[arg-type]
                    count=_READ_COUNT,
                    block=self._block_ms,
                )
            except _UNAVAILABLE as exc:
                self._down(exc)
                lost = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            except redis_errors.ResponseError as exc:
                if str(exc).startswith("LOADING"):  # a restarted Redis reading its data
                    self._down(exc)
                    lost = True
                elif "WRONGTYPE" in str(exc):
                    await self._end_foreign_feeds()
                else:
                    log.error("reading streams from redis at %s failed: %s", self.url, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            self._up()
            fetched: list[tuple[_Feed, _Items]] = []
            for key, items in cast(list[tuple[str, _Items]], reply or []):
                if key == self._wake_key:
                    wake_cursor = items[-1][0]
                    continue
                fed = self._feeds.get(key)
                if fed is not None and items:
                    fetched.append((fed, items))
            # A stream with more waiting than one read takes may be trimmed faster than it
            # is read: checked before anything is handed on, so the gap is not hidden.
            behind = [f for f, items in fetched if len(items) == _READ_COUNT]
            trimmed = await self._trimmed_past_cursor(behind) if behind else set()
            for fed, items in fetched:
                entries, closed = _entries(items)
                fed.cursor = items[-1][0]
                if fed in trimmed:
                    fed.reset()  # its tails go back to the log, which reports the gap
                else:
                    fed.push(entries, closed)

    async def _end_foreign_feeds(self) -> None:
        """End the tails of keys that something else made into a non-stream: one such key
        must not stall the one XREAD that every other stream of the process shares."""
        feeds = [f for f in self._feeds.values() if not f.closed]
        with contextlib.suppress(BrokerError), self._calling():
            async with self._redis.pipeline(transaction=False) as pipe:
                for feed in feeds:
                    pipe.type(feed.key)
                types = await pipe.execute()
            for feed, kind in zip(feeds, types, strict=True):
                if kind not in ("stream", "none"):
                    log.error("%s is a %s, not a stream: its tails end", feed.key, kind)
                    feed.push([], closed=True)

    async def _trimmed_past_cursor(self, feeds: list[_Feed]) -> set[_Feed]:
        try:
            with self._calling():
                async with self._redis.pipeline(transaction=False) as pipe:
                    for feed in feeds:
                        pipe.xinfo_stream(feed.key)
                    infos = await pipe.execute(raise_on_error=False)
        except BrokerError:
            return set()
        trimmed = set()
        for feed, info in zip(feeds, infos, strict=True):
            if isinstance(info, BaseException):
                continue
            deleted = parse_id(info["max-deleted-entry-id"]) or (0, 0)
            if deleted > (parse_id(feed.cursor) or (0, 0)):
                trimmed.add(feed)
        return trimmed

    async def _watch_leases(self) -> None:
        """Ask, for streams idle here, whether their producer's lease lapsed.

        Every `lease_check` seconds for a stream with a lease; one found without is asked
        again after twice as long each time, up to `_LEASE_CHECK_MAX` (a channel never
        has one; a completion has one from before its first event).
        """
        while not self._closing:
            await asyncio.sleep(self.lease_check)
            try:
                await self._check_leases()
            except Exception:
                log.exception("checking leases failed")

    async def _check_leases(self) -> None:
        keep = int(self.closed_ttl * 1000)
        now = time.monotonic()
        due = [
            f
            for f in self._feeds.values()
            if not f.closed and now - f.idle_since >= self.lease_check and now >= f.check_at
        ]
        present = [f for f in self._feeds.values() if f.leased and not f.closed]
        if not self._available:
            return
        if now - self._back_at < _REAP_GRACE:
            due = []
        if not (due or present):
            return
        try:
            with self._calling():
                async with self._redis.pipeline(transaction=False) as pipe:
                    if present:
                        args: list[str | int] = [self._process, self._presence_ms]
                        args += ["0"] * len(present)
                        await self._present(
                            keys=[self._presence_key(f.stream) for f in present],
                            args=args,
                            client=pipe,
                        )
                    for feed in due:
                        keys = [feed.key, self._lease_key(feed.stream)]
                        await self._reap(keys=keys, args=[keep, "0"], client=pipe)
                    answers = await pipe.execute()
                    if present:
                        answers = answers[1:]
        except BrokerError as exc:
            log.debug("lease check failed: %s", exc)
            return
        for feed, answer in zip(due, answers, strict=True):
            feed.leased = answer != -1
            if answer == -1:
                feed.check_every = min(
                    max(feed.check_every * 2, self.lease_check * 2), _LEASE_CHECK_MAX
                )
            else:
                feed.check_every = self.lease_check
            feed.check_at = now + feed.check_every

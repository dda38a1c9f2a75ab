"""The broker contract: named append-only logs of events with increasing ids.

Every stream ssehub serves (a channel, a completion, a job) is one log. An SSE connection
is a reader at a cursor in a log; resume, replay, fan-out and multi-node delivery all
follow from that. Two implementations keep this contract: `MemoryBroker` (one process)
and `RedisBroker` (Redis Streams, many processes and nodes).

Ids have the Redis stream id form `<ms>-<seq>` in every broker, so an id handed out by
one process is a valid cursor on any other that shares the log, and ids compare by
`parse_id`. A memory broker's ids stay increasing across restarts because `<ms>` is wall
time, so a cursor from an earlier process is never mistaken for a newer event.
"""

from __future__ import annotations

import abc
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ssehub.protocol import ServerSentEvent, encode

_ID = re.compile(r"(\d{1,20})-(\d{1,20})\Z")


# What readers get when a stream's producer stopped without closing it (see `Broker.lease`).
PRODUCER_LOST: tuple[tuple[str, str], ...] = (
    (
        "error",
        '{"error": {"message": "the process producing this stream stopped", '
        '"type": "producer_lost", "param": null, "code": null}}',
    ),
)


class BrokerError(Exception):
    """The broker could not do what was asked."""


class BrokerUnavailable(BrokerError):
    """The backing service (Redis) cannot be reached now; the caller may retry later."""


class StreamClosed(BrokerError):
    """Append to a stream that was closed."""


def parse_id(value: str) -> tuple[int, int] | None:
    """`"<ms>-<seq>"` as a comparable pair, or None when `value` is not such an id."""
    match = _ID.match(value)
    if match is None:
        return None
    return int(match[1]), int(match[2])


def format_id(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One event in a log. `wire` is its SSE encoding with its `id:` line, made once."""

    id: str
    key: tuple[int, int]
    event: str
    data: str
    wire: bytes = field(repr=False)

    @classmethod
    def make(cls, id: str, event: str, data: str) -> Entry:
        key = parse_id(id)
        if key is None:
            raise ValueError(f"not a stream id: {id!r}")
        wire = encode(ServerSentEvent(data=data, event=event, id=id))
        return cls(id=id, key=key, event=event, data=data, wire=wire)


@dataclass(frozen=True, slots=True)
class Batch:
    """What a read or a tail step returns.

    `gap` is True when the cursor given was older than the oldest retained entry, or not
    an id of this stream (unknown, malformed or from the future): `entries` then start at
    the oldest retained entry, and the reader must be told before it gets them.
    `closed` is True when the stream was closed and `entries` hold the last of it.
    """

    entries: Sequence[Entry]
    gap: bool = False
    closed: bool = False


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of a log is kept for replay: at most `max_len` entries, none older than
    `max_age` seconds (None: no bound of that kind)."""

    max_len: int | None = 10_000
    max_age: float | None = 3600.0


@dataclass(frozen=True, slots=True)
class StreamInfo:
    first_id: str | None
    last_id: str | None
    length: int
    closed: bool


# A member's answerer: a question (a JSON object) in, its answer (a JSON object) out.
Answerer = Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class Member:
    """A process serving with this broker's logs. `process` is its id (None when the broker
    is not shared: the one process is all there is); `about` is what it said of itself
    when it joined (ssehub: `node`, `pid`)."""

    process: str | None
    about: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Answers:
    """What `Broker.ask` collected: each answer with the member that gave it, and the
    live members that did not answer in time."""

    answers: Sequence[tuple[Member, Mapping[str, Any]]]
    unanswered: Sequence[Member]


class Broker(abc.ABC):
    """Named append-only logs. All methods are safe to call concurrently from one loop."""

    # This process's id among the processes sharing the logs; None when nothing is shared.
    process: str | None = None
    # The `on_stop` of each lease held in this process, by stream (see `request_stop`).
    _stoppers: dict[str, Callable[[], object]]
    # This process's answerer and self-description while it is a member (see `join`).
    _member: tuple[Answerer, Mapping[str, Any]] | None = None

    @abc.abstractmethod
    async def append(
        self,
        stream: str,
        events: Sequence[tuple[str, str]],
        retention: Retention | None = None,
    ) -> list[Entry]:
        """Append `(event type, data)` pairs in order; returns the new entries.

        Creates the stream when absent, then trims it to `retention` (None: the broker's
        default). Raises `StreamClosed` when it was closed and
        `BrokerUnavailable` when the backing service is down.
        """

    @abc.abstractmethod
    async def read(self, stream: str, after: str | None, limit: int = 1000) -> Batch:
        """Entries after the cursor `after` (None: from the oldest retained), at most `limit`."""

    @abc.abstractmethod
    def tail(self, stream: str, after: str | None) -> AsyncIterator[Batch]:
        """Batches after `after`: first what is retained, then each new batch as it lands.

        A batch carries every entry appended since the previous one, so a reader that was
        busy gets one batch, not one wake-up per entry. Ends after the batch with
        `closed=True`. `after=None` starts at the oldest retained entry; to start live,
        pass `last_id` from `info`.
        """

    @abc.abstractmethod
    async def close(self, stream: str, expire_after: float | None = None) -> None:
        """Mark the stream closed: tails end; later appends raise `StreamClosed`.

        A closed stream stays readable, and known to be closed, for `expire_after`
        seconds (None: the broker's default), then it is deleted.
        """

    @abc.abstractmethod
    async def info(self, stream: str) -> StreamInfo | None:
        """What the broker knows of the stream, or None when it does not exist."""

    @abc.abstractmethod
    async def delete(self, stream: str) -> None:
        """Forget the stream and its entries at once."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections and background tasks."""

    @contextlib.asynccontextmanager
    async def lease(
        self,
        stream: str,
        ttl: float = 5.0,
        lost: Sequence[tuple[str, str]] | None = None,
        on_stop: Callable[[], object] | None = None,
    ) -> AsyncIterator[None]:
        """Hold `stream` as its only producer while inside this context.

        Leaving without having closed the stream appends `lost` (`(event, data)` pairs;
        default `PRODUCER_LOST`) and closes it, so its readers never wait on a stream that
        nobody writes. With a broker shared by processes (Redis), the lease is renewed
        every `ttl / 3` seconds and readers anywhere do the same once it lapses for `ttl`
        seconds: the producer's process died. In one process that cannot happen apart
        from the readers, so only the leaving is watched.

        `on_stop` is called (in this process, maybe more than once) when anyone asks the
        producer to stop with `request_stop`; the producer then ends the stream itself.
        """
        try:
            with self._stopper(stream, on_stop):
                yield
        finally:
            info = await self.info(stream)
            if info is None or not info.closed:
                with contextlib.suppress(StreamClosed):
                    await self.append(stream, lost or PRODUCER_LOST)
                await self.close(stream)

    @contextlib.contextmanager
    def _stopper(self, stream: str, on_stop: Callable[[], object] | None) -> Iterator[None]:
        """Keep `on_stop` as the stop handler of `stream` in this process meanwhile."""
        if on_stop is None:
            yield
            return
        stoppers: dict[str, Callable[[], object]] = self.__dict__.setdefault("_stoppers", {})
        stoppers[stream] = on_stop
        try:
            yield
        finally:
            if stoppers.get(stream) is on_stop:
                del stoppers[stream]

    def _stop_here(self, stream: str) -> bool:
        """Call the stop handler of `stream`'s lease when it is held in this process."""
        on_stop = self.__dict__.get("_stoppers", {}).get(stream)
        if on_stop is None:
            return False
        on_stop()
        return True

    async def request_stop(self, stream: str) -> bool:
        """Ask the producer holding `stream`'s lease, in any process, to stop.

        Returns True when a live lease holder was asked (its `on_stop` runs; it then ends
        the stream as it sees fit), False when nobody holds the lease: the stream is
        unknown, ended, or its producer is gone. It does not wait for the stream to end:
        tail it for that. In one process (memory) only this process's leases exist.
        """
        return self._stop_here(stream)

    async def tailed_elsewhere(self, stream: str) -> bool:
        """Whether a process other than this one tails `stream`, a stream with a lease.

        A producer asks it before giving up on a stream nobody reads here. Always False
        when the broker is not shared (memory): the caller sees all readers itself.
        """
        return False

    async def ping(self) -> bool:
        """Whether the backing service answers now (for /healthz); always True in memory."""
        return True

    # -- members: the processes sharing the logs, asked questions (the admin view) ------

    async def join(self, answerer: Answerer, about: Mapping[str, Any]) -> None:
        """Make this process a member: `ask` from any process reaches `answerer` here.

        `about` (JSON) is how others name this process in what they collect. Joining
        again replaces both. A shared broker (Redis) announces the membership and renews
        it while the process lives; a process that died drops out within seconds. It
        never raises for a backing service that is down: the renewals keep trying.
        """
        self._member = (answerer, about)

    async def leave(self) -> None:
        """Stop answering and drop out of the members now."""
        self._member = None

    async def ask(
        self, question: Mapping[str, Any], *, to: str | None = None, wait: float = 0.5
    ) -> Answers:
        """Put `question` to every live member (or only to the one whose `process` is
        `to`) and collect their answers for up to `wait` seconds.

        Returns as soon as every member that was live when asked has answered; those that
        did not by then are `unanswered`. With nothing shared (memory) the one process,
        when it joined, answers at once, and no member has a `process` to address.
        Raises `BrokerUnavailable` when the backing service is down.
        """
        if self._member is None or to is not None:
            return Answers((), ())
        answerer, about = self._member
        return Answers(((Member(None, about), await answerer(question)),), ())

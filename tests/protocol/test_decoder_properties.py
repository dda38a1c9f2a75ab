"""Property tests: chunking never changes the result, the decoder agrees with the naive
reference parser, encode then decode round-trips, and no input makes it raise anything
but EventTooLarge."""

from __future__ import annotations

import itertools
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from ssehub import Decoder, EventTooLarge, ServerSentEvent, encode, encode_comment, encode_retry

from .reference import reference_decode

# Pieces that make event streams interesting: field names and their prefixes, every line
# end, NUL, BOMs, digits for retry, multi-byte characters, and UTF-8 fragments and errors.
TOKENS = [
    b"data",
    b"data: ",
    b"data:",
    b"id",
    b"id: ",
    b"event: ",
    b"event",
    b"retry: ",
    b"retry",
    b":",
    b" ",
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\n",
    b"\x00",
    b"\xef\xbb\xbf",
    b"\xef\xbb",
    b"1",
    b"42",
    b"x",
    b"+",
    "é".encode(),
    "😀".encode(),
    b"\xe2\x82",
    b"\xac",
    b"\xff",
    b"\x80",
    b"\x0b",
    "\u2028".encode(),
]

streams = st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join)


@st.composite
def chunkings(draw: st.DrawFn, raw: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def decode(
    chunks: list[bytes], decoder: Decoder | None = None
) -> tuple[list[ServerSentEvent], Decoder]:
    decoder = decoder or Decoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    return events, decoder


@settings(max_examples=400, deadline=None)
@given(st.data(), streams)
def test_agrees_with_reference_under_any_chunking(data: st.DataObject, raw: bytes) -> None:
    chunks = data.draw(chunkings(raw))
    events, decoder = decode(chunks)
    expected = reference_decode(raw)
    assert events == expected.events
    assert decoder.retry == expected.retry
    assert decoder.last_event_id == expected.last_event_id


@settings(max_examples=200, deadline=None)
@given(streams, streams)
def test_close_forgets_the_connection_but_keeps_retry_and_last_event_id(
    first: bytes, second: bytes
) -> None:
    decoder = Decoder()
    decode([first], decoder)
    kept_retry, kept_id = decoder.retry, decoder.last_event_id
    # The second connection's stream parses as a fresh stream (its own BOM, no leftover
    # line or event) whose last event ID buffer starts at the kept id.
    events, _ = decode([second], decoder)
    expected = reference_decode(
        b"id: " + kept_id.encode() + b"\n" + second.removeprefix(b"\xef\xbb\xbf")
    )
    assert events == expected.events
    assert decoder.retry == (expected.retry if expected.retry is not None else kept_retry)


# Event types and ids that may be encoded: no CR, LF or NUL. An empty type means "message".
field_text = st.text().filter(lambda s: not re.search(r"[\r\n\0]", s))
events_to_send = st.builds(
    ServerSentEvent,
    data=st.text(),
    event=st.one_of(st.just("message"), field_text),
    id=st.one_of(st.none(), field_text),
    retry=st.one_of(st.none(), st.integers(0, 2**40)),
)
comments = st.text().map(encode_comment)


@settings(max_examples=300, deadline=None)
@given(st.data(), st.lists(st.one_of(events_to_send, comments), max_size=12))
def test_encode_then_decode_round_trips(
    data: st.DataObject, items: list[ServerSentEvent | bytes]
) -> None:
    wire = b"".join(item if isinstance(item, bytes) else encode(item) for item in items)
    chunks = data.draw(chunkings(wire))
    events, decoder = decode(chunks)

    expected: list[ServerSentEvent] = []
    last_id = ""
    retry = None
    for item in items:
        if isinstance(item, bytes):
            continue
        if item.id is not None:
            last_id = item.id
        if item.retry is not None:
            retry = item.retry
        # Line ends in data all come back as LF: the wire cannot tell them apart.
        text = item.data.replace("\r\n", "\n").replace("\r", "\n")
        expected.append(ServerSentEvent(text, item.event or "message", last_id))
    assert events == expected
    assert decoder.retry == retry
    assert decoder.last_event_id == last_id


@settings(max_examples=100, deadline=None)
@given(st.data(), st.lists(st.integers(0, 10**12), min_size=1, max_size=5))
def test_encode_retry_round_trips(data: st.DataObject, values: list[int]) -> None:
    wire = b"".join(encode_retry(v) for v in values)
    events, decoder = decode(data.draw(chunkings(wire)))
    assert events == []
    assert decoder.retry == values[-1]


@settings(max_examples=500, deadline=None)
@given(st.data(), st.one_of(st.binary(max_size=400), streams), st.integers(1, 64))
def test_arbitrary_bytes_raise_nothing_but_event_too_large(
    data: st.DataObject, raw: bytes, max_event_size: int
) -> None:
    decoder = Decoder(max_event_size=max_event_size)
    for chunk in data.draw(chunkings(raw)):
        try:
            events = decoder.feed(chunk)
        except EventTooLarge as exc:
            error = exc
            events = exc.events
            assert error.size > max_event_size
        assert all(isinstance(e, ServerSentEvent) for e in events)
        assert all(len(e.data) <= max_event_size for e in events)
    assert decoder.close() == []
    assert isinstance(decoder.last_event_id, str)
    assert decoder.retry is None or decoder.retry >= 0

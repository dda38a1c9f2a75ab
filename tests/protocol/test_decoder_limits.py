"""The size bound, linear time whatever the chunking, and the decoder's lifecycle."""

from __future__ import annotations

import dataclasses
import pickle
import time

import pytest

from ssehub import Decoder, EventTooLarge, ServerSentEvent
from ssehub.protocol import DEFAULT_MAX_EVENT_SIZE

MIB = 1024 * 1024


def feed_in_chunks(decoder: Decoder, raw: bytes, size: int) -> list[ServerSentEvent]:
    events: list[ServerSentEvent] = []
    for i in range(0, len(raw), size):
        events += decoder.feed(raw[i : i + size])
    return events


def timed(raw: bytes, size: int) -> tuple[float, list[ServerSentEvent]]:
    start = time.process_time()
    events = feed_in_chunks(Decoder(), raw, size)
    return time.process_time() - start, events


def one_line_event(size: int) -> bytes:
    return b"data: " + b"x" * size + b"\n\n"


def many_lines_event(size: int) -> bytes:
    line = b"data: " + b"y" * 57 + b"\r\n"  # 64 bytes, CRLF split across chunks too
    return line * (size // 64) + b"\r\n"


def test_default_bound_admits_an_8_mib_event() -> None:
    assert DEFAULT_MAX_EVENT_SIZE >= 8 * MIB + 64


@pytest.mark.parametrize("make", [one_line_event, many_lines_event])
def test_8_mib_event_in_1_kib_chunks_is_fast(make: object) -> None:
    raw = make(8 * MIB)  # type: ignore[operator]
    seconds, events = timed(raw, 1024)
    assert len(events) == 1
    assert len(events[0].data) >= 8 * MIB * 57 // 64
    # Well under a second on an idle machine; the bound is generous for a busy one.
    assert seconds < 5, f"8 MiB in 1 KiB chunks took {seconds:.2f} s"


@pytest.mark.parametrize("make", [one_line_event, many_lines_event])
def test_time_is_linear_in_event_size(make: object) -> None:
    # Eight times the input must cost about eight times as much, not sixty-four (as a
    # rescan of the buffer per chunk would). Best of three against scheduling noise.
    small = make(MIB)  # type: ignore[operator]
    large = make(8 * MIB)  # type: ignore[operator]
    t_small = min(timed(small, 1024)[0] for _ in range(3))
    t_large = min(timed(large, 1024)[0] for _ in range(3))
    assert t_large < 24 * max(t_small, 0.002), (t_small, t_large)


def test_one_byte_at_a_time_is_linear() -> None:
    raw = one_line_event(64 * 1024) + many_lines_event(64 * 1024)
    seconds, events = timed(raw, 1)
    assert len(events) == 2
    assert seconds < 5


def test_unterminated_line_over_the_bound_raises() -> None:
    decoder = Decoder(max_event_size=1000)
    decoder.feed(b"data: " + b"x" * 900)
    with pytest.raises(EventTooLarge, match="max_event_size") as caught:
        decoder.feed(b"x" * 200)
    assert caught.value.max_event_size == 1000
    assert caught.value.size > 1000
    assert caught.value.events == []


def test_long_comment_line_counts_too() -> None:
    decoder = Decoder(max_event_size=100)
    for _ in range(8):
        assert decoder.feed(b": " + b"z" * 10) == []
    with pytest.raises(EventTooLarge):
        decoder.feed(b": " + b"z" * 10)


def test_many_data_lines_over_the_bound_raise() -> None:
    decoder = Decoder(max_event_size=1000)
    for _ in range(90):  # 11 characters held per line: 990
        assert decoder.feed(b"data: 0123456789\n") == []
    with pytest.raises(EventTooLarge) as caught:
        decoder.feed(b"data: 0123456789\n")
    assert caught.value.size == 1001


def test_whole_event_over_the_bound_in_one_feed_raises_and_keeps_earlier_events() -> None:
    decoder = Decoder(max_event_size=1000)
    raw = b"data: a\n\nid: 1\ndata: b\n\n" + b"data: " + b"x" * 2000 + b"\n\n"
    with pytest.raises(EventTooLarge) as caught:
        decoder.feed(raw)
    assert caught.value.events == [ServerSentEvent("a", id=""), ServerSentEvent("b", id="1")]


def test_event_at_the_bound_passes() -> None:
    # The bound counts the characters held: each data line's value plus its LF.
    decoder = Decoder(max_event_size=100)
    events = decoder.feed(b"data: " + b"x" * 99 + b"\n\n")
    assert events == [ServerSentEvent("x" * 99, id="")]
    with pytest.raises(EventTooLarge):
        decoder.feed(b"data: " + b"x" * 100 + b"\n\n")


def test_bound_is_per_event() -> None:
    decoder = Decoder(max_event_size=100)
    raw = (b"data: " + b"x" * 80 + b"\n\n") * 50
    assert len(feed_in_chunks(decoder, raw, 7)) == 50


def test_decoder_is_usable_after_event_too_large() -> None:
    decoder = Decoder(max_event_size=10)
    decoder.feed(b"id: 3\ndata: ok\n\n")
    with pytest.raises(EventTooLarge):
        decoder.feed(b"data: " + b"x" * 50)
    # As after close(): a new stream, keeping the last event ID string.
    assert decoder.feed(b"data: next\n\n") == [ServerSentEvent("next", id="3")]


def test_close_discards_unfinished_event_and_resets_stream_state() -> None:
    decoder = Decoder()
    assert decoder.feed(b"retry: 500\nid: 1\ndata: a\n\nid: 2\ndata: b\n") == [
        ServerSentEvent("a", id="1")
    ]
    assert decoder.close() == []
    assert (decoder.retry, decoder.last_event_id) == (500, "1")
    # A new connection: its BOM is stripped again, the half event is gone, the last event
    # ID buffer starts from the last event ID string.
    assert decoder.feed(b"\xef\xbb\xbfdata: c\n\n") == [ServerSentEvent("c", id="1")]


def test_close_drops_half_a_character_and_pending_cr() -> None:
    decoder = Decoder()
    decoder.feed(b"data: \xe2\x82")
    assert decoder.close() == []
    decoder.feed(b"data: a\r")
    decoder.close()
    # Had the CR been remembered, this LF would be swallowed as the rest of a CRLF.
    assert decoder.feed(b"\ndata: b\n\n") == [ServerSentEvent("b", id="")]


def test_starting_last_event_id() -> None:
    decoder = Decoder(last_event_id="41")
    assert decoder.last_event_id == "41"
    assert decoder.feed(b"data: a\n\nid: 42\ndata: b\n\n") == [
        ServerSentEvent("a", id="41"),
        ServerSentEvent("b", id="42"),
    ]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\0b"])
def test_starting_last_event_id_must_be_sendable(bad: str) -> None:
    with pytest.raises(ValueError, match="last_event_id"):
        Decoder(last_event_id=bad)


@pytest.mark.parametrize("bad", [0, -1])
def test_max_event_size_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="max_event_size"):
        Decoder(max_event_size=bad)


def test_feed_accepts_bytearray_and_memoryview() -> None:
    decoder = Decoder()
    assert decoder.feed(bytearray(b"data: a\n")) == []
    assert decoder.feed(memoryview(b"\n")) == [ServerSentEvent("a", id="")]


def test_empty_feed_is_harmless() -> None:
    decoder = Decoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\n") == [ServerSentEvent("a", id="")]


def test_retry_with_more_digits_than_python_converts_is_ignored() -> None:
    decoder = Decoder()
    decoder.feed(b"retry: 10\n")
    decoder.feed(b"retry: " + b"9" * 10_000 + b"\n")
    assert decoder.retry == 10


def test_decoded_events_are_ordinary_frozen_events() -> None:
    # The decoder builds events without __init__ (for speed); they must be the real thing.
    (event,) = Decoder().feed(b"event: e\nid: 1\ndata: x\n\n")
    (slow,) = Decoder().feed(b"event: e\nid: 1\ndata: x\ndata: y\n:\n\n")
    for decoded in (event, slow):
        assert type(decoded) is ServerSentEvent
        with pytest.raises(dataclasses.FrozenInstanceError):
            decoded.data = "changed"  # type: ignore[misc]
        assert dataclasses.replace(decoded, retry=5).retry == 5
        assert pickle.loads(pickle.dumps(decoded)) == decoded
    assert event == ServerSentEvent("x", "e", "1", None)
    assert hash(event) == hash(ServerSentEvent("x", "e", "1", None))
    assert slow == ServerSentEvent("x\ny", "e", "1", None)


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_last_event_id_matches_the_events_delivered_before_an_overflow(size: int) -> None:
    decoder = Decoder(max_event_size=100)
    raw = b"id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: " + b"x" * 300 + b"\n\n"
    delivered: list[ServerSentEvent] = []
    with pytest.raises(EventTooLarge) as caught:  # noqa: PT012
        for i in range(0, len(raw), size):
            delivered += decoder.feed(raw[i : i + size])
    delivered += caught.value.events
    assert delivered == [ServerSentEvent("a", id="1"), ServerSentEvent("b", id="2")]
    assert decoder.last_event_id == "2"

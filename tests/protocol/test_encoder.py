"""The encoder: wire form of events, comments and retry, its errors, and its fast path."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssehub import ServerSentEvent, encode, encode_comment, encode_data, encode_retry


def test_plain_event() -> None:
    assert encode(ServerSentEvent("hello")) == b"data: hello\n\n"


def test_all_fields() -> None:
    event = ServerSentEvent('{"a": 1}', event="update", id="42", retry=3000)
    assert encode(event) == b'event: update\nid: 42\nretry: 3000\ndata: {"a": 1}\n\n'


def test_default_and_empty_type_are_not_written() -> None:
    assert encode(ServerSentEvent("x", event="message")) == b"data: x\n\n"
    assert encode(ServerSentEvent("x", event="")) == b"data: x\n\n"


def test_empty_data_is_still_an_event() -> None:
    # A block without a data line would dispatch nothing.
    assert encode(ServerSentEvent("")) == b"data: \n\n"


def test_empty_id_is_written_to_reset_the_last_event_id() -> None:
    assert encode(ServerSentEvent("x", id="")) == b"id: \ndata: x\n\n"


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("a\r\nb", b"data: a\ndata: b\n\n"),
        ("a\rb", b"data: a\ndata: b\n\n"),
        ("a\r\n\r\nb", b"data: a\ndata: \ndata: b\n\n"),
        ("a\n\rb", b"data: a\ndata: \ndata: b\n\n"),
        ("\n", b"data: \ndata: \n\n"),
        ("a\n", b"data: a\ndata: \n\n"),
        ("\ra", b"data: \ndata: a\n\n"),
    ],
)
def test_line_breaks_in_data_become_data_lines(data: str, wire: bytes) -> None:
    assert encode(ServerSentEvent(data)) == wire
    assert encode_data(data) == wire


def test_other_separators_stay_in_the_line() -> None:
    data = "a\x0bb\x0cc\x1cd\x85e\u2028f\u2029g\x00h"
    assert encode(ServerSentEvent(data)) == b"data: " + data.encode() + b"\n\n"


def test_leading_space_survives() -> None:
    # The decoder removes exactly one space, the one the encoder writes.
    assert encode(ServerSentEvent(" x", id=" 1")) == b"id:  1\ndata:  x\n\n"


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "a\0b", "\n", "\0"])
def test_event_type_with_cr_lf_or_nul_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="event type"):
        encode(ServerSentEvent("x", event=bad))


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "a\0b", "\n", "\0"])
def test_id_with_cr_lf_or_nul_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="event id"):
        encode(ServerSentEvent("x", id=bad))


def test_negative_retry_is_refused() -> None:
    with pytest.raises(ValueError, match="retry"):
        encode(ServerSentEvent("x", retry=-1))
    with pytest.raises(ValueError, match="retry"):
        encode_retry(-5)


def test_retry_block() -> None:
    assert encode_retry(1500) == b"retry: 1500\n\n"
    assert encode_retry(0) == b"retry: 0\n\n"


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("", b":\n\n"),
        ("ping", b": ping\n\n"),
        ("a\nb", b": a\n: b\n\n"),
        ("a\r\nb\rc", b": a\n: b\n: c\n\n"),
    ],
)
def test_comments(text: str, wire: bytes) -> None:
    assert encode_comment(text) == wire


def test_non_ascii_is_utf8() -> None:
    assert encode(ServerSentEvent("é😀", event="ü", id="✓")) == (
        "event: ü\nid: ✓\ndata: é😀\n\n".encode()
    )


@given(st.text())
def test_fast_path_equals_general_path(data: str) -> None:
    assert encode_data(data) == encode(ServerSentEvent(data))

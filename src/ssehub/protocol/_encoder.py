"""Events to bytes (WHATWG HTML, "Server-sent events", section 9.2.5 "Event stream format").

Every value is written after `field: `: the decoder removes exactly one leading space
(9.2.6), so values that start with a space survive. Text is encoded as UTF-8, the only
encoding of an event stream; a lone surrogate in a str raises UnicodeEncodeError (a
ValueError).
"""

from __future__ import annotations

import re

from ssehub.protocol._events import ServerSentEvent

# A line ends with CRLF, LF or CR (stream grammar: `end-of-line`).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode_data(data: str) -> bytes:
    """Fast path for the common event: type `message`, no id, no retry."""
    if "\n" in data or "\r" in data:
        return _data_lines(data).encode()
    return b"data: " + data.encode() + b"\n\n"


def encode(event: ServerSentEvent) -> bytes:
    """The wire form of `event`, ending with the blank line that dispatches it.

    Raises ValueError when `event.event` or `event.id` holds CR, LF or NUL: the line would
    end early and the rest would be read as other fields (and 9.2.6 ignores an id with
    NUL). Raises ValueError for a negative `retry`.
    """
    data = event.data
    body = _data_lines(data) if "\n" in data or "\r" in data else "data: " + data + "\n\n"
    head = ""
    event_type = event.event
    # An empty type reads back as "message" too (9.2.6, dispatch step 6): write neither.
    if event_type and event_type != "message":
        if "\r" in event_type or "\n" in event_type or "\0" in event_type:
            raise ValueError(f"event type must not contain CR, LF or NUL: {event_type!r}")
        head = "event: " + event_type + "\n"
    if event.id is not None:
        event_id = event.id
        if "\r" in event_id or "\n" in event_id or "\0" in event_id:
            raise ValueError(f"event id must not contain CR, LF or NUL: {event_id!r}")
        head += "id: " + event_id + "\n"
    if event.retry is not None:
        if event.retry < 0:
            raise ValueError(f"retry must be a non-negative integer: {event.retry!r}")
        head += f"retry: {int(event.retry)}\n"
    return (head + body).encode() if head else body.encode()


def _data_lines(data: str) -> str:
    # Each line becomes one `data:` field; the decoder joins them with LF.
    return "data: " + "\ndata: ".join(_LINE_BREAK.split(data)) + "\n\n"


def encode_comment(text: str = "") -> bytes:
    """A comment block (heartbeat): ignored by decoders, keeps proxies and clients awake."""
    if not text:
        return b":\n\n"
    return "".join(f": {line}\n" for line in _LINE_BREAK.split(text)).encode() + b"\n"


def encode_retry(milliseconds: int) -> bytes:
    """A block that only sets the client's reconnection time."""
    if milliseconds < 0:
        raise ValueError(f"retry must be a non-negative integer: {milliseconds!r}")
    return b"retry: %d\n\n" % milliseconds

"""Bytes to events: WHATWG HTML, "Server-sent events", section 9.2.6 "Interpreting an event
stream" (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).

The decoder is sans-IO: the caller feeds it the bytes of one connection as they arrive and
gets back the events they complete. It decodes UTF-8 once per feed, splits the text into
lines with `str.split` (never `str.splitlines`, which also breaks on VT, FF, FS, U+2028 and
others that the event stream grammar treats as ordinary characters) and keeps the
unterminated last line as a list of pieces, so the work done is linear in the input
whatever its chunking: a byte fed once is decoded once and copied a bounded number of times.
"""

from __future__ import annotations

import codecs
import contextlib
import re
from collections.abc import Callable
from typing import Any, NoReturn

from ssehub.protocol._events import ServerSentEvent

#: Default bound on the characters held for one event. An event stream has no length
#: prefix, so without a bound a server that never sends a line end (or a blank line) makes
#: the client buffer without end. 16 MiB leaves room for very large payloads (a whole
#: document, a base64 image) while keeping a hostile or broken server from exhausting memory.
DEFAULT_MAX_EVENT_SIZE = 16 * 1024 * 1024

_BOM = "\ufeff"

# The head of a block of the shape servers send most: `event: T` and `id: I` lines in any
# order (the last of each wins, as when parsing line by line; an `id` holding NUL is
# ignored by 9.2.6, so it is left to the line parser), then `data: ` and the rest of the
# block. Dispatching it gives type T (or "message"), last event ID I, the data lines.
_COMMON_BLOCK = re.compile(r"(?:event: (.*)\n|id: ([^\n\0]*)\n)*data: ((?s:.*))")


class EventTooLarge(ValueError):
    """An event, or a line not yet terminated, outgrew the decoder's `max_event_size`.

    `events` holds the events the same `feed()` call completed before the bound was hit:
    they are valid and the caller may still deliver them. The decoder has discarded the
    rest of the connection's state (as `close()` does); the connection should be dropped.
    """

    def __init__(self, size: int, max_event_size: int, events: list[ServerSentEvent]) -> None:
        super().__init__(
            f"server-sent event exceeds max_event_size: {size} characters buffered for one "
            f"event or line, the limit is {max_event_size} "
            "(raise Decoder(max_event_size=...) if such events are expected)"
        )
        self.size = size
        self.max_event_size = max_event_size
        self.events = events


class Decoder:
    """Parses one event stream incrementally.

    - `feed(data)` takes the next bytes of the stream, in chunks of any size, and returns
      the events they complete, in order.
    - `close()` marks the end of the connection's input. An event not yet ended by a blank
      line is discarded (spec: "any pending data must be discarded"). The decoder may then
      be fed the next connection's stream, as a reconnecting `EventSource` would: `retry` and
      `last_event_id` are kept, everything else starts afresh.
    - `retry`: the last valid reconnection time received, in milliseconds, or `None`.
    - `last_event_id`: the spec's *last event ID string*, set when a block ends; the value
      a client sends as `Last-Event-ID` when it reconnects. Starts as the `last_event_id`
      given to the constructor (default `""`).
    - `max_event_size`: the most characters held for one event (its data lines plus the
      line being received); beyond it `feed()` raises `EventTooLarge`.

    Dispatched events carry `event` (`"message"` when unset), `data` and `id`, which is the
    last event ID string at dispatch (`""` when none was ever set). Their `retry` is `None`:
    a `retry` field is applied to `Decoder.retry` at once, not tied to an event.
    """

    __slots__ = (
        "_bom_seen",
        "_data",
        "_data_size",
        "_event_type",
        "_id_buffer",
        "_partial",
        "_partial_size",
        "_skip_lf",
        "_utf8",
        "last_event_id",
        "max_event_size",
        "retry",
    )

    def __init__(
        self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE, *, last_event_id: str = ""
    ) -> None:
        if max_event_size < 1:
            raise ValueError(f"max_event_size must be positive: {max_event_size!r}")
        if "\0" in last_event_id or "\r" in last_event_id or "\n" in last_event_id:
            raise ValueError(f"last_event_id must not contain CR, LF or NUL: {last_event_id!r}")
        self.max_event_size = max_event_size
        self.retry: int | None = None
        self.last_event_id = last_event_id
        self._start_stream()

    def _start_stream(self) -> None:
        # 9.2.6: "The stream must then be parsed by reading everything line by line" after
        # being decoded with "UTF-8 decode", which replaces invalid sequences by U+FFFD. The
        # incremental decoder keeps a character split across chunks until it is complete.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bom_seen = False
        # Set when the text so far ended with CR: a LF opening the next chunk belongs to the
        # same CRLF line end and must not end a second (empty) line.
        self._skip_lf = False
        # The unterminated last line, as pieces joined once it ends (linear time).
        self._partial: list[str] = []
        self._partial_size = 0
        # The data buffer as a list of data line values; the spec's buffer is their
        # concatenation each followed by LF, i.e. "\n".join(self._data) + "\n".
        self._data: list[str] = []
        self._data_size = 0
        self._event_type = ""
        # Like browsers (Chromium's EventSourceParser), a new connection's last event ID
        # buffer starts from the last event ID string, so an event without `id` after a
        # reconnection keeps the id the client resumed from.
        self._id_buffer = self.last_event_id

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        """Parse the next bytes of the stream; return the events they complete.

        Raises EventTooLarge when an event or a line outgrows `max_event_size`.
        """
        text = self._utf8.decode(data)
        if not text:
            return []
        if not self._bom_seen:
            self._bom_seen = True
            # 9.2.5: "One leading U+FEFF BYTE ORDER MARK character must be ignored if any
            # are present." Only one: a second BOM is an ordinary character.
            if text[0] == _BOM:
                text = text[1:]
                if not text:
                    return []
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []
        if "\r" in text:
            # 9.2.5: end-of-line = ( cr lf / cr / lf ). A CR ends its line at once, so a
            # lone CR at the very end of the input still ends the line; the LF of a CRLF
            # split across chunks is skipped when it arrives.
            if text[-1] == "\r":
                self._skip_lf = True
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "\n" not in text:
            # No line ends: more of the unterminated line (the path of small chunks).
            self._partial.append(text)
            self._partial_size += len(text)
            if self._data_size + self._partial_size > self.max_event_size:
                self._overflow(self._data_size + self._partial_size, [])
            return []
        events: list[ServerSentEvent] = []
        # The text between the first and the last blank line holds whole blocks that start
        # with empty buffers: they are parsed block by block, the rest line by line.
        first = text.find("\n\n")
        if first >= 0:
            last = text.rfind("\n\n")
            if last >= first + 2:
                self._parse_text(text[: first + 2], events)
                self._parse_blocks(text[first + 2 : last], events)
                text = text[last + 2 :]
        if text:
            self._parse_text(text, events)
        return events

    def _parse_text(self, text: str, events: list[ServerSentEvent]) -> None:
        # Lines are split with str.split: only LF is left after CR and CRLF were replaced.
        lines = text.split("\n")
        tail = lines.pop()
        if self._partial:
            if not lines:
                self._partial.append(tail)
                self._partial_size += len(tail)
                self._check_partial(events)
                return
            self._partial.append(lines[0])
            lines[0] = "".join(self._partial)
            self._partial = []
            self._partial_size = 0
        if lines:
            self._parse_lines(lines, events)
        if tail:
            self._partial.append(tail)
            self._partial_size = len(tail)
            self._check_partial(events)

    def close(self) -> list[ServerSentEvent]:
        """End of the connection's input: discard what is unfinished, keep `retry` and
        `last_event_id`, and get ready for the next connection's stream.

        Always returns an empty list: per 9.2.6, "If the file ends in the middle of an
        event, before the final empty line, the incomplete event is not dispatched." The
        return value keeps the API symmetric with `feed()`.
        """
        self._start_stream()
        return []

    def _check_partial(self, events: list[ServerSentEvent]) -> None:
        size = self._data_size + self._partial_size
        if size > self.max_event_size:
            self._overflow(size, events)

    def _parse_lines(self, lines: list[str], events: list[ServerSentEvent]) -> None:
        # The hot loop. State lives in locals, written back once at the end; the most
        # common lines (`data: `, blank, `id: `, `event: `) are recognised by their exact
        # prefix before the general field parsing, which gives the same result for them.
        data = self._data
        data_size = self._data_size
        event_type = self._event_type
        id_buffer = self._id_buffer
        last_id = self.last_event_id
        limit = self.max_event_size
        for line in lines:
            if line[:6] == "data: ":
                # 9.2.6 "data": append the value (one leading space removed), then a LF.
                data.append(line[6:])
                data_size += len(line) - 5
                if data_size > limit:
                    self._overflow(data_size, events, last_id)
            elif not line:
                # 9.2.6: "If the line is empty (a blank line): Dispatch the event".
                # Dispatch step 1: the last event ID string takes the buffer's value, even
                # when nothing is dispatched.
                last_id = id_buffer
                if data:
                    # Step 2 (empty data buffer: dispatch nothing) is the `if`; step 3
                    # (remove one trailing LF) is joining without a final LF; step 6: the
                    # type is "message" unless the event type buffer is set.
                    event = _new_event()
                    event.data = "\n".join(data)
                    event.event = event_type or "message"
                    event.id = id_buffer
                    event.retry = None
                    event.__class__ = _ServerSentEvent
                    events.append(event)
                    data = []
                    data_size = 0
                # Steps 2 and 7: the data and event type buffers are emptied either way.
                event_type = ""
            elif line[:4] == "id: ":
                # 9.2.6 "id": "If the field value does not contain U+0000 NULL, then set
                # the last event ID buffer to the field value. Otherwise, ignore the field."
                if "\0" not in line:
                    id_buffer = line[4:]
            elif line[:7] == "event: ":
                event_type = line[7:]
            else:
                colon = line.find(":")
                if colon == 0:
                    # 9.2.6: "If the line starts with a U+003A COLON character (:)": comment.
                    continue
                if colon < 0:
                    # 9.2.6: no colon: "using the whole line as the field name, and the
                    # empty string as the field value".
                    name = line
                    value = ""
                else:
                    name = line[:colon]
                    value = line[colon + 1 :]
                    # 9.2.6: "If value starts with a U+0020 SPACE character, remove it from
                    # value." Exactly one.
                    if value[:1] == " ":
                        value = value[1:]
                if name == "data":
                    data.append(value)
                    data_size += len(value) + 1
                    if data_size > limit:
                        self._overflow(data_size, events, last_id)
                elif name == "event":
                    event_type = value
                elif name == "id":
                    if "\0" not in value:
                        id_buffer = value
                elif name == "retry" and value.isascii() and value.isdigit():
                    # 9.2.6 "retry": "If the field value consists of only ASCII digits,
                    # then interpret the field value as an integer in base ten, and set the
                    # event stream's reconnection time to that integer." Not `+5`, `1_000`,
                    # `٣` or an empty value (which int() or str.isdigit() alone accept).
                    # More digits than CPython converts (sys.int_info): ignored.
                    with contextlib.suppress(ValueError):
                        self.retry = int(value)
                # 9.2.6: any other field name: "The field is ignored."
        self._data = data
        self._data_size = data_size
        self._event_type = event_type
        self._id_buffer = id_buffer
        self.last_event_id = last_id

    def _parse_blocks(self, text: str, events: list[ServerSentEvent]) -> None:
        # `text` is whole blocks, each ended by a blank line, the first starting with empty
        # data and event type buffers (the line before it was blank). Every block ends with
        # a dispatch, so the last event ID string ends as the last event ID buffer.
        if len(text) >= self.max_event_size:
            # A block may outgrow the bound: the line parser measures each one.
            self._parse_lines([*text.split("\n"), ""], events)
            return
        id_buffer = self._id_buffer
        match = _COMMON_BLOCK.match
        append = events.append
        for block in text.split("\n\n"):
            # The blocks servers send most are parsed at once, with str methods and one
            # regex, to the result the line parser would give; any other goes to it.
            if block[:6] == "data: ":
                data = block[6:]
                if "\n" not in data:
                    # The commonest of all, one data line: built right here.
                    event = _new_event()
                    event.data = data
                    event.event = "message"
                    event.id = id_buffer
                    event.retry = None
                    event.__class__ = _ServerSentEvent
                    append(event)
                    continue
                event_type = "message"
                new_id = id_buffer
            elif not block:
                # A blank line right after a blank line (some servers send bare line ends
                # as heartbeats): its dispatch finds the buffers empty, changes nothing.
                continue
            else:
                m = match(block)
                if m is None:
                    if block[0] == ":" and "\n" not in block:
                        # A lone comment (a heartbeat): dispatches nothing, likewise.
                        continue
                    self._id_buffer = id_buffer
                    self._parse_lines([*block.split("\n"), ""], events)
                    id_buffer = self._id_buffer
                    continue
                event_type, new_id, data = m.groups()
                if new_id is None:
                    new_id = id_buffer
                event_type = event_type or "message"
            if "\n" in data:
                # Several lines after the first data line: all data lines (each LF starts
                # one) are joined with LF by dropping their `data: ` prefixes.
                if data.count("\n") != data.count("\ndata: "):
                    self._id_buffer = id_buffer
                    self._parse_lines([*block.split("\n"), ""], events)
                    id_buffer = self._id_buffer
                    continue
                data = data.replace("\ndata: ", "\n")
            id_buffer = new_id
            event = _new_event()
            event.data = data
            event.event = event_type
            event.id = id_buffer
            event.retry = None
            event.__class__ = _ServerSentEvent
            append(event)
        self._id_buffer = id_buffer
        self.last_event_id = id_buffer

    def _overflow(
        self, size: int, events: list[ServerSentEvent], last_id: str | None = None
    ) -> NoReturn:
        # The events completed before the overflow reach the caller (`exc.events`): the
        # last event ID string must match them, or a client resuming from it would get
        # them again.
        if last_id is not None:
            self.last_event_id = last_id
        self._start_stream()
        raise EventTooLarge(size, self.max_event_size, events)


# Building a frozen dataclass through __init__ costs one object.__setattr__ call per field:
# it was the largest single cost of decoding. The decoder fills a plain object with the same
# slots, then makes it a ServerSentEvent by assigning __class__, which CPython allows
# between classes of identical layout. The result is an ordinary ServerSentEvent (type,
# equality, hash, immutability), built in a third of the time.
_ServerSentEvent = ServerSentEvent


class _EventUnderConstruction:
    __slots__ = ServerSentEvent.__slots__


# Typed Any: mypy cannot follow the __class__ assignment.
_new_event: Callable[[], Any] = _EventUnderConstruction


def _check_layout() -> None:
    # Fails at import, not in the middle of a stream, if ServerSentEvent's layout changes.
    event = _new_event()
    event.data, event.event, event.id, event.retry = "", "message", "", None
    event.__class__ = _ServerSentEvent
    assert event == ServerSentEvent("", "message", "", None)


_check_layout()

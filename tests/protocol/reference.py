"""An independent, deliberately naive event stream parser to test the Decoder against.

It follows WHATWG HTML 9.2.6 "Interpreting an event stream" step by step on the whole
input at once: no chunking, no fast paths, the data buffer kept as the spec's string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssehub.protocol import ServerSentEvent


@dataclass
class Outcome:
    events: list[ServerSentEvent] = field(default_factory=list)
    retry: int | None = None
    last_event_id: str = ""


def reference_decode(raw: bytes) -> Outcome:
    text = raw.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    out = Outcome()
    data = ""
    event_type = ""
    id_buffer = ""
    position = 0
    while True:
        # The next line end: CR, LF or CR LF. Text after the last one is discarded.
        end = position
        while end < len(text) and text[end] not in "\r\n":
            end += 1
        if end == len(text):
            break
        line = text[position:end]
        if text[end] == "\r" and end + 1 < len(text) and text[end + 1] == "\n":
            position = end + 2
        else:
            position = end + 1

        if line == "":
            out.last_event_id = id_buffer
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            out.events.append(ServerSentEvent(data, event_type or "message", out.last_event_id))
            data = ""
            event_type = ""
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id":
            if "\0" not in value:
                id_buffer = value
        elif name == "retry" and value != "" and all(c in "0123456789" for c in value):
            out.retry = int(value)
    return out

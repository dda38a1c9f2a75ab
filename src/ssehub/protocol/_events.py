from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One event of an event stream.

    - `data`: the payload; may hold line breaks (encoded as several `data:` lines).
    - `event`: the event type; `"message"` is the default and is not written on the wire.
    - `id`: the id to send, or for a decoded event the stream's *last event ID string* at
      dispatch (`""` when none was set). Must not hold CR, LF or NUL.
    - `retry`: a reconnection time in milliseconds to send along (encoding only).
    """

    data: str = ""
    event: str = "message"
    id: str | None = None
    retry: int | None = None

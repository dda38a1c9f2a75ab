"""Reading event data as JSON, and OpenAI-style completion streams.

Each helper takes any iterable of `ServerSentEvent`s (an `EventSource`, a list of decoded
events), so they compose with every source.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import orjson

from ssehub.client._errors import EventError, InvalidJSON
from ssehub.protocol import ServerSentEvent

# The OpenAI API ends a completion stream with this data (not JSON) instead of an event.
DONE = "[DONE]"


def event_json(event: ServerSentEvent) -> Any:
    """`event.data` decoded as JSON; raises `InvalidJSON` (a `ValueError`) when it is not."""
    try:
        return orjson.loads(event.data)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(
            f"data of event {event.event!r} (id {event.id!r}) is not JSON: {exc}: "
            f"{event.data[:200]!r}",
            event=event,
        ) from exc


def iter_json(events: Iterable[ServerSentEvent]) -> Iterator[Any]:
    """The data of each event, decoded as JSON."""
    for event in events:
        yield event_json(event)


async def aiter_json(events: AsyncIterable[ServerSentEvent]) -> AsyncIterator[Any]:
    """The data of each event, decoded as JSON."""
    async for event in events:
        yield event_json(event)


def openai_chunk(event: ServerSentEvent) -> dict[str, Any] | None:
    """The chunk an OpenAI-style event carries; None for `[DONE]` and for events to skip.

    Raises `EventError` for `event: error` or a JSON object with an `"error"` key (how the
    OpenAI API and compatible servers report a failure after the stream has started).
    """
    if event.event == "error":
        raise _event_error(event)
    if event.event != "message":
        # Other types carry no chunk: keep-alives (`event: ping`) and control events
        # such as `ssehub.gap`.
        return None
    if event.data.strip() == DONE:
        return None
    chunk = event_json(event)
    if not isinstance(chunk, dict):
        raise InvalidJSON(f"expected a JSON object, got: {event.data[:200]!r}", event=event)
    if chunk.get("error") is not None:
        raise _event_error(event, chunk)
    return chunk


def iter_openai(events: Iterable[ServerSentEvent]) -> Iterator[dict[str, Any]]:
    """The chunks of an OpenAI-style stream (`chat.completion.chunk` dicts), to `[DONE]`."""
    for event in events:
        chunk = openai_chunk(event)
        if chunk is not None:
            yield chunk
        elif _is_done(event):
            return


async def aiter_openai(events: AsyncIterable[ServerSentEvent]) -> AsyncIterator[dict[str, Any]]:
    """The chunks of an OpenAI-style stream (`chat.completion.chunk` dicts), to `[DONE]`."""
    async for event in events:
        chunk = openai_chunk(event)
        if chunk is not None:
            yield chunk
        elif _is_done(event):
            return


def _is_done(event: ServerSentEvent) -> bool:
    return event.event == "message" and event.data.strip() == DONE


def _event_error(event: ServerSentEvent, payload: Any = None) -> EventError:
    if payload is None:
        try:
            payload = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            payload = event.data
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        detail = error.get("message") or orjson.dumps(error).decode()
    else:
        detail = str(error)
    return EventError(f"the stream reported an error: {detail}", event=event, error=error)

"""Reading a gateway's event stream in tests, with ssehub's own decoder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from ssehub.protocol import Decoder, ServerSentEvent


def iter_events(response: httpx.Response) -> Iterator[ServerSentEvent]:
    decoder = Decoder()
    for raw in response.iter_raw():
        yield from decoder.feed(raw)


def chunks(events: list[ServerSentEvent]) -> list[dict[str, Any]]:
    """The JSON objects among `events` (everything but `[DONE]` and ssehub's own events)."""
    return [json.loads(e.data) for e in events if e.event == "message" and e.data != "[DONE]"]


def text_of(objects: list[dict[str, Any]]) -> str:
    parts = []
    for obj in objects:
        for choice in obj.get("choices", []):
            if "delta" in choice:
                parts.append(choice["delta"].get("content") or "")
            else:
                parts.append(choice.get("text") or "")
    return "".join(parts)


def post_stream(
    url: str, body: dict[str, Any], **kwargs: Any
) -> tuple[httpx.Response, list[ServerSentEvent]]:
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json={"stream": True, **body}, timeout=30, **kwargs
    ) as response:
        if response.status_code != 200:
            response.read()
            return response, []
        return response, list(iter_events(response))

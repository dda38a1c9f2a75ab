"""A fake OpenAI-compatible upstream, awkward on purpose, as a raw ASGI app.

The request's `model` picks the behaviour. Streams use CRLF line ends, comments, fields
ssehub does not know, and are written in pieces cut inside `data:`, inside CRLF and inside
UTF-8 sequences, each piece its own write with a pause so the relay reads them apart.
Every request and every client disconnect is recorded, for tests to assert on.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

# The text the `fake-text` model streams: multi-byte characters that cuts land inside.
TEXT_PIECES = ["Héllo", ", wörld", "! 你好", "，世界", " 🎉🎉", " done."]
REASONING = ["Let me ", "think…"]
TOOL_ARGUMENTS = ['{"ci', 'ty": "Pa', 'ris", "unit": ', '"°C"}']
MODELS = ["fake-text", "fake-tools", "fake-error-mid", "fake-garbage", "fake-cut", "fake-slow"]


@dataclass
class Seen:
    """A request the upstream got, and whether its client went away before the end."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    disconnected: threading.Event = field(default_factory=threading.Event)
    chunks_sent: int = 0
    client: tuple[str, int] | None = None


def chunk(model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "upstream-id-1",
        "object": "chat.completion.chunk",
        "created": 1726132850,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        **extra,
    }


def delta(content: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish, **extra}


def text_stream(model: str, include_usage: bool) -> list[dict[str, Any]]:
    chunks = [chunk(model, [delta({"role": "assistant", "content": ""})], x_vendor={"a": [1]})]
    chunks += [chunk(model, [delta({"reasoning_content": r, "content": None})]) for r in REASONING]
    for i, piece in enumerate(TEXT_PIECES):
        logprobs = {"content": [{"token": piece, "logprob": -0.25 * i, "bytes": None}]}
        chunks.append(chunk(model, [delta({"content": piece}) | {"logprobs": logprobs}]))
    chunks.append(chunk(model, [delta({}, "stop")]))
    if include_usage:
        usage = {"prompt_tokens": 5, "completion_tokens": len(TEXT_PIECES), "total_tokens": 11}
        chunks.append(chunk(model, [], usage=usage))
    return chunks


def tool_stream(model: str) -> list[dict[str, Any]]:
    first = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "index": 0,
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ],
    }
    chunks = [chunk(model, [delta(first)])]
    for part in TOOL_ARGUMENTS:
        fragment = {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}
        chunks.append(chunk(model, [delta(fragment)]))
    chunks.append(chunk(model, [delta({}, "tool_calls")]))
    return chunks


def text_completion_stream(model: str) -> list[dict[str, Any]]:
    return [
        {
            "id": "cmpl-up",
            "object": "text_completion",
            "created": 1,
            "model": model,
            "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}],
        }
        for piece in TEXT_PIECES
    ] + [
        {
            "id": "cmpl-up",
            "object": "text_completion",
            "created": 1,
            "model": model,
            "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}],
        }
    ]


def awkward_bytes(events: list[str]) -> list[bytes]:
    """The wire form of `events` (data strings) with CRLF and comments, cut into awkward
    pieces: inside `data:`, between CR and LF, and inside UTF-8 sequences."""
    wire = b": upstream says hello\r\n\r\n"
    for i, data in enumerate(events):
        if i == 2:
            wire += b":keep-alive\r\n"
        field = b"" if data.startswith("event:") else b"data: "  # a whole event, as is
        wire += field + data.encode() + b"\r\n\r\n"
    pieces: list[bytes] = []
    start = 0
    for i in range(1, len(wire)):
        byte = wire[i]
        cut = (
            (wire[i - 1 : i] == b"\r" and byte == ord("\n"))  # between CR and LF
            or (0x80 <= byte < 0xC0 and i % 2 == 0)  # inside a UTF-8 sequence
            or wire[i - 3 : i] == b"dat"  # inside the field name
        )
        if cut:
            pieces.append(wire[start:i])
            start = i
    pieces.append(wire[start:])
    return pieces


class FakeUpstream:
    """The ASGI app. `seen` lists requests in arrival order."""

    def __init__(self, piece_pause: float = 0.002, slow_interval: float = 0.02) -> None:
        self.seen: list[Seen] = []
        self.piece_pause = piece_pause
        self.slow_interval = slow_interval
        # Set to make `fake-wait` send its first chunk.
        self.release = threading.Event()

    def requests_for(self, model: str) -> list[Seen]:
        return [s for s in self.seen if s.body.get("model") == model]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        if path.endswith("/models"):
            data = [{"id": m, "object": "model", "created": 1, "owned_by": "fake"} for m in MODELS]
            await _json(send, 200, {"object": "list", "data": data})
            return
        parsed = json.loads(body) if body else {}
        seen = Seen(path, headers, parsed, client=tuple(scope["client"]))
        self.seen.append(seen)
        model = parsed.get("model", "")
        if model.startswith("fake-late-"):
            # No response head until released: an upstream slow to answer at all.
            model = model.removeprefix("fake-late-")
            gone = asyncio.ensure_future(_wait_disconnect(receive))
            # `release` is set from the test's thread: polled, not awaited.
            while not self.release.is_set() and not gone.done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if gone.done():
                seen.disconnected.set()
                return
            gone.cancel()
        include_usage = bool((parsed.get("stream_options") or {}).get("include_usage"))
        if model == "fake-missing":
            error = {
                "message": "The model `fake-missing` does not exist",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
            await _json(send, 404, {"error": error})
            return
        if model == "fake-ratelimit":
            error = {
                "message": "Rate limit reached",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
            await _json(send, 429, {"error": error})
            return
        if model == "fake-redirect":
            await _raw(send, 301, b"text/plain", b"moved")
            return
        if model == "fake-html-error":
            await _raw(send, 502, b"text/html", b"<html><body>Bad gateway</body></html>")
            return
        if model == "fake-json":
            await _json(send, 200, {"surprise": True})
            return
        if not parsed.get("stream"):
            text = "".join(TEXT_PIECES)
            reply = {
                "id": "upstream-full",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
                "x_vendor": "kept",
            }
            await _json(send, 200, reply)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await self._stream(model, include_usage, path, seen, send, watcher)
        finally:
            if watcher.done():
                seen.disconnected.set()
            watcher.cancel()

    async def _stream(
        self,
        model: str,
        include_usage: bool,
        path: str,
        seen: Seen,
        send: Any,
        watcher: asyncio.Future[None],
    ) -> None:
        async def write(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        if model == "fake-slow" or model == "fake-wait":
            # Runs until the client goes: the cost a gateway must stop.
            if model == "fake-wait":
                # `release` is set from the test's thread: polled, not awaited.
                while not self.release.is_set() and not watcher.done():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            i = 0
            while not watcher.done():
                data = json.dumps(chunk(model, [delta({"content": f"t{i} "})]))
                await write(b"data: " + data.encode() + b"\r\n\r\n")
                seen.chunks_sent += 1
                i += 1
                await asyncio.wait({watcher}, timeout=self.slow_interval)
            return
        if model.startswith("fake-flood-"):
            # N chunks of about 1 KB as fast as the gateway takes them, then [DONE].
            count = int(model.removeprefix("fake-flood-"))
            pad = "x" * 1000
            for start in range(0, count, 100):
                batch = [
                    b"data: "
                    + json.dumps(chunk(model, [delta({"content": f"{i} {pad}"})])).encode()
                    for i in range(start, min(start + 100, count))
                ]
                await write(b"\n\n".join(batch) + b"\n\n")
                seen.chunks_sent += len(batch)
            await write(b"data: [DONE]\n\n", more=False)
            return
        if path.endswith("/completions") and not path.endswith("/chat/completions"):
            events = [json.dumps(c, ensure_ascii=False) for c in text_completion_stream(model)]
            events.append("[DONE]")
        elif model == "fake-tools":
            events = [json.dumps(c) for c in tool_stream(model)] + ["[DONE]"]
        else:
            events = [json.dumps(c, ensure_ascii=False) for c in text_stream(model, include_usage)]
            if model == "fake-error-mid":
                error = {
                    "message": "the model crashed",
                    "type": "server_error",
                    "param": None,
                    "code": "boom",
                }
                events = [*events[:4], json.dumps({"error": error})]
            elif model == "fake-garbage":
                events = [*events[:4], "this is {not json", *events[4:]]
            elif model == "fake-event-error":
                events = [*events[:4], "event: error\r\ndata: overloaded, try later"]
            elif model == "fake-cut":
                events = events[:4]
            else:
                events.append("[DONE]")
        for piece in awkward_bytes(events):
            await write(piece)
            seen.chunks_sent += 1
            await asyncio.sleep(self.piece_pause)
        await write(b"", more=False)


async def _wait_disconnect(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _json(send: Any, status: int, body: Any) -> None:
    await _raw(send, status, b"application/json", json.dumps(body).encode())


async def _raw(send: Any, status: int, content_type: bytes, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type)],
        }
    )
    await send({"type": "http.response.body", "body": body})

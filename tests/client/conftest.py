"""A real event-stream server for the client tests, misbehaving on request.

Each test passes its own `key` in the query string, so one server (started once per
session, on a free port) serves every test, and each test reads back only its requests.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from ssehub.protocol import ServerSentEvent as Event
from ssehub.protocol import encode, encode_comment, encode_retry

from _support import serve_in_thread

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class Seen:
    """One request as the server received it."""

    path: str
    method: str
    last_event_id: str | None
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Recorder:
    requests: dict[str, list[Seen]] = field(default_factory=dict)
    disconnected: set[str] = field(default_factory=set)
    # (key, what) pairs of one-time misbehaviours already done: each drop happens once.
    done: set[tuple[str, str]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, key: str) -> list[Seen]:
        with self.lock:
            return list(self.requests.get(key, []))

    def once(self, key: str, what: str) -> bool:
        """True the first time (key, what) is asked about."""
        with self.lock:
            if (key, what) in self.done:
                return False
            self.done.add((key, what))
            return True


@dataclass
class Server:
    url: str
    seen: Recorder

    def __call__(self, path: str, key: str, **query: object) -> str:
        params = "&".join(f"{k}={v}" for k, v in {"key": key, **query}.items())
        return f"{self.url}{path}?{params}"


EVENT_STREAM = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]


class Endpoint:
    """A raw ASGI endpoint (Starlette routes to instances as ASGI apps), so that a handler
    can break a response off in the middle, which Starlette's responses never do."""

    def __init__(self, recorder: Recorder, handler: Handler) -> None:
        self.recorder = recorder
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        body = await request.body()
        raw_id = dict(scope["headers"]).get(b"last-event-id")
        key = request.query_params.get("key", "")
        with self.recorder.lock:
            self.recorder.requests.setdefault(key, []).append(
                Seen(
                    path=request.url.path,
                    method=request.method,
                    last_event_id=None if raw_id is None else raw_id.decode("utf-8"),
                    headers=dict(request.headers),
                    body=body,
                    at=time.monotonic(),
                )
            )
        if await self.handler(request, self.recorder, send) == HOLD:
            # Keep the response open, silent, until the client goes: tests check that it
            # closed the connection.
            await _until_disconnect(receive, self.recorder, key)
        # Returning from a response not completed makes uvicorn close the connection
        # without ending the chunked body: a broken connection, as the client sees it.


async def _until_disconnect(receive: Receive, recorder: Recorder, key: str) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            with recorder.lock:
                recorder.disconnected.add(key)
            return


async def _start(
    send: Send, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": headers or EVENT_STREAM}
    )


async def _body(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


HOLD, DROP, DONE = "hold", "drop", "done"
Handler = Callable[[Request, Recorder, Send], Awaitable[str]]


async def numbers(request: Request, recorder: Recorder, send: Send) -> str:
    """Events 1..count with ids (optionally `prefix`ed), from after Last-Event-ID.

    - `drop=3,7`: once each, break the connection right after event 3 (or 7), in the
      middle of the next event's bytes.
    - `retry=MS`: send `retry: MS` first. `json=1`: data is `{"n": N}`; `big=N`: event
      N's data is 1000 characters long. `stall=N`: once, fall silent after event N.
    - `gap=S` and `beat=S`: wait S seconds between events, sending a heartbeat comment
      every `beat` seconds meanwhile.
    - `location=1`: name this stream's GET URL in Content-Location.
    - `forget=N`: once, after event N, reset the last event ID with `id` and drop.
    - Once the client has everything, answer 204 (the spec's "stop reconnecting").
    """
    q = request.query_params
    key = q.get("key", "")
    count = int(q.get("count", "5"))
    prefix = q.get("prefix", "")
    drops = {int(n) for n in q.get("drop", "").split(",") if n}
    stall_after = int(q["stall"]) if "stall" in q else None
    gap = float(q.get("gap", "0"))
    beat = float(q.get("beat", "0"))
    last = request.headers.get("last-event-id")
    if last is not None:
        # Header bytes are UTF-8 (Starlette decodes them as latin-1).
        last = last.encode("latin-1").decode("utf-8")
    start = int(last.removeprefix(prefix)) + 1 if last else 1
    if start > count:
        await _start(send, 204, [])
        await _body(send, b"", more=False)
        return DONE
    headers = list(EVENT_STREAM)
    if q.get("location"):
        # This stream, resumable with a GET (what ssehub's gateway offers per completion).
        query = "&".join(f"{k}={v}" for k, v in q.multi_items() if k != "location")
        headers.append((b"content-location", f"/numbers?{query}".encode()))
    await _start(send, 200, headers)
    if "retry" in q:
        await _body(send, encode_retry(int(q["retry"])))
    for n in range(start, count + 1):
        if gap:
            waited = 0.0
            while waited < gap:
                step = min(beat or gap, gap - waited)
                await anyio.sleep(step)
                waited += step
                if beat:
                    await _body(send, encode_comment())
        data = orjson.dumps({"n": n}).decode() if q.get("json") else f"event {n}"
        if q.get("big") == str(n):
            data = "x" * 1000
        await _body(
            send, encode(Event(data=data, id=f"{prefix}{n}", event=q.get("type", "message")))
        )
        if q.get("forget") == str(n) and recorder.once(key, f"forget{n}"):
            # An empty `id` resets the last event ID (WHATWG HTML 9.2.6), then a drop: the
            # client must reconnect without Last-Event-ID.
            await _body(send, b"id\n\n")
            return DROP
        if n in drops and recorder.once(key, f"drop{n}"):
            # Half an event, then the connection breaks: the client must discard it.
            await _body(send, b"data: half of the next ev")
            return DROP
        if stall_after == n and recorder.once(key, f"stall{n}"):
            # Silence: no bytes, not even heartbeats, until the client gives up on us.
            return HOLD
    await _body(send, b"", more=False)
    return DONE


async def stall(request: Request, recorder: Recorder, send: Send) -> str:
    """One event, then silence until the client leaves."""
    await _start(send)
    await _body(send, encode(Event(data="hello", id="1")))
    return HOLD


async def status(request: Request, recorder: Recorder, send: Send) -> str:
    """`code` (default 500) with a text body, `times` times per key, then `numbers`."""
    q = request.query_params
    key = q.get("key", "")
    times = int(q.get("times", "1000000"))
    seen = len(recorder.of(key))
    if seen <= times:
        code = int(q.get("code", "500"))
        body = b"boom: the database is on fire\n" + b"x" * int(q.get("pad", "0"))
        await _start(send, code, [(b"content-type", b"text/plain; charset=utf-8")])
        await _body(send, body, more=False)
        return DONE
    return await numbers(request, recorder, send)


async def wrong_type(request: Request, recorder: Recorder, send: Send) -> str:
    await _start(send, 200, [(b"content-type", b"application/json")])
    await _body(send, b'{"detail": "not a stream"}', more=False)
    return DONE


async def nothing(request: Request, recorder: Recorder, send: Send) -> str:
    await _start(send, 204, [])
    await _body(send, b"", more=False)
    return DONE


async def openai(request: Request, recorder: Recorder, send: Send) -> str:
    """An OpenAI-style completion stream; `mode` = ok | error_data | error_event."""
    mode = request.query_params.get("mode", "ok")
    await _start(send)
    for word in ["Hel", "lo"]:
        chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": word}}]}
        await _body(send, b"data: " + orjson.dumps(chunk) + b"\n\n")
    await _body(send, b"event: ping\ndata: {}\n\n")
    if mode == "error_data":
        await _body(send, b'data: {"error": {"message": "model overloaded", "code": 503}}\n\n')
    elif mode == "error_event":
        await _body(send, b'event: error\ndata: {"message": "quota exceeded"}\n\n')
    await _body(send, b"data: [DONE]\n\n")
    # Anything after [DONE] must not reach the reader, which must not wait for the end.
    await _body(send, b'data: {"after": "done"}\n\n')
    return HOLD


async def redirect(request: Request, recorder: Recorder, send: Send) -> str:
    """307 to `/numbers` with the same query (EventSource follows redirects)."""
    location = f"/numbers?{request.url.query}".encode()
    await _start(send, 307, [(b"location", location), (b"content-length", b"0")])
    await _body(send, b"", more=False)
    return DONE


def build_app(recorder: Recorder) -> Starlette:
    handlers = {
        "/redirect": redirect,
        "/numbers": numbers,
        "/stall": stall,
        "/status": status,
        "/wrong-type": wrong_type,
        "/nothing": nothing,
        "/openai": openai,
    }
    return Starlette(
        routes=[
            Route(path, Endpoint(recorder, handler), methods=["GET", "POST"])
            for path, handler in handlers.items()
        ]
    )


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    recorder = Recorder()
    with serve_in_thread(build_app(recorder), timeout_graceful_shutdown=1) as url:
        yield Server(url, recorder)


@pytest.fixture
def key() -> str:
    return uuid.uuid4().hex

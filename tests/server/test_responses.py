"""EventStreamResponse in an app of its own, served by real uvicorn."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server._sse import Stream, stalled_subscriber
from ssehub.protocol import ServerSentEvent
from ssehub.server import EventStreamResponse
from ssehub.server.responses import encode_item

from _support import serve_in_thread, wait_for


class Record:
    """What the app's callbacks and producers saw, readable from the test thread."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.producer_closed = threading.Event()
        self.shutdown: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def hook(self, name: str) -> Any:
        def record(*args: Any) -> None:
            self.calls.append((name, *args))

        return record


def make_app(record: Record) -> Starlette:
    async def kinds(request: Request) -> Response:
        async def source() -> AsyncIterator[Any]:
            yield "plain"
            yield {"data": {"n": 1}, "event": "obj", "id": "7"}
            yield ServerSentEvent(data="two\nlines", event="sse")
            yield {"data": "no type"}

        return EventStreamResponse(source(), retry=2500, on_complete=record.hook("complete"))

    async def sync_source(request: Request) -> Response:
        def source() -> Iterator[str]:
            yield from ("a", "b", "c")

        return EventStreamResponse(source())

    async def idle(request: Request) -> Response:
        async def source() -> AsyncIterator[str]:
            try:
                yield "first"
                await asyncio.Event().wait()  # never: only heartbeats follow
                yield "never"
            finally:
                record.producer_closed.set()

        heartbeat = float(request.query_params.get("heartbeat", "0.1")) or None
        return EventStreamResponse(
            source(), heartbeat=heartbeat, on_complete=record.hook("complete")
        )

    async def failing(request: Request) -> Response:
        async def source() -> AsyncIterator[str]:
            yield "ok"
            raise RuntimeError("boom")

        return EventStreamResponse(
            source(), on_error=record.hook("error"), on_complete=record.hook("complete")
        )

    async def flood(request: Request) -> Response:
        async def source() -> AsyncIterator[str]:
            while True:
                yield "z" * 65536

        return EventStreamResponse(
            source(),
            send_timeout=0.3,
            on_timeout=record.hook("timeout"),
            on_complete=record.hook("complete"),
        )

    async def until_shutdown(request: Request) -> Response:
        record.shutdown = asyncio.Event()
        record.loop = asyncio.get_running_loop()

        async def source() -> AsyncIterator[str]:
            yield "started"
            await asyncio.Event().wait()
            yield "never"

        return EventStreamResponse(
            source(), shutdown=record.shutdown, on_complete=record.hook("complete")
        )

    return Starlette(
        routes=[
            Route("/kinds", kinds),
            Route("/sync", sync_source),
            Route("/idle", idle),
            Route("/failing", failing),
            Route("/flood", flood),
            Route("/shutdown", until_shutdown),
        ]
    )


@pytest.fixture
def app() -> Iterator[tuple[httpx.Client, Record, str]]:
    record = Record()
    with (
        serve_in_thread(make_app(record), timeout_graceful_shutdown=2) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        yield client, record, url


def test_headers_retry_and_every_kind_of_item(app: tuple[httpx.Client, Record, str]) -> None:
    client, record, _ = app
    with Stream(client, "/kinds") as stream:
        stream.until_end()
        headers = stream.response.headers
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert "connection" not in headers
    assert "content-encoding" not in headers
    assert stream.raw.startswith(b"retry: 2500\n\n")
    assert [(e.event, e.data, e.id) for e in stream.events] == [
        ("message", "plain", ""),
        ("obj", '{"n":1}', "7"),
        ("sse", "two\nlines", "7"),
        ("message", "no type", "7"),
    ]
    wait_for(lambda: record.calls == [("complete",)])


def test_a_sync_iterator_source(app: tuple[httpx.Client, Record, str]) -> None:
    client, _, _ = app
    with Stream(client, "/sync") as stream:
        stream.until_end()
    assert [e.data for e in stream.events] == ["a", "b", "c"]


def test_heartbeats_while_the_source_is_idle(app: tuple[httpx.Client, Record, str]) -> None:
    client, _, _ = app
    with Stream(client, "/idle") as stream:
        stream.read_until(lambda s: s.raw.count(b":\n\n") >= 3, what="three heartbeats")
        assert stream.raw.startswith(b"data: first\n\n:\n\n")


def test_leaving_client_stops_the_producer(app: tuple[httpx.Client, Record, str]) -> None:
    client, record, _ = app
    with Stream(client, "/idle?heartbeat=0") as stream:
        stream.events_n(1)
    # No heartbeat to write into the closed connection: the disconnect itself is seen.
    assert record.producer_closed.wait(10)
    wait_for(lambda: record.calls == [("complete",)])


def test_source_errors_end_the_stream_and_call_on_error(
    app: tuple[httpx.Client, Record, str],
) -> None:
    client, record, _ = app
    with Stream(client, "/failing") as stream:
        stream.until_end()
    assert [e.data for e in stream.events] == ["ok"]
    wait_for(lambda: len(record.calls) == 2)
    (name, exc), complete = record.calls
    assert name == "error"
    assert isinstance(exc, RuntimeError)
    assert complete == ("complete",)


def test_send_timeout_on_a_client_that_stopped_reading(
    app: tuple[httpx.Client, Record, str],
) -> None:
    _, record, url = app
    sock = stalled_subscriber(url, "/flood")
    try:
        wait_for(lambda: record.calls == [("timeout",), ("complete",)], 15)
    finally:
        sock.close()


def test_shutdown_event_ends_the_stream(app: tuple[httpx.Client, Record, str]) -> None:
    client, record, _ = app
    with Stream(client, "/shutdown") as stream:
        stream.events_n(1)
        assert record.loop is not None
        assert record.shutdown is not None
        record.loop.call_soon_threadsafe(record.shutdown.set)
        stream.until_end()
    wait_for(lambda: record.calls == [("complete",)])


@pytest.mark.parametrize(
    ("item", "wire"),
    [
        ("x", b"data: x\n\n"),
        ({"data": [1]}, b"data: [1]\n\n"),
        (
            {"data": "d", "event": "e", "id": "1", "retry": 5},
            b"event: e\nid: 1\nretry: 5\ndata: d\n\n",
        ),
        (ServerSentEvent(data="a\rb"), b"data: a\ndata: b\n\n"),
    ],
)
def test_encode_item(item: Any, wire: bytes) -> None:
    assert encode_item(item) == wire


def test_encode_item_rejects_other_things() -> None:
    with pytest.raises(TypeError):
        encode_item(5)  # type: ignore[arg-type]


def test_cancelled_by_the_servers_shutdown_timeout_still_completes() -> None:
    """An app with no shutdown event of its own: uvicorn cancels the stream after its
    graceful-shutdown timeout, and on_complete still runs."""
    record = Record()
    client = httpx.Client(timeout=10)
    try:
        with serve_in_thread(make_app(record), timeout_graceful_shutdown=0.2) as url:
            stream = Stream(client, f"{url}/idle?heartbeat=0")
            stream.events_n(1)
        # The server has stopped: the stream was cut and the callback ran.
        assert record.producer_closed.wait(10)
        wait_for(lambda: record.calls == [("complete",)])
        stream.close()
    finally:
        client.close()

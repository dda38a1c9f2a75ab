"""Helpers for server tests: a real uvicorn serving `create_app`, SSE streams over httpx."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette

from ssehub.protocol import Decoder, ServerSentEvent
from ssehub.server import Hub, create_app
from ssehub.server.connection import HubHttpProtocol
from ssehub.settings import Settings

from _support import serve_in_thread, wait_for


@dataclass
class Server:
    url: str
    app: Starlette
    client: httpx.Client
    http: str = "hub"

    @property
    def hub(self) -> Hub:
        hub: Hub = self.app.state.hub
        return hub

    def wait_live(self, count: int, channel: str | None = None) -> None:
        """Wait until `count` subscribers (of `channel`) are live on their pump."""

        def live() -> bool:
            conns = self.hub.connections(channel)
            return len(conns) == count and all(c.live for c in conns)

        wait_for(live, 10, what=f"{count} live subscribers")

    def publish(self, channel: str, data: str, **headers: str) -> str:
        r = self.client.post(f"/channels/{channel}", content=data, headers=headers)
        assert r.status_code == 200, r.text
        ids: list[str] = r.json()["ids"]
        return ids[0]


@contextlib.contextmanager
def running(
    settings: Settings | None = None, *, http: str = "hub", **changes: Any
) -> Iterator[Server]:
    """`create_app` served by uvicorn. `http`: "hub" (the default, as `ssehub serve`:
    subscriptions leave ASGI, see server/connection.py), "httptools" (ASGI, the pump
    writes to the transport itself) or "h11" (ASGI `send` only)."""
    settings = (settings or Settings()).replace(**changes)
    app = create_app(settings)
    protocol: Any = HubHttpProtocol if http == "hub" else http
    with (
        serve_in_thread(app, timeout_graceful_shutdown=2, http=protocol) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        yield Server(url, app, client, http)


class Stream:
    """A GET of an event stream, read incrementally: raw bytes and decoded events."""

    def __init__(self, client: httpx.Client, path: str, headers: dict[str, str] | None = None):
        self._cm = client.stream("GET", path, headers=headers)
        self.response = self._cm.__enter__()
        self.raw = bytearray()
        self.events: list[ServerSentEvent] = []
        self.ended = False
        self._decoder = Decoder()
        self._chunks = self.response.iter_raw()

    def read_until(
        self, condition: Callable[[Stream], bool], timeout: float = 10.0, what: str = ""
    ) -> Stream:
        deadline = time.monotonic() + timeout
        while not condition(self):
            if self.ended or time.monotonic() > deadline:
                raise AssertionError(
                    f"stream {'ended' if self.ended else 'timed out'} before {what or condition};"
                    f" got {self.raw[-500:]!r}"
                )
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self.ended = True
                self.events.extend(self._decoder.close())
                continue
            self.raw += chunk
            self.events.extend(self._decoder.feed(chunk))
        return self

    def events_n(self, n: int) -> list[ServerSentEvent]:
        self.read_until(lambda s: len(s.events) >= n, what=f"{n} events")
        return self.events[:n]

    def until_end(self) -> Stream:
        return self.read_until(lambda s: s.ended, what="the end of the stream")

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stalled_subscriber(url: str, path: str) -> socket.socket:
    """A raw connection that subscribes and then never reads (tiny receive buffer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: stalled\r\n\r\n".encode())
    return sock

"""Subscriptions outside ASGI (`HubHttpProtocol`, as `ssehub serve` runs): what the
connection does that the channel tests cannot see through httpx."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server._sse import Server, running
from ssehub.server.connection import Subscription

from _support import free_port, serve_in_process, wait_for


@pytest.fixture
def server() -> Iterator[Server]:
    with running(http="hub") as s:
        yield s


class Raw:
    """One client connection, read by hand."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host = host
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.data = b""

    def send(self, *requests: str) -> None:
        self.sock.sendall(b"".join(r.encode() for r in requests))

    def get(self, path: str, *headers: str) -> str:
        lines = [f"GET {path} HTTP/1.1", f"Host: {self.host}", *headers]
        return "\r\n".join(lines) + "\r\n\r\n"

    def read_until(self, marker: bytes, timeout: float = 10) -> bytes:
        """Everything up to and including `marker` (consumed)."""
        deadline = time.monotonic() + timeout
        while marker not in self.data:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            more = self.sock.recv(65536)
            if not more:
                raise AssertionError(f"closed before {marker!r}; got {self.data!r}")
            self.data += more
        head, _, self.data = self.data.partition(marker)
        return head + marker

    def closed(self, timeout: float = 10) -> bool:
        self.sock.settimeout(timeout)
        return self.data == b"" and self.sock.recv(65536) == b""

    def close(self) -> None:
        self.sock.close()


def test_an_idle_subscription_has_no_task_of_its_own(server: Server) -> None:
    clients = [Raw(server.url) for _ in range(20)]
    try:
        for raw in clients:
            raw.send(raw.get("/channels/idle"))
        server.wait_live(20)
        for sub in server.hub._subscribers.values():
            assert type(sub.cycle) is Subscription
            assert sub.cycle.task is None
        # The hub's ticker and the channel's pump; no request task, no join task.
        wait_for(lambda: len(server.hub._tasks) == 2, 10, what="join tasks to end")
        server.publish("idle", "hello")
        for raw in clients:
            assert raw.read_until(b"data: hello\n\n")
    finally:
        for raw in clients:
            raw.close()
    wait_for(lambda: not server.hub.connections(), 10, what="subscribers forgotten")


def _head(raw: bytes) -> list[str]:
    lines = raw.decode().split("\r\n")
    return sorted(line.lower() for line in lines if line and not line.startswith("date:"))


def test_response_heads_are_the_asgi_paths() -> None:
    heads: dict[str, list[list[str]]] = {}
    for http in ("hub", "httptools"):
        with running(http=http) as server:
            server.client.delete("/channels/gone")
            raw = Raw(server.url)
            other = Raw(server.url)
            try:
                raw.send(raw.get("/channels/live"))
                live = _head(raw.read_until(b"\r\n\r\n"))
                # One after the other on one connection (kept alive after each).
                other.send(other.get("/channels/gone"))
                gone = _head(other.read_until(b"\r\n\r\n"))
                other.send(other.get("/channels/x?from=newest"))
                wrong = _head(other.read_until(b"}"))
                other.send(other.get("/channels/bad%20name"))
                bad = _head(other.read_until(b"}"))
            finally:
                raw.close()
                other.close()
        heads[http] = [live, gone, wrong, bad]
    assert heads["hub"] == heads["httptools"]
    live, gone, wrong, _ = heads["hub"]
    assert "http/1.1 200 ok" in live
    assert "transfer-encoding: chunked" in live
    assert "http/1.1 204 no content" in gone
    assert "http/1.1 400 bad request" in wrong


def test_the_connection_is_kept_alive_after_the_stream_ends(server: Server) -> None:
    raw = Raw(server.url)
    try:
        raw.send(raw.get("/channels/ka"))
        raw.read_until(b"\r\n\r\n")
        server.wait_live(1)
        server.client.delete("/channels/ka")
        assert raw.read_until(b"0\r\n\r\n").endswith(b"data: \n\n\r\n0\r\n\r\n")
        wait_for(lambda: not server.hub.connections(), 10, what="subscriber forgotten")
        # The same connection: a 204 for the closed channel, then any other request.
        raw.send(raw.get("/channels/ka"))
        assert raw.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 204 ")
        raw.send(raw.get("/healthz"))
        assert raw.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 200 ")
        assert b'"status":"ok"' in raw.read_until(b"}")
    finally:
        raw.close()


def test_a_request_pipelined_behind_a_stream_closes_it_at_the_end(server: Server) -> None:
    raw = Raw(server.url)
    try:
        raw.send(raw.get("/channels/pipe"))
        raw.read_until(b"\r\n\r\n")
        server.wait_live(1)
        raw.send(raw.get("/healthz"))
        server.publish("pipe", "still streaming")
        raw.read_until(b"data: still streaming\n\n")
        server.client.delete("/channels/pipe")
        raw.read_until(b"0\r\n\r\n")
        # Not answered: the client retries it on a new connection (RFC 9112, 9.3.2).
        assert raw.closed()
    finally:
        raw.close()


def test_connection_close_is_honoured(server: Server) -> None:
    raw = Raw(server.url)
    try:
        raw.send(raw.get("/channels/cc", "Connection: close"))
        assert b"connection: close\r\n" in raw.read_until(b"\r\n\r\n")
        server.wait_live(1)
        server.client.delete("/channels/cc")
        raw.read_until(b"0\r\n\r\n")
        assert raw.closed()
    finally:
        raw.close()


@pytest.mark.parametrize("http", ["hub", "httptools"])
def test_peer_behind_a_trusted_proxy(http: str) -> None:
    with running(http=http) as server:
        raw = Raw(server.url)
        try:
            raw.send(raw.get("/channels/px", "X-Forwarded-For: 203.0.113.7"))
            raw.read_until(b"\r\n\r\n")
            server.wait_live(1)
            (conn,) = server.hub.connections()
            assert conn.peer.startswith("203.0.113.7:")
        finally:
            raw.close()


def test_a_client_leaving_while_it_joins_is_forgotten(server: Server) -> None:
    for i in range(300):
        server.publish("busy", f"e{i}")
    for _ in range(20):
        raw = Raw(server.url)
        raw.send(raw.get("/channels/busy?from=oldest"))
        raw.close()
    wait_for(lambda: not server.hub.connections(), 10, what="subscribers forgotten")
    wait_for(lambda: len(server.hub._tasks) <= 1, 10, what="join tasks and the pump to end")


def test_serve_uses_the_protocol_only_on_a_tested_uvicorn(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import uvicorn

    from ssehub.server import connection

    tested = uvicorn.__version__.startswith(tuple(v + "." for v in connection.TESTED_UVICORN))
    expected = connection.HubHttpProtocol if tested else "httptools"
    assert connection.http_protocol() == expected
    monkeypatch.setattr(uvicorn, "__version__", "9.99.0")
    assert connection.http_protocol() == "httptools"
    assert "not one ssehub's connection protocol was tested with" in caplog.text


def test_serve_logs_subscriptions_like_uvicorn_does() -> None:
    import httpx

    port = free_port()
    with serve_in_process("--log-level", "info", port=port) as (url, _):
        with httpx.stream("GET", url + "/channels/logged?from=oldest", timeout=10) as response:
            assert response.status_code == 200
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ssehub-test-{port}.log"
        wait_for(lambda: "/channels/logged" in log.read_text(), 10, what="the access log line")
        text = log.read_text()
    assert '"GET /channels/logged?from=oldest HTTP/1.1" 200' in text
    assert "Logging error" not in text

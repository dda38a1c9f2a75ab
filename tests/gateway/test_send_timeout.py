"""A client that stops reading is dropped after the send timeout; the run and its other
readers go on."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx
import orjson
from fake_upstream import FakeUpstream
from sse import chunks, iter_events

from conftest import ServeGateway

from _support import wait_for

Upstream = tuple[str, FakeUpstream]
COUNT = 20_000  # chunks of ~1 KB: far more than the socket buffers of a stalled client hold


def _stalled_client(url: str, body: dict[str, object]) -> tuple[socket.socket, str]:
    """Send a streamed request on a raw socket with a tiny receive buffer, read the
    response head, then read nothing more."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((parts.hostname, parts.port))
    payload = orjson.dumps(body)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200")
    (line,) = [h for h in head.split(b"\r\n") if h.lower().startswith(b"ssehub-completion-id:")]
    return sock, line.split(b":", 1)[1].strip().decode()


def _send_timeouts(url: str) -> float:
    metrics = httpx.get(url + "/metrics").text
    name = "ssehub_gateway_send_timeouts_total"
    (line,) = [m for m in metrics.splitlines() if m.startswith(name)]
    return float(line.split()[-1])


def test_a_client_that_stops_reading_is_dropped(
    serve_gateway: ServeGateway, fake_upstream: Upstream
) -> None:
    upstream_url, fake = fake_upstream
    body = {"model": f"fake-flood-{COUNT}", "messages": [{"role": "user", "content": "go"}]}
    with serve_gateway(upstream=upstream_url, send_timeout=1.0, detach_grace=60) as url:
        stalled, completion_id = _stalled_client(url, {**body, "stream": True})
        try:
            # Another reader of the same completion gets all of it, undisturbed.
            with httpx.stream(
                "GET", f"{url}/v1/chat/completions/{completion_id}/stream", timeout=30
            ) as response:
                events = list(iter_events(response))
            assert events[-1].data == "[DONE]"
            got = chunks(events)
            assert len(got) == COUNT
            assert got[-1]["choices"][0]["delta"]["content"].startswith(f"{COUNT - 1} ")
            # The stalled client stays stalled until the server gives up on it (however
            # fast the other reader was: the timeout counts one write's wait).
            wait_for(lambda: _send_timeouts(url) >= 1, 60, 0.05, "the stalled client to be dropped")
            # What it still finds in its buffers ends without the stream's end, and then
            # the connection closes.
            received = bytearray()
            deadline = time.monotonic() + 60
            while piece := stalled.recv(65536):
                received += piece
                assert time.monotonic() < deadline, "the stalled connection was never closed"
            assert b"data: [DONE]" not in received
            assert 0 < received.count(b"\nid: ") < COUNT
        finally:
            stalled.close()
        # The server still serves.
        again = httpx.post(
            url + "/v1/chat/completions",
            json={**body, "model": "fake-text", "stream": True},
            timeout=30,
        )
        assert again.text.rstrip().endswith("data: [DONE]")
    (seen,) = fake.requests_for(f"fake-flood-{COUNT}")
    assert seen.chunks_sent == COUNT

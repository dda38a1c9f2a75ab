"""Channels over real HTTP: publish, subscribe, replay, gaps, heartbeats, close."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from server._sse import Server, Stream, running
from ssehub.broker import parse_id
from ssehub.server.connection import Subscription

from _support import wait_for


@pytest.fixture(params=["hub", "httptools", "h11"])
def server(request: pytest.FixtureRequest) -> Server:  # type: ignore[misc]
    """Every path: no ASGI (hub, as `ssehub serve`), ASGI with writes straight to
    uvicorn's transport (httptools), ASGI `send` only (h11)."""
    with running(http=request.param) as s:
        yield s


def test_the_write_path_in_use(server: Server) -> None:
    with Stream(server.client, "/channels/wp") as stream:
        server.wait_live(1)
        (sub,) = server.hub._subscribers.values()
        kind = {"hub": Subscription, "httptools": RequestResponseCycle, "h11": type(None)}
        assert type(sub.cycle) is kind[server.http]
        server.publish("wp", "x")
        assert stream.events_n(1)[0].data == "x"


def test_headers_of_a_subscription(server: Server) -> None:
    with Stream(server.client, "/channels/h") as stream:
        headers = stream.response.headers
        assert stream.response.status_code == 200
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        assert headers["cache-control"] == "no-cache"
        assert headers["x-accel-buffering"] == "no"
        assert "connection" not in headers
        assert "content-encoding" not in headers


def test_publish_text_json_object_and_batch(server: Server) -> None:
    with Stream(server.client, "/channels/news") as stream:
        server.wait_live(1)
        r1 = server.client.post("/channels/news", content="plain text")
        r2 = server.client.post("/channels/news", json={"data": {"price": 3}, "event": "quote"})
        r3 = server.client.post(
            "/channels/news", json=[{"data": "a"}, "b", {"data": [1, 2], "event": "list"}]
        )
        ids = r1.json()["ids"] + r2.json()["ids"] + r3.json()["ids"]
        assert [r.status_code for r in (r1, r2, r3)] == [200, 200, 200]
        assert r1.json() == {"channel": "news", "ids": ids[:1]}
        events = stream.events_n(5)
    assert [(e.event, e.data, e.id) for e in events] == [
        ("message", "plain text", ids[0]),
        ("quote", '{"price":3}', ids[1]),
        ("message", "a", ids[2]),
        ("message", "b", ids[3]),
        ("list", "[1,2]", ids[4]),
    ]
    keys = [parse_id(i) for i in ids]
    assert keys == sorted(keys)


def test_multiline_data_round_trips(server: Server) -> None:
    with Stream(server.client, "/channels/ml") as stream:
        server.wait_live(1)
        server.publish("ml", "line 1\nline 2\r\nline 3")
        (event,) = stream.events_n(1)
    assert event.data == "line 1\nline 2\nline 3"


def test_a_new_subscriber_starts_live(server: Server) -> None:
    server.publish("live", "before")
    with Stream(server.client, "/channels/live") as stream:
        server.wait_live(1)
        server.publish("live", "after")
        (event,) = stream.events_n(1)
    assert event.data == "after"


@pytest.mark.parametrize("how", ["header", "query"])
def test_replay_after_a_drop_loses_and_repeats_nothing(server: Server, how: str) -> None:
    for i in range(30):
        server.publish("r", f"e{i}")
    with Stream(server.client, "/channels/r?from=oldest") as stream:
        seen = stream.events_n(10)
    # Dropped; more is published meanwhile.
    for i in range(30, 60):
        server.publish("r", f"e{i}")
    cursor = seen[-1].id
    assert cursor is not None
    if how == "header":
        stream = Stream(server.client, "/channels/r", headers={"Last-Event-ID": cursor})
    else:
        stream = Stream(server.client, f"/channels/r?last_event_id={cursor}")
    with stream:
        rest = stream.events_n(50)
        server.wait_live(1)
        server.publish("r", "e60")
        (last,) = stream.read_until(lambda s: len(s.events) == 51).events[50:]
    data = [e.data for e in seen + rest + [last]]
    assert data == [f"e{i}" for i in range(61)]


def test_header_wins_over_query(server: Server) -> None:
    ids = [server.publish("hq", f"e{i}") for i in range(5)]
    with Stream(
        server.client, f"/channels/hq?last_event_id={ids[0]}", headers={"Last-Event-ID": ids[2]}
    ) as stream:
        events = stream.events_n(2)
    assert [e.data for e in events] == ["e3", "e4"]


def test_start_from_oldest_and_from_zero(server: Server) -> None:
    for i in range(3):
        server.publish("o", f"e{i}")
    for path in ("/channels/o?from=oldest", "/channels/o?last_event_id=0-0"):
        with Stream(server.client, path) as stream:
            assert [e.data for e in stream.events_n(3)] == ["e0", "e1", "e2"]
            assert not any(e.event == "ssehub.gap" for e in stream.events)


def raw_subscribers(server: Server, path: str, count: int) -> list[Any]:
    """`count` subscriptions on raw sockets: cheap enough for passes longer than a slice."""
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        socks.append(s)
    return socks


def raw_data(sock: Any, events: int) -> list[str]:
    """The data of the first `events` events a raw subscription received."""
    sock.settimeout(10)
    buf = b""
    while buf.count(b"data: ") < events:
        chunk = sock.recv(65536)
        assert chunk, "connection closed early"
        buf += chunk
    body = buf.split(b"\r\n\r\n", 1)[1]
    return [line[6:].decode() for line in body.split(b"\n") if line.startswith(b"data: ")]


@pytest.mark.parametrize("bystanders", [0, 60])
def test_joining_while_publishing_never_loses_or_repeats(bystanders: int) -> None:
    """Subscribers drop and resume by Last-Event-ID while a publisher runs flat out.

    With bystanders, each pass over the channel spans several slices (`PASS_SLICE`), so
    the resuming subscriber joins and leaves while a pass is paused.
    """
    with running(heartbeat=0) as server:
        total = 400
        done = threading.Event()
        socks = raw_subscribers(server, "/channels/race", bystanders)
        server.wait_live(bystanders)

        def publisher() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                for i in range(total):
                    batch = [f"e{i}"]
                    r = client.post("/channels/race", json=batch)
                    assert r.status_code == 200
            done.set()

        server.publish("race", "start")
        received: list[str] = []
        cursor = ""
        thread = threading.Thread(target=publisher)
        thread.start()
        try:
            reads = 0
            while len(received) < total + 1:
                headers = {"Last-Event-ID": cursor} if cursor else {}
                path = "/channels/race" if cursor else "/channels/race?from=oldest"
                with Stream(server.client, path, headers=headers) as stream:
                    want = min(total + 1 - len(received), 7 + reads % 13)
                    events = stream.events_n(want)
                    assert not any(e.event == "ssehub.gap" for e in events)
                    received.extend(e.data for e in events)
                    cursor = events[-1].id or ""
                reads += 1
            expected = ["start"] + [f"e{i}" for i in range(total)]
            for sock in socks:
                assert raw_data(sock, total + 1) == expected
        finally:
            thread.join(timeout=30)
            for sock in socks:
                sock.close()
        assert received == expected, " ".join(received)
        assert reads > 5


def test_gap_when_the_cursor_was_trimmed() -> None:
    with running(retention_count=5) as server:
        ids = [server.publish("g", f"e{i}") for i in range(20)]
        with Stream(server.client, "/channels/g", headers={"Last-Event-ID": ids[2]}) as stream:
            events = stream.events_n(6)
        gap, *rest = events
        assert gap.event == "ssehub.gap"
        assert b"id:" not in stream.raw.split(b"\n\n")[0]  # the client keeps its cursor
        assert json.loads(gap.data) == {"last_event_id": ids[2], "oldest_id": ids[15]}
        assert [e.data for e in rest] == [f"e{i}" for i in range(15, 20)]
        # The last trimmed one: nothing was missed, so no gap.
        with Stream(server.client, "/channels/g", headers={"Last-Event-ID": ids[14]}) as stream:
            events = stream.events_n(5)
        assert [e.data for e in events] == [f"e{i}" for i in range(15, 20)]


@pytest.mark.parametrize("cursor", ["nonsense", "99999999999999-0", "1-2-3", "%20"])
def test_gap_when_the_cursor_is_unknown(server: Server, cursor: str) -> None:
    ids = [server.publish("u", f"e{i}") for i in range(2)]
    with Stream(server.client, f"/channels/u?last_event_id={cursor}") as stream:
        gap, e0, e1 = stream.events_n(3)
    assert gap.event == "ssehub.gap"
    assert json.loads(gap.data)["oldest_id"] == ids[0]
    assert [e0.data, e1.data] == ["e0", "e1"]


def test_heartbeats_on_idle_streams() -> None:
    with running(heartbeat=0.1) as server, Stream(server.client, "/channels/hb") as stream:
        stream.read_until(lambda s: s.raw.count(b":\n\n") >= 2, what="two heartbeats")
        server.publish("hb", "x")
        stream.read_until(lambda s: len(s.events) == 1)
        stream.read_until(lambda s: s.raw.endswith(b"data: x\n\n:\n\n"), what="a heartbeat after")


def test_close_sends_close_event_then_204(server: Server) -> None:
    with Stream(server.client, "/channels/c") as stream:
        server.wait_live(1)
        server.publish("c", "last words")
        r = server.client.delete("/channels/c")
        assert r.status_code == 200
        close_id = r.json()["id"]
        stream.until_end()
    assert [(e.event, e.data) for e in stream.events] == [("message", "last words"), ("close", "")]
    assert stream.events[-1].id == close_id
    # A browser reconnecting with the close id, or anyone new, is told to stop.
    assert server.client.get("/channels/c", headers={"Last-Event-ID": close_id}).status_code == 204
    assert server.client.get("/channels/c").status_code == 204
    # Someone who dropped before the end still gets the rest, then the end.
    with Stream(server.client, "/channels/c?from=oldest") as stream:
        stream.until_end()
    assert [e.event for e in stream.events] == ["message", "close"]
    r = server.client.post("/channels/c", content="too late")
    assert r.status_code == 409
    assert "closed" in r.json()["error"]
    # Closing twice is fine.
    assert server.client.delete("/channels/c").json()["id"] is None


def test_stats_and_metrics_count_deliveries(server: Server) -> None:
    with Stream(server.client, "/channels/m") as s1, Stream(server.client, "/channels/m") as s2:
        server.wait_live(2)
        server.client.post("/channels/m", json=["a", "b", "c"])
        s1.events_n(3)
        s2.events_n(3)
        stats = server.client.get("/admin/stats").json()
        assert stats["connections"] == 2
        assert stats["channels"] == 1
        assert stats["published"] == 3
        assert stats["delivered"] == 6
        text = server.client.get("/metrics").text
    assert "ssehub_connections 2.0" in text
    assert "ssehub_delivered_events_total 6.0" in text
    assert "ssehub_slow_consumer_disconnects_total 0.0" in text


def test_healthz(server: Server) -> None:
    r = server.client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    wait_for(lambda: server.hub.stats().connections == 0)


def test_a_client_that_leaves_is_forgotten_at_once(server: Server) -> None:
    with Stream(server.client, "/channels/bye"):
        server.wait_live(1)
    # No heartbeat or event is needed to notice: the hub hears the disconnect itself.
    wait_for(lambda: not server.hub.connections(), what="the registry to forget it")
    assert server.hub.stats().channels == 0  # and the channel's pump stopped


def test_many_subscribers_get_every_event_in_order() -> None:
    """Raw sockets, so hundreds of subscribers cost the test little; a batch publisher."""
    count, events = 300, 200
    with running(heartbeat=0) as server:
        socks = raw_subscribers(server, "/channels/many", count)
        try:
            server.wait_live(count)
            for i in range(0, events, 20):
                r = server.client.post("/channels/many", json=[f"e{j}" for j in range(i, i + 20)])
                assert r.status_code == 200
            expected = [f"e{j}" for j in range(events)]
            for s in socks:
                assert raw_data(s, events) == expected
        finally:
            for s in socks:
                s.close()
        assert server.hub.stats().delivered == count * events


def test_channel_stream_response_in_an_app_route() -> None:
    """An app's own route (here: per-user channels behind its own check) serves a channel."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from ssehub.server import ChannelStreamResponse, create_app

    from _support import serve_in_thread

    app = create_app()

    async def my_events(request: Request) -> Response:
        if request.headers.get("x-user") != request.path_params["user"]:
            return JSONResponse({"error": "not you"}, status_code=403)
        return ChannelStreamResponse(request.app.state.hub, f"user@{request.path_params['user']}")

    app.router.routes.append(Route("/me/{user}/events", my_events))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/me/ann/events", headers={"x-user": "bob"}).status_code == 403
        first = client.post("/channels/user@ann", content="one").json()["ids"][0]
        client.post("/channels/user@ann", content="two")
        with Stream(
            client, "/me/ann/events", headers={"x-user": "ann", "Last-Event-ID": first}
        ) as stream:
            assert [e.data for e in stream.events_n(1)] == ["two"]
            assert [c.channel for c in app.state.hub.connections()] == ["user@ann"]
        client.delete("/channels/user@ann")
        assert client.get("/me/ann/events", headers={"x-user": "ann"}).status_code == 204


def test_broker_unavailable_is_503_or_a_clean_end() -> None:
    from ssehub.broker import BrokerUnavailable
    from ssehub.broker.memory import MemoryBroker
    from ssehub.server import create_app

    from _support import serve_in_thread

    class Flaky(MemoryBroker):
        down = False

        async def read(self, stream: str, after: str | None, limit: int = 1000) -> Any:
            if self.down:
                raise BrokerUnavailable("redis is away")
            return await super().read(stream, after, limit)

        async def append(self, stream: str, events: Any, retention: Any = None) -> Any:
            if self.down:
                raise BrokerUnavailable("redis is away")
            return await super().append(stream, events, retention)

    broker = Flaky()
    app = create_app(broker=broker)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = client.post("/channels/f", content="x").json()["ids"][0]
        broker.down = True
        r = client.post("/channels/f", content="y")
        assert r.status_code == 503
        assert "unavailable" in r.json()["error"]
        # Joining needs a read: the stream starts, then ends cleanly for a retry.
        with Stream(client, "/channels/f", headers={"Last-Event-ID": first}) as stream:
            stream.until_end()
        assert stream.events == []
        broker.down = False
        assert client.get("/healthz").status_code == 200

"""Tokens, the connection registry, and bad input of every kind, over real HTTP."""

from __future__ import annotations

import pytest

from server._sse import Server, Stream, running

from _support import wait_for


@pytest.fixture(scope="module")
def server() -> Server:  # type: ignore[misc]
    with running(admin_token="adm", publish_token="pub", max_body=1000) as s:
        yield s


ADMIN = {"Authorization": "Bearer adm"}
PUB = {"Authorization": "Bearer pub"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/connections"),
        ("DELETE", "/admin/connections/c1"),
        ("GET", "/admin/stats"),
        ("GET", "/metrics"),
    ],
)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic adm", "Bearer", "adm"])
def test_admin_needs_the_admin_token(
    server: Server, method: str, path: str, auth: str | None
) -> None:
    headers = {"Authorization": auth} if auth else {}
    r = server.client.request(method, path, headers=headers)
    assert r.status_code == 401
    assert "Bearer" in r.json()["error"]


@pytest.mark.parametrize("auth", [None, "Bearer adm", "Bearer pubx", "bearer"])
def test_publishing_and_closing_need_the_publish_token(server: Server, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    assert server.client.post("/channels/t", content="x", headers=headers).status_code == 401
    assert server.client.delete("/channels/t", headers=headers).status_code == 401
    assert server.client.post("/demo/jobs", headers=headers).status_code == 401
    assert server.client.post("/channels/t", content="x", headers=PUB).status_code == 200
    # Subscribing needs no token.
    assert server.client.head("/channels/t").status_code == 200


def test_registry_lists_and_disconnects(server: Server) -> None:
    with (
        Stream(server.client, "/channels/a", headers={"User-Agent": "ua-1"}) as s1,
        Stream(server.client, "/channels/b", headers={"User-Agent": "ua-2"}) as s2,
    ):
        server.wait_live(2)
        server.client.post("/channels/a", content="hello", headers=PUB)
        s1.events_n(1)
        conns = server.client.get("/admin/connections", headers=ADMIN).json()["connections"]
        assert len(conns) == 2
        (a,) = (c for c in conns if c["channel"] == "a")
        assert a["user_agent"] == "ua-1"
        assert a["peer"].startswith("127.0.0.1:")
        assert a["events_sent"] == 1
        assert a["bytes_sent"] >= len(b"data: hello\n\n")
        assert a["pending_bytes"] == 0
        assert a["live"] is True
        assert isinstance(a["connected_since"], float)
        only_b = server.client.get("/admin/connections?channel=b", headers=ADMIN).json()
        assert [c["channel"] for c in only_b["connections"]] == ["b"]
        # Disconnect a: its stream ends; b is untouched.
        r = server.client.delete(f"/admin/connections/{a['id']}", headers=ADMIN)
        assert r.json() == {"id": a["id"], "disconnected": True}
        s1.until_end()
        wait_for(lambda: [c.channel for c in server.hub.connections()] == ["b"])
        server.client.post("/channels/b", content="still here", headers=PUB)
        assert s2.events_n(1)[0].data == "still here"
        assert not s2.ended
    r = server.client.delete("/admin/connections/nope", headers=ADMIN)
    assert r.status_code == 404


def test_hub_api_matches_the_registry(server: Server) -> None:
    with Stream(server.client, "/channels/x"):
        server.wait_live(1)
        (conn,) = server.hub.connections()
        assert server.hub.connection(conn.id) == conn
        assert server.hub.connection("nope") is None
        assert server.hub.disconnect("nope") is False


@pytest.mark.parametrize(
    "name",
    [
        "a b",
        "x" * 201,
        "caf%C3%A9",
        "semi;colon",
        "back%5Cslash",
        "quote%22",
        "tab%09",
        "",
        "star*",
    ],
)
def test_bad_channel_names(server: Server, name: str) -> None:
    for method in ("GET", "POST", "DELETE"):
        r = server.client.request(method, f"/channels/{name}", headers=PUB, content="x")
        assert r.status_code == 400, (method, name)
        assert "channel names" in r.json()["error"]


def test_good_channel_names(server: Server) -> None:
    for name in ["a", "x" * 200, "user@example.com", "jobs/1/2", "a:b.c-d_e"]:
        r = server.client.post(f"/channels/{name}", content="x", headers=PUB)
        assert r.status_code == 200, name


JSON = {"Content-Type": "application/json", **PUB}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "not valid JSON"),
        (b"42", "must be an object"),
        (b'"just a string"', "must be an object"),
        (b"null", "must be an object"),
        (b"[1, 2]", "list of event objects"),
        (b'{"event": "x"}', 'needs "data"'),
        (b'{"data": "x", "id": "5-0"}', "unknown event fields"),
        (b'{"data": "x", "event": "close"}', "reserved"),
        (b'{"data": "x", "event": "ssehub.gap"}', "reserved"),
        (b'{"data": "x", "event": "two\\nlines"}', "event type"),
        (b'{"data": "x", "event": ""}', "event type"),
        (b'{"data": "x", "event": 5}', "event type"),
        (b'[{"data": "ok"}, {"data": "x", "event": "close"}]', "reserved"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_publish_bodies(server: Server, body: bytes, error: str) -> None:
    before = server.hub.stats().published
    r = server.client.post("/channels/bad", content=body, headers=JSON)
    assert r.status_code == 400
    assert error in r.json()["error"]
    # Nothing of a rejected batch was published.
    assert server.hub.stats().published == before


def test_raw_text_that_is_not_utf8(server: Server) -> None:
    r = server.client.post("/channels/bad", content=b"\xff", headers=PUB)
    assert r.status_code == 400


def test_oversized_bodies_get_413(server: Server) -> None:
    r = server.client.post("/channels/big", content=b"x" * 1001, headers=PUB)
    assert r.status_code == 413
    assert server.client.post("/channels/big", content=b"x" * 1000, headers=PUB).status_code == 200

    def chunks() -> object:
        for _ in range(20):
            yield b"x" * 100

    # Chunked, so no Content-Length to judge by: counted as it arrives.
    r = server.client.post("/channels/big", content=chunks(), headers=PUB)  # type: ignore[arg-type]
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/channels/q?from=newest", 400),
        ("/channels/q?from=", 400),
    ],
)
def test_bad_subscribe_queries(server: Server, path: str, status: int) -> None:
    r = server.client.get(path)
    assert r.status_code == status
    assert "from" in r.json()["error"]


def test_unknown_method(server: Server) -> None:
    r = server.client.put("/channels/q", content="x")
    assert r.status_code == 405


def test_bad_job_requests(server: Server) -> None:
    for body in (b"[1]", b"{bad", b'{"delay": "soon"}', b'{"delay": -1}', b'{"delay": 99}'):
        r = server.client.post("/demo/jobs", content=body, headers=PUB)
        assert r.status_code == 400, body
        assert "error" in r.json()


def test_the_server_survives_all_of_it(server: Server) -> None:
    assert server.client.get("/healthz").status_code == 200

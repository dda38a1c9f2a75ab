"""The admin view over every process sharing one Redis: real `ssehub serve` nodes and
workers, connections listed and closed from any of them, a node killed."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sse_listener import Listener

from redis_server import RedisServer, redis_server

from _support import serve_in_process, wait_for

pytestmark = pytest.mark.redis

ADMIN = {"Authorization": "Bearer adm"}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def node_args(redis: RedisServer, *extra: str) -> tuple[str, ...]:
    return (
        "--redis-url", redis.url, "--admin-token", "adm", "--heartbeat", "0.5",
        "--log-level", "warning", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def nodes(redis: RedisServer) -> Iterator[tuple[str, str]]:
    with (
        serve_in_process(*node_args(redis)) as (one, _),
        serve_in_process(*node_args(redis)) as (two, _),
    ):
        wait_for(lambda: len(processes(one)) == 2, 15, 0.05, "both nodes to join")
        yield one, two


def get(base: str, path: str) -> Any:
    response = httpx.get(f"{base}{path}", headers=ADMIN, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def processes(base: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = get(base, "/admin/stats")["processes"]
    return found


def listed(base: str, channel: str, limit: int = 100) -> list[dict[str, Any]]:
    """The connections of `channel`, once every process answered."""
    body = get(base, f"/admin/connections?channel={channel}&limit={limit}")
    assert not body["unanswered"], body
    found: list[dict[str, Any]] = body["connections"]
    return found


def listed_when(base: str, channel: str, count: int) -> list[dict[str, Any]]:
    """`listed`, once it has `count` connections."""
    found: list[dict[str, Any]] = []

    def complete() -> bool:
        found[:] = listed(base, channel)
        return len(found) == count

    wait_for(complete, 15, 0.05, f"{count} connections listed on {base}")
    return found


def port_of(base: str) -> str:
    return base.rsplit(":", 1)[1]


def subscribe(base: str, channel: str, count: int = 1) -> list[Listener]:
    listeners = [Listener("GET", f"{base}/channels/{channel}") for _ in range(count)]
    wait_for(lambda: all(x.status == 200 for x in listeners), 30, 0.02, "subscriptions")
    return listeners


def close_all(listeners: list[Listener]) -> None:
    for listener in listeners:
        listener.close()


def test_either_node_lists_every_connection_with_its_holder(nodes: tuple[str, str]) -> None:
    one, two = nodes
    channel = f"list-{uuid.uuid4().hex[:6]}"
    listeners = subscribe(one, channel, 2) + subscribe(two, channel, 1)
    try:
        for base in nodes:
            conns = listed_when(base, channel, 3)
            by_port: dict[str, int] = {}
            for conn in conns:
                assert conn["channel"] == channel
                # The holder: its process id (which ends the connection's id), its node.
                assert conn["id"].endswith("@" + conn["process"])
                port = conn["node"].rsplit(":", 1)[1]
                by_port[port] = by_port.get(port, 0) + 1
                assert isinstance(conn["pid"], int)
            assert by_port == {port_of(one): 2, port_of(two): 1}
            assert len({c["id"] for c in conns}) == 3
        # Another channel's filter sees none of them.
        assert listed(two, f"other-{uuid.uuid4().hex[:6]}") == []
    finally:
        close_all(listeners)


def test_a_stream_held_on_one_node_is_closed_from_the_other(nodes: tuple[str, str]) -> None:
    one, two = nodes
    channel = f"close-{uuid.uuid4().hex[:6]}"
    held_on_one, held_on_two = subscribe(one, channel), subscribe(two, channel)
    try:
        conns = listed_when(two, channel, 2)
        (target,) = (c for c in conns if c["node"].endswith(":" + port_of(one)))
        response = httpx.delete(f"{two}/admin/connections/{target['id']}", headers=ADMIN)
        assert response.status_code == 200, response.text
        assert response.json() == {"id": target["id"], "disconnected": True}
        held_on_one[0].wait_ended(10)
        remaining = listed_when(one, channel, 1)
        assert remaining[0]["node"].endswith(":" + port_of(two))
        assert not held_on_two[0].ended.is_set()
        # Gone now, anywhere; unknown ids and processes are 404 too.
        for conn_id in (target["id"], "c999999@" + target["process"], "c1@0123456789ab", "c1"):
            response = httpx.delete(f"{one}/admin/connections/{conn_id}", headers=ADMIN)
            assert response.status_code == 404, (conn_id, response.text)
    finally:
        close_all(held_on_one + held_on_two)


def test_stats_add_up_over_the_nodes(nodes: tuple[str, str]) -> None:
    one, two = nodes
    channel = f"stats-{uuid.uuid4().hex[:6]}"
    listeners = subscribe(one, channel, 2) + subscribe(two, channel, 3)
    try:
        listed_when(one, channel, 5)
        httpx.post(f"{one}/channels/{channel}", content="hello", timeout=10)
        for listener in listeners:
            listener.wait(1)
        stats = get(two, "/admin/stats")
        assert not stats["unanswered"]
        assert len(stats["processes"]) == 2
        assert {p["node"].rsplit(":", 1)[1] for p in stats["processes"]} == {
            port_of(one),
            port_of(two),
        }
        for field in ("connections", "channels", "published", "delivered"):
            assert stats[field] == sum(p[field] for p in stats["processes"]), field
        per_port = {p["node"].rsplit(":", 1)[1]: p for p in stats["processes"]}
        assert per_port[port_of(one)]["connections"] >= 2
        assert per_port[port_of(two)]["connections"] >= 3
        assert stats["connections"] == get(one, "/admin/connections")["total"]
    finally:
        close_all(listeners)


def test_limit_bounds_the_listing_and_says_what_it_left_out(nodes: tuple[str, str]) -> None:
    one, two = nodes
    channel = f"limit-{uuid.uuid4().hex[:6]}"
    listeners = subscribe(one, channel, 3) + subscribe(two, channel, 3)
    try:
        listed_when(one, channel, 6)
        body = get(two, f"/admin/connections?channel={channel}&limit=4")
        assert len(body["connections"]) == 4
        assert body["total"] == 6
        assert body["left_out"] == 2
        # The oldest first, from both nodes.
        since = [c["connected_since"] for c in body["connections"]]
        assert since == sorted(since)
        for bad in ("0", "-1", "x", "1001"):
            response = httpx.get(f"{one}/admin/connections?limit={bad}", headers=ADMIN)
            assert response.status_code == 400, bad
    finally:
        close_all(listeners)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/connections"),
        ("DELETE", "/admin/connections/c1@0123456789ab"),
        ("GET", "/admin/stats"),
    ],
)
def test_the_admin_token_is_still_needed(nodes: tuple[str, str], method: str, path: str) -> None:
    for base in nodes:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.request(method, f"{base}{path}", headers=headers, timeout=10)
            assert response.status_code == 401, (base, headers)


def test_a_killed_node_leaves_the_view(redis: RedisServer, nodes: tuple[str, str]) -> None:
    one, _ = nodes
    channel = f"killed-{uuid.uuid4().hex[:6]}"
    with serve_in_process(*node_args(redis)) as (three, proc):
        listeners = subscribe(three, channel, 2)
        try:
            listed_when(one, channel, 2)
            assert len(processes(one)) == 3
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

            def gone() -> bool:
                stats = get(one, "/admin/stats")
                nodes_seen = [p["node"] for p in stats["processes"] + stats["unanswered"]]
                return not any(n.endswith(":" + port_of(three)) for n in nodes_seen)

            # Its membership lapses three renewals (3 s) after the last one.
            wait_for(gone, 10, 0.1, "the killed node to leave the view")
            body = get(one, f"/admin/connections?channel={channel}")
            assert body == {"connections": [], "total": 0, "left_out": 0, "unanswered": []}
        finally:
            close_all(listeners)


def test_workers_answer_for_each_other() -> None:
    # A Redis of their own: the module's nodes would be members too.
    with (
        redis_server() as redis,
        serve_in_process(*node_args(redis, "--workers", "3")) as (base, _),
    ):
        # The port answers as soon as the first worker does; three start on a busy machine.
        wait_for(lambda: _joined(base) == 3, 60, 0.2, "three workers to join")
        channel = f"workers-{uuid.uuid4().hex[:6]}"
        # Each connection lands on whichever worker accepts it.
        listeners = subscribe(base, channel, 6)
        try:
            conns = listed_when(base, channel, 6)
            pids = {p["pid"] for p in processes(base)}
            assert len(pids) == 3
            assert {c["pid"] for c in conns} <= pids
            # Whichever worker takes each DELETE, the stream ends where it is held.
            for conn in conns:
                response = httpx.delete(f"{base}/admin/connections/{conn['id']}", headers=ADMIN)
                assert response.status_code == 200, response.text
            for listener in listeners:
                listener.wait_ended(10)
            listed_when(base, channel, 0)
        finally:
            close_all(listeners)


def _joined(base: str) -> int:
    try:
        response = httpx.get(f"{base}/admin/stats", headers=ADMIN, timeout=5)
    except httpx.HTTPError:
        return 0
    if response.status_code != 200:
        return 0
    return len(response.json()["processes"])


def test_without_redis_the_view_is_the_one_process() -> None:
    args = ("--admin-token", "adm", "--heartbeat", "0.5", "--log-level", "warning")
    with serve_in_process(*args) as (base, proc):
        channel = f"memory-{uuid.uuid4().hex[:6]}"
        listeners = subscribe(base, channel, 3)
        try:
            conns = listed_when(base, channel, 3)
            assert {c["process"] for c in conns} == {None}
            assert {c["pid"] for c in conns} == {proc.pid}
            assert all("@" not in c["id"] for c in conns)
            body = get(base, f"/admin/connections?channel={channel}&limit=1")
            assert (len(body["connections"]), body["total"], body["left_out"]) == (1, 3, 2)
            stats = get(base, "/admin/stats")
            assert [p["pid"] for p in stats["processes"]] == [proc.pid]
            assert stats["connections"] == stats["processes"][0]["connections"] == 3
            for conn_id in ("c1@0123456789ab", "c999999"):
                response = httpx.delete(f"{base}/admin/connections/{conn_id}", headers=ADMIN)
                assert response.status_code == 404
            response = httpx.delete(f"{base}/admin/connections/{conns[0]['id']}", headers=ADMIN)
            assert response.json() == {"id": conns[0]["id"], "disconnected": True}
            listed_when(base, channel, 2)
        finally:
            close_all(listeners)

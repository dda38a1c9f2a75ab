"""Real `ssehub serve` nodes sharing one private redis-server: channels and completions
across nodes, several workers, Redis restarted under open streams, a node killed."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sse_listener import Listener

from redis_server import RedisServer, redis_server

from _support import serve_in_process, wait_for

pytestmark = pytest.mark.redis

DEMO = "ssehub-demo"


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def node_args(redis: RedisServer, *extra: str) -> tuple[str, ...]:
    return ("--redis-url", redis.url, "--heartbeat", "0.5", "--log-level", "warning", *extra)


@pytest.fixture(scope="module")
def nodes(redis: RedisServer) -> Iterator[tuple[str, str]]:
    with (
        serve_in_process(*node_args(redis)) as (one, _),
        serve_in_process(*node_args(redis)) as (two, _),
    ):
        yield one, two


def publish(base: str, channel: str, *data: str) -> list[str]:
    body = [{"data": d} for d in data]
    response = httpx.post(f"{base}/channels/{channel}", json=body, timeout=10)
    assert response.status_code == 200, response.text
    ids: list[str] = response.json()["ids"]
    return ids


def test_publish_on_one_node_subscribe_and_resume_on_the_other(nodes: tuple[str, str]) -> None:
    one, two = nodes
    channel = f"news-{uuid.uuid4().hex[:6]}"
    listener = Listener("GET", f"{two}/channels/{channel}")
    try:
        wait_for(lambda: listener.status == 200, 10, 0.02, "the subscription")
        first = publish(one, channel, "a", "b")
        listener.wait(2)
        assert listener.data() == ["a", "b"]
        assert [e.id for e in listener.events if e.event == "message"] == first
    finally:
        listener.close()
    # Missed while away, published on node two; resumed on node one with node two's id.
    later = publish(two, channel, "c", "d")
    resumed = Listener("GET", f"{one}/channels/{channel}", headers={"Last-Event-ID": first[-1]})
    try:
        resumed.wait(2)
        assert resumed.data()[:2] == ["c", "d"]
        assert [e.id for e in resumed.events if e.event == "message"][:2] == later
        assert not resumed.data("ssehub.gap")
    finally:
        resumed.close()


def test_closing_a_channel_on_one_node_ends_streams_on_the_other(nodes: tuple[str, str]) -> None:
    one, two = nodes
    channel = f"closing-{uuid.uuid4().hex[:6]}"
    listener = Listener("GET", f"{two}/channels/{channel}")
    try:
        wait_for(lambda: listener.status == 200, 10, 0.02, "the subscription")
        publish(one, channel, "last words")
        assert httpx.delete(f"{one}/channels/{channel}", timeout=10).status_code == 200
        listener.wait_ended()
        assert listener.data() == ["last words"]
        assert listener.data("close")
        refused = httpx.post(f"{two}/channels/{channel}", content="late", timeout=10)
        assert refused.status_code == 409
    finally:
        listener.close()


def start_completion(base: str) -> Listener:
    body = {
        "model": DEMO,
        "stream": True,
        "messages": [{"role": "user", "content": "tell me about redis streams"}],
    }
    return Listener("POST", f"{base}/v1/chat/completions", json=body)


def completion_id(listener: Listener) -> str:
    listener.wait(1)
    chunk = json.loads(listener.data()[0])
    cid: str = chunk["id"]
    return cid


def text_of(data: list[str]) -> str:
    parts = []
    for item in data:
        if item == "[DONE]":
            continue
        for choice in json.loads(item).get("choices", []):
            parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def test_a_completion_begun_on_one_node_is_resumed_on_another(nodes: tuple[str, str]) -> None:
    one, two = nodes
    origin = start_completion(one)
    try:
        cid = completion_id(origin)
        origin.wait(3)
        cursor = origin.events[1].id
        assert cursor is not None
        resumed = Listener(
            "GET", f"{two}/v1/chat/completions/{cid}/stream", headers={"Last-Event-ID": cursor}
        )
        try:
            resumed.wait_ended(60)
            origin.wait_ended(60)
            assert resumed.data()[-1] == "[DONE]"
            # Resumed after the second event: the rest of the very same stream.
            assert resumed.data() == origin.data()[2:]
            assert text_of(origin.data())
        finally:
            resumed.close()
    finally:
        origin.close()


def test_several_workers_share_channels(redis: RedisServer) -> None:
    with serve_in_process(*node_args(redis, "--workers", "3")) as (base, proc):
        # The port answers as soon as the first worker does; three start on a busy machine.
        wait_for(lambda: _healthy(base), 60, 0.2, "the workers")
        channel = f"workers-{uuid.uuid4().hex[:6]}"
        # Each connection lands on whichever worker accepts it.
        listeners = [Listener("GET", f"{base}/channels/{channel}") for _ in range(6)]
        try:
            wait_for(lambda: all(x.status == 200 for x in listeners), 60, 0.02, "subscriptions")
            ids = [publish(base, channel, f"m{i}")[0] for i in range(5)]
            for listener in listeners:
                listener.wait(5, timeout=30)
                assert listener.data() == [f"m{i}" for i in range(5)]
                assert [e.id for e in listener.events if e.event == "message"] == ids
            assert len(_children(proc.pid)) >= 3  # the supervisor's worker processes
        finally:
            for listener in listeners:
                listener.close()


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_redis_restarted_under_open_streams() -> None:
    with (
        redis_server(persist=True) as redis,
        serve_in_process(*node_args(redis)) as (one, _),
        serve_in_process(*node_args(redis)) as (two, _),
    ):
        channel = "restart"
        listener = Listener("GET", f"{two}/channels/{channel}")
        try:
            wait_for(lambda: listener.status == 200, 10, 0.02, "the subscription")
            publish(one, channel, "before")
            listener.wait(1)
            assert httpx.get(f"{one}/healthz", timeout=5).json()["status"] == "ok"

            redis.stop()
            refused = httpx.post(f"{one}/channels/{channel}", content="x", timeout=10)
            assert refused.status_code == 503
            assert "error" in refused.json()
            health = httpx.get(f"{one}/healthz", timeout=10)
            assert health.status_code == 200
            assert health.json()["status"] == "degraded"
            assert not listener.ended.is_set()  # subscribers are kept

            redis.start()
            wait_for(
                lambda: httpx.get(f"{one}/healthz", timeout=10).json()["status"] == "ok",
                20,
                0.1,
                "healthz to recover",
            )
            publish(one, channel, "after-1", "after-2")
            listener.wait(3)
            assert listener.data() == ["before", "after-1", "after-2"]
            assert not listener.data("ssehub.gap")
            assert listener.error is None
        finally:
            listener.close()


def test_a_node_killed_mid_completion_ends_it_with_an_error_elsewhere(
    redis: RedisServer,
) -> None:
    with (
        serve_in_process(*node_args(redis, "--demo-delay", "0.3")) as (one, proc),
        serve_in_process(*node_args(redis)) as (two, _),
    ):
        origin = start_completion(one)
        try:
            cid = completion_id(origin)
            resumed = Listener("GET", f"{two}/v1/chat/completions/{cid}/stream")
            try:
                resumed.wait(2)
                os.kill(proc.pid, signal.SIGKILL)
                resumed.wait_ended(30)
                data = resumed.data()
                assert data[-1] == "[DONE]"
                error = json.loads(data[-2])["error"]
                assert "stopped" in error["message"]
                assert text_of(data[:-2])  # what was said before the node died
                assert resumed.error is None
            finally:
                resumed.close()
        finally:
            origin.close()


def test_a_completion_read_only_on_another_node_is_not_stopped_as_detached(
    redis: RedisServer,
) -> None:
    with (
        serve_in_process(*node_args(redis, "--demo-delay", "0.1", "--detach-grace", "1")) as (
            one,
            _,
        ),
        serve_in_process(*node_args(redis)) as (two, _),
    ):
        origin = start_completion(one)
        try:
            cid = completion_id(origin)
            resumed = Listener("GET", f"{two}/v1/chat/completions/{cid}/stream")
            try:
                resumed.wait(2)
                # The client moved: nobody reads on node one, but node two has a reader,
                # so the run must go on past the detach grace.
                origin.close()
                resumed.wait_ended(60)
                data = resumed.data()
                assert data[-1] == "[DONE]"
                assert not [d for d in data[:-1] if "error" in json.loads(d)], data[-3:]
            finally:
                resumed.close()
        finally:
            origin.close()

"""Cancel from any node: a completion generated on node A, stopped by a POST to node B
(two `ssehub serve` processes sharing one private redis-server)."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import pytest
from fake_upstream import FakeUpstream
from sse import chunks, iter_events, text_of

from redis_server import redis_server
from ssehub.protocol import ServerSentEvent

from _support import serve_in_process, wait_for

pytestmark = pytest.mark.redis

BODY = {
    "model": "ssehub-demo",
    "messages": [{"role": "user", "content": "stop me from the other node"}],
    "stream": True,
}


def node_args(redis_url: str, *extra: str) -> tuple[str, ...]:
    return ("--redis-url", redis_url, "--log-level", "warning", *extra)


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def read_all(url: str) -> list[ServerSentEvent]:
    with httpx.stream("GET", url, timeout=30) as response:
        assert response.status_code == 200
        return list(iter_events(response))


def test_cancel_on_another_node_stops_the_run() -> None:
    with (
        redis_server() as redis,
        serve_in_process(*node_args(redis.url, "--demo-delay", "0.05")) as (node_a, _),
        serve_in_process(*node_args(redis.url)) as (node_b, _),
    ):
        whole = httpx.post(
            node_a + "/v1/chat/completions", json={**BODY, "stream": False}, timeout=30
        )
        expected = whole.json()["choices"][0]["message"]["content"]
        events: list[ServerSentEvent] = []
        cancelled: list[httpx.Response] = []
        started = time.monotonic()
        with httpx.stream(
            "POST", node_a + "/v1/chat/completions", json=BODY, timeout=30
        ) as response:
            completion_id = response.headers["ssehub-completion-id"]
            for event in iter_events(response):
                events.append(event)
                if len(events) == 5:
                    # Stop pressed; the load balancer sent it to the other node.
                    cancelled.append(
                        httpx.post(
                            f"{node_b}/v1/chat/completions/{completion_id}/cancel", timeout=30
                        )
                    )
        elapsed = time.monotonic() - started
        stream = f"/v1/chat/completions/{completion_id}/stream"
        on_b = read_all(node_b + stream)
        on_a = read_all(node_a + stream)
        again = httpx.post(f"{node_b}/v1/chat/completions/{completion_id}/cancel", timeout=30)
        unknown = httpx.post(f"{node_b}/v1/chat/completions/chatcmpl-nope/cancel", timeout=30)
        # The run stopped on A, where it was generated: counted there as a request's cancel.
        assert metric(node_a, "ssehub_gateway_cancellations_total", '{reason="request"}') == 1
        assert metric(node_a, "ssehub_gateway_active_streams") == 0
        assert metric(node_b, "ssehub_gateway_cancellations_total", '{reason="request"}') == 0

    (answer,) = cancelled
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"id": completion_id, "object": "completion.cancel", "cancelled": True}
    # The reader on A got the cancellation end well before the whole reply.
    assert chunks(events)[-1]["error"]["code"] == "request"
    assert events[-1].data == "[DONE]"
    partial = text_of(chunks(events))
    assert expected.startswith(partial)
    assert len(partial) < len(expected) / 2
    # 60+ tokens at 50 ms would take 3 s or more.
    assert len(chunks(events)) < 40
    assert elapsed < len(expected.split()) * 0.05
    # Readers on either node get the same log, ending the same way.
    assert [(e.id, e.data) for e in on_a] == [(e.id, e.data) for e in on_b]
    assert [(e.id, e.data) for e in on_a] == [(e.id, e.data) for e in events]
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "ended"
    assert unknown.status_code == 404


def test_cancel_on_another_node_closes_the_upstream_request(
    fake_upstream: tuple[str, FakeUpstream],
) -> None:
    upstream_url, fake = fake_upstream
    body = {"model": "fake-slow", "messages": [{"role": "user", "content": "go"}], "stream": True}
    with (
        redis_server() as redis,
        serve_in_process(*node_args(redis.url, "--upstream", upstream_url)) as (node_a, _),
        serve_in_process(*node_args(redis.url)) as (node_b, _),
    ):
        events: list[ServerSentEvent] = []
        done = threading.Event()

        def read() -> None:
            with httpx.stream("POST", node_a + "/v1/chat/completions", json=body, timeout=30) as r:
                events.extend(iter_events(r))
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: len(events) >= 3, 15, 0.02, "the first chunks")
        (seen,) = fake.requests_for("fake-slow")
        completion_id = chunks(events)[0]["id"]
        answer = httpx.post(f"{node_b}/v1/chat/completions/{completion_id}/cancel", timeout=30)
        assert answer.status_code == 200, answer.text
        # The upstream connection of node A is closed: the cost stops.
        assert seen.disconnected.wait(10), "the upstream request was not cancelled"
        assert done.wait(10), "the reader on node A did not end"
        reader.join(10)
    assert chunks(events)[-1]["error"]["code"] == "request"
    assert events[-1].data == "[DONE]"


def test_a_cancel_the_producer_cannot_answer_in_time_is_accepted_and_still_happens() -> None:
    with (
        redis_server() as redis,
        serve_in_process(*node_args(redis.url, "--demo-delay", "0.05")) as (node_a, proc_a),
        serve_in_process(*node_args(redis.url)) as (node_b, _),
    ):
        events: list[ServerSentEvent] = []
        done = threading.Event()

        def read() -> None:
            with httpx.stream("POST", node_a + "/v1/chat/completions", json=BODY, timeout=30) as r:
                events.extend(iter_events(r))
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: len(events) >= 3, 15, 0.02, "the first chunks")
        completion_id = chunks(events)[0]["id"]
        cancel = f"{node_b}/v1/chat/completions/{completion_id}/cancel"
        bad_wait = httpx.post(cancel + "?wait=soon", timeout=30)
        # The generating process is paused (a long GC pause, an overloaded host): the
        # request is recorded, the answer says so instead of waiting for ever...
        proc_a.send_signal(signal.SIGSTOP)
        try:
            answer = httpx.post(cancel + "?wait=0.2", timeout=30)
        finally:
            proc_a.send_signal(signal.SIGCONT)
        # ...and the producer stops once it runs again.
        assert done.wait(15), "the reader on node A did not end"
        reader.join(10)
        again = httpx.post(cancel, timeout=30)

    assert bad_wait.status_code == 400
    assert bad_wait.json()["error"]["param"] == "wait"
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"id": completion_id, "object": "completion.cancel", "cancelled": False}
    assert chunks(events)[-1]["error"]["code"] == "request"
    assert events[-1].data == "[DONE]"
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "ended"

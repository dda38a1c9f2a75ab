"""Completions in Redis: a reply started on one node is resumed on another."""

from __future__ import annotations

import httpx
import pytest
from sse import chunks, iter_events, text_of

from conftest import ServeGateway
from redis_server import redis_server
from ssehub.protocol import ServerSentEvent

pytestmark = pytest.mark.redis

BODY = {
    "model": "ssehub-demo",
    "messages": [{"role": "user", "content": "resume me elsewhere"}],
    "stream": True,
}


def test_resume_on_another_node(serve_gateway: ServeGateway) -> None:
    with (
        redis_server() as redis,
        serve_gateway(redis_url=redis.url, demo_delay=0.01) as node_a,
        serve_gateway(redis_url=redis.url) as node_b,
    ):
        whole = httpx.post(node_a + "/v1/chat/completions", json={**BODY, "stream": False})
        expected = whole.json()["choices"][0]["message"]["content"]
        first: list[ServerSentEvent] = []
        with httpx.stream("POST", node_a + "/v1/chat/completions", json=BODY) as response:
            completion_id = response.headers["ssehub-completion-id"]
            for event in iter_events(response):
                first.append(event)
                if len(first) == 10:
                    break
        with httpx.stream(
            "GET",
            f"{node_b}/v1/chat/completions/{completion_id}/stream",
            headers={"last-event-id": first[-1].id or ""},
            timeout=30,
        ) as response:
            assert response.status_code == 200
            rest = list(iter_events(response))
        # It has ended by now (and cancel only works on the node that runs one): 409.
        elsewhere = httpx.post(f"{node_b}/v1/chat/completions/{completion_id}/cancel")
    events = first + rest
    assert [e.id for e in events] == sorted({e.id or "" for e in events}, key=_key)
    assert text_of(chunks(events)) == expected
    assert events[-1].data == "[DONE]"
    assert elsewhere.status_code == 409


def _key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)

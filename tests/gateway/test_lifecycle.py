"""Generation outlives its request for a grace time, then stops and closes the upstream
connection; cancel; heartbeats before the first token; metrics."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from fake_upstream import TEXT_PIECES, FakeUpstream
from sse import chunks, iter_events, text_of

from conftest import ServeGateway
from ssehub.protocol import Decoder, ServerSentEvent

from _support import wait_for

Upstream = tuple[str, FakeUpstream]
SLOW = {"model": "fake-slow", "messages": [{"role": "user", "content": "go"}], "stream": True}


def read_some(url: str, body: dict[str, object], count: int) -> tuple[str, list[ServerSentEvent]]:
    """Start a stream, read `count` events, drop the connection."""
    events: list[ServerSentEvent] = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        completion_id = response.headers["ssehub-completion-id"]
        for event in iter_events(response):
            events.append(event)
            if len(events) == count:
                break
    return completion_id, events


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def test_detached_run_stops_after_grace_and_closes_upstream(
    serve_gateway: ServeGateway, fake_upstream: Upstream
) -> None:
    upstream_url, fake = fake_upstream
    with serve_gateway(upstream=upstream_url, detach_grace=0.3) as url:
        completion_id, _ = read_some(url, SLOW, 3)
        (seen,) = fake.requests_for("fake-slow")
        assert seen.disconnected.wait(10), "the upstream request was not cancelled"
        sent = seen.chunks_sent
        with httpx.stream(
            "GET", f"{url}/v1/chat/completions/{completion_id}/stream", timeout=30
        ) as response:
            events = list(iter_events(response))
        assert metric(url, "ssehub_gateway_cancellations_total", '{reason="detached"}') == 1
        assert metric(url, "ssehub_gateway_active_streams") == 0
        assert metric(url, "ssehub_gateway_detached_streams") == 0
    # Generation went on after the client left (more chunks than it read), then stopped.
    # (The client read 3; the upstream sends one every 20 ms of the 0.3 s grace. A few
    # may still sit unread in the socket when the request is cancelled.)
    assert sent > 5
    assert len(chunks(events)) - 1 > 5
    assert chunks(events)[-1]["error"]["code"] == "detached"
    assert events[-1].data == "[DONE]"
    assert seen.chunks_sent == sent  # nothing more after the disconnect


def test_reload_within_grace_then_cancel(
    serve_gateway: ServeGateway, fake_upstream: Upstream
) -> None:
    upstream_url, fake = fake_upstream
    with serve_gateway(upstream=upstream_url, detach_grace=30) as url:
        completion_id, first = read_some(url, SLOW, 3)
        (seen,) = fake.requests_for("fake-slow")
        wait_for(lambda: metric(url, "ssehub_gateway_detached_streams") == 1, 10, 0.02, "detached")
        resumed: list[ServerSentEvent] = []
        with httpx.stream(
            "GET",
            f"{url}/v1/chat/completions/{completion_id}/stream",
            headers={"last-event-id": first[-1].id or ""},
            timeout=30,
        ) as response:
            for event in iter_events(response):
                resumed.append(event)
                if len(resumed) == 5:
                    # Resumed within the grace time: the upstream request is still on.
                    assert not seen.disconnected.is_set()
                    assert metric(url, "ssehub_gateway_detached_streams") == 0
                    assert metric(url, "ssehub_gateway_active_streams") == 1
                    cancelled = httpx.post(f"{url}/v1/chat/completions/{completion_id}/cancel")
                    assert cancelled.status_code == 200
                    assert cancelled.json()["cancelled"] is True
        again = httpx.post(f"{url}/v1/chat/completions/{completion_id}/cancel")
        unknown = httpx.post(f"{url}/v1/chat/completions/chatcmpl-unknown/cancel")
        assert metric(url, "ssehub_gateway_cancellations_total", '{reason="request"}') == 1
    assert seen.disconnected.wait(10)
    # The resumed reader got the run's continuation live, then the cancellation.
    assert [e.id for e in resumed] == sorted(e.id or "" for e in resumed)
    assert chunks(resumed)[-1]["error"]["code"] == "request"
    assert resumed[-1].data == "[DONE]"
    assert again.status_code == 409
    assert unknown.status_code == 404
    assert set(unknown.json()["error"]) == {"message", "type", "param", "code"}


def test_heartbeats_while_waiting_for_the_first_token(
    serve_gateway: ServeGateway, fake_upstream: Upstream
) -> None:
    upstream_url, fake = fake_upstream
    body = {**SLOW, "model": "fake-wait"}
    with (
        serve_gateway(upstream=upstream_url, first_token_heartbeat=0.05) as url,
        httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response,
    ):
        received = b""
        for raw in response.iter_raw():
            received += raw
            if received.count(b":\n\n") >= 2 and not fake.release.is_set():
                assert b"data:" not in received
                fake.release.set()
            if b"data:" in received:
                break
    assert received.startswith(b":\n\n")
    first = received[received.index(b"id:") :]
    assert json.loads(first.split(b"data: ", 1)[1].split(b"\n", 1)[0])["model"] == "fake-wait"


def test_demo_metrics(serve_gateway: ServeGateway) -> None:
    body = {"model": "ssehub-demo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with serve_gateway() as url:
        for _ in range(2):
            with httpx.stream("POST", url + "/v1/chat/completions", json=body) as response:
                list(iter_events(response))
        wait_for(
            lambda: (
                metric(
                    url, "ssehub_gateway_completions_total", '{backend="demo",outcome="finished"}'
                )
                == 2
            ),
            10,
            0.02,
            "two finished completions",
        )
        ttft = metric(url, "ssehub_gateway_time_to_first_token_seconds_count", '{backend="demo"}')
        rate = metric(url, "ssehub_gateway_tokens_per_second_count", '{backend="demo"}')
        tokens = metric(url, "ssehub_gateway_completion_tokens_total", '{backend="demo"}')
    assert ttft == 2
    assert rate == 2
    assert 120 <= tokens <= 400


def test_client_gone_before_the_first_token(
    serve_gateway: ServeGateway, fake_upstream: Upstream
) -> None:
    upstream_url, fake = fake_upstream
    body = {**SLOW, "model": "fake-wait"}
    with serve_gateway(upstream=upstream_url, first_token_heartbeat=0.05, detach_grace=0.2) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            next(response.iter_raw())  # a heartbeat; then the client leaves
        (seen,) = fake.requests_for("fake-wait")
        assert seen.disconnected.wait(10), "the upstream request outlived its client"
        assert seen.chunks_sent == 0
        wait_for(
            lambda: metric(url, "ssehub_gateway_cancellations_total", '{reason="detached"}') == 1,
            10,
            0.02,
            "the detached cancellation",
        )


def test_shutdown_ends_streams_and_runs() -> None:
    import signal
    import time

    from _support import serve_in_process

    body = {"model": "ssehub-demo", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with serve_in_process("--demo-delay", "0.5", "--log-level", "warning") as (url, proc):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
            events = iter_events(response)
            next(events)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = list(events)
        # The reply would take a minute; the stream ends at once, the server soon after.
        assert time.monotonic() - start < 3
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert proc.wait(timeout=10) in (0, -signal.SIGTERM)
    assert all(e.data != "[DONE]" for e in rest)


@pytest.mark.parametrize("model", ["fake-late-fake-text", "fake-late-fake-ratelimit"])
def test_upstream_slow_to_answer_at_all(
    serve_gateway: ServeGateway, fake_upstream: Upstream, model: str
) -> None:
    upstream_url, fake = fake_upstream
    body = {**SLOW, "model": model}
    with (
        serve_gateway(upstream=upstream_url, first_token_heartbeat=0.05) as url,
        httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response,
    ):
        # The stream starts (and stays alive) before the upstream has said anything.
        assert response.status_code == 200
        raw = response.iter_raw()
        assert next(raw).startswith(b":")
        fake.release.set()
        decoder = Decoder()
        events = [e for piece in raw for e in decoder.feed(piece)]
    objects = chunks(events)
    assert events[-1].data == "[DONE]"
    if model.endswith("ratelimit"):
        # The upstream's HTTP error, told in-band: its own error object.
        assert objects == [
            {
                "error": {
                    "message": "Rate limit reached",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
        ]
    else:
        assert text_of(objects) == "".join(TEXT_PIECES)


def test_client_gone_before_the_upstream_answered(
    serve_gateway: ServeGateway, fake_upstream: Upstream
) -> None:
    upstream_url, fake = fake_upstream
    body = {**SLOW, "model": "fake-late-fake-text"}
    with serve_gateway(upstream=upstream_url, first_token_heartbeat=0.05, detach_grace=0.2) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
            next(response.iter_raw())
        (seen,) = fake.requests_for("fake-late-fake-text")
        assert seen.disconnected.wait(10), "the upstream request outlived its client"

"""The sync and async clients against a real server: every test runs with both."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest

from ssehub.client import (
    AsyncEventSource,
    ConnectionLost,
    ContentTypeError,
    EventSource,
    EventTooLarge,
    HTTPStatusError,
    IdleTimeout,
    Reconnect,
    ServerSentEvent,
    aconnect,
    connect,
)

from .conftest import Server
from _support import free_port, wait_for

FAST = Reconnect(delay=0.01, jitter=0.0, max_attempts=5)


@dataclass
class Run:
    events: list[ServerSentEvent] = field(default_factory=list)
    error: Exception | None = None
    source: EventSource | AsyncEventSource | None = None

    @property
    def data(self) -> list[str]:
        return [e.data for e in self.events]

    @property
    def ids(self) -> list[str | None]:
        return [e.id for e in self.events]


Collect = Callable[..., Run]


def _collect_sync(url: str, limit: int | None = None, **kwargs: Any) -> Run:
    run = Run()
    try:
        with connect(url, **kwargs) as source:
            run.source = source
            for event in source:
                run.events.append(event)
                if len(run.events) == limit:
                    break
    except Exception as exc:
        run.error = exc
    return run


def _collect_async(url: str, limit: int | None = None, **kwargs: Any) -> Run:
    run = Run()

    async def main() -> None:
        try:
            async with aconnect(url, **kwargs) as source:
                run.source = source
                async for event in source:
                    run.events.append(event)
                    if len(run.events) == limit:
                        break
        except Exception as exc:
            run.error = exc

    anyio.run(main)
    return run


@pytest.fixture(params=["sync", "async"])
def collect(request: pytest.FixtureRequest) -> Collect:
    return _collect_sync if request.param == "sync" else _collect_async


def test_reads_events_and_stops_on_204(server: Server, key: str, collect: Collect) -> None:
    run = collect(server("/numbers", key, count=5), reconnect=FAST)
    assert run.error is None
    assert run.data == [f"event {n}" for n in range(1, 6)]
    assert run.ids == ["1", "2", "3", "4", "5"]
    assert {e.event for e in run.events} == {"message"}
    assert run.source is not None
    assert run.source.last_event_id == "5"
    # The stream ended, so the client reconnected (GET follows EventSource); the server
    # had nothing after 5 and answered 204, which ends the iteration.
    requests = server.seen.of(key)
    assert [r.last_event_id for r in requests] == [None, "5"]
    assert requests[0].headers["accept"] == "text/event-stream"
    assert requests[0].headers["cache-control"] == "no-store"


def test_resumes_after_drops_without_loss_or_duplicates(
    server: Server, key: str, collect: Collect
) -> None:
    run = collect(server("/numbers", key, count=30, drop="3,10,29"), reconnect=FAST)
    assert run.error is None
    # Each drop cut an event in half: it was discarded, then sent again in full.
    assert run.data == [f"event {n}" for n in range(1, 31)]
    assert [r.last_event_id for r in server.seen.of(key)] == [None, "3", "10", "29", "30"]


def test_starts_from_the_given_last_event_id(server: Server, key: str, collect: Collect) -> None:
    run = collect(server("/numbers", key, count=10), last_event_id="7", reconnect=FAST)
    assert run.ids == ["8", "9", "10"]
    assert server.seen.of(key)[0].last_event_id == "7"


def test_a_last_event_id_header_is_a_starting_id(
    server: Server, key: str, collect: Collect
) -> None:
    url = server("/numbers", key, count=4, drop=3)
    run = collect(url, headers={"Last-Event-ID": "1"}, reconnect=FAST)
    assert run.ids == ["2", "3", "4"]
    assert [r.last_event_id for r in server.seen.of(key)] == ["1", "3", "4"]


def test_follows_redirects(server: Server, key: str, collect: Collect) -> None:
    run = collect(server("/redirect", key, count=2), reconnect=FAST)
    assert run.error is None
    assert run.ids == ["1", "2"]
    assert [r.path for r in server.seen.of(key)] == ["/redirect", "/numbers"] * 2


def test_resumes_from_a_non_ascii_id(server: Server, key: str, collect: Collect) -> None:
    # Last-Event-ID is sent as UTF-8 (an httpx str header would have to be ASCII).
    run = collect(server("/numbers", key, count=3, drop=1, prefix="%C3%A91-"), reconnect=FAST)
    assert run.error is None
    assert run.ids == ["é1-1", "é1-2", "é1-3"]
    assert [r.last_event_id for r in server.seen.of(key)] == [None, "é1-1", "é1-3"]


def test_an_empty_id_means_no_last_event_id_header(
    server: Server, key: str, collect: Collect
) -> None:
    run = collect(server("/numbers", key, count=3, forget=2), reconnect=FAST)
    assert run.error is None
    # The server reset the id, so the client could not say where it was: it starts over.
    assert run.ids == ["1", "2", "1", "2", "3"]
    assert [r.last_event_id for r in server.seen.of(key)] == [None, None, "3"]


def test_honours_retry_from_the_stream(server: Server, key: str, collect: Collect) -> None:
    # The policy alone would wait 30 s: only the stream's `retry: 50` makes this quick.
    slow = Reconnect(delay=30, jitter=0.0)
    run = collect(server("/numbers", key, count=3, drop=1, retry=50), reconnect=slow)
    assert run.error is None
    assert run.ids == ["1", "2", "3"]
    assert run.source is not None
    assert run.source.retry == 50
    first, second, *_ = server.seen.of(key)
    assert 0.05 <= second.at - first.at < 10


def test_gives_up_after_max_attempts(collect: Collect) -> None:
    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    started = time.monotonic()
    run = collect(url, reconnect=Reconnect(delay=0.01, jitter=0.0, max_attempts=3))
    assert isinstance(run.error, ConnectionLost)
    assert isinstance(run.error.__cause__, httpx.ConnectError)
    assert "gave up after 3 attempts in a row" in (run.error.__notes__ or [])
    # Two waits between three attempts: 0.01 s then 0.02 s.
    assert time.monotonic() - started < 10


def test_without_reconnect_a_drop_raises(server: Server, key: str, collect: Collect) -> None:
    run = collect(server("/numbers", key, count=5, drop=2), reconnect=False)
    assert run.ids == ["1", "2"]
    assert isinstance(run.error, ConnectionLost)
    assert isinstance(run.error.__cause__, httpx.RemoteProtocolError)
    assert len(server.seen.of(key)) == 1


def test_without_reconnect_the_end_of_the_stream_ends_iteration(
    server: Server, key: str, collect: Collect
) -> None:
    run = collect(server("/numbers", key, count=3), reconnect=False)
    assert run.error is None
    assert run.ids == ["1", "2", "3"]
    assert len(server.seen.of(key)) == 1


def test_http_error_carries_status_and_body(server: Server, key: str, collect: Collect) -> None:
    run = collect(server("/status", key, code=500), reconnect=FAST)
    error = run.error
    assert isinstance(error, HTTPStatusError)
    assert error.status_code == 500
    assert error.reason == "Internal Server Error"
    assert error.body == "boom: the database is on fire"
    assert error.content_type.startswith("text/plain")
    assert error.method == "GET"
    assert "/status?" in error.url
    assert "500 Internal Server Error" in str(error)
    assert "boom: the database is on fire" in str(error)
    # A 500 is not retried: the server is broken, not restarting.
    assert len(server.seen.of(key)) == 1


def test_error_body_snippet_is_bounded(server: Server, key: str, collect: Collect) -> None:
    run = collect(server("/status", key, code=404, pad=1_000_000), reconnect=False)
    assert isinstance(run.error, HTTPStatusError)
    assert run.error.status_code == 404
    assert run.error.body.startswith("boom")
    assert len(run.error.body) <= 500


def test_transient_status_is_retried(server: Server, key: str, collect: Collect) -> None:
    run = collect(server("/status", key, code=503, times=2, count=2), reconnect=FAST)
    assert run.error is None
    assert run.ids == ["1", "2"]
    assert len(server.seen.of(key)) == 4  # 503, 503, the stream, 204


def test_transient_status_raises_once_attempts_are_used_up(
    server: Server, key: str, collect: Collect
) -> None:
    policy = Reconnect(delay=0.01, jitter=0.0, max_attempts=2)
    run = collect(server("/status", key, code=503), reconnect=policy)
    assert isinstance(run.error, HTTPStatusError)
    assert run.error.status_code == 503
    assert len(server.seen.of(key)) == 2


def test_wrong_content_type_raises(server: Server, key: str, collect: Collect) -> None:
    run = collect(server("/wrong-type", key), reconnect=FAST)
    error = run.error
    assert isinstance(error, ContentTypeError)
    assert error.status_code == 200
    assert error.content_type == "application/json"
    assert error.body == '{"detail": "not a stream"}'
    assert "'application/json', not text/event-stream" in str(error)
    assert len(server.seen.of(key)) == 1


def test_204_at_once_means_no_events(server: Server, key: str, collect: Collect) -> None:
    run = collect(server("/nothing", key), reconnect=FAST)
    assert run.error is None
    assert run.events == []
    assert len(server.seen.of(key)) == 1


def test_idle_timeout_notices_a_silent_connection(
    server: Server, key: str, collect: Collect
) -> None:
    started = time.monotonic()
    run = collect(server("/stall", key), idle_timeout=1.0, reconnect=False)
    assert run.data == ["hello"]
    assert isinstance(run.error, IdleTimeout)
    assert "no data for 1s" in str(run.error)
    assert time.monotonic() - started < 10
    wait_for(lambda: key in server.seen.disconnected, what="the server to see the client go")


def test_idle_timeout_reconnects_and_resumes(server: Server, key: str, collect: Collect) -> None:
    run = collect(server("/numbers", key, count=4, stall=2), idle_timeout=1.0, reconnect=FAST)
    assert run.error is None
    assert run.ids == ["1", "2", "3", "4"]
    assert [r.last_event_id for r in server.seen.of(key)] == [None, "2", "4"]


def test_heartbeats_count_as_life(server: Server, key: str, collect: Collect) -> None:
    # 2 s between events, longer than the idle timeout: only the heartbeat comments every
    # 0.1 s (which the decoder drops) keep the connection from being taken for dead.
    url = server("/numbers", key, count=2, gap=2.0, beat=0.1)
    run = collect(url, idle_timeout=1.0, reconnect=False)
    assert run.error is None
    assert run.ids == ["1", "2"]


def test_without_heartbeats_the_same_gap_times_out(
    server: Server, key: str, collect: Collect
) -> None:
    run = collect(server("/numbers", key, count=2, gap=2.0), idle_timeout=1.0, reconnect=False)
    assert run.events == []
    assert isinstance(run.error, IdleTimeout)


def test_post_json_is_sent_again_with_last_event_id(
    server: Server, key: str, collect: Collect
) -> None:
    run = collect(
        server("/numbers", key, count=4, drop=2),
        method="POST",
        json={"prompt": "hi", "stream": True},
        headers={"Authorization": "Bearer sk-test"},
        reconnect=FAST,
    )
    assert run.error is None
    assert run.ids == ["1", "2", "3", "4"]
    requests = server.seen.of(key)
    # Re-sent after the drop; not after the clean end (POST stops there, as
    # fetch-event-source does).
    assert [(r.method, r.last_event_id) for r in requests] == [("POST", None), ("POST", "2")]
    for r in requests:
        assert r.body == b'{"prompt":"hi","stream":true}'
        assert r.headers["content-type"] == "application/json"
        assert r.headers["authorization"] == "Bearer sk-test"


def test_post_resumes_with_get_where_content_location_says(
    server: Server, key: str, collect: Collect
) -> None:
    run = collect(
        server("/numbers", key, count=4, drop=2, location=1),
        method="POST",
        json={"prompt": "hi"},
        headers={"Authorization": "Bearer sk-test"},
        reconnect=FAST,
    )
    assert run.error is None
    assert run.ids == ["1", "2", "3", "4"]
    first, second = server.seen.of(key)
    assert (first.method, first.body) == ("POST", b'{"prompt":"hi"}')
    # Not sent again: resumed by GET at the stream's own URL, with the caller's headers.
    assert (second.method, second.body, second.last_event_id) == ("GET", b"", "2")
    assert second.path == "/numbers"
    assert "content-type" not in second.headers
    assert second.headers["authorization"] == "Bearer sk-test"


def test_leaving_early_closes_the_connection(server: Server, key: str, collect: Collect) -> None:
    run = collect(server("/stall", key), limit=1, idle_timeout=None)
    assert run.data == ["hello"]
    assert run.error is None
    wait_for(lambda: key in server.seen.disconnected, what="the server to see the client go")


def test_oversized_event_raises_after_the_events_before_it(
    server: Server, key: str, collect: Collect
) -> None:
    run = collect(server("/numbers", key, count=3, big=3), max_event_size=100, reconnect=FAST)
    assert run.ids == ["1", "2"]
    assert isinstance(run.error, EventTooLarge)
    assert len(server.seen.of(key)) == 1


def test_a_given_client_is_used_and_left_open(server: Server, key: str) -> None:
    with httpx.Client(base_url=server.url, headers={"X-Team": "blue"}) as client:
        with connect(f"/numbers?key={key}&count=2", client=client, reconnect=FAST) as source:
            assert [e.id for e in source] == ["1", "2"]
        assert not client.is_closed
        assert server.seen.of(key)[0].headers["x-team"] == "blue"


@pytest.mark.anyio
async def test_a_given_async_client_is_used_and_left_open(server: Server, key: str) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        url = f"/numbers?key={key}&count=2"
        async with aconnect(url, client=client, reconnect=FAST) as source:
            assert [e.id async for e in source] == ["1", "2"]
        assert not client.is_closed


def test_iterating_without_a_with_block(server: Server, key: str) -> None:
    assert [e.id for e in connect(server("/numbers", key, count=2), reconnect=FAST)] == ["1", "2"]


def test_rejects_an_id_that_no_stream_can_hold() -> None:
    with pytest.raises(ValueError, match="must not contain CR, LF or NUL"):
        connect("http://127.0.0.1:1/", last_event_id="1\n2")


def test_rejects_a_malformed_url_at_once() -> None:
    with pytest.raises(httpx.InvalidURL):
        connect("http://[::1/")


def test_rejects_json_and_content_together() -> None:
    with pytest.raises(TypeError):
        connect("http://127.0.0.1:1/", json={}, content=b"{}")


@pytest.fixture(params=["reading", "waiting"])
def blocked_url(request: pytest.FixtureRequest, server: Server, key: str) -> str:
    """Where a reader blocks for good: in a read of a silent stream (without an idle
    timeout), or in the 30 s wait after failing to connect."""
    if request.param == "reading":
        return server("/stall", key)
    return f"http://127.0.0.1:{free_port()}/"


def test_close_from_another_thread_ends_the_iteration(server: Server, blocked_url: str) -> None:
    source = connect(blocked_url, idle_timeout=None, reconnect=Reconnect(delay=30, jitter=0))
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(e.data for e in source), daemon=True)
    reader.start()
    if "stall" in blocked_url:
        wait_for(lambda: seen, what="the first event")
    else:
        time.sleep(0.3)  # most likely into its wait; a close() before it ends it as well
    source.close()
    reader.join(10)
    assert not reader.is_alive()
    if "stall" in blocked_url:
        key = blocked_url.split("key=")[1]
        wait_for(lambda: key in server.seen.disconnected, what="the server to see it go")


@pytest.mark.anyio
async def test_aclose_from_another_task_ends_the_iteration(
    server: Server, blocked_url: str
) -> None:
    source = aconnect(blocked_url, idle_timeout=None, reconnect=Reconnect(delay=30, jitter=0))
    first = anyio.Event()
    ended = anyio.Event()

    async def read() -> None:
        async for _ in source:
            first.set()
        ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        with anyio.fail_after(10):
            if "stall" in blocked_url:
                await first.wait()
            else:
                await anyio.sleep(0.3)
            await source.aclose()
            await ended.wait()
    if "stall" in blocked_url:
        key = blocked_url.split("key=")[1]
        wait_for(lambda: key in server.seen.disconnected, what="the server to see it go")

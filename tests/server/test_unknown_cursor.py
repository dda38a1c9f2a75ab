"""A cursor the server never handed out (one from a previous process of a memory broker,
or from before a Redis restart that lost its data: the events after it are gone) is told
in-band with `ssehub.gap` before anything else, never silently taken as valid (issue #3)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import httpx
import pytest

from redis_server import redis_server
from ssehub.protocol import Decoder, ServerSentEvent
from ssehub.server.app import create_app
from ssehub.settings import Settings

from _support import serve_in_thread


@contextlib.contextmanager
def restarted(kind: str, channel: str, *data: str) -> Iterator[tuple[list[str], str]]:
    """Publish `data` on a server, restart it, yield (the ids, the new server's URL).

    The restart is of the process (memory broker), or of a Redis without persistence
    under it (everything it had is lost)."""
    with contextlib.ExitStack() as stack:
        settings = Settings(heartbeat=0.0)
        redis = None
        if kind == "redis":
            redis = stack.enter_context(redis_server())
            settings = settings.replace(redis_url=redis.url)
        with serve_in_thread(create_app(settings)) as before:
            ids = publish(before, channel, *data)
        if redis is not None:
            redis.restart()
        yield ids, stack.enter_context(serve_in_thread(create_app(settings)))


def publish(base: str, channel: str, *data: str) -> list[str]:
    response = httpx.post(f"{base}/channels/{channel}", json=[{"data": d} for d in data])
    assert response.status_code == 200, response.text
    ids: list[str] = response.json()["ids"]
    return ids


def events(response: httpx.Response) -> Iterator[ServerSentEvent]:
    decoder = Decoder()
    for raw in response.iter_raw():
        yield from decoder.feed(raw)


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_cursor_from_before_a_restart_gets_a_gap_first(kind: str) -> None:
    # A client got these ids, then the server (or its Redis) restarted.
    with restarted(kind, "news", "a", "b") as (old, after):
        # The channel does not exist in the new process yet.
        with httpx.stream(
            "GET", f"{after}/channels/news", headers={"Last-Event-ID": old[-1]}, timeout=10
        ) as response:
            assert response.status_code == 200
            stream = events(response)
            gap = next(stream)
            assert gap.event == "ssehub.gap"
            assert json.loads(gap.data) == {"last_event_id": old[-1], "oldest_id": None}
            # Then live, from the channel's start: nothing published after is skipped.
            (new,) = publish(after, "news", "c")
            message = next(stream)
            assert (message.event, message.data, message.id) == ("message", "c", new)
        # Once the channel has events again, the old cursor still is not one of its ids.
        with httpx.stream(
            "GET", f"{after}/channels/news?last_event_id={old[0]}", timeout=10
        ) as response:
            stream = events(response)
            gap = next(stream)
            assert gap.event == "ssehub.gap"
            assert json.loads(gap.data) == {"last_event_id": old[0], "oldest_id": new}
            assert next(stream).data == "c"
        # `0-0` is the explicit "everything retained": no gap.
        with httpx.stream(
            "GET", f"{after}/channels/news?last_event_id=0-0", timeout=10
        ) as response:
            first = next(events(response))
            assert (first.event, first.data) == ("message", "c")
        # A cursor the new process handed out resumes without a gap.
        (later,) = publish(after, "news", "d")
        with httpx.stream(
            "GET", f"{after}/channels/news", headers={"Last-Event-ID": new}, timeout=10
        ) as response:
            first = next(events(response))
            assert (first.event, first.data, first.id) == ("message", "d", later)

"""JSON data and OpenAI-style streams: the pure rules, then against the real server."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from ssehub.client import (
    EventError,
    InvalidJSON,
    Reconnect,
    ServerSentEvent,
    aconnect,
    aiter_json,
    aiter_openai,
    connect,
    event_json,
    iter_json,
    iter_openai,
    openai_chunk,
)

from .conftest import Server

FAST = Reconnect(delay=0.01, jitter=0.0)


def E(data: str, event: str = "message", id: str = "") -> ServerSentEvent:
    return ServerSentEvent(data=data, event=event, id=id)


def test_event_json() -> None:
    assert event_json(E('{"a": [1, 2.5, null]}')) == {"a": [1, 2.5, None]}
    assert event_json(E("42")) == 42


def test_invalid_json_names_the_event() -> None:
    with pytest.raises(InvalidJSON, match=r"data of event 'tick' \(id '7'\) is not JSON") as info:
        event_json(E("{nope", event="tick", id="7"))
    assert info.value.event.data == "{nope"
    assert isinstance(info.value, ValueError)


def test_openai_chunk_rules() -> None:
    chunk = {"choices": [{"delta": {"content": "hi"}}]}
    assert openai_chunk(E('{"choices": [{"delta": {"content": "hi"}}]}')) == chunk
    assert openai_chunk(E("[DONE]")) is None
    assert openai_chunk(E("{}", event="ping")) is None
    # A null "error" is not an error (some servers send the key on every chunk).
    assert openai_chunk(E('{"error": null, "id": "x"}')) == {"error": None, "id": "x"}
    with pytest.raises(InvalidJSON, match="expected a JSON object"):
        openai_chunk(E("[1, 2]"))


def test_openai_error_data() -> None:
    with pytest.raises(EventError, match="model overloaded") as info:
        openai_chunk(E('{"error": {"message": "model overloaded", "type": "server_error"}}'))
    assert info.value.error == {"message": "model overloaded", "type": "server_error"}


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        ('{"message": "quota exceeded"}', {"message": "quota exceeded"}, "quota exceeded"),
        ('{"error": {"code": 42}}', {"code": 42}, '{"code":42}'),
        ("upstream went away", "upstream went away", "upstream went away"),
        ('"plain"', "plain", "plain"),
    ],
)
def test_openai_error_event(data: str, error: Any, message: str) -> None:
    with pytest.raises(EventError, match=message) as info:
        openai_chunk(E(data, event="error"))
    assert info.value.error == error
    assert info.value.event.event == "error"


def test_iter_openai_stops_at_done() -> None:
    events = [E('{"n": 1}'), E("{}", event="ping"), E('{"n": 2}'), E(" [DONE]"), E('{"n": 3}')]
    assert list(iter_openai(events)) == [{"n": 1}, {"n": 2}]


def test_iter_json_over_a_stream(server: Server, key: str) -> None:
    with connect(server("/numbers", key, count=3, json=1), reconnect=FAST) as source:
        assert list(iter_json(source)) == [{"n": 1}, {"n": 2}, {"n": 3}]


@pytest.mark.anyio
async def test_aiter_json_over_a_stream(server: Server, key: str) -> None:
    async with aconnect(server("/numbers", key, count=3, json=1), reconnect=FAST) as source:
        assert [obj async for obj in aiter_json(source)] == [{"n": 1}, {"n": 2}, {"n": 3}]


def _openai_sync(url: str) -> tuple[list[str], Exception | None]:
    words: list[str] = []
    try:
        with connect(url, method="POST", json={"model": "m", "stream": True}) as source:
            for chunk in iter_openai(source):
                words.append(chunk["choices"][0]["delta"]["content"])
    except EventError as exc:
        return words, exc
    return words, None


def _openai_async(url: str) -> tuple[list[str], Exception | None]:
    async def main() -> tuple[list[str], Exception | None]:
        words: list[str] = []
        try:
            async with aconnect(url, method="POST", json={"model": "m", "stream": True}) as src:
                async for chunk in aiter_openai(src):
                    words.append(chunk["choices"][0]["delta"]["content"])
        except EventError as exc:
            return words, exc
        return words, None

    return anyio.run(main)


@pytest.fixture(params=["sync", "async"])
def openai_stream(request: pytest.FixtureRequest) -> Any:
    return _openai_sync if request.param == "sync" else _openai_async


def test_openai_stream_ends_at_done(server: Server, key: str, openai_stream: Any) -> None:
    # The server keeps the connection open after [DONE]: the reader must not wait for more.
    words, error = openai_stream(server("/openai", key))
    assert error is None
    assert words == ["Hel", "lo"]
    assert server.seen.of(key)[0].body == b'{"model":"m","stream":true}'


def test_openai_error_in_data_raises(server: Server, key: str, openai_stream: Any) -> None:
    words, error = openai_stream(server("/openai", key, mode="error_data"))
    assert words == ["Hel", "lo"]
    assert isinstance(error, EventError)
    assert error.error == {"message": "model overloaded", "code": 503}


def test_openai_error_event_raises(server: Server, key: str, openai_stream: Any) -> None:
    words, error = openai_stream(server("/openai", key, mode="error_event"))
    assert words == ["Hel", "lo"]
    assert isinstance(error, EventError)
    assert error.error == {"message": "quota exceeded"}
    assert "quota exceeded" in str(error)

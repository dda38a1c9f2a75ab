"""The relay against an awkward fake upstream: CRLF, comments, reads cut inside UTF-8
sequences and field names, tool-call fragments, errors mid-stream, HTTP errors, garbage."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import openai
import pytest
from fake_upstream import REASONING, TEXT_PIECES, TOOL_ARGUMENTS, FakeUpstream
from sse import chunks, post_stream, text_of

from conftest import ServeGateway

Upstream = tuple[str, FakeUpstream]
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def relay(serve_gateway: ServeGateway, fake_upstream: Upstream) -> Iterator[str]:
    with serve_gateway(upstream=fake_upstream[0], upstream_api_key="up-key") as url:
        yield url


def test_chunks_pass_through_faithfully(relay: str, fake_upstream: Upstream) -> None:
    response, events = post_stream(
        relay,
        {"model": "fake-text", "messages": MESSAGES, "stream_options": {"include_usage": True}},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    completion_id = response.headers["ssehub-completion-id"]
    objects = chunks(events)
    assert events[-1].data == "[DONE]"
    # Every event has an id, ids increase.
    ids = [e.id for e in events]
    assert all(ids)
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    # Multi-byte text cut across reads arrives whole.
    assert text_of(objects) == "".join(TEXT_PIECES)
    # One id for the stream: the gateway's, which is what a client resumes by.
    assert {o["id"] for o in objects} == {completion_id}
    # Everything else is the upstream's, unknown fields included.
    assert all(o["created"] == 1726132850 and o["model"] == "fake-text" for o in objects)
    assert objects[0]["x_vendor"] == {"a": [1]}
    reasoning = [o["choices"][0]["delta"].get("reasoning_content") for o in objects[1:3]]
    assert reasoning == REASONING
    logprobs = [o["choices"][0]["logprobs"] for o in objects[3:9]]
    assert [lp["content"][0]["token"] for lp in logprobs] == TEXT_PIECES
    assert logprobs[2]["content"][0]["logprob"] == -0.5
    assert objects[-1]["choices"] == []
    assert objects[-1]["usage"]["completion_tokens"] == len(TEXT_PIECES)
    # The upstream got the client's request, with the gateway's key.
    (seen,) = fake_upstream[1].requests_for("fake-text")
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer up-key"
    assert seen.body["stream_options"] == {"include_usage": True}
    assert seen.body["messages"] == MESSAGES


def test_openai_sdk_through_the_relay(relay: str) -> None:
    client = openai.OpenAI(base_url=relay + "/v1", api_key="client-key", max_retries=0)
    stream = client.chat.completions.create(model="fake-text", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    got = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "".join(
        TEXT_PIECES
    )
    assert (got[1].choices[0].delta.model_extra or {})["reasoning_content"] == REASONING[0]
    whole = client.chat.completions.create(model="fake-text", messages=MESSAGES)  # type: ignore[arg-type]
    assert whole.choices[0].message.content == "".join(TEXT_PIECES)
    assert (whole.model_extra or {})["x_vendor"] == "kept"
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "ssehub-demo"
    assert "fake-text" in ids
    assert "fake-tools" in ids


def test_tool_call_fragments(relay: str) -> None:
    client = openai.OpenAI(base_url=relay + "/v1", api_key="k", max_retries=0)
    got = list(
        client.chat.completions.create(model="fake-tools", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    )
    calls = [c.choices[0].delta.tool_calls for c in got if c.choices[0].delta.tool_calls]
    assert calls[0][0].id == "call_abc"
    assert calls[0][0].function is not None
    assert calls[0][0].function.name == "get_weather"
    arguments = "".join(call[0].function.arguments or "" for call in calls if call[0].function)
    assert arguments == "".join(TOOL_ARGUMENTS)
    assert json.loads(arguments) == {"city": "Paris", "unit": "°C"}
    assert got[-1].choices[0].finish_reason == "tool_calls"


def test_legacy_completions_relay(relay: str, fake_upstream: Upstream) -> None:
    client = openai.OpenAI(base_url=relay + "/v1", api_key="k", max_retries=0)
    got = list(client.completions.create(model="fake-text", prompt="hi", stream=True))
    assert "".join(c.choices[0].text for c in got) == "".join(TEXT_PIECES)
    assert len({c.id for c in got}) == 1
    assert got[0].id.startswith("cmpl-")
    assert fake_upstream[1].requests_for("fake-text")[0].path == "/v1/completions"


def test_error_mid_stream(relay: str) -> None:
    _response, events = post_stream(relay, {"model": "fake-error-mid", "messages": MESSAGES})
    objects = chunks(events)
    assert objects[-1] == {
        "error": {
            "message": "the model crashed",
            "type": "server_error",
            "param": None,
            "code": "boom",
        }
    }
    assert events[-1].data == "[DONE]"
    client = openai.OpenAI(base_url=relay + "/v1", api_key="k", max_retries=0)
    stream = client.chat.completions.create(model="fake-error-mid", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError, match="the model crashed"):
        list(stream)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("fake-garbage", "not a JSON object"),
        ("fake-cut", "before \\[DONE\\]"),
        ("fake-event-error", "overloaded, try later"),
    ],
)
def test_bad_streams_end_with_an_error_event(relay: str, model: str, message: str) -> None:
    response, events = post_stream(relay, {"model": model, "messages": MESSAGES})
    assert response.status_code == 200
    objects = chunks(events)
    assert "error" in objects[-1]
    assert objects[-1]["error"]["type"] == "upstream_error"
    assert re.search(message, objects[-1]["error"]["message"])
    assert events[-1].data == "[DONE]"
    # The chunks before the damage were delivered; the gateway still serves.
    assert text_of(objects).startswith(TEXT_PIECES[0])
    _again, more = post_stream(relay, {"model": "fake-text", "messages": MESSAGES})
    assert text_of(chunks(more)) == "".join(TEXT_PIECES)


def test_upstream_http_errors(relay: str) -> None:
    client = openai.OpenAI(base_url=relay + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="fake-ratelimit", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert limited.value.status_code == 429
    assert limited.value.code == "rate_limit_exceeded"
    assert "Rate limit reached" in limited.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="fake-missing", messages=MESSAGES)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    html = httpx.post(
        relay + "/v1/chat/completions",
        json={"model": "fake-html-error", "messages": MESSAGES, "stream": True},
    )
    assert html.status_code == 502
    assert "Bad gateway" in html.json()["error"]["message"]
    assert set(html.json()["error"]) == {"message", "type", "param", "code"}
    redirect = httpx.post(
        relay + "/v1/chat/completions",
        json={"model": "fake-redirect", "messages": MESSAGES, "stream": True},
    )
    assert redirect.status_code == 502
    assert "answered 301" in redirect.json()["error"]["message"]
    not_sse = httpx.post(
        relay + "/v1/chat/completions",
        json={"model": "fake-json", "messages": MESSAGES, "stream": True},
    )
    assert not_sse.status_code == 502
    assert "instead of an event stream" in not_sse.json()["error"]["message"]


def test_unreachable_upstream(serve_gateway: ServeGateway) -> None:
    from _support import free_port

    with serve_gateway(upstream=f"http://127.0.0.1:{free_port()}/v1") as url:
        response = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
        )
        models = httpx.get(url + "/v1/models")
        _demo, events = post_stream(url, {"model": "ssehub-demo", "messages": MESSAGES})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"
    # The demo still works and is still listed.
    assert [m["id"] for m in models.json()["data"]] == ["ssehub-demo"]
    assert events[-1].data == "[DONE]"


def test_client_key_forwarded_when_no_key_is_configured(
    serve_gateway: ServeGateway, fake_upstream: Upstream
) -> None:
    with serve_gateway(upstream=fake_upstream[0]) as url:
        post_stream(
            url,
            {"model": "fake-text", "messages": MESSAGES},
            headers={"authorization": "Bearer mine"},
        )
    assert fake_upstream[1].requests_for("fake-text")[0].headers["authorization"] == "Bearer mine"


def test_upstream_connection_is_reused(relay: str, fake_upstream: Upstream) -> None:
    for _ in range(3):
        _, events = post_stream(relay, {"model": "fake-tools", "messages": MESSAGES})
        assert events[-1].data == "[DONE]"
    clients = {seen.client for seen in fake_upstream[1].requests_for("fake-tools")}
    assert len(clients) == 1, "each completion opened a new upstream connection"


@pytest.mark.anyio
async def test_async_sdk_through_ssehub_serve(fake_upstream: Upstream) -> None:
    """`ssehub serve --upstream ... --upstream-api-key ...` as a user starts it."""
    from _support import serve_in_process

    upstream_url, fake = fake_upstream
    with serve_in_process(
        "--upstream", upstream_url, "--upstream-api-key", "from-cli", "--log-level", "warning"
    ) as (url, _):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stream = await client.chat.completions.create(
            model="fake-tools",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        arguments = ""
        async for chunk in stream:
            for call in chunk.choices[0].delta.tool_calls or []:
                arguments += (call.function.arguments if call.function else None) or ""
        models = [m.id async for m in client.models.list()]
        await client.close()
    assert json.loads(arguments) == {"city": "Paris", "unit": "°C"}
    assert models[0] == "ssehub-demo"
    assert "fake-tools" in models
    assert fake.requests_for("fake-tools")[0].headers["authorization"] == "Bearer from-cli"

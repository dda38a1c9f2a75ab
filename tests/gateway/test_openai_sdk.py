"""The official `openai` SDK, sync and async, against a served gateway: the demo model."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import ServeGateway

MESSAGES = [{"role": "user", "content": "What is Server-Sent Events?"}]


def test_sync_stream_is_openai_shaped(serve_gateway: ServeGateway) -> None:
    with serve_gateway() as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        stream = client.chat.completions.create(
            model="ssehub-demo",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        whole = client.chat.completions.create(model="ssehub-demo", messages=MESSAGES)  # type: ignore[arg-type]

    assert len({c.id for c in chunks}) == 1
    assert len({c.created for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.model == "ssehub-demo" and c.system_fingerprint for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    *with_choices, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    # The same conversation gets the same reply, streamed or not.
    assert text == whole.choices[0].message.content
    assert "ssehub-demo" in text
    assert "--upstream" in text
    assert 60 <= last.usage.completion_tokens <= 200
    assert last.usage.completion_tokens == len(with_choices) - 2  # minus role and finish
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert whole.object == "chat.completion"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == last.usage.completion_tokens
    assert whole.choices[0].finish_reason == "stop"


def test_no_usage_chunk_unless_asked(serve_gateway: ServeGateway) -> None:
    with serve_gateway() as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        chunks = list(
            client.chat.completions.create(model="ssehub-demo", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


@pytest.mark.anyio
async def test_async_stream(serve_gateway: ServeGateway) -> None:
    with serve_gateway(demo_delay=0.001) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        stream = await client.chat.completions.create(
            model="ssehub-demo",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
        )
        parts = [c.choices[0].delta.content or "" async for c in stream]
        again = await client.chat.completions.create(
            model="ssehub-demo", messages=[{"role": "user", "content": "hello"}]
        )
        other = await client.chat.completions.create(
            model="ssehub-demo", messages=[{"role": "user", "content": "something else"}]
        )
        await client.close()
    assert "".join(parts) == again.choices[0].message.content
    assert other.choices[0].message.content != again.choices[0].message.content


def test_legacy_completions(serve_gateway: ServeGateway) -> None:
    with serve_gateway() as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        chunks = list(
            client.completions.create(
                model="ssehub-demo",
                prompt="Say hi",
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        whole = client.completions.create(model="ssehub-demo", prompt="Say hi")
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("cmpl-")
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert "demo" in text
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert whole.usage is not None
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens


def test_models_lists_the_demo(serve_gateway: ServeGateway) -> None:
    with serve_gateway() as url:
        models = openai.OpenAI(base_url=url + "/v1", api_key="unused").models.list()
    assert [m.id for m in models.data] == ["ssehub-demo"]


def test_errors_before_the_stream(serve_gateway: ServeGateway) -> None:
    with serve_gateway() as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError) as not_found:
            client.chat.completions.create(model="gpt-9", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="ssehub-demo", messages=[], stream=True)
        invalid = httpx.post(
            url + "/v1/chat/completions",
            content=b'{"model": "ssehub-demo", "messages": [',
            headers={"content-type": "application/json"},
        )
        no_messages = httpx.post(url + "/v1/chat/completions", json={"model": "ssehub-demo"})
        no_prompt = httpx.post(url + "/v1/completions", json={"model": "ssehub-demo"})
    assert not_found.value.status_code == 404
    assert not_found.value.code == "model_not_found"
    assert not_found.value.param == "model"
    assert bad.value.status_code == 400
    assert bad.value.param == "messages"
    for response in (invalid, no_messages, no_prompt):
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "JSON" in invalid.json()["error"]["message"]
    assert no_messages.json()["error"]["param"] == "messages"


def test_max_tokens_cuts_the_reply(serve_gateway: ServeGateway) -> None:
    with serve_gateway() as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        chunks = list(
            client.chat.completions.create(
                model="ssehub-demo",
                messages=MESSAGES,  # type: ignore[arg-type]
                stream=True,
                max_tokens=5,
                stream_options={"include_usage": True},
            )
        )
        whole = client.chat.completions.create(
            model="ssehub-demo",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_completion_tokens=5,
        )
        full = client.chat.completions.create(model="ssehub-demo", messages=MESSAGES)  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert whole.choices[0].finish_reason == "length"
    assert whole.choices[0].message.content == text
    assert full.choices[0].message.content is not None
    assert full.choices[0].message.content.startswith(text)
    assert len(full.choices[0].message.content) > len(text)

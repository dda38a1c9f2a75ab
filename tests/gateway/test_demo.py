"""The demo model alone: deterministic, 60-200 tokens, says what it is and how to connect."""

from __future__ import annotations

import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from ssehub.gateway.demo import reply_text, tokenize
from ssehub.gateway.schema import CompletionRequest, parse_request


def chat(*contents: str) -> CompletionRequest:
    messages = [{"role": "user", "content": c} for c in contents]
    return parse_request(orjson.dumps({"model": "ssehub-demo", "messages": messages}), "chat")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=4))
def test_reply_length_and_content(contents: list[str]) -> None:
    request = chat(*contents)
    text = reply_text(request)
    tokens = tokenize(text)
    assert 60 <= len(tokens) <= 200
    assert "".join(tokens) == text
    assert "ssehub-demo" in text
    assert "--upstream" in text
    assert reply_text(chat(*contents)) == text


def test_conversations_get_different_replies() -> None:
    replies = {reply_text(chat(f"question number {i}")) for i in range(20)}
    assert len(replies) > 5


def test_content_parts_and_prompts() -> None:
    parts = [{"type": "text", "text": "from parts"}]
    body = {"model": "ssehub-demo", "messages": [{"role": "user", "content": parts}]}
    assert "from parts" in reply_text(parse_request(orjson.dumps(body), "chat"))
    text = parse_request(b'{"model": "ssehub-demo", "prompt": ["a", "b"]}', "text")
    assert text.prompt_text == "a\nb"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["role", "content", "x"]) | st.text(), children, max_size=4
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "model": json_values | st.just("ssehub-demo"),
            "messages": json_values,
            "prompt": json_values,
            "stream": json_values,
            "stream_options": json_values,
        },
    ),
    st.sampled_from(["chat", "text"]),
)
def test_any_request_is_accepted_or_refused_with_400(body: dict[str, object], kind: str) -> None:
    from ssehub.gateway.schema import GatewayError

    refused: GatewayError | None = None
    try:
        request = parse_request(json.dumps(body).encode(), kind)  # type: ignore[arg-type]
    except GatewayError as error:
        refused = error
    if refused is not None:
        assert refused.status == 400
        assert set(refused.body()["error"]) == {"message", "type", "param", "code"}
        return
    # Accepted: the demo can answer it.
    assert 60 <= len(tokenize(reply_text(request))) <= 200

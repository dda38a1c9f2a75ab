"""The demo model alone: deterministic, 60-200 tokens, says what it is and how to connect."""

from __future__ import annotations

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

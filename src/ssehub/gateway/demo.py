"""`ssehub-demo`: the built-in model. No network, no weights: a reply picked from phrases by
a hash of the conversation, so the same conversation always gets the same reply, told
one token at a time like a real model."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator

from ssehub.gateway.chunks import ChunkFactory, Tally, Usage
from ssehub.gateway.schema import CompletionRequest

DEMO_MODEL = "ssehub-demo"

# GPT-2's pre-tokenizer, simplified: a word with its leading space, a run of
# punctuation, or whitespace. Close enough to real token counts for usage figures.
_TOKEN = re.compile(r" ?[A-Za-z0-9_'’]+| ?[^\sA-Za-z0-9_'’]+|\s+")

_OPENINGS = (
    "Hello! I am ssehub-demo, the demo model built into ssehub.",
    "Hi there. You are talking to ssehub-demo, the small demo model that ships with ssehub.",
    "Thanks for your message. I am ssehub-demo, a built-in demo model, not a real one.",
    "Good question to start with. This reply comes from ssehub-demo, ssehub's demo model.",
)
_ECHOES = (
    'You asked about "{topic}", and I would love to help,',
    'I read your message about "{topic}" carefully,',
    'Your words were "{topic}", which deserve a real answer,',
)
_ECHO_TAILS = (
    " but I cannot understand it: I only stream prepared text.",
    " yet all I can do is stream this reply, token by token.",
    " although I do not think; I am here so that streaming works out of the box.",
)
_MIDDLES = (
    "Every token you see arrives as a Server-Sent Event in the OpenAI format, and each "
    "event has an id, so a dropped connection can resume where it stopped.",
    "This stream is kept in a log on the server: reload the page or lose the network, "
    "and the reply continues from the last event you received.",
    "The chunks follow the OpenAI chat completion format, so any OpenAI client library "
    "can read them, and a reconnecting client misses nothing.",
)
_CONNECTS = (
    "To talk to a real model, start the server with --upstream and the base URL of an "
    "OpenAI-compatible API, for example `ssehub serve --upstream "
    "https://api.openai.com/v1 --upstream-api-key $OPENAI_API_KEY`, then ask for one of "
    "its models by name.",
    "To connect a real model, run `ssehub serve --upstream URL --upstream-api-key KEY` "
    "with any OpenAI-compatible server: OpenAI, DashScope, vLLM, Ollama or llama.cpp. "
    "Its models then appear in /v1/models beside me.",
)
_CLOSINGS = (
    "Until then, enjoy the stream!",
    "See docs/gateway.md for the details.",
    "Happy streaming.",
)


def tokenize(text: str) -> list[str]:
    """Split text into model-like tokens; joined back they give the text unchanged."""
    return _TOKEN.findall(text)


def _pick(options: tuple[str, ...], digest: bytes, at: int) -> str:
    return options[digest[at] % len(options)]


def reply_text(request: CompletionRequest) -> str:
    """The demo's reply to this conversation: the same conversation, the same reply."""
    digest = hashlib.sha256(request.prompt_text.encode()).digest()
    words = request.last_user_text.split()
    topic = " ".join(words[:8]) + (" ..." if len(words) > 8 else "")
    topic = topic.replace('"', "'")[:80]
    parts = [_pick(_OPENINGS, digest, 0)]
    if topic:
        parts.append(_pick(_ECHOES, digest, 1).format(topic=topic) + _pick(_ECHO_TAILS, digest, 2))
    parts.append(_pick(_MIDDLES, digest, 3))
    parts.append(_pick(_CONNECTS, digest, 4))
    parts.append(_pick(_CLOSINGS, digest, 5))
    return " ".join(parts)


def reply_tokens(request: CompletionRequest) -> tuple[list[str], str]:
    """The reply's tokens and finish reason: cut at `max_tokens` (or
    `max_completion_tokens`) with `length`, as a real model is."""
    tokens = tokenize(reply_text(request))
    limit = request.body.get("max_completion_tokens") or request.body.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < len(tokens):
        return tokens[:limit], "length"
    return tokens, "stop"


def usage_for(request: CompletionRequest, tokens: list[str]) -> Usage:
    return Usage(len(tokenize(request.prompt_text)), len(tokens))


async def demo_chunks(
    request: CompletionRequest, factory: ChunkFactory, delay: float, tally: Tally | None = None
) -> AsyncIterator[list[str]]:
    """The demo's stream as batches of chunk JSON, `delay` seconds between tokens.

    With no delay it yields the tokens in a few large batches, which is what a fast model
    behind a slow network looks like.
    """
    tokens, finish_reason = reply_tokens(request)
    batch: list[str] = [factory.role()] if factory.kind == "chat" else []
    tally = tally or Tally()
    for token in tokens:
        batch.append(factory.content(token))
        tally.tokens += 1
        if delay > 0:
            yield batch
            batch = []
            await asyncio.sleep(delay)
        elif len(batch) >= 64:
            yield batch
            batch = []
            await asyncio.sleep(0)
    batch.append(factory.finish(finish_reason))
    if factory.include_usage:
        batch.append(factory.usage(usage_for(request, tokens)))
    yield batch


def demo_completion(request: CompletionRequest, factory: ChunkFactory) -> dict[str, object]:
    """The whole demo reply as one `chat.completion` (or `text_completion`) object."""
    tokens, finish_reason = reply_tokens(request)
    return factory.completion("".join(tokens), finish_reason, usage_for(request, tokens))

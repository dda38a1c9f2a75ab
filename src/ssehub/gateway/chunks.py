"""OpenAI response objects: stream chunks, whole completions, usage, model lists.

Shapes follow the OpenAI API reference ("The chat completion chunk object", "The chat
completion object", legacy "The completion object").
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from ssehub.gateway.schema import Kind

SYSTEM_FINGERPRINT = "fp_ssehub"


def new_completion_id(kind: Kind) -> str:
    """A fresh id: the name of the completion's log (`run:<id>`) and its resume handle."""
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return prefix + secrets.token_hex(12)


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(frozen=True, slots=True)
class ChunkFactory:
    """Builds the chunks of one stream: the same `id`, `created` and `model` in each.

    `include_usage`: OpenAI then sends `"usage": null` on every chunk and the counts on a
    last chunk with no choices.
    """

    kind: Kind
    id: str
    created: int
    model: str
    include_usage: bool = False
    system_fingerprint: str = SYSTEM_FINGERPRINT

    @classmethod
    def start(cls, kind: Kind, model: str, include_usage: bool = False) -> ChunkFactory:
        return cls(kind, new_completion_id(kind), int(time.time()), model, include_usage)

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {
            "text": delta.get("content", ""),
            "index": 0,
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    def role(self) -> str:
        """The first chat chunk: the role, and empty content as OpenAI sends it."""
        return dumps(self._chunk([self._choice({"role": "assistant", "content": ""}, None)]))

    def content(self, text: str) -> str:
        return dumps(self._chunk([self._choice({"content": text}, None)]))

    def finish(self, reason: str = "stop") -> str:
        return dumps(self._chunk([self._choice({}, reason)]))

    def usage(self, usage: Usage) -> str:
        chunk = self._chunk([])
        chunk["usage"] = usage.as_dict()
        return dumps(chunk)

    def completion(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        """The whole reply as one object, for `stream: false`."""
        choice: dict[str, Any]
        if self.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": self.id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "choices": [choice],
            "usage": usage.as_dict(),
        }


def model_object(model_id: str, owned_by: str, created: int = 0) -> dict[str, Any]:
    """An entry of `GET /v1/models`."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


class Tally:
    """Counts a stream's tokens as its source produces them.

    `tokens` counts chunks that carry choices (one token each for most models); `usage`
    is the `completion_tokens` the model reported, which wins when present.
    """

    __slots__ = ("tokens", "usage")

    def __init__(self) -> None:
        self.tokens = 0
        self.usage: int | None = None

    @property
    def completion_tokens(self) -> int:
        return self.usage if self.usage is not None else self.tokens

"""Requests and errors in the OpenAI wire format.

Only what the gateway needs to route and stream a request is validated here; everything
else in the body is the model's business and goes to the upstream untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

Kind = Literal["chat", "text"]
"""`chat`: /v1/chat/completions; `text`: the legacy /v1/completions."""


class GatewayError(Exception):
    """An error to answer with: `status` and OpenAI's `{"error": {...}}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        *,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        # An upstream's own error body, passed through as it came.
        self._body = body

    def body(self) -> dict[str, Any]:
        if self._body is not None:
            return self._body
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    """OpenAI's error object: all four keys are always present (null when unknown)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A validated completion request.

    - `kind`: chat or legacy text completion.
    - `model`: the model asked for.
    - `stream`: whether the reply is an event stream.
    - `include_usage`: `stream_options.include_usage`: a last chunk with `choices: []`
      and `usage`.
    - `body`: the request as the client sent it, forwarded to an upstream as is.
    """

    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    body: dict[str, Any]

    @property
    def prompt_text(self) -> str:
        """The conversation as text (what the demo model answers and counts)."""
        if self.kind == "text":
            prompt = self.body.get("prompt", "")
            if isinstance(prompt, list):
                return "\n".join(str(p) for p in prompt)
            return str(prompt)
        parts = []
        for message in self.body["messages"]:
            content = message.get("content")
            if isinstance(content, list):
                # Content parts: keep the text ones.
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role', '')}: {content or ''}")
        return "\n".join(parts)

    @property
    def last_user_text(self) -> str:
        if self.kind == "text":
            return self.prompt_text
        for message in reversed(self.body["messages"]):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    content = " ".join(
                        str(p.get("text", "")) for p in content if isinstance(p, dict)
                    )
                return str(content or "")
        return ""


def parse_request(raw: bytes, kind: Kind) -> CompletionRequest:
    """Validate a request body; raises `GatewayError` (400) saying what is wrong."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "'model' is required and must be a string.", param="model")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GatewayError(
                400, "'messages' is required and must be a non-empty array.", param="messages"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise GatewayError(
                    400,
                    f"'messages[{i}]' must be an object with a 'role'.",
                    param=f"messages[{i}]",
                )
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise GatewayError(400, "'prompt' is required.", param="prompt")
        if not isinstance(prompt, str | list):
            raise GatewayError(400, "'prompt' must be a string or an array.", param="prompt")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise GatewayError(400, "'stream' must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise GatewayError(400, "'stream_options' must be an object.", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return CompletionRequest(
        kind=kind, model=model, stream=stream, include_usage=include_usage, body=body
    )

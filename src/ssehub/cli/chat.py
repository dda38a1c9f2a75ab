"""`ssehub chat "prompt"`: stream a model's reply to the terminal through a gateway.

When the connection drops mid-reply, the rest is fetched from
`/v1/chat/completions/{id}/stream` after the last event received: a gateway keeps the
completion going (for its detach grace time), so nothing is lost or repeated.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click
import httpx
import orjson

from ssehub.client import (
    ConnectionLost,
    EventError,
    EventSource,
    HTTPStatusError,
    Reconnect,
    SSEError,
    connect,
    openai_chunk,
)
from ssehub.client._tls import tls_context

# Attempts to resume a dropped reply before giving up.
RESUME_ATTEMPTS = 5


def _error_message(error: HTTPStatusError) -> str:
    try:
        detail = orjson.loads(error.body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        detail = error.body.strip() or error.reason
    message = f"{error.status_code} {error.reason}: {detail}"
    if error.status_code == 401:
        message += " (give the key with --api-key or SSEHUB_API_KEY)"
    return message


class _Reply:
    """What the reply has shown so far, and the figures printed at the end."""

    def __init__(self, out: Any, color: bool) -> None:
        self.out = out
        self.color = color
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self.tool_calls: dict[int, dict[str, str]] = {}
        self.in_reasoning = False
        self.completion_id: str | None = None

    def write(self, text: str, dim: bool = False) -> None:
        if self.color and dim:
            text = click.style(text, dim=True)
        self.out.write(text)
        self.out.flush()

    def take(self, chunk: dict[str, Any]) -> None:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content")
            content = delta.get("content")
            if content is None and "text" in choice:  # legacy completions
                content = choice["text"]
            if reasoning or content or delta.get("tool_calls"):
                self.chunks += 1
                if self.first_token is None:
                    self.first_token = time.monotonic()
            if reasoning:
                self.in_reasoning = True
                self.write(reasoning, dim=True)
            if content:
                if self.in_reasoning:
                    self.in_reasoning = False
                    self.write("\n\n")
                self.write(content)
            for call in delta.get("tool_calls") or []:
                slot = self.tool_calls.setdefault(call.get("index", 0), {"name": "", "args": ""})
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["args"] += function.get("arguments") or ""

    def summary(self) -> str:
        for call in self.tool_calls.values():
            self.write(f"\n[tool call] {call['name']}({call['args']})")
        elapsed = time.monotonic() - self.start
        parts = []
        if self.usage:
            parts.append(
                f"usage: {self.usage.get('prompt_tokens')} prompt + "
                f"{self.usage.get('completion_tokens')} completion = "
                f"{self.usage.get('total_tokens')} tokens"
            )
        else:
            parts.append(f"usage: not reported ({self.chunks} chunks)")
        if self.first_token is not None:
            parts.append(f"time to first token: {(self.first_token - self.start) * 1000:.0f} ms")
            generating = time.monotonic() - self.first_token
            tokens = (self.usage or {}).get("completion_tokens") or self.chunks
            if generating > 0 and tokens > 1:
                parts.append(f"{tokens / generating:.1f} tokens/s")
        parts.append(f"total {elapsed:.2f} s")
        return " · ".join(parts)


def _read(source: EventSource, reply: _Reply) -> bool:
    """Read `source` to `[DONE]` (True), or until it ends or breaks before (False)."""
    with source:
        for event in source:
            if reply.completion_id is None and source.response is not None:
                reply.completion_id = source.response.headers.get("ssehub-completion-id")
            if event.event == "message" and event.data.strip() == "[DONE]":
                return True
            chunk = openai_chunk(event)
            if chunk is not None:
                reply.completion_id = reply.completion_id or chunk.get("id")
                reply.take(chunk)
    return False


@click.command()
@click.argument("prompt")
@click.option(
    "--server",
    default="http://127.0.0.1:8000",
    show_default=True,
    envvar="SSEHUB_SERVER",
    show_envvar=True,
    help="Base URL of the gateway (an ssehub server, or any OpenAI-compatible API).",
)
@click.option("--model", "-m", default="ssehub-demo", show_default=True, help="Model to ask.")
@click.option("--system", default=None, help="A system message to send first.")
@click.option(
    "--api-key",
    # SSEHUB_API_KEY wins: a shell may hold a key for OpenAI itself in OPENAI_API_KEY
    # while this gateway wants its own.
    envvar=["SSEHUB_API_KEY", "OPENAI_API_KEY"],
    show_envvar=True,
    default=None,
    help="Sent as 'Authorization: Bearer KEY': the gateway's key (serve --api-key), or "
    "for a gateway that forwards it, the upstream's.",
)
@click.option("--timeout", default=120.0, show_default=True, help="Seconds without a byte.")
def chat(
    prompt: str,
    server: str,
    model: str,
    system: str | None,
    api_key: str | None,
    timeout: float,
) -> None:
    """Stream a chat completion's reply to the terminal, then usage and time to first token.

    Example: ssehub chat "What are Server-Sent Events?" --server http://127.0.0.1:8000
    """
    base = server.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    body = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # The server's SSEHUB_API_KEY may list several keys; no key holds a comma, so the
    # first one is a key.
    key = next((k.strip() for k in (api_key or "").split(",") if k.strip()), None)
    headers = {"authorization": f"Bearer {key}"} if key else None
    # Made before the clock starts: the time to first token is the server's, not the
    # time this process takes to set up a client.
    client = httpx.Client(follow_redirects=True, verify=tls_context())
    reply = _Reply(sys.stdout, color=sys.stdout.isatty())
    # A POST is never sent twice (that would start a second completion): a dropped reply
    # is resumed by its id instead.
    source = connect(
        base + "/chat/completions",
        method="POST",
        json=body,
        headers=headers,
        reconnect=False,
        idle_timeout=timeout,
        client=client,
    )
    attempts = 0
    try:
        while True:
            try:
                done = _read(source, reply)
            except ConnectionLost:
                done = False
                if reply.completion_id is None:
                    raise
            if done:
                break
            completion_id = reply.completion_id
            if completion_id is None or attempts > RESUME_ATTEMPTS:
                raise click.ClickException("the stream ended before [DONE] and cannot resume")
            attempts += 1
            source = connect(
                f"{base}/chat/completions/{completion_id}/stream",
                headers=headers,
                last_event_id=source.last_event_id or None,
                reconnect=Reconnect(max_attempts=RESUME_ATTEMPTS),
                idle_timeout=timeout,
                client=client,
            )
    except HTTPStatusError as error:
        raise click.ClickException(_error_message(error)) from None
    except EventError as error:
        reply.write("\n")
        raise click.ClickException(str(error)) from None
    except SSEError as error:
        raise click.ClickException(f"{base}: {error}") from None
    finally:
        client.close()
    reply.write("\n")
    click.echo(click.style(reply.summary(), dim=True), err=True)

"""The relay to an OpenAI-compatible upstream (OpenAI, DashScope, vLLM, Ollama, llama.cpp).

The upstream's event stream is parsed with ssehub's own decoder, so CRLF line ends,
comments and reads cut anywhere (even inside a UTF-8 sequence) are handled once, by the
code the whole project tests. Chunks are re-emitted as the upstream sent them, fields
ssehub does not know included; only `id` is replaced by the gateway's completion id,
because that id is what a client resumes by (`GET /v1/chat/completions/{id}/stream`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import orjson

from ssehub.gateway.chunks import Tally
from ssehub.gateway.schema import GatewayError, error_body
from ssehub.protocol import Decoder, EventTooLarge, ServerSentEvent

log = logging.getLogger("ssehub.gateway")

# An error body is read whole to pass it on; beyond this it is cut (a misconfigured
# upstream can answer an HTML page of any size).
MAX_ERROR_BODY = 65_536
# Seconds to wait for the end of a response after its `[DONE]`.
DRAIN_TIMEOUT = 1.0
# A non-streamed completion is read whole before it is passed on.
MAX_JSON_BODY = 16 * 1_048_576


class StreamFailure(Exception):
    """The stream started, then failed: `body` is the `{"error": ...}` event to send."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("error")))
        self.body = body


def _upstream_error(status: int, content: bytes, reason: str) -> GatewayError:
    """The upstream's HTTP error as ours: its status and, when it is OpenAI-shaped, its
    body. A status that is not an error (a redirect, an unexpected 2xx) is a 502: the
    client could do nothing with it."""
    if status < 400:
        snippet = content[:200].decode("utf-8", "replace").strip()
        return GatewayError(
            502,
            f"the upstream answered {status} {reason}; is --upstream the API base URL "
            f"(ending in /v1)? {snippet}".strip(),
            type="upstream_error",
            code=502,
        )
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
        message = str(error.get("message") or reason)
        # Keep every field the upstream sent; add the four OpenAI ones when missing.
        body = {"error": {"message": message, "type": None, "param": None, "code": None}}
        body["error"].update(error)
        body["error"]["message"] = message
        return GatewayError(status, message, body=body)
    snippet = content[:500].decode("utf-8", "replace").strip()
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        snippet = parsed["error"]  # Ollama and llama.cpp: {"error": "message"}
    message = f"upstream answered {status} {reason}" + (f": {snippet}" if snippet else "")
    return GatewayError(status, message, type="upstream_error", code=status)


def _transport_error(exc: httpx.HTTPError, url: str) -> GatewayError:
    if isinstance(exc, httpx.TimeoutException):
        return GatewayError(504, f"upstream timed out: {url}", type="upstream_error", code=504)
    return GatewayError(
        502, f"cannot reach the upstream {url}: {exc!r}", type="upstream_error", code=502
    )


def _data_of(events: list[ServerSentEvent]) -> list[str]:
    """The data of message events; an `event: error` (some servers send errors so) as an
    error chunk. Other event types (keep-alive `ping`s...) carry no chunk."""
    out = []
    for event in events:
        if event.event == "message":
            out.append(event.data)
        elif event.event == "error":
            try:
                parsed = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                parsed = event.data
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                out.append(event.data)
                continue
            if isinstance(parsed, dict):
                message = str(parsed.get("message") or event.data)
            else:
                message = str(parsed) or "the upstream reported an error"
            out.append(orjson.dumps(error_body(message, "upstream_error")).decode())
    return out


class UpstreamStream:
    """An upstream response that answered 200 with an event stream."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    async def data(self) -> AsyncGenerator[list[str], None]:
        """The `data` of each message event, in batches of one network read each."""
        decoder = Decoder()
        try:
            async for raw in self._response.aiter_bytes():
                try:
                    events = decoder.feed(raw)
                except EventTooLarge as exc:
                    if exc.events:
                        yield _data_of(exc.events)
                    raise StreamFailure(
                        error_body(f"the upstream sent a bad stream: {exc}", "upstream_error")
                    ) from exc
                if events:
                    yield _data_of(events)
            rest = decoder.close()
            if rest:
                yield _data_of(rest)
        except httpx.HTTPError as exc:
            raise StreamFailure(
                error_body(f"the upstream stream broke: {exc!r}", "upstream_error")
            ) from exc
        finally:
            await self._response.aclose()

    async def aclose(self) -> None:
        """Close the response and its connection: the upstream sees the client go."""
        await self._response.aclose()


async def relay_chunks(
    stream: UpstreamStream, completion_id: str, tally: Tally | None = None
) -> AsyncIterator[list[str]]:
    """The upstream's chunks with the gateway's id, in batches; ends at `[DONE]`.

    Raises `StreamFailure` on an error chunk, data that is not a JSON object, or a stream
    that ends without `[DONE]` (the reply may be cut: the client must be told).
    """
    tally = tally or Tally()
    data = stream.data()
    try:
        async for batch in data:
            out: list[str] = []
            for item in batch:
                if item == "[DONE]":
                    if out:
                        yield out
                    await _drain(data)
                    return
                try:
                    chunk = orjson.loads(item)
                except orjson.JSONDecodeError:
                    chunk = None
                if not isinstance(chunk, dict):
                    if out:
                        yield out
                    raise StreamFailure(
                        error_body(
                            f"the upstream sent an event that is not a JSON object: {item[:200]!r}",
                            "upstream_error",
                        )
                    )
                if chunk.get("error"):
                    if out:
                        yield out
                    error = chunk["error"]
                    if not isinstance(error, dict):
                        chunk = error_body(str(error), "upstream_error")
                    raise StreamFailure(chunk)
                chunk["id"] = completion_id
                if chunk.get("choices"):
                    tally.tokens += 1
                usage = chunk.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    tally.usage = usage["completion_tokens"]
                out.append(orjson.dumps(chunk).decode())
            if out:
                yield out
        raise StreamFailure(
            error_body("the upstream ended the stream before [DONE]", "upstream_error")
        )
    finally:
        await data.aclose()


async def _drain(data: AsyncIterator[list[str]]) -> None:
    """After `[DONE]`: read the response to its end, so its connection goes back to the
    pool instead of being closed (else every completion pays a new TCP handshake). An
    upstream that goes on sending is cut off."""
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            async for _ in data:
                pass
    except (TimeoutError, StreamFailure):
        pass


class LateRelay:
    """`relay_chunks` of a request whose response head has not come yet.

    Used when the upstream is slow to answer at all: the client's stream has started
    (and gets heartbeats) meanwhile, so an HTTP error of the upstream becomes an error
    event. `aclose()` cancels the request, even before the first batch was asked for.
    """

    def __init__(
        self, opening: asyncio.Future[UpstreamStream], completion_id: str, tally: Tally
    ) -> None:
        self._opening = opening
        self._batches = self._relay(completion_id, tally)

    async def _relay(self, completion_id: str, tally: Tally) -> AsyncGenerator[list[str], None]:
        try:
            stream = await self._opening
        except GatewayError as error:
            raise StreamFailure(error.body()) from error
        async for batch in relay_chunks(stream, completion_id, tally):
            yield batch

    def __aiter__(self) -> LateRelay:
        return self

    async def __anext__(self) -> list[str]:
        return await anext(self._batches)

    async def aclose(self) -> None:
        await self._batches.aclose()
        if not self._opening.done():
            self._opening.cancel()
        elif not self._opening.cancelled() and self._opening.exception() is None:
            await self._opening.result().aclose()


class Upstream:
    """An OpenAI-compatible API at `base_url` (the part before `/chat/completions`)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        # Reads wait long: a reasoning model may think for minutes between tokens.
        self._timeout = httpx.Timeout(connect=10.0, read=600.0, write=30.0, pool=10.0)
        self._transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)
        )
        self._urls: dict[str, httpx.URL] = {}
        self._client = client or httpx.AsyncClient(timeout=self._timeout, transport=self._transport)

    def _parsed_url(self, url: str) -> httpx.URL:
        # Parsing a URL is a fifth of the cost of sending the request: once per path.
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = httpx.URL(url)
        return parsed

    def _headers(self, authorization: str | None) -> dict[str, str]:
        headers = {"accept": "text/event-stream, application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        elif authorization:
            # No key configured: each client brings its own.
            headers["authorization"] = authorization
        return headers

    async def models(self, authorization: str | None = None) -> list[dict[str, Any]]:
        """The upstream's model list; raises `GatewayError` when it cannot be had."""
        url = f"{self.base_url}/models"
        try:
            response = await self._client.get(url, headers=self._headers(authorization))
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url) from exc
        if response.status_code != 200:
            raise _upstream_error(
                response.status_code, response.content[:MAX_ERROR_BODY], response.reason_phrase
            )
        try:
            data = orjson.loads(response.content).get("data")
        except (orjson.JSONDecodeError, AttributeError):
            data = None
        if not isinstance(data, list):
            raise GatewayError(
                502, f"{url} did not answer a model list", type="upstream_error", code=502
            )
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def post(
        self, path: str, body: dict[str, Any], authorization: str | None = None
    ) -> tuple[int, bytes]:
        """A non-streamed request: the upstream's status and JSON body, errors converted."""
        url = self.base_url + path
        try:
            async with self._client.stream(
                "POST", url, content=orjson.dumps(body), headers=self._headers(authorization)
            ) as response:
                received = bytearray()
                async for piece in response.aiter_bytes():
                    received += piece
                    if len(received) > MAX_JSON_BODY:
                        raise GatewayError(
                            502, "the upstream reply is too large", type="upstream_error"
                        )
                content = bytes(received)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url) from exc
        if response.status_code != 200:
            raise _upstream_error(
                response.status_code, content[:MAX_ERROR_BODY], response.reason_phrase
            )
        return response.status_code, content

    async def open_stream(
        self, path: str, body: dict[str, Any], authorization: str | None = None
    ) -> UpstreamStream:
        """Send a streamed request and wait for the response head.

        Raises `GatewayError` with the upstream's status and error when it does not
        answer 200 with an event stream: the client then gets an HTTP error, not a stream.
        """
        url = self.base_url + path
        request = httpx.Request(
            "POST",
            self._parsed_url(url),
            content=orjson.dumps(body),
            headers={**self._headers(authorization), "content-type": "application/json"},
            extensions={"timeout": self._timeout.as_dict()},
        )
        try:
            # Straight to the transport (httpx's connection pool): the client layer adds
            # auth flows, redirects and a cookie jar parse per response, none of which a
            # relay wants, and costs more CPU than the relaying itself on the path to the
            # first token.
            response = await self._transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url) from exc
        response.request = request
        try:
            content_type = response.headers.get("content-type", "")
            if response.status_code != 200:
                content = await _read_some(response)
                raise _upstream_error(response.status_code, content, response.reason_phrase)
            if not content_type.startswith("text/event-stream"):
                content = await _read_some(response)
                inner = _upstream_error(502, content, "Bad Gateway")
                raise GatewayError(
                    502,
                    f"the upstream answered {content_type or 'no content type'} instead of "
                    f"an event stream ({inner.message})",
                    type="upstream_error",
                    code=502,
                )
        except BaseException:
            await response.aclose()
            raise
        return UpstreamStream(response)

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._transport.aclose()


async def _read_some(response: httpx.Response) -> bytes:
    content = b""
    try:
        async for piece in response.aiter_bytes():
            content += piece
            if len(content) >= MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass
    return content[:MAX_ERROR_BODY]

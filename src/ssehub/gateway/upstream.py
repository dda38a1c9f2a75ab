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

import orjson

from ssehub.gateway import http1
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


def _transport_error(exc: http1.HTTPError, url: str) -> GatewayError:
    if isinstance(exc, http1.Timeout):
        return GatewayError(
            504, f"upstream timed out: {url} ({exc})", type="upstream_error", code=504
        )
    if isinstance(exc, http1.ProxyError):
        # The proxy's fault, in its words (`exc` names the proxy and what it answered).
        return GatewayError(502, str(exc), type="upstream_error", code=502)
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

    def __init__(self, response: http1.Response) -> None:
        self._response = response

    async def data(self) -> AsyncGenerator[list[str], None]:
        """The `data` of each message event, in batches of one network read each."""
        decoder = Decoder()
        receive = self._response.receive
        try:
            while raw := await receive():
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
        except http1.HTTPError as exc:
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
        self,
        upstream: Upstream,
        head: asyncio.Future[http1.Response],
        completion_id: str,
        tally: Tally,
    ) -> None:
        self._head = head
        self._batches = self._relay(upstream, completion_id, tally)

    async def _relay(
        self, upstream: Upstream, completion_id: str, tally: Tally
    ) -> AsyncGenerator[list[str], None]:
        try:
            stream = await upstream.checked(self._head)
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
        head = self._head
        if not head.done():
            head.cancel()  # closes the connection
        elif not head.cancelled() and head.exception() is None:
            head.result().close()  # a no-op when it was read to its end


class Upstream:
    """An OpenAI-compatible API at `base_url` (the part before `/chat/completions`),
    reached through `proxy` (`http://[user:pass@]host:port`) when given, else through the
    proxy the environment names for it (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY).

    Raises `ValueError` for a proxy that cannot be used: a bad setting is an error at
    startup, not at the first request.
    """

    def __init__(self, base_url: str, api_key: str | None = None, proxy: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        proxies = http1.Proxies(http1.Proxy.parse(proxy)) if proxy else http1.Proxies.from_environ()
        self._pool = http1.Pool(http1.Timeouts(connect=10.0, read=600.0), proxies=proxies)
        self._targets: dict[str, http1.Target] = {}
        try:
            base = http1.Target.parse(self.base_url)
        except ValueError:
            return  # each request answers 502 with what is wrong with the URL
        try:
            # Every request goes to this origin: its proxy is decided once, now.
            self._pool.proxy_for(base)
        except ValueError as exc:
            raise ValueError(
                f"{exc} (give --upstream-proxy, or exclude the upstream's host with NO_PROXY)"
            ) from None

    def _target(self, url: str) -> http1.Target:
        target = self._targets.get(url)
        if target is None:
            try:
                target = self._targets[url] = http1.Target.parse(url)
            except ValueError as exc:
                raise GatewayError(
                    502, f"bad upstream URL {url!r}: {exc}", type="upstream_error", code=502
                ) from exc
        return target

    def _headers(self, authorization: str | None, json_body: bool = False) -> dict[str, str]:
        headers = {
            "accept": "text/event-stream, application/json",
            # Bodies are relayed as they come: no compressed ones to undo.
            "accept-encoding": "identity",
            "user-agent": "ssehub-gateway",
        }
        if json_body:
            headers["content-type"] = "application/json"
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        elif authorization:
            # No key configured: each client brings its own.
            headers["authorization"] = authorization
        return headers

    async def _request(
        self, method: str, url: str, authorization: str | None, body: bytes = b""
    ) -> http1.Response:
        try:
            return await self._pool.request(
                method, self._target(url), self._headers(authorization, bool(body)), body
            )
        except http1.HTTPError as exc:
            raise _transport_error(exc, url) from exc

    async def models(self, authorization: str | None = None) -> list[dict[str, Any]]:
        """The upstream's model list; raises `GatewayError` when it cannot be had."""
        url = f"{self.base_url}/models"
        response = await self._request("GET", url, authorization)
        content = await _read(response, MAX_JSON_BODY, url)
        if response.status_code != 200:
            raise _upstream_error(
                response.status_code, content[:MAX_ERROR_BODY], response.reason_phrase
            )
        try:
            data = orjson.loads(content).get("data")
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
        response = await self._request("POST", url, authorization, orjson.dumps(body))
        content = await _read(response, MAX_JSON_BODY + 1, url)
        if len(content) > MAX_JSON_BODY:
            raise GatewayError(502, "the upstream reply is too large", type="upstream_error")
        if response.status_code != 200:
            raise _upstream_error(
                response.status_code, content[:MAX_ERROR_BODY], response.reason_phrase
            )
        return response.status_code, content

    async def send_stream(
        self, path: str, body: dict[str, Any], authorization: str | None = None
    ) -> asyncio.Future[http1.Response]:
        """Send a streamed request; the future resolves to the response head.

        Returns once the request is written (raises `GatewayError` when the upstream
        cannot be reached). Cancelling the future closes the connection.
        """
        url = self.base_url + path
        try:
            return await self._pool.send(
                "POST", self._target(url), self._headers(authorization, True), orjson.dumps(body)
            )
        except http1.HTTPError as exc:
            raise _transport_error(exc, url) from exc

    async def checked(self, head: asyncio.Future[http1.Response]) -> UpstreamStream:
        """The stream of a response that answered 200 with an event stream.

        Raises `GatewayError` with the upstream's status and error otherwise: the client
        then gets an HTTP error, not a stream.
        """
        try:
            response = await head
        except http1.HTTPError as exc:
            raise _transport_error(exc, self.base_url) from exc
        except BaseException:
            head.cancel()
            raise
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
            response.close()
            raise
        return UpstreamStream(response)

    async def open_stream(
        self, path: str, body: dict[str, Any], authorization: str | None = None
    ) -> UpstreamStream:
        """Send a streamed request and wait for the response head (see `checked`)."""
        return await self.checked(await self.send_stream(path, body, authorization))

    async def aclose(self) -> None:
        await self._pool.aclose()


async def _read(response: http1.Response, limit: int, url: str) -> bytes:
    try:
        return await response.read(limit)
    except http1.HTTPError as exc:
        raise _transport_error(exc, url) from exc


async def _read_some(response: http1.Response) -> bytes:
    """Up to `MAX_ERROR_BODY` of an error body; what came before a failure is enough."""
    content = bytearray()
    try:
        while len(content) < MAX_ERROR_BODY and (piece := await response.receive()):
            content += piece
    except http1.HTTPError:
        pass
    return bytes(content[:MAX_ERROR_BODY])

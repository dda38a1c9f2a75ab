"""What an event source remembers across connections; no I/O, shared by sync and async.

The I/O layers (`_sync.py`, `_async.py`) send the request this builds, hand the response
and its bytes back here, and sleep for as long as this says between connections.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import orjson

from ssehub.client._errors import (
    BODY_SNIPPET_CHARS,
    ConnectionLost,
    ContentTypeError,
    HTTPStatusError,
    IdleTimeout,
    ResponseError,
    SSEError,
)
from ssehub.client._reconnect import Reconnect
from ssehub.protocol import DEFAULT_MAX_EVENT_SIZE, Decoder, ServerSentEvent

logger = logging.getLogger("ssehub.client")

HeaderTypes = Mapping[str, str] | Sequence[tuple[str, str]]

# Bytes of a non-stream body read for the error message: bounded, because a wrong answer
# may itself be endless.
BODY_SNIPPET_BYTES = 4 * BODY_SNIPPET_CHARS


class Verdict(enum.Enum):
    """What to do with a response, from its status line and headers alone."""

    STREAM = "stream"  # 2xx text/event-stream: read events
    STOP = "stop"  # 204: the server asks the client to stop (WHATWG HTML 9.2.3)
    ERROR = "error"  # anything else: read a body snippet, then `response_error()`


class SourceState:
    """The request to (re)send and what the stream has told us so far."""

    def __init__(
        self,
        url: httpx.URL | str,
        *,
        method: str,
        params: Mapping[str, Any] | None,
        headers: HeaderTypes | None,
        json: Any,
        content: bytes | str | None,
        last_event_id: str | None,
        reconnect: bool | Reconnect,
        idle_timeout: float | None,
        timeout: float | None,
        max_event_size: int | None,
    ) -> None:
        if json is not None and content is not None:
            raise TypeError("pass json= or content=, not both")
        self.method = method.upper()
        self.url = httpx.URL(url)  # a malformed URL fails here, not in the first iteration
        self.params = params
        self.headers = httpx.Headers(headers)
        if last_event_id is None:
            # A `Last-Event-ID` among the headers is a starting id given another way.
            last_event_id = self.headers.get("Last-Event-ID")
        if json is not None:
            # Serialized once: a reconnection re-sends the very same bytes.
            self.content: bytes | None = orjson.dumps(json)
            self.headers.setdefault("Content-Type", "application/json")
        else:
            self.content = content.encode() if isinstance(content, str) else content
        self.headers.setdefault("Accept", "text/event-stream")
        # The spec fetches with cache mode "no-store" (WHATWG HTML 9.2.2).
        self.headers.setdefault("Cache-Control", "no-store")
        self.reconnect: Reconnect | None = Reconnect() if reconnect is True else (reconnect or None)
        self.idle_timeout = idle_timeout
        self.timeout = httpx.Timeout(timeout, read=idle_timeout)
        # One decoder for every connection: `close()` between connections discards a
        # half-received event but keeps the last event ID and the reconnection time, and
        # events after a reconnection carry the id the client resumed from, as in browsers.
        # It rejects an id with CR, LF or NUL, which no stream can produce.
        self.decoder = Decoder(
            DEFAULT_MAX_EVENT_SIZE if max_event_size is None else max_event_size,
            last_event_id=last_event_id or "",
        )
        # The last event ID string as of the event being handed out (the decoder's runs
        # ahead to the end of the chunk it was fed).
        self.last_event_id = self.decoder.last_event_id
        self.retry: int | None = None
        self.failures = 0
        self._received = False
        # Where to resume a non-GET request's stream, when its response said so.
        self.stream_url: httpx.URL | None = None

    # -- one connection ----------------------------------------------------------------

    def build_request(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        """The request for the next connection, carrying `Last-Event-ID` when there is one."""
        raw = [(k, v) for k, v in self.headers.raw if k.lower() != b"last-event-id"]
        if self.last_event_id:
            # Sent as UTF-8 (WHATWG HTML 9.2.3 "reestablish the connection"); an httpx str
            # header would have to be ASCII.
            raw.append((b"Last-Event-ID", self.last_event_id.encode()))
        if self.stream_url is not None:
            raw = [(k, v) for k, v in raw if k.lower() != b"content-type"]
            return client.build_request("GET", self.stream_url, headers=raw, timeout=self.timeout)
        return client.build_request(
            self.method,
            self.url,
            params=self.params,
            headers=raw,
            content=self.content,
            timeout=self.timeout,
        )

    def verdict(self, response: httpx.Response) -> Verdict:
        if response.status_code == 204:
            logger.info("%s %s: 204, no more events", response.request.method, response.request.url)
            return Verdict.STOP
        if response.is_success and _is_event_stream(response):
            return Verdict.STREAM
        return Verdict.ERROR

    def response_error(self, response: httpx.Response, body: bytes) -> ResponseError:
        """The exception for a response that is not an event stream (`body`: its start)."""
        snippet = body.decode("utf-8", "replace").strip()[:BODY_SNIPPET_CHARS]
        content_type = response.headers.get("Content-Type", "")
        request = response.request
        where = f"{request.method} {request.url}"
        status = f"{response.status_code} {response.reason_phrase}".strip()
        one_line = " ".join(snippet.split())
        if not response.is_success:
            cls: type[ResponseError] = HTTPStatusError
            message = f"{where} answered {status}"
        else:
            cls = ContentTypeError
            message = (
                f"{where} answered {status} with Content-Type {content_type or '(none)'!r}, "
                "not text/event-stream"
            )
        if one_line:
            message += f": {one_line}"
        return cls(
            message,
            method=request.method,
            url=str(request.url),
            status_code=response.status_code,
            reason=response.reason_phrase,
            content_type=content_type,
            body=snippet,
        )

    def transport_error(self, exc: httpx.RequestError) -> SSEError:
        """The exception for a failed connection; raises when trying again cannot help."""
        if _has_request(exc):
            where = f"{exc.request.method} {exc.request.url}"
        else:
            where = f"{self.method} {self.url}"
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.TooManyRedirects):
            raise SSEError(f"{where}: {_describe(exc)}") from exc
        if isinstance(exc, httpx.ReadTimeout):
            error: SSEError = IdleTimeout(
                f"{where}: no data for {self.idle_timeout:g}s (idle timeout)"
            )
        else:
            error = ConnectionLost(f"{where}: {_describe(exc)}")
        error.__cause__ = exc
        return error

    def connected(self, response: httpx.Response) -> Decoder:
        """`response` is an event stream: the decoder to feed its bytes to."""
        self._received = False
        logger.info(
            "connected: %s %s (%d %s)",
            response.request.method,
            response.request.url,
            response.status_code,
            response.reason_phrase,
        )
        location = response.headers.get("Content-Location")
        if location and self.method != "GET" and self.stream_url is None:
            # The server names the stream this request started (RFC 9110 8.7: the resource
            # this response is a representation of): resume it there with a GET rather
            # than sending the request, and starting its work, again.
            self.stream_url = response.request.url.join(location)
        return self.decoder

    def received(self) -> None:
        """Bytes arrived and went through the decoder: the connection is alive and useful."""
        self._received = True
        if self.decoder.retry is not None:
            self.retry = self.decoder.retry

    def deliver(self, events: list[ServerSentEvent]) -> Iterator[ServerSentEvent]:
        """`events`, keeping `last_event_id` that of the event in hand."""
        for event in events:
            self.last_event_id = event.id or ""
            yield event
        self.last_event_id = self.decoder.last_event_id

    # -- between connections -----------------------------------------------------------

    def failed(self, error: SSEError, level: int = logging.WARNING) -> float:
        """The connection failed with `error`: seconds to wait, or raise `error`."""
        if isinstance(error, ResponseError) and (
            self.reconnect is None or error.status_code not in self.reconnect.retry_statuses
        ):
            raise error
        if self._received:
            self.failures = 0
        self._received = False
        self.failures += 1
        if self.reconnect is None:
            raise error
        if self.reconnect.gives_up(self.failures):
            if self.failures > 1:
                error.add_note(f"gave up after {self.failures} attempts in a row")
            raise error
        delay = self.reconnect.wait(self.failures - 1, self.retry)
        attempts = self.reconnect.max_attempts
        logger.log(
            level,
            "%s; reconnecting in %.1fs (attempt %d%s)",
            error,
            delay,
            self.failures,
            "" if attempts is None else f"/{attempts}",
        )
        return delay

    def ended(self) -> float | None:
        """The server ended the stream: seconds to wait before reconnecting, or None to stop.

        GET reconnects, as EventSource does (WHATWG HTML 9.2.3): servers and proxies end
        long streams, and a server that means "stop" answers 204. Other methods stop, as
        fetch-event-source does: a POST usually starts work that the end of its stream
        completes, and sending it again would start that work over.
        """
        if self.reconnect is None or self.method != "GET":
            return None
        if self._received:
            # The usual life of a long stream, not a failure worth a warning.
            error = ConnectionLost(f"{self.method} {self.url}: the server ended the stream")
            return self.failed(error, logging.INFO)
        error = ConnectionLost(
            f"{self.method} {self.url}: the server ended the stream without sending anything"
        )
        return self.failed(error)


def _is_event_stream(response: httpx.Response) -> bool:
    # MIME type parameters (charset) are ignored (WHATWG HTML 9.2.3).
    media_type: str = response.headers.get("Content-Type", "").split(";", 1)[0]
    return media_type.strip().lower() == "text/event-stream"


def _has_request(exc: httpx.RequestError) -> bool:
    try:
        exc.request  # noqa: B018 - raises RuntimeError when httpx did not attach one
    except RuntimeError:
        return False
    return True


def _describe(exc: httpx.RequestError) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())

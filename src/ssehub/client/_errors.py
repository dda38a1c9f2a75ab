"""What the client raises. Everything derives from `SSEError`, so one `except` catches all."""

from __future__ import annotations

from typing import Any

from ssehub.protocol import ServerSentEvent

# Enough of an error page to see what went wrong, small enough for one log line.
BODY_SNIPPET_CHARS = 500


class SSEError(Exception):
    """Base class of every error the ssehub client raises."""


class ResponseError(SSEError):
    """The server answered, but not with an event stream.

    `status_code`, `reason`, `method`, `url`, `content_type` describe the response;
    `body` holds the first characters of its body (at most `BODY_SNIPPET_CHARS`).
    """

    def __init__(
        self,
        message: str,
        *,
        method: str,
        url: str,
        status_code: int,
        reason: str,
        content_type: str,
        body: str,
    ) -> None:
        super().__init__(message)
        self.method = method
        self.url = url
        self.status_code = status_code
        self.reason = reason
        self.content_type = content_type
        self.body = body


class HTTPStatusError(ResponseError):
    """The server answered with a status outside 2xx."""


class ContentTypeError(ResponseError):
    """The server answered 2xx with a Content-Type other than `text/event-stream`."""


class ConnectionLost(SSEError):
    """The connection failed or broke; `__cause__` holds the transport error.

    Raised when reconnecting is off or has used up its attempts.
    """


class IdleTimeout(ConnectionLost):
    """No byte arrived for `idle_timeout` seconds (heartbeat comments count as bytes)."""


class EventError(SSEError):
    """The stream reported an error in-band (`event: error`, or `{"error": ...}` data).

    `event` is the event that carried it; `error` its decoded payload (the value of the
    `"error"` key when there is one, else the whole JSON value, else the raw data string).
    """

    def __init__(self, message: str, *, event: ServerSentEvent, error: Any) -> None:
        super().__init__(message)
        self.event = event
        self.error = error


class InvalidJSON(SSEError, ValueError):
    """An event's data is not valid JSON; `event` is the event."""

    def __init__(self, message: str, *, event: ServerSentEvent) -> None:
        super().__init__(message)
        self.event = event

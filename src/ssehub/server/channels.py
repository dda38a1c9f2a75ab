"""`/channels/{name}`: GET subscribes (SSE), POST publishes, DELETE closes.

GET is a plain ASGI handler rather than a Starlette endpoint: the subscriber's `send` is
driven by the channel pump, and the handler's task only waits for the client to leave, so
an idle connection costs that one suspended task and a small `Subscriber`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ssehub.broker import BrokerUnavailable, StreamClosed, parse_id
from ssehub.server.fanout import Subscriber
from ssehub.server.hub import CHANNEL_NAME, Hub, InvalidEvent

logger = logging.getLogger("ssehub.server")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # nginx buffers proxied responses unless told not to.
    (b"x-accel-buffering", b"no"),
]


class RequestError(Exception):
    """A client error answered with a JSON body `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> Response:
        return JSONResponse({"error": self.message}, status_code=self.status)


def check_bearer(headers: Headers, token: str | None, what: str) -> None:
    """Raise 401 unless `token` is unset or given as `Authorization: Bearer <token>`."""
    if token is None:
        return
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise RequestError(401, f"{what} needs 'Authorization: Bearer <token>'")


async def read_body(receive: Receive, headers: Headers, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed `limit` bytes."""
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(413, f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_events(body: bytes, content_type: str) -> list[Any]:
    """What a POST body publishes: raw text is one `message`; JSON is an event or a list."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise RequestError(400, "body is not UTF-8") from None
    if content_type.split(";")[0].strip().lower() != "application/json":
        return [text]
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise RequestError(400, f"body is not valid JSON: {exc}") from None
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, dict | str):
                raise RequestError(400, "a batch is a list of event objects or strings")
        return value
    raise RequestError(400, 'JSON body must be an object {"data": ..., "event": ...} or a list')


def error_response(exc: RequestError | BrokerUnavailable) -> Response:
    if isinstance(exc, RequestError):
        return exc.response()
    return JSONResponse({"error": "broker unavailable, retry later"}, 503)


async def join(hub: Hub, sub: Subscriber, cursor: str | None, from_oldest: bool) -> None:
    """`hub.attach` for a subscription whose response head is out."""
    try:
        await hub.attach(sub, cursor, from_oldest)
    except BrokerUnavailable:
        # Headers are out: end the stream; the client reconnects and resumes.
        logger.warning("broker unavailable while subscriber %s joined", sub.id)
        hub.drop(sub, "broker unavailable")


class ChannelEndpoint:
    """The ASGI app behind `/channels/{name:path}`."""

    def __init__(
        self, hub: Hub, *, publish_token: str | None = None, max_body: int = 1_048_576
    ) -> None:
        self.hub = hub
        self.publish_token = publish_token
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name: str = scope["path_params"]["name"]
        method = scope["method"]
        try:
            if not CHANNEL_NAME.match(name):
                raise RequestError(
                    400, "channel names are 1-200 characters of letters, digits and _ - . : @ /"
                )
            if method in ("GET", "HEAD"):
                await self.subscribe(name, scope, receive, send)
                return
            headers = Headers(scope=scope)
            if method == "POST":
                check_bearer(headers, self.publish_token, "publishing")
                response = await self.publish(name, headers, receive)
            elif method == "DELETE":
                check_bearer(headers, self.publish_token, "closing a channel")
                closed_id = await self.hub.close_channel(name)
                response = JSONResponse({"channel": name, "closed": True, "id": closed_id})
            else:
                response = JSONResponse(
                    {"error": f"method {method} not allowed"},
                    status_code=405,
                    headers={"allow": "GET, POST, DELETE"},
                )
        except (RequestError, BrokerUnavailable) as exc:
            response = error_response(exc)
        await response(scope, receive, send)

    async def publish(self, name: str, headers: Headers, receive: Receive) -> Response:
        body = await read_body(receive, headers, self.max_body)
        events = parse_events(body, headers.get("content-type", ""))
        try:
            ids = await self.hub.publish_batch(name, events)
        except InvalidEvent as exc:
            raise RequestError(400, str(exc)) from None
        except StreamClosed:
            raise RequestError(409, f"channel {name!r} is closed") from None
        return JSONResponse({"channel": name, "ids": ids})

    async def subscribe(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        start = await self.opening(
            name, Headers(scope=scope), QueryParams(scope.get("query_string", b""))
        )
        if start is None:
            # 204 tells an EventSource to stop reconnecting (WHATWG HTML 9.2.3).
            await Response(status_code=204)(scope, receive, send)
            return
        cursor, from_oldest, user_agent = start
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else ""
        hub = self.hub
        sub = hub.new_subscriber(name, send, peer, user_agent)
        # This frame lives as long as the connection: keep its locals few.
        del start, client, peer, user_agent, scope
        try:
            await join(hub, sub, cursor, from_oldest)
            del cursor
            # The pump writes; this task only learns when the client leaves or the
            # response was completed (uvicorn then answers `http.disconnect`).
            while (await receive())["type"] != "http.disconnect":
                pass
        except asyncio.CancelledError:
            task = asyncio.current_task()
            # Cancelled by the hub (abort of a stuck client) or by the server's graceful
            # shutdown timeout: either way this stream is over, quietly.
            if sub.reason is None and not hub.shutting_down.is_set():
                raise
            if task is not None:
                task.uncancel()
        finally:
            hub.detach(sub)

    async def opening(
        self, name: str, headers: Headers, query: QueryParams
    ) -> tuple[str | None, bool, str] | None:
        """(cursor, from oldest, user agent) for a subscription; None: answer 204.

        Raises `RequestError` or `BrokerUnavailable` (see `error_response`)."""
        # The header wins: a browser reconnecting sends it, with the original URL's query.
        cursor = headers.get("last-event-id") or query.get("last_event_id") or None
        start = query.get("from")
        if start not in (None, "oldest"):
            raise RequestError(400, "'from' accepts only 'oldest'")
        from_oldest = start == "oldest" and cursor is None
        if self.hub.shutting_down.is_set():
            raise RequestError(503, "server is shutting down")
        info = await self.hub.channel_info(name)
        if info is not None and info.closed:
            key = parse_id(cursor) if cursor else None
            last = parse_id(info.last_id) if info.last_id else None
            if (cursor is None and not from_oldest) or (key and last and key >= last):
                return None
        if cursor is None and not from_oldest:
            # "From now" is fixed here, before the headers go out: a client that publishes
            # once it sees them must get that event, however long joining takes (with
            # Redis, the join's own reads are network round trips).
            if info is None or info.last_id is None:
                from_oldest = True
            else:
                cursor = info.last_id
        return cursor, from_oldest, headers.get("user-agent", "")


class ChannelStreamResponse(Response):
    """A subscription to `channel` answered from your own route (your auth, your URL).

    Behaves exactly as `GET /channels/{channel}`: replay by `Last-Event-ID` or
    `?last_event_id=`, `?from=oldest`, `ssehub.gap`, heartbeats, `close`, 204 once closed,
    and the connection is in the Hub's registry.
    """

    def __init__(self, hub: Hub, channel: str) -> None:
        self.hub = hub
        self.channel = channel
        self.status_code = 200
        self.background = None
        self.init_headers(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ChannelEndpoint(self.hub)
        try:
            if not CHANNEL_NAME.match(self.channel):
                raise RequestError(400, f"bad channel name {self.channel!r}")
            await endpoint.subscribe(self.channel, scope, receive, send)
        except RequestError as exc:
            await exc.response()(scope, receive, send)

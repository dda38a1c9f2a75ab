"""Subscriptions served by uvicorn's httptools protocol without ASGI (`ssehub serve`).

Through ASGI an idle SSE connection keeps uvicorn's request machinery alive for as long
as it lasts: the protocol with its parser, the request cycle, scope and headers, three
deques behind asyncio Events and the pipeline, the request's task and its frames; about
8 of ssehub's 11 KB per idle connection (docs/benchmarks.md). `HubHttpProtocol` is
uvicorn's protocol except for `GET /channels/{name}` to the app `create_app` made (no
user middleware): once the head is parsed, the connection's transport is handed to a
`Subscription`, a small slotted protocol. It answers the request itself (same status and
headers as the ASGI path) and gives the Hub the `cycle` its pump writes to; what the
connection was for uvicorn is garbage. An idle subscription then costs the transport,
a `Subscription` and a `Subscriber`, and no task: replay runs in a task that ends once
the subscriber is live, and a disconnect is `connection_lost`. When the stream ends
the connection goes back to a fresh `HubHttpProtocol` (keep-alive), unless the client
sent more bytes meanwhile (a pipelined request nobody will answer): then it is closed,
and the client retries it (RFC 9112, 9.3.2).

Anything else, and a subscription that is not plain (a body, HTTP/1.0, an upgrade, a
head that is not alone in its read: pipelining), takes uvicorn's ASGI path unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httptools
from starlette.datastructures import Headers, QueryParams
from starlette.responses import Response
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ssehub.broker import BrokerUnavailable
from ssehub.server.app import HubApp
from ssehub.server.channels import (
    SSE_HEADERS,
    ChannelEndpoint,
    RequestError,
    error_response,
    join,
)
from ssehub.server.fanout import Subscriber, chunk
from ssehub.server.hub import CHANNEL_NAME, Hub

logger = logging.getLogger("ssehub.server")
access_logger = logging.getLogger("uvicorn.access")

_STREAM_HEADERS = [*SSE_HEADERS, (b"transfer-encoding", b"chunked")]
_LAST_CHUNK = b"0\r\n\r\n"
_CHANNELS = "/channels/"


@dataclass(frozen=True, slots=True)
class Request:
    """What a subscription needs of its request until its response head is out."""

    headers: Headers
    query: QueryParams
    peer: str  # "host:port", as uvicorn's ProxyHeadersMiddleware sets the scope's client
    url: bytes  # the request target, for the access log


# The uvicorn releases whose httptools protocol internals HubHttpProtocol was checked
# against (the hooks it overrides and the attributes it reads are not public API).
TESTED_UVICORN = ("0.54",)


def http_protocol() -> type[asyncio.Protocol] | str:
    """What `ssehub serve` gives uvicorn as `http`: HubHttpProtocol on a tested uvicorn,
    else uvicorn's own protocol (every subscription then goes through ASGI: correct, but
    ~11 KB per idle connection instead of ~2.5 KB)."""
    import uvicorn

    if uvicorn.__version__.startswith(tuple(v + "." for v in TESTED_UVICORN)):
        return HubHttpProtocol
    logger.warning(
        "uvicorn %s is not one ssehub's connection protocol was tested with (%s): "
        "subscriptions go through ASGI and take more memory",
        uvicorn.__version__,
        ", ".join(TESTED_UVICORN),
    )
    return "httptools"


class HubHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, handing plain subscriptions to a `Subscription`.

    Pass it as `uvicorn.Config(http=HubHttpProtocol)` / `uvicorn.run(..., http=...)`.
    """

    # The read being parsed ends with the first request head in it: a subscription in it
    # can be handed over with no bytes of a next request left in this parser.
    read_is_one_head = False
    # Set once the transport belongs to a `Subscription` (the parser still calls
    # `on_message_complete` for the request it just handed over).
    handed_to: Subscription | None = None

    def data_received(self, data: bytes) -> None:
        self.read_is_one_head = data.find(b"\r\n\r\n") == len(data) - 4
        super().data_received(data)

    def on_headers_complete(self) -> None:
        target = self._subscription() if self.read_is_one_head else None
        if target is None:
            super().on_headers_complete()
            return
        endpoint, name, query = target
        conn = Subscription(self, endpoint.hub)
        self.handed_to = conn
        self.connections.discard(self)
        self.connections.add(conn)  # type: ignore[arg-type]  # uvicorn only calls .shutdown()
        self.transport.set_protocol(conn)
        request = Request(Headers(raw=self.headers), QueryParams(query), self.peer(), self.url)
        conn.task = endpoint.hub.spawn(conn.serve(endpoint, name, request))

    def on_message_complete(self) -> None:
        if self.handed_to is None:
            super().on_message_complete()

    def _subscription(self) -> tuple[ChannelEndpoint, str, bytes] | None:
        """(endpoint, channel, query) when this request is a plain subscription."""
        parser = self.parser
        if (
            parser.get_method() != b"GET"
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
            or (self.cycle is not None and not self.cycle.response_complete)
            or self.limit_concurrency is not None
        ):
            return None
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return None
        app = self.app
        if isinstance(app, ProxyHeadersMiddleware):
            app = app.app
        if not isinstance(app, HubApp) or app.user_middleware:
            return None
        url = httptools.parse_url(self.url)
        path = url.path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        if not path.startswith(_CHANNELS):
            return None
        channel = path[len(_CHANNELS) :]
        if not CHANNEL_NAME.match(channel):
            return None  # the ASGI path answers 400
        return app.channels, channel, url.query or b""

    def peer(self) -> str:
        """The client as uvicorn's ProxyHeadersMiddleware would put it in the scope."""
        client = self.client
        app = self.app
        if client and isinstance(app, ProxyHeadersMiddleware) and client[0] in app.trusted_hosts:
            forwarded = [v for n, v in self.headers if n == b"x-forwarded-for"]
            if forwarded:
                host, port = app.trusted_hosts.get_trusted_client_address(
                    b", ".join(forwarded).decode("latin1")
                )
                if host:
                    client = (host, port)
        return f"{client[0]}:{client[1]}" if client else ""


class Subscription(asyncio.Protocol):
    """One subscription's connection after `HubHttpProtocol` handed it over.

    Also the `cycle` of its `Subscriber` (`transport`, `flow.write_paused`,
    `disconnected`, as on uvicorn's request cycle), and `send` finishes the writes the
    pump could not make directly (a paused transport, the end of the body).
    """

    __slots__ = (
        "app_state",
        "config",
        "disconnected",
        "drained",
        "flow",
        "hub",
        "keep_alive",
        "server_state",
        "sub",
        "task",
        "transport",
        "write_paused",
    )

    def __init__(self, origin: HubHttpProtocol, hub: Hub) -> None:
        self.transport: asyncio.Transport = origin.transport
        # What a fresh HubHttpProtocol needs when the connection is handed back (shared).
        self.config = origin.config
        self.server_state = origin.server_state
        self.app_state = origin.app_state
        self.hub = hub
        self.flow = self  # the Subscriber reads `cycle.flow.write_paused`
        self.write_paused = origin.flow.write_paused
        self.disconnected = False
        self.keep_alive = origin.parser.should_keep_alive()
        self.drained: asyncio.Future[None] | None = None
        self.sub: Subscriber | None = None
        self.task: asyncio.Task[None] | None = None

    async def serve(self, endpoint: ChannelEndpoint, name: str, request: Request) -> None:
        """Answer the subscription and join the channel; the task ends once it is live."""
        hub = self.hub
        sub = None
        try:
            try:
                start = await endpoint.opening(name, request.headers, request.query)
            except (RequestError, BrokerUnavailable) as exc:
                self.respond(error_response(exc), request)
                return
            if start is None:
                # 204 tells an EventSource to stop reconnecting (WHATWG HTML 9.2.3).
                self.respond(Response(status_code=204), request)
                return
            cursor, from_oldest, user_agent = start
            self.write_head(200, _STREAM_HEADERS, request)
            sub = self.sub = hub.new_subscriber(
                name, self.send, request.peer, user_agent, cycle=self
            )
            # Stuck writes are aborted at the transport (`Hub.drop`), never by cancelling
            # this task, and a finished task kept by each subscriber costs ~600 bytes.
            sub.task = None
            del start, request
            await join(hub, sub, cursor, from_oldest)
        finally:
            self.task = None
            if self.disconnected and sub is not None:
                hub.detach(sub)

    # -- writing ----------------------------------------------------------------------

    def write_head(self, status: int, headers: list[tuple[bytes, bytes]], request: Request) -> None:
        """The status line and headers as uvicorn's cycle writes them."""
        if self.disconnected:
            return
        lines = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers]:
            lines += [name, b": ", value, b"\r\n"]
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines))
        if access_logger.hasHandlers():
            # uvicorn's access log line, with the five arguments its formatter unpacks.
            url = request.url.decode("latin1")
            access_logger.info('%s - "%s %s HTTP/%s" %d', request.peer, "GET", url, "1.1", status)

    def respond(self, response: Response, request: Request) -> None:
        """A whole response (an error, 204), then the connection is uvicorn's again."""
        self.write_head(response.status_code, response.raw_headers, request)
        if response.body and not self.disconnected:
            self.transport.write(response.body)
        self.finish()

    async def send(self, message: dict[str, Any]) -> None:
        """An ASGI body message, written once the transport takes writes again."""
        while self.write_paused and not self.disconnected:
            if self.drained is None or self.drained.done():
                self.drained = asyncio.get_running_loop().create_future()
            await self.drained
        if self.disconnected:
            return
        more = message.get("more_body", False)
        self.transport.write(chunk(message.get("body", b"")) + (b"" if more else _LAST_CHUNK))
        if not more:
            self.finish()

    def finish(self) -> None:
        """The response is complete: forget the subscriber, hand the connection back."""
        if self.sub is not None:
            self.hub.detach(self.sub)
            self.sub = None
        self.server_state.connections.discard(self)
        transport = self.transport
        if self.disconnected or transport.is_closing():
            return
        if not self.keep_alive:
            transport.close()
            return
        protocol = HubHttpProtocol(self.config, self.server_state, self.app_state)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.on_response_complete()  # resumes reading, arms the keep-alive timeout

    # -- asyncio.Protocol -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # The client sent another request behind the subscription (pipelining): it is
        # not answered, so the connection closes when the stream ends.
        self.keep_alive = False

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected = True
        self.resume_writing()
        self.server_state.connections.discard(self)
        if self.task is not None:
            self.task.cancel()  # still joining: its `finally` detaches
        elif self.sub is not None:
            self.hub.detach(self.sub)
            self.sub = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: end the stream, then close the connection."""
        self.keep_alive = False
        if self.sub is not None:
            self.hub.drop(self.sub, "shutdown")
        elif self.task is None:
            self.transport.close()

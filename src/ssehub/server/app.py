"""`create_app`: the ssehub server as one Starlette app (channels, admin, jobs demo, ...).

The Hub is `app.state.hub`, the settings `app.state.settings`. Add routes to the list in
`create_app`; coroutines appended to `app.state.cleanups` run at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from types import FrameType
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from ssehub.broker import Broker, BrokerUnavailable, Retention
from ssehub.broker.memory import MemoryBroker
from ssehub.gateway import Gateway, gateway_routes
from ssehub.server.admin import admin_routes, answerer, node_connections
from ssehub.server.channels import ChannelEndpoint
from ssehub.server.hub import Hub
from ssehub.server.jobs import job_routes
from ssehub.server.metrics import make_registry
from ssehub.settings import Settings
from ssehub.web import routes as web_routes

logger = logging.getLogger("ssehub.server")

_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def make_broker(settings: Settings) -> Broker:
    """The broker `settings` ask for: Redis when `redis_url` is set, else process memory."""
    retention = Retention(max_len=settings.retention_count, max_age=settings.retention_seconds)
    if settings.redis_url:
        from ssehub.broker.redis import RedisBroker

        return RedisBroker(
            settings.redis_url, retention=retention, closed_ttl=settings.retention_seconds
        )
    return MemoryBroker(retention=retention, closed_ttl=settings.retention_seconds)


def make_hub(settings: Settings, broker: Broker) -> Hub:
    return Hub(
        broker,
        heartbeat=settings.heartbeat,
        max_pending=settings.max_pending,
        send_timeout=settings.send_timeout,
        closed_ttl=settings.retention_seconds,
    )


@contextlib.contextmanager
def ending_streams_on_signals(hub: Hub) -> Any:
    """On SIGINT/SIGTERM, end open streams at once, then let the server's own handler run.

    uvicorn drains connections before it runs the lifespan shutdown, so without this an
    SSE stream (which never ends by itself) would hold the shutdown for the whole grace
    period. The previous handler is chained, not replaced, and restored afterwards.
    Signals can only be handled in the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(hub.begin_shutdown)
        prev = previous.get(signum)
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_DFL and signum == signal.SIGINT:
            raise KeyboardInterrupt

    for sig in _SHUTDOWN_SIGNALS:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for signum, prev in previous.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, prev)


class HubApp(Starlette):
    """Starlette, with subscriptions handed straight to the channel endpoint.

    An idle subscription is a suspended task whose coroutine frames are the ASGI stack
    above it; skipping Starlette's middleware and router frames for `GET /channels/...`
    saves a few KB per connection. With user middleware added, every request takes the
    normal path, so the middleware sees subscriptions too.
    """

    channels: ChannelEndpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not self.user_middleware:
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            if path.startswith(_CHANNELS):
                scope["app"] = self
                scope["path_params"] = {"name": path[len(_CHANNELS) :]}
                await self.channels(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


_CHANNELS = "/channels/"


def create_app(settings: Settings | None = None, *, broker: Broker | None = None) -> Starlette:
    """The ssehub ASGI app. `broker` overrides the one `settings` would make (and is then
    not closed by the app)."""
    settings = settings or Settings()
    owns_broker = broker is None
    broker = broker if broker is not None else make_broker(settings)
    hub = make_hub(settings, broker)
    cleanups: list[Callable[[], Awaitable[None]]] = []
    # How the admin view of every process sharing the broker names this one; `/metrics`
    # and `/healthz` answer for the processes of its `node`.
    node = f"{socket.gethostname()}:{settings.port}"
    about = {"node": node, "pid": os.getpid()}

    async def healthz(request: Request) -> Response:
        # A broker that does not answer (Redis away) is "degraded", still HTTP 200: open
        # streams are kept and resume when it is back, and every node shares that Redis,
        # so a probe that restarted or evicted nodes for it would only cut connections.
        try:
            broker_ok = await asyncio.wait_for(broker.ping(), timeout=2.0)
        except TimeoutError:
            broker_ok = False
        # The node's connections (every worker's); this process's alone when the broker,
        # which carries the question, is away.
        connections = hub.stats().connections
        if broker_ok:
            with contextlib.suppress(BrokerUnavailable, TimeoutError):
                connections = await asyncio.wait_for(node_connections(hub, node), timeout=2.0)
        return JSONResponse(
            {
                "status": "ok" if broker_ok else "degraded",
                "broker": "ok" if broker_ok else "unavailable",
                "connections": connections,
            }
        )

    channels = ChannelEndpoint(
        hub, publish_token=settings.publish_token, max_body=settings.max_body
    )
    registry = make_registry(hub)
    gateway = Gateway(settings, broker, registry)
    cleanups.append(gateway.aclose)
    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/channels/{name:path}", channels, methods=["GET", "HEAD", "POST", "DELETE"]),
        *admin_routes(hub, settings.admin_token, registry, node=node, workers=settings.workers),
        *job_routes(hub, settings.publish_token, settings.max_body),
        *gateway_routes(),
        *web_routes(),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        await broker.join(answerer(hub, registry, node), about)
        try:
            with ending_streams_on_signals(hub):
                yield
        finally:
            hub.begin_shutdown()
            try:
                await broker.leave()
            except Exception:
                logger.exception("leaving the broker's members failed")
            for cleanup in reversed(cleanups):
                try:
                    await cleanup()
                except Exception:
                    logger.exception("cleanup %r failed", cleanup)
            await hub.stop()
            if owns_broker:
                await broker.aclose()

    app = HubApp(routes=routes, lifespan=lifespan)
    app.channels = channels
    app.state.hub = hub
    app.state.gateway = gateway
    app.state.settings = settings
    app.state.cleanups = cleanups
    return app


def create_app_from_env() -> Starlette:
    """`create_app` with settings from `SSEHUB_*` variables (uvicorn's factory for workers)."""
    from ssehub.cli.serve import settings_from_env

    return create_app(settings_from_env())

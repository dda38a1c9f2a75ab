"""`/admin/*`, `/metrics` and `/healthz`: the connection registry and the hub's health."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ssehub.server import metrics
from ssehub.server.channels import RequestError, check_bearer
from ssehub.server.hub import Hub

Endpoint = Callable[[Request], Awaitable[Response]]


def admin_routes(
    hub: Hub, admin_token: str | None, registry: CollectorRegistry | None = None
) -> list[BaseRoute]:
    # Others (the gateway) register their metrics in the same registry: one /metrics.
    registry = registry or metrics.make_registry(hub)

    def guarded(endpoint: Endpoint) -> Endpoint:
        async def checked(request: Request) -> Response:
            try:
                check_bearer(request.headers, admin_token, "admin endpoints")
            except RequestError as exc:
                return exc.response()
            return await endpoint(request)

        return checked

    async def list_connections(request: Request) -> Response:
        channel = request.query_params.get("channel")
        return JSONResponse(
            {"connections": [dataclasses.asdict(c) for c in hub.connections(channel)]}
        )

    async def close_connection(request: Request) -> Response:
        conn_id = request.path_params["id"]
        if not hub.disconnect(conn_id):
            return JSONResponse({"error": f"no connection {conn_id!r}"}, status_code=404)
        return JSONResponse({"id": conn_id, "disconnected": True})

    async def stats(request: Request) -> Response:
        return JSONResponse(dataclasses.asdict(hub.stats()))

    async def scrape(request: Request) -> Response:
        return Response(metrics.render(registry), media_type=metrics.CONTENT_TYPE)

    return [
        Route("/admin/connections", guarded(list_connections), methods=["GET"]),
        Route("/admin/connections/{id}", guarded(close_connection), methods=["DELETE"]),
        Route("/admin/stats", guarded(stats), methods=["GET"]),
        Route("/metrics", guarded(scrape), methods=["GET"]),
    ]

"""A minimal pub/sub hub written with sse-starlette, the way its users write one.

A peer for `bench/fanout.py`, not part of ssehub: one `asyncio.Queue` per subscriber,
publishing puts the event in every queue of the channel, each subscriber's generator
yields from its queue into `EventSourceResponse` (default settings: CRLF separators,
15 s pings). No replay, no bound on the queues.

    uvicorn --app-dir bench/peers sse_starlette_hub:app

- `GET /channels/{name}`: subscribe (SSE; each event has an `id:`).
- `POST /channels/{name}`: the raw body is the data of one event.
- `GET /stats`: `{"subscribers": <connected subscribers over all channels>}`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

channels: dict[str, set[asyncio.Queue[tuple[int, str]]]] = {}
ids = itertools.count(1)


async def subscribe(request: Request) -> EventSourceResponse:
    name = request.path_params["name"]
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    channels.setdefault(name, set()).add(queue)

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            while True:
                event_id, data = await queue.get()
                yield {"id": str(event_id), "data": data}
        finally:
            channels[name].discard(queue)

    return EventSourceResponse(events())


async def publish(request: Request) -> JSONResponse:
    name = request.path_params["name"]
    data = (await request.body()).decode()
    event_id = next(ids)
    subscribers = channels.get(name, set())
    for queue in subscribers:
        queue.put_nowait((event_id, data))
    return JSONResponse({"id": event_id, "subscribers": len(subscribers)})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({"subscribers": sum(len(s) for s in channels.values())})


app = Starlette(
    routes=[
        Route("/channels/{name:path}", subscribe, methods=["GET"]),
        Route("/channels/{name:path}", publish, methods=["POST"]),
        Route("/stats", stats, methods=["GET"]),
    ]
)

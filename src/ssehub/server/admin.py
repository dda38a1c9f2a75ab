"""`/admin/*`, `/metrics` and `/healthz`: the connection registry and the hub's health.

The admin view covers every process that shares the broker: the process that takes an
admin request asks all of them through the broker (`Broker.ask`), each answers from its
own registry (`answerer`), and the asker merges the answers. With the memory broker the
one process answers itself, through the same path.

`/metrics` and `/healthz`'s `connections` answer for the node instead (the processes of
one `ssehub serve --workers N`): each node is its own Prometheus target (`ask_node`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ssehub.broker import Broker, BrokerUnavailable
from ssehub.broker.base import Answerer, Answers, Member
from ssehub.server import metrics
from ssehub.server.channels import RequestError, check_bearer
from ssehub.server.hub import ConnectionInfo, Hub, HubStats

Endpoint = Callable[[Request], Awaitable[Response]]

# How long the asking process waits for the others' answers: a process that takes longer
# is listed as unanswered rather than holding the operator's request.
ASK_WAIT = 0.5
# Connections listed when `?limit=` is not given, and the most it may ask for: every
# process sends at most that many, so an answer stays small with 10,000 per process.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_STATS_FIELDS = [f.name for f in dataclasses.fields(HubStats)]


def answerer(
    hub: Hub, registry: CollectorRegistry | None = None, node: str | None = None
) -> Answerer:
    """What this process answers, from `hub`'s registry, when an admin request anywhere
    asks every process (see `admin_routes`).

    `registry` is what it answers a `metrics` question with (default: the hub's metrics
    alone); `node` is the node it belongs to, as in its `about`: a question for another
    node (`"node"` in it) gets an empty answer, which the asker does not count.
    """
    registry = registry if registry is not None else metrics.make_registry(hub)

    async def answer(question: Mapping[str, Any]) -> Mapping[str, Any]:
        kind = question.get("ask")
        if kind == "connections":
            channel = question.get("channel")
            matching = hub.connections(channel if isinstance(channel, str) else None)
            oldest = heapq.nsmallest(int(question["limit"]), matching, key=_age_order)
            return {
                "connections": [dataclasses.asdict(c) for c in oldest],
                "matching": len(matching),
            }
        if kind == "disconnect":
            return {"disconnected": hub.disconnect(str(question["id"]))}
        if question.get("node", node) != node:
            return {}
        if kind == "stats":
            return dataclasses.asdict(hub.stats())
        if kind == "metrics":
            return {"metrics": metrics.render(registry).decode()}
        raise ValueError(f"unknown admin question {kind!r}")

    return answer


async def ask_node(broker: Broker, question: Mapping[str, Any], node: str | None) -> Answers:
    """`question` put to the processes of `node` (the `node` of their `about`), for
    what a node answers for itself (`/metrics`, `/healthz`): every other node is a target
    of its own. Other nodes' processes still get the question (`Broker.ask` reaches
    every member) but answer it empty, and are left out here. `node=None`: every process.
    """
    answers = await broker.ask({**question, "node": node}, wait=ASK_WAIT)
    if node is None:
        return answers
    return Answers(
        [(m, body) for m, body in answers.answers if m.about.get("node") == node],
        [m for m in answers.unanswered if m.about.get("node") == node],
    )


async def node_connections(hub: Hub, node: str | None) -> int:
    """The open subscriber connections of every process of `node`: this process's own
    count, plus what the others answer (see `ask_node`). Raises `BrokerUnavailable`."""
    broker = hub.broker
    here = hub.stats().connections
    if broker.process is None:
        return here
    answers = await ask_node(broker, {"ask": "stats"}, node)
    return here + sum(
        int(body.get("connections", 0))
        for m, body in answers.answers
        if m.process != broker.process
    )


def _age_order(info: ConnectionInfo) -> tuple[float, str]:
    return info.connected_since, info.id


def _holder(member: Member) -> dict[str, Any]:
    """How the listing names the process holding a connection."""
    return {
        "process": member.process,
        "node": member.about.get("node"),
        "pid": member.about.get("pid"),
    }


def _unanswered(answers: Answers) -> list[dict[str, Any]]:
    return [_holder(m) for m in answers.unanswered]


def admin_routes(
    hub: Hub,
    admin_token: str | None,
    registry: CollectorRegistry | None = None,
    *,
    node: str | None = None,
    workers: int = 1,
) -> list[BaseRoute]:
    """The admin routes and `/metrics`. `node` is this process's node (its `about`'s):
    `/metrics` answers for the processes of that node (None: every process). `workers` is
    how many processes the node runs: a scrape that holds fewer (one not yet or no
    longer a member, or the broker away) counts the missing as unanswered.
    """
    # Others (the gateway) register their metrics in the same registry: one /metrics.
    registry = registry or metrics.make_registry(hub)
    broker = hub.broker

    def guarded(endpoint: Endpoint) -> Endpoint:
        async def checked(request: Request) -> Response:
            try:
                check_bearer(request.headers, admin_token, "admin endpoints")
            except RequestError as exc:
                return exc.response()
            try:
                return await endpoint(request)
            except BrokerUnavailable:
                return JSONResponse({"error": "broker unavailable, retry later"}, 503)

        return checked

    async def list_connections(request: Request) -> Response:
        channel = request.query_params.get("channel")
        raw_limit = request.query_params.get("limit", str(DEFAULT_LIMIT))
        limit = int(raw_limit) if raw_limit.isdigit() else 0
        if not 1 <= limit <= MAX_LIMIT:
            return JSONResponse({"error": f"limit must be 1-{MAX_LIMIT}"}, status_code=400)
        answers = await broker.ask(
            {"ask": "connections", "channel": channel, "limit": limit}, wait=ASK_WAIT
        )
        listed: list[dict[str, Any]] = []
        total = 0
        for member, body in answers.answers:
            total += body["matching"]
            listed += [{**c, **_holder(member)} for c in body["connections"]]
        # Each process sent its oldest `limit`: the oldest `limit` of all are among them.
        listed.sort(key=lambda c: (c["connected_since"], c["id"]))
        del listed[limit:]
        return JSONResponse(
            {
                "connections": listed,
                "total": total,
                "left_out": total - len(listed),
                "unanswered": _unanswered(answers),
            }
        )

    async def close_connection(request: Request) -> Response:
        conn_id = request.path_params["id"]
        # `c12@<process>`: only its holder is asked. An id without a process is asked
        # of all (with the memory broker, of the one process).
        _, at, process = conn_id.rpartition("@")
        answers = await broker.ask(
            {"ask": "disconnect", "id": conn_id}, to=process if at else None, wait=ASK_WAIT
        )
        if any(body.get("disconnected") for _, body in answers.answers):
            return JSONResponse({"id": conn_id, "disconnected": True})
        if answers.unanswered:
            return JSONResponse(
                {
                    "error": f"no answer from the process that may hold {conn_id!r}",
                    "unanswered": _unanswered(answers),
                },
                status_code=504,
            )
        return JSONResponse({"error": f"no connection {conn_id!r}"}, status_code=404)

    async def stats(request: Request) -> Response:
        answers = await broker.ask({"ask": "stats"}, wait=ASK_WAIT)
        processes = [{**_holder(m), **body} for m, body in answers.answers]
        processes.sort(key=lambda p: (str(p["node"]), str(p["pid"]), str(p["process"])))
        totals = {name: sum(int(p.get(name, 0)) for p in processes) for name in _STATS_FIELDS}
        return JSONResponse({**totals, "processes": processes, "unanswered": _unanswered(answers)})

    # How many other processes of this node the last scrape knew of: when the broker is
    # away, the scrape says they are missing rather than pass one process off as the node.
    peers = workers - 1

    async def scrape(request: Request) -> Response:
        nonlocal peers
        # This process's samples are taken here, not through the broker, so a scrape has
        # them even when the broker is away; one round of asking fetches all the others'.
        own = metrics.render(registry)
        others: list[str] = []
        unanswered = 0
        if broker.process is not None:
            try:
                # Bounded whole: a Redis that hangs rather than refuses must not hold
                # the scrape for its socket timeout.
                answers = await asyncio.wait_for(
                    ask_node(broker, {"ask": "metrics"}, node), ASK_WAIT + 1.0
                )
            except (BrokerUnavailable, TimeoutError):
                unanswered = max(peers, workers - 1)
            else:
                for member, body in answers.answers:
                    text = body.get("metrics")
                    if member.process != broker.process and isinstance(text, str):
                        others.append(text)
                unanswered = sum(m.process != broker.process for m in answers.unanswered)
                peers = len(others) + unanswered
                unanswered = max(unanswered, workers - 1 - len(others))
        exposition = metrics.node_exposition(own, others, unanswered)
        return Response(exposition, media_type=metrics.CONTENT_TYPE)

    return [
        Route("/admin/connections", guarded(list_connections), methods=["GET"]),
        Route("/admin/connections/{id}", guarded(close_connection), methods=["DELETE"]),
        Route("/admin/stats", guarded(stats), methods=["GET"]),
        Route("/metrics", guarded(scrape), methods=["GET"]),
    ]

"""The OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models,
and ssehub's own /v1/chat/completions/{id}/stream and /cancel."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ssehub.broker import Broker
from ssehub.gateway.chunks import ChunkFactory, Tally, model_object, new_completion_id
from ssehub.gateway.demo import DEMO_MODEL, demo_chunks, demo_completion
from ssehub.gateway.metrics import GatewayMetrics
from ssehub.gateway.response import RunResponse
from ssehub.gateway.runs import Runs, run_stream
from ssehub.gateway.schema import CompletionRequest, GatewayError, Kind, parse_request
from ssehub.gateway.upstream import LateRelay, Upstream, relay_chunks
from ssehub.settings import Settings

log = logging.getLogger("ssehub.gateway")

# Completion ids are ours (`chatcmpl-<hex>`, `cmpl-<hex>`), but upstreams' ids look alike;
# anything else in the path is not a completion and must not name a broker log.
_COMPLETION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")

_STREAM_HEADERS = {
    "cache-control": "no-cache",
    # nginx buffers proxied responses unless told not to; a buffered stream arrives in
    # one piece at the end.
    "x-accel-buffering": "no",
}


def parse_api_keys(value: str | None) -> tuple[bytes, ...]:
    """The client keys in `value` (comma-separated, empty entries ignored); `()` if unset.

    Raises `ValueError` when `value` is set but holds no key: a gateway meant to be
    closed must not start open.
    """
    if value is None:
        return ()
    keys = tuple(key.strip().encode() for key in value.split(",") if key.strip())
    if not keys:
        raise ValueError(
            f"--api-key (SSEHUB_API_KEY) {value!r} holds no key; empty entries are ignored"
        )
    return keys


class Gateway:
    """What the gateway endpoints share in one app: runs, the upstream, metrics, and the
    client keys (`api_keys`, empty when the endpoints are open)."""

    def __init__(self, settings: Settings, broker: Broker, registry: Any = None) -> None:
        self.api_keys = parse_api_keys(settings.api_key)
        self.settings = settings
        self.broker = broker
        self.metrics = GatewayMetrics(registry)
        self.runs = Runs(
            broker,
            self.metrics,
            detach_grace=settings.detach_grace,
            retention=settings.completion_retention,
            heartbeat=settings.first_token_heartbeat,
        )
        self.upstream = (
            Upstream(settings.upstream, settings.upstream_api_key, settings.upstream_proxy)
            if settings.upstream
            else None
        )

    async def aclose(self) -> None:
        await self.runs.aclose()
        if self.upstream is not None:
            await self.upstream.aclose()


def _shutdown(request: Request) -> asyncio.Event | None:
    # Set by the hub when the server stops: open streams end so clients resume elsewhere.
    event = getattr(getattr(request.app.state, "hub", None), "shutting_down", None)
    return event if isinstance(event, asyncio.Event) else None


def _gateway(request: Request) -> Gateway:
    gateway = request.app.state.gateway
    assert isinstance(gateway, Gateway)
    return gateway


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def error_response(error: GatewayError) -> Response:
    return json_response(error.body(), error.status)


Endpoint = Callable[[Request], Awaitable[Response]]


def _authenticated(endpoint: Endpoint) -> Endpoint:
    """`endpoint`, answering 401 first unless the request names one of the gateway's keys."""

    @functools.wraps(endpoint)
    async def checked(request: Request) -> Response:
        keys = _gateway(request).api_keys
        if not keys:
            return await endpoint(request)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        token = given.strip().encode()
        # Every key is compared, with no early exit: the time taken does not say which
        # key matched, nor how much of one.
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(token, key)
        presented = scheme.lower() == "bearer" and bool(token)
        if presented and matched:
            return await endpoint(request)
        if presented:
            message = "Incorrect API key provided."
            challenge = 'Bearer error="invalid_token"'
        else:
            message = "This server needs an API key: send 'Authorization: Bearer <key>'."
            # RFC 6750 3.1: a request with no credentials gets no error code.
            challenge = "Bearer"
        response = error_response(GatewayError(401, message, code="invalid_api_key"))
        response.headers["www-authenticate"] = challenge
        return response

    return checked


def _upstream_authorization(gateway: Gateway, request: Request) -> str | None:
    """The client's `Authorization` to forward upstream: none when it was the key for
    this gateway (that key is ours, not the upstream's)."""
    if gateway.api_keys:
        return None
    return request.headers.get("authorization")


def event_stream(
    gateway: Gateway, body: AsyncIterator[bytes], completion_id: str, kind: Kind
) -> Response:
    base = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    headers = {
        "content-type": "text/event-stream; charset=utf-8",
        **_STREAM_HEADERS,
        "ssehub-completion-id": completion_id,
        # RFC 9110 8.7: the resource this stream is a representation of. A client whose
        # POST's connection breaks resumes there with GET and Last-Event-ID instead of
        # starting a second completion (ssehub.client does).
        "content-location": f"{base}/{completion_id}/stream",
    }
    return RunResponse(
        body, headers, gateway.settings.send_timeout, gateway.metrics.send_timeouts.inc
    )


async def _read_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise GatewayError(413, f"The request body is larger than {limit} bytes.")
    return bytes(body)


async def _complete(request: Request, kind: Kind) -> Response:
    gateway = _gateway(request)
    settings = gateway.settings
    try:
        completion = parse_request(await _read_body(request, settings.max_body), kind)
        tally = Tally()
        if completion.model == DEMO_MODEL:
            factory = ChunkFactory.start(kind, DEMO_MODEL, completion.include_usage)
            if not completion.stream:
                return json_response(demo_completion(completion, factory))
            completion_id = factory.id
            backend = "demo"
            source = demo_chunks(completion, factory, settings.demo_delay, tally)
        else:
            if gateway.upstream is None:
                raise GatewayError(
                    404,
                    f"The model '{completion.model}' does not exist. This server serves "
                    f"only '{DEMO_MODEL}'; start it with --upstream URL to relay others.",
                    param="model",
                    code="model_not_found",
                )
            path = "/chat/completions" if kind == "chat" else "/completions"
            authorization = _upstream_authorization(gateway, request)
            if not completion.stream:
                status, content = await gateway.upstream.post(path, completion.body, authorization)
                return Response(content, status, media_type="application/json")
            completion_id = new_completion_id(kind)
            backend = "upstream"
            source = await _open_relay(
                gateway, path, completion, authorization, completion_id, tally
            )
    except GatewayError as error:
        return error_response(error)
    gateway.runs.start(completion_id, backend, source, tally)
    return event_stream(
        gateway, gateway.runs.read(completion_id, None, _shutdown(request)), completion_id, kind
    )


async def _open_relay(
    gateway: Gateway,
    path: str,
    completion: CompletionRequest,
    authorization: str | None,
    completion_id: str,
    tally: Tally,
) -> AsyncIterator[list[str]]:
    """Send the request upstream; the relay of its stream once the upstream answers.

    An upstream error that comes within `first_token_heartbeat` seconds is raised as a
    `GatewayError` (the client gets its status). An upstream slower than that to answer
    at all does not keep the client without a byte: its stream starts, with heartbeats,
    and a late error becomes an error event.
    """
    upstream = gateway.upstream
    assert upstream is not None
    # The request is written here; its answer is a future the upstream connection
    # resolves when the response head comes, so that wakes this task directly.
    head = await upstream.send_stream(path, completion.body, authorization)
    wait = gateway.settings.first_token_heartbeat
    if not head.done():
        try:
            await asyncio.wait({head}, timeout=wait if wait > 0 else None)
        except asyncio.CancelledError:
            head.cancel()
            raise
    if head.done():
        return relay_chunks(await upstream.checked(head), completion_id, tally)
    return LateRelay(upstream, head, completion_id, tally)


async def chat_completions(request: Request) -> Response:
    return await _complete(request, "chat")


async def completions(request: Request) -> Response:
    return await _complete(request, "text")


async def models(request: Request) -> Response:
    gateway = _gateway(request)
    data = [model_object(DEMO_MODEL, "ssehub")]
    if gateway.upstream is not None:
        try:
            upstream_models = await gateway.upstream.models(
                _upstream_authorization(gateway, request)
            )
        except GatewayError as error:
            # The demo stays usable, and a UI can still list it, when the upstream is down.
            log.warning("cannot list the upstream's models: %s", error.message)
        else:
            data.extend(m for m in upstream_models if m["id"] != DEMO_MODEL)
    return json_response({"object": "list", "data": data})


def _completion_id(request: Request) -> str:
    completion_id = str(request.path_params["completion_id"])
    if not _COMPLETION_ID.match(completion_id):
        raise _not_found(completion_id)
    return completion_id


def _not_found(completion_id: str) -> GatewayError:
    return GatewayError(
        404,
        f"No completion '{completion_id}': unknown, or its retention time is over.",
        param="id",
        code="completion_not_found",
    )


async def resume(request: Request) -> Response:
    """Replay a completion's stream after a cursor and follow it to `[DONE]`."""
    gateway = _gateway(request)
    try:
        completion_id = _completion_id(request)
        if await gateway.broker.info(run_stream(completion_id)) is None:
            raise _not_found(completion_id)
    except GatewayError as error:
        return error_response(error)
    cursor = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    kind: Kind = "text" if completion_id.startswith("cmpl-") else "chat"
    return event_stream(
        gateway,
        gateway.runs.read(completion_id, cursor or None, _shutdown(request)),
        completion_id,
        kind,
    )


async def cancel(request: Request) -> Response:
    gateway = _gateway(request)
    try:
        completion_id = _completion_id(request)
        result = await gateway.runs.cancel(completion_id, _cancel_wait(request))
        if result == "requested":
            # Asked, not yet done (see `Runs.cancel`): the log ends with the `request`
            # error event once the generating process hears it.
            return json_response(
                {"id": completion_id, "object": "completion.cancel", "cancelled": False},
                status=202,
            )
        if result == "none":
            info = await gateway.broker.info(run_stream(completion_id))
            if info is None:
                raise _not_found(completion_id)
            if info.closed:
                raise GatewayError(
                    409, f"The completion '{completion_id}' has already ended.", code="ended"
                )
            raise GatewayError(
                409,
                f"No server process is generating the completion '{completion_id}' now "
                "(the one that did stopped); its stream ends with an error event once "
                "its lease lapses.",
                code="not_local",
            )
    except GatewayError as error:
        return error_response(error)
    return json_response({"id": completion_id, "object": "completion.cancel", "cancelled": True})


def _cancel_wait(request: Request) -> float:
    """`?wait=SECONDS` (0-60, default 10): how long a cancel waits for another node."""
    raw = request.query_params.get("wait")
    if raw is None:
        return 10.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= 60:
        raise GatewayError(400, "'wait' must be a number of seconds from 0 to 60.", param="wait")
    return wait


def gateway_routes() -> list[BaseRoute]:
    """The gateway's routes; the app puts a `Gateway` in `app.state.gateway`. With client
    keys set (`--api-key`), every one of them needs one."""
    routes: list[BaseRoute] = [
        Route("/v1/chat/completions", _authenticated(chat_completions), methods=["POST"]),
        Route("/v1/completions", _authenticated(completions), methods=["POST"]),
        Route("/v1/models", _authenticated(models), methods=["GET"]),
    ]
    for prefix in ("/v1/chat/completions", "/v1/completions"):
        stream, stop = _authenticated(resume), _authenticated(cancel)
        routes.append(Route(prefix + "/{completion_id}/stream", stream, methods=["GET"]))
        routes.append(Route(prefix + "/{completion_id}/cancel", stop, methods=["POST"]))
    return routes

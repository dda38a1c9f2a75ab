"""The job-progress demo (seed 004): push progress until done, then close the channel.

`POST /demo/jobs` starts a job whose progress 0..100 goes to channel `jobs/<id>` as
`progress` events (`{"job": id, "progress": n, "state": "running"}`); when done the channel
is closed with a `close` event carrying the final state. The channel keeps only its
latest progress event (a state channel), so a late subscriber with `?from=oldest` gets
the current state first, then the rest live; after the end it gets the final state and
the `close` event, and a reconnect after that gets 204.
"""

from __future__ import annotations

import asyncio
import json
import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ssehub.broker import Retention
from ssehub.server.channels import RequestError, check_bearer, read_body
from ssehub.server.hub import Hub

STEP = 10  # percent per progress event: 0, 10, ..., 100
_LATEST_ONLY = Retention(max_len=1, max_age=None)


async def run_job(hub: Hub, job_id: str, delay: float) -> None:
    """Publish progress on `jobs/<job_id>` every `delay` seconds, then close it."""
    channel = f"jobs/{job_id}"
    for progress in range(0, 101, STEP):
        state = {"job": job_id, "progress": progress, "state": "running"}
        await hub.publish(channel, state, event="progress", retention=_LATEST_ONLY)
        if progress < 100:
            await asyncio.sleep(delay)
    await hub.close_channel(channel, {"job": job_id, "progress": 100, "state": "done"})


def job_routes(hub: Hub, publish_token: str | None, max_body: int) -> list[BaseRoute]:
    async def start_job(request: Request) -> Response:
        try:
            check_bearer(request.headers, publish_token, "starting a job")
            body = await read_body(request.receive, request.headers, max_body)
            options = json.loads(body) if body.strip() else {}
            if not isinstance(options, dict):
                raise RequestError(400, 'body must be a JSON object like {"delay": 0.5}')
            delay = options.get("delay", 0.5)
            if not isinstance(delay, int | float) or isinstance(delay, bool):
                raise RequestError(400, '"delay" must be a number of seconds')
            if not 0 <= delay <= 10:
                raise RequestError(400, '"delay" must be between 0 and 10 seconds')
        except ValueError:
            return JSONResponse({"error": "body is not valid JSON"}, status_code=400)
        except RequestError as exc:
            return exc.response()
        job_id = secrets.token_hex(6)
        hub.spawn(run_job(hub, job_id, float(delay)))
        channel = f"jobs/{job_id}"
        return JSONResponse(
            {"id": job_id, "channel": channel, "events": f"/channels/{channel}?from=oldest"},
            status_code=202,
        )

    return [Route("/demo/jobs", start_job, methods=["POST"])]

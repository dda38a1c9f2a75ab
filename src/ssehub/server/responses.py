"""`EventStreamResponse`: an SSE response from any iterator, for Starlette/FastAPI apps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio
from starlette.background import BackgroundTask
from starlette.concurrency import iterate_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ssehub.protocol import ServerSentEvent, encode, encode_comment, encode_data, encode_retry
from ssehub.server.fanout import call_hook

logger = logging.getLogger("ssehub.server")

EventItem = ServerSentEvent | str | Mapping[str, Any]
Hook = Callable[..., Awaitable[None] | None]


def encode_item(item: EventItem) -> bytes:
    """Wire bytes for one item: a `ServerSentEvent`, a string (the data of a `message`
    event) or a mapping with `data` (non-strings become JSON), `event`, `id`, `retry`."""
    if isinstance(item, str):
        return encode_data(item)
    if isinstance(item, ServerSentEvent):
        return encode(item)
    if isinstance(item, Mapping):
        data = item.get("data", "")
        if not isinstance(data, str):
            data = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        return encode(
            ServerSentEvent(
                data=data,
                event=item.get("event") or "message",
                id=item.get("id"),
                retry=item.get("retry"),
            )
        )
    raise TypeError(f"cannot send {type(item).__name__} as an event")


class EventStreamResponse(Response):
    """Stream events from `source` (an async or sync iterable of events, strings or dicts).

    - `heartbeat`: seconds of silence before a `:` comment is sent (None or 0: never).
    - `retry`: milliseconds sent first as `retry:`, the client's reconnection delay.
    - `send_timeout`: seconds a write may wait on a client that stopped reading; then
      the stream ends and `on_timeout` runs (None: wait forever).
    - `shutdown`: an event that ends the stream when set; by default the `Hub`'s
      `shutting_down` when the app has one in `app.state.hub` (set by `create_app`).
    - `on_complete()` runs whenever the stream ends (finished, client left, timeout,
      error, shutdown, cancellation); `on_timeout()` after a send timeout; `on_error(exc)` when the
      source raised. Each may be sync or async.

    The producer stops (its iterator is closed) as soon as the client disconnects.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        source: AsyncIterable[EventItem] | Iterable[EventItem],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        heartbeat: float | None = 15.0,
        retry: int | None = None,
        send_timeout: float | None = 30.0,
        shutdown: asyncio.Event | None = None,
        on_complete: Hook | None = None,
        on_timeout: Hook | None = None,
        on_error: Hook | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        self.source = source
        self.status_code = status_code
        self.heartbeat = heartbeat
        self.retry = retry
        self.send_timeout = send_timeout
        self.shutdown = shutdown
        self.on_complete = on_complete
        self.on_timeout = on_timeout
        self.on_error = on_error
        self.background = background
        self.init_headers(headers)
        # The Content-Type charset is part of the contract; never compressed, never cached.
        # No Connection header: it is forbidden in HTTP/2 (RFC 9113, 8.2.2).
        self.headers["content-type"] = "text/event-stream; charset=utf-8"
        self.headers["cache-control"] = "no-cache"
        self.headers["x-accel-buffering"] = "no"
        self.outcome = "pending"  # then: complete, disconnect, timeout, error, shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        shutdown = self.shutdown
        if shutdown is None:
            hub = getattr(getattr(scope.get("app"), "state", None), "hub", None)
            shutdown = getattr(hub, "shutting_down", None)
        last_write = time.monotonic()
        lock = anyio.Lock()

        async def write(data: bytes) -> None:
            nonlocal last_write
            async with lock:
                with anyio.fail_after(self.send_timeout):
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                last_write = time.monotonic()

        await send(
            {
                "type": "http.response.start",
                "status": self.status_code,
                "headers": self.raw_headers,
            }
        )
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        iterator = self._iterate()
        try:
            async with anyio.create_task_group() as tg:

                def end(outcome: str) -> None:
                    if self.outcome == "pending":
                        self.outcome = outcome
                    tg.cancel_scope.cancel()

                async def watch_client() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    end("disconnect")

                async def watch_shutdown(event: asyncio.Event) -> None:
                    await event.wait()
                    end("shutdown")

                async def beat(interval: float) -> None:
                    while True:
                        await anyio.sleep(max(0.0, last_write + interval - time.monotonic()))
                        if time.monotonic() - last_write >= interval:
                            await write(encode_comment())

                async def produce() -> None:
                    if self.retry is not None:
                        await write(encode_retry(self.retry))
                    async for item in iterator:
                        await write(encode_item(item))
                    end("complete")

                async def guarded(job: Callable[[], Awaitable[None]]) -> None:
                    try:
                        await job()
                    except TimeoutError:
                        end("timeout")
                    except Exception as exc:
                        if self.outcome == "pending":
                            self.outcome = "error"
                            logger.exception("event stream source failed")
                            await call_hook(self.on_error, exc)
                        tg.cancel_scope.cancel()

                tg.start_soon(watch_client)
                if shutdown is not None:
                    tg.start_soon(watch_shutdown, shutdown)
                if self.heartbeat:
                    tg.start_soon(guarded, lambda: beat(self.heartbeat or 0))
                tg.start_soon(guarded, produce)
        except BaseException:
            # Cancelled from outside (the server's shutdown timeout, a cancelled task).
            if self.outcome == "pending":
                self.outcome = "cancelled"
            raise
        finally:
            # Stop the producer: run its `finally` blocks and release what it holds.
            with anyio.CancelScope(shield=True):
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self.outcome == "cancelled":
                    await call_hook(self.on_complete)
        if self.outcome == "timeout":
            await call_hook(self.on_timeout)
        elif self.outcome != "disconnect":
            # The client is still there: end the chunked body so it sees a clean end.
            with anyio.move_on_after(self.send_timeout or 5):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        await call_hook(self.on_complete)
        if self.background is not None:
            await self.background()

    async def _iterate(self) -> AsyncIterator[EventItem]:
        source = self.source
        if isinstance(source, AsyncIterable):
            iterator = aiter(source)
            try:
                async for item in iterator:
                    yield item
            finally:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
        else:
            sync = iter(source)
            try:
                async for item in iterate_in_threadpool(sync):
                    yield item
            finally:
                close = getattr(sync, "close", None)
                if close is not None:
                    # Still running in its worker thread when the client left mid-`next`.
                    with contextlib.suppress(ValueError):
                        close()

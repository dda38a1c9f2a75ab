"""`RunResponse`: the HTTP response of a completion stream, a reader of the run's log.

Lean on purpose: it is on the path to every relayed first token. The request's own task
writes what the reader yields; a second task only waits for the client to leave (and
then cancels the first). A write that waits longer than `send_timeout` on a client that
stopped reading ends the response: the reader lets go of the run (which goes on for its
other readers, or for its detach grace), and the connection is closed unfinished, so
the client resumes with Last-Event-ID when it comes back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("ssehub.gateway")

_END: dict[str, Any] = {"type": "http.response.body", "body": b"", "more_body": False}


class RunResponse(Response):
    """An event stream from `body` (wire bytes)."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        headers: Mapping[str, str],
        send_timeout: float,
        on_timeout: Callable[[], object] | None = None,
    ) -> None:
        self.source = body
        self.on_timeout = on_timeout
        self.status_code = 200
        self.background = None
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.send_timeout = send_timeout
        self.outcome = "pending"  # then: complete, disconnect, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        watcher = loop.create_task(self._watch(receive, task))
        timeout = self.send_timeout
        try:
            async for data in self.source:
                timer = loop.call_later(timeout, self._stalled, task) if timeout > 0 else None
                try:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                finally:
                    if timer is not None:
                        timer.cancel()
                if self.outcome != "pending":
                    return
            self.outcome = "complete"
            await send(_END)
        except asyncio.CancelledError:
            # Ours when the client left or stalled: the stream is over, quietly.
            if self.outcome not in ("disconnect", "timeout"):
                raise
            task.uncancel()
        finally:
            watcher.cancel()
            aclose = getattr(self.source, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self.outcome == "pending":
            self.outcome = "disconnect"
            task.cancel()

    def _stalled(self, task: asyncio.Task[Any]) -> None:
        if self.outcome == "pending":
            self.outcome = "timeout"
            log.info("dropping a completion stream: its client stopped reading")
            if self.on_timeout is not None:
                self.on_timeout()
            task.cancel()

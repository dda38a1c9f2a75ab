"""The asyncio/trio client: `aconnect()` / `AsyncEventSource`, a mirror of `_sync.py`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import anyio
import httpx

from ssehub.client._reconnect import Reconnect
from ssehub.client._state import BODY_SNIPPET_BYTES, HeaderTypes, SourceState, Verdict
from ssehub.client._tls import tls_context
from ssehub.protocol import EventTooLarge, ServerSentEvent


class AsyncEventSource:
    """The events of one URL, across as many connections as it takes.

    Iterate it with `async for`; use it with `async with` so the connection is closed
    when you stop early. See `aconnect()` for the arguments.
    """

    def __init__(
        self,
        url: httpx.URL | str,
        *,
        method: str = "GET",
        params: Mapping[str, Any] | None = None,
        headers: HeaderTypes | None = None,
        json: Any = None,
        content: bytes | str | None = None,
        last_event_id: str | None = None,
        reconnect: bool | Reconnect = True,
        idle_timeout: float | None = 60.0,
        timeout: float | None = 10.0,
        max_event_size: int | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._state = SourceState(
            url,
            method=method,
            params=params,
            headers=headers,
            json=json,
            content=content,
            last_event_id=last_event_id,
            reconnect=reconnect,
            idle_timeout=idle_timeout,
            timeout=timeout,
            max_event_size=max_event_size,
        )
        self._client = client
        self._events: AsyncGenerator[ServerSentEvent, None] | None = None
        self._wait: float | None = None
        self._closed = False
        self._wake: anyio.Event | None = None
        self.response: httpx.Response | None = None
        """The response being read, while connected (for its headers, say)."""

    @property
    def last_event_id(self) -> str:
        """The last event ID string: sent as `Last-Event-ID` on reconnection ("" = none)."""
        return self._state.last_event_id

    @property
    def retry(self) -> int | None:
        """The reconnection time the stream asked for with `retry:` (ms), or None."""
        return self._state.retry

    def __aiter__(self) -> AsyncIterator[ServerSentEvent]:
        if self._events is None:
            self._events = self._run()
        return self._events

    async def aclose(self) -> None:
        """Close the connection (and the httpx client, unless it was passed in).

        May be called from another task than the one iterating: that one's loop then ends.
        """
        self._closed = True
        if self._events is None:
            return
        if not getattr(self._events, "ag_running", False):  # typeshed lacks the attribute
            await self._events.aclose()
            return
        # Another task is inside the generator, which cannot be closed from here: end its
        # read (or its wait) instead, and it returns on seeing `_closed`.
        if self._wake is not None:
            self._wake.set()
        if self.response is not None:
            await self.response.aclose()

    async def __aenter__(self) -> AsyncEventSource:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _closing(self) -> bool:
        # A method, not the attribute: mypy would take `_closed` as still False after a yield.
        return self._closed

    async def _run(self) -> AsyncGenerator[ServerSentEvent, None]:
        client = self._client or httpx.AsyncClient(follow_redirects=True, verify=tls_context())
        self._wake = anyio.Event()
        try:
            while not self._closed:
                # Closed explicitly: an async generator left suspended would keep the
                # response open until the garbage collector finalizes it.
                async with contextlib.aclosing(self._connection(client)) as events:
                    async for event in events:
                        yield event
                if self._wait is None:
                    return
                with anyio.move_on_after(self._wait):
                    await self._wake.wait()
        finally:
            if client is not self._client:
                await client.aclose()

    async def _connection(self, client: httpx.AsyncClient) -> AsyncGenerator[ServerSentEvent, None]:
        """One connection's events; sets `_wait` to the seconds before the next, or None."""
        state = self._state
        try:
            response = await client.send(state.build_request(client), stream=True)
        except httpx.RequestError as exc:  # the connection failed
            self._wait = None if self._closed else state.failed(state.transport_error(exc))
            return
        self.response = response
        try:
            verdict = state.verdict(response)
            if verdict is Verdict.STOP or self._closed:
                self._wait = None
                return
            if verdict is Verdict.ERROR:
                self._wait = state.failed(
                    state.response_error(response, await _body_start(response))
                )
                return
            decoder = state.connected(response)
            try:
                async for chunk in response.aiter_bytes():
                    try:
                        events = decoder.feed(chunk)
                    except EventTooLarge as exc:
                        # Hand out the events completed before the oversized one; the
                        # server would send that one again on reconnection.
                        for event in state.deliver(exc.events):
                            yield event
                        raise
                    state.received()
                    for event in state.deliver(events):
                        yield event
                        if self._closing():  # closed from elsewhere meanwhile
                            self._wait = None
                            return
            finally:
                decoder.close()
            self._wait = state.ended()
            return
        except (httpx.RequestError, httpx.StreamError) as exc:  # it failed or broke
            if self._closed:  # by `aclose()` from another task
                self._wait = None
                return
            if not isinstance(exc, httpx.RequestError):
                raise
            self._wait = state.failed(state.transport_error(exc))
            return
        finally:
            self.response = None
            await response.aclose()


async def _body_start(response: httpx.Response) -> bytes:
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= BODY_SNIPPET_BYTES:
            break
    return body[:BODY_SNIPPET_BYTES]


def aconnect(
    url: httpx.URL | str,
    *,
    method: str = "GET",
    params: Mapping[str, Any] | None = None,
    headers: HeaderTypes | None = None,
    json: Any = None,
    content: bytes | str | None = None,
    last_event_id: str | None = None,
    reconnect: bool | Reconnect = True,
    idle_timeout: float | None = 60.0,
    timeout: float | None = 10.0,
    max_event_size: int | None = None,
    client: httpx.AsyncClient | None = None,
) -> AsyncEventSource:
    """Open an event stream: `async with aconnect(url) as events: async for event in events:`.

    - `method`, `params`, `headers`, `json` (sent as JSON) or `content` (raw body): the
      request; every reconnection sends it again, with `Last-Event-ID`.
    - `last_event_id`: resume after this id from the first request on.
    - `reconnect`: `True` (the default `Reconnect()` policy), a `Reconnect`, or `False`.
    - `idle_timeout`: seconds without a single byte (heartbeats count) before the
      connection is taken for dead; `timeout`: connect and write timeout.
    - `max_event_size`: the decoder's bound on one event, in bytes.
    - `client`: an `httpx.AsyncClient` to send with (its base URL, auth, transport); it is left
      open.
    """
    return AsyncEventSource(
        url,
        method=method,
        params=params,
        headers=headers,
        json=json,
        content=content,
        last_event_id=last_event_id,
        reconnect=reconnect,
        idle_timeout=idle_timeout,
        timeout=timeout,
        max_event_size=max_event_size,
        client=client,
    )

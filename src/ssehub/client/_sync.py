"""The blocking client: `connect()` / `EventSource`. `_async.py` mirrors it line for line."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Generator, Iterator, Mapping
from types import TracebackType
from typing import Any

import httpx

from ssehub.client._reconnect import Reconnect
from ssehub.client._state import BODY_SNIPPET_BYTES, HeaderTypes, SourceState, Verdict
from ssehub.client._tls import tls_context
from ssehub.protocol import EventTooLarge, ServerSentEvent


class EventSource:
    """The events of one URL, across as many connections as it takes.

    Iterate it for `ServerSentEvent`s; use it as a context manager so the connection is
    closed when you stop early. See `connect()` for the arguments.
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
        client: httpx.Client | None = None,
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
        self._events: Generator[ServerSentEvent, None, None] | None = None
        self._wait: float | None = None
        self._closed = False
        self._wake = threading.Event()
        self._reader: int | None = None  # the iterating thread
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

    def __iter__(self) -> Iterator[ServerSentEvent]:
        if self._events is None:
            self._reader = threading.get_ident()  # before `_events`: close() reads them so
            self._events = self._run()
        return self._events

    def close(self) -> None:
        """Close the connection (and the httpx client, unless it was passed in).

        May be called from another thread than the one iterating: that one's loop then ends.
        """
        self._closed = True
        if self._events is None:
            return
        if self._reader in (None, threading.get_ident()):
            self._events.close()
            return
        # Another thread iterates: closing the generator under it would race with its next
        # step. End its read (or its wait) instead; it returns on seeing `_closed`.
        self._wake.set()
        response = self.response
        if response is not None:
            _shut_down(response)

    def __enter__(self) -> EventSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _closing(self) -> bool:
        # A method, not the attribute: mypy would take `_closed` as still False after a yield.
        return self._closed

    def _run(self) -> Generator[ServerSentEvent, None, None]:
        client = self._client or httpx.Client(follow_redirects=True, verify=tls_context())
        try:
            while not self._closed:
                yield from self._connection(client)
                if self._wait is None:
                    return
                self._wake.wait(self._wait)
        finally:
            if client is not self._client:
                client.close()

    def _connection(self, client: httpx.Client) -> Generator[ServerSentEvent, None, None]:
        """One connection's events; sets `_wait` to the seconds before the next, or None."""
        state = self._state
        try:
            response = client.send(state.build_request(client), stream=True)
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
                self._wait = state.failed(state.response_error(response, _body_start(response)))
                return
            decoder = state.connected(response)
            try:
                for chunk in response.iter_bytes():
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
            if self._closed:  # by `close()` from another thread
                self._wait = None
                return
            if not isinstance(exc, httpx.RequestError):
                raise
            self._wait = state.failed(state.transport_error(exc))
            return
        finally:
            self.response = None
            response.close()


def _shut_down(response: httpx.Response) -> None:
    """End the reads of `response`'s connection, also one blocked in another thread.

    Closing a socket does not wake a thread blocked reading it; shutting it down does (the
    read returns end of file), and that thread then closes the response itself.
    """
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)


def _body_start(response: httpx.Response) -> bytes:
    body = b""
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= BODY_SNIPPET_BYTES:
            break
    return body[:BODY_SNIPPET_BYTES]


def connect(
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
    client: httpx.Client | None = None,
) -> EventSource:
    """Open an event stream: `with connect(url) as events: for event in events: ...`.

    - `method`, `params`, `headers`, `json` (sent as JSON) or `content` (raw body): the
      request; every reconnection sends it again, with `Last-Event-ID`.
    - `last_event_id`: resume after this id from the first request on.
    - `reconnect`: `True` (the default `Reconnect()` policy), a `Reconnect`, or `False`.
    - `idle_timeout`: seconds without a single byte (heartbeats count) before the
      connection is taken for dead; `timeout`: connect and write timeout.
    - `max_event_size`: the decoder's bound on one event, in bytes.
    - `client`: an `httpx.Client` to send with (its base URL, auth, transport); it is left
      open.
    """
    return EventSource(
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

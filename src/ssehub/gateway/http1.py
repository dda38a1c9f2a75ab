"""A lean HTTP/1.1 client for the upstream leg of the relay (RFC 9112).

Why not httpx: on the path to a relayed first token, httpx and httpcore cost about as much
CPU as everything else the gateway does for a request (pool bookkeeping, anyio cancel
scopes, h11's per-event state machine, two awaits per network read). This client does
one thing: requests to a few origins over kept-alive connections, on an
`asyncio.Protocol`, so a response head or a network read wakes the waiting task once.

- One request at a time per connection (no pipelining); idle connections are kept per
  origin, newest first, and dropped when the server closes them.
- Bodies framed by `Transfer-Encoding: chunked`, `Content-Length` or the connection's
  end (RFC 9112 6.3). A piece of body is everything one network read brought, de-chunked:
  a burst of events is one piece, not one per chunk.
- TLS through an `ssl.SSLContext` (the system's trust store by default).
- Timeouts: connecting, and each wait for data (head or body). No redirects, cookies or
  retries: a relay passes the upstream's answer on as it is.
- A response not read to its end closes its connection: the upstream sees the client go,
  and the connection cannot be handed out with a half-read body in it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httpx

# Bounds on what a server may send before its body: a head larger than this, or a chunk
# size line longer than that, is not an HTTP server speaking to us.
MAX_HEAD = 65_536
MAX_CHUNK_LINE = 4_096
# Stop reading the socket while this much is buffered and not yet taken by the reader
# (back-pressure to the upstream instead of an unbounded buffer).
READ_HIGH_WATER = 1_048_576
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) (\d{3})(?: ([^\r\n]*))?\Z")
_NO_BODY = frozenset({204, 304})


class HTTPError(Exception):
    """The exchange with the upstream failed (no usable HTTP response)."""


class ConnectError(HTTPError):
    """The connection (TCP or TLS) could not be made."""


class Timeout(HTTPError):
    """Connecting, or waiting for data, took longer than allowed."""


class ProtocolError(HTTPError):
    """The server broke HTTP/1.1: a bad head, bad chunked framing, or it closed early."""


class NoResponse(ProtocolError):
    """The connection ended before a single byte of the response came."""


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed request URL: the origin to connect to and the request target to send."""

    scheme: str
    host: str
    port: int
    target: bytes  # path and query, as sent in the request line
    host_header: bytes

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        if port != default:
            shown += f":{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, host, port, target.encode("ascii"), shown.encode("idna"))


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    read: float = 600.0  # between two pieces of data; a reasoning model may think long


class _Connection(asyncio.Protocol):
    """One connection: a receive buffer, and what waits on it: a response head (parsed
    as the data comes, so its arrival wakes the requester directly) or a body reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.head: asyncio.Future[Response] | None = None
        self.head_timer: asyncio.TimerHandle | None = None
        self.pending: tuple[Pool, Target] | None = None
        self.eof = False
        self.error: Exception | None = None
        self.paused = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not subclasses of asyncio.Transport.)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_HIGH_WATER and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        if self.head is not None:
            self._parse_head()
        else:
            self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._ended()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.error = exc
        self._ended()

    def _ended(self) -> None:
        if self.head is not None:
            self._parse_head()
        else:
            self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the response head -------------------------------------------------------------

    def expect_head(self, pool: Pool, target: Target, timeout: float) -> asyncio.Future[Response]:
        head: asyncio.Future[Response] = self.loop.create_future()
        self.head, self.pending = head, (pool, target)
        self.head_timer = self.loop.call_later(timeout, self._head_failed, None)
        head.add_done_callback(self._head_done)
        if self.buffer or self.eof:
            self._parse_head()
        return head

    def _head_done(self, head: asyncio.Future[Response]) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.head is head:  # cancelled by its requester: nobody will read the answer
            self.head = self.pending = None
            self.close()

    def _head_failed(self, error: HTTPError | None) -> None:
        head = self.head
        self.head = self.pending = None
        self.close()
        if head is not None and not head.done():
            head.set_exception(error or Timeout("the upstream did not answer in time"))

    def _parse_head(self) -> None:
        assert self.head is not None
        assert self.pending is not None
        try:
            response = _parse_head(self, *self.pending)
        except HTTPError as error:
            self._head_failed(error)
            return
        if response is not None:
            head = self.head
            self.head = self.pending = None
            head.set_result(response)
            if self.buffer or self.eof:
                self._wake()

    # -- for the response --------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.eof and self.transport is not None and not self.transport.is_closing()

    async def wait(self, seconds: float) -> None:
        """Until more data comes or the connection ends; `Timeout` after `seconds`."""
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(seconds, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if self.waiter is waiter:
                self.waiter = None

    def close(self) -> None:
        self.eof = True
        if self.transport is not None:
            self.transport.close()


def _parse_head(conn: _Connection, pool: Pool, target: Target) -> Response | None:
    """The response whose head is in `conn.buffer` (taken out of it), None until it is
    complete; interim 1xx responses (RFC 9110 15.2) are skipped."""
    while True:
        match = _HEAD_END.search(conn.buffer)
        if match is None:
            if len(conn.buffer) > MAX_HEAD:
                raise ProtocolError("the upstream's response head is too large")
            if conn.eof:
                raise (ProtocolError if conn.buffer else NoResponse)(
                    "the upstream closed the connection without a response"
                    + (f" ({conn.error})" if conn.error else "")
                )
            return None
        raw = bytes(conn.buffer[: match.start()])
        del conn.buffer[: match.end()]
        status_line, *header_lines = raw.split(b"\n")
        status = _STATUS_LINE.match(status_line.rstrip(b"\r"))
        if status is None:
            raise ProtocolError(f"not an HTTP/1.x response: {status_line[:80]!r}")
        code = int(status[2])
        headers: dict[str, str] = {}
        for line in header_lines:
            name, colon, value = line.rstrip(b"\r").partition(b":")
            if not colon or not name or name != name.strip():
                raise ProtocolError(f"bad header line: {line[:80]!r}")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if 100 <= code < 200 and code != 101:
            continue
        tokens = {t.strip() for t in headers.get("connection", "").lower().split(",")}
        keep_alive = status[1] == b"1" and "close" not in tokens
        reason = (status[3] or b"").decode("latin-1")
        return Response(pool, target.origin, conn, code, reason, headers, keep_alive)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(Timeout("no data from the upstream in time"))


class Response:
    """A response whose head has been read. Read the body with `receive()` or
    `aiter_bytes()`; `aclose()` gives the connection back, or closes it when the body
    was not read to its end."""

    def __init__(
        self,
        pool: Pool,
        origin: tuple[str, str, int],
        conn: _Connection,
        status: int,
        reason: str,
        headers: dict[str, str],
        keep_alive: bool,
    ) -> None:
        self.status_code = status
        self.reason_phrase = reason
        self.headers = headers
        self._pool = pool
        self._origin = origin
        self._conn: _Connection | None = conn
        self._keep_alive = keep_alive
        self._timeout = pool.timeouts.read
        # Framing (RFC 9112 6.3): chunked, a length, or until the connection closes.
        self._chunked = False
        self._remaining = -1  # bytes left of a Content-Length body, or of the current chunk
        self._chunk_state = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailers
        self._done = False
        encoding = headers.get("transfer-encoding", "").lower()
        if status in _NO_BODY or 100 <= status < 200:
            self._done = True
        elif encoding:
            # Only a final `chunked` frames the body; otherwise it ends with the connection.
            self._chunked = encoding.rsplit(",", 1)[-1].strip() == "chunked"
            if self._chunked:
                self._remaining = 0
            else:
                self._keep_alive = False
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"].split(",")[0])
            except ValueError:
                raise ProtocolError("bad Content-Length") from None
            if self._remaining < 0:
                raise ProtocolError("bad Content-Length")
            self._done = self._remaining == 0
        else:
            self._keep_alive = False
        if self._done:
            self._release()

    async def receive(self) -> bytes:
        """The next piece of the body (all that is buffered now); b"" at its end."""
        while True:
            conn = self._conn
            if conn is None:
                return b""
            piece = self._take(conn)
            if piece:
                return piece
            if self._done:
                self._release()
                return b""
            if conn.eof:
                if not self._chunked and self._remaining < 0:
                    self._done = True  # delimited by the connection's end
                    self._keep_alive = False
                    self._release()
                    return b""
                self.close()
                raise ProtocolError("the upstream closed the connection before the body's end")
            try:
                await conn.wait(self._timeout)
            except BaseException:
                self.close()
                raise

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while piece := await self.receive():
            yield piece

    async def read(self, limit: int) -> bytes:
        """The body, or its first `limit` bytes (the connection is then closed)."""
        received = bytearray()
        while len(received) < limit and (piece := await self.receive()):
            received += piece
        if len(received) >= limit:
            self.close()
        return bytes(received[:limit])

    async def aclose(self) -> None:
        if self._conn is not None:
            if self._done:
                self._release()
            else:
                self.close()

    def close(self) -> None:
        """Drop the connection now (the upstream sees it closed)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._keep_alive and not conn.buffer and conn.usable:
            self._pool.put(self._origin, conn)
        else:
            conn.close()

    def _take(self, conn: _Connection) -> bytes:
        """Remove the body bytes that are in the buffer, de-chunked."""
        buffer = conn.buffer
        if not buffer or self._done:
            return b""
        if not self._chunked:
            if self._remaining < 0:
                piece = bytes(buffer)
                buffer.clear()
                return piece
            piece = bytes(buffer[: self._remaining])
            del buffer[: len(piece)]
            self._remaining -= len(piece)
            self._done = self._remaining == 0
            return piece
        out: list[bytes] = []
        pos = 0
        end = len(buffer)
        while pos < end:
            state = self._chunk_state
            if state == 1:  # chunk data
                n = min(self._remaining, end - pos)
                out.append(bytes(buffer[pos : pos + n]))
                pos += n
                self._remaining -= n
                if self._remaining == 0:
                    self._chunk_state = 2
                continue
            newline = buffer.find(b"\n", pos)
            if newline < 0:
                if end - pos > MAX_CHUNK_LINE:
                    raise ProtocolError("chunked framing: line too long")
                break
            line = bytes(buffer[pos:newline]).rstrip(b"\r")
            pos = newline + 1
            if state == 0:  # chunk-size [; extensions]
                size = line.split(b";", 1)[0].strip()
                try:
                    self._remaining = int(size, 16)
                except ValueError:
                    raise ProtocolError(f"chunked framing: bad size {size[:20]!r}") from None
                if self._remaining < 0:
                    raise ProtocolError("chunked framing: bad size")
                self._chunk_state = 1 if self._remaining else 3
            elif state == 2:  # the CRLF after a chunk's data
                if line:
                    raise ProtocolError("chunked framing: data longer than its size")
                self._chunk_state = 0
            elif not line:  # state 3: trailer fields end with an empty line
                self._done = True
                break
        del buffer[:pos]
        return b"".join(out)


class Pool:
    """Kept-alive connections per origin, and the requests sent over them."""

    def __init__(
        self,
        timeouts: Timeouts | None = None,
        *,
        max_idle: int = 64,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.timeouts = timeouts or Timeouts()
        self.max_idle = max_idle
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._closed = False

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # httpx's verification (certifi's CA bundle, or SSL_CERT_FILE/SSL_CERT_DIR), as
            # every other HTTPS client in ssehub uses.
            context = httpx.create_ssl_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    def put(self, origin: tuple[str, str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if self._closed or len(idle) >= self.max_idle:
            conn.close()
        else:
            idle.append(conn)

    async def _connect(self, target: Target, reuse: bool = True) -> tuple[_Connection, bool]:
        """A connection to `target`, and whether it is a kept-alive one being reused."""
        idle = self._idle.get(target.origin)
        while reuse and idle:
            conn = idle.pop()
            if conn.usable and not conn.buffer:
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        conn = _Connection(loop)
        tls = target.scheme == "https"
        try:
            async with asyncio.timeout(self.timeouts.connect):
                # (uvloop may call `connection_made` after this returns.)
                conn.transport, _ = await loop.create_connection(
                    lambda: conn,
                    target.host,
                    target.port,
                    ssl=self._ssl() if tls else None,
                    server_hostname=target.host if tls else None,
                )
        except TimeoutError:
            conn.close()
            raise Timeout(f"connecting to {target.host}:{target.port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            conn.close()
            raise ConnectError(f"cannot connect to {target.host}:{target.port}: {exc}") from exc
        return conn, False

    async def send(
        self,
        method: str,
        target: Target,
        headers: Mapping[str, str],
        body: bytes = b"",
    ) -> asyncio.Future[Response]:
        """Send a request; the future is resolved when the response head has come.

        Cancelling the future closes the connection (the upstream sees the client go).
        """
        if self._closed:
            raise HTTPError("the client is closed")
        conn, reused = await self._connect(target)
        head = self._write(conn, method, target, headers, body)
        if not reused:
            return head
        # A kept-alive connection the upstream closed as the request went out (its idle
        # timeout) is no answer: RFC 9112 9.3.1 lets a client send again on a new one.
        outer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        def settle(inner: asyncio.Future[Response]) -> None:
            if outer.done():
                return
            if inner.cancelled():
                outer.cancel()
            elif isinstance(inner.exception(), NoResponse):
                retry = asyncio.ensure_future(self._resend(method, target, headers, body))
                outer.add_done_callback(lambda _: retry.cancel())
                retry.add_done_callback(lambda task: _chain(task, outer))
            elif (error := inner.exception()) is not None:
                outer.set_exception(error)
            else:
                outer.set_result(inner.result())

        head.add_done_callback(settle)
        outer.add_done_callback(lambda _: head.cancel())
        return outer

    async def _resend(
        self, method: str, target: Target, headers: Mapping[str, str], body: bytes
    ) -> Response:
        conn, _ = await self._connect(target, reuse=False)
        head = self._write(conn, method, target, headers, body)
        try:
            return await head
        except BaseException:
            head.cancel()
            raise

    def _write(
        self,
        conn: _Connection,
        method: str,
        target: Target,
        headers: Mapping[str, str],
        body: bytes,
    ) -> asyncio.Future[Response]:
        lines = [
            method.encode("ascii") + b" " + target.target + b" HTTP/1.1",
            b"host: " + target.host_header,
        ]
        lines.extend(f"{name}: {value}".encode("latin-1") for name, value in headers.items())
        if body or method not in ("GET", "HEAD"):
            lines.append(b"content-length: " + str(len(body)).encode())
        assert conn.transport is not None
        head = conn.expect_head(self, target, self.timeouts.read)
        conn.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        return head

    async def request(
        self,
        method: str,
        target: Target,
        headers: Mapping[str, str],
        body: bytes = b"",
    ) -> Response:
        """Send a request and wait for the response head."""
        head = await self.send(method, target, headers, body)
        try:
            return await head
        except BaseException:
            head.cancel()
            raise

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _chain(task: asyncio.Future[Response], outer: asyncio.Future[Response]) -> None:
    """Settle `outer` as `task` ended (unless `outer` was settled or cancelled first)."""
    if outer.done():
        if not task.cancelled() and task.exception() is None:
            task.result().close()  # nobody will read it: free its connection
        return
    if task.cancelled():
        outer.cancel()
    elif (error := task.exception()) is not None:
        outer.set_exception(error)
    else:
        outer.set_result(task.result())

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
- HTTP proxies (`Proxies`): https origins through a `CONNECT` tunnel, http origins with
  absolute-form request targets (RFC 9112 3.2.2 and 9.3.6). Which proxy reaches an origin
  is decided once per origin, so the direct path does no proxy work per request.
- Timeouts: connecting, and each wait for data (head or body). No redirects, cookies or
  retries: a relay passes the upstream's answer on as it is.
- A response not read to its end closes its connection: the upstream sees the client go,
  and the connection cannot be handed out with a half-read body in it.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import re
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import unquote, urlsplit

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


class ProxyError(ConnectError):
    """The proxy could not be reached, or refused to carry the request (its answer is in
    the message, never its credentials)."""


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


# The variables curl and httpx read; the lower-case one first, as both do.
PROXY_VARIABLES = {
    "http": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"),
    "https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
}
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")
# Every variable `Proxies.from_environ` reads (tests and benchmarks clear them).
PROXY_ENVIRONMENT = (*PROXY_VARIABLES["https"], "http_proxy", "HTTP_PROXY", *NO_PROXY_VARIABLES)


def _redacted(url: str) -> str:
    """`url` with everything before its last `@` after the scheme (user and password,
    even a malformed one) replaced by `***`, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy: where it listens, and the `Proxy-Authorization` it is sent."""

    host: str
    port: int
    url: str  # `http://host:port`, without credentials: what messages show
    authorization: str | None = field(default=None, repr=False)  # `Basic ...`

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """`http://[user:pass@]host[:port]` (no scheme means http://, as in curl and httpx;
        no port means 80). Credentials are percent-decoded. Raises `ValueError` with a
        message that never contains the password."""
        raw = url.strip()
        shown = _redacted(raw)
        if "://" not in raw:
            raw = "http://" + raw
        try:
            parts = urlsplit(raw)
            port = 80 if parts.port is None else parts.port
            if not port:
                raise ValueError
        except ValueError:
            # (Not the parser's words: they can quote a piece of the password.)
            raise ValueError(f"not a proxy URL: {shown!r} (bad host or port)") from None
        if parts.scheme != "http":
            raise ValueError(
                f"unsupported proxy {shown!r}: only http:// proxies are supported, "
                f"not {parts.scheme}://"
            )
        if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"not a proxy URL: {shown!r} (expected http://[user:pass@]host:port)")
        host = parts.hostname
        authorization = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            token = base64.b64encode(credentials.encode("utf-8")).decode("ascii")
            authorization = f"Basic {token}"
        bracketed = f"[{host}]" if ":" in host else host
        return cls(host, port, f"http://{bracketed}:{port}", authorization)


def _split_port(entry: str) -> tuple[str, int | None]:
    """A NO_PROXY entry as (host, port or None): `host:port`, `[v6]:port`, `[v6]`."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    host, colon, port = entry.rpartition(":")
    if colon and ":" not in host and port.isdigit():
        return host, int(port)
    return entry, None  # no port, or a bare IPv6 address


def bypasses_proxy(no_proxy: str, host: str, port: int) -> bool:
    """Whether a `NO_PROXY` list excludes `host:port`, by curl's rules: entries separated
    by commas; `*` alone excludes every host; a name excludes itself and its subdomains
    (`example.com` and `.example.com` alike); an IP address or CIDR block excludes the
    hosts written as such an address (no DNS); `host:port` excludes only that port."""
    host = host.lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for item in no_proxy.split(","):
        entry = item.strip().lower()
        if entry == "*":
            return True
        name, only_port = _split_port(entry)
        if not name or (only_port is not None and only_port != port):
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except (ValueError, TypeError):
                pass  # a name, or an address of the other IP version
            continue
        name = name.lstrip("*").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


class Proxies:
    """Which proxy, if any, reaches an origin: one given for all of them, or the one the
    environment names, as curl and httpx choose it (`https_proxy`/`HTTPS_PROXY` for https
    origins, `http_proxy`/`HTTP_PROXY` for http ones, `all_proxy`/`ALL_PROXY` for both,
    lower case first; `no_proxy`/`NO_PROXY` excludes hosts). `NO_PROXY` applies to the
    environment's proxies only: an explicit proxy is used for every origin."""

    def __init__(
        self, explicit: Proxy | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self.explicit = explicit
        # A copy: the choice does not change with the process's environment later on.
        self._environ = {
            name: environ[name] for name in PROXY_ENVIRONMENT if environ and environ.get(name)
        }

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Proxies:
        """The environment's choice (`os.environ` unless given), as it is now."""
        return cls(None, os.environ if environ is None else environ)

    def for_origin(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for `scheme://host:port`, or None to connect directly. Raises
        `ValueError` when the variable that applies is not a usable proxy URL."""
        if self.explicit is not None:
            return self.explicit
        env = self._environ
        found = next((name for name in PROXY_VARIABLES.get(scheme, ()) if name in env), None)
        if found is None:
            return None
        no_proxy = next((env[name] for name in NO_PROXY_VARIABLES if name in env), "")
        if no_proxy and bypasses_proxy(no_proxy, host, port):
            return None
        try:
            return Proxy.parse(env[found])
        except ValueError as exc:
            raise ValueError(f"{found}, the proxy for {scheme}://{host}:{port}: {exc}") from None


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
        # Set when requests go to a proxy in absolute form (an http origin via a proxy).
        self.forward: _Forward | None = None

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

    def abort(self) -> None:
        """Close now, without TLS's closing exchange: that would outlive a loop that is
        about to close (uvloop then reports an error and an unclosed transport)."""
        self.eof = True
        if self.transport is not None:
            self.transport.abort()


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
        if code == 407 and conn.forward is not None:
            # Only the proxy asks for proxy credentials (RFC 9110 15.5.8): not the upstream's
            # answer, so not passed on as one.
            reason = (status[3] or b"").decode("latin-1")
            raise ProxyError(
                f"the proxy {conn.forward.proxy.url} refused the request to "
                f"{conn.forward.prefix.decode('latin-1')}: 407 {reason}".rstrip()
            )
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


@dataclass(frozen=True, slots=True)
class _Forward:
    """How requests to an http origin are written for the proxy that carries them."""

    proxy: Proxy
    prefix: bytes  # scheme and authority before the path: absolute form (RFC 9112 3.2.2)
    lines: tuple[bytes, ...]  # the Proxy-Authorization header line, when it has credentials


class _Route:
    """How the pool reaches one origin, decided once: directly, or through a proxy; and
    the origin's idle connections. Connections are kept per origin, and an origin has one
    route in a pool, so a tunnel to A never carries a request for B and a proxied
    connection is never taken for a direct one."""

    __slots__ = ("forward", "idle", "proxy")

    def __init__(self, target: Target, proxy: Proxy | None) -> None:
        self.proxy = proxy
        self.idle: list[_Connection] = []
        self.forward: _Forward | None = None
        if proxy is not None and target.scheme == "http":
            lines = (
                (b"proxy-authorization: " + proxy.authorization.encode("ascii"),)
                if proxy.authorization
                else ()
            )
            self.forward = _Forward(proxy, b"http://" + target.host_header, lines)


async def _open_tunnel(conn: _Connection, proxy: Proxy, target: Target, within: float) -> None:
    """Ask the proxy on `conn` for a tunnel to `target` (RFC 9110 9.3.6) and read its
    answer; raises `ProxyError` unless it is a 2xx."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    authority = f"{host}:{target.port}"
    wire = authority.encode("idna")
    lines = [b"CONNECT " + wire + b" HTTP/1.1", b"host: " + wire]
    if proxy.authorization:
        lines.append(b"proxy-authorization: " + proxy.authorization.encode("ascii"))
    assert conn.transport is not None
    conn.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
    refused = f"the proxy {proxy.url} refused CONNECT to {authority}"
    while (end := _HEAD_END.search(conn.buffer)) is None:
        if len(conn.buffer) > MAX_HEAD:
            raise ProxyError(f"{refused}: its answer's head is too large")
        if conn.eof:
            raise ProxyError(f"{refused}: it closed the connection without an answer")
        await conn.wait(within)  # (the caller's asyncio.timeout bounds the whole connect)
    status_line = bytes(conn.buffer[: end.start()]).split(b"\n", 1)[0].rstrip(b"\r")
    status = _STATUS_LINE.match(status_line)
    if status is None:
        raise ProxyError(f"{refused}: not an HTTP answer: {status_line[:80]!r}")
    if status[2][:1] != b"2":
        answer = f"{status[2].decode()} {(status[3] or b'').decode('latin-1')}".rstrip()
        raise ProxyError(f"{refused}: {answer}")
    if len(conn.buffer) > end.end():
        # The origin speaks only after the TLS client hello: bytes now are the proxy's.
        raise ProxyError(f"{refused}: it sent data after its 2xx answer")
    conn.buffer.clear()


class Pool:
    """Kept-alive connections per origin, and the requests sent over them."""

    def __init__(
        self,
        timeouts: Timeouts | None = None,
        *,
        max_idle: int = 64,
        ssl_context: ssl.SSLContext | None = None,
        proxies: Proxies | None = None,
    ) -> None:
        self.timeouts = timeouts or Timeouts()
        self.max_idle = max_idle
        self._ssl_context = ssl_context
        self._proxies = proxies or Proxies()
        self._routes: dict[tuple[str, str, int], _Route] = {}
        self._closed = False

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # httpx's verification (certifi's CA bundle, or SSL_CERT_FILE/SSL_CERT_DIR), as
            # every other HTTPS client in ssehub uses.
            context = httpx.create_ssl_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    def proxy_for(self, target: Target) -> Proxy | None:
        """The proxy requests to `target`'s origin go through (None: directly). Raises
        `ValueError` when the environment names one that cannot be used."""
        return self._route(target).proxy

    def _route(self, target: Target) -> _Route:
        route = self._routes.get(target.origin)
        if route is None:
            proxy = self._proxies.for_origin(target.scheme, target.host, target.port)
            route = self._routes[target.origin] = _Route(target, proxy)
        return route

    def put(self, origin: tuple[str, str, int], conn: _Connection) -> None:
        route = self._routes.get(origin)
        if self._closed or route is None or len(route.idle) >= self.max_idle:
            conn.close()
        else:
            route.idle.append(conn)

    async def _connect(self, target: Target, reuse: bool = True) -> tuple[_Connection, bool]:
        """A connection to `target`, and whether it is a kept-alive one being reused."""
        route = self._routes.get(target.origin)
        if route is None:
            try:
                route = self._route(target)
            except ValueError as exc:
                raise ConnectError(str(exc)) from None
        idle = route.idle
        while reuse and idle:
            conn = idle.pop()
            if conn.usable and not conn.buffer:
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        conn = _Connection(loop)
        proxy = route.proxy
        tls = target.scheme == "https"
        try:
            # One bound for all of it: TCP, and through a proxy its answer and TLS too.
            async with asyncio.timeout(self.timeouts.connect):
                if proxy is None:
                    # (uvloop may call `connection_made` after this returns.)
                    conn.transport, _ = await loop.create_connection(
                        lambda: conn,
                        target.host,
                        target.port,
                        ssl=self._ssl() if tls else None,
                        server_hostname=target.host if tls else None,
                    )
                else:
                    await self._connect_through(conn, route, proxy, target)
        except TimeoutError:
            conn.close()
            raise Timeout(
                f"connecting to {target.host}:{target.port}{_through(proxy)} timed out"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            conn.close()
            raise ConnectError(
                f"cannot connect to {target.host}:{target.port}{_through(proxy)}: {exc}"
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn, False

    async def _connect_through(
        self, conn: _Connection, route: _Route, proxy: Proxy, target: Target
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn.transport, _ = await loop.create_connection(lambda: conn, proxy.host, proxy.port)
        except OSError as exc:
            raise ProxyError(
                f"cannot connect to the proxy {proxy.url} (for {target.host}:{target.port}): {exc}"
            ) from exc
        if target.scheme == "http":
            conn.forward = route.forward
            return
        await _open_tunnel(conn, proxy, target, self.timeouts.connect)
        # The origin's TLS inside the tunnel; the connection keeps its protocol (`conn`).
        transport = await loop.start_tls(
            conn.transport, conn, self._ssl(), server_hostname=target.host
        )
        if transport is None:
            raise ConnectError(f"TLS to {target.host}:{target.port} did not start")
        conn.transport = transport

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
        forward = conn.forward
        if forward is None:
            lines = [
                method.encode("ascii") + b" " + target.target + b" HTTP/1.1",
                b"host: " + target.host_header,
            ]
        else:
            lines = [
                method.encode("ascii") + b" " + forward.prefix + target.target + b" HTTP/1.1",
                b"host: " + target.host_header,
                *forward.lines,
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
        for route in self._routes.values():
            for conn in route.idle:
                conn.abort()
            route.idle.clear()


def _through(proxy: Proxy | None) -> str:
    return "" if proxy is None else f" through the proxy {proxy.url}"


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

"""The upstream HTTP/1.1 client against raw servers that answer exactly what a test says."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from ssehub.gateway import http1

from _support import self_signed_cert

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, list[tuple[int, int]]]]:
    """A server on a free port; yields its base URL and the (connection, request) numbers."""
    seen: list[tuple[int, int]] = []
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        requests = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                requests += 1
                seen.append((number, requests))
                await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ssl_context)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if ssl_context else "http"
    async with server:
        yield f"{scheme}://localhost:{port}" if ssl_context else f"http://127.0.0.1:{port}", seen


def writes(*pieces: bytes, close: bool = False) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)  # read apart by the client
        if close:
            writer.close()

    return handler


async def fetch(pool: http1.Pool, url: str) -> tuple[http1.Response, bytes]:
    response = await pool.request("POST", http1.Target.parse(url + "/v1/x"), {}, b"{}")
    body = b""
    while piece := await response.receive():
        body += piece
    return response, body


@pytest.mark.anyio
async def test_chunked_body_cut_anywhere_with_extensions_and_trailers() -> None:
    handler = writes(
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n5;ext=1\r",
        b"\nhel",
        b"lo\r\n6\r\n world\r",
        b"\n0\r\nTrailer: x\r\n",
        b"\r\n",
    )
    async with raw_server(handler) as (url, seen):
        pool = http1.Pool()
        response, body = await fetch(pool, url)
        assert (response.status_code, response.reason_phrase) == (200, "OK")
        assert response.headers["x-a"] == "1, 2"
        assert body == b"hello world"
        # The connection went back to the pool and serves the next request.
        _, again = await fetch(pool, url)
        assert again == b"hello world"
        assert seen == [(1, 1), (1, 2)]
        await pool.aclose()


@pytest.mark.anyio
async def test_content_length_and_close_delimited_bodies() -> None:
    async with raw_server(
        writes(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\n", b"nope")
    ) as (
        url,
        _,
    ):
        pool = http1.Pool()
        response, body = await fetch(pool, url)
        assert (response.status_code, body) == (404, b"nope")
        await pool.aclose()
    async with raw_server(writes(b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the end", close=True)) as (
        url,
        seen,
    ):
        pool = http1.Pool()
        _, body = await fetch(pool, url)
        assert body == b"until the end"
        _, body = await fetch(pool, url)  # that connection could not be reused
        assert seen == [(1, 1), (2, 1)]
        await pool.aclose()


@pytest.mark.anyio
async def test_a_body_cut_short_is_an_error() -> None:
    handler = writes(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", close=True)
    async with raw_server(handler) as (url, _):
        pool = http1.Pool()
        with pytest.raises(http1.ProtocolError, match="before the body's end"):
            await fetch(pool, url)
        await pool.aclose()


@pytest.mark.anyio
async def test_no_answer_times_out_and_refused_is_a_connect_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with raw_server(silent) as (url, _):
        pool = http1.Pool(http1.Timeouts(connect=5, read=0.2))
        with pytest.raises(http1.Timeout):
            await fetch(pool, url)
        await pool.aclose()
    pool = http1.Pool()
    with pytest.raises(http1.ConnectError):
        await fetch(pool, url)


@pytest.mark.anyio
async def test_closing_a_response_early_closes_its_connection() -> None:
    closed = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not reader.at_eof():
            writer.write(b"3\r\nabc\r\n")
            await writer.drain()
            try:
                await asyncio.wait_for(reader.read(1), 0.01)
            except TimeoutError:
                continue
        closed.set()

    async with raw_server(endless) as (url, _):
        pool = http1.Pool()
        response = await pool.request("POST", http1.Target.parse(url + "/v1/x"), {}, b"")
        assert await response.receive()
        await response.aclose()
        await asyncio.wait_for(closed.wait(), 10)
        await pool.aclose()


@pytest.mark.anyio
async def test_https(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    handler = writes(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
    async with raw_server(handler, server_context) as (url, seen):
        # Not trusted by default: a TLS failure is a connect error.
        with pytest.raises(http1.ConnectError):
            await fetch(http1.Pool(), url)
        client_context = ssl.create_default_context(cafile=str(cert))
        pool = http1.Pool(ssl_context=client_context)
        _, body = await fetch(pool, url)
        _, again = await fetch(pool, url)
        assert body == again == b"secret"
        assert seen == [(1, 1), (1, 2)]  # one connection, kept alive
        await pool.aclose()


@pytest.mark.anyio
async def test_a_kept_alive_connection_closed_unanswered_is_retried_once_on_a_new_one() -> None:
    """The upstream's idle timeout fires as a request goes out: send again (RFC 9112 9.3.1)."""

    async def answer_once_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if handled.setdefault(id(writer), 0):
            writer.transport.abort()  # the second request on this connection: no answer
            raise ConnectionError
        handled[id(writer)] = 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    handled: dict[int, int] = {}
    async with raw_server(answer_once_per_connection) as (url, seen):
        pool = http1.Pool()
        try:
            for _ in range(3):
                response, body = await fetch(pool, url)
                assert (response.status_code, body) == (200, b"ok")
        finally:
            await pool.aclose()
    # Each reused connection died unanswered and the request went out again on a new one.
    assert seen == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]


@pytest.mark.anyio
async def test_a_new_connection_closed_unanswered_is_an_error_not_a_retry() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()
        raise ConnectionError

    async with raw_server(hang_up) as (url, seen):
        pool = http1.Pool()
        try:
            with pytest.raises(http1.ProtocolError, match="without a response"):
                await fetch(pool, url)
        finally:
            await pool.aclose()
    assert seen == [(1, 1)]

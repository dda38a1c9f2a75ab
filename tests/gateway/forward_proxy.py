"""A forward HTTP proxy for tests, as corporate networks run them (squid and the like):
`CONNECT host:port` tunnels and absolute-form requests (`POST http://host/path`), over
kept-alive client connections. It can demand Basic credentials (407 without them) and
records every request head it got, for tests to assert on."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from _support import wait_for

# Hop-by-hop: for the proxy, not passed on (RFC 9110 7.6.1).
_HOP_BY_HOP = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}


@dataclass(frozen=True)
class ProxySeen:
    """A request head the proxy got: `CONNECT host:port` or an absolute-form request."""

    method: str
    target: str
    headers: dict[str, str]  # names in lower case


class ForwardProxy:
    """The proxy's state; run it with `forward_proxy()`."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.seen: list[ProxySeen] = []
        self.connections = 0  # client connections accepted
        self.url = ""
        self.expected = (
            None
            if credentials is None
            else "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        )

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        origins: dict[tuple[str, int], tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                self.seen.append(ProxySeen(method, target, headers))
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if self.expected and headers.get("proxy-authorization") != self.expected:
                    writer.write(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                        b'Proxy-Authenticate: Basic realm="test"\r\n'
                        b"Content-Length: 15\r\n\r\nwho are you?..."
                    )
                    await writer.drain()
                    if method == "CONNECT":
                        return
                    continue
                if method == "CONNECT":
                    await self._tunnel(target, reader, writer)
                    return
                if not await self._forward(method, target, headers, body, origins, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            await _close(writer, *(origin_writer for _, origin_writer in origins.values()))

    async def _tunnel(
        self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host, _, port = target.rpartition(":")
        try:
            origin_reader, origin_writer = await asyncio.open_connection(
                host.strip("[]"), int(port)
            )
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            await asyncio.gather(_pipe(reader, origin_writer), _pipe(origin_reader, writer))
        finally:
            await _close(origin_writer)

    async def _forward(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        origins: dict[tuple[str, int], tuple[asyncio.StreamReader, asyncio.StreamWriter]],
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Send an absolute-form request on to its origin in origin form and relay the
        answer; whether the client connection can carry another request."""
        url = urlsplit(target)
        assert url.hostname, f"not absolute form: {target}"
        key = (url.hostname, url.port or 80)
        if key not in origins:
            origins[key] = await asyncio.open_connection(*key)
        origin_reader, origin_writer = origins[key]
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        lines = [f"{method} {path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in headers.items() if k not in _HOP_BY_HOP]
        origin_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        head = await origin_reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        answer = head.decode("latin-1").lower()
        if "transfer-encoding: chunked" in answer:
            while True:
                size_line = await origin_reader.readuntil(b"\r\n")
                writer.write(size_line)
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while (trailer := await origin_reader.readuntil(b"\r\n")) != b"\r\n":
                        writer.write(trailer)
                    writer.write(b"\r\n")
                    break
                writer.write(await origin_reader.readexactly(size + 2))
                await writer.drain()
        elif "content-length:" in answer:
            length = int(answer.split("content-length:", 1)[1].split("\r\n", 1)[0])
            writer.write(await origin_reader.readexactly(length))
        else:
            await _pipe(origin_reader, writer)
            return False
        await writer.drain()
        return True


async def _close(*writers: asyncio.StreamWriter) -> None:
    """Close and wait: a socket left to a later loop iteration may outlive the loop."""
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()


@contextlib.contextmanager
def forward_proxy(credentials: tuple[str, str] | None = None) -> Iterator[ForwardProxy]:
    """A `ForwardProxy` on a free port of 127.0.0.1, served from a thread of its own."""
    proxy = ForwardProxy(credentials)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    handlers: set[asyncio.Task[None]] = set()

    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await proxy.serve(reader, writer)
            finally:
                handlers.discard(task)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        proxy.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            await stop.wait()
            for task in list(handlers):
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        wait_for(lambda: proxy.url, 10.0, what="the proxy to listen")
        yield proxy
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()

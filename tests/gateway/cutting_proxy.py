"""A TCP proxy that cuts its first connection after some bytes from the server: a
connection dropped mid-stream, as a flaky network or a reload does it."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from _support import free_port


@contextlib.contextmanager
def cutting_proxy(target_port: int, cut_after: int) -> Iterator[tuple[str, list[int]]]:
    """Yields (base URL, bytes relayed to the client per connection)."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    relayed: list[int] = []
    stop = threading.Event()

    def pipe(src: socket.socket, dst: socket.socket, index: int | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if index is not None:
                    if index == 0 and relayed[0] + len(data) >= cut_after:
                        dst.sendall(data[: cut_after - relayed[0]])
                        relayed[0] = cut_after
                        break
                    relayed[index] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", target_port))
            index = len(relayed)
            relayed.append(0)
            threading.Thread(target=pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client, index), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", relayed
    finally:
        stop.set()
        thread.join(5)
        listener.close()

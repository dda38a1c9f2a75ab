"""A private `redis-server` for tests: free port, temp dir, never the shared one on 6379."""

from __future__ import annotations

import atexit
import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from _support import free_port, require_binary, wait_for_port

INSTALL = "apt-get install -y redis-server"


class RedisServer:
    """`redis-server` on a free port. `persist=True` keeps data across `restart` (AOF,
    fsync always), as a production Redis would; otherwise a restart loses everything."""

    def __init__(self, *, persist: bool = False) -> None:
        self.binary = require_binary("redis-server", INSTALL)
        self.port = free_port()
        self.persist = persist
        self._dir = tempfile.TemporaryDirectory(prefix="ssehub-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persist
            else ["--appendonly", "no"]
        )
        log = Path(self._dir.name) / "redis.log"
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                self._dir.name,
                "--logfile",
                str(log),
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        """Stop at once (SIGKILL): what Redis kept is what it had written to disk."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        self._dir.cleanup()


@contextlib.contextmanager
def redis_server(*, persist: bool = False) -> Iterator[RedisServer]:
    server = RedisServer(persist=persist)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


_shared: RedisServer | None = None


def shared_redis_url() -> str:
    """One server for the whole test session (contract tests use a key prefix each)."""
    global _shared
    if _shared is None:
        _shared = RedisServer()
        _shared.start()
        atexit.register(_shared.cleanup)
    return _shared.url

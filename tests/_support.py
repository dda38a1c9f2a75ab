"""Shared test helpers: free ports, real servers, binaries the tests need."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def require_binary(name: str, install: str) -> str:
    """Path of `name`; skip the test when absent, fail under CI (CI must run every test)."""
    path = shutil.which(name) or (name if os.path.exists(name) else None)
    if path is None:
        message = f"needs {name}: install it with `{install}`"
        if IN_CI:
            pytest.fail(message + " (CI runs every test)")
        pytest.skip(message)
    return path


def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    def connects() -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex((host, port)) == 0

    wait_for(connects, timeout, 0.02, f"{host}:{port} to accept connections")


@contextlib.contextmanager
def serve_in_thread(app: Any, **config: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free port in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    cfg = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **config
    )
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 15.0, 0.01, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextlib.contextmanager
def serve_in_process(
    *args: str, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run `ssehub serve --port P *args` in a subprocess; yields (base URL, process)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "ssehub", "serve", "--port", str(port), *args]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ssehub-test-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        try:
            wait_for_port(port)
        except AssertionError:
            proc.kill()
            raise AssertionError(f"server did not start: {log.read_text()[-2000:]}") from None
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for `localhost` (and its key) made with the openssl binary."""
    openssl = require_binary("openssl", "apt-get install -y openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key

"""The nginx config in docs/deployment.md, for real: nginx in front of two ssehub nodes
sharing a private Redis, streamed through over HTTP/1.1 and over HTTP/2 with TLS."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sse_listener import Listener

from redis_server import redis_server

from _support import (
    free_port,
    require_binary,
    self_signed_cert,
    serve_in_process,
    wait_for,
    wait_for_port,
)

pytestmark = pytest.mark.redis

DOC = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"


def documented_config() -> str:
    """The ```nginx block of docs/deployment.md, exactly as a reader copies it."""
    match = re.search(r"```nginx\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/deployment.md has no ```nginx block"
    return match.group(1)


@contextlib.contextmanager
def nginx_in_front_of(nodes: list[int]) -> Iterator[tuple[str, str]]:
    """nginx with the documented config on free ports; yields (http URL, https URL)."""
    nginx = require_binary("nginx", "apt-get install -y nginx")
    with tempfile.TemporaryDirectory(prefix="ssehub-nginx-") as tmp:
        prefix = Path(tmp)
        # nginx workers drop to an unprivileged user when started as root; let them in.
        prefix.chmod(0o755)
        http_port, https_port = free_port(), free_port()
        cert, key = self_signed_cert(prefix)
        site = documented_config()
        replacements = {
            "server 127.0.0.1:8001;": f"server 127.0.0.1:{nodes[0]};",
            "server 127.0.0.1:8002;": f"server 127.0.0.1:{nodes[1]};",
            "listen 80;": f"listen 127.0.0.1:{http_port};",
            "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
            "/etc/ssl/ssehub/fullchain.pem": str(cert),
            "/etc/ssl/ssehub/privkey.pem": str(key),
        }
        for old, new in replacements.items():
            assert old in site, f"the documented config lost {old!r}"
            site = site.replace(old, new)
        (prefix / "ssehub.conf").write_text(site)
        # What /etc/nginx/nginx.conf would provide around the site file.
        temp = "\n".join(
            f"    {name}_temp_path {prefix / name};"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n"
            f"error_log {prefix / 'error.log'} warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n    access_log off;\n{temp}\n    include {prefix / 'ssehub.conf'};\n}}\n"
        )
        log = (prefix / "stderr.log").open("wb")
        proc = subprocess.Popen(
            [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"),
             "-c", str(prefix / "nginx.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            try:
                wait_for_port(http_port)
                wait_for_port(https_port)
            except AssertionError:
                errors = (prefix / "error.log").read_text(errors="replace")
                raise AssertionError(f"nginx did not start: {errors[-2000:]}") from None
            yield f"http://127.0.0.1:{http_port}", f"https://127.0.0.1:{https_port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def publish(base: str, channel: str, data: str, *, verify: bool = True) -> str:
    response = httpx.post(f"{base}/channels/{channel}", content=data, timeout=10, verify=verify)
    assert response.status_code == 200, response.text
    ids: list[str] = response.json()["ids"]
    return ids[0]


def test_documented_nginx_config_streams_from_two_nodes() -> None:
    with (
        redis_server() as redis,
        serve_in_process("--redis-url", redis.url, "--heartbeat", "0.5") as (one, _),
        serve_in_process("--redis-url", redis.url, "--heartbeat", "0.5") as (two, _),
    ):
        ports = [int(one.rsplit(":", 1)[1]), int(two.rsplit(":", 1)[1])]
        with nginx_in_front_of(ports) as (http_url, https_url):
            channel = f"proxied-{uuid.uuid4().hex[:6]}"
            listeners = [Listener("GET", f"{http_url}/channels/{channel}") for _ in range(4)]
            try:
                wait_for(lambda: all(x.status == 200 for x in listeners), 15, 0.02, "streams")
                # Published through nginx too: round robin lands on both nodes.
                ids = [publish(http_url, channel, f"e{i}") for i in range(6)]
                for listener in listeners:
                    # Each event must arrive while the stream stays open: not buffered.
                    listener.wait(6, timeout=10)
                    assert listener.data() == [f"e{i}" for i in range(6)]
                    assert not listener.ended.is_set()
            finally:
                for listener in listeners:
                    listener.close()

            # Resume through nginx with Last-Event-ID, whichever node gets the request.
            later = [publish(http_url, channel, f"late{i}") for i in range(2)]
            for _ in range(2):
                resumed = Listener(
                    "GET", f"{http_url}/channels/{channel}", headers={"Last-Event-ID": ids[2]}
                )
                try:
                    resumed.wait(5)
                    assert resumed.data()[:5] == ["e3", "e4", "e5", "late0", "late1"]
                    got = [e.id for e in resumed.events if e.event == "message"]
                    assert got[3:5] == later
                finally:
                    resumed.close()

            http2_stream_through_tls(https_url, channel)


def http2_stream_through_tls(https_url: str, channel: str) -> None:
    curl = require_binary("curl", "apt-get install -y curl")
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [curl, "--http2", "-k", "-s", "-N", "-i", "--max-time", "30",
             f"{https_url}/channels/{channel}"],
            stdout=out,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "NO_PROXY": "*"},
        )  # fmt: skip
        try:

            def received() -> bytes:
                out.seek(0)
                return out.read()

            wait_for(lambda: b"\r\n\r\n" in received(), 15, 0.05, "response headers over h2")
            publish(https_url, channel, "over-h2", verify=False)
            wait_for(lambda: b"data: over-h2" in received(), 15, 0.05, "an event over h2")
            head = received().split(b"\r\n", 1)[0]
            assert head.startswith(b"HTTP/2 200"), head
            assert b"content-type: text/event-stream" in received().lower()
        finally:
            proc.kill()
            proc.wait()

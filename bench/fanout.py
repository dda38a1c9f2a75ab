"""Fan-out benchmark: one channel, N SSE subscribers, E events published over HTTP.

Runs `ssehub serve`, nginx with nchan and a minimal sse-starlette hub through the same
load in one run, each server started here on a free port and pinned to core 1, the load
generator (this process and its subscriber processes) pinned to core 0. Prints, per
server: deliveries/s, publish-to-receive latency (p50, p99), errors, and memory per
idle connection; saves the same as JSON under bench/results/.

    .venv/bin/python bench/fanout.py                      # 1000 x 2000, K=2000 idle
    .venv/bin/python bench/fanout.py --subscribers 200 --events 200 --idle 500
    .venv/bin/python bench/fanout.py --servers ssehub --scale 10000

See docs/benchmarks.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NCHAN_CONF = ROOT / "bench" / "peers" / "nchan.conf"  # a template: @NAMES@ are filled in
HOST = "127.0.0.1"
SERVER_CORE = 1
LOADGEN_CORE = 0

# Every event's data is `EVT<publisher>.<seq>:<monotonic ns at publish>;` padded with `x`
# to --size.
# Counting the marker works for any framing (LF or CRLF separators, `id:` or not, chunked
# transfer coding) as long as a server never splits one event across chunks, which none of
# the three does; a split would show up as lost deliveries, not as a wrong figure.
MARK = b"EVT"
SAMPLE = re.compile(rb"EVT(\d+)\.(\d+):(\d+);")
CARRY = 64  # longer than any partial `EVT<publisher>.<seq>:<ns>` a read can end in


# --------------------------------------------------------------------------------------
# Process and machine helpers
# --------------------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit (children, servers included, inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants (nginx: master and worker)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
    return pids


def rss_kb(pid: int) -> int:
    """Resident memory of the process tree, from /proc/<pid>/status VmRSS (kB)."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the process tree so far."""
    user = system = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as f:
            # Fields after the `(comm)`, which may hold spaces: utime is 14th, stime 15th.
            fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def pinning_available() -> bool:
    return hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


# --------------------------------------------------------------------------------------
# A small blocking HTTP/1.1 client for publishing and probes (keep-alive, no pipelining)
# --------------------------------------------------------------------------------------


class HttpConnection:
    """One keep-alive connection. Faster than any client library, so the publisher is
    limited by the server, not by the load generator."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers)
        head += f"Content-Length: {len(body)}\r\n\r\n"
        message = head.encode() + body
        for attempt in (0, 1):
            reused = self.sock is not None
            if self.sock is None:
                self.sock = socket.create_connection((HOST, self.port), timeout=self.timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.sock.sendall(message)
                return self._response()
            except ConnectionError:
                # A keep-alive connection the server closed while idle: retry once on a
                # new one (the server never saw the request).
                self.close()
                if not reused or attempt:
                    raise
        raise AssertionError("unreachable")

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("server closed the connection")
        self.buf += chunk

    def _response(self) -> tuple[int, bytes]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        self.buf = self.buf[end + 4 :]
        status = int(lines[0].split()[1])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        if "content-length" in fields:
            size = int(fields["content-length"])
            while len(self.buf) < size:
                self._fill()
            body, self.buf = self.buf[:size], self.buf[size:]
        elif fields.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                while (eol := self.buf.find(b"\r\n")) < 0:
                    self._fill()
                size = int(self.buf[:eol].split(b";")[0], 16)
                while len(self.buf) < eol + 2 + size + 2:
                    self._fill()
                parts.append(self.buf[eol + 2 : eol + 2 + size])
                self.buf = self.buf[eol + 2 + size + 2 :]
                if size == 0:
                    break
            body = b"".join(parts)
        else:
            body = b""
        if fields.get("connection") == "close":
            self.close()
        return status, body


def http_get(port: int, path: str, headers: Sequence[tuple[str, str]] = ()) -> tuple[int, bytes]:
    conn = HttpConnection(port, timeout=10.0)
    try:
        return conn.request("GET", path, headers=headers)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------
# Subscribers: raw asyncio protocols in child processes (uvloop when installed)
# --------------------------------------------------------------------------------------


class _Tally:
    """What the subscribers of one process found, shared by their protocols."""

    __slots__ = (
        "all_done",
        "bad_status",
        "connect_failed",
        "done",
        "dropped",
        "expected",
        "last_done_ns",
        "latencies",
        "ok",
        "order_errors",
    )

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.ok = 0
        self.done = 0
        self.connect_failed = 0
        self.bad_status = 0
        self.dropped = 0
        self.order_errors = 0
        self.last_done_ns = 0
        self.latencies: list[int] = []
        self.all_done: asyncio.Future[None] | None = None

    def settle(self) -> None:
        """Wake the session once every connected subscriber got all events or left."""
        if self.done + self.dropped >= self.ok and self.all_done and not self.all_done.done():
            self.all_done.set_result(None)


class _Subscriber(asyncio.Protocol):
    """Counts events by their marker; a sampled one also parses seq and timestamp."""

    __slots__ = ("carry", "count", "done_ns", "head", "headers", "next_seq", "request",
                 "sampled", "tail", "tally", "transport")  # fmt: skip

    def __init__(
        self, tally: _Tally, sampled: bool, request: bytes, headers: asyncio.Future[bool]
    ) -> None:
        self.tally = tally
        self.sampled = sampled
        self.request = request
        self.headers = headers
        self.head: bytes | None = b""
        self.tail = b""
        self.carry = b""
        self.count = 0
        self.next_seq: dict[bytes, int] = {}  # per publisher: each one publishes in order
        self.done_ns = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            head = self.head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self.head = head
                return
            self.head = None
            if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                self.tally.bad_status += 1
                self.headers.set_result(False)
                assert self.transport is not None
                self.transport.close()
                return
            self.tally.ok += 1
            self.headers.set_result(True)
            data = head[end + 4 :]
            if not data:
                return
        if self.sampled:
            self._parse(data)
        else:
            n = data.count(MARK)
            if self.tail:
                # A marker split across two reads.
                n += (self.tail + data[:2]).count(MARK)
            self.tail = data[-2:] if len(data) >= 2 else (self.tail + data)[-2:]
            self.count += n
        if (
            data.endswith(b"0\r\n\r\n")
            and self.transport is not None
            and (len(data) == 5 or data.endswith(b"\n0\r\n\r\n"))
        ):
            # The last chunk: the server ended the stream. Do not wait for it to close the
            # kept-alive connection.
            self.transport.close()
        tally = self.tally
        if self.count >= tally.expected and not self.done_ns:
            self.done_ns = time.monotonic_ns()
            tally.last_done_ns = max(tally.last_done_ns, self.done_ns)
            tally.done += 1
            tally.settle()

    def _parse(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.carry + data
        end = 0
        latencies = self.tally.latencies
        next_seq = self.next_seq
        for match in SAMPLE.finditer(buf):
            publisher, seq = match[1], int(match[2])
            latencies.append(now - int(match[3]))
            if seq != next_seq.get(publisher, 0):
                self.tally.order_errors += 1
            next_seq[publisher] = seq + 1
            self.count += 1
            end = match.end()
        self.carry = buf[end:][-CARRY:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.headers.done():
            self.tally.connect_failed += 1
            self.headers.set_result(False)
        elif self.headers.result() and self.count < self.tally.expected:
            self.tally.dropped += 1
            self.tally.settle()


def _subscriber_process(
    conn: multiprocessing.connection.Connection,
    port: int,
    path: str,
    n: int,
    first_index: int,
    expected: int,
    sample_every: int,
    concurrency: int,
) -> None:
    if pinning_available():
        os.sched_setaffinity(0, {LOADGEN_CORE})
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        session = _subscriber_session(
            conn, port, path, n, first_index, expected, sample_every, concurrency
        )
        asyncio.run(session)


async def _subscriber_session(
    conn: multiprocessing.connection.Connection,
    port: int,
    path: str,
    n: int,
    first_index: int,
    expected: int,
    sample_every: int,
    concurrency: int,
) -> None:
    loop = asyncio.get_running_loop()
    tally = _Tally(expected)
    tally.all_done = loop.create_future()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()
    subscribers: list[_Subscriber] = []
    # In flight until its response headers arrive: bounded, so no server's accept queue
    # overflows (a dropped SYN costs a 1 s retransmit and would distort the connect phase).
    gate = asyncio.Semaphore(concurrency)

    async def open_one(index: int) -> None:
        async with gate:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            # Close with RST: no TIME_WAIT, so repeated 10,000-connection runs do not run
            # out of ephemeral ports.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            headers: asyncio.Future[bool] = loop.create_future()
            protocol = _Subscriber(tally, index % sample_every == 0, request, headers)
            try:
                await loop.sock_connect(sock, (HOST, port))
                await loop.create_connection(lambda: protocol, sock=sock)
                ok = await asyncio.wait_for(headers, 30)
            except (OSError, TimeoutError):
                if not headers.done():
                    tally.connect_failed += 1
                    headers.set_result(False)
                sock.close()
                return
            if ok:
                subscribers.append(protocol)

    await asyncio.gather(*(open_one(first_index + i) for i in range(n)))
    tally.settle()
    conn.send(("ready", {"ok": tally.ok, "failed": tally.connect_failed + tally.bad_status}))

    commands: asyncio.Queue[Any] = asyncio.Queue()

    def on_command() -> None:
        try:
            commands.put_nowait(conn.recv())
        except EOFError:
            commands.put_nowait(("close",))

    loop.add_reader(conn.fileno(), on_command)
    # The loop made the pipe non-blocking; the results (latency samples) can be larger
    # than the pipe buffer, and the parent is reading them meanwhile.
    os.set_blocking(conn.fileno(), True)
    while True:
        command = await commands.get()
        if command[0] == "go":
            cpu_start = time.process_time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(tally.all_done), command[1])
            conn.send(
                (
                    "done",
                    {
                        "ok": tally.ok,
                        "complete": tally.done,
                        "delivered": sum(s.count for s in subscribers),
                        "last_done_ns": tally.last_done_ns,
                        "connect_failed": tally.connect_failed,
                        "bad_status": tally.bad_status,
                        "dropped": tally.dropped,
                        "order_errors": tally.order_errors,
                        "over_delivered": sum(max(0, s.count - expected) for s in subscribers),
                        "latencies": array.array("q", tally.latencies).tobytes(),
                        "cpu_seconds": time.process_time() - cpu_start,
                    },
                )
            )
        else:
            for s in subscribers:
                if s.transport is not None:
                    s.transport.close()
            loop.remove_reader(conn.fileno())
            conn.send(("closed", None))
            return


class SubscriberPool:
    """N subscribers in `procs` processes, driven by commands over pipes."""

    def __init__(
        self,
        port: int,
        path: str,
        n: int,
        expected: int,
        procs: int,
        sample_every: int,
        concurrency: int = 200,
    ) -> None:
        self.n = n
        context = multiprocessing.get_context("fork")
        self.children: list[tuple[multiprocessing.process.BaseProcess, Any]] = []
        first = 0
        for i in range(procs):
            share = n // procs + (1 if i < n % procs else 0)
            if share == 0:
                continue
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_subscriber_process,
                args=(child_end, port, path, share, first, expected, sample_every, concurrency),
                daemon=True,
            )
            process.start()
            child_end.close()
            self.children.append((process, parent_end))
            first += share

    def _collect(self, kind: str, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        answers = []
        for process, conn in self.children:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"subscriber process {process.pid} did not answer {kind!r}")
            got, payload = conn.recv()
            if got != kind:
                raise RuntimeError(f"expected {kind!r} from subscriber process, got {got!r}")
            answers.append(payload)
        return answers

    def ready(self, timeout: float) -> dict[str, int]:
        answers = self._collect("ready", timeout)
        return {"ok": sum(a["ok"] for a in answers), "failed": sum(a["failed"] for a in answers)}

    def go(self, timeout: float) -> None:
        for _, conn in self.children:
            conn.send(("go", timeout))

    def results(self, timeout: float) -> dict[str, Any]:
        answers = self._collect("done", timeout)
        merged: dict[str, Any] = {"latencies": array.array("q")}
        for answer in answers:
            for key, value in answer.items():
                if key == "latencies":
                    merged["latencies"].frombytes(value)
                elif key == "last_done_ns":
                    merged[key] = max(merged.get(key, 0), value)
                else:
                    merged[key] = merged.get(key, 0) + value
        return merged

    def close(self) -> None:
        for _, conn in self.children:
            with contextlib.suppress(OSError):
                conn.send(("close",))
        with contextlib.suppress(TimeoutError, RuntimeError, EOFError, OSError):
            self._collect("closed", 30)
        for process, conn in self.children:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()


# --------------------------------------------------------------------------------------
# Servers under test
# --------------------------------------------------------------------------------------


class ServerUnderTest:
    name: ClassVar[str]
    batches: ClassVar[bool] = False  # takes a JSON list of events in one POST

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def sub_path(self, channel: str) -> str:
        return f"/channels/{channel}"

    def pub_path(self, channel: str) -> str:
        return f"/channels/{channel}"

    def ready_path(self) -> str:
        return "/"

    def subscriber_count(self, channel: str) -> int | None:
        """Subscribers the server itself reports (None: it cannot tell)."""
        return None

    def batch_body(self, datas: Sequence[str]) -> bytes:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """The server's own counters, kept in the JSON next to the harness's figures."""
        return {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.port = free_port()
        command = self.command()
        if pinning_available() and not self.args.no_pin:
            command = ["taskset", "-c", str(SERVER_CORE), *command]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                http_get(self.port, self.ready_path())
            except OSError:
                return False
            return True

        wait_for(answers, 30, f"{self.name} to answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Ssehub(ServerUnderTest):
    name = "ssehub"
    batches = True

    def command(self) -> list[str]:
        # Heartbeats off the table: a run is shorter than the interval anyway.
        serve = ["serve", "--host", HOST, "--port", str(self.port), "--heartbeat", "3600",
                 "--log-level", "warning"]  # fmt: skip
        if self.args.profile:
            out = self.workdir / f"ssehub-{time.strftime('%H%M%S')}.prof"
            return [sys.executable, "-c", PROFILED_SERVE, str(out), *serve]
        return [sys.executable, "-m", "ssehub", *serve]

    def ready_path(self) -> str:
        return "/healthz"

    def subscriber_count(self, channel: str) -> int | None:
        status, body = http_get(self.port, "/admin/stats")
        if status != 200:
            return None
        stats = json.loads(body)
        for key in ("connections", "subscribers"):
            value = stats.get(key)
            if isinstance(value, int):
                return value
            if isinstance(value, dict):
                total = value.get("open", value.get("current", value.get("total")))
                if isinstance(total, int):
                    return total
        return None

    def batch_body(self, datas: Sequence[str]) -> bytes:
        return json.dumps([{"data": d} for d in datas]).encode()

    def stats(self) -> dict[str, Any]:
        status, body = http_get(self.port, "/admin/stats")
        value = json.loads(body) if status == 200 else {}
        return value if isinstance(value, dict) else {}


# `python -m cProfile` writes nothing here: uvicorn re-raises SIGTERM after its shutdown,
# and the default action kills the process. A handler that raises lets the profile be saved.
PROFILED_SERVE = """
import cProfile, signal, sys
def stop(signum, frame):
    raise SystemExit(0)
signal.signal(signal.SIGTERM, stop)
from ssehub.cli import main
profile = cProfile.Profile()
profile.enable()
try:
    main(sys.argv[2:], standalone_mode=False)
except SystemExit:
    pass
finally:
    profile.disable()
    profile.dump_stats(sys.argv[1])
"""


class Nchan(ServerUnderTest):
    name = "nchan"

    def command(self) -> list[str]:
        prefix = self.workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        module = next(
            (
                p
                for p in (
                    Path("/usr/lib/nginx/modules/ngx_nchan_module.so"),
                    Path("/usr/share/nginx/modules/ngx_nchan_module.so"),
                )
                if p.exists()
            ),
            None,
        )
        if module is None:
            raise RuntimeError("ngx_nchan_module.so not found (apt-get install libnginx-mod-nchan)")
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        buffer = max(self.args.events, self.args.scale_events) + 100
        conf = prefix / "nginx.conf"
        text = NCHAN_CONF.read_text()
        for name, value in {
            "PREFIX": prefix,
            "MODULE": module,
            "NOFILE": nofile,
            "CONNECTIONS": max(1024, nofile - 100),
            "PORT": self.port,
            "BUFFER": buffer,
        }.items():
            text = text.replace(f"@{name}@", str(value))
        conf.write_text(text)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        return [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]

    def sub_path(self, channel: str) -> str:
        return f"/sub/{channel}"

    def pub_path(self, channel: str) -> str:
        return f"/pub/{channel}"

    def subscriber_count(self, channel: str) -> int | None:
        status, body = http_get(self.port, self.pub_path(channel), [("Accept", "text/json")])
        if status == 404:
            return 0
        value = json.loads(body).get("subscribers") if status == 200 else None
        return value if isinstance(value, int) else None


class SseStarlette(ServerUnderTest):
    name = "sse-starlette"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "bench" / "peers"),
                "sse_starlette_hub:app", "--host", HOST, "--port", str(self.port),
                "--log-level", "warning"]  # fmt: skip

    def ready_path(self) -> str:
        return "/stats"

    def subscriber_count(self, channel: str) -> int | None:
        status, body = http_get(self.port, "/stats")
        value = json.loads(body).get("subscribers") if status == 200 else None
        return value if isinstance(value, int) else None


SERVERS: dict[str, type[ServerUnderTest]] = {cls.name: cls for cls in (Ssehub, Nchan, SseStarlette)}


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------


@dataclass
class Published:
    requests: int = 0
    failures: int = 0
    # Seconds each POST took: how long the server kept a publisher waiting.
    times: list[float] = field(default_factory=list)


@dataclass
class Row:
    server: str
    mode: str
    subscribers: int
    events: int
    deliveries_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    lost: int = 0
    idle_kb_per_conn: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def new_channel(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:8]}"


def wait_subscribed(server: ServerUnderTest, channel: str, n: int, timeout: float) -> bool:
    """Wait until the server itself reports `n` subscribers; False if it cannot tell."""
    if server.subscriber_count(channel) is None:
        return False
    wait_for(
        lambda: (server.subscriber_count(channel) or 0) >= n,
        timeout,
        f"{server.name} to report {n} subscribers",
        interval=0.1,
    )
    return True


def wait_drained(server: ServerUnderTest, channel: str, timeout: float = 30) -> None:
    if server.subscriber_count(channel) is None:
        time.sleep(1.0)
        return
    with contextlib.suppress(TimeoutError):
        wait_for(
            lambda: (server.subscriber_count(channel) or 0) == 0,
            timeout,
            f"{server.name} to see subscribers leave",
            interval=0.1,
        )


def event_data(publisher: int, seq: int, size: int) -> str:
    head = f"EVT{publisher}.{seq}:{time.monotonic_ns()};"
    return head + "x" * max(0, size - len(head))


def publish_all(
    server: ServerUnderTest, channel: str, events: int, size: int, batch: int, publishers: int
) -> Published:
    """Publish `events` as fast as the server takes them, from `publishers` connections
    at once (threads: they wait on the server, not on the GIL)."""
    if publishers == 1:
        return publish_some(server, channel, 0, events, size, batch)
    shares = [
        events // publishers + (1 if i < events % publishers else 0) for i in range(publishers)
    ]
    with concurrent.futures.ThreadPoolExecutor(publishers) as pool:
        futures = [
            pool.submit(publish_some, server, channel, i, share, size, batch)
            for i, share in enumerate(shares)
        ]
        done = [f.result() for f in futures]
    return Published(
        sum(p.requests for p in done),
        sum(p.failures for p in done),
        [t for p in done for t in p.times],
    )


def publish_some(
    server: ServerUnderTest, channel: str, publisher: int, events: int, size: int, batch: int
) -> Published:
    """One publisher: sequential POSTs over one keep-alive connection."""
    conn = HttpConnection(server.port)
    path = server.pub_path(channel)
    result = Published()
    try:
        seq = 0
        while seq < events:
            if batch > 1:
                last = min(events, seq + batch)
                datas = [event_data(publisher, s, size) for s in range(seq, last)]
                body = server.batch_body(datas)
                content_type = "application/json"
                seq += len(datas)
            else:
                body = event_data(publisher, seq, size).encode()
                content_type = "text/plain"
                seq += 1
            sent = time.perf_counter()
            status, _ = conn.request("POST", path, body, [("Content-Type", content_type)])
            result.times.append(time.perf_counter() - sent)
            result.requests += 1
            if not 200 <= status < 300:
                result.failures += 1
    finally:
        conn.close()
    return result


def run_fanout(
    server: ServerUnderTest,
    n: int,
    events: int,
    args: argparse.Namespace,
    batch: int = 1,
    publishers: int = 1,
) -> Row:
    mode = f"batch {batch}" if batch > 1 else "single"
    if publishers > 1:
        mode += f" x{publishers} pub"
    channel = new_channel("fanout")
    row = Row(server.name, mode, n, events)
    pool = SubscriberPool(server.port, server.sub_path(channel), n, events, args.procs, args.sample)
    try:
        ready = pool.ready(120 + n / 50)
        confirmed = wait_subscribed(server, channel, ready["ok"], 60)
        user_before, system_before = cpu_times(server.pid)
        own_cpu_before = time.process_time()
        pool.go(args.timeout)
        start = time.monotonic_ns()
        published_by = publish_all(server, channel, events, args.size, batch, publishers)
        published = time.monotonic_ns()
        result = pool.results(args.timeout + 60)
        user, system = cpu_times(server.pid)
        user, system = user - user_before, system - system_before
        cpu = user + system
        publisher_cpu = time.process_time() - own_cpu_before
    finally:
        pool.close()
    wait_drained(server, channel)
    row.detail["server_stats"] = server.stats()
    expected = n * events
    delivered = result["delivered"]
    complete = result["complete"] >= n and delivered >= expected
    end = result["last_done_ns"] if complete else time.monotonic_ns()
    seconds = (end - start) / 1e9
    latencies = sorted(result["latencies"])
    post_times = sorted(published_by.times)
    row.deliveries_per_s = delivered / seconds if seconds > 0 else None
    row.p50_ms = percentile(latencies, 0.50) / 1e6
    row.p99_ms = percentile(latencies, 0.99) / 1e6
    row.lost = max(0, expected - delivered)
    row.errors = (
        ready["failed"]
        + result["dropped"]
        + result["order_errors"]
        + result["over_delivered"]
        + published_by.failures
    )
    row.detail = {
        **row.detail,
        "channel": channel,
        "subscribers_connected": ready["ok"],
        "server_confirmed_subscribers": confirmed,
        "expected_deliveries": expected,
        "delivered": delivered,
        "complete_subscribers": result["complete"],
        "seconds_first_publish_to_last_delivery": seconds,
        "publish_seconds": (published - start) / 1e9,
        "publish_requests": published_by.requests,
        "post_ms_p50": percentile(post_times, 0.50) * 1e3,
        "post_ms_p99": percentile(post_times, 0.99) * 1e3,
        "post_ms_max": post_times[-1] * 1e3 if post_times else None,
        "events_published_per_s": events / ((published - start) / 1e9),
        "publish_failures": published_by.failures,
        "connect_failures": ready["failed"],
        "dropped_connections": result["dropped"],
        "order_errors_in_sample": result["order_errors"],
        "over_delivered": result["over_delivered"],
        "latency_samples": len(latencies),
        "latency_max_ms": (latencies[-1] / 1e6) if latencies else None,
        "latency_mean_ms": (statistics.fmean(latencies) / 1e6) if latencies else None,
        "server_cpu_seconds": cpu,
        # System time is the kernel's share (socket writes); user time is the server's own.
        "server_user_seconds": user,
        "server_system_seconds": system,
        "deliveries_per_server_cpu_s": delivered / cpu if cpu > 0 else None,
        # The load generator's own CPU: far below the wall time means it was not the limit.
        "subscriber_cpu_seconds": result["cpu_seconds"],
        "publisher_cpu_seconds": publisher_cpu,
    }
    return row


def measure_idle(server: ServerUnderTest, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """Server RSS with K idle subscribers minus RSS with none, over K."""
    channel = new_channel("idle")
    time.sleep(0.5)
    before = rss_kb(server.pid)
    pool = SubscriberPool(server.port, server.sub_path(channel), k, 1, args.procs, k + 1)
    try:
        ready = pool.ready(120 + k / 50)
        confirmed = wait_subscribed(server, channel, ready["ok"], 60)
        time.sleep(1.0)
        after = rss_kb(server.pid)
    finally:
        pool.close()
    wait_drained(server, channel)
    return {
        "idle_subscribers": ready["ok"],
        "idle_connect_failures": ready["failed"],
        "idle_server_confirmed": confirmed,
        "rss_kb_before": before,
        "rss_kb_with_idle": after,
        "kb_per_idle_connection": (after - before) / ready["ok"] if ready["ok"] else None,
    }


def warm_up(server: ServerUnderTest, args: argparse.Namespace) -> None:
    """Touch every code path once, so lazy imports and first allocations are not measured."""
    quiet = argparse.Namespace(**{**vars(args), "sample": 1, "timeout": 30})
    run_fanout(server, 10, 20, quiet)
    if server.batches:
        run_fanout(server, 10, 20, quiet, batch=10)


def bench_server(cls: type[ServerUnderTest], args: argparse.Namespace, workdir: Path) -> list[Row]:
    rows: list[Row] = []
    server = cls(args, workdir)
    print(f"--- {server.name}", flush=True)
    try:
        server.start()
        warm_up(server, args)
        idle = measure_idle(server, args.idle, args) if args.idle else {}
        if idle:
            print(f"    idle: {idle['kb_per_idle_connection']:.1f} KB/conn", flush=True)
        modes = [(1, 1)]
        if args.publishers > 1:
            modes.append((1, args.publishers))
        if server.batches and args.batch > 1:
            modes.append((args.batch, 1))
        if not (args.subscribers and args.events):
            modes = []
            row = Row(server.name, "idle only", args.idle, 0, detail=dict(idle))
            row.idle_kb_per_conn = idle.get("kb_per_idle_connection")
            rows.append(row)
        for batch, publishers in modes:
            row = run_fanout(server, args.subscribers, args.events, args, batch, publishers)
            row.idle_kb_per_conn = idle.get("kb_per_idle_connection")
            row.detail.update(idle)
            rows.append(row)
            print("    " + format_row(row), flush=True)
    except Exception as exc:
        print(f"    {server.name} failed: {exc!r}\n{server.log_tail()}", flush=True)
        rows.append(Row(server.name, "failed", args.subscribers, args.events,
                        detail={"error": repr(exc), "log": server.log_tail()}))  # fmt: skip
    finally:
        server.stop()
    if args.scale and cls is Ssehub:
        rows.extend(bench_scale(cls, args, workdir))
    return rows


def bench_scale(cls: type[ServerUnderTest], args: argparse.Namespace, workdir: Path) -> list[Row]:
    """A fresh server: K = --scale idle subscribers, then a fan-out to --scale of them."""
    server = cls(args, workdir)
    print(f"--- {server.name} at {args.scale} subscribers", flush=True)
    try:
        server.start()
        warm_up(server, args)
        idle = measure_idle(server, args.scale, args)
        row = run_fanout(server, args.scale, args.scale_events, args)
        row.mode = f"single, {args.scale} subs"
        row.idle_kb_per_conn = idle.get("kb_per_idle_connection")
        row.detail.update(idle)
        print("    " + format_row(row), flush=True)
        return [row]
    except Exception as exc:
        print(f"    failed: {exc!r}\n{server.log_tail()}", flush=True)
        return [Row(server.name, f"failed at {args.scale}", args.scale, args.scale_events,
                    detail={"error": repr(exc), "log": server.log_tail()})]  # fmt: skip
    finally:
        server.stop()


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

COLUMNS = ("server", "mode", "subs x events", "deliveries/s", "p50 ms", "p99 ms", "errors",
           "lost", "KB/idle conn", "deliv/CPU-s")  # fmt: skip


def _cells(row: Row) -> list[str]:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None or value != value else format(value, fmt)

    return [
        row.server,
        row.mode,
        f"{row.subscribers} x {row.events}",
        num(row.deliveries_per_s, ",.0f"),
        num(row.p50_ms, ".1f"),
        num(row.p99_ms, ".1f"),
        str(row.errors),
        str(row.lost),
        num(row.idle_kb_per_conn, ".1f"),
        num(row.detail.get("deliveries_per_server_cpu_s"), ",.0f"),
    ]


def format_row(row: Row) -> str:
    return " | ".join(_cells(row))


def table(rows: Sequence[Row]) -> str:
    cells = [list(COLUMNS), *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for i, line in enumerate(cells):
        padded = (
            c.rjust(w) if j >= 2 else c.ljust(w)
            for j, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        lines.append(" | ".join(padded))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "nginx": nginx,
        "pinned": pinning_available(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--servers", default="ssehub,nchan,sse-starlette",
                   help="comma-separated: " + ", ".join(SERVERS))  # fmt: skip
    p.add_argument("--subscribers", "-n", type=int, default=1000)
    p.add_argument("--events", "-e", type=int, default=2000)
    p.add_argument("--size", type=int, default=100, help="bytes of data per event")
    p.add_argument("--batch", type=int, default=50,
                   help="events per POST in batch mode (JSON list); 1 = off")  # fmt: skip
    p.add_argument("--publishers", type=int, default=4,
                   help="publisher connections in the concurrent mode; 1 = off")  # fmt: skip
    p.add_argument("--idle", type=int, default=2000,
                   help="K idle subscribers for memory per connection; 0 = skip")  # fmt: skip
    p.add_argument("--scale", type=int, default=0,
                   help="also run ssehub with this many subscribers (e.g. 10000)")  # fmt: skip
    p.add_argument("--scale-events", type=int, default=100)
    p.add_argument("--procs", type=int, default=1, help="subscriber processes")
    p.add_argument("--sample", type=int, default=10,
                   help="every Nth subscriber records latency and order")  # fmt: skip
    p.add_argument("--timeout", type=float, default=300, help="seconds per fan-out")
    p.add_argument("--profile", action="store_true",
                   help="run ssehub under cProfile; the .prof lands in bench/results/")  # fmt: skip
    p.add_argument("--no-pin", action="store_true", help="do not pin servers to a core")
    p.add_argument("--output", type=Path, default=None, help="JSON file (default: bench/results/)")
    args = p.parse_args(argv)
    unknown = set(args.servers.split(",")) - set(SERVERS)
    if unknown:
        p.error(f"unknown servers: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_fd_limit()
    need = max(args.subscribers, args.idle, args.scale) + 200
    if nofile < need:
        print(f"warning: RLIMIT_NOFILE is {nofile}, {need} needed", file=sys.stderr)
    if pinning_available() and not args.no_pin:
        os.sched_setaffinity(0, {LOADGEN_CORE})
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="ssehub-bench-") as tmp:
        workdir = Path(tmp)
        for name in args.servers.split(","):
            rows.extend(bench_server(SERVERS[name], args, workdir))
            for prof in workdir.glob("*.prof"):
                shutil.move(str(prof), RESULTS / prof.name)
    print()
    print(table(rows))
    output = args.output or RESULTS / f"fanout-{started}.json"
    report = {
        "started": started,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "rows": [row.__dict__ for row in rows],
    }
    output.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nsaved {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")
    return 0 if all(r.mode != "failed" and not r.errors and not r.lost for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Relay overhead: a client talking to a fast local upstream directly, and through the
ssehub gateway (`ssehub serve --upstream`), in the same run.

Run by hand: `.venv/bin/python bench/relay.py [--requests N] [--chunks N] [--repeat R]`.

Three processes: the upstream (uvicorn + a raw ASGI app that streams pre-encoded
`chat.completion.chunk` events as fast as the socket takes them), the gateway (`ssehub
serve`, pinned to CPU 0 with `taskset` when there are two CPUs or more: "one core"), and
this client (pinned with the upstream to the other CPUs).

- Time to first token: `--requests` sequential streamed requests of 8 chunks on a kept-
  alive connection; from sending the request to the first complete `data:` event. The
  added time is the median through the gateway minus the median direct.
- Throughput: one streamed request of `--chunks` chunks, read as raw bytes (events are
  counted, not decoded, so the client is not the bottleneck); chunks per second, the best
  of `--repeat` runs. Through the gateway every chunk is decoded, re-serialised with the
  gateway's id, stored in the completion's log and re-encoded with its `id:`.

Figures on a shared machine are noisy; the best-of and the medians are meant to resist
that, not to hide it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from ssehub.gateway.http1 import PROXY_ENVIRONMENT  # noqa: E402

from _support import free_port, wait_for_port  # noqa: E402

UPSTREAM = """
import json

def chunk(i):
    return {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "fast",
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "logprobs": None,
                         "finish_reason": None}]}

def wire(n):
    return [b"data: " + json.dumps(chunk(i)).encode() + b"\\n\\n" for i in range(n)]

CACHE = {}

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    n = int(json.loads(body)["model"].split("-")[1])
    events = CACHE.get(n) or CACHE.setdefault(n, wire(n))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    # The first chunk alone (time to first token), then the rest in large writes.
    await send({"type": "http.response.body", "body": events[0], "more_body": True})
    for i in range(1, n, 512):
        await send({"type": "http.response.body", "body": b"".join(events[i:i + 512]),
                    "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\\n\\n"})
"""


def _pin(cpus: set[int]) -> list[str]:
    if (
        os.environ.get("RELAY_BENCH_PIN", "1") == "1"
        and shutil.which("taskset")
        and len(os.sched_getaffinity(0)) >= 2
    ):
        return ["taskset", "-c", ",".join(map(str, sorted(cpus)))]
    return []


@contextmanager
def process(
    cmd: list[str], port: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def cpu_seconds(proc: subprocess.Popen[bytes]) -> float:
    """User + system CPU time of a process so far (Linux /proc), robust to other load."""
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reference_loop_us() -> float:
    """A fixed piece of pure Python, best of 5: how fast this machine runs Python now
    (about 10-15 us on an idle modern core; more when other processes share it)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(200):
            sum(range(1000))
        best = min(best, (time.perf_counter() - start) / 200)
    return best * 1e6


def body(chunks: int) -> dict[str, Any]:
    return {
        "model": f"fast-{chunks}",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
    }


def first_token(client: httpx.Client, url: str) -> float:
    """Seconds from sending the request to the first complete event."""
    start = time.perf_counter()
    first = None
    received = b""
    with client.stream("POST", url, json=body(8)) as response:
        for raw in response.iter_raw():
            if first is None:
                received += raw
                if b"data:" in received and b"\n\n" in received[received.index(b"data:") :]:
                    first = time.perf_counter() - start
    assert first is not None
    return first


def throughput(client: httpx.Client, url: str, chunks: int) -> float:
    """Chunks per second of one long stream, counted in the raw bytes."""
    start = time.perf_counter()
    count = 0
    tail = b""
    with client.stream("POST", url, json=body(chunks)) as response:
        for raw in response.iter_raw():
            # An event ends with a blank line; count them across read boundaries.
            joined = tail + raw
            count += joined.count(b"\n\n")
            tail = joined[-1:]
    elapsed = time.perf_counter() - start
    # The upstream's [DONE] is one event too.
    assert count >= chunks + 1, f"{url}: {count} events for {chunks} chunks"
    return chunks / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    # Everything here talks over loopback: a developer's HTTPS_PROXY and co. must not send
    # the gateway's upstream requests, nor this client's, through a proxy.
    for name in PROXY_ENVIRONMENT:
        os.environ.pop(name, None)

    cpus = os.sched_getaffinity(0)
    gateway_cpus = {min(cpus)}
    others = (cpus - gateway_cpus) or cpus
    up_port, gw_port = free_port(), free_port()
    upstream_file = ROOT / "bench" / "results" / "_relay_upstream.py"
    upstream_file.parent.mkdir(exist_ok=True)
    upstream_file.write_text(UPSTREAM)
    python = sys.executable
    upstream_cmd = [
        *_pin(others), python, "-m", "uvicorn", "--app-dir", str(upstream_file.parent),
        "_relay_upstream:app", "--port", str(up_port), "--log-level", "warning",
        "--http", "httptools", "--loop", "uvloop",
    ]  # fmt: skip
    profile = (
        ["-m", "cProfile", "-o", os.environ["RELAY_BENCH_PROFILE"]]
        if os.environ.get("RELAY_BENCH_PROFILE")
        else []
    )
    gateway_cmd = [
        *_pin(gateway_cpus), python, *profile, "-m", "ssehub", "serve", "--port", str(gw_port),
        "--upstream", f"http://127.0.0.1:{up_port}/v1", "--log-level", "warning",
    ]  # fmt: skip
    pinned = bool(_pin(gateway_cpus))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, others)
    direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
    relayed = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
    results: dict[str, Any] = {}
    try:
        with (
            process(upstream_cmd, up_port),
            process(gateway_cmd, gw_port) as gateway,
            httpx.Client(timeout=60) as client,
        ):
            for url in (direct, relayed):  # warm up both paths and their connections
                for _ in range(20):
                    first_token(client, url)
                throughput(client, url, 2_000)
            ttft: dict[str, list[float]] = {"direct": [], "gateway": []}
            gateway_cpu = 0.0
            for _ in range(args.requests):  # interleaved, so noise hits both alike
                ttft["direct"].append(first_token(client, direct))
                before = cpu_seconds(gateway)
                ttft["gateway"].append(first_token(client, relayed))
                gateway_cpu += cpu_seconds(gateway) - before
            rates: dict[str, list[float]] = {"direct": [], "gateway": []}
            cpu_rates = []
            for _ in range(args.repeat):
                rates["direct"].append(throughput(client, direct, args.chunks))
                before = cpu_seconds(gateway)
                rates["gateway"].append(throughput(client, relayed, args.chunks))
                cpu_rates.append(args.chunks / max(cpu_seconds(gateway) - before, 1e-9))
    finally:
        upstream_file.unlink(missing_ok=True)
    for name in ("direct", "gateway"):
        samples = sorted(ttft[name])
        results[name] = {
            "ttft_median_ms": statistics.median(samples) * 1000,
            "ttft_p90_ms": samples[int(len(samples) * 0.9)] * 1000,
            "chunks_per_s": max(rates[name]),
        }
    added = results["gateway"]["ttft_median_ms"] - results["direct"]["ttft_median_ms"]
    results["added_ttft_median_ms"] = added
    results["reference_loop_us"] = reference_loop_us()
    results["gateway_cpu_ms_per_request"] = gateway_cpu / args.requests * 1000
    results["gateway_chunks_per_cpu_second"] = max(cpu_rates)
    results["gateway_cpus"] = sorted(gateway_cpus) if pinned else "unpinned"
    print(f"{'':10} {'TTFT median':>12} {'TTFT p90':>10} {'chunks/s':>10}")
    for name in ("direct", "gateway"):
        r = results[name]
        print(
            f"{name:10} {r['ttft_median_ms']:10.2f}ms {r['ttft_p90_ms']:8.2f}ms "
            f"{r['chunks_per_s']:10,.0f}"
        )
    print(f"added time to first token (median): {added:.2f} ms  (goal < 1 ms)")
    print(
        f"relayed chunks/s on one core: {results['gateway']['chunks_per_s']:,.0f}  (goal 20,000+)"
    )
    print(
        f"gateway CPU per 8-chunk request: {results['gateway_cpu_ms_per_request']:.2f} ms; "
        f"chunks per gateway CPU-second: {results['gateway_chunks_per_cpu_second']:,.0f} "
        "(CPU time: what the figures would be on an idle core)"
    )
    print(
        f"machine speed now: reference loop {results['reference_loop_us']:.0f} us "
        "(an idle modern core: ~12 us)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Fan-out through Redis: the in-memory hub beside one and two nodes sharing a redis-server.

Reuses bench/fanout.py's load generator (subscriber processes, publisher, latency
samples) and runs, on one channel, N subscribers and E events published over HTTP:

- `memory`: one `ssehub serve` node, in-memory broker (the baseline);
- `redis, 1 node`: one node with `--redis-url`: publish and subscribe on it;
- `redis, 2 nodes`: two nodes on the same Redis; events are published on node A and the
  subscribers are split between A and B, so half of the deliveries cross nodes.

redis-server and the nodes share core 1, the load generator has core 0 (when `taskset`
works), so on a 2-core machine the figures compare the paths, not the hardware.

    .venv/bin/python bench/redis_fanout.py                    # 200 x 500
    .venv/bin/python bench/redis_fanout.py -n 1000 -e 2000 --batch 50
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The sibling script, found through the path above.
import fanout as base


class RedisServerProcess:
    def __init__(self, workdir: Path, pin: bool) -> None:
        self.port = base.free_port()
        command = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", base.HOST, "--save", "",
            "--appendonly", "no", "--dir", str(workdir),
        ]  # fmt: skip
        if pin:
            command = ["taskset", "-c", str(base.SERVER_CORE), *command]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base.wait_for(self._answers, 15, f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        import socket

        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex((base.HOST, self.port)) == 0

    @property
    def url(self) -> str:
        return f"redis://{base.HOST}:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Node(base.Ssehub):
    """`ssehub serve` with `--redis-url` (none: the in-memory broker)."""

    def __init__(self, args: argparse.Namespace, workdir: Path, name: str, redis: str | None):
        self.name = name  # type: ignore[misc]  # per instance: the log file is named for it
        super().__init__(args, workdir)
        self.redis_url = redis

    def command(self) -> list[str]:
        command = super().command()
        return command + (["--redis-url", self.redis_url] if self.redis_url else [])


def fanout(
    label: str,
    publisher: base.ServerUnderTest,
    nodes: Sequence[base.ServerUnderTest],
    n: int,
    events: int,
    batch: int,
    args: argparse.Namespace,
) -> base.Row:
    """`n` subscribers spread over `nodes`, events published on `publisher`."""
    channel = base.new_channel("redis")
    mode = f"{label}, " + (f"batch {batch}" if batch > 1 else "single")
    row = base.Row("ssehub", mode, n, events)
    shares = [n // len(nodes) + (1 if i < n % len(nodes) else 0) for i in range(len(nodes))]
    pools = [
        base.SubscriberPool(
            node.port, node.sub_path(channel), share, events, args.procs, args.sample
        )
        for node, share in zip(nodes, shares, strict=True)
    ]
    try:
        ready = [pool.ready(120 + n / 50) for pool in pools]
        for node, answer in zip(nodes, ready, strict=True):
            base.wait_subscribed(node, channel, answer["ok"], 60)
        cpu_before = sum(sum(base.cpu_times(node.pid)) for node in nodes)
        for pool in pools:
            pool.go(args.timeout)
        start = time.monotonic_ns()
        failures = base.publish_all(publisher, channel, events, args.size, batch, 1).failures
        results = [pool.results(args.timeout + 60) for pool in pools]
        cpu = sum(sum(base.cpu_times(node.pid)) for node in nodes) - cpu_before
    finally:
        for pool in pools:
            pool.close()
    for node in nodes:
        base.wait_drained(node, channel)
    delivered = sum(r["delivered"] for r in results)
    complete = sum(r["complete"] for r in results) >= n and delivered >= n * events
    end = max(r["last_done_ns"] for r in results) if complete else time.monotonic_ns()
    seconds = (end - start) / 1e9
    latencies = sorted(x for r in results for x in r["latencies"])
    row.deliveries_per_s = delivered / seconds if seconds > 0 else None
    row.p50_ms = base.percentile(latencies, 0.50) / 1e6
    row.p99_ms = base.percentile(latencies, 0.99) / 1e6
    row.lost = max(0, n * events - delivered)
    row.errors = (
        failures
        + sum(a["failed"] for a in ready)
        + sum(r["dropped"] + r["order_errors"] + r["over_delivered"] for r in results)
    )
    row.detail = {
        "channel": channel,
        "nodes": len(nodes),
        "delivered": delivered,
        "seconds_first_publish_to_last_delivery": seconds,
        "latency_samples": len(latencies),
        "server_cpu_seconds": cpu,
        "deliveries_per_server_cpu_s": delivered / cpu if cpu > 0 else None,
    }
    return row


def run(args: argparse.Namespace, workdir: Path) -> list[base.Row]:
    pin = base.pinning_available() and not args.no_pin
    rows: list[base.Row] = []
    batches = [1] + ([args.batch] if args.batch > 1 else [])
    redis = RedisServerProcess(workdir, pin)
    memory = Node(args, workdir, "memory", None)
    one = Node(args, workdir, "redis-a", redis.url)
    two = Node(args, workdir, "redis-b", redis.url)
    setups: list[tuple[str, base.ServerUnderTest, list[base.ServerUnderTest]]] = [
        ("memory", memory, [memory]),
        ("redis, 1 node", one, [one]),
        ("redis, 2 nodes", one, [one, two]),
    ]
    try:
        for node in (memory, one, two):
            node.start()
        for label, publisher, nodes in setups:
            # Warm-up: imports, first allocations and Redis scripts are not measured.
            fanout(label, publisher, nodes, 10, 20, 1, args)
            for batch in batches:
                row = fanout(label, publisher, nodes, args.subscribers, args.events, batch, args)
                rows.append(row)
                print("    " + base.format_row(row), flush=True)
    finally:
        for node in (memory, one, two):
            node.stop()
        redis.stop()
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--subscribers", "-n", type=int, default=200)
    p.add_argument("--events", "-e", type=int, default=500)
    p.add_argument("--size", type=int, default=100, help="bytes of data per event")
    p.add_argument("--batch", type=int, default=50, help="events per POST in batch mode; 1 = off")
    p.add_argument("--procs", type=int, default=1, help="subscriber processes")
    p.add_argument("--sample", type=int, default=10, help="every Nth subscriber samples latency")
    p.add_argument("--timeout", type=float, default=300, help="seconds per fan-out")
    p.add_argument("--no-pin", action="store_true", help="do not pin servers to a core")
    p.add_argument("--output", type=Path, default=None, help="JSON file (default: bench/results/)")
    args = p.parse_args(argv)
    args.profile = False  # read by base.Ssehub
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Servers run in sessions of their own: on SIGTERM, unwind so that `finally` stops them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base.raise_fd_limit()
    if base.pinning_available() and not args.no_pin:
        import os

        os.sched_setaffinity(0, {base.LOADGEN_CORE})
    base.RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="ssehub-redis-bench-") as tmp:
        rows = run(args, Path(tmp))
    print()
    print(base.table(rows))
    output = args.output or base.RESULTS / f"redis-fanout-{started}.json"
    report: dict[str, Any] = {
        "started": started,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": base.machine(),
        "rows": [row.__dict__ for row in rows],
    }
    output.write_text(json.dumps(report, indent=2, default=str))
    shown = output.relative_to(base.ROOT) if output.is_relative_to(base.ROOT) else output
    print(f"\nsaved {shown}")
    return 0 if all(not r.errors and not r.lost for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

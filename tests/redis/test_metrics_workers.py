"""`/metrics` and `/healthz` answer for the node: every worker of one `ssehub serve
--workers 3`, whichever worker takes the scrape, and not another node on the same Redis."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sse_listener import Listener

from redis_server import RedisServer, redis_server

from _support import serve_in_process, wait_for

pytestmark = pytest.mark.redis

ADMIN = {"Authorization": "Bearer adm"}
WORKERS = 3
# Events published per test, one POST each: the POSTs land on several workers too.
EVENTS = 8


def node_args(redis: RedisServer, *extra: str) -> tuple[str, ...]:
    return (
        "--redis-url", redis.url, "--admin-token", "adm", "--heartbeat", "0.5",
        "--log-level", "warning", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[str, str]]:
    """A node of three workers and a node of one, sharing a Redis of their own."""
    with (
        redis_server() as redis,
        serve_in_process(*node_args(redis, "--workers", str(WORKERS))) as (workers, _),
        serve_in_process(*node_args(redis)) as (single, _),
    ):
        # The port answers as soon as the first worker does; three start on a busy machine.
        wait_for(lambda: len(_processes(workers)) == WORKERS + 1, 60, 0.2, "every process")
        yield workers, single


def get(base: str, path: str) -> Any:
    response = httpx.get(f"{base}{path}", headers=ADMIN, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _processes(base: str) -> list[dict[str, Any]]:
    try:
        return list(get(base, "/admin/stats")["processes"])
    except (httpx.HTTPError, AssertionError):
        return []


def port_of(base: str) -> str:
    return base.rsplit(":", 1)[1]


def scrape(base: str) -> dict[str, float]:
    """`/metrics` of `base`: each unlabelled sample's value, once the exposition was
    read back by prometheus_client's parser with every family declared once."""
    response = httpx.get(f"{base}/metrics", headers=ADMIN, timeout=10)
    assert response.status_code == 200, response.text
    declared = [line.split()[2] for line in response.text.splitlines() if line.startswith("# TYPE")]
    assert len(declared) == len(set(declared)), declared
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if not sample.labels:
                assert sample.name not in values, sample.name
                values[sample.name] = sample.value
    return values


def node_stats(base: str) -> dict[str, int]:
    """`/admin/stats` summed over the processes of `base`'s node only."""
    stats = get(base, "/admin/stats")
    assert not stats["unanswered"], stats
    mine = [p for p in stats["processes"] if p["node"].endswith(":" + port_of(base))]
    return {
        field: sum(p[field] for p in mine)
        for field in ("connections", "channels", "published", "delivered")
    }


def no_connections_left(bases: tuple[str, ...]) -> None:
    """Wait for the connections of earlier tests to be gone everywhere."""
    wait_for(
        lambda: all(get(b, "/admin/connections")["total"] == 0 for b in bases),
        20,
        0.1,
        "earlier connections to close",
    )


def held_on(base: str, channel: str) -> list[dict[str, Any]]:
    """The connections to `channel` that `base`'s node holds (the listing covers all)."""
    body = get(base, f"/admin/connections?channel={channel}")
    assert not body["unanswered"], body
    return [c for c in body["connections"] if c["node"].endswith(":" + port_of(base))]


def subscribe(base: str, channel: str, count: int, held: int = 0) -> list[Listener]:
    """`count` more subscriptions to `channel` on `base`, once its node lists them."""
    listeners = [Listener("GET", f"{base}/channels/{channel}") for _ in range(count)]
    wait_for(lambda: all(x.status == 200 for x in listeners), 30, 0.02, "subscriptions")
    wait_for(
        lambda: len(held_on(base, channel)) == held + count,
        15,
        0.05,
        "the subscriptions to be listed",
    )
    return listeners


def subscribe_on_several_workers(base: str, channel: str) -> list[Listener]:
    """Subscriptions to `channel` on `base` until at least two workers hold some."""
    listeners: list[Listener] = []
    while len(listeners) < 60:
        listeners += subscribe(base, channel, 4, held=len(listeners))
        if len({c["pid"] for c in held_on(base, channel)}) >= 2:
            return listeners
    raise AssertionError("every connection landed on one worker")


def publish(base: str, channel: str, count: int) -> None:
    for i in range(count):
        response = httpx.post(f"{base}/channels/{channel}", content=f"e{i}", timeout=10)
        assert response.status_code in (200, 201, 202), response.text


def close_all(listeners: list[Listener]) -> None:
    for listener in listeners:
        listener.close()


def test_every_scrape_holds_the_whole_node(nodes: tuple[str, str]) -> None:
    workers, _ = nodes
    no_connections_left(nodes)
    channel = f"node-{uuid.uuid4().hex[:6]}"
    listeners = subscribe_on_several_workers(workers, channel)
    try:
        publish(workers, channel, EVENTS)
        for listener in listeners:
            listener.wait(EVENTS)
        total = len(listeners)
        # Counters settle once the last delivery is counted.
        wait_for(lambda: node_stats(workers)["delivered"] == total * EVENTS, 10, 0.05, "stats")
        expected = node_stats(workers)
        assert expected["connections"] == total
        assert expected["published"] == EVENTS
        previous: dict[str, float] = {}
        # Many scrapes, so that each worker takes some.
        for _ in range(30):
            got = scrape(workers)
            assert got["ssehub_metrics_processes"] == WORKERS, got
            assert got["ssehub_metrics_processes_unanswered"] == 0, got
            assert got["ssehub_connections"] == total
            assert got["ssehub_channels"] == expected["channels"] >= 2
            assert got["ssehub_published_events_total"] == EVENTS
            assert got["ssehub_delivered_events_total"] == total * EVENTS
            for name, value in got.items():
                if name.endswith("_total"):
                    assert value >= previous.get(name, 0.0), name
            previous = got
            health = httpx.get(f"{workers}/healthz", timeout=10).json()
            assert health == {"status": "ok", "broker": "ok", "connections": total}
    finally:
        close_all(listeners)


def test_each_node_reports_only_its_own(nodes: tuple[str, str]) -> None:
    workers, single = nodes
    no_connections_left(nodes)
    channel = f"nodes-{uuid.uuid4().hex[:6]}"
    on_workers = subscribe_on_several_workers(workers, channel)
    on_single = subscribe(single, channel, 3)
    try:
        before = scrape(single)
        publish(single, channel, EVENTS)
        for listener in on_workers + on_single:
            listener.wait(EVENTS)
        wait_for(
            lambda: (
                node_stats(workers)["delivered"] >= len(on_workers) * EVENTS
                and node_stats(single)["delivered"]
                >= before["ssehub_delivered_events_total"] + 3 * EVENTS
            ),
            10,
            0.05,
            "stats",
        )
        for _ in range(10):
            got = scrape(single)
            assert got["ssehub_metrics_processes"] == 1
            assert got["ssehub_metrics_processes_unanswered"] == 0
            assert got["ssehub_connections"] == 3
            assert (
                got["ssehub_published_events_total"]
                == before["ssehub_published_events_total"] + EVENTS
            )
            assert got["ssehub_delivered_events_total"] == node_stats(single)["delivered"]
            assert httpx.get(f"{single}/healthz", timeout=10).json()["connections"] == 3
            got = scrape(workers)
            assert got["ssehub_metrics_processes"] == WORKERS
            assert got["ssehub_connections"] == len(on_workers)
            assert got["ssehub_delivered_events_total"] == node_stats(workers)["delivered"]
            health = httpx.get(f"{workers}/healthz", timeout=10).json()
            assert health["connections"] == len(on_workers)
    finally:
        close_all(on_workers + on_single)


def test_a_worker_that_does_not_answer_is_counted(nodes: tuple[str, str]) -> None:
    workers, _ = nodes
    pids = [p["pid"] for p in _processes(workers) if p["node"].endswith(":" + port_of(workers))]
    assert len(pids) == WORKERS
    # A stopped worker is still a member until its membership lapses (3 s): meanwhile
    # the others take the scrapes and say it is missing.
    os.kill(pids[0], signal.SIGSTOP)
    try:
        seen: dict[str, float] = {}

        def missing_one() -> bool:
            seen.update(scrape(workers))
            return seen["ssehub_metrics_processes_unanswered"] == 1

        wait_for(missing_one, 3, 0.01, "a scrape that misses the stopped worker")
        assert seen["ssehub_metrics_processes"] == WORKERS - 1
    finally:
        os.kill(pids[0], signal.SIGCONT)
    wait_for(
        lambda: scrape(workers)["ssehub_metrics_processes"] == WORKERS,
        20,
        0.1,
        "the worker to answer again",
    )


def test_with_redis_away_a_scrape_says_what_it_misses() -> None:
    with (
        redis_server() as redis,
        serve_in_process(*node_args(redis, "--workers", "2")) as (base, _),
    ):
        wait_for(lambda: len(_processes(base)) == 2, 60, 0.2, "both workers to join")
        channel = f"away-{uuid.uuid4().hex[:6]}"
        listeners = subscribe_on_several_workers(base, channel)
        try:
            per_worker: dict[int, int] = {}
            for conn in held_on(base, channel):
                per_worker[conn["pid"]] = per_worker.get(conn["pid"], 0) + 1
            redis.stop()
            for _ in range(6):
                got = scrape(base)
                assert got["ssehub_metrics_processes"] == 1
                assert got["ssehub_metrics_processes_unanswered"] == 1
                assert got["ssehub_connections"] in per_worker.values()
                health = httpx.get(f"{base}/healthz", timeout=10).json()
                assert health["status"] == "degraded"
                assert health["connections"] in per_worker.values()
            redis.start()
            wait_for(
                lambda: scrape(base)["ssehub_metrics_processes"] == 2,
                20,
                0.1,
                "both workers to answer again",
            )
            assert scrape(base)["ssehub_connections"] == len(listeners)
        finally:
            close_all(listeners)

"""`GET /metrics`: the hub's counters in the Prometheus text format, from its own registry.

Values are read from `Hub.stats()` at scrape time, so the delivery path never touches a
metric object.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ssehub.server.hub import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HubCollector(Collector):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        stats = self.hub.stats()
        yield GaugeMetricFamily(
            "ssehub_connections", "Open SSE subscriber connections.", value=stats.connections
        )
        yield GaugeMetricFamily(
            "ssehub_channels", "Channels with subscribers in this process.", value=stats.channels
        )
        yield CounterMetricFamily(
            "ssehub_published_events", "Events published through this process.", stats.published
        )
        yield CounterMetricFamily(
            "ssehub_delivered_events",
            "Event deliveries to subscribers (one event to 3 subscribers counts 3).",
            stats.delivered,
        )
        yield CounterMetricFamily(
            "ssehub_slow_consumer_disconnects",
            "Subscribers disconnected for falling more than max_pending bytes behind.",
            stats.slow_consumer_disconnects,
        )
        yield CounterMetricFamily(
            "ssehub_send_timeouts",
            "Subscribers disconnected because a write waited longer than send_timeout.",
            stats.send_timeouts,
        )


def make_registry(hub: Hub) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(HubCollector(hub))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    data: bytes = generate_latest(registry)
    return data

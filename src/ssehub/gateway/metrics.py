"""Prometheus metrics of the gateway, registered in the app's registry (served at /metrics).

`backend` is `demo` or `upstream`, never the model name: model names come from clients,
and a label per name would let any client grow the registry without bound.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.time_to_first_token = Histogram(
            "ssehub_gateway_time_to_first_token_seconds",
            "Seconds from a streamed completion's start to its first chunk.",
            ["backend"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "ssehub_gateway_tokens_per_second",
            "Completion tokens per second of generation, per finished completion.",
            ["backend"],
            buckets=(1, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 20000),
            registry=registry,
        )
        self.tokens = Counter(
            "ssehub_gateway_completion_tokens",
            "Completion tokens streamed.",
            ["backend"],
            registry=registry,
        )
        self.completions = Counter(
            "ssehub_gateway_completions",
            "Streamed completions by how they ended: finished, failed, cancelled, detached.",
            ["backend", "outcome"],
            registry=registry,
        )
        self.active = Gauge(
            "ssehub_gateway_active_streams",
            "Completions generating now.",
            registry=registry,
        )
        self.detached = Gauge(
            "ssehub_gateway_detached_streams",
            "Completions generating now with no client reading them (in their grace time).",
            registry=registry,
        )
        self.send_timeouts = Counter(
            "ssehub_gateway_send_timeouts",
            "Completion streams dropped because their client stopped reading for longer "
            "than --send-timeout (the completion itself goes on).",
            registry=registry,
        )
        self.cancellations = Counter(
            "ssehub_gateway_cancellations",
            "Completions stopped before their end: reason `request` (the cancel endpoint), "
            "`detached` (no reader for the grace time) or `shutdown`.",
            ["reason"],
            registry=registry,
        )

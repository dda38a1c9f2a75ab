"""Server settings: one field per `ssehub serve` flag, each also read from `SSEHUB_<NAME>`.

The CLI builds its options from these fields (their `help` metadata is the `--help` text),
so adding a setting is adding a field here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `create_app` and `ssehub serve` can be told."""

    host: str = _opt("127.0.0.1", "Address to listen on.")
    port: int = _opt(8000, "TCP port to listen on.")
    workers: int = _opt(1, "Worker processes; more than one needs --redis-url.")
    redis_url: str | None = _opt(
        None, "Use Redis (redis://host:port/db) as the broker instead of process memory."
    )
    publish_token: str | None = _opt(
        None, "When set, publishing needs 'Authorization: Bearer <token>'."
    )
    admin_token: str | None = _opt(
        None, "When set, /admin endpoints need 'Authorization: Bearer <token>'."
    )
    heartbeat: float = _opt(15.0, "Seconds between heartbeat comments on idle streams; 0 = off.")
    max_body: int = _opt(1_048_576, "Largest accepted request body in bytes (413 beyond).")
    retention_count: int = _opt(10_000, "Events kept per channel for replay.")
    retention_seconds: float = _opt(3600.0, "Seconds events are kept per channel for replay.")
    max_pending: int = _opt(
        1_048_576,
        "Bytes a subscriber may fall behind before it is disconnected (it resumes from the log).",
    )
    send_timeout: float = _opt(30.0, "Seconds a write may wait on a client that stopped reading.")
    shutdown_grace: float = _opt(5.0, "Seconds open streams get to end on shutdown.")
    demo_delay: float = _opt(0.03, "Seconds between tokens of the built-in demo model.")
    upstream: str | None = _opt(
        None, "Base URL of an OpenAI-compatible upstream (e.g. https://api.openai.com/v1)."
    )
    upstream_api_key: str | None = _opt(None, "API key sent to the upstream as a Bearer token.")
    upstream_proxy: str | None = _opt(
        None,
        "HTTP proxy to reach the upstream through (http://[user:pass@]host:port). Without it "
        "HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY apply, as in curl.",
    )
    api_key: str | None = _opt(
        None,
        "When set, /v1 endpoints need 'Authorization: Bearer <key>' (several keys: "
        "comma-separated).",
    )
    detach_grace: float = _opt(
        5.0, "Seconds a completion keeps generating with no client reading it."
    )
    completion_retention: float = _opt(600.0, "Seconds a finished completion stays resumable.")
    first_token_heartbeat: float = _opt(
        5.0, "Seconds between heartbeat comments while waiting for a model's first token."
    )
    log_level: str = _opt("info", "Log level: debug, info, warning, error.")

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


def setting_fields() -> tuple[dataclasses.Field[Any], ...]:
    """The fields of `Settings`, in declaration order."""
    return dataclasses.fields(Settings)

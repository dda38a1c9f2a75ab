"""Append-only event logs behind every stream: in memory or in Redis."""

from ssehub.broker.base import (
    PRODUCER_LOST,
    Batch,
    Broker,
    BrokerError,
    BrokerUnavailable,
    Entry,
    Retention,
    StreamClosed,
    StreamInfo,
    format_id,
    parse_id,
)

__all__ = [
    "PRODUCER_LOST",
    "Batch",
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Entry",
    "Retention",
    "StreamClosed",
    "StreamInfo",
    "format_id",
    "parse_id",
]

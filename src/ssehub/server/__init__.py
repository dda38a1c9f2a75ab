"""The hub server: channels over HTTP, the fan-out, and `EventStreamResponse` for apps."""

from ssehub.server.app import create_app, create_app_from_env
from ssehub.server.channels import ChannelStreamResponse
from ssehub.server.hub import (
    ConnectionInfo,
    Hub,
    HubStats,
    InvalidChannel,
    InvalidEvent,
)
from ssehub.server.responses import EventStreamResponse

__all__ = [
    "ChannelStreamResponse",
    "ConnectionInfo",
    "EventStreamResponse",
    "Hub",
    "HubStats",
    "InvalidChannel",
    "InvalidEvent",
    "create_app",
    "create_app_from_env",
]

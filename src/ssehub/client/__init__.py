"""Python clients for event streams: the same API blocking (`connect`) and async (`aconnect`).

    with connect("http://localhost:8000/channels/news") as events:
        for event in events:
            print(event.id, event.event, event.data)

They reconnect by themselves (with `Last-Event-ID`, honouring `retry:`, backing off), and
read events with `ssehub.protocol.Decoder`. See docs/client.md.
"""

from ssehub.client._async import AsyncEventSource, aconnect
from ssehub.client._errors import (
    ConnectionLost,
    ContentTypeError,
    EventError,
    HTTPStatusError,
    IdleTimeout,
    InvalidJSON,
    ResponseError,
    SSEError,
)
from ssehub.client._json import (
    aiter_json,
    aiter_openai,
    event_json,
    iter_json,
    iter_openai,
    openai_chunk,
)
from ssehub.client._reconnect import Reconnect
from ssehub.client._sync import EventSource, connect
from ssehub.protocol import EventTooLarge, ServerSentEvent

__all__ = [
    "AsyncEventSource",
    "ConnectionLost",
    "ContentTypeError",
    "EventError",
    "EventSource",
    "EventTooLarge",
    "HTTPStatusError",
    "IdleTimeout",
    "InvalidJSON",
    "Reconnect",
    "ResponseError",
    "SSEError",
    "ServerSentEvent",
    "aconnect",
    "aiter_json",
    "aiter_openai",
    "connect",
    "event_json",
    "iter_json",
    "iter_openai",
    "openai_chunk",
]

# Tracebacks and reprs name the public module, not the private one a class is defined in.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("ssehub.client."):
        _obj.__module__ = "ssehub.client"
del _name, _obj

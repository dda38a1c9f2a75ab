"""The SSE protocol core: events, encoder, decoder. Pure: no sockets, no event loop."""

from ssehub.protocol._decoder import DEFAULT_MAX_EVENT_SIZE, Decoder, EventTooLarge
from ssehub.protocol._encoder import encode, encode_comment, encode_data, encode_retry
from ssehub.protocol._events import ServerSentEvent

__all__ = [
    "DEFAULT_MAX_EVENT_SIZE",
    "Decoder",
    "EventTooLarge",
    "ServerSentEvent",
    "encode",
    "encode_comment",
    "encode_data",
    "encode_retry",
]

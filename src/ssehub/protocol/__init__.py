"""The SSE protocol core: events, encoder, decoder. Pure: no sockets, no event loop."""

from ssehub.protocol._encoder import encode, encode_comment, encode_data, encode_retry
from ssehub.protocol._events import ServerSentEvent

__all__ = [
    "ServerSentEvent",
    "encode",
    "encode_comment",
    "encode_data",
    "encode_retry",
]

"""ssehub: Server-Sent Events done properly."""

from ssehub.protocol import (
    Decoder,
    EventTooLarge,
    ServerSentEvent,
    encode,
    encode_comment,
    encode_data,
    encode_retry,
)

__all__ = [
    "Decoder",
    "EventTooLarge",
    "ServerSentEvent",
    "encode",
    "encode_comment",
    "encode_data",
    "encode_retry",
]

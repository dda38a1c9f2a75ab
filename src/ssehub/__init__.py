"""ssehub: Server-Sent Events done properly."""

from ssehub.protocol import (
    ServerSentEvent,
    encode,
    encode_comment,
    encode_data,
    encode_retry,
)

__all__ = [
    "ServerSentEvent",
    "encode",
    "encode_comment",
    "encode_data",
    "encode_retry",
]

"""protoserve client: generated stubs of the v1 API and a small typed client, sync and async.

Needs only grpcio and protobuf. Results are plain dataclasses (`protoserve.client.results`);
failures raise a `ProtoserveError` subclass per gRPC status (`protoserve.client.errors`).
"""

from __future__ import annotations

from protoserve.client.async_client import AsyncProtoserveClient
from protoserve.client.async_stream import AsyncStream
from protoserve.client.channel import TLSOptions
from protoserve.client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    ProtoserveError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from protoserve.client.results import (
    Choice,
    Delta,
    ModelInfo,
    Reply,
    Segment,
    TokenLogprob,
    Tokens,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Transcript,
    TranscriptDelta,
    Usage,
)
from protoserve.client.sync_client import ProtoserveClient

__all__ = [
    "AsyncProtoserveClient",
    "AsyncStream",
    "Cancelled",
    "Choice",
    "DeadlineExceeded",
    "Delta",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "ModelInfo",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "ProtoserveClient",
    "ProtoserveError",
    "Reply",
    "Segment",
    "TLSOptions",
    "TokenLogprob",
    "Tokens",
    "ToolCall",
    "ToolCallDelta",
    "TopLogprob",
    "Transcript",
    "TranscriptDelta",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Usage",
]

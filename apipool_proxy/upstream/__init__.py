"""HTTP/1.1 requests to upstreams: connections, keep-alive, timeouts and the address guard."""

from .client import ForwardProxy, UpstreamClient, header_block
from .connection import UpstreamResponse
from .errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .websockets import WebSocketDialer

__all__ = (
    "ForwardProxy",
    "UpstreamClient",
    "UpstreamClosed",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "WebSocketDialer",
    "header_block",
)

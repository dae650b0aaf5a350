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

__all__ = (
    "ForwardProxy",
    "UpstreamClient",
    "UpstreamClosed",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "header_block",
)

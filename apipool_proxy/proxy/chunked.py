"""Writing a streamed response's pieces straight to the caller's connection.

A stream relays tens of thousands of small pieces a second. aiohttp's
``StreamResponse.write`` spends two coroutines, a join and its own bookkeeping on each;
here a piece costs one formatted write. The response is still prepared (its headers sent)
and ended (``write_eof``, which writes the last chunk and the terminator) by aiohttp, and
flow control uses the writer's public ``drain()``.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.http import HttpVersion11

# Above this many bytes waiting in the caller's connection, wait for it to drain: a slow
# caller then slows the upstream down (its socket stops being read) instead of filling
# memory.
DRAIN_AT = 64 * 1024


class ChunkedBody:
    """The body of a prepared response with chunked transfer encoding."""

    def __init__(self, request: web.BaseRequest, transport: asyncio.Transport) -> None:
        self._writer = request.writer
        self._transport = transport

    @classmethod
    def for_request(
        cls, request: web.BaseRequest, response: web.StreamResponse
    ) -> ChunkedBody | None:
        """Turn on chunked encoding for ``response`` (call before ``prepare``) and return
        its body; None for an HTTP/1.0 caller, whose body aiohttp writes as it likes."""
        transport = request.transport
        if request.version < HttpVersion11 or transport is None:
            return None
        response.enable_chunked_encoding()
        return cls(request, transport)

    def write(self, data: bytes) -> bool:
        """Send one non-empty piece; True when ``drain()`` should be awaited before the next."""
        transport = self._transport
        if transport.is_closing():
            raise ConnectionResetError("the caller closed the connection")
        transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        return transport.get_write_buffer_size() > DRAIN_AT

    async def drain(self) -> None:
        await self._writer.drain()

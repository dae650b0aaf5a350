"""One HTTP/1.1 connection to an upstream, and the answer arriving on it.

The answer is parsed by llhttp (through httptools) as bytes arrive. Its body waits in a
small queue until the relay takes it; when the queue grows past HIGH_WATER the socket stops
being read, so a slow caller slows the upstream down instead of filling memory. A relay may
instead have the body pushed to it (``push_to``): each read's pieces are handed to it from
the socket's callback, with no task woken per piece.

Timeouts cost one timer per request, not one per read: every read stamps the time, and the
timer, when it fires, either finds the connection silent for ``read_timeout`` or re-arms
itself for the rest of the interval.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol

import httptools
from multidict import CIMultiDict

from ..log import upstream_log
from .errors import (
    StaleConnection,
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from .client import Origin

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# A compressed piece is inflated at most this much at a time, so a "zip bomb" answer is
# handed on in bounded slices (and stopped by whoever reads it) instead of all at once.
INFLATE_SLICE = 256 * 1024
DECODABLE = frozenset(("gzip", "x-gzip", "deflate"))
# Small requests go out in one write; big ones skip the copy that joining them would cost.
JOIN_LIMIT = 64 * 1024
# The most bytes an upstream may send before its answer's headers are complete (1xx
# answers included). Real ones send a few KiB; without a bound, an upstream sending
# headers without end would grow the parser's buffers until memory ran out.
MAX_HEAD_BYTES = 64 * 1024


class UpstreamResponse:
    """Status, headers and body of one upstream answer; ``release()`` when done with it.

    When the body was compressed with gzip or deflate it is handed out decoded, and the
    headers no longer carry Content-Encoding or Content-Length (``content_length`` is None).
    """

    __slots__ = (
        "status",
        "reason",
        "headers",
        "content_length",
        "_connection",
        "_chunks",
        "_buffered",
        "_done",
        "_error",
        "_waiter",
        "_inflater",
        "_received",
        "_sink",
    )

    def __init__(self, connection: UpstreamConnection) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        self._connection = connection
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._inflater: _Inflater | None = None  # set when the body arrives compressed
        self._received = False  # any byte of this answer at all
        self._sink: Callable[[bytes], bool] | None = None  # see push_to()

    # -- reading ---------------------------------------------------------------------------

    def body_if_complete(self) -> bytes | None:
        """The whole body when it has already arrived and needs no decoding, else None."""
        if not self._done or self._error is not None or self._inflater is not None:
            return None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body, or its first ``limit`` bytes (the rest is left unread)."""
        parts: list[bytes] = []
        size = 0
        while True:
            piece = self.take()
            if piece is None:
                await self.arrival()
                continue
            if not piece:
                return b"".join(parts)
            parts.append(piece)
            size += len(piece)
            if limit is not None and size >= limit:
                return b"".join(parts)[:limit]

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body piece by piece as it arrives, decoded when it was compressed."""
        while True:
            piece = self.take()
            if piece is None:
                await self.arrival()
            elif piece:
                yield piece
            else:
                return

    def take(self) -> bytes | None:
        """The next piece of the body, decoded: None when none has arrived yet (await
        ``arrival()``), b"" once the body is over. Raises the error that cut it short.

        With ``arrival()`` this is the cheapest way through a body: a relay loop calling
        them directly pays for no generator or coroutine per piece.
        """
        if self._inflater is not None:
            return self._take_decoded(self._inflater)
        return self._take_raw()

    def arrival(self) -> asyncio.Future[None]:
        """A future done when the body has moved on: bytes came, it ended, or it broke."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = self._connection.loop.create_future()
        return waiter

    def push_to(self, sink: Callable[[bytes], bool]) -> bool:
        """Hand the body to ``sink`` as it arrives instead of queueing it for ``take()``.

        Call it when ``take()`` has just returned None. From then on ``sink`` is called
        from the connection's read callback with everything one read brought, and returns
        False to stop being pushed to: the body then queues again and ``arrival()`` fires.
        Pieces that arrive with the end of the body are pushed too, before ``arrival()``
        fires for the end: when many streams end at once, a last piece left for the relay
        to take would wait for every one of their endings. Returns False, and pushes
        nothing, for a compressed body (which ``take()`` decodes in bounded slices) or one
        that is already over.
        """
        if self._inflater is not None or self._done or self._error is not None:
            return False
        self._sink = sink
        return True

    def drained(self) -> bool:
        """True when the body has ended and every piece of it has been taken."""
        return self._done and not self._chunks and self._inflater is None

    def _take_raw(self) -> bytes | None:
        chunks = self._chunks
        if chunks:
            chunk = chunks.popleft()
            self._buffered -= len(chunk)
            if self._buffered < LOW_WATER:
                self._connection.resume_reading()
            return chunk
        if self._error is not None:
            raise self._error
        return b"" if self._done else None

    def _take_decoded(self, inflater: _Inflater) -> bytes | None:
        try:
            if inflater.unconsumed_tail:
                out = inflater.decompress(inflater.unconsumed_tail, INFLATE_SLICE)
                if out:
                    return out
            while True:
                raw = self._take_raw()
                if raw is None:
                    return None
                if not raw:
                    self._inflater = None  # the end: what the decoder still holds, then b""
                    return inflater.flush() or b""
                out = inflater.decompress(raw, INFLATE_SLICE)
                if out:
                    return out
        except zlib.error:
            raise UpstreamProtocolError("undecodable compressed answer") from None

    def release(self) -> None:
        """Hand the connection back for reuse when the answer was read to its end, else close."""
        self._sink = None
        self._connection.finish(self, self._done and self._error is None)

    # -- fed by the connection -------------------------------------------------------------

    def _headers_complete(self, status: int) -> None:
        self.status = status
        headers = self.headers
        length = headers.get("Content-Length")
        if length is not None and length.isdigit():
            self.content_length = int(length)
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding in DECODABLE:
            self._inflater = _inflater(encoding)
            self.content_length = None
            del headers["Content-Encoding"]
            headers.popall("Content-Length", None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._sink is not None:
            return  # pushed once the whole read is parsed (see _push)
        if self._buffered > HIGH_WATER:
            self._connection.pause_reading()
        self._wake()

    def _push(self) -> None:
        """Hand what arrived to the sink; stop pushing once the body is over."""
        chunks, sink = self._chunks, self._sink
        if sink is None or not chunks:
            return
        if self._error is not None:
            self._stop_pushing()
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        try:
            keep = sink(data)
        except Exception:
            # A bug in the relay, not the upstream's fault: the piece is lost, so the body
            # must not look whole to whoever reads on.
            upstream_log.exception("relay sink failed")
            self._done = False
            self._fail(UpstreamError())
            return
        if not keep or self._done:
            self._stop_pushing()

    def _stop_pushing(self) -> None:
        self._sink = None
        if self._buffered > HIGH_WATER:
            self._connection.pause_reading()
        self._wake()

    def _complete(self) -> None:
        self._done = True
        if not self._chunks:
            self._sink = None  # else the read callback pushes the last pieces, then stops
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self._done and self._error is None:
            self._error = error
            self._sink = None
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _inflater(encoding: str) -> _Inflater:
    # wbits 47 reads both gzip and zlib headers; "deflate" is zlib-wrapped by the RFC,
    # though some servers send it raw, which a first byte without a zlib header betrays.
    if encoding == "deflate":
        return _DeflateInflater()
    return zlib.decompressobj(wbits=47)


class _Inflater(Protocol):
    """What decoding needs of a zlib decompressobj."""

    @property
    def unconsumed_tail(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _DeflateInflater:
    """A decompressobj for "deflate" that decides between zlib and raw on the first bytes."""

    def __init__(self) -> None:
        self._inner: zlib._Decompress | None = None
        self._start = b""  # the first byte, while it arrives alone

    @property
    def unconsumed_tail(self) -> bytes:
        return self._inner.unconsumed_tail if self._inner is not None else b""

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._inner is None:
            data = self._start + data
            if len(data) < 2:
                self._start = data
                return b""
            self._inner = _deflate_for(data)
        return self._inner.decompress(data, max_length)

    def flush(self) -> bytes:
        if self._inner is None:
            if not self._start:
                return b""
            self._inner = _deflate_for(self._start)
            return self._inner.decompress(self._start) + self._inner.flush()
        return self._inner.flush()


def _deflate_for(start: bytes) -> zlib._Decompress:
    # A zlib header: compression method 8 in the low nibble, the first two bytes a
    # multiple of 31 (RFC 1950).
    zlib_header = start[0] & 0x0F == 8 and int.from_bytes(start[:2]) % 31 == 0
    return zlib.decompressobj(wbits=15 if zlib_header else -15)


class SilenceWatch:
    """Fails answers whose upstream has been silent for ``read_timeout``.

    One timer for every connection waiting on an answer, firing a few times per timeout,
    instead of a timer armed and cancelled for each request: on the request path that cost
    more than the rest of sending it. A silent upstream is therefore noticed between
    ``read_timeout`` and a quarter more after its last byte.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self.read_timeout = read_timeout
        self._loop = loop
        self._waiting: set[UpstreamConnection] = set()
        self._interval = read_timeout / 4
        self._timer: asyncio.TimerHandle | None = None

    def add(self, connection: UpstreamConnection) -> None:
        self._waiting.add(connection)
        if self._timer is None:
            self._timer = self._loop.call_later(self._interval, self._check)

    def discard(self, connection: UpstreamConnection) -> None:
        self._waiting.discard(connection)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        now = self._loop.time()
        for connection in list(self._waiting):
            connection.check_silence(now, self.read_timeout)
        # Idle when nothing waits; the next request starts the timer again.
        waiting = bool(self._waiting)
        self._timer = self._loop.call_later(self._interval, self._check) if waiting else None


class UpstreamConnection(asyncio.Protocol):
    """An asyncio protocol carrying one request at a time; reused while the server allows."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin, watch: SilenceWatch):
        self.origin = origin  # the pool it returns to
        self.reused = False
        self.idle_since = 0.0
        self.closed = False
        self.loop = loop
        self._watch = watch
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: UpstreamResponse | None = None
        self._headers_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._head_only = False
        self._keep_alive = False
        self._paused = False
        self._last_read = 0.0
        self._head_bytes = 0  # received for the current answer before its headers ended
        # Set by the client: where a connection goes when its answer was read to the end.
        self.on_reusable: Callable[[UpstreamConnection], None] | None = None

    # -- used by the client ----------------------------------------------------------------

    def send(self, head: bytes, body: bytes, head_only: bool) -> asyncio.Future[UpstreamResponse]:
        """Write one request; the future holds the answer once its headers are in.

        Whoever awaits it must call ``abort()`` when cancelled.
        """
        transport = self._transport
        if self.closed or transport is None or transport.is_closing():
            raise StaleConnection()
        response = UpstreamResponse(self)
        self._response = response
        self._head_only = head_only
        self._keep_alive = False
        waiter = self.loop.create_future()
        self._headers_waiter = waiter
        self._head_bytes = 0
        self._last_read = self.loop.time()
        self._watch.add(self)
        if len(body) < JOIN_LIMIT:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        return waiter

    def finish(self, response: UpstreamResponse, reusable: bool) -> None:
        """The answer was taken: back to the pool if possible, otherwise closed."""
        if response is not self._response:
            return  # released twice: the connection may already carry another request
        self._unwatch()
        self._response = None
        if reusable and self._keep_alive and not self.closed:
            self.resume_reading()
            self.reused = True
            if self.on_reusable is not None:
                self.on_reusable(self)
            return
        self.abort()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def pause_reading(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._last_read = self.loop.time()  # a pause was ours, not the upstream's silence
            self._transport.resume_reading()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._response is None:
            self.abort()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._last_read = self.loop.time()
        response = self._response
        response._received = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # Invalid HTTP, a second answer, or a protocol switch nobody asked for.
            self._fail(UpstreamProtocolError())
            self.abort()
            return
        if not response.status:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                upstream_log.info("upstream %s sent headers without end", self.origin.host)
                self._fail(UpstreamProtocolError())
                self.abort()
            return
        if response._sink is not None:
            response._push()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._unwatch()
        response = self._response
        if response is None:
            return
        if response.status and exc is None and self._reads_until_close(response):
            # A body without length or chunks ends when the connection does; a reset
            # (exc is set) cuts it short instead.
            response._complete()
        elif response._received:
            self._fail(UpstreamClosed())
        else:
            self._fail(StaleConnection() if self.reused else UpstreamClosed())

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        response = self._response
        if response is not None and response.status:
            # A second answer to one request: whatever it is, the connection is unusable.
            raise UpstreamProtocolError("bytes after the end of the answer")

    def on_status(self, status: bytes) -> None:
        if self._response is not None:
            self._response.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            self._response.headers.add(name.decode("latin-1"), value.decode("utf-8", "replace"))

    def on_headers_complete(self) -> None:
        response = self._response
        if response is None:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            response.headers.clear()  # 100 Continue, 103 Early Hints: the real answer follows
            return
        self._keep_alive = self._parser.should_keep_alive() and not self._head_only
        try:
            response._headers_complete(status)
        except ValueError:
            self._fail(UpstreamProtocolError())
            return
        if self._head_only:
            response._complete()  # no body follows, whatever Content-Length says
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is None or not response.status:
            return  # the end of an informational answer
        self._unwatch()
        response._complete()

    # -- internals ---------------------------------------------------------------------------

    def _reads_until_close(self, response: UpstreamResponse) -> bool:
        if response._done or response._error is not None:
            return False
        headers = response.headers
        return "Content-Length" not in headers and "chunked" not in headers.get(
            "Transfer-Encoding", ""
        )

    def _fail(self, error: UpstreamError) -> None:
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self._response is not None:
            self._response._fail(error)

    def check_silence(self, now: float, read_timeout: float) -> None:
        """Fail the answer when the upstream has sent nothing for ``read_timeout``."""
        if self._paused:
            self._last_read = now  # our own pause is not the upstream's silence
        elif now - self._last_read >= read_timeout:
            self._fail(UpstreamTimeout())
            self.abort()

    def _unwatch(self) -> None:
        self._watch.discard(self)  # no answer is awaited any more

    def abort(self) -> None:
        self.closed = True
        self._unwatch()
        if self._transport is not None:
            self._transport.abort()

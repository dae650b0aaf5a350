"""A fake OpenAI upstream that streams chat completions at a fixed pace.

POST /v1/chat/completions with "stream": true gets CHUNKS server-sent events, INTERVAL seconds
apart, then `data: [DONE]`. Each chunk carries "x_sent_at", the sender's time.time() taken just
before the write, so a client on the same machine can measure how long each chunk took to reach
it. Requests without "stream": true get one canned chat.completion.

Two optional body fields let a load client hold many streams open before any chunk flows:
"x_start_at" (a time.time() value: the headers go out at once, the first chunk not before
then) and "x_phase" (0..1: how far into the first interval this stream's chunks are offset,
so a thousand streams do not send in lockstep).

This stand-in shares one core with the load client and must pace 50,000 chunks/s for a
thousand streams with room to spare, so it is built for that:

- One scheduler for all streams. Every stream's next chunk waits in one heap ordered by its
  due time, and one timer wakes about once a millisecond to write every chunk that is due.
  A sleeping task per stream would cost a timer, a task switch and a coroutine resume for
  every chunk; here a wake-up costs one timer for some fifty chunks. Chunks go out up to a
  tick late, which the measurement does not see: each is stamped when it is written.
- A raw asyncio protocol on uvloop, the request parsed by httptools (llhttp): no web
  framework between the socket and the write. HTTP/1.1 with keep-alive, answers in chunked
  framing, as a real upstream does, so a proxy pools its connections here as it would there.

    python scripts/stream_upstream.py --port 9001 [--chunks 100] [--interval 0.02]
"""

import argparse
import asyncio
import gc
import heapq
import itertools
import json
import resource
import time
from collections import deque
from typing import NamedTuple

import httptools
import uvloop

MODEL = "gpt-4o-mini"
COMPLETION_ID = "chatcmpl-bench"
CREATED = 1_700_000_000
USAGE = {"prompt_tokens": 12, "completion_tokens": 100, "total_tokens": 112}
PATH = b"/v1/chat/completions"
TICK = 0.001  # seconds between the scheduler's wake-ups while chunks are due
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"


def chunk_prefixes(count: int) -> list[bytes]:
    """Build every chunk up to its timestamp once, so sending costs one format per chunk."""
    prefixes = []
    for index in range(count):
        delta = {"role": "assistant", "content": ""} if index == 0 else {"content": "tok "}
        finish = "stop" if index == count - 1 else None
        event = {
            "id": COMPLETION_ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        # Drop the closing brace: x_sent_at is appended as the last member at send time.
        prefixes.append(b"data: " + json.dumps(event).encode()[:-1] + b', "x_sent_at": ')
    return prefixes


def usage_event() -> bytes:
    # Sent only when the caller asks for stream_options.include_usage, as the OpenAI API does.
    event = {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [],
        "usage": USAGE,
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def completion() -> dict:
    message = {"role": "assistant", "content": "Hello from the stream upstream."}
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": USAGE,
    }


def chunk(data: bytes) -> bytes:
    """One piece of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def whole_response(status: str, body: dict, keep_alive: bool) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
    )
    return head.encode() + end_of_head(keep_alive) + payload


def end_of_head(keep_alive: bool) -> bytes:
    """The blank line ending a head, after "Connection: close" if the client asked for it."""
    return b"\r\n" if keep_alive else b"Connection: close\r\n\r\n"


def error_response(status: str, message: str, keep_alive: bool) -> bytes:
    error = {"message": message, "type": "invalid_request_error"}
    return whole_response(status, {"error": error}, keep_alive)


class Request(NamedTuple):
    method: bytes
    url: bytes
    body: bytes
    keep_alive: bool


class Stream:
    """One streamed answer in progress: which chunk is next and what ends it."""

    __slots__ = ("connection", "sent", "ending")

    def __init__(self, connection: "Connection", ending: bytes) -> None:
        self.connection = connection
        self.sent = 0
        self.ending = ending  # after the last chunk: usage if asked for, [DONE], the body's end

    def send_next(self, prefixes: list[bytes]) -> bool:
        """Write the next chunk, stamped now; False once the stream is over (or gone)."""
        if self.connection.closed:
            return False
        data = chunk(prefixes[self.sent] + b"%.6f}\n\n" % time.time())
        self.sent += 1
        if self.sent < len(prefixes):
            self.connection.write(data)
            return True
        self.connection.write(data + self.ending)
        self.connection.answered()
        return False


class Scheduler:
    """Every stream's next chunk in one heap; one timer writes all that are due."""

    def __init__(self, prefixes: list[bytes], interval: float) -> None:
        self.prefixes = prefixes
        self.interval = interval
        self._heap: list[tuple[float, int, Stream]] = []
        self._order = itertools.count()  # breaks ties in due time, so streams never compare
        self._timer: asyncio.TimerHandle | None = None
        self._wake_at = 0.0

    def add(self, stream: Stream, first_at: float) -> None:
        heapq.heappush(self._heap, (first_at, next(self._order), stream))
        self._arm()

    def _arm(self) -> None:
        """Wake for the earliest due chunk, but not sooner than a tick from now."""
        if not self._heap:
            return
        wake_at = max(self._heap[0][0], time.time() + TICK)
        if self._timer is not None:
            if self._wake_at <= wake_at:
                return
            self._timer.cancel()
        self._wake_at = wake_at
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(wake_at - time.time(), self._send_due)

    def _send_due(self) -> None:
        self._timer = None
        heap, prefixes, interval = self._heap, self.prefixes, self.interval
        now = time.time()
        while heap and heap[0][0] <= now:
            # Popped before sending: a stream that ends may start the connection's next one.
            due, order, stream = heapq.heappop(heap)
            if stream.send_next(prefixes):
                # The next due time counts from the schedule, not from now: no drift.
                heapq.heappush(heap, (due + interval, order, stream))
        self._arm()


class Connection(asyncio.Protocol):
    """One client connection: requests are parsed as they come and answered in order."""

    def __init__(self, scheduler: Scheduler, ending: bytes, usage_ending: bytes) -> None:
        self.closed = False
        self._scheduler = scheduler
        self._endings = (ending, usage_ending)
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport  # set by connection_made
        self._url = b""
        self._body: list[bytes] = []
        self._queue: deque[Request] = deque()  # pipelined requests wait for the stream
        self._streaming = False
        self._keep_alive = True

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self._streaming:  # an error in the middle of a stream would corrupt it
                self.write(error_response("400 Bad Request", f"bad request: {exc}", False))
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True  # the scheduler drops this connection's stream at its next chunk

    # -- httptools callbacks -----------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method()
        request = Request(method, self._url, b"".join(self._body), self._parser.should_keep_alive())
        self._url, self._body = b"", []
        self._queue.append(request)
        if not self._streaming:
            self._answer_next()

    # -- answering ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed:
            self._transport.write(data)

    def answered(self) -> None:
        """The current answer is written whole: close, or take the next request."""
        self._streaming = False
        if not self._keep_alive:
            self._close()
        elif self._queue:
            self._answer_next()

    def _close(self) -> None:
        self.closed = True
        self._transport.close()  # after the buffered answer is sent

    def _answer_next(self) -> None:
        while self._queue and not self._streaming and not self.closed:
            request = self._queue.popleft()
            self._keep_alive = request.keep_alive
            self._answer(request)
            if not self._streaming and not self._keep_alive:
                self._close()

    def _answer(self, request: Request) -> None:
        keep_alive = request.keep_alive
        if request.url.split(b"?")[0] != PATH:
            self.write(error_response("404 Not Found", "no such endpoint", keep_alive))
            return
        if request.method != b"POST":
            self.write(error_response("405 Method Not Allowed", "POST only", keep_alive))
            return
        try:
            body = json.loads(request.body)
            if not isinstance(body, dict):
                raise ValueError("the body is not a JSON object")
        except ValueError as exc:
            # The OpenAI API answers a body it cannot parse with 400, not a server error.
            message = f"invalid JSON body: {exc}"
            self.write(error_response("400 Bad Request", message, keep_alive))
            return
        if not body.get("stream"):
            self.write(whole_response("200 OK", completion(), keep_alive))
            return
        self._start_stream(body, keep_alive)

    def _start_stream(self, body: dict, keep_alive: bool) -> None:
        interval = self._scheduler.interval
        start_at = float(body.get("x_start_at") or time.time())
        first_at = start_at + float(body.get("x_phase", 0)) * interval
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stream = Stream(self, self._endings[include_usage])
        self.write(STREAM_HEAD + end_of_head(keep_alive))
        self._streaming = True
        if self._scheduler.prefixes:
            self._scheduler.add(stream, first_at)
        else:
            self.write(stream.ending)
            self._streaming = False


def stream_endings() -> tuple[bytes, bytes]:
    """What follows the last chunk: without and with the usage event."""
    done = chunk(b"data: [DONE]\n\n") + LAST_CHUNK
    return done, chunk(usage_event()) + done


def raise_nofile_limit() -> None:
    # A thousand concurrent streams need a thousand sockets; the default soft limit is often 1024.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(args: argparse.Namespace) -> None:
    scheduler = Scheduler(chunk_prefixes(args.chunks), args.interval)
    ending, usage_ending = stream_endings()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(scheduler, ending, usage_ending), args.host, args.port, backlog=4096
    )
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between chunks")
    args = parser.parse_args()

    raise_nofile_limit()
    # A stand-in must not stall: a full collection over a thousand open streams pauses the
    # loop for tens of ms, which would show up as chunks sent late in bursts. The benchmark
    # starts a fresh upstream per run, so the cyclic garbage it leaves is bounded.
    gc.disable()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()

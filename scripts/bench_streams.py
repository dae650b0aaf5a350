"""Hold many chat-completion streams open at once and measure each chunk's delay.

Every chunk from scripts/stream_upstream.py carries "x_sent_at" (the upstream's time.time() at
send). This client takes time.time() when the bytes arrive, so `received - x_sent_at` is the
delay one chunk picked up between upstream and caller: the proxy's share plus this client's own.
Run it once straight at the upstream to learn the client's share. Prints one JSON object.

All streams are opened during an opening window and ask the upstream (via "x_start_at") to
start sending when the window closes, so the streams really are open at the same time; their
phases are spread over one chunk interval so they do not send in lockstep.

The client shares one core with the upstream stand-in and must take in 50,000 chunks/s with
room to spare, or its own queueing is what gets measured. So each stream is a raw asyncio
protocol on uvloop, one connection per stream: the answer is parsed by httptools (llhttp) as
it arrives, and each piece of body is searched for the timestamps with one regular expression,
never decoded as JSON. A chunk costs one callback and a few C calls, where an HTTP client
library's stream reader would add buffers, futures and a task switch per chunk.

    python scripts/bench_streams.py --url http://127.0.0.1:9002/v1/chat/completions --streams 1000
"""

import argparse
import asyncio
import gc
import json
import re
import resource
import time
from array import array
from collections import Counter
from urllib.parse import urlsplit

import httptools
import uvloop

# A proxy may re-serialise events (other spacing, other key order), so no fixed layout.
SENT_AT = re.compile(rb'"x_sent_at":\s*([0-9.]+)')
DONE = re.compile(rb"^data:[ \t]*\[DONE\][ \t]*\r?$", re.MULTILINE)
LAG_TICK = 0.01
ERROR_SAMPLE_CHARS = 300


class Tally:
    """What all streams saw, kept in flat arrays: 100k floats must not cost 100k objects."""

    def __init__(self) -> None:
        self.delays = array("d")
        self.lengths = array("d")
        self.loop_lag = array("d")
        self.errors: Counter[str] = Counter()
        self.error_samples: dict[str, str] = {}
        self.completed = 0
        self.open_late = 0
        self.last_received = 0.0
        self.cpu_at_start = 0.0

    def error(self, kind: str, sample: str = "") -> None:
        self.errors[kind] += 1
        self.error_samples.setdefault(kind, sample[:ERROR_SAMPLE_CHARS])


class StreamProtocol(asyncio.Protocol):
    """One stream on its own connection: send the request, read the answer as it arrives.

    Delays go straight into the tally; the verdict on the stream (see `judge`) is left to
    whoever awaits `finished`, which is set once the answer ended or the connection did.
    """

    def __init__(self, request: bytes, start_at: float, tally: Tally) -> None:
        self.finished = asyncio.get_running_loop().create_future()
        self.failure: tuple[str, str] | None = None  # (error kind, sample)
        self.status = 0
        self.chunks = 0
        self.done = False  # data: [DONE] seen
        self.error_body = b""
        self._request = request
        self._start_at = start_at
        self._tally = tally
        self._add_delay = tally.delays.append
        self._parser = httptools.HttpResponseParser(self)
        self._framed = False  # a length or chunks, not the connection's end, ends the body
        self._pending = b""  # an event's start whose line end has not arrived yet
        self._received = 0.0
        self._first = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._received = self._tally.last_received = time.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(("HttpParserError", str(exc)))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.finished.done():
            return
        if self.status and not self._framed:
            self.on_message_complete()  # a body without length or chunks ends with the connection
        elif exc is not None:
            self._finish((type(exc).__name__, str(exc)))
        elif self.status:
            self._finish(("connection closed mid-answer", f"after {self.chunks} chunks"))
        else:
            self._finish(("connection closed before the answer", ""))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, _value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self._received > self._start_at:
            self._tally.open_late += 1

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            self.error_body = (self.error_body + body)[:ERROR_SAMPLE_CHARS]
            return
        if self._pending:
            body = self._pending + body
        # Only whole lines: a timestamp split over two reads must not be read half.
        end = body.rfind(b"\n") + 1
        self._pending = body[end:]
        if end:
            self._scan(body[:end] if end < len(body) else body)

    def on_message_complete(self) -> None:
        if self._pending:
            self._scan(self._pending)
            self._pending = b""
        self._finish(None)

    # -- internals ---------------------------------------------------------------------------

    def _scan(self, lines: bytes) -> None:
        """Record the delay of every timestamped event in whole lines; note [DONE]."""
        received = self._received
        stamps = SENT_AT.findall(lines)
        if stamps:
            if not self.chunks:
                self._first = received
            self.chunks += len(stamps)
            for stamp in stamps:
                self._add_delay(received - float(stamp))
        if b"[DONE]" in lines and not self.done and DONE.search(lines):
            self.done = True
            # First chunk to [DONE]: longer than nominal means someone fell behind the pace.
            self._tally.lengths.append(received - self._first)

    def _finish(self, failure: tuple[str, str] | None) -> None:
        if self.finished.done():
            return
        self.failure = failure
        self.finished.set_result(None)


def judge(stream: StreamProtocol, expected_chunks: int, tally: Tally) -> None:
    if stream.failure is not None:
        tally.error(*stream.failure)
    elif stream.status != 200:
        tally.error(f"status {stream.status}", stream.error_body.decode(errors="replace"))
    elif not stream.done:
        tally.error("missing [DONE]", f"after {stream.chunks} chunks")
    elif stream.chunks < expected_chunks:
        tally.error("fewer chunks than expected", f"{stream.chunks} of {expected_chunks}")
    else:
        tally.completed += 1


async def one_stream(
    args, request: bytes, start_at: float, tally: Tally
) -> asyncio.BaseTransport | None:
    """Run one stream to its end and judge it; return its connection, still open."""
    target = urlsplit(args.url)
    loop = asyncio.get_running_loop()
    try:
        transport, stream = await loop.create_connection(
            lambda: StreamProtocol(request, start_at, tally), target.hostname, target.port or 80
        )
    except OSError as exc:  # refused, unreachable, out of ports or file descriptors
        tally.error(type(exc).__name__, str(exc))
        return None
    try:
        await stream.finished
    except asyncio.CancelledError:
        transport.abort()  # timed out
        raise
    judge(stream, args.chunks, tally)
    return transport


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def note_cpu_at(start_at: float, tally: Tally) -> None:
    # CPU is shared out over the sending phase only; opening the streams costs far less.
    await asyncio.sleep(max(0.0, start_at - time.time()))
    tally.cpu_at_start = cpu_seconds()


async def watch_loop_lag(tally: Tally) -> None:
    # How late this client's own event loop wakes up: a lower bound of the delay it adds.
    # perf_counter, not loop.time(): uvloop's clock only ticks in whole milliseconds.
    while True:
        before = time.perf_counter()
        await asyncio.sleep(LAG_TICK)
        tally.loop_lag.append(time.perf_counter() - before - LAG_TICK)


def request_bytes(args: argparse.Namespace, start_at: float, index: int) -> bytes:
    """The whole HTTP/1.1 request for stream `index`, head and JSON body."""
    body = {
        "model": args.model,
        "stream": True,
        "messages": [{"role": "user", "content": "Count to one hundred."}],
        "x_start_at": start_at,
        "x_phase": index / args.streams,
    }
    payload = json.dumps(body).encode()
    target = urlsplit(args.url)
    path = target.path + (f"?{target.query}" if target.query else "")
    head = [
        f"POST {path or '/'} HTTP/1.1",
        f"Host: {target.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ]
    if args.token:
        head.append(f"Authorization: Bearer {args.token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


async def open_streams(args, tally: Tally, start_at: float) -> list[asyncio.Task]:
    """Open the streams evenly over the first half of the opening window."""
    opened = time.time()
    spacing = (start_at - opened) / 2 / args.streams
    tasks = []
    for index in range(args.streams):
        await asyncio.sleep(max(0.0, opened + index * spacing - time.time()))
        stream = one_stream(args, request_bytes(args, start_at, index), start_at, tally)
        tasks.append(asyncio.create_task(stream, name=f"stream-{index}"))
    return tasks


async def run(args: argparse.Namespace) -> dict:
    tally = Tally()
    window = args.window if args.window is not None else 1.0 + args.streams / 250
    start_at = time.time() + window
    lag_task = asyncio.create_task(watch_loop_lag(tally), name="loop-lag")
    cpu_task = asyncio.create_task(note_cpu_at(start_at, tally), name="cpu-at-start")

    tasks = await open_streams(args, tally, start_at)
    done, pending = await asyncio.wait(
        tasks, timeout=max(1.0, start_at + args.timeout - time.time())
    )
    for task in pending:
        task.cancel()
        tally.error("timed out", f"still open {args.timeout:g} s after the start")
    await asyncio.gather(*pending, return_exceptions=True)
    # Closed only now, as a pooling client would: a thousand connections closed as their
    # streams end would crowd a thousand closes (here and in the proxy) into the last
    # chunk interval and hold up the last chunks of the streams still running.
    for transport in filter(None, (task.result() for task in done)):
        transport.close()
    lag_task.cancel()
    cpu_task.cancel()
    return summarize(args, tally, start_at, cpu_seconds() - tally.cpu_at_start)


def percentiles_ms(values: array, shares: dict[str, float]) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys(shares)
    ordered = sorted(values)
    last = len(ordered) - 1
    return {
        name: round(ordered[min(last, int(share * len(ordered)))] * 1000, 3)
        for name, share in shares.items()
    }


def median(values: array) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def summarize(args, tally: Tally, start_at: float, cpu: float) -> dict:
    sending = tally.last_received - start_at
    return {
        "streams": args.streams,
        "completed": tally.completed,
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "error_samples": tally.error_samples,
        "opened_late": tally.open_late,
        "chunks": len(tally.delays),
        "offered_chunks_per_s": round(args.streams / args.interval),
        "achieved_chunks_per_s": round(len(tally.delays) / sending) if sending > 0 else None,
        "delay_ms": percentiles_ms(tally.delays, {"p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}),
        "client_loop_lag_ms": percentiles_ms(tally.loop_lag, {"p50": 0.5, "p99": 0.99, "max": 1.0}),
        "stream_length_p50_s": median(tally.lengths),
        # The sending phase, as time.time() values, so others' CPU can be shared out over it.
        "sending_from": start_at,
        "sending_until": tally.last_received,
        # Near 1.0 means this client used a whole core: its own delay then dominates.
        "client_cpu_share": round(cpu / sending, 3) if sending > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default="", help="bearer token, if the target wants one")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=100, help="chunks each stream must carry")
    parser.add_argument("--interval", type=float, default=0.02, help="upstream's chunk spacing")
    parser.add_argument(
        "--window", type=float, help="seconds to open every stream (default 1 + streams/250)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="give up this long after the start"
    )
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args()
    if urlsplit(args.url).scheme != "http":
        parser.error("--url must be a plain http:// URL")

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The instrument must not stall: with a thousand streams' objects alive, one full
    # collection pauses this loop for tens of ms and every chunk in flight looks late.
    # One short run leaves little cyclic garbage, so collection can wait until exit.
    gc.disable()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

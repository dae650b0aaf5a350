"""Hold many chat-completion streams open at once and measure each chunk's delay.

Every chunk from scripts/stream_upstream.py carries "x_sent_at" (the upstream's time.time() at
send). This client takes time.time() when the bytes arrive, so `received - x_sent_at` is the
delay one chunk picked up between upstream and caller: the proxy's share plus this client's own.
Run it once straight at the upstream to learn the client's share. Prints one JSON object.

All streams are opened during an opening window and ask the upstream (via "x_start_at") to
start sending when the window closes, so the streams really are open at the same time; their
phases are spread over one chunk interval so they do not send in lockstep.

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

import aiohttp

# A proxy may re-serialise events (other spacing, other key order), so no fixed layout.
SENT_AT = re.compile(rb'"x_sent_at":\s*([0-9.]+)')
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


def parse_lines(lines: list[bytes], received: float, tally: Tally) -> tuple[int, bool]:
    """Record the delay of every timestamped event; return (chunks seen, [DONE] seen)."""
    chunks, done = 0, False
    for line in lines:
        if not line.startswith(b"data:"):
            continue
        if line[5:].strip() == b"[DONE]":
            done = True
            continue
        found = SENT_AT.search(line)
        if found is None:
            continue
        tally.delays.append(received - float(found[1]))
        chunks += 1
    return chunks, done


async def read_events(response: aiohttp.ClientResponse, tally: Tally) -> tuple[int, bool]:
    chunks, done, pending, first = 0, False, b"", 0.0
    async for data in response.content.iter_any():
        received = time.time()
        *lines, pending = (pending + data).split(b"\n")
        seen, finished = parse_lines(lines, received, tally)
        if seen and not chunks:
            first = received
        chunks += seen
        if finished and not done:
            # First chunk to [DONE]: longer than nominal means someone fell behind the pace.
            tally.lengths.append(received - first)
        done = done or finished
        tally.last_received = max(tally.last_received, received)
    return chunks, done


async def one_stream(session, url: str, body: bytes, headers: dict, start_at: float, args, tally):
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if time.time() > start_at:
                tally.open_late += 1
            if response.status != 200:
                tally.error(f"status {response.status}", await response.text(errors="replace"))
                return
            chunks, done = await read_events(response, tally)
    except Exception as exc:  # a benchmark counts every failure, whatever its kind
        tally.error(type(exc).__name__, str(exc))
        return

    if not done:
        tally.error("missing [DONE]", f"after {chunks} chunks")
    elif chunks < args.chunks:
        tally.error("fewer chunks than expected", f"{chunks} of {args.chunks}")
    else:
        tally.completed += 1


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


def request_body(args: argparse.Namespace, start_at: float, index: int) -> bytes:
    body = {
        "model": args.model,
        "stream": True,
        "messages": [{"role": "user", "content": "Count to one hundred."}],
        "x_start_at": start_at,
        "x_phase": index / args.streams,
    }
    return json.dumps(body).encode()


async def open_streams(session, args, tally: Tally, start_at: float) -> list[asyncio.Task]:
    """Open the streams evenly over the first half of the opening window."""
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    opened = time.time()
    spacing = (start_at - opened) / 2 / args.streams
    tasks = []
    for index in range(args.streams):
        await asyncio.sleep(max(0.0, opened + index * spacing - time.time()))
        body = request_body(args, start_at, index)
        stream = one_stream(session, args.url, body, headers, start_at, args, tally)
        tasks.append(asyncio.create_task(stream, name=f"stream-{index}"))
    return tasks


async def run(args: argparse.Namespace) -> dict:
    tally = Tally()
    window = args.window if args.window is not None else 1.0 + args.streams / 250
    start_at = time.time() + window
    connector = aiohttp.TCPConnector(limit=0)
    # No sock_read timeout: re-arming it on every chunk costs the client a tenth of its time.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    lag_task = asyncio.create_task(watch_loop_lag(tally), name="loop-lag")
    cpu_task = asyncio.create_task(note_cpu_at(start_at, tally), name="cpu-at-start")

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = await open_streams(session, args, tally, start_at)
        await asyncio.wait(tasks, timeout=max(1.0, start_at + args.timeout - time.time()))
        for task in tasks:
            if not task.done():
                task.cancel()
                tally.error("timed out", f"still open {args.timeout:g} s after the start")
    lag_task.cancel()
    cpu_task.cancel()
    return summarize(args, tally, start_at, cpu_seconds() - tally.cpu_at_start)


def percentile(values: array, share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def percentile_ms(values: array, share: float) -> float | None:
    value = percentile(values, share)
    return None if value is None else round(value * 1000, 3)


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
        "delay_ms": {
            name: percentile_ms(tally.delays, share)
            for name, share in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        },
        "client_loop_lag_ms": {
            "p50": percentile_ms(tally.loop_lag, 0.5),
            "p99": percentile_ms(tally.loop_lag, 0.99),
            "max": percentile_ms(tally.loop_lag, 1.0),
        },
        "stream_length_p50_s": percentile(tally.lengths, 0.5),
        # The sending phase, as time.time() values, so others' CPU can be shared out over it.
        "sending_from": start_at,
        "sending_until": tally.last_received,
        # Near 1.0 means this client used a whole core: its own delay then dominates.
        "client_cpu_share": round(cpu / sending, 3) if sending > 0 else None,
    }


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


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

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The instrument must not stall: with a thousand streams' objects alive, one full
    # collection pauses this loop for tens of ms and every chunk in flight looks late.
    # One short run leaves little cyclic garbage, so collection can wait until exit.
    gc.disable()
    with asyncio.Runner(loop_factory=new_loop) as runner:
        result = runner.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Open many concurrent chat-completion streams and measure each chunk's delay.

Every chunk from scripts/stream_upstream.py carries "x_sent_at" (the upstream's time.time() at
send). This client takes time.time() when the bytes arrive, so `received - x_sent_at` is the
delay one chunk picked up between upstream and caller: the proxy's share plus this client's own.
Run it once straight at the upstream to learn the client's share. Prints one JSON object.

    python scripts/bench_streams.py --url http://127.0.0.1:9002/v1/chat/completions --streams 1000
"""

import argparse
import asyncio
import json
import resource
import time
from array import array
from collections import Counter

import aiohttp

SENT_AT = b'"x_sent_at":'
LAG_TICK = 0.01


class Tally:
    """What all streams saw, kept in flat arrays: 100k floats must not cost 100k objects."""

    def __init__(self) -> None:
        self.delays = array("d")
        self.errors: Counter[str] = Counter()
        self.completed = 0
        self.loop_lag = array("d")
        self.lengths = array("d")


def parse_lines(lines: list[bytes], received: float, tally: Tally) -> tuple[int, bool]:
    """Record the delay of every timestamped event; return (chunks seen, [DONE] seen)."""
    chunks, done = 0, False
    for line in lines:
        if not line.startswith(b"data:"):
            continue
        if line[5:].strip() == b"[DONE]":
            done = True
            continue
        at = line.find(SENT_AT)
        if at < 0:
            continue
        end = line.find(b"}", at)
        tally.delays.append(received - float(line[at + len(SENT_AT) : end]))
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
    return chunks, done


async def one_stream(session, url: str, body: bytes, headers: dict, expected: int, tally: Tally):
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                tally.errors[f"status {response.status}"] += 1
                await response.read()
                return
            chunks, done = await read_events(response, tally)
    except Exception as exc:  # a benchmark counts every failure, whatever its kind
        tally.errors[type(exc).__name__] += 1
        return

    if not done:
        tally.errors["missing [DONE]"] += 1
    elif chunks < expected:
        tally.errors["fewer chunks than expected"] += 1
    else:
        tally.completed += 1


async def watch_loop_lag(tally: Tally) -> None:
    # How late this client's own event loop wakes up: a lower bound of the delay it adds.
    # perf_counter, not loop.time(): uvloop's clock only ticks in whole milliseconds.
    while True:
        before = time.perf_counter()
        await asyncio.sleep(LAG_TICK)
        tally.loop_lag.append(time.perf_counter() - before - LAG_TICK)


async def run(args: argparse.Namespace) -> dict:
    tally = Tally()
    body = json.dumps(
        {
            "model": args.model,
            "stream": True,
            "messages": [{"role": "user", "content": "Count to one hundred."}],
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"

    connector = aiohttp.TCPConnector(limit=0)
    # No sock_read timeout: re-arming it on every chunk costs the client a tenth of its time.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    lag_task = asyncio.create_task(watch_loop_lag(tally), name="loop-lag")
    started = time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        for index in range(args.streams):
            # Spread the starts so chunks from all streams do not arrive in lockstep bursts.
            await asyncio.sleep(
                max(0.0, started + index * args.ramp / args.streams - time.monotonic())
            )
            stream = one_stream(session, args.url, body, headers, args.chunks, tally)
            tasks.append(asyncio.create_task(stream, name=f"stream-{index}"))
        await asyncio.wait(tasks, timeout=args.timeout)
        for task in tasks:
            if not task.done():
                task.cancel()
                tally.errors["timed out"] += 1
    lag_task.cancel()
    return summarize(args, tally, time.monotonic() - started, cpu_before)


def percentile(values: array, share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def percentile_ms(values: array, share: float) -> float | None:
    value = percentile(values, share)
    return None if value is None else round(value * 1000, 3)


def summarize(args, tally: Tally, wall: float, cpu_before) -> dict:
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "streams": args.streams,
        "completed": tally.completed,
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "chunks": len(tally.delays),
        "delay_ms": {
            name: percentile_ms(tally.delays, share)
            for name, share in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        },
        "client_loop_lag_ms": {
            "p50": percentile_ms(tally.loop_lag, 0.5),
            "p99": percentile_ms(tally.loop_lag, 0.99),
        },
        "stream_length_p50_s": percentile(tally.lengths, 0.5),
        "wall_s": round(wall, 3),
        # Near 1.0 means this client used a whole core: its own delay then dominates.
        "client_cpu_share": round(cpu / wall, 3) if wall else None,
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
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds to open all streams")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this long")
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args()

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with asyncio.Runner(loop_factory=new_loop) as runner:
        result = runner.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

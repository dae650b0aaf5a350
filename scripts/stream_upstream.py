"""A fake OpenAI upstream that streams chat completions at a fixed pace.

POST /v1/chat/completions with "stream": true gets CHUNKS server-sent events, INTERVAL seconds
apart, then `data: [DONE]`. Each chunk carries "x_sent_at", the sender's time.time() taken just
before the write, so a client on the same machine can measure how long each chunk took to reach
it. Requests without "stream": true get one canned chat.completion.

Two optional body fields let a load client hold many streams open before any chunk flows:
"x_start_at" (a time.time() value: the headers go out at once, the first chunk not before
then) and "x_phase" (0..1: how far into the first interval this stream's chunks are offset,
so a thousand streams do not send in lockstep).

    python scripts/stream_upstream.py --port 9001 [--chunks 100] [--interval 0.02]
"""

import argparse
import asyncio
import gc
import json
import resource
import time

from aiohttp import web

MODEL = "gpt-4o-mini"
COMPLETION_ID = "chatcmpl-bench"
CREATED = 1_700_000_000
USAGE = {"prompt_tokens": 12, "completion_tokens": 100, "total_tokens": 112}

CHUNKS_KEY = web.AppKey("chunks", list)
INTERVAL_KEY = web.AppKey("interval", float)


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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except ValueError as exc:
        # The OpenAI API answers a body it cannot parse with 400, not a server error.
        error = {"message": f"invalid JSON body: {exc}", "type": "invalid_request_error"}
        return web.json_response({"error": error}, status=400)
    if not body.get("stream"):
        return web.json_response(completion())

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    interval = request.app[INTERVAL_KEY]
    first_at = (
        float(body.get("x_start_at") or time.time()) + float(body.get("x_phase", 0)) * interval
    )
    await send_chunks(response, request.app[CHUNKS_KEY], interval, first_at)
    if (body.get("stream_options") or {}).get("include_usage"):
        await response.write(usage_event())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def send_chunks(
    response: web.StreamResponse, prefixes: list[bytes], interval: float, first_at: float
) -> None:
    # Pace against an absolute schedule so one late write does not stretch the whole stream.
    for index, prefix in enumerate(prefixes):
        wait = first_at + index * interval - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        await response.write(prefix + b"%.6f}\n\n" % time.time())


def raise_nofile_limit() -> None:
    # A thousand concurrent streams need a thousand sockets; the default soft limit is often 1024.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


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
    app = web.Application()
    app[CHUNKS_KEY] = chunk_prefixes(args.chunks)
    app[INTERVAL_KEY] = args.interval
    app.router.add_post("/v1/chat/completions", chat_completions)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        backlog=4096,
        print=None,
        loop=new_loop(),
    )


if __name__ == "__main__":
    main()

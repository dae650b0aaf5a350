"""The least an aiohttp reverse proxy can do: the floor apipool-proxy is measured against.

One ClientSession for the process; every POST is sent to one fixed upstream URL and the answer
is returned with the upstream status and content type. No auth, no pool, no logging. With
--stream the answer is relayed piece by piece as it arrives instead of read whole.

    python scripts/reference_proxy.py --port 9002 [--stream] \
        --upstream http://127.0.0.1:9001/v1/chat/completions
"""

import argparse
import asyncio
import resource

import aiohttp
from aiohttp import web

SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream_url: str, stream: bool) -> web.Application:
    async def session_context(app: web.Application):
        # limit=0: a thousand concurrent streams need a thousand upstream connections at once.
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            app[SESSION_KEY] = session
            yield

    async def relay_whole(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {"Content-Type": request.content_type}
        async with request.app[SESSION_KEY].post(upstream_url, data=body, headers=headers) as up:
            payload = await up.read()
            content_type = up.headers.get("Content-Type", "application/json")
            return web.Response(
                body=payload, status=up.status, headers={"Content-Type": content_type}
            )

    async def relay_stream(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.content_type}
        async with request.app[SESSION_KEY].post(upstream_url, data=body, headers=headers) as up:
            content_type = up.headers.get("Content-Type", "application/json")
            response = web.StreamResponse(status=up.status, headers={"Content-Type": content_type})
            await response.prepare(request)
            async for piece in up.content.iter_any():
                await response.write(piece)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_context)
    app.router.add_post("/{path:.*}", relay_stream if stream else relay_whole)
    return app


def new_loop() -> asyncio.AbstractEventLoop:
    # Same event loop as apipool-proxy uses, so the comparison is loop-for-loop.
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="full URL every request is sent to")
    parser.add_argument("--stream", action="store_true", help="relay answers as they arrive")
    args = parser.parse_args()

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    app = build_app(args.upstream, args.stream)
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

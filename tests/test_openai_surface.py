"""The whole /v1 surface: every operation in OpenAI's published API description, sent
through the proxy to an upstream that answers anything, arrives as it was sent.

The operations come from ``data/openai_operations.json`` (derived from OpenAI's
openapi.yaml; see the file's ``about``). The only ones the proxy answers itself are the
model list and lookup, served from the pool, and the listings of objects a member created
(files, batches...), merged from the keys that hold them.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from apipool_proxy.objects import LISTINGS

from .support import Member

OPERATIONS = json.loads((Path(__file__).parent / "data" / "openai_operations.json").read_text())
ANSWERED_BY_THE_POOL = {("GET", "/models"), ("GET", "/models/{model}")} | {
    ("GET", path) for path in LISTINGS
}


def _filled(path: str) -> str:
    """The path with every {parameter} replaced by an id of the shape OpenAI uses."""
    return re.sub(r"\{([^}]+)\}", lambda m: f"{m.group(1)}_0a1b2c", path)


class AnyUpstream:
    """An upstream that answers every request with 200 and records what it got."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []
        self.runner: web.AppRunner | None = None
        self.base_url = ""

    async def _answer(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.raw_path, await request.read()))
        return web.json_response({"id": "thing_1", "object": "thing", "echo": request.path})

    async def __aenter__(self) -> AnyUpstream:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.base_url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def surface(start_server, http) -> AsyncIterator[tuple[Any, AnyUpstream, Member]]:
    async with AnyUpstream() as upstream, start_server() as server:
        alice = await Member(http, server.admin_url, "alice").join()
        await alice.add_key("sk-surface-" + "x" * 20, upstream.base_url, models=["gpt-4o-mini"])
        yield server, upstream, alice


def _body(kind: str | None) -> dict[str, Any]:
    if kind == "multipart":
        form = aiohttp.FormData()
        form.add_field("model", "gpt-4o-mini")
        form.add_field("purpose", "batch")
        form.add_field("file", b'{"a": 1}\n', filename="input.jsonl")
        return {"data": form}
    return {"json": {"model": "gpt-4o-mini", "input": "hi"}} if kind == "json" else {}


async def test_every_published_operation_reaches_the_upstream_as_sent(surface, http):
    server, upstream, alice = surface
    operations = OPERATIONS["operations"]
    assert len(operations) > 250  # the file is whole
    for method, path, body in operations:
        if (method, path) in ANSWERED_BY_THE_POOL:
            continue
        target = _filled(path)
        sent = "/v1" + target + ("&" if "?" in target else "?") + "limit=2&order=desc"
        before = len(upstream.seen)
        async with http.request(
            method, server.proxy_url + sent[3:], headers=alice.auth, **_body(body)
        ) as answer:
            data = await answer.json()
        arrived = upstream.seen[before:]
        assert answer.status == 200, (method, path, data)
        # The operation itself reached the upstream, path and query byte for byte.
        assert (method, sent) in [(m, p) for m, p, _ in arrived], (method, path, arrived)
        assert data["echo"] == "/v1" + target.split("?")[0]


async def test_the_operations_the_pool_answers_itself(surface, http):
    server, upstream, alice = surface
    for method, path, _ in OPERATIONS["operations"]:
        if (method, path) not in ANSWERED_BY_THE_POOL:
            continue
        async with http.get(server.proxy_url + _filled(path), headers=alice.auth) as answer:
            data = await answer.json()
        if path == "/models/{model}":
            # A model no key serves: the pool's own 404, as OpenAI words it.
            assert (answer.status, data["error"]["code"]) == (404, "model_not_found")
        else:
            assert (answer.status, data["object"]) == (200, "list"), (path, data)

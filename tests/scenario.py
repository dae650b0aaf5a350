"""A pool in one test: a server in this process, a fake upstream, an admin, members with
keys, and official openai SDK clients, for the usage, limits and metrics tests."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from apipool_proxy.server import RunningServer

from .fake_upstream import FakeUpstream
from .support import Member

ADMIN = "root"
MODEL = "gpt-4o-mini"
StartServer = Callable[..., AbstractAsyncContextManager[RunningServer]]


def messages(text: str = "hello there") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def secret(name: str) -> str:
    """An upstream key value that is long enough to be redacted by value."""
    return f"sk-{name}-" + "k" * 24


@dataclass
class Scenario:
    server: RunningServer
    up: FakeUpstream
    http: aiohttp.ClientSession
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    async def member(self, username: str) -> Member:
        return await Member(self.http, self.server.admin_url, username).join()

    async def admin(self) -> Member:
        return await self.member(ADMIN)

    async def add_key(self, owner: Member, name: str, **fields: Any) -> int:
        fields.setdefault("models", [MODEL])
        return (await owner.add_key(secret(name), self.up.base_url, **fields))["id"]

    def sdk(self, who: Member | str) -> openai.AsyncOpenAI:
        token = who if isinstance(who, str) else who.token
        client = openai.AsyncOpenAI(base_url=self.server.proxy_url, api_key=token, max_retries=0)
        self.clients.append(client)
        return client

    async def chat(self, who: Member | str, text: str = "hello there", **kw: Any) -> Any:
        return await self.sdk(who).chat.completions.create(
            model=MODEL, messages=messages(text), **kw
        )

    async def raw_chat(self, who: Member | str, text: str = "hello there", **kw: Any) -> Any:
        """The SDK's raw response: ``.headers`` and ``.parse()``."""
        return await self.sdk(who).chat.completions.with_raw_response.create(
            model=MODEL, messages=messages(text), **kw
        )

    def served_by(self, name: str) -> int:
        return sum(1 for r in self.up.requests_for(secret(name)) if r.path != "/v1/models")

    def upstream_calls(self) -> int:
        return sum(1 for r in self.up.requests if r.path != "/v1/models")

    async def usage_rows(self) -> list[sqlite3.Row]:
        """Every row of the usage table, oldest first, once pending rows are written."""
        await self.server.services.writer.flush()
        return query(self.server.services.settings.database.path, "SELECT * FROM usage ORDER BY id")

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with self.http.get(self.server.admin_url + "/metrics") as resp:
            assert resp.status == 200
            return parse_metrics(await resp.text())


def query(path: str, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by name and sorted labels: ``samples["apipool_keys", (("status", "active"),)]``."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@asynccontextmanager
async def bare_upstream(
    chat: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """An upstream answering POST /v1/chat/completions with ``chat``; yields its base URL,
    for answers FakeUpstream has no knob for."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


def chat_completion(text: str, prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bare",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


@asynccontextmanager
async def scenario(
    start_server: StartServer, http: aiohttp.ClientSession, **sections: dict[str, Any]
) -> AsyncIterator[Scenario]:
    """A server named ``ADMIN`` as its admin, with a fresh fake upstream."""
    sections["auth"] = {"admins": [ADMIN], **sections.get("auth", {})}
    async with FakeUpstream() as up, start_server(**sections) as server:
        s = Scenario(server, up, http)
        try:
            yield s
        finally:
            for client in s.clients:
                await client.close()

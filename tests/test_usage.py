"""Usage accounting: one row per proxied request with the upstream's token counts, the
usage report for callers and contributors, ``apipool usage``, and no row lost at shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from apipool_proxy.storage import Database
from apipool_proxy.storage.database import _insert_usage_sql
from apipool_proxy.usage import USAGE_COLUMNS, UsageRow, WriteBehind

from .fake_upstream import FakeUpstream
from .scenario import (
    MODEL,
    Scenario,
    bare_upstream,
    chat_completion,
    messages,
    scenario,
    secret,
)
from .support import PASSWORD, ServerProcess, run_cli


async def test_plain_and_streamed_requests_have_rows_with_their_tokens(start_server, http):
    async with scenario(start_server, http) as s:
        alice = await s.member("alice")
        key_id = await s.add_key(alice, "alice")
        status, created = await alice.call("POST", "/api/tokens", {"name": "sdk"})
        assert status == 201
        token = created["token"]

        plain = await s.raw_chat(token, "one two three")
        assert plain.parse().usage.total_tokens == 8
        stream = await s.sdk(token).chat.completions.create(
            model=MODEL, messages=messages("four five"), stream=True
        )
        assert [c async for c in stream][-1].choices[0].finish_reason == "stop"

        _, report = await alice.call("GET", "/api/usage?group_by=model")
        assert report["rows"] == [
            {
                "group": MODEL,
                "requests": 2,
                "prompt_tokens": 5,
                "completion_tokens": 10,
                "total_tokens": 15,
                "errors": 0,
            }
        ]
        rows = await s.usage_rows()
        assert [_tokens(r) for r in rows] == [(3, 5, 8), (2, 5, 7)]
        assert [r["stream"] for r in rows] == [0, 1]
        assert rows[0]["request_id"] == plain.headers["x-request-id"]
        for row in rows:
            assert row["user_id"] == alice.user_id and row["token_id"] == created["id"]
            assert row["key_id"] == key_id and row["key_owner_id"] == alice.user_id
            assert (row["model"], row["endpoint"]) == (MODEL, "/chat/completions")
            assert (row["status"], row["attempts"]) == (200, 1)
            assert 0 < row["upstream_ms"] <= row["total_ms"] < 5000


def _tokens(row: sqlite3.Row) -> tuple[Any, Any, Any]:
    return row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]


async def test_usage_chunk_reaches_only_callers_who_asked_for_it(start_server, http):
    async with scenario(start_server, http) as s:
        alice = await s.member("alice")
        await s.add_key(alice, "alice")
        client = s.sdk(alice)

        quiet = await client.chat.completions.create(
            model=MODEL, messages=messages("a b c"), stream=True
        )
        chunks = [c async for c in quiet]
        assert all(c.usage is None and c.choices for c in chunks)
        # The proxy asked for usage on the caller's behalf, and kept the answer to itself.
        assert s.up.requests[-1].json()["stream_options"] == {"include_usage": True}

        asked = await client.chat.completions.create(
            model=MODEL,
            messages=messages("a b c d"),
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in asked]
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 9

        assert [_tokens(r) for r in await s.usage_rows()] == [(3, 5, 8), (4, 5, 9)]


async def test_usage_request_keeps_the_callers_bytes(start_server, http):
    async with scenario(start_server, http) as s:
        alice = await s.member("alice")
        await s.add_key(alice, "alice")
        # Odd spacing, an escaped character and a trailing newline, as a hand-written
        # client might send: only the usage request is added, nothing is re-encoded.
        sent = (
            b'{ "model" : "gpt-4o-mini", "stream":true,\n'
            b' "messages": [{"role": "user", "content": "caf\\u00e9 \xc3\xa9"}] }\n'
        )
        headers = {"Authorization": f"Bearer {alice.token}", "Content-Type": "application/json"}
        url = s.server.proxy_url + "/chat/completions"
        async with http.post(url, data=sent, headers=headers) as resp:
            assert resp.status == 200
            answer = await resp.read()
        events = [e[len(b"data: ") :] for e in answer.split(b"\n\n") if e]
        assert events[-1] == b"[DONE]"
        # The usage-only chunk the proxy asked for stays with the proxy.
        assert all(json.loads(e)["choices"] for e in events[:-1])

        received = s.up.requests[-1].body
        assert received == sent.rstrip()[:-1] + b', "stream_options": {"include_usage": true}}'
        assert json.loads(received)["messages"][0]["content"] == "caf\u00e9 \u00e9"
        assert [_tokens(r) for r in await s.usage_rows()] == [(2, 5, 7)]


async def test_upstream_without_stream_options_is_remembered_per_key(start_server, http):
    async with scenario(start_server, http) as s:
        alice, bob = await s.member("alice"), await s.member("bob")
        old_key = await s.add_key(alice, "old-server")
        await s.add_key(bob, "bob")  # a private loopback key: serves bob alone
        s.up.account(secret("old-server")).reject_stream_options = True

        for text in ("first stream", "second stream"):
            stream = await s.chat(alice, text, stream=True)
            pieces = [c.choices[0].delta.content async for c in stream if c.choices]
            assert "".join(p or "" for p in pieces) == f"echo: {text}"
        sent = [r.json() for r in s.up.requests_for(secret("old-server"))]
        # Refused once with stream_options, resent without; the second stream went plain.
        assert ["stream_options" in body for body in sent] == [True, False, False]

        await s.chat(bob, stream=True)
        assert s.up.requests_for(secret("bob"))[-1].json()["stream_options"]["include_usage"]

        rows = await s.usage_rows()
        assert [(r["status"], r["attempts"], _tokens(r)) for r in rows[:2]] == [
            (200, 1, (None, None, None))
        ] * 2
        assert _tokens(rows[2]) == (2, 5, 7)
        stored = _query_one(s, "SELECT no_stream_options FROM upstream_keys WHERE id = ?", old_key)
        assert stored == 1  # a restart remembers it too


def _query_one(s: Scenario, sql: str, *params: Any) -> Any:
    conn = sqlite3.connect(s.server.services.settings.database.path)
    try:
        return conn.execute(sql, params).fetchone()[0]
    finally:
        conn.close()


async def test_usage_of_a_json_answer_sent_chunked_is_counted(start_server, http):
    # Upstreams behind CDNs often send JSON compressed on the fly, chunked, without a
    # Content-Length; the proxy relays such a body as it comes and must still count it.
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        data = json.dumps(chat_completion("in pieces", 4, 6)).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(data), 50):
            await response.write(data[start : start + 50])
        await response.write_eof()
        return response

    async with bare_upstream(chat) as base_url, scenario(start_server, http) as s:
        alice = await s.member("alice")
        await alice.add_key(secret("cdn"), base_url, models=[MODEL])
        reply = await s.chat(alice)
        assert reply.choices[0].message.content == "in pieces"
        assert [_tokens(r) for r in await s.usage_rows()] == [(4, 6, 10)]


async def test_contributors_see_totals_of_others_use_but_not_who(start_server, http):
    async with scenario(start_server, http, upstream={"shared_hosts": ["127.0.0.1"]}) as s:
        root, alice, bob = await s.admin(), await s.member("alice"), await s.member("bob")
        alices = await s.add_key(alice, "alice")
        await s.chat(alice, "mine")
        await s.chat(bob, "borrowed one")
        await s.chat(bob, "borrowed two", stream=True)

        for group_by, label in (("model", MODEL), ("day", None)):
            status, report = await alice.call("GET", f"/api/usage?group_by={group_by}")
            assert status == 200
            assert [r["requests"] for r in report["rows"]] == [1]
            (theirs,) = report["contributed"]
            assert (theirs["requests"], theirs["prompt_tokens"], theirs["total_tokens"]) == (
                2,
                4,
                14,
            )
            assert label is None or theirs["group"] == label
            assert "bob" not in json.dumps(report) and "user" not in json.dumps(report)

        _, report = await bob.call("GET", "/api/usage")
        assert [r["requests"] for r in report["rows"]] == [2] and report["contributed"] == []
        status, report = await bob.call("GET", "/api/usage?group_by=user")
        assert status == 400

        _, report = await root.call("GET", "/api/usage?all=true&group_by=user")
        assert {r["group"]: r["requests"] for r in report["rows"]} == {"alice": 1, "bob": 2}
        assert report["scope"] == "everyone"

        # An admin who contributes may see who used their keys.
        await s.add_key(root, "root")
        await alice.call("PATCH", f"/api/keys/{alices}", {"enabled": False})
        await s.chat(bob, "on root")
        _, report = await root.call("GET", "/api/usage?group_by=user")
        assert [(r["group"], r["requests"]) for r in report["contributed"]] == [("bob", 1)]


async def test_apipool_usage_prints_a_table(tmp_path):
    async with FakeUpstream() as up, aiohttp.ClientSession() as http:
        server = ServerProcess(tmp_path, "upstream: {allow_private_networks: true}\n")
        await asyncio.to_thread(server.start)
        try:
            headers = await _login(http, server, "alice")
            await _add_key(http, server, headers, up, "alice")
            async with openai.AsyncOpenAI(
                base_url=server.proxy_url, api_key=headers["Authorization"][7:], max_retries=0
            ) as client:
                for model, text in (("gpt-4o", "one two"), (MODEL, "three four five")):
                    await client.chat.completions.create(model=model, messages=messages(text))
            token_file = tmp_path / ".auth_token"
            token_file.write_text(headers["Authorization"][7:])
            args = ["--server", server.admin_url, "usage", "--group-by", "model"]
            result = await asyncio.to_thread(run_cli, args, tmp_path)
        finally:
            await asyncio.to_thread(server.stop)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split() for line in lines] == [
        ["model", "requests", "prompt", "completion", "total"],
        ["-" * len(MODEL), "--------", "------", "----------", "-----"],
        ["gpt-4o", "1", "2", "5", "7"],
        [MODEL, "1", "3", "5", "8"],
        ["-" * len(MODEL), "--------", "------", "----------", "-----"],
        ["total", "2", "5", "10", "15"],
    ]
    # Numbers line up on the right under their headings.
    assert len({len(line) for line in lines}) == 1


async def _login(http: aiohttp.ClientSession, server: ServerProcess, name: str) -> dict[str, str]:
    creds = {"username": name, "password": PASSWORD}
    async with http.post(server.admin_url + "/api/register", json=creds) as resp:
        assert resp.status == 201
    async with http.post(server.admin_url + "/api/login", json=creds) as resp:
        return {"Authorization": "Bearer " + (await resp.json())["token"]}


async def _add_key(
    http: aiohttp.ClientSession,
    server: ServerProcess,
    headers: dict[str, str],
    up: FakeUpstream,
    name: str,
) -> None:
    key = {"key": secret(name), "base_url": up.base_url, "models": [MODEL, "gpt-4o"]}
    async with http.post(server.admin_url + "/api/keys", json=key, headers=headers) as resp:
        assert resp.status == 201


async def test_every_answered_request_keeps_its_row_through_sigterm(tmp_path):
    async with FakeUpstream() as up, aiohttp.ClientSession() as http:
        up.chunk_delay = 0.05
        server = ServerProcess(tmp_path, "upstream: {allow_private_networks: true}\n")
        await asyncio.to_thread(server.start)
        try:
            headers = await _login(http, server, "alice")
            await _add_key(http, server, headers, up, "alice")
            up.fail(secret("alice"), "delay", seconds=0.5)  # every request, until healed
            async with openai.AsyncOpenAI(
                base_url=server.proxy_url, api_key=headers["Authorization"][7:], max_retries=0
            ) as client:
                burst = [
                    asyncio.ensure_future(_one(client, i, stream=i % 2 == 0)) for i in range(40)
                ]
                async with asyncio.timeout(10):
                    await up.wait_inflight(len(burst))
                server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                results = await asyncio.gather(*burst)
            assert await asyncio.to_thread(server.proc.wait, 20) == 0  # type: ignore[union-attr]
            server.proc = None
            # Every request was in flight at SIGTERM, so every one is answered in full.
            answered = {request_id for request_id in results if request_id}
            assert len(answered) == len(burst)

            await asyncio.to_thread(server.start)
            rows = await asyncio.to_thread(_rows_by_request, tmp_path / "apipool.db")
            assert answered <= rows.keys()
            assert all(rows[r]["status"] == 200 and rows[r]["total_tokens"] for r in answered)
            async with http.get(server.admin_url + "/api/usage", headers=headers) as resp:
                (today,) = (await resp.json())["rows"]
            assert today["requests"] >= len(answered)
        finally:
            await asyncio.to_thread(server.stop, signal.SIGKILL)
    assert "Traceback" not in server.log()


async def _one(client: openai.AsyncOpenAI, i: int, stream: bool) -> str | None:
    """The request id of an answered request, None for one refused or cut off."""
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages(f"burst {i}"), stream=stream
        )
        if stream:
            async for _ in raw.parse():
                pass
        else:
            raw.parse()
    except openai.APIError:
        return None
    return raw.headers["x-request-id"] if raw.status_code == 200 else None


def _rows_by_request(path: Any) -> dict[str, sqlite3.Row]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM usage").fetchall()
    finally:
        conn.close()
    by_id = {row["request_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a request was written twice"
    return by_id


# -- the write-behind buffer ------------------------------------------------------------------


class SlowDatabase:
    """Commits a batch in a worker that finishes even when its caller is cancelled, as
    aiosqlite's thread does."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self._workers: set[asyncio.Task[None]] = set()

    async def insert_usage(self, rows: list[tuple[Any, ...]]) -> None:
        worker = asyncio.ensure_future(self._commit(list(rows)))
        self._workers.add(worker)
        await asyncio.shield(worker)

    async def _commit(self, rows: list[tuple[Any, ...]]) -> None:
        self.started.set()
        await self.gate.wait()
        self.rows.extend(rows)


def _record(n: int) -> UsageRow:
    values = {
        "created_at": time.time(),
        "user_id": 1,
        "token_id": 1,
        "key_id": 1,
        "key_owner_id": 1,
        "model": MODEL,
        "endpoint": "/chat/completions",
        "status": 200,
        "attempts": 1,
        "stream": False,
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "total_tokens": 2,
        "upstream_ms": 1.0,
        "total_ms": 1.0,
        "request_id": f"req_{n}",
    }
    return tuple(values[column] for column in USAGE_COLUMNS)


async def test_a_batch_cut_by_shutdown_is_written_exactly_once(monkeypatch):
    monkeypatch.setattr("apipool_proxy.usage.FLUSH_INTERVAL", 0.01)
    db = SlowDatabase()
    writer = WriteBehind(db)  # type: ignore[arg-type]
    for n in range(3):
        writer.record(_record(n))
    loop = asyncio.ensure_future(writer.run())
    await db.started.wait()
    writer.record(_record(3))  # arrives while the batch is being written
    loop.cancel()  # shutdown, between the batch's insert and its commit
    await asyncio.gather(loop, return_exceptions=True)
    db.gate.set()
    await writer.flush()  # the final flush of close_services
    assert sorted(row[-1] for row in db.rows) == ["req_0", "req_1", "req_2", "req_3"]
    assert writer.pending == 0


async def test_a_failed_batch_is_kept_for_the_next_flush():
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0
            self.rows: list[tuple[Any, ...]] = []

        async def insert_usage(self, rows: list[tuple[Any, ...]]) -> None:
            self.calls += 1
            if self.calls == 1:
                raise sqlite3.OperationalError("database is locked")
            self.rows.extend(rows)

    db = Flaky()
    writer = WriteBehind(db)  # type: ignore[arg-type]
    writer.record(_record(0))
    with pytest.raises(sqlite3.OperationalError):
        await writer.flush()
    writer.record(_record(1))
    await writer.flush()
    assert [row[-1] for row in db.rows] == ["req_0", "req_1"]


async def test_batches_of_any_size_are_written_whole_with_few_statement_shapes(tmp_path):
    db = await Database.open(str(tmp_path / "usage.db"))
    try:
        sizes = [1, 3, 511, 512, 513, 1500, 2047, 777]
        rows = [_record(n) for n in range(sum(sizes))]
        start = 0
        for size in sizes:
            await db.insert_usage(rows[start : start + size])
            start += size
        written = await db.usage_rows(0, time.time() + 1, None, None)
    finally:
        await db.close()
    assert len(written) == len(rows)
    # Every batch size is cut into the same few statement sizes, so the statement cache
    # (one prepared statement per distinct SQL text) cannot fill with huge statements.
    assert _insert_usage_sql.cache_info().currsize <= 11

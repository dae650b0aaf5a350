"""The /v1 proxy, driven by the official openai SDK against fake upstreams on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import openai
import pytest
from aiohttp import WSMsgType, web
from yarl import URL

from apipool_proxy.netguard import AddressPolicy
from apipool_proxy.upstream import ForwardProxy, UpstreamClient, WebSocketDialer

from .fake_upstream import FakeUpstream
from .scenario import MODEL, bare_upstream, chat_completion, scenario, secret
from .support import Member


@dataclass
class Pool:
    server: object
    up: FakeUpstream
    alice: Member
    keys: list[str]
    key_ids: list[int]
    clients: list[openai.AsyncOpenAI | openai.OpenAI] = field(default_factory=list)

    def client(self, token: str | None = None) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(
            base_url=self.server.proxy_url,  # type: ignore[attr-defined]
            api_key=token or self.alice.token,
            max_retries=0,
        )
        self.clients.append(client)
        return client

    def sync_client(self) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=self.server.proxy_url,  # type: ignore[attr-defined]
            api_key=self.alice.token,
            max_retries=0,
        )
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            if isinstance(client, openai.AsyncOpenAI):
                await client.close()
            else:
                client.close()

    def served_by(self, key: str) -> int:
        """Requests the key served, not counting the proxy's own model discovery."""
        return sum(1 for r in self.up.requests_for(key) if r.path != "/v1/models")


async def make_pool(
    server, http, n_keys: int = 2, username: str = "alice", **key_fields
) -> AsyncIterator[Pool]:
    async with FakeUpstream() as up:
        alice = await Member(http, server.admin_url, username).join()
        keys = [f"sk-pool-key-{i}-{'x' * 20}" for i in range(n_keys)]
        ids = []
        for key in keys:
            added = await alice.add_key(key, up.base_url, **key_fields)
            ids.append(added["id"])
        pool = Pool(server, up, alice, keys, ids)
        try:
            yield pool
        finally:
            await pool.close()


@pytest.fixture
async def pool(server, http) -> AsyncIterator[Pool]:
    async for p in make_pool(server, http, models=None):
        await wait_models_known(p)
        yield p


async def wait_models_known(p: Pool) -> None:
    """Keys added without models ask the upstream's /models in the background."""
    async with asyncio.timeout(5):
        while True:
            status, data = await p.alice.call("GET", "/api/keys")
            if all(k["discovered_models"] for k in data["keys"]):
                return
            await asyncio.sleep(0.02)


async def until_served(pool: Pool, key: str) -> None:
    """Send requests until the pool (which picks among equals at random) has tried ``key``;
    every one must still succeed, through another key if that one fails."""
    client = pool.client()
    for _ in range(50):
        if pool.served_by(key):
            return
        reply = await client.chat.completions.create(model="gpt-4o-mini", messages=messages())
        assert reply.choices[0].message.content == "echo: hello there"
    pytest.fail(f"the pool never tried key {key[:10]}")


def messages(text: str = "hello there") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- the surface ------------------------------------------------------------------------------


async def test_chat_completion_async_and_sync(pool: Pool):
    reply = await pool.client().chat.completions.create(
        model="gpt-4o-mini", messages=messages("hello there")
    )
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.usage is not None and reply.usage.prompt_tokens == 2

    sync_reply = await asyncio.to_thread(
        lambda: pool.sync_client().chat.completions.create(
            model="gpt-4o-mini", messages=messages("from a thread")
        )
    )
    assert sync_reply.choices[0].message.content == "echo: from a thread"


async def test_stream_arrives_chunk_by_chunk_in_order(pool: Pool):
    pool.up.stream_chunks = 5
    pool.up.chunk_delay = 0.2
    stream = await pool.client().chat.completions.create(
        model="gpt-4o-mini", messages=messages("one two three"), stream=True
    )
    arrivals, pieces = [], []
    async for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        assert chunk.usage is None  # not asked for: no usage chunk
    assert "".join(pieces) == "echo: one two three"
    # Relayed as they come: the gaps between chunks are the upstream's, not one burst.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert sum(1 for g in gaps if g > 0.1) >= 3


async def test_stream_with_include_usage_keeps_the_usage_chunk(pool: Pool):
    stream = await pool.client().chat.completions.create(
        model="gpt-4o-mini",
        messages=messages("a b c"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 3


async def test_embeddings(pool: Pool):
    result = await pool.client().embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8


async def test_multipart_upload_and_binary_download_byte_for_byte(pool: Pool):
    audio = bytes(range(256)) * 4000  # ~1 MB of every byte value
    result = await pool.client().audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", audio, "audio/wav")
    )
    assert hashlib.sha256(audio).hexdigest() in result.text
    speech = await pool.client().audio.speech.create(model="tts-1", voice="alloy", input="hi")
    async with openai.AsyncOpenAI(
        base_url=pool.up.base_url, api_key=pool.keys[0], max_retries=0
    ) as direct:
        expected = await direct.audio.speech.create(model="tts-1", voice="alloy", input="hi")
    assert speech.content == expected.content and len(speech.content) == 200 * 1024


async def test_models_list_and_lookup_with_slash_and_colon(pool: Pool):
    client = pool.client()
    ids = [m.id async for m in client.models.list()]
    assert "gpt-4o-mini" in ids and "qwen/qwen2.5-coder-7b-instruct" in ids
    model = await client.models.retrieve("qwen/qwen2.5-coder-7b-instruct")
    assert model.id == "qwen/qwen2.5-coder-7b-instruct"
    assert (await client.models.retrieve("ft:gpt-4o-mini:acme::abc123")).id.startswith("ft:")
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_unlisted_endpoint_query_and_raw_path_pass_through(pool: Pool, http):
    url = pool.server.proxy_url + "/files/a%2Fb?limit=3&order=asc"
    async with http.get(url, headers=pool.alice.auth) as resp:
        assert resp.status == 404  # the upstream's own answer, relayed
    seen = pool.up.requests[-1]
    assert seen.raw_path == "/v1/files/a%2Fb" and seen.query_string == "limit=3&order=asc"


# -- headers ----------------------------------------------------------------------------------


async def test_upstream_sees_only_the_pooled_key_and_allowed_headers(pool: Pool, http):
    headers = {
        **pool.alice.auth,
        "Cookie": "session=caller",
        "X-Forwarded-For": "10.1.2.3",
        "X-Forwarded-Host": "evil",
        "Forwarded": "for=10.1.2.3",
        "OpenAI-Organization": "org-caller",
        "OpenAI-Project": "proj-caller",
        "OpenAI-Beta": "assistants=v2",
        "X-Stainless-Lang": "python",
        "User-Agent": "my-app/1.0",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "1",
        "Proxy-Authorization": "Basic abc",
        "api-key": "also-a-secret",
    }
    body = {"model": "gpt-4o-mini", "messages": messages()}
    async with http.post(
        pool.server.proxy_url + "/chat/completions", json=body, headers=headers
    ) as resp:
        assert resp.status == 200
        caller_sees = resp.headers
    seen = pool.up.requests[-1].headers
    assert seen["Authorization"] in {f"Bearer {k}" for k in pool.keys}
    assert pool.alice.token not in str(dict(seen))
    for name in (
        "Cookie",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "Forwarded",
        "OpenAI-Organization",
        "OpenAI-Project",
        "X-Hop",
        "Proxy-Authorization",
        "api-key",
    ):
        assert name not in seen, name
    assert seen["OpenAI-Beta"] == "assistants=v2"
    assert seen["X-Stainless-Lang"] == "python" and seen["User-Agent"] == "my-app/1.0"
    assert seen["Content-Type"] == "application/json"
    assert caller_sees["x-request-id"].startswith("req_")
    assert "x-fake-key-id" in caller_sees  # upstream headers pass...
    assert "openai-organization" not in caller_sees  # ...but not the key owner's account
    assert "set-cookie" not in caller_sees


async def test_gzip_upstream_is_decoded_consistently(pool: Pool, http):
    pool.up.gzip = True
    body = {"model": "gpt-4o-mini", "messages": messages("zip")}
    async with http.post(
        pool.server.proxy_url + "/chat/completions", json=body, headers=pool.alice.auth
    ) as resp:
        assert "Content-Encoding" not in resp.headers
        assert (await resp.json())["choices"][0]["message"]["content"] == "echo: zip"


# -- failover and key health -----------------------------------------------------------------


async def test_rate_limited_key_is_skipped_then_rested_until_retry_after(pool: Pool):
    bad, good = pool.keys
    pool.up.fail(bad, "429", times=1, retry_after=1)
    client = pool.client()
    await until_served(pool, bad)
    for _ in range(6):
        reply = await client.chat.completions.create(model="gpt-4o-mini", messages=messages())
        assert reply.choices[0].message.content == "echo: hello there"
    assert pool.served_by(bad) == 1  # tried once, then left alone while cooling
    _, data = await pool.alice.call("GET", "/api/keys")
    states = {k["id"]: k for k in data["keys"]}
    assert states[pool.key_ids[0]]["status"] == "cooling"
    assert states[pool.key_ids[0]]["cooldown_until"] is not None
    await asyncio.sleep(1.1)
    for _ in range(10):
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages())
    assert pool.served_by(bad) > 1  # back in rotation after Retry-After


async def test_401_marks_the_key_invalid_and_redacts_it(pool: Pool):
    bad = pool.keys[0]
    pool.up.revoke(bad)  # the fake echoes the key in its error message, as OpenAI does
    client = pool.client()
    await until_served(pool, bad)
    for _ in range(4):
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages())
    assert pool.served_by(bad) == 1
    _, data = await pool.alice.call("GET", "/api/keys")
    entry = next(k for k in data["keys"] if k["id"] == pool.key_ids[0])
    assert entry["status"] == "invalid"
    assert entry["last_error"] and bad not in entry["last_error"]


# OpenRouter answers 403 with this when the caller's input was flagged by moderation.
FLAGGED = {
    "error": {
        "code": 403,
        "message": "Your chosen model requires moderation and your input was flagged",
        "metadata": {"reasons": ["violence"], "flagged_input": "...", "provider_name": "x"},
    }
}


async def key_states(pool: Pool) -> list[str]:
    _, data = await pool.alice.call("GET", "/api/keys")
    by_id = {k["id"]: k["status"] for k in data["keys"]}
    return [by_id[key_id] for key_id in pool.key_ids]


async def test_a_flagged_prompt_is_the_callers_answer_and_costs_no_key(pool: Pool):
    # A member sending flagged prompts must not be able to take the pool's keys out.
    for key in pool.keys:
        pool.up.fail(key, "403", times=3, body=FLAGGED)
    client = pool.client()
    for _ in range(3):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages())
        assert "input was flagged" in caught.value.message
    assert sum(pool.served_by(k) for k in pool.keys) == 3  # one key each time, no failover
    assert await key_states(pool) == ["active", "active"]


async def test_a_key_lacking_a_scope_passes_the_request_on_and_stays_in_the_pool(pool: Pool):
    restricted = pool.keys[0]
    pool.up.fail(restricted, "401_scope")  # every request, until healed
    await until_served(pool, restricted)  # each one served by the other key
    assert await key_states(pool) == ["active", "active"]
    # When no key has the scope, the caller learns why, as a 403: their token is fine.
    pool.up.fail(pool.keys[1], "401_scope")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await pool.client().chat.completions.create(model="gpt-4o-mini", messages=messages())
    assert "Missing scopes" in caught.value.message
    assert await key_states(pool) == ["active", "active"]
    status, checked = await pool.alice.call("POST", f"/api/keys/{pool.key_ids[0]}/check")
    assert (status, checked["status"]) == (200, "active")  # the credentials are accepted


async def test_a_key_out_of_credit_rests_and_the_next_key_serves(pool: Pool):
    broke = pool.keys[0]
    pool.up.fail(broke, "402")
    await until_served(pool, broke)
    assert pool.served_by(broke) == 1
    assert await key_states(pool) == ["exhausted", "active"]


async def test_a_403_for_an_unknown_reason_fails_over_and_rests_the_key_if_it_repeats(
    pool: Pool,
):
    refusing = pool.keys[0]
    pool.up.fail(refusing, "403", body={"error": {"message": "Forbidden"}})
    await until_served(pool, refusing)
    assert await key_states(pool) == ["active", "active"]  # once can be bad luck
    client = pool.client()
    for _ in range(50):
        if pool.served_by(refusing) == 2:
            break
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages())
    assert await key_states(pool) == ["cooling", "active"]  # twice in a row is a pattern


async def test_400_is_returned_verbatim_without_failover(pool: Pool):
    key = pool.keys[0]
    for k in pool.keys:
        pool.up.fail(k, "400", times=1, message="bad temperature", param="temperature")
    with pytest.raises(openai.BadRequestError) as caught:
        await pool.client().chat.completions.create(model="gpt-4o-mini", messages=messages())
    assert caught.value.body["param"] == "temperature"  # type: ignore[index]
    assert "bad temperature" in caught.value.message
    assert sum(pool.served_by(k) for k in pool.keys) == 1
    _, data = await pool.alice.call("GET", "/api/keys")
    assert all(k["status"] == "active" for k in data["keys"]), key


async def test_every_key_cooling_gives_rate_limit_error_with_retry_after(pool: Pool):
    for key in pool.keys:
        pool.up.fail(key, "429", retry_after=30)
    client = pool.client()
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages())
    assert int(caught.value.response.headers["retry-after"]) >= 29
    # Now nothing is sent upstream at all until a key recovers.
    before = len(pool.up.requests)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages())
    assert len(pool.up.requests) == before
    assert "cooling down" in caught.value.message


@pytest.mark.parametrize("mode", ["hang", "reset", "500", "503"])
async def test_broken_upstream_fails_over_to_a_healthy_key(start_server, http, mode):
    async with start_server(upstream={"read_timeout": 0.5}) as server:
        async for p in make_pool(server, http, models=["gpt-4o-mini"]):
            for key in p.keys[:1]:
                p.up.fail(key, mode)
            for _ in range(4):
                reply = await p.client().chat.completions.create(
                    model="gpt-4o-mini", messages=messages()
                )
                assert reply.choices[0].message.content == "echo: hello there"


async def test_all_keys_broken_gives_502_without_upstream_details(start_server, http):
    async with start_server(upstream={"read_timeout": 0.5}) as server:
        async for p in make_pool(server, http, models=["gpt-4o-mini"]):
            p.up.fail(p.keys[0], "502", html=True)
            p.up.fail(p.keys[1], "reset")
            with pytest.raises(openai.InternalServerError) as caught:
                await p.client().chat.completions.create(model="gpt-4o-mini", messages=messages())
            assert caught.value.status_code == 502
            text = caught.value.message
            assert "<html" not in text.lower() and "127.0.0.1" not in text
            assert all(k not in text for k in p.keys)


async def test_upstream_dying_mid_stream_raises_api_error(pool: Pool):
    for key in pool.keys:
        pool.up.fail(key, "die_midstream", after_chunks=2)
    stream = await pool.client().chat.completions.create(
        model="gpt-4o-mini", messages=messages(), stream=True
    )
    received = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 2  # what arrived before the break, and no retry after it


async def test_caller_leaving_mid_stream_releases_the_upstream(pool: Pool, http):
    pool.up.stream_chunks = 200
    pool.up.chunk_delay = 0.05
    body = {"model": "gpt-4o-mini", "messages": messages(), "stream": True}
    resp = await http.post(
        pool.server.proxy_url + "/chat/completions", json=body, headers=pool.alice.auth
    )
    await resp.content.readline()
    assert pool.up.inflight == 1
    resp.close()  # the caller hangs up
    async with asyncio.timeout(1):
        await pool.up.wait_idle()
    assert pool.up.disconnects == 1


async def test_slow_caller_holds_back_the_upstream_and_gets_every_byte(start_server, http):
    events, size = 1024, 64 * 1024  # 64 MiB: far more than every buffer on the way
    written = [0]

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(events):
            # write() waits while the proxy is not reading: that is the backpressure.
            await response.write(b'data: {"i": %d, "pad": "%s"}\n\n' % (index, b"x" * size))
            written[0] = index + 1
        await response.write(b"data: [DONE]\n\n")
        return response

    async with bare_upstream(chat) as base_url, scenario(start_server, http) as s:
        alice = await s.member("alice")
        await alice.add_key(secret("firehose"), base_url, models=[MODEL])
        proxy = urlsplit(s.server.proxy_url)
        reader, writer = await asyncio.open_connection(proxy.hostname, proxy.port)
        body = b'{"model": "%s", "stream": true, "messages": []}' % MODEL.encode()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
            b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (alice.token.encode(), len(body), body)
        )
        received = [await reader.readexactly(256 * 1024)]
        await asyncio.sleep(1.0)  # the caller stops reading
        held_back = written[0]
        received.append(await reader.read())
        writer.close()

    data = b"".join(received)
    assert held_back < events // 2, f"{held_back} of {events} events written to a stalled caller"
    indexes = [int(i) for i in re.findall(rb'"i": (\d+)', data)]
    assert indexes == list(range(events))
    assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


async def test_websocket_is_relayed_both_ways(pool: Pool, http):
    url = pool.server.proxy_url.replace("http", "ws") + "/realtime?model=gpt-4o-realtime-preview"
    async with http.ws_connect(url, headers=pool.alice.auth) as ws:
        await ws.send_str('{"type": "session.update"}')
        message = await ws.receive_json(timeout=5)
        assert message["type"] == "echo"
        await ws.send_bytes(b"\x00\x01binary")
        assert (await ws.receive(timeout=5)).data == b"\x00\x01binary"
    seen = [r for r in pool.up.requests if r.path == "/v1/realtime"]
    assert seen and seen[-1].key in pool.keys
    # The session counts like any request: one usage row, under its model.
    status, usage = await pool.alice.call("GET", "/api/usage?group_by=model")
    assert status == 200
    rows = {row["group"]: row for row in usage["rows"]}
    assert rows["gpt-4o-realtime-preview"]["requests"] == 1


async def test_https_and_wss_upstreams_go_through_the_forward_proxy(
    start_server, http, monkeypatch, tls_files, tls_server_context, tunnel_proxy
):
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))  # the server trusts the test CA
    proxy = await tunnel_proxy(credentials="Basic dTpw")  # u:p
    settings = {"http_proxy": proxy.url("u:p@")}
    async with start_server(upstream=settings) as server, FakeUpstream(tls_server_context) as up:
        alice = await Member(http, server.admin_url, "alice").join()
        key = "sk-tunnelled-" + "x" * 20
        await alice.add_key(key, up.base_url, models=[MODEL, "gpt-4o-realtime-preview"])
        async with openai.AsyncOpenAI(
            base_url=server.proxy_url, api_key=alice.token, max_retries=0
        ) as client:
            reply = await client.chat.completions.create(model=MODEL, messages=messages("hi"))
        assert reply.choices[0].message.content == "echo: hi"
        url = server.proxy_url.replace("http", "ws") + "/realtime?model=gpt-4o-realtime-preview"
        async with http.ws_connect(url, headers=alice.auth) as ws:
            await ws.send_str('{"type": "session.update"}')
            assert (await ws.receive_json(timeout=5))["type"] == "echo"
    assert [r.path for r in up.requests] == ["/v1/chat/completions", "/v1/realtime"]
    assert all(r.key == key for r in up.requests)
    # One tunnel for the plain request, one for the WebSocket, both to the upstream's name.
    assert [head.split(b"\r\n")[0] for head in proxy.heads] == [
        b"CONNECT localhost:%d HTTP/1.1" % up.port
    ] * 2


async def test_the_guard_judges_a_wss_host_before_asking_the_proxy(tunnel_proxy, tls_files):
    proxy = await tunnel_proxy()
    upstream = UpstreamClient(
        AddressPolicy(False, frozenset()),
        connect_timeout=2,
        read_timeout=5,
        proxy=ForwardProxy.from_url(proxy.url()),
    )
    dialer = WebSocketDialer(
        upstream,
        allow_private_networks=False,
        forbidden_ports=frozenset(),
        connect_timeout=2,
        read_timeout=5,
    )
    try:
        for url in ("https://localhost:9/v1/realtime", "wss://127.0.0.1:9/v1/realtime"):
            with pytest.raises(aiohttp.ClientConnectionError, match="guard"):
                await dialer.connect(URL(url))
        with pytest.raises(aiohttp.ClientConnectionError):  # ws:// is dialled directly
            await dialer.connect(URL("ws://127.0.0.1:9/v1/realtime"))
    finally:
        await dialer.close()
        await upstream.close()
    assert proxy.heads == []  # the proxy was never asked for a tunnel


async def test_every_answer_names_the_server_without_versions(pool: Pool, http):
    # Python's and aiohttp's versions would tell a scanner which known flaws to try.
    v1 = pool.server.proxy_url
    base = v1.removesuffix("/v1")
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    answers = [
        ("GET", v1 + "/models", pool.alice.auth, None),  # answered by the proxy
        ("POST", v1 + "/chat/completions", pool.alice.auth, chat),  # relayed
        ("POST", v1 + "/chat/completions", pool.alice.auth, chat | {"stream": True}),
        ("GET", v1 + "/models", {"Authorization": "Bearer ap-wrong"}, None),  # refused
        ("GET", base + "/healthz", {}, None),
        ("GET", pool.server.admin_url + "/api/me", pool.alice.auth, None),
        ("GET", pool.server.admin_url + "/nowhere", {}, None),
    ]
    for method, url, headers, body in answers:
        async with http.request(method, url, headers=headers, json=body) as response:
            await response.read()
            assert response.headers.getall("Server") == ["apipool-proxy"], (method, url)
    url = v1.replace("http", "ws") + "/realtime?model=gpt-4o-realtime-preview"
    async with http.ws_connect(url, headers=pool.alice.auth) as ws:
        assert ws._response.headers.getall("Server") == ["apipool-proxy"]
        assert ws._response.headers["x-request-id"].startswith("req_")


async def test_websocket_messages_are_bounded(pool: Pool, http):
    # A message is held whole before it is passed on: one without bound could fill memory.
    url = pool.server.proxy_url.replace("http", "ws") + "/realtime?model=gpt-4o-realtime-preview"
    async with http.ws_connect(url, headers=pool.alice.auth, max_msg_size=0) as ws:
        await ws.send_bytes(b"a" * (1 << 20))
        assert len((await ws.receive(timeout=5)).data) == 1 << 20  # a large one passes
        with contextlib.suppress(ConnectionError):  # the proxy may hang up mid-message
            await ws.send_bytes(b"b" * (17 << 20))
        ending = await ws.receive(timeout=5)
        assert ending.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR), ending
    assert ws.closed  # the upstream, which takes any size, never got it to echo back


async def test_websocket_sessions_count_against_concurrency_limits(start_server, http):
    async with start_server(limits={"max_concurrent": 1}) as server:
        async for p in make_pool(server, http, models=["gpt-4o-realtime-preview"]):
            url = (
                p.server.proxy_url.replace("http", "ws") + "/realtime?model=gpt-4o-realtime-preview"
            )
            async with http.ws_connect(url, headers=p.alice.auth) as ws:
                await ws.send_str("{}")
                await ws.receive(timeout=5)
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    async with http.ws_connect(url, headers=p.alice.auth):
                        pass
                assert refused.value.status == 429


# -- the proxy's own errors, as the SDK sees them --------------------------------------------


async def test_proxy_errors_map_to_sdk_exception_classes(start_server, http):
    async with start_server(proxy={"max_body_mb": 1}) as server:
        async for p in make_pool(server, http, models=["gpt-4o-mini"]):
            with pytest.raises(openai.AuthenticationError) as auth:
                await p.client(token="ap-not-a-real-token").models.list()
            assert auth.value.code == "invalid_api_key"
            with pytest.raises(openai.NotFoundError) as missing:
                await p.client().chat.completions.create(model="gpt-9", messages=messages())
            assert missing.value.code == "model_not_found"
            with pytest.raises(openai.APIStatusError) as big:
                await p.client().chat.completions.create(
                    model="gpt-4o-mini", messages=messages("x" * (2 * 1024 * 1024))
                )
            assert big.value.status_code == 413
            for key in p.keys:
                p.up.fail(key, "429", retry_after=20)
            with pytest.raises(openai.RateLimitError):
                await p.client().chat.completions.create(model="gpt-4o-mini", messages=messages())
            for key in p.keys:
                p.up.heal(key)
                p.up.fail(key, "500")
    async with start_server() as server:
        async for p in make_pool(server, http, username="bob", models=["gpt-4o-mini"]):
            for key in p.keys:
                p.up.fail(key, "500")
            with pytest.raises(openai.InternalServerError) as broken:
                await p.client().chat.completions.create(model="gpt-4o-mini", messages=messages())
            assert broken.value.status_code == 502


async def test_missing_token_and_non_v1_paths(server, http):
    async with http.get(server.proxy_url + "/models") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"
        assert resp.headers["x-request-id"].startswith("req_")
    async with http.get(server.proxy_url.replace("/v1", "/api/keys")) as resp:
        assert resp.status == 404
        assert "error" in await resp.json()
        assert resp.headers["x-request-id"].startswith("req_")


async def test_malformed_json_body_is_400(pool: Pool, http):
    async with http.post(
        pool.server.proxy_url + "/chat/completions",
        data=b'{"model": ',
        headers={**pool.alice.auth, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"
    assert pool.up.requests_for(pool.keys[0]) == [] or all(
        r.path != "/v1/chat/completions" for r in pool.up.requests
    )


async def test_logout_takes_effect_on_the_next_proxied_request(pool: Pool):
    client = pool.client()
    await client.models.list()
    await pool.alice.call("POST", "/api/logout")
    with pytest.raises(openai.AuthenticationError):
        await client.models.list()


async def test_round_robin_spreads_requests(start_server, http):
    async with start_server(pool={"strategy": "round_robin"}) as server:
        async for p in make_pool(server, http, n_keys=3, models=["gpt-4o-mini"]):
            for _ in range(9):
                await p.client().chat.completions.create(model="gpt-4o-mini", messages=messages())
            assert [p.served_by(k) for k in p.keys] == [3, 3, 3]


async def test_keys_without_models_are_tried_until_upstream_lists_them(start_server, http):
    async with start_server() as server:
        async for p in make_pool(server, http, n_keys=1):
            p.up.set_models(p.keys[0], ["only-this"])
            await wait_models_known(p)
            with pytest.raises(openai.NotFoundError):
                await p.client().chat.completions.create(model="gpt-4o-mini", messages=messages())


async def _send_head_expecting_continue(pool: Pool, token: str, body: bytes, expect: str):
    proxy = urlsplit(pool.server.proxy_url)  # type: ignore[attr-defined]
    reader, writer = await asyncio.open_connection(proxy.hostname, proxy.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"Expect: %s\r\nContent-Length: %d\r\n\r\n" % (token.encode(), expect.encode(), len(body))
    )
    return reader, writer


async def test_expect_100_continue_is_answered_before_the_body_is_sent(pool: Pool):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % MODEL.encode()
    reader, writer = await _send_head_expecting_continue(
        pool, pool.alice.token, body, "100-continue"
    )
    try:
        # curl waits a second for this line before sending the body anyway.
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b'"chat.completion"' in answer


@pytest.mark.parametrize(
    ("token", "expect", "status"),
    [("ap-not-a-token", "100-continue", 401), (None, "something-else", 417)],
    ids=["unauthenticated", "unknown-expectation"],
)
async def test_refused_upload_gets_no_100_continue(pool: Pool, token, expect, status):
    body = b'{"model": "%s"}' % MODEL.encode()
    reader, writer = await _send_head_expecting_continue(
        pool, token or pool.alice.token, body, expect
    )
    try:
        # The answer comes without the body ever being sent.
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
        error = await asyncio.wait_for(reader.readexactly(length), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b'"error"' in error


async def test_health_check_and_paths_outside_v1(server, http, caplog):
    caplog.set_level(logging.INFO, logger="apipool_proxy.access")
    base = server.proxy_url.removesuffix("/v1")
    async with http.get(base + "/healthz") as response:  # no token: for load balancers
        assert (response.status, await response.json()) == (200, {"status": "ok"})
    server.services.answered.drain(server.services)
    assert "/healthz" not in caplog.text  # passing checks are not access-logged
    async with http.head(base + "/healthz") as response:
        assert response.status == 200
    for method, path in [("POST", "/healthz"), ("GET", "/"), ("GET", "/v2/models")]:
        async with http.request(method, base + path) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "unknown_url"


async def test_each_port_says_so_when_given_the_others_requests(server, http):
    # An OpenAI client pointed at the admin port learns where the proxy port is.
    client = openai.AsyncOpenAI(base_url=server.admin_url + "/v1", api_key="ap-x", max_retries=0)
    async with client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages())
    assert caught.value.code == "wrong_port"
    assert f"base_url={server.proxy_url}" in caught.value.message
    # The CLI or SDK pointed at the proxy port learns it is the wrong one, not where the
    # admin port is.
    base = server.proxy_url.removesuffix("/v1")
    async with http.post(base + "/api/login", json={"username": "a", "password": "b"}) as answer:
        error = (await answer.json())["error"]
    assert (answer.status, error["code"]) == (404, "wrong_port")
    assert server.admin_url.rsplit(":", 1)[1] not in error["message"]


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"s" * 20000 + b"\r\n\r\n",
        b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nsecret-sk-abc header\r\n\r\n",
        b"SECRETMETHOD /v1/models HTTP/1.1\r\n\r\n",
    ],
    ids=["header-too-long", "length-and-chunked", "bad-header", "bad-method"],
)
@pytest.mark.parametrize("port", ["proxy", "admin"])
async def test_malformed_http_gets_the_envelope_without_an_echo(server, raw: bytes, port: str):
    url = urlsplit(server.proxy_url if port == "proxy" else server.admin_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 5)  # and the connection is closed
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 400 " in head.split(b"\r\n")[0]
    assert b"application/json" in head
    error = json.loads(body)["error"]
    assert (error["code"], error["type"]) == ("bad_http", "invalid_request_error")
    for echo in (b"sss", b"secret", b"SECRETMETHOD", b"chunked"):
        assert echo not in body
    assert b"\r\nServer: apipool-proxy\r\n" in head


async def test_a_key_without_access_to_a_listed_model_is_passed_over(server, http):
    # Both keys are listed for "gpt-4o", but only the second one's account may use it.
    async for p in make_pool(server, http, n_keys=2, models=["gpt-4o", "gpt-4o-mini"]):
        p.up.account(p.keys[0]).models = ["gpt-4o-mini"]
        client = p.client()

        async def chat(model: str, client: openai.AsyncOpenAI = client) -> None:
            reply = await client.chat.completions.create(model=model, messages=messages("hi"))
            assert reply.choices[0].message.content == "echo: hi"  # through another key

        for _ in range(50):  # the pool picks among equals at random: until it tried key 0
            if p.served_by(p.keys[0]):
                break
            await chat("gpt-4o")
        assert p.served_by(p.keys[0]) == 1  # turned it down
        for _ in range(10):
            await chat("gpt-4o")
        assert p.served_by(p.keys[0]) == 1  # and was not offered that model again
        for _ in range(50):  # but still is for the models its account has
            if p.served_by(p.keys[0]) == 2:
                break
            await chat("gpt-4o-mini")
        assert p.served_by(p.keys[0]) == 2


async def test_a_model_no_key_may_use_is_the_upstreams_404(server, http):
    async for p in make_pool(server, http, n_keys=2, models=["gpt-4o", "gpt-4o-mini"]):
        for key in p.keys:
            p.up.account(key).models = ["gpt-4o-mini"]
        client = p.client()
        with pytest.raises(openai.NotFoundError) as first:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
        assert "do not have access" in first.value.message  # the upstream's own words
        assert p.served_by(p.keys[0]) == p.served_by(p.keys[1]) == 1  # both were asked
        with pytest.raises(openai.NotFoundError) as again:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
        assert again.value.code == "model_not_found"
        assert p.served_by(p.keys[0]) == p.served_by(p.keys[1]) == 1  # neither asked again


async def test_a_project_barred_from_a_model_is_passed_over_not_invalidated(start_server, http):
    barred = secret("barred")
    asked: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        asked.append(key)
        if key == barred:  # what OpenAI answers for a project without access to a model
            error = {
                "message": "Project `proj_x` does not have access to model `gpt-4o`",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
            return web.json_response({"error": error}, status=403)
        return web.json_response(chat_completion("fine", 1, 1))

    async with bare_upstream(chat) as base_url, scenario(start_server, http) as s:
        alice = await s.member("alice")
        barred_id = (await alice.add_key(barred, base_url, models=["gpt-4o"]))["id"]
        await alice.add_key(secret("allowed"), base_url, models=["gpt-4o"])
        client = openai.AsyncOpenAI(base_url=s.server.proxy_url, api_key=alice.token)
        for _ in range(30):
            reply = await client.chat.completions.create(model="gpt-4o", messages=messages())
            assert reply.choices[0].message.content == "fine"
            if barred in asked:
                break
        for _ in range(5):
            await client.chat.completions.create(model="gpt-4o", messages=messages())
        await client.close()
        assert asked.count(barred) == 1  # asked once, then passed over
        [key] = [
            k for k in (await alice.call("GET", "/api/keys"))[1]["keys"] if k["id"] == barred_id
        ]
        assert key["status"] == "active"  # the key works; only that model is barred

"""What operators see: /metrics, the admin pool view, /readyz, and the access log."""

from __future__ import annotations

import asyncio
import json
import logging
import signal

import aiohttp
import openai
import pytest

from .fake_upstream import FakeUpstream
from .scenario import MODEL, messages, scenario, secret
from .support import PASSWORD, ServerProcess


def requests_total(samples: dict, status: str = "200", model: str = MODEL) -> float:
    labels = (("endpoint", "/chat/completions"), ("model", model), ("status", status))
    return samples.get(("apipool_requests_total", labels), 0.0)


async def test_metrics_count_requests_attempts_and_failovers(start_server, http):
    async with scenario(start_server, http) as s:
        root, alice = await s.admin(), await s.member("alice")
        await s.add_key(alice, "alice")
        bobs = await s.add_key(await s.member("bob"), "bob")
        await root.call("POST", f"/api/admin/keys/{bobs}/approve")

        # Alice's own key is tried first, fails, and the request moves on to bob's.
        s.up.fail(secret("alice"), "500", times=1)
        await s.chat(alice)
        await s.chat(alice, stream=True)
        before = await s.metrics()
        assert requests_total(before) == 2
        assert before[("apipool_upstream_attempts_total", ())] == 3
        assert before[("apipool_failovers_total", ())] == 1
        assert before[("apipool_upstream_latency_seconds_count", ())] == 3
        assert before[("apipool_requests_in_flight", ())] == 0
        assert before[("apipool_keys", (("status", "active"),))] == 2

        # Both keys fail: two attempts, one failover (there was nowhere to go after the second).
        for name in ("alice", "bob"):
            s.up.fail(secret(name), "503", times=1)
        with pytest.raises(openai.InternalServerError):
            await s.chat(alice)
        with pytest.raises(openai.NotFoundError):
            await s.sdk(alice).chat.completions.create(model="no-such", messages=messages())
        after = await s.metrics()
        assert requests_total(after, "502") == 1
        assert requests_total(after, "404", model="other") == 1
        assert after[("apipool_upstream_attempts_total", ())] == 5
        assert after[("apipool_failovers_total", ())] == 2


async def test_metrics_show_requests_in_flight_and_keys_by_status(start_server, http):
    async with scenario(start_server, http) as s:
        alice = await s.member("alice")
        await s.add_key(alice, "slow")
        await s.add_key(alice, "revoked")
        s.up.revoke(secret("revoked"))
        s.up.fail(secret("slow"), "delay", seconds=0.5)
        held = [asyncio.ensure_future(s.chat(alice)) for _ in range(2)]
        async with asyncio.timeout(3):
            await s.up.wait_inflight(2)  # both on the slow key, after the revoked one failed
        during = await s.metrics()
        assert during[("apipool_requests_in_flight", ())] == 2
        assert during[("apipool_keys", (("status", "invalid"),))] == 1
        assert during[("apipool_keys", (("status", "active"),))] == 1
        assert during[("apipool_keys", (("status", "exhausted"),))] == 0  # zeros are shown
        await asyncio.gather(*held)
        assert (await s.metrics())[("apipool_requests_in_flight", ())] == 0


async def test_metrics_show_usage_rows_waiting_to_be_written(start_server, http, monkeypatch):
    monkeypatch.setattr("apipool_proxy.usage.FLUSH_INTERVAL", 60)
    async with scenario(start_server, http) as s:
        alice = await s.member("alice")
        await s.add_key(alice, "alice")
        for _ in range(3):
            await s.chat(alice)
        assert (await s.metrics())[("apipool_usage_rows_pending", ())] == 3
        await alice.call("GET", "/api/usage")  # writes what is pending first
        assert (await s.metrics())[("apipool_usage_rows_pending", ())] == 0


async def test_admin_pool_shows_every_key_masked_with_its_state(start_server, http):
    async with scenario(start_server, http) as s:
        root, alice, bob = await s.admin(), await s.member("alice"), await s.member("bob")
        busy = await s.add_key(alice, "busy", label="main")
        cooling = await s.add_key(bob, "cooling")
        await s.chat(alice, "one two three")
        s.up.fail(secret("cooling"), "429", times=1, retry_after=30)
        with pytest.raises(openai.RateLimitError):
            await s.chat(bob)
        s.up.fail(secret("busy"), "delay", times=1, seconds=0.5)
        held = asyncio.ensure_future(s.chat(alice))
        async with asyncio.timeout(2):
            await s.up.wait_inflight(1)

        assert (await alice.call("GET", "/api/admin/pool"))[0] == 403
        status, pool = await root.call("GET", "/api/admin/pool")
        await held
        assert status == 200
        keys = {k["id"]: k for k in pool["keys"]}
        assert set(keys) == {busy, cooling}
        assert secret("busy") not in json.dumps(pool) and secret("cooling") not in json.dumps(pool)
        first = keys[busy]
        assert first["masked_key"] == "sk-bu...kkkk" and first["label"] == "main"
        assert (first["owner"], first["owner_id"]) == ("alice", alice.user_id)
        assert (first["status"], first["in_flight"]) == ("active", 1)
        assert (first["requests_today"], first["tokens_today"]) == (1, 8)
        second = keys[cooling]
        assert (second["owner"], second["status"], second["in_flight"]) == ("bob", "cooling", 0)
        assert second["cooldown_until"].endswith("Z")
        assert "HTTP 429" in second["last_error"]
        assert (second["requests_today"], second["tokens_today"]) == (1, 0)


async def test_readyz_needs_a_usable_key(start_server, http):
    async with scenario(start_server, http) as s:
        ready = s.server.admin_url + "/readyz"
        async with http.get(ready) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "no_usable_key"
        alice = await s.member("alice")
        await s.add_key(alice, "alice")
        async with http.get(ready) as resp:
            assert resp.status == 200 and (await resp.json())["usable_keys"] == 1
        s.up.revoke(secret("alice"))
        with pytest.raises(openai.APIStatusError):
            await s.chat(alice)
        async with http.get(ready) as resp:
            assert resp.status == 503
        async with http.get(s.server.admin_url + "/healthz") as resp:
            assert resp.status == 200


# -- the access log ---------------------------------------------------------------------------


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "apipool_proxy.access"]


async def test_one_access_line_per_v1_request(start_server, http, caplog):
    caplog.set_level(logging.INFO, logger="apipool_proxy.access")
    async with scenario(start_server, http, limits={"rpm": 1}) as s:
        alice = await s.member("alice")
        key = await s.add_key(alice, "alice")
        await s.chat(alice)
        await s.sdk(alice).models.list()
        with pytest.raises(openai.AuthenticationError):
            await s.sdk("not-a-token").models.list()
        async with http.get(s.server.proxy_url + "/x%0Aforged", headers=alice.auth) as resp:
            assert resp.status == 429  # forwarded like any /v1 path, so the rpm limit applies
        with pytest.raises(openai.RateLimitError):
            await s.chat(alice)
        # Lines are written behind the request path, within a fraction of a second.
        for _ in range(100):
            lines = [r.getMessage() for r in access_lines(caplog)]
            if len(lines) >= 5:
                break
            await asyncio.sleep(0.02)
    assert len(lines) == 5, lines
    assert lines[0].startswith(
        f"POST /v1/chat/completions 200 user={alice.user_id} key={key} model={MODEL} attempts=1 "
    )
    assert lines[1].startswith(f"GET /v1/models 200 user={alice.user_id} key=- model=- ")
    assert lines[2].startswith("GET /v1/models 401 user=- key=- model=- attempts=0 ")
    assert lines[3].startswith("GET /v1/x%0Aforged 429 ")  # as sent: no forged second line
    assert lines[4].startswith(f"POST /v1/chat/completions 429 user={alice.user_id} key=- ")
    assert all("latency_ms=" in line and "\n" not in line for line in lines)


async def test_json_access_log_has_no_secret_prompt_or_completion(tmp_path):
    config = (
        "upstream: {allow_private_networks: true}\n"
        "pool: {strategy: round_robin}\n"  # the first request tries the revoked key first
        "log: {format: json, level: DEBUG}\n"
    )
    canary = "canary-7f3a9c-prompt"
    async with FakeUpstream() as up, aiohttp.ClientSession() as http:
        server = ServerProcess(tmp_path, config)
        await asyncio.to_thread(server.start)
        try:
            creds = {"username": "alice", "password": PASSWORD}
            async with http.post(server.admin_url + "/api/register", json=creds) as resp:
                user_id = (await resp.json())["user_id"]
            async with http.post(server.admin_url + "/api/login", json=creds) as resp:
                token = (await resp.json())["token"]
            auth = {"Authorization": f"Bearer {token}"}
            for name in ("good", "revoked"):
                key = {"key": secret(name), "base_url": up.base_url, "models": [MODEL]}
                async with http.post(server.admin_url + "/api/keys", json=key, headers=auth) as r:
                    assert r.status == 201
            up.revoke(secret("revoked"))  # its upstream echoes the key in the 401 message
            async with openai.AsyncOpenAI(
                base_url=server.proxy_url, api_key=token, max_retries=0
            ) as client:
                for _ in range(3):
                    await client.chat.completions.create(model=MODEL, messages=messages(canary))
                stream = await client.chat.completions.create(
                    model=MODEL, messages=messages(canary), stream=True
                )
                async for _ in stream:
                    pass
                # The caller's own mistake, echoing the prompt: relayed, never logged.
                up.fail(secret("good"), "400", times=1, message=f"bad value near {canary}")
                with pytest.raises(openai.BadRequestError) as caught:
                    await client.chat.completions.create(model=MODEL, messages=messages(canary))
                assert canary in caught.value.message
        finally:
            await asyncio.to_thread(server.stop, signal.SIGTERM)
    log = server.log()
    entries = [json.loads(line) for line in log.splitlines()]
    access = [e for e in entries if e["logger"] == "apipool_proxy.access"]
    assert [e["status"] for e in access] == [200, 200, 200, 200, 400]
    for entry in access:
        assert (entry["method"], entry["path"]) == ("POST", "/v1/chat/completions")
        assert entry["user_id"] == user_id and entry["model"] == MODEL
        assert entry["key_id"] == 1
        assert entry["latency_ms"] > 0 and entry["request_id"].startswith("req_")
    assert [e["attempts"] for e in access] == [2, 1, 1, 1, 1]
    assert [e["stream"] for e in access] == [False, False, False, True, False]
    for leak in (canary, "echo:", token, secret("good"), secret("revoked")):
        assert leak not in log, leak

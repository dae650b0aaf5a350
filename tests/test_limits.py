"""Fair sharing: per-user limits, per-key caps, own keys first, contribution required, and
disabled accounts, all seen through the official openai SDK."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import openai
import pytest
from aiohttp import web

from .scenario import MODEL, bare_upstream, chat_completion, scenario, secret
from .support import Member

RESET = re.compile(r"^(\d+m)?\d+s$|^\d+ms$")


async def test_default_rpm_limit_is_429_with_retry_after_and_no_upstream_call(start_server, http):
    async with scenario(start_server, http, limits={"rpm": 2}) as s:
        alice = await s.member("alice")
        await s.add_key(alice, "alice")
        first, second = await s.raw_chat(alice), await s.raw_chat(alice)
        assert [r.headers["x-ratelimit-remaining-requests"] for r in (first, second)] == ["1", "0"]

        with pytest.raises(openai.RateLimitError) as caught:
            await s.chat(alice)
        error = caught.value
        assert error.code == "rate_limit_exceeded" and "2 requests per minute" in error.message
        assert 55 <= int(error.response.headers["Retry-After"]) <= 60
        assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert error.response.headers["x-request-id"].startswith("req_")
        assert s.upstream_calls() == 2

        bob = await s.member("bob")  # limits are per user
        await s.add_key(bob, "bob")
        await s.chat(bob)

        # The refusal has its usage row, so members and admins see the limit being hit.
        rows = [(r["user_id"], r["status"], r["attempts"]) for r in await s.usage_rows()]
        assert rows == [(alice.user_id, 200, 1)] * 2 + [
            (alice.user_id, 429, 0),
            (bob.user_id, 200, 1),
        ]


@pytest.mark.parametrize(
    ("limit", "retry_after"),
    [("tpm", (55, 60)), ("daily_tokens", (1, 86400))],
)
async def test_token_limits_refuse_once_used_tokens_reach_them(
    start_server, http, limit, retry_after
):
    # Each request below costs 2 prompt + 5 completion tokens. A request is admitted on the
    # tokens already used, so the second one (7 used of 10) still goes through.
    async with scenario(start_server, http, limits={limit: 10}) as s:
        alice = await s.member("alice")
        await s.add_key(alice, "alice")
        await s.chat(alice)
        await s.chat(alice)
        with pytest.raises(openai.RateLimitError) as caught:
            await s.chat(alice)
        assert caught.value.code == "rate_limit_exceeded"
        low, high = retry_after
        assert low <= int(caught.value.response.headers["Retry-After"]) <= high
        assert s.upstream_calls() == 2


async def test_daily_tokens_used_before_a_restart_still_count(start_server, http):
    sections = {"limits": {"daily_tokens": 10}}
    async with scenario(start_server, http, **sections) as s:
        alice = await s.member("alice")
        await s.add_key(alice, "alice")
        await s.chat(alice, "one two three four five")  # 5 + 5 tokens
    async with scenario(start_server, http, **sections) as s:  # the same database
        with pytest.raises(openai.RateLimitError) as caught:
            await s.chat(alice)
        assert "Daily token limit" in caught.value.message


async def test_admin_overrides_limits_per_user(start_server, http):
    async with scenario(start_server, http) as s:
        root, alice, bob = await s.admin(), await s.member("alice"), await s.member("bob")
        for who in (alice, bob):
            await s.add_key(who, who.username)

        status, _ = await alice.call("PATCH", f"/api/admin/users/{bob.user_id}", {"limits": {}})
        assert status == 403
        status, user = await root.call(
            "PATCH", f"/api/admin/users/{alice.user_id}", {"limits": {"rpm": 1}}
        )
        assert status == 200 and user["limits"]["rpm"] == 1
        assert user["limit_overrides"] == {"rpm": 1}

        await s.chat(alice)
        with pytest.raises(openai.RateLimitError):
            await s.chat(alice)
        for _ in range(3):
            await s.chat(bob)

        _, listing = await root.call("GET", "/api/admin/users")
        by_name = {u["username"]: u for u in listing["users"]}
        assert by_name["alice"]["limits"]["rpm"] == 1 and by_name["bob"]["limits"]["rpm"] is None

        await root.call("PATCH", f"/api/admin/users/{alice.user_id}", {"limits": {"rpm": None}})
        await s.chat(alice)  # an explicit null is "unlimited", whatever the default


async def test_ratelimit_headers_count_down_for_plain_and_streamed_requests(start_server, http):
    async with scenario(start_server, http, limits={"rpm": 5, "tpm": 100}) as s:
        alice = await s.member("alice")
        await s.add_key(alice, "alice")
        seen = []
        for stream in (False, True, False):
            raw = await s.raw_chat(alice, stream=stream)
            if stream:
                async for _ in raw.parse():
                    pass
            seen.append(raw.headers)
        assert [h["x-ratelimit-limit-requests"] for h in seen] == ["5"] * 3
        assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["4", "3", "2"]
        assert [h["x-ratelimit-limit-tokens"] for h in seen] == ["100"] * 3
        # Tokens are known after a request ends: each answer shows those used before it.
        assert [h["x-ratelimit-remaining-tokens"] for h in seen] == ["100", "93", "86"]
        for headers in seen:
            assert RESET.match(headers["x-ratelimit-reset-requests"])
            assert RESET.match(headers["x-ratelimit-reset-tokens"])
        assert seen[0]["x-ratelimit-reset-tokens"] == "0s"  # nothing used yet
        assert seen[2]["x-ratelimit-reset-tokens"] != "0s"


async def test_callers_see_their_own_limits_never_the_pooled_keys(start_server, http):
    async def chat(request: web.Request) -> web.Response:
        # What OpenAI says about the key owner's account.
        limits = {
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-limit-tokens": "30000000",
            "x-ratelimit-reset-tokens": "6ms",
        }
        return web.json_response(chat_completion("hi", 1, 1), headers=limits)

    async with bare_upstream(chat) as base_url, scenario(start_server, http) as s:
        root, alice = await s.admin(), await s.member("alice")
        await alice.add_key(secret("owner"), base_url, models=[MODEL])
        assert _ratelimit_headers(await s.raw_chat(alice)) == {}

        await root.call("PATCH", f"/api/admin/users/{alice.user_id}", {"limits": {"tpm": 50}})
        seen = _ratelimit_headers(await s.raw_chat(alice))
        assert RESET.match(seen.pop("x-ratelimit-reset-tokens"))
        assert seen == {"x-ratelimit-limit-tokens": "50", "x-ratelimit-remaining-tokens": "48"}


def _ratelimit_headers(raw: Any) -> dict[str, str]:
    return {
        name.lower(): value
        for name, value in raw.headers.items()
        if name.lower().startswith("x-ratelimit-")
    }


async def test_max_concurrent_per_user(start_server, http):
    async with scenario(start_server, http, limits={"max_concurrent": 1}) as s:
        alice = await s.member("alice")
        await s.add_key(alice, "alice")
        s.up.fail(secret("alice"), "delay", times=1, seconds=0.5)
        held = asyncio.ensure_future(s.chat(alice))
        async with asyncio.timeout(2):
            await s.up.wait_inflight(1)
        with pytest.raises(openai.RateLimitError) as caught:
            await s.chat(alice)
        assert "in flight" in caught.value.message
        await held
        await s.chat(alice)


# -- caps on one key --------------------------------------------------------------------------


async def test_key_at_max_concurrent_is_skipped(start_server, http):
    async with scenario(start_server, http) as s:
        alice = await s.member("alice")
        for name in ("one", "two"):
            await s.add_key(alice, name, max_concurrent=1)
        for name in ("one", "two"):
            s.up.fail(secret(name), "delay", times=1, seconds=0.5)
        held = [asyncio.ensure_future(s.chat(alice)) for _ in range(2)]
        async with asyncio.timeout(2):
            await s.up.wait_inflight(2)
        # One request on each key: the second went to the key that was free.
        assert (s.served_by("one"), s.served_by("two")) == (1, 1)
        with pytest.raises(openai.RateLimitError) as caught:
            await s.chat(alice)
        assert "at capacity" in caught.value.message
        assert caught.value.response.headers["Retry-After"] == "1"
        assert s.upstream_calls() == 2
        await asyncio.gather(*held)
        await s.chat(alice)


async def test_key_rpm_cap_is_skipped(start_server, http):
    async with scenario(start_server, http) as s:
        alice = await s.member("alice")
        await s.add_key(alice, "capped", rpm=2)
        await s.chat(alice)
        await s.chat(alice)
        with pytest.raises(openai.RateLimitError) as caught:
            await s.chat(alice)
        assert "at capacity" in caught.value.message
        assert 55 <= int(caught.value.response.headers["Retry-After"]) <= 60
        assert s.upstream_calls() == 2

        await s.add_key(alice, "open")
        for _ in range(3):
            await s.chat(alice)
        assert (s.served_by("capped"), s.served_by("open")) == (2, 3)


async def test_a_key_stops_at_its_daily_token_budget_until_the_owner_raises_it(start_server, http):
    # Each request costs 2 prompt + 5 completion tokens. Like the per-user limit, a key still
    # takes a request while under its budget: the second one (7 of 10 used) goes through.
    async with scenario(start_server, http) as s:
        alice = await s.member("alice")
        key_id = await s.add_key(alice, "budgeted", daily_tokens=10)
        await s.chat(alice)
        await s.chat(alice)
        with pytest.raises(openai.RateLimitError) as caught:
            await s.chat(alice)
        assert "daily token budget" in caught.value.message
        assert 1 <= int(caught.value.response.headers["Retry-After"]) <= 86400  # midnight UTC
        assert s.upstream_calls() == 2

        await s.add_key(alice, "open")
        await s.chat(alice)
        assert (s.served_by("budgeted"), s.served_by("open")) == (2, 1)
        _, listed = await alice.call("GET", "/api/keys")
        spent = {k["id"]: (k["daily_tokens"], k["tokens_today"]) for k in listed["keys"]}
        assert spent[key_id] == (10, 14)

        status, _ = await alice.call("PATCH", f"/api/keys/{key_id}", {"daily_tokens": 1000})
        assert status == 200
        for _ in range(50):  # the pool picks among equals at random
            if s.served_by("budgeted") == 3:
                break
            await s.chat(alice)
        assert s.served_by("budgeted") == 3
        status, data = await alice.call("PATCH", f"/api/keys/{key_id}", {"daily_tokens": 0})
        assert (status, data["error"]["param"]) == (400, "daily_tokens")

    async with scenario(start_server, http) as s:  # the same database: today still counts
        again = Member(http, s.server.admin_url, "alice")
        again.token = alice.token
        _, listed = await again.call("GET", "/api/keys")
        spent = {k["id"]: (k["daily_tokens"], k["tokens_today"]) for k in listed["keys"]}
        assert spent[key_id] == (1000, 21)


# -- own keys, the shared pool, and contribution ---------------------------------------------


async def test_own_keys_first_then_the_shared_pool(start_server, http):
    async with scenario(start_server, http) as s:
        root, alice, bob = await s.admin(), await s.member("alice"), await s.member("bob")
        await s.add_key(alice, "alice", max_concurrent=1)
        bobs = await s.add_key(bob, "bob")
        status, approved = await root.call("POST", f"/api/admin/keys/{bobs}/approve")
        assert status == 200 and approved["visibility"] == "approved"

        for _ in range(4):
            await s.chat(alice)
        assert (s.served_by("alice"), s.served_by("bob")) == (4, 0)

        # Alice's key is busy: her next request spills over to the shared pool.
        s.up.fail(secret("alice"), "delay", times=1, seconds=0.5)
        held = asyncio.ensure_future(s.chat(alice))
        async with asyncio.timeout(2):
            await s.up.wait_inflight(1)
        await s.chat(alice)
        assert s.served_by("bob") == 1
        await held

        # Alice's key is private (a loopback URL no admin approved): bob never gets it.
        s.up.fail(secret("bob"), "500")
        with pytest.raises(openai.InternalServerError):
            await s.chat(bob)
        assert s.served_by("alice") == 5


async def test_without_prefer_own_keys_requests_spread_over_the_pool(start_server, http):
    async with scenario(
        start_server,
        http,
        pool={"prefer_own_keys": False, "strategy": "round_robin"},
        upstream={"shared_hosts": ["127.0.0.1"]},
    ) as s:
        alice, bob = await s.member("alice"), await s.member("bob")
        await s.add_key(alice, "alice")
        await s.add_key(bob, "bob")
        for _ in range(4):
            await s.chat(alice)
        assert (s.served_by("alice"), s.served_by("bob")) == (2, 2)


async def test_require_contribution_refuses_members_without_a_working_key(start_server, http):
    async with scenario(
        start_server,
        http,
        pool={"require_contribution": True},
        upstream={"shared_hosts": ["127.0.0.1"]},
    ) as s:
        alice, carol = await s.member("alice"), await s.member("carol")
        await s.add_key(alice, "alice")
        await s.chat(alice)
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await s.chat(carol)
        assert caught.value.code == "contribution_required"
        assert "contribute a working key" in caught.value.message

        # A key its upstream rejects is not a contribution.
        carols = await s.add_key(carol, "carol")
        s.up.revoke(secret("carol"))
        await carol.call("POST", f"/api/keys/{carols}/check")
        with pytest.raises(openai.PermissionDeniedError):
            await s.chat(carol)
        s.up.unrevoke(secret("carol"))
        await carol.call("POST", f"/api/keys/{carols}/check")
        await s.chat(carol)


# -- disabled accounts ------------------------------------------------------------------------


async def test_disabled_user_is_locked_out_of_both_ports_at_once(start_server, http):
    async with scenario(start_server, http) as s:
        root, alice = await s.admin(), await s.member("alice")
        await s.add_key(alice, "alice")
        client = s.sdk(alice)
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )

        status, user = await root.call(
            "PATCH", f"/api/admin/users/{alice.user_id}", {"disabled": True}
        )
        assert status == 200 and user["disabled"] is True
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
        assert (await alice.call("GET", "/api/me"))[0] == 401
        assert (await alice.call("GET", "/api/keys"))[0] == 401
        login = {"username": "alice", "password": "correct-horse-battery"}
        assert (await alice.call("POST", "/api/login", login))[0] == 401
        status, _ = await root.call("PATCH", f"/api/admin/users/{root.user_id}", {"disabled": True})
        assert status == 400  # an admin cannot lock themselves out

        await root.call("PATCH", f"/api/admin/users/{alice.user_id}", {"disabled": False})
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
        assert (await alice.call("GET", "/api/me"))[0] == 200

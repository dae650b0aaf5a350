"""Owners managing their keys: PATCH /api/keys/{id} and POST /api/keys/{id}/check."""

from __future__ import annotations

import asyncio

import openai
import pytest

from .scenario import MODEL, messages, scenario, secret


async def test_patch_changes_label_models_caps_and_enabled(start_server, http):
    async with scenario(start_server, http) as s:
        alice, bob = await s.member("alice"), await s.member("bob")
        key = await s.add_key(alice, "alice", models=[MODEL, "gpt-4o"])
        change = {"label": "work", "models": ["gpt-4o"], "max_concurrent": 1, "rpm": 50}
        status, data = await alice.call("PATCH", f"/api/keys/{key}", change)
        assert status == 200
        assert {name: data[name] for name in change} == change

        with pytest.raises(openai.NotFoundError):
            await s.chat(alice)  # the key no longer serves gpt-4o-mini
        await s.sdk(alice).chat.completions.create(model="gpt-4o", messages=messages())

        # max_concurrent took effect at once: a second request waits for nothing, it is refused.
        s.up.fail(secret("alice"), "delay", times=1, seconds=0.5)
        create = s.sdk(alice).chat.completions.create
        held = asyncio.ensure_future(create(model="gpt-4o", messages=messages()))
        async with asyncio.timeout(2):
            await s.up.wait_inflight(1)
        with pytest.raises(openai.RateLimitError):
            await create(model="gpt-4o", messages=messages())
        await held

        status, data = await alice.call("PATCH", f"/api/keys/{key}", {"enabled": False})
        assert (status, data["enabled"], data["status"]) == (200, False, "disabled")
        with pytest.raises(openai.APIStatusError) as caught:
            await create(model="gpt-4o", messages=messages())
        assert caught.value.status_code == 503 and "disabled" in caught.value.message
        await alice.call("PATCH", f"/api/keys/{key}", {"enabled": True, "max_concurrent": None})
        await create(model="gpt-4o", messages=messages())

        # Only the owner may change a key, and only these fields.
        assert (await bob.call("PATCH", f"/api/keys/{key}", {"label": "mine"}))[0] == 404
        status, error = await alice.call("PATCH", f"/api/keys/{key}", {"base_url": "x"})
        assert status == 400 and error["error"]["param"] == "base_url"
        status, error = await alice.call("PATCH", f"/api/keys/{key}", {"rpm": 0})
        assert status == 400 and error["error"]["param"] == "rpm"


async def test_check_probes_models_and_clears_invalid(start_server, http):
    async with scenario(start_server, http) as s:
        alice = await s.member("alice")
        key = await s.add_key(alice, "alice")
        s.up.revoke(secret("alice"))
        with pytest.raises(openai.APIStatusError):
            await s.chat(alice)
        _, listing = await alice.call("GET", "/api/keys")
        assert listing["keys"][0]["status"] == "invalid"

        status, data = await alice.call("POST", f"/api/keys/{key}/check")
        assert (status, data["status"]) == (200, "invalid")  # still rejected upstream
        assert s.up.requests[-1].path == "/v1/models"

        s.up.unrevoke(secret("alice"))
        status, data = await alice.call("POST", f"/api/keys/{key}/check")
        assert (status, data["status"], data["last_error"]) == (200, "active", None)
        await s.chat(alice)

        bob = await s.member("bob")
        assert (await bob.call("POST", f"/api/keys/{key}/check"))[0] == 404

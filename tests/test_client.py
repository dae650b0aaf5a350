"""The Python SDK (``APIPoolClient``) against a real server and a fake upstream.

The SDK is synchronous, so its calls run in a worker thread while the server and the fake
upstream keep serving on the test's event loop.
"""

from __future__ import annotations

import asyncio

import pytest

from apipool_proxy import APIPoolClient, APIPoolError

from .fake_upstream import FakeUpstream
from .support import PASSWORD


async def test_sdk_walkthrough_and_chat(server):
    async with FakeUpstream() as up:

        def walkthrough() -> None:
            client = APIPoolClient(server_url=server.admin_url)
            user_id = client.register("alice", PASSWORD)
            assert user_id == 1
            token = client.login("alice", PASSWORD)
            assert token and client.token == token
            assert client.me()["username"] == "alice"
            key = client.add_key(
                "sk-sdk-secret-key-0042", base_url=up.base_url, models=["gpt-4o-mini"], label="sdk"
            )
            assert key["masked_key"] == "sk-sd...0042"
            assert [k["id"] for k in client.list_keys()] == [key["id"]]

            reply = client.chat_completions("gpt-4o-mini", [{"role": "user", "content": "hi sdk"}])
            assert reply["choices"][0]["message"]["content"] == "echo: hi sdk"
            chunks = list(
                client.chat_completions(
                    "gpt-4o-mini", [{"role": "user", "content": "a b"}], stream=True
                )
            )
            text = "".join(
                c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
            )
            assert text == "echo: a b"
            assert [m["id"] for m in client.models()] == ["gpt-4o-mini"]

            client.delete_key(key["id"])
            assert client.list_keys() == []
            client.logout()
            with pytest.raises(APIPoolError) as caught:
                client.list_keys()
            assert caught.value.status == 401
            assert isinstance(caught.value, RuntimeError)

        await asyncio.to_thread(walkthrough)


async def test_sdk_errors_carry_status_and_message(server):
    def failures() -> None:
        client = APIPoolClient(server_url=server.admin_url)
        client.register("bob", PASSWORD)
        with pytest.raises(APIPoolError) as taken:
            client.register("bob", PASSWORD)
        assert taken.value.status == 409 and "taken" in taken.value.message
        with pytest.raises(APIPoolError) as wrong:
            client.login("bob", "wrong-password")
        assert wrong.value.status == 401
        assert "wrong-password" not in str(wrong.value)
        token = client.login("bob", PASSWORD)
        with pytest.raises(APIPoolError) as bad:
            client.add_key("sk-x\r\ny")
        assert bad.value.status == 400 and token not in str(bad.value)

    await asyncio.to_thread(failures)


async def test_revoked_token_is_rejected_by_the_sdk_on_the_proxy_port(server):
    def revoked() -> None:
        client = APIPoolClient(server_url=server.admin_url)
        client.register("carol", PASSWORD)
        token = client.login("carol", PASSWORD)
        stale = APIPoolClient(server_url=server.admin_url, token=token)
        client.logout()
        with pytest.raises(APIPoolError) as caught:
            stale.models()
        assert caught.value.status == 401

    await asyncio.to_thread(revoked)

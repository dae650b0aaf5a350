"""The admin port: registration, login, tokens and upstream keys over real HTTP."""

from __future__ import annotations

import asyncio
import io
import sqlite3
from pathlib import Path

import pytest

from apipool_proxy import accounts as accounts_module

from .support import PASSWORD, Member


async def test_register_login_me_logout(server, http):
    alice = Member(http, server.admin_url, "alice")
    status, data = await alice.call(
        "POST", "/api/register", {"username": "alice", "password": PASSWORD}
    )
    assert (status, data["username"]) == (201, "alice")
    status, data = await alice.call(
        "POST", "/api/login", {"username": "alice", "password": PASSWORD}
    )
    assert status == 200 and data["user_id"] == 1 and data["expires_at"].endswith("Z")
    # An opaque token with at least 256 bits of randomness.
    assert len(data["token"]) >= 43
    alice.token = data["token"]
    assert (await alice.call("GET", "/api/me"))[1] == {
        "user_id": 1,
        "username": "alice",
        "is_admin": False,
    }
    assert await alice.call("POST", "/api/logout") == (200, {"ok": True})
    status, data = await alice.call("GET", "/api/me")
    assert status == 401 and data["error"]["code"] == "invalid_token"


async def test_taken_username_is_409(member, server, http):
    await member("alice")
    status, data = await Member(http, server.admin_url, "x").call(
        "POST", "/api/register", {"username": "ALICE", "password": PASSWORD}
    )
    assert status == 409 and data["error"]["param"] == "username"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"username": "ab", "password": PASSWORD}, "username"),
        ({"username": "a" * 65, "password": PASSWORD}, "username"),
        ({"username": "bad name", "password": PASSWORD}, "username"),
        ({"username": "bob\r\nX: y", "password": PASSWORD}, "username"),
        ({"username": 42, "password": PASSWORD}, "username"),
        ({"username": "bob", "password": "short"}, "password"),
        ({"username": "bob", "password": "x" * 73}, "password"),
        ({"username": "bob", "password": "é" * 37}, "password"),  # 74 bytes
        ({"username": "bob"}, "password"),
    ],
)
async def test_bad_registrations_are_400_naming_the_field(server, http, body, param):
    status, data = await Member(http, server.admin_url, "x").call("POST", "/api/register", body)
    assert status == 400
    assert data["error"]["param"] == param
    assert set(data["error"]) == {"message", "type", "param", "code"}


async def test_72_byte_password_is_accepted(server, http):
    member = Member(http, server.admin_url, "bob")
    body = {"username": "bob", "password": "p" * 72}
    assert (await member.call("POST", "/api/register", body))[0] == 201
    assert (await member.call("POST", "/api/login", body))[0] == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[1,2]",
        b"null",
        b"\xff\xfe",
        b'{"username": "a"' + b"}" * 3,
        b"[" * 5000 + b"]" * 5000,
    ],
)
async def test_malformed_json_is_400(server, http, raw):
    async with http.post(
        server.admin_url + "/api/register", data=raw, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_oversized_body_is_413_in_the_envelope(server, http):
    async with http.post(
        server.admin_url + "/api/register",
        data=io.BytesIO(b"x" * (2 * 1024 * 1024)),
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "request_too_large"


async def test_unknown_route_and_method_use_the_envelope(server, http):
    async with http.get(server.admin_url + "/nope") as resp:
        assert resp.status == 404
        assert "error" in await resp.json()
    async with http.put(server.admin_url + "/api/login") as resp:
        assert resp.status == 405
        assert "error" in await resp.json()


async def test_wrong_password_and_unknown_user_look_the_same(member, server, http):
    await member("alice")
    anon = Member(http, server.admin_url, "x")
    wrong = await anon.call("POST", "/api/login", {"username": "alice", "password": "nope-nope"})
    unknown = await anon.call("POST", "/api/login", {"username": "nobody", "password": "nope-no"})
    assert wrong == unknown
    assert wrong[0] == 401


async def test_keys_are_listed_masked_and_only_to_their_owner(member, server):
    alice, bob = await member("alice"), await member("bob")
    added = await alice.add_key(
        "sk-alice-secret-value-1234", "http://127.0.0.1:9/v1", models=["gpt-4o-mini"], label="work"
    )
    assert added["masked_key"] == "sk-al...1234"
    assert "sk-alice-secret-value-1234" not in str(added)
    status, data = await alice.call("GET", "/api/keys")
    assert status == 200
    [key] = data["keys"]
    assert key["label"] == "work" and key["models"] == ["gpt-4o-mini"]
    assert key["status"] == "active" and key["base_url"] == "http://127.0.0.1:9/v1"
    assert (await bob.call("GET", "/api/keys"))[1] == {"keys": []}
    # Bob cannot delete or change Alice's key: 404, the same as a key that does not exist.
    missing = await bob.call("DELETE", "/api/keys/999")
    theirs = await bob.call("DELETE", f"/api/keys/{key['id']}")
    assert missing[0] == theirs[0] == 404
    assert missing[1]["error"]["code"] == theirs[1]["error"]["code"] == "key_not_found"
    status, _ = await bob.call("PATCH", f"/api/keys/{key['id']}", {"label": "mine"})
    assert status == 404
    assert len((await alice.call("GET", "/api/keys"))[1]["keys"]) == 1
    assert (await alice.call("DELETE", f"/api/keys/{key['id']}"))[0] == 204
    assert (await alice.call("GET", "/api/keys"))[1] == {"keys": []}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "key"),
        ({"key": ""}, "key"),
        ({"key": "sk-abc\r\nX-Injected: 1"}, "key"),
        ({"key": 12345678}, "key"),
        ({"key": "sk-valid-key-123", "base_url": "ftp://x/v1"}, "base_url"),
        ({"key": "sk-valid-key-123", "models": "not-a-list-of-dicts", "label": 5}, "label"),
        ({"key": "sk-valid-key-123", "models": [1, 2]}, "models"),
        ({"key": "sk-valid-key-123", "label": "a\nb"}, "label"),
        ({"key": "sk-valid-key-123", "rpm": 0}, "rpm"),
    ],
)
async def test_bad_keys_are_400_naming_the_field(member, body, param):
    alice = await member("alice")
    status, data = await alice.call("POST", "/api/keys", body)
    assert status == 400, data
    assert data["error"]["param"] == param


async def test_api_tokens_are_shown_once_and_revocable(member, server, http):
    alice = await member("alice")
    status, created = await alice.call("POST", "/api/tokens", {"name": "laptop"})
    assert status == 201 and created["token"].startswith("ap-")
    status, listed = await alice.call("GET", "/api/tokens")
    assert [t["name"] for t in listed["tokens"]] == ["laptop"]
    assert "token" not in listed["tokens"][0]
    app = Member(http, server.admin_url, "alice")
    app.token = created["token"]
    assert (await app.call("GET", "/api/me"))[0] == 200
    assert (await alice.call("DELETE", f"/api/tokens/{created['id']}"))[0] == 204
    assert (await app.call("GET", "/api/me"))[0] == 401
    assert (await alice.call("DELETE", f"/api/tokens/{created['id']}"))[0] == 404


async def test_an_api_token_can_be_given_a_lifetime(member, server, http):
    alice = await member("alice")
    for bad in (0, -1, "7", True, 3651):
        status, data = await alice.call(
            "POST", "/api/tokens", {"name": "app", "expires_in_days": bad}
        )
        assert (status, data["error"]["param"]) == (400, "expires_in_days"), bad
    status, created = await alice.call(
        "POST", "/api/tokens", {"name": "brief", "expires_in_days": 1.5 / 86400}
    )
    assert status == 201 and created["expires_at"].endswith("Z")
    app = Member(http, server.admin_url, "alice")
    app.token = created["token"]
    assert (await app.call("GET", "/api/me"))[0] == 200
    async with http.get(server.proxy_url + "/models", headers=app.auth) as answer:
        assert answer.status == 200
    await asyncio.sleep(1.6)
    assert (await app.call("GET", "/api/me"))[0] == 401  # gone on both ports
    async with http.get(server.proxy_url + "/models", headers=app.auth) as answer:
        assert answer.status == 401
    assert (await alice.call("GET", "/api/tokens"))[1]["tokens"] == []


async def test_info_and_health(server, http):
    async with http.get(server.admin_url + "/api/info") as resp:
        data = await resp.json()
    assert data["proxy_url"].endswith("/v1") and data["version"]
    async with http.get(server.admin_url + "/healthz") as resp:
        assert resp.status == 200


async def test_plaintext_key_is_not_in_the_database_file(member, server, tmp_path: Path):
    alice = await member("alice")
    secret = "sk-canary-" + "Q" * 30
    await alice.add_key(secret, "http://127.0.0.1:9/v1", models=["m"])
    db_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("apipool.db*"))
    assert secret.encode() not in db_bytes
    with sqlite3.connect(tmp_path / "apipool.db") as conn:
        stored = conn.execute("SELECT secret FROM upstream_keys").fetchone()[0]
    assert secret.encode() not in stored


async def test_closed_registration_needs_an_admin(start_server, http):
    async with start_server(auth={"open_registration": False, "admins": ["root"]}) as server:
        anon = Member(http, server.admin_url, "x")
        status, data = await anon.call(
            "POST", "/api/register", {"username": "eve", "password": PASSWORD}
        )
        assert status == 403 and data["error"]["code"] == "registration_closed"
        root = await Member(http, server.admin_url, "root").join()
        assert (await root.call("GET", "/api/me"))[1]["is_admin"] is True
        status, _ = await root.call(
            "POST", "/api/register", {"username": "eve", "password": PASSWORD}
        )
        assert status == 201


async def test_a_member_holds_at_most_max_keys_per_member(start_server, http):
    async with start_server(pool={"max_keys_per_member": 2}, auth={"admins": ["root"]}) as server:
        alice = await Member(http, server.admin_url, "alice").join()
        root = await Member(http, server.admin_url, "root").join()
        body = {"base_url": "http://127.0.0.1:9/v1", "models": ["m"]}
        first = await alice.add_key("sk-limit-one-" + "a" * 16, **body)
        await alice.add_key("sk-limit-two-" + "a" * 16, **body)
        status, data = await alice.call(
            "POST", "/api/keys", {"key": "sk-three-" + "a" * 16, **body}
        )
        assert status == 403 and data["error"]["code"] == "too_many_keys"
        # Room again once one is removed; admins are not limited.
        assert (await alice.call("DELETE", f"/api/keys/{first['id']}"))[0] == 204
        await alice.add_key("sk-limit-three-" + "a" * 16, **body)
        for index in range(3):
            await root.add_key(f"sk-root-{index}-" + "r" * 16, **body)


async def test_sessions_and_api_tokens_per_user_are_bounded(server, http, monkeypatch):
    monkeypatch.setattr(accounts_module, "MAX_SESSIONS", 3)
    monkeypatch.setattr(accounts_module, "MAX_API_TOKENS", 2)
    alice = await Member(http, server.admin_url, "alice").join()
    sessions = []
    for _ in range(4):
        status, data = await alice.call(
            "POST", "/api/login", {"username": "alice", "password": PASSWORD}
        )
        assert status == 200
        sessions.append(data["token"])
    alive = []
    for token in sessions:
        alice.token = token
        alive.append((await alice.call("GET", "/api/me"))[0] == 200)
    # The join() session and the first login were the oldest; three remain.
    assert alive == [False, True, True, True]

    for name in ("one", "two"):
        assert (await alice.call("POST", "/api/tokens", {"name": name}))[0] == 201
    status, data = await alice.call("POST", "/api/tokens", {"name": "three"})
    assert status == 403 and data["error"]["code"] == "too_many_tokens"


async def test_admin_port_refuses_changes_asked_for_by_web_pages(server, http):
    body = {"username": "mallory", "password": PASSWORD}
    for origin in ("http://rebound.example:8081", "null", "http://127.0.0.1:8081"):
        async with http.post(
            server.admin_url + "/api/register", json=body, headers={"Origin": origin}
        ) as response:
            assert response.status == 403
            assert (await response.json())["error"]["code"] == "web_page_refused"
    async with http.get(server.admin_url + "/healthz", headers={"Origin": "null"}) as response:
        assert response.status == 200  # reading public health is harmless
    alice = await Member(http, server.admin_url, "mallory").join()  # no Origin: a client
    assert alice.user_id

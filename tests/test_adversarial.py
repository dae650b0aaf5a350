"""Attacks on a running server: what strangers sharing a pool could try against both ports.

Each test plays one attacker move against the server built by the production factory (or
against ``apipool serve`` in a subprocess for the canary) and states what must not happen.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import socket
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import openai
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from apipool_proxy import accounts as accounts_module
from apipool_proxy import netguard
from apipool_proxy.log import RedactingFormatter
from apipool_proxy.server import RunningServer

from .fake_upstream import FakeUpstream
from .support import PASSWORD, Member, ServerProcess

SQL_INJECTIONS = ("' OR 1=1 --", '"; DROP TABLE users; --')
MODEL = "gpt-4o-mini"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
JSON_TYPE = {"Content-Type": "application/json"}
# A public address that nothing in these tests ever dials.
PUBLIC_IP = "93.184.215.14"


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class Scene:
    """A server, a fake upstream, alice (who contributed ``key``) and bob (who did not)."""

    server: RunningServer
    up: FakeUpstream
    alice: Member
    bob: Member
    key: str
    key_id: int

    @property
    def proxy_port(self) -> int:
        return self.server.proxy_port

    def sdk(self, token: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.server.proxy_url, api_key=token, max_retries=0)

    async def proxy(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """A /v1 request as alice through the shared test session."""
        headers = {**self.alice.auth, **kw.pop("headers", {})}
        url = self.server.proxy_url + path
        async with self.alice.http.request(method, url, headers=headers, **kw) as resp:
            return resp.status, await _json_or_text(resp)


@contextlib.asynccontextmanager
async def open_scene(
    start_server: Any, http: aiohttp.ClientSession, key: str = "sk-adv-" + "k" * 24, **sections: Any
) -> AsyncIterator[Scene]:
    async with start_server(**sections) as server, FakeUpstream() as up:
        alice = await Member(http, server.admin_url, "alice").join()
        bob = await Member(http, server.admin_url, "bob").join()
        added = await alice.add_key(key, up.base_url, models=[MODEL])
        yield Scene(server, up, alice, bob, key, added["id"])


@pytest.fixture
async def scene(start_server: Any, http: aiohttp.ClientSession) -> AsyncIterator[Scene]:
    async with open_scene(start_server, http) as opened:
        yield opened


async def _json_or_text(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text()
    try:
        return json.loads(text)
    except ValueError:
        return text


def expect_error(expected: int, status: int, data: Any) -> dict[str, Any]:
    """Check that an answer is ``expected`` in the OpenAI error envelope; return the error."""
    assert status == expected, data
    assert isinstance(data, dict) and set(data) == {"error"}, data
    assert set(data["error"]) == {"message", "type", "param", "code"}, data
    return data["error"]


class Listener:
    """A loopback port that counts the connections it gets and closes each at once."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> Listener:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def __aenter__(self) -> Listener:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def raw_http(
    port: int, target: str, headers: dict[str, str] | None = None, body: bytes = b"", method="GET"
) -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte, so no client library tidies the path."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
    except ConnectionError:
        pass  # the server may answer and hang up before reading everything
    try:
        data = await reader.read()
    except ConnectionError:
        data = b""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    status_line, _, rest = data.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split(b" ")[1]), payload


class RebindingResolver(AbstractResolver):
    """DNS for one attacker's host: a public address on the first lookup, ``later`` after.

    That is DNS rebinding: the address checked when the key is contributed is not the
    address dialled when the key is used.
    """

    def __init__(self, host: str, later: str) -> None:
        self.host = host
        self.later = later
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self.host:
            raise OSError(f"no such host {host}")
        self.lookups += 1
        address = PUBLIC_IP if self.lookups == 1 else self.later
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
def rebinding(monkeypatch: pytest.MonkeyPatch) -> Iterator[RebindingResolver]:
    """Every resolver the upstream guard creates (add-time check, connector) is this one."""
    resolver = RebindingResolver("rebind.attacker.example", later="127.0.0.1")
    monkeypatch.setattr(netguard, "ThreadedResolver", lambda: resolver)
    monkeypatch.setattr(netguard, "DefaultResolver", lambda: resolver)
    yield resolver


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Everything logged while the test runs, through the production redacting formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def login_from(
    admin_url: str, address: str, username: str, password: str, **kw: Any
) -> tuple[int, Any, Any]:
    """Log in from a given loopback source address (all of 127.0.0.0/8 reaches us)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        body = {"username": username, "password": password}
        async with session.post(admin_url + "/api/login", json=body, **kw) as resp:
            return resp.status, await resp.json(), resp.headers


def _loopback_aliases_work() -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.2", 0))
        except OSError:
            return False
    return True


# Linux routes all of 127.0.0.0/8 to loopback; macOS only has 127.0.0.1 unless aliased.
needs_loopback_aliases = pytest.mark.skipif(
    not _loopback_aliases_work(), reason="127.0.0.2 cannot be a source address here"
)


def read_db(path: Path, sql: str) -> list[Any]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


# -- injection in tokens and names ------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [*SQL_INJECTIONS, "garbage", "ap-" + "A" * 43, "x" * 600],
    ids=["sql_or", "sql_drop", "garbage", "token_shaped", "oversized"],
)
async def test_sql_or_garbage_bearer_token_is_401_on_both_ports(scene: Scene, http, token):
    bad = {"Authorization": f"Bearer {token}"}
    async with http.get(scene.server.admin_url + "/api/me", headers=bad) as resp:
        error = expect_error(401, resp.status, await resp.json())
        assert error["code"] == "invalid_token"
    async with http.post(
        scene.server.proxy_url + "/chat/completions", json=CHAT, headers=bad
    ) as resp:
        error = expect_error(401, resp.status, await resp.json())
        assert error["code"] == "invalid_api_key"
    async with scene.sdk(token) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    assert scene.up.requests == []
    # The tables are intact and nothing matched: members' own tokens still work.
    assert (await scene.alice.call("GET", "/api/me"))[1]["username"] == "alice"
    assert (await scene.bob.call("GET", "/api/keys"))[0] == 200


@pytest.mark.parametrize("username", SQL_INJECTIONS)
async def test_sql_in_username_is_400_at_registration_and_401_at_login(
    server, http, member, tmp_path, username
):
    await member("alice")
    anon = Member(http, server.admin_url, "anon")
    status, data = await anon.call(
        "POST", "/api/register", {"username": username, "password": PASSWORD}
    )
    assert expect_error(400, status, data)["param"] == "username"
    login = await anon.call("POST", "/api/login", {"username": username, "password": PASSWORD})
    unknown = await anon.call("POST", "/api/login", {"username": "nobody", "password": PASSWORD})
    assert login == unknown and login[0] == 401
    assert read_db(tmp_path / "apipool.db", "SELECT username FROM users") == [("alice",)]


async def test_sql_in_label_token_name_and_models_is_stored_as_plain_text(scene: Scene, tmp_path):
    text = SQL_INJECTIONS[1]
    status, key = await scene.alice.call(
        "PATCH", f"/api/keys/{scene.key_id}", {"label": text, "models": [MODEL, text]}
    )
    assert status == 200 and key["label"] == text and text in key["models"]
    status, token = await scene.alice.call("POST", "/api/tokens", {"name": text})
    assert status == 201 and token["name"] == text
    assert read_db(tmp_path / "apipool.db", "SELECT label FROM upstream_keys") == [(text,)]
    assert len(read_db(tmp_path / "apipool.db", "SELECT id FROM users")) == 2


@pytest.mark.parametrize("path_id", ["1 OR 1=1", "1;DROP TABLE users", "-1", "0x1", "1e3"])
async def test_non_numeric_object_ids_are_404_and_touch_nothing(scene: Scene, path_id):
    for method, path in [
        ("PATCH", f"/api/keys/{path_id}"),
        ("DELETE", f"/api/keys/{path_id}"),
        ("POST", f"/api/keys/{path_id}/check"),
        ("DELETE", f"/api/tokens/{path_id}"),
    ]:
        status, data = await scene.alice.call(method, path, {"label": "x"})
        expect_error(404, status, data)
    status, data = await scene.alice.call("GET", "/api/keys")
    assert [k["id"] for k in data["keys"]] == [scene.key_id] and data["keys"][0]["label"] is None


# -- dead tokens ------------------------------------------------------------------------------


async def assert_refused_on_both_ports(scene: Scene, token: str) -> None:
    member = Member(scene.alice.http, scene.server.admin_url, "x")
    member.token = token
    status, data = await member.call("GET", "/api/me")
    assert expect_error(401, status, data)["code"] == "invalid_token"
    async with scene.sdk(token) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        assert caught.value.code == "invalid_api_key"


async def test_logged_out_token_is_401_on_both_ports(scene: Scene):
    token = scene.alice.token
    assert (await scene.proxy("POST", "/chat/completions", json=CHAT))[0] == 200
    assert (await scene.alice.call("POST", "/api/logout"))[0] == 200
    await assert_refused_on_both_ports(scene, token)


async def test_expired_session_token_is_401_on_both_ports(start_server, http):
    async with open_scene(start_server, http, auth={"session_ttl_hours": 0.0003}) as scene:
        assert (await scene.proxy("POST", "/chat/completions", json=CHAT))[0] == 200
        await asyncio.sleep(1.2)  # 0.0003 h is about 1.1 s
        await assert_refused_on_both_ports(scene, scene.alice.token)


async def test_disabled_member_is_refused_on_both_ports_at_once(start_server, http):
    async with open_scene(start_server, http, auth={"admins": ["root"]}) as scene:
        root = await Member(http, scene.server.admin_url, "root").join()
        status, _ = await root.call(
            "PATCH", f"/api/admin/users/{scene.alice.user_id}", {"disabled": True}
        )
        assert status == 200
        await assert_refused_on_both_ports(scene, scene.alice.token)


# -- one member against another's keys and tokens ----------------------------------------------


async def test_other_member_cannot_see_change_check_or_delete_a_key(scene: Scene):
    before = (await scene.alice.call("GET", "/api/keys"))[1]
    assert (await scene.bob.call("GET", "/api/keys"))[1] == {"keys": []}
    attempts = [
        ("PATCH", f"/api/keys/{scene.key_id}", {"label": "mine now", "enabled": False}),
        ("POST", f"/api/keys/{scene.key_id}/check", None),
        ("DELETE", f"/api/keys/{scene.key_id}", None),
    ]
    for method, path, body in attempts:
        status, data = await scene.bob.call(method, path, body)
        assert expect_error(404, status, data)["code"] == "key_not_found"
    # Someone else's key answers exactly like a key that never existed.
    status, data = await scene.bob.call("DELETE", "/api/keys/999")
    assert (status, data["error"]["code"]) == (404, "key_not_found")
    after = (await scene.alice.call("GET", "/api/keys"))[1]
    assert after == before
    assert [r.path for r in scene.up.requests] == []  # bob's "check" never probed the key


async def test_other_member_cannot_revoke_api_tokens(scene: Scene):
    status, created = await scene.alice.call("POST", "/api/tokens", {"name": "ci"})
    assert status == 201
    status, data = await scene.bob.call("DELETE", f"/api/tokens/{created['id']}")
    assert expect_error(404, status, data)["code"] == "token_not_found"
    tokens = (await scene.alice.call("GET", "/api/tokens"))[1]["tokens"]
    assert [t["id"] for t in tokens] == [created["id"]]
    async with scene.sdk(created["token"]) as client:
        assert [m.id async for m in client.models.list()] == [MODEL]


# -- where upstream requests may go -----------------------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    [
        "https://169.254.169.254/latest/meta-data",
        "https://127.0.0.1/v1",
        "https://[::1]/v1",
        "https://0x7f000001/v1",
        "https://2130706433/v1",
        "https://[::ffff:127.0.0.1]/v1",
        "https://127.1/v1",
        "https://localhost/v1",
        "https://metadata.google.internal/v1",
        "file:///etc/passwd",
        "http://user@api.openai.com/v1",
        "https://user:hunter2@api.openai.com/v1",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        # Slow to refuse for idna before 3.15 without a length check first.
        pytest.param("https://" + "\u0660" * 2000 + ".com/v1", id="idn_2000_chars"),
    ],
)
async def test_internal_or_malformed_base_url_is_400_naming_base_url(start_server, http, base_url):
    async with start_server(upstream={"allow_private_networks": False}) as server:
        alice = await Member(http, server.admin_url, "alice").join()
        status, data = await alice.call(
            "POST", "/api/keys", {"key": "sk-" + "a" * 30, "base_url": base_url}
        )
        error = expect_error(400, status, data)
        assert error["param"] == "base_url" and "base_url" in error["message"]
        assert "hunter2" not in error["message"]
        assert (await alice.call("GET", "/api/keys"))[1] == {"keys": []}


@pytest.mark.parametrize(
    ("base_url", "hinted"),
    [
        ("http://api.example.com/v1", True),
        ("https://127.0.0.1:8000/v1", True),
        ("https://localhost/v1", True),
        ("https://vllm/v1", True),
        ("https://169.254.169.254/v1", False),  # refused whatever the setting
    ],
)
async def test_a_refusal_the_operator_can_lift_names_the_setting(
    start_server, http, base_url, hinted
):
    # A member adding a local model server learns what to ask the operator for.
    async with start_server(upstream={"allow_private_networks": False}) as server:
        alice = await Member(http, server.admin_url, "alice").join()
        status, data = await alice.call(
            "POST", "/api/keys", {"key": "sk-" + "a" * 30, "base_url": base_url}
        )
        error = expect_error(400, status, data)
        assert ("upstream.allow_private_networks" in error["message"]) is hinted


async def test_metadata_address_is_refused_even_with_private_networks_allowed(server, member):
    alice = await member("alice")
    for base_url in ("http://169.254.169.254/latest", "http://[fd00:ec2::254]/"):
        status, data = await alice.call(
            "POST", "/api/keys", {"key": "sk-" + "a" * 30, "base_url": base_url}
        )
        assert expect_error(400, status, data)["param"] == "base_url"


async def test_base_url_at_the_servers_own_ports_is_refused_even_with_private_networks_allowed(
    server, member
):
    alice = await member("alice")
    for port in (server.admin_port, server.proxy_port):
        for host in ("127.0.0.1", "localhost", "[::1]", "0x7f000001", "0.0.0.0"):
            status, data = await alice.call(
                "POST", "/api/keys", {"key": "sk-" + "a" * 30, "base_url": f"http://{host}:{port}"}
            )
            assert expect_error(400, status, data)["param"] == "base_url", (host, port)


async def test_dns_rebinding_to_loopback_never_connects(
    start_server, http, rebinding: RebindingResolver
):
    async with (
        Listener() as target,
        start_server(upstream={"allow_private_networks": False}) as server,
    ):
        alice = await Member(http, server.admin_url, "alice").join()
        base_url = f"https://{rebinding.host}:{target.port}/v1"
        # At contribution time the host resolves to a public address, so the key is taken...
        key = await alice.add_key("sk-rebind-" + "r" * 20, base_url, models=[MODEL])
        # ...and every lookup after that answers loopback.
        async with openai.AsyncOpenAI(
            base_url=server.proxy_url, api_key=alice.token, max_retries=0
        ) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        assert caught.value.status_code == 502
        assert (await alice.call("POST", f"/api/keys/{key['id']}/check"))[0] == 200
    assert rebinding.lookups >= 2
    assert target.connections == 0


async def test_dns_rebinding_onto_the_admin_port_never_reaches_the_admin_api(
    start_server, http, rebinding: RebindingResolver
):
    async with start_server() as server:  # private networks allowed, ports chosen at start
        alice = await Member(http, server.admin_url, "alice").join()
        base_url = f"http://{rebinding.host}:{server.admin_port}/api"
        # The "key" is alice's own session token: if the proxy reached its admin port,
        # GET /v1/me would come back as alice's account.
        await alice.add_key(alice.token, base_url, models=[MODEL])
        async with http.get(server.proxy_url + "/me", headers=alice.auth) as resp:
            data = await resp.json()
        expect_error(502, resp.status, data)
        assert "username" not in json.dumps(data)


async def test_upstream_redirect_to_loopback_is_not_followed(scene: Scene):
    async with Listener() as target:
        location = f"http://127.0.0.1:{target.port}/steal"
        scene.up.fail(scene.key, "302", location=location)
        async with scene.sdk(scene.alice.token) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        assert caught.value.status_code == 502
        assert caught.value.code == "upstream_redirect"
        assert "location" not in caught.value.response.headers
        # The key's own probe does not follow it either.
        await scene.alice.call("POST", f"/api/keys/{scene.key_id}/check")
    assert len(scene.up.requests) == 2
    assert target.connections == 0


async def test_upstream_redirect_of_a_websocket_upgrade_is_not_followed(scene: Scene, http):
    async with Listener() as target:
        scene.up.fail(scene.key, "302", location=f"http://127.0.0.1:{target.port}/steal")
        url = scene.server.proxy_url.replace("http", "ws") + f"/realtime?model={MODEL}"
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            async with http.ws_connect(url, headers=scene.alice.auth):
                pass
        assert caught.value.status == 502
    assert target.connections == 0


# -- request paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../api/keys",
        "/v1/%2e%2e/api/keys",
        "/v1/%2E%2E/api/keys",
        "/v1/./../api/keys",
        "/v1//evil.example/x",
        "/v1/..%2f..%2fapi",
        "/v1/%2e%2e%2f%2e%2e%2fapi/keys",
        "/v1/@evil.example/x",
        "/v1%2f..%2fapi/keys",
        "/v%31/chat/completions",
        "/%76%31/chat/completions",
        "http://evil.example/v1/chat/completions",
    ],
)
async def test_path_tricks_stay_on_the_keys_own_host(scene: Scene, target):
    seen = len(scene.up.requests)
    headers = {**scene.alice.auth, "Content-Type": "application/json"}
    status, body = await raw_http(
        scene.proxy_port, target, headers, json.dumps(CHAT).encode(), method="POST"
    )
    assert status in (400, 404), body
    assert set(json.loads(body)) == {"error"} and b"masked_key" not in body
    # Either the proxy refused it, or the key's own upstream answered; nothing else.
    assert len(scene.up.requests) - seen <= 1
    for request in scene.up.requests[seen:]:
        assert request.key == scene.key and request.raw_path.startswith("/v1/")


async def test_encoded_v1_prefix_cannot_move_the_request_to_another_port(start_server, http):
    # "/v%31/x" is routed as "/v1/x". Cutting three characters off the raw path would leave
    # "31/x", which glued to "http://host:600" makes "http://host:60031/x".
    target = await _listener_on_a_port_ending_in_31()
    base_url = f"http://127.0.0.1:{target.port // 100}"
    try:
        async with start_server() as server:
            alice = await Member(http, server.admin_url, "alice").join()
            await alice.add_key("sk-port-" + "p" * 20, base_url, models=[MODEL])
            headers = {**alice.auth, "Content-Type": "application/json"}
            body = json.dumps(CHAT).encode()
            target_path = "/v%31/chat/completions"
            status, _ = await raw_http(server.proxy_port, target_path, headers, body, "POST")
            assert status == 400
    finally:
        await target.close()
    assert target.connections == 0


async def _listener_on_a_port_ending_in_31() -> Listener:
    for port in range(60031, 65536, 100):
        with contextlib.suppress(OSError):
            return await Listener().start(port)
    pytest.skip("no free port ending in 31")


async def test_request_body_fields_naming_hosts_or_keys_are_passed_through_untouched(
    scene: Scene,
):
    async with Listener() as elsewhere:
        other = f"http://127.0.0.1:{elsewhere.port}/v1"
        body = {
            **CHAT,
            "api_base": other,
            "base_url": other,
            "api_key": "sk-attacker-" + "a" * 20,
            "organization": "org-attacker",
        }
        raw = json.dumps(body).encode()
        status, _ = await scene.proxy(
            "POST",
            "/chat/completions?base_url=" + other,
            data=raw,
            headers={"Content-Type": "application/json", "X-Api-Base": other},
        )
    assert status == 200
    seen = scene.up.requests[-1]
    assert seen.body == raw and seen.key == scene.key
    assert seen.query_string == "base_url=" + other
    assert elsewhere.connections == 0


# -- who may use whose key --------------------------------------------------------------------


async def test_private_key_serves_only_its_owner_until_an_admin_approves_it(start_server, http):
    async with open_scene(start_server, http, auth={"admins": ["root"]}) as scene:
        root = await Member(http, scene.server.admin_url, "root").join()
        listed = (await scene.alice.call("GET", "/api/keys"))[1]["keys"]
        assert listed[0]["visibility"] == "private"

        async with scene.sdk(scene.bob.token) as bob:
            assert [m.id async for m in bob.models.list()] == []
            with pytest.raises(openai.NotFoundError):
                await bob.chat.completions.create(model=MODEL, messages=CHAT["messages"])
            assert scene.up.requests == []
            async with scene.sdk(scene.alice.token) as alice:
                await alice.chat.completions.create(model=MODEL, messages=CHAT["messages"])
            assert len(scene.up.requests) == 1

            status, data = await scene.bob.call("POST", f"/api/admin/keys/{scene.key_id}/approve")
            assert expect_error(403, status, data)["code"] == "admin_required"
            status, data = await root.call("POST", f"/api/admin/keys/{scene.key_id}/approve")
            assert status == 200 and data["visibility"] == "approved"
            listed = (await scene.alice.call("GET", "/api/keys"))[1]["keys"]
            assert listed[0]["visibility"] == "approved"

            reply = await bob.chat.completions.create(model=MODEL, messages=CHAT["messages"])
            assert reply.choices[0].message.content == "echo: hi"


async def test_key_on_a_shared_host_serves_everyone_and_is_listed_as_shared(start_server, http):
    async with open_scene(start_server, http, upstream={"shared_hosts": ["127.0.0.1"]}) as scene:
        listed = (await scene.alice.call("GET", "/api/keys"))[1]["keys"]
        assert listed[0]["visibility"] == "shared"
        async with scene.sdk(scene.bob.token) as bob:
            await bob.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        assert scene.up.requests[-1].key == scene.key


async def test_owner_cannot_retarget_or_self_approve_a_key(scene: Scene):
    for field, value in [
        ("base_url", "http://127.0.0.1:1/v1"),
        ("approved", True),
        ("owner_id", scene.bob.user_id),
        ("key", "sk-other-" + "o" * 20),
    ]:
        status, data = await scene.alice.call("PATCH", f"/api/keys/{scene.key_id}", {field: value})
        assert expect_error(400, status, data)["param"] == field
    listed = (await scene.alice.call("GET", "/api/keys"))[1]["keys"]
    assert listed[0]["visibility"] == "private"
    assert listed[0]["base_url"] == scene.up.base_url


async def test_admin_routes_are_403_for_members_and_401_for_strangers(start_server, http):
    async with open_scene(start_server, http, auth={"admins": ["root"]}) as scene:
        stranger = Member(http, scene.server.admin_url, "x")
        routes = [
            ("GET", "/api/admin/users", None),
            ("PATCH", f"/api/admin/users/{scene.bob.user_id}", {"is_admin": True}),
            ("PATCH", f"/api/admin/users/{scene.alice.user_id}", {"disabled": True}),
            ("GET", "/api/admin/pool", None),
            ("POST", f"/api/admin/keys/{scene.key_id}/approve", None),
        ]
        for method, path, body in routes:
            status, data = await scene.bob.call(method, path, body)
            assert expect_error(403, status, data)["code"] == "admin_required", path
            status, data = await stranger.call(method, path, body)
            assert expect_error(401, status, data)["code"] == "invalid_token", path
        status, data = await scene.bob.call("GET", "/api/usage?group_by=user")
        assert expect_error(400, status, data)["param"] == "group_by"
        # Asking for admin rights at registration is ignored.
        sneaky = Member(http, scene.server.admin_url, "sneaky")
        await sneaky.call(
            "POST", "/api/register", {"username": "sneaky", "password": PASSWORD, "is_admin": True}
        )
        sneaky = await _logged_in(sneaky)
        assert (await sneaky.call("GET", "/api/me"))[1]["is_admin"] is False
        assert (await scene.alice.call("GET", "/api/me"))[1]["is_admin"] is False


async def _logged_in(member: Member) -> Member:
    status, data = await member.call(
        "POST", "/api/login", {"username": member.username, "password": PASSWORD}
    )
    assert status == 200, data
    member.token = data["token"]
    return member


# -- input hygiene ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "body"),
    [
        ("/api/keys", "key", {"key": "sk-aaaaaaaaaaaa\r\nX-Injected: 1"}),
        ("/api/keys", "label", {"key": "sk-" + "c" * 30, "label": "mine\r\nX-Injected: 1"}),
        (
            "/api/keys",
            "base_url",
            {"key": "sk-" + "c" * 30, "base_url": "http://127.0.0.1:9/v1\r\nHost: evil"},
        ),
        ("/api/keys", "models", {"key": "sk-" + "c" * 30, "models": ["gpt\r\nX: 1"]}),
        ("/api/tokens", "name", {"name": "ci\r\nX-Injected: 1"}),
        ("/api/register", "username", {"username": "eve\r\nX-Injected: 1", "password": PASSWORD}),
    ],
    ids=["key", "label", "base_url", "models", "token_name", "username"],
)
async def test_crlf_in_a_field_is_400_naming_it(server, member, path, field, body):
    alice = await member("alice")
    status, data = await alice.call("POST", path, body)
    assert expect_error(400, status, data)["param"] == field
    assert (await alice.call("GET", "/api/keys"))[1] == {"keys": []}


async def test_73_byte_password_is_400_and_72_bytes_work_without_truncation(server, http):
    anon = Member(http, server.admin_url, "anon")
    for username, password in [("ascii", "p" * 73), ("utf8", "é" * 36 + "p")]:
        status, data = await anon.call(
            "POST", "/api/register", {"username": username, "password": password}
        )
        assert expect_error(400, status, data)["param"] == "password"
    carol = {"username": "carol", "password": "é" * 36}  # 72 bytes
    assert (await anon.call("POST", "/api/register", carol))[0] == 201
    assert (await anon.call("POST", "/api/login", carol))[0] == 200
    # bcrypt reads 72 bytes; anything longer that starts the same must not log in.
    status, data = await anon.call("POST", "/api/login", {**carol, "password": "é" * 36 + "x"})
    assert expect_error(401, status, data)["code"] == "invalid_credentials"


async def test_oversized_bodies_are_413_on_both_ports(start_server, http):
    async with open_scene(start_server, http, proxy={"max_body_mb": 1}) as scene:
        big = b'{"x": "' + b"a" * (2 * 1024 * 1024) + b'"}'

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to trust
            for _ in range(40):
                yield b"a" * 65536

        headers = {**scene.alice.auth, "Content-Type": "application/json"}
        urls = (scene.server.admin_url + "/api/keys", scene.server.proxy_url + "/chat/completions")
        # Its own session: a connection left with an unread upload would hold up shutdown.
        async with aiohttp.ClientSession() as uploads:
            for url in urls:
                for data in (io.BytesIO(big), chunked()):
                    async with uploads.post(url, data=data, headers=headers) as resp:
                        error = expect_error(413, resp.status, await resp.json())
                        assert error["code"] == "request_too_large"
        assert scene.up.requests == []


NESTED = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"model": "gpt-4o-mini", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
]


@pytest.mark.parametrize("raw", NESTED, ids=["arrays", "objects", "inside_a_request"])
async def test_deeply_nested_json_is_400_on_both_ports(scene: Scene, http, raw):
    async with http.post(
        scene.server.admin_url + "/api/tokens", data=raw, headers={**scene.alice.auth, **JSON_TYPE}
    ) as resp:
        assert expect_error(400, resp.status, await resp.json())["code"] == "invalid_json"
    status, body = await scene.proxy("POST", "/chat/completions", data=raw, headers=JSON_TYPE)
    assert expect_error(400, status, body)["code"] == "invalid_json"
    assert scene.up.requests == []


async def test_json_nested_just_under_the_parser_limit_is_never_a_500(scene: Scene, log_lines):
    # Python's json parser and encoder share the interpreter's recursion budget with the
    # handler's own stack, so a depth the parser only just accepts may not survive being
    # encoded again further down (where the proxy asks a stream to report usage).
    deepest = await _deepest_parsed_nesting(scene)
    for depth in range(deepest - 20, deepest + 1):
        raw = _nested_chat(depth)
        status, data = await scene.proxy("POST", "/chat/completions", data=raw, headers=JSON_TYPE)
        assert status != 500, (depth, data)
    assert "unhandled error" not in log_lines.getvalue()


async def _deepest_parsed_nesting(scene: Scene) -> int:
    """Bisect for the deepest nesting the proxy parses; no model, so nothing goes upstream."""
    parsed, refused = 1, 5000
    while refused - parsed > 1:
        depth = (parsed + refused) // 2
        raw = _nested_chat(depth, model="-")
        status, _ = await scene.proxy("POST", "/chat/completions", data=raw, headers=JSON_TYPE)
        if status == 400:
            refused = depth
        else:
            parsed = depth
    return parsed


def _nested_chat(depth: int, model: str = MODEL) -> bytes:
    head = json.dumps({**CHAT, "model": model, "stream": True})[:-1]
    return f'{head}, "x": {"[" * depth}{"]" * depth}}}'.encode()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "\xff\xfe"}',
        b'\xef\xbb\xbf{"model": "x"}',
        b'{"model": ',
        b'{"a": 1}}',
        b"{'model': 'x'}",
        b'{"model": NaN',
    ],
    ids=["invalid_utf8", "bom", "truncated", "trailing", "single_quotes", "nan_truncated"],
)
async def test_invalid_utf8_or_malformed_json_is_400_on_both_ports(scene: Scene, http, raw):
    async with http.post(
        scene.server.admin_url + "/api/tokens", data=raw, headers={**scene.alice.auth, **JSON_TYPE}
    ) as resp:
        expect_error(400, resp.status, await resp.json())
    status, body = await scene.proxy("POST", "/chat/completions", data=raw, headers=JSON_TYPE)
    expect_error(400, status, body)
    assert scene.up.requests == []


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Big": "a" * 100_000},
        {f"X-Many-{i}": "b" * 50 for i in range(2000)},
        {"Authorization": "Bearer " + "c" * 9000},
        {"Cookie": "d=" + "e" * 70_000},
    ],
    ids=["one_huge", "thousands", "huge_authorization", "huge_cookie"],
)
async def test_huge_headers_are_4xx_not_5xx_on_both_ports(scene: Scene, headers):
    for port, path in ((scene.proxy_port, "/v1/models"), (scene.server.admin_port, "/api/me")):
        status, _ = await raw_http(port, path, {**scene.alice.auth, **headers})
        assert 400 <= status < 500, (port, status)
    status, _ = await raw_http(scene.proxy_port, "/v1/models?" + "q" * 100_000, scene.alice.auth)
    assert 400 <= status < 500
    assert (await scene.proxy("GET", "/models"))[0] == 200  # still serving


async def test_request_smuggling_framing_is_refused_on_both_ports(scene: Scene):
    smuggled = b"0\r\n\r\nGET /api/keys HTTP/1.1\r\nHost: x\r\n\r\n"
    for port in (scene.proxy_port, scene.server.admin_port):
        status, _ = await raw_http(
            port,
            "/v1/chat/completions" if port == scene.proxy_port else "/api/tokens",
            {**scene.alice.auth, "Transfer-Encoding": "chunked", "Content-Length": "5"},
            smuggled,
            method="POST",
        )
        assert status == 400
    assert scene.up.requests == []


# -- login throttling and enumeration ---------------------------------------------------------


async def test_registrations_from_one_address_are_limited(start_server, http):
    async with start_server(auth={"registrations_per_address": 3, "admins": ["root"]}) as server:
        root = await Member(http, server.admin_url, "root").join()  # counts: a sign-up
        answers = []
        for i in range(4):
            status, data = await Member(http, server.admin_url, f"user{i}").call(
                "POST", "/api/register", {"username": f"user{i}", "password": PASSWORD}
            )
            answers.append(status)
        assert answers == [201, 201, 429, 429]
        assert data["error"]["code"] == "too_many_registrations"
        # An admin creating accounts is not signing up.
        status, _ = await root.call(
            "POST", "/api/register", {"username": "made-by-root", "password": PASSWORD}
        )
        assert status == 201


async def test_password_checks_run_one_at_a_time_and_overflow_is_503(
    start_server, http, monkeypatch
):
    running = peak = 0
    real_checkpw = bcrypt.checkpw

    def watched_checkpw(password: bytes, hashed: bytes) -> bool:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            time.sleep(0.1)  # long enough for threads to overlap if they could
            return real_checkpw(password, hashed)
        finally:
            running -= 1

    async with start_server() as server:
        await Member(http, server.admin_url, "alice").join()
        monkeypatch.setattr(bcrypt, "checkpw", watched_checkpw)
        monkeypatch.setattr(accounts_module, "PASSWORD_QUEUE", 4)
        body = {"username": "alice", "password": PASSWORD}

        async def login() -> int:
            async with http.post(server.admin_url + "/api/login", json=body) as resp:
                return resp.status

        statuses = await asyncio.gather(*(login() for _ in range(8)))
    assert peak == 1
    assert statuses.count(200) >= 4 and set(statuses) <= {200, 503}
    assert 503 in statuses  # more than the queue holds were waiting at once


@needs_loopback_aliases
async def test_twenty_wrong_passwords_for_one_account_get_429_from_any_address(server, member):
    await member("alice")
    answers = []
    for i in range(20):  # a different source address each time: only the account counts
        status, data, headers = await login_from(
            server.admin_url, f"127.0.0.{i + 2}", "alice", "wrong-password"
        )
        answers.append(status)
    assert answers == [401] * 10 + [429] * 10
    assert expect_error(429, status, data)["code"] == "too_many_logins"
    assert 1 <= int(headers["Retry-After"]) <= 301
    # While throttled even the right password is refused.
    status, data, headers = await login_from(server.admin_url, "127.0.0.99", "alice", PASSWORD)
    assert status == 429 and "Retry-After" in headers


@needs_loopback_aliases
async def test_twenty_wrong_passwords_from_one_address_get_429_for_every_account(server, member):
    await member("alice")
    answers = []
    for i in range(20):  # other accounts, one address; spoofed forwarding headers change nothing
        spoof = {"X-Forwarded-For": f"10.0.0.{i}", "X-Real-IP": f"10.0.1.{i}"}
        status, _, _ = await login_from(
            server.admin_url, "127.0.0.1", f"user{i}", "wrong-pass", headers=spoof
        )
        answers.append(status)
    assert answers == [401] * 10 + [429] * 10
    status, _, headers = await login_from(server.admin_url, "127.0.0.1", "alice", PASSWORD)
    assert status == 429 and int(headers["Retry-After"]) >= 1
    status, _, _ = await login_from(server.admin_url, "127.0.0.50", "alice", PASSWORD)
    assert status == 200


@needs_loopback_aliases
async def test_parallel_wrong_passwords_cannot_outrun_the_throttle(server, member):
    await member("alice")
    results = await asyncio.gather(
        *(
            login_from(server.admin_url, f"127.0.0.{i + 2}", "alice", "wrong-password")
            for i in range(30)
        )
    )
    statuses = [status for status, _, _ in results]
    assert statuses.count(401) <= 10 and statuses.count(429) >= 20


async def test_unknown_user_and_wrong_password_answer_alike_in_status_body_and_time(
    start_server, http
):
    auth = {"bcrypt_rounds": 8, "login_max_failures": 1000}
    async with start_server(auth=auth) as server:
        await Member(http, server.admin_url, "alice").join()
        anon = Member(http, server.admin_url, "anon")
        cases = {"wrong": "alice", "unknown": "nobody-here", "sql": SQL_INJECTIONS[0]}
        times: dict[str, list[float]] = {name: [] for name in cases}
        answers: dict[str, set[str]] = {name: set() for name in cases}
        for _ in range(9):
            for name, username in cases.items():
                started = time.perf_counter()
                status, data = await anon.call(
                    "POST", "/api/login", {"username": username, "password": "not-it-at-all"}
                )
                times[name].append(time.perf_counter() - started)
                answers[name].add(f"{status} {json.dumps(data, sort_keys=True)}")
    assert len(set.union(*answers.values())) == 1
    medians = {name: statistics.median(values) for name, values in times.items()}
    assert max(medians.values()) < 3 * min(medians.values()), medians


# -- secrets ----------------------------------------------------------------------------------

ODD_KEY = "odd-shaped-KEY-7Qx2Lr9vWm4Tz8Np"  # matches none of the redactor's key shapes


async def test_key_echoed_by_a_rejecting_upstream_never_reaches_caller_listing_or_log(
    start_server, http, log_lines
):
    async with open_scene(start_server, http, key=ODD_KEY, auth={"admins": ["root"]}) as scene:
        root = await Member(http, scene.server.admin_url, "root").join()
        scene.up.revoke(ODD_KEY)  # answers 401 "Incorrect API key provided: <key>."
        status, body = await scene.proxy("POST", "/chat/completions", json=CHAT)
        expect_error(502, status, body)
        listed = (await scene.alice.call("GET", "/api/keys"))[1]["keys"][0]
        status, checked = await scene.alice.call("POST", f"/api/keys/{scene.key_id}/check")
        pool = (await root.call("GET", "/api/admin/pool"))[1]
    assert scene.up.requests[0].key == ODD_KEY  # the upstream did echo it
    assert listed["status"] == "invalid" and "[redacted]" in listed["last_error"]
    for text in (
        json.dumps(body),
        json.dumps(listed),
        json.dumps(checked),
        json.dumps(pool),
        log_lines.getvalue(),
    ):
        assert ODD_KEY not in text


async def test_key_echoed_in_a_relayed_400_is_redacted(start_server, http, log_lines):
    async with open_scene(start_server, http, key=ODD_KEY) as scene:
        scene.up.fail(ODD_KEY, "400", message=f"Bad request for key {ODD_KEY} (temperature)")
        async with scene.sdk(scene.alice.token) as client:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        text = caught.value.response.text
        listed = (await scene.alice.call("GET", "/api/keys"))[1]
    assert "Bad request for key [redacted]" in text and ODD_KEY not in text
    assert ODD_KEY not in json.dumps(listed) and ODD_KEY not in log_lines.getvalue()


async def test_callers_token_never_reaches_the_upstream_in_a_header_or_subprotocol(
    scene: Scene, http
):
    token = scene.alice.token
    headers = {"api-key": token, "x-api-key": token, "Proxy-Authorization": f"Bearer {token}"}
    assert (await scene.proxy("POST", "/chat/completions", json=CHAT, headers=headers))[0] == 200
    # Browsers cannot set headers on a WebSocket, so the Realtime API takes the key as a
    # subprotocol; the caller's pool token must not be handed on that way either.
    url = scene.server.proxy_url.replace("http", "ws") + f"/realtime?model={MODEL}"
    protocols = ("realtime", f"openai-insecure-api-key.{token}")
    async with http.ws_connect(url, headers=scene.alice.auth, protocols=protocols) as ws:
        await ws.send_str("{}")
        assert (await ws.receive_json(timeout=5))["type"] == "echo"
    assert len(scene.up.requests) == 2
    for request in scene.up.requests:
        assert request.key == scene.key
        seen = json.dumps(list(request.headers.items())) + request.body.decode()
        assert token not in seen and token not in request.raw_path + request.query_string


async def test_no_response_carries_a_password_hash_token_hash_or_the_master_key(
    start_server, http, tmp_path
):
    async with open_scene(start_server, http, auth={"admins": ["root"]}) as scene:
        root = await Member(http, scene.server.admin_url, "root").join()
        await scene.alice.call("POST", "/api/tokens", {"name": "ci"})
        await scene.proxy("POST", "/chat/completions", json=CHAT)
        admin, proxy = scene.server.admin_url, scene.server.proxy_url
        seen: list[bytes] = []
        gets = [
            "/api/me",
            "/api/keys",
            "/api/tokens",
            "/api/usage",
            "/api/usage?all=true",
            "/api/usage?group_by=user&all=true",
            "/api/admin/users",
            "/api/admin/pool",
            "/api/info",
            "/healthz",
            "/readyz",
            "/metrics",
        ]
        for who in (scene.alice, root):
            for path in gets:
                async with http.get(admin + path, headers=who.auth) as resp:
                    seen.append(str(resp.headers).encode() + await resp.read())
            async with http.get(proxy + "/models", headers=who.auth) as resp:
                seen.append(str(resp.headers).encode() + await resp.read())
        db = tmp_path / "apipool.db"
        hashes = [row[0] for row in read_db(db, "SELECT password_hash FROM users")]
        token_hashes = [row[0] for row in read_db(db, "SELECT token_hash FROM tokens")]
    master_text = (tmp_path / "master.key").read_text().strip()
    master = base64.urlsafe_b64decode(master_text)
    forbidden = [h.encode() for h in hashes] + [master_text.encode(), master, master.hex().encode()]
    for digest in token_hashes:
        forbidden += [
            digest,
            digest.hex().encode(),
            base64.b64encode(digest),
            base64.urlsafe_b64encode(digest).rstrip(b"="),
        ]
    everything = b"\n".join(seen)
    assert b"$2b$" not in everything and len(hashes) == 3 and len(token_hashes) >= 4
    for secret in forbidden:
        assert secret not in everything


# -- the canary -------------------------------------------------------------------------------

CANARY_KEY = "canaryKEY" + "4b9e1f7a2c6d8e0f3a5b7c9d"
CANARY_PASSWORD = "canaryPW-5e8a3c1f9b"


class Recorder:
    """Talks to a ServerProcess and keeps every answer, headers and body, as text."""

    def __init__(self, http: aiohttp.ClientSession, proc: ServerProcess) -> None:
        self.http = http
        self.proc = proc
        self.answers: list[str] = []

    async def admin(self, method: str, path: str, body: Any = None, token: str = "") -> Any:
        return await self._call(method, self.proc.admin_url + path, body, token)

    async def proxy(self, body: Any, token: str) -> Any:
        return await self._call("POST", self.proc.proxy_url + "/chat/completions", body, token)

    async def _call(self, method: str, url: str, body: Any, token: str) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, url, json=body, headers=headers) as resp:
            text = await resp.text()
            self.answers.append(f"{resp.status} {resp.headers} {text}")
            return json.loads(text) if resp.content_type == "application/json" else None


async def _canary_scenario(calls: Recorder, up: FakeUpstream) -> list[str]:
    """Register, log in, contribute, proxy (succeeding and failing); return the tokens."""
    creds = {"username": "canary", "password": CANARY_PASSWORD}
    await calls.admin("POST", "/api/register", creds)
    await calls.admin("POST", "/api/login", {**creds, "password": CANARY_PASSWORD + "x"})
    await calls.admin("POST", "/api/login", {"username": "nobody", "password": CANARY_PASSWORD})
    session = (await calls.admin("POST", "/api/login", creds))["token"]
    api = (await calls.admin("POST", "/api/tokens", {"name": "ci"}, session))["token"]

    key = {"key": CANARY_KEY, "base_url": up.base_url}
    key_id = (await calls.admin("POST", "/api/keys", key, session))["id"]
    await calls.admin("POST", "/api/keys", key, session)  # a duplicate: 409
    await calls.admin("POST", "/api/keys", {**key, "base_url": "file:///x"}, session)

    for token in (session, api):
        await calls.proxy(CHAT, token)
        await calls.proxy({**CHAT, "stream": True}, token)
    up.fail(CANARY_KEY, "400", times=1, message=f"no such key {CANARY_KEY}")
    await calls.proxy(CHAT, api)
    up.fail(CANARY_KEY, "500", times=1)
    await calls.proxy(CHAT, api)
    up.revoke(CANARY_KEY)
    await calls.proxy(CHAT, api)

    await calls.admin("POST", f"/api/keys/{key_id}/check", None, session)
    await calls.admin("GET", "/api/keys", None, session)
    await calls.admin("GET", "/api/usage", None, session)
    await calls.admin("GET", "/no-such-page", None, session)  # logged at DEBUG
    return [session, api]


async def test_canary_key_password_and_tokens_appear_in_no_log_response_or_database_file(
    tmp_path, http
):
    proc = ServerProcess(
        tmp_path, "upstream: {allow_private_networks: true}\nlog: {level: DEBUG}\n"
    )
    calls = Recorder(http, proc)
    async with FakeUpstream() as up:
        await asyncio.to_thread(proc.start)
        try:
            tokens = await _canary_scenario(calls, up)
            live_files = _database_bytes(tmp_path)
        finally:
            await asyncio.to_thread(proc.stop)
    assert any(r.key == CANARY_KEY for r in up.requests)  # the canary really was used
    log = proc.log()
    assert " DEBUG apipool_proxy" in log and "canary" in log  # verbose, and names the user

    # Tokens are handed out once, by login and token creation; never logged or stored.
    for canary in [CANARY_KEY, CANARY_PASSWORD, *tokens]:
        assert canary not in log, canary[:6]
        for blob in (live_files, _database_bytes(tmp_path)):
            assert canary.encode() not in blob, canary[:6]
    for canary in (CANARY_KEY, CANARY_PASSWORD):
        assert canary not in "\n".join(calls.answers), canary[:6]

    # Nor what is stored in their place: DEBUG logging must not dump database rows.
    db = tmp_path / "apipool.db"
    assert "$2b$" not in log
    for (digest,) in read_db(db, "SELECT token_hash FROM tokens"):
        assert digest.hex() not in log and repr(digest)[2:-1] not in log
    for secret, fingerprint in read_db(db, "SELECT secret, fingerprint FROM upstream_keys"):
        assert repr(secret)[2:40] not in log and repr(fingerprint)[2:40] not in log


def _database_bytes(tmp_path: Path) -> bytes:
    """The raw bytes of the database, its WAL and shared memory file, freed pages and all."""
    parts = [tmp_path / name for name in ("apipool.db", "apipool.db-wal", "apipool.db-shm")]
    return b"".join(p.read_bytes() for p in parts if p.exists())


def test_throttle_memory_is_bounded_and_forgets_expired_subjects_first(monkeypatch):
    monkeypatch.setattr(accounts_module, "MAX_THROTTLE_SUBJECTS", 100)
    throttle = accounts_module.AttemptThrottle(max_failures=3, window=60)
    for i in range(60):
        throttle.fail([f"user:old{i}"], now=0.0)  # outside the window by now=100
    for i in range(40):
        throttle.fail([f"user:live{i}"], now=100.0)
    throttle.fail(["addr:new"], now=100.0)
    assert len(throttle) == 41  # the 60 expired went, every live one stayed
    assert throttle.retry_after(["user:live0"], 100.0) is None
    for _ in range(2):
        throttle.fail(["user:live0"], now=100.0)
    assert throttle.retry_after(["user:live0"], 100.0) is not None  # its count survived
    # A flood of fresh subjects (attempts answered 503 never reach a check) stays bounded.
    for i in range(1000):
        throttle.fail([f"user:junk{i}"], now=100.0)
    assert len(throttle) <= 100

"""Browsers calling the proxy port from other origins: preflights and readable answers."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from apipool_proxy.config import ConfigError, settings_from_dict

from .scenario import MODEL, bare_upstream, chat_completion, scenario, secret

PAGE = "https://chat.example.com"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def preflight_headers(origin: str = PAGE) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    }


async def test_preflight_is_answered_without_a_token(start_server, http: aiohttp.ClientSession):
    async with scenario(start_server, http) as s:
        url = s.server.proxy_url + "/chat/completions"
        async with http.options(url, headers=preflight_headers()) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
            allowed = response.headers["Access-Control-Allow-Headers"].lower()
            assert {"authorization", "content-type", "x-stainless-os"} <= {
                name.strip() for name in allowed.split(",")
            }
            assert int(response.headers["Access-Control-Max-Age"]) > 0
            assert "x-request-id" in response.headers
        assert s.up.requests == []  # nothing went upstream


async def test_answers_to_any_origin_are_readable(start_server, http: aiohttp.ClientSession):
    async with scenario(start_server, http) as s:
        alice = await s.member("alice")
        await alice.add_key(secret("cors"), s.up.base_url)
        url = s.server.proxy_url + "/chat/completions"
        headers = {**alice.auth, "Origin": PAGE}
        async with http.post(url, json=CHAT, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert response.headers["Access-Control-Expose-Headers"] == "*"
        # A stream gets them before its first byte; an error gets them so the page can read it.
        streamed = {**CHAT, "stream": True}
        async with http.post(url, json=streamed, headers=headers) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert b"[DONE]" in await response.read()
        async with http.post(url, json=CHAT, headers={"Origin": PAGE}) as response:
            assert response.status == 401
            assert response.headers["Access-Control-Allow-Origin"] == "*"
        # Without an Origin (not a browser) nothing is added.
        async with http.post(url, json=CHAT, headers=alice.auth) as response:
            assert "Access-Control-Allow-Origin" not in response.headers


async def test_listed_origins_only(start_server, http: aiohttp.ClientSession):
    other = "https://evil.example.net"
    async with scenario(start_server, http, proxy={"cors_origins": [PAGE]}) as s:
        alice = await s.member("alice")
        await alice.add_key(secret("cors"), s.up.base_url)
        url = s.server.proxy_url + "/chat/completions"
        async with http.options(url, headers=preflight_headers(PAGE.upper())) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == PAGE.upper()
            assert response.headers["Vary"] == "Origin"
        async with http.options(url, headers=preflight_headers(other)) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
            error = (await response.json())["error"]
            assert error["code"] == "origin_not_allowed"
        async with http.post(url, json=CHAT, headers={**alice.auth, "Origin": other}) as response:
            # Served (a browser would still keep it from the page), but not marked readable.
            assert response.status == 200
            assert "Access-Control-Allow-Origin" not in response.headers
        async with http.post(url, json=CHAT, headers={**alice.auth, "Origin": PAGE}) as response:
            assert response.headers["Access-Control-Allow-Origin"] == PAGE
            assert response.headers["Vary"] == "Origin"


async def test_no_origins_turns_cors_off(start_server, http: aiohttp.ClientSession):
    async def chat(request: web.Request) -> web.Response:
        # An upstream's own CORS headers never speak for the proxy.
        answer = chat_completion("hi", 1, 1)
        return web.json_response(answer, headers={"Access-Control-Allow-Origin": "*"})

    async with (
        bare_upstream(chat) as base_url,
        scenario(start_server, http, proxy={"cors_origins": []}) as s,
    ):
        alice = await s.member("alice")
        await alice.add_key(secret("cors"), base_url, models=[MODEL])
        url = s.server.proxy_url + "/chat/completions"
        async with http.options(url, headers=preflight_headers()) as response:
            assert response.status == 401  # a preflight is then just an unauthenticated call
            assert "Access-Control-Allow-Origin" not in response.headers
        async with http.post(url, json=CHAT, headers={**alice.auth, "Origin": PAGE}) as response:
            assert response.status == 200
            assert "Access-Control-Allow-Origin" not in response.headers


async def test_malformed_preflight_headers_are_refused(start_server, http):
    async with scenario(start_server, http) as s:
        url = s.server.proxy_url + "/chat/completions"
        headers = {**preflight_headers(), "Access-Control-Request-Headers": "authorization, a b"}
        async with http.options(url, headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "invalid_preflight"


@pytest.mark.parametrize(
    "origins",
    [["https://chat.example.com/app"], ["chat.example.com"], ["*", "ftp://x"], [""]],
)
def test_bad_origins_are_a_config_error(tmp_path, origins: list[Any]):
    with pytest.raises(ConfigError, match="cors_origins"):
        settings_from_dict({"proxy": {"cors_origins": origins}})

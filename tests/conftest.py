"""Fixtures: a real server built by the production factory, on loopback, per test."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from apipool_proxy.server import RunningServer, serve

from .loopback import TunnelProxy, write_self_signed
from .support import Member, make_settings


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def start_server(tmp_path: Path) -> Callable[..., AbstractAsyncContextManager[RunningServer]]:
    """``async with start_server(pool={...}) as server:`` runs both ports in this process."""

    def start(**sections: dict[str, Any]) -> AbstractAsyncContextManager[RunningServer]:
        return serve(make_settings(tmp_path, **sections), environ={})

    return start


@pytest.fixture
async def server(start_server: Callable[..., Any]) -> AsyncIterator[RunningServer]:
    async with start_server() as running:
        yield running


@pytest.fixture
def member(http: aiohttp.ClientSession, server: RunningServer) -> Callable[[str], Any]:
    async def make(username: str) -> Member:
        return await Member(http, server.admin_url, username).join()

    return make


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    return write_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    return context


@pytest.fixture
async def tunnel_proxy() -> AsyncIterator[Callable[..., Any]]:
    """``await tunnel_proxy(credentials=...)`` starts a CONNECT-only forward proxy."""
    proxies: list[TunnelProxy] = []

    async def start(**fields: Any) -> TunnelProxy:
        proxies.append(await TunnelProxy(**fields).start())
        return proxies[-1]

    yield start
    for proxy in proxies:
        await proxy.stop()

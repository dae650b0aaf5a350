"""Fixtures: a real server built by the production factory, on loopback, per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from apipool_proxy.server import RunningServer, serve

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

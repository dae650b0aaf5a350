"""Helpers shared by the tests: settings in a temp dir, servers in-process and as
subprocesses, and members who register, log in and contribute keys."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from apipool_proxy.config import Settings, settings_from_dict

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct-horse-battery"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for one test: its own database and master key, free ports, loopback
    upstreams allowed (the fake upstream runs on 127.0.0.1)."""
    raw: dict[str, Any] = {
        "proxy": {"port": 0},
        "admin": {"port": 0},
        "database": {"path": str(tmp_path / "apipool.db")},
        "security": {"master_key_file": str(tmp_path / "master.key")},
        "upstream": {"allow_private_networks": True, "connect_timeout": 2, "read_timeout": 5},
        "auth": {"bcrypt_rounds": 4},
        "log": {"level": "DEBUG"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return settings_from_dict(raw)


class Member:
    """One pool member talking to the admin port over HTTP."""

    def __init__(self, http: aiohttp.ClientSession, admin_url: str, username: str) -> None:
        self.http = http
        self.admin_url = admin_url
        self.username = username
        self.token = ""
        self.user_id = 0

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        async with self.http.request(
            method, self.admin_url + path, json=body, headers=self.auth, **kw
        ) as resp:
            text = await resp.text()
            data = json.loads(text) if text else None
            return resp.status, data

    async def join(self) -> Member:
        status, data = await self.call(
            "POST", "/api/register", {"username": self.username, "password": PASSWORD}
        )
        assert status == 201, data
        self.user_id = data["user_id"]
        status, data = await self.call(
            "POST", "/api/login", {"username": self.username, "password": PASSWORD}
        )
        assert status == 200, data
        self.token = data["token"]
        return self

    async def add_key(self, key: str, base_url: str, **fields: Any) -> dict[str, Any]:
        status, data = await self.call(
            "POST", "/api/keys", {"key": key, "base_url": base_url, **fields}
        )
        assert status == 201, data
        return data


class ServerProcess:
    """``apipool serve`` in a subprocess, for CLI, restart and signal tests."""

    def __init__(self, tmp_path: Path, extra_config: str = "", env: dict[str, str] | None = None):
        self.tmp_path = tmp_path
        self.proxy_port = free_port()
        self.admin_port = free_port()
        self.config = tmp_path / "config.yaml"
        self.config.write_text(
            f"proxy: {{port: {self.proxy_port}}}\n"
            f"admin: {{port: {self.admin_port}}}\n"
            f"database: {{path: {tmp_path / 'apipool.db'}}}\n"
            f"security: {{master_key_file: {tmp_path / 'master.key'}}}\n"
            "auth: {bcrypt_rounds: 4}\n" + extra_config
        )
        self.log_path = tmp_path / "server.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/v1"

    def start(self) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "apipool_proxy", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                cwd=self.tmp_path,
                env=self.env,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited early:\n" + self.log_path.read_text())
            try:
                with urllib.request.urlopen(self.admin_url + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError("server did not start:\n" + self.log_path.read_text())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.stop(signal.SIGKILL)


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apipool_proxy", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )

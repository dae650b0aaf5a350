"""Start apipool-proxy the way users run it and give it a pool of upstream keys to serve.

Each benchmark section gets a fresh instance with its own database, so memory figures start
from a clean process and one section's traffic does not colour the next.
"""

import http.client
import json
import secrets
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_procs import Cores, Processes, free_port

DEFAULT_COMMAND = "{python} -m apipool_proxy serve --config {config}"
BENCH_ACCOUNT = {"username": "bench", "password": "bench-password-1"}
KEY_COUNT = 10
MODEL = "gpt-4o-mini"


class ApipoolUnavailable(Exception):
    """apipool-proxy could not be started or provisioned; the message says why."""


@dataclass
class Apipool:
    process: subprocess.Popen
    proxy_port: int
    admin_port: int
    token: str

    @property
    def pgid(self) -> int:
        return self.process.pid


def local_request(port: int, method: str, path: str, body=None, token: str = "", timeout=10.0):
    """One HTTP request to a loopback port; returns (status, parsed JSON or raw text)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    payload = None if body is None else json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
    finally:
        connection.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def write_config(directory: Path, proxy_port: int, admin_port: int) -> Path:
    # JSON strings are valid YAML scalars, so quoting paths this way needs no YAML library.
    config = directory / "config.yaml"
    config.write_text(
        f"proxy: {{host: 127.0.0.1, port: {proxy_port}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n"
        f"database: {{path: {json.dumps(str(directory / 'apipool.db'))}}}\n"
        f"security: {{master_key_file: {json.dumps(str(directory / 'master.key'))}}}\n"
        "upstream: {allow_private_networks: true}\n"
    )
    return config


def build_command(template: str, config: Path) -> list[str]:
    return [part.format(python=sys.executable, config=config) for part in shlex.split(template)]


def start(
    procs: Processes,
    cores: Cores,
    workdir: Path,
    name: str,
    upstream_base: str,
    template: str = DEFAULT_COMMAND,
) -> Apipool:
    """Start an instance, wait for /healthz, create the account and its keys."""
    workdir.mkdir(parents=True, exist_ok=True)
    proxy_port, admin_port = free_port(), free_port()
    config = write_config(workdir, proxy_port, admin_port)
    process = procs.start(name, cores.pin(build_command(template, config), "proxy"))

    try:
        wait_healthy(process, admin_port)
        token = provision(admin_port, upstream_base)
    except ApipoolUnavailable as exc:
        procs.stop(process)
        tail = procs.log_tail(name)
        raise ApipoolUnavailable(f"{exc}\n--- last lines of its output ---\n{tail}") from None
    return Apipool(process, proxy_port, admin_port, token)


def wait_healthy(process, admin_port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ApipoolUnavailable(f"apipool-proxy exited with code {process.returncode}")
        try:
            status, _ = local_request(admin_port, "GET", "/healthz", timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise ApipoolUnavailable(f"GET /healthz on the admin port not 200 after {timeout:.0f} s")


def provision(admin_port: int, upstream_base: str) -> str:
    """Register the bench account, log in, and pool KEY_COUNT keys at the upstream stand-in."""
    status, answer = local_request(admin_port, "POST", "/api/register", BENCH_ACCOUNT)
    expect(status in (200, 201), "POST /api/register", status, answer)
    status, answer = local_request(admin_port, "POST", "/api/login", BENCH_ACCOUNT)
    token = answer.get("token") if isinstance(answer, dict) else None
    expect(status == 200 and bool(token), "POST /api/login", status, answer)

    for index in range(KEY_COUNT):
        key = {
            "key": f"sk-bench-{index}-{secrets.token_hex(12)}",
            "base_url": upstream_base,
            "models": [MODEL],
        }
        status, answer = local_request(admin_port, "POST", "/api/keys", key, token=token)
        expect(status == 201, "POST /api/keys", status, answer)
    return token


def expect(condition: bool, step: str, status: int, answer) -> None:
    if not condition:
        raise ApipoolUnavailable(f"{step} answered {status}: {str(answer)[:300]}")

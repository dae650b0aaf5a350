"""Starting, stopping and restarting ``apipool serve``: config errors, persistence across
restarts and kill -9, the master key."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import shutil
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from apipool_proxy.server import serve

from .support import PASSWORD, ServerProcess, free_port, make_settings, run_cli


def call(url: str, method: str = "GET", body: Any = None, token: str | None = None):
    request = urllib.request.Request(url, method=method)
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def serve_with(tmp_path: Path, config: str, env: dict[str, str] | None = None):
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "apipool_proxy", "serve", "--config", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


@pytest.mark.parametrize(
    ("config", "env", "named"),
    [
        ("proxy: {port: 99999}\n", {}, "proxy.port"),
        ("proxy: {port: eighty}\n", {}, "proxy.port"),
        ("admin: {hots: 127.0.0.1}\n", {}, "admin.hots"),
        ("nonsense: {a: 1}\n", {}, "nonsense"),
        ("pool: {strategy: fastest}\n", {}, "pool.strategy"),
        ("upstream: {max_attempts: 0}\n", {}, "upstream.max_attempts"),
        ("auth: {open_registration: maybe}\n", {}, "auth.open_registration"),
        ("", {"APIPOOL_ADMIN_PORT": "-1"}, "admin.port"),
        ("", {"APIPOOL_LOG_FORMAT": "xml"}, "log.format"),
        ("proxy: [1, 2\n", {}, "not valid YAML"),
    ],
)
def test_bad_config_stops_startup_with_one_clear_line(tmp_path, config, env, named):
    result = serve_with(tmp_path, config, env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0] and "Traceback" not in result.stderr


def test_environment_overrides_the_file(tmp_path):
    port = free_port()
    server = ServerProcess(tmp_path, env={"APIPOOL_ADMIN_PORT": str(port)})
    server.admin_port = port
    with server:
        assert call(server.admin_url + "/healthz")[0] == 200


def test_everything_survives_kill_9_and_restart(tmp_path):
    server = ServerProcess(tmp_path, "upstream: {allow_private_networks: true}\n").start()
    try:
        admin = server.admin_url
        assert (
            call(admin + "/api/register", "POST", {"username": "alice", "password": PASSWORD})[0]
            == 201
        )
        creds = {"username": "alice", "password": PASSWORD}
        token = call(admin + "/api/login", "POST", creds)[1]["token"]
        doomed = call(admin + "/api/login", "POST", creds)[1]["token"]
        status, key = call(
            admin + "/api/keys",
            "POST",
            {"key": "sk-persisted-key-0001", "base_url": "http://127.0.0.1:9/v1", "models": ["m"]},
            token,
        )
        assert status == 201
        assert call(admin + "/api/logout", "POST", {}, doomed)[0] == 200
        # Rejected on both ports at once.
        assert call(admin + "/api/me", token=doomed)[0] == 401
        assert call(server.proxy_url + "/models", token=doomed)[0] == 401
        # kill -9 right after the writes were acknowledged: nothing may be lost.
        server.stop(signal.SIGKILL)
        server.start()
        assert call(admin + "/api/me", token=token)[1]["username"] == "alice"
        assert call(admin + "/api/login", "POST", creds)[0] == 200
        keys = call(admin + "/api/keys", token=token)[1]["keys"]
        assert [k["id"] for k in keys] == [key["id"]]
        assert call(admin + "/api/me", token=doomed)[0] == 401
        assert call(server.proxy_url + "/models", token=doomed)[0] == 401
        assert call(server.proxy_url + "/models", token=token)[1]["data"][0]["id"] == "m"
    finally:
        server.stop(signal.SIGKILL)
    assert "sk-persisted-key-0001" not in server.log()


def test_sigterm_shuts_down_cleanly(tmp_path):
    server = ServerProcess(tmp_path).start()
    assert server.stop(signal.SIGTERM) == 0
    assert "stopped" in server.log()
    assert "Traceback" not in server.log()


def test_open_file_limit_is_raised_to_the_hard_limit(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard open-file limit above 256, not {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the server
    try:
        server = ServerProcess(tmp_path).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert server.proc is not None
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)]
    finally:
        server.stop()
    assert f"open-file limit raised from 256 to {hard}" in server.log()


def test_master_key_file_is_private_and_required(tmp_path):
    server = ServerProcess(tmp_path, "upstream: {allow_private_networks: true}\n").start()
    key_file = tmp_path / "master.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    admin = server.admin_url
    call(admin + "/api/register", "POST", {"username": "alice", "password": PASSWORD})
    token = call(admin + "/api/login", "POST", {"username": "alice", "password": PASSWORD})[1]
    call(
        admin + "/api/keys",
        "POST",
        {"key": "sk-needs-the-master-key", "models": ["m"], "base_url": "http://127.0.0.1:9/v1"},
        token["token"],
    )
    server.stop()
    # A different master key cannot decrypt the stored keys: refuse to start, never re-key.
    key_file.write_text("A" * 43 + "=\n")
    result = run_cli(["serve", "--config", str(server.config)], cwd=tmp_path)
    assert result.returncode == 1
    assert "master key" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _server_with_keys(tmp_path: Path, owners: int = 2) -> ServerProcess:
    """A stopped server whose database holds one upstream key per owner."""
    server = ServerProcess(tmp_path, "upstream: {allow_private_networks: true}\n").start()
    for index in range(owners):
        creds = {"username": f"owner{index}", "password": PASSWORD}
        call(server.admin_url + "/api/register", "POST", creds)
        token = call(server.admin_url + "/api/login", "POST", creds)[1]["token"]
        key = {"key": f"sk-rotated-key-{index:04d}", "base_url": "http://127.0.0.1:9/v1"}
        assert call(server.admin_url + "/api/keys", "POST", key, token)[0] == 201
    server.stop()
    return server


def test_rotating_the_master_key_re_encrypts_every_stored_key(tmp_path):
    server = _server_with_keys(tmp_path)
    key_file = tmp_path / "master.key"
    old_key = key_file.read_text()

    result = run_cli(["rotate-master-key", "--config", str(server.config)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Re-encrypted 2 upstream key(s)" in result.stdout
    assert key_file.read_text() != old_key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not (tmp_path / "master.key.new").exists()
    assert old_key.strip() not in result.stdout + result.stderr  # keys are never printed

    # The server starts (it decrypts every key at startup) and still knows each key.
    server.start()
    try:
        creds = {"username": "owner1", "password": PASSWORD}
        token = call(server.admin_url + "/api/login", "POST", creds)[1]["token"]
        keys = call(server.admin_url + "/api/keys", token=token)[1]["keys"]
        assert [k["masked_key"] for k in keys] == ["sk-ro...0001"]
        again = {"key": "sk-rotated-key-0001", "base_url": "http://127.0.0.1:9/v1"}
        assert call(server.admin_url + "/api/keys", "POST", again, token)[0] == 409
        # Refused while the server runs: it holds the key in memory.
        result = run_cli(["rotate-master-key", "--config", str(server.config)], cwd=tmp_path)
        assert result.returncode == 1 and "stop the server first" in result.stderr
    finally:
        server.stop()
    # The old key opens nothing any more.
    env = {"APIPOOL_MASTER_KEY": old_key.strip()}
    result = run_cli(["serve", "--config", str(server.config)], cwd=tmp_path, env=env)
    assert result.returncode == 1 and "master key" in result.stderr


def test_an_interrupted_rotation_is_named_at_startup_and_finished_by_running_it_again(
    tmp_path,
):
    server = _server_with_keys(tmp_path, owners=1)
    key_file, pending = tmp_path / "master.key", tmp_path / "master.key.new"
    old_key = key_file.read_text()
    assert run_cli(["rotate-master-key", "--config", str(server.config)], cwd=tmp_path).stdout
    # The state a crash between the database commit and the key file's replacement leaves.
    pending.write_text(key_file.read_text())
    pending.chmod(0o600)
    key_file.write_text(old_key)

    result = run_cli(["serve", "--config", str(server.config)], cwd=tmp_path)
    assert result.returncode == 1 and "rotate-master-key" in result.stderr
    result = run_cli(["rotate-master-key", "--config", str(server.config)], cwd=tmp_path)
    assert result.returncode == 0 and "Finished an interrupted rotation" in result.stdout
    assert not pending.exists()
    server.start().stop()  # the database opens again

    # A new key written before a rotation that never reached the database is dropped.
    pending.write_text("A" * 43 + "=\n")
    result = run_cli(["rotate-master-key", "--config", str(server.config)], cwd=tmp_path)
    assert result.returncode == 0 and "Re-encrypted 1 upstream key(s)" in result.stdout
    server.start().stop()


def test_rotating_a_master_key_given_in_the_environment_writes_the_new_one_to_a_file(
    tmp_path,
):
    key = "B" * 43 + "="
    server = ServerProcess(
        tmp_path, "upstream: {allow_private_networks: true}\n", env={"APIPOOL_MASTER_KEY": key}
    ).start()
    creds = {"username": "owner", "password": PASSWORD}
    call(server.admin_url + "/api/register", "POST", creds)
    token = call(server.admin_url + "/api/login", "POST", creds)[1]["token"]
    new_key = {"key": "sk-env-key-0001", "base_url": "http://127.0.0.1:9/v1"}
    call(server.admin_url + "/api/keys", "POST", new_key, token)
    server.stop()
    env = {"APIPOOL_MASTER_KEY": key}
    config = str(server.config)
    result = run_cli(["rotate-master-key", "--config", config], cwd=tmp_path, env=env)
    assert result.returncode == 1 and "--new-key-file" in result.stderr
    target = tmp_path / "new.key"
    result = run_cli(
        ["rotate-master-key", "--config", config, "--new-key-file", str(target)],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0 and "Set APIPOOL_MASTER_KEY" in result.stdout
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    server.env["APIPOOL_MASTER_KEY"] = target.read_text().strip()
    server.start().stop()


async def test_sigterm_lets_an_in_flight_stream_finish(tmp_path):
    import asyncio

    import aiohttp

    from .fake_upstream import FakeUpstream

    async with FakeUpstream() as up, aiohttp.ClientSession() as http:
        up.stream_chunks = 10
        up.chunk_delay = 0.1
        server = ServerProcess(tmp_path, "upstream: {allow_private_networks: true}\n")
        await asyncio.to_thread(server.start)
        try:
            admin = server.admin_url
            creds = {"username": "alice", "password": PASSWORD}
            async with http.post(admin + "/api/register", json=creds) as resp:
                assert resp.status == 201
            async with http.post(admin + "/api/login", json=creds) as resp:
                token = (await resp.json())["token"]
            auth = {"Authorization": f"Bearer {token}"}
            key = {"key": "sk-shutdown-key-123", "base_url": up.base_url, "models": ["gpt-4o"]}
            async with http.post(admin + "/api/keys", json=key, headers=auth) as resp:
                assert resp.status == 201
            body = {
                "model": "gpt-4o",
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            }
            async with http.post(
                server.proxy_url + "/chat/completions", json=body, headers=auth
            ) as resp:
                first = await resp.content.readline()
                assert first.startswith(b"data: ")
                server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                await asyncio.sleep(0.3)
                # New connections are refused while the stream goes on...
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with aiohttp.ClientSession() as fresh:
                        await fresh.get(server.proxy_url + "/models", headers=auth)
                rest = await resp.content.read()
            # ...and the stream in flight ends properly.
            assert rest.rstrip().endswith(b"data: [DONE]")
            assert await asyncio.to_thread(server.proc.wait, 20) == 0  # type: ignore[union-attr]
        finally:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.kill()
            server.proc = None


def _listen_backlog(port: int) -> int:
    """The accept backlog of the socket listening on ``port``, as ``ss`` reports it (the
    Send-Q column of a listening socket)."""
    listing = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return int(listing.split()[2])


@pytest.mark.skipif(not shutil.which("ss"), reason="needs ss (iproute2)")
async def test_both_ports_take_a_burst_of_new_connections(start_server):
    # aiohttp's default backlog of 128 drops handshakes when hundreds connect at once.
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    async with start_server() as server:
        for port in (server.proxy_port, server.admin_port):
            assert _listen_backlog(port) == min(2048, somaxconn)


@pytest.mark.parametrize("port", ["proxy", "admin"])
async def test_connection_that_never_finishes_its_request_is_closed(start_server, port):
    async with start_server(proxy={"idle_timeout": 0.5}) as server:
        url = server.proxy_url if port == "proxy" else server.admin_url
        host, port_number = url.split("//")[1].split("/")[0].split(":")
        reader, writer = await asyncio.open_connection(host, int(port_number))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and no more
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not left open
        finally:
            writer.close()


@pytest.mark.parametrize("configured", [None, "http://proxy.example:3128"])
async def test_a_proxy_in_the_environment_is_not_used_silently(tmp_path, caplog, configured):
    settings = make_settings(tmp_path, upstream={"http_proxy": configured})
    caplog.set_level(logging.WARNING, logger="apipool_proxy")
    async with serve(settings, environ={"HTTPS_PROXY": "http://other.example:8080"}):
        pass
    warned = "set upstream.http_proxy" in caplog.text
    assert warned == (configured is None)


@pytest.mark.parametrize(
    ("host", "open_registration", "warned"),
    [("0.0.0.0", True, True), ("0.0.0.0", False, False), ("127.0.0.1", True, False)],
)
async def test_an_admin_port_open_to_the_network_with_open_registration_is_named(
    tmp_path, caplog, host, open_registration, warned
):
    settings = make_settings(
        tmp_path, admin={"host": host}, auth={"open_registration": open_registration}
    )
    caplog.set_level(logging.WARNING, logger="apipool_proxy")
    async with serve(settings, environ={}):
        pass
    assert ("with open registration" in caplog.text) == warned

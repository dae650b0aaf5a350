"""The ``apipool`` CLI against a real ``apipool serve`` subprocess."""

from __future__ import annotations

import http.server
import os
import stat
import threading
from pathlib import Path

import pytest

from apipool_proxy import APIPoolClient, APIPoolError

from .support import PASSWORD, ServerProcess, run_cli


@pytest.fixture
def served(tmp_path: Path):
    with ServerProcess(tmp_path, "upstream: {allow_private_networks: true}\n") as server:
        yield server


def cli(server: ServerProcess, workdir: Path, *args: str, stdin: str | None = None):
    return run_cli(["--server", server.admin_url, *args], cwd=workdir, stdin=stdin)


def test_walkthrough_register_login_add_list_logout(served, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    result = cli(served, work, "register", "alice", PASSWORD)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Registered successfully. User ID: 1"

    result = cli(served, work, "login", "alice", PASSWORD)
    assert result.stdout.strip() == "Logged in successfully. Token saved."
    token_file = work / ".auth_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    result = cli(
        served,
        work,
        "add-key",
        "sk-walkthrough-secret-9876",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--models",
        "gpt-4o-mini,gpt-4o",
        "--label",
        "mine",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "Key added successfully."

    result = cli(served, work, "tokens", "create", "ci-job", "--expires-days", "7")
    assert result.stdout.startswith("Token created, valid until 20"), result.stderr
    assert "expires=20" in cli(served, work, "tokens", "list").stdout

    result = cli(served, work, "list-keys")
    lines = result.stdout.splitlines()
    assert lines[0] == "Your Keys:"
    assert len(lines) == 2 and lines[1].startswith("- sk-wa...9876")
    assert "sk-walkthrough-secret-9876" not in result.stdout

    result = cli(served, work, "update-key", "1", "--daily-tokens", "50000", "--rpm", "30")
    assert (result.returncode, result.stdout.strip()) == (0, "Key 1 updated."), result.stderr
    result = cli(served, work, "list-keys")
    assert "tokens_today=0/50000" in result.stdout
    assert cli(served, work, "update-key", "1", "--daily-tokens", "none").returncode == 0
    assert "tokens_today" not in cli(served, work, "list-keys").stdout  # the cap is gone

    token = token_file.read_text().strip()
    result = cli(served, work, "logout")
    assert result.stdout.strip() == "Logged out successfully."
    assert not token_file.exists()

    # The old token is dead server-side, and commands now say so in one line.
    token_file.write_text(token)
    result = cli(served, work, "list-keys")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr
    assert "sk-walkthrough-secret-9876" not in served.log()


def test_password_is_prompted_without_echo_when_left_off(served, tmp_path: Path):
    # getpass reads from the terminal, or from stdin when there is none.
    result = cli(served, tmp_path, "register", "bob", stdin=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout


def test_errors_are_one_line_with_nonzero_exit(served, tmp_path: Path):
    assert cli(served, tmp_path, "register", "carol", PASSWORD).returncode == 0
    result = cli(served, tmp_path, "register", "carol", PASSWORD)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("Error: ") and "taken" in result.stderr
    result = cli(served, tmp_path, "list-keys")
    assert result.returncode == 1 and "not logged in" in result.stderr
    result = run_cli(
        ["--server", "http://127.0.0.1:9", "whoami"],
        cwd=tmp_path,
        env={"APIPOOL_TOKEN_FILE": str(tmp_path / "t")},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_token_file_path_from_environment(served, tmp_path: Path):
    token_path = tmp_path / "elsewhere" / "tok"
    token_path.parent.mkdir()
    env = {"APIPOOL_TOKEN_FILE": str(token_path), "APIPOOL_SERVER": served.admin_url}
    assert run_cli(["register", "dave", PASSWORD], cwd=tmp_path, env=env).returncode == 0
    assert run_cli(["login", "dave", PASSWORD], cwd=tmp_path, env=env).returncode == 0
    assert token_path.exists() and not (tmp_path / ".auth_token").exists()
    result = run_cli(["whoami"], cwd=tmp_path, env=env)
    assert result.stdout.startswith("dave")
    os.remove(token_path)


def test_admin_commands_manage_accounts_and_the_pool(tmp_path: Path):
    config = (
        "upstream: {allow_private_networks: true}\n"
        "auth: {admins: [root], open_registration: false}\n"
    )
    root, alice = tmp_path / "root", tmp_path / "alice"
    root.mkdir()
    alice.mkdir()
    with ServerProcess(tmp_path, config) as served:
        # Registration is closed: the named admin bootstraps, then creates the others.
        assert cli(served, root, "register", "root", PASSWORD).returncode == 0
        assert cli(served, root, "login", "root", PASSWORD).returncode == 0
        result = cli(served, alice, "register", "alice", PASSWORD)
        assert result.returncode == 1 and "Registration is closed" in result.stderr
        result = cli(served, root, "admin", "create-user", "alice", PASSWORD)
        assert result.stdout.strip() == "Created user alice. User ID: 2", result.stderr
        assert cli(served, alice, "login", "alice", PASSWORD).returncode == 0
        result = cli(
            served,
            alice,
            "add-key",
            "sk-alices-own-key-0001",
            "--base-url",
            "http://127.0.0.1:9/v1",
        )
        assert "visibility=private" in result.stdout

        # A member is told, in one line, that these are for admins.
        result = cli(served, alice, "admin", "users")
        assert result.returncode == 1 and result.stderr.startswith("Error: ")

        result = cli(served, root, "admin", "users")
        assert result.returncode == 0, result.stderr
        assert "- id=2  username=alice  admin=no  disabled=no  keys=1  limits=none" in result.stdout

        result = cli(served, root, "admin", "pool")
        assert "owner=alice" in result.stdout and "visibility=private" in result.stdout
        assert "sk-alices-own-key-0001" not in result.stdout
        result = cli(served, root, "admin", "approve", "1")
        assert result.stdout.strip() == "Key 1 approved: it serves every member."
        assert "visibility=approved" in cli(served, root, "admin", "pool").stdout

        # Limits add up: setting one keeps the others.
        cli(served, root, "admin", "limits", "2", "rpm=5")
        result = cli(served, root, "admin", "limits", "2", "daily_tokens=1000")
        assert result.stdout.strip() == "User 2 limits: daily_tokens:1000,rpm:5"
        result = cli(served, root, "admin", "limits", "2", "rpm=none")
        assert result.stdout.strip() == "User 2 limits: daily_tokens:1000"
        result = cli(served, root, "admin", "limits", "2", "rpm=lots")
        assert result.returncode == 2 and "expected a number" in result.stderr
        result = cli(served, root, "admin", "limits", "2", "--reset")
        assert result.stdout.strip() == "User 2 limits: none"

        # Everyone's usage by member: alice's request (to a dead upstream) has its row.
        member = APIPoolClient(served.admin_url, token=(alice / ".auth_token").read_text().strip())
        with pytest.raises(APIPoolError):
            member.chat_completions("gpt-4o-mini", [{"role": "user", "content": "hi"}])
        result = cli(served, root, "usage", "--all", "--group-by", "user")
        assert result.stdout.splitlines()[0].split()[:2] == ["user", "requests"]
        assert result.stdout.splitlines()[2].split()[:2] == ["alice", "1"]
        result = cli(served, alice, "usage", "--group-by", "user")
        assert result.returncode == 1 and result.stderr.startswith("Error: ")

        assert cli(served, root, "admin", "disable", "2").stdout.strip() == "User 2 disabled."
        assert cli(served, alice, "whoami").returncode == 1  # locked out at once
        assert cli(served, root, "admin", "enable", "2").stdout.strip() == "User 2 enabled."
        assert cli(served, alice, "whoami").stdout.startswith("alice")


def test_list_keys_says_why_a_key_rests(served, tmp_path: Path):
    # An upstream that turns every key down, as OpenAI does a revoked one.
    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            body = (
                b'{"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}'
            )
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        assert cli(served, tmp_path, "register", "bob", PASSWORD).returncode == 0
        assert cli(served, tmp_path, "login", "bob", PASSWORD).returncode == 0
        base_url = f"http://127.0.0.1:{upstream.server_address[1]}/v1"
        added = cli(served, tmp_path, "add-key", "sk-revoked-key-0001", "--base-url", base_url)
        assert added.returncode == 0, added.stderr
        result = cli(served, tmp_path, "check-key", "1")
        assert result.stdout.strip() == "Key 1 is invalid."
        line = cli(served, tmp_path, "list-keys").stdout.splitlines()[1]
        assert "status=invalid" in line
        assert 'error="upstream answered 401 to GET /models"' in line
    finally:
        upstream.shutdown()
        upstream.server_close()

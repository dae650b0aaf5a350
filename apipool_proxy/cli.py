"""The ``apipool`` command: run the server, or manage your account, upstream keys and tokens.

Every command except ``serve`` talks to the admin port through APIPoolClient. A failure prints
one ``Error: ...`` line to stderr and exits with status 1 (130 when interrupted).
"""

import argparse
import contextlib
import getpass
import json
import os
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from .client import DEFAULT_SERVER_URL, DEFAULT_UPSTREAM_URL, APIPoolClient, APIPoolError

DEFAULT_TOKEN_FILE = ".auth_token"  # noqa: S105 (a file name, not a secret)

Handler = Callable[[argparse.Namespace], int]
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

_USAGE_COLUMNS = (
    ("group", "group"),
    ("requests", "requests"),
    ("prompt", "prompt_tokens"),
    ("completion", "completion_tokens"),
    ("total", "total_tokens"),
)


class CommandError(Exception):
    """A failure to report to the user as one ``Error: ...`` line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``apipool`` command line and return its exit status."""
    args = _build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except APIPoolError as exc:
        return _fail(exc.message)
    except CommandError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(_describe_os_error(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", status=130)


def _fail(message: str, status: int = 1) -> int:
    # One line, whatever the server put in its message, so scripts can grep for it.
    text = " ".join(message.split()) or "unknown failure"
    print(f"Error: {text}", file=sys.stderr)
    return status


def _describe_os_error(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


# Parser


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apipool",
        description="Share LLM API keys in a pool behind one OpenAI-compatible proxy.",
    )
    # Given before the command it is the global option; the copy in `client` below also lets
    # it come after the command (`apipool login --server URL alice`).
    parser.add_argument(
        "--server",
        metavar="URL",
        type=_server_url,
        default=os.environ.get("APIPOOL_SERVER") or DEFAULT_SERVER_URL,
        help=f"admin server URL (default: $APIPOOL_SERVER, else {DEFAULT_SERVER_URL})",
    )
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--server", metavar="URL", type=_server_url, default=argparse.SUPPRESS, help="as above"
    )

    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    serve = _command(commands, "serve", _serve, "run the proxy and admin server", [])
    serve.add_argument("--config", metavar="FILE", help="YAML configuration file")
    rotate = _command(
        commands,
        "rotate-master-key",
        _rotate_master_key,
        "re-encrypt the stored upstream keys under a new master key (server stopped)",
        [],
    )
    rotate.add_argument("--config", metavar="FILE", help="YAML configuration file")
    rotate.add_argument(
        "--new-key-file",
        metavar="FILE",
        help="where the new key goes when the current one comes from APIPOOL_MASTER_KEY",
    )
    _add_account_commands(commands, [client])
    _add_key_commands(commands, [client])
    _add_token_commands(commands, [client])
    _add_usage_command(commands, [client])
    _add_admin_commands(commands, [client])
    return parser


def _command(
    commands: Subcommands,
    name: str,
    handler: Handler,
    summary: str,
    parents: list[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=summary, description=summary, parents=parents)
    parser.set_defaults(handler=handler)
    return parser


def _add_account_commands(commands: Subcommands, parents: list[argparse.ArgumentParser]) -> None:
    for name, handler, summary in (
        ("register", _register, "create an account"),
        ("login", _login, "log in and save the token"),
    ):
        parser = _command(commands, name, handler, summary, parents)
        parser.add_argument("username", metavar="USER")
        parser.add_argument("password", metavar="PASS", nargs="?", help="asked when left out")
    _command(commands, "logout", _logout, "revoke the saved token and delete it", parents)
    _command(commands, "whoami", _whoami, "show the logged-in account", parents)


def _add_key_commands(commands: Subcommands, parents: list[argparse.ArgumentParser]) -> None:
    add = _command(commands, "add-key", _add_key, "contribute an upstream API key", parents)
    add.add_argument("key", metavar="KEY", nargs="?", help="asked when left out")
    add.add_argument(
        "--base-url", metavar="URL", default=DEFAULT_UPSTREAM_URL, help="upstream API base URL"
    )
    _add_key_limits(add)

    _command(commands, "list-keys", _list_keys, "list your upstream keys", parents)
    remove = _command(commands, "remove-key", _remove_key, "delete an upstream key", parents)
    remove.add_argument("key_id", metavar="ID")

    update = _command(commands, "update-key", _update_key, "change an upstream key", parents)
    update.add_argument("key_id", metavar="ID")
    _add_key_limits(update)
    switch = update.add_mutually_exclusive_group()
    switch.add_argument("--enable", dest="enabled", action="store_const", const=True)
    switch.add_argument("--disable", dest="enabled", action="store_const", const=False)

    check = _command(commands, "check-key", _check_key, "test an upstream key now", parents)
    check.add_argument("key_id", metavar="ID")


def _add_key_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", metavar="A,B", type=_model_list, help="comma-separated")
    parser.add_argument("--label", metavar="LABEL")
    parser.add_argument("--max-concurrent", metavar="N", type=_cap, help="none: no cap")
    parser.add_argument("--rpm", metavar="N", type=_cap, help="requests per minute")
    parser.add_argument(
        "--daily-tokens", metavar="N", type=_cap, help="tokens the key serves per day (UTC)"
    )


def _add_admin_commands(commands: Subcommands, parents: list[argparse.ArgumentParser]) -> None:
    admin = commands.add_parser("admin", help="manage accounts and the pool (admins only)")
    actions = admin.add_subparsers(title="actions", metavar="ACTION", required=True)
    _command(actions, "users", _admin_users, "list accounts and their limits", parents)
    create = _command(
        actions, "create-user", _admin_create_user, "create an account for someone", parents
    )
    create.add_argument("username", metavar="USER")
    create.add_argument("password", metavar="PASS", nargs="?", help="asked when left out")
    _command(actions, "pool", _admin_pool, "list every key in the pool", parents)
    approve = _command(
        actions, "approve", _admin_approve, "let a key on a private host serve everyone", parents
    )
    approve.add_argument("key_id", metavar="KEY_ID")
    for name, disabled, summary in (
        ("disable", True, "lock an account out of both ports"),
        ("enable", False, "let a disabled account back in"),
    ):
        parser = _command(actions, name, _admin_set_disabled, summary, parents)
        parser.add_argument("user_id", metavar="USER_ID")
        parser.set_defaults(disabled=disabled)
    limits = _command(actions, "limits", _admin_limits, "set an account's limits", parents)
    limits.add_argument("user_id", metavar="USER_ID")
    limits.add_argument(
        "settings",
        metavar="NAME=N",
        nargs="*",
        type=_limit_setting,
        help="rpm, tpm, daily_tokens or max_concurrent; N=none for unlimited",
    )
    limits.add_argument("--reset", action="store_true", help="back to the server's defaults")


def _add_token_commands(commands: Subcommands, parents: list[argparse.ArgumentParser]) -> None:
    tokens = commands.add_parser("tokens", help="manage pool tokens for the proxy")
    actions = tokens.add_subparsers(title="actions", metavar="ACTION", required=True)
    create = _command(actions, "create", _create_token, "create a pool token", parents)
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--expires-days",
        metavar="DAYS",
        type=float,
        help="valid this many days (default: until revoked)",
    )
    _command(actions, "list", _list_tokens, "list your pool tokens", parents)
    revoke = _command(actions, "revoke", _revoke_token, "revoke a pool token", parents)
    revoke.add_argument("token_id", metavar="ID")


def _add_usage_command(commands: Subcommands, parents: list[argparse.ArgumentParser]) -> None:
    usage = _command(commands, "usage", _usage, "show your token usage", parents)
    usage.add_argument("--since", metavar="DATE", help="ISO 8601 date or time")
    usage.add_argument("--until", metavar="DATE", help="ISO 8601 date or time")
    usage.add_argument(
        "--group-by", choices=("day", "model", "key", "user"), default="day", help="user: admins"
    )
    usage.add_argument("--all", action="store_true", help="everyone's usage (admins only)")


def _server_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        raise argparse.ArgumentTypeError("expected an http:// or https:// URL without credentials")
    return text


# What a cap option holds when the user typed "none": sent as null, which removes the cap.
_NO_CAP = "none"


def _cap(text: str) -> int | str:
    if text.lower() in ("none", "unlimited"):
        return _NO_CAP
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number or none") from None


def _cap_value(value: Any) -> Any:
    return None if value == _NO_CAP else value


def _limit_setting(text: str) -> tuple[str, int | None]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=N, got {text!r}")
    if value.lower() in ("none", "unlimited"):
        return name, None
    try:
        return name, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected a number or none") from None


def _model_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


# Commands


def _serve(args: argparse.Namespace) -> int:
    # Imported here so that account commands work without loading the server and its
    # dependencies.
    from .server import run

    return run(args.config)


def _rotate_master_key(args: argparse.Namespace) -> int:
    # Imported here, like the server: account commands need none of this.
    from .config import ConfigError, load_settings
    from .crypto import MasterKeyError
    from .rotation import RotationError, rotate_master_key

    path = args.config or os.environ.get("APIPOOL_CONFIG")
    try:
        settings = load_settings(path, os.environ)
        print(rotate_master_key(settings, os.environ, args.new_key_file))
    except (ConfigError, RotationError, MasterKeyError) as exc:
        raise CommandError(str(exc)) from None
    return 0


def _register(args: argparse.Namespace) -> int:
    password = args.password if args.password is not None else _ask("Password: ")
    user_id = APIPoolClient(args.server).register(args.username, password)
    print(f"Registered successfully. User ID: {user_id}")
    return 0


def _login(args: argparse.Namespace) -> int:
    password = args.password if args.password is not None else _ask("Password: ")
    token = APIPoolClient(args.server).login(args.username, password)
    _save_token(token)
    print("Logged in successfully. Token saved.")
    return 0


def _logout(args: argparse.Namespace) -> int:
    client = _logged_in_client(args)
    # The file goes even when the server refuses: a token it rejects is of no further use, and
    # an unreachable server must not leave the user stuck "logged in".
    try:
        client.logout()
    finally:
        _forget_token()
    print("Logged out successfully.")
    return 0


def _whoami(args: argparse.Namespace) -> int:
    me = _logged_in_client(args).me()
    admin = " [admin]" if me.get("is_admin") else ""
    print(f"{me.get('username')} (user id {me.get('user_id')}){admin}")
    return 0


def _add_key(args: argparse.Namespace) -> int:
    client = _logged_in_client(args)
    secret = args.key if args.key is not None else _ask("Upstream API key: ")
    key = client.add_key(
        secret,
        base_url=args.base_url,
        models=args.models or None,
        label=args.label,
        max_concurrent=_cap_value(args.max_concurrent),
        rpm=_cap_value(args.rpm),
        daily_tokens=_cap_value(args.daily_tokens),
    )
    print("Key added successfully.")
    print(_key_line(key))
    return 0


def _list_keys(args: argparse.Namespace) -> int:
    keys = _logged_in_client(args).list_keys()
    print("Your Keys:")
    _print_lines([_key_line(key) for key in keys])
    return 0


def _remove_key(args: argparse.Namespace) -> int:
    _logged_in_client(args).delete_key(args.key_id)
    print(f"Key {args.key_id} removed.")
    return 0


def _update_key(args: argparse.Namespace) -> int:
    fields = {
        name: getattr(args, name)
        for name in ("label", "models", "enabled", "max_concurrent", "rpm", "daily_tokens")
        if getattr(args, name) is not None
    }
    for cap in ("max_concurrent", "rpm", "daily_tokens"):
        if cap in fields:
            fields[cap] = _cap_value(fields[cap])
    if not fields:
        raise CommandError("nothing to update (give --label, --models, --enable, --disable, ...)")
    _logged_in_client(args).update_key(args.key_id, **fields)
    print(f"Key {args.key_id} updated.")
    return 0


def _check_key(args: argparse.Namespace) -> int:
    key = _logged_in_client(args).check_key(args.key_id)
    print(f"Key {args.key_id} is {key.get('status')}.")
    return 0


def _create_token(args: argparse.Namespace) -> int:
    created = _logged_in_client(args).create_token(args.name, args.expires_days)
    if created.get("expires_at"):
        print(f"Token created, valid until {created['expires_at']}.")
        print("Save it now, it will not be shown again:")
    else:
        print("Token created. Save it now, it will not be shown again:")
    print(created.get("token"))
    return 0


def _list_tokens(args: argparse.Namespace) -> int:
    tokens = _logged_in_client(args).list_tokens()
    print("Your Tokens:")
    _print_lines([_token_line(token) for token in tokens])
    return 0


def _revoke_token(args: argparse.Namespace) -> int:
    _logged_in_client(args).revoke_token(args.token_id)
    print(f"Token {args.token_id} revoked.")
    return 0


def _usage(args: argparse.Namespace) -> int:
    client = _logged_in_client(args)
    report = client.usage(
        since=args.since, until=args.until, group_by=args.group_by, everyone=args.all
    )
    _print_lines(_usage_table(report.get("rows") or [], args.group_by))
    contributed = report.get("contributed") or []
    if contributed:
        print()
        print("Used from your keys by others:")
        _print_lines(_usage_table(contributed, args.group_by))
    return 0


def _admin_create_user(args: argparse.Namespace) -> int:
    client = _logged_in_client(args)
    password = args.password if args.password is not None else _ask("Password: ")
    user_id = client.register(args.username, password)
    print(f"Created user {args.username}. User ID: {user_id}")
    return 0


def _admin_users(args: argparse.Namespace) -> int:
    users = _logged_in_client(args).list_users()
    _print_lines([_user_line(user) for user in users])
    return 0


def _admin_pool(args: argparse.Namespace) -> int:
    keys = _logged_in_client(args).pool()
    _print_lines([_pool_key_line(key) for key in keys])
    return 0


def _admin_approve(args: argparse.Namespace) -> int:
    _logged_in_client(args).approve_key(args.key_id)
    print(f"Key {args.key_id} approved: it serves every member.")
    return 0


def _admin_set_disabled(args: argparse.Namespace) -> int:
    _logged_in_client(args).update_user(args.user_id, disabled=args.disabled)
    print(f"User {args.user_id} {'disabled' if args.disabled else 'enabled'}.")
    return 0


def _admin_limits(args: argparse.Namespace) -> int:
    if args.reset == bool(args.settings):
        raise CommandError("give NAME=N settings, or --reset")
    client = _logged_in_client(args)
    overrides: dict[str, int | None] = {}
    if not args.reset:
        # The server replaces an account's overrides as a whole: keep the ones not named.
        for user in client.list_users():
            if str(user.get("user_id")) == str(args.user_id):
                overrides = dict(user.get("limit_overrides") or {})
        overrides.update(args.settings)
    user = client.update_user(args.user_id, limits=overrides)
    print(f"User {args.user_id} limits: {_limits_text(user.get('limits') or {})}")
    return 0


# Token file and prompts


def _token_path() -> str:
    return os.environ.get("APIPOOL_TOKEN_FILE") or DEFAULT_TOKEN_FILE


def _logged_in_client(args: argparse.Namespace) -> APIPoolClient:
    try:
        with open(_token_path(), encoding="utf-8") as file:
            token = file.read().strip()
    except FileNotFoundError:
        token = ""
    if not token:
        raise CommandError("not logged in (run 'apipool login USER' first)")
    return APIPoolClient(args.server, token=token)


def _save_token(token: str) -> None:
    path = _token_path()
    # os.open applies the 0o600 mode only when it creates the file, so an older file (perhaps
    # more readable) is removed first; O_EXCL also refuses to follow a symlink left at the path.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(token + "\n")


def _forget_token() -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_token_path())


def _ask(prompt: str) -> str:
    try:
        return getpass.getpass(prompt)
    except EOFError:
        raise CommandError("no input: give it on the command line or from a terminal") from None


# Output


def _print_lines(lines: list[str]) -> None:
    print("\n".join(lines) if lines else "(none)")


def _key_line(key: dict[str, Any]) -> str:
    fields = {
        "id": key.get("id"),
        "label": key.get("label") or "-",
        "base_url": key.get("base_url"),
        "models": ",".join(key.get("models") or []) or "any",
        "status": key.get("status"),
        "visibility": key.get("visibility"),
    }
    if key.get("daily_tokens") is not None:
        fields["tokens_today"] = f"{key.get('tokens_today')}/{key['daily_tokens']}"
    if key.get("status") != "active":
        # Why the key rests, and until when: what its owner needs to act on.
        if key.get("cooldown_until"):
            fields["until"] = key["cooldown_until"]
        if key.get("last_error"):
            fields["error"] = json.dumps(" ".join(str(key["last_error"]).split())[:200])
    return f"- {key.get('masked_key')}  " + "  ".join(f"{k}={v}" for k, v in fields.items())


def _user_line(user: dict[str, Any]) -> str:
    fields = {
        "id": user.get("user_id"),
        "username": user.get("username"),
        "admin": "yes" if user.get("is_admin") else "no",
        "disabled": "yes" if user.get("disabled") else "no",
        "keys": user.get("keys"),
        "limits": _limits_text(user.get("limits") or {}),
    }
    return "- " + "  ".join(f"{k}={v}" for k, v in fields.items())


def _limits_text(limits: dict[str, Any]) -> str:
    given = [f"{name}:{value}" for name, value in sorted(limits.items()) if value is not None]
    return ",".join(given) or "none"


def _pool_key_line(key: dict[str, Any]) -> str:
    fields = {
        "id": key.get("id"),
        "owner": key.get("owner"),
        "base_url": key.get("base_url"),
        "status": key.get("status"),
        "visibility": key.get("visibility"),
        "in_flight": key.get("in_flight"),
        "requests_today": key.get("requests_today"),
        "tokens_today": key.get("tokens_today"),
    }
    return f"- {key.get('masked_key')}  " + "  ".join(f"{k}={v}" for k, v in fields.items())


def _token_line(token: dict[str, Any]) -> str:
    fields = {
        "id": token.get("id"),
        "name": token.get("name"),
        "created": token.get("created_at"),
        "last_used": token.get("last_used_at") or "never",
        "expires": token.get("expires_at") or "never",
    }
    return "- " + "  ".join(f"{k}={v}" for k, v in fields.items())


def _usage_table(rows: list[dict[str, Any]], group_by: str = "group") -> list[str]:
    """Format usage rows as aligned columns: the group on the left, counts on the right,
    and a total line under several rows."""
    header = [group_by, *(title for title, _ in _USAGE_COLUMNS[1:])]
    cells = [[_cell(row.get(field)) for _, field in _USAGE_COLUMNS] for row in rows]
    if len(rows) > 1:
        sums = [sum(row.get(field) or 0 for row in rows) for _, field in _USAGE_COLUMNS[1:]]
        cells.append(["total", *(str(n) for n in sums)])
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    rule = _table_row(["-" * w for w in widths], widths)
    lines = [_table_row(line, widths) for line in cells]
    if len(rows) > 1:
        lines.insert(-1, rule)
    return [_table_row(header, widths), rule, *(lines or ["(none)"])]


def _table_row(cells: list[str], widths: list[int]) -> str:
    first = cells[0].ljust(widths[0])
    rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
    return "  ".join([first, *rest]).rstrip()


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)

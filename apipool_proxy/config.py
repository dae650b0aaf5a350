"""Settings: a YAML file, overridden by ``APIPOOL_<SECTION>_<KEY>`` environment variables.

Every key is optional. Unknown keys, wrong types and bad values raise :class:`ConfigError`
with a one-line message naming the key, so a typo stops startup instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ENV_PREFIX = "APIPOOL_"

DEFAULT_SHARED_HOSTS = (
    "api.openai.com",
    "openrouter.ai",
    "api.groq.com",
    "api.deepseek.com",
    "api.mistral.ai",
    "api.together.xyz",
    "integrate.api.nvidia.com",
    "generativelanguage.googleapis.com",
    "api.fireworks.ai",
    "api.x.ai",
)


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or out of range."""


@dataclass(frozen=True)
class ProxySettings:
    host: str = "127.0.0.1"
    port: int = 8080
    # The URL callers use to reach the proxy port, shown by /api/info; None means
    # http://<host>:<port>/v1.
    public_url: str | None = None
    # Largest request body accepted on /v1 (audio and file uploads included).
    max_body_mb: int = 64
    # Seconds in-flight requests get to finish on shutdown.
    shutdown_grace: float = 10.0
    # Seconds a caller's connection may sit idle, or take to send a request's headers,
    # before it is closed. Behind a load balancer, keep it above the balancer's own.
    idle_timeout: float = 75.0
    # Origins whose web pages may call /v1 from a browser (CORS); "*" for any, [] for none.
    cors_origins: list[str] = field(default_factory=lambda: ["*"])


@dataclass(frozen=True)
class AdminSettings:
    host: str = "127.0.0.1"
    port: int = 8081


@dataclass(frozen=True)
class DatabaseSettings:
    path: str = "data/apipool.db"


@dataclass(frozen=True)
class SecuritySettings:
    master_key_file: str = "data/master.key"


@dataclass(frozen=True)
class AuthSettings:
    session_ttl_hours: float = 168
    open_registration: bool = True
    admins: list[str] = field(default_factory=list)
    # Failed logins allowed per account and per client address within
    # login_window_seconds before further attempts get 429.
    login_max_failures: int = 10
    login_window_seconds: int = 300
    # Accounts one client address may register within login_window_seconds (admins creating
    # accounts are not counted).
    registrations_per_address: int = 10
    # bcrypt work factor: each step doubles the time a password check takes.
    bcrypt_rounds: int = 12


@dataclass(frozen=True)
class UpstreamSettings:
    connect_timeout: float = 10
    # Idle-read timeout: the longest silence allowed between two reads from upstream.
    read_timeout: float = 600  # as the openai SDK: a reasoning model may be silent for minutes
    max_attempts: int = 3
    allow_private_networks: bool = False
    shared_hosts: list[str] = field(default_factory=lambda: list(DEFAULT_SHARED_HOSTS))
    # How often keys without an explicit model list re-ask their upstream's /models.
    models_refresh_minutes: float = 60
    # http://[user:password@]host:port of a proxy that https upstreams are reached through
    # (CONNECT), WebSocket sessions included; None connects directly. http:// upstreams
    # (local servers) never use it.
    http_proxy: str | None = None


@dataclass(frozen=True)
class PoolSettings:
    strategy: str = "least_busy"
    prefer_own_keys: bool = True
    require_contribution: bool = False
    # Days the pool remembers which key holds a stored response or chat completion (the
    # upstream deletes them: OpenAI after 30 days by default); None remembers them forever.
    stored_response_days: float | None = 30
    # Keys one member may add (admins are not limited).
    max_keys_per_member: int = 100


@dataclass(frozen=True)
class LimitSettings:
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    max_concurrent: int | None = None


@dataclass(frozen=True)
class LogSettings:
    level: str = "INFO"
    format: str = "text"
    access_log: bool = True


@dataclass(frozen=True)
class Settings:
    proxy: ProxySettings = field(default_factory=ProxySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    log: LogSettings = field(default_factory=LogSettings)


# Settings whose values may hold a password: errors about them never quote the value.
_SECRET_SETTINGS = frozenset({("upstream", "http_proxy")})

# Checks beyond the type: (section, key) -> (predicate, what a good value looks like).
_CHECKS: dict[tuple[str, str], tuple[typing.Callable[[Any], bool], str]] = {
    ("proxy", "port"): (lambda v: 0 <= v <= 65535, "a port number 0-65535"),
    ("admin", "port"): (lambda v: 0 <= v <= 65535, "a port number 0-65535"),
    ("proxy", "max_body_mb"): (lambda v: 1 <= v <= 4096, "between 1 and 4096"),
    ("proxy", "shutdown_grace"): (lambda v: 0 <= v <= 3600, "between 0 and 3600"),
    ("proxy", "idle_timeout"): (lambda v: 0 < v <= 86400, "between 0 and 86400"),
    ("proxy", "public_url"): (
        lambda v: v is None or v.startswith(("http://", "https://")),
        "an http:// or https:// URL",
    ),
    ("proxy", "cors_origins"): (
        lambda v: all(o == "*" or re.fullmatch(r"https?://[^/?#\s]+", o) for o in v),
        '"*" or origins such as https://chat.example.com (no path)',
    ),
    ("database", "path"): (bool, "a non-empty path"),
    ("security", "master_key_file"): (bool, "a non-empty path"),
    ("auth", "session_ttl_hours"): (lambda v: 0 < v <= 24 * 366, "between 0 and 8784"),
    ("auth", "login_max_failures"): (lambda v: v >= 1, "at least 1"),
    ("auth", "login_window_seconds"): (lambda v: v >= 1, "at least 1"),
    ("auth", "registrations_per_address"): (lambda v: v >= 1, "at least 1"),
    ("auth", "bcrypt_rounds"): (lambda v: 4 <= v <= 16, "between 4 and 16"),
    ("upstream", "connect_timeout"): (lambda v: v > 0, "greater than 0"),
    ("upstream", "read_timeout"): (lambda v: v > 0, "greater than 0"),
    ("upstream", "max_attempts"): (lambda v: 1 <= v <= 20, "between 1 and 20"),
    ("upstream", "http_proxy"): (
        lambda v: v is None or _is_proxy_url(v),
        "null or http://[user:password@]host:port",
    ),
    ("upstream", "models_refresh_minutes"): (lambda v: v > 0, "greater than 0"),
    ("pool", "strategy"): (
        lambda v: v in ("least_busy", "round_robin", "random"),
        "one of least_busy, round_robin, random",
    ),
    ("pool", "stored_response_days"): (lambda v: v is None or v > 0, "null or greater than 0"),
    ("pool", "max_keys_per_member"): (lambda v: v >= 1, "at least 1"),
    ("log", "level"): (
        lambda v: v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "one of DEBUG, INFO, WARNING, ERROR",
    ),
    ("log", "format"): (lambda v: v in ("text", "json"), "text or json"),
}
for _name in ("rpm", "tpm", "daily_tokens", "max_concurrent"):
    _CHECKS[("limits", _name)] = (lambda v: v is None or v >= 1, "null or at least 1")


def _is_proxy_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return False
    return (
        parts.scheme == "http"
        and bool(parts.hostname)
        and parts.path in ("", "/")
        and not parts.query
    )


def load_settings(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Settings:
    """Read the YAML file at ``path`` (if any), apply environment overrides, validate."""
    raw = _read_yaml(path) if path else {}
    _apply_environment(raw, environ)
    return settings_from_dict(raw)


def settings_from_dict(raw: Mapping[str, Any]) -> Settings:
    sections = {f.name: f for f in dataclasses.fields(Settings)}
    built: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown section '{section}'")
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section}: expected a mapping of settings")
        section_type = typing.get_type_hints(Settings)[section]
        built[section] = _build_section(section, section_type, values)
    return Settings(**built)


def _build_section(section: str, section_type: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(section_type)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{section}.{key}: unknown setting")
        name = f"{section}.{key}"
        hidden = (section, str(key)) in _SECRET_SETTINGS
        try:
            value = _coerce(name, hints[key], value)
        except ConfigError:
            if hidden:
                raise ConfigError(f"{name}: expected a string (the value is not shown)") from None
            raise
        check = _CHECKS.get((section, str(key)))
        if check and not check[0](value):
            shown = "a value not shown, as it may hold a password" if hidden else repr(value)
            raise ConfigError(f"{name}: must be {check[1]}, got {shown}")
        kwargs[key] = value
    return section_type(**kwargs)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    optional = _is_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must not be null")
    base = _strip_optional(hint)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if typing.get_origin(base) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
    raise ConfigError(f"{name}: unsupported setting type")  # pragma: no cover


def _is_optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def _strip_optional(hint: Any) -> Any:
    if _is_optional(hint):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Overlay ``APIPOOL_SECTION_KEY=value``; values are read as YAML scalars or lists."""
    sections = {f.name for f in dataclasses.fields(Settings)}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        # APIPOOL_CONFIG, APIPOOL_MASTER_KEY, APIPOOL_SERVER... are not settings.
        if section not in sections or not key:
            continue
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError:
            raise ConfigError(f"{name}: cannot parse value") from None
        target = raw.get(section)
        if not isinstance(target, dict):
            target = {}
            raw[section] = target
        target[key] = value

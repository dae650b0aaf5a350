"""Contributing, listing, changing and removing upstream keys.

This is where the database record of a key (encrypted) meets its live state in the
pool (decrypted, in memory). Every change is written first, then applied to the pool.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from . import crypto, netguard
from .accounts import User
from .config import Settings
from .errors import ApiError
from .limits import today_start
from .log import admin_log, pool_log, redact, secrets
from .pool import KeyPool, KeyStatus, Outcome, PooledKey, classify_response
from .storage import Database
from .upstream import UpstreamClient, UpstreamError, header_block

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_MODELS = 2000
DISCOVERY_TIMEOUT = 30.0
MODELS_BODY_LIMIT = 8 * 1024 * 1024


class UpstreamKeys:
    def __init__(
        self,
        db: Database,
        master_key: bytes,
        pool: KeyPool,
        settings: Settings,
        forbidden_ports: set[int],
    ) -> None:
        self.db = db
        self.master_key = master_key
        self.cipher = crypto.KeyCipher(master_key)
        self.pool = pool
        self.settings = settings
        self.forbidden_ports = forbidden_ports
        self.upstream: UpstreamClient | None = None
        self._shared_hosts = {h.lower() for h in settings.upstream.shared_hosts}

    async def load(self) -> None:
        """Decrypt every stored key into the pool; a wrong master key stops startup."""
        for row in await self.db.all_keys():
            secret = self.cipher.decrypt(row["secret"], row["user_id"])
            self.pool.add(self._from_row(row, secret))
            secrets.add(secret)

    def _from_row(self, row: Any, secret: str) -> PooledKey:
        return PooledKey(
            id=row["id"],
            owner_id=row["user_id"],
            base_url=row["base_url"],
            secret=secret,
            masked=row["masked"],
            label=row["label"],
            models=_models(row["models"]),
            discovered_models=_models(row["discovered_models"]),
            enabled=bool(row["enabled"]),
            on_shared_host=self._is_shared_host(row["base_url"]),
            approved=bool(row["approved"]),
            status=KeyStatus(row["status"]),
            cooldown_until=row["cooldown_until"],
            last_error=row["last_error"],
            max_concurrent=row["max_concurrent"],
            rpm=row["rpm"],
            daily_tokens=row["daily_tokens"],
            no_stream_options=bool(row["no_stream_options"]),
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
        )

    def _is_shared_host(self, base_url: str) -> bool:
        return (urlsplit(base_url).hostname or "") in self._shared_hosts

    # -- owner operations ------------------------------------------------------------------

    async def add(self, user: User, payload: dict[str, Any]) -> PooledKey:
        self._check_room(user)
        secret = _check_secret(payload.get("key"))
        base_url = await self._check_base_url(payload.get("base_url", DEFAULT_BASE_URL))
        models = _check_models(payload.get("models"))
        label = _check_label(payload.get("label"))
        max_concurrent = _check_cap(payload, "max_concurrent")
        rpm = _check_cap(payload, "rpm")
        daily_tokens = _check_cap(payload, "daily_tokens")
        fingerprint = crypto.key_fingerprint(self.master_key, base_url + "\n" + secret)
        if any(k.secret == secret and k.base_url == base_url for k in self.pool):
            raise ApiError(
                409, "This key is already in the pool.", param="key", code="duplicate_key"
            )
        masked = crypto.mask_key(secret)
        created_at = time.time()
        fields: dict[str, Any] = {
            "user_id": user.id,
            "label": label,
            "base_url": base_url,
            "secret": self.cipher.encrypt(secret, user.id),
            "masked": masked,
            "fingerprint": fingerprint,
            "models": json.dumps(sorted(models)) if models is not None else None,
            "max_concurrent": max_concurrent,
            "rpm": rpm,
            "daily_tokens": daily_tokens,
            "approved": 0,
            "created_at": created_at,
        }
        key_id = await self.db.create_key(fields)
        key = PooledKey(
            id=key_id,
            owner_id=user.id,
            base_url=base_url,
            secret=secret,
            masked=masked,
            label=label,
            models=models,
            on_shared_host=self._is_shared_host(base_url),
            max_concurrent=max_concurrent,
            rpm=rpm,
            daily_tokens=daily_tokens,
            created_at=created_at,
        )
        secrets.add(secret)
        self.pool.add(key)
        admin_log.info("user %d added key %d (%s) for %s", user.id, key_id, key.masked, base_url)
        return key

    async def _check_base_url(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ApiError(
                400, "'base_url' must be a string.", param="base_url", code="invalid_type"
            )
        allow_private = self.settings.upstream.allow_private_networks
        try:
            url = netguard.normalize_base_url(value, allow_private_networks=allow_private)
            async with asyncio.timeout(10):
                await netguard.check_upstream_host(
                    url,
                    allow_private_networks=allow_private,
                    forbidden_ports=self.forbidden_ports,
                )
        except netguard.UnsafeUpstreamError as exc:
            raise ApiError(
                400, f"'base_url' is not allowed: {exc}", param="base_url", code="invalid_base_url"
            ) from None
        except (netguard.UnresolvableHostError, TimeoutError):
            # A host that does not resolve now is no danger: the upstream client (and the
            # WebSocket connector) check every address again when they connect. Accept it,
            # so a DNS hiccup (or a machine that reaches out through a proxy) does not block
            # contributing.
            admin_log.info("base URL host of a new key does not resolve yet: %s", url)
        return url

    def _check_room(self, user: User) -> None:
        """Members hold at most pool.max_keys_per_member keys; admins are not limited.

        Every key costs memory, a place in key choice and model discovery requests to its
        host, so one member must not be able to add them without end.
        """
        limit = self.settings.pool.max_keys_per_member
        if user.is_admin or len(self.pool.owned_by(user.id)) < limit:
            return
        raise ApiError(
            403,
            f"You already have {limit} keys in the pool, the most a member may add; remove"
            " one first.",
            code="too_many_keys",
        )

    def owned(self, user: User, key_id: int) -> PooledKey:
        """The caller's key; another user's key is as missing as one that never existed."""
        key = self.pool.get(key_id)
        if key is None or key.owner_id != user.id:
            raise ApiError(404, f"No key with id {key_id}.", code="key_not_found")
        return key

    async def delete(self, user: User, key_id: int) -> None:
        key = self.owned(user, key_id)
        await self.db.delete_key(key_id)
        self.pool.remove(key_id)
        admin_log.info("user %d removed key %d (%s)", user.id, key_id, key.masked)

    async def update(self, key: PooledKey, payload: dict[str, Any]) -> PooledKey:
        unknown = set(payload) - _CHANGEABLE
        if unknown:
            name = sorted(unknown)[0]
            raise ApiError(400, f"'{name}' cannot be changed.", param=name, code="invalid_field")
        label = _check_label(payload["label"]) if "label" in payload else key.label
        models = _check_models(payload["models"]) if "models" in payload else key.models
        enabled = payload.get("enabled", key.enabled)
        if not isinstance(enabled, bool):
            raise ApiError(
                400, "'enabled' must be true or false.", param="enabled", code="invalid_type"
            )
        max_concurrent = _check_cap(payload, "max_concurrent", key.max_concurrent)
        rpm = _check_cap(payload, "rpm", key.rpm)
        daily_tokens = _check_cap(payload, "daily_tokens", key.daily_tokens)
        await self._save_settings(
            key,
            label=label,
            models=models,
            enabled=enabled,
            max_concurrent=max_concurrent,
            rpm=rpm,
            daily_tokens=daily_tokens,
        )
        key.label, key.max_concurrent, key.rpm = label, max_concurrent, rpm
        key.daily_tokens = daily_tokens
        if enabled and not key.enabled:
            self.pool.reset(key)
        key.enabled = enabled
        if models != key.models:
            self.pool.set_models(key, models, discovered=False)
        return key

    async def _save_settings(self, key: PooledKey, **changes: Any) -> None:
        """Write a key's owner-set fields, ``changes`` over their current values; the caller
        applies them to the pool after, so a failed write changes nothing."""
        values: dict[str, Any] = {
            "label": key.label,
            "models": key.models,
            "enabled": key.enabled,
            "approved": key.approved,
            "max_concurrent": key.max_concurrent,
            "rpm": key.rpm,
            "daily_tokens": key.daily_tokens,
        }
        values.update(changes)
        models = values["models"]
        values["models"] = json.dumps(sorted(models)) if models is not None else None
        values["enabled"] = int(values["enabled"])
        values["approved"] = int(values["approved"])
        await self.db.save_key_settings(key.id, values)

    async def approve(self, key_id: int) -> PooledKey:
        key = self.pool.get(key_id)
        if key is None:
            raise ApiError(404, f"No key with id {key_id}.", code="key_not_found")
        await self._save_settings(key, approved=True)
        key.approved = True
        self.pool.changed()  # others may use it now
        return key

    async def check(self, key: PooledKey) -> PooledKey:
        """Probe the key's upstream now; a key that answers becomes active again."""
        answer = await self._list_models(key)
        status, body = answer if answer is not None else (None, b"")
        outcome = classify_response(status, {}, body).outcome if status else None
        if outcome in (Outcome.OK, Outcome.NOT_ALLOWED):
            # NOT_ALLOWED: a restricted key without the scope to list models, whose
            # credentials the upstream accepted.
            self.pool.reset(key)
        elif outcome in (Outcome.INVALID, Outcome.FORBIDDEN):
            if outcome is Outcome.INVALID:
                key.status = KeyStatus.INVALID
            key.last_error = f"upstream answered {status} to GET /models"
            self.pool.dirty.add(key.id)
        await self.save_health()
        return key

    # -- model discovery -------------------------------------------------------------------

    async def discover(self, key: PooledKey) -> int | None:
        """Ask ``GET {base_url}/models``; return the status, or None when unreachable."""
        answer = await self._list_models(key)
        return answer[0] if answer is not None else None

    async def _list_models(self, key: PooledKey) -> tuple[int, bytes] | None:
        """``GET {base_url}/models`` and take the models it lists; the status and body (of
        a 200, 401 or 403), or None when the upstream could not be reached."""
        if self.upstream is None:
            return None
        headers = header_block([("Authorization", key.auth_header), ("Accept", "application/json")])
        try:
            async with asyncio.timeout(DISCOVERY_TIMEOUT):
                answer = await self.upstream.request("GET", key.base_url, "/models", headers)
                try:
                    status = answer.status
                    wanted = status in (200, 401, 403)
                    body = await answer.read(MODELS_BODY_LIMIT) if wanted else b""
                finally:
                    answer.release()
        except TimeoutError:
            pool_log.info("key %d: cannot list models: upstream timed out", key.id)
            return None
        except UpstreamError as exc:
            pool_log.info("key %d: cannot list models: %s", key.id, exc.describe)
            return None
        if status == 200:
            models = _model_ids(body)
            if models is not None and key.models is None:
                self.pool.set_models(key, models, discovered=True)
                self.pool.dirty.add(key.id)
        return status, body

    async def refresh_models(self) -> None:
        """Background loop: keys without an owner-given model list re-ask their upstream."""
        interval = self.settings.upstream.models_refresh_minutes * 60
        while True:
            for key in self.pool:
                if key.models is None and key.enabled and key.status is not KeyStatus.INVALID:
                    await self.discover(key)
            await self.save_health()
            await asyncio.sleep(interval)

    # -- persistence of live state ---------------------------------------------------------

    async def seed_budgets(self, now: float) -> None:
        """Count what each key served today, so a restart does not refill its budget."""
        for row in await self.db.key_tokens_since(today_start(now)):
            key = self.pool.get(row["key_id"])
            if key is not None:
                key.add_tokens(row["tokens"] or 0, now)

    async def save_health(self) -> None:
        dirty, self.pool.dirty = self.pool.dirty, set()
        rows = []
        for key_id in dirty:
            key = self.pool.get(key_id)
            if key is None:
                continue
            discovered = key.discovered_models
            rows.append(
                {
                    "id": key.id,
                    "status": key.status.value,
                    "cooldown_until": key.cooldown_until,
                    "last_error": key.last_error,
                    "discovered_models": json.dumps(sorted(discovered)) if discovered else None,
                    "no_stream_options": int(key.no_stream_options),
                    "last_used_at": key.last_used_at,
                }
            )
        if rows:
            await self.db.save_key_health(rows)

    # -- presentation ----------------------------------------------------------------------

    def describe(self, key: PooledKey, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        status = key.effective_status(now)
        cooling = status in (KeyStatus.COOLING, KeyStatus.EXHAUSTED)
        served = key.served_models()
        return {
            "id": key.id,
            "label": key.label,
            "masked_key": key.masked,
            "base_url": key.base_url,
            "models": sorted(key.models) if key.models is not None else None,
            "discovered_models": sorted(served) if key.models is None and served else None,
            "status": status.value,
            "enabled": key.enabled,
            "visibility": key.visibility.value,
            "cooldown_until": iso(key.cooldown_until) if cooling else None,
            "last_error": redact(key.last_error) if key.last_error else None,
            "max_concurrent": key.max_concurrent,
            "rpm": key.rpm,
            "daily_tokens": key.daily_tokens,
            "tokens_today": key.tokens_used_today(now),
            "in_flight": key.in_flight,
            "created_at": iso(key.created_at),
            "last_used_at": iso(key.last_used_at),
        }


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _models(text: str | None) -> frozenset[str] | None:
    return frozenset(json.loads(text)) if text else None


def _model_ids(body: bytes) -> frozenset[str] | None:
    try:
        data = json.loads(body).get("data")
        ids = [m["id"] for m in data if isinstance(m.get("id"), str)]
    except (ValueError, AttributeError, TypeError, KeyError):
        return None
    return frozenset(ids[:MAX_MODELS])


def _printable(value: str) -> bool:
    return value.isprintable() and not any(ch in value for ch in "\r\n\t\x00")


def _check_secret(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(
            400, "'key' is required and must be a string.", param="key", code="invalid_value"
        )
    if len(value) > 1024 or not value.isascii() or not value.isprintable() or " " in value:
        raise ApiError(
            400,
            "'key' must be up to 1024 printable ASCII characters without spaces.",
            param="key",
            code="invalid_value",
        )
    return value


def _check_models(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [m.strip() for m in value.split(",") if m.strip()]
    if not isinstance(value, list) or len(value) > MAX_MODELS:
        raise ApiError(
            400, "'models' must be a list of model names.", param="models", code="invalid_type"
        )
    for model in value:
        if not isinstance(model, str) or not 1 <= len(model) <= 256 or not _printable(model):
            raise ApiError(
                400,
                "Each model name must be 1-256 printable characters.",
                param="models",
                code="invalid_value",
            )
    return frozenset(value) or None


def _check_label(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 100 or not _printable(value):
        raise ApiError(
            400,
            "'label' must be up to 100 printable characters.",
            param="label",
            code="invalid_value",
        )
    return value or None


# What an owner may change about a key after adding it (the base URL never changes).
_CHANGEABLE = frozenset(("label", "models", "enabled", "max_concurrent", "rpm", "daily_tokens"))

# The largest value each cap takes (a million, unless named here).
_CAP_MOST = {"daily_tokens": 10**12}


def _check_cap(payload: dict[str, Any], name: str, current: int | None = None) -> int | None:
    if name not in payload:
        return current
    value = payload[name]
    if value is None:
        return None
    most = _CAP_MOST.get(name, 1_000_000)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise ApiError(
            400, f"'{name}' must be a positive integer or null.", param=name, code="invalid_value"
        )
    return value

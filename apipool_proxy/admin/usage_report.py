"""The usage report behind GET /api/usage and ``apipool usage``."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ..accounts import User
from ..errors import ApiError
from ..state import Services

GROUPS = ("day", "model", "key", "user")
DEFAULT_DAYS = 30


async def usage_report(services: Services, user: User, query: Mapping[str, str]) -> dict[str, Any]:
    """The caller's own usage, and how others used the caller's keys.

    Admins may add ``all=true`` to see everyone's usage; only they may group by user.
    """
    now = time.time()
    until = _parse_time(query.get("until"), "until", now)
    since = _parse_time(query.get("since"), "since", until - DEFAULT_DAYS * 86400)
    group_by = query.get("group_by", "day")
    if group_by not in GROUPS or (group_by == "user" and not user.is_admin):
        raise ApiError(
            400,
            "'group_by' must be one of day, model, key.",
            param="group_by",
            code="invalid_value",
        )
    everyone = user.is_admin and query.get("all") in ("1", "true")
    own = await services.db.usage_rows(since, until, None if everyone else user.id, None)
    contributed = await services.db.usage_rows(since, until, None, user.id)
    others = [r for r in contributed if r["user_id"] != user.id]
    names = services.accounts.users
    return {
        "since": _iso(since),
        "until": _iso(until),
        "group_by": group_by,
        "scope": "everyone" if everyone else "own",
        "rows": _aggregate(own, group_by, names),
        # Other members' use of the caller's keys: totals only, never who; only an admin
        # may group by user (checked above).
        "contributed": _aggregate(others, group_by, names),
    }


def _aggregate(rows: list[Any], group_by: str, names: Mapping[int, User]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        label = _group_label(row, group_by, names)
        entry = groups.setdefault(
            label,
            {
                "group": label,
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "errors": 0,
            },
        )
        entry["requests"] += 1
        entry["prompt_tokens"] += row["prompt_tokens"] or 0
        entry["completion_tokens"] += row["completion_tokens"] or 0
        entry["total_tokens"] += row["total_tokens"] or 0
        if row["status"] >= 400:
            entry["errors"] += 1
    return [groups[label] for label in sorted(groups)]


def _group_label(row: Any, group_by: str, names: Mapping[int, User]) -> str:
    if group_by == "day":
        return datetime.fromtimestamp(row["created_at"], UTC).strftime("%Y-%m-%d")
    if group_by == "model":
        return row["model"] or "-"
    if group_by == "key":
        return f"key {row['key_id']}" if row["key_id"] is not None else "-"
    user = names.get(row["user_id"])
    return user.username if user else f"user {row['user_id']}"


def _parse_time(value: str | None, name: str, default: float) -> float:
    if not value:
        return default
    try:
        if value.replace(".", "", 1).isdigit():
            return float(value)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            400,
            f"'{name}' must be a date (2026-01-31), an ISO time or a Unix time.",
            param=name,
            code="invalid_value",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

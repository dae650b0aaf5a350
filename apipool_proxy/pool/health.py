"""What an upstream answer means for the key that got it.

The proxy keeps two things apart: an upstream that *answered* with an error (data: the
answer is classified here and either relayed or held against the key) and an upstream
that could not be reached (an exception, always held against the key).
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass


class Outcome(enum.Enum):
    OK = "ok"
    CALLER_ERROR = "caller_error"  # 400/404/413/422...: the caller's fault, relay as is
    RATE_LIMITED = "rate_limited"  # 429: cool down, try another key
    EXHAUSTED = "exhausted"  # out of credit: long cooldown, try another key
    INVALID = "invalid"  # 401/403: the key is bad, try another key
    SERVER_ERROR = "server_error"  # 500/502/503/504 or unreachable: try another key


# Statuses on which another key may do better (before any byte reached the caller).
RETRYABLE = frozenset(
    {Outcome.RATE_LIMITED, Outcome.EXHAUSTED, Outcome.INVALID, Outcome.SERVER_ERROR}
)

EXHAUSTED_COOLDOWN = 3600.0
MAX_BACKOFF = 300.0


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    retry_after: float | None = None  # seconds, when the upstream said


def classify_response(status: int, headers: Mapping[str, str], body: bytes) -> Verdict:
    if status < 400:
        return Verdict(Outcome.OK)
    if status == 429:
        if _is_quota_error(body):
            return Verdict(Outcome.EXHAUSTED)
        return Verdict(Outcome.RATE_LIMITED, retry_after_seconds(headers))
    if status in (401, 403):
        return Verdict(Outcome.INVALID)
    if status in (500, 502, 503, 504):
        return Verdict(Outcome.SERVER_ERROR, retry_after_seconds(headers))
    return Verdict(Outcome.CALLER_ERROR)


def _is_quota_error(body: bytes) -> bool:
    # OpenAI answers 429 with code/type "insufficient_quota" when the account has no credit.
    if b"insufficient_quota" not in body:
        return False
    try:
        error = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        return False
    return "insufficient_quota" in (error.get("code"), error.get("type"))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds until the upstream expects us back, from the headers OpenAI-style APIs send.

    ``retry-after-ms`` (OpenAI) wins over ``Retry-After`` (RFC 9110 section 10.2.3:
    seconds or an HTTP date); ``x-ratelimit-reset-*`` ("1s", "6m0s", "20ms") comes last.
    """
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        seconds = _parse_retry_after(value)
        if seconds is not None:
            return seconds
    resets = [
        _parse_duration(headers[name])
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if headers.get(name)
    ]
    known = [s for s in resets if s is not None]
    return max(known) if known else None


def _parse_retry_after(value: str) -> float | None:
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_duration(value: str) -> float | None:
    parts = _DURATION_PART.findall(value.strip())
    if not parts:
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def backoff_seconds(failures: int) -> float:
    """Cooldown after the n-th failure in a row: 1, 2, 4... seconds, at most 5 minutes."""
    return min(MAX_BACKOFF, 2.0 ** max(0, failures - 1))

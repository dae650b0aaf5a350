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
    # This key's account may not do what was asked (a model, an operation), another's may:
    # try another key, hold nothing against this one.
    NOT_ALLOWED = "not_allowed"
    RATE_LIMITED = "rate_limited"  # 429: cool down, try another key
    EXHAUSTED = "exhausted"  # out of credit (429 insufficient_quota, 402): long cooldown
    INVALID = "invalid"  # 401, or a 403 that names the key: the key is bad, try another
    FORBIDDEN = "forbidden"  # 403 for no reason we know: try another key, rest if it repeats
    SERVER_ERROR = "server_error"  # 5xx, 408 or unreachable: try another key


# Statuses on which another key may do better (before any byte reached the caller).
RETRYABLE = frozenset(
    {
        Outcome.RATE_LIMITED,
        Outcome.EXHAUSTED,
        Outcome.INVALID,
        Outcome.FORBIDDEN,
        Outcome.SERVER_ERROR,
    }
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
    if status == 402:  # no credit left (OpenRouter, DeepSeek)
        return Verdict(Outcome.EXHAUSTED)
    if status in (401, 403):
        return _classify_refusal(status, body)
    # 408: the upstream gave up waiting (OpenRouter); 529: overloaded (Anthropic-style).
    if status in (408, 500, 502, 503, 504, 529):
        return Verdict(Outcome.SERVER_ERROR, retry_after_seconds(headers))
    return Verdict(Outcome.CALLER_ERROR)


def _classify_refusal(status: int, body: bytes) -> Verdict:
    """A 401 or 403. Only what is surely about the key may take it out of the pool: a
    member who can make every key look invalid (with a flagged prompt, an operation
    restricted keys lack) could otherwise empty the pool for everyone."""
    error = _error_object(body)
    message = str(error.get("message") or "").lower()
    if "missing scopes" in message or "insufficient permissions" in message:
        # A restricted key (OpenAI) without the scope this operation needs.
        return Verdict(Outcome.NOT_ALLOWED)
    if status == 401:
        return Verdict(Outcome.INVALID)
    metadata = error.get("metadata")
    if (isinstance(metadata, dict) and "flagged_input" in metadata) or (
        "requires moderation" in message or "input was flagged" in message
    ):
        # The caller's input was flagged (OpenRouter answers 403): the caller's answer.
        # Narrowly matched: "your account was flagged" is about the key, not the input.
        return Verdict(Outcome.CALLER_ERROR)
    if error.get("code") == _UNSUPPORTED_REGION:
        return Verdict(Outcome.INVALID)  # the key can never work from this server
    return Verdict(Outcome.FORBIDDEN)


_UNSUPPORTED_REGION = "unsupported_country_region_territory"


def _error_object(body: bytes) -> dict:
    """The ``error`` object of an OpenAI-style error body; empty when there is none."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return {}
    return error if isinstance(error, dict) else {}


def _is_quota_error(body: bytes) -> bool:
    # OpenAI answers 429 with code/type "insufficient_quota" when the account has no credit.
    if b"insufficient_quota" not in body:
        return False
    error = _error_object(body)
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

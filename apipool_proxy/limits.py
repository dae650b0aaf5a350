"""Per-user limits: requests and tokens per minute, tokens per day, concurrent requests.

Counters live in memory. Tokens are counted as upstreams report them, after the fact: a
request is admitted on what the user has already used, never on a guess of what it will
use. Daily totals are seeded from the usage table at startup so a restart forgives nothing.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass, field

from .config import LimitSettings
from .errors import ApiError

WINDOW = 60.0
DAY = 86400.0


# One user's limits: the configured defaults with that user's overrides applied.
Limits = LimitSettings


@dataclass(slots=True)
class UserCounters:
    """One user's use of the last minute, kept as per-second buckets.

    At most 60 buckets whatever the request rate, so memory stays flat under load; limits
    are judged to the second (a bucket leaves the window when its first instant does).
    """

    # [second, requests started, tokens reported], oldest first
    window: deque[list[int]] = field(default_factory=deque)
    requests_in_window: int = 0
    tokens_in_window: int = 0
    day: int = 0
    tokens_today: int = 0
    in_flight: int = 0

    def bucket(self, now: float) -> list[int]:
        second = int(now)
        window = self.window
        if window and window[-1][0] == second:
            return window[-1]
        entry = [second, 0, 0]
        window.append(entry)
        return entry

    def frees_at(self, index: int) -> float:
        """When the oldest bucket holding requests (index 1) or tokens (2) leaves the window."""
        for entry in self.window:
            if entry[index]:
                return entry[0] + WINDOW
        return 0.0


class Limiter:
    def __init__(self, defaults: LimitSettings) -> None:
        self.defaults = defaults
        self._counters: dict[int, UserCounters] = {}

    def limits_for(self, overrides: dict[str, int | None]) -> Limits:
        if not overrides:
            return self.defaults  # the common case costs no allocation
        return dataclasses.replace(self.defaults, **overrides)

    def seed_today(self, user_id: int, tokens: int, now: float) -> None:
        counters = self._get(user_id, now)
        counters.tokens_today += tokens

    def admit(self, user_id: int, limits: Limits, now: float) -> UserCounters:
        """Count a request start, or raise 429 with Retry-After when a limit is reached."""
        counters = self._get(user_id, now)
        self._trim(counters, now)
        refusal = _refusal(counters, limits, now)
        if refusal is not None:
            message, wait = refusal
            seconds = max(1, math.ceil(wait))
            headers = {"Retry-After": str(seconds), **self.headers(counters, limits, now)}
            raise ApiError(
                429,
                f"{message} Try again in {seconds} s.",
                code="rate_limit_exceeded",
                type="requests",
                headers=headers,
            )
        counters.bucket(now)[1] += 1
        counters.requests_in_window += 1
        counters.in_flight += 1
        return counters

    def finish(self, counters: UserCounters, tokens: int | None, now: float) -> None:
        counters.in_flight -= 1
        if tokens:
            self._roll_day(counters, now)
            counters.bucket(now)[2] += tokens
            counters.tokens_in_window += tokens
            counters.tokens_today += tokens

    def headers(self, counters: UserCounters, limits: Limits, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the caller's own per-minute limits."""
        headers: dict[str, str] = {}
        if limits.rpm is None and limits.tpm is None:
            return headers
        if limits.rpm is not None:
            reset = max(0.0, counters.frees_at(1) - now)
            headers["x-ratelimit-limit-requests"] = str(limits.rpm)
            headers["x-ratelimit-remaining-requests"] = str(
                max(0, limits.rpm - counters.requests_in_window)
            )
            headers["x-ratelimit-reset-requests"] = _duration(reset)
        if limits.tpm is not None:
            reset = max(0.0, counters.frees_at(2) - now)
            headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(
                max(0, limits.tpm - counters.tokens_in_window)
            )
            headers["x-ratelimit-reset-tokens"] = _duration(reset)
        return headers

    def _get(self, user_id: int, now: float) -> UserCounters:
        counters = self._counters.get(user_id)
        if counters is None:
            counters = self._counters[user_id] = UserCounters(day=int(now // DAY))
        return counters

    def _trim(self, counters: UserCounters, now: float) -> None:
        horizon = now - WINDOW
        window = counters.window
        while window and window[0][0] <= horizon:
            _, requests, tokens = window.popleft()
            counters.requests_in_window -= requests
            counters.tokens_in_window -= tokens
        self._roll_day(counters, now)

    @staticmethod
    def _roll_day(counters: UserCounters, now: float) -> None:
        day = int(now // DAY)
        if day != counters.day:
            counters.day = day
            counters.tokens_today = 0


def _refusal(counters: UserCounters, limits: Limits, now: float) -> tuple[str, float] | None:
    """Why a new request must wait, and for how many seconds; None when it may start."""
    if limits.max_concurrent is not None and counters.in_flight >= limits.max_concurrent:
        return (
            f"You have {counters.in_flight} requests in flight, your limit is"
            f" {limits.max_concurrent}.",
            1,
        )
    if limits.rpm is not None and counters.requests_in_window >= limits.rpm:
        wait = counters.frees_at(1) - now
        return f"Rate limit reached: {limits.rpm} requests per minute.", wait
    if limits.tpm is not None and counters.tokens_in_window >= limits.tpm:
        wait = counters.frees_at(2) - now
        return f"Rate limit reached: {limits.tpm} tokens per minute.", wait
    if limits.daily_tokens is not None and counters.tokens_today >= limits.daily_tokens:
        wait = (counters.day + 1) * DAY - now
        return f"Daily token limit reached: {limits.daily_tokens} tokens per day (UTC).", wait
    return None


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "20ms"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def today_start(now: float | None = None) -> float:
    now = time.time() if now is None else now
    return (now // DAY) * DAY

"""One pooled upstream key and its live state."""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DAY = 86400.0


class KeyStatus(enum.StrEnum):
    ACTIVE = "active"
    COOLING = "cooling"  # rate-limited or failing; usable again after cooldown_until
    EXHAUSTED = "exhausted"  # out of quota; a long cooldown, then tried again
    INVALID = "invalid"  # rejected by its upstream (401/403); waits for its owner
    DISABLED = "disabled"  # switched off by its owner


class Visibility(enum.StrEnum):
    SHARED = "shared"  # on a well-known host: serves everyone
    PRIVATE = "private"  # on another host: serves its owner only
    APPROVED = "approved"  # on another host, but an admin let it serve everyone


@dataclass(slots=True, eq=False)
class PooledKey:
    id: int
    owner_id: int
    base_url: str
    secret: str
    masked: str
    label: str | None = None
    models: frozenset[str] | None = None  # given by the owner; None means "ask upstream"
    discovered_models: frozenset[str] | None = None  # from upstream GET /models
    enabled: bool = True
    on_shared_host: bool = True
    approved: bool = False
    status: KeyStatus = KeyStatus.ACTIVE
    cooldown_until: float | None = None
    last_error: str | None = None
    max_concurrent: int | None = None
    rpm: int | None = None
    # Tokens the key may serve per UTC day, all members together (its owner's budget).
    daily_tokens: int | None = None
    no_stream_options: bool = False
    # Models this key's account turned down (model_not_found) -> until when the key is
    # not offered them: a key listed for a model it cannot use is not tried over and over.
    refused_models: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    last_used_at: float | None = None
    # Live counters, never persisted.
    in_flight: int = 0
    failures: int = 0
    recent_starts: deque[float] = field(default_factory=deque)
    day: int = -1  # the UTC day tokens_today counts
    tokens_today: int = 0
    auth_header: str = ""
    host: str = ""

    def __post_init__(self) -> None:
        self.auth_header = "Bearer " + self.secret
        self.base_url = self.base_url.rstrip("/")
        self.host = urlsplit(self.base_url).hostname or ""

    @property
    def visibility(self) -> Visibility:
        if self.on_shared_host:
            return Visibility.SHARED
        return Visibility.APPROVED if self.approved else Visibility.PRIVATE

    def usable_by(self, user_id: int) -> bool:
        return self.owner_id == user_id or self.on_shared_host or self.approved

    def served_models(self) -> frozenset[str] | None:
        """The models this key serves, or None while that is unknown (try it for any)."""
        return self.models if self.models is not None else self.discovered_models

    def effective_status(self, now: float) -> KeyStatus:
        """The status with expired cooldowns taken into account."""
        if not self.enabled:
            return KeyStatus.DISABLED
        if self.status in (KeyStatus.COOLING, KeyStatus.EXHAUSTED):
            if self.cooldown_until is None or now >= self.cooldown_until:
                return KeyStatus.ACTIVE
        return self.status

    def ready(self, now: float) -> bool:
        """Usable for a new request now: enabled, not cooling or broken, under its caps."""
        if self.status is KeyStatus.ACTIVE and self.enabled:
            if self.max_concurrent is None and self.rpm is None and self.daily_tokens is None:
                return True  # the common case, decided without another call
            return not self.at_capacity(now)
        return self.effective_status(now) is KeyStatus.ACTIVE and not self.at_capacity(now)

    def at_capacity(self, now: float) -> bool:
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            return True
        if self.budget_spent(now):
            return True
        if self.rpm is not None:
            starts = self.recent_starts
            while starts and starts[0] <= now - 60.0:
                starts.popleft()
            return len(starts) >= self.rpm
        return False

    def capacity_free_at(self, now: float) -> float:
        """When a key held back only by its rpm cap frees a slot."""
        if self.rpm is not None and self.recent_starts and len(self.recent_starts) >= self.rpm:
            return self.recent_starts[0] + 60.0
        return now + 1.0

    def budget_spent(self, now: float) -> bool:
        """True when the key served its daily token budget today (UTC)."""
        if self.daily_tokens is None:
            return False
        return self.tokens_used_today(now) >= self.daily_tokens

    def budget_resets_at(self, now: float) -> float:
        return (now // DAY + 1) * DAY  # the next midnight, UTC

    def tokens_used_today(self, now: float) -> int:
        return self.tokens_today if self.day == int(now // DAY) else 0

    def add_tokens(self, tokens: int, now: float) -> None:
        """Count tokens the key served. A request already under way when the budget runs
        out still finishes, so a busy key may go a little over it."""
        day = int(now // DAY)
        if day != self.day:
            self.day, self.tokens_today = day, 0
        self.tokens_today += tokens

    def begin(self, now: float | None = None) -> None:
        self.in_flight += 1
        if self.rpm is not None:
            self.recent_starts.append(now if now is not None else time.time())

    def end(self) -> None:
        self.in_flight -= 1

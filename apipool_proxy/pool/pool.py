"""The pool: every upstream key in memory, indexed by model, and the choice of a key."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator

from ..log import pool_log, redact
from .health import EXHAUSTED_COOLDOWN, Outcome, Verdict, backoff_seconds
from .keys import KeyStatus, PooledKey

STRATEGIES = ("least_busy", "round_robin", "random")


class NoKeyAvailable(Exception):
    """No key can take this request now; ``status`` and the message say why."""

    def __init__(
        self, status: int, message: str, *, code: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


# Above this many keys of equal rank, least_busy compares two keys picked at random.
_SAMPLE_ABOVE = 4


def _less_busy_of_two(
    offered: tuple[tuple[int, PooledKey], ...], tried: set[int], now: float
) -> PooledKey | None:
    """The less busy of two different keys picked at random; None unless both are ready."""
    count = len(offered)
    first = int(random.random() * count)  # noqa: S311 - load spreading, not security
    second = int(random.random() * (count - 1))  # noqa: S311
    if second >= first:
        second += 1
    a, b = offered[first][1], offered[second][1]
    if not (a.ready(now) and b.ready(now)) or a.id in tried or b.id in tried:
        return None
    return a if a.in_flight <= b.in_flight else b


# A rank outweighs any number of requests in flight.
_RANK_WEIGHT = 1 << 40
_NO_SCORE = 2 * _RANK_WEIGHT


class KeyPool:
    def __init__(self, strategy: str = "least_busy", prefer_own_keys: bool = True) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        self.strategy = strategy
        self.prefer_own_keys = prefer_own_keys
        self._keys: dict[int, PooledKey] = {}
        # model -> ids of keys known to serve it; keys whose models are unknown are kept
        # apart and offered for every model until their upstream tells us.
        self._by_model: dict[str, set[int]] = {}
        self._open: set[int] = set()
        self._serving_cache: dict[str | None, tuple[PooledKey, ...]] = {}
        # (model, user id) -> (rank, key) for the keys that user may use, sorted by id;
        # rank 0 marks the user's own keys when they are preferred.
        self._offered_cache: dict[tuple[str | None, int], tuple[tuple[int, PooledKey], ...]] = {}
        self._turn = 0
        # Keys whose persisted state (status, cooldown, last error...) changed.
        self.dirty: set[int] = set()
        # When the first model refusal (see refuse_model) runs out.
        self._refusals_until = math.inf

    # -- membership ---------------------------------------------------------------------

    def add(self, key: PooledKey) -> None:
        self._keys[key.id] = key
        self._index(key)

    def remove(self, key_id: int) -> PooledKey | None:
        key = self._keys.pop(key_id, None)
        if key is not None:
            self._unindex(key)
            self.dirty.discard(key_id)
        return key

    def get(self, key_id: int) -> PooledKey | None:
        return self._keys.get(key_id)

    def __iter__(self) -> Iterator[PooledKey]:
        return iter(list(self._keys.values()))

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def known_models(self) -> dict[str, set[int]]:
        """Model name -> ids of the keys known to serve it."""
        return self._by_model

    def owned_by(self, user_id: int) -> list[PooledKey]:
        return [k for k in self._keys.values() if k.owner_id == user_id]

    def set_models(self, key: PooledKey, models: frozenset[str] | None, discovered: bool) -> None:
        """Change what a key serves and keep the model index in step."""
        self._unindex(key)
        if discovered:
            key.discovered_models = models
        else:
            key.models = models
        key.refused_models.clear()  # a new list: each model deserves a new try
        self._index(key)

    def refuse_model(self, key: PooledKey, model: str, until: float) -> None:
        """The key's upstream said it has no access to ``model``: do not offer the key for
        it until ``until``, even though its list names it."""
        key.refused_models[model] = until
        self._refusals_until = min(self._refusals_until, until)
        self.changed()

    def _expire_refusals(self, now: float) -> None:
        earliest = math.inf
        for key in self._keys.values():
            refused = key.refused_models
            for model in [m for m, until in refused.items() if until <= now]:
                del refused[model]
            earliest = min(earliest, *refused.values(), math.inf)
        self._refusals_until = earliest
        self.changed()

    def changed(self) -> None:
        """Forget cached choices: call after a key's models or who may use it changed."""
        self._serving_cache.clear()
        self._offered_cache.clear()

    def _index(self, key: PooledKey) -> None:
        self.changed()
        served = key.served_models()
        if served is None:
            self._open.add(key.id)
            return
        for model in served:
            self._by_model.setdefault(model, set()).add(key.id)

    def _unindex(self, key: PooledKey) -> None:
        self.changed()
        self._open.discard(key.id)
        for model in list(self._by_model):
            ids = self._by_model[model]
            ids.discard(key.id)
            if not ids:
                del self._by_model[model]

    # -- choosing a key -----------------------------------------------------------------

    def candidates(self, model: str | None, user_id: int) -> list[PooledKey]:
        """Keys this user may use that serve ``model`` (any model when None)."""
        return [k for k in self._serving(model) if k.usable_by(user_id)]

    def _serving(self, model: str | None) -> tuple[PooledKey, ...]:
        """Keys that serve ``model``, whoever may use them; cached until the pool changes."""
        found = self._serving_cache.get(model)
        if found is None:
            if model is None:
                ids: Iterable[int] = self._keys.keys()
            else:
                ids = self._by_model.get(model, set()) | self._open
            keys = (self._keys[i] for i in sorted(ids))
            found = tuple(k for k in keys if model is None or model not in k.refused_models)
            if len(self._serving_cache) >= 4096:
                self._serving_cache.clear()  # bounded: callers choose the model names
            self._serving_cache[model] = found
        return found

    def _offered(self, model: str | None, user_id: int) -> tuple[tuple[int, PooledKey], ...]:
        found = self._offered_cache.get((model, user_id))
        if found is None:
            prefer_own = self.prefer_own_keys
            # Sorted by rank (then id): equal ranks show as equal first and last entries.
            found = tuple(
                sorted(
                    (
                        (0 if prefer_own and key.owner_id == user_id else 1, key)
                        for key in self._serving(model)
                        if key.usable_by(user_id)
                    ),
                    key=lambda entry: (entry[0], entry[1].id),
                )
            )
            if len(self._offered_cache) >= 4096:
                self._offered_cache.clear()  # bounded: callers choose the model names
            self._offered_cache[(model, user_id)] = found
        return found

    def choose(self, model: str | None, user_id: int, tried: set[int], now: float) -> PooledKey:
        """Pick the key for the next attempt, or raise :class:`NoKeyAvailable`.

        One pass over the keys this user may use for the model: with ``prefer_own_keys``
        the user's own ready keys win over everyone else's; with ``least_busy`` fewer
        requests in flight win next; the strategy decides among the keys left equal.
        """
        if now >= self._refusals_until:
            self._expire_refusals(now)
        least_busy = self.strategy == "least_busy"
        offered = self._offered(model, user_id)
        if least_busy and len(offered) > _SAMPLE_ABOVE and offered[0][0] == offered[-1][0]:
            # Many keys of equal rank: the less busy of two picked at random ("power of two
            # choices"), which spreads load almost as well as scanning them all.
            key = _less_busy_of_two(offered, tried, now)
            if key is not None:
                return key
        best = _NO_SCORE  # score of the keys in ``equal``: rank first, then load
        equal: list[PooledKey] = []
        for rank, key in offered:
            if not key.ready(now) or key.id in tried:
                continue
            score = rank * _RANK_WEIGHT + (key.in_flight if least_busy else 0)
            if score < best:
                best = score
                equal = [key]
            elif score == best:
                equal.append(key)
        if not equal:
            raise self._explain(model, self.candidates(model, user_id), tried, now)
        return self._pick(equal)

    def _pick(self, equal: list[PooledKey]) -> PooledKey:
        if len(equal) == 1:
            return equal[0]
        if self.strategy == "round_robin":
            self._turn += 1  # the keys come sorted by id
            return equal[self._turn % len(equal)]
        # least_busy ties and random: load spreading, not security.
        return random.choice(equal)  # noqa: S311

    def _explain(
        self, model: str | None, candidates: list[PooledKey], tried: set[int], now: float
    ) -> NoKeyAvailable:
        what = f"model '{model}'" if model else "this request"
        if not candidates:
            if model is None:
                return NoKeyAvailable(
                    503, "The pool has no upstream key you can use yet.", code="no_keys"
                )
            return NoKeyAvailable(
                404,
                f"The model '{model}' does not exist or no key in the pool serves it.",
                code="model_not_found",
            )
        waits: list[float] = []
        counts: dict[str, int] = {}
        for key in candidates:
            reason, ready_at = _unavailable_reason(key, tried, now)
            counts[reason] = counts.get(reason, 0) + 1
            if ready_at is not None:
                waits.append(ready_at - now)
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        noun = "key" if len(candidates) == 1 else "keys"
        if waits and len(waits) == len(candidates) - counts.get("already tried", 0):
            wait = max(1, math.ceil(min(waits)))
            return NoKeyAvailable(
                429,
                f"Every key for {what} is busy or rate-limited ({summary}); the first is"
                f" ready again in {wait} s.",
                code="rate_limit_exceeded",
                retry_after=wait,
            )
        return NoKeyAvailable(
            503,
            f"No usable key for {what}: the {len(candidates)} {noun} that serve it are {summary}.",
            code="no_usable_key",
            retry_after=math.ceil(min(waits)) if waits else None,
        )

    # -- health ---------------------------------------------------------------------------

    def record(self, key: PooledKey, verdict: Verdict, error: str | None, now: float) -> None:
        """Apply what the upstream answered to the key's state."""
        outcome = verdict.outcome
        if outcome in (Outcome.OK, Outcome.CALLER_ERROR, Outcome.NOT_ALLOWED):
            key.failures = 0
            if key.status is not KeyStatus.ACTIVE and key.effective_status(now) is not (
                KeyStatus.INVALID
            ):
                self._set(key, KeyStatus.ACTIVE, None, None)
            return
        key.failures += 1
        error = redact(error)[:500] if error else outcome.value
        if outcome is Outcome.RATE_LIMITED:
            wait = verdict.retry_after or backoff_seconds(key.failures)
            self._set(key, KeyStatus.COOLING, now + wait, error)
        elif outcome is Outcome.EXHAUSTED:
            self._set(key, KeyStatus.EXHAUSTED, now + EXHAUSTED_COOLDOWN, error)
        elif outcome is Outcome.INVALID:
            self._set(key, KeyStatus.INVALID, None, error)
        elif key.failures >= 2 or verdict.retry_after:
            # One 5xx or dropped connection can be bad luck; a second in a row is a pattern.
            wait = verdict.retry_after or backoff_seconds(key.failures - 1)
            self._set(key, KeyStatus.COOLING, now + wait, error)
        else:
            key.last_error = error
            self.dirty.add(key.id)

    def _set(
        self, key: PooledKey, status: KeyStatus, until: float | None, error: str | None
    ) -> None:
        if status is not key.status:
            pool_log.warning(
                "key %d (%s) %s -> %s%s",
                key.id,
                key.masked,
                key.status.value,
                status.value,
                f": {error}" if error else "",
            )
        key.status = status
        key.cooldown_until = until
        if error is not None or status is KeyStatus.ACTIVE:
            key.last_error = error
        self.dirty.add(key.id)

    def reset(self, key: PooledKey) -> None:
        """Forget a key's failures (its owner re-checked or re-enabled it)."""
        key.failures = 0
        self._set(key, KeyStatus.ACTIVE, None, None)


def _unavailable_reason(key: PooledKey, tried: set[int], now: float) -> tuple[str, float | None]:
    if key.id in tried:
        return "already tried", None
    status = key.effective_status(now)
    if status is KeyStatus.COOLING and key.cooldown_until is not None:
        return "cooling down", key.cooldown_until
    if status is KeyStatus.EXHAUSTED and key.cooldown_until is not None:
        return "out of quota", None
    if status is KeyStatus.ACTIVE and key.budget_spent(now):
        return "out of their daily token budget", key.budget_resets_at(now)
    if status is KeyStatus.ACTIVE and key.at_capacity(now):
        return "at capacity", key.capacity_free_at(now)
    return status.value, None

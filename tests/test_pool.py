"""Choosing keys and judging answers: the real KeyPool and classifier, no server needed."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from apipool_proxy.pool import KeyPool, KeyStatus, Outcome, PooledKey
from apipool_proxy.pool.health import classify_response

MODEL = "gpt-4o-mini"


def _pool(count: int, owner: int = 1) -> KeyPool:
    pool = KeyPool("least_busy", prefer_own_keys=True)
    for key_id in range(1, count + 1):
        pool.add(
            PooledKey(
                id=key_id,
                owner_id=owner,
                base_url="https://api.example.com/v1",
                secret=f"sk-test-{key_id:04d}",
                masked="sk-...",
                models=frozenset({MODEL}),
            )
        )
    return pool


def _choices(pool: KeyPool, user_id: int, rounds: int = 2000) -> Counter[int]:
    now = time.time()
    return Counter(pool.choose(MODEL, user_id, set(), now).id for _ in range(rounds))


def test_least_busy_never_picks_the_busiest_of_many_keys_and_spreads_over_the_rest():
    pool = _pool(8)
    pool.get(3).in_flight = 5  # type: ignore[union-attr]
    picked = _choices(pool, user_id=2)
    assert 3 not in picked
    assert set(picked) == {1, 2, 4, 5, 6, 7, 8}
    assert min(picked.values()) > 2000 / 7 / 3  # roughly even, not one favourite


def test_least_busy_with_many_keys_skips_keys_that_are_not_ready():
    pool = _pool(8)
    for key_id in (1, 2, 3, 4, 5, 6):
        pool.get(key_id).status = KeyStatus.INVALID  # type: ignore[union-attr]
    pool.get(8).in_flight = 1  # type: ignore[union-attr]
    assert set(_choices(pool, user_id=2, rounds=200)) == {7}  # ready and least busy


def test_own_keys_win_over_the_pool_even_among_many():
    pool = _pool(8, owner=1)
    pool.add(
        PooledKey(
            id=99,
            owner_id=2,
            base_url="https://api.example.com/v1",
            secret="sk-test-own-key",
            masked="sk-...",
            models=frozenset({MODEL}),
        )
    )
    pool.get(99).in_flight = 50  # busy, but the caller's own  # type: ignore[union-attr]
    assert set(_choices(pool, user_id=2, rounds=200)) == {99}


def test_tried_keys_are_not_chosen_again():
    pool = _pool(6)
    tried = {1, 2, 3, 4, 5}
    now = time.time()
    assert {pool.choose(MODEL, 2, tried, now).id for _ in range(100)} == {6}


def test_a_refused_model_is_not_offered_until_the_refusal_runs_out():
    pool = _pool(2)
    key = pool.get(1)
    assert key is not None
    now = time.time()
    pool.refuse_model(key, MODEL, until=now + 60)
    assert {pool.choose(MODEL, 2, set(), now).id for _ in range(200)} == {2}
    assert [k.id for k in pool.candidates(MODEL, 2)] == [2]
    assert [k.id for k in pool.candidates("other", 2)] == []  # only listed models, as before
    later = now + 61
    assert {pool.choose(MODEL, 2, set(), later).id for _ in range(200)} == {1, 2}
    assert key.refused_models == {}
    # A new model list gives every model a new try at once.
    pool.refuse_model(key, MODEL, until=now + 60)
    pool.set_models(key, frozenset({MODEL}), discovered=False)
    assert [k.id for k in pool.candidates(MODEL, 2)] == [1, 2]


def _error(message: str, **fields: object) -> bytes:
    return json.dumps({"error": {"message": message, **fields}}).encode()


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (401, _error("Incorrect API key provided", code="invalid_api_key"), Outcome.INVALID),
        (401, b"<html>Unauthorized</html>", Outcome.INVALID),
        (401, _error("You have insufficient permissions. Missing scopes: x"), Outcome.NOT_ALLOWED),
        (403, _error("Missing scopes: api.files.write"), Outcome.NOT_ALLOWED),
        (
            403,
            _error("Country not supported", code="unsupported_country_region_territory"),
            Outcome.INVALID,
        ),
        (
            403,
            _error("Your chosen model requires moderation and your input was flagged"),
            Outcome.CALLER_ERROR,
        ),
        (403, _error("Declined", metadata={"flagged_input": "..."}), Outcome.CALLER_ERROR),
        (403, _error("Forbidden"), Outcome.FORBIDDEN),
        (403, _error("Your account has been flagged for review"), Outcome.FORBIDDEN),
        (403, b"<html>Forbidden</html>", Outcome.FORBIDDEN),
        (403, b'{"error": "a string"}', Outcome.FORBIDDEN),
        (402, _error("Insufficient credits"), Outcome.EXHAUSTED),
        (429, _error("You exceeded your quota", code="insufficient_quota"), Outcome.EXHAUSTED),
        (429, _error("Rate limit reached"), Outcome.RATE_LIMITED),
        (408, b"", Outcome.SERVER_ERROR),
        (529, _error("Overloaded"), Outcome.SERVER_ERROR),
        (404, _error("Unknown model", code="model_not_found"), Outcome.CALLER_ERROR),
        (422, _error("Unprocessable"), Outcome.CALLER_ERROR),
    ],
)
def test_upstream_errors_are_judged_by_what_they_say_about_the_key(status, body, outcome):
    assert classify_response(status, {}, body).outcome is outcome

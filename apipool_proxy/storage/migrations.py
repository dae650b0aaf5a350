"""Numbered schema migrations, applied in order at startup.

A migration is never edited once released: add a new one instead. ``PRAGMA user_version``
records how far a database file has come.
"""

MIGRATIONS: list[str] = [
    # 1: accounts, tokens, pooled keys, usage.
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE COLLATE NOCASE,
        password_hash TEXT NOT NULL,
        is_admin INTEGER NOT NULL DEFAULT 0,
        disabled INTEGER NOT NULL DEFAULT 0,
        limits TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE tokens (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        token_hash BLOB NOT NULL UNIQUE,
        kind TEXT NOT NULL CHECK (kind IN ('session', 'api')),
        name TEXT,
        created_at REAL NOT NULL,
        expires_at REAL,
        last_used_at REAL,
        revoked_at REAL
    );
    CREATE INDEX tokens_user ON tokens(user_id);
    CREATE TABLE upstream_keys (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        label TEXT,
        base_url TEXT NOT NULL,
        secret BLOB NOT NULL,
        masked TEXT NOT NULL,
        fingerprint BLOB NOT NULL,
        models TEXT,
        discovered_models TEXT,
        enabled INTEGER NOT NULL DEFAULT 1,
        approved INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL DEFAULT 'active',
        cooldown_until REAL,
        last_error TEXT,
        max_concurrent INTEGER,
        rpm INTEGER,
        no_stream_options INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        last_used_at REAL
    );
    CREATE INDEX upstream_keys_user ON upstream_keys(user_id);
    CREATE TABLE usage (
        id INTEGER PRIMARY KEY,
        created_at REAL NOT NULL,
        user_id INTEGER,
        token_id INTEGER,
        key_id INTEGER,
        key_owner_id INTEGER,
        model TEXT,
        endpoint TEXT NOT NULL,
        status INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        stream INTEGER NOT NULL,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        total_tokens INTEGER,
        upstream_ms REAL,
        total_ms REAL,
        request_id TEXT
    );
    CREATE INDEX usage_user_time ON usage(user_id, created_at);
    CREATE INDEX usage_owner_time ON usage(key_owner_id, created_at);
    """,
    # 2: objects that live on one upstream account (files, batches, responses...).
    """
    CREATE TABLE upstream_objects (
        object_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        key_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX upstream_objects_user ON upstream_objects(user_id, kind);
    """,
    # 3: a key's daily token budget, set by its owner.
    """
    ALTER TABLE upstream_keys ADD COLUMN daily_tokens INTEGER;
    """,
]

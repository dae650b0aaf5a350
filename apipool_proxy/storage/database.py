"""All SQL lives here. The rest of the package calls these methods and never builds SQL.

One aiosqlite connection (one worker thread) serves the process. WAL mode lets readers
proceed during writes; every write commits before its method returns, so a write the
API has acknowledged survives the process being killed.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from ..log import storage_log
from .migrations import MIGRATIONS

Row = sqlite3.Row


class StorageError(RuntimeError):
    """The database file cannot be opened or migrated."""


class UsernameTaken(Exception):
    pass


USAGE_COLUMNS = (
    "created_at",
    "user_id",
    "token_id",
    "key_id",
    "key_owner_id",
    "model",
    "endpoint",
    "status",
    "attempts",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "upstream_ms",
    "total_ms",
    "request_id",
)
_USAGE_ROW = "(" + ",".join("?" * len(USAGE_COLUMNS)) + ")"
# SQLite allows 32766 parameters per statement since 3.32 and 999 before.
_MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
_LARGEST_STATEMENT = min(512, _MAX_VARIABLES // len(USAGE_COLUMNS))


def _statement_sizes(rows: int) -> list[int]:
    """Rows per INSERT for a batch: the largest size while it fits, then powers of two."""
    sizes = [_LARGEST_STATEMENT] * (rows // _LARGEST_STATEMENT)
    rest = rows % _LARGEST_STATEMENT
    size = 1 << rest.bit_length()
    while rest:
        size >>= 1
        if rest >= size:
            sizes.append(size)
            rest -= size
    return sizes


@functools.cache
def _insert_usage_sql(rows: int) -> str:
    values = ",".join([_USAGE_ROW] * rows)
    return f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES {values}"  # noqa: S608


class Database:
    def __init__(self, conn: aiosqlite.Connection, path: str) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    async def open(cls, path: str) -> Database:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await aiosqlite.connect(path)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {path}: {exc}") from None
        conn.row_factory = sqlite3.Row
        db = cls(conn, path)
        try:
            await db._configure()
            await db._migrate()
        except sqlite3.Error as exc:
            await conn.close()
            raise StorageError(f"cannot prepare database {path}: {exc}") from None
        return db

    async def close(self) -> None:
        await self._conn.close()

    async def _configure(self) -> None:
        # synchronous=NORMAL in WAL mode loses nothing when the process dies (the WAL is
        # in the OS page cache); only a power cut can lose the last commits.
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA busy_timeout=5000",
            "PRAGMA foreign_keys=ON",
        ):
            await self._conn.execute(pragma)

    async def _migrate(self) -> None:
        async with self._conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise StorageError(
                f"database schema version {version} is newer than this release knows"
            )
        for number in range(version + 1, len(MIGRATIONS) + 1):
            storage_log.info("applying schema migration %d", number)
            await self._conn.executescript(
                "BEGIN;\n" + MIGRATIONS[number - 1] + f"\nPRAGMA user_version={number};\nCOMMIT;"
            )

    async def ping(self) -> bool:
        async with self._conn.execute("SELECT 1") as cur:
            return (await cur.fetchone()) is not None

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self._conn.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        async with self._conn.execute(sql, params) as cur:
            return await cur.fetchone()

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write and commit; return the new row id (inserts) or rows changed."""
        async with self._conn.execute(sql, params) as cur:
            result = cur.lastrowid if sql.lstrip().upper().startswith("INSERT") else cur.rowcount
        await self._conn.commit()
        return result or 0

    # -- users ------------------------------------------------------------------------

    async def create_user(
        self, username: str, password_hash: str, is_admin: bool, now: float
    ) -> int:
        try:
            return await self._write(
                "INSERT INTO users (username, password_hash, is_admin, created_at)"
                " VALUES (?, ?, ?, ?)",
                (username, password_hash, int(is_admin), now),
            )
        except sqlite3.IntegrityError:
            await self._conn.rollback()
            raise UsernameTaken(username) from None

    async def user_by_name(self, username: str) -> Row | None:
        return await self._fetchone("SELECT * FROM users WHERE username = ?", (username,))

    async def all_users(self) -> list[Row]:
        return await self._fetchall("SELECT * FROM users ORDER BY id")

    async def save_user_flags(
        self, user_id: int, is_admin: bool, disabled: bool, limits: str | None
    ) -> None:
        await self._write(
            "UPDATE users SET is_admin = ?, disabled = ?, limits = ? WHERE id = ?",
            (int(is_admin), int(disabled), limits, user_id),
        )

    # -- tokens -----------------------------------------------------------------------

    async def create_token(
        self,
        user_id: int,
        token_hash: bytes,
        kind: str,
        name: str | None,
        now: float,
        expires_at: float | None,
    ) -> int:
        return await self._write(
            "INSERT INTO tokens (user_id, token_hash, kind, name, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (user_id, token_hash, kind, name, now, expires_at),
        )

    async def revoke_token(self, token_id: int, now: float) -> None:
        await self._write(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (now, token_id),
        )

    async def live_tokens(self, now: float) -> list[Row]:
        return await self._fetchall(
            "SELECT id, user_id, token_hash, kind, name, created_at, expires_at, last_used_at"
            " FROM tokens WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
            (now,),
        )

    async def touch_tokens(self, last_used: Iterable[tuple[float, int]]) -> None:
        await self._conn.executemany(
            "UPDATE tokens SET last_used_at = ? WHERE id = ?", list(last_used)
        )
        await self._conn.commit()

    # -- upstream keys ----------------------------------------------------------------

    async def create_key(self, fields: dict[str, Any]) -> int:
        return await self._write(
            "INSERT INTO upstream_keys (user_id, label, base_url, secret, masked, fingerprint,"
            " models, max_concurrent, rpm, daily_tokens, approved, created_at)"
            " VALUES (:user_id, :label, :base_url, :secret, :masked, :fingerprint, :models,"
            " :max_concurrent, :rpm, :daily_tokens, :approved, :created_at)",
            fields,  # type: ignore[arg-type]
        )

    async def all_keys(self) -> list[Row]:
        return await self._fetchall("SELECT * FROM upstream_keys ORDER BY id")

    async def delete_key(self, key_id: int) -> None:
        await self._write("DELETE FROM upstream_keys WHERE id = ?", (key_id,))

    async def save_key_settings(self, key_id: int, fields: dict[str, Any]) -> None:
        await self._write(
            "UPDATE upstream_keys SET label = :label, models = :models, enabled = :enabled,"
            " approved = :approved, max_concurrent = :max_concurrent, rpm = :rpm,"
            " daily_tokens = :daily_tokens WHERE id = :id",
            {**fields, "id": key_id},  # type: ignore[arg-type]
        )

    async def save_key_health(self, rows: Iterable[dict[str, Any]]) -> None:
        await self._conn.executemany(
            "UPDATE upstream_keys SET status = :status, cooldown_until = :cooldown_until,"
            " last_error = :last_error, discovered_models = :discovered_models,"
            " no_stream_options = :no_stream_options, last_used_at = :last_used_at"
            " WHERE id = :id",
            list(rows),
        )
        await self._conn.commit()

    # -- usage ------------------------------------------------------------------------

    async def insert_usage(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert a batch, all or nothing: a failed batch is retried whole later.

        Each row is a tuple in USAGE_COLUMNS order. Rows go in a few multi-row INSERTs
        rather than one executemany: executemany gives up the GIL once per row, and each
        time the event loop thread has to hand it back, which under load cost the request
        path more than the insert itself. The statements have a few fixed sizes (powers of
        two), so the connection's statement cache holds a handful of them, not one per
        batch size.
        """
        try:
            start = 0
            for size in _statement_sizes(len(rows)):
                chunk = rows[start : start + size]
                start += size
                await self._conn.execute(
                    _insert_usage_sql(size), list(itertools.chain.from_iterable(chunk))
                )
            await self._conn.commit()
        except sqlite3.Error:
            # Rows inserted before the failure would otherwise ride along with the next
            # commit, and then again with the retry.
            await self._conn.rollback()
            raise

    async def usage_rows(
        self, since: float, until: float, user_id: int | None, key_owner_id: int | None
    ) -> list[Row]:
        """Usage between two times, for one caller, one key owner, or (both None) everyone."""
        return await self._fetchall(
            "SELECT created_at, user_id, key_id, key_owner_id, model, status, prompt_tokens,"
            " completion_tokens, total_tokens FROM usage"
            " WHERE created_at >= ? AND created_at < ?"
            " AND (? IS NULL OR user_id = ?) AND (? IS NULL OR key_owner_id = ?)"
            " ORDER BY created_at",
            (since, until, user_id, user_id, key_owner_id, key_owner_id),
        )

    async def key_usage_since(self, since: float) -> dict[int, tuple[int, int]]:
        """Requests and tokens per key since a time."""
        rows = await self._fetchall(
            "SELECT key_id, COUNT(*) AS requests, SUM(COALESCE(total_tokens, 0)) AS tokens"
            " FROM usage WHERE created_at >= ? AND key_id IS NOT NULL GROUP BY key_id",
            (since,),
        )
        return {row["key_id"]: (row["requests"], row["tokens"]) for row in rows}

    async def key_tokens_since(self, since: float) -> list[Row]:
        """Tokens each key served since a time (to seed daily budgets after a restart)."""
        return await self._fetchall(
            "SELECT key_id, SUM(COALESCE(total_tokens, 0)) AS tokens FROM usage"
            " WHERE created_at >= ? AND key_id IS NOT NULL GROUP BY key_id",
            (since,),
        )

    async def tokens_since(self, since: float) -> list[Row]:
        """Tokens used per user since a time (to seed daily limits after a restart)."""
        return await self._fetchall(
            "SELECT user_id, SUM(COALESCE(total_tokens, 0)) AS tokens FROM usage"
            " WHERE created_at >= ? GROUP BY user_id",
            (since,),
        )

    # -- objects held by one upstream account ------------------------------------------

    async def record_objects(self, rows: Sequence[tuple[str, str, int, int, float]]) -> None:
        await self._conn.executemany(
            "INSERT OR REPLACE INTO upstream_objects (object_id, kind, key_id, user_id,"
            " created_at) VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        await self._conn.commit()

    async def forget_objects(self, object_ids: Sequence[str]) -> None:
        await self._conn.executemany(
            "DELETE FROM upstream_objects WHERE object_id = ?", [(i,) for i in object_ids]
        )
        await self._conn.commit()

    async def all_objects(self) -> list[Row]:
        return await self._fetchall(
            "SELECT object_id, kind, key_id, user_id, created_at FROM upstream_objects"
        )

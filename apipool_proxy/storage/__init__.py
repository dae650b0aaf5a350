"""Persistence: SQLite through aiosqlite. Knows nothing of HTTP or of the pool."""

from .database import USAGE_COLUMNS, Database, StorageError, UsernameTaken

__all__ = ["USAGE_COLUMNS", "Database", "StorageError", "UsernameTaken"]

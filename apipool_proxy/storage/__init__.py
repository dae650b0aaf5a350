"""Persistence: SQLite through aiosqlite. Knows nothing of HTTP or of the pool."""

from .database import Database, StorageError, UsernameTaken

__all__ = ["Database", "StorageError", "UsernameTaken"]

"""Usage records, written behind the request path.

A proxied request appends one row to memory and never waits for the database. A named
background task writes the rows in batches about twice a second, together with the other
write-behind state (token last-use times, key health), and once more at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .log import storage_log
from .storage import USAGE_COLUMNS, Database

FLUSH_INTERVAL = 0.5


__all__ = ("USAGE_COLUMNS", "UsageRow", "WriteBehind")

# One row of the usage table: a plain tuple with the values in ``USAGE_COLUMNS`` order
# (created_at, user_id, token_id, key_id, key_owner_id, model, endpoint, status, attempts,
# stream, prompt_tokens, completion_tokens, total_tokens, upstream_ms, total_ms,
# request_id). A tuple, so that the request path builds it in one step and the batch
# insert binds it as it is.
UsageRow = tuple[Any, ...]


class WriteBehind:
    """Collects rows and state changes in memory and writes them in batches."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._usage: list[UsageRow] = []
        # Extra sources polled on every flush: each returns a coroutine or None.
        self._sources: list[Callable[[], Any]] = []
        # One flush at a time: the final flush at shutdown waits for a batch in progress.
        self._lock = asyncio.Lock()
        self._batch: asyncio.Future[None] | None = None
        self.written = 0

    def record(self, row: UsageRow) -> None:
        self._usage.append(row)

    @property
    def pending(self) -> int:
        return len(self._usage)

    def add_source(self, source: Callable[[], Any]) -> None:
        self._sources.append(source)

    async def run(self) -> None:
        """The background loop; cancelled at shutdown, after which :meth:`flush` runs once."""
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            # Shielded: a cancel must not land between a batch's insert, which the database
            # thread finishes regardless, and its bookkeeping here, or the final flush would
            # write the batch a second time.
            self._batch = asyncio.ensure_future(self._flush_logged())
            await asyncio.shield(self._batch)

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except Exception:
            storage_log.exception("writing usage and state failed; will retry")

    async def flush(self) -> None:
        async with self._lock:
            await self._write_pending()

    async def _write_pending(self) -> None:
        rows, self._usage = self._usage, []
        if rows:
            try:
                await self.db.insert_usage(rows)
            except BaseException:
                self._usage[:0] = rows  # keep them for the next try
                raise
            self.written += len(rows)
        for source in self._sources:
            pending = source()
            if pending is not None:
                await pending

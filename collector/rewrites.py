"""The rewrite generation: one counter that every rewrite of stored aggregates bumps.

Aggregators may keep a process-local cache of what the database already holds (rollup
registers, IP statistics value rows) and leave out statements it proves redundant. Such
a cache is only true while nobody lowered or deleted those rows. Every code path that
does -- rebuilds, retention, erasure -- bumps this counter in its own transaction, and
the batch writer reads it inside each batch transaction (``SQLiteStorage.write_batch``):
when it moved, the caches are emptied and the batch prepared again. The counter lives in
the database, so rewrites by other processes (the CLI, governance API) count too.
"""

from __future__ import annotations

from collector.storage.base import Transaction

GENERATION_SQL = "SELECT value FROM rollup_state WHERE name = 'rewrites'"
_BUMP = (
    "INSERT INTO rollup_state (name, value) VALUES ('rewrites', 1) "
    "ON CONFLICT (name) DO UPDATE SET value = rollup_state.value + 1"
)


async def bump(tx: Transaction) -> None:
    """Void every aggregator cache (call inside the rewriting transaction)."""
    await tx.execute(_BUMP)

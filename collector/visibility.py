"""Which hits count: one SQL condition shared by rollups, IP statistics and every view.

A hit whose visitor id or IP is under a block in force (6.2.4) — or whose IP is one of
the stored addresses inside a blocked network (``block_ips``) — is hidden from every view
except an admin's and left out of aggregates; releasing the block, or its end
(``expires_at``) passing, brings it back. ``active_blocks`` is a view per backend that
compares ``expires_at`` with the database clock, so an expired block stops hiding at
once. Use as ``... FROM hits WHERE <time range> AND {VISIBLE}`` (the table must be named
or aliased ``hits``).
"""

from __future__ import annotations

VISIBLE = (
    "NOT EXISTS (SELECT 1 FROM active_blocks b WHERE "
    "(b.kind = 'visitor' AND b.value = hits.visitor_id) OR (b.kind = 'ip' AND b.value = hits.ip) "
    "OR (b.kind = 'network' AND EXISTS "
    "(SELECT 1 FROM block_ips m WHERE m.block_id = b.id AND m.ip = hits.ip)))"
)

# Hits whose aggregates a writer still holds in its window (migration 0012). A rebuild
# leaves them out: the writer adds them when its window ends, or -- when the rebuild's
# rewrite voided its window -- aggregates them from these raw rows itself.
AGGREGATED = (
    "NOT EXISTS (SELECT 1 FROM aggregate_pending p WHERE hits.id BETWEEN p.first_id AND p.last_id)"
)

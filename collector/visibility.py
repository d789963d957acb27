"""Which hits count: one SQL condition shared by rollups, IP statistics and every view.

A hit whose visitor id or IP is under an active block (6.2.4) is hidden from every view
except an admin's and left out of aggregates; releasing the block brings it back.
Use as ``... FROM hits WHERE <time range> AND {VISIBLE}`` (the table must be named or
aliased ``hits``).
"""

from __future__ import annotations

VISIBLE = (
    "NOT EXISTS (SELECT 1 FROM blocks b WHERE b.released_at IS NULL AND "
    "((b.kind = 'visitor' AND b.value = hits.visitor_id) OR (b.kind = 'ip' AND b.value = hits.ip)))"
)

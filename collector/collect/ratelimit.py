"""Token buckets per key (app instance, client IP) for ``POST /collect``.

In memory and per worker process: with ``--workers N`` the effective limit is N times
the configured one. Buckets that have refilled completely carry no information and are
dropped when the table grows, so memory stays bounded under a flood of new keys.
"""

from __future__ import annotations

import math
import time

_MAX_KEYS = 100_000


class RateLimiter:
    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float | None = None) -> float:
        """0 when allowed (a token is spent); else the seconds until one is available."""
        if self.capacity <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if len(self._buckets) >= _MAX_KEYS and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _prune(self, now: float) -> None:
        full = [
            k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.capacity
        ]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= _MAX_KEYS:  # all busy: forget the oldest half
            for k in list(self._buckets)[: _MAX_KEYS // 2]:
                del self._buckets[k]


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))

"""The SQLite library behind every connection this project opens.

``pysqlite3-binary`` where its wheel exists (Linux x86_64): the standard library's
``sqlite3`` module built against a bundled SQLite 3.51, compiled with the lookaside
allocator. Debian's libsqlite3 3.40, behind the standard library's module, is built
without it (``OMIT_LOOKASIDE``), so every statement step goes to malloc for its small
allocations. On the writer's path that is ~14% of the CPU a hit costs (``bench.micro_statements``,
alternating) and ~10% of the writer process's CPU per request under load
(``bench.ab``; docs/PERFORMANCE.md, session 10). Elsewhere the standard library's module
serves, with the same API.

One process must use one SQLite library for a file. POSIX drops every lock a process
holds on a file when any of its descriptors to that file closes; SQLite works around that
only among the connections of one copy of the library, so a second copy in the same
process can release the first one's locks and let another process write under a reader
(https://www.sqlite.org/howtocorrupt.html, section 2.2.1). So nothing here imports
``sqlite3`` but this module (``tests/test_storage.py`` checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite3
else:
    try:
        from pysqlite3 import dbapi2 as sqlite3
    except ImportError:  # no wheel for this platform
        import sqlite3

__all__ = ["sqlite3"]


def _null(value: None) -> None:
    return value


# The module binds None through its adapter protocol: a registry miss, a failed
# ``__adapt__`` lookup whose AttributeError message is formatted and dropped, and a
# ``__conform__`` lookup. On a 22-column insert with 8 NULLs that is 6.6 against 4.0 µs
# a row with Python 3.11's module, and 13.6 against 3.0 with pysqlite3's (session 10). A
# pixel hit binds 5-6 NULLs (cookies, placement, referrer, geo). An adapter found in the
# registry skips the rest; it returns None, so the value is bound as NULL. Process-wide,
# as every ``register_adapter`` is: the same NULL for every connection.
sqlite3.register_adapter(type(None), _null)

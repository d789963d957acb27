"""Where every SQLite connection to a collector file is opened.

Two settings hold for every connection, whichever Python build runs us:

- ``secure_delete``: erased and expired rows (hits, spooled batches) are overwritten
  with zeros in the pages SQLite writes, not left in free space where a copy of the
  file would still hold them (policy 1.1 "destroying", 5.1). In WAL mode the zeroed
  pages reach the main file at the next checkpoint (every ~40 MB of writes); until
  then the old page images remain in it and in older WAL frames, so erasure and
  retention end with one (``SQLiteStorage.settle_deletes``).
  Debian's libsqlite3 is compiled with it on; builds without that compile option
  (pysqlite3's bundled SQLite, for one) leave it off.
- NULL parameters bind through a registered adapter (below).

So the package opens files only through ``connect``: ``tests/test_storage.py`` forbids
``sqlite3.connect`` and ``aiosqlite.connect`` elsewhere, and checks that every connection
of the store and the spool has it on even where the library's default is off.

The library is the standard library's ``sqlite3``; why not pysqlite3's bundled SQLite is
in docs/PERFORMANCE.md, session 10. Any second SQLite library would have to be the
process's only one for a file: POSIX drops every lock a process holds on a file when any
of its descriptors to it closes, and SQLite works around that only among the
connections of one copy of the library (https://www.sqlite.org/howtocorrupt.html, 2.2.1).
"""

from __future__ import annotations

import sqlite3
from typing import Any

__all__ = ["connect", "sqlite3"]


def _null(value: None) -> None:
    return value


# Python 3.11's sqlite3 binds None through its adapter protocol: a registry miss, a
# failed ``__adapt__`` lookup whose AttributeError message is formatted and dropped, and
# a ``__conform__`` lookup, ~0.23 µs per NULL (a 22-column insert with 8 NULLs: 5.1
# against 3.7 µs a row; docs/PERFORMANCE.md, session 9). A pixel hit binds 5-6 NULLs
# (cookies, placement, referrer, geo). An adapter found in the registry skips the rest;
# it returns None, so the value is bound as NULL. Process-wide, as every
# ``register_adapter`` is: the same NULL for every connection.
sqlite3.register_adapter(type(None), _null)


def connect(database: Any, **kwargs: Any) -> sqlite3.Connection:
    """``sqlite3.connect`` with ``secure_delete`` on (see above)."""
    conn: sqlite3.Connection = sqlite3.connect(database, **kwargs)
    conn.execute("PRAGMA secure_delete = ON")
    return conn

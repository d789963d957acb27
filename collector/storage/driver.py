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
- SQLite's memory statistics are off in every process that imports this module before
  opening a connection (``_memory_statistics_off``).

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

import _sqlite3
import ctypes
import logging
import sqlite3
import threading
from typing import Any

__all__ = ["connect", "sqlite3"]

logger = logging.getLogger(__name__)


# Python 3.11's sqlite3 binds None through its adapter protocol: a registry miss, a
# failed ``__adapt__`` lookup whose AttributeError message is formatted and dropped, and
# a ``__conform__`` lookup, ~0.23 µs per NULL (a 22-column insert with 8 NULLs: 5.1
# against 3.7 µs a row; docs/PERFORMANCE.md, session 9). A pixel hit binds 5-6 NULLs
# (cookies, placement, referrer, geo). An adapter found in the registry skips the rest;
# it returns None, so the value is bound as NULL. A builtin's bound method (an empty
# dict's ``get``: None for any key) runs without a Python frame: 345 fewer instructions
# a pixel hit than a function (session 13). Process-wide, as every ``register_adapter``
# is: the same NULL for every connection.
_null: Any = {}.get
sqlite3.register_adapter(type(None), _null)


def connect(database: Any, **kwargs: Any) -> sqlite3.Connection:
    """``sqlite3.connect`` with ``secure_delete`` on (see above)."""
    conn: sqlite3.Connection = sqlite3.connect(database, **kwargs)
    conn.execute("PRAGMA secure_delete = ON")
    return conn


_SQLITE_CONFIG_MEMSTATUS = 9  # sqlite3.h


def _memory_statistics_off() -> bool:
    """Turn off SQLite's memory statistics (``SQLITE_CONFIG_MEMSTATUS``) for this process.

    They are on by default: every allocation SQLite makes takes a global mutex to count
    itself, and the sqlite3 module makes several a hit (one per text it binds, as
    ``SQLITE_TRANSIENT`` copies it). Off, the writer's batch took 10.6% fewer
    instructions a stored hit (50,038 -> 44,729; docs/PERFORMANCE.md, session 13). We
    read no statistic and set no soft heap limit, which needs them.

    The option can only be set while the library is shut down, and the sqlite3 module
    initialises it on import. So this shuts it down and starts it again, which is safe
    only while nothing holds SQLite memory and no other thread can start to. With the
    statistics on, the first is exactly: the bytes in use are those of one allocation
    made here to check. That also proves they are on (off, SQLite reports 0 in use
    whatever is open). Otherwise, in a process that runs other threads already, or where
    the sqlite3 module's SQLite cannot be reached (a static build that hides its
    symbols), it leaves the library as it is. Returns whether the statistics are now
    off."""
    if threading.active_count() != 1:
        return False
    try:
        # The extension module's handle: its symbols resolve to the SQLite it uses.
        lib = ctypes.CDLL(_sqlite3.__file__)
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        lib.sqlite3_malloc.restype = ctypes.c_void_p
        lib.sqlite3_msize.argtypes = [ctypes.c_void_p]
        lib.sqlite3_msize.restype = ctypes.c_uint64
        lib.sqlite3_free.argtypes = [ctypes.c_void_p]
        probe = lib.sqlite3_malloc(64)
        if not probe:
            return False
        alone = lib.sqlite3_memory_used() == lib.sqlite3_msize(probe)
        lib.sqlite3_free(probe)
    except (OSError, AttributeError):
        return False
    if not alone:
        logger.debug("SQLite is in use already: its memory statistics stay on")
        return False
    if lib.sqlite3_shutdown() != 0:
        return False
    done = bool(lib.sqlite3_config(_SQLITE_CONFIG_MEMSTATUS, ctypes.c_int(0)) == 0)
    if lib.sqlite3_initialize() != 0:  # pragma: no cover - the library cannot start
        raise RuntimeError("SQLite could not be initialised again")
    return done


MEMORY_STATISTICS_OFF = _memory_statistics_off()

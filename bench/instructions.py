"""Instructions a stored hit: the write path's cost counted, not timed.

This host's timings swing by 2x between minutes (other tenants share its cores), so a
change worth 5-10% cannot be seen in rows/s without many rounds. Valgrind's cachegrind
counts the instructions a process executes, in user space, and gives the same count
run after run. This runs ``SQLiteStorage.write_batch`` as the writer process does (sole
writer, batches of 2,000, the cyclic GC paused per batch, close included), without the
aggregators (rollups and IP statistics: ``micro_writer``'s write path figure), twice under
cachegrind, with a small and a large number of hits. The difference divided by the
difference in hits is the cost of one hit, without start-up, imports or migrations.

What it does not count: the kernel (page reads, WAL writes, fsync at checkpoints: see
``micro_writer``'s wall time), cache misses and waits. So it ranks changes to the work
the writer does; rows/s remains the target's figure.

    python -m bench.instructions [--tree DIR ...] [--mix target,returning,new] [--grown N]

``--tree`` (repeatable) names source trees to compare, for example one made by ``git
worktree add``; the default is this one. Mixes: ``target`` is ``micro_writer``'s target
rows (every hit a new visitor id), ``returning`` its realistic mix (``_visits``), and
``new`` every hit a new random visitor. ``--grown N`` writes into a copy of a store that
already holds N hits (each tree builds its own) instead of an empty one. Needs Debian's
``valgrind``; about a minute a tree and mix.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SMALL, _LARGE = 8_000, 40_000
_MIXES = ("target", "returning", "new")


def _rows(hits: int) -> dict[str, list[tuple[object, ...]]]:
    """The mixes, enriched as the writer enriches them, as plain tuples."""
    from bench.micro_writer import _new_visitors, _settings, _target_hits, _visits
    from bench.mix import build_mix
    from collector.enrich import Enricher
    from collector.geo import GeoIP
    from collector.storage.base import RawHit

    settings = _settings(Path(tempfile.gettempdir()) / "unused.db")
    geoip = GeoIP(settings.geoip)
    geoip.open()
    try:
        enricher = Enricher(settings, geoip)
        # The start of an hour, so no run's hits cross into a new hour (hours rows).
        mix, now = build_mix(), int(time.time() // 3600 * 3600 * 1000)
        items = _target_hits(mix, hits * 10 // 7 + 10, now)
        target = [enricher.row(x) for x in items if isinstance(x, RawHit)][:hits]
        returning = [enricher.row(x) for x in _visits(mix, hits, now)]
    finally:
        geoip.close()
    new = _new_visitors(target, random.Random(5))
    return {
        "target": [tuple(r) for r in target],
        "returning": [tuple(r) for r in returning],
        "new": [tuple(r) for r in new],
    }


def _child(tree: str, rows_file: str, mix: str, hits: int, store: str, seed: str) -> None:
    """Under cachegrind: write ``hits`` rows of ``mix`` with ``tree``'s code and close."""
    sys.path.insert(0, tree)
    import gc

    import collector

    if not Path(collector.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"--tree {tree}: no collector package there")
    from collector.config import load_settings
    from collector.storage.base import Batch, HitRow
    from collector.storage.sqlite import SQLiteStorage
    from collector.writer_process import BatchCollection

    # Under cachegrind everything runs ~50x slower: a policy by wall time would fire far
    # more often than it does at full speed, and make the count depend on the host's
    # load. The writer notes the hours after 32,768 hits or 30 s; only the count counts.
    storage_module = sys.modules[SQLiteStorage.__module__]
    if hasattr(storage_module, "_NOTE_AGE_S"):
        storage_module._NOTE_AGE_S = float("inf")  # type: ignore[attr-defined]

    with open(rows_file, "rb") as f:  # every run builds them all: only the writes differ
        rows = [HitRow(*r) for r in pickle.load(f)[mix]]
    gc.collect()
    gc.freeze()  # the input rows are not the writer's to traverse
    if seed:
        shutil.copyfile(seed, store)
    settings = load_settings(
        None,
        environ={"COLLECTOR_STORAGE_PATH": store, "COLLECTOR_CONSENT_SECRET": "x" * 32},
    )
    collection = BatchCollection()

    async def write() -> None:
        storage = SQLiteStorage(settings, sole_writer=True)
        await storage.open()
        try:
            for i in range(0, hits, 2000):
                with collection.after():
                    await storage.write_batch(Batch(hits=rows[i : min(hits, i + 2000)]))
        finally:
            await storage.close()

    asyncio.run(write())


def _count(tree: Path, rows_file: Path, mix: str, hits: int, work: Path, seed: str) -> int:
    store = work / "count.db"
    err = _run_child(
        "--child", str(tree), str(rows_file), mix, str(hits), str(store), seed, valgrind=True
    )
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", err)
    if found is None:
        raise SystemExit(f"cachegrind gave no count:\n{err[-2000:]}")
    return int(found.group(1).replace(",", ""))


def _grow(tree: str, rows_file: str, hits: int, store: str) -> None:
    """A closed store of ``hits`` hits, written with ``tree``'s code, in the hours before
    the rows: the target rows again, each from a new random visitor (as
    ``micro_writer``'s grown store)."""
    sys.path.insert(0, tree)
    from collector.config import load_settings
    from collector.storage.base import Batch, HitRow
    from collector.storage.sqlite import SQLiteStorage

    with open(rows_file, "rb") as f:
        rows = [HitRow(*r) for r in pickle.load(f)["target"]]
    settings = load_settings(
        None,
        environ={"COLLECTOR_STORAGE_PATH": store, "COLLECTOR_CONSENT_SECRET": "x" * 32},
    )
    rnd = random.Random(3)
    start = rows[0].ts_ms - hits // 18 - 3_600_000

    async def write() -> None:
        storage = SQLiteStorage(settings, sole_writer=True)
        await storage.open()
        try:
            for first in range(0, hits, 8000):
                part = [
                    rows[i % len(rows)]._replace(
                        ts_ms=start + i // 18,
                        visitor_id=f"{rnd.getrandbits(128):032x}",
                        session_id=f"{rnd.getrandbits(128):032x}",
                    )
                    for i in range(first, min(hits, first + 8000))
                ]
                await storage.write_batch(Batch(hits=part))
        finally:
            await storage.close()

    asyncio.run(write())


def _run_child(*args: str, valgrind: bool) -> str:
    tool = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    out = subprocess.run(
        [*(tool if valgrind else []), sys.executable, "-m", "bench.instructions", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    return out.stderr


def main(argv: list[str] | None = None) -> dict[tuple[str, str], float]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(*argv[1:4], int(argv[4]), argv[5], argv[6] if len(argv) > 6 else "")
        return {}
    if argv[:1] == ["--grow"]:
        _grow(argv[1], argv[2], int(argv[3]), argv[4])
        return {}
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tree", action="append", type=Path, help="source tree (repeatable)")
    ap.add_argument("--mix", default=",".join(_MIXES), help="comma-separated: " + ", ".join(_MIXES))
    ap.add_argument("--grown", type=int, default=0, help="hits already stored (0: empty)")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.instructions needs valgrind (apt-get install valgrind)")
    trees = [t.resolve() for t in args.tree or [Path(__file__).resolve().parent.parent]]
    mixes = [m for m in args.mix.split(",") if m]
    if unknown := set(mixes) - set(_MIXES):
        raise SystemExit(f"--mix: unknown {', '.join(sorted(unknown))}")
    results: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="collector-instructions-") as tmp:
        work = Path(tmp)
        rows_file = work / "rows.pkl"
        with open(rows_file, "wb") as f:
            pickle.dump(_rows(_LARGE), f)
        for tree in trees:
            seed = ""
            if args.grown:
                seed = str(work / "grown.db")
                _run_child(
                    "--grow", str(tree), str(rows_file), str(args.grown), seed, valgrind=False
                )
            for mix in mixes:
                small = _count(tree, rows_file, mix, _SMALL, work, seed)
                large = _count(tree, rows_file, mix, _LARGE, work, seed)
                results[(str(tree), mix)] = (large - small) / (_LARGE - _SMALL)
                print(f"{tree}  {mix:10} {results[(str(tree), mix)]:9,.0f} instructions a hit")
    return results


if __name__ == "__main__":
    main()

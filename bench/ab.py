"""A/B of collector settings in one run: the bare pixel and one collector per variant.

Each variant is ``NAME=KEY=VALUE,KEY=VALUE`` (environment overrides, e.g.
``COLLECTOR_STORAGE_BATCH_SIZE=2000``; an empty list is the defaults). Servers are placed
as in ``bench.run`` (uvicorn on CPU 1, the writer process and wrk on CPU 0), driven in
alternating rounds, and reported as medians: req/s, ratio to bare, CPU per request of the
serving and writer processes, p99. This is how a setting's default is chosen.

    python -m bench.ab default= big=COLLECTOR_STORAGE_BATCH_SIZE=8000 [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.mix import build_mix, collector_env
from bench.run import LOAD_CPU, Server, start_bare, start_collector, wait_flushed, wrk


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, pairs = text.partition("=")
    env = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
    return name, env


Rounds = dict[str, list[tuple[float, float, float, float, float]]]


def main(argv: list[str] | None = None) -> Rounds:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("variants", nargs="+", type=_variant)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=6)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="collector-ab-"))
    data = work / "mix.tsv"
    build_mix().write_lua_data(data)
    servers: dict[str, Server] = {"bare": start_bare(work, collector_env(work / "bare.db"))}
    results: Rounds = {"bare": []}
    try:
        for name, env in args.variants:
            servers[name] = start_collector(
                work,
                {**collector_env(work / f"{name}.db"), **env},
                tag=f"-{name}",
                writer_cpu=LOAD_CPU,
            )
            results[name] = []
        for server in servers.values():
            wrk(server.url, data, 3)
        for _ in range(args.rounds):
            for name, server in servers.items():
                if name != "bare":
                    wait_flushed(server)
                before = server.cpu_s()
                out = wrk(server.url, data, args.duration)
                if name != "bare":
                    wait_flushed(server)
                after = server.cpu_s()
                n = out["requests"]
                results[name].append(
                    (
                        out["rps"],
                        (after[0] - before[0]) / n * 1e6,
                        (after[1] - before[1]) / n * 1e6,
                        out["p99_us"] / 1000,
                        out["wrk_cpu_us"],
                    )
                )
                time.sleep(0.5)
    finally:
        for server in servers.values():
            server.stop()
    bare = statistics.median(r[0] for r in results["bare"])
    for name, rows in results.items():
        rps, serving, writer, p99, load = (statistics.median(r[i] for r in rows) for i in range(5))
        print(
            f"{name:12} {rps:8.0f} req/s  /bare {rps / bare:.2f}  serving {serving:5.1f} us"
            f"  writer {writer:5.1f} us  wrk {load:5.1f} us  p99 {p99:.1f} ms"
        )
    return results


if __name__ == "__main__":
    main()

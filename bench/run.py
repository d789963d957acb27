"""``make bench``: the bare Starlette pixel against the real collector, in one run.

Both servers run under uvicorn (1 worker, uvloop, httptools) pinned to CPU 1; wrk runs
pinned to CPU 0 with bench/pixel.lua and the same request mix against both, in
alternating rounds (the machine is noisy: only ratios from the same run mean anything).
Then: p99 at half the collector's peak rate, an exact rows == consented-200s check with
our own client, resident memory across 1M hits, and ``--workers 2`` against 1.

    python -m bench.run [--rounds 3] [--duration 10] [--memory-hits 1000000] [--micro]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from bench.client import drive
from bench.mix import ROOT, build_mix, collector_env

SERVER_CPU = "1"
LOAD_CPU = "0"
LUA = ROOT / "bench" / "pixel.lua"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process (optionally pinned) with its log in the work directory."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], work: Path, cpu: str | None
    ) -> None:
        self.name = name
        self.port = _free_port()
        self.log = open(work / f"{name}.log", "wb")
        pin = ["taskset", "-c", cpu] if cpu is not None else []
        self.proc = subprocess.Popen(
            [*pin, sys.executable, *argv, "--port", str(self.port)],
            env=env,
            cwd=work,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/p.gif", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start; see {self.log.name}")

    def children(self) -> list[int]:
        """Child processes: uvicorn workers and the collector's writer process."""
        found: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):  # per thread
            try:
                found += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        return found

    def writer_pid(self) -> int | None:
        """The collector's writer process (``collector.writer_process``), if it has one."""
        for pid in self.children():
            try:
                if b"collector.writer_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                pass
        return None

    def rss_mb(self) -> float:
        """Resident memory of the server and its children (workers, writer), in MB."""
        total = 0
        for pid in [self.proc.pid, *self.children()]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds (user + system) used so far: (serving processes, writer process).

        Per request, this is the figure that survives a noisy machine: other processes
        steal wall time from the server, not CPU time charged to it.
        """
        writer = self.writer_pid()
        serving = sum(_cpu_s(p) for p in [self.proc.pid, *self.children()] if p != writer)
        return serving, _cpu_s(writer) if writer is not None else 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _cpu_us(server: Server, before: tuple[float, float], requests: int) -> tuple[float, float]:
    """CPU µs a request of the serving processes and of the writer process since
    ``before`` (``server.cpu_s()``), for ``requests`` requests."""
    serving, writing = server.cpu_s()
    return (serving - before[0]) / requests * 1e6, (writing - before[1]) / requests * 1e6


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_bare(work: Path, env: dict[str, str], cpu: str | None = SERVER_CPU) -> Server:
    argv = [
        "-m", "uvicorn", "bench.bare_app:create_app", "--factory", "--loop", "uvloop",
        "--http", "httptools", "--no-access-log", "--no-proxy-headers",
        "--no-server-header", "--log-level", "warning", "--lifespan", "off",
    ]  # fmt: skip
    return Server("bare", argv, env, work, cpu)


def start_collector(
    work: Path,
    env: dict[str, str],
    cpu: str | None = SERVER_CPU,
    workers: int = 1,
    tag: str = "",
    writer_cpu: str | None = None,
) -> Server:
    """``collector serve``; ``writer_cpu`` ("0", or "0,1") moves its writer process there."""
    argv = ["-m", "collector", "serve", "--workers", str(workers)]
    server = Server(f"collector{tag}", argv, env, work, cpu)
    writer = server.writer_pid()
    if writer_cpu is not None and writer is not None:
        # Every thread: affinity is per thread, and the writer's SQLite threads started
        # (on uvicorn's CPU, inherited) before it answered. Pinning only the main thread
        # left the SQLite work on the serving core (sessions 1-2 measured that by mistake).
        cpus = {int(cpu) for cpu in writer_cpu.split(",")}
        for task in Path(f"/proc/{writer}/task").iterdir():
            os.sched_setaffinity(int(task.name), cpus)
    return server


def wrk(
    url: str,
    data: Path,
    duration: float,
    *,
    connections: int = 32,
    threads: int = 1,
    delay_ms: int = 0,
    cpu: str | None = LOAD_CPU,
) -> dict[str, Any]:
    pin = ["taskset", "-c", cpu] if cpu is not None else []
    cmd = [
        *pin, "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
        "--timeout", "5s", "-s", str(LUA), f"{url}/p.gif", "--", str(data), str(delay_ms),
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks = _cpu_ticks()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    busy = _busy(ticks, _cpu_ticks())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for line in out.splitlines():
        if line.startswith("BENCH "):
            result: dict[str, Any] = json.loads(line[6:])
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            # wrk's own CPU (taskset execs it): it shares CPU 0 with the writer process.
            spent = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            result["wrk_cpu_us"] = spent / max(result["requests"], 1) * 1e6
            result["cpu_busy"] = busy
            return result
    raise RuntimeError(f"wrk printed no result:\n{out}")


def _cpu_ticks() -> list[tuple[int, int]]:
    """(busy, total) jiffies of each CPU since boot, from /proc/stat."""
    found = []
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(x) for x in fields[:8]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            found.append((sum(ticks) - idle, sum(ticks)))
    return found


def _busy(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    """Each CPU's busy share between two readings (all processes, the kernel's included):
    which core is the limit in a round, where per-process CPU only tells who used it."""
    return [(b1 - b0) / max(1, t1 - t0) for (b0, t0), (b1, t1) in zip(before, after, strict=True)]


def queue_depth(server: Server) -> int:
    with urllib.request.urlopen(f"{server.url}/healthz", timeout=5) as resp:
        return int(json.load(resp)["queue_depth"])


def wait_flushed(server: Server, timeout: float = 60) -> None:
    """The writer has stored everything accepted so far (``/healthz`` queue_depth == 0)."""
    deadline = time.monotonic() + timeout
    while queue_depth(server) != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("writer did not drain")
        time.sleep(0.05)


def db_counts(db: Path) -> tuple[int, Counter[str]]:
    """Rows in ``hits`` and hits per consent state in ``pixel_counts``."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        hits = conn.execute("SELECT count(*) FROM hits").fetchone()[0]
        by_state: Counter[str] = Counter(
            dict(conn.execute("SELECT consent, sum(hits) FROM pixel_counts GROUP BY consent"))
        )
    finally:
        conn.close()
    return int(hits), by_state


class RssSampler(threading.Thread):
    def __init__(self, server: Server, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.samples: list[float] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.samples.append(self.server.rss_mb())


class DepthSampler(RssSampler):
    """The writer's queue depth during a run: a writer that falls behind shows here."""

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                self.samples.append(queue_depth(self.server))
            except OSError:
                pass


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def profile(pid: int, seconds: int, out: Path) -> None:
    """Sample process ``pid`` with py-spy (raw stacks, Python frames)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250",
           "--format", "raw", "--output", str(out), "--nonblocking"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)


def summarize_profile(raw: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        count = int(n)
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"{samples} samples; self% / total% by frame"]
    for frame, n in own.most_common(top):
        lines.append(f"  {100 * n / samples:5.1f}% {100 * total[frame] / samples:5.1f}%  {frame}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--exact", type=int, default=20_000, help="requests in the exactness check")
    ap.add_argument("--memory-hits", type=int, default=1_000_000, help="0 skips the RSS phase")
    ap.add_argument("--skip-workers", action="store_true", help="skip --workers 2 vs 1")
    ap.add_argument(
        "--profile", type=Path,
        help="py-spy raw output of a collector round: FILE (serving), FILE.writer",
    )  # fmt: skip
    ap.add_argument("--micro", action="store_true", help="also run the micro-benchmarks")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--baseline", type=Path, help="also run the collector from this source tree")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--writer-cpu", default=LOAD_CPU, help="CPU for the collector's writer process")
    ap.add_argument(
        "--skip-variants",
        action="store_true",
        help="skip the one-core and inline-writer collectors",
    )
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="collector-bench-"))
    db = work / "collector.db"
    env = collector_env(db)
    mix = build_mix()
    data = work / "mix.tsv"
    mix.write_lua_data(data)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version}}
    servers: list[Server] = []
    ok = True
    try:
        bare = start_bare(work, env)
        servers.append(bare)
        # The collector as shipped: the writer process on the load generator's core,
        # which it shares with wrk (~20-30 us of wrk per request, printed per round);
        # uvicorn on CPU 1.
        coll = start_collector(work, env, writer_cpu=args.writer_cpu)
        servers.append(coll)
        sampler = RssSampler(coll)
        sampler.start()
        served = 0
        print(f"work dir {work}; warming up", flush=True)
        wrk(bare.url, data, 3, connections=args.connections)
        served += wrk(coll.url, data, 3, connections=args.connections)["requests"]

        contenders: list[tuple[str, Server, Path | None]] = [
            ("bare", bare, None),
            ("collector", coll, db),
        ]
        if not args.skip_variants:
            # Every request through the ASGI path (``server.fast_path = false``: what the
            # parser-callback pixel buys); the writer process left to the scheduler on
            # either core (as a deployment runs it); everything on one core (the writer
            # process pinned beside uvicorn); and the writer in a thread of the worker
            # (``writer_process = false``, the earlier design). Same run, same rounds.
            for tag, extra, writer_cpu in (
                ("asgi", {"COLLECTOR_SERVER_FAST_PATH": "false"}, args.writer_cpu),
                ("writer-any", {}, f"{LOAD_CPU},{SERVER_CPU}"),
                ("one-core", {}, None),
                ("inline", {"COLLECTOR_STORAGE_WRITER_PROCESS": "false"}, None),
            ):
                v_db = work / f"{tag}.db"
                variant = start_collector(
                    work, {**collector_env(v_db), **extra}, tag=f"-{tag}", writer_cpu=writer_cpu
                )
                servers.append(variant)
                contenders.append((tag, variant, v_db))
                wrk(variant.url, data, 3, connections=args.connections)
        if args.baseline:
            # The same collector from another source tree (e.g. `git archive` of main),
            # to measure a code change A/B in the same run.
            base_db = work / "baseline.db"
            base_env = {**collector_env(base_db), "PYTHONPATH": str(args.baseline.resolve())}
            base = start_collector(work, base_env, tag="-baseline", writer_cpu=args.writer_cpu)
            servers.append(base)
            contenders.append(("baseline", base, base_db))
            wrk(base.url, data, 3, connections=args.connections)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in contenders}
        checks: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for name, server, server_db in order:
                if server_db is not None:
                    wait_flushed(server)
                    before, before_states = db_counts(server_db)
                    depth = DepthSampler(server)
                    depth.start()
                cpu_before = server.cpu_s()
                res = wrk(server.url, data, args.duration, connections=args.connections)
                drained = time.monotonic()
                if server_db is not None:
                    wait_flushed(server)  # the writer's work belongs to these requests
                # Requests per second until everything they carried was stored: below
                # ``rps`` when the writer fell behind during the round.
                res["drain_s"] = time.monotonic() - drained
                res["stored_rps"] = res["requests"] / (
                    res["duration_us"] / 1e6 + max(0.0, res["drain_s"] - 0.25)
                )
                res["cpu_us"], res["writer_cpu_us"] = _cpu_us(server, cpu_before, res["requests"])
                runs[name].append(res)
                line = (
                    f"round {r + 1} {name:9} {res['rps']:9.0f} req/s  "
                    f"p50 {_ms(res['p50_us'])} ms  p99 {_ms(res['p99_us'])} ms  "
                    f"cpu {res['cpu_us']:.0f} (+ writer {res['writer_cpu_us']:.0f}; "
                    f"wrk {res['wrk_cpu_us']:.0f}) us/req  busy "
                    + " ".join(f"cpu{i} {100 * b:.0f}%" for i, b in enumerate(res["cpu_busy"]))
                )
                if server_db is not None:
                    depth.stopped.set()
                    depth.join()
                    res["max_queue_depth"] = max(depth.samples, default=0)
                    if server is coll:
                        served += res["requests"]
                    wait_flushed(server)
                    after, after_states = db_counts(server_db)
                    rows = after - before
                    granted = after_states["granted"] - before_states["granted"]
                    counted = sum(after_states.values()) - sum(before_states.values())
                    # wrk stops with up to -c requests in flight: the server may have
                    # recorded them without wrk reading the answer. Rows must lie between
                    # the consented 200s wrk read and the consented requests it sent.
                    good = (
                        res["ok_consented"] <= rows <= res["sent_consented"]
                        and rows == granted
                        and res["ok"] <= counted <= res["sent_consented"] + res["sent_unconsented"]
                        and res["other_status"] == 0
                    )
                    ok &= good
                    checks.append({"server": name, "rows": rows, "granted_counted": granted, **res})
                    line += (
                        f"  rows {rows} (consented 200s read {res['ok_consented']}, "
                        f"sent {res['sent_consented']}) {'ok' if good else 'MISMATCH'}; "
                        f"max queue {res['max_queue_depth']}, drained in {res['drain_s']:.1f} s"
                    )
                print(line, flush=True)
        summary: dict[str, Any] = {}
        for name, rs in runs.items():
            summary[name] = {
                "rps": _med([x["rps"] for x in rs]),
                "stored_rps": _med([x["stored_rps"] for x in rs]),
                "p50_ms": _med([x["p50_us"] for x in rs]) / 1000,
                "p99_ms": _med([x["p99_us"] for x in rs]) / 1000,
                "cpu_us_per_request": _med([x["cpu_us"] for x in rs]),
                "writer_cpu_us_per_request": _med([x["writer_cpu_us"] for x in rs]),
                "wrk_cpu_us_per_request": _med([x["wrk_cpu_us"] for x in rs]),
                "cpu_busy": [_med(list(b)) for b in zip(*(x["cpu_busy"] for x in rs), strict=True)],
            }
            if name != "bare":
                ratios = [c["rps"] / b["rps"] for b, c in zip(runs["bare"], rs, strict=True)]
                summary[name]["ratio_per_round"] = ratios
                summary[name]["ratio_median"] = _med(ratios)
                summary[name]["cpu_ratio"] = summary["bare"]["cpu_us_per_request"] / max(
                    summary[name]["cpu_us_per_request"], 1e-9
                )
        summary["ratio_per_round"] = summary["collector"]["ratio_per_round"]
        summary["ratio_median"] = summary["collector"]["ratio_median"]
        summary["cpu_ratio"] = summary["collector"]["cpu_ratio"]
        if args.baseline:
            summary["collector_vs_baseline"] = _med(
                [
                    c["rps"] / b["rps"]
                    for b, c in zip(runs["baseline"], runs["collector"], strict=True)
                ]
            )
            print(f"collector/baseline (median of rounds): {summary['collector_vs_baseline']:.2f}")
        results["load"] = summary
        results["load_checks"] = checks

        # p99 at half the collector's peak: wrk (not wrk2) has no fixed rate, so each
        # connection pauses between requests; rate ~= connections / (delay + latency).
        peak = summary["collector"]["rps"]
        delay_ms = 4
        conns = max(1, round(peak / 2 * (delay_ms + summary["collector"]["p50_ms"]) / 1000))
        wait_flushed(coll)
        half = wrk(coll.url, data, args.duration, connections=conns, delay_ms=delay_ms)
        served += half["requests"]
        results["half_rate"] = {
            "target_rps": peak / 2,
            "rps": half["rps"],
            "connections": conns,
            "p50_ms": half["p50_us"] / 1000,
            "p99_ms": half["p99_us"] / 1000,
        }
        print(
            f"half rate: {half['rps']:.0f} req/s (target {peak / 2:.0f}, {conns} connections) "
            f"p50 {_ms(half['p50_us'])} ms  p99 {_ms(half['p99_us'])} ms",
            flush=True,
        )

        if args.profile:
            # The serving process into FILE, the writer process into FILE.writer.
            wait_flushed(coll)
            targets = [(coll.proc.pid, args.profile)]
            if (writer_pid := coll.writer_pid()) is not None:
                targets.append((writer_pid, args.profile.with_name(args.profile.name + ".writer")))
            spies = [
                threading.Thread(target=profile, args=(pid, int(args.duration), out))
                for pid, out in targets
            ]
            for spy in spies:
                spy.start()
            served += wrk(coll.url, data, args.duration, connections=args.connections)["requests"]
            for spy in spies:
                spy.join()
            for _, out in targets:
                print(f"{out}:\n{summarize_profile(out)}", flush=True)

        # Exact accounting: our client reads every answer it asked for.
        wait_flushed(coll)
        before, _ = db_counts(db)
        counts = asyncio.run(drive("127.0.0.1", coll.port, mix.requests(args.exact), 32))
        served += args.exact
        wait_flushed(coll)
        rows = db_counts(db)[0] - before
        exact_ok = (
            rows == counts.ok_consented == counts.sent_consented
            and counts.ok == args.exact
            and counts.other_status == 0
        )
        ok &= exact_ok
        total_hits, states = db_counts(db)
        consistent = total_hits == states["granted"]
        ok &= consistent
        results["exact"] = {
            "requests": args.exact,
            "ok": counts.ok,
            "consented_200": counts.ok_consented,
            "rows": rows,
            "equal": exact_ok,
            "hits_table_equals_granted_counter": consistent,
        }
        print(
            f"exact: {args.exact} requests, {counts.ok} x 200, {counts.ok_consented} consented "
            f"200s, {rows} rows -> {'equal' if exact_ok else 'MISMATCH'}; "
            f"hits {total_hits} == granted counter {states['granted']}: {consistent}",
            flush=True,
        )

        if args.memory_hits:
            while served < args.memory_hits:
                left = args.memory_hits - served
                secs = min(60, max(2, left / max(peak, 1) * 1.05))
                served += wrk(coll.url, data, secs, connections=args.connections)["requests"]
                print(f"memory: {served} hits served, RSS {coll.rss_mb():.0f} MB", flush=True)
            wait_flushed(coll)
        sampler.stopped.set()
        sampler.join()
        results["memory"] = {
            "hits_served": served,
            "rss_start_mb": sampler.samples[0] if sampler.samples else 0,
            "rss_max_mb": max(sampler.samples, default=0),
            "rss_end_mb": coll.rss_mb(),
            "rows_total": db_counts(db)[0],
        }
        print(
            f"memory: {served} hits, RSS max {results['memory']['rss_max_mb']:.0f} MB "
            f"(start {results['memory']['rss_start_mb']:.0f} MB)",
            flush=True,
        )
        for s in (bare, coll):
            s.stop()

        if not args.skip_workers:
            # Unpinned: two workers need both cores; wrk stays on CPU 0 and competes.
            w_runs: dict[int, list[float]] = {1: [], 2: []}
            w1 = start_collector(work, collector_env(work / "w1.db"), cpu=None, tag="-w1")
            # (Unpinned runs leave the writer process to the scheduler too.)
            servers.append(w1)
            w2 = start_collector(
                work, collector_env(work / "w2.db"), cpu=None, workers=2, tag="-w2"
            )
            servers.append(w2)
            for server in (w1, w2):
                wrk(server.url, data, 2, connections=64)
            # All the CPU a request takes here (serving, writer process, wrk): the two
            # cores allow at most 2 s of it a second, whatever the number of workers.
            w_cpu: dict[int, list[float]] = {1: [], 2: []}
            for r in range(max(2, args.rounds - 1)):
                pair = [(1, w1), (2, w2)] if r % 2 == 0 else [(2, w2), (1, w1)]
                for n, server in pair:
                    wait_flushed(server)
                    cpu_before = server.cpu_s()
                    res = wrk(server.url, data, args.duration, connections=64)
                    wait_flushed(server)  # the writer's work belongs to these requests
                    spent = _cpu_us(server, cpu_before, res["requests"])
                    w_runs[n].append(res["rps"])
                    w_cpu[n].append(sum(spent) + res["wrk_cpu_us"])
                    print(
                        f"workers={n}: {res['rps']:.0f} req/s, all CPU {w_cpu[n][-1]:.0f} "
                        "us/req, busy "
                        + " ".join(f"cpu{i} {100 * b:.0f}%" for i, b in enumerate(res["cpu_busy"])),
                        flush=True,
                    )
            cores = len(_cpu_ticks())
            results["workers"] = {
                "w1_rps": _med(w_runs[1]),
                "w2_rps": _med(w_runs[2]),
                "factor": _med(w_runs[2]) / _med(w_runs[1]),
                "w1_all_cpu_us": _med(w_cpu[1]),
                "w2_all_cpu_us": _med(w_cpu[2]),
                "w1_ceiling_rps": cores * 1e6 / _med(w_cpu[1]),
                "w2_ceiling_rps": cores * 1e6 / _med(w_cpu[2]),
            }
    finally:
        for s in servers:
            s.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    if args.micro:
        from bench import micro_ua, micro_writer

        results["micro_ua"] = micro_ua.main([])
        results["micro_writer"] = micro_writer.main([])

    load = results["load"]
    print(
        "\n| | req/s | stored req/s | p50 ms | p99 ms | CPU us/req serving | + writer process "
        "| wrk | busy per CPU | /bare |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name in runs:
        x = load[name]
        print(
            f"| {name} | {x['rps']:.0f} | {x['stored_rps']:.0f} | {x['p50_ms']:.2f} "
            f"| {x['p99_ms']:.2f} "
            f"| {x['cpu_us_per_request']:.1f} | {x['writer_cpu_us_per_request']:.1f} "
            f"| {x['wrk_cpu_us_per_request']:.1f} "
            f"| {' / '.join(f'{100 * b:.0f}%' for b in x['cpu_busy'])} "
            f"| {x.get('ratio_median', 1.0):.2f} |"
        )
    print(
        f"\ncollector/bare: {load['ratio_median']:.2f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in load['ratio_per_round'])}); "
        f"by serving CPU per request: {load['cpu_ratio']:.2f}"
    )
    h = results["half_rate"]
    print(f"p99 at {h['rps']:.0f} req/s (half peak): {h['p99_ms']:.2f} ms")
    print(f"rows == consented 200s: {results['exact']['equal']} (exact phase)")
    bounded = all(
        c["ok_consented"] <= c["rows"] <= c["sent_consented"] for c in results["load_checks"]
    )
    print(f"every wrk round's rows within its in-flight bounds: {bounded}")
    m = results["memory"]
    print(f"RSS over {m['hits_served']} hits: max {m['rss_max_mb']:.0f} MB")
    if "workers" in results:
        w = results["workers"]
        print(f"--workers 2: {w['w2_rps']:.0f} vs {w['w1_rps']:.0f} req/s: x{w['factor']:.2f}")
        print(
            f"  all CPU a request (serving, writer, wrk): {w['w2_all_cpu_us']:.0f} vs "
            f"{w['w1_all_cpu_us']:.0f} us; the machine's cores allow at most "
            f"{w['w2_ceiling_rps']:.0f} vs {w['w1_ceiling_rps']:.0f} req/s "
            f"({w['w2_rps'] / w['w2_ceiling_rps']:.0%} vs "
            f"{w['w1_rps'] / w['w1_ceiling_rps']:.0%} of that reached)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

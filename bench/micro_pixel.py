"""Micro-benchmark: our own CPU per pixel request, without uvicorn.

The real ``CollectorApp`` (raw ASGI pixel, consent, cookies, query, client IP, enqueue)
called directly on 20,000 scopes built from the bench mix, with a no-op ``send``, and
``Pixel.answer_now`` (what ``collector/protocol.py`` calls from uvicorn's parser
callback) on the same requests; the writer is started but never flushes. It isolates
what the collector adds to uvicorn's own per-request cost (which the bare pixel pays too).

    python -m bench.micro_pixel [--requests 20000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.mix import build_mix, collector_env


def _scopes(n: int) -> list[dict[str, Any]]:
    scopes = []
    for raw, _ in build_mix().requests(n):
        lines = raw.decode("latin-1").split("\r\n")
        path, _, qs = lines[0].split(" ")[1].partition("?")
        headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, _, value in (line.partition(": ") for line in lines[1:] if line)
        ]
        scopes.append(
            {
                "type": "http",
                "method": "GET",
                "path": path,
                "query_string": qs.encode("latin-1"),
                "headers": headers,
                "client": ("127.0.0.1", 5555),
            }
        )
    return scopes


async def _run(requests: int, repeats: int, work: Path) -> tuple[list[float], list[float]]:
    from collector.app import CollectorApp
    from collector.config import load_settings

    never = "1000000000"
    env = {
        **collector_env(work / "c.db"),
        "COLLECTOR_STORAGE_BATCH_SIZE": never,
        "COLLECTOR_STORAGE_FLUSH_INTERVAL_MS": never,
        "COLLECTOR_STORAGE_QUEUE_SIZE": never,
        "COLLECTOR_STORAGE_WRITER_PROCESS": "false",
    }
    app = CollectorApp(load_settings(None, environ=env))
    scopes = _scopes(requests)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    await app.storage.open()
    await app.writer.start()
    asgi, fast = [], []
    facts = [(s["headers"], s["query_string"], s["client"]) for s in scopes]
    answer = app.pixel.answer_now
    try:
        for _ in range(repeats):
            app.writer._buf.clear()  # nothing is written: only the request path counts
            started = time.process_time()
            for scope in scopes:
                await app(scope, receive, send)
            asgi.append((time.process_time() - started) / len(scopes) * 1e6)
            app.writer._buf.clear()
            # What collector/protocol.py calls from uvicorn's parser callback.
            started = time.process_time()
            for headers, query_string, client in facts:
                answer(headers, query_string, client)
            fast.append((time.process_time() - started) / len(facts) * 1e6)
    finally:
        app.writer._buf.clear()
        await app.writer.stop()
        await app.storage.close()
    return asgi, fast


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="collector-micro-pixel-") as tmp:
        asgi, fast = asyncio.run(_run(args.requests, args.repeats, Path(tmp)))
    for name, runs in (("ASGI path (app call)", asgi), ("parser-callback path", fast)):
        print(
            f"{name:22} median {statistics.median(runs):.2f} us CPU per request "
            f"(min {min(runs):.2f}, max {max(runs):.2f}, {args.repeats} x {args.requests})"
        )
    return statistics.median(fast)


if __name__ == "__main__":
    main()

"""A small keep-alive HTTP/1.1 load client that counts exactly what came back.

wrk stops with requests in flight, so its counts bound the stored rows from both sides;
this client sends a fixed list of requests and reads every answer, which makes
"rows recorded == consented 200 responses" an exact check (the smoke test and the
benchmark's exactness phase use it).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(slots=True)
class Counts:
    ok: int = 0
    ok_consented: int = 0
    other_status: int = 0
    sent_consented: int = 0


async def _connection(
    host: str, port: int, requests: list[tuple[bytes, bool]], counts: Counts
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for raw, consented in requests:
            counts.sent_consented += consented
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length = 0
            keeps_visitor = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "set-cookie" and "Max-Age=0" not in value:
                    keeps_visitor = True
            if length:
                await reader.readexactly(length)
            if status == 200:
                counts.ok += 1
                counts.ok_consented += keeps_visitor
            else:
                counts.other_status += 1
    finally:
        writer.close()
        await writer.wait_closed()


async def drive(
    host: str, port: int, requests: list[tuple[bytes, bool]], connections: int = 16
) -> Counts:
    """Send every request (spread over ``connections``) and count the answers."""
    counts = Counts()
    shares = [requests[i::connections] for i in range(connections)]
    await asyncio.gather(*(_connection(host, port, s, counts) for s in shares if s))
    return counts

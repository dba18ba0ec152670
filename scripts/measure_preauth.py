"""Memory a server holds for clients that never say hello.

Three rounds against a real td-server (with a token) and an embedded PostgreSQL, on
loopback: 40 connections that each send half of a 16 MiB frame, one 16 MiB msgpack frame
of empty maps, and 2,000 idle connections. Prints the server's resident memory (VmRSS)
and its peak (VmHWM) after each, and how soon the idle connections were closed.

    python scripts/measure_preauth.py
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.harness import server_process, start_postgres  # noqa: E402

MiB = 1024 * 1024


def memory_mb(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) // 1024
    raise KeyError(key)


async def half_frames(address: tuple[str, int], pid: int) -> None:
    streams = [await asyncio.open_connection(*address) for _ in range(40)]
    for _, writer in streams:
        writer.write(struct.pack(">I", 16 * MiB) + bytes(8 * MiB))
    await asyncio.sleep(2)
    print(f"40 connections x half of a 16 MiB frame: RSS {memory_mb(pid)} MB, "
          f"peak {memory_mb(pid, 'VmHWM')} MB")
    for _, writer in streams:
        writer.close()


async def empty_maps(address: tuple[str, int], pid: int) -> None:
    body = msgpack.packb({"type": "hello", "x": [{}] * (16 * MiB - 64)})
    reader, writer = await asyncio.open_connection(*address)
    writer.write(struct.pack(">I", len(body)) + body)
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(reader.read(), 10)
    writer.close()
    print(f"one 16 MiB frame of empty maps: peak {memory_mb(pid, 'VmHWM')} MB")


async def idle(address: tuple[str, int], pid: int, count: int = 2000) -> None:
    streams = [await asyncio.open_connection(*address) for _ in range(count)]
    started = time.monotonic()
    closed = 0
    for reader, _ in streams:
        with contextlib.suppress(OSError, TimeoutError):
            closed += await asyncio.wait_for(reader.read(), 30) == b""
    print(f"{closed} of {count} idle connections closed by the server within "
          f"{time.monotonic() - started:.1f} s; peak {memory_mb(pid, 'VmHWM')} MB")
    for _, writer in streams:
        writer.close()


async def main() -> None:
    parent = Path(tempfile.mkdtemp(prefix="tdagg-preauth-"))
    postgres = start_postgres(parent)
    token = parent / "token"
    token.write_text("t0k3n\n")
    try:
        async with server_process("td_server", postgres.dsn(), parent, "--token-file",
                                  str(token)) as td:
            pid = td.process.pid
            print(f"at start: RSS {memory_mb(pid)} MB")
            await half_frames(td.address, pid)
            await empty_maps(td.address, pid)
            await idle(td.address, pid)
            await td.stop()
    finally:
        postgres.stop()
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())

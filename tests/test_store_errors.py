"""Start-up failures of the store say what happened, what was tried and what to do, and
never show a password."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.store import StoreError, open_store, scheme_of
from common.store.memory import MemoryStore
from common.store.postgres import PostgresStore

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def server_args(tmp_path: Path, dsn: str, *extra: str) -> list[str]:
    return ["--dsn", dsn, "--listen", "127.0.0.1:0", "--metrics-listen", "",
            "--state-dir", str(tmp_path / "state"), *extra]


def test_the_scheme_picks_the_backend() -> None:
    assert scheme_of("") == "postgresql"  # the PG* variables
    assert scheme_of("host=/tmp dbname=x") == "postgresql"  # libpq key=value
    assert isinstance(open_store("postgres://u@h/db"), PostgresStore)
    assert isinstance(open_store("postgresql://u@h/db"), PostgresStore)
    assert isinstance(open_store("memory://trial"), MemoryStore)
    with pytest.raises(StoreError, match="unknown database scheme 'mysql://'"):
        open_store("mysql://u@h/db")


def test_a_database_that_does_not_answer_names_what_was_tried(tmp_path: Path) -> None:
    port = free_port()
    done = run("td_server", *server_args(
        tmp_path, f"postgresql://tdagg:s3cret-pw@127.0.0.1:{port}/metrics"))
    assert done.returncode == 1, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr
    assert "--dsn" in done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_an_unknown_scheme_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    done = run("non_td_server", *server_args(tmp_path, "mysql://root:pw@127.0.0.1/m"))
    assert done.returncode == 2, done.stderr
    assert "unknown database scheme 'mysql://'" in done.stderr
    assert "postgresql://, postgres://, memory://" in done.stderr
    assert ":pw@" not in done.stderr


def test_a_policy_without_timescaledb_names_the_extension_and_the_setting(
        dsn: str, tmp_path: Path) -> None:
    done = run("td_server", *server_args(tmp_path, dsn, "--retention-days", "7"))
    assert done.returncode == 1, done.stderr
    assert "retention_days = 7 needs the TimescaleDB extension" in done.stderr
    assert "unset retention_days" in done.stderr
    done = run("td_server", *server_args(tmp_path, dsn, "--compress-after-days", "1.5"))
    assert done.returncode == 1, done.stderr
    assert "compress_after_days = 1.5 needs the TimescaleDB extension" in done.stderr


def test_a_bad_policy_value_is_a_configuration_error(tmp_path: Path) -> None:
    done = run("td_server", *server_args(tmp_path, "memory://x", "--retention-days", "0"))
    assert done.returncode == 2, done.stderr
    assert "retention" in done.stderr
    assert "> 0" in done.stderr


def test_reports_and_replays_refuse_a_memory_store(tmp_path: Path) -> None:
    done = run("td_report", "--dsn", "memory://trial", "--run-id", "r")
    assert done.returncode == 2, done.stderr
    assert "memory://" in done.stderr
    assert "lives inside the process" in done.stderr


def test_a_server_runs_on_a_memory_store(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "td_server", *server_args(tmp_path, "memory://trial")],
        stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert process.stderr is not None
        said_before = ""
        line = process.stderr.readline()
        while line and "ready" not in line:
            said_before += line
            line = process.stderr.readline()
        assert "database memory://trial" in line, line
        assert "gone when it exits" in said_before, said_before
        process.terminate()
        assert process.wait(timeout=30) == 0
        said = process.stderr.read()
        assert "stopped:" in said, said
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_client_options_are_taken_out_of_the_dsn() -> None:
    from common.store.postgres import split_client_options  # noqa: PLC0415

    assert split_client_options(
        "postgresql://u:p@h:5/db?sslmode=disable&statement_cache_size=0&search_path=public"
    ) == ("postgresql://u:p@h:5/db?sslmode=disable&search_path=public",
          {"statement_cache_size": 0})
    assert split_client_options("postgresql://h/db?statement_cache_size=0") == (
        "postgresql://h/db", {"statement_cache_size": 0})
    assert split_client_options("host=/tmp dbname=x") == ("host=/tmp dbname=x", {})
    with pytest.raises(StoreError, match="statement_cache_size='off' in the DSN"):
        split_client_options("postgresql://h/db?statement_cache_size=off")

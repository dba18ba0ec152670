"""Which database a report reads (its queries are the store's: common.store).

Database choice is the servers' (``common.cli.choose_database``) with one difference:
a report never creates the embedded PostgreSQL. With no ``--dsn``, ``TDAGG_DSN`` or PG*
variables it uses the embedded one only if a server already initialised it in
DATA_DIR/pgdata (starting it again if it is stopped); otherwise it is an error, since
there cannot be anything to report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import embedded
from common.cli import choose_database as server_choose_database
from common.config import ServerConfig, _optional_text, default_data_dir
from common.store.rows import Extent, GeneratorInfo, RunInfo, Series

__all__ = ["Extent", "GeneratorInfo", "ReportConfig", "ReportError", "RunInfo", "Series",
           "choose_database"]


class ReportError(Exception):
    """Bad input or an empty selection: printed as ``td-report: error: ...``, exit 2."""


def _path(text: Any) -> Path:
    if not isinstance(text, str) or not text:
        raise ValueError("expected a path")
    return Path(text)


def parse_quantiles(text: Any) -> tuple[float, ...]:
    """'0.5,0.9,0.95' (or a TOML list of numbers) -> (0.5, 0.9, 0.95)."""
    if isinstance(text, list):
        items: list[Any] = text
    elif isinstance(text, str):
        items = [t.strip() for t in text.split(",") if t.strip()]
    else:
        raise ValueError(f"expected a comma-separated list, got {type(text).__name__}")
    if not items:
        raise ValueError("expected at least one quantile")
    result = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError("expected numbers")
        try:
            q = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{item!r} is not a number") from None
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"{item} is not between 0 and 1 (write 0.95 for p(95))")
        if q not in result:
            result.append(q)
    return tuple(result)


def _quantile_text(text: Any) -> str:
    """Checked and kept as text: common.config shows tuples as HOST:PORT."""
    return ",".join(repr(q) for q in parse_quantiles(text))


def _field(default: Any, parse: Any, help: str, form: str) -> Any:
    return field(default=default, metadata={"parse": parse, "help": help, "form": form})


DEFAULT_QUANTILES = "0.5,0.9,0.95,0.99"


@dataclass(frozen=True)
class ReportConfig:
    """Settings that may come from a TOML file or TDAGG_* variables; see common.config."""

    dsn: str | None = _field(
        None, _optional_text,
        "PostgreSQL DSN; without one, PG* variables if PGHOST, PGDATABASE or PGSERVICE is "
        "set, else the embedded PostgreSQL in DATA_DIR/pgdata if a server created it", "DSN")
    data_dir: Path = _field(
        default_data_dir(), _path, "directory of the servers' embedded PostgreSQL", "PATH")
    quantiles: str = _field(
        DEFAULT_QUANTILES, _quantile_text,
        "quantiles to report for every trend, from 0 to 1 (0.999 is p(99.9))", "Q,Q,...")
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)


def choose_database(config: ReportConfig) -> tuple[str, str]:
    """(dsn for asyncpg, label for humans); refuses to create the embedded database."""
    if not config.dsn and not embedded.looks_like_pg_env(os.environ):
        pgdata = config.data_dir / "pgdata"
        try:
            initialised = (pgdata / "PG_VERSION").exists()
        except OSError:  # not ours to read (another user's cluster): let PostgreSQL say
            initialised = True
        if not initialised:
            raise ReportError(
                f"no database to read: no --dsn, TDAGG_DSN or PG* variables, and no embedded "
                f"PostgreSQL in {pgdata} (it is created by the first td-server or "
                f"non-td-server that runs without --dsn; a report never creates it). Pass "
                f"--dsn DSN, or --data-dir if the servers used another directory.")
    server_config = ServerConfig(dsn=config.dsn, data_dir=config.data_dir)
    try:
        return server_choose_database(server_config)
    except embedded.EmbeddedUnavailable as exc:
        raise ReportError(str(exc)) from None

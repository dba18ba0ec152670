"""Which database a report reads, and the queries it runs.

Database choice is the servers' (``common.cli.choose_database``) with one difference:
a report never creates the embedded PostgreSQL. With no ``--dsn``, ``TDAGG_DSN`` or PG*
variables it uses the embedded one only if a server already initialised it in
DATA_DIR/pgdata (starting it again if it is stopped); otherwise it is an error, since
there cannot be anything to report.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from common import embedded
from common.cli import choose_database as server_choose_database
from common.config import ServerConfig, _optional_text, default_data_dir


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


@dataclass(frozen=True)
class Series:
    """One stored (metric, tags) series of a run."""

    metric: str
    kind: str
    tags: dict[str, str]


_SERIES = """
SELECT metric, 'trend' AS kind, tags::text AS tags
FROM trend_buckets WHERE run_id = $1 GROUP BY metric, tags
UNION ALL
SELECT metric, min(metric_type), tags::text
FROM counter_buckets WHERE run_id = $1 GROUP BY metric, tags
"""

_RUNS = """
SELECT run_id, min(first) AS first, max(last) AS last FROM (
    SELECT run_id, min(bucket) AS first, max(bucket) AS last FROM trend_buckets GROUP BY run_id
    UNION ALL
    SELECT run_id, min(bucket), max(bucket) FROM counter_buckets GROUP BY run_id
) AS runs GROUP BY run_id ORDER BY last DESC, run_id
"""


def _epoch(column: str) -> str:
    return f"extract(epoch FROM {column})::float8 AS {column}"


_GENERATORS = (
    "SELECT producer, host, k6_version, script, "
    + ", ".join(_epoch(c) for c in ("started_at", "ended_at"))
    + ", exit_status, "
    + ", ".join(_epoch(c) for c in ("first_sample", "last_sample"))
    + ", samples, "
    + ", ".join(_epoch(c) for c in ("td_written_at", "non_td_written_at"))
    + ", units::text AS units FROM generators WHERE run_id = $1"
    " ORDER BY started_at NULLS LAST, first_sample NULLS LAST, host NULLS LAST, producer")


@dataclass(frozen=True)
class GeneratorInfo:
    """One load generator (k6-forward process) of a run, as the servers recorded it.

    Times are epoch seconds. Any field may be None: an older forwarder, pipe mode (no k6
    version or script), or a server that has not recorded that part yet.
    """

    producer: str
    host: str | None = None
    k6_version: str | None = None
    script: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    exit_status: int | None = None
    first_sample: float | None = None  # event time of its first k6 sample
    last_sample: float | None = None  # and of its last
    samples: int | None = None
    td_written_at: float | None = None  # td-server has written all its buckets
    non_td_written_at: float | None = None  # non-td-server has
    units: str | None = None  # JSON {metric: "time" | "data"} from k6's Metric lines

    @property
    def running(self) -> bool:
        return self.ended_at is None

    @property
    def written(self) -> bool:
        """Ended, and both servers have written every bucket holding its data."""
        return (self.ended_at is not None and self.td_written_at is not None
                and self.non_td_written_at is not None)


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    first: datetime
    last: datetime


@dataclass(frozen=True)
class Extent:
    first: float  # epoch seconds: start of the first bucket
    last: float  # end of the last bucket
    buckets: int  # distinct bucket starts
    widths: tuple[int, ...]  # distinct bucket_seconds


def _conditions(run_id: str, start: datetime | None, end: datetime | None,
                where: dict[str, str]) -> tuple[str, list[Any]]:
    conditions = ["run_id = $1"]
    args: list[Any] = [run_id]
    if start is not None:
        args.append(start)
        conditions.append(f"bucket + bucket_seconds * interval '1 second' > ${len(args)}")
    if end is not None:
        args.append(end)
        conditions.append(f"bucket < ${len(args)}")
    if where:
        args.append(orjson.dumps(where).decode())
        conditions.append(f"tags @> ${len(args)}::jsonb")
    return " AND ".join(conditions), args


class Reader:
    """Queries on one connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def series(self, run_id: str) -> list[Series]:
        rows = await self.conn.fetch(_SERIES, run_id)
        return [Series(r["metric"], r["kind"], orjson.loads(r["tags"])) for r in rows]

    async def runs(self) -> list[RunInfo]:
        return [RunInfo(r["run_id"], r["first"], r["last"])
                for r in await self.conn.fetch(_RUNS)]

    async def extent(self, run_id: str, start: datetime | None, end: datetime | None
                     ) -> Extent | None:
        """Time covered by the run's buckets that overlap [start, end); None if none do."""
        condition, args = _conditions(run_id, start, end, {})
        row = await self.conn.fetchrow(
            "SELECT extract(epoch FROM min(bucket))::float8 AS first,"
            " extract(epoch FROM max(bucket + bucket_seconds * interval '1 second'))::float8"
            " AS last, count(DISTINCT bucket) AS buckets,"
            " array_agg(DISTINCT bucket_seconds) AS widths FROM ("
            f" SELECT bucket, bucket_seconds FROM trend_buckets WHERE {condition} UNION ALL"
            f" SELECT bucket, bucket_seconds FROM counter_buckets WHERE {condition}) AS b",
            *args)
        if row is None or row["first"] is None:
            return None
        return Extent(row["first"], row["last"], row["buckets"], tuple(sorted(row["widths"])))

    async def last_sample(self, run_id: str) -> tuple[float, float] | None:
        """(end of the run's last bucket, time of the latest sample recorded in it).

        Only gauges store a sample time (each generator's latest, in ``state``); k6
        samples ``vus`` every second, so this is within about a second of the run's end.
        """
        row = await self.conn.fetchrow(
            "WITH last AS (SELECT max(bucket) AS bucket FROM ("
            " SELECT max(bucket) AS bucket FROM trend_buckets WHERE run_id = $1 UNION ALL"
            " SELECT max(bucket) FROM counter_buckets WHERE run_id = $1) AS b)"
            " SELECT extract(epoch FROM max(c.bucket + c.bucket_seconds * interval '1 second'))"
            "::float8 AS bucket_end, max((g.value->>0)::float8) / 1e9 AS sample"
            " FROM counter_buckets c JOIN last ON c.bucket = last.bucket,"
            " jsonb_each(c.state->'gauge_last') AS g"
            " WHERE c.run_id = $1 AND c.metric_type = 'gauge'"
            " AND jsonb_typeof(c.state->'gauge_last') = 'object'", run_id)
        if row is None or row["sample"] is None:
            return None
        return row["bucket_end"], row["sample"]

    async def gauge_producers(self, run_id: str, start: datetime | None,
                              end: datetime | None) -> set[str]:
        """Producer ids of the k6-forward processes named in the window's gauge states."""
        condition, args = _conditions(run_id, start, end, {})
        rows = await self.conn.fetch(
            "SELECT DISTINCT g.producer FROM counter_buckets,"
            " jsonb_object_keys(CASE WHEN jsonb_typeof(state->'gauge_last') = 'object'"
            " THEN state->'gauge_last' ELSE '{}'::jsonb END) AS g(producer)"
            f" WHERE metric_type = 'gauge' AND {condition}", *args)
        return {r["producer"] for r in rows}

    async def generators(self, run_id: str) -> list[GeneratorInfo] | None:
        """The run's rows of ``generators``, earliest start first; None when the database
        has no such table (servers of a release before it)."""
        if await self.conn.fetchval("SELECT to_regclass('generators') IS NULL"):
            return None
        rows = await self.conn.fetch(_GENERATORS, run_id)
        return [GeneratorInfo(**dict(r)) for r in rows]

    async def rows(self, table: str, run_id: str, start: datetime | None,
                   end: datetime | None, where: dict[str, str],
                   metrics: Sequence[str] | None = None) -> AsyncIterator[asyncpg.Record]:
        """The run's rows of one table overlapping [start, end), ordered by metric, bucket;
        only of ``metrics`` when given."""
        if table == "trend_buckets":
            columns = "count, sum, min, max, zeros, digest, sum_rest"
        else:
            columns = "metric_type, value, count, nonzero, min, max, state::text AS state"
        condition, args = _conditions(run_id, start, end, where)
        if metrics is not None:
            args.append(list(metrics))
            condition += f" AND metric = ANY(${len(args)}::text[])"
        sql = (f"SELECT metric, tags::text AS tags, extract(epoch FROM bucket)::float8 AS bucket,"
               f" bucket_seconds, {columns} FROM {table} WHERE {condition}"
               f" ORDER BY metric, bucket")
        # A cursor needs a transaction: the caller's (see query.build).
        async for row in self.conn.cursor(sql, *args, prefetch=2000):
            yield row

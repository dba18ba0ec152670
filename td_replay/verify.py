"""The database side of a replay: when each (metric, bucket) row of the run first becomes
visible (freshness), and the stored figures per metric compared with what was sent."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import asyncpg

from common.redact import dsn_secrets, redact_text
from td_replay.recording import MetricFigures

# (metric, bucket start) of every row of the run, whichever table holds it.
_ROWS = """
SELECT metric, extract(epoch FROM bucket)::bigint AS bucket FROM trend_buckets
 WHERE run_id = $1
UNION
SELECT metric, extract(epoch FROM bucket)::bigint FROM counter_buckets WHERE run_id = $1
"""
_TREND_TOTALS = """
SELECT metric, 'trend' AS kind, count(*) AS rows, sum(count)::bigint AS count,
       sum(sum) AS total, sum(count - zeros)::bigint AS nonzero
  FROM trend_buckets WHERE run_id = $1 GROUP BY metric
"""
# state->>'sum' is the exact sample sum for every kind (value is nonzero/count for rates
# and the sum of last values for gauges).
_COUNTER_TOTALS = """
SELECT metric, min(metric_type) AS kind, count(*) AS rows, sum(count)::bigint AS count,
       sum((state->>'sum')::float8) AS total, sum(nonzero)::bigint AS nonzero
  FROM counter_buckets WHERE run_id = $1 GROUP BY metric
"""
# Sums of floats are compared with this relative tolerance: the servers and the database
# add per-bucket partial sums in an order of their own.
REL_TOLERANCE = 1e-9


@dataclass
class Stored:
    kind: str
    rows: int = 0
    count: int = 0
    total: float = 0.0
    nonzero: int = 0


@dataclass(frozen=True)
class Expected:
    kind: str
    count: int
    total: float
    nonzero: int


def expected_figures(figures: dict[str, MetricFigures], copies: int) -> dict[str, Expected]:
    """The recording's figures times the number of generators."""
    return {name: Expected(f.kind, f.count * copies, f.total * copies, f.nonzero * copies)
            for name, f in figures.items()}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOLERANCE, abs_tol=REL_TOLERANCE)


def compare(expected: dict[str, Expected], stored: dict[str, Stored]) -> list[str]:
    """One line per disagreement, each naming its metric; empty when all agree.

    Every metric: the sample count. Counters: the total. Rates: the non-zero samples.
    Trends: the sum of the samples."""
    problems = []
    for name in sorted(set(expected) | set(stored)):
        want, got = expected.get(name), stored.get(name)
        if want is None:
            assert got is not None
            problems.append(f"metric {name}: {got.count:,} samples stored in {got.rows:,} "
                            "rows, none sent")
            continue
        if got is None:
            problems.append(f"metric {name} ({want.kind}): no rows stored, "
                            f"{want.count:,} samples sent")
            continue
        if got.count != want.count:
            problems.append(f"metric {name} ({want.kind}): count stored {got.count:,}, sent "
                            f"{want.count:,} ({got.count - want.count:+,})")
        if want.kind == "counter" and not _close(got.total, want.total):
            problems.append(f"metric {name} (counter): total stored {got.total:.10g}, sent "
                            f"{want.total:.10g} ({got.total - want.total:+.6g})")
        if want.kind == "rate" and got.nonzero != want.nonzero:
            problems.append(f"metric {name} (rate): non-zero samples stored "
                            f"{got.nonzero:,}, sent {want.nonzero:,} "
                            f"({got.nonzero - want.nonzero:+,})")
        if want.kind == "trend" and not _close(got.total, want.total):
            problems.append(f"metric {name} (trend): sum stored {got.total:.10g}, sent "
                            f"{want.total:.10g}")
    return problems


class Watcher:
    """Polls the run's rows: first-seen time of each (metric, bucket), and totals."""

    def __init__(self, dsn: str, run_id: str, poll_seconds: float) -> None:
        self.dsn = dsn
        self.run_id = run_id
        self.poll_seconds = poll_seconds
        self.first_seen: dict[tuple[str, int], float] = {}
        self.polls = 0
        self.errors = 0
        self.last_error: str | None = None
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one query at a time on the connection

    async def connect(self) -> None:
        async with self._lock:
            await self._connection()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn or None, timeout=30)
        return self._conn

    async def poll(self) -> None:
        """One look at the run's rows. A row's visibility time is the wall time at which
        this query was issued: its snapshot is taken then, so the row became visible
        between the previous poll and this one."""
        async with self._lock:
            conn = await self._connection()
            issued = time.time()
            rows = await conn.fetch(_ROWS, self.run_id)
        self.polls += 1
        for metric, bucket in rows:
            self.first_seen.setdefault((metric, int(bucket)), issued)

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.errors += 1
                # Shown in the summary: never with the DSN's password (common.redact).
                self.last_error = redact_text(str(exc), dsn_secrets(self.dsn))
                await self.close()
                await asyncio.sleep(1.0)
            await asyncio.sleep(self.poll_seconds)

    async def totals(self) -> dict[str, Stored]:
        stored: dict[str, Stored] = {}
        async with self._lock:
            conn = await self._connection()
            results = [await conn.fetch(sql, self.run_id)
                       for sql in (_TREND_TOTALS, _COUNTER_TOTALS)]
        for rows in results:
            for row in rows:
                mine = stored.get(row["metric"])
                if mine is None:
                    mine = stored[row["metric"]] = Stored(row["kind"])
                mine.rows += row["rows"]
                mine.count += row["count"] or 0
                mine.total += row["total"] or 0.0
                mine.nonzero += row["nonzero"] or 0
        return stored

    def freshness(self, bucket_seconds: int) -> list[float]:
        """Seconds from each (metric, bucket)'s end to its row first seen."""
        return [seen - (bucket + bucket_seconds)
                for (_, bucket), seen in self.first_seen.items()]

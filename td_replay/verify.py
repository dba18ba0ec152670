"""The database side of a replay: when each (metric, bucket) row of the run first becomes
visible (freshness), and the stored figures per metric compared with what was sent."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from common.redact import dsn_secrets, redact_text
from common.store import Store, StoreError, open_store
from td_replay.recording import MetricFigures

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

    def __init__(self, dsn: str, run_id: str, poll_seconds: float,
                 label: str | None = None) -> None:
        self.dsn = dsn
        self.run_id = run_id
        self.poll_seconds = poll_seconds
        self.first_seen: dict[tuple[str, int], float] = {}
        self.polls = 0
        self.errors = 0
        self.last_error: str | None = None
        self.store: Store = open_store(dsn, label)
        self._open = False
        self._lock = asyncio.Lock()  # one query at a time on the connection

    async def connect(self) -> None:
        async with self._lock:
            await self._connection()

    async def close(self) -> None:
        if self._open:
            self._open = False
            await self.store.close()

    async def _connection(self) -> Store:
        if not self._open:
            await self.store.open(connections=1)
            self._open = True
        return self.store

    async def poll(self) -> None:
        """One look at the run's rows. A row's visibility time is the wall time at which
        this query was issued: its snapshot is taken then, so the row became visible
        between the previous poll and this one."""
        async with self._lock:
            store = await self._connection()
            issued = time.time()
            async with store.snapshot() as view:
                keys = await view.row_keys(self.run_id)
        self.polls += 1
        for key in keys:
            self.first_seen.setdefault(key, issued)

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except StoreError as exc:
                self.errors += 1
                # Shown in the summary: never with the DSN's password (common.redact).
                self.last_error = redact_text(str(exc), dsn_secrets(self.dsn))
                await self.close()
                await asyncio.sleep(1.0)
            await asyncio.sleep(self.poll_seconds)

    async def totals(self) -> dict[str, Stored]:
        stored: dict[str, Stored] = {}
        async with self._lock:
            store = await self._connection()
            async with store.snapshot() as view:
                totals = await view.totals(self.run_id)
        for row in totals:
            mine = stored.get(row.metric)
            if mine is None:
                mine = stored[row.metric] = Stored(row.kind)
            mine.rows += row.rows
            mine.count += row.count
            mine.total += row.total
            mine.nonzero += row.nonzero
        return stored

    def freshness(self, bucket_seconds: int) -> list[float]:
        """Seconds from each (metric, bucket)'s end to its row first seen."""
        return [seen - (bucket + bucket_seconds)
                for (_, bucket), seen in self.first_seen.items()]

"""Global thresholds judged while the test runs, by the server that holds the metric.

Each forwarder says its run's thresholds after every welcome (protocol.thresholds). A
server judges those of its own metrics (td-server: trend methods; non-td-server: count,
rate, value) over every generator, cumulatively from the run's start, each time it has
written buckets of the run; it stores every evaluation in ``threshold_evaluations`` and
pushes it to the run's connected forwarders, which stop k6 on an ``abortOnFail`` failure
and exit 99 on a failed final verdict.

Nothing here is state that a restart can lose: verdicts are computed from the stored
rows (td_report's query engine), and the thresholds come again with every forwarder's
next connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from common import protocol
from td_report.thresholds import Threshold, ThresholdError, check_applicable, parse_threshold

if TYPE_CHECKING:
    from td_report.query import ThresholdResult

log = logging.getLogger("tdagg.thresholds")

INSERT_EVALUATION = """
INSERT INTO threshold_evaluations (run_id, role, threshold, evaluated_at, through, final,
    verdict, ok, decided, observed, samples, rank_low, rank_high, abort_on_fail, note)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
"""


def parse_items(items: Iterable[tuple[str, bool, float]]) -> list[Threshold]:
    """A forwarder's thresholds frame as Thresholds; protocol.Refused names a bad one."""
    result = []
    for text, abort, delay in items:
        try:
            threshold = parse_threshold(text)
        except ThresholdError as exc:
            raise protocol.Refused("bad_threshold", f"{text[:200]!r}: {exc}") from None
        result.append(Threshold(threshold.metric, threshold.tags, threshold.expression,
                                abort, delay))
    return result


@dataclass(frozen=True)
class Verdict:
    """One threshold's evaluation, as stored and pushed."""

    threshold: Threshold
    verdict: str  # pass, fail, no_data (no sample yet), error (cannot apply)
    ok: bool
    decided: bool = True
    observed: float | None = None
    samples: int = 0
    rank_low: float | None = None  # percentiles: share of samples certainly below the bound
    rank_high: float | None = None  # and possibly at or below it
    note: str = ""

    def message(self) -> dict[str, Any]:
        return {"threshold": self.threshold.text, "verdict": self.verdict, "ok": self.ok,
                "decided": self.decided, "observed": self.observed, "samples": self.samples,
                "rank": None if self.rank_low is None else [self.rank_low, self.rank_high],
                "abort": self.threshold.abort_on_fail, "note": self.note}


def from_result(result: ThresholdResult, threshold: Threshold) -> Verdict:
    low = high = None
    if result.counts is not None:
        low, high = result.counts.share
    if not result.samples:
        return Verdict(threshold, "no_data", True, True, None, 0, note="no samples yet")
    return Verdict(threshold, "pass" if result.ok else "fail", result.ok, result.decided,
                   result.value, result.samples, low, high,
                   "" if result.decided else "too close to call")


class LiveThresholds:
    """Thresholds of the runs whose forwarders are connected, and their evaluation.

    ``push(run_id, frame)`` sends a verdicts frame to the run's connections. One task
    evaluates the runs marked dirty, one at a time, so that evaluations never pile up
    behind a slow database.
    """

    def __init__(self, role: str, push: Callable[[str, bytes], None]) -> None:
        self.role = role
        self.push = push
        self.pool: asyncpg.Pool | None = None
        self.runs: dict[str, dict[str, Threshold]] = {}  # run -> text -> threshold
        self.latest: dict[str, bytes] = {}  # run -> its latest verdicts frame
        self.evaluations = 0
        self.failures = 0
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def declare(self, run_id: str, thresholds: list[Threshold]) -> bytes | None:
        """A forwarder of ``run_id`` says its thresholds; return the run's latest verdicts
        for that forwarder (None before the first evaluation)."""
        known = self.runs.setdefault(run_id, {})
        added = False
        for threshold in thresholds:
            if threshold.role == self.role and threshold.text not in known:
                known[threshold.text] = threshold
                added = True
        if added or run_id not in self.latest:
            self.written([run_id])
        return self.latest.get(run_id)

    def written(self, run_ids: Iterable[str]) -> None:
        """Buckets or generator marks of these runs are in the database: judge again."""
        for run_id in run_ids:
            if self.runs.get(run_id):
                self._dirty.add(run_id)
                self._wake.set()

    def forget(self, run_id: str) -> None:
        """No forwarder of the run is connected any more, and its verdict was final."""
        self.runs.pop(run_id, None)
        self.latest.pop(run_id, None)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            runs, self._dirty = self._dirty, set()
            for run_id in sorted(runs):
                try:
                    await self.evaluate(run_id)
                except Exception as exc:  # the database is away: judge again later
                    self.failures += 1
                    log.warning("could not evaluate the thresholds of run %r (retrying "
                                "after the next write): %r", run_id, exc)
                    self._dirty.add(run_id)

    async def evaluate(self, run_id: str) -> list[Verdict] | None:
        thresholds = list(self.runs.get(run_id, {}).values())
        if not thresholds or self.pool is None:
            return None
        async with self.pool.acquire() as conn:
            verdicts, through, final = await judge(conn, run_id, thresholds, self.role)
            now = datetime.now(UTC)
            through_at = None if through is None else datetime.fromtimestamp(through, UTC)
            await conn.executemany(INSERT_EVALUATION, [
                (run_id, self.role, v.threshold.text, now, through_at, final, v.verdict, v.ok,
                 v.decided, v.observed, v.samples, v.rank_low, v.rank_high,
                 v.threshold.abort_on_fail, v.note or None) for v in verdicts])
        self.evaluations += 1
        frame = protocol.verdicts(run_id, through, final, [v.message() for v in verdicts])
        self.latest[run_id] = frame
        self.push(run_id, frame)
        failed = [v.threshold.text for v in verdicts if not v.ok]
        log.info("run %r: %d thresholds judged through %s%s%s", run_id, len(verdicts),
                 "-" if through is None else time.strftime("%H:%M:%S", time.gmtime(through)),
                 " (final)" if final else "", f"; failed: {', '.join(failed)}" if failed else "")
        return verdicts


async def judge(conn: asyncpg.Connection, run_id: str, thresholds: list[Threshold],
                role: str) -> tuple[list[Verdict], float | None, bool]:
    """(verdicts, end of the latest stored bucket, final) over every generator's rows."""
    # td_report's reader picks its database through common.cli, which imports the server.
    from td_report.database import ReportError  # noqa: PLC0415
    from td_report.query import Selection, build  # noqa: PLC0415

    async with conn.transaction(isolation="repeatable_read", readonly=True):
        generators = await conn.fetch(
            f"SELECT ended_at IS NOT NULL AS ended, {role}_written_at IS NOT NULL AS written"
            f" FROM generators WHERE run_id = $1", run_id)
        final = bool(generators) and all(g["ended"] and g["written"] for g in generators)
        if role == "td":
            table, kind = "trend_buckets", "'trend'"
        else:
            table, kind = "counter_buckets", "metric_type"
        kinds = {row[0]: row[1] for row in await conn.fetch(
            f"SELECT DISTINCT metric, {kind} FROM {table} WHERE run_id = $1", run_id)}
        through = await conn.fetchval(
            f"SELECT extract(epoch FROM max(bucket + bucket_seconds * interval '1 second'))"
            f"::float8 FROM {table} WHERE run_id = $1", run_id)
    verdicts: dict[str, Verdict] = {}
    applicable = []
    for threshold in thresholds:
        if threshold.metric not in kinds:
            verdicts[threshold.text] = Verdict(threshold, "no_data", True,
                                               note="no samples of this metric yet")
            continue
        try:
            check_applicable(threshold, kinds, [k for k, _ in threshold.tags], run_id)
        except ThresholdError as exc:
            verdicts[threshold.text] = Verdict(threshold, "error", False, note=str(exc))
            continue
        applicable.append(threshold)
    if applicable:
        selection = Selection(run_id, thresholds=tuple(applicable), quantiles=(0.5,),
                              metrics=tuple(sorted({t.metric for t in applicable})))
        try:
            report = await build(conn, selection)
        except ReportError as exc:  # e.g. the filter matches nothing yet
            for threshold in applicable:
                verdicts[threshold.text] = Verdict(threshold, "no_data", True, note=str(exc))
        else:
            for result, threshold in zip(report.thresholds, applicable, strict=True):
                verdicts[threshold.text] = from_result(result, threshold)
    return [verdicts[t.text] for t in thresholds], through, final

"""Global thresholds judged while the test runs, by the server that holds the metric.

Each forwarder says its run's thresholds after every welcome (protocol.thresholds). A
server judges those of its own metrics (td-server: trend methods; non-td-server: count,
rate, value) over every generator, cumulatively from the run's start, each time it has
written buckets of the run; it stores every evaluation in ``threshold_evaluations`` and
pushes it to the run's connected forwarders, which stop k6 on an ``abortOnFail`` failure
and exit 99 on a failed final verdict.

Evaluation is incremental: per run and threshold, an accumulator (td_report.summary)
holds everything merged so far, and each successful write adds what it wrote (a new row,
or the late part merged into a stored one). An accumulator is first built from the
stored rows, so a restarted server, or a threshold said in the middle of a run, starts
from what the database holds; nothing here is state a restart can lose. ``write_lock``
keeps a write's commit and its feed on one side of that first read's snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from common import digest, protocol
from common.store.rows import (
    COUNTER,
    TREND,
    CounterRow,
    Evaluation,
    StoredRow,
    TrendRow,
    Values,
)
from td_report.band import APPROXIMATE_METHODS
from td_report.summary import Selected, judge
from td_report.thresholds import (
    Threshold,
    ThresholdError,
    check_applicable,
    matches,
    parse_threshold,
)

if TYPE_CHECKING:
    from common.aggregate import Aggregator, BucketKey, Entry
    from common.store.base import Store, StoreView

log = logging.getLogger("tdagg.thresholds")

# Rows fed between two chances for the event loop to serve connections (each row costs
# a digest merge, about 0.1-0.3 ms).
FEED_SLICE = 100

# One stored or written row, with a trend's sketch when it is decoded already.
Row = tuple[StoredRow, digest.Centroids | None]


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


@dataclass
class RunState:
    """One run's thresholds of this server and what has been merged for each."""

    thresholds: dict[str, Threshold] = field(default_factory=dict)
    targets: dict[str, Selected] = field(default_factory=dict)  # text -> merged so far
    through: float | None = None  # end of the latest bucket fed
    ready: bool = False  # built from the stored rows
    building: bool = False
    # Rows written since the build's snapshot, fed by the evaluating task (not by the
    # flush that wrote them, which must not wait for digest merges).
    pending: list[Row] = field(default_factory=list)
    generation: int = 0  # bumped when thresholds are added: a build under way is stale

    def feed(self, row: Row) -> None:
        stored, centroids = row
        metric, tags, values = stored.metric, stored.tags, stored.values
        end = stored.bucket + stored.bucket_seconds
        self.through = end if self.through is None else max(self.through, end)
        for text, threshold in self.thresholds.items():
            if threshold.metric != metric or not matches(tags, threshold.tags):
                continue
            target = self.targets.get(text)
            if target is None:
                target = self.targets[text] = Selected.new(metric, stored.kind,
                                                           threshold.tags)
                if (target.trend is not None
                        and threshold.expression.method in APPROXIMATE_METHODS):
                    target.trend.watch(threshold.expression.bound)
            if target.trend is not None and isinstance(values, TrendRow):
                if centroids is None:
                    centroids = digest.decode(values.digest)  # once for every target
                target.trend.add_row(values, centroids)
            elif target.counter is not None and isinstance(values, CounterRow):
                target.counter.add_row(stored.bucket, values)


def written_rows(aggregator: Aggregator[Any, Any], bucket_seconds: int,
                 entries: Mapping[BucketKey, Entry[Any]]) -> dict[str, list[Row]]:
    """What a write added to each run: what every entry added (BucketWriter.contribution),
    whether it made a new row or was merged into a stored one (late data)."""
    rows: dict[str, list[Row]] = {}
    for (run_id, metric, tags, bucket), entry in entries.items():
        state = entry.written
        if state is None:
            continue
        centroids = None
        if aggregator.role == "td":  # the merged sketch as is, not encoded and decoded
            parts = state.parts
            centroids = parts[0] if len(parts) == 1 else digest.merge(parts)
            total, *rest = state.sum.expansion()
            values: Values = TrendRow(state.count, total, state.lo, state.hi, state.zeros,
                                      b"", tuple(rest))
        else:
            values = aggregator.values(state)
        rows.setdefault(run_id, []).append(
            (StoredRow(metric, dict(tags), float(bucket), bucket_seconds, values), centroids))
    return rows


class LiveThresholds:
    """Thresholds of the runs whose forwarders are connected, and their evaluation.

    ``push(run_id, frame)`` sends a verdicts frame to the run's connections. One task
    evaluates the runs marked dirty, one at a time, so that evaluations never pile up
    behind a slow database.
    """

    def __init__(self, role: str, push: Callable[[str, bytes], None]) -> None:
        self.role = role
        self.push = push
        self.store: Store | None = None
        self.runs: dict[str, RunState] = {}
        self.latest: dict[str, bytes] = {}  # run -> its latest verdicts frame
        self.write_lock = asyncio.Lock()  # held by the server around a write and its feed
        self.evaluations = 0
        self.failures = 0
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, store: Store) -> None:
        self.store = store
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def declare(self, run_id: str, thresholds: list[Threshold]) -> bytes | None:
        """A forwarder of ``run_id`` says its thresholds; return the run's latest verdicts
        for that forwarder (None before the first evaluation)."""
        state = self.runs.setdefault(run_id, RunState())
        added = False
        for threshold in thresholds:
            if threshold.role == self.role and threshold.text not in state.thresholds:
                state.thresholds[threshold.text] = threshold
                added = True
        if added:  # a new accumulator needs the run's history: build them all again
            state.ready = False
            state.pending = []
            state.generation += 1
        if added or run_id not in self.latest:
            self._mark([run_id])
        return self.latest.get(run_id)

    def wrote(self, rows: Mapping[str, list[Row]]) -> None:
        """A write committed these rows (call under ``write_lock``): queue them, judge."""
        for run_id, run_rows in rows.items():
            state = self.runs.get(run_id)
            if state is not None and state.thresholds and (state.ready or state.building):
                state.pending.extend(run_rows)
            # else: not built yet; the build will read these rows from the database
        self._mark(rows)

    def generators_written(self, run_ids: Iterable[str]) -> None:
        """Generators of these runs have ended and been written: a verdict may be final."""
        self._mark(run_ids)

    def forget(self, run_id: str) -> None:
        """No forwarder of the run is connected any more; they say it again if they
        return."""
        self.runs.pop(run_id, None)
        self.latest.pop(run_id, None)

    def _mark(self, run_ids: Iterable[str]) -> None:
        for run_id in run_ids:
            state = self.runs.get(run_id)
            if state is not None and state.thresholds:
                self._dirty.add(run_id)
                self._wake.set()

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

    async def build(self, run_id: str, state: RunState) -> None:
        """Feed the run's stored rows of the thresholds' metrics to fresh accumulators.

        The snapshot is taken under ``write_lock``: rows committed before it are read
        here, rows committed after it are queued by ``wrote`` and fed afterwards."""
        assert self.store is not None
        generation = state.generation
        state.targets.clear()
        state.through = None
        metrics = sorted({t.metric for t in state.thresholds.values()})
        table = TREND if self.role == "td" else COUNTER
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with self.write_lock:
                    view = await stack.enter_async_context(self.store.snapshot())
                    state.pending = []
                    state.building = True
                fed = 0
                async for stored in view.rows(table, run_id, None, None, {}, metrics):
                    state.feed((stored, None))
                    fed += 1
                    if fed % FEED_SLICE == 0:
                        await asyncio.sleep(0)  # let connections be served meanwhile
            state.ready = state.generation == generation
        finally:
            state.building = False

    async def catch_up(self, state: RunState) -> None:
        """Feed the rows written since the last evaluation, a slice at a time."""
        while state.pending:
            rows, state.pending = state.pending[:FEED_SLICE], state.pending[FEED_SLICE:]
            for row in rows:
                state.feed(row)
            if state.pending:
                await asyncio.sleep(0)

    async def evaluate(self, run_id: str) -> list[Verdict] | None:
        state = self.runs.get(run_id)
        if state is None or not state.thresholds or self.store is None:
            return None
        if not state.ready:
            await self.build(run_id, state)
            if not state.ready:  # thresholds were added meanwhile: build again
                self._mark([run_id])
                return None
        await self.catch_up(state)
        async with self.store.snapshot() as view:
            final, span = await run_facts(view, run_id, self.role, state)
        verdicts = judge_state(run_id, state, span)
        now = datetime.now(UTC)
        through = state.through
        through_at = None if through is None else datetime.fromtimestamp(through, UTC)
        await self.store.record_evaluations([
            Evaluation(run_id, self.role, v.threshold.text, now, through_at, final, v.verdict,
                       v.ok, v.decided, v.observed, v.samples, v.rank_low, v.rank_high,
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


async def run_facts(view: StoreView, run_id: str, role: str, state: RunState
                    ) -> tuple[bool, float]:
    """(final: every generator ended and written by this server; the run's span in
    seconds, for counters' rates per second)."""
    # Imported here: td_report.query imports td_report.database, which picks a database
    # through common.cli, which imports the server, which imports this module.
    from td_report.query import whole_run_span  # noqa: PLC0415

    generators = await view.generators(run_id) or []
    final = bool(generators) and all(g.ended_at is not None and g.written_by(role)
                                     for g in generators)
    span = 0.0
    if any(t.expression.method == "rate" for t in state.thresholds.values()):
        found = await whole_run_span(view, run_id)
        if found is not None:
            span = max(found[1] - found[0], 0.0)
    return final, span


def judge_state(run_id: str, state: RunState, span: float) -> list[Verdict]:
    verdicts = []
    for text, threshold in state.thresholds.items():
        target = state.targets.get(text)
        if target is None or not target.samples:
            verdicts.append(Verdict(threshold, "no_data", True,
                                    note="no samples of this metric yet"))
            continue
        try:
            check_applicable(threshold, {threshold.metric: target.kind},
                             [k for k, _ in threshold.tags], run_id)
        except ThresholdError as exc:
            verdicts.append(Verdict(threshold, "error", False, note=str(exc)))
            continue
        verdict = judge(threshold.expression, target, span)
        low = high = None
        if verdict.counts is not None:
            low, high = verdict.counts.share
        verdicts.append(Verdict(
            threshold, "pass" if verdict.holds else "fail", verdict.holds, verdict.decided,
            verdict.value, target.samples, low, high,
            "" if verdict.decided else "too close to call"))
    return verdicts

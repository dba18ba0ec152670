"""Build a report: select a run's rows, merge them, evaluate the thresholds.

Every row of the selection is read once, in (metric, bucket) order, and fed to each
accumulator it belongs to: its whole metric, its ``--by`` group, every threshold
submetric whose filter it matches, and (for charts) its metric's bucket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from common import digest
from common.store import Store, StoreView
from common.store.rows import COUNTER, TREND, CounterRow, StoredRow, TrendRow
from td_report.band import APPROXIMATE_METHODS, Counts
from td_report.database import Extent, GeneratorInfo, ReportError, Series
from td_report.generators import sample_span
from td_report.summary import CounterAccumulator, CounterStats, Selected, TrendAccumulator, judge
from td_report.thresholds import Tags, Threshold, ThresholdError, check_applicable, matches

CHART_QUANTILES = (0.5, 0.9, 0.95, 0.99)
# Figures of k6's own summary (med, p(90), p(95)), computed whatever --quantiles asks.
K6_QUANTILES = (0.5, 0.9, 0.95)


@dataclass(frozen=True)
class Selection:
    run_id: str
    start: datetime | None = None
    end: datetime | None = None
    where: Tags = ()
    by: tuple[str, ...] = ()
    quantiles: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99)
    thresholds: tuple[Threshold, ...] = ()
    per_bucket: bool = False  # charts need each bucket's figures
    strict: bool = False  # --strict-thresholds: a verdict too close to call fails
    metrics: tuple[str, ...] | None = None  # read only these metrics' rows (None: all)


@dataclass(frozen=True)
class ThresholdResult:
    threshold: Threshold
    kind: str
    value: float  # the observed figure
    samples: int
    decided: bool = True  # False: the exact figure may be on either side of the bound
    counts: Counts | None = None  # percentiles: the rank interval of the bound
    strict: bool = False  # --strict-thresholds

    @property
    def holds(self) -> bool:
        """Whether the observed figure satisfies the threshold (k6's verdict)."""
        return self.threshold.expression.holds(self.value)

    @property
    def too_close(self) -> bool:
        return not self.decided

    @property
    def ok(self) -> bool:
        """The verdict that counts: k6's, except that with --strict-thresholds a verdict
        too close to call fails."""
        return self.holds and (self.decided or not self.strict)


@dataclass(frozen=True)
class TrendPoint:
    bucket: float
    seconds: int
    count: int
    quantiles: tuple[float, ...]  # CHART_QUANTILES


@dataclass(frozen=True)
class CounterPoint:
    bucket: float
    seconds: int
    stats: CounterStats


@dataclass
class Report:
    selection: Selection
    extent: Extent
    span_start: float  # epoch seconds; rates per second use span_end - span_start
    span_end: float
    kinds: dict[str, str]
    stored_keys: tuple[str, ...]
    metrics: dict[str, Selected] = field(default_factory=dict)
    groups: dict[tuple[str, tuple[str | None, ...]], Selected] = field(default_factory=dict)
    submetrics: dict[tuple[str, Tags], Selected] = field(default_factory=dict)
    thresholds: list[ThresholdResult] = field(default_factory=list)
    trend_points: dict[str, list[TrendPoint]] = field(default_factory=dict)
    counter_points: dict[str, list[CounterPoint]] = field(default_factory=dict)
    generators: int = 0  # how many generators (recorded, or seen in gauge states; 0: unknown)
    generator_rows: list[GeneratorInfo] = field(default_factory=list)  # the run's records
    span_source: str = "buckets"  # "samples": the generators' first to last sample
    span_note: str = ""  # with "buckets": why the samples' span was not used
    group_paths: set[str] = field(default_factory=set)  # values of the k6 'group' tag
    checks: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # -> [pass, fail]
    rows: int = 0
    # metric -> "time" or "data", as the generators' k6 said (render.unit_of falls back
    # to k6's built-in metrics)
    units: dict[str, str] = field(default_factory=dict)

    @property
    def span_seconds(self) -> float:
        return max(self.span_end - self.span_start, 0.0)

    @property
    def quantiles(self) -> tuple[float, ...]:
        return self.selection.quantiles

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.thresholds)

    @property
    def too_close(self) -> int:
        """How many verdicts are too close to call."""
        return sum(1 for r in self.thresholds if r.too_close)

    def all_quantiles(self) -> tuple[float, ...]:
        return tuple(sorted(set(self.selection.quantiles) | set(K6_QUANTILES)))


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


async def known_runs_hint(reader: StoreView) -> str:
    runs = await reader.runs()
    if not runs:
        return "the database holds no runs yet"
    shown = ", ".join(r.run_id for r in runs[:10])
    more = f" and {len(runs) - 10} more" if len(runs) > 10 else ""
    return f"known runs, latest first: {shown}{more} (td-report --list-runs shows them all)"


def _check_keys(what: str, keys: Sequence[str], stored: set[str], run_id: str) -> None:
    for key in keys:
        if key not in stored:
            raise ReportError(
                f"{what}: tag {key!r} is not stored for run {run_id!r}; only the tag keys "
                f"k6-forward grouped by (its --tags) are stored, here: "
                f"{', '.join(sorted(stored)) or 'none'}")


async def build(store: Store, selection: Selection) -> Report:
    """Every query in one snapshot, so that a report taken while servers write is
    consistent with itself."""
    async with store.snapshot() as view:
        return await _build(view, selection)


async def _build(reader: StoreView, selection: Selection) -> Report:
    run_id = selection.run_id
    series = await reader.series(run_id)
    if not series:
        raise ReportError(f"unknown run id {run_id!r}: no stored rows; "
                          f"{await known_runs_hint(reader)}")
    kinds = _kinds(series)
    stored = {key for s in series for key in s.tags}
    _check_keys("--where", [k for k, _ in selection.where], stored, run_id)
    _check_keys("--by", selection.by, stored, run_id)
    for threshold in selection.thresholds:
        try:
            check_applicable(threshold, kinds, stored, run_id)
        except ThresholdError as exc:
            raise ReportError(str(exc)) from None

    whole = await reader.extent(run_id, None, None)
    assert whole is not None
    extent = await reader.extent(run_id, selection.start, selection.end)
    if extent is None:
        raise ReportError(
            f"empty window: run {run_id!r} has no buckets between "
            f"{_describe(selection.start, 'its start')} and "
            f"{_describe(selection.end, 'its end')}; its data runs "
            f"from {_utc(whole.first)} to {_utc(whole.last)}")
    window_start = selection.start.timestamp() if selection.start is not None else None
    window_end = selection.end.timestamp() if selection.end is not None else None
    generators = await reader.generators(run_id)
    # Producers that wrote gauges: a generator among them without a row (an older
    # k6-forward) may have sampled outside the recorded span.
    seen = await reader.gauge_producers(run_id, None, None) if generators else set()
    sampled = sample_span(generators, seen, window_start, window_end)
    if isinstance(sampled, tuple):
        # The generators' first and last sample: the run's real start and end.
        span_start, span_end = sampled
        span_source, span_note = "samples", ""
    else:
        span_start, span_end = await _bucket_span(reader, run_id, whole, extent)
        if window_start is not None:
            span_start = max(span_start, window_start)
        if window_end is not None:
            span_end = min(span_end, window_end)
        span_source, span_note = "buckets", sampled
    if generators:
        count = len({g.producer for g in generators} | seen)
    else:
        count = len(await reader.gauge_producers(run_id, selection.start, selection.end))
    report = Report(selection, extent, span_start, span_end, kinds, tuple(sorted(stored)),
                    generators=count, generator_rows=generators or [],
                    span_source=span_source, span_note=span_note)
    for generator in generators or []:
        if generator.units:
            report.units.update(generator.units)
    feeder = _Feeder(report)
    where = dict(selection.where)
    for table in (TREND, COUNTER):
        async for row in reader.rows(table, run_id, selection.start, selection.end, where,
                                     selection.metrics):
            feeder.feed(row)
    feeder.finish()
    if not report.rows:
        raise ReportError(
            f"no rows of run {run_id!r} match --where "
            f"{','.join(f'{k}={v}' for k, v in selection.where)} in the selected window")
    for threshold in selection.thresholds:
        selected = report.submetrics[(threshold.metric, threshold.tags)]
        verdict = judge(threshold.expression, selected, report.span_seconds)
        report.thresholds.append(ThresholdResult(
            threshold, selected.kind, verdict.value, selected.samples, verdict.decided,
            verdict.counts, selection.strict))
    return report


async def whole_run_span(reader: StoreView, run_id: str) -> tuple[float, float] | None:
    """The whole run's span for rates per second, as a report without a window takes it:
    the generators' first to last sample, else the buckets'. None for a run without rows."""
    whole = await reader.extent(run_id, None, None)
    if whole is None:
        return None
    generators = await reader.generators(run_id)
    seen = await reader.gauge_producers(run_id, None, None) if generators else set()
    sampled = sample_span(generators, seen, None, None)
    if isinstance(sampled, tuple):
        return sampled
    return await _bucket_span(reader, run_id, whole, whole)


async def _bucket_span(reader: StoreView, run_id: str, whole: Extent, extent: Extent
                       ) -> tuple[float, float]:
    """From the first selected bucket's start to the last one's end; when the selection
    reaches the run's end, to the latest sample time recorded in gauge states instead."""
    span_start, span_end = extent.first, extent.last
    if extent.last == whole.last:
        # Stop at the latest sample recorded, not at the end of the last bucket, so that
        # rates per second are closer to k6's own.
        last = await reader.last_sample(run_id)
        if last is not None and last[0] == whole.last and last[1] > span_start:
            span_end = min(span_end, last[1])
    return span_start, span_end


def _describe(moment: datetime | None, otherwise: str) -> str:
    return otherwise if moment is None else _utc(moment.timestamp())


def _kinds(series: list[Series]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for s in series:
        kinds.setdefault(s.metric, s.kind)
    return kinds


class _Feeder:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.by = report.selection.by
        # metric -> [(filter, accumulator)] of the thresholds' submetrics
        self.submetrics: dict[str, list[tuple[Tags, Selected]]] = {}
        for threshold in report.selection.thresholds:
            key = (threshold.metric, threshold.tags)
            if key not in report.submetrics:
                selected = Selected.new(threshold.metric, report.kinds[threshold.metric],
                                        threshold.tags)
                report.submetrics[key] = selected
                self.submetrics.setdefault(threshold.metric, []).append((threshold.tags,
                                                                         selected))
            selected = report.submetrics[key]
            if (selected.trend is not None
                    and threshold.expression.method in APPROXIMATE_METHODS):
                selected.trend.watch(threshold.expression.bound)
        self.per_bucket = report.selection.per_bucket
        self.point_key: tuple[str, float] | None = None
        self.point_seconds = 0
        self.point_acc = TrendAccumulator()
        self.counter_buckets: dict[tuple[str, float], tuple[int, CounterAccumulator]] = {}

    def _targets(self, metric: str, kind: str, tags: dict[str, str]) -> list[Selected]:
        report = self.report
        targets = []
        whole = report.metrics.get(metric)
        if whole is None:
            whole = report.metrics[metric] = Selected.new(metric, kind)
        targets.append(whole)
        if self.by:
            values = tuple(tags.get(k) for k in self.by)
            group = report.groups.get((metric, values))
            if group is None:
                group = report.groups[(metric, values)] = Selected.new(
                    metric, kind, tuple(zip(self.by, values, strict=True)))
            targets.append(group)
        for wanted, selected in self.submetrics.get(metric, ()):
            if matches(tags, wanted):
                targets.append(selected)
        return targets

    def feed(self, row: StoredRow) -> None:
        self.report.rows += 1
        metric, tags, bucket, values = row.metric, row.tags, row.bucket, row.values
        if "group" in tags:
            self.report.group_paths.add(tags["group"])
        if isinstance(values, TrendRow):
            centroids = digest.decode(values.digest)
            for target in self._targets(metric, "trend", tags):
                assert target.trend is not None
                target.trend.add_row(values, centroids)
            if self.per_bucket:
                if self.point_key != (metric, bucket):
                    self._close_point()
                    self.point_key = (metric, bucket)
                    self.point_seconds = row.bucket_seconds
                self.point_acc.add_row(values, centroids)
            return
        assert isinstance(values, CounterRow)
        kind = values.metric_type
        for target in self._targets(metric, kind, tags):
            assert target.counter is not None
            target.counter.add_row(bucket, values)
        if metric == "checks" and "check" in tags:
            tally = self.report.checks.setdefault((tags.get("group", ""), tags["check"]), [0, 0])
            tally[0] += values.nonzero
            tally[1] += values.count - values.nonzero
        if self.per_bucket:
            key = (metric, bucket)
            entry = self.counter_buckets.get(key)
            if entry is None:
                entry = self.counter_buckets[key] = (row.bucket_seconds,
                                                     CounterAccumulator(kind))
            entry[1].add_row(bucket, values)

    def _close_point(self) -> None:
        if self.point_key is not None and self.point_acc.count:
            metric, bucket = self.point_key
            values = self.point_acc.quantiles(CHART_QUANTILES)
            self.report.trend_points.setdefault(metric, []).append(
                TrendPoint(bucket, self.point_seconds, self.point_acc.count, tuple(values)))
        self.point_acc = TrendAccumulator()

    def finish(self) -> None:
        self._close_point()
        for (metric, bucket), (seconds, acc) in sorted(self.counter_buckets.items()):
            self.report.counter_points.setdefault(metric, []).append(
                CounterPoint(bucket, seconds, acc.stats(float(seconds))))


def parse_time(text: str, flag: str) -> datetime:
    """ISO 8601 (a time without an offset is UTC) or epoch seconds."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return datetime.fromtimestamp(seconds, UTC)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ReportError(f"{flag} {text!r}: expected an ISO 8601 time such as "
                          f"2025-01-31T14:05:00Z (UTC when no offset is given) or epoch "
                          f"seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment

"""The rows every store holds and returns, as typed values (no driver types)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from common import digest

# (run_id, metric, sorted tag pairs, bucket start in epoch seconds)
BucketKey = tuple[str, str, tuple[tuple[str, str], ...], int]

TREND, COUNTER = "trend", "counter"  # the two tables: td-server's and non-td-server's


@dataclass(slots=True)
class TrendRow:
    """One trend bucket: exact count, sum, min, max and zeros, and the merged sketch.

    ``sum`` is the exact sum correctly rounded, ``sum_rest`` what rounding left out
    (common.exactsum). The percentiles are the sketch's, stored for plain SQL readers.
    """

    count: int
    sum: float
    min: float
    max: float
    zeros: int
    digest: bytes
    sum_rest: tuple[float, ...] = ()
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0


@dataclass(slots=True)
class CounterRow:
    """One counter, rate or gauge bucket.

    ``value`` is what the kind reads as: a counter's sum, a rate's nonzero / count, a
    gauge's sum over generators of each one's last value (``gauge_last``: producer ->
    [last sample time ns, value]). ``sum`` and ``sum_rest`` hold the exact sample sum.
    """

    metric_type: str  # "counter", "rate" or "gauge"
    value: float
    count: int
    nonzero: int
    min: float
    max: float
    sum: float
    sum_rest: tuple[float, ...] = ()
    gauge_last: dict[str, list[float]] | None = None


Values = TrendRow | CounterRow


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A row as read back: its series, its bucket (epoch seconds) and its values."""

    metric: str
    tags: dict[str, str]  # shared between rows with the same tags: never change it
    bucket: float
    bucket_seconds: int
    values: Values

    @property
    def kind(self) -> str:
        return "trend" if isinstance(self.values, TrendRow) else self.values.metric_type


@dataclass(frozen=True, slots=True)
class MergedTrend:
    """Every trend row of a group (a window, or one period of it) read as one: exact
    count, min, max and zeros, and the rows' sketches, which read together give the
    group's percentiles (no averaging)."""

    start: float  # the group's start, epoch seconds
    count: int
    min: float
    max: float
    zeros: int
    digests: tuple[bytes, ...]

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        stacked = digest.stack([digest.decode(blob) for blob in self.digests])
        return digest.quantiles(stacked, qs, self.min, self.max, self.zeros)


@dataclass(frozen=True, slots=True)
class Series:
    """One stored (metric, tags) series of a run."""

    metric: str
    kind: str
    tags: dict[str, str]


@dataclass(frozen=True, slots=True)
class RunInfo:
    run_id: str
    first: datetime
    last: datetime


@dataclass(frozen=True, slots=True)
class Extent:
    first: float  # epoch seconds: start of the first bucket
    last: float  # end of the last bucket
    buckets: int  # distinct bucket starts
    widths: tuple[int, ...]  # distinct bucket_seconds


@dataclass(frozen=True, slots=True)
class MetricTotals:
    """One metric's rows of a run added up (td-replay's verification)."""

    metric: str
    kind: str
    rows: int
    count: int
    total: float  # sum of the samples
    nonzero: int


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
    units: dict[str, str] | None = None  # {metric: "time" | "data"} from k6's Metric lines

    @property
    def running(self) -> bool:
        return self.ended_at is None

    @property
    def written(self) -> bool:
        """Ended, and both servers have written every bucket holding its data."""
        return (self.ended_at is not None and self.td_written_at is not None
                and self.non_td_written_at is not None)

    def written_by(self, role: str) -> bool:
        return (self.td_written_at if role == "td" else self.non_td_written_at) is not None


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One judgement of one threshold over all generators (threshold_evaluations)."""

    run_id: str
    role: str
    threshold: str
    evaluated_at: datetime
    through: datetime | None
    final: bool
    verdict: str
    ok: bool
    decided: bool
    observed: float | None
    samples: int | None
    rank_low: float | None
    rank_high: float | None
    abort_on_fail: bool
    note: str | None


@dataclass(frozen=True, slots=True)
class Footprint:
    """What the bucket tables hold: rows, and bytes on disk where the store knows."""

    trend_rows: int
    counter_rows: int
    bytes: int | None

    @property
    def rows(self) -> int:
        return self.trend_rows + self.counter_rows


@dataclass(frozen=True, slots=True)
class Policies:
    """Optional TimescaleDB policies (ignored by stores without them)."""

    retention_days: float | None = None  # drop buckets older than this
    compress_after_days: float | None = None  # compress buckets older than this

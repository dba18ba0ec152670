"""Parse k6 ``--out json`` lines into local per-(series, bucket) aggregates. No I/O.

The hot path is ``LineAggregator.feed``: one orjson.loads per line, a few dict look-ups,
and an append or an add. Digests are built only when a bucket closes, from the whole
list of values at once.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from typing import IO, Any

import orjson

from common import digest
from common.protocol import CounterPartial, TrendPartial
from common.timebucket import BucketClock, TimestampError, parse_epoch_ns

KINDS = ("trend", "counter", "gauge", "rate")
# A metric the forwarder has seen no "Metric" line for yet.
_MISSING = None
_EMPTY_TAGS: dict[str, str] = {}


class _Sums:
    """Counter, gauge or rate aggregate of one series in one bucket."""

    __slots__ = ("total", "count", "nonzero", "lo", "hi", "last_ns", "last_value")

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self.nonzero = 0
        self.lo = math.inf
        self.hi = -math.inf
        self.last_ns = -1
        self.last_value = 0.0


class LineAggregator:
    """Feeds k6 JSON lines into open local buckets; closes them into partials."""

    def __init__(self, tag_keys: tuple[str, ...], bucket_seconds: int,
                 report: IO[str] | None = None, max_reports: int = 50) -> None:
        self.tag_keys = tag_keys
        self.bucket_seconds = bucket_seconds
        self.clock = BucketClock(bucket_seconds)
        self.kinds: dict[str, str] = {}
        # bucket start -> (metric, tag values) -> list of trend values or _Sums
        self.open: dict[int, dict[tuple[str, tuple[str | None, ...]], Any]] = {}
        self.watermark = 0  # highest event-time second seen
        self.lines = 0
        self.samples = 0
        self.skipped: Counter[str] = Counter()
        self.report = report if report is not None else sys.stderr
        self.max_reports = max_reports
        self._reported = 0

    def skip(self, lineno: int, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if self._reported < self.max_reports:
            self._reported += 1
            print(f"k6-forward: line {lineno}: skipped ({reason}): {detail}", file=self.report)
            if self._reported == self.max_reports:
                print("k6-forward: further skipped lines are counted, not printed",
                      file=self.report)

    def feed(self, lines: list[bytes]) -> None:
        """Aggregate complete lines (without their newlines)."""
        loads = orjson.loads
        kinds = self.kinds
        second_and_bucket = self.clock.second_and_bucket
        tag_keys = self.tag_keys
        open_buckets = self.open
        watermark = self.watermark
        lineno = self.lines
        samples = 0
        last_bucket = -1
        series: dict[tuple[str, tuple[str | None, ...]], Any] = {}
        for line in lines:
            lineno += 1
            if not line:
                continue
            try:
                obj = loads(line)
                if obj["type"] == "Point":
                    metric = obj["metric"]
                    kind = kinds.get(metric, _MISSING)
                    if kind is None:
                        self.skip(lineno, "point_before_metric",
                                  f"no Metric line for {metric!r} before this point")
                        continue
                    data = obj["data"]
                    value = data["value"]
                    if value.__class__ is not float and value.__class__ is not int:
                        self.skip(lineno, "bad_value", f"value {value!r} is not a number")
                        continue
                    if value - value != 0:
                        self.skip(lineno, "not_finite", f"value {value!r} is not finite")
                        continue
                    time_text = data["time"]
                    second, bucket = second_and_bucket(time_text)
                    if second > watermark:
                        watermark = second
                    tags = data.get("tags") or _EMPTY_TAGS
                    key = (metric, tuple(map(tags.get, tag_keys)))
                    if bucket != last_bucket:
                        series = open_buckets.get(bucket)  # type: ignore[assignment]
                        if series is None:
                            series = open_buckets[bucket] = {}
                        last_bucket = bucket
                    if kind == "trend":
                        values = series.get(key)
                        if values is None:
                            series[key] = [value]
                        else:
                            values.append(value)
                    else:
                        sums = series.get(key)
                        if sums is None:
                            sums = series[key] = _Sums()
                        sums.total += value
                        sums.count += 1
                        if value:
                            sums.nonzero += 1
                        if value < sums.lo:
                            sums.lo = value
                        if value > sums.hi:
                            sums.hi = value
                        if kind == "gauge":
                            ns = parse_epoch_ns(time_text)
                            if ns >= sums.last_ns:
                                sums.last_ns = ns
                                sums.last_value = value
                    samples += 1
                elif obj["type"] == "Metric":
                    self._metric_line(lineno, obj)
                else:
                    self.skip(lineno, "unknown_line_type", f"line type {obj['type']!r}")
            except orjson.JSONDecodeError as exc:
                self.skip(lineno, "bad_json", f"not JSON: {exc}")
            except TimestampError as exc:
                self.skip(lineno, "bad_time", str(exc))
            except (KeyError, TypeError, AttributeError, IndexError) as exc:
                self.skip(lineno, "bad_shape", f"not a k6 JSON line: {exc!r}")
        self.lines = lineno
        self.samples += samples
        self.watermark = watermark

    def _metric_line(self, lineno: int, obj: dict[str, Any]) -> None:
        data = obj["data"]
        name = data["name"]
        kind = data["type"]
        if not isinstance(name, str) or not name:
            raise TypeError("metric name must be a non-empty string")
        if kind not in KINDS:
            self.skip(lineno, "unknown_metric_type",
                      f"metric {name!r} has unknown type {kind!r}; its points are skipped")
            return
        self.kinds[name] = kind

    def close_through(self, last_bucket: int) -> tuple[list[TrendPartial], list[CounterPartial]]:
        """Close every open bucket whose start is <= last_bucket into partials."""
        trends: list[TrendPartial] = []
        counters: list[CounterPartial] = []
        width = self.bucket_seconds
        for bucket in sorted(b for b in self.open if b <= last_bucket):
            for (metric, tag_values), agg in self.open.pop(bucket).items():
                tags = tuple(sorted(
                    (k, str(v)) for k, v in zip(self.tag_keys, tag_values, strict=True)
                    if v is not None))
                if isinstance(agg, list):
                    trends.append(TrendPartial(
                        metric, tags, bucket, width, len(agg), math.fsum(agg), float(min(agg)),
                        float(max(agg)), digest.from_values(agg)))
                else:
                    counters.append(CounterPartial(
                        metric, self.kinds[metric], tags, bucket, width, agg.total, agg.count,
                        agg.nonzero, float(agg.lo), float(agg.hi), max(agg.last_ns, 0),
                        float(agg.last_value)))
        return trends, counters

    def close_ready(self, local_grace: float) -> tuple[list[TrendPartial], list[CounterPartial]]:
        """Close buckets that event time has passed by more than the local grace."""
        return self.close_through(int(self.watermark - local_grace) - self.bucket_seconds)

    def close_all(self) -> tuple[list[TrendPartial], list[CounterPartial]]:
        return self.close_through(2**62)

"""Parse k6 ``--out json`` lines into local per-(series, bucket) aggregates. No I/O.

The hot path is ``LineAggregator.feed_buffer``. It runs one compiled regular expression
over a whole buffer of lines (``split``, in C). For a line in k6's own Point layout

    {"metric":"M","type":"Point","data":{"time":"T","value":V,"tags":{...}}}

the pattern yields the metric, time, value and tags text (see ``_LINE`` for how such a
line is known to be valid JSON). Any other line (Metric lines, points in another layout,
anything malformed) is parsed by ``orjson`` on its own, as before; so is a Point-layout
line that the fast path cannot take as it is (a metric without its Metric line yet, a
bad time or value, tags that are not a JSON object of hashable values). Either way a
line gets the same result, skip reason, report and line number.

The values of all the fast lines of a buffer are read at once, by ``orjson`` as one
JSON array (so each is the very number orjson reads in the whole line). Then, per fast
line, the Python loop does two byte-string comparisons (the time and the tags text
against the line before: k6 stamps all the metrics of one request with the same time
and tags), one dictionary look-up on the metric name and one list append. The time is
parsed only when the second (or offset) changes, the tags only when their text changes.
Count, sum (``math.fsum``), min, max, zero count and digest are computed from the whole
list of values when a bucket closes. Gauge points, which also need the exact time for
the gauge's last value, take a slower branch.
"""

from __future__ import annotations

import contextlib
import re
import sys
from array import array
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import IO, Any

import numpy as np
import orjson

from common import digest
from common.exactsum import expansion_of
from common.protocol import (
    MAX_ABS_VALUE,
    CounterPartial,
    Limits,
    TrendPartial,
    shorten,
    text_problem,
)
from common.timebucket import NS_PER_S, parse_epoch_ns, parse_epoch_seconds

KINDS = ("trend", "counter", "gauge", "rate")
UNITS = ("time", "data")  # what a k6 Metric line's "contains" may say besides "default"
_EMPTY_TAGS: dict[str, str] = {}
_MAX_CACHED_TAGS = 10_000
_MAX_CACHED_SECONDS = 4096

# One match per line, ended by the line's own newline. When the line is a k6 Point in
# k6's layout (the first branch), groups 1-4 are its metric, time, value and tags text
# (the rest of the line: the tags object, then "}}") and group 5 is None; otherwise
# groups 1-4 are None and group 5 is the whole line.
# ``split`` returns them flat: [text before the first line (empty), 5 groups, text
# between two lines (empty), 5 groups, ..., text after the last newline].
#
# A line the first branch takes is taken only if it is valid JSON. The metric and time
# hold only characters that need no escaping. The value's characters are those of JSON
# numbers, and all the values of a buffer are then read by orjson at once: a value it
# does not read as a number sends its line to the per-line path. The tags text is read
# by orjson, once per distinct text (without the final "}}", which must be there),
# before it is used. The time's date and clock part
# is checked here only for its characters: it is parsed strictly once per distinct
# second, and a line is taken only with exactly that second's text. Optional parts are
# written as alternatives with an empty branch, which the regex engine runs faster.
_LINE = re.compile(
    rb'(?:\{"metric":"([A-Za-z0-9_]{1,128})","type":"Point","data":\{"time":"'
    rb"([0-9T:-]{19}(?:\.\d{1,9}|)(?:Z|[+-]\d\d:\d\d))"
    rb'","value":([-+.0-9eE]{1,64}),"tags":(\{[^\n]*+)\n|([^\n]*)\n)'
)
# Items per line in _LINE.split's result: 5 groups and the (empty) text after the line,
# which _read_values replaces by the line's value as a number.
_FIELDS = 6
# A fragment of a cut line waits this many lines for the rest of it (k6's progress
# block is a few lines), then counts as lost.
_FRAGMENT_LINES = 1000
# Text that can only come from a k6 JSON line; a line without it that is not JSON is
# k6's own text (banner, progress, summary) and harmless.
# (k6's summary writes sub-metrics indented, as `{ scenario:browse }`, without quotes.)
_JSON_DEBRIS = re.compile(rb'^\{|^\s*\{"|"(?:metric|type|data|time|value|tags)":|\}\}\s*$')
_HEAD = b'{"metric":"'
_TIME = b'","type":"Point","data":{"time":"'
_VALUE = b'","value":'
_TAGS = b',"tags":'
_MISSING: Any = object()

Slot = dict[bytes, Callable[[float], None]]  # metric name -> append of its values


class _Series:
    """Trend, counter or rate values of one series in one bucket."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        # In arrival order, as float64: 8 bytes a value, and numpy reads them in place.
        # Every figure taken from them (sum, min, max, zeros, digest) is the same as from
        # the numbers orjson gives, int or float: those too are taken as float64.
        self.values = array("d")


class _Gauge(_Series):
    """A gauge also keeps the value with the latest event time (later arrival on a tie)."""

    __slots__ = ("last_ns", "last_value")

    def __init__(self) -> None:
        super().__init__()
        self.last_ns = -1
        self.last_value: float = 0.0

    def add(self, ns: int, value: float) -> None:
        self.values.append(value)
        if ns >= self.last_ns:
            self.last_ns = ns
            self.last_value = value


# (metric, tag values, kind): a metric that changes type starts new series
SeriesKey = tuple[str, tuple[Any, ...], str]


class _BucketSlots:
    """Fast-path look-ups of one bucket: tags text or tag values -> slot."""

    __slots__ = ("by_text", "by_values")

    def __init__(self) -> None:
        # tags text -> (slot, tag values), or None when the text is no usable tags
        self.by_text: dict[bytes, tuple[Slot, tuple[Any, ...]] | None] = {}
        self.by_values: dict[tuple[Any, ...], Slot] = {}


class LineAggregator:
    """Feeds k6 JSON lines into open local buckets; closes them into partials."""

    def __init__(self, tag_keys: tuple[str, ...], bucket_seconds: int,
                 report: IO[str] | None = None, max_reports: int = 50,
                 limits: Limits | None = None) -> None:
        if bucket_seconds < 1:
            raise ValueError("bucket_seconds must be >= 1")
        self.tag_keys = tag_keys
        self.limits = limits or Limits()
        self.text_lines = 0  # k6's own text between the JSON lines: harmless
        self.rejoined = 0  # JSON lines that k6's progress output cut, put back together
        self.tags_shortened = 0
        self._fragment: tuple[bytes, int] | None = None  # start of a cut line, its number
        self.bucket_seconds = bucket_seconds
        self.kinds: dict[str, str] = {}
        self.units: dict[str, str] = {}  # metric -> "time" or "data", from its Metric line
        # bucket start -> (metric, tag values, kind) -> values of that series
        self.open: dict[int, dict[SeriesKey, _Series]] = {}
        self.watermark = 0  # highest event-time second seen
        # Event time of the first and last sample, to the nanosecond (for the run's span:
        # the lines of a buffer are taken as in time order, as k6 writes them).
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.lines = 0
        self.samples = 0
        self.skipped: Counter[str] = Counter()
        self.report = report if report is not None else sys.stderr
        self.max_reports = max_reports
        self._reported = 0
        # Fast path only: trend, counter and rate series of each open bucket, by tags
        # and metric name. Dropped when a metric changes type.
        self._fast: dict[int, _BucketSlots] = {}
        self._fast_epoch = 0
        self._tags: dict[bytes, tuple[Any, ...] | None] = {}  # tags text -> tag values
        self._seconds: dict[bytes, tuple[int, int]] = {}  # time to the second + offset
        self._base = 0  # line number before the buffer being fed
        self._found = 0  # lines of that buffer already located (see _locate)

    def skip(self, lineno: int, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if self._reported < self.max_reports:
            self._reported += 1
            print(f"k6-forward: line {lineno}: skipped ({reason}): {detail}", file=self.report)
            if self._reported == self.max_reports:
                print("k6-forward: further skipped lines are counted, not printed",
                      file=self.report)

    # --- feeding ---------------------------------------------------------------------

    def feed(self, lines: list[bytes]) -> None:
        """Aggregate complete lines (without their newlines)."""
        if not lines:
            return
        block = b"\n".join(lines) + b"\n"
        if block.count(b"\n") == len(lines):
            self.feed_buffer(block)
            return
        # A "line" holding a newline: keep the caller's line numbering.
        for line in lines:
            self.lines += 1
            if line:
                self.samples += self._slow_line(line, partial(int, self.lines))

    def feed_buffer(self, data: bytes | memoryview) -> bytes:
        """Aggregate every complete line of ``data``; return what follows the last newline.

        This is ``feed`` for raw input (``data`` may be a memoryview of it). The bytes
        returned are the start of a line that is not complete yet: they go in front of
        the next buffer.
        """
        parts = _LINE.split(data)
        rest: bytes = parts[-1]
        if len(parts) > 1:
            self._read_values(parts)
            self._rows(parts)
        return rest

    @staticmethod
    def _read_values(parts: list[Any]) -> None:
        """Put each fast line's value, read by orjson, in the slot after its groups."""
        texts = parts[3::_FIELDS]
        try:
            joined = b",".join(texts)
        except TypeError:  # some lines are not fast lines: hold their places
            joined = b",".join([b"0" if text is None else text for text in texts])
        try:
            values = orjson.loads(b"[" + joined + b"]")
            # min and max run in C: only a buffer holding a huge value pays the loop below.
            if not values or (max(values) <= MAX_ABS_VALUE and min(values) >= -MAX_ABS_VALUE):
                parts[_FIELDS::_FIELDS] = values
                return
        except orjson.JSONDecodeError:
            pass
        numbers: list[Any] = []
        for i, text in enumerate(texts):
            number = None
            if text is not None:
                try:
                    number = orjson.loads(text)
                    if not -MAX_ABS_VALUE <= number <= MAX_ABS_VALUE:
                        raise orjson.JSONDecodeError("huge", "", 0)
                except orjson.JSONDecodeError:
                    # Not a JSON number: the line takes the per-line path, which reports
                    # it with the message orjson gives for the whole line.
                    at = 1 + _FIELDS * i
                    parts[at + 4] = (_HEAD + parts[at] + _TIME + parts[at + 1] + _VALUE + text
                                     + _TAGS + parts[at + 3])
                    parts[at] = parts[at + 1] = parts[at + 2] = parts[at + 3] = None
            numbers.append(number)
        parts[_FIELDS::_FIELDS] = numbers

    def _locate(self, parts: list[Any], item: bytes, field: int) -> int:
        """Line number of the line whose group ``field`` is the object ``item``.

        Asked only for lines that are reported, in order, so each search goes on from
        the line found before and all of them together cost at most one pass.
        """
        i = self._found
        end = len(parts) // _FIELDS
        while i < end and parts[1 + _FIELDS * i + field] is not item:
            i += 1
        if i == end:  # cannot happen; a wrong number beats a crash
            return self._base + 1
        self._found = i + 1
        return self._base + i + 1

    def _rows(self, parts: list[Any]) -> None:
        fast = self._fast
        seconds = self._seconds
        self._base = self.lines
        self._found = 0
        watermark = self.watermark
        epoch = self._fast_epoch
        not_fast = 0  # lines that did not add a sample by the fast path
        slow_samples = 0
        # Never equal to a fast line's time or tags, nor to any other line's None.
        last_time = last_tags = b""
        second_prefix = second_suffix = b"\xff"
        second = 0
        bucket: int | None = None
        slots = _BucketSlots()  # of that bucket
        by_text = slots.by_text
        tag_values: tuple[Any, ...] = ()
        slot: Slot = {}
        items = iter(parts)
        next(items)
        for metric, time_text, text, tags_text, other, value in zip(
                items, items, items, items, items, items, strict=False):
            if time_text != last_time or tags_text != last_tags:
                # Here when the time or the tags text differ from the line before (about
                # one line in four), or for a line the fast path does not take.
                slow = metric is None
                if not slow and time_text != last_time:
                    if not (time_text.startswith(second_prefix)
                            and time_text.endswith(second_suffix)):
                        # Another second or offset: parse it, strictly, once.
                        suffix = time_text[-1:] if time_text[-1] == 0x5A else time_text[-6:]
                        key = time_text[:19] + suffix
                        pair = seconds.get(key)
                        if pair is None:
                            pair = self._second(key, time_text)
                        if pair is None:
                            slow = True
                        else:
                            second_prefix = time_text[:19]
                            second_suffix = suffix
                            second = pair[0]
                            if pair[1] != bucket:
                                bucket = pair[1]
                                if bucket in fast:
                                    slots = fast[bucket]
                                else:
                                    slots = fast[bucket] = _BucketSlots()
                                by_text = slots.by_text
                                last_tags = b""
                    if not slow:
                        last_time = time_text
                if not slow and tags_text != last_tags:
                    entry = by_text.get(tags_text, _MISSING)
                    if entry is _MISSING:
                        entry = self._slot(slots, tags_text)
                    if entry is None:
                        slow = True
                    else:
                        slot, tag_values = entry
                        last_tags = tags_text
                if slow:
                    # The next line checks its time again, and so the watermark.
                    last_time = b""
                    not_fast += 1
                    if metric is not None:
                        line = (_HEAD + metric + _TIME + time_text + _VALUE + text + _TAGS
                                + tags_text)
                        where = partial(self._locate, parts, time_text, 1)
                    elif other:
                        line = other
                        where = partial(self._locate, parts, other, 4)
                    else:
                        self.text_lines += 1  # an empty line
                        continue
                    self.watermark = watermark
                    slow_samples += self._slow_line(line, where)
                    watermark = self.watermark
                    if self._fast_epoch != epoch:
                        # A metric changed type: every slot was dropped.
                        epoch = self._fast_epoch
                        bucket = None
                        second_prefix = second_suffix = b"\xff"
                        last_time = last_tags = b""
                    continue
                if second > watermark:
                    # Only a point that is taken moves the watermark (as in the per-line
                    # path, where time is read after the metric check and whole-line JSON).
                    if self.kinds.get(metric.decode()) is None:
                        last_time = b""  # skipped below: no Metric line yet
                    else:
                        watermark = second
            try:
                slot[metric](value)
            except KeyError:
                # The first point of this series in this bucket, a gauge point, or a
                # metric without its Metric line yet.
                name = metric.decode()
                kind = self.kinds.get(name)
                if kind is None:
                    not_fast += 1
                    self.watermark = watermark
                    slow_samples += self._slow_line(
                        _HEAD + metric + _TIME + time_text + _VALUE + text + _TAGS
                        + tags_text, partial(self._locate, parts, time_text, 1))
                    watermark = self.watermark
                else:
                    assert bucket is not None  # a line gets here only with a parsed time
                    series = self._series(bucket, name, tag_values, kind)
                    if isinstance(series, _Gauge):
                        # The second is known; the fraction, if any, is 1 to 9 digits.
                        fraction = time_text[20:len(time_text) - len(second_suffix)]
                        series.add(second * NS_PER_S
                                   + (int(fraction.ljust(9, b"0")) if fraction else 0), value)
                    else:
                        append = slot[metric] = series.values.append
                        append(value)
        lines = len(parts) // _FIELDS
        self.lines += lines
        self.samples += lines - not_fast + slow_samples
        self.watermark = watermark
        if lines > not_fast:
            self._note_times(list(zip(parts[1::_FIELDS], parts[2::_FIELDS], strict=True)))

    def _note_times(self, lines: list[tuple[bytes | None, bytes | None]]) -> None:
        """Move the first and last sample times by a buffer's first and last fast line
        that is not a gauge: k6 writes vus every second, also while a test is paused."""
        def taken(line: tuple[bytes | None, bytes | None]) -> bool:
            metric, text = line
            return (metric is not None and text is not None
                    and self.kinds.get(metric.decode()) not in (None, "gauge"))

        first = next(filter(taken, lines), None)
        last = next(filter(taken, reversed(lines)), None)
        for line in (first, last):
            if line is not None and line[1] is not None:
                with contextlib.suppress(ValueError):
                    self._note_ns(parse_epoch_ns(line[1].decode()))

    def _note_ns(self, ns: int) -> None:
        if self.first_ns is None or ns < self.first_ns:
            self.first_ns = ns
        if self.last_ns is None or ns > self.last_ns:
            self.last_ns = ns

    def _second(self, key: bytes, time_text: bytes) -> tuple[int, int] | None:
        """(epoch second, bucket start) of a fast-path time; None if it does not parse."""
        try:
            second = parse_epoch_seconds(time_text.decode())
        except ValueError:
            return None
        pair = (second, second - second % self.bucket_seconds)
        if len(self._seconds) >= _MAX_CACHED_SECONDS:
            self._seconds.clear()
        self._seconds[key] = pair
        return pair

    def _slot(self, slots: _BucketSlots, text: bytes) -> tuple[Slot, tuple[Any, ...]] | None:
        """The slot and tag values of a tags text in one bucket; None for unusable tags."""
        values = self._tags.get(text, _MISSING)
        if values is _MISSING:
            values = self._parse_tags(text)
        entry = None
        if values is not None:
            slot = slots.by_values.get(values)
            if slot is None:
                slot = slots.by_values[values] = {}
            entry = (slot, values)
        if len(slots.by_text) >= _MAX_CACHED_TAGS:
            slots.by_text.clear()
        slots.by_text[text] = entry
        return entry

    def _parse_tags(self, text: bytes) -> tuple[Any, ...] | None:
        """Tag values of a tags text; None when its lines must take the per-line path."""
        tags = None
        if text.endswith(b"}}"):  # the ends of "data" and of the line
            with contextlib.suppress(orjson.JSONDecodeError):
                tags = orjson.loads(text[:-2])
        values: tuple[Any, ...] | None = None
        if tags.__class__ is dict:
            values = tuple(map(tags.get, self.tag_keys))
            try:
                hash(values)
            except TypeError:
                values = None
            if values is not None and b"\\u0000" in text:
                values = None  # the per-line path refuses a NUL in a grouped tag
        if len(self._tags) >= _MAX_CACHED_TAGS:
            self._tags.clear()
        self._tags[text] = values
        return values

    def _series(self, bucket: int, metric: str, tag_values: tuple[Any, ...],
                kind: str) -> _Series:
        series_by_key = self.open.get(bucket)
        if series_by_key is None:
            series_by_key = self.open[bucket] = {}
        key = (metric, tag_values, kind)
        series = series_by_key.get(key)
        if series is None:
            series = series_by_key[key] = _Gauge() if kind == "gauge" else _Series()
        return series

    def _slow_line(self, line: bytes, where: Callable[[], int]) -> int:
        """Parse and aggregate one line with orjson; 1 when it added a sample, else 0.

        ``where()`` gives the line's number; it is asked only when the line is skipped.
        """
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            obj = self._not_json(line, where, exc)
            if obj is None:
                return 0
        try:
            return self._take(obj, where)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            self.skip(where(), "bad_shape", f"not a k6 JSON line: {exc!r}")
        return 0

    def _not_json(self, line: bytes, where: Callable[[], int],
                  exc: orjson.JSONDecodeError) -> Any:
        """A line that is not JSON: the rest of a cut line (the joined line is returned),
        the start of one (kept), k6's own text (counted as harmless), or a loss."""
        fragment = self._fragment
        if fragment is not None:
            with contextlib.suppress(orjson.JSONDecodeError):
                obj = orjson.loads(fragment[0] + line)
                self._fragment = None
                self.rejoined += 1
                return obj
        if _JSON_DEBRIS.search(line) is None:
            self.text_lines += 1
            if fragment is not None and where() - fragment[1] > _FRAGMENT_LINES:
                self.finish()
            return None
        if line.lstrip().startswith(b"{") and exc.pos >= len(line.rstrip()):
            # JSON that ends too soon. k6 writes its progress block into the same stdout
            # as --out json=-, and it can land inside a JSON line: keep the start until
            # the rest arrives.
            self.finish()
            self._fragment = (bytes(line), where())
            return None
        self.skip(where(), "bad_json", f"not JSON: {exc}")
        return None

    def finish(self) -> None:
        """Count a cut line whose rest never came as lost. Call at end of input."""
        if self._fragment is not None:
            _, lineno = self._fragment
            self._fragment = None
            self.skip(lineno, "cut_line",
                      "a JSON line cut by k6's progress output was never completed; run "
                      "k6 with -q (--quiet) so that it writes no progress into the pipe")

    def _take(self, obj: Any, where: Callable[[], int]) -> int:
        if obj["type"] == "Point":
            metric = obj["metric"]
            kind = self.kinds.get(metric)
            if kind is None:
                self.skip(where(), "point_before_metric",
                          f"no Metric line for {metric!r} before this point")
                return 0
            data = obj["data"]
            value = data["value"]
            if value.__class__ is not float and value.__class__ is not int:
                self.skip(where(), "bad_value", f"value {value!r} is not a number")
                return 0
            if value - value != 0:
                self.skip(where(), "not_finite", f"value {value!r} is not finite")
                return 0
            if not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
                self.skip(where(), "huge_value",
                          f"value {value!r} is beyond +-{MAX_ABS_VALUE:g}")
                return 0
            time_text = data["time"]
            if not isinstance(time_text, str):
                raise TypeError(f"time {time_text!r} is not a string")
            try:
                ns = parse_epoch_ns(time_text)
            except ValueError as exc:
                self.skip(where(), "bad_time", str(exc))
                return 0
            tags = data.get("tags") or _EMPTY_TAGS
            tag_values = tuple(map(tags.get, self.tag_keys))
            hash(tag_values)  # unhashable tag values are a bad shape
            problem = self._name_problem(metric, tag_values)
            if problem:
                self.skip(where(), problem[0], problem[1])
                return 0
            second = ns // NS_PER_S
            if second > self.watermark:
                self.watermark = second
            if kind != "gauge":
                self._note_ns(ns)
            series = self._series(second - second % self.bucket_seconds, metric,
                                  tag_values, kind)
            if isinstance(series, _Gauge):
                series.add(ns, value)
            else:
                series.values.append(value)
            return 1
        if obj["type"] == "Metric":
            self._metric_line(where, obj)
        else:
            self.skip(where(), "unknown_line_type", f"line type {obj['type']!r}")
        return 0

    def _name_problem(self, metric: str, tag_values: tuple[Any, ...]) -> tuple[str, str] | None:
        """Why the servers would refuse this sample's metric name or tags, or None."""
        if len(metric) > self.limits.max_name_length:
            return "too_long", f"metric name longer than {self.limits.max_name_length} chars"
        problem = text_problem(metric)
        if problem:
            return "bad_character", f"metric {metric[:40]!r} {problem}"
        for key, value in zip(self.tag_keys, tag_values, strict=True):
            problem = text_problem(value) if isinstance(value, str) else None
            if problem:
                return "bad_character", f"tag {key!r}: {value[:40]!r} {problem}"
        return None

    def _metric_line(self, where: Callable[[], int], obj: dict[str, Any]) -> None:
        data = obj["data"]
        name = data["name"]
        kind = data["type"]
        if not isinstance(name, str) or not name:
            raise TypeError("metric name must be a non-empty string")
        if kind not in KINDS:
            self.skip(where(), "unknown_metric_type",
                      f"metric {name!r} has unknown type {kind!r}; its points are skipped")
            return
        contains = data.get("contains")
        if contains in UNITS and text_problem(name) is None and (
                len(name) <= self.limits.max_name_length):
            self.units[name] = contains  # k6's unit: time (ms) or data (bytes)
        old = self.kinds.get(name)
        self.kinds[name] = kind
        if old is not None and old != kind:
            self._fast.clear()
            self._fast_epoch += 1

    # --- closing ---------------------------------------------------------------------

    def close_through(self, last_bucket: int) -> tuple[list[TrendPartial], list[CounterPartial]]:
        """Close every open bucket whose start is <= last_bucket into partials."""
        trends: list[TrendPartial] = []
        counters: list[CounterPartial] = []
        width = self.bucket_seconds
        for bucket in [b for b in self._fast if b <= last_bucket]:
            del self._fast[bucket]
        for bucket in sorted(b for b in self.open if b <= last_bucket):
            for (metric, tag_values, kind), series in self.open.pop(bucket).items():
                tags = tuple(sorted(
                    (k, self._tag_text(str(v)))
                    for k, v in zip(self.tag_keys, tag_values, strict=True) if v is not None))
                values = np.frombuffer(series.values, dtype=np.float64)
                count = len(values)
                total, *rest = expansion_of(values)  # the exact sum, correctly rounded first
                lo, hi = float(values.min()), float(values.max())
                if kind == "trend":
                    centroids, zeros = digest.split_zeros(values)
                    trends.append(TrendPartial(metric, tags, bucket, width, count, total, lo,
                                               hi, centroids, zeros, tuple(rest)))
                    continue
                last_ns, last_value = 0, 0.0
                if isinstance(series, _Gauge):
                    last_ns, last_value = max(series.last_ns, 0), float(series.last_value)
                counters.append(CounterPartial(
                    metric, kind, tags, bucket, width, total, count,
                    int(np.count_nonzero(values)), lo, hi, last_ns, last_value, tuple(rest)))
        return trends, counters

    def _tag_text(self, value: str) -> str:
        """The tag value as the servers store it: a long URL is shortened, never refused."""
        if len(value) <= self.limits.max_tag_length:
            return value
        self.tags_shortened += 1
        return shorten(value, self.limits.max_tag_length)

    def close_ready(self, local_grace: float) -> tuple[list[TrendPartial], list[CounterPartial]]:
        """Close buckets that event time has passed by more than the local grace."""
        return self.close_through(int(self.watermark - local_grace) - self.bucket_seconds)

    def close_all(self) -> tuple[list[TrendPartial], list[CounterPartial]]:
        return self.close_through(2**62)

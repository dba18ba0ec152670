"""A k6 recording in memory: its lines in chunks with their event times, the figures a
replay must find in the database, and the time shift of each simulated generator.

No network and no asyncio. The expected figures are computed here from the raw lines with
``orjson``, independently of ``k6_forward.lines`` (the code under test): a Point counts
when its metric had a Metric line of a known type before it, its value is a finite
number and its time an RFC 3339 timestamp with an offset, as k6-forward documents.
"""

from __future__ import annotations

import calendar
import gzip
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from common.timebucket import NS_PER_S, BucketClock, TimestampError

KINDS = ("trend", "counter", "gauge", "rate")
# Every Point line holds its time right after this key (lines in another layout are
# rewritten into k6's at load, see ``_normalized``). Inside a JSON string every quote is
# escaped, so this text can only be the JSON structure itself.
TIME_KEY = b'"data":{"time":"'
_SECONDS = re.compile(rb'"data":\{"time":"(\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d)')
_WHOLE_TIME = re.compile(
    rb'"data":\{"time":"(\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d)(\.\d{1,9})?([Zz]|[+-]\d\d:\d\d)"')


class RecordingError(Exception):
    """The recording cannot be read, or holds no usable Point line."""


@dataclass
class MetricFigures:
    """What one copy of the recording holds for one metric."""

    kind: str
    count: int = 0
    nonzero: int = 0
    total: float = 0.0
    values: list[float] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class Chunk:
    block: bytes  # complete lines, each ending with a newline
    lines: int
    samples: int  # Points that count (see the module docstring)
    end_ns: int  # event time of the chunk's last timed line (for pacing)
    seconds: tuple[bytes, ...]  # distinct data.time texts up to the second, sorted


@dataclass
class Recording:
    path: Path
    chunks: list[Chunk]
    lines: int
    samples: int
    metric_lines: int
    other_lines: int  # neither a Metric line nor a counted Point (skipped by a forwarder)
    normalized: int  # Point lines rewritten into k6's layout so their time can be shifted
    first_ns: int
    last_ns: int
    figures: dict[str, MetricFigures]

    @property
    def span_seconds(self) -> float:
        return (self.last_ns - self.first_ns) / NS_PER_S


def read_lines(path: Path) -> list[bytes]:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw: bytes = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise RecordingError(f"cannot read {path}: {exc}") from None
    lines = raw.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


class _Clock:
    """Epoch nanoseconds of k6 timestamps, the second cached (k6 repeats it a lot)."""

    def __init__(self) -> None:
        self._seconds = BucketClock(1)

    def epoch_ns(self, text: object) -> int | None:
        if not isinstance(text, str) or len(text) < 20:
            return None
        try:
            second, _ = self._seconds.second_and_bucket(text)
        except (TimestampError, ValueError):
            return None
        # second_and_bucket checked: [.fraction](Z|z|+hh:mm|-hh:mm) after the seconds.
        end = len(text) - (1 if text[-1] in "Zz" else 6)
        fraction = text[20:end] if text[19] == "." else ""
        return second * NS_PER_S + (int(fraction.ljust(9, "0")) if fraction else 0)


def _normalized(obj: dict[str, Any], data: dict[str, Any]) -> bytes:
    """The same Point in k6's layout: metric, type, then data with time first."""
    rest = {k: v for k, v in obj.items() if k not in ("metric", "type", "data")}
    body = {"time": data["time"], **{k: v for k, v in data.items() if k != "time"}}
    return orjson.dumps({"metric": obj.get("metric"), "type": "Point", "data": body, **rest})


def load(path: Path, max_lines: int = 4096, window_s: float = 0.0) -> Recording:
    """Read a recording and cut it into chunks of at most ``max_lines`` lines and, when
    ``window_s`` > 0, at most that much event time each."""
    clock = _Clock()
    kinds: dict[str, str] = {}
    figures: dict[str, MetricFigures] = {}
    lines = read_lines(path)
    window_ns = int(window_s * NS_PER_S)
    chunks: list[Chunk] = []
    current: list[bytes] = []
    current_samples = 0
    chunk_start: int | None = None
    last_time: int | None = None
    first_ns, last_ns = math.inf, -math.inf
    samples = metric_lines = other = normalized = 0

    def cut() -> None:
        nonlocal current, current_samples, chunk_start
        if not current:
            return
        block = b"\n".join(current) + b"\n"
        seconds = tuple(sorted(set(_SECONDS.findall(block))))
        chunks.append(Chunk(block, len(current), current_samples,
                            last_time if last_time is not None else 0, seconds))
        current, current_samples, chunk_start = [], 0, None

    for raw in lines:
        line_ns: int | None = None
        counted = False
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and obj.get("type") == "Metric":
            data = obj.get("data")
            if isinstance(data, dict):
                name, kind = data.get("name"), data.get("type")
                if isinstance(name, str) and name and kind in KINDS:
                    kinds[name] = kind
                    metric_lines += 1
        elif isinstance(obj, dict) and obj.get("type") == "Point":
            data = obj.get("data")
            if isinstance(data, dict) and isinstance(data.get("time"), str):
                if raw.count(TIME_KEY) != 1:
                    raw = _normalized(obj, data)
                    normalized += 1
                line_ns = clock.epoch_ns(data["time"])
                metric = obj.get("metric")
                value = data.get("value")
                tags = data.get("tags")
                if (line_ns is not None and isinstance(metric, str) and metric in kinds
                        and value.__class__ in (int, float) and math.isfinite(value)
                        and (not tags or isinstance(tags, dict))):
                    counted = True
                    figure = figures.get(metric)
                    if figure is None:
                        figure = figures[metric] = MetricFigures(kinds[metric])
                    figure.kind = kinds[metric]
                    figure.count += 1
                    figure.values.append(float(value))
                    if value:
                        figure.nonzero += 1
                    first_ns = min(first_ns, line_ns)
                    last_ns = max(last_ns, line_ns)
        if counted:
            samples += 1
        elif not (isinstance(obj, dict) and obj.get("type") == "Metric"):
            other += 1
        if line_ns is not None:
            if chunk_start is not None and window_ns and line_ns - chunk_start > window_ns:
                cut()
            if chunk_start is None:
                chunk_start = line_ns
        current.append(raw)
        current_samples += counted
        if line_ns is not None:
            last_time = line_ns
        if len(current) >= max_lines:
            cut()
    cut()
    if not samples:
        raise RecordingError(f"{path} holds no usable k6 Point line")
    for figure in figures.values():
        figure.total = math.fsum(figure.values)
        figure.values = []
    return Recording(path, chunks, len(lines), samples, metric_lines, other, normalized,
                     int(first_ns), int(last_ns), figures)


def bucket_offset(first_ns: int, bucket_seconds: int, now: float) -> int:
    """Seconds to add so the recording's first bucket becomes the current bucket."""
    first_bucket = (first_ns // NS_PER_S) // bucket_seconds * bucket_seconds
    now_bucket = int(now) // bucket_seconds * bucket_seconds
    return now_bucket - first_bucket


def _shift_second(text: bytes, seconds: int) -> bytes:
    """'YYYY-MM-DDTHH:MM:SS' moved by whole seconds; the separator is kept, and the UTC
    offset after it is left alone, so the text still means the shifted instant."""
    epoch = calendar.timegm((int(text[0:4]), int(text[5:7]), int(text[8:10]),
                             int(text[11:13]), int(text[14:16]), int(text[17:19]), 0, 0, 0))
    t = time.gmtime(epoch + seconds)
    return b"%04d-%02d-%02d%s%02d:%02d:%02d" % (t.tm_year, t.tm_mon, t.tm_mday, text[10:11],
                                                 t.tm_hour, t.tm_min, t.tm_sec)


class Shifter:
    """Rewrites every Point's data.time by ``shift_ns``, the rest of each line untouched.

    A whole-second shift changes only the text up to the seconds: the fraction (all its
    digits, nanoseconds included) and the offset text stay as they were. A shift with a
    fraction of a second rewrites the fraction as k6 writes it (up to 9 digits, trailing
    zeros dropped).
    """

    _MAX_CACHE = 200_000

    def __init__(self, shift_ns: int) -> None:
        self.shift_ns = shift_ns
        self.whole, self.sub_ns = divmod(shift_ns, NS_PER_S)  # sub_ns in [0, 1e9)
        self._seconds: dict[bytes, bytes] = {}
        self._times: dict[bytes, bytes] = {}

    def second(self, text: bytes, extra: int = 0) -> bytes:
        key = text if not extra else text + b"+"
        new = self._seconds.get(key)
        if new is None:
            if len(self._seconds) >= self._MAX_CACHE:
                self._seconds.clear()
            new = self._seconds[key] = _shift_second(text, self.whole + extra)
        return new

    def apply(self, chunk: Chunk) -> bytes:
        if not self.shift_ns:
            return chunk.block
        if self.sub_ns:
            return _WHOLE_TIME.sub(self._replace, chunk.block)
        block = chunk.block
        # Later seconds first when moving forward (earlier first when moving back), so a
        # rewritten text is never rewritten again by the next replacement.
        for text in (reversed(chunk.seconds) if self.whole > 0 else chunk.seconds):
            block = block.replace(TIME_KEY + text, TIME_KEY + self.second(text))
        return block

    def _replace(self, match: re.Match[bytes]) -> bytes:
        key = match.group(0)
        new = self._times.get(key)
        if new is None:
            fraction = match.group(2) or b""
            ns = (int(fraction[1:].ljust(9, b"0")) if fraction else 0) + self.sub_ns
            carry, ns = divmod(ns, NS_PER_S)
            digits = (b".%09d" % ns).rstrip(b"0") if ns else b""
            new = (TIME_KEY + self.second(match.group(1), carry) + digits + match.group(3)
                   + b'"')
            if len(self._times) >= self._MAX_CACHE:
                self._times.clear()
            self._times[key] = new
        return new

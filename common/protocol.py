"""Wire protocol: length-prefixed msgpack frames and their schema. No I/O, no asyncio.

See docs/PROTOCOL.md. Every frame is a 4-byte big-endian unsigned length followed by
that many bytes of msgpack holding one map with a ``type`` key.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np

from common import digest

PROTOCOL_VERSION = 1
ROLE_TD = "td"
ROLE_NON_TD = "non_td"
NON_TD_KINDS = ("counter", "gauge", "rate")

_LENGTH = struct.Struct(">I")


class FramingError(Exception):
    """The byte stream cannot be split into frames; the connection must close."""


class Refused(Exception):
    """A frame that is well framed but unacceptable. ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Largest magnitude of a sample value. Beyond it a value is taken as corrupt: the
# forwarder skips such a sample and the servers refuse an item whose min, max or last
# value lies beyond it. With counts below 2**63, no sum of such values can overflow a
# float64, whatever a client sends. 1e20 still admits int64 nanosecond timestamps and
# every byte count or duration k6 produces.
MAX_ABS_VALUE = 1e20
# A shortened tag ends in "~" and 16 hex digits of a BLAKE2b hash of the whole text.
_SHORTENED_SUFFIX = 17
MIN_TAG_LENGTH = 2 * _SHORTENED_SUFFIX


@dataclass(frozen=True)
class Limits:
    """Validation limits shared by the forwarder and the servers (docs/PROTOCOL.md)."""

    max_frame_bytes: int = 16 * 1024 * 1024
    max_items_per_frame: int = 100_000
    max_name_length: int = 200
    max_tags: int = 32
    max_tag_length: int = 256
    max_centroids: int = 10_000
    max_abs_value: float = MAX_ABS_VALUE


class TrendPartial(NamedTuple):
    metric: str
    tags: tuple[tuple[str, str], ...]
    bucket: int
    bucket_seconds: int
    samples: int
    total: float
    lo: float
    hi: float
    centroids: digest.Centroids
    zeros: int = 0
    # What rounding left out of ``total``: total + rest is the samples' exact sum
    # (common.exactsum). Sent as an 11th field when not empty.
    rest: tuple[float, ...] = ()
    # The digest as received, when it is a sketch's encoding of ``centroids`` (b"" when
    # not): a row made of this partial alone stores these bytes as they are.
    sketch: bytes = b""


class CounterPartial(NamedTuple):
    metric: str
    kind: str
    tags: tuple[tuple[str, str], ...]
    bucket: int
    bucket_seconds: int
    total: float
    samples: int
    nonzero: int
    lo: float
    hi: float
    last_ns: int
    last_value: float
    rest: tuple[float, ...] = ()  # as TrendPartial's; a 13th field when not empty


class Hello(NamedTuple):
    producer: str
    run_id: str
    role: str
    token: str | None = None
    # A secret the forwarder chose for its producer id: a later connection must show
    # the same one to speak for that producer (see docs/PROTOCOL.md).
    producer_key: str | None = None
    # What the forwarder reads, as a hash of its first 64 KiB (see k6_forward), and
    # whether the user wants it added again to a run that already holds it.
    input_id: str | None = None
    append: bool = False
    # The forwarder keeps frames until ``committed`` (their buckets are in the database),
    # not only until ``ack``; the server then sends ``committed`` frames.
    confirm: bool = False
    # The highest seq this forwarder had written to any connection for this server
    # before this hello: a frame up to it may already be in the database.
    sent_before: int = 0


class Generator(NamedTuple):
    """What a forwarder says of its load generator: at its start (host, k6, script) and
    at its end (exit status, the event time of its first and last sample, samples)."""

    seq: int
    state: str  # "start" or "end"
    at: float  # epoch seconds of the event, on the generator's clock
    host: str | None = None
    k6_version: str | None = None
    script: str | None = None
    exit_status: int | None = None
    first_ns: int | None = None
    last_ns: int | None = None
    samples: int | None = None
    # metric -> "time" or "data", as k6's Metric lines say ("contains"), at the end.
    units: dict[str, str] | None = None


class ItemRefusal(NamedTuple):
    """Items of one frame refused for one reason; the rest of the frame is accepted."""

    reason: str
    items: int
    samples: int
    detail: str


class Data(NamedTuple):
    seq: int
    items: list[Any]
    # The stream the items were first numbered in: the forwarder's name for the server it
    # sent them to ("" when not said), and their seq there when they are moved from it to
    # another server of the role (None: this frame's own seq). Rows remember, per
    # producer and stream, the last seq they hold, so that a frame stored by a lost
    # server and sent again is not counted twice.
    source: str = ""
    source_seq: int | None = None


# --- encoding -----------------------------------------------------------------------


def frame(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


def hello(producer: str, run_id: str, role: str, token: str | None = None,
          producer_key: str | None = None, input_id: str | None = None,
          append: bool = False, confirm: bool = False, sent_before: int = 0) -> bytes:
    message: dict[str, Any] = {"type": "hello", "version": PROTOCOL_VERSION,
                               "producer": producer, "run": run_id, "role": role}
    if confirm:
        message["confirm"] = True
    if sent_before:
        message["sent_before"] = sent_before
    if token is not None:
        message["token"] = token
    if producer_key is not None:
        message["producer_key"] = producer_key
    if input_id is not None:
        message["input"] = input_id
    if append:
        message["append"] = True
    return frame(message)


def welcome(role: str, last_seq: int, committed: int | None = None) -> bytes:
    message: dict[str, Any] = {"type": "welcome", "version": PROTOCOL_VERSION, "role": role,
                               "last_seq": last_seq}
    if committed is not None:
        message["committed"] = committed
    return frame(message)


def data(seq: int, items: list[list[Any]], source: str = "",
         source_seq: int | None = None) -> bytes:
    message: dict[str, Any] = {"type": "data", "seq": seq, "items": items}
    if source:
        message["source"] = source
    if source_seq is not None:
        message["source_seq"] = source_seq
    return frame(message)


def generator(g: Generator) -> bytes:
    """A generator frame: numbered, acknowledged, logged and resent like a data frame."""
    message = {"type": "generator", "seq": g.seq, "state": g.state, "at": g.at}
    for name in ("host", "k6_version", "script", "exit_status", "first_ns", "last_ns",
                 "samples", "units"):
        if getattr(g, name) is not None:
            message[name] = getattr(g, name)
    return frame(message)


MAX_THRESHOLDS = 1000
MAX_SOURCE_LENGTH = 256
MAX_SUM_TERMS = 40  # common.exactsum.MAX_TERMS
MAX_THRESHOLD_TEXT = 1024


def thresholds(items: list[tuple[str, bool, float]]) -> bytes:
    """The run's thresholds as this forwarder's k6 sees them: ``[text, abort_on_fail,
    delay_abort_eval seconds]`` each, ``text`` being ``metric{k:v}: p(95)<500``. Sent
    after every welcome; neither numbered nor logged: the forwarder says it again on every
    connection, so a restarted server learns it again."""
    return frame({"type": "thresholds", "items": [list(item) for item in items]})


def parse_thresholds(message: dict[str, Any]) -> list[tuple[str, bool, float]]:
    """Shape only; the server parses each text with td_report.thresholds."""
    items = message.get("items")
    if not isinstance(items, list) or len(items) > MAX_THRESHOLDS:
        raise Refused("bad_field", f"thresholds: items must be a list of at most "
                      f"{MAX_THRESHOLDS}")
    result = []
    for item in items:
        if (not isinstance(item, list) or len(item) != 3 or type(item[1]) is not bool):
            raise Refused("bad_field", "thresholds: each item is [text, abort_on_fail, "
                          "delay_abort_eval]")
        text = _text(item[0], "threshold", MAX_THRESHOLD_TEXT)
        delay = _finite(item[2], "delay_abort_eval")
        if delay < 0:
            raise Refused("bad_field", "thresholds: delay_abort_eval must not be negative")
        result.append((text, item[1], delay))
    return result


def verdicts(run_id: str, through: float | None, final: bool,
             results: list[dict[str, Any]]) -> bytes:
    """A server's verdicts on the run's thresholds of its metrics, over every generator,
    cumulative from the run's start up to ``through`` (the end of the latest bucket it
    has written; None before any). ``final``: every generator of the run has ended and
    this server has written all of their buckets."""
    return frame({"type": "verdicts", "run": run_id, "through": through, "final": final,
                  "results": results})


def data_body(seq: int, items: list[Any], source: str = "",
              source_seq: int | None = None) -> bytes:
    """A data frame's body without the length prefix (``items`` may be empty here)."""
    return data(seq, items, source, source_seq)[4:]


def ack(seq: int) -> bytes:
    return frame({"type": "ack", "seq": seq})


def quarantined(rows: int, samples: int, detail: str) -> bytes:
    """Bucket rows holding this producer's samples that the database refused for good,
    kept in the server's quarantine file: totals so far (a repeat replaces them).
    ``samples``: all samples of those rows, every producer's."""
    return frame({"type": "quarantined", "rows": rows, "samples": samples, "detail": detail})


def stream_key(producer: str, source: str) -> str:
    """The name rows keep for a stream (a producer's frames numbered for one server)."""
    text = f"{producer}\0{source}".encode(errors="surrogatepass")
    return hashlib.blake2b(text, digest_size=8).hexdigest()


def committed(seq: int) -> bytes:
    """Every frame of the producer up to ``seq`` is in the database (not only logged)."""
    return frame({"type": "committed", "seq": seq})


def error(reason: str, detail: str, seq: int | None = None, fatal: bool = False,
          retry: bool = False) -> bytes:
    """``retry``: nothing was refused; the server closes the connection and the client
    resends everything unacknowledged after reconnecting (a full disk, a busy server)."""
    message = {"type": "error", "seq": seq, "reason": reason, "detail": detail,
               "fatal": fatal}
    if retry:
        message["retry"] = True
    return frame(message)


def items_refused(seq: int, refusals: list[ItemRefusal]) -> bytes:
    """Some items of frame ``seq`` were refused; the rest of it is accepted (and acked).

    An ``error`` frame, so that a client that does not know ``items`` still sees a
    refusal; ``items`` lists [reason, items, samples, detail of the first] per reason.
    """
    first = refusals[0]
    return frame({"type": "error", "seq": seq, "reason": first.reason, "detail": first.detail,
                  "fatal": False,
                  "items": [[r.reason, r.items, r.samples, r.detail] for r in refusals]})


def trend_item(p: TrendPartial) -> list[Any]:
    item = [p.metric, dict(p.tags), p.bucket, p.bucket_seconds, p.samples, p.total, p.lo, p.hi,
            digest.encode(p.centroids), p.zeros]
    if p.rest:
        item.append(list(p.rest))
    return item


def counter_item(p: CounterPartial) -> list[Any]:
    item = [p.metric, p.kind, dict(p.tags), p.bucket, p.bucket_seconds, p.total, p.samples,
            p.nonzero, p.lo, p.hi, p.last_ns, p.last_value]
    if p.rest:
        item.append(list(p.rest))
    return item


# --- decoding -----------------------------------------------------------------------


def claimed_samples(item: object) -> int:
    """The sample count an item claims (trend field 4, counter field 6), 0 if none."""
    at = {10: 4, 12: 6}.get(len(item)) if isinstance(item, list) else None
    count = item[at] if at is not None and isinstance(item, list) else None
    return count if type(count) is int and 0 <= count <= MAX_INT else 0


class FrameDecoder:
    """Splits a byte stream into frame bodies. Feed bytes, get complete bodies back."""

    def __init__(self, max_frame_bytes: int = Limits.max_frame_bytes) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._broken: str | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete frame bodies so far. Frames before a bad length prefix are returned
        first; the FramingError comes from the next call (or ``check``)."""
        self.check()
        self._buffer += chunk
        bodies: list[bytes] = []
        buf = self._buffer
        offset = 0
        while len(buf) - offset >= 4:
            (length,) = _LENGTH.unpack_from(buf, offset)
            if length == 0 or length > self.max_frame_bytes:
                self._broken = f"frame length {length} outside 1..{self.max_frame_bytes} bytes"
                del buf[:]
                if bodies:
                    return bodies
                self.check()
            end = offset + 4 + length
            if end > len(buf):
                break
            bodies.append(bytes(buf[offset + 4 : end]))
            offset = end
        if offset:
            del buf[:offset]
        return bodies

    def check(self) -> None:
        """Raise FramingError if the stream already proved unframeable."""
        if self._broken is not None:
            raise FramingError(self._broken)

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)


class UnpackLimits(NamedTuple):
    """msgpack's own limits: a frame cannot make the decoder build more than this."""

    max_str_len: int
    max_bin_len: int
    max_array_len: int
    max_map_len: int


# A hello is a small map of short strings; the first frame is at most 64 KiB anyway.
HELLO_UNPACK = UnpackLimits(max_str_len=64 * 1024, max_bin_len=64 * 1024, max_array_len=64,
                            max_map_len=32)


def unpack_limits(limits: Limits) -> UnpackLimits:
    """For data frames. Strings may be long (a URL tag is shortened, not refused) but not
    longer than 1 MiB; binaries are digests; arrays are the items and their fields;
    maps are frames and tags."""
    return UnpackLimits(max_str_len=1 << 20, max_bin_len=16 * limits.max_centroids,
                        # twice the item limit: a few items too many are named as such
                        max_array_len=2 * max(limits.max_items_per_frame, 16),
                        # above the tag limit, so that too many tags cost their item only
                        max_map_len=max(limits.max_tags, 16) + 32)


def unpack(body: bytes, limits: UnpackLimits | None = None) -> dict[str, Any]:
    """Body bytes to a message map, refusing anything that is not a map with a type."""
    bounds = limits._asdict() if limits is not None else {}
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0,
                                  **bounds)
    except Exception as exc:  # msgpack raises several unrelated types
        raise Refused("bad_msgpack", f"body is not valid msgpack: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise Refused("bad_message", "frame is not a map with a string 'type'")
    return message


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored, or None. PostgreSQL text and jsonb hold any
    Unicode scalar value except U+0000; msgpack and orjson already refuse lone
    surrogates and invalid UTF-8."""
    if "\x00" in value:
        return "holds a NUL character (U+0000), which databases cannot store"
    return None


def shorten(value: str, limit: int) -> str:
    """``value`` if it has at most ``limit`` characters; else its first
    ``limit - 17`` characters, "~" and 16 hex digits of BLAKE2b-64 of its UTF-8 bytes.

    Stable (the same long URL always gives the same tag) and distinct for distinct
    values beyond any practical doubt. The forwarder and the servers both apply it."""
    if len(value) <= limit:
        return value
    tail = hashlib.blake2b(value.encode(), digest_size=8).hexdigest()
    return f"{value[:limit - _SHORTENED_SUFFIX]}~{tail}"


def _text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value:
        raise Refused("bad_field", f"{what} must be a non-empty string")
    if len(value) > limit:
        raise Refused("too_long", f"{what} is longer than {limit} characters")
    problem = text_problem(value)
    if problem:
        raise Refused("bad_character", f"{what} {value[:40]!r} {problem}")
    return value


# Counts and bucket starts stay below 2**53, so that they are exact as float64 too and
# their sums fit the database's bigint.
MAX_INT = 2**53


def _int(value: object, what: str, low: int = 0, high: int = MAX_INT) -> int:
    if type(value) is not int or not low <= value <= high:
        raise Refused("bad_field", f"{what} must be an integer from {low} to {high}")
    return value


def _finite(value: object, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise Refused("not_finite", f"{what} must be a finite number")
    return float(value)  # type: ignore[arg-type]


def _value(value: object, what: str, limits: Limits) -> float:
    number = _finite(value, what)
    if not -limits.max_abs_value <= number <= limits.max_abs_value:
        raise Refused("huge_value", f"{what} {number!r} is beyond +-{limits.max_abs_value:g}")
    return number


def _sum(value: object, count: int, lo: float, hi: float) -> float:
    """The sum of ``count`` values in [lo, hi]; any other is refused as inconsistent, so
    that no merge of sums can overflow."""
    total = _finite(value, "sum")
    slack = 1e-9 * count * max(abs(lo), abs(hi)) + 1e-300
    if not count * lo - slack <= total <= count * hi + slack:
        raise Refused("bad_field", f"sum {total!r} of {count} values is outside "
                      f"[{count} * min, {count} * max]")
    return total


def _rest(value: object, total: float) -> tuple[float, ...]:
    """The terms that make ``total`` exact: finite, each smaller than the one before."""
    if not isinstance(value, list) or len(value) > MAX_SUM_TERMS:
        raise Refused("bad_field", f"sum_rest must be a list of at most {MAX_SUM_TERMS} "
                      f"numbers")
    terms = tuple(_finite(term, "sum_rest") for term in value)
    previous = abs(total)
    for term in terms:
        if term == 0.0 or abs(term) > previous:
            raise Refused("bad_field", "each sum_rest term must be non-zero and smaller "
                          "than the one before it")
        previous = abs(term)
    return terms


def _tags(value: object, limits: Limits,
          notes: Counter[str] | None) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise Refused("bad_field", "tags must be a map of strings")
    if len(value) > limits.max_tags:
        raise Refused("too_many_tags", f"{len(value)} tags, limit {limits.max_tags}")
    pairs = []
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str) or not key:
            raise Refused("bad_field", "tag keys must be non-empty strings, values strings")
        for text in (key, val):
            problem = text_problem(text)
            if problem:
                raise Refused("bad_character", f"tag {key[:40]!r}: {text[:40]!r} {problem}")
        if len(key) > limits.max_tag_length or len(val) > limits.max_tag_length:
            key, val = shorten(key, limits.max_tag_length), shorten(val, limits.max_tag_length)
            if notes is not None:
                notes["tags_shortened"] += 1
        pairs.append((key, val))
    return tuple(sorted(pairs))


def _bucket(bucket: object, width: object) -> tuple[int, int]:
    start = _int(bucket, "bucket")
    seconds = _int(width, "bucket_seconds", 1)
    if start % seconds:
        raise Refused("unaligned_bucket", f"bucket {start} is not a multiple of {seconds}")
    return start, seconds


def parse_hello(message: dict[str, Any], limits: Limits) -> Hello:
    if message.get("type") != "hello":
        raise Refused("hello_expected", "the first frame must be a hello")
    version = message.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise Refused("bad_version", f"protocol version {message.get('version')!r} is not "
                      f"supported; this server speaks {PROTOCOL_VERSION}")
    role = message.get("role")
    if role not in (ROLE_TD, ROLE_NON_TD):
        raise Refused("bad_field", "role must be 'td' or 'non_td'")
    token = message.get("token")
    if token is not None and not isinstance(token, str):
        raise Refused("bad_field", "token must be a string")
    key = message.get("producer_key")
    if key is not None:
        key = _text(key, "producer_key", 128)
    input_id = message.get("input")
    if input_id is not None:
        input_id = _text(input_id, "input", 128)
    append = message.get("append", False)
    if type(append) is not bool:
        raise Refused("bad_field", "append must be true or false")
    confirm = message.get("confirm", False)
    if type(confirm) is not bool:
        raise Refused("bad_field", "confirm must be true or false")
    sent_before = _int(message.get("sent_before", 0), "sent_before", 0)
    return Hello(
        producer=_text(message.get("producer"), "producer", limits.max_name_length),
        run_id=_text(message.get("run"), "run", limits.max_name_length),
        role=role,
        token=token,
        producer_key=key,
        input_id=input_id,
        append=append,
        confirm=confirm,
        sent_before=sent_before,
    )


def parse_data(message: dict[str, Any], limits: Limits) -> Data:
    if message.get("type") != "data":
        raise Refused("unexpected_type", f"unexpected frame type {message.get('type')!r}")
    seq = _int(message.get("seq"), "seq", 1)
    items = message.get("items")
    if not isinstance(items, list) or not items:
        raise Refused("bad_field", "items must be a non-empty list")
    if len(items) > limits.max_items_per_frame:
        raise Refused("too_many_items", f"{len(items)} items, limit {limits.max_items_per_frame}")
    source = message.get("source", "")
    if source != "":
        source = _text(source, "source", MAX_SOURCE_LENGTH)
    source_seq = message.get("source_seq")
    if source_seq is not None:
        source_seq = _int(source_seq, "source_seq", 1)
    return Data(seq, items, source, source_seq)


def parse_generator(message: dict[str, Any], limits: Limits) -> Generator:
    seq = _int(message.get("seq"), "seq", 1)
    state = message.get("state")
    if state not in ("start", "end"):
        raise Refused("bad_field", "a generator's state is 'start' or 'end'")
    texts: dict[str, Any] = {}
    for name in ("host", "k6_version", "script"):
        value = message.get(name)
        texts[name] = None if value is None else shorten(
            _text(value, name, 1 << 16), limits.max_name_length)
    numbers: dict[str, Any] = {}
    for name, low, high in (("exit_status", -(2**31), 2**31 - 1), ("first_ns", 0, 2**63 - 1),
                            ("last_ns", 0, 2**63 - 1), ("samples", 0, 2**63 - 1)):
        value = message.get(name)
        numbers[name] = None if value is None else _int(value, name, low, high)
    return Generator(seq, state, _finite(message.get("at"), "at"), **texts, **numbers,
                     units=_units(message.get("units"), limits))


MAX_UNITS = 10_000


def _units(value: object, limits: Limits) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_UNITS:
        raise Refused("bad_field", f"units must be a map of at most {MAX_UNITS} metrics")
    units = {}
    for metric, unit in value.items():
        if unit not in ("time", "data"):
            raise Refused("bad_field", "a metric's unit is 'time' or 'data'")
        units[_text(metric, "metric", limits.max_name_length)] = unit
    return units


def parse_trend_item(item: object, limits: Limits,
                     notes: Counter[str] | None = None) -> TrendPartial:
    if not isinstance(item, list) or len(item) not in (10, 11):
        raise Refused("bad_item", "a trend item is a list of 10 fields (11 with sum_rest)")
    metric, tags, bucket, width, count, total, lo, hi, blob, zero_count = item[:10]
    start, seconds = _bucket(bucket, width)
    n = _int(count, "count", 1)
    zeros = _int(zero_count, "zeros")
    if zeros > n:
        raise Refused("bad_field", "zeros is greater than count")
    if not isinstance(blob, bytes):
        raise Refused("bad_field", "digest must be binary")
    if len(blob) > 16 * limits.max_centroids:
        raise Refused("too_long", f"digest has more than {limits.max_centroids} centroids")
    try:
        centroids = digest.decode(blob)
    except ValueError as exc:
        raise Refused("bad_digest", str(exc)) from None
    sketch = digest.encodes_sketch(blob)
    problem = (digest.check(centroids, known_sketch=sketch)
               if len(centroids) or zeros < n else None)
    if problem:
        raise Refused("bad_digest", problem)
    low, high = _value(lo, "min", limits), _value(hi, "max", limits)
    if low > high:
        raise Refused("bad_field", "min is greater than max")
    if len(centroids) and digest.outside(centroids, low, high, known_sketch=sketch):
        raise Refused("bad_digest", "a bucket (or centroid) lies outside [min, max]")
    with np.errstate(over="ignore"):  # absurd weights overflow to inf and are refused below
        weight = float(np.sum(centroids[:, 1]))
    if not abs(weight + zeros - n) <= 1e-6 * n:
        raise Refused("bad_digest",
                      f"centroid weights sum to {weight} with {zeros} zeros, count is {n}")
    checked = _sum(total, n, low, high)
    return TrendPartial(_text(metric, "metric", limits.max_name_length),
                        _tags(tags, limits, notes), start, seconds, n, checked, low, high,
                        centroids, zeros, _rest(item[10], checked) if len(item) == 11 else (),
                        blob if sketch and len(centroids) <= digest.MAX_CENTROIDS else b"")


def parse_counter_item(item: object, limits: Limits,
                       notes: Counter[str] | None = None) -> CounterPartial:
    if not isinstance(item, list) or len(item) not in (12, 13):
        raise Refused("bad_item", "a counter item is a list of 12 fields (13 with sum_rest)")
    metric, kind, tags, bucket, width, total, count, nonzero, lo, hi, last_ns, last = item[:12]
    if kind not in NON_TD_KINDS:
        raise Refused("bad_kind", f"metric kind {kind!r} is not one of {NON_TD_KINDS}")
    start, seconds = _bucket(bucket, width)
    n = _int(count, "count", 1)
    nz = _int(nonzero, "nonzero")
    if nz > n:
        raise Refused("bad_field", "nonzero is greater than count")
    low, high = _value(lo, "min", limits), _value(hi, "max", limits)
    if low > high:
        raise Refused("bad_field", "min is greater than max")
    last_value = _value(last, "last_value", limits)
    if kind == "gauge" and not low <= last_value <= high:
        raise Refused("bad_field", "a gauge's last_value lies outside [min, max]")
    checked = _sum(total, n, low, high)
    return CounterPartial(_text(metric, "metric", limits.max_name_length), kind,
                          _tags(tags, limits, notes), start, seconds, checked, n, nz, low,
                          high, _int(last_ns, "last_ns", 0, 2**63 - 1), last_value,
                          _rest(item[12], checked) if len(item) == 13 else ())

"""Wire protocol: length-prefixed msgpack frames and their schema. No I/O, no asyncio.

See docs/PROTOCOL.md. Every frame is a 4-byte big-endian unsigned length followed by
that many bytes of msgpack holding one map with a ``type`` key.
"""

from __future__ import annotations

import math
import struct
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


@dataclass(frozen=True)
class Limits:
    """Validation limits; the defaults are documented in docs/PROTOCOL.md."""

    max_frame_bytes: int = 16 * 1024 * 1024
    max_items_per_frame: int = 100_000
    max_name_length: int = 200
    max_tags: int = 32
    max_tag_length: int = 256
    max_centroids: int = 10_000


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


class Hello(NamedTuple):
    producer: str
    run_id: str
    role: str
    token: str | None = None


class Data(NamedTuple):
    seq: int
    items: list[Any]


# --- encoding -----------------------------------------------------------------------


def frame(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


def hello(producer: str, run_id: str, role: str, token: str | None = None) -> bytes:
    message = {"type": "hello", "version": PROTOCOL_VERSION, "producer": producer,
               "run": run_id, "role": role}
    if token is not None:
        message["token"] = token
    return frame(message)


def welcome(role: str, last_seq: int) -> bytes:
    return frame({"type": "welcome", "version": PROTOCOL_VERSION, "role": role,
                  "last_seq": last_seq})


def data(seq: int, items: list[list[Any]]) -> bytes:
    return frame({"type": "data", "seq": seq, "items": items})


def ack(seq: int) -> bytes:
    return frame({"type": "ack", "seq": seq})


def error(reason: str, detail: str, seq: int | None = None, fatal: bool = False) -> bytes:
    return frame({"type": "error", "seq": seq, "reason": reason, "detail": detail,
                  "fatal": fatal})


def trend_item(p: TrendPartial) -> list[Any]:
    return [p.metric, dict(p.tags), p.bucket, p.bucket_seconds, p.samples, p.total, p.lo, p.hi,
            digest.encode(p.centroids), p.zeros]


def counter_item(p: CounterPartial) -> list[Any]:
    return [p.metric, p.kind, dict(p.tags), p.bucket, p.bucket_seconds, p.total, p.samples,
            p.nonzero, p.lo, p.hi, p.last_ns, p.last_value]


# --- decoding -----------------------------------------------------------------------


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


def unpack(body: bytes) -> dict[str, Any]:
    """Body bytes to a message map, refusing anything that is not a map with a type."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise Refused("bad_msgpack", f"body is not valid msgpack: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise Refused("bad_message", "frame is not a map with a string 'type'")
    return message


def _text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value:
        raise Refused("bad_field", f"{what} must be a non-empty string")
    if len(value) > limit:
        raise Refused("too_long", f"{what} is longer than {limit} characters")
    return value


def _int(value: object, what: str, low: int = 0) -> int:
    if type(value) is not int or value < low:
        raise Refused("bad_field", f"{what} must be an integer >= {low}")
    return value


def _finite(value: object, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise Refused("not_finite", f"{what} must be a finite number")
    return float(value)  # type: ignore[arg-type]


def _tags(value: object, limits: Limits) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise Refused("bad_field", "tags must be a map of strings")
    if len(value) > limits.max_tags:
        raise Refused("too_many_tags", f"{len(value)} tags, limit {limits.max_tags}")
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise Refused("bad_field", "tag keys and values must be strings")
        if len(key) > limits.max_tag_length or len(val) > limits.max_tag_length:
            raise Refused("too_long", f"tag {key[:40]!r} exceeds {limits.max_tag_length} chars")
    return tuple(sorted(value.items()))


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
    return Hello(
        producer=_text(message.get("producer"), "producer", limits.max_name_length),
        run_id=_text(message.get("run"), "run", limits.max_name_length),
        role=role,
        token=token,
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
    return Data(seq, items)


def parse_trend_item(item: object, limits: Limits) -> TrendPartial:
    if not isinstance(item, list) or len(item) != 10:
        raise Refused("bad_item", "a trend item is a list of 10 fields")
    metric, tags, bucket, width, count, total, lo, hi, blob, zero_count = item
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
    problem = digest.check(centroids) if len(centroids) or zeros < n else None
    if problem:
        raise Refused("bad_digest", problem)
    low, high = _finite(lo, "min"), _finite(hi, "max")
    if low > high:
        raise Refused("bad_field", "min is greater than max")
    with np.errstate(over="ignore"):  # absurd weights overflow to inf and are refused below
        weight = float(np.sum(centroids[:, 1]))
    if not abs(weight + zeros - n) <= 1e-6 * n:
        raise Refused("bad_digest",
                      f"centroid weights sum to {weight} with {zeros} zeros, count is {n}")
    return TrendPartial(_text(metric, "metric", limits.max_name_length), _tags(tags, limits),
                        start, seconds, n, _finite(total, "sum"), low, high, centroids, zeros)


def parse_counter_item(item: object, limits: Limits) -> CounterPartial:
    if not isinstance(item, list) or len(item) != 12:
        raise Refused("bad_item", "a counter item is a list of 12 fields")
    metric, kind, tags, bucket, width, total, count, nonzero, lo, hi, last_ns, last = item
    if kind not in NON_TD_KINDS:
        raise Refused("bad_kind", f"metric kind {kind!r} is not one of {NON_TD_KINDS}")
    start, seconds = _bucket(bucket, width)
    n = _int(count, "count", 1)
    nz = _int(nonzero, "nonzero")
    if nz > n:
        raise Refused("bad_field", "nonzero is greater than count")
    low, high = _finite(lo, "min"), _finite(hi, "max")
    if low > high:
        raise Refused("bad_field", "min is greater than max")
    return CounterPartial(_text(metric, "metric", limits.max_name_length), kind,
                          _tags(tags, limits), start, seconds, _finite(total, "sum"), n, nz,
                          low, high, _int(last_ns, "last_ns"), _finite(last, "last_value"))

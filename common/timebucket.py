"""k6 timestamps to epoch nanoseconds and bucket starts. Pure functions, no I/O.

k6 writes RFC 3339 timestamps with up to nanosecond precision and the runner's local
UTC offset, for example ``2026-11-23T15:26:21.227868137Z`` or
``2026-11-23T17:26:21.227868137+02:00``. ``datetime.fromisoformat`` stops at
microseconds, so the timestamp is parsed here, strictly and in ASCII only.
"""

from __future__ import annotations

import calendar
import re

NS_PER_S = 1_000_000_000

_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,
)
# What follows the seconds: an optional 1-9 digit fraction, then the offset.
_AFTER_SECONDS = re.compile(r"(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})", re.ASCII)


class TimestampError(ValueError):
    """A timestamp that is not RFC 3339 with an explicit offset."""


def _parse(text: str) -> tuple[int, str]:
    """(whole epoch seconds, fraction digits) of a timestamp."""
    match = _TIMESTAMP.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise TimestampError(f"not an RFC 3339 timestamp with a UTC offset: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not 1 <= month <= 12 or year < 1:
        raise TimestampError(f"date out of range: {text!r}")
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        raise TimestampError(f"day out of range: {text!r}")
    if hour > 23 or minute > 59 or second > 60:
        raise TimestampError(f"time out of range: {text!r}")
    offset_text = match.group(8)
    offset = 0
    if offset_text not in ("Z", "z"):
        off_hours, off_minutes = int(offset_text[1:3]), int(offset_text[4:6])
        if off_hours > 23 or off_minutes > 59:
            raise TimestampError(f"UTC offset out of range: {text!r}")
        offset = off_hours * 3600 + off_minutes * 60
        if offset_text[0] == "-":
            offset = -offset
    whole = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) - offset
    return whole, match.group(7) or ""


def parse_epoch_seconds(text: str) -> int:
    """Whole UTC epoch seconds of the timestamp's second (the fraction is validated)."""
    return _parse(text)[0]


def parse_epoch_ns(text: str) -> int:
    """Exact UTC epoch nanoseconds of an RFC 3339 timestamp with an offset."""
    whole, fraction = _parse(text)
    return whole * NS_PER_S + int(fraction.ljust(9, "0") or 0)


def bucket_start(epoch_seconds: int, bucket_seconds: int) -> int:
    """Start of the UTC-aligned bucket holding this second: floor(epoch / width) * width."""
    return (epoch_seconds // bucket_seconds) * bucket_seconds


class BucketClock:
    """Maps k6 timestamp strings to (epoch second, bucket start), caching per second.

    k6 emits many samples per second with the same second and offset, so the cache key
    is the timestamp without its fraction. The fraction and offset are still checked on
    every call, so a cached second cannot let a malformed timestamp through.
    """

    __slots__ = ("bucket_seconds", "_cache")

    def __init__(self, bucket_seconds: int) -> None:
        if bucket_seconds < 1:
            raise ValueError("bucket_seconds must be >= 1")
        self.bucket_seconds = bucket_seconds
        self._cache: dict[str, tuple[int, int]] = {}

    def second_and_bucket(self, text: str) -> tuple[int, int]:
        """(epoch second, bucket start) of a k6 timestamp."""
        if _AFTER_SECONDS.fullmatch(text, 19) is None:
            raise TimestampError(f"not an RFC 3339 timestamp with a UTC offset: {text!r}")
        key = text[:19] + ("Z" if text[-1] in "Zz" else text[-6:])
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        second = parse_epoch_seconds(text)
        pair = (second, bucket_start(second, self.bucket_seconds))
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = pair
        return pair

"""k6 timestamps to epoch nanoseconds and bucket starts. Pure functions, no I/O.

k6 writes RFC 3339 timestamps with up to nanosecond precision and the runner's local
UTC offset, for example ``2026-11-23T15:26:21.227868137Z`` or
``2026-11-23T17:26:21.227868137+02:00``. ``datetime.fromisoformat`` stops at
microseconds, so the fraction is parsed by hand.
"""

from __future__ import annotations

import calendar

NS_PER_S = 1_000_000_000


class TimestampError(ValueError):
    """A timestamp that is not RFC 3339 with an explicit offset."""


def _offset_seconds(text: str, original: str) -> int:
    if text in ("Z", "z"):
        return 0
    if len(text) != 6 or text[0] not in "+-" or text[3] != ":":
        raise TimestampError(f"bad UTC offset {text!r} in timestamp {original!r}")
    try:
        hours, minutes = int(text[1:3]), int(text[4:6])
    except ValueError:
        raise TimestampError(f"bad UTC offset {text!r} in timestamp {original!r}") from None
    if hours > 23 or minutes > 59:
        raise TimestampError(f"UTC offset out of range in timestamp {original!r}")
    seconds = hours * 3600 + minutes * 60
    return -seconds if text[0] == "-" else seconds


def parse_epoch_seconds(text: str) -> int:
    """Whole UTC epoch seconds of the timestamp's second, ignoring its fraction.

    The fraction cannot move a timestamp across a whole-second boundary, so bucket
    assignment for whole-second widths needs only this part (and it is cacheable).
    """
    if len(text) < 20 or text[4] != "-" or text[7] != "-" or text[10] not in "Tt ":
        raise TimestampError(f"not an RFC 3339 timestamp: {text!r}")
    if text[13] != ":" or text[16] != ":":
        raise TimestampError(f"not an RFC 3339 timestamp: {text!r}")
    try:
        year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
        hour, minute, second = int(text[11:13]), int(text[14:16]), int(text[17:19])
    except ValueError:
        raise TimestampError(f"not an RFC 3339 timestamp: {text!r}") from None
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 60):
        raise TimestampError(f"date or time out of range: {text!r}")
    rest = text[19:]
    if rest.startswith("."):
        i = 1
        while i < len(rest) and rest[i].isdigit():
            i += 1
        if i == 1 or i > 10:
            raise TimestampError(f"bad fractional seconds in {text!r}")
        rest = rest[i:]
    offset = _offset_seconds(rest, text)
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) - offset


def parse_epoch_ns(text: str) -> int:
    """Exact UTC epoch nanoseconds of an RFC 3339 timestamp with an offset."""
    whole = parse_epoch_seconds(text)
    fraction = 0
    if len(text) > 19 and text[19] == ".":
        digits = ""
        i = 20
        while i < len(text) and text[i].isdigit():
            digits += text[i]
            i += 1
        fraction = int(digits.ljust(9, "0"))
    return whole * NS_PER_S + fraction


def bucket_start(epoch_seconds: int, bucket_seconds: int) -> int:
    """Start of the UTC-aligned bucket holding this second: floor(epoch / width) * width."""
    return (epoch_seconds // bucket_seconds) * bucket_seconds


class BucketClock:
    """Maps k6 timestamp strings to bucket starts, caching per whole second.

    k6 emits many samples per second with the same second and offset, so the cache key
    is the timestamp without its fraction; the cache is cleared when it grows large.
    """

    __slots__ = ("bucket_seconds", "_cache")

    def __init__(self, bucket_seconds: int) -> None:
        if bucket_seconds < 1:
            raise ValueError("bucket_seconds must be >= 1")
        self.bucket_seconds = bucket_seconds
        self._cache: dict[str, tuple[int, int]] = {}

    def second_and_bucket(self, text: str) -> tuple[int, int]:
        """(epoch second, bucket start) of a k6 timestamp."""
        # The key is the date-time to the second plus the offset; the fraction is dropped.
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

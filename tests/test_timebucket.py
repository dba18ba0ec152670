"""k6 timestamp parsing and UTC bucket assignment (common.timebucket).

Expected values come from datetime arithmetic or from hand-computed epoch integers,
never from the functions under test.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from common.timebucket import (
    BucketClock,
    TimestampError,
    bucket_start,
    parse_epoch_ns,
    parse_epoch_seconds,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def tz(hours: int = 0, minutes: int = 0, sign: int = 1) -> timezone:
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def epoch_seconds(dt: datetime) -> int:
    """Whole epoch seconds of an aware datetime, by exact timedelta arithmetic."""
    delta = dt - EPOCH
    return delta.days * 86_400 + delta.seconds


def floor_to(value: int, width: int) -> int:
    """Floor without relying on Python's // semantics for negatives."""
    q = value // width if value >= 0 else -((-value + width - 1) // width)
    return q * width


# (timestamp text, aware datetime of its whole second, fraction in nanoseconds)
CASES = [
    ("2026-11-23T15:26:21.227868137Z",
     datetime(2026, 11, 23, 15, 26, 21, tzinfo=UTC), 227_868_137),
    ("2026-11-23T17:26:21.227868137+02:00",
     datetime(2026, 11, 23, 17, 26, 21, tzinfo=tz(2)), 227_868_137),
    ("2026-11-23T21:11:21.000000001+05:45",
     datetime(2026, 11, 23, 21, 11, 21, tzinfo=tz(5, 45)), 1),
    ("2026-11-23T11:56:21.999999999-03:30",
     datetime(2026, 11, 23, 11, 56, 21, tzinfo=tz(3, 30, -1)), 999_999_999),
    ("2026-11-23T15:26:21.5Z", datetime(2026, 11, 23, 15, 26, 21, tzinfo=UTC), 500_000_000),
    ("2026-11-23T15:26:21.05Z", datetime(2026, 11, 23, 15, 26, 21, tzinfo=UTC), 50_000_000),
    ("2026-11-23T15:26:21.123456Z",
     datetime(2026, 11, 23, 15, 26, 21, tzinfo=UTC), 123_456_000),
    ("2026-11-23T15:26:21.00000001Z",
     datetime(2026, 11, 23, 15, 26, 21, tzinfo=UTC), 10),
    ("2026-11-23T15:26:21Z", datetime(2026, 11, 23, 15, 26, 21, tzinfo=UTC), 0),
    ("2026-11-23T15:26:21+02:00", datetime(2026, 11, 23, 15, 26, 21, tzinfo=tz(2)), 0),
    ("2026-11-23T15:26:21.000000000-03:30",
     datetime(2026, 11, 23, 15, 26, 21, tzinfo=tz(3, 30, -1)), 0),
    # Offsets that move the instant across UTC midnight, a month end and a year end.
    ("2026-12-31T22:30:00.25-03:30",
     datetime(2026, 12, 31, 22, 30, 0, tzinfo=tz(3, 30, -1)), 250_000_000),
    ("2027-01-01T01:00:00.75+05:45",
     datetime(2027, 1, 1, 1, 0, 0, tzinfo=tz(5, 45)), 750_000_000),
    ("2024-02-28T23:00:00-02:00", datetime(2024, 2, 28, 23, 0, 0, tzinfo=tz(2, 0, -1)), 0),
    ("2024-03-01T00:30:00+02:00", datetime(2024, 3, 1, 0, 30, 0, tzinfo=tz(2)), 0),
    ("2026-11-30T23:59:59.999999999-00:01",
     datetime(2026, 11, 30, 23, 59, 59, tzinfo=tz(0, 1, -1)), 999_999_999),
    # Before the epoch: negative epoch seconds.
    ("1970-01-01T00:00:05+01:00", datetime(1970, 1, 1, 0, 0, 5, tzinfo=tz(1)), 0),
    ("1969-12-31T23:59:59.5Z", datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), 500_000_000),
]


@pytest.mark.parametrize(("text", "dt", "fraction"), CASES, ids=[c[0] for c in CASES])
def test_parse_matches_datetime_arithmetic(text: str, dt: datetime, fraction: int) -> None:
    expected = epoch_seconds(dt)
    assert parse_epoch_seconds(text) == expected
    assert parse_epoch_ns(text) == expected * 1_000_000_000 + fraction


@pytest.mark.parametrize(
    ("text", "expected_seconds"),
    [
        # Hand-computed epoch integers.
        ("1970-01-01T00:00:00Z", 0),
        ("2000-01-01T00:00:00Z", 946_684_800),
        ("2023-11-14T22:13:20Z", 1_700_000_000),
        ("2023-11-15T00:13:20+02:00", 1_700_000_000),
        ("2023-11-15T04:13:20+06:00", 1_700_000_000),
        ("2023-11-14T18:43:20-03:30", 1_700_000_000),
        ("2023-11-15T03:58:20+05:45", 1_700_000_000),
        ("1969-12-31T23:59:59Z", -1),
        ("1970-01-01T00:00:00+00:01", -60),
        ("1969-12-31T23:59:00-00:01", 0),
    ],
)
def test_hand_computed_epochs(text: str, expected_seconds: int) -> None:
    assert parse_epoch_seconds(text) == expected_seconds
    assert parse_epoch_ns(text) == expected_seconds * 1_000_000_000


def test_same_instant_in_every_offset_is_equal() -> None:
    texts = [
        "2026-11-23T15:26:21.227868137Z",
        "2026-11-23T15:26:21.227868137z",
        "2026-11-23t15:26:21.227868137Z",
        "2026-11-23 15:26:21.227868137Z",
        "2026-11-23T15:26:21.227868137+00:00",
        "2026-11-23T15:26:21.227868137-00:00",
        "2026-11-23T17:26:21.227868137+02:00",
        "2026-11-23T21:11:21.227868137+05:45",
        "2026-11-23T11:56:21.227868137-03:30",
        "2026-11-24T04:26:21.227868137+13:00",
        "2026-11-22T15:27:21.227868137-23:59",
    ]
    expected = epoch_seconds(datetime(2026, 11, 23, 15, 26, 21, tzinfo=UTC)) * 1_000_000_000
    expected += 227_868_137
    assert {parse_epoch_ns(t) for t in texts} == {expected}


def test_fraction_digit_counts() -> None:
    base = epoch_seconds(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) * 1_000_000_000
    for digits in range(1, 10):
        fraction = "7" * digits
        text = f"2026-01-02T03:04:05.{fraction}Z"
        assert parse_epoch_ns(text) == base + int(fraction + "0" * (9 - digits)), text
        # The fraction never changes the whole second.
        assert parse_epoch_seconds(text) == base // 1_000_000_000


def test_nanosecond_ordering_within_a_second() -> None:
    a = parse_epoch_ns("2026-11-23T15:26:21.000000009Z")
    b = parse_epoch_ns("2026-11-23T15:26:21.00000001Z")
    c = parse_epoch_ns("2026-11-23T15:26:21.1Z")
    d = parse_epoch_ns("2026-11-23T15:26:22Z")
    assert (b - a, c - b, d - c) == (1, 99_999_990, 900_000_000)


@pytest.mark.parametrize(
    ("seconds", "width", "expected"),
    [
        (1_700_000_000, 1, 1_700_000_000),
        (1_700_000_000, 10, 1_700_000_000),
        (1_700_000_009, 10, 1_700_000_000),
        (1_700_000_010, 10, 1_700_000_010),
        (1_700_000_000, 60, 1_699_999_980),  # 1_700_000_000 = 28_333_333 * 60 + 20
        (1_700_000_039, 60, 1_699_999_980),
        (1_700_000_040, 60, 1_700_000_040),
        (0, 10, 0),
        (-1, 1, -1),
        (-1, 10, -10),
        (-10, 10, -10),
        (-11, 10, -20),
        (-1, 60, -60),
        (-3595, 60, -3600),
    ],
)
def test_bucket_start(seconds: int, width: int, expected: int) -> None:
    assert bucket_start(seconds, width) == expected
    assert bucket_start(seconds, width) == floor_to(seconds, width)


@pytest.mark.parametrize("width", [1, 10, 60])
def test_bucket_start_property(width: int) -> None:
    for seconds in range(-200, 200):
        start = bucket_start(seconds, width)
        assert start % width == 0
        assert start <= seconds < start + width


@pytest.mark.parametrize("width", [1, 10, 60])
@pytest.mark.parametrize(("text", "dt", "fraction"), CASES, ids=[c[0] for c in CASES])
def test_bucket_clock_matches_datetime(text: str, dt: datetime, fraction: int,
                                       width: int) -> None:
    second = epoch_seconds(dt)
    expected = (second, floor_to(second, width))
    clock = BucketClock(width)
    assert clock.second_and_bucket(text) == expected
    # Second look-up hits the cache and must agree.
    assert clock.second_and_bucket(text) == expected


def test_bucket_clock_crosses_midnight_with_offsets() -> None:
    clock = BucketClock(60)
    # 23:59:30 local at -03:30 is 03:29:30 UTC the next day.
    second, bucket = clock.second_and_bucket("2026-12-31T23:59:30.5-03:30")
    utc = datetime(2027, 1, 1, 3, 29, 30, tzinfo=UTC)
    assert second == epoch_seconds(utc)
    assert bucket == epoch_seconds(datetime(2027, 1, 1, 3, 29, tzinfo=UTC))
    # 00:10:15 local at +05:45 is 18:25:15 UTC the previous day (previous year).
    second, bucket = clock.second_and_bucket("2027-01-01T00:10:15.999+05:45")
    assert second == epoch_seconds(datetime(2026, 12, 31, 18, 25, 15, tzinfo=UTC))
    assert bucket == epoch_seconds(datetime(2026, 12, 31, 18, 25, tzinfo=UTC))


def test_bucket_clock_cache_same_second_different_fraction() -> None:
    clock = BucketClock(10)
    expected_second = epoch_seconds(datetime(2026, 11, 23, 15, 26, 29, tzinfo=UTC))
    expected = (expected_second, expected_second - 9)
    for fraction in ("", ".0", ".000000001", ".5", ".999999999", ".123"):
        assert clock.second_and_bucket(f"2026-11-23T15:26:29{fraction}Z") == expected


def test_bucket_clock_cache_distinguishes_offsets() -> None:
    clock = BucketClock(10)
    local = "2026-11-23T15:26:21.1"
    results = {
        offset: clock.second_and_bucket(local + offset)
        for offset in ("Z", "+02:00", "-03:30", "+05:45", "+00:00", "z")
    }
    naive = datetime(2026, 11, 23, 15, 26, 21)
    for offset, zone in (("Z", UTC), ("+02:00", tz(2)), ("-03:30", tz(3, 30, -1)),
                         ("+05:45", tz(5, 45)), ("+00:00", UTC), ("z", UTC)):
        second = epoch_seconds(naive.replace(tzinfo=zone))
        assert results[offset] == (second, floor_to(second, 10)), offset
    # And asking again in a different order gives the same answers.
    for offset in ("+05:45", "z", "-03:30", "Z", "+02:00", "+00:00"):
        assert clock.second_and_bucket(local + "9" + offset) == results[offset]


def test_bucket_clock_many_distinct_seconds_survive_cache_clear() -> None:
    clock = BucketClock(10)
    start = datetime(2026, 11, 23, 0, 0, 0, tzinfo=UTC)
    base = epoch_seconds(start)
    for i in range(0, 6000, 7):
        t = start + timedelta(seconds=i)
        text = t.strftime("%Y-%m-%dT%H:%M:%S") + ".42+00:00"
        assert clock.second_and_bucket(text) == (base + i, floor_to(base + i, 10))
    # After thousands of entries (and at least one clear) old keys still resolve right.
    assert clock.second_and_bucket("2026-11-23T00:00:07.9Z") == (base + 7, base)


def test_bucket_clock_rejects_zero_width() -> None:
    with pytest.raises(ValueError, match="bucket_seconds"):
        BucketClock(0)


MALFORMED = [
    "not a timestamp at all",
    "2026-11-23",
    "2026-11-23T15:26:21",
    "2026-11-23T15:26:21.123",
    "2026/11/23T15:26:21Z",
    "2026-11-23X15:26:21Z",
    "2026-11-23T15-26-21Z",
    "2026-11-23T15:26.21Z",
    "abcd-11-23T15:26:21Z",
    "2026-1a-23T15:26:21Z",
    "2026-13-01T00:00:00Z",
    "2026-00-10T00:00:00Z",
    "2026-11-00T00:00:00Z",
    "2026-11-32T00:00:00Z",
    "2026-11-23T24:00:00Z",
    "2026-11-23T23:60:00Z",
    "2026-11-23T23:59:61Z",
    "2026-11-23T15:26:21.Z",
    "2026-11-23T15:26:21.1234567890Z",
    "2026-11-23T15:26:21.12a4Z",
    "2026-11-23T15:26:21+0200",
    "2026-11-23T15:26:21+02",
    "2026-11-23T15:26:21 +02:00",
    "2026-11-23T15:26:21+24:00",
    "2026-11-23T15:26:21+02:60",
    "2026-11-23T15:26:21+ab:cd",
    "2026-11-23T15:26:21*02:00",
    "2026-11-23T15:26:21+02:00Z",
    "2026-11-23T15:26:21ZZ",
    "2026-11-23T15:26:21.5UTC",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_timestamps_raise(text: str) -> None:
    with pytest.raises(TimestampError):
        parse_epoch_seconds(text)
    with pytest.raises(TimestampError):
        parse_epoch_ns(text)
    with pytest.raises(TimestampError):
        BucketClock(10).second_and_bucket(text)


def test_empty_timestamp_raises_timestamp_error() -> None:
    with pytest.raises(TimestampError):
        parse_epoch_ns("")
    with pytest.raises(TimestampError):  # not an IndexError from the cache key
        BucketClock(10).second_and_bucket("")


def test_timestamp_error_is_a_value_error() -> None:
    assert issubclass(TimestampError, ValueError)


# Out-of-range or non-ASCII fields that the old hand-written parser let through (or
# failed on with a bare ValueError); the strict ASCII regex and the calendar check refuse
# them. Kept as regression cases.
SLIPPING_THROUGH = [
    "2026-02-30T00:00:00Z",   # February has no 30th
    "2025-02-29T12:00:00Z",   # 2025 is no leap year
    "2100-02-29T12:00:00Z",   # nor is 2100 (divisible by 100, not by 400)
    "2026-04-31T00:00:00Z",   # April has 30 days
    "0000-01-01T00:00:00Z",   # there is no year 0
    "2026-11-23T+1:26:21Z",   # int() accepts a sign
    "2_26-11-23T15:26:21Z",   # int() accepts underscores
    "2026-11-23T15:26:21.\u00b2Z",  # superscript two is str.isdigit() but not a digit
    "\uff12026-11-23T15:26:21Z",  # fullwidth digit two: \d without re.ASCII matches it
    "2026-11-23T15:26:2\u0661Z",   # Arabic-Indic digit one
    "2026-11-23T15:26:21.5+02:0\u0663",  # Arabic-Indic digit in the offset
    "2026-11-23T15:26:21.5\u221202:00",  # a minus sign that is not ASCII '-'
    "2026-11-23T15:26:21,5Z",  # comma as the decimal sign
    "2026-11-23T15:26:21.5+2:00",
    "2026-11-23T15:26:21.5+002:00",
    "2026-11-23T15:26:21.5-02:00:00",
    "12026-11-23T15:26:21Z",
    "2026-11-23T15:26:21Z\n",  # fullmatch, not match: no trailing newline
    " 2026-11-23T15:26:21Z",
    "2026-11-23T15:26:21Z ",
    "2026-11-23T15:26:21.5+02:00\x00",
]


def test_leap_days_that_exist_are_accepted() -> None:
    for text, dt in (("2024-02-29T12:00:00Z", datetime(2024, 2, 29, 12, tzinfo=UTC)),
                     ("2000-02-29T00:00:00+01:00", datetime(2000, 2, 29, tzinfo=tz(1)))):
        assert parse_epoch_ns(text) == epoch_seconds(dt) * 1_000_000_000
        second = epoch_seconds(dt)
        assert BucketClock(10).second_and_bucket(text) == (second, floor_to(second, 10))


@pytest.mark.parametrize("text", SLIPPING_THROUGH)
def test_invalid_fields_raise_timestamp_error(text: str) -> None:
    """Every rejection must be a TimestampError: the forwarder only catches that type."""
    with pytest.raises(TimestampError):
        parse_epoch_seconds(text)
    with pytest.raises(TimestampError):
        parse_epoch_ns(text)
    with pytest.raises(TimestampError):
        BucketClock(10).second_and_bucket(text)


def test_non_string_timestamp_raises_timestamp_error() -> None:
    for value in (None, b"2026-11-23T15:26:21Z", 1_700_000_000):
        with pytest.raises(TimestampError):
            parse_epoch_ns(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "malformed",
    [
        "2026-11-23T15:26:21.1234567890123Z",  # too many fraction digits
        "2026-11-23T15:26:21.5x+02:00",        # junk between fraction and offset
        "2026-11-23T15:26:21.Z",               # a dot without digits
        "2026-11-23T15:26:21.\u00b2Z",         # a non-ASCII digit in the fraction
        "2026-11-23T15:26:21.5Z\n",            # trailing newline
        "2026-11-23T15:26:21.5ZZ",
        "2026-11-23T15:26:21.5+02:00Z",
    ],
)
def test_bucket_clock_cache_does_not_bypass_validation(malformed: str) -> None:
    """A malformed timestamp must be refused even after a valid one of the same second."""
    clock = BucketClock(10)
    valid = malformed[:19] + ("Z" if malformed.endswith("Z") else "+02:00")
    clock.second_and_bucket(valid)
    with pytest.raises(TimestampError):
        clock.second_and_bucket(malformed)

"""k6 JSON lines to local partials (k6_forward.lines.LineAggregator)."""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pytest

from common import digest, protocol
from common.protocol import CounterPartial, Limits, TrendPartial
from k6_forward.lines import LineAggregator

T0 = datetime(2026, 11, 23, 15, 26, 0, tzinfo=UTC)
E0 = (T0 - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1)
assert E0 % 60 == 0  # midnight plus 15:26:00, a multiple of every width used here
NS = 1_000_000_000


def ts(seconds: int, nanos: int = 0, offset_minutes: int = 0) -> str:
    """RFC 3339 text, k6 style, for E0 + seconds + nanos, written in the given offset."""
    local = T0 + timedelta(seconds=seconds, minutes=offset_minutes)
    if offset_minutes == 0:
        suffix = "Z"
    else:
        sign = "+" if offset_minutes > 0 else "-"
        hours, minutes = divmod(abs(offset_minutes), 60)
        suffix = f"{sign}{hours:02d}:{minutes:02d}"
    return local.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}" + suffix


def metric(name: str, kind: str) -> bytes:
    return orjson.dumps({"type": "Metric", "data": {
        "name": name, "type": kind, "contains": "default", "thresholds": [],
        "submetrics": None}, "metric": name})


def point(name: str, time: str, value: Any, tags: dict[str, str] | None = None) -> bytes:
    return orjson.dumps({"type": "Point", "data": {"time": time, "value": value, "tags": tags},
                         "metric": name})


def by_key(partials: list[Any]) -> dict[tuple[str, tuple[tuple[str, str], ...], int], Any]:
    out = {}
    for p in partials:
        key = (p.metric, p.tags, p.bucket)
        assert key not in out, f"two partials for {key}"
        out[key] = p
    return out


def assert_trend(p: TrendPartial, values: list[float], width: int) -> None:
    """Exact count, sum, min, max and zero count; the digest holds the non-zero values."""
    zeros = sum(1 for v in values if v == 0)
    assert p.bucket_seconds == width
    assert p.samples == len(values)
    assert p.zeros == zeros
    assert type(p.zeros) is int
    assert p.total == math.fsum(values)
    assert p.lo == min(values)
    assert p.hi == max(values)
    weights = p.centroids[:, 1]
    assert float(weights.sum()) == len(values) - zeros
    if zeros < len(values):
        # The sketch of exactly these samples.
        assert np.array_equal(p.centroids, digest.from_values([v for v in values if v]))
    else:
        assert p.centroids.shape == (0, 2)


def assert_sendable(trends: list[TrendPartial], counters: list[CounterPartial]) -> None:
    """Every closed partial must pass the servers' validation after a trip over the wire."""
    items = [protocol.trend_item(p) for p in trends] + [protocol.counter_item(p)
                                                        for p in counters]
    if not items:
        return
    (body,) = protocol.FrameDecoder().feed(protocol.data(1, items))
    received = protocol.parse_data(protocol.unpack(body), Limits()).items
    for item, sent in zip(received, [*trends, *counters], strict=True):
        if isinstance(sent, TrendPartial):
            got = protocol.parse_trend_item(item, Limits())
            assert got[:8] == sent[:8]
            assert got.zeros == sent.zeros
            assert np.array_equal(got.centroids, sent.centroids)
        else:
            assert protocol.parse_counter_item(item, Limits()) == sent


DURATION, REQS, CHECKS, VUS = "http_req_duration", "http_reqs", "checks", "vus"
GET_A = {"name": "a", "method": "GET", "status": "200"}


def mixed_lines() -> list[bytes]:
    return [
        metric(DURATION, "trend"), metric(REQS, "counter"), metric(CHECKS, "rate"),
        metric(VUS, "gauge"),
        point(DURATION, ts(1, 250_000_000), 100.5, GET_A),
        point(REQS, ts(1, 250_000_000), 1, GET_A),
        # status is not a tag key: same series as the line above
        point(DURATION, ts(2), 200.25, {**GET_A, "status": "500"}),
        point(REQS, ts(2), 1, {**GET_A, "status": "500"}),
        # method missing: omitted from the series tags
        point(DURATION, ts(3), 50, {"name": "b"}),
        point(REQS, ts(3), 1, {"name": "b", "scenario": "x"}),
        # no tags at all (k6 may write null)
        point(DURATION, ts(4, 5), 7.0, None),
        point(DURATION, ts(4, 6), 0.125, {}),
        point(CHECKS, ts(5), 1, {"check": "ok"}),
        point(CHECKS, ts(5, 1), 0, {"check": "ok"}),
        point(CHECKS, ts(5, 2), 1, {"check": "ok"}),
        point(CHECKS, ts(5, 3), 1.0, {"check": "ok"}),
        # gauge: 9.9 s is the newest; the 7 s sample arrives after it
        point(VUS, ts(6, 500_000_000), 5),
        point(VUS, ts(9, 900_000_000), 8),
        point(VUS, ts(7), 3),
        # next bucket, with a non-UTC offset on the wire
        point(DURATION, ts(12, 0, offset_minutes=120), 300.0, {"name": "a", "method": "GET"}),
        point(VUS, ts(12, 1, offset_minutes=-210), 2),
        point(VUS, ts(11, 999_999_999, offset_minutes=345), 4),
    ]


def test_mixed_metrics_exact_partials() -> None:
    agg = LineAggregator(("name", "method"), 10, report=io.StringIO())
    agg.feed(mixed_lines())
    assert agg.lines == 22
    assert agg.samples == 18
    assert sum(agg.skipped.values()) == 0
    trends, counters = agg.close_all()
    assert_sendable(trends, counters)
    t = by_key(trends)
    c = by_key(counters)
    a_get = (("method", "GET"), ("name", "a"))
    assert set(t) == {(DURATION, a_get, E0), (DURATION, (("name", "b"),), E0),
                      (DURATION, (), E0), (DURATION, a_get, E0 + 10)}
    assert_trend(t[(DURATION, a_get, E0)], [100.5, 200.25], 10)
    assert_trend(t[(DURATION, (("name", "b"),), E0)], [50.0], 10)
    assert_trend(t[(DURATION, (), E0)], [7.0, 0.125], 10)
    assert_trend(t[(DURATION, a_get, E0 + 10)], [300.0], 10)

    assert set(c) == {(REQS, a_get, E0), (REQS, (("name", "b"),), E0), (CHECKS, (), E0),
                      (VUS, (), E0), (VUS, (), E0 + 10)}
    reqs = c[(REQS, a_get, E0)]
    assert (reqs.kind, reqs.total, reqs.samples, reqs.nonzero, reqs.lo, reqs.hi) == (
        "counter", 2.0, 2, 2, 1.0, 1.0)
    assert c[(REQS, (("name", "b"),), E0)].samples == 1
    checks = c[(CHECKS, (), E0)]
    assert (checks.kind, checks.total, checks.samples, checks.nonzero, checks.lo,
            checks.hi) == ("rate", 3.0, 4, 3, 0.0, 1.0)
    vus = c[(VUS, (), E0)]
    assert (vus.kind, vus.total, vus.samples, vus.nonzero, vus.lo, vus.hi) == (
        "gauge", 16.0, 3, 3, 3.0, 8.0)
    assert (vus.last_ns, vus.last_value) == ((E0 + 9) * NS + 900_000_000, 8.0)
    later = c[(VUS, (), E0 + 10)]
    # 12.000000001 s written at -03:30 is newer than 11.999999999 s written at +05:45.
    assert (later.last_ns, later.last_value) == ((E0 + 12) * NS + 1, 2.0)
    assert (later.total, later.samples, later.lo, later.hi) == (6.0, 2, 2.0, 4.0)
    assert all(p.bucket_seconds == 10 for p in counters)


def test_no_tag_keys_gives_one_series_per_metric() -> None:
    agg = LineAggregator((), 60, report=io.StringIO())
    agg.feed(mixed_lines())
    trends, counters = agg.close_all()
    assert_sendable(trends, counters)
    t = by_key(trends)
    c = by_key(counters)
    assert set(t) == {(DURATION, (), E0)}
    assert_trend(t[(DURATION, (), E0)], [100.5, 200.25, 50.0, 7.0, 0.125, 300.0], 60)
    assert set(c) == {(REQS, (), E0), (CHECKS, (), E0), (VUS, (), E0)}
    assert c[(REQS, (), E0)].total == 3.0
    vus = c[(VUS, (), E0)]
    assert (vus.samples, vus.total, vus.last_value) == (5, 22.0, 2.0)
    assert vus.last_ns == (E0 + 12) * NS + 1


def test_bucket_edges_and_widths() -> None:
    lines = [metric(REQS, "counter")]
    lines += [point(REQS, ts(s, n), 1) for s, n in
              [(0, 0), (0, 999_999_999), (9, 999_999_999), (10, 0), (59, 1), (60, 0)]]
    for width, expected in [
        (1, {E0: 2, E0 + 9: 1, E0 + 10: 1, E0 + 59: 1, E0 + 60: 1}),
        (10, {E0: 3, E0 + 10: 1, E0 + 50: 1, E0 + 60: 1}),
        (60, {E0: 5, E0 + 60: 1}),
    ]:
        agg = LineAggregator((), width, report=io.StringIO())
        agg.feed(lines)
        _, counters = agg.close_all()
        assert {p.bucket: p.samples for p in counters} == expected, width


def test_lines_split_over_feeds_accumulate() -> None:
    lines = mixed_lines()
    one = LineAggregator(("name", "method"), 10, report=io.StringIO())
    one.feed(lines)
    many = LineAggregator(("name", "method"), 10, report=io.StringIO())
    for i in range(0, len(lines), 3):
        many.feed(lines[i : i + 3])
    assert (many.lines, many.samples) == (one.lines, one.samples)
    t1, c1 = one.close_all()
    t2, c2 = many.close_all()
    assert {k: p[:8] for k, p in by_key(t1).items()} == {k: p[:8] for k, p in by_key(t2).items()}
    assert {k: p.zeros for k, p in by_key(t1).items()} == {
        k: p.zeros for k, p in by_key(t2).items()}
    assert by_key(c1) == by_key(c2)


def test_trend_zeros_are_counted_beside_the_digest() -> None:
    """k6 reports 0 for http_req_connecting on reused connections: the forwarder counts
    exact zeros (integer or float) beside a digest of the other values (split_zeros)."""
    connecting = "http_req_connecting"
    values: list[float] = [0, 0.0, 1.25, 0, 0.5, 0.0, 0.0, 3.0, 0]
    lines = [metric(connecting, "trend")]
    lines += [point(connecting, ts(1, i), v, {"name": "a"}) for i, v in enumerate(values)]
    # A bucket of only zeros, and one without any.
    lines += [point(connecting, ts(11, i), 0, {"name": "a"}) for i in range(4)]
    lines += [point(connecting, ts(21, i), 2.0, {"name": "a"}) for i in range(3)]
    agg = LineAggregator(("name",), 10, report=io.StringIO())
    agg.feed(lines)
    trends, counters = agg.close_all()
    assert counters == []
    assert_sendable(trends, counters)
    t = by_key(trends)
    a = (("name", "a"),)
    assert_trend(t[(connecting, a, E0)], values, 10)
    assert t[(connecting, a, E0)].zeros == 6
    assert sorted(np.repeat(t[(connecting, a, E0)].centroids[:, 0],
                            t[(connecting, a, E0)].centroids[:, 1].astype(int)).tolist()) == \
        pytest.approx([0.5, 1.25, 3.0], rel=digest.ALPHA)
    assert_trend(t[(connecting, a, E0 + 10)], [0, 0, 0, 0], 10)
    assert_trend(t[(connecting, a, E0 + 20)], [2.0, 2.0, 2.0], 10)


# --- bad lines -------------------------------------------------------------------

_REPORTED = re.compile(r"line (\d+): skipped \((\w+)\)")


def reported(stream: io.StringIO) -> dict[int, str]:
    return {int(n): reason for n, reason in _REPORTED.findall(stream.getvalue())}


def test_bad_lines_are_counted_reported_and_skipped() -> None:
    good = ts(1)
    numbered: list[tuple[bytes, str | None]] = [
        (metric(DURATION, "trend"), None),                                   # 1
        (b"{not json", "bad_json"),                                          # 2
        (point("undeclared", good, 1.0), "point_before_metric"),             # 3
        (metric("weird", "histogram"), "unknown_metric_type"),               # 4
        (point("weird", good, 1.0), "?"),                                    # 5
        (point(DURATION, good, "12"), "bad_value"),                          # 6
        (point(DURATION, good, None), "bad_value"),                          # 7
        (point(DURATION, good, True), "bad_value"),                          # 8
        (b'{"type":"Point","metric":"http_req_duration","data":{"time":"'
         + good.encode() + b'","value":NaN}}', "bad_json"),                  # 9
        (b"[1, 2, 3]", "bad_shape"),                                         # 10
        (b'"just a string"', "bad_shape"),                                   # 11
        (b"42", "bad_shape"),                                                # 12
        (b"null", "bad_shape"),                                              # 13
        (point(DURATION, "yesterday", 1.0), "bad_time"),                     # 14
        (point(DURATION, "2026-11-23T15:26:01", 1.0), "bad_time"),           # 15
        (point(DURATION, good, 1.5), None),                                  # 16
        (b"", None),                                                         # 17
        (b'{"type":"Point","metric":"http_req_duration","data":{"value":1}}',
         "bad_shape"),                                                       # 18
        (b'{"type":"Other","data":{}}', "unknown_line_type"),                # 19
        (b'{"type":"Point","metric":"http_req_duration","data":{"time":"'
         + good.encode() + b'","value":1e400}}', "bad_json"),                # 20
        (point(DURATION, ts(2), 2.5), None),                                 # 21
        (b'{"type":"Point","metric":"http_req_duration","data":{"time":"'
         + good.encode() + b'","value":Infinity}}', "bad_json"),             # 22
        (point(DURATION, good, "NaN"), "bad_value"),                         # 23
        (b'{"metric":"http_req_duration"}', "bad_shape"),                    # 24
        (point(DURATION, good, [1.0]), "bad_value"),                         # 25
    ]
    report = io.StringIO()
    agg = LineAggregator(("name",), 10, report=report)
    lines = [line for line, _ in numbered]
    agg.feed(lines[:10])
    agg.feed(lines[10:])  # line numbers continue across feeds

    expected = {n: reason for n, (_, reason) in enumerate(numbered, start=1) if reason}
    got = reported(report)
    assert set(got) == set(expected)
    assert {n: r for n, r in got.items() if expected[n] != "?"} == {
        n: r for n, r in expected.items() if r != "?"}
    counts = Counter(r for r in expected.values() if r != "?")
    assert sum(agg.skipped.values()) == len(expected)
    for reason, count in counts.items():
        if reason == "point_before_metric":
            # line 5's point (of a refused metric) may be counted here too
            assert agg.skipped[reason] in (count, count + 1)
        else:
            assert agg.skipped[reason] == count, reason
    assert agg.lines == len(numbered)
    assert agg.samples == 2

    trends, counters = agg.close_all()
    assert counters == []
    (only,) = trends
    assert (only.metric, only.tags, only.bucket) == (DURATION, (), E0)
    assert_trend(only, [1.5, 2.5], 10)


def test_report_is_capped() -> None:
    report = io.StringIO()
    agg = LineAggregator((), 10, report=report, max_reports=3)
    agg.feed([b'{"value":x}'] * 7)
    text = report.getvalue().splitlines()
    assert [int(m.group(1)) for line in text if (m := _REPORTED.search(line))] == [1, 2, 3]
    assert len(text) == 4  # three reports and one notice that more are only counted
    assert not _REPORTED.search(text[3])
    assert agg.skipped["bad_json"] == 7


@pytest.mark.parametrize(
    ("kind", "bad_time"),
    [
        ("counter", "0000-01-01T00:00:00Z"),     # datetime cannot represent year 0
        ("gauge", "2026-11-23T15:26:01.\u00b2Z"),  # a non-ASCII "digit" in the fraction
    ],
)
def test_unparseable_time_is_skipped_not_fatal(kind: str, bad_time: str) -> None:
    """One bad timestamp must cost one line, not the forwarder (feed must not raise)."""
    report = io.StringIO()
    agg = LineAggregator((), 10, report=report)
    agg.feed([metric(VUS, kind), point(VUS, ts(1), 4.0), point(VUS, bad_time, 99.0),
              point(VUS, ts(2), 6.0)])
    assert agg.skipped == Counter({"bad_time": 1})
    assert reported(report) == {3: "bad_time"}
    _, counters = agg.close_all()
    (only,) = counters
    assert (only.samples, only.total, only.hi) == (2, 10.0, 6.0)


def test_bad_gauge_time_after_good_one_in_same_second_is_not_half_counted() -> None:
    """A skipped line must not also be aggregated.

    The bucket cache keys on the text up to the second plus the offset, so a malformed
    fraction in an already-seen second gets through second_and_bucket, the sample is
    added, and only the later exact-time parse for the gauge raises.
    """
    agg = LineAggregator((), 10, report=io.StringIO())
    agg.feed([metric(VUS, "gauge"), point(VUS, ts(1, 500_000_000), 4.0),
              point(VUS, "2026-11-23T15:26:01.abcZ", 99.0)])
    skipped = sum(agg.skipped.values())
    _, counters = agg.close_all()
    (only,) = counters
    assert skipped == 1
    assert (only.samples, only.total, only.hi, only.last_value) == (1, 4.0, 4.0, 4.0)


# --- closing by watermark --------------------------------------------------------


def closed_buckets(result: tuple[list[TrendPartial], list[CounterPartial]]) -> list[int]:
    trends, counters = result
    return sorted(p.bucket for p in [*trends, *counters])


def test_close_ready_waits_for_local_grace() -> None:
    agg = LineAggregator((), 10, report=io.StringIO())
    agg.feed([metric(REQS, "counter"), metric(DURATION, "trend"),
              point(REQS, ts(1), 1), point(DURATION, ts(3), 0.5), point(REQS, ts(11), 1)])
    assert agg.watermark == E0 + 11
    # Bucket E0 ends at E0 + 10; the watermark is past it by 1 s, less than 2 s of grace.
    assert closed_buckets(agg.close_ready(2.0)) == []
    agg.feed([point(REQS, ts(12), 1)])
    assert closed_buckets(agg.close_ready(2.5)) == []  # passed by exactly 2 s < 2.5 s
    agg.feed([point(REQS, ts(13, 1), 1)])
    assert agg.watermark == E0 + 13
    # Now past by more than 2.5 s: bucket E0 closes (both its series), E0 + 10 does not.
    assert closed_buckets(agg.close_ready(2.5)) == [E0, E0]
    assert closed_buckets(agg.close_ready(2.5)) == []
    assert sorted(agg.open) == [E0 + 10]


def test_close_ready_late_sample_reopens_only_its_bucket() -> None:
    agg = LineAggregator((), 10, report=io.StringIO())
    agg.feed([metric(REQS, "counter"), point(REQS, ts(1), 1), point(REQS, ts(15), 1)])
    assert closed_buckets(agg.close_ready(1.0)) == [E0]
    agg.feed([point(REQS, ts(2), 5)])  # late for E0, which has been sent
    assert agg.watermark == E0 + 15  # a late sample never moves the watermark back
    trends, counters = agg.close_ready(1.0)
    assert trends == []
    (late,) = counters
    assert (late.bucket, late.samples, late.total) == (E0, 1, 5.0)
    assert sorted(agg.open) == [E0 + 10]


@pytest.mark.parametrize(("width", "grace"), [(1, 0.0), (10, 2.0), (10, 0.5), (60, 5.0)])
def test_close_ready_never_closes_too_early(width: int, grace: float) -> None:
    agg = LineAggregator((), width, report=io.StringIO())
    agg.feed([metric(REQS, "counter")])
    sent: set[int] = set()
    for second in range(0, 200):
        agg.feed([point(REQS, ts(second, 500_000_000), 1)])
        assert agg.watermark == E0 + second
        # Every sample is at a whole second plus 0.5 s, so this is the exact event time.
        event_time = E0 + second + 0.5
        for bucket in closed_buckets(agg.close_ready(grace)):
            assert event_time - (bucket + width) > grace, (bucket, event_time)
            sent.add(bucket)
        for bucket in agg.open:
            # Whole-second watermarks may hold a bucket up to one second longer, no more.
            assert event_time - (bucket + width) <= grace + 1, (bucket, event_time)
    assert sent
    assert all(b % width == 0 for b in sent)


K6_TEXT = [
    b"",
    b"         /\\      Grafana   /\xe2\x80\xbe\xe2\x80\xbe/  ",
    b"     execution: local",
    b"running (10.0s), 4/8 VUs, 4033 complete and 0 interrupted iterations",
    b"browse     [  83% ] 4 VUs    10.0s/12s ",
    b"    http_req_duration{scenario:browse}",
    b"      { expected_response:true }......: avg=22.02ms    min=195.07\xc2\xb5s",
    b"     \xe2\x9c\x93 status is \"200\"",
]


def test_k6_text_is_harmless_and_cut_lines_are_rejoined() -> None:
    """k6 without -q writes its banner, progress and summary into the JSON pipe, and a
    progress block can land inside a JSON line (seen with k6 v1.1.0)."""
    whole = point(DURATION, ts(1), 7.25, {"name": "a", "group": ""})
    cut = whole.index(b'"group":"') + len(b'"group":"')
    lines = [metric(DURATION, "trend"), *K6_TEXT, whole[:cut], *K6_TEXT[3:5], whole[cut:],
             point(DURATION, ts(2), 1.5, {"name": "a"})]
    report = io.StringIO()
    agg = LineAggregator(("name",), 10, report=report)
    agg.feed(lines)
    agg.finish()
    assert report.getvalue() == ""
    assert agg.skipped == {}
    assert (agg.samples, agg.rejoined, agg.text_lines) == (2, 1, len(K6_TEXT) + 2)
    (trend,), _ = agg.close_all()
    assert_trend(trend, [7.25, 1.5], 10)


def test_a_cut_line_whose_rest_never_comes_is_lost_and_said() -> None:
    whole = point(DURATION, ts(1), 7.25, {"name": "a"})
    report = io.StringIO()
    agg = LineAggregator(("name",), 10, report=report)
    agg.feed([metric(DURATION, "trend"), whole[:40], *K6_TEXT, whole[:50]])
    agg.finish()
    assert agg.skipped == {"cut_line": 2}
    assert reported(report) == {2: "cut_line", 2 + len(K6_TEXT) + 1: "cut_line"}
    assert "run k6 with -q" in report.getvalue()
    assert agg.samples == 0

"""Pure tests of td-report's threshold syntax, accumulators and formatting (no database)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from common import digest
from td_report import html, render
from td_report.band import Counts
from td_report.database import Extent
from td_report.query import Report, Selection, ThresholdResult
from td_report.summary import CounterAccumulator, Selected, TrendAccumulator, observe
from td_report.thresholds import (
    ThresholdError,
    check_applicable,
    from_options,
    load_file,
    matches,
    parse_expression,
    parse_selector,
    parse_threshold,
)


@pytest.mark.parametrize(("text", "method", "percentile", "op", "bound"), [
    ("p(95)<500", "p", 95.0, "<", 500.0),
    ("p(99.9) < 5", "p", 99.9, "<", 5.0),
    ("  p( 90 )>=1e3 ", "p", 90.0, ">=", 1000.0),
    ("avg===1", "avg", None, "===", 1.0),
    ("avg==1", "avg", None, "==", 1.0),
    ("med!=2.5", "med", None, "!=", 2.5),
    ("min>-1", "min", None, ">", -1.0),
    ("max<=.5", "max", None, "<=", 0.5),
    ("count>1000", "count", None, ">", 1000.0),
    ("rate<0.01", "rate", None, "<", 0.01),
    ("value>5.", "value", None, ">", 5.0),
    ("p(0)<1", "p", 0.0, "<", 1.0),
    ("p(100)<1", "p", 100.0, "<", 1.0),
])
def test_expression_parses_as_k6(text: str, method: str, percentile: float | None, op: str,
                                 bound: float) -> None:
    expression = parse_expression(text)
    assert (expression.method, expression.percentile, expression.op, expression.bound) == (
        method, percentile, op, bound)
    assert expression.text == text.strip()


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty threshold expression"),
    ("avg = 1", "no comparison operator"),
    ("p95<5", "unknown aggregation method 'p95'"),
    ("p()<5", "percentile '' must be a number"),
    ("p(101)<5", "from 0 to 100"),
    ("p(abc)<5", "must be a number"),
    ("p(95)<", "missing the number"),
    ("<5", "missing the aggregation method"),
    ("avg<<5", "a single operator"),
    ("avg<0x10", "'0x10' is not a number"),
    ("avg<inf", "'inf' is not a number"),
    ("avg<1e999", "not a finite number"),
    ("average<5", "unknown aggregation method 'average'"),
    ("rate<5 ms", "'5 ms' is not a number"),
])
def test_malformed_expressions_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(ThresholdError) as info:
        parse_expression(text)
    assert message in str(info.value)


@pytest.mark.parametrize(("op", "value", "bound", "holds"), [
    ("<", 1, 2, True), ("<", 2, 2, False), ("<=", 2, 2, True), (">", 3, 2, True),
    (">", 2, 2, False), (">=", 2, 2, True), ("==", 2, 2, True), ("===", 2, 3, False),
    ("!=", 2, 3, True), ("!=", 2, 2, False),
])
def test_operators(op: str, value: float, bound: float, holds: bool) -> None:
    assert parse_expression(f"avg{op}{bound}").holds(value) is holds


def test_selector_and_submetric_filters() -> None:
    assert parse_selector("http_req_duration") == ("http_req_duration", ())
    assert parse_selector("http_req_duration{scenario:browse}") == (
        "http_req_duration", (("scenario", "browse"),))
    # k6 trims spaces and quotes around keys and values.
    assert parse_selector(' tt{ x : "a" , y:\'b\'} ') == ("tt", (("x", "a"), ("y", "b")))
    assert parse_selector("m{url:http://x/y}") == ("m", (("url", "http://x/y"),))
    for bad, message in [("", "malformed metric"), ("1abc", "malformed metric"),
                         ("m{}", "empty submetric filter"), ("m{a}", "tag:value pairs"),
                         ("m{a:}", "tag:value pairs"), ("m{a:1,a:2}", "names tag 'a' twice"),
                         ("m{a:1", "malformed metric"), ("a" * 129, "at most 128")]:
        with pytest.raises(ThresholdError) as info:
            parse_selector(bad)
        assert message in str(info.value), bad


def test_threshold_flag_form() -> None:
    th = parse_threshold("http_req_duration{scenario:browse}: p(99)<800")
    assert (th.metric, th.tags, th.selector) == (
        "http_req_duration", (("scenario", "browse"),), "http_req_duration{scenario:browse}")
    assert th.expression.method_label == "p(99)"
    assert parse_threshold("http_reqs:count>1000").expression.bound == 1000
    with pytest.raises(ThresholdError, match="expected METRIC: EXPRESSION"):
        parse_threshold("http_req_duration p(95)<500")
    with pytest.raises(ThresholdError, match="unknown aggregation method"):
        parse_threshold("http_req_duration: p95<500")


def test_k6_options_thresholds(tmp_path: Path) -> None:
    options = {"thresholds": {
        "http_req_duration": ["p(95)<500", {"threshold": "p(99)<900", "abortOnFail": True}],
        "http_req_failed{name:pay}": "rate<0.01",
    }}
    found = from_options(options, "x")
    assert [(t.selector, t.expression.text) for t in found] == [
        ("http_req_duration", "p(95)<500"), ("http_req_duration", "p(99)<900"),
        ("http_req_failed{name:pay}", "rate<0.01")]
    path = tmp_path / "options.json"
    path.write_text(json.dumps(options))
    assert load_file(path) == found
    for bad, message in [({}, "'thresholds' key"), ({"thresholds": []}, "must be an object"),
                         ({"thresholds": {"m": [5]}}, "must be a string"),
                         ({"thresholds": {"m": ["p95<1"]}}, "x: m: malformed")]:
        with pytest.raises(ThresholdError) as info:
            from_options(bad, "x")
        assert message in str(info.value)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ThresholdError, match="not valid JSON"):
        load_file(tmp_path / "bad.json")
    with pytest.raises(ThresholdError, match="cannot read"):
        load_file(tmp_path / "missing.json")


def test_applicability_as_k6_validates() -> None:
    kinds = {"http_req_duration": "trend", "http_reqs": "counter", "vus": "gauge",
             "http_req_failed": "rate"}
    keys = ["name", "status"]
    for text in ("http_req_duration: p(95)<1", "http_req_duration: med<1",
                 "http_reqs: count>1", "http_reqs: rate>1", "vus: value>1",
                 "http_req_failed{status:500}: rate<1"):
        check_applicable(parse_threshold(text), kinds, keys, "r")
    for text, message in [
        ("http_req_duration: count>1", "count is not supported for http_req_duration, a trend"),
        ("http_reqs: p(95)<1", "p(95) is not supported"),
        ("vus: min>1", "min is not supported for vus, a gauge metric; supported: value"),
        ("http_req_failed: count>1", "supported: rate"),
        ("nope: avg<1", "run 'r' has no metric 'nope'"),
        ("http_req_duration{expected_response:true}: p(95)<1",
         "tag 'expected_response' is not stored for run 'r'"),
    ]:
        with pytest.raises(ThresholdError) as info:
            check_applicable(parse_threshold(text), kinds, keys, "r")
        assert message in str(info.value), text


def test_matches_is_k6_submetric_semantics() -> None:
    assert matches({"name": "a", "status": "200"}, (("name", "a"),))
    assert not matches({"name": "b"}, (("name", "a"),))
    assert not matches({}, (("name", "a"),))
    assert matches({}, ())


def test_trend_accumulator_merges_rows_with_zeros() -> None:
    rng = np.random.default_rng(7)
    acc = TrendAccumulator()
    everything = []
    for _ in range(20):
        values = np.concatenate([rng.lognormal(2, 1, 500), np.zeros(50)])
        everything.append(values)
        centroids, zeros = digest.split_zeros(values)
        acc.add(len(values), float(values.sum()), float(values.min()), float(values.max()),
                zeros, centroids)
    allv = np.concatenate(everything)
    stats = acc.stats([0.05, 0.5, 0.95])
    assert stats.count == len(allv)
    assert stats.zeros == 1000
    assert stats.min == allv.min()
    assert stats.max == allv.max()
    assert stats.mean == pytest.approx(allv.mean(), rel=1e-12)
    assert stats.quantiles[0.05] == 0.0  # inside the exact zeros
    for q in (0.5, 0.95):
        assert stats.quantiles[q] == pytest.approx(np.quantile(allv, q), rel=0.01)


def test_empty_selection_reads_zero_as_k6() -> None:
    trend = Selected.new("t", "trend")
    assert observe(parse_expression("p(95)<1"), trend, 10) == 0.0
    assert observe(parse_expression("avg<1"), trend, 10) == 0.0
    counter = Selected.new("c", "counter")
    assert observe(parse_expression("rate<1"), counter, 10) == 0.0
    rate = Selected.new("r", "rate")
    assert observe(parse_expression("rate<1"), rate, 10) == 0.0


def test_counter_rate_and_gauge_last() -> None:
    counter = CounterAccumulator("counter")
    counter.add(0, 30, 30, 30, 1, 1, {"sum": 30})
    counter.add(10, 20, 20, 20, 1, 1, {"sum": 20})
    assert counter.stats(20).total == 50
    assert counter.stats(20).rate == 2.5
    rate = CounterAccumulator("rate")
    rate.add(0, 0.25, 8, 2, 0, 1, None)
    rate.add(10, 0.5, 4, 2, 0, 1, None)
    assert rate.stats(1).rate == 4 / 12
    gauge = CounterAccumulator("gauge")
    # Two generators, two tag sets: per generator the latest sample of the latest bucket.
    gauge.add(10, 7, 3, 3, 1, 9, {"gauge_last": {"a": [15, 4.0], "b": [16, 3.0]}})
    gauge.add(10, 5, 2, 2, 2, 5, {"gauge_last": {"a": [18, 5.0]}})
    gauge.add(0, 99, 2, 2, 0, 99, {"gauge_last": {"a": [5, 99.0]}})  # older bucket
    stats = gauge.stats(1)
    assert (stats.last, stats.min, stats.max, stats.samples) == (8.0, 0, 99, 7)


def test_axis_ticks_are_round() -> None:
    upper, ticks = html._y_ticks(87.3)
    assert upper == 100
    assert ticks == [0, 25, 50, 75, 100]
    upper, ticks = html._y_ticks(0.0)
    assert upper == 1.0
    times = html._x_ticks(1000.0, 1040.0)
    assert times
    assert all(t % 10 == 0 for t in times)
    assert html.axis_label_duration(1500) == "1.5s"
    assert html.axis_label_duration(0.25) == "250µs"
    assert math.isclose(html._nice_step(7, 7), 1)


# --- verdicts too close to call ---------------------------------------------------------

def _verdicts(strict: bool) -> Report:
    """Two thresholds of one trend: one decided, one whose bound holds between 94.87 %
    and 95.12 % of 10,000 samples below it (too close to call for p(95))."""
    near = parse_threshold("huge_range: p(95)<173573014")
    far = parse_threshold("huge_range: p(50)<1e9")
    results = [
        ThresholdResult(near, "trend", 173412345.0, 10_000, decided=False,
                        counts=Counts(10_000, 9487.0, 9490.0, 9490.0, 9512.0), strict=strict),
        ThresholdResult(far, "trend", 3.2e7, 10_000, decided=True,
                        counts=Counts(10_000, 9990.0, 9992.0, 9990.0, 9992.0), strict=strict),
    ]
    selection = Selection(run_id="r", thresholds=(near, far), strict=strict)
    report = Report(selection, Extent(0.0, 10.0, 1, (10,)), 0.0, 10.0, {"huge_range": "trend"},
                    ())
    report.thresholds = results
    report.submetrics[("huge_range", ())] = Selected.new("huge_range", "trend")
    return report


class _Stream(io.StringIO):
    def __init__(self, encoding: str) -> None:
        super().__init__()
        self._encoding = encoding

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding


def test_too_close_to_call_is_marked_but_passes_by_default() -> None:
    report = _verdicts(strict=False)
    assert report.passed
    assert report.too_close == 1
    lines = render.threshold_lines(report, _Stream("utf-8"))
    near = next(line for line in lines if "p(95)<173573014" in line)
    assert near.lstrip().startswith("✓")
    assert near.endswith("≈ too close to call: bound between p(94.87) and p(95.12)")
    far = next(line for line in lines if "p(50)<1e9" in line)
    assert "too close" not in far
    assert lines[-1] == ("  all 2 thresholds passed; 1 too close to call "
                         "(--strict-thresholds would fail it)")
    ascii_lines = render.threshold_lines(report, _Stream("ascii"))
    assert any(line.endswith("~ too close to call: bound between p(94.87) and p(95.12)")
               and line.lstrip().startswith("ok") for line in ascii_lines)


def test_strict_thresholds_fail_verdicts_too_close_to_call() -> None:
    report = _verdicts(strict=True)
    assert not report.passed
    near, far = report.thresholds
    assert (near.holds, near.decided, near.ok) == (True, False, False)
    assert (far.holds, far.decided, far.ok) == (True, True, True)
    lines = render.threshold_lines(report, _Stream("utf-8"))
    line = next(line for line in lines if "p(95)<173573014" in line)
    assert line.lstrip().startswith("✗")
    assert "too close to call (fails: --strict-thresholds)" in line
    assert lines[-1] == ("  1 of 2 thresholds failed; 1 too close to call, failed by "
                         "--strict-thresholds")
    # k6's summary export says the threshold was crossed.
    assert render.k6_summary(report, False)["metrics"]["huge_range"]["thresholds"] == {
        "p(95)<173573014": True, "p(50)<1e9": False}


def test_json_carries_observed_value_band_and_decision() -> None:
    for strict in (False, True):
        data = render.report_dict(_verdicts(strict))
        near, far = data["thresholds"]
        assert near["observed"] == near["value"] == 173412345.0
        assert (near["holds"], near["decided"], near["ok"]) == (True, False, not strict)
        assert near["band"]["kind"] == "rank of the bound"
        assert near["band"]["low"] == pytest.approx(0.9487)
        assert near["band"]["high"] == pytest.approx(0.9512)
        assert near["band"]["below"] == [9487.0, 9490.0]
        assert near["band"]["at_or_below"] == [9490.0, 9512.0]
        assert near["band"]["samples"] == 10_000
        assert (far["decided"], far["ok"]) == (True, True)
        assert data["strict_thresholds"] is strict
        assert data["too_close"] == 1
        assert data["passed"] is not strict
    exact = ThresholdResult(parse_threshold("t: avg<1"), "trend", 0.5, 3)
    assert render.threshold_dict(exact)["band"] is None
    assert render.threshold_dict(exact)["decided"] is True


def test_html_badges_a_verdict_too_close_to_call() -> None:
    for strict in (False, True):
        text = html.render_html(_verdicts(strict))
        assert text.count('<span class="badge close"') == 1
        assert ">too close to call</span>" in text
        assert "(bound between p(94.87) and p(95.12))" in text
        if strict:
            assert '<div class="verdict fail">✗ 1 of 2 thresholds failed; 1 too close' in text
        else:
            assert '<div class="verdict pass">✓ all 2 thresholds passed; 1 too close' in text

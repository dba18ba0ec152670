"""Text outputs of a report: terminal table, JSON, CSV and k6's --summary-export shape."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from td_report import generators
from td_report.database import GeneratorInfo
from td_report.query import K6_QUANTILES, Report, ThresholdResult
from td_report.summary import Selected, quantile_label
from td_report.thresholds import selector_name

# k6's built-in metrics measured in milliseconds, and the ones measured in bytes.
TIME_METRICS = frozenset({
    "http_req_duration", "http_req_blocked", "http_req_connecting",
    "http_req_tls_handshaking", "http_req_sending", "http_req_waiting",
    "http_req_receiving", "iteration_duration", "group_duration", "ws_connecting",
    "ws_session_duration", "ws_ping", "grpc_req_duration", "browser_web_vital_lcp",
    "browser_web_vital_fcp", "browser_web_vital_inp", "browser_web_vital_ttfb",
    "browser_web_vital_fid", "browser_http_req_duration",
})
DATA_METRICS = frozenset({"data_sent", "data_received", "ws_msgs_sent_bytes"})
KIND_ORDER = ("trend", "counter", "rate", "gauge")
KIND_TITLES = {"trend": "TRENDS", "counter": "COUNTERS", "rate": "RATES", "gauge": "GAUGES"}


# --- number formatting ---------------------------------------------------------------

def fmt_number(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1000:
        return f"{value:,.1f}".replace(",", " ")
    return f"{value:.6g}"


def fmt_duration(ms: float) -> str:
    """k6's style: 52.72µs, 8.88ms, 1.02s."""
    if math.isnan(ms):
        return "-"
    if ms == 0:
        return "0s"
    if abs(ms) < 1:
        return f"{ms * 1000:.2f}µs"
    if abs(ms) < 1000:
        return f"{ms:.2f}ms"
    if abs(ms) < 60_000:
        return f"{ms / 1000:.2f}s"
    minutes, rest = divmod(ms / 1000, 60)
    return f"{int(minutes)}m{rest:.1f}s"


def fmt_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def unit_of(metric: str, units: Mapping[str, str] | None = None) -> str | None:
    """"time" (ms), "data" (bytes) or None: as the run's k6 said (its Metric lines'
    "contains", recorded by the forwarders), else as k6's built-in metrics are."""
    if units and metric in units:
        return units[metric]
    if metric in TIME_METRICS:
        return "time"
    if metric in DATA_METRICS:
        return "data"
    return None


def fmt_value(metric: str, value: float, units: Mapping[str, str] | None = None) -> str:
    """A trend figure in the metric's unit."""
    unit = unit_of(metric, units)
    if unit == "time":
        return fmt_duration(value)
    if unit == "data":
        return fmt_bytes(value)
    return fmt_number(value)


def fmt_total(metric: str, value: float, units: Mapping[str, str] | None = None) -> str:
    unit = unit_of(metric, units)
    if unit == "data":
        return fmt_bytes(value)
    return fmt_duration(value) if unit == "time" else fmt_number(value)


def fmt_rate_per_s(metric: str, value: float, units: Mapping[str, str] | None = None) -> str:
    if unit_of(metric, units) == "data":
        return fmt_bytes(value) + "/s"
    return f"{value:.2f}/s" if value < 1e6 else f"{value:.4g}/s"


def fmt_percent(fraction: float) -> str:
    return f"{fraction * 100:.2f}%"


def fmt_span(seconds: float) -> str:
    """36.2 s, 12 min 5 s, 2 h 3 min."""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds != int(seconds) else f"{int(seconds)} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if secs else f"{minutes} min"


def fmt_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


# --- shared pieces ---------------------------------------------------------------------

def ordered(selections: Iterable[Selected]) -> list[Selected]:
    def key(s: Selected) -> tuple[Any, ...]:
        return (KIND_ORDER.index(s.kind), s.metric, tuple((v is None, v or "") for _, v in s.tags))
    return sorted(selections, key=key)


def rows_shown(report: Report) -> list[Selected]:
    """Whole metrics, or the --by groups when there are any."""
    if report.selection.by:
        return ordered(report.groups.values())
    return ordered(report.metrics.values())


def threshold_value_text(result: ThresholdResult,
                         units: Mapping[str, str] | None = None) -> str:
    expression = result.threshold.expression
    label = expression.method_label
    metric = result.threshold.metric
    if result.kind == "trend":
        return f"{label}={fmt_value(metric, result.value, units)}"
    if result.kind == "rate":
        return f"{label}={fmt_percent(result.value)}"
    if expression.method == "rate":
        return f"{label}={fmt_rate_per_s(metric, result.value, units)}"
    return f"{label}={fmt_number(result.value)}"


def _marks(stream: IO[str]) -> tuple[str, str, str]:
    """(pass, fail, too close to call) marks the stream can print."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "✓✗≈".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "ok  ", "FAIL", "~"
    return "✓", "✗", "≈"


def _percent_label(fraction: float, digits: int) -> str:
    """0.94871 -> 'p(94.87)' with 2 digits; 0.95 -> 'p(95)'."""
    text = f"{fraction * 100:.{digits}f}".rstrip("0").rstrip(".")
    return f"p({text})"


def band_text(result: ThresholdResult) -> str:
    """'bound between p(94.87) and p(95.12)': the share of samples below the bound, as far
    as the digests tell; empty for exact figures."""
    counts = result.counts
    if counts is None or not counts.n:
        return ""
    low, high = counts.share
    digits = 2
    # Enough digits that the interval reads as one around the percentile asked for.
    while digits < 6 and _percent_label(low, digits) == _percent_label(high, digits):
        digits += 1
    return f"bound between {_percent_label(low, digits)} and {_percent_label(high, digits)}"


def too_close_text(result: ThresholdResult, mark: str = "≈") -> str:
    """'≈ too close to call: bound between p(94.87) and p(95.12)', or ''."""
    if result.decided:
        return ""
    where = band_text(result)
    strict = " (fails: --strict-thresholds)" if result.strict else ""
    return f"{mark} too close to call{strict}" + (f": {where}" if where else "")


def thresholds_summary(report: Report) -> str:
    """'all 3 thresholds passed' or '1 of 3 thresholds failed', and how many verdicts
    were too close to call."""
    failed = sum(1 for r in report.thresholds if not r.ok)
    total = len(report.thresholds)
    text = (f"{failed} of {total} thresholds failed" if failed
            else f"all {total} thresholds passed")
    close = report.too_close
    if close:
        text += f"; {close} too close to call"
        passing = sum(1 for r in report.thresholds if r.too_close and r.holds)
        if report.selection.strict:
            text += ", failed by --strict-thresholds"
        elif passing == close:
            text += f" (--strict-thresholds would fail {'it' if close == 1 else 'them'})"
        elif passing:
            text += f" (--strict-thresholds would fail {passing} of them)"
    return text


def threshold_lines(report: Report, stream: IO[str]) -> list[str]:
    if not report.thresholds:
        return []
    good, bad, close = _marks(stream)
    lines = ["THRESHOLDS (over all generators of the run)"]
    current = None
    for result in sorted(report.thresholds, key=lambda r: r.threshold.selector):
        if result.threshold.selector != current:
            current = result.threshold.selector
            lines.append(f"  {current}")
        mark = good if result.ok else bad
        empty = "  (no samples)" if not result.samples else ""
        doubt = too_close_text(result, close)
        lines.append(f"    {mark} '{result.threshold.expression.text}' "
                     f"{threshold_value_text(result, report.units)}{empty}"
                     + (f"  {doubt}" if doubt else ""))
    lines.append(f"  {thresholds_summary(report)}")
    return lines


def header_lines(report: Report) -> list[str]:
    sel = report.selection
    extent = report.extent
    widths = "/".join(str(w) for w in extent.widths)
    lines = [
        f"run       {sel.run_id}",
        f"window    {fmt_time(report.span_start)} .. {fmt_time(report.span_end)}  "
        f"({fmt_span(report.span_seconds)}, {extent.buckets} buckets of {widths} s)",
    ]
    if (sel.start is not None and sel.start.timestamp() > extent.first) or (
            sel.end is not None and sel.end.timestamp() < extent.last):
        lines.append(f"          whole buckets {fmt_time(extent.first)} .. "
                     f"{fmt_time(extent.last)} are counted; rates are per second of the "
                     f"window")
    lines.append(f"span      {span_text(report)}")
    if not report.generator_rows and report.generators:  # else: the GENERATORS section
        lines.append(f"generators {report.generators} (k6-forward processes seen in gauge "
                     f"samples)")
    if sel.where:
        lines.append("where     " + ", ".join(f"{k}={v}" for k, v in sel.where))
    if sel.by:
        lines.append("by        " + ", ".join(sel.by))
    return lines


def span_text(report: Report) -> str:
    """'first to last sample, 60.2 s' or 'buckets, 36.2 s (why)'."""
    seconds = fmt_span(report.span_seconds)
    if report.span_source == "samples":
        return f"first to last sample, {seconds}"
    note = f" ({report.span_note})" if report.span_note else ""
    return f"buckets, {seconds}{note}"


def generator_cells(report: Report) -> list[list[str]]:
    """host, script, k6, started, ended, exit, samples: one list per generator."""
    names = generators.labels(report.generator_rows)
    rows = []
    for g in report.generator_rows:
        rows.append([
            names[g.producer], generators.printable(g.script or "-"),
            generators.printable(g.k6_version or "-"),
            fmt_time(g.started_at) if g.started_at is not None else "-",
            "running" if g.ended_at is None else fmt_time(g.ended_at),
            generators.exit_text(g),
            fmt_number(g.samples) if g.samples is not None else "-",
        ])
    return rows


GENERATOR_HEADERS = ("host", "script", "k6", "started", "ended", "exit", "samples")


def _tag_cells(selected: Selected) -> list[str]:
    return [v if v is not None else "-" for _, v in selected.tags]


# --- terminal table --------------------------------------------------------------------

def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.ljust(w) if i < left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  " + "  ".join(parts).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def table_text(report: Report, stream: IO[str] | None = None) -> str:
    stream = stream or sys.stdout
    qs = report.quantiles
    by = list(report.selection.by)
    lines = header_lines(report)
    if report.generator_rows:
        lines += ["", f"GENERATORS {generators.count_text(report.generator_rows)}"]
        lines += _table(GENERATOR_HEADERS, generator_cells(report), 6)
    shown = rows_shown(report)
    for kind in KIND_ORDER:
        items = [s for s in shown if s.kind == kind]
        if not items:
            continue
        lines += ["", KIND_TITLES[kind]]
        rows: list[list[str]] = []
        if kind == "trend":
            headers = ["metric", *by, "count", "min", "mean",
                       *(quantile_label(q) for q in qs), "max"]
            for s in items:
                assert s.trend is not None
                st = s.trend.stats(qs)
                f, u = s.metric, report.units
                rows.append([s.metric, *_tag_cells(s), fmt_number(st.count),
                             fmt_value(f, st.min, u), fmt_value(f, st.mean, u),
                             *(fmt_value(f, st.quantiles[q], u) for q in qs),
                             fmt_value(f, st.max, u)])
        elif kind == "counter":
            headers = ["metric", *by, "total", "rate"]
            for s in items:
                assert s.counter is not None
                c = s.counter.stats(report.span_seconds)
                rows.append([s.metric, *_tag_cells(s), fmt_total(s.metric, c.total, report.units),
                             fmt_rate_per_s(s.metric, c.rate, report.units)])
        elif kind == "rate":
            headers = ["metric", *by, "rate", "non-zero", "samples"]
            for s in items:
                assert s.counter is not None
                c = s.counter.stats(report.span_seconds)
                rows.append([s.metric, *_tag_cells(s), fmt_percent(c.rate),
                             fmt_number(c.nonzero), fmt_number(c.samples)])
        else:
            headers = ["metric", *by, "last", "min", "max"]
            for s in items:
                assert s.counter is not None
                c = s.counter.stats(report.span_seconds)
                rows.append([s.metric, *_tag_cells(s), fmt_number(c.last), fmt_number(c.min),
                             fmt_number(c.max)])
        lines += _table(headers, rows, 1 + len(by))
    thresholds = threshold_lines(report, stream)
    if thresholds:
        lines += ["", *thresholds]
    return "\n".join(lines) + "\n"


# --- JSON ------------------------------------------------------------------------------

def metric_dict(report: Report, selected: Selected) -> dict[str, Any]:
    entry: dict[str, Any] = {"metric": selected.metric, "type": selected.kind}
    if selected.tags:
        entry["tags"] = {k: v for k, v in selected.tags}
    if selected.trend is not None:
        st = selected.trend.stats(report.quantiles)
        entry.update(count=st.count, sum=st.sum, min=st.min, max=st.max, mean=st.mean,
                     zeros=st.zeros,
                     quantiles={quantile_label(q): v for q, v in st.quantiles.items()})
        return entry
    assert selected.counter is not None
    c = selected.counter.stats(report.span_seconds)
    if c.kind == "counter":
        entry.update(total=c.total, rate=c.rate, samples=c.samples)
    elif c.kind == "rate":
        entry.update(rate=c.rate, nonzero=c.nonzero, zero=c.samples - c.nonzero,
                     samples=c.samples)
    else:
        entry.update(value=c.last, min=c.min, max=c.max, samples=c.samples)
    return entry


def band_dict(result: ThresholdResult) -> dict[str, Any] | None:
    """The rank interval of the bound: the share of samples certainly below it (low) and
    possibly at or below it (high), with the underlying sample counts."""
    counts = result.counts
    if counts is None:
        return None
    low, high = counts.share
    return {"kind": "rank of the bound", "low": low, "high": high,
            "below": [counts.below_lo, counts.below_hi],
            "at_or_below": [counts.at_or_below_lo, counts.at_or_below_hi],
            "samples": counts.n}


def threshold_dict(result: ThresholdResult) -> dict[str, Any]:
    th = result.threshold
    return {"metric": th.metric, "tags": dict(th.tags), "selector": th.selector,
            "threshold": th.expression.text, "method": th.expression.method_label,
            "value": result.value, "observed": result.value, "samples": result.samples,
            "holds": result.holds, "decided": result.decided, "band": band_dict(result),
            "ok": result.ok}


def generator_dict(g: GeneratorInfo) -> dict[str, Any]:
    def when(epoch: float | None) -> str | None:
        return iso(epoch) if epoch is not None else None

    return {"producer": g.producer, "host": g.host, "script": g.script,
            "k6_version": g.k6_version, "started_at": when(g.started_at),
            "ended_at": when(g.ended_at), "running": g.running,
            "exit_status": g.exit_status, "failed": g.exit_status not in (None, 0),
            "first_sample": when(g.first_sample), "last_sample": when(g.last_sample),
            "samples": g.samples, "td_written_at": when(g.td_written_at),
            "non_td_written_at": when(g.non_td_written_at), "written": g.written}


def report_dict(report: Report) -> dict[str, Any]:
    sel = report.selection
    data: dict[str, Any] = {
        "run_id": sel.run_id,
        "window": {
            "from": iso(sel.start.timestamp()) if sel.start else None,
            "to": iso(sel.end.timestamp()) if sel.end else None,
            "start": iso(report.span_start),
            "end": iso(report.span_end),
            "seconds": report.span_seconds,
            "buckets": report.extent.buckets,
            "bucket_seconds": list(report.extent.widths),
            "first_bucket": iso(report.extent.first),
            "buckets_end": iso(report.extent.last),
            "span": report.span_source,
            "span_note": report.span_note or None,
        },
        "generator_count": report.generators or None,
        "generators": [generator_dict(g) for g in report.generator_rows],
        "where": dict(sel.where),
        "by": list(sel.by),
        "quantiles": list(sel.quantiles),
        "metrics": [metric_dict(report, s) for s in ordered(report.metrics.values())],
    }
    if sel.by:
        data["groups"] = [metric_dict(report, s) for s in ordered(report.groups.values())]
    data["thresholds"] = [threshold_dict(r) for r in report.thresholds]
    data["strict_thresholds"] = sel.strict
    data["too_close"] = report.too_close
    data["passed"] = report.passed
    return data


def json_text(report: Report) -> str:
    return orjson.dumps(report_dict(report), option=orjson.OPT_INDENT_2).decode() + "\n"


# --- CSV -------------------------------------------------------------------------------

def csv_text(report: Report) -> str:
    qs = report.quantiles
    by = list(report.selection.by)
    headers = ["metric", "type", *by, "count", "min", "max", "mean",
               *(quantile_label(q) for q in qs), "total", "rate", "nonzero", "value"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(headers)
    for s in rows_shown(report):
        cells: dict[str, Any] = {"metric": s.metric, "type": s.kind}
        cells.update({k: (v if v is not None else "") for k, v in s.tags})
        if s.trend is not None:
            st = s.trend.stats(qs)
            cells.update({"count": st.count, "min": st.min, "max": st.max, "mean": st.mean})
            cells.update({quantile_label(q): v for q, v in st.quantiles.items()})
        else:
            assert s.counter is not None
            c = s.counter.stats(report.span_seconds)
            cells["count"] = c.samples
            if c.kind == "counter":
                cells.update(total=c.total, rate=c.rate)
            elif c.kind == "rate":
                cells.update(rate=c.rate, nonzero=c.nonzero)
            else:
                cells.update(min=c.min, max=c.max, value=c.last)
        writer.writerow([_csv_cell(cells.get(h, "")) for h in headers])
    return out.getvalue()


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    return value


# --- k6 --summary-export ---------------------------------------------------------------

def k6_summary(report: Report, explicit_quantiles: bool) -> dict[str, Any]:
    """The shape of ``k6 run --summary-export``: root_group and metrics."""
    if explicit_quantiles:
        trend_qs = tuple(q for q in report.quantiles if q != 0.5)
    else:
        trend_qs = tuple(q for q in K6_QUANTILES if q != 0.5)
    metrics: dict[str, dict[str, Any]] = {}
    for s in ordered(report.metrics.values()):
        metrics[s.metric] = _k6_entry(report, s, trend_qs)
    for s in ordered(report.groups.values()):
        tags = tuple((k, v) for k, v in s.tags if v is not None)
        if tags:
            metrics.setdefault(selector_name(s.metric, tags), _k6_entry(report, s, trend_qs))
    for (metric, tags), s in report.submetrics.items():
        metrics.setdefault(selector_name(metric, tags), _k6_entry(report, s, trend_qs))
    for result in report.thresholds:
        entry = metrics[result.threshold.selector]
        # k6 writes whether each threshold *failed*: true means crossed.
        entry.setdefault("thresholds", {})[result.threshold.expression.text] = not result.ok
    return {"root_group": _root_group(report), "metrics": metrics}


def _k6_entry(report: Report, s: Selected, trend_qs: Sequence[float]) -> dict[str, Any]:
    if s.trend is not None:
        st = s.trend.stats(report.all_quantiles())
        entry: dict[str, Any] = {"avg": st.mean, "min": st.min, "med": st.quantiles[0.5],
                                 "max": st.max}
        for q in trend_qs:
            entry[quantile_label(q)] = (st.quantiles[q] if q in st.quantiles
                                        else s.trend.quantiles([q])[0])
        return entry
    assert s.counter is not None
    c = s.counter.stats(report.span_seconds)
    if c.kind == "counter":
        return {"count": c.total, "rate": c.rate}
    if c.kind == "rate":
        return {"passes": c.nonzero, "fails": c.samples - c.nonzero, "value": c.rate}
    return {"value": c.last, "min": c.min, "max": c.max}


def _group_id(path: str) -> str:
    return hashlib.md5(path.encode(), usedforsecurity=False).hexdigest()


def _root_group(report: Report) -> dict[str, Any]:
    """k6's group tree, rebuilt from the stored 'group' tag (and 'check', when stored)."""
    def node(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "path": path, "id": _group_id(path), "groups": {}, "checks": {}}

    root = node("", "")
    nodes = {"": root}
    paths = set(report.group_paths) | {g for g, _ in report.checks}
    for path in sorted(paths):
        if not path.startswith("::"):
            continue
        parent = root
        prefix = ""
        for name in path[2:].split("::"):
            prefix = f"{prefix}::{name}"
            if prefix not in nodes:
                nodes[prefix] = parent["groups"][name] = node(name, prefix)
            parent = nodes[prefix]
    for (group, check), (passes, fails) in sorted(report.checks.items()):
        parent = nodes.get(group, root)
        path = f"{parent['path']}::{check}"
        parent["checks"][check] = {"name": check, "path": path, "id": _group_id(path),
                                   "passes": passes, "fails": fails}
    return root


def k6_summary_text(report: Report, explicit_quantiles: bool) -> str:
    return orjson.dumps(k6_summary(report, explicit_quantiles),
                        option=orjson.OPT_INDENT_2).decode() + "\n"

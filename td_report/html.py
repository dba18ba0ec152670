"""A self-contained HTML report: inline CSS and SVG, no script, no network access."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

from td_report import generators, render
from td_report.query import CHART_QUANTILES, CounterPoint, Report, ThresholdResult, TrendPoint
from td_report.summary import Selected, quantile_label

QUANTILE_COLORS = ("#2563eb", "#16a34a", "#f59e0b", "#dc2626")  # p50 p90 p95 p99

CSS = """
:root { --ink: #1f2937; --muted: #6b7280; --line: #e5e7eb; --bg: #f5f6f8; --card: #fff;
        --pass: #15803d; --pass-bg: #dcfce7; --fail: #b91c1c; --fail-bg: #fee2e2;
        --close: #92400e; --close-bg: #fef3c7; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue",
       Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 40px; }
header { display: flex; justify-content: space-between; align-items: flex-start; gap: 16px;
         flex-wrap: wrap; margin-bottom: 18px; }
h1 { font-size: 22px; margin: 0 0 4px; font-weight: 650; letter-spacing: -0.01em; }
h2 { font-size: 16px; margin: 30px 0 12px; font-weight: 650; }
h3 { font-size: 14px; margin: 0; font-weight: 600; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
              font-size: 12.5px; }
.sub { color: var(--muted); font-size: 13px; }
.meta { display: flex; flex-wrap: wrap; gap: 6px 22px; color: var(--muted); font-size: 13px; }
.meta b { color: var(--ink); font-weight: 600; }
.verdict { padding: 8px 14px; border-radius: 8px; font-weight: 650; white-space: nowrap; }
.verdict.pass { background: var(--pass-bg); color: var(--pass); }
.verdict.fail { background: var(--fail-bg); color: var(--fail); }
.kpis { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr));
        gap: 12px; margin-top: 18px; }
.kpi, .card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; }
.kpi { padding: 12px 14px; }
.kpi .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
              letter-spacing: 0.04em; }
.kpi .value { font-size: 22px; font-weight: 650; margin-top: 2px;
              font-variant-numeric: tabular-nums; }
.kpi .note { color: var(--muted); font-size: 12px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
        gap: 14px; }
.card { padding: 14px 16px 10px; }
.card-head { display: flex; justify-content: space-between; align-items: baseline; gap: 10px;
             flex-wrap: wrap; margin-bottom: 6px; }
.legend { display: flex; gap: 12px; flex-wrap: wrap; font-size: 12px; color: var(--muted); }
.legend span { display: inline-flex; align-items: center; gap: 5px; }
.legend i { display: inline-block; width: 14px; height: 3px; border-radius: 2px; }
.legend i.dash { background: repeating-linear-gradient(90deg, #9ca3af 0 4px,
                 transparent 4px 7px) !important; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart rect.hover { fill: #111827; fill-opacity: 0; }
svg.chart rect.hover:hover { fill-opacity: 0.05; }
svg.chart text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
                 fill: #6b7280; }
.empty { color: var(--muted); padding: 30px 0; text-align: center; }
.table-card { padding: 4px 0 2px; overflow-x: auto; }
table.data { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table.data th, table.data td { padding: 7px 14px; border-bottom: 1px solid var(--line);
                               white-space: nowrap; }
table.data th { text-align: right; color: var(--muted); font-weight: 600; font-size: 12px; }
table.data td { text-align: right; }
table.data th.l, table.data td.l { text-align: left; }
table.data tr:last-child td { border-bottom: none; }
table.data tbody tr:hover { background: #f9fafb; }
.side { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr));
        gap: 0 14px; align-items: start; }
.kind { color: var(--muted); font-size: 12px; margin: 18px 0 6px 2px; text-transform: uppercase;
        letter-spacing: 0.05em; font-weight: 600; }
.badge { display: inline-block; min-width: 52px; text-align: center; padding: 2px 8px;
         border-radius: 999px; font-size: 12px; font-weight: 650; }
.badge.pass { background: var(--pass-bg); color: var(--pass); }
.badge.fail { background: var(--fail-bg); color: var(--fail); }
.badge.close { background: var(--close-bg); color: var(--close); margin-left: 4px; }
footer { margin-top: 34px; color: var(--muted); font-size: 12px; }
"""


@dataclass(frozen=True)
class Line:
    label: str
    color: str
    points: list[tuple[float, float]]  # (epoch seconds, value), in time order
    gaps_after: float  # a gap longer than this (seconds) breaks the line
    dashed: bool = False
    area: bool = False


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def _y_ticks(top: float) -> tuple[float, list[float]]:
    if not top > 0 or not math.isfinite(top):
        top = 1.0
    step = _nice_step(top, 4)
    upper = math.ceil(top / step - 1e-9) * step
    count = round(upper / step)
    return upper, [i * step for i in range(count + 1)]


_TIME_STEPS = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
               21600, 43200, 86400)


def _x_ticks(start: float, end: float) -> list[float]:
    span = end - start
    step = next((s for s in _TIME_STEPS if span / s <= 7), _TIME_STEPS[-1])
    first = math.ceil(start / step) * step
    return [first + i * step for i in range(int((end - first) // step) + 1)]


def _time_label(epoch: float, span: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%H:%M" if span >= 1800 else "%H:%M:%S")


def axis_label_duration(ms: float) -> str:
    if ms == 0:
        return "0"
    if ms >= 1000:
        return f"{ms / 1000:g}s"
    if ms >= 1:
        return f"{ms:g}ms"
    return f"{ms * 1000:.3g}µs"


def axis_label_number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e6:
        return f"{value / 1e6:g}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


def axis_label_percent(value: float) -> str:
    return f"{value * 100:g}%"


def svg_chart(lines: Sequence[Line], x_range: tuple[float, float],
              y_label: Callable[[float], str], value_text: Callable[[float], str],
              name: str, bucket_width: float) -> str:
    """A line chart as inline SVG; each bucket's column has a <title> tooltip."""
    width, height = 640.0, 250.0
    left, right, top, bottom = 58.0, 18.0, 12.0, 28.0
    plot_w, plot_h = width - left - right, height - top - bottom
    x0, x1 = x_range
    if x1 <= x0:
        x0, x1 = x0 - bucket_width / 2, x0 + bucket_width / 2
    highest = max((v for line in lines for _, v in line.points if math.isfinite(v)),
                  default=0.0)
    upper, yticks = _y_ticks(highest * 1.04)

    def sx(t: float) -> float:
        return left + (t - x0) / (x1 - x0) * plot_w

    def sy(v: float) -> float:
        return top + plot_h - (v / upper) * plot_h

    out = [f'<svg class="chart" data-metric="{escape(name)}" viewBox="0 0 {width:g} {height:g}" '
           f'role="img" aria-label="{escape(name)}">']
    for tick in yticks:
        y = sy(tick)
        out.append(f'<line x1="{left:g}" x2="{width - right:g}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="{"#d1d5db" if tick == 0 else "#eef0f3"}" stroke-width="1"/>')
        out.append(f'<text x="{left - 8:g}" y="{y + 3.5:.1f}" text-anchor="end">'
                   f'{escape(y_label(tick))}</text>')
    for tick in _x_ticks(x0, x1):
        x = sx(tick)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h:g}" '
                   f'y2="{top + plot_h + 4:g}" stroke="#9ca3af"/>')
        anchor = ("end" if x > width - right - 24 else
                  "start" if x < left + 24 else "middle")
        out.append(f'<text x="{x:.1f}" y="{height - 8:g}" text-anchor="{anchor}">'
                   f'{_time_label(tick, x1 - x0)}</text>')
    for line in lines:
        for segment in _segments(line):
            coords = " ".join(f"{sx(t):.1f},{sy(v):.1f}" for t, v in segment)
            if line.area and len(segment) > 1:
                base = sy(0)
                area = (f"{sx(segment[0][0]):.1f},{base:.1f} {coords} "
                        f"{sx(segment[-1][0]):.1f},{base:.1f}")
                out.append(f'<polygon points="{area}" fill="{line.color}" '
                           f'fill-opacity="0.10" stroke="none"/>')
            dash = ' stroke-dasharray="5 4"' if line.dashed else ""
            out.append(f'<polyline points="{coords}" fill="none" stroke="{line.color}" '
                       f'stroke-width="2" stroke-linejoin="round" stroke-linecap="round"'
                       f'{dash}/>')
            if len(segment) == 1 and len(line.points) > 60:  # else it would not show
                t, v = segment[0]
                out.append(f'<circle cx="{sx(t):.1f}" cy="{sy(v):.1f}" r="2" '
                           f'fill="{line.color}"/>')
        if len(line.points) <= 60:
            out.extend(f'<circle cx="{sx(t):.1f}" cy="{sy(v):.1f}" r="2.6" '
                       f'fill="{line.color}"/>' for t, v in line.points if math.isfinite(v))
    # One hover column per bucket; its tooltip lists every line's value there.
    column = max(plot_w * bucket_width / (x1 - x0), 1.0)
    values: dict[float, list[str]] = {}
    for line in lines:
        for t, v in line.points:
            values.setdefault(t, []).append(f"{line.label} {value_text(v)}")
    for t, texts in sorted(values.items()):
        tip = (f"{_time_label(t - bucket_width / 2, 0)}–{_time_label(t + bucket_width / 2, 0)}"
               f"Z\n" + "\n".join(texts))
        out.append(f'<rect class="hover" x="{sx(t) - column / 2:.1f}" y="{top:g}" '
                   f'width="{column:.1f}" height="{plot_h:g}"><title>{escape(tip)}</title>'
                   f"</rect>")
    out.append("</svg>")
    return "".join(out)


def _segments(line: Line) -> list[list[tuple[float, float]]]:
    segments: list[list[tuple[float, float]]] = []
    for t, v in line.points:
        if not math.isfinite(v):
            continue
        if segments and t - segments[-1][-1][0] <= line.gaps_after:
            segments[-1].append((t, v))
        else:
            segments.append([(t, v)])
    return segments


def _legend(lines: Sequence[Line]) -> str:
    items = []
    for line in lines:
        cls = ' class="dash"' if line.dashed else ""
        items.append(f'<span><i{cls} style="background:{line.color}"></i>'
                     f'{escape(line.label)}</span>')
    return f'<div class="legend">{"".join(items)}</div>'


def _card(title: str, subtitle: str, body: str, lines: Sequence[Line] = ()) -> str:
    legend = _legend(lines) if lines else ""
    sub = f' <span class="sub">{escape(subtitle)}</span>' if subtitle else ""
    return (f'<div class="card"><div class="card-head"><h3>{escape(title)}{sub}</h3>'
            f'{legend}</div>{body}</div>')


def _empty(text: str) -> str:
    return f'<div class="empty">{escape(text)}</div>'


def _mid(point: TrendPoint | CounterPoint) -> float:
    return point.bucket + point.seconds / 2


def _width(points: Sequence[TrendPoint | CounterPoint]) -> float:
    return float(min((p.seconds for p in points), default=10))


def trend_chart(report: Report, metric: str) -> str:
    points = report.trend_points.get(metric, [])
    width = _width(points)
    lines = [Line(quantile_label(q).replace("(", "").replace(")", ""), color,
                  [(_mid(p), p.quantiles[i]) for p in points], width * 1.5)
             for i, (q, color) in enumerate(zip(CHART_QUANTILES, QUANTILE_COLORS, strict=True))]
    is_time = render.unit_of(metric, report.units) == "time"
    y_label = axis_label_duration if is_time else axis_label_number

    def value_text(value: float) -> str:
        return render.fmt_value(metric, value, report.units)

    x_range = (report.extent.first, report.extent.last)
    total = sum(p.count for p in points)
    body = svg_chart(lines, x_range, y_label, value_text, metric, width)
    return _card(metric, f"{render.fmt_number(total)} samples, per {width:g} s bucket", body,
                 lines)


def _counter_line(report: Report, metric: str, label: str, color: str,
                  value: Callable[[CounterPoint], float], dashed: bool = False,
                  area: bool = False) -> Line | None:
    points = report.counter_points.get(metric)
    if not points:
        return None
    return Line(label, color, [(_mid(p), value(p)) for p in points], _width(points) * 1.5,
                dashed, area)


def overview_charts(report: Report) -> list[str]:
    x_range = (report.extent.first, report.extent.last)
    width = float(min(report.extent.widths))
    cards = []
    lines = [line for line in (
        _counter_line(report, "http_reqs", "requests/s", "#2563eb",
                      lambda p: p.stats.total / p.seconds, area=True),
        _counter_line(report, "iterations", "iterations/s", "#7c3aed",
                      lambda p: p.stats.total / p.seconds),
    ) if line is not None]
    body = (svg_chart(lines, x_range, axis_label_number, lambda v: f"{v:.1f}/s",
                      "throughput", width)
            if lines else _empty("no http_reqs or iterations in this selection"))
    cards.append(_card("Throughput", f"per second, per {width:g} s bucket", body, lines))

    error = _counter_line(report, "http_req_failed", "http_req_failed", "#dc2626",
                          lambda p: p.stats.rate, area=True)
    checks = _counter_line(report, "checks", "checks failed", "#f59e0b",
                           lambda p: 1 - p.stats.rate)
    lines = [line for line in (error, checks) if line is not None]
    body = (svg_chart(lines, x_range, axis_label_percent, render.fmt_percent, "error_rate",
                      width)
            if lines else _empty("no http_req_failed or checks in this selection"))
    cards.append(_card("Error rate", f"failed requests and checks, per {width:g} s bucket",
                       body, lines))

    lines = [line for line in (
        _counter_line(report, "vus", "vus", "#0891b2", lambda p: p.stats.last, area=True),
        _counter_line(report, "vus_max", "vus_max", "#9ca3af", lambda p: p.stats.last,
                      dashed=True),
    ) if line is not None]
    body = (svg_chart(lines, x_range, axis_label_number, render.fmt_number, "vus", width)
            if lines else _empty("no vus gauge in this selection"))
    cards.append(_card("Virtual users", "at each bucket's end, all generators", body, lines))
    return cards


def _kpis(report: Report) -> str:
    cards: list[tuple[str, str, str]] = []
    metrics = report.metrics
    span = report.span_seconds

    def counter(name: str) -> Selected | None:
        selected = metrics.get(name)
        return selected if selected is not None and selected.counter is not None else None

    if (reqs := counter("http_reqs")) and reqs.counter:
        c = reqs.counter.stats(span)
        cards.append(("Requests", render.fmt_number(c.total), f"{c.rate:.1f}/s"))
    if (failed := counter("http_req_failed")) and failed.counter:
        c = failed.counter.stats(span)
        cards.append(("Failed requests", render.fmt_percent(c.rate),
                      f"{render.fmt_number(c.nonzero)} of {render.fmt_number(c.samples)}"))
    duration = metrics.get("http_req_duration")
    if duration is not None and duration.trend is not None and duration.trend.count:
        p95, p99 = duration.trend.quantiles([0.95, 0.99])
        cards.append(("Latency p95", render.fmt_duration(p95),
                      f"p99 {render.fmt_duration(p99)}"))
    if (iters := counter("iterations")) and iters.counter:
        c = iters.counter.stats(span)
        cards.append(("Iterations", render.fmt_number(c.total), f"{c.rate:.1f}/s"))
    if (checks := counter("checks")) and checks.counter:
        c = checks.counter.stats(span)
        cards.append(("Checks passed", render.fmt_percent(c.rate),
                      f"{render.fmt_number(c.nonzero)} of {render.fmt_number(c.samples)}"))
    if (vus := counter("vus")) and vus.counter:
        c = vus.counter.stats(span)
        # A sample's max is one generator's; bucket-end values add all generators up.
        points = report.counter_points.get("vus", [])
        peak = max([c.max, *(p.stats.last for p in points)])
        cards.append(("Peak VUs", render.fmt_number(peak), f"last {render.fmt_number(c.last)}"))
    cards.append(("Duration", render.fmt_span(span), f"{report.extent.buckets} buckets"))
    items = "".join(f'<div class="kpi"><div class="label">{escape(label)}</div>'
                    f'<div class="value">{escape(value)}</div>'
                    f'<div class="note">{escape(note)}</div></div>'
                    for label, value, note in cards)
    return f'<section class="kpis">{items}</section>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> str:
    head = "".join(f'<th class="l">{escape(h)}</th>' if i < left else f"<th>{escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{escape(c)}</td>' if i < left else f"<td>{escape(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return (f'<div class="card table-card"><table class="data"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _summary_tables(report: Report) -> str:
    qs = report.quantiles
    by = list(report.selection.by)
    shown = render.rows_shown(report)
    parts: list[str] = []
    others: list[str] = []
    for kind in render.KIND_ORDER:
        items = [s for s in shown if s.kind == kind]
        if not items:
            continue
        rows: list[list[str]] = []
        tags = [[v if v is not None else "–" for _, v in s.tags] for s in items]
        if kind == "trend":
            headers = ["metric", *by, "count", "min", "mean",
                       *(quantile_label(q) for q in qs), "max"]
            for s, t in zip(items, tags, strict=True):
                assert s.trend is not None
                st = s.trend.stats(qs)
                m, u = s.metric, report.units
                rows.append([m, *t, render.fmt_number(st.count), render.fmt_value(m, st.min, u),
                             render.fmt_value(m, st.mean, u),
                             *(render.fmt_value(m, st.quantiles[q], u) for q in qs),
                             render.fmt_value(m, st.max, u)])
        elif kind == "counter":
            headers = ["metric", *by, "total", "rate"]
            for s, t in zip(items, tags, strict=True):
                assert s.counter is not None
                c = s.counter.stats(report.span_seconds)
                rows.append([s.metric, *t, render.fmt_total(s.metric, c.total, report.units),
                             render.fmt_rate_per_s(s.metric, c.rate, report.units)])
        elif kind == "rate":
            headers = ["metric", *by, "rate", "non-zero", "samples"]
            for s, t in zip(items, tags, strict=True):
                assert s.counter is not None
                c = s.counter.stats(report.span_seconds)
                rows.append([s.metric, *t, render.fmt_percent(c.rate),
                             render.fmt_number(c.nonzero), render.fmt_number(c.samples)])
        else:
            headers = ["metric", *by, "last", "min", "max"]
            for s, t in zip(items, tags, strict=True):
                assert s.counter is not None
                c = s.counter.stats(report.span_seconds)
                rows.append([s.metric, *t, render.fmt_number(c.last),
                             render.fmt_number(c.min), render.fmt_number(c.max)])
        table = (f'<div><div class="kind">{render.KIND_TITLES[kind].lower()}</div>'
                 f"{_table(headers, rows, 1 + len(by))}</div>")
        (parts if kind == "trend" else others).append(table)
    if others:
        parts.append(f'<div class="side">{"".join(others)}</div>')
    return "".join(parts)


def _thresholds(results: Sequence[ThresholdResult], units: Mapping[str, str]) -> str:
    rows = []
    for r in sorted(results, key=lambda r: (r.ok, r.decided, r.threshold.selector)):
        badge = ('<span class="badge pass">pass</span>' if r.ok
                 else '<span class="badge fail">fail</span>')
        observed = render.threshold_value_text(r, units) + (
            " (no samples)" if not r.samples else "")
        if r.too_close:
            why = ("the exact value may lie on either side of the bound"
                   + ("; --strict-thresholds fails it" if r.strict else ""))
            badge += (f'<span class="badge close" title="{escape(why)}">too close to call'
                      f"</span>")
            where = render.band_text(r)
            if where:
                observed += f" ({where})"
        rows.append(f'<tr><td class="l">{badge}</td>'
                    f'<td class="l"><code>{escape(r.threshold.selector)}</code></td>'
                    f'<td class="l"><code>{escape(r.threshold.expression.text)}</code></td>'
                    f'<td>{escape(observed)}</td></tr>')
    return ('<div class="card table-card"><table class="data"><thead><tr>'
            '<th class="l">result</th><th class="l">metric</th><th class="l">threshold</th>'
            f'<th>observed</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _generators(report: Report) -> str:
    """One row per generator; a non-zero exit status is flagged."""
    head = "".join(f'<th class="l">{escape(h)}</th>' if i < 6 else f"<th>{escape(h)}</th>"
                   for i, h in enumerate(render.GENERATOR_HEADERS))
    rows = []
    for g, cells in zip(report.generator_rows, render.generator_cells(report), strict=True):
        tds = []
        for i, cell in enumerate(cells):
            if i == 5 and g.exit_status not in (None, 0):
                tds.append(f'<td class="l"><span class="badge fail">{escape(cell)}</span></td>')
            else:
                tds.append(f'<td class="l">{escape(cell)}</td>' if i < 6
                           else f"<td>{escape(cell)}</td>")
        rows.append(f"<tr>{''.join(tds)}</tr>")
    return (f'<div class="card table-card"><table class="data generators"><thead><tr>{head}'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _chart_order(metric: str) -> tuple[int, str]:
    """http_req_duration first, then iteration_duration, custom trends, the rest."""
    if metric == "http_req_duration":
        return (0, metric)
    if metric == "iteration_duration":
        return (1, metric)
    if metric not in render.TIME_METRICS:
        return (2, metric)
    return (3, metric)


def render_html(report: Report) -> str:
    sel = report.selection
    title = f"Load test report: {sel.run_id}"
    meta = [
        ("window", f"{render.fmt_time(report.span_start)} – {render.fmt_time(report.span_end)}"),
        ("duration", render.fmt_span(report.span_seconds)),
        ("buckets", f"{report.extent.buckets} × {'/'.join(map(str, report.extent.widths))} s"),
    ]
    meta.append(("span", "first to last sample" if report.span_source == "samples"
                  else "buckets"))
    if report.generator_rows:
        meta.append(("generators", generators.count_text(report.generator_rows)))
    elif report.generators:
        meta.append(("generators", str(report.generators)))
    if sel.where:
        meta.append(("where", ", ".join(f"{k}={v}" for k, v in sel.where)))
    if sel.by:
        meta.append(("by", ", ".join(sel.by)))
    meta_html = "".join(f"<span>{escape(k)} <b>{escape(v)}</b></span>" for k, v in meta)
    verdict = ""
    if report.thresholds:
        summary = escape(render.thresholds_summary(report))
        verdict = (f'<div class="verdict pass">✓ {summary}</div>' if report.passed
                   else f'<div class="verdict fail">✗ {summary}</div>')
    sections = [
        f'<header><div><h1>{escape(title)}</h1><div class="meta">{meta_html}</div></div>'
        f"{verdict}</header>",
        _kpis(report),
    ]
    if report.thresholds:
        sections.append("<h2>Thresholds <span class='sub'>over all generators of the run"
                        "</span></h2>" + _thresholds(report.thresholds, report.units))
    if report.generator_rows:
        sections.append("<h2>Generators <span class='sub'>"
                        f"{escape(generators.count_text(report.generator_rows))}</span></h2>"
                        + _generators(report))
    sections.append("<h2>Overview</h2><div class='grid'>" + "".join(overview_charts(report))
                    + "</div>")
    trends = sorted((m for m, s in report.metrics.items() if s.kind == "trend"),
                    key=_chart_order)
    if trends:
        sections.append("<h2>Trends <span class='sub'>p50, p90, p95 and p99 of each bucket, "
                        "merged over tag sets and generators</span></h2><div class='grid'>"
                        + "".join(trend_chart(report, m) for m in trends) + "</div>")
    sections.append("<h2>Summary <span class='sub'>whole window</span></h2>"
                    + _summary_tables(report))
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    sections.append(f"<footer>Generated by td-report at {generated}. Quantiles come from "
                    "merged t-digests; counts, sums, min, max and totals are exact. Rates per "
                    f"second divide by the span: {escape(render.span_text(report))}.</footer>")
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>"
            f"<body><main>\n{body}\n</main></body></html>\n")


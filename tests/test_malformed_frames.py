"""Malformed input over real sockets: every kind is answered as documented, counted by
reason, never stored, never kept in memory, and good clients go on unharmed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import struct
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import orjson
import pytest

from common import digest, protocol
from common.server import AggregatorServer
from td_server.aggregator import QUANTILES
from tests.utils import Client, fetch, run_server, wait_until

TD, NON_TD = protocol.ROLE_TD, protocol.ROLE_NON_TD
OLD_BUCKET = (int(time.time()) - 3600) // 10 * 10  # recent past: the flush loop closes it
FAR_PAST = (int(time.time()) - 8 * 24 * 3600) // 10 * 10  # beyond max_bucket_age (7 days)
FAR_FUTURE = (int(time.time()) + 2 * 24 * 3600) // 10 * 10  # beyond max_bucket_ahead (1 h)
MAX_FRAME = 16 * 1024 * 1024
# Every refused data frame carries this ignored field, so that a server keeping refused
# frames (or their bodies) around would grow by megabytes per round.
PAD = bytes(4096)
REPEATS = 300  # frames per kind and round
CONNECTIONS = 3  # connections per kind of frame that leaves the connection open
FATAL_REPEATS = 300  # one connection each, per kind and round
MAX_SERIES = 4
MAX_ITEMS = 50
GROWTH_LIMIT = 20 * 1024 * 1024
EOF_WAIT = 3.0  # the server answers a fatal frame and closes within milliseconds

NAN, INF = float("nan"), float("inf")
LENGTH = struct.Struct(">I")
SERVER_LOG = "tdagg.server"


def raw_frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


def frame(message: dict[str, Any]) -> bytes:
    return raw_frame(msgpack.packb(message, use_bin_type=True))


def data(seq: Any, items: Any) -> bytes:
    return frame({"type": "data", "seq": seq, "items": items, "pad": PAD})


def hello(role: str, /, **changes: Any) -> bytes:
    message = {"type": "hello", "version": 1, "producer": uuid.uuid4().hex, "run": "junk",
               "role": role}
    message.update(changes)
    return frame(message)


def blob(pairs: list[tuple[float, float]]) -> bytes:
    """A digest as (mean, weight) pairs, the form of the t-digest era that servers still
    read: any pairs, valid or not."""
    return np.array(pairs, dtype="<f8").tobytes()


FOUR = blob([(1.0, 1.0), (2.0, 1.0), (3.0, 1.0), (4.0, 1.0)])
SKETCH = digest.encode(digest.from_values([1.0, 2.0, 3.0, 4.0]))


def td_item(metric: str = "m", tags: Any = None, bucket: Any = OLD_BUCKET, width: Any = 10,
            count: Any = 4, total: Any = 10.0, lo: Any = 1.0, hi: Any = 4.0,
            centroids: Any = FOUR, zeros: Any = 0) -> list[Any]:
    return [metric, {"name": "a"} if tags is None else tags, bucket, width, count, total, lo,
            hi, centroids, zeros]


def counter_item(metric: str = "m", kind: Any = "counter", tags: Any = None,
                 bucket: Any = OLD_BUCKET, width: Any = 10, total: Any = 3.0, count: Any = 3,
                 nonzero: Any = 3, lo: Any = 1.0, hi: Any = 1.0, last_ns: Any = None,
                 last: Any = 1.0) -> list[Any]:
    return [metric, kind, {"name": "a"} if tags is None else tags, bucket, width, total, count,
            nonzero, lo, hi, OLD_BUCKET * 10**9 if last_ns is None else last_ns, last]


def item(role: str, **changes: Any) -> list[Any]:
    return td_item(**changes) if role == TD else counter_item(**changes)


def cycle(values: list[Any], i: int) -> Any:
    return values[i % len(values)]


@dataclass(frozen=True)
class Kind:
    """One kind of malformed input.

    ``build(i)`` gives the bytes of attempt ``i`` (for a data frame: ``i`` is its seq).
    A fatal kind uses one fresh connection per attempt (after a valid hello when
    ``after_hello``) and expects one fatal error frame then EOF, or EOF alone when
    ``reason`` is None. Otherwise the frames are pipelined on a few connections that
    said hello. A frame refused whole (``echo`` False) is answered by a non-fatal error;
    a frame whose one item is refused (``echo``) by an error naming its seq and listing
    the refused item, then an ack: refusal is per item.
    """

    name: str
    reason: str | None
    build: Callable[[int], bytes]
    fatal: bool = False
    after_hello: bool = False
    echo: bool = True


def fatal_kinds(role: str) -> list[Kind]:
    other = NON_TD if role == TD else TD
    rng = np.random.default_rng(7)
    garbage = [b"\x7f" + rng.bytes(255) for _ in range(8)]  # length prefix > 2 GiB
    good = data(1, [item(role)])
    return [
        Kind("zero length", "bad_framing", lambda i: LENGTH.pack(0) + b"abc", fatal=True),
        Kind("huge length", "bad_framing", lambda i: b"\xff\xff\xff\xff" + b"x" * 16,
             fatal=True),
        Kind("length just over the limit", "bad_framing",
             lambda i: LENGTH.pack(MAX_FRAME + 1) + b"x" * 100, fatal=True),
        Kind("garbage bytes", "bad_framing", lambda i: cycle(garbage, i), fatal=True),
        Kind("http request", "bad_framing", lambda i: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
             fatal=True),
        Kind("truncated frame, then close", None, lambda i: LENGTH.pack(100) + b"y" * 50,
             fatal=True),
        Kind("truncated hello, then close", None, lambda i: hello(role)[:-3], fatal=True),
        Kind("non-msgpack body before hello", "bad_msgpack",
             lambda i: raw_frame(b"\xc1\xc1\xc1"), fatal=True),
        Kind("msgpack non-map before hello", "bad_message",
             lambda i: raw_frame(msgpack.packb([1, 2, 3])), fatal=True),
        Kind("map without type before hello", "bad_message",
             lambda i: frame({"version": 1, "role": role}), fatal=True),
        Kind("data before hello", "hello_expected", lambda i: good, fatal=True),
        Kind("hello with wrong version", "bad_version",
             lambda i: hello(role, version=cycle([2, 0, -1, "1", None, b"\x01"], i)),
             fatal=True),
        Kind("hello for the other server", "wrong_server", lambda i: hello(other),
             fatal=True),
        Kind("hello with unknown role", "bad_field",
             lambda i: hello(role, role=cycle(["both", "", None, 1], i)), fatal=True),
        Kind("hello with a token that is not a string", "bad_field",
             lambda i: hello(role, token=cycle([5, b"secret", ["x"]], i)), fatal=True),
        Kind("hello with too long producer", "too_long",
             lambda i: hello(role, producer="p" * 201), fatal=True),
        Kind("zero length after hello", "bad_framing", lambda i: LENGTH.pack(0), fatal=True,
             after_hello=True),
        Kind("truncated data after hello, then close", None, lambda i: good[:-10],
             fatal=True, after_hello=True),
    ]


def frame_kinds(role: str) -> list[Kind]:
    """Well-framed but refused frames after a valid hello; the connection stays open."""
    good = item(role)
    return [
        Kind("non-msgpack body", "bad_msgpack", lambda i: raw_frame(b"\xc1" + PAD),
             echo=False),
        # 300 x 128 KiB per round: kept bodies would show at once in the memory check.
        Kind("large non-msgpack body", "bad_msgpack",
             lambda i: raw_frame(b"\xc1" * (128 * 1024)), echo=False),
        Kind("msgpack non-map", "bad_message",
             lambda i: raw_frame(msgpack.packb([i, "data", PAD])), echo=False),
        Kind("map without type", "bad_message",
             lambda i: frame({"seq": i, "items": [good], "pad": PAD}), echo=False),
        Kind("type not a string", "bad_message",
             lambda i: frame({"type": cycle([1, None, b"data"], i), "seq": i, "items": [good]}),
             echo=False),
        Kind("unexpected type", "unexpected_type",
             lambda i: cycle([hello(role), frame({"type": "ack", "seq": i}),
                              frame({"type": "welcome"})], i), echo=False),
        Kind("bad seq", "bad_field",
             lambda i: data(cycle([0, -1, -(2**63), "1", 1.5, None, True, [1]], i), [good]),
             echo=False),
        Kind("items not a list", "bad_field",
             lambda i: data(i, cycle([{"a": 1}, "abc", None, 5, good[0]], i)), echo=False),
        Kind("items empty", "bad_field", lambda i: data(i, []), echo=False),
        Kind("too many items", "too_many_items", lambda i: data(i, [good] * (MAX_ITEMS + 1)),
             echo=False),
        Kind("item of wrong arity", "bad_item",
             lambda i: data(i, [cycle([good[:-1], [*good, [], 0], [], good[:1]], i)])),
        Kind("bad sum_rest", "bad_field",
             lambda i: data(i, [cycle([[*good, 0], [*good, [1.0] * 41], [*good, [0.0]]], i)])),
        Kind("item not a list", "bad_item", lambda i: data(i, [cycle(["x", 1, {"a": 1}], i)])),
        Kind("non-finite sum/min/max", "not_finite",
             lambda i: data(i, [item(role, **{cycle(["total", "lo", "hi"], i):
                                              cycle([NAN, INF, -INF, NAN], i // 3)})])),
        Kind("non-numeric value", "not_finite", lambda i: data(i, [item(role, total="1.0")])),
        Kind("unaligned bucket", "unaligned_bucket",
             lambda i: data(i, [item(role, bucket=OLD_BUCKET + 1 + i % 9)])),
        Kind("other bucket width", "bucket_width_mismatch",
             lambda i: data(i, [item(role, width=cycle([5, 1, 2], i))])),
        Kind("negative bucket", "bad_field", lambda i: data(i, [item(role, bucket=-10)])),
        Kind("bucket far in the past", "bucket_out_of_window",
             lambda i: data(i, [item(role, bucket=FAR_PAST - 10 * (i % 50))])),
        Kind("bucket far in the future", "bucket_out_of_window",
             lambda i: data(i, [item(role, bucket=FAR_FUTURE + 10 * (i % 50))])),
        Kind("metric name too long", "too_long",
             lambda i: data(i, [item(role, metric="m" * (201 + i % 50))])),
        Kind("empty metric name", "bad_field", lambda i: data(i, [item(role, metric="")])),
        Kind("too many tags", "too_many_tags",
             lambda i: data(i, [item(role, tags={f"k{n}": "v" for n in range(33)})])),
        Kind("NUL in a tag value", "bad_character",
             lambda i: data(i, [item(role, tags={"name": "v\x00" * (1 + i % 5)})])),
        Kind("NUL in a tag key", "bad_character",
             lambda i: data(i, [item(role, tags={"na\x00me": "v"})])),
        Kind("NUL in the metric name", "bad_character",
             lambda i: data(i, [item(role, metric="m\x00")])),
        Kind("value beyond 1e20", "huge_value",
             lambda i: data(i, [item(role, lo=-1.7e308, total=-1e300)])),
        Kind("sum beyond count x max", "bad_field",
             lambda i: data(i, [item(role, total=1.7e308)])),
        Kind("tag value not a string", "bad_field",
             lambda i: data(i, [item(role, tags={"name": cycle([1, None, b"a"], i)})])),
        # The run is already at its series cap (see prefill_series_cap).
        Kind("too many series for the run", "too_many_series",
             lambda i: frame({"type": "data", "seq": i, "pad": PAD,
                              "items": [item(role, metric=f"extra-{i}")]})),
    ] + (td_kinds() if role == TD else counter_kinds())


def td_kinds() -> list[Kind]:
    return [
        Kind("negative or zero centroid weight", "bad_digest",
             lambda i: data(i, [td_item(centroids=cycle([
                 blob([(1, -1), (2, 1), (3, 2), (4, 2)]),
                 blob([(1, 0), (2, 2), (3, 1), (4, 1)])], i))])),
        Kind("unsorted centroids", "bad_digest",
             lambda i: data(i, [td_item(centroids=blob([(2, 1), (1, 1), (3, 1), (4, 1)]))])),
        Kind("weights not summing to count", "bad_digest",
             lambda i: data(i, [td_item(count=cycle([5, 3, 400], i))])),
        Kind("digest not whole pairs", "bad_digest",
             lambda i: data(i, [td_item(centroids=FOUR[:-1 - i % 15])])),
        Kind("sketch cut short", "bad_digest",
             lambda i: data(i, [td_item(centroids=SKETCH[:cycle([20, 30, 40, 51], i)])])),
        Kind("sketch with a bad header", "bad_digest",
             lambda i: data(i, [td_item(centroids=cycle(
                 [SKETCH[:2] + b"\x09" + SKETCH[3:], SKETCH[:3] + b"\x02" + SKETCH[4:],
                  b"\xd5k" + bytes(15)], i))])),
        Kind("non-finite centroid", "bad_digest",
             lambda i: data(i, [td_item(centroids=blob([(1, 1), (NAN, 1), (3, 1), (4, 1)]))])),
        Kind("empty digest", "bad_digest", lambda i: data(i, [td_item(centroids=b"")])),
        Kind("digest not binary", "bad_field",
             lambda i: data(i, [td_item(centroids=cycle(["abc", [1.0, 1.0], None], i))])),
        Kind("zeros above count", "bad_field", lambda i: data(i, [td_item(zeros=5)])),
        Kind("count zero", "bad_field", lambda i: data(i, [td_item(count=0)])),
        Kind("min above max", "bad_field", lambda i: data(i, [td_item(lo=5.0, hi=4.0)])),
    ]


def counter_kinds() -> list[Kind]:
    return [
        Kind("bad kind", "bad_kind",
             lambda i: data(i, [counter_item(kind=cycle(["trend", "", None, 1, "Counter"],
                                                        i))])),
        Kind("nonzero above count", "bad_field",
             lambda i: data(i, [counter_item(nonzero=4)])),
        Kind("negative count", "bad_field",
             lambda i: data(i, [counter_item(count=cycle([0, -3], i))])),
        Kind("non-finite last value", "not_finite",
             lambda i: data(i, [counter_item(kind="gauge", last=cycle([NAN, INF], i))])),
        Kind("negative last_ns", "bad_field", lambda i: data(i, [counter_item(last_ns=-1)])),
        Kind("trend item to the counter server", "bad_item", lambda i: data(i, [td_item()])),
    ]


# --- running the kinds against a server ----------------------------------------------------


ANY_COUNT = "the samples the item claims"


def refusals(server: AggregatorServer) -> Counter[str]:
    """Frames refused whole by reason, and items refused alone as "item:REASON"."""
    items = Counter({f"item:{r}": n for r, n in server.stats.refused_items.items()})
    return server.stats.refused + items


def decode_all(raw: bytes) -> list[dict[str, Any]]:
    return [protocol.unpack(b) for b in protocol.FrameDecoder().feed(raw)]


async def fatal_attempt(address: tuple[str, int], role: str, kind: Kind, i: int) -> None:
    reader, writer = await asyncio.open_connection(*address)
    try:
        if kind.after_hello:
            writer.write(hello(role))
            (length,) = LENGTH.unpack(await reader.readexactly(4))
            welcome = protocol.unpack(await reader.readexactly(length))
            assert welcome == {"type": "welcome", "version": 1, "role": role, "last_seq": 0}
        writer.write(kind.build(i))
        if kind.reason is None:
            writer.write_eof()
        await writer.drain()
        try:
            received = await asyncio.wait_for(reader.read(), EOF_WAIT)  # all until EOF
        except TimeoutError:
            raise AssertionError(f"{kind.name} #{i}: the server kept the connection "
                                 f"open") from None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    answers = decode_all(received)
    if kind.reason is None:
        assert answers == [], (kind.name, answers)
    else:
        assert len(answers) == 1, (kind.name, answers)
        assert {k: v for k, v in answers[0].items() if k != "detail"} == {
            "type": "error", "seq": None, "reason": kind.reason, "fatal": True}, (
            kind.name, answers)
        assert isinstance(answers[0]["detail"], str)


async def _next_error(client: Client, kind: Kind, seq: int) -> dict[str, Any]:
    try:
        return await client.receive()
    except TimeoutError:
        raise AssertionError(f"{kind.name}: seq {seq} not answered") from None


async def frame_kind(address: tuple[str, int], role: str, kind: Kind) -> None:
    per_connection = REPEATS // CONNECTIONS
    problem = None
    for c in range(CONNECTIONS):
        run_id = "greedy" if "series" in kind.name else "junk"
        client = await Client.connect(address, role=role, run_id=run_id)
        try:
            seqs = range(1 + c * per_connection, 1 + (c + 1) * per_connection)
            client.writer.write(b"".join(kind.build(seq) for seq in seqs))
            await client.writer.drain()
            # Every frame is answered, and the connection stays open. Acks are cumulative
            # (one per read), so they are taken apart from the errors.
            acked = 0
            for seq in seqs:
                answer = await _next_error(client, kind, seq)
                while answer["type"] == "ack":
                    acked = answer["seq"]
                    answer = await _next_error(client, kind, seq)
                expected: dict[str, Any] = {"type": "error", "seq": seq if kind.echo else None,
                                            "reason": kind.reason, "fatal": False}
                got = {k: v for k, v in answer.items() if k != "detail"}
                if kind.echo and "items" in answer:  # one item refused, the rest acked
                    expected["items"] = [[kind.reason, 1, ANY_COUNT, answer["detail"]]]
                    got["items"] = [[r, n, ANY_COUNT, d] for r, n, _, d in answer["items"]]
                if problem is None and got != expected:
                    problem = f"{kind.name}: seq {seq} answered {answer}, expected {expected}"
            while kind.echo and acked < seqs[-1] and problem is None:
                answer = await _next_error(client, kind, seqs[-1])
                if answer["type"] != "ack":
                    problem = f"{kind.name}: {answer} where an ack was expected"
                acked = answer.get("seq", acked)
        finally:
            await client.close()
    assert problem is None, problem


async def garbage_round(server: AggregatorServer, role: str) -> tuple[Counter[str], list[str]]:
    """Send every kind; return the refusals expected by reason and the kinds that failed.

    A kind that is answered wrongly is reported, not raised at once, so that every other
    kind and the checks after the round still run. A fatal kind whose first attempt fails
    is not repeated (each such attempt may wait EOF_WAIT seconds).
    """
    expected: Counter[str] = Counter()
    problems: list[str] = []
    limit = asyncio.Semaphore(32)

    async def attempt(kind: Kind, i: int) -> None:
        async with limit:
            await fatal_attempt(server.address, role, kind, i)

    for kind in fatal_kinds(role):
        try:
            await attempt(kind, 0)
            await asyncio.gather(*(attempt(kind, i) for i in range(1, FATAL_REPEATS)))
        except AssertionError as exc:
            problems.append(str(exc))
            expected[kind.reason or ""] += 1
        else:
            expected[kind.reason or ""] += FATAL_REPEATS
    frames = frame_kinds(role)
    results = await asyncio.gather(*(frame_kind(server.address, role, kind) for kind in frames),
                                   return_exceptions=True)
    for kind, result in zip(frames, results, strict=True):
        if isinstance(result, AssertionError):
            problems.append(str(result))
        elif isinstance(result, BaseException):
            raise result
        expected[f"item:{kind.reason}" if kind.echo else kind.reason or ""] += REPEATS
    del expected[""]

    async def all_closed() -> bool:
        return not server._connections

    await wait_until(all_closed)
    return expected, problems


# --- good data ---------------------------------------------------------------------------------


async def prefill_series_cap(address: tuple[str, int], role: str) -> None:
    client = await Client.connect(address, role=role, run_id="greedy")
    items = [item(role, metric=f"s{n}") for n in range(MAX_SERIES)]
    assert await client.send(1, items) == {"type": "ack", "seq": 1}
    await client.close()


GOOD_TREND = np.arange(1.0, 101.0)
GOOD_WAITING = np.array([0.0, 0.0, 0.0, 1.5, 2.5, 0.25])


def good_trend_items() -> list[list[Any]]:
    out = []
    for metric, tags, values in (("http_req_duration", {"name": "a", "status": "200"},
                                  GOOD_TREND),
                                 ("http_req_waiting", {}, GOOD_WAITING)):
        centroids, zeros = digest.split_zeros(values)
        out.append([metric, tags, OLD_BUCKET, 10, len(values), math.fsum(values),
                    float(values.min()), float(values.max()), digest.encode(centroids), zeros])
    return out


def good_counter_items() -> list[list[Any]]:
    ns = OLD_BUCKET * 10**9
    return [counter_item("reqs", "counter", {"status": "200"}, total=3.0, count=3, nonzero=3,
                         lo=1.0, hi=1.0, last_ns=ns + 3, last=1.0),
            counter_item("ok", "rate", {}, total=3.0, count=4, nonzero=3, lo=0.0, hi=1.0,
                         last_ns=ns + 4, last=1.0),
            counter_item("vus", "gauge", {}, total=17.0, count=3, nonzero=3, lo=3.0, hi=9.0,
                         last_ns=ns + 5, last=5.0)]


async def send_good(server: AggregatorServer, role: str) -> None:
    items = good_trend_items() if role == TD else good_counter_items()
    client = await Client.connect(server.address, role=role, run_id="good", producer="good-1")
    assert await client.send(1, items) == {"type": "ack", "seq": 1}
    assert await client.send(1, items) == {"type": "ack", "seq": 1}  # a resend counts once
    await client.close()
    expected_rows = len(items) + MAX_SERIES

    async def written() -> bool:
        return (server.stats.buckets_written >= expected_rows and not server.open.entries
                and not server.closing)

    await wait_until(written)


async def check_stored(dsn: str, role: str) -> None:
    if role == TD:
        rows = await fetch(dsn, "SELECT * FROM trend_buckets ORDER BY run_id, metric")
        assert [(r["run_id"], r["metric"]) for r in rows] == [
            ("good", "http_req_duration"), ("good", "http_req_waiting"),
            *(("greedy", f"s{n}") for n in range(MAX_SERIES))]
        for row, sent in zip(rows, good_trend_items(), strict=False):
            metric, tags, bucket, width, count, total, lo, hi, blob_, zeros = sent
            centroids = digest.decode(blob_)
            assert orjson.loads(row["tags"]) == tags
            assert row["bucket"].timestamp() == bucket
            assert row["bucket_seconds"] == width
            assert (row["count"], row["sum"], row["min"], row["max"], row["zeros"]) == (
                count, total, lo, hi, zeros)
            assert row["mean"] == total / count
            assert row["digest"] == blob_
            assert [row[c] for c in ("p50", "p90", "p95", "p99")] == digest.quantiles(
                centroids, QUANTILES, lo, hi, zeros)
            assert row["wal_pos"] > 0
        assert rows[0]["p50"] == pytest.approx(50.5, abs=1)
        # Three of six samples are exact zeros: as numpy and k6, halfway from the third
        # (0) to the fourth (0.25).
        assert rows[1]["p50"] == pytest.approx(0.125, rel=digest.ALPHA)
        for row in rows[2:]:
            assert (row["count"], row["sum"], row["min"], row["max"], row["zeros"]) == (
                4, 10.0, 1.0, 4.0, 0)
            # Sent as t-digest centroids, stored as the sketch of the same samples.
            assert row["digest"] == SKETCH
        return
    rows = await fetch(dsn, "SELECT * FROM counter_buckets ORDER BY run_id, metric")
    got = [(r["run_id"], r["metric"], r["metric_type"], orjson.loads(r["tags"]), r["value"],
            r["count"], r["nonzero"], r["min"], r["max"], orjson.loads(r["state"]))
           for r in rows]
    assert got == [
        ("good", "ok", "rate", {}, 0.75, 4, 3, 0.0, 1.0, {"sum": 3.0}),
        ("good", "reqs", "counter", {"status": "200"}, 3.0, 3, 3, 1.0, 1.0, {"sum": 3.0}),
        ("good", "vus", "gauge", {}, 5.0, 3, 3, 3.0, 9.0,
         {"sum": 17.0, "gauge_last": {"good-1": [OLD_BUCKET * 10**9 + 5, 5.0]}}),
        *(("greedy", f"s{n}", "counter", {"name": "a"}, 3.0, 3, 3, 1.0, 1.0, {"sum": 3.0})
          for n in range(MAX_SERIES)),
    ]
    assert all(r["bucket"].timestamp() == OLD_BUCKET for r in rows)


# --- the test ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [TD, NON_TD])
async def test_malformed_input_is_refused_counted_and_forgotten(
        dsn: str, tmp_path: Path, role: str, caplog: pytest.LogCaptureFixture) -> None:
    # Thousands of refusals are logged as warnings; pytest would keep every one.
    caplog.set_level(logging.ERROR, logger=SERVER_LOG)
    kinds = fatal_kinds(role) + frame_kinds(role)
    assert len(kinds) >= 40
    async with run_server(dsn, tmp_path, role=role, grace=0, max_series_per_run=MAX_SERIES,
                          max_items_per_frame=MAX_ITEMS) as server:
        await prefill_series_cap(server.address, role)

        expected, problems = await garbage_round(server, role)
        assert not problems, "\n".join(problems)
        assert sum(expected.values()) > 10_000
        assert refusals(server) == expected
        assert server.stats.items == MAX_SERIES  # the prefill only

        # A good client is unharmed, and its data is stored exactly (checked below).
        await send_good(server, role)
        items_before = server.stats.items

        # Second round under tracemalloc: whatever it leaves allocated is growth.
        gc.collect()
        bytes_before = server.stats.bytes
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            assert await garbage_round(server, role) == (expected, problems)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            top = tracemalloc.take_snapshot().statistics("lineno")[:5]
        finally:
            tracemalloc.stop()
        assert after - before < GROWTH_LIMIT, [str(s) for s in top]
        assert refusals(server) == expected + expected
        assert server.stats.items == items_before
        # The round sent several times the growth limit.
        assert server.stats.bytes - bytes_before > 3 * GROWTH_LIMIT
        assert server.stats.duplicate_frames == 1  # the good client's resend
        # Refused frames take no room under the per-run series cap.
        assert {run: len(names) for run, names in server.series.items() if names} == {
            "greedy": MAX_SERIES, "good": 3 if role == NON_TD else 2}
        assert not server.open.entries
    await check_stored(dsn, role)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("version", [1.0, True])
async def test_hello_version_must_be_the_integer_1(dsn: str, tmp_path: Path,
                                                   version: object) -> None:
    """docs/PROTOCOL.md: ``version`` is an int. 1.0 and true compare equal to 1 in Python."""
    async with run_server(dsn, tmp_path) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        try:
            writer.write(hello(TD, version=version))
            (length,) = LENGTH.unpack(await asyncio.wait_for(reader.readexactly(4), 10))
            answer = protocol.unpack(await reader.readexactly(length))
            assert (answer["type"], answer.get("reason"), answer.get("fatal")) == (
                "error", "bad_version", True), answer
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert server.stats.refused == {"bad_version": 1}

"""Framing, message schema and item validation (common.protocol)."""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import digest, protocol
from common.protocol import (
    CounterPartial,
    Data,
    FrameDecoder,
    FramingError,
    Hello,
    Limits,
    Refused,
    TrendPartial,
    parse_counter_item,
    parse_data,
    parse_hello,
    parse_trend_item,
    unpack,
)

LIMITS = Limits()
BUCKET = 1_700_000_000  # a multiple of 10 (and of 1, 2, 4, 5, 8, ...), not of 60


def raw_frame(message: Any) -> bytes:
    """A frame built with msgpack and struct directly, not with protocol.frame."""
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def blob(rows: list[tuple[float, float]]) -> bytes:
    """Little-endian float64 (mean, weight) pairs, built by hand."""
    return b"".join(struct.pack("<dd", mean, weight) for mean, weight in rows)


def good_trend_list() -> list[Any]:
    rows = [(1.0, 1.0), (2.0, 2.0), (4.0, 1.0)]
    return ["http_req_duration", {"name": "a", "method": "GET"}, BUCKET, 10, 4, 9.0, 1.0,
            4.0, blob(rows), 0]


def zero_trend_list() -> list[Any]:
    """Six samples: 0, 0, 1, 2, 2, 4 -- two exact zeros beside a digest of the other four."""
    rows = [(1.0, 1.0), (2.0, 2.0), (4.0, 1.0)]
    return ["http_req_connecting", {"name": "a"}, BUCKET, 10, 6, 9.0, 0.0, 4.0, blob(rows), 2]


def good_counter_list() -> list[Any]:
    return ["http_reqs", "counter", {"name": "a"}, BUCKET, 10, 12.0, 12, 12, 1.0, 1.0,
            1_700_000_003_500_000_000, 1.0]


def with_field(base: list[Any], index: int, value: Any) -> list[Any]:
    item = list(base)
    item[index] = value
    return item


def refused(call: Callable[[], object]) -> str:
    with pytest.raises(Refused) as info:
        call()
    return info.value.reason


# --- framing ---------------------------------------------------------------------


def test_frame_layout_is_big_endian_length_then_msgpack() -> None:
    message = {"type": "ack", "seq": 7}
    encoded = protocol.frame(message)
    body = msgpack.packb(message, use_bin_type=True)
    assert encoded[:4] == len(body).to_bytes(4, "big")
    assert msgpack.unpackb(encoded[4:], raw=False) == message
    assert len(encoded) == 4 + len(body)


def test_message_builders() -> None:
    def body(encoded: bytes) -> Any:
        assert int.from_bytes(encoded[:4], "big") == len(encoded) - 4
        return msgpack.unpackb(encoded[4:], raw=False)

    assert body(protocol.hello("gen-1", "run-9", "td")) == {
        "type": "hello", "version": 1, "producer": "gen-1", "run": "run-9", "role": "td"}
    assert body(protocol.welcome("non_td", 41)) == {
        "type": "welcome", "version": 1, "role": "non_td", "last_seq": 41}
    assert body(protocol.data(3, [[1, 2]])) == {"type": "data", "seq": 3, "items": [[1, 2]]}
    assert body(protocol.ack(5)) == {"type": "ack", "seq": 5}
    assert body(protocol.error("bad_item", "why", 2, True)) == {
        "type": "error", "seq": 2, "reason": "bad_item", "detail": "why", "fatal": True}


def _stream() -> tuple[bytes, list[bytes], list[int]]:
    messages = [{"type": "ack", "seq": 1}, {"type": "data", "seq": 2, "items": ["x" * 300]},
                {"type": "ack", "seq": 3}]
    bodies = [msgpack.packb(m, use_bin_type=True) for m in messages]
    frames = [struct.pack(">I", len(b)) + b for b in bodies]
    ends = []
    total = 0
    for f in frames:
        total += len(f)
        ends.append(total)
    return b"".join(frames), bodies, ends


def test_split_at_every_byte_boundary() -> None:
    stream, bodies, ends = _stream()
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        first = decoder.feed(stream[:cut])
        complete = sum(1 for end in ends if end <= cut)
        assert first == bodies[:complete], cut
        last_end = max([0] + [end for end in ends if end <= cut])
        assert decoder.pending_bytes == cut - last_end, cut
        second = decoder.feed(stream[cut:])
        assert first + second == bodies, cut
        assert decoder.pending_bytes == 0


def test_split_at_every_pair_of_boundaries() -> None:
    stream, bodies, _ = _stream()
    step = 7  # every pair would be slow; a stride still covers header and body splits
    for a in range(0, len(stream) + 1, step):
        for b in range(a, len(stream) + 1, 3):
            decoder = FrameDecoder()
            out = decoder.feed(stream[:a]) + decoder.feed(stream[a:b]) + decoder.feed(stream[b:])
            assert out == bodies, (a, b)


def test_byte_at_a_time() -> None:
    stream, bodies, _ = _stream()
    decoder = FrameDecoder()
    out: list[bytes] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == bodies
    assert decoder.pending_bytes == 0


def test_many_frames_in_one_chunk() -> None:
    messages = [{"type": "ack", "seq": i} for i in range(1, 51)]
    stream = b"".join(raw_frame(m) for m in messages)
    decoder = FrameDecoder()
    assert [msgpack.unpackb(b) for b in decoder.feed(stream)] == messages
    assert decoder.feed(b"") == []


def test_empty_feed_and_partial_header() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\x00\x00") == []
    assert decoder.pending_bytes == 2
    assert decoder.feed(b"\x00\x01") == []
    assert decoder.feed(b"Z") == [b"Z"]
    assert decoder.pending_bytes == 0


def test_zero_length_frame_is_a_framing_error() -> None:
    with pytest.raises(FramingError):
        FrameDecoder().feed(b"\x00\x00\x00\x00")
    # After a good frame in the same chunk: the good frame first, then the error.
    decoder = FrameDecoder()
    good = raw_frame({"type": "ack"})
    assert decoder.feed(good + b"\x00\x00\x00\x00rest") == [good[4:]]
    with pytest.raises(FramingError):
        decoder.check()
    with pytest.raises(FramingError):
        decoder.feed(b"more")
    # And when the zero header arrives split over two chunks.
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00") == []
    with pytest.raises(FramingError):
        decoder.feed(b"\x00\x00")


def test_oversize_frame_is_a_framing_error_before_the_body_arrives() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    with pytest.raises(FramingError):
        decoder.feed(struct.pack(">I", 101))
    with pytest.raises(FramingError):
        FrameDecoder(max_frame_bytes=100).feed(b"\xff\xff\xff\xff")
    exact = FrameDecoder(max_frame_bytes=100)
    assert exact.feed(struct.pack(">I", 100) + b"a" * 100) == [b"a" * 100]


def test_default_limit_is_sixteen_mebibytes() -> None:
    assert FrameDecoder().max_frame_bytes == 16 * 1024 * 1024
    ok = FrameDecoder()
    assert ok.feed(struct.pack(">I", 16 * 1024 * 1024)) == []
    with pytest.raises(FramingError):
        FrameDecoder().feed(struct.pack(">I", 16 * 1024 * 1024 + 1))


# --- unpack ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x93\x01",  # array of three with one element
        b"\xd9\x05ab",  # str8 of five with two bytes
        msgpack.packb({"type": "ack"}) + b"\x00",  # trailing data
    ],
)
def test_unpack_refuses_bad_msgpack(body: bytes) -> None:
    assert refused(lambda: unpack(body)) == "bad_msgpack"


@pytest.mark.parametrize(
    "message",
    [[1, 2], "hello", 5, None, {"seq": 1}, {"type": 5}, {"type": None}, {"type": b"hello"},
     {"type": ["hello"]}],
)
def test_unpack_refuses_non_messages(message: Any) -> None:
    body = msgpack.packb(message, use_bin_type=True)
    assert refused(lambda: unpack(body)) == "bad_message"


def test_unpack_refuses_non_string_map_keys() -> None:
    body = msgpack.packb({"type": "ack", 1: "x"})
    assert refused(lambda: unpack(body)) in ("bad_msgpack", "bad_message")


def test_unpack_returns_the_map() -> None:
    message = {"type": "data", "seq": 1, "items": [[b"\x00\x01", 1.5, "x"]]}
    assert unpack(msgpack.packb(message, use_bin_type=True)) == message


# --- hello and data ----------------------------------------------------------------


def hello_message(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "hello", "version": 1, "producer": "gen-1",
                               "run": "run-1", "role": "td"}
    for key, value in changes.items():
        if value is _DROP:
            message.pop(key)
        else:
            message[key] = value
    return message


_DROP = object()


def test_parse_hello_accepts_both_roles() -> None:
    assert parse_hello(hello_message(), LIMITS) == Hello("gen-1", "run-1", "td")
    assert parse_hello(hello_message(role="non_td"), LIMITS) == Hello("gen-1", "run-1", "non_td")
    name = "p" * 200
    assert parse_hello(hello_message(producer=name, run=name), LIMITS).producer == name


def test_a_hello_says_it_wants_commits_and_what_it_sent_before() -> None:
    """A forwarder keeps frames until they are in the database (confirm), and says the
    highest seq it ever sent to this server, so that a server that lost its log knows
    which frames may be stored already."""
    (body,) = FrameDecoder().feed(protocol.hello("g", "r", "td", confirm=True,
                                                 sent_before=41))
    hello = parse_hello(unpack(body), LIMITS)
    assert (hello.confirm, hello.sent_before) == (True, 41)
    (body,) = FrameDecoder().feed(protocol.hello("g", "r", "td"))
    assert "confirm" not in unpack(body)
    assert "sent_before" not in unpack(body)
    hello = parse_hello(unpack(body), LIMITS)
    assert (hello.confirm, hello.sent_before) == (False, 0)


def test_a_data_frame_names_its_stream_and_a_moved_frame_its_origin() -> None:
    (body,) = FrameDecoder().feed(protocol.data(3, [["m"]], "10.0.0.1:7410", 17))
    assert parse_data(unpack(body), LIMITS) == Data(3, [["m"]], "10.0.0.1:7410", 17)
    (body,) = FrameDecoder().feed(protocol.data(3, [["m"]]))
    assert parse_data(unpack(body), LIMITS) == Data(3, [["m"]], "", None)
    # One name per producer and stream; another producer's stream is another one.
    assert protocol.stream_key("p", "a:1") == protocol.stream_key("p", "a:1")
    assert len({protocol.stream_key(p, s) for p in ("p", "q") for s in ("a:1", "a:2")}) == 4
    base = {"type": "data", "seq": 3, "items": [["m"]]}
    for field, value, reason in (("source", 5, "bad_field"), ("source", "s" * 257, "too_long"),
                                 ("source_seq", 0, "bad_field"),
                                 ("source_seq", "1", "bad_field"),
                                 ("source_seq", 2**64, "bad_field")):
        assert refused(functools.partial(parse_data, {**base, field: value}, LIMITS)) == reason
    assert unpack(protocol.committed(9)[4:]) == {"type": "committed", "seq": 9}


def test_parse_hello_from_the_wire() -> None:
    (body,) = FrameDecoder().feed(protocol.hello("gen-7", "run-3", "non_td"))
    assert parse_hello(unpack(body), LIMITS) == Hello("gen-7", "run-3", "non_td")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"type": "data"}, "hello_expected"),
        ({"type": "welcome"}, "hello_expected"),
        ({"version": 2}, "bad_version"),
        ({"version": 0}, "bad_version"),
        ({"version": "1"}, "bad_version"),
        ({"version": _DROP}, "bad_version"),
        ({"role": "both"}, "bad_field"),
        ({"role": "TD"}, "bad_field"),
        ({"role": _DROP}, "bad_field"),
        ({"producer": ""}, "bad_field"),
        ({"producer": 5}, "bad_field"),
        ({"producer": _DROP}, "bad_field"),
        ({"run": ""}, "bad_field"),
        ({"run": None}, "bad_field"),
        ({"producer": "p" * 201}, "too_long"),
        ({"run": "r" * 201}, "too_long"),
        ({"confirm": 1}, "bad_field"),
        ({"confirm": "yes"}, "bad_field"),
        ({"sent_before": -1}, "bad_field"),
        ({"sent_before": "3"}, "bad_field"),
        ({"sent_before": 1.5}, "bad_field"),
        ({"sent_before": 2**64}, "bad_field"),
    ],
)
def test_parse_hello_refusals(changes: dict[str, Any], reason: str) -> None:
    assert refused(lambda: parse_hello(hello_message(**changes), LIMITS)) == reason


def test_parse_hello_respects_configured_name_limit() -> None:
    limits = Limits(max_name_length=5)
    assert parse_hello(hello_message(producer="abcde"), limits).producer == "abcde"
    assert refused(lambda: parse_hello(hello_message(producer="abcdef"), limits)) == "too_long"


def test_parse_data() -> None:
    items = [good_trend_list(), good_counter_list()]
    assert parse_data({"type": "data", "seq": 9, "items": items}, LIMITS) == Data(9, items)
    (body,) = FrameDecoder().feed(protocol.data(4, [good_counter_list()]))
    parsed = parse_data(unpack(body), LIMITS)
    assert parsed.seq == 4
    assert parsed.items == [good_counter_list()]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"type": "ack", "seq": 1, "items": [[1]]}, "unexpected_type"),
        ({"type": "hello", "seq": 1, "items": [[1]]}, "unexpected_type"),
        ({"type": "data", "seq": 0, "items": [[1]]}, "bad_field"),
        ({"type": "data", "seq": -3, "items": [[1]]}, "bad_field"),
        ({"type": "data", "seq": 1.0, "items": [[1]]}, "bad_field"),
        ({"type": "data", "seq": True, "items": [[1]]}, "bad_field"),
        ({"type": "data", "seq": "1", "items": [[1]]}, "bad_field"),
        ({"type": "data", "items": [[1]]}, "bad_field"),
        ({"type": "data", "seq": 1, "items": []}, "bad_field"),
        ({"type": "data", "seq": 1, "items": {"a": 1}}, "bad_field"),
        ({"type": "data", "seq": 1}, "bad_field"),
    ],
)
def test_parse_data_refusals(message: dict[str, Any], reason: str) -> None:
    assert refused(lambda: parse_data(message, LIMITS)) == reason


def test_parse_data_item_limit() -> None:
    limits = Limits(max_items_per_frame=3)
    assert len(parse_data({"type": "data", "seq": 1, "items": [[0]] * 3}, limits).items) == 3
    message = {"type": "data", "seq": 1, "items": [[0]] * 4}
    assert refused(lambda: parse_data(message, limits)) == "too_many_items"


# --- trend items -----------------------------------------------------------------


def test_parse_good_trend_item() -> None:
    parsed = parse_trend_item(good_trend_list(), LIMITS)
    assert parsed.metric == "http_req_duration"
    assert parsed.tags == (("method", "GET"), ("name", "a"))
    assert (parsed.bucket, parsed.bucket_seconds, parsed.samples) == (BUCKET, 10, 4)
    assert (parsed.total, parsed.lo, parsed.hi) == (9.0, 1.0, 4.0)
    assert parsed.centroids.tolist() == [[1.0, 1.0], [2.0, 2.0], [4.0, 1.0]]
    assert parsed.zeros == 0
    assert type(parsed.zeros) is int


def test_parse_trend_item_with_zeros() -> None:
    parsed = parse_trend_item(zero_trend_list(), LIMITS)
    assert (parsed.samples, parsed.zeros) == (6, 2)
    assert (parsed.total, parsed.lo, parsed.hi) == (9.0, 0.0, 4.0)
    assert parsed.centroids.tolist() == [[1.0, 1.0], [2.0, 2.0], [4.0, 1.0]]


def test_trend_item_of_only_zeros_has_an_empty_digest() -> None:
    """Every sample an exact zero: no centroid at all, and that is valid."""
    item = ["http_req_connecting", {}, BUCKET, 10, 250, 0.0, 0.0, 0.0, b"", 250]
    parsed = parse_trend_item(item, LIMITS)
    assert (parsed.samples, parsed.zeros, parsed.total, parsed.lo, parsed.hi) == (
        250, 250, 0.0, 0.0, 0.0)
    assert parsed.centroids.shape == (0, 2)
    assert parsed.centroids.dtype == np.float64


def test_trend_item_zeros_equal_to_count_still_validates_a_digest() -> None:
    """zeros == count allows an empty digest, not a broken or extra one."""
    base = ["m", {}, BUCKET, 10, 3, 0.0, 0.0, 0.0, b"", 3]
    assert refused(lambda: parse_trend_item(with_field(base, 8, b"\x00" * 15),
                                            LIMITS)) == "bad_digest"
    assert refused(lambda: parse_trend_item(with_field(base, 8, blob([(NAN, 1.0)])),
                                            LIMITS)) == "bad_digest"
    assert refused(lambda: parse_trend_item(with_field(base, 8, blob([(1.0, 1.0)])),
                                            LIMITS)) == "bad_digest"
    assert refused(lambda: parse_trend_item(with_field(base, 8, blob([(1.0, 0.0)])),
                                            LIMITS)) == "bad_digest"


def test_trend_item_boundaries_accepted() -> None:
    item = good_trend_list()
    item[0] = "m" * 200
    item[1] = {f"k{i:02d}": "v" * 256 for i in range(32)}
    item[2], item[3] = 0, 1  # the epoch itself, width 1
    parsed = parse_trend_item(item, LIMITS)
    assert len(parsed.tags) == 32
    # Equal means (a point mass split over centroids) are sorted, not refused.
    tie = with_field(good_trend_list(), 8, blob([(2.0, 2.0), (2.0, 2.0)]))
    tie[5], tie[6], tie[7] = 8.0, 2.0, 2.0
    assert parse_trend_item(tie, LIMITS).samples == 4
    # Integers are accepted where floats are expected.
    ints = with_field(with_field(with_field(good_trend_list(), 5, 9), 6, 1), 7, 4)
    parsed = parse_trend_item(ints, LIMITS)
    assert (parsed.total, parsed.lo, parsed.hi) == (9.0, 1.0, 4.0)
    assert all(type(v) is float for v in (parsed.total, parsed.lo, parsed.hi))


NAN, INF = float("nan"), float("inf")

TREND_REFUSALS = [
    # shape
    ("not a list", lambda i: tuple(i), "bad_item"),
    ("map", lambda i: {"metric": i[0]}, "bad_item"),
    ("8 fields", lambda i: i[:8], "bad_item"),
    ("9 fields (no zeros, the old layout)", lambda i: i[:9], "bad_item"),
    ("12 fields", lambda i: [*i, [], 0], "bad_item"),
    ("sum_rest not a list", lambda i: [*i, 0], "bad_field"),
    ("sum_rest growing", lambda i: [*i, [1e-20, 1e-10]], "bad_field"),
    ("sum_rest with a zero", lambda i: [*i, [0.0]], "bad_field"),
    ("sum_rest not finite", lambda i: [*i, [float("nan")]], "not_finite"),
    # bucket
    ("negative bucket", lambda i: with_field(i, 2, -10), "bad_field"),
    ("float bucket", lambda i: with_field(i, 2, float(BUCKET)), "bad_field"),
    ("zero width", lambda i: with_field(i, 3, 0), "bad_field"),
    ("unaligned bucket", lambda i: with_field(i, 2, BUCKET + 5), "unaligned_bucket"),
    ("unaligned to 60", lambda i: with_field(i, 3, 60), "unaligned_bucket"),
    # count
    ("zero count", lambda i: with_field(i, 4, 0), "bad_field"),
    ("bool count", lambda i: with_field(i, 4, True), "bad_field"),
    ("float count", lambda i: with_field(i, 4, 4.0), "bad_field"),
    # digest
    ("digest not binary", lambda i: with_field(i, 8, "abc"), "bad_field"),
    ("digest list", lambda i: with_field(i, 8, [[1.0, 4.0]]), "bad_field"),
    ("digest ragged", lambda i: with_field(i, 8, blob([(1.0, 4.0)]) + b"\x00"), "bad_digest"),
    ("digest empty", lambda i: with_field(i, 8, b""), "bad_digest"),
    ("sketch index no double has",
     lambda i: with_field(i, 8, b"\xd5k\x01\x00" + struct.pack("<IIQ", 0, 1, 0)
                          + struct.pack("<iI", 2**31 - 1, 4)), "bad_digest"),
    ("nan mean", lambda i: with_field(i, 8, blob([(1.0, 1.0), (NAN, 3.0)])), "bad_digest"),
    ("inf mean", lambda i: with_field(i, 8, blob([(1.0, 1.0), (INF, 3.0)])), "bad_digest"),
    ("inf weight", lambda i: with_field(i, 8, blob([(1.0, 1.0), (2.0, INF)])), "bad_digest"),
    ("zero weight", lambda i: with_field(i, 8, blob([(1.0, 4.0), (2.0, 0.0)])), "bad_digest"),
    ("negative weight",
     lambda i: with_field(i, 8, blob([(1.0, 5.0), (2.0, -1.0)])), "bad_digest"),
    ("unsorted",
     lambda i: with_field(i, 8, blob([(1.0, 1.0), (4.0, 2.0), (2.0, 1.0)])), "bad_digest"),
    ("weights short", lambda i: with_field(i, 8, blob([(1.0, 1.0), (2.0, 2.0)])), "bad_digest"),
    ("weights long", lambda i: with_field(i, 8, blob([(1.0, 3.0), (2.0, 2.0)])), "bad_digest"),
    # zeros
    ("zeros > count", lambda i: with_field(i, 9, 5), "bad_field"),
    ("zeros far > count", lambda i: with_field(i, 9, 2**64 - 1), "bad_field"),
    ("negative zeros", lambda i: with_field(i, 9, -1), "bad_field"),
    ("float zeros", lambda i: with_field(i, 9, 0.0), "bad_field"),
    ("bool zeros", lambda i: with_field(i, 9, False), "bad_field"),
    ("none zeros", lambda i: with_field(i, 9, None), "bad_field"),
    ("string zeros", lambda i: with_field(i, 9, "0"), "bad_field"),
    ("weights + zeros > count", lambda i: with_field(i, 9, 1), "bad_digest"),
    ("weights + zeros < count", lambda i: with_field(i, 4, 5), "bad_digest"),
    ("zeros == count with centroids",
     lambda i: with_field(i, 9, 4), "bad_digest"),
    ("empty digest, zeros < count",
     lambda i: with_field(with_field(i, 8, b""), 9, 3), "bad_digest"),
    # numbers
    ("nan sum", lambda i: with_field(i, 5, NAN), "not_finite"),
    ("inf sum", lambda i: with_field(i, 5, -INF), "not_finite"),
    ("nan min", lambda i: with_field(i, 6, NAN), "not_finite"),
    ("inf max", lambda i: with_field(i, 7, INF), "not_finite"),
    ("string min", lambda i: with_field(i, 6, "1"), "not_finite"),
    ("none max", lambda i: with_field(i, 7, None), "not_finite"),
    ("bool sum", lambda i: with_field(i, 5, True), "not_finite"),
    ("min > max", lambda i: with_field(with_field(i, 6, 5.0), 7, 4.0), "bad_field"),
    # names and tags
    ("empty metric", lambda i: with_field(i, 0, ""), "bad_field"),
    ("metric not text", lambda i: with_field(i, 0, 7), "bad_field"),
    ("metric too long", lambda i: with_field(i, 0, "m" * 201), "too_long"),
    ("tags list", lambda i: with_field(i, 1, [["a", "b"]]), "bad_field"),
    ("tags none", lambda i: with_field(i, 1, None), "bad_field"),
    ("too many tags",
     lambda i: with_field(i, 1, {f"k{n}": "v" for n in range(33)}), "too_many_tags"),
    ("NUL in a tag value", lambda i: with_field(i, 1, {"name": "a\x00b"}), "bad_character"),
    ("NUL in a tag key", lambda i: with_field(i, 1, {"na\x00me": "a"}), "bad_character"),
    ("NUL in the metric", lambda i: with_field(i, 0, "http\x00"), "bad_character"),
    ("empty tag key", lambda i: with_field(i, 1, {"": "a"}), "bad_field"),
    ("min beyond 1e20", lambda i: with_field(i, 6, -1.7e308), "huge_value"),
    ("max beyond 1e20", lambda i: with_field(i, 7, 1.7e308), "huge_value"),
    ("sum above count * max", lambda i: with_field(i, 5, 1e300), "bad_field"),
    ("centroid above max", lambda i: with_field(i, 7, 1.5), "bad_digest"),
    ("count above 2**53", lambda i: with_field(i, 4, 2**53 + 1), "bad_field"),
    ("tag value number", lambda i: with_field(i, 1, {"status": 200}), "bad_field"),
    ("tag key number", lambda i: with_field(i, 1, {200: "status"}), "bad_field"),
]


@pytest.mark.parametrize(("mutate", "reason"), [(m, r) for _, m, r in TREND_REFUSALS],
                         ids=[name for name, _, _ in TREND_REFUSALS])
def test_trend_item_refusals(mutate: Callable[[list[Any]], Any], reason: str) -> None:
    item = mutate(good_trend_list())
    assert refused(lambda: parse_trend_item(item, LIMITS)) == reason


ZERO_REFUSALS = [
    ("zeros > count", lambda i: with_field(i, 9, 7), "bad_field"),
    ("weights + zeros > count", lambda i: with_field(i, 9, 3), "bad_digest"),
    ("weights + zeros < count", lambda i: with_field(i, 9, 1), "bad_digest"),
    ("count without the zeros", lambda i: with_field(i, 4, 4), "bad_digest"),
    ("zeros == count with centroids", lambda i: with_field(i, 9, 6), "bad_digest"),
    ("zeros written as a float", lambda i: with_field(i, 9, 2.0), "bad_field"),
]


@pytest.mark.parametrize(("mutate", "reason"), [(m, r) for _, m, r in ZERO_REFUSALS],
                         ids=[name for name, _, _ in ZERO_REFUSALS])
def test_trend_item_with_zeros_refusals(mutate: Callable[[list[Any]], Any], reason: str) -> None:
    item = mutate(zero_trend_list())
    assert refused(lambda: parse_trend_item(item, LIMITS)) == reason


def test_trend_item_weights_plus_zeros_tolerance() -> None:
    """Weights are floats: a sum within 1e-6 relative of count - zeros is accepted."""
    n = 3_000_000
    close = ["m", {}, BUCKET, 10, n, 1.0, 0.0, 1.0, blob([(1.0, n - 1_000_000 + 0.5)]),
             1_000_000]
    assert parse_trend_item(close, LIMITS).zeros == 1_000_000
    far = with_field(close, 8, blob([(1.0, n - 1_000_000 + 10.0)]))
    assert refused(lambda: parse_trend_item(far, LIMITS)) == "bad_digest"


def test_trend_digest_size_limit() -> None:
    limits = Limits(max_centroids=2)
    item = good_trend_list()  # three centroids
    assert refused(lambda: parse_trend_item(item, limits)) == "too_long"
    two = with_field(item, 8, blob([(1.0, 2.0), (4.0, 2.0)]))
    assert parse_trend_item(two, limits).samples == 4


def test_trend_tag_limits_are_configurable() -> None:
    limits = Limits(max_tags=2, max_tag_length=40)
    ok = with_field(good_trend_list(), 1, {"a" * 40: "x" * 40, "b": "c"})
    assert parse_trend_item(ok, limits).tags == (("a" * 40, "x" * 40), ("b", "c"))
    three = with_field(good_trend_list(), 1, {"a": "1", "b": "2", "c": "3"})
    assert refused(lambda: parse_trend_item(three, limits)) == "too_many_tags"


def test_long_tags_are_shortened_stably_not_refused() -> None:
    """A long URL in k6's `name` tag must never cost its frame: both ends shorten it to
    its first (limit - 17) characters, "~" and 16 hex digits of BLAKE2b-64."""
    url = "https://shop.example/" + "p/🛒" * 120  # 381 characters, 4-byte ones among them
    notes: Counter[str] = Counter()
    parsed = parse_trend_item(with_field(good_trend_list(), 1, {"name": url, "k" * 300: "v"}),
                              LIMITS, notes)
    tags = dict(parsed.tags)
    expected_hash = hashlib.blake2b(url.encode("utf-8"), digest_size=8).hexdigest()
    shortened_url = url[:256 - 17] + "~" + expected_hash
    assert len(shortened_url) == 256
    assert shortened_url in tags.values()
    key = "k" * 239 + "~" + hashlib.blake2b(b"k" * 300, digest_size=8).hexdigest()
    assert tags[key] == "v"
    assert notes == {"tags_shortened": 2}
    # The same value always gives the same tag; another value another one.
    again = parse_trend_item(with_field(good_trend_list(), 1, {"name": url}), LIMITS)
    other = parse_trend_item(with_field(good_trend_list(), 1, {"name": url + "x"}), LIMITS)
    assert dict(again.tags)["name"] == shortened_url != dict(other.tags)["name"]
    counter = parse_counter_item(with_field(good_counter_list(), 2, {"name": url}), LIMITS)
    assert dict(counter.tags)["name"] == shortened_url


def test_trend_weight_sum_overflow_is_refused_cleanly() -> None:
    """Finite weights whose sum overflows must be refused, without a RuntimeWarning.

    pytest turns warnings into errors here, so numpy's "overflow encountered in reduce"
    from summing the weights surfaces as an exception that is not a Refused.
    """
    item = with_field(good_trend_list(), 8, blob([(1.0, 1e308), (2.0, 1e308)]))
    assert refused(lambda: parse_trend_item(item, LIMITS)) == "bad_digest"
    # Also with zeros beside the digest and the largest count msgpack can carry.
    item = with_field(with_field(item, 4, 2**53), 9, 2**52)
    assert refused(lambda: parse_trend_item(item, LIMITS)) == "bad_digest"


# --- counter items ---------------------------------------------------------------


def test_parse_good_counter_items() -> None:
    parsed = parse_counter_item(good_counter_list(), LIMITS)
    assert parsed == CounterPartial("http_reqs", "counter", (("name", "a"),), BUCKET, 10, 12.0,
                                    12, 12, 1.0, 1.0, 1_700_000_003_500_000_000, 1.0)
    for kind in ("counter", "gauge", "rate"):
        assert parse_counter_item(with_field(good_counter_list(), 1, kind), LIMITS).kind == kind
    zero = ["checks", "rate", {}, BUCKET, 10, 0, 3, 0, 0, 0, 0, 0]
    parsed = parse_counter_item(zero, LIMITS)
    assert (parsed.total, parsed.samples, parsed.nonzero, parsed.last_ns) == (0.0, 3, 0, 0)
    assert parsed.tags == ()


COUNTER_REFUSALS = [
    ("not a list", lambda i: tuple(i), "bad_item"),
    ("11 fields", lambda i: i[:11], "bad_item"),
    ("14 fields", lambda i: [*i, [], 0], "bad_item"),
    ("sum_rest not a list", lambda i: [*i, "x"], "bad_field"),
    ("kind trend", lambda i: with_field(i, 1, "trend"), "bad_kind"),
    ("kind unknown", lambda i: with_field(i, 1, "histogram"), "bad_kind"),
    ("kind none", lambda i: with_field(i, 1, None), "bad_kind"),
    ("kind upper", lambda i: with_field(i, 1, "Counter"), "bad_kind"),
    ("unaligned bucket", lambda i: with_field(i, 3, BUCKET + 1), "unaligned_bucket"),
    ("zero width", lambda i: with_field(i, 4, 0), "bad_field"),
    ("negative bucket", lambda i: with_field(i, 3, -10), "bad_field"),
    ("zero count", lambda i: with_field(i, 6, 0), "bad_field"),
    ("negative nonzero", lambda i: with_field(i, 7, -1), "bad_field"),
    ("nonzero > count", lambda i: with_field(i, 7, 13), "bad_field"),
    ("min > max", lambda i: with_field(with_field(i, 8, 2.0), 9, 1.0), "bad_field"),
    ("nan sum", lambda i: with_field(i, 5, NAN), "not_finite"),
    ("inf sum", lambda i: with_field(i, 5, INF), "not_finite"),
    ("nan min", lambda i: with_field(i, 8, NAN), "not_finite"),
    ("inf max", lambda i: with_field(i, 9, INF), "not_finite"),
    ("nan last", lambda i: with_field(i, 11, NAN), "not_finite"),
    ("string last", lambda i: with_field(i, 11, "1"), "not_finite"),
    ("negative last_ns", lambda i: with_field(i, 10, -1), "bad_field"),
    ("float last_ns", lambda i: with_field(i, 10, 1.5), "bad_field"),
    ("empty metric", lambda i: with_field(i, 0, ""), "bad_field"),
    ("metric too long", lambda i: with_field(i, 0, "m" * 201), "too_long"),
    ("too many tags",
     lambda i: with_field(i, 2, {f"k{n}": "v" for n in range(33)}), "too_many_tags"),
    ("NUL in a tag", lambda i: with_field(i, 2, {"name": "x\x00"}), "bad_character"),
    ("last value beyond 1e20", lambda i: with_field(with_field(with_field(
        with_field(i, 1, "gauge"), 8, -1e21), 9, 1e21), 11, 1e21), "huge_value"),
    ("sum of 1.7e308", lambda i: with_field(i, 5, 1.7e308), "bad_field"),
    ("tags not map", lambda i: with_field(i, 2, "name=a"), "bad_field"),
]


@pytest.mark.parametrize(("mutate", "reason"), [(m, r) for _, m, r in COUNTER_REFUSALS],
                         ids=[name for name, _, _ in COUNTER_REFUSALS])
def test_counter_item_refusals(mutate: Callable[[list[Any]], Any], reason: str) -> None:
    item = mutate(good_counter_list())
    assert refused(lambda: parse_counter_item(item, LIMITS)) == reason


# --- round trips -----------------------------------------------------------------


def through_the_wire(items: list[list[Any]], chunk: int) -> list[Any]:
    stream = protocol.data(17, items)
    decoder = FrameDecoder()
    bodies: list[bytes] = []
    for i in range(0, len(stream), chunk):
        bodies += decoder.feed(stream[i : i + chunk])
    (body,) = bodies
    parsed = parse_data(unpack(body), LIMITS)
    assert parsed.seq == 17
    return parsed.items


def test_trend_round_trip() -> None:
    rng = np.random.default_rng(7)
    values = rng.lognormal(0.0, 1.0, 5000)
    centroids = digest.from_values(values)
    original = TrendPartial("http_req_duration", (("status", "200"), ("name", "home")), BUCKET,
                            10, len(values), math.fsum(values), float(values.min()),
                            float(values.max()), centroids)
    (item,) = through_the_wire([protocol.trend_item(original)], chunk=1000)
    parsed = parse_trend_item(item, LIMITS)
    assert parsed.metric == original.metric
    assert parsed.tags == (("name", "home"), ("status", "200"))
    assert (parsed.bucket, parsed.bucket_seconds, parsed.samples) == (BUCKET, 10, 5000)
    assert (parsed.total, parsed.lo, parsed.hi) == (original.total, original.lo, original.hi)
    assert parsed.centroids.shape == centroids.shape
    assert np.array_equal(parsed.centroids, centroids)
    assert parsed.zeros == 0


def test_trend_item_layout() -> None:
    centroids = digest.from_values([1.5, 1.5, 3.0])
    partial = TrendPartial("m", (("a", "1"), ("b", "2")), BUCKET, 10, 5, 6.0, 0.0, 3.0,
                           centroids, 2)
    assert protocol.trend_item(partial) == ["m", {"a": "1", "b": "2"}, BUCKET, 10, 5, 6.0, 0.0,
                                            3.0, digest.encode(centroids), 2]
    # A partial built without zeros sends 0 as the tenth field.
    without = TrendPartial("m", (), BUCKET, 10, 3, 6.0, 1.5, 3.0, centroids)
    assert without.zeros == 0
    assert protocol.trend_item(without)[9] == 0
    assert len(protocol.trend_item(without)) == 10


@pytest.mark.parametrize("share", [0.0, 0.3, 0.9, 1.0])
def test_trend_round_trip_with_zeros(share: float) -> None:
    rng = np.random.default_rng([8, round(share * 10)])
    values = rng.lognormal(np.log(0.004), 1.0, 5000)
    values[rng.random(5000) < share] = 0.0
    centroids, zeros = digest.split_zeros(values)
    assert zeros == np.count_nonzero(values == 0.0)
    original = TrendPartial("http_req_connecting", (("name", "home"),), BUCKET, 10,
                            len(values), math.fsum(values), float(values.min()),
                            float(values.max()), centroids, zeros)
    (item,) = through_the_wire([protocol.trend_item(original)], chunk=777)
    parsed = parse_trend_item(item, LIMITS)
    assert parsed[:8] == original[:8]
    assert parsed.zeros == zeros
    assert type(parsed.zeros) is int
    assert np.array_equal(parsed.centroids, centroids)
    if share == 1.0:
        assert parsed.centroids.shape == (0, 2)


def test_counter_round_trip() -> None:
    originals = [
        CounterPartial("http_reqs", "counter", (("method", "GET"), ("name", "a")), BUCKET, 10,
                       1234.0, 1234, 1234, 1.0, 1.0, 0, 0.0),
        CounterPartial("vus", "gauge", (), BUCKET, 10, 55.5, 10, 9, 0.0, 12.25,
                       1_700_000_009_999_999_999, 7.0),
        CounterPartial("checks", "rate", (("check", "status is 200"),), 1_700_000_040, 60,
                       3.0, 4, 3, 0.0, 1.0, 5, 1.0),
    ]
    items = through_the_wire([protocol.counter_item(p) for p in originals], chunk=3)
    assert [parse_counter_item(i, LIMITS) for i in items] == originals


# --- fuzzing ---------------------------------------------------------------------

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FUZZ_LIMITS = Limits(max_frame_bytes=4096, max_items_per_frame=20, max_centroids=64)


def consume(chunks: list[bytes], limits: Limits = FUZZ_LIMITS) -> None:
    """Run everything a server does with received bytes; only protocol errors may escape.

    A FramingError ends the connection; a Refused drops the frame or item.
    """
    decoder = FrameDecoder(limits.max_frame_bytes)
    for chunk in chunks:
        try:
            bodies = decoder.feed(chunk)
        except FramingError:
            return
        for body in bodies:
            try:
                message = unpack(body)
            except Refused:
                continue
            try:
                parse_hello(message, limits)
            except Refused:
                pass
            try:
                data = parse_data(message, limits)
            except Refused:
                continue
            for item in data.items:
                for parse in (parse_trend_item, parse_counter_item):
                    try:
                        parse(item, limits)
                    except Refused:
                        pass


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = []
    start = 0
    for point in points:
        pieces.append(stream[start:point])
        start = point
    pieces.append(stream[start:])
    return pieces


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_fuzz_arbitrary_bytes(stream: bytes, cuts: list[int]) -> None:
    consume(split(stream, cuts))


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=200), max_size=6), st.binary(max_size=10),
       st.lists(st.integers(0, 1300), max_size=8))
def test_fuzz_well_framed_garbage(bodies: list[bytes], tail: bytes, cuts: list[int]) -> None:
    stream = b"".join(struct.pack(">I", len(b)) + b for b in bodies) + tail
    consume(split(stream, cuts))


# Bounded floats keep numpy arithmetic on digests from overflowing; the overflow case is
# covered by test_trend_weight_sum_overflow_is_refused_cleanly and test_digest.py.
_floats = st.floats(min_value=-1e300, max_value=1e300) | st.sampled_from([NAN, INF, -INF, 0.0])
_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | _floats
         | st.text(max_size=12) | st.binary(max_size=40).filter(lambda b: len(b) % 16 != 0))
_value = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=12,
)
_digest_blob = st.lists(st.tuples(_floats, _floats), max_size=5).map(blob)


@st.composite
def _near_valid_item(draw: st.DrawFn) -> Any:
    item = list(draw(st.sampled_from([good_trend_list(), zero_trend_list(),
                                      good_counter_list()])))
    for _ in range(draw(st.integers(0, 2))):
        index = draw(st.integers(0, len(item) - 1))
        item[index] = draw(_value | _digest_blob | _floats | st.integers(-5, BUCKET + 100))
    return item


_item = st.one_of(_near_valid_item(), st.lists(_value, min_size=10, max_size=10),
                  st.lists(_value, min_size=12, max_size=12), _value)
_data_message = st.fixed_dictionaries(
    {"type": st.just("data"), "seq": st.integers(1, 5),
     "items": st.lists(_item, min_size=1, max_size=6)})
_hello_message = st.fixed_dictionaries(
    {"type": st.just("hello"), "version": st.just(1), "producer": st.text(max_size=8),
     "run": st.text(max_size=8), "role": st.sampled_from(["td", "non_td", "x"])})
_any_message = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "data", "ack", "welcome", ""]) | st.text(max_size=5)},
    optional={
        "version": st.sampled_from([1, 2]) | _value,
        "producer": st.text(max_size=8) | _value,
        "run": st.text(max_size=8) | _value,
        "role": st.sampled_from(["td", "non_td"]) | _value,
        "seq": st.integers(-2, 10) | _value,
        "items": st.lists(_item, max_size=5) | _value,
    },
)
_message = st.one_of(_data_message, _hello_message, _any_message)


@FUZZ
@given(st.lists(_message, max_size=4), st.lists(st.integers(0, 3000), max_size=8))
def test_fuzz_structured_messages(messages: list[dict[str, Any]], cuts: list[int]) -> None:
    stream = b"".join(raw_frame(m) for m in messages)
    consume(split(stream, cuts), Limits(max_frame_bytes=1 << 20, max_items_per_frame=20,
                                        max_centroids=64))


# Any text a database can store: everything but NUL (refused; see the refusal tests).
_storable = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
_tag_text = st.text(_storable, min_size=1, max_size=10)
_tags = st.dictionaries(_tag_text, st.text(_storable, max_size=10), max_size=4).map(
    lambda d: tuple(sorted(d.items())))
_bucket = st.sampled_from([1, 10, 60]).flatmap(
    lambda w: st.tuples(st.integers(0, 3_000_000_000 // w).map(lambda n: n * w), st.just(w)))
_finite = st.floats(min_value=-1e12, max_value=1e12)


@st.composite
def _trend_partial(draw: st.DrawFn) -> TrendPartial:
    values = np.array(draw(st.lists(_finite | st.just(0.0), min_size=1, max_size=60)))
    bucket, width = draw(_bucket)
    centroids, zeros = digest.split_zeros(values)
    return TrendPartial(draw(_tag_text), draw(_tags), bucket, width, len(values),
                        math.fsum(values), float(values.min()), float(values.max()),
                        centroids, zeros)


@st.composite
def _counter_partial(draw: st.DrawFn) -> CounterPartial:
    count = draw(st.integers(1, 10**9))
    lo = draw(_finite)
    hi = draw(st.floats(min_value=lo, max_value=1e12))
    bucket, width = draw(_bucket)
    # A sum of `count` values in [lo, hi], and a last value among them.
    total = draw(st.floats(min_value=count * lo, max_value=count * hi))
    return CounterPartial(draw(_tag_text), draw(st.sampled_from(protocol.NON_TD_KINDS)),
                          draw(_tags), bucket, width, total, count,
                          draw(st.integers(0, count)), lo, hi,
                          draw(st.integers(0, 2**63 - 1)),
                          draw(st.floats(min_value=lo, max_value=hi)))


@FUZZ
@given(st.lists(st.one_of(_trend_partial(), _counter_partial()), min_size=1, max_size=6),
       st.integers(1, 4), st.lists(st.integers(0, 20_000), max_size=10))
def test_valid_frames_survive_any_chunking(partials: list[Any], per_frame: int,
                                           cuts: list[int]) -> None:
    groups = [partials[i : i + per_frame] for i in range(0, len(partials), per_frame)]
    stream = protocol.hello("gen", "run", "td")
    for seq, group in enumerate(groups, start=1):
        stream += protocol.data(seq, [
            protocol.trend_item(p) if isinstance(p, TrendPartial) else protocol.counter_item(p)
            for p in group])
    decoder = FrameDecoder()
    bodies: list[bytes] = []
    for piece in split(stream, cuts):
        bodies += decoder.feed(piece)
    assert decoder.pending_bytes == 0
    assert len(bodies) == 1 + len(groups)
    assert parse_hello(unpack(bodies[0]), LIMITS) == Hello("gen", "run", "td")
    received: list[Any] = []
    for seq, body in enumerate(bodies[1:], start=1):
        data = parse_data(unpack(body), LIMITS)
        assert data.seq == seq
        for item in data.items:
            if len(item) == 10:
                received.append(parse_trend_item(item, LIMITS))
            else:
                received.append(parse_counter_item(item, LIMITS))
    assert len(received) == len(partials)
    for got, sent in zip(received, partials, strict=True):
        assert type(got) is type(sent)
        if isinstance(sent, TrendPartial):
            assert got[:8] == sent[:8]
            assert got.zeros == sent.zeros
            assert np.array_equal(got.centroids, sent.centroids)
        else:
            assert got == sent

"""Unit tests of the write-ahead log (common/wal.py) on a temporary directory, no database."""

from __future__ import annotations

import struct
import time
import types
import zlib
from pathlib import Path

import msgpack
import pytest

from common import wal as wal_module
from common.wal import Record, WriteAheadLog, segment_of

_HEADER = struct.Struct(">II")


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("wal-*.log"))


def segment_numbers(directory: Path) -> list[int]:
    return [int(p.stem[4:]) for p in segment_files(directory)]


def body(i: int) -> bytes:
    return msgpack.packb({"type": "data", "seq": i, "items": [[f"m{i}", i * 1.5]]})


def fill(log: WriteAheadLog, count: int, producer: str = "p", run_id: str = "r",
         first_seq: int = 1) -> list[tuple[int, tuple[str, str, int, bytes]]]:
    """Append ``count`` records and commit; return (position, content) of each."""
    out = []
    for seq in range(first_seq, first_seq + count):
        content = (producer, run_id, seq, body(seq))
        out.append((log.append(*content), content))
    log.commit()
    return out


def content(records: list[Record]) -> list[tuple[str, str, int, bytes]]:
    return [(r.producer, r.run_id, r.seq, r.body) for r in records]


def reopen(directory: Path, **kwargs: object) -> tuple[WriteAheadLog, list[Record]]:
    log = WriteAheadLog(directory, **kwargs)  # type: ignore[arg-type]
    return log, log.open()


# --- append, commit, reopen -------------------------------------------------------------


def test_reopen_returns_records_in_order_with_their_positions(tmp_path: Path) -> None:
    log, records = reopen(tmp_path)
    assert records == []
    written = fill(log, 20, producer="a") + fill(log, 5, producer="b", run_id="r2")
    empty = ("c", "r3", 1, b"")  # an empty body is a record too
    written.append((log.append(*empty), empty))
    log.close()

    log2, records = reopen(tmp_path)
    try:
        assert content(records) == [c for _, c in written]
        positions = [r.position for r in records]
        # The positions append() returned are the ones replay reports, strictly growing.
        assert positions == [p for p, _ in written]
        assert all(a < b for a, b in zip(positions, positions[1:], strict=False))
        assert {segment_of(p) for p in positions} == {1}
    finally:
        log2.close()


def test_positions_grow_across_reopens_and_crashes(tmp_path: Path) -> None:
    seen: list[int] = []
    for round_ in range(4):
        log, records = reopen(tmp_path)
        # Every earlier record is replayed, in order, with its original position.
        assert [r.position for r in records] == seen
        for position, _ in fill(log, 3, producer=f"p{round_}"):
            assert not seen or position > seen[-1]
            seen.append(position)
        if round_ % 2:
            log.close()
        else:  # kill -9: no close, only the committed (flushed) records are on disk
            assert log._file is not None
            log._file.close()
    segments = [segment_of(p) for p in seen]
    assert segments == sorted(segments)
    assert len(set(segments)) == 4  # a fresh segment per open, never an old number


# --- torn tails ---------------------------------------------------------------------------


def _bad_crc_record() -> bytes:
    payload = msgpack.packb(["p", "r", 99, b"lost"], use_bin_type=True)
    return _HEADER.pack(len(payload), zlib.crc32(payload) ^ 1) + payload


def _oversized_record() -> bytes:
    payload = msgpack.packb(["p", "r", 99, b"lost"], use_bin_type=True)
    return _HEADER.pack(len(payload) + 100, zlib.crc32(payload)) + payload


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"\x00", id="one-byte"),
        pytest.param(b"\x00\x00\x00\x20\xde\xad", id="partial-header"),
        pytest.param(b"\x7f" + bytes(range(200)), id="garbage"),
        pytest.param(_bad_crc_record(), id="wrong-crc"),
        pytest.param(_oversized_record(), id="length-beyond-end"),
        # A crash can leave the file longer than what reached it, filled with zeros.
        pytest.param(bytes(64), id="zero-filled"),
    ],
)
def test_garbage_tail_is_cut_off_on_open(tmp_path: Path, tail: bytes) -> None:
    log, _ = reopen(tmp_path)
    written = fill(log, 10)
    log.close()
    (path,) = [p for p in segment_files(tmp_path) if p.stat().st_size]
    good_size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(tail)

    log2, records = reopen(tmp_path)
    log2.close()
    assert content(records) == [c for _, c in written]
    assert path.stat().st_size == good_size  # the tail is gone from the file too

    log3, records = reopen(tmp_path)  # and the cut is stable
    log3.close()
    assert content(records) == [c for _, c in written]


def test_truncated_last_record_is_cut_off_at_every_byte(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)
    written = fill(log, 4)
    log.close()
    (path,) = [p for p in segment_files(tmp_path) if p.stat().st_size]
    full = path.read_bytes()
    last_start = written[-1][0] & ((1 << 40) - 1)
    for cut in range(last_start + 1, len(full)):
        path.write_bytes(full[:cut])  # the crash hit inside the last record
        for extra in segment_files(tmp_path):
            if extra != path:
                extra.unlink()
        log2, records = reopen(tmp_path)
        log2.close()
        assert content(records) == [c for _, c in written[:-1]], cut
        assert path.stat().st_size == last_start, cut


def test_torn_tail_of_the_last_segment_keeps_earlier_segments(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)
    first = fill(log, 3, producer="a")
    log.rotate_if_due(0)
    second = fill(log, 3, producer="b")
    log.close()
    assert segment_numbers(tmp_path) == [1, 2]
    last = segment_files(tmp_path)[-1]
    last.write_bytes(last.read_bytes()[:-3])  # the crash hit the last record of segment 2

    log2, records = reopen(tmp_path)
    log2.close()
    assert content(records) == [c for _, c in first + second[:-1]]


# --- rotation -------------------------------------------------------------------------------


def test_rotate_only_when_not_empty_and_large_or_old(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(wal_module, "time",
                        types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    log = WriteAheadLog(tmp_path, segment_bytes=1000)
    log.open()
    start = log.segment
    try:
        # Empty: never.
        log.rotate_if_due(0)
        assert log.segment == start

        # Non-empty but small and younger than the limit (age counts from the segment's
        # start): no.
        log.append("p", "r", 1, b"x" * 10)
        clock[0] += 59.9
        log.rotate_if_due(60)
        assert log.segment == start

        # Old enough: yes, and the appended record was committed before the switch.
        clock[0] += 0.1
        log.rotate_if_due(60)
        assert log.segment == start + 1
        assert segment_numbers(tmp_path) == [start, start + 1]
        reader, records = reopen(tmp_path)
        reader.close()
        assert content(records) == [("p", "r", 1, b"x" * 10)]

        # New segment: empty again, so no rotation even when old.
        clock[0] += 10_000
        log.rotate_if_due(60)
        assert log.segment == start + 1

        # Large (>= segment_bytes) but young: yes.
        log.append("p", "r", 2, b"y" * 990)
        log.rotate_if_due(3600)
        assert log.segment == start + 2
        log.append("p", "r", 3, b"z" * 100)
        log.rotate_if_due(3600)
        assert log.segment == start + 2
    finally:
        log.close()


# --- release, dedup table and segment numbering ---------------------------------------------


def _three_segments(directory: Path) -> WriteAheadLog:
    log = WriteAheadLog(directory)
    log.open()  # segment 1
    fill(log, 5, producer="old")  # seq 1..5, segment 1 only
    log.rotate_if_due(0)
    fill(log, 2, producer="mid")  # segment 2
    log.rotate_if_due(0)
    fill(log, 1, producer="new")  # segment 3, current
    return log


def test_release_removes_only_older_segments_never_the_current(tmp_path: Path) -> None:
    log = _three_segments(tmp_path)
    try:
        assert log.segment == 3
        sizes = {n: (tmp_path / f"wal-{n:010d}.log").stat().st_size for n in (1, 2, 3)}
        assert log.release_before(1) == 0
        assert segment_numbers(tmp_path) == [1, 2, 3]
        assert log.release_before(2) == sizes[1]
        assert segment_numbers(tmp_path) == [2, 3]
        # Asking for more than exists still keeps the segment being appended to.
        assert log.release_before(10**6) == sizes[2]
        assert segment_numbers(tmp_path) == [3]
        assert log.release_before(10**6) == 0
        assert segment_numbers(tmp_path) == [3]
        assert log.size_bytes() == sizes[3]
        fill(log, 1, producer="new", first_seq=2)  # the current one still takes appends
    finally:
        log.close()
    log2, records = reopen(tmp_path)
    log2.close()
    assert content(records) == [("new", "r", 1, body(1)), ("new", "r", 2, body(2))]


def test_last_seq_survives_release_and_reopen(tmp_path: Path) -> None:
    log = _three_segments(tmp_path)
    assert (log.last_seq("old"), log.last_seq("mid"), log.last_seq("new")) == (5, 2, 1)
    assert log.last_seq("unknown") == 0
    log.release_before(3)
    log.close()
    log2, records = reopen(tmp_path)
    try:
        assert [r.producer for r in records] == ["new"]
        # "old" and "mid" have no record left in any segment: their seqs come from
        # producers.msgpack, so a resent frame is still recognised as a duplicate.
        assert (log2.last_seq("old"), log2.last_seq("mid"), log2.last_seq("new")) == (5, 2, 1)
        assert log2.last_seq("unknown") == 0
        fill(log2, 1, producer="old", first_seq=6)
        assert log2.last_seq("old") == 6
    finally:
        log2.close()
    log3, _ = reopen(tmp_path)  # crash-free restart again: 6 comes from the segment
    log3.close()
    assert log3.last_seq("old") == 6


def test_segment_numbers_are_never_reused_after_release(tmp_path: Path) -> None:
    log = _three_segments(tmp_path)
    highest = log.append("p", "r", 1, b"last")
    log.rotate_if_due(0)
    log.release_before(log.segment)  # every segment that held a record is gone
    log.close()
    assert segment_numbers(tmp_path) == [4]
    assert (tmp_path / "wal-0000000004.log").stat().st_size == 0

    log2, records = reopen(tmp_path)
    log2.close()
    assert records == []
    assert log2.segment == 5
    assert segment_numbers(tmp_path) == [4, 5]

    # No segment file left at all: producers.msgpack still remembers the numbering, so
    # new positions stay above those of released segments (database rows hold them).
    for path in segment_files(tmp_path):
        assert path.stat().st_size == 0
        path.unlink()
    log3, records = reopen(tmp_path)
    try:
        assert records == []
        again = log3.append("p", "r", 2, b"again")
        assert segment_of(again) > segment_of(highest)
        assert again > highest
        assert log3.last_seq("p") == 2
    finally:
        log3.close()
    log4, _ = reopen(tmp_path)
    log4.close()
    assert log4.last_seq("p") == 2
    assert log4.last_seq("old") == 5


# --- ensure_after -------------------------------------------------------------------------------


def test_ensure_after_moves_above_the_positions_segment(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)
    try:
        assert log.segment == 1
        log.ensure_after((7 << 40) | 12345)  # rows in the database reach segment 7
        assert log.segment == 8
        position = log.append("p", "r", 1, b"x")
        assert segment_of(position) == 8
        assert position > (7 << 40) | 12345
        log.ensure_after((3 << 40) | 5)  # below the current segment: nothing to do
        assert log.segment == 8
        log.ensure_after(position)  # a position in the current segment itself
        assert log.segment == 9
        log.ensure_after(0)
        assert log.segment == 9
    finally:
        log.close()
    log2, records = reopen(tmp_path)
    log2.close()
    assert [segment_of(r.position) for r in records] == [8]
    assert log2.segment == 10


# --- fsync policies ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["sometimes", "", "ALWAYS", "on", "fsync", None])
def test_unknown_fsync_policy_is_refused(tmp_path: Path, policy: object) -> None:
    with pytest.raises(ValueError, match="fsync policy"):
        WriteAheadLog(tmp_path, fsync=policy)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("policy", "syncs"), [("always", True), ("off", False)])
def test_fsync_policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str,
                        syncs: bool) -> None:
    calls: list[int] = []
    real = wal_module.os.fdatasync

    def spy(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(wal_module.os, "fdatasync", spy)
    log = WriteAheadLog(tmp_path, fsync=policy)
    assert log.fsync == policy
    log.open()
    fill(log, 3)
    log.commit()  # nothing new: no second sync
    log.close()
    assert len(calls) == (1 if syncs else 0)


@pytest.mark.parametrize("policy", ["always", "off"])
def test_committed_records_are_visible_without_close(tmp_path: Path, policy: str) -> None:
    """kill -9 of the server: the writer is never closed, a new process reads the files."""
    writer = WriteAheadLog(tmp_path, fsync=policy)
    writer.open()
    try:
        # Small records stay in the writer's userspace buffer until commit() hands them
        # to the OS; a second reader sees exactly the committed ones.
        written = fill(writer, 5)
        reader, records = reopen(tmp_path, fsync=policy)
        reader.close()
        assert content(records) == [c for _, c in written]
        more = fill(writer, 2, first_seq=6)
        reader, records = reopen(tmp_path, fsync=policy)
        reader.close()
        assert content(records) == [c for _, c in written + more]
        assert reader.last_seq("p") == 7
    finally:
        assert writer._file is not None
        writer._file.close()  # no close(): nothing more is committed

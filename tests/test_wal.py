"""Unit tests of the write-ahead log (common/wal.py) on a temporary directory, no database."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
import types
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

from common import wal as wal_module
from common.wal import (
    Record,
    StateDirError,
    TornTail,
    WalCorrupt,
    WalWriteError,
    WriteAheadLog,
    read_log,
    scan_segment,
    segment_of,
)

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


def crash(log: WriteAheadLog) -> None:
    """kill -9: the descriptors close (and the lock goes), nothing more is written."""
    for name in ("_fd", "_lock_fd"):
        descriptor = getattr(log, name)
        if descriptor is not None:
            os.close(descriptor)
            setattr(log, name, None)


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
            crash(log)
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
        assert content(read_log(tmp_path)) == [("p", "r", 1, b"x" * 10)]

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
        assert log3.seen_seq("p") == 2
        assert log3.last_seq("p") == 1  # durable only once committed (close does)
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
def test_fsync_policies(tmp_path: Path, policy: str, syncs: bool) -> None:
    calls: list[int] = []

    def spy(fd: int) -> None:
        calls.append(fd)
        os.fdatasync(fd)

    log = WriteAheadLog(tmp_path, fsync=policy, datasync=spy)
    assert log.fsync == policy
    log.open()
    # A new directory's identity is synced whatever the policy (segments that outlived
    # their identity would be taken for another server's); the policy is about records.
    assert len(calls) == 1
    calls.clear()
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
        # Appended records stay in the writer's memory until commit() hands them to the
        # OS; a second reader sees exactly the committed ones.
        written = fill(writer, 5)
        writer.append("p", "r", 6, body(6))
        assert content(read_log(tmp_path)) == [c for _, c in written]
        writer.commit()
        more = fill(writer, 1, first_seq=7)
        assert [r.seq for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]
        assert more[0][1] == read_log(tmp_path)[-1][1:5]
    finally:
        crash(writer)  # no close(): nothing more is committed
    reader, records = reopen(tmp_path, fsync=policy)
    reader.close()
    assert reader.last_seq("p") == 7


# --- write failures (disk full, EIO) -------------------------------------------------------


class SmallDisk:
    """os.write on a disk with ``free`` bytes left: a short write, then ENOSPC."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, fd: int, data: memoryview) -> int:
        if self.free <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.write(fd, data[:self.free])
        self.free -= written
        return written


class FlakySync:
    """os.fdatasync that fails (EIO) while ``failing`` is set."""

    def __init__(self) -> None:
        self.failing = False

    def __call__(self, fd: int) -> None:
        if self.failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fdatasync(fd)


def current_segment(log: WriteAheadLog) -> Path:
    return log.directory / f"wal-{log.segment:010d}.log"


def test_append_only_buffers_and_flush_writes(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)
    try:
        path = current_segment(log)
        log.append("p", "r", 1, b"x" * 100_000)  # larger than any userspace buffer
        assert path.stat().st_size == 0
        assert log.flush()
        assert path.stat().st_size > 100_000
        assert not log.flush()
    finally:
        log.close()


def test_short_writes_are_completed(tmp_path: Path) -> None:
    def dribble(fd: int, data: memoryview) -> int:
        return os.write(fd, data[:7])

    log = WriteAheadLog(tmp_path, write=dribble)
    log.open()
    written = fill(log, 5)
    log.close()
    assert content(read_log(tmp_path)) == [c for _, c in written]


@pytest.mark.parametrize("policy", ["always", "off"])
def test_a_failed_write_cuts_back_and_the_log_goes_on(tmp_path: Path, policy: str) -> None:
    disk = SmallDisk(free=10**9)
    log = WriteAheadLog(tmp_path, policy, write=disk)
    log.open()
    path = current_segment(log)
    kept = fill(log, 3)
    good_size = path.stat().st_size
    disk.free = 25  # part of the next record fits, then the disk is full
    position = log.append("p", "r", 4, body(4))
    log.append("p", "r", 5, body(5))
    assert log.seen_seq("p") == 5
    with pytest.raises(WalWriteError) as failure:
        log.commit()
    message = str(failure.value)
    assert str(path) in message
    assert "No space left on device (ENOSPC)" in message
    assert "the 2 records" in message
    assert failure.value.errno == errno.ENOSPC
    assert isinstance(failure.value, OSError)
    # Nothing half-written stays behind, and the lost seqs are forgotten.
    assert path.stat().st_size == good_size
    assert (log.last_seq("p"), log.seen_seq("p")) == (3, 3)
    # Still full: the same again, nothing changes.
    log.append("p", "r", 4, body(4))
    with pytest.raises(WalWriteError):
        log.flush()
    assert path.stat().st_size == good_size
    # Space is back: the resent frames land where the lost ones would have.
    disk.free = 10**9
    again = fill(log, 2, first_seq=4)
    assert again[0][0] == position
    log.close()
    log2, records = reopen(tmp_path)
    log2.close()
    assert content(records) == [c for _, c in kept + again]
    assert log2.torn_tails == []


def test_a_failed_sync_cuts_back_to_the_last_synced_byte(tmp_path: Path) -> None:
    sync = FlakySync()
    log = WriteAheadLog(tmp_path, "always", datasync=sync)
    log.open()
    path = current_segment(log)
    kept = fill(log, 3)
    synced_size = path.stat().st_size
    position = log.append("p", "r", 4, body(4))
    log.flush()  # handed to the OS ...
    assert path.stat().st_size > synced_size
    assert (log.last_seq("p"), log.seen_seq("p")) == (3, 4)  # ... not durable yet
    sync.failing = True
    with pytest.raises(WalWriteError, match="fdatasync failed: Input/output error") as failure:
        log.commit()
    assert failure.value.errno == errno.EIO
    assert path.stat().st_size == synced_size
    assert (log.last_seq("p"), log.seen_seq("p")) == (3, 3)
    sync.failing = False
    again = fill(log, 1, first_seq=4)
    assert again[0][0] == position
    log.close()
    assert content(read_log(tmp_path)) == [c for _, c in kept + again]


@pytest.mark.parametrize("policy", ["always", "off"])
def test_last_seq_reports_durable_records_only(tmp_path: Path, policy: str) -> None:
    """The welcome frame tells a reconnecting forwarder what it may drop; the duplicate
    check also counts what is appended and not failed."""
    log, _ = reopen(tmp_path, fsync=policy)
    try:
        log.append("p", "r", 1, body(1))
        assert (log.last_seq("p"), log.seen_seq("p")) == (0, 1)
        log.flush()
        assert log.last_seq("p") == (1 if policy == "off" else 0)
        log.commit()
        assert (log.last_seq("p"), log.seen_seq("p")) == (1, 1)
        assert (log.last_seq("other"), log.seen_seq("other")) == (0, 0)
    finally:
        log.close()


def test_a_failed_producers_save_keeps_the_old_file_and_every_segment(
        tmp_path: Path) -> None:
    disk = SmallDisk(free=10**9)
    log = WriteAheadLog(tmp_path, write=disk)
    log.open()
    fill(log, 2, producer="a")
    log.rotate_if_due(0)
    log.release_before(log.segment)  # producers.msgpack now exists
    saved = (tmp_path / "producers.msgpack").read_bytes()
    fill(log, 2, producer="b")
    log.rotate_if_due(0)
    segments = segment_numbers(tmp_path)
    disk.free = 10  # the next file does not fit
    with pytest.raises(WalWriteError, match="producers.msgpack: cannot save") as failure:
        log.release_before(log.segment)
    assert "No space left on device" in str(failure.value)
    assert (tmp_path / "producers.msgpack").read_bytes() == saved
    assert not list(tmp_path.glob("*.tmp"))
    assert segment_numbers(tmp_path) == segments
    disk.free = 10**9
    log.release_before(log.segment)
    log.close()
    assert segment_numbers(tmp_path) == segments[-1:]
    log2, _ = reopen(tmp_path)
    log2.close()
    assert (log2.last_seq("a"), log2.last_seq("b")) == (2, 2)


def test_a_failed_rotation_stays_in_the_current_segment(tmp_path: Path) -> None:
    sync = FlakySync()
    log = WriteAheadLog(tmp_path, datasync=sync)
    log.open()
    kept = fill(log, 2)
    segment = log.segment
    log.append("p", "r", 3, body(3))
    sync.failing = True
    with pytest.raises(WalWriteError):
        log.rotate_if_due(0)
    assert log.segment == segment
    assert segment_numbers(tmp_path) == [segment]
    assert log.seen_seq("p") == 2
    sync.failing = False
    more = fill(log, 1, first_seq=3)
    log.rotate_if_due(0)
    assert log.segment == segment + 1
    log.close()
    assert content(read_log(tmp_path)) == [c for _, c in kept + more]


def test_a_failed_close_raises_and_still_releases_the_directory(tmp_path: Path) -> None:
    sync = FlakySync()
    log = WriteAheadLog(tmp_path, datasync=sync)
    log.open()
    kept = fill(log, 2)
    log.append("p", "r", 3, body(3))
    sync.failing = True
    with pytest.raises(WalWriteError):
        log.close()
    log2, records = reopen(tmp_path)  # not locked any more
    log2.close()
    assert content(records) == [c for _, c in kept]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs), to fill up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); the same code paths "
                    "are tested with an injected failing write")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                            capture_output=True, text=True, check=False)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill_disk(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    with open(path, "ab", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\xff" * 4096)


def test_a_full_disk_loses_nothing_acknowledged(small_disk: Path) -> None:
    state = small_disk / "state"
    log = WriteAheadLog(state, "always", role="td")
    log.open()
    ballast = small_disk / "ballast"
    fill_disk(ballast)
    os.truncate(ballast, ballast.stat().st_size - 40_000)

    def log_until_full() -> None:
        for seq in range(1, 1000):
            log.append("p", "r", seq, os.urandom(900))
            log.commit()
            acknowledged.append(seq)

    acknowledged: list[int] = []
    with pytest.raises(WalWriteError, match="No space left on device") as failure:
        log_until_full()
    assert str(state) in str(failure.value)
    assert 10 < len(acknowledged) < 50
    assert (log.last_seq("p"), log.seen_seq("p")) == (acknowledged[-1],) * 2
    segment = current_segment(log)
    assert not scan_segment(segment.read_bytes(), log.segment).damage  # no partial record
    assert [r.seq for r in read_log(state)] == acknowledged

    fill_disk(small_disk / "ballast2")  # whatever the cut freed
    with pytest.raises(WalWriteError, match="producers.msgpack: cannot save"):
        log.save_producers()
    assert sorted(p.name for p in state.iterdir()) == ["lock", "log-id", "role", segment.name]

    ballast.unlink()  # space is back
    seq = acknowledged[-1] + 1
    log.append("p", "r", seq, os.urandom(900))
    log.commit()
    acknowledged.append(seq)
    log.save_producers()
    log.close()
    log2 = WriteAheadLog(state, role="td")
    records = log2.open()
    log2.close()
    assert [r.seq for r in records] == acknowledged
    assert log2.torn_tails == []


# --- damage: torn tails are cut, anything else is refused ----------------------------------


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def offset_of(position: int) -> int:
    return position & ((1 << 40) - 1)


@pytest.mark.parametrize("where", ["header", "payload"])
def test_damage_followed_by_records_is_refused_not_cut(tmp_path: Path, where: str) -> None:
    log, _ = reopen(tmp_path)
    written = fill(log, 10)
    log.close()
    (path,) = [p for p in segment_files(tmp_path) if p.stat().st_size]
    damaged = offset_of(written[3][0])
    flip_byte(path, damaged + (2 if where == "header" else 12))
    before = path.read_bytes()
    for _ in range(2):  # refused again: the lock was released
        with pytest.raises(WalCorrupt) as refused:
            reopen(tmp_path)
        message = str(refused.value)
        assert str(path) in message
        assert f"damaged record at byte {damaged}" in message
        assert "followed by 6 intact records" in message
        assert f"tdagg-wal-repair {tmp_path}" in message
        assert "aside" not in message
    assert path.read_bytes() == before  # nothing was cut


def test_a_lost_page_in_the_middle_is_refused(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)
    fill(log, 200)
    log.close()
    (path,) = [p for p in segment_files(tmp_path) if p.stat().st_size]
    data = bytearray(path.read_bytes())
    data[4096:8192] = bytes(4096)  # a page that never reached the disk
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorrupt, match=r"at byte \d+ \(\d+ bytes\), followed by \d+ intact"):
        reopen(tmp_path)


def test_damage_in_an_earlier_segment_counts_the_later_records(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)
    fill(log, 3, producer="a")
    log.rotate_if_due(0)
    fill(log, 4, producer="b")
    log.close()
    first = segment_files(tmp_path)[0]
    first.write_bytes(first.read_bytes()[:-3])  # its tail is torn, but records follow
    with pytest.raises(WalCorrupt, match="followed by 0 intact records in this segment and "
                                         "4 in later segments"):
        reopen(tmp_path)


def test_a_torn_tail_is_reported(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)
    fill(log, 3)
    log.close()
    (path,) = [p for p in segment_files(tmp_path) if p.stat().st_size]
    good_size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x01\x00torn")
    log2, records = reopen(tmp_path)
    log2.close()
    assert len(records) == 3
    assert log2.torn_tails == [TornTail(path, good_size, 8)]
    assert log2.torn_tail == TornTail(path, good_size, 8)
    assert str(log2.torn_tail) == (f"cut a torn tail off {path} at byte {good_size}: 8 bytes "
                                   "of a write a crash interrupted (never acknowledged)")
    log3, _ = reopen(tmp_path)
    log3.close()
    assert (log3.torn_tails, log3.torn_tail) == ([], None)


def test_a_torn_tail_before_empty_segments_is_cut(tmp_path: Path) -> None:
    """A crash (fsync off, power cut) after the next segment was created, before a
    record reached it: nothing intact follows the damage anywhere."""
    log, _ = reopen(tmp_path)
    written = fill(log, 3)
    log.close()
    (path,) = [p for p in segment_files(tmp_path) if p.stat().st_size]
    path.write_bytes(path.read_bytes()[:-5])
    (tmp_path / "wal-0000000099.log").write_bytes(b"")
    log2, records = reopen(tmp_path)
    log2.close()
    assert content(records) == [c for _, c in written[:-1]]
    assert [t.path for t in log2.torn_tails] == [path]


def test_padding_is_skipped_and_later_positions_stay(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)
    written = fill(log, 5)
    log.close()
    (path,) = [p for p in segment_files(tmp_path) if p.stat().st_size]
    data = bytearray(path.read_bytes())
    start, end = offset_of(written[1][0]), offset_of(written[2][0])
    data[start:end] = wal_module.padding(end - start)
    path.write_bytes(bytes(data))
    log2, records = reopen(tmp_path)
    log2.close()
    kept = [written[0], *written[2:]]
    assert [(r.position, *c) for r, c in zip(records, content(records), strict=True)] == [
        (p, *c) for p, c in kept]


@pytest.mark.parametrize("size", [9, 10, 257, 258, 259, 265, 65538, 65539, 70000])
def test_padding_has_exactly_the_size_asked(size: int) -> None:
    data = wal_module.padding(size)
    assert len(data) == size
    scan = scan_segment(data, 1)
    assert (scan.records, scan.damage) == ([], [])


def test_a_large_damaged_range_is_scanned_quickly(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)
    written = fill(log, 2)
    log.close()
    (path,) = [p for p in segment_files(tmp_path) if p.stat().st_size]
    data = path.read_bytes()
    second = offset_of(written[1][0])
    garbage = random.Random(1).randbytes(4 * 1024 * 1024)
    path.write_bytes(data[:second] + garbage + data[second:])
    started = time.monotonic()
    scan = scan_segment(path.read_bytes(), 1)
    assert time.monotonic() - started < 10
    assert [r.seq for r in scan.records] == [1, 2]
    assert scan.damage == [wal_module.Damage(second, len(garbage))]


# --- the state directory: lock, role, permissions, damaged files ---------------------------

HOLD_LOCK = """
import sys
from pathlib import Path
from common.wal import WriteAheadLog
log = WriteAheadLog(Path(sys.argv[1]), role="td")
log.open()
print("ready", flush=True)
sys.stdin.read()
log.close()
"""


def test_a_directory_in_use_by_another_server_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "ready\n"
        with pytest.raises(StateDirError) as refused:
            reopen(tmp_path, role="td")
        assert str(refused.value) == (
            f"state directory {tmp_path} is in use by another server (pid {holder.pid}); "
            "give each server its own --state-dir")
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    log, _ = reopen(tmp_path, role="td")  # released when the holder closed
    with pytest.raises(StateDirError, match=f"in use by another server .pid {os.getpid()}"):
        reopen(tmp_path, role="td")  # a second log in the same process, too
    log.close()


def test_a_directory_of_the_other_role_is_refused(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path, role="td")
    fill(log, 1)
    log.close()
    assert (tmp_path / "role").read_text() == "td\n"
    with pytest.raises(StateDirError) as refused:
        reopen(tmp_path, role="non_td")
    assert str(refused.value) == (
        f"state directory {tmp_path} belongs to the td server, not the non_td server; give "
        "each server its own --state-dir")
    log2, records = reopen(tmp_path, role="td")
    log2.close()
    assert len(records) == 1


def test_a_directory_of_an_earlier_release_is_adopted(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)  # no role: as an earlier release left it
    fill(log, 2)
    log.close()
    assert not (tmp_path / "role").exists()
    log2, records = reopen(tmp_path, role="non_td")
    log2.close()
    assert len(records) == 2
    assert (tmp_path / "role").read_text() == "non_td\n"


@pytest.mark.parametrize("marker", [b"", b"\xff\xfe", b"td server\n"])
def test_a_damaged_role_marker_is_refused_clearly(tmp_path: Path, marker: bytes) -> None:
    (tmp_path / "role").write_bytes(marker)
    with pytest.raises(StateDirError, match=f"{tmp_path / 'role'}"):
        reopen(tmp_path, role="td")


def _file_modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


def test_the_directory_and_its_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old_umask = os.umask(0)
    try:
        log, _ = reopen(state, role="td")
        fill(log, 2)
        log.rotate_if_due(0)
        log.release_before(log.segment)
        log.close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    modes = _file_modes(state)
    assert set(modes) == {"lock", "log-id", "role", "producers.msgpack", "wal-0000000002.log"}
    assert set(modes.values()) == {0o600}

    # As an earlier release (or another umask) left them: made private on open.
    os.chmod(state, 0o755)
    for path in state.iterdir():
        os.chmod(path, 0o644)
    log2, _ = reopen(state, role="td")
    log2.close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert set(_file_modes(state).values()) == {0o600}


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[:-4], id="truncated"),
        pytest.param(lambda raw: b"", id="empty"),
        pytest.param(lambda raw: b"\xc1garbage", id="garbage"),
        pytest.param(lambda raw: raw + b"\x00", id="extra-bytes"),
        pytest.param(lambda raw: msgpack.packb([1, 2, 3]), id="a-list"),
        pytest.param(lambda raw: msgpack.packb({"producers": {"p": "x"}, "next_segment": 2}),
                     id="bad-entry"),
        pytest.param(lambda raw: msgpack.packb({"producers": {}}), id="no-next-segment"),
    ],
)
def test_a_damaged_producers_file_is_refused_clearly(tmp_path: Path,
                                                     damage: Callable[[bytes], bytes]) -> None:
    log = _three_segments(tmp_path)
    log.release_before(3)
    log.close()
    path = tmp_path / "producers.msgpack"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WalCorrupt) as refused:
        reopen(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{path} is damaged (")
    assert f"tdagg-wal-repair {tmp_path}" in message


@pytest.mark.parametrize("name", ["producers.msgpack", "wal-0000000001.log"])
def test_an_unreadable_file_is_refused_clearly(tmp_path: Path, name: str) -> None:
    (tmp_path / name).mkdir()  # reading it fails, for root too
    with pytest.raises(StateDirError, match=f"{tmp_path / name}: cannot read it: Is a "
                                            "directory"):
        reopen(tmp_path)


# --- producer keys -----------------------------------------------------------------------------


def test_the_first_key_binds_a_producer_for_good(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)
    assert log.bind("p", b"key-1")
    assert log.bind("p", b"key-1")
    assert not log.bind("p", b"key-2")
    assert not log.bind("p", b"")
    fill(log, 2, producer="p")
    fill(log, 1, producer="unkeyed")  # appended unbound: bound without a key
    assert not log.bind("unkeyed", b"key-3")
    assert log.bind("unkeyed", b"")
    log.close()

    # After a restart, the records carry the binding ...
    log2, records = reopen(tmp_path)
    assert {r.producer: r.key_digest for r in records} == {"p": b"key-1", "unkeyed": b""}
    assert not log2.bind("p", b"key-2")
    assert log2.bind("p", b"key-1")
    # ... and after their segments are released, producers.msgpack does.
    log2.rotate_if_due(0)
    log2.release_before(log2.segment)
    log2.close()
    log3, records = reopen(tmp_path)
    log3.close()
    assert records == []
    assert not log3.bind("p", b"key-2")
    assert not log3.bind("unkeyed", b"key-3")
    assert log3.bind("p", b"key-1")


def test_records_and_producers_of_an_earlier_release_are_read(tmp_path: Path) -> None:
    payload = msgpack.packb(["old", "r", 7, b"body"], use_bin_type=True)  # no key digest
    (tmp_path / "wal-0000000002.log").write_bytes(
        _HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
    (tmp_path / "producers.msgpack").write_bytes(msgpack.packb(
        {"producers": {"older": [3, time.time()]}, "next_segment": 2}))
    log, records = reopen(tmp_path)
    try:
        assert records == [Record((2 << 40), "old", "r", 7, b"body", b"")]
        assert (log.last_seq("old"), log.last_seq("older")) == (7, 3)
        assert log.bind("old", b"")
        assert not log.bind("older", b"a key")
    finally:
        log.close()


# --- bounded producer state ---------------------------------------------------------------------


def test_producers_past_the_ttl_are_dropped_on_save(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr(wal_module, "time",
                        types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic))
    log = WriteAheadLog(tmp_path, producer_ttl=3600)
    log.open()
    fill(log, 1, producer="quiet")
    log.bind("bound-only", b"k")
    clock[0] += 1800
    fill(log, 1, producer="busy")
    clock[0] += 1801  # "quiet" and "bound-only" are past the TTL, "busy" is not
    log.rotate_if_due(0)
    log.release_before(log.segment)
    log.close()
    saved = msgpack.unpackb((tmp_path / "producers.msgpack").read_bytes())
    assert set(saved["producers"]) == {"busy"}
    assert set(log.producers) == {"busy"}


def test_the_documented_cost_per_producer(tmp_path: Path) -> None:
    log, _ = reopen(tmp_path)
    count = 2000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            producer = uuid.uuid4().hex
            log.bind(producer, hashlib.blake2b(producer.encode(), digest_size=16).digest())
        memory = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    log.save_producers()
    log.close()
    on_disk = (tmp_path / "producers.msgpack").stat().st_size / count
    # The module docstring says about 70 bytes in the file and 250 bytes of memory.
    assert on_disk <= 75
    assert memory <= 300
    assert "about 70 bytes in the file and 250 bytes of memory" in " ".join(
        (wal_module.__doc__ or "").split())


def test_log_identity_is_made_once_and_kept(tmp_path: Path) -> None:
    """A new directory gets a random 32-hex-digit identity, kept across reopens and
    private like every file; a wiped directory gets another; a damaged one is refused."""
    log, _ = reopen(tmp_path / "a")
    made = log.log_id
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert stat.S_IMODE((tmp_path / "a" / "log-id").stat().st_mode) == 0o600
    crash(log)
    again, _ = reopen(tmp_path / "a")
    assert again.log_id == made
    crash(again)
    other, _ = reopen(tmp_path / "b")
    assert other.log_id != made
    crash(other)
    (tmp_path / "a" / "log-id").write_text("not an identity\n")
    with pytest.raises(StateDirError, match=r"log-id is damaged .*'not an identity'"):
        reopen(tmp_path / "a")

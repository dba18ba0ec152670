"""Group commit (common/group_commit.py) over a real write-ahead log in a temporary
directory. The sync function is a stand-in that blocks until the test lets it finish,
so that what waits for what can be observed; one test uses the real fdatasync."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from common.group_commit import GroupCommit
from common.wal import WalWriteError, WriteAheadLog, read_log
from tests.utils import wait_until


class GatedSync:
    """fdatasync stand-in: records what it synced, finishes when the test opens a gate."""

    def __init__(self) -> None:
        self.started: list[int] = []  # file sizes seen at each sync's start
        self.gates: list[threading.Event] = []
        self.fail_next = False
        self._lock = threading.Lock()

    def __call__(self, descriptor: int) -> None:
        gate = threading.Event()
        with self._lock:
            self.started.append(os.fstat(descriptor).st_size)
            self.gates.append(gate)
        assert gate.wait(10), "the test never opened the gate"
        if self.fail_next:
            self.fail_next = False
            raise OSError(5, "Input/output error")

    def open(self, index: int) -> None:
        self.gates[index].set()


def append(log: WriteAheadLog, seq: int) -> None:
    log.append("p", "r", seq, msgpack.packb({"seq": seq}))


async def committing(log: WriteAheadLog, sync: GatedSync | None = None,
                     ) -> tuple[GatedSync, GroupCommit, asyncio.Task[None]]:
    """A group commit over ``log`` whose first caller (record 1) waits in the first sync."""
    sync = sync or GatedSync()
    group = GroupCommit(log, sync)
    append(log, 1)
    first = asyncio.create_task(group.commit())
    await wait_until(lambda: sync.started)
    return sync, group, first


@pytest.fixture
def log(tmp_path: Path) -> Iterator[WriteAheadLog]:
    wal = WriteAheadLog(tmp_path, "always")
    wal.open()
    yield wal
    wal.close()


def logged_seqs(directory: Path) -> list[int]:
    """Sequence numbers of every record a fresh reader of the directory finds."""
    return [r.seq for r in read_log(directory)]


def written(log: WriteAheadLog) -> int:
    """Bytes of the current segment handed to the OS."""
    return log.written_position - (log.segment << 40)


async def test_commit_waits_for_a_sync_of_its_records(log: WriteAheadLog) -> None:
    sync, group, first = await committing(log)
    # The records were handed to the OS before the sync started, and it saw them.
    assert sync.started == [written(log)]  # the bytes appended so far
    await asyncio.sleep(0.05)
    assert not first.done()  # no acknowledgement before the sync has finished
    sync.open(0)
    await asyncio.wait_for(first, 5)
    assert group.syncs == 1
    group.close()


async def test_the_loop_keeps_running_during_a_sync(log: WriteAheadLog) -> None:
    sync, group, waiting = await committing(log)
    ticks = 0
    for _ in range(20):  # other connections' work goes on
        await asyncio.sleep(0)
        ticks += 1
    assert ticks == 20
    assert not waiting.done()
    sync.open(0)
    await waiting
    group.close()


async def test_callers_during_a_sync_share_the_next_one(log: WriteAheadLog) -> None:
    sync, group, first = await committing(log)
    # Three more connections append and commit while the first sync runs.
    later = []
    for seq in (2, 3, 4):
        append(log, seq)
        later.append(asyncio.create_task(group.commit()))
    await asyncio.sleep(0.05)
    assert len(sync.started) == 1  # nobody starts a second sync while one runs
    sync.open(0)
    await first
    # The first sync started before records 2-4 were flushed: it does not cover them.
    await wait_until(lambda: len(sync.started) == 2)
    assert not any(t.done() for t in later)
    assert sync.started[1] == written(log)  # the second sees all four
    sync.open(1)
    await asyncio.wait_for(asyncio.gather(*later), 5)
    assert group.syncs == 2
    group.close()


async def test_nothing_new_still_waits_for_a_sync_in_flight(log: WriteAheadLog) -> None:
    """A frame acknowledged as a duplicate may have been appended by another connection
    whose sync is still running: the duplicate's ack must wait for it too."""
    sync, group, first = await committing(log)
    duplicate = asyncio.create_task(group.commit())  # appended nothing itself
    await asyncio.sleep(0.05)
    assert not duplicate.done()
    sync.open(0)
    await asyncio.wait_for(asyncio.gather(first, duplicate), 5)
    assert len(sync.started) == 1
    group.close()


async def test_a_failed_sync_cuts_the_log_back_and_fails_every_waiter_beyond(
        log: WriteAheadLog, tmp_path: Path) -> None:
    """After a failed fdatasync the kernel may have dropped any unsynced page: every
    record after the last synced byte is cut off, and every caller waiting for one of
    them, including records other connections flushed while the sync ran, gets the
    error; their sequence numbers are forgotten."""
    sync, group, first = await committing(log)
    sync.open(0)
    await first  # record 1 is durable
    synced = written(log)
    sync.fail_next = True
    append(log, 2)
    failing = asyncio.create_task(group.commit())
    await wait_until(lambda: len(sync.started) == 2)
    append(log, 3)  # another connection, during the sync that is going to fail
    during = asyncio.create_task(group.commit())
    duplicate = asyncio.create_task(group.commit())  # acknowledges a duplicate of 3
    await asyncio.sleep(0.05)
    assert log.seen_seq("p") == 3
    assert log.last_seq("p") == 1
    sync.open(1)
    for waiter in (failing, during, duplicate):
        with pytest.raises(WalWriteError, match="fdatasync failed: Input/output error"):
            await asyncio.wait_for(waiter, 5)
    assert (tmp_path / f"wal-{log.segment:010d}.log").stat().st_size == synced
    assert logged_seqs(tmp_path) == [1]
    assert (log.last_seq("p"), log.seen_seq("p")) == (1, 1)
    assert group.syncs == 1
    # The log goes on at the cut: the resent frames are logged again.
    append(log, 2)
    append(log, 3)
    retry = asyncio.create_task(group.commit())
    await wait_until(lambda: len(sync.started) == 3)
    assert sync.started[2] == written(log) > synced
    sync.open(2)
    await asyncio.wait_for(retry, 5)
    assert logged_seqs(tmp_path) == [1, 2, 3]
    assert log.last_seq("p") == 3
    group.close()


async def test_a_failed_write_fails_only_its_own_caller(tmp_path: Path) -> None:
    fail = [False]

    def write(fd: int, data: memoryview) -> int:
        if fail[0]:
            fail[0] = False
            os.write(fd, data[:3])  # a short write first: the disk filled up meanwhile
            raise OSError(28, "No space left on device")
        return os.write(fd, data)

    wal = WriteAheadLog(tmp_path, "always", write=write)
    wal.open()
    sync, group, first = await committing(wal)  # record 1 waits in the sync
    fail[0] = True
    append(wal, 2)
    with pytest.raises(WalWriteError, match="No space left on device"):
        await group.commit()
    assert wal.seen_seq("p") == 1
    sync.open(0)
    await asyncio.wait_for(first, 5)  # written before the failed write: unharmed
    assert logged_seqs(tmp_path) == [1]
    append(wal, 2)
    second = asyncio.create_task(group.commit())
    await wait_until(lambda: len(sync.started) == 2)
    sync.open(1)
    await asyncio.wait_for(second, 5)
    assert logged_seqs(tmp_path) == [1, 2]
    group.close()
    wal.close()


async def test_a_failed_sync_outside_the_group_fails_the_waiters_it_cut(
        tmp_path: Path) -> None:
    """A rotation syncs inline. When that sync fails, callers waiting in the group
    commit for records it cut off get the error too (the log tells the group)."""
    inline_fails = [False]

    def inline_sync(fd: int) -> None:
        if inline_fails[0]:
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)

    wal = WriteAheadLog(tmp_path, "always", datasync=inline_sync)
    wal.open()
    sync, group, first = await committing(wal)
    sync.open(0)
    time.sleep(0.2)  # noqa: ASYNC251 - the worker finishes; the loop has not seen it yet
    append(wal, 2)
    second = asyncio.create_task(group.commit())
    await asyncio.sleep(0)
    inline_fails[0] = True
    with pytest.raises(WalWriteError, match="fdatasync failed"):
        wal.rotate_if_due(0)  # applies the group's sync of 1 first, then syncs 2: fails
    await asyncio.wait_for(first, 5)
    with pytest.raises(WalWriteError, match="fdatasync failed"):
        await asyncio.wait_for(second, 5)
    assert logged_seqs(tmp_path) == [1]
    assert (wal.last_seq("p"), wal.seen_seq("p")) == (1, 1)
    inline_fails[0] = False
    wal.rotate_if_due(0)  # the failed rotation did not switch; this one does
    assert len(sync.started) == 1
    group.close()
    wal.close()


async def test_last_seq_reports_only_synced_records(log: WriteAheadLog) -> None:
    """The welcome frame tells a reconnecting forwarder what it may drop: only what is
    on disk. Duplicate detection counts what is logged but not yet synced."""
    sync, group, first = await committing(log)
    assert (log.last_seq("p"), log.seen_seq("p")) == (0, 1)
    sync.open(0)
    await asyncio.wait_for(first, 5)
    assert (log.last_seq("p"), log.seen_seq("p")) == (1, 1)
    group.close()


async def test_a_cancelled_waiter_does_not_cancel_the_sync(log: WriteAheadLog) -> None:
    sync, group, cancelled = await committing(log)
    other = asyncio.create_task(group.commit())
    await asyncio.sleep(0)
    cancelled.cancel()  # shutdown cancels one connection
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    sync.open(0)
    await asyncio.wait_for(other, 5)
    assert group.syncs == 1
    group.close()


async def test_fsync_off_never_syncs(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, "off")
    wal.open()
    sync = GatedSync()
    group = GroupCommit(wal, sync)
    append(wal, 1)
    await asyncio.wait_for(group.commit(), 5)
    assert sync.started == []
    # ... but the records reached the OS: a fresh reader sees them.
    assert logged_seqs(tmp_path) == [1]
    group.close()
    wal.close()


async def test_real_fdatasync_across_a_rotation(log: WriteAheadLog, tmp_path: Path) -> None:
    """With the real fdatasync: commits before and after a segment rotation all return,
    and every record reads back from the segments."""
    group = GroupCommit(log)
    seq = 0
    for _ in range(3):
        for _ in range(5):
            seq += 1
            append(log, seq)
        await asyncio.gather(group.commit(), group.commit())
        log.rotate_if_due(0.0)
    group.close()
    log.close()
    assert logged_seqs(tmp_path) == list(range(1, 16))


async def test_a_caller_arriving_as_a_sync_completes(log: WriteAheadLog) -> None:
    """Regression: the sync's completion is queued on the loop, and a new caller runs
    before the completion's callbacks. It must wait for (or start) a sync, not spin on
    the finished one and freeze the loop."""
    sync, group, first = await committing(log)
    sync.open(0)
    time.sleep(0.2)  # noqa: ASYNC251 - blocks the loop on purpose: the worker finishes
    append(log, 2)
    second = asyncio.create_task(group.commit())  # queued after that completion
    await wait_until(lambda: len(sync.started) == 2 or second.done())
    sync.open(1)
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert len(sync.started) == 2
    group.close()

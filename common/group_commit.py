"""Group commit of the write-ahead log: one fdatasync at a time, off the event loop.

Every connection makes its frames durable before acknowledging them. Run on the event
loop, each fdatasync would stall every other connection for the length of a disk flush.
Here the sync runs in one worker thread; a connection waits for the first sync that
*started after* its records were handed to the OS, and callers that arrive while a
sync runs share the next one. So N busy connections cost at most two syncs per round,
and the loop keeps reading, logging and merging meanwhile.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from common.wal import WriteAheadLog


class GroupCommit:
    def __init__(self, wal: WriteAheadLog,
                 sync: Callable[[int], None] = os.fdatasync) -> None:
        self._wal = wal
        self._sync = sync
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-sync")
        self._flushed = 0  # flushes that handed new records to the OS
        self._synced = 0  # every flush up to this one is on disk
        self._running: asyncio.Task[None] | None = None
        self.syncs = 0  # completed syncs, shown in /metrics

    async def commit(self) -> None:
        """Return once everything appended so far is durable (per the log's policy).

        Everything, not just the caller's own records: a frame acknowledged as a
        duplicate may have been appended by another connection a moment ago.
        """
        if self._wal.flush():
            self._flushed += 1
        if self._wal.fsync != "always":
            return
        target = self._flushed
        while self._synced < target:
            if self._running is None:
                self._running = asyncio.ensure_future(self._sync_once())
            # Shielded: a connection cancelled at shutdown must not cancel a sync that
            # other connections wait on.
            await asyncio.shield(self._running)

    async def _sync_once(self) -> None:
        # The state changes inside the task, before it is done: whoever sees the task
        # done also sees what it synced. (Done-callbacks run later than the task's
        # completion is visible, and a caller arriving in between would spin.)
        covers = self._flushed
        try:
            descriptor = self._wal.dup_fd()
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._sync_and_close, descriptor)
            self._synced = max(self._synced, covers)
            self.syncs += 1
        finally:
            self._running = None

    def _sync_and_close(self, descriptor: int) -> None:
        try:
            self._sync(descriptor)
        finally:
            os.close(descriptor)

    def close(self) -> None:
        """Wait for a sync still running; no commit may follow."""
        self._executor.shutdown(wait=True)

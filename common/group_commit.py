"""Group commit of the write-ahead log: one fdatasync at a time, off the event loop.

Every connection makes its frames durable before acknowledging them. Run on the event
loop, each fdatasync would stall every other connection for the length of a disk flush.
Here the sync runs in one worker thread; a connection waits for the first sync that
*started after* its records were handed to the OS, and callers that arrive while a
sync runs share the next one. So N busy connections cost at most two syncs per round,
and the loop keeps reading, logging and merging meanwhile.

A failed sync makes the log cut off everything after its last synced byte; every caller
waiting for a position beyond that cut gets the log's WalWriteError, also when the cut
came from a sync outside the group commit (a rotation), through the log's cut listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from common.wal import WalWriteError, WriteAheadLog


class GroupCommit:
    def __init__(self, wal: WriteAheadLog, sync: Callable[[int], None] | None = None) -> None:
        """``sync``: the fdatasync to run (default: the log's)."""
        self._wal = wal
        self._sync = sync or wal.datasync
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-sync")
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []  # (position, waiter)
        self._running: asyncio.Task[None] | None = None
        self._closed = False
        self.syncs = 0  # completed syncs, shown in /metrics
        wal.cut_listeners.append(self._fail_beyond)

    async def commit(self) -> None:
        """Return once everything appended so far is durable (per the log's policy).

        Everything, not just the caller's own records: a frame acknowledged as a
        duplicate may have been appended by another connection a moment ago. Raises
        WalWriteError when the records were lost instead (they are not in the log).
        Call it right after appending, with no await in between, as the log's write
        buffer is shared: the flush here writes it.
        """
        self._wal.flush()
        if self._wal.fsync != "always":
            return
        target = self._wal.written_position
        if self._wal.durable_position >= target:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append((target, waiter))
        if self._running is None:
            self._running = asyncio.ensure_future(self._sync_while_waited())
        # A cancelled caller cancels only its own waiter, never the sync others await.
        await waiter

    async def _sync_while_waited(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting and not self._closed:
                ticket = self._wal.start_sync()
                if ticket is not None:
                    await loop.run_in_executor(self._executor, ticket.run, self._sync)
                    # A failed sync: the log's cut has failed the waiters beyond it.
                    with contextlib.suppress(WalWriteError):
                        self._wal.finish_sync(ticket)
                        self.syncs += 1
                self._settle()
                if ticket is None and self._waiting:  # cannot happen: see _fail_beyond
                    raise RuntimeError("callers wait for records that are not in the log")
            if self._waiting:
                raise RuntimeError("the write-ahead log's group commit is closed")
        except asyncio.CancelledError:
            for _, waiter in self._waiting:
                waiter.cancel()
            self._waiting = []
            raise
        except Exception as exc:  # the log is broken or closed: nobody may wait forever
            self._fail_beyond(-1, exc)
        finally:
            self._running = None

    def _settle(self) -> None:
        """Answer the callers whose records are now durable."""
        durable = self._wal.durable_position
        for _, waiter in self._take(lambda target: target <= durable):
            waiter.set_result(None)

    def _fail_beyond(self, cut: int, error: BaseException) -> None:
        for _, waiter in self._take(lambda target: target > cut):
            waiter.set_exception(error)

    def _take(self, chosen: Callable[[int], bool]) -> list[tuple[int, asyncio.Future[None]]]:
        """Remove and return the chosen waiters still waiting; forget cancelled ones."""
        taken = [(t, w) for t, w in self._waiting if not w.done() and chosen(t)]
        self._waiting = [(t, w) for t, w in self._waiting if not w.done() and not chosen(t)]
        return taken

    def close(self) -> None:
        """Wait for a sync still running; no commit may follow."""
        self._closed = True
        self._executor.shutdown(wait=True)

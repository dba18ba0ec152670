"""A bounded spool file for data frames that do not fit in memory. No asyncio.

The spool is a first-in first-out queue of frames kept in one file used as a ring of
``capacity`` bytes: frames are appended at the tail, and space is reclaimed when frames
leave at the head (acknowledged, or moved back to memory). A frame may wrap around the
end of the file, so the file never grows beyond ``capacity`` bytes whatever the order of
appends and removals. A frame refused by the server can leave from the middle: it is
marked dead and its space comes back when the head passes it.

The index (sequence number, offset, length) lives in memory; the file holds only the
frame bytes. It is created on the first append, truncated to zero bytes whenever the
spool becomes empty, and removed by ``release()``. It is not meant to survive the
process: a forwarder's producer id is new at every start.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path


class SpoolError(Exception):
    """The spool file cannot be written or read back."""


@dataclass
class _Record:
    seq: int
    offset: int
    length: int
    live: bool = True


class Spool:
    def __init__(self, path: str | os.PathLike[str], capacity: int,
                 remove_empty_dir: bool = False) -> None:
        """``remove_empty_dir``: ``release()`` also removes the file's directory when it is
        empty (a directory of this process only)."""
        if capacity < 1:
            raise ValueError("spool capacity must be at least 1 byte")
        self.path = Path(path)
        self.capacity = capacity
        self.remove_empty_dir = remove_empty_dir
        self._fd: int | None = None
        self._records: deque[_Record] = deque()
        self._by_seq: dict[int, _Record] = {}
        self._head = 0       # file offset of the oldest record
        self.used = 0        # ring bytes from the head to the tail, dead records included
        self.live_bytes = 0  # bytes of the frames still in the spool

    # --- queries ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_seq)

    def __bool__(self) -> bool:
        return bool(self._by_seq)

    def __contains__(self, seq: object) -> bool:
        return seq in self._by_seq

    def fits(self, length: int, limit: int | None = None) -> bool:
        """Whether a frame of ``length`` bytes can be appended with at most ``limit``
        ring bytes in use afterwards (default: the capacity)."""
        bound = self.capacity if limit is None else min(limit, self.capacity)
        return self.used + length <= bound

    def first(self) -> tuple[int, int] | None:
        """(seq, length) of the oldest frame, or None when the spool is empty."""
        for record in self._records:
            if record.live:
                return record.seq, record.length
        return None

    def last_seq(self) -> int | None:
        for record in reversed(self._records):
            if record.live:
                return record.seq
        return None

    def seqs(self) -> list[int]:
        return [r.seq for r in self._records if r.live]

    @property
    def file_size(self) -> int:
        """Current size of the file on disk (0 when it does not exist)."""
        if self._fd is None:
            return 0
        return os.fstat(self._fd).st_size

    # --- changes ---------------------------------------------------------------------

    def append(self, seq: int, frame: bytes) -> None:
        """Add a frame at the tail. Sequence numbers must increase. Raises ValueError when
        the frame does not fit (check ``fits`` first) and SpoolError when the write fails;
        after a failure the spool is unchanged."""
        if self._records and seq <= self._records[-1].seq:
            raise ValueError(f"seq {seq} is not above the spool's last {self._records[-1].seq}")
        if not frame:
            raise ValueError("empty frame")
        if not self.fits(len(frame)):
            raise ValueError(f"a frame of {len(frame)} bytes does not fit: {self.used} of "
                             f"{self.capacity} bytes in use")
        offset = (self._head + self.used) % self.capacity
        try:
            self._write_at(offset, frame)
        except OSError as exc:
            raise SpoolError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        record = _Record(seq, offset, len(frame))
        self._records.append(record)
        self._by_seq[seq] = record
        self.used += len(frame)
        self.live_bytes += len(frame)

    def read(self, seq: int) -> bytes:
        """The bytes of a frame still in the spool (KeyError if it is not)."""
        record = self._by_seq[seq]
        try:
            data = self._read_at(record.offset, record.length)
        except OSError as exc:
            raise SpoolError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        if len(data) != record.length:
            raise SpoolError(f"{self.path} is shorter than expected: frame {seq} is cut off")
        return data

    def pop_first(self) -> tuple[int, bytes]:
        """Read and remove the oldest frame."""
        found = self.first()
        if found is None:
            raise IndexError("the spool is empty")
        seq = found[0]
        data = self.read(seq)
        self.discard(seq)
        return seq, data

    def discard(self, seq: int) -> bool:
        """Remove one frame (acknowledged, refused or moved to memory)."""
        record = self._by_seq.pop(seq, None)
        if record is None:
            return False
        record.live = False
        self.live_bytes -= record.length
        self._trim()
        return True

    def discard_through(self, seq: int) -> int:
        """Remove every frame up to and including ``seq`` (a cumulative ack)."""
        removed = 0
        for record in self._records:
            if record.seq > seq:
                break
            if record.live:
                record.live = False
                del self._by_seq[record.seq]
                self.live_bytes -= record.length
                removed += 1
        if removed:
            self._trim()
        return removed

    def release(self) -> None:
        """Forget every frame, close and remove the file (and its directory, see
        ``remove_empty_dir``). The spool can be used again afterwards."""
        self._records.clear()
        self._by_seq.clear()
        self._head = self.used = self.live_bytes = 0
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self.remove_empty_dir:
            with contextlib.suppress(OSError):  # absent, or another spool's file is in it
                self.path.parent.rmdir()

    # --- internals -------------------------------------------------------------------

    def _trim(self) -> None:
        """Reclaim the space of dead records at the head; empty the file when nothing is
        left."""
        records = self._records
        while records and not records[0].live:
            dead = records.popleft()
            self._head = (dead.offset + dead.length) % self.capacity
            self.used -= dead.length
        if not records:
            self._head = self.used = 0
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        return self._fd

    def _write_at(self, offset: int, data: bytes) -> None:
        fd = self._open()
        first = min(len(data), self.capacity - offset)
        _pwrite_all(fd, memoryview(data)[:first], offset)
        if first < len(data):
            _pwrite_all(fd, memoryview(data)[first:], 0)

    def _read_at(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            raise SpoolError(f"{self.path} is not open")
        first = min(length, self.capacity - offset)
        data = _pread_all(self._fd, first, offset)
        if first < length:
            data += _pread_all(self._fd, length - first, 0)
        return data


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)

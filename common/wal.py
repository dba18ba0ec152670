"""Write-ahead log of accepted data frames. Plain file I/O, no asyncio.

Layout: ``DIR/wal-NNNNNNNNNN.log`` segments, each a sequence of records
``[4-byte big-endian payload length][4-byte CRC-32 of payload][payload]`` where the
payload is msgpack ``[producer, run_id, seq, frame body]``. A record's position is
``segment number << 40 | byte offset``: it grows monotonically across segments and
restarts, which lets the database rows remember the last position they contain.

A torn record at the end of the last segment (a crash mid-write) is cut off on open.
``DIR/producers.msgpack`` holds the last sequence number of every producer whose frames
are no longer in any segment, so that deduplication survives segment removal.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

import msgpack

_HEADER = struct.Struct(">II")
_OFFSET_BITS = 40
FSYNC_POLICIES = ("always", "off")
# Producers not heard from for this long are forgotten by the dedup table.
PRODUCER_TTL_SECONDS = 7 * 24 * 3600


class WalCorrupt(Exception):
    """A damaged record before the last segment: acknowledged data would be lost."""


class Record(NamedTuple):
    position: int
    producer: str
    run_id: str
    seq: int
    body: bytes


def segment_of(position: int) -> int:
    return position >> _OFFSET_BITS


class WriteAheadLog:
    def __init__(self, directory: Path, fsync: str = "always",
                 segment_bytes: int = 64 * 1024 * 1024) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}")
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.segment = 0
        self._file: IO[bytes] | None = None
        self._offset = 0
        self._opened_at = 0.0
        self._dirty = False
        self.producers: dict[str, list[float]] = {}  # producer -> [last seq, last seen]

    # --- opening and replay -------------------------------------------------------

    def _segments(self) -> list[int]:
        numbers = []
        for path in self.directory.glob("wal-*.log"):
            with contextlib.suppress(ValueError):
                numbers.append(int(path.stem[4:]))
        return sorted(numbers)

    def _path(self, segment: int) -> Path:
        return self.directory / f"wal-{segment:010d}.log"

    def open(self) -> list[Record]:
        """Read every record of every segment, then start a fresh segment for appends."""
        self.directory.mkdir(parents=True, exist_ok=True)
        snapshot = self.directory / "producers.msgpack"
        next_segment = 1
        if snapshot.exists():
            saved = msgpack.unpackb(snapshot.read_bytes(), raw=False)
            self.producers = {k: list(v) for k, v in saved["producers"].items()}
            next_segment = saved["next_segment"]
        records: list[Record] = []
        segments = self._segments()
        for number in segments:
            records.extend(self._read_segment(number, last=number == segments[-1]))
        for record in records:
            seen = self.producers.get(record.producer)
            if seen is None or record.seq > seen[0]:
                self.producers[record.producer] = [record.seq, time.time()]
        self._start_segment(max([next_segment, *(n + 1 for n in segments)]))
        return records

    def _read_segment(self, number: int, last: bool) -> Iterator[Record]:
        path = self._path(number)
        data = path.read_bytes()
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, offset)
            start = offset + _HEADER.size
            payload = data[start:start + length]
            # A zero length is a zero-filled tail (the size grew, the data never landed).
            if length == 0 or len(payload) < length or zlib.crc32(payload) != crc:
                break
            try:
                producer, run_id, seq, body = msgpack.unpackb(payload, raw=False)
            except (ValueError, TypeError):  # msgpack's own errors subclass ValueError
                break
            yield Record((number << _OFFSET_BITS) | offset, producer, run_id, seq, body)
            offset = start + length
        if offset < len(data):
            if not last:
                raise WalCorrupt(
                    f"{path}: damaged record at byte {offset} of {len(data)} in a segment "
                    "that is not the last; acknowledged frames after it cannot be read. Move "
                    "the file aside to start without them.")
            # A torn tail from a crash mid-append: nothing after it was acknowledged.
            with open(path, "r+b") as f:
                f.truncate(offset)

    # --- appending --------------------------------------------------------------

    def _start_segment(self, number: int) -> None:
        if self._file is not None:
            self._file.close()
        self.segment = number
        self._file = open(self._path(number), "ab")  # noqa: SIM115 - kept open for appends
        self._offset = self._file.tell()
        self._opened_at = time.monotonic()
        self._sync_directory()

    def append(self, producer: str, run_id: str, seq: int, body: bytes) -> int:
        """Buffer one record; ``commit`` makes it durable. Returns its position."""
        assert self._file is not None, "open() first"
        payload = msgpack.packb([producer, run_id, seq, body], use_bin_type=True)
        position = (self.segment << _OFFSET_BITS) | self._offset
        self._file.write(_HEADER.pack(len(payload), zlib.crc32(payload)))
        self._file.write(payload)
        self._offset += _HEADER.size + len(payload)
        self._dirty = True
        self.producers[producer] = [seq, time.time()]
        return position

    def commit(self) -> None:
        """Hand appended records to the OS and, under the 'always' policy, to the disk.

        The OS copy survives kill -9 of the server; the fsync also survives a power cut.
        The server's connections use ``common.group_commit`` instead, which runs the
        fsync off the event loop; this inline form is for rotation and shutdown.
        """
        if self.flush() and self.fsync == "always":
            assert self._file is not None
            os.fdatasync(self._file.fileno())

    def flush(self) -> bool:
        """Hand appended records to the OS; True if there were any since the last flush."""
        if not self._dirty or self._file is None:
            return False
        self._file.flush()
        self._dirty = False
        return True

    def dup_fd(self) -> int:
        """A new descriptor of the current segment, for a worker thread to fdatasync and
        close: a rotation may close the segment's own descriptor meanwhile."""
        assert self._file is not None, "open() first"
        return os.dup(self._file.fileno())

    def ensure_after(self, position: int) -> None:
        """Continue in a segment numbered above ``position``'s (a wiped state dir)."""
        if segment_of(position) >= self.segment:
            self._start_segment(segment_of(position) + 1)

    def last_seq(self, producer: str) -> int:
        seen = self.producers.get(producer)
        return int(seen[0]) if seen else 0

    # --- truncation -------------------------------------------------------------

    def rotate_if_due(self, max_age_seconds: float) -> None:
        """Start a new segment when the current one is large or old, and not empty."""
        if self._offset and (self._offset >= self.segment_bytes
                             or time.monotonic() - self._opened_at >= max_age_seconds):
            self.commit()
            self._start_segment(self.segment + 1)

    def release_before(self, segment: int) -> int:
        """Remove segments numbered below ``segment``; their buckets are all written.

        The producers' last sequence numbers are saved first, so that deduplication of
        frames that were in those segments survives a restart. Returns bytes freed.
        """
        old = [n for n in self._segments() if n < min(segment, self.segment)]
        if not old:
            return 0
        self._save_producers()
        freed = 0
        for number in old:
            path = self._path(number)
            freed += path.stat().st_size
            path.unlink()
        self._sync_directory()
        return freed

    def _save_producers(self) -> None:
        cutoff = time.time() - PRODUCER_TTL_SECONDS
        self.producers = {k: v for k, v in self.producers.items() if v[1] >= cutoff}
        snapshot = self.directory / "producers.msgpack"
        temporary = snapshot.with_suffix(".tmp")
        with open(temporary, "wb") as f:
            f.write(msgpack.packb({"producers": self.producers,
                                   "next_segment": self.segment + 1}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, snapshot)

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def size_bytes(self) -> int:
        return sum(self._path(n).stat().st_size for n in self._segments())

    def close(self) -> None:
        self.commit()
        if self._file is not None:
            self._file.close()
            self._file = None

"""Write-ahead log of accepted data frames. Plain file I/O, no asyncio.

The state directory (made 0700; every file in it 0600, whatever the umask) holds:

- ``wal-NNNNNNNNNN.log``: segments, each a sequence of records
  ``[4-byte big-endian payload length][4-byte CRC-32 of payload][payload]`` where the
  payload is msgpack ``[producer, run_id, seq, frame body, key digest]`` (records of
  earlier releases have no key digest). A record whose payload is not an array (nil or
  bin) is padding that ``tdagg-wal-repair`` wrote over damaged bytes; readers skip it.
- ``producers.msgpack``: every producer's last durable sequence number, last-seen time
  and key digest, so that deduplication and producer bindings survive segment removal.
  Rewritten whole (temporary file, fsync, rename) and compacted on every save: producers
  not heard from for ``producer_ttl`` seconds (default 7 days) are dropped. Cost per
  producer: about 70 bytes in the file and 250 bytes of memory for a 32-character id
  with a 16-byte key digest (measured in tests/test_wal.py).
- ``lock``: flock'ed by the process using the directory for its whole life; holds its
  pid, for the message that refuses a second server.
- ``log-id``: this log's identity, 32 random hex digits made when the directory is
  first opened. Rows name their writers by it (several servers may write one row): a
  wiped directory is a new log, whose low positions no row mistakes for the old one's.
- ``role``: ``td`` or ``non_td``. A server refuses a directory marked with the other
  role; a directory without the marker (an earlier release, or new) is adopted.

A record's position is ``segment number << 40 | byte offset``: it grows monotonically
across segments and restarts, which lets the database rows remember the last position
they contain. Repairs never move a record (padding replaces damaged bytes) for the same
reason: a row's position must keep meaning the same record.

Durability. ``append`` only encodes the record into a memory buffer. ``flush`` hands the
buffer to the OS with ``os.write``; under fsync 'off' the records are then *durable* (they
survive kill -9); under 'always' they are durable once an fdatasync that started after
the flush has succeeded (``commit`` inline, or ``common.group_commit`` off the event
loop). ``last_seq`` reports durable sequence numbers only: it tells a reconnecting
forwarder what it may drop. ``seen_seq`` also counts records appended and not failed,
for duplicate detection.

Write failures (disk full, EIO) never leave a half-written record behind and never lose
a durable one. A failed write cuts the segment back to where that flush began; a failed
fdatasync cuts it back to the last synced byte (after a failed sync the kernel may have
dropped any unsynced page, so nothing after that byte can be trusted). Either way the
lost records' sequence numbers are forgotten, ``WalWriteError`` is raised, and the log
goes on at the cut once writes succeed again. ``cut_listeners`` hear of sync cuts:
records other callers flushed may have been among the lost.

Damage found on open. A record that is damaged (length, CRC or content) is a torn tail
only when no intact record follows it, in its segment or any later one: a crash in the
middle of a write. The tail is cut and reported in ``torn_tails``. Damage followed by
intact records means acknowledged data would be lost by cutting: ``open`` refuses with
``WalCorrupt``, and ``tdagg-wal-repair`` keeps every intact record.

Producer keys. ``bind(producer, key_digest)``: the first digest a producer is bound with
(or appended with: an unbound producer is bound to b"", no key) is its digest for good,
b"" included; a later bind with any other digest is refused. So a keyed producer cannot
be taken over, and an unkeyed one (a forwarder of an earlier release) keeps working
unkeyed but cannot be claimed by a key later. A binding is persisted in each of the
producer's records and in ``producers.msgpack``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hmac
import os
import re
import stat
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

_HEADER = struct.Struct(">II")
_OFFSET_BITS = 40
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1
FSYNC_POLICIES = ("always", "off")
# Producers not heard from for this long are forgotten by the dedup table.
PRODUCER_TTL_SECONDS = 7 * 24 * 3600
PRODUCERS_FILE = "producers.msgpack"
LOCK_FILE = "lock"
ROLE_FILE = "role"
LOG_ID_FILE = "log-id"
REPAIR_COMMAND = "tdagg-wal-repair"
_PRIVATE_FILE = 0o600
_PRIVATE_DIR = 0o700

Write = Callable[[int, memoryview], int]
Sync = Callable[[int], None]


class StateDirError(Exception):
    """The state directory cannot be used: locked, another role, unreadable, damaged."""


class WalCorrupt(StateDirError):
    """Damaged log content that cutting would turn into lost acknowledged data."""


class WalWriteError(OSError):
    """Writing or syncing the log failed; the records that were not durable are gone."""

    def __str__(self) -> str:
        return str(self.strerror)


class Record(NamedTuple):
    position: int
    producer: str
    run_id: str
    seq: int
    body: bytes
    key_digest: bytes = b""


class TornTail(NamedTuple):
    """A torn tail ``open`` cut off: where, and how many bytes."""

    path: Path
    offset: int
    bytes_cut: int

    def __str__(self) -> str:
        return (f"cut a torn tail off {self.path} at byte {self.offset}: {self.bytes_cut} "
                "bytes of a write a crash interrupted (never acknowledged)")


@dataclass(slots=True)
class ProducerState:
    seq: int  # highest durably logged sequence number (0: none)
    seen_at: float  # wall clock of the last record or bind
    key_digest: bytes  # b"": bound without a key


def segment_of(position: int) -> int:
    return position >> _OFFSET_BITS


def first_position_of(segment: int) -> int:
    """The lowest position a record of ``segment`` can have."""
    return segment << _OFFSET_BITS


def segment_path(directory: Path, segment: int) -> Path:
    return directory / f"wal-{segment:010d}.log"


def segment_numbers(directory: Path) -> list[int]:
    numbers = []
    for path in directory.glob("wal-*.log"):
        with contextlib.suppress(ValueError):
            numbers.append(int(path.stem[4:]))
    return sorted(numbers)


def describe(exc: OSError) -> str:
    """'No space left on device (ENOSPC)': the errno text and its name."""
    if exc.errno is None:
        return str(exc)
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{exc.strerror or os.strerror(exc.errno)} ({name})"


# --- reading records -----------------------------------------------------------------------

# msgpack markers: str8/16/32, bin8/16/32, the sized ints, with their length widths.
_STR_WIDTH = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_BIN_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_INT_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_NIL = 0xC0
# Where a record's payload may begin: a 4/5-array whose first item is a str, or padding.
_PAYLOAD_START = re.compile(rb"[\x94\x95][\xa0-\xbf\xd9-\xdb]|[\xc0\xc4-\xc6]")


def _item_size(data: bytes, at: int, kind: str) -> int | None:
    """Encoded size of the msgpack str/bin/int at ``at``, from its header alone."""
    if at >= len(data):
        return None
    marker = data[at]
    if kind == "str" and 0xA0 <= marker <= 0xBF:
        return 1 + (marker & 0x1F)
    if kind == "int":
        if marker <= 0x7F or marker >= 0xE0:
            return 1
        width = _INT_WIDTH.get(marker)
        return None if width is None else 1 + width
    width = (_STR_WIDTH if kind == "str" else _BIN_WIDTH).get(marker)
    if width is None or at + 1 + width > len(data):
        return None
    return 1 + width + int.from_bytes(data[at + 1:at + 1 + width], "big")


def _shaped_size(data: bytes, at: int) -> int | None:
    """Encoded size of a record payload or padding at ``at``, reading headers only.

    Lets a scan through damaged bytes reject almost every false start without a CRC
    over a length that happens to fit.
    """
    marker = data[at]
    if marker == _NIL:
        return 1
    if marker in _BIN_WIDTH:
        return _item_size(data, at, "bin")
    if marker not in (0x94, 0x95):
        return None
    size = 1
    for kind in ("str", "str", "int", "bin", "bin")[:marker & 0x0F]:
        item = _item_size(data, at + size, kind)
        if item is None:
            return None
        size += item
    return size


def _as_record(payload: Any, position: int) -> Record | None:
    if not isinstance(payload, list) or len(payload) not in (4, 5):
        return None
    producer, run_id, seq, body, *key = payload
    key_digest = key[0] if key else b""
    if not (isinstance(producer, str) and isinstance(run_id, str) and isinstance(seq, int)
            and isinstance(body, bytes) and isinstance(key_digest, bytes)):
        return None
    return Record(position, producer, run_id, seq, body, key_digest)


_PADDING = object()


def _record_at(data: bytes, offset: int, segment: int) -> tuple[int, Record | object] | None:
    """(end offset, Record or _PADDING) of an intact record at ``offset``, else None."""
    start = offset + _HEADER.size
    if start >= len(data):
        return None
    length, crc = _HEADER.unpack_from(data, offset)
    # A zero length is a zero-filled tail (the size grew, the data never landed).
    if length == 0 or start + length > len(data) or _shaped_size(data, start) != length:
        return None
    payload = data[start:start + length]
    if zlib.crc32(payload) != crc:
        return None
    try:
        content = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):  # ValueError: msgpack's own
        return None
    if content is None or isinstance(content, bytes):
        return start + length, _PADDING
    record = _as_record(content, (segment << _OFFSET_BITS) | offset)
    return None if record is None else (start + length, record)


def _next_intact(data: bytes, offset: int, segment: int) -> int:
    """Offset of the first intact record after ``offset``, or the end of the data."""
    for match in _PAYLOAD_START.finditer(data, offset + 1 + _HEADER.size):
        candidate = match.start() - _HEADER.size
        if _record_at(data, candidate, segment) is not None:
            return candidate
    return len(data)


class Damage(NamedTuple):
    offset: int  # first damaged byte
    length: int  # up to the next intact record, or the end of the segment


class SegmentScan(NamedTuple):
    records: list[Record]
    damage: list[Damage]
    size: int

    def records_after(self, offset: int) -> int:
        return sum(1 for r in self.records if r.position & _OFFSET_MASK > offset)


def scan_segment(data: bytes, segment: int) -> SegmentScan:
    """Every intact record of a segment, and the damaged byte ranges between them."""
    records: list[Record] = []
    damage: list[Damage] = []
    offset = 0
    while offset < len(data):
        found = _record_at(data, offset, segment)
        if found is not None:
            offset, record = found
            if isinstance(record, Record):
                records.append(record)
            continue
        resume = _next_intact(data, offset, segment)
        damage.append(Damage(offset, resume - offset))
        offset = resume
    return SegmentScan(records, damage, len(data))


def padding_record(size: int) -> bytes:
    """A record of exactly ``size`` bytes (at least 9) that readers skip."""
    payload_size = size - _HEADER.size
    if payload_size < 1:
        raise ValueError(f"padding needs at least {_HEADER.size + 1} bytes, not {size}")
    if payload_size == 1:
        payload = bytes([_NIL])
    else:
        # bin8, bin16 or bin32, whichever reaches the size; msgpack accepts a wider
        # header than needed.
        marker, width = next((m, w) for m, w in _BIN_WIDTH.items()
                             if payload_size - 1 - w < 1 << (8 * w))
        filler = payload_size - 1 - width
        payload = bytes([marker]) + filler.to_bytes(width, "big") + bytes(filler)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


_LARGEST_PADDING = 1 << 30


def padding(size: int) -> bytes:
    """Padding records filling exactly ``size`` bytes (at least 9)."""
    parts = []
    while size > _LARGEST_PADDING:
        piece = _LARGEST_PADDING - 16  # leaves a remainder of more than 9 bytes
        parts.append(padding_record(piece))
        size -= piece
    parts.append(padding_record(size))
    return b"".join(parts)


def read_log(directory: Path) -> list[Record]:
    """The intact records of every segment, without locking or changing anything."""
    records: list[Record] = []
    for number in segment_numbers(directory):
        records.extend(scan_segment(segment_path(directory, number).read_bytes(),
                                    number).records)
    return records


def corruption_message(path: Path, scan: SegmentScan, later_records: int) -> str:
    first = scan.damage[0]
    here = scan.records_after(first.offset)
    others = len(scan.damage) - 1
    more = f"; {others} more damaged range{'s' * (others > 1)} after it" if others else ""
    later = f" and {later_records} in later segments" if later_records else ""
    return (
        f"{path}: damaged record at byte {first.offset} ({first.length} bytes{more}), "
        f"followed by {here} intact records in this segment{later}. They were "
        "acknowledged, so the server does not cut the log there. Stop the server and run "
        f"`{REPAIR_COMMAND} {path.parent}`: it keeps a copy of the damaged file, keeps every "
        "intact record and replaces only the damaged bytes; then start the server again.")


# --- producers.msgpack ---------------------------------------------------------------------


def _parse_producers(saved: Any) -> tuple[dict[str, ProducerState], int]:
    """The producers and next segment number of a producers.msgpack; ValueError if bad."""
    if not isinstance(saved, dict):
        raise ValueError(f"a {type(saved).__name__} where a map belongs")
    entries = saved.get("producers")
    next_segment = saved.get("next_segment")
    if not isinstance(entries, dict):
        raise ValueError("no producers map")
    if not isinstance(next_segment, int) or next_segment < 1:
        raise ValueError(f"next_segment is {next_segment!r}")
    producers = {}
    for name, entry in entries.items():
        # [seq, last seen] from earlier releases; [seq, last seen, key digest] now.
        if not (isinstance(name, str) and isinstance(entry, list) and len(entry) in (2, 3)
                and isinstance(entry[0], int) and isinstance(entry[1], (int, float))
                and (len(entry) == 2 or isinstance(entry[2], bytes))):
            raise ValueError(f"bad entry for producer {name!r}: {entry!r}")
        key = entry[2] if len(entry) == 3 else b""
        producers[name] = ProducerState(entry[0], float(entry[1]), key)
    return producers, next_segment


def load_producers(path: Path) -> tuple[dict[str, ProducerState], int]:
    """producers.msgpack's content; ({}, 1) when absent. StateDirError / WalCorrupt."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}, 1
    except OSError as exc:
        raise StateDirError(f"{path}: cannot read it: {describe(exc)}; the server needs "
                            "read and write access to its state directory") from None
    try:
        return _parse_producers(msgpack.unpackb(raw, raw=False))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise WalCorrupt(
            f"{path} is damaged ({exc}; {len(raw)} bytes). It holds the last sequence "
            "numbers of producers whose log segments were already released. Stop the "
            f"server and run `{REPAIR_COMMAND} {path.parent}`: it keeps a copy and rebuilds "
            "the file from the segments.") from None


def producers_content(producers: dict[str, ProducerState], next_segment: int) -> bytes:
    return msgpack.packb(
        {"version": 2, "next_segment": next_segment,
         "producers": {name: [s.seq, s.seen_at, s.key_digest]
                       for name, s in producers.items()}},
        use_bin_type=True)


def producers_from_records(records: Iterable[Record], now: float,
                           known: dict[str, ProducerState] | None = None,
                           ) -> dict[str, ProducerState]:
    """``known`` updated with the records: highest seq, first key digest."""
    producers = dict(known or {})
    for record in records:
        state = producers.get(record.producer)
        if state is None:
            producers[record.producer] = ProducerState(record.seq, now, record.key_digest)
        elif record.seq > state.seq:
            state.seq = record.seq
            state.seen_at = now
    return producers


# --- files ------------------------------------------------------------------------------


def open_private(path: Path, flags: int) -> int:
    """os.open with mode 0600, also for a file that already exists (umask aside)."""
    fd = os.open(path, flags | os.O_CLOEXEC, _PRIVATE_FILE)
    try:
        os.fchmod(fd, _PRIVATE_FILE)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_all(fd: int, data: bytes | bytearray, write: Write = os.write) -> None:
    """Write every byte, looping on short writes."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            written = write(fd, view[done:])
            if written <= 0:  # a regular file never does this; do not spin on it
                raise OSError(errno.EIO, "write wrote nothing")
            done += written


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, content: bytes, write: Write = os.write,
                 datasync: Sync = os.fdatasync) -> None:
    """Write ``content`` to a temporary file, sync it and rename it over ``path``; on
    failure remove the temporary file and leave ``path`` as it was (OSError)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        fd = open_private(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            write_all(fd, content, write)
            datasync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        sync_directory(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def prepare_directory(directory: Path) -> None:
    """Create the directory 0700, or make an existing one 0700. StateDirError."""
    try:
        directory.mkdir(parents=True, mode=_PRIVATE_DIR, exist_ok=True)
        if stat.S_IMODE(directory.stat().st_mode) != _PRIVATE_DIR:
            os.chmod(directory, _PRIVATE_DIR)
    except OSError as exc:
        raise StateDirError(
            f"state directory {directory}: cannot create it or make it private (mode "
            f"0700): {describe(exc)}; it must belong to the user running the server") from None


def lock_directory(directory: Path, holder: str) -> int:
    """Take DIR/lock (flock, exclusive, not waiting) and write our pid into it; the
    descriptor keeps the lock until closed. StateDirError if another process holds it."""
    path = directory / LOCK_FILE
    try:
        fd = open_private(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise StateDirError(f"{path}: cannot open the lock file: {describe(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        other = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateDirError(f"{path}: cannot lock it: {describe(exc)}") from None
        pid = other[0] if other else "unknown"
        who = "another server" if len(other) < 2 or other[1] == "server" else other[1]
        raise StateDirError(
            f"state directory {directory} is in use by {who} (pid {pid}); give each "
            "server its own --state-dir") from None
    # Only informs the message above: a full disk must not stop the lock being held.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {holder}\n".encode(), 0)
    return fd


# --- the log ----------------------------------------------------------------------------


class SyncTicket:
    """One fdatasync of the current segment, covering everything written when it was
    taken. ``run`` may be called from a worker thread; only once does it sync."""

    def __init__(self, descriptor: int, covers: int) -> None:
        self.descriptor = descriptor  # a dup: a rotation may close the segment's own
        self.covers = covers  # the position up to which the segment was written
        self.error: OSError | None = None
        self.failure: WalWriteError | None = None  # what finish_sync raised
        self.finished = False
        self._ran = False
        self._lock = threading.Lock()

    def abandon(self) -> None:
        """Close the descriptor of a ticket nobody ran; it counts as a failed sync."""
        with self._lock:
            if not self._ran:
                self._ran = True
                self.error = OSError(errno.EBADF, "the log was closed before this sync ran")
                os.close(self.descriptor)

    def run(self, datasync: Sync) -> None:
        with self._lock:
            if self._ran:
                return
            self._ran = True
            try:
                datasync(self.descriptor)
            except OSError as exc:
                self.error = exc
            except Exception as exc:  # unknown outcome: as unsafe as a failed sync
                self.error = OSError(errno.EIO, f"sync raised {exc!r}")
            finally:
                os.close(self.descriptor)


class WriteAheadLog:
    def __init__(self, directory: Path, fsync: str = "always",
                 segment_bytes: int = 64 * 1024 * 1024, *, role: str | None = None,
                 producer_ttl: float = PRODUCER_TTL_SECONDS,
                 write: Write = os.write, datasync: Sync = os.fdatasync) -> None:
        """``role``: the role marker to check or write (None: neither, for tools).
        ``write`` and ``datasync`` are os.write and os.fdatasync, replaceable in tests."""
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}")
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.role = role
        self.producer_ttl = producer_ttl
        self.datasync = datasync
        self._write = write
        self.segment = 0
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._written = 0  # bytes of the current segment handed to the OS
        self._pending = bytearray()  # appended, not yet written
        self._durable = 0  # position up to which records are durable
        self._opened_at = 0.0
        self._in_flight: list[SyncTicket] = []
        self._broken: WalWriteError | None = None
        self.producers: dict[str, ProducerState] = {}  # durable seqs and bindings
        # (end position, producer, seq) of every record not durable yet, in order.
        self._unconfirmed: deque[tuple[int, str, int]] = deque()
        self._seen: dict[str, int] = {}  # highest unconfirmed seq per producer
        self.torn_tails: list[TornTail] = []
        self.log_id = ""  # known once open
        # Called with (cut position, error) when a failed sync cut off written records.
        self.cut_listeners: list[Callable[[int, WalWriteError], None]] = []

    # --- positions ------------------------------------------------------------------

    def _position(self, offset: int) -> int:
        return (self.segment << _OFFSET_BITS) | offset

    @property
    def written_position(self) -> int:
        """Everything before this position has been handed to the OS."""
        return self._position(self._written)

    @property
    def durable_position(self) -> int:
        """Everything before this position is durable under the fsync policy."""
        return self._durable

    @property
    def torn_tail(self) -> TornTail | None:
        """The torn tail ``open`` cut off, if any (``torn_tails`` has every one: more
        than one only when several segments end in damage with nothing intact after)."""
        return self.torn_tails[0] if self.torn_tails else None

    def _path(self, segment: int) -> Path:
        return segment_path(self.directory, segment)

    def _segments(self) -> list[int]:
        return segment_numbers(self.directory)

    # --- opening and replay -----------------------------------------------------------

    def open(self) -> list[Record]:
        """Lock the directory, read every record of every segment, start a fresh segment.

        Raises StateDirError (locked, other role, unreadable), WalCorrupt (damage that
        is not a torn tail) or WalWriteError (cutting a torn tail or starting the
        segment failed). A torn tail cut off is listed in ``torn_tails``.
        """
        prepare_directory(self.directory)
        self._lock_fd = lock_directory(self.directory, "server")
        try:
            self._check_role()
            self.log_id = self._load_log_id()
            self._make_files_private()
            self.producers, next_segment = load_producers(self.directory / PRODUCERS_FILE)
            segments = self._segments()
            records = self._read_segments(segments)
            self.producers = producers_from_records(records, time.time(), self.producers)
            self._start_segment(max([next_segment, *(n + 1 for n in segments)]))
        except BaseException:
            self._close_files()
            raise
        return records

    def _check_role(self) -> None:
        if self.role is None:
            return
        path = self.directory / ROLE_FILE
        try:
            marked = path.read_bytes().decode().strip()
        except FileNotFoundError:
            # New, or written by a release without markers: adopt it.
            self._write_role(path)
            return
        except (OSError, UnicodeDecodeError) as exc:
            cause = describe(exc) if isinstance(exc, OSError) else "not text"
            raise StateDirError(f"{path}: cannot read the role marker: {cause}") from None
        if not marked.isidentifier():
            raise StateDirError(
                f"{path} is damaged (it holds {marked!r}); it names the server that owns "
                f"the directory: write {self.role} into it if this is the {self.role} "
                "server's directory")
        if marked != self.role:
            raise StateDirError(
                f"state directory {self.directory} belongs to the {marked} server, not the "
                f"{self.role} server; give each server its own --state-dir")

    def _load_log_id(self) -> str:
        path = self.directory / LOG_ID_FILE
        try:
            found = path.read_bytes().decode().strip()
        except FileNotFoundError:
            made = os.urandom(16).hex()
            try:
                replace_file(path, f"{made}\n".encode(), self._write, self.datasync)
            except OSError as exc:
                raise WalWriteError(exc.errno, f"{path}: cannot write the log identity: "
                                    f"{describe(exc)}") from None
            return made
        except (OSError, UnicodeDecodeError) as exc:
            cause = describe(exc) if isinstance(exc, OSError) else "not text"
            raise StateDirError(f"{path}: cannot read the log identity: {cause}") from None
        if not re.fullmatch(r"[0-9a-f]{32}", found):
            raise StateDirError(
                f"{path} is damaged (it holds {found[:40]!r}, not 32 hex digits): delete it "
                "only together with the wal-*.log segments, which a new identity disowns")
        return found

    def _write_role(self, path: Path) -> None:
        assert self.role is not None
        try:
            replace_file(path, f"{self.role}\n".encode(), self._write, self.datasync)
        except OSError as exc:
            raise WalWriteError(exc.errno, f"{path}: cannot write the role marker: "
                                f"{describe(exc)}") from None

    def _make_files_private(self) -> None:
        """Files an earlier release wrote with the umask's mode become 0600."""
        names = [PRODUCERS_FILE, ROLE_FILE, LOG_ID_FILE,
                 *(self._path(n).name for n in self._segments())]
        for name in names:
            path = self.directory / name
            try:
                if stat.S_IMODE(path.stat().st_mode) != _PRIVATE_FILE:
                    os.chmod(path, _PRIVATE_FILE)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StateDirError(f"{path}: cannot make it private (mode 0600): "
                                    f"{describe(exc)}") from None

    def _read_segments(self, segments: list[int]) -> list[Record]:
        scans = []
        for number in segments:
            path = self._path(number)
            try:
                scans.append((path, scan_segment(path.read_bytes(), number)))
            except OSError as exc:
                raise StateDirError(f"{path}: cannot read it: {describe(exc)}") from None
        # Decide about every segment before cutting anything.
        later = [sum(len(scan.records) for _, scan in scans[i + 1:])
                 for i in range(len(scans))]
        for (path, scan), later_records in zip(scans, later, strict=True):
            if scan.damage and (scan.records_after(scan.damage[0].offset) or later_records):
                raise WalCorrupt(corruption_message(path, scan, later_records))
        for path, scan in scans:
            if scan.damage:
                self._cut_torn_tail(path, scan)
        return [record for _, scan in scans for record in scan.records]

    def _cut_torn_tail(self, path: Path, scan: SegmentScan) -> None:
        # Nothing intact follows: a crash in the middle of a write, never acknowledged.
        offset = scan.damage[0].offset
        try:
            os.truncate(path, offset)
        except OSError as exc:
            raise WalWriteError(exc.errno, f"{path}: cannot cut the torn tail at byte "
                                f"{offset}: {describe(exc)}") from None
        self.torn_tails.append(TornTail(path, offset, scan.size - offset))

    # --- appending --------------------------------------------------------------------

    def _start_segment(self, number: int) -> None:
        """Continue in segment ``number``; the current one must be all durable."""
        assert not self._pending
        assert not self._unconfirmed
        assert not self._in_flight
        path = self._path(number)
        try:
            fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except OSError as exc:
            raise WalWriteError(exc.errno, f"{path}: cannot create the log segment: "
                                f"{describe(exc)}") from None
        size = os.fstat(fd).st_size
        try:
            # Without its directory entry on disk, a synced segment could still vanish.
            sync_directory(self.directory)
        except OSError as exc:
            os.close(fd)
            if size == 0:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise WalWriteError(exc.errno, f"{self.directory}: cannot sync the directory "
                                f"for new segment {path.name}: {describe(exc)}") from None
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self.segment = number
        self._written = size
        self._durable = self._position(size)
        self._opened_at = time.monotonic()

    def records_from(self, segment: int) -> list[Record]:
        """The records on disk in segments numbered ``segment`` and above (records still
        buffered by ``append`` are not there yet)."""
        return [record for number in segment_numbers(self.directory) if number >= segment
                for record in scan_segment(segment_path(self.directory, number).read_bytes(),
                                           number).records]

    def bind(self, producer: str, key_digest: bytes) -> bool:
        """Bind ``producer`` to ``key_digest`` on first sight; False if it is bound to
        another digest (see the module docstring for the rule)."""
        state = self.producers.get(producer)
        if state is None:
            self.producers[producer] = ProducerState(0, time.time(), key_digest)
            return True
        if not hmac.compare_digest(state.key_digest, key_digest):
            return False
        state.seen_at = time.time()
        return True

    def append(self, producer: str, run_id: str, seq: int, body: bytes) -> int:
        """Encode one record into memory (no I/O); ``flush`` or a commit writes it.
        Returns its position. The record carries the producer's key digest."""
        assert self._fd is not None, "open() first"
        state = self.producers.get(producer)
        if state is None:  # unbound: bound with no key from now on
            state = self.producers[producer] = ProducerState(0, time.time(), b"")
        state.seen_at = time.time()
        payload = msgpack.packb([producer, run_id, seq, body, state.key_digest],
                                use_bin_type=True)
        position = self._position(self._written + len(self._pending))
        self._pending += _HEADER.pack(len(payload), zlib.crc32(payload))
        self._pending += payload
        end = self._position(self._written + len(self._pending))
        self._unconfirmed.append((end, producer, seq))
        self._seen[producer] = max(self._seen.get(producer, 0), seq)
        return position

    def flush(self) -> bool:
        """Write appended records to the OS; True if there were any. WalWriteError: they
        were discarded, the segment is cut back to where this flush began."""
        if not self._pending:
            return False
        self._check_usable()
        assert self._fd is not None
        start = self._written
        # Taken out of the log first: a failed write's traceback may still hold views of
        # the buffer, and a bytearray with views cannot be cleared.
        pending, self._pending = self._pending, bytearray()
        try:
            write_all(self._fd, pending, self._write)
        except OSError as exc:
            raise self._fail_write(start, len(pending), exc) from None
        self._written += len(pending)
        if self.fsync == "off":
            self._confirm(self.written_position)
        return True

    def _fail_write(self, start: int, size: int, exc: OSError) -> WalWriteError:
        count = sum(1 for end, _, _ in self._unconfirmed if end > self._position(start))
        self._cut(start)
        return WalWriteError(
            exc.errno, f"write-ahead log {self._path(self.segment)}: write failed: "
            f"{describe(exc)}; the {count} records ({size} bytes) of this write were "
            f"discarded and are not acknowledged; the log continues at byte {start}")

    def _cut(self, offset: int) -> None:
        """Drop everything of the current segment from ``offset`` on, file and memory."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, offset)
        except OSError as exc:
            # Unknown bytes stay in the file: appending after them would bury them.
            self._broken = WalWriteError(
                exc.errno, f"write-ahead log {self._path(self.segment)}: cannot cut it "
                f"back to byte {offset} after a failed write: {describe(exc)}; restart the "
                "server (on start it checks the log)")
        self._pending.clear()
        self._written = offset
        self._forget_unconfirmed_beyond(self._position(offset))

    def _check_usable(self) -> None:
        if self._broken is not None:
            # Nothing more reaches the file: what is appended is lost like a failed write.
            self._pending = bytearray()
            self._forget_unconfirmed_beyond(self.written_position)
            raise self._broken

    def _confirm(self, position: int) -> None:
        """Records ending at or before ``position`` are durable."""
        self._durable = max(self._durable, position)
        while self._unconfirmed and self._unconfirmed[0][0] <= position:
            _, producer, seq = self._unconfirmed.popleft()
            state = self.producers.setdefault(producer, ProducerState(0, time.time(), b""))
            state.seq = max(state.seq, seq)
            if self._seen.get(producer, 0) <= state.seq:
                self._seen.pop(producer, None)

    def _forget_unconfirmed_beyond(self, position: int) -> None:
        affected = set()
        while self._unconfirmed and self._unconfirmed[-1][0] > position:
            affected.add(self._unconfirmed.pop()[1])
        for producer in affected:
            self._seen.pop(producer, None)
        for _, producer, seq in self._unconfirmed:
            if producer in affected:
                self._seen[producer] = max(self._seen.get(producer, 0), seq)

    # --- syncing ------------------------------------------------------------------------

    def start_sync(self) -> SyncTicket | None:
        """A ticket to fdatasync what is written and not yet durable (None: nothing is).
        Run it (any thread), then hand it to ``finish_sync`` (this thread)."""
        self._check_usable()
        if self._fd is None or self._durable >= self.written_position:
            return None
        try:
            descriptor = os.dup(self._fd)
        except OSError as exc:  # EMFILE: no sync, so as unsafe as a failed one
            raise self._cut_unsynced(exc) from None
        ticket = SyncTicket(descriptor, self.written_position)
        self._in_flight.append(ticket)
        return ticket

    def finish_sync(self, ticket: SyncTicket) -> None:
        """Apply a ticket's outcome: its records are durable, or, if the sync failed,
        everything after the last synced byte is cut off (WalWriteError, also for a
        second call). Listeners in ``cut_listeners`` hear of the cut."""
        if not ticket.finished:
            ticket.finished = True
            if ticket in self._in_flight:
                self._in_flight.remove(ticket)
            if self._fd is None:
                ticket.failure = WalWriteError(
                    errno.EBADF, f"write-ahead log {self.directory}: closed before the "
                    "outcome of a sync was known; its records are not acknowledged")
            elif ticket.error is None:
                self._confirm(ticket.covers)
            else:
                ticket.failure = self._cut_unsynced(ticket.error)
        if ticket.failure is not None:
            raise ticket.failure

    def _cut_unsynced(self, exc: OSError) -> WalWriteError:
        # A new segment starts only when the last one is all durable.
        assert segment_of(self._durable) == self.segment
        offset = self._durable & _OFFSET_MASK
        lost = self._written + len(self._pending) - offset
        count = len(self._unconfirmed)
        self._cut(offset)
        for other in self._in_flight:
            other.covers = min(other.covers, self._durable)
        failure = WalWriteError(
            exc.errno, f"write-ahead log {self._path(self.segment)}: fdatasync failed: "
            f"{describe(exc)}; the {count} records ({lost} bytes) written since the last "
            f"successful sync may not be on disk: they were cut off and are not "
            f"acknowledged; the log continues at byte {offset}")
        for listener in self.cut_listeners:
            listener(self._durable, failure)
        return failure

    def commit(self) -> None:
        """Flush, and under the 'always' policy fdatasync now, blocking (WalWriteError).

        For rotation, shutdown and tools; the server's connections use
        ``common.group_commit``, which runs the sync off the event loop. A sync of the
        group commit still running is waited for and applied first: two syncs of one
        file must not race, as only the first to run reports a writeback error.
        """
        self.flush()
        if self.fsync != "always":
            return
        for running in list(self._in_flight):
            running.run(self.datasync)  # waits for it if a worker thread runs it
            self.finish_sync(running)
        ticket = self.start_sync()
        if ticket is not None:
            ticket.run(self.datasync)
            self.finish_sync(ticket)

    def ensure_after(self, position: int) -> None:
        """Continue in a segment numbered above ``position``'s (a wiped state dir)."""
        if segment_of(position) >= self.segment:
            self.commit()
            self._start_segment(segment_of(position) + 1)

    def last_seq(self, producer: str) -> int:
        """The producer's highest durably logged sequence number (0: none)."""
        state = self.producers.get(producer)
        return state.seq if state else 0

    def seen_seq(self, producer: str) -> int:
        """The highest sequence number appended and not failed, durable or not."""
        return max(self._seen.get(producer, 0), self.last_seq(producer))

    # --- truncation -------------------------------------------------------------------

    def rotate_if_due(self, max_age_seconds: float) -> None:
        """Start a new segment when the current one is large or old, and not empty.
        WalWriteError: the log stays in the current segment."""
        size = self._written + len(self._pending)
        if size and (size >= self.segment_bytes
                     or time.monotonic() - self._opened_at >= max_age_seconds):
            self.commit()
            self._start_segment(self.segment + 1)

    def release_before(self, segment: int) -> int:
        """Remove segments numbered below ``segment``; their buckets are all written.

        The producers' last sequence numbers are saved first, so that deduplication of
        frames that were in those segments survives a restart. Returns bytes freed.
        WalWriteError: nothing was removed (or, if the directory sync failed, the
        removal may not be durable yet; producers.msgpack already covers it).
        """
        old = [n for n in self._segments() if n < min(segment, self.segment)]
        if not old:
            return 0
        self.save_producers()
        freed = 0
        try:
            for number in old:
                path = self._path(number)
                freed += path.stat().st_size
                path.unlink()
            sync_directory(self.directory)
        except OSError as exc:
            raise WalWriteError(exc.errno, f"{self.directory}: cannot remove released log "
                                f"segments: {describe(exc)}") from None
        return freed

    def save_producers(self) -> None:
        """Write producers.msgpack, dropping producers silent for ``producer_ttl``."""
        cutoff = time.time() - self.producer_ttl
        self.producers = {name: state for name, state in self.producers.items()
                          if state.seen_at >= cutoff or name in self._seen}
        path = self.directory / PRODUCERS_FILE
        content = producers_content(self.producers, self.segment + 1)
        try:
            replace_file(path, content, self._write, self.datasync)
        except OSError as exc:
            raise WalWriteError(exc.errno, f"{path}: cannot save the producers' sequence "
                                f"numbers: {describe(exc)}; the previous file is kept and "
                                "no log segment was released") from None

    def size_bytes(self) -> int:
        total = 0
        for number in self._segments():
            with contextlib.suppress(FileNotFoundError):
                total += self._path(number).stat().st_size
        return total

    def close(self) -> None:
        """Commit what is appended and release the directory (also if that fails)."""
        try:
            if self._fd is not None:
                self.commit()
        finally:
            self._close_files()

    def _close_files(self) -> None:
        for ticket in self._in_flight:
            ticket.abandon()
        self._in_flight.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

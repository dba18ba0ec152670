"""tdagg-wal-repair: make a damaged write-ahead log readable again, keeping every intact
record. For when a server refuses to start with "damaged record ... followed by N intact
records" (or a damaged producers.msgpack).

Records keep their byte offsets, because database rows remember the log position of the
last record merged into them: damaged bytes between intact records are overwritten with
padding records the server skips, and only damaged bytes after the last intact record of
a segment are cut off.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from common.wal import (
    PRODUCERS_FILE,
    REPAIR_COMMAND,
    SegmentScan,
    StateDirError,
    WalCorrupt,
    describe,
    load_producers,
    lock_directory,
    open_private,
    padding,
    producers_content,
    producers_from_records,
    read_log,
    replace_file,
    scan_segment,
    segment_numbers,
    segment_path,
    write_all,
)

DESCRIPTION = """\
Repairs the write-ahead log in STATE_DIR (a td-server's or non-td-server's --state-dir)
after the server refused to start because of damaged records.

For every log segment with damaged bytes it first copies the segment to
NAME.damaged-TIMESTAMP (the evidence is kept), then rewrites the segment: every intact
record stays, at its byte offset (database rows remember log positions); damaged bytes
between intact records are replaced by padding the server skips; damaged bytes after the
last intact record are cut off. It prints, per file, the records kept and the damaged
bytes with their offsets. A damaged producers.msgpack is copied the same way and rebuilt
from the segments.

Stop the server first: the tool takes the state directory's lock and refuses to run
while a server holds it.
"""

EPILOG = "exit status: 0 repaired (or nothing to repair), 1 on any error"

# Padding is a record: header and at least one byte of payload.
_SMALLEST_PADDING = 9


class RepairError(Exception):
    pass


def repaired_content(data: bytes, scan: SegmentScan) -> tuple[bytes, list[str]]:
    """The segment with its damage padded or cut, and a line per damaged range."""
    fixed = bytearray(data)
    notes = []
    for damage in scan.damage:
        if not scan.records_after(damage.offset):
            notes.append(f"{len(data) - damage.offset} bytes cut at offset {damage.offset} "
                         "(nothing intact after them)")
            del fixed[damage.offset:]
            break
        if damage.length < _SMALLEST_PADDING:
            raise RepairError(
                f"{damage.length} damaged bytes at offset {damage.offset} are fewer than "
                f"the {_SMALLEST_PADDING} a padding record needs; not repaired")
        fixed[damage.offset:damage.offset + damage.length] = padding(damage.length)
        notes.append(f"{damage.length} bytes skipped at offset {damage.offset} "
                     "(replaced by padding)")
    return bytes(fixed), notes


def check_repaired(fixed: bytes, scan: SegmentScan, number: int) -> None:
    """The rewritten segment must read back as exactly the intact records, undamaged."""
    again = scan_segment(fixed, number)
    if again.damage or again.records != scan.records:
        raise RepairError("the rewritten segment does not read back as the intact "
                          "records; not repaired")


def keep_copy(path: Path, data: bytes, stamp: str) -> Path:
    """Write ``data`` to NAME.damaged-STAMP next to ``path``, synced, mode 0600."""
    copy = path.with_name(f"{path.name}.damaged-{stamp}")
    fd = open_private(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return copy


def repair_segment(path: Path, number: int, stamp: str, dry_run: bool, out: TextIO) -> None:
    data = path.read_bytes()
    scan = scan_segment(data, number)
    if not scan.damage:
        print(f"{path.name}: intact, {len(scan.records)} records", file=out)
        return
    fixed, notes = repaired_content(data, scan)
    check_repaired(fixed, scan, number)
    summary = f"{path.name}: {len(scan.records)} records kept; " + "; ".join(notes)
    if dry_run:
        print(f"{summary} (dry run: not changed)", file=out)
        return
    copy = keep_copy(path, data, stamp)
    replace_file(path, fixed)
    print(f"{summary}; the original is kept as {copy.name}", file=out)


def repair_producers(directory: Path, stamp: str, dry_run: bool, out: TextIO) -> None:
    path = directory / PRODUCERS_FILE
    try:
        load_producers(path)
        return
    except WalCorrupt as exc:
        cause = str(exc).split(". It holds", 1)[0]  # "PATH is damaged (why; N bytes)"
    segments = segment_numbers(directory)
    producers = producers_from_records(read_log(directory), time.time())
    summary = (f"{PRODUCERS_FILE}: damaged; rebuilt from the segments with {len(producers)} "
               "producers (producers whose segments were already released are forgotten: "
               f"a forwarder of one of them that reconnects is told it has nothing logged); "
               f"it was: {cause}")
    if dry_run:
        print(f"{summary} (dry run: not changed)", file=out)
        return
    copy = keep_copy(path, path.read_bytes(), stamp)
    replace_file(path, producers_content(producers, max(segments, default=0) + 1))
    print(f"{summary}; the original is kept as {copy.name}", file=out)


def repair(directory: Path, dry_run: bool, out: TextIO, err: TextIO) -> int:
    if not directory.is_dir():
        print(f"{REPAIR_COMMAND}: error: {directory} is not a directory", file=err)
        return 1
    try:
        lock = lock_directory(directory, REPAIR_COMMAND)
    except StateDirError as exc:
        print(f"{REPAIR_COMMAND}: error: {exc}. Stop the server before repairing its log.",
              file=err)
        return 1
    failed = False
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        for number in segment_numbers(directory):
            path = segment_path(directory, number)
            try:
                repair_segment(path, number, stamp, dry_run, out)
            except (RepairError, OSError) as exc:
                cause = describe(exc) if isinstance(exc, OSError) else str(exc)
                print(f"{REPAIR_COMMAND}: error: {path}: {cause}", file=err)
                failed = True
        try:
            repair_producers(directory, stamp, dry_run, out)
        except (StateDirError, OSError) as exc:
            cause = describe(exc) if isinstance(exc, OSError) else str(exc)
            print(f"{REPAIR_COMMAND}: error: {directory / PRODUCERS_FILE}: {cause}", file=err)
            failed = True
    finally:
        os.close(lock)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=REPAIR_COMMAND, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state_dir", metavar="STATE_DIR", type=Path,
                        help="the server's state directory (its --state-dir)")
    parser.add_argument("--dry-run", action="store_true",
                        help="report what would be repaired; change nothing")
    args = parser.parse_args(argv)
    return repair(args.state_dir, args.dry_run, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""tdagg-wal-repair (common/wal_repair.py) on damaged logs in a temporary directory."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from common import wal_repair
from common.wal import Record, WalCorrupt, WriteAheadLog, lock_directory, read_log

REPO = Path(__file__).parent.parent


def body(i: int) -> bytes:
    return msgpack.packb({"type": "data", "seq": i, "items": [[f"m{i}", i * 1.5]]})


def logged(directory: Path, count: int, segments: int = 1) -> list[Record]:
    """A log of ``count`` records per segment, closed; returns what it holds."""
    log = WriteAheadLog(directory, role="td")
    log.open()
    seq = 0
    for number in range(segments):
        if number:
            log.rotate_if_due(0)
        for _ in range(count):
            seq += 1
            log.append("p", "r", seq, body(seq))
        log.commit()
    log.close()
    return read_log(directory)


def damage(path: Path, start: int, end: int, fill: bytes | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[start:end] = fill if fill is not None else bytes(b ^ 0x5A for b in data[start:end])
    path.write_bytes(bytes(data))


def offset(record: Record) -> int:
    return record.position & ((1 << 40) - 1)


def run(*args: str) -> tuple[int, str, str]:
    """tdagg-wal-repair ARGS: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = wal_repair.main(list(args))
    return code, out.getvalue(), err.getvalue()


def reopened(directory: Path) -> list[Record]:
    log = WriteAheadLog(directory, role="td")
    records = log.open()
    log.close()
    assert log.torn_tails == []
    return records


def only_segment(directory: Path) -> Path:
    (path,) = [p for p in directory.glob("wal-*.log") if p.stat().st_size]
    return path


def test_every_intact_record_is_kept_at_its_position(tmp_path: Path) -> None:
    records = logged(tmp_path, 10)
    path = only_segment(tmp_path)
    original = path.read_bytes()
    start, end = offset(records[3]), offset(records[4])
    damage(path, start + 10, start + 14)  # inside record 4's payload
    damaged = path.read_bytes()
    with pytest.raises(WalCorrupt):
        reopened(tmp_path)

    code, out, err = run(str(tmp_path))
    assert (code, err) == (0, "")
    assert f"{path.name}: 9 records kept; {end - start} bytes skipped at offset {start} " \
           "(replaced by padding)" in out
    (copy,) = tmp_path.glob(f"{path.name}.damaged-*")
    assert copy.name in out
    assert copy.read_bytes() == damaged  # the evidence is kept
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == len(original)

    # The server opens it, with every other record where it was (rows hold positions).
    assert reopened(tmp_path) == records[:3] + records[4:]
    code, out, _ = run(str(tmp_path))
    assert code == 0
    assert f"{path.name}: intact, 9 records" in out


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    records = logged(tmp_path, 5)
    path = only_segment(tmp_path)
    damage(path, offset(records[1]), offset(records[1]) + 3)
    before = sorted(p.name for p in tmp_path.iterdir()), path.read_bytes()
    code, out, err = run(str(tmp_path), "--dry-run")
    assert (code, err) == (0, "")
    assert "4 records kept" in out
    assert "(dry run: not changed)" in out
    assert (sorted(p.name for p in tmp_path.iterdir()), path.read_bytes()) == before


def test_a_lost_page_and_a_torn_tail_in_several_segments(tmp_path: Path) -> None:
    records = logged(tmp_path, 150, segments=2)
    first, second = sorted(tmp_path.glob("wal-*.log"))[:2]
    size = first.stat().st_size
    damage(first, 4096, 8192, bytes(4096))  # a page that never reached the disk
    with open(first, "r+b") as f:
        f.truncate(size - 5)  # and the torn end of the first segment, records after it
    with pytest.raises(WalCorrupt):
        reopened(tmp_path)

    code, out, err = run(str(tmp_path))
    assert (code, err) == (0, "")
    ends = [offset(r) for r in records[1:150]] + [size]
    lost = {r for r, end in zip(records[:150], ends, strict=True)
            if offset(r) < 8192 and end > 4096 or end > size - 5}
    assert 2 <= len(lost) < 150
    assert reopened(tmp_path) == [r for r in records if r not in lost]
    first_lost = min(offset(r) for r in lost)
    last_kept_end = max(end for r, end in zip(records[:150], ends, strict=True)
                        if r not in lost)
    assert f"{first.name}: {150 - len(lost)} records kept; " in out
    assert f"bytes skipped at offset {first_lost} (replaced by padding)" in out
    assert f"{size - 5 - last_kept_end} bytes cut at offset {last_kept_end}" in out
    assert f"{second.name}: intact, 150 records" in out


def test_a_damaged_producers_file_is_rebuilt_from_the_segments(tmp_path: Path) -> None:
    logged(tmp_path, 3)
    log = WriteAheadLog(tmp_path, role="td")
    log.open()
    log.save_producers()
    log.close()
    path = tmp_path / "producers.msgpack"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(WalCorrupt, match="producers.msgpack is damaged"):
        reopened(tmp_path)
    code, out, err = run(str(tmp_path))
    assert (code, err) == (0, "")
    assert "producers.msgpack: damaged; rebuilt from the segments with 1 producers" in out
    assert list(tmp_path.glob("producers.msgpack.damaged-*"))
    log = WriteAheadLog(tmp_path, role="td")
    log.open()
    log.close()
    assert log.last_seq("p") == 3


def test_refused_while_a_server_holds_the_directory(tmp_path: Path) -> None:
    records = logged(tmp_path, 3)
    path = only_segment(tmp_path)
    damage(path, offset(records[1]), offset(records[1]) + 3)
    before = path.read_bytes()
    lock = lock_directory(tmp_path, "server")  # what a running server holds
    try:
        code, out, err = run(str(tmp_path))
    finally:
        os.close(lock)
    assert (code, out) == (1, "")
    assert f"in use by another server (pid {os.getpid()})" in err
    assert "Stop the server before repairing its log." in err
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.damaged-*"))


def test_damage_too_small_to_pad_is_an_error(tmp_path: Path) -> None:
    records = logged(tmp_path, 3)
    path = only_segment(tmp_path)
    data = path.read_bytes()
    at = offset(records[1])
    path.write_bytes(data[:at] + b"\x01\x02\x03" + data[at:])  # 3 stray bytes
    code, out, err = run(str(tmp_path))
    assert code == 1
    assert f"{path}: 3 damaged bytes at offset {at} are fewer than the 9" in err
    assert not list(tmp_path.glob("*.damaged-*"))


def test_not_a_directory(tmp_path: Path) -> None:
    code, _, err = run(str(tmp_path / "missing"))
    assert code == 1
    assert "is not a directory" in err


def test_the_console_script_explains_itself() -> None:
    result = subprocess.run([sys.executable, "-m", "common.wal_repair", "--help"],
                            capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0
    for words in ("tdagg-wal-repair", "STATE_DIR", "--dry-run", "NAME.damaged-TIMESTAMP",
                  "Stop the server first", "exit status: 0"):
        assert words in result.stdout

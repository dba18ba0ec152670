"""The forwarder's spool file (k6_forward/spool.py): a bounded ring of frames on disk."""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path

import pytest

from common import protocol
from k6_forward.spool import Spool, SpoolError


def frame(seq: int, size: int = 40) -> bytes:
    """A real data frame; ``size`` only steers its length."""
    return protocol.data(seq, [["m", "x" * size, seq]])


def test_append_read_and_pop_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.spool", 10_000)
    frames = {seq: frame(seq, seq * 3) for seq in range(1, 8)}
    for seq, data in frames.items():
        spool.append(seq, data)
    assert len(spool) == 7
    assert spool.seqs() == list(range(1, 8))
    assert spool.live_bytes == spool.used == sum(map(len, frames.values()))
    assert spool.first() == (1, len(frames[1]))
    assert spool.last_seq() == 7
    assert spool.read(5) == frames[5]
    assert 5 in spool
    assert spool.pop_first() == (1, frames[1])
    assert spool.pop_first() == (2, frames[2])
    assert spool.first() == (3, len(frames[3]))
    assert [spool.read(s) for s in spool.seqs()] == [frames[s] for s in range(3, 8)]
    spool.release()


def test_file_is_created_lazily_truncated_when_empty_and_removed(tmp_path: Path) -> None:
    directory = tmp_path / "k6-forward-p"
    spool = Spool(directory / "td.spool", 10_000, remove_empty_dir=True)
    assert not directory.exists()
    assert spool.file_size == 0
    spool.append(1, frame(1))
    spool.append(2, frame(2))
    assert (directory / "td.spool").stat().st_size == spool.file_size > 0
    assert spool.discard_through(1) == 1
    assert spool.file_size > 0
    assert spool.discard_through(2) == 1
    assert not spool
    assert spool.file_size == 0           # truncated once everything left
    assert (directory / "td.spool").exists()
    spool.append(3, frame(3))              # usable again, from offset 0
    assert spool.read(3) == frame(3)
    spool.release()
    assert not directory.exists()          # file and its directory removed
    spool.append(4, frame(4))              # and usable again after a release
    assert spool.read(4) == frame(4)
    spool.release()
    assert not directory.exists()


def test_release_keeps_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    first = Spool(tmp_path / "d" / "td.spool", 1000, remove_empty_dir=True)
    second = Spool(tmp_path / "d" / "non_td.spool", 1000, remove_empty_dir=True)
    first.append(1, frame(1))
    second.append(1, frame(1))
    first.release()
    assert (tmp_path / "d" / "non_td.spool").exists()
    assert second.read(1) == frame(1)
    second.release()
    assert not (tmp_path / "d").exists()


def test_capacity_is_a_hard_bound(tmp_path: Path) -> None:
    size = len(frame(1))
    spool = Spool(tmp_path / "s.spool", 3 * size)
    for seq in (1, 2, 3):
        assert spool.fits(size)
        spool.append(seq, frame(seq))
    assert not spool.fits(1)
    with pytest.raises(ValueError, match="does not fit"):
        spool.append(4, frame(4))
    assert spool.seqs() == [1, 2, 3]
    assert spool.file_size == 3 * size
    assert not Spool(tmp_path / "t.spool", size - 1).fits(size)
    assert spool.fits(0, limit=3 * size)
    spool.discard_through(1)
    assert spool.fits(size)
    assert not spool.fits(size, limit=2 * size)
    spool.release()


def test_frames_wrap_around_the_end_of_the_file(tmp_path: Path) -> None:
    size = len(frame(1))
    capacity = 3 * size + size // 2        # the fourth frame must straddle the end
    spool = Spool(tmp_path / "s.spool", capacity)
    for seq in (1, 2, 3):
        spool.append(seq, frame(seq))
    assert spool.pop_first() == (1, frame(1))
    spool.append(4, frame(4))
    assert spool.read(4) == frame(4)
    assert spool.pop_first() == (2, frame(2))
    spool.append(5, frame(5))
    assert [spool.read(s) for s in spool.seqs()] == [frame(3), frame(4), frame(5)]
    assert spool.file_size <= capacity
    spool.release()


def test_a_refused_frame_leaves_from_the_middle(tmp_path: Path) -> None:
    size = len(frame(1))
    spool = Spool(tmp_path / "s.spool", 3 * size)
    for seq in (1, 2, 3):
        spool.append(seq, frame(seq))
    assert spool.discard(2)
    assert not spool.discard(2)
    assert 2 not in spool
    assert spool.seqs() == [1, 3]
    assert spool.live_bytes == 2 * size
    assert spool.used == 3 * size          # its space returns when the head passes it
    assert not spool.fits(size)
    assert spool.pop_first() == (1, frame(1))
    assert spool.used == size
    assert spool.first() == (3, size)
    assert spool.discard_through(10) == 1
    assert spool.used == spool.live_bytes == 0
    spool.release()


def test_refusals_of_misuse(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.spool", 1000)
    spool.append(5, frame(5))
    with pytest.raises(ValueError, match="not above"):
        spool.append(5, frame(5))
    with pytest.raises(ValueError, match="empty"):
        spool.append(6, b"")
    with pytest.raises(KeyError):
        spool.read(4)
    spool.discard_through(5)
    with pytest.raises(IndexError):
        spool.pop_first()
    with pytest.raises(ValueError, match="at least 1"):
        Spool(tmp_path / "t.spool", 0)
    spool.release()


def test_a_failed_write_leaves_the_spool_unchanged(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    spool = Spool(blocker / "td.spool", 1000)
    with pytest.raises(SpoolError, match="cannot write"):
        spool.append(1, frame(1))
    assert not spool
    assert spool.used == spool.live_bytes == 0
    spool.release()


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_a_simple_queue(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice((300, 1000, 4096))
    spool = Spool(tmp_path / "s.spool", capacity)
    model: OrderedDict[int, bytes] = OrderedDict()
    next_seq = 1
    for _ in range(3000):
        op = rng.random()
        if op < 0.5:
            data = frame(next_seq, rng.randrange(1, 120))
            if spool.fits(len(data)):
                spool.append(next_seq, data)
                model[next_seq] = data
            else:
                with pytest.raises(ValueError, match="does not fit"):
                    spool.append(next_seq, data)
            next_seq += 1
        elif op < 0.7 and model:
            assert spool.pop_first() == model.popitem(last=False)
        elif op < 0.85 and model:
            through = rng.choice(list(model))
            expected = [s for s in model if s <= through]
            for s in expected:
                del model[s]
            assert spool.discard_through(through) == len(expected)
        elif model:
            seq = rng.choice(list(model))
            del model[seq]
            assert spool.discard(seq)
        assert spool.seqs() == list(model)
        assert spool.live_bytes == sum(map(len, model.values()))
        assert spool.live_bytes <= spool.used <= capacity
        assert spool.file_size <= capacity
        if model and rng.random() < 0.3:
            seq = rng.choice(list(model))
            assert spool.read(seq) == model[seq]
    for seq, data in model.items():
        assert spool.read(seq) == data
    spool.release()
    assert not (tmp_path / "s.spool").exists()

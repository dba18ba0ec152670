"""The aggregator interface both servers implement, and the open-bucket map they share.

A bucket's life: open (in ``OpenBuckets``) -> closing (swapped out, held by the flush
loop) -> written (the database confirmed) -> evicted. Nothing is evicted before it is
written; a failed write keeps the closing states for the next attempt.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Generic, Protocol, TypeVar

from common.protocol import Limits
from common.store.rows import BucketKey, Values

__all__ = ["Aggregator", "BucketKey", "Entry", "OpenBuckets", "absorb_entry"]

P = TypeVar("P")
S = TypeVar("S")


class Aggregator(Protocol[P, S]):
    """What a server adds to the shared skeleton: how to validate, merge and store."""

    role: str  # "td" (trend rows) or "non_td" (counter rows)

    def parse_item(self, item: object, limits: Limits,
                   notes: Counter[str] | None = None) -> P:
        """Validate one item; counts what was mended (e.g. tags_shortened) in notes."""
        ...

    def key_of(self, run_id: str, partial: P) -> BucketKey: ...

    def new_state(self, partial: P, producer: str) -> S: ...

    def add(self, state: S, partial: P, producer: str) -> None: ...

    def absorb(self, state: S, other: S) -> None: ...

    def from_stored(self, stored: Values) -> S:
        """A state rebuilt from a stored row's values (to merge late data into)."""
        ...

    def values(self, state: S) -> Values:
        """The row a state is stored as."""
        ...

    def samples(self, partial: P) -> int: ...

    def state_samples(self, state: S) -> int: ...


class Entry(Generic[S]):
    """A bucket state with the write-ahead-log span it holds and the frames it came from.

    ``first_segment`` keeps the log segments it came from alive until it is written, and
    ``first_position`` tells which frames are not in the database yet (a forwarder keeps
    those); ``last_position`` is stored with the row, so that a replay after a crash skips
    what the row already contains.

    ``sources``: per stream (a producer's frames to one server), the lowest and highest
    seq merged into ``state``. ``doubtful``: items that may already be in the row (sent
    again after a server was lost, or replayed from the log), kept apart as (stream, seq,
    partial, producer) and merged at the write only if the row's seq for their stream is
    below theirs. ``state`` is None while the entry holds doubtful items only.
    """

    __slots__ = ("state", "first_segment", "first_position", "last_position", "sources",
                 "doubtful", "written")

    def __init__(self, state: S | None, first_segment: int, last_position: int,
                 first_position: int | None = None) -> None:
        self.state = state
        self.first_segment = first_segment
        self.first_position = last_position if first_position is None else first_position
        self.last_position = last_position
        self.sources: dict[str, list[int]] = {}
        self.doubtful: list[tuple[str, int, Any, str]] = []
        self.written: S | None = None  # what the last write added to the row

    def add_source(self, source: str, seq: int) -> None:
        span = self.sources.get(source)
        if span is None:
            self.sources[source] = [seq, seq]
        else:
            span[0] = min(span[0], seq)
            span[1] = max(span[1], seq)


class OpenBuckets(Generic[P, S]):
    """Open bucket states keyed by BucketKey, with the swap that closes them."""

    def __init__(self, aggregator: Aggregator[P, S], bucket_seconds: int) -> None:
        self.aggregator = aggregator
        self.bucket_seconds = bucket_seconds
        self.entries: dict[BucketKey, Entry[S]] = {}

    def merge(self, run_id: str, producer: str, partial: P, position: int = 0,
              segment: int = 0, source: str | None = None, seq: int = 0,
              doubtful: bool = False) -> None:
        """Merge a partial from log ``position``; with ``source``, from frame ``seq`` of
        that stream (kept apart when ``doubtful``)."""
        key = self.aggregator.key_of(run_id, partial)
        entry = self.entries.get(key)
        if entry is None:
            state = None if doubtful else self.aggregator.new_state(partial, producer)
            entry = self.entries[key] = Entry(state, segment, position)
        else:
            if not doubtful:
                if entry.state is None:
                    entry.state = self.aggregator.new_state(partial, producer)
                else:
                    self.aggregator.add(entry.state, partial, producer)
            entry.first_position = min(entry.first_position, position)
            entry.last_position = max(entry.last_position, position)
        if doubtful:
            entry.doubtful.append((source or "", seq, partial, producer))
        elif source is not None:
            entry.add_source(source, seq)

    def take_closable(self, now: float, grace: float) -> dict[BucketKey, Entry[S]]:
        """Swap out every bucket whose end + grace has passed (wall clock)."""
        close_before = now - grace - self.bucket_seconds
        closable = [key for key in self.entries if key[3] <= close_before]
        return {key: self.entries.pop(key) for key in closable}

    def take_run(self, run_id: str) -> dict[BucketKey, Entry[S]]:
        """Swap out every bucket of one run, whatever its time."""
        keys = [key for key in self.entries if key[0] == run_id]
        return {key: self.entries.pop(key) for key in keys}

    def take_all(self) -> dict[BucketKey, Entry[S]]:
        entries, self.entries = self.entries, {}
        return entries

    def __len__(self) -> int:
        return len(self.entries)


def absorb_entry(aggregator: Aggregator[Any, S], into: Entry[S], other: Entry[S]) -> None:
    if other.state is not None:
        if into.state is None:
            into.state = other.state
        else:
            aggregator.absorb(into.state, other.state)
    into.first_segment = min(into.first_segment, other.first_segment)
    into.first_position = min(into.first_position, other.first_position)
    into.last_position = max(into.last_position, other.last_position)
    for source, (low, high) in other.sources.items():
        into.add_source(source, low)
        into.add_source(source, high)
    into.doubtful += other.doubtful

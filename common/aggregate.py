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
    """A bucket state with the write-ahead-log span it holds.

    ``first_segment`` keeps the log segments it came from alive until it is written;
    ``last_position`` is stored with the row, so that a replay after a crash skips what
    the row already contains.
    """

    __slots__ = ("state", "first_segment", "last_position")

    def __init__(self, state: S, first_segment: int, last_position: int) -> None:
        self.state = state
        self.first_segment = first_segment
        self.last_position = last_position


class OpenBuckets(Generic[P, S]):
    """Open bucket states keyed by BucketKey, with the swap that closes them."""

    def __init__(self, aggregator: Aggregator[P, S], bucket_seconds: int) -> None:
        self.aggregator = aggregator
        self.bucket_seconds = bucket_seconds
        self.entries: dict[BucketKey, Entry[S]] = {}

    def merge(self, run_id: str, producer: str, partial: P, position: int = 0,
              segment: int = 0) -> None:
        key = self.aggregator.key_of(run_id, partial)
        entry = self.entries.get(key)
        if entry is None:
            self.entries[key] = Entry(self.aggregator.new_state(partial, producer), segment,
                                      position)
        else:
            self.aggregator.add(entry.state, partial, producer)
            entry.last_position = max(entry.last_position, position)

    def take_closable(self, now: float, grace: float) -> dict[BucketKey, Entry[S]]:
        """Swap out every bucket whose end + grace has passed (wall clock)."""
        close_before = now - grace - self.bucket_seconds
        closable = [key for key in self.entries if key[3] <= close_before]
        return {key: self.entries.pop(key) for key in closable}

    def take_all(self) -> dict[BucketKey, Entry[S]]:
        entries, self.entries = self.entries, {}
        return entries

    def __len__(self) -> int:
        return len(self.entries)


def absorb_entry(aggregator: Aggregator[Any, S], into: Entry[S], other: Entry[S]) -> None:
    aggregator.absorb(into.state, other.state)
    into.first_segment = min(into.first_segment, other.first_segment)
    into.last_position = max(into.last_position, other.last_position)

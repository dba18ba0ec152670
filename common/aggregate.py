"""The aggregator interface both servers implement, and the open-bucket map they share.

A bucket's life: open (in ``OpenBuckets``) -> closing (swapped out, held by the flush
loop) -> written (the database confirmed) -> evicted. Nothing is evicted before it is
written; a failed write keeps the closing states for the next attempt.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

from common.protocol import Limits

# (run_id, metric, sorted tag pairs, bucket start)
BucketKey = tuple[str, str, tuple[tuple[str, str], ...], int]

P = TypeVar("P")
S = TypeVar("S")


class Aggregator(Protocol[P, S]):
    """What a server adds to the shared skeleton: how to validate, merge and store."""

    role: str
    table: str
    # Columns written, in order, after the four key columns (bucket, run_id, metric, tags)
    # and bucket_seconds.
    value_columns: tuple[str, ...]
    # Columns read back from a stored row when late data must be merged into it.
    stored_columns: tuple[str, ...]

    def parse_item(self, item: object, limits: Limits) -> P: ...

    def key_of(self, run_id: str, partial: P) -> BucketKey: ...

    def new_state(self, partial: P, producer: str) -> S: ...

    def add(self, state: S, partial: P, producer: str) -> None: ...

    def absorb(self, state: S, other: S) -> None: ...

    def from_stored(self, stored: Any) -> S:
        """A state rebuilt from a stored row's ``stored_columns``."""
        ...

    def values(self, state: S) -> tuple[Any, ...]: ...

    def samples(self, partial: P) -> int: ...


class OpenBuckets(Generic[P, S]):
    """Open bucket states keyed by BucketKey, with the swap that closes them."""

    def __init__(self, aggregator: Aggregator[P, S], bucket_seconds: int) -> None:
        self.aggregator = aggregator
        self.bucket_seconds = bucket_seconds
        self.states: dict[BucketKey, S] = {}

    def merge(self, run_id: str, producer: str, partial: P) -> None:
        key = self.aggregator.key_of(run_id, partial)
        state = self.states.get(key)
        if state is None:
            self.states[key] = self.aggregator.new_state(partial, producer)
        else:
            self.aggregator.add(state, partial, producer)

    def take_closable(self, now: float, grace: float) -> dict[BucketKey, S]:
        """Swap out every bucket whose end + grace has passed (wall clock)."""
        close_before = now - grace - self.bucket_seconds
        closable = [key for key in self.states if key[3] <= close_before]
        return {key: self.states.pop(key) for key in closable}

    def take_all(self) -> dict[BucketKey, S]:
        states, self.states = self.states, {}
        return states

    def __len__(self) -> int:
        return len(self.states)

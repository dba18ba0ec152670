"""The storage interface: what the servers write and what the tools read.

A ``Store`` is one database. Its write side is the schema, one ``BucketWriter`` per
server role (batch writes that merge late data and skip what an earlier attempt
committed, and the write-ahead-log positions rows hold), generator rows, input claims
and threshold evaluations. Its read side is a ``StoreView``: one consistent snapshot of
runs, series, rows, totals and generators. Backends live in sub-packages, one per store;
nothing outside them talks to a database.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from common.store.rows import (
    TREND,
    BucketKey,
    Evaluation,
    Extent,
    Footprint,
    GeneratorInfo,
    MergedTrend,
    MetricTotals,
    Policies,
    RunInfo,
    Series,
    StoredRow,
    TrendRow,
)

if TYPE_CHECKING:
    from common.aggregate import Aggregator, Entry
    from common.generators import GeneratorRow

log = logging.getLogger(__name__)


class StoreError(Exception):
    """The store failed a request. The message names the store (never a password)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached, or stopped answering: the same request may pass
    later."""


class SchemaMissing(StoreError):
    """The store has no tdagg tables: no server has written to it."""


class RowsRefused(StoreError):
    """The store refuses the data itself: retrying the same rows can never pass."""


def is_permanent(exc: BaseException) -> bool:
    """Whether a failed batch write can never succeed by retrying that same batch.

    True for data the store refuses and for Python errors raised while encoding a row
    (the same entries raise them again). False for everything else, unknown errors
    included, since dropping data on a passing fault is worse than retrying.
    """
    if isinstance(exc, StoreError):
        return isinstance(exc, RowsRefused)
    return isinstance(exc, ValueError | TypeError | ArithmeticError)


class BucketWriter(ABC):
    """Writes the closed buckets of one server role's table, as one writer.

    ``writer_id`` names the write-ahead log whose positions the entries carry (a server's
    log identity). Each row keeps the last position of every writer that merged into it,
    so several servers may write the same row: a retry or a replay is recognised per
    writer, and a wiped state directory (a new log identity) starts afresh.
    """

    def __init__(self, aggregator: Aggregator[Any, Any], bucket_seconds: int,
                 writer_id: str = "") -> None:
        self.aggregator = aggregator
        self.bucket_seconds = bucket_seconds
        self.writer_id = writer_id
        # Entries whose streams the row held in part: their merged state cannot be split,
        # so the row may count some frames twice (said in the log, counted here).
        self.overlaps = 0

    def contribution(self, key: BucketKey, entry: Entry[Any],
                     stored_sources: Mapping[str, int]) -> tuple[Any, dict[str, int]]:
        """What ``entry`` adds to a row holding ``stored_sources`` (stream -> highest seq
        merged), as a state (None: nothing), and the row's sources after the write.

        A doubtful item counts only if its seq is above the row's for its stream. The
        entry's own state counts unless the row already holds every stream of it up to
        its highest seq (a lost server's frames, stored by the server they were sent to
        again). Never changes the entry, so that a failed write can be retried as is.
        The result is also kept as ``entry.written``, for the live thresholds."""
        agg = self.aggregator
        sources = dict(stored_sources)
        added = entry.state
        if added is not None and entry.sources:
            held = [stored_sources.get(s, 0) >= high for s, (_, high) in entry.sources.items()]
            if all(held):
                added = None
            elif any(stored_sources.get(s, 0) >= low for s, (low, _) in entry.sources.items()):
                self.overlaps += 1
                log.error("row %r holds part of the frames merged into its entry (a server "
                          "was lost while it wrote them); they may count twice", key[:2])
            for source, (_, high) in entry.sources.items():
                sources[source] = max(sources.get(source, 0), high)
        fresh = None
        for source, seq, partial, producer in entry.doubtful:
            if seq <= stored_sources.get(source, 0):
                continue
            if fresh is None:
                fresh = agg.new_state(partial, producer)
            else:
                agg.add(fresh, partial, producer)
            if source:
                sources[source] = max(sources.get(source, 0), seq)
        if fresh is not None:
            if added is not None:
                agg.absorb(fresh, added)
            added = fresh
        entry.written = added
        return added, sources

    @abstractmethod
    async def write(self, entries: Mapping[BucketKey, Entry[Any]]) -> int:
        """Write a batch atomically; return how many rows held late data.

        Idempotent, so that any failure may be retried with the same entries: a stored
        row whose position for this writer already reaches an entry's last position
        holds that entry (an earlier attempt committed it), and the entry is skipped.
        Two writers merging into one row at the same time never lose an update. Late data is
        merged into a state rebuilt from the stored row (aggregator.from_stored), never
        into the entry's own state. Any part of a batch may be written on its own."""

    @abstractmethod
    async def stored_positions(self, keys: Sequence[BucketKey]) -> dict[BucketKey, int]:
        """This writer's last log position that each existing row already contains (a
        row written before writers had identities: the position it holds)."""

    @abstractmethod
    async def max_position(self) -> int:
        """The highest log position any row of this table holds (0 when none)."""

    async def write_each(self, entries: Mapping[BucketKey, Entry[Any]]
                         ) -> tuple[int, dict[BucketKey, BaseException]]:
        """Write a batch, setting aside the entries that can never be written.

        Returns (rows that held late data, {key: error} of the entries set aside); every
        other entry is written. A batch that fails permanently (is_permanent) is split in
        halves, each written on its own, down to single entries: k bad entries among n
        cost about 2·k·log2(n) extra writes. Any other failure is raised as is, and the
        whole batch may be retried (halves written before it are skipped: write is
        idempotent).
        """
        try:
            return await self.write(entries), {}
        except Exception as exc:
            if not is_permanent(exc):
                raise
            if len(entries) <= 1:
                return 0, {key: exc for key in entries}
        items = list(entries.items())
        middle = len(items) // 2
        late_first, failed_first = await self.write_each(dict(items[:middle]))
        late_second, failed_second = await self.write_each(dict(items[middle:]))
        return late_first + late_second, failed_first | failed_second


class StoreView(ABC):
    """The read side, over one consistent snapshot."""

    @abstractmethod
    async def runs(self) -> list[RunInfo]:
        """Every stored run, latest last bucket first."""

    @abstractmethod
    async def series(self, run_id: str) -> list[Series]: ...

    @abstractmethod
    async def extent(self, run_id: str, start: datetime | None, end: datetime | None
                     ) -> Extent | None:
        """Time covered by the run's buckets that overlap [start, end); None if none
        do."""

    @abstractmethod
    async def last_sample(self, run_id: str) -> tuple[float, float] | None:
        """(end of the run's last bucket, time of the latest sample recorded in it).

        Only gauges store a sample time (each generator's latest); k6 samples ``vus``
        every second, so this is within about a second of the run's end."""

    @abstractmethod
    async def gauge_producers(self, run_id: str, start: datetime | None,
                              end: datetime | None) -> set[str]:
        """Producer ids of the k6-forward processes named in the window's gauge rows."""

    @abstractmethod
    async def generators(self, run_id: str) -> list[GeneratorInfo] | None:
        """The run's generators, earliest start first; None when the store has no
        generator table (servers of a release before it)."""

    @abstractmethod
    def rows(self, table: str, run_id: str, start: datetime | None, end: datetime | None,
             where: Mapping[str, str], metrics: Sequence[str] | None = None
             ) -> AsyncIterator[StoredRow]:
        """The run's rows of one table (rows.TREND or rows.COUNTER) overlapping
        [start, end) whose tags include ``where``, ordered by metric then bucket; only
        of ``metrics`` when given."""

    async def merged_trends(self, run_id: str, metric: str, start: datetime | None,
                            end: datetime | None, where: Mapping[str, str],
                            per_seconds: int | None = None) -> list[MergedTrend]:
        """The metric's trend rows overlapping [start, end) whose tags include ``where``,
        merged over every tag set: one group for the whole window, or one per
        ``per_seconds`` (groups start at multiples of it), in time order."""
        groups: dict[float, list[TrendRow]] = {}
        first = float("inf")
        async for row in self.rows(TREND, run_id, start, end, where, [metric]):
            if isinstance(row.values, TrendRow):
                first = min(first, row.bucket)
                at = 0.0 if per_seconds is None else row.bucket // per_seconds * per_seconds
                groups.setdefault(at, []).append(row.values)
        return [MergedTrend(first if per_seconds is None else at,
                            sum(v.count for v in values), min(v.min for v in values),
                            max(v.max for v in values), sum(v.zeros for v in values),
                            tuple(v.digest for v in values))
                for at, values in sorted(groups.items())]

    @abstractmethod
    async def row_keys(self, run_id: str) -> set[tuple[str, int]]:
        """(metric, bucket start) of every row of the run, in either table."""

    @abstractmethod
    async def totals(self, run_id: str) -> list[MetricTotals]:
        """Per metric and table: rows, samples, the samples' sum and nonzero samples."""

    @abstractmethod
    async def evaluations(self, run_id: str) -> list[Evaluation]:
        """Every stored threshold evaluation of the run, oldest first."""


class Store(ABC):
    """One database. ``label`` names it for humans and never shows a password."""

    label: str

    @abstractmethod
    async def open(self, connections: int = 3) -> None:
        """Connect; StoreUnavailable (what was tried, and why) when it cannot."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ensure_schema(self, policies: Policies | None = None) -> None:
        """Create the tables if missing, and apply the policies; StoreError saying what
        is missing when a policy cannot be applied."""

    @abstractmethod
    async def ping(self) -> None:
        """Return once the store answers; StoreUnavailable otherwise."""

    @abstractmethod
    def writer(self, aggregator: Aggregator[Any, Any], bucket_seconds: int,
               writer_id: str = "") -> BucketWriter:
        """The bucket writer of the aggregator's role, writing as ``writer_id``."""

    @abstractmethod
    async def record_generators(self, rows: Sequence[GeneratorRow]) -> None:
        """Upsert generator rows; a field a row does not know keeps its stored value."""

    @abstractmethod
    async def mark_written(self, role: str, keys: Sequence[tuple[str, str]]) -> None:
        """Every bucket of these (run, producer) generators that the role's server holds
        is stored; the first such time is kept."""

    @abstractmethod
    async def claim_input(self, run_id: str, role: str, input_id: str,
                          producer: str) -> tuple[str, float]:
        """Record that ``producer`` sends ``input_id`` in ``run_id``; return the producer
        that claimed it first and when (epoch seconds): another one means a rerun."""

    @abstractmethod
    async def record_evaluations(self, rows: Sequence[Evaluation]) -> None: ...

    @abstractmethod
    async def footprint(self) -> Footprint:
        """Rows of both bucket tables, and their bytes on disk (None if not on disk)."""

    @abstractmethod
    def snapshot(self) -> contextlib.AbstractAsyncContextManager[StoreView]:
        """The read side over one consistent snapshot, taken on entry."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

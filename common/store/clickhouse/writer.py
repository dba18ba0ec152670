"""Batch writes of one server role's ClickHouse table: new row versions, never updates.

ClickHouse has no transactions and no upsert. A write therefore (1) reads the highest
write-ahead-log position each of the batch's keys holds (max(wal_pos) over its stored
versions: no FINAL needed), (2) skips an entry whose row already holds its last position
(the retry of an attempt that went through), (3) reads the current version (FINAL) of the
keys that exist and merges the late data into a state rebuilt from it, and (4) inserts one
new version per remaining entry, with the higher position, in one INSERT. The table keeps
the version with the highest wal_pos per key (ReplacingMergeTree(wal_pos), read with
FINAL). Each server role writes its own table from one flush loop, so nothing else
inserts a version of these keys between (1) and (4); a failure anywhere is retried as a
whole, and what was already inserted is skipped by (2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from common.store.base import BucketWriter
from common.store.clickhouse import tables
from common.store.rows import COUNTER, TREND, BucketKey, Values

if TYPE_CHECKING:
    from common.aggregate import Aggregator, Entry
    from common.store.clickhouse import ClickHouseStore

# Key lookups go out in groups of this many buckets per run: a statement stays small.
_BUCKETS_PER_QUERY = 500


class ChBucketWriter(BucketWriter):
    def __init__(self, store: ClickHouseStore, aggregator: Aggregator[Any, Any],
                 bucket_seconds: int, writer_id: str = "") -> None:
        # ClickHouse has no row locks: a row's versions carry one log position, so a row
        # must have one writer (one server per role; docs/CLICKHOUSE.md). writer_id is
        # kept for the interface only.
        super().__init__(aggregator, bucket_seconds, writer_id)
        self.store = store
        self.kind = TREND if aggregator.role == "td" else COUNTER
        self.table = store.table(tables.TABLES[self.kind])

    def _lookups(self, keys: Sequence[BucketKey]) -> list[str]:
        """WHERE clauses that cover the keys (and maybe more rows: filter by key)."""
        groups: dict[str, tuple[set[str], set[int]]] = {}
        for run_id, metric, _, bucket in keys:
            metrics, buckets = groups.setdefault(run_id, (set(), set()))
            metrics.add(metric)
            buckets.add(bucket)
        clauses = []
        for run_id, (metrics, buckets) in groups.items():
            ordered = sorted(buckets)
            for i in range(0, len(ordered), _BUCKETS_PER_QUERY):
                chunk = ordered[i:i + _BUCKETS_PER_QUERY]
                clauses.append(
                    f"run_id = {tables.string(run_id)} AND metric IN "
                    f"{tables.strings(sorted(metrics))} AND bucket IN ("
                    + ", ".join(f"toDateTime({b})" for b in chunk) + ")")
        return clauses

    async def stored_positions(self, keys: Sequence[BucketKey]) -> dict[BucketKey, int]:
        wanted = {(k[0], k[1], tables.tags_json(k[2]), k[3]): k for k in keys}
        found: dict[BucketKey, int] = {}
        for where in self._lookups(keys):
            rows = await self.store.engine.query(
                f"SELECT run_id, metric, tags, toUInt32(bucket), max(wal_pos) FROM "
                f"{self.table} WHERE {where} GROUP BY run_id, metric, tags, bucket")
            for run_id, metric, tags, bucket, position in rows:
                key = wanted.get((run_id, metric, tags, int(bucket)))
                if key is not None:
                    found[key] = int(position)
        return found

    async def _stored_values(self, keys: Sequence[BucketKey]) -> dict[BucketKey, Values]:
        wanted = {(k[0], k[1], tables.tags_json(k[2]), k[3]): k for k in keys}
        found: dict[BucketKey, Values] = {}
        columns = ", ".join(tables.VALUE_COLUMNS[self.kind])
        for where in self._lookups(keys):
            rows = await self.store.engine.query(
                f"SELECT run_id, metric, tags, toUInt32(bucket), {columns} FROM "
                f"{self.table} FINAL WHERE {where}")
            for row in rows:
                key = wanted.get((row[0], row[1], row[2], int(row[3])))
                if key is not None:
                    found[key] = tables.read_values(self.kind, row[4:])
        return found

    async def max_position(self) -> int:
        rows = await self.store.engine.query(f"SELECT max(wal_pos) FROM {self.table}")
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    async def write(self, entries: Mapping[BucketKey, Entry[Any]]) -> int:
        for key in entries:
            tables.check_key(key)
        positions = await self.stored_positions(list(entries))
        agg = self.aggregator
        # Rows here keep no streams (docs/CLICKHOUSE.md: one server per role): every
        # doubtful item counts.
        to_write = {key: self.contribution(key, entry, {})[0] for key, entry in entries.items()}
        written_positions = {key: entry.last_position for key, entry in entries.items()}
        merge = []
        for key, stored in positions.items():
            if stored >= entries[key].last_position > 0:
                del to_write[key]  # written by an attempt whose outcome was unknown
            else:
                merge.append(key)
                written_positions[key] = max(written_positions[key], stored)
        late = 0
        if merge:
            # Late data: merged into a state rebuilt from the stored row, never into the
            # closing state itself, so that a failed attempt can be retried as is.
            stored_values = await self._stored_values(merge)
            for key in merge:
                merged = agg.from_stored(stored_values[key])
                agg.absorb(merged, to_write[key])
                to_write[key] = merged
                late += 1
        rows = [tables.row_columns(key, self.bucket_seconds, agg.values(state),
                                   written_positions[key])
                for key, state in to_write.items() if state is not None]
        await self.store.engine.insert(self.table, tables.INSERT_COLUMNS[self.kind], rows)
        return late

"""What servers know of each load generator of a run, until the database has it. No I/O.

A forwarder sends a generator frame when it starts (host, k6 version, script) and when
its input has ended and every frame is acknowledged (exit status, first and last sample,
samples). Both are logged like data frames and become a row of ``generators``. Once a
generator has ended and this server has written every bucket that can hold its data, the
row is marked as written by this server's role: ``td-report --wait`` waits for that.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from common.aggregate import BucketKey
from common.protocol import Generator

GeneratorKey = tuple[str, str]  # (run id, producer)


@dataclass
class GeneratorRow:
    run_id: str
    producer: str
    host: str | None = None
    k6_version: str | None = None
    script: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    exit_status: int | None = None
    first_ns: int | None = None
    last_ns: int | None = None
    samples: int | None = None
    units: dict[str, str] | None = None

    def absorb(self, g: Generator) -> None:
        if g.state == "start":
            self.started_at = g.at
        else:
            self.ended_at = g.at
        for name in ("host", "k6_version", "script", "exit_status", "first_ns", "last_ns",
                     "samples", "units"):
            if getattr(g, name) is not None:
                setattr(self, name, getattr(g, name))


class GeneratorLedger:
    def __init__(self, bucket_seconds: int) -> None:
        self.bucket_seconds = bucket_seconds
        self.rows: dict[GeneratorKey, tuple[GeneratorRow, int]] = {}  # row, first segment
        # Ended generators whose buckets may not all be written: the start of their last
        # bucket (None without samples), and the log segment that holds their end.
        self.ended: dict[GeneratorKey, tuple[int | None, int]] = {}

    def note(self, run_id: str, producer: str, g: Generator, segment: int) -> None:
        key = (run_id, producer)
        row, first = self.rows.get(key, (GeneratorRow(run_id, producer), segment))
        row.absorb(g)
        self.rows[key] = (row, min(first, segment))
        if g.state == "end":
            last_bucket = None
            if g.last_ns is not None:
                second = g.last_ns // 1_000_000_000
                last_bucket = second - second % self.bucket_seconds
            self.ended[key] = (last_bucket, segment)

    def take_rows(self) -> dict[GeneratorKey, tuple[GeneratorRow, int]]:
        rows, self.rows = self.rows, {}
        return rows

    def put_back(self, rows: dict[GeneratorKey, tuple[GeneratorRow, int]]) -> None:
        for key, (row, first) in rows.items():
            newer = self.rows.get(key)
            if newer is not None:  # noted while the write was under way: it wins
                for name, value in vars(row).items():
                    if getattr(newer[0], name) is None:
                        setattr(newer[0], name, value)
                first = min(first, newer[1])
                row = newer[0]
            self.rows[key] = (row, first)

    def written(self, pending: Iterable[BucketKey]) -> list[GeneratorKey]:
        """Ended generators (with their rows stored) that no pending bucket can hold data
        of any more; they leave the ledger."""
        if not self.ended:
            return []
        oldest: dict[str, int] = {}
        for run_id, _, _, bucket in pending:
            if bucket < oldest.get(run_id, bucket + 1):
                oldest[run_id] = bucket
        done = []
        for key, (last_bucket, _) in self.ended.items():
            waiting = oldest.get(key[0])
            if key not in self.rows and (last_bucket is None or waiting is None
                                         or waiting > last_bucket):
                done.append(key)
        for key in done:
            del self.ended[key]
        return done

    def segments(self) -> list[int]:
        """Log segments still needed: the records of rows or marks not yet stored."""
        return [first for _, first in self.rows.values()] + [
            segment for _, segment in self.ended.values()]

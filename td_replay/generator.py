"""One simulated load generator: a copy of the recording, time-shifted, fed through
k6-forward's own LineAggregator and sent by its own ServerLinks under its own producer id.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from common import protocol
from common.protocol import CounterPartial, TrendPartial
from k6_forward.lines import LineAggregator
from k6_forward.link import ITEMS_PER_FRAME, ServerLink
from td_replay.recording import NS_PER_S, Recording, Shifter

# As in k6-forward: after this long without input, every open bucket is sent.
IDLE_FLUSH_SECONDS = 2.0


@dataclass(frozen=True)
class Settings:
    run_id: str
    td: tuple[str, int]
    non_td: tuple[str, int]
    tag_keys: tuple[str, ...]
    bucket_seconds: int
    local_grace: float
    max_unacked_bytes: int
    spool_dir: str | None
    speed: float | None  # None: as fast as the servers take it


@dataclass(frozen=True)
class DroppedFrame:
    number: int
    server: str
    items: int
    samples: int
    metrics: tuple[str, ...]


class Generator:
    def __init__(self, index: int, recording: Recording, shift_ns: int, settings: Settings,
                 report: IO[str], drop_frame: int | None = None) -> None:
        self.index = index
        self.recording = recording
        self.shifter = Shifter(shift_ns)
        self.shift_ns = shift_ns
        self.settings = settings
        self.producer = f"td-replay-g{index}-{uuid.uuid4().hex}"
        # Only generator 0 prints skipped lines: the others hold the same lines.
        self.lines = LineAggregator(settings.tag_keys, settings.bucket_seconds, report=report,
                                    max_reports=50 if index == 0 else 0)
        self.td = ServerLink("td-server", settings.td, self.producer, settings.run_id,
                             protocol.ROLE_TD, settings.max_unacked_bytes, report,
                             spool_dir=settings.spool_dir)
        self.non_td = ServerLink("non-td-server", settings.non_td, self.producer,
                                 settings.run_id, protocol.ROLE_NON_TD,
                                 settings.max_unacked_bytes, report,
                                 spool_dir=settings.spool_dir)
        self.drop_frame = drop_frame
        self.dropped: DroppedFrame | None = None
        self.frames_queued = 0  # data frames handed to the links (or dropped)
        self.items_sent = 0
        self.done = False

    @property
    def links(self) -> tuple[ServerLink, ServerLink]:
        return self.td, self.non_td

    def frames_acked(self) -> int:
        """Frames acknowledged (or refused) by the servers so far."""
        return sum(link.next_seq - 1 - link.unacked_frames for link in self.links)

    def frames_sent(self) -> int:
        return sum(link.next_seq - 1 for link in self.links)

    def refused(self) -> list[str]:
        return self.td.refused + self.non_td.refused

    def start(self) -> None:
        self.td.start()
        self.non_td.start()

    async def close(self) -> None:
        await self.td.close()
        await self.non_td.close()

    async def _send_frames(self, link: ServerLink, items: list[list[Any]],
                           partials: Sequence[TrendPartial | CounterPartial]) -> None:
        # One send_items call per frame, so that frames can be counted (and one dropped).
        for start in range(0, len(items), ITEMS_PER_FRAME):
            self.frames_queued += 1
            batch = items[start:start + ITEMS_PER_FRAME]
            if self.frames_queued == self.drop_frame:
                chosen = partials[start:start + ITEMS_PER_FRAME]
                self.dropped = DroppedFrame(
                    self.frames_queued, link.name, len(batch), sum(p.samples for p in chosen),
                    tuple(sorted({p.metric for p in chosen})))
                continue
            await link.send_items(batch)
            self.items_sent += len(batch)

    async def send(self, closed: tuple[list[TrendPartial], list[CounterPartial]]) -> None:
        trends, counters = closed
        if trends:
            await self._send_frames(self.td, [protocol.trend_item(p) for p in trends], trends)
        if counters:
            await self._send_frames(self.non_td, [protocol.counter_item(p) for p in counters],
                                    counters)

    async def run(self, started: float, delay: float = 0.0) -> None:
        """Feed every chunk (paced by event time unless --max; ``delay`` seconds of event
        time later than generator 0), send what closes, and return once both servers
        have acknowledged everything."""
        loop = asyncio.get_running_loop()
        speed = self.settings.speed
        grace = self.settings.local_grace
        first_ns = self.recording.first_ns
        for chunk in self.recording.chunks:
            if speed is not None:
                due = started + (max(chunk.end_ns - first_ns, 0) / NS_PER_S + delay) / speed
                wait = due - loop.time()
                if wait > IDLE_FLUSH_SECONDS:
                    await asyncio.sleep(IDLE_FLUSH_SECONDS)
                    await self.send(self.lines.close_all())
                    wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            lines = self.shifter.apply(chunk).split(b"\n")
            lines.pop()  # the block ends with a newline
            self.lines.feed(lines)
            await self.send(self.lines.close_ready(grace))
            # Let the links, the database poller and the other generators run.
            await asyncio.sleep(0)
        await self.send(self.lines.close_all())
        await self.td.wait_acked()
        await self.non_td.wait_acked()
        self.done = True

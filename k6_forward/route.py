"""The servers of one role, sharing its series: rendezvous hashing with failover.

Each series (metric and tag values) has an order over the role's servers: by a hash of
the series and each server's HOST:PORT, highest first (rendezvous hashing). Its partials
go to the first server in that order that is not failed over, so every forwarder given
the same servers, in any order, sends a series to the same one, and adding or removing
a server moves only the series it gains or loses.

A server that has been unreachable for ``failover_after`` seconds is failed over: its
series go to the next server in their order until it is reachable again; then new
buckets go back to it. Every frame it had not said is in the database goes to the next
servers too, with its origin (stream and seq): it may have lost its disk. Rows keep, per
stream, the highest seq they hold, so a frame it had stored, or stores from its log when
it is back, is not counted twice; and each writer's log position, so that a retry or a
replay is not either (common/store).

Generator and threshold frames go to every server of the role.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any

from common import protocol
from k6_forward.link import ServerLink

Series = tuple[str, tuple[tuple[str, str], ...]]
WATCH_EVERY = 0.5  # seconds between checks for failover while no items come


def series_of(item: list[Any]) -> Series:
    """The series of a trend item (tags second) or a counter item (tags third)."""
    tags = item[1] if isinstance(item[1], dict) else item[2]
    return item[0], tuple(sorted(tags.items()))


def rendezvous_order(series: Series, servers: Sequence[str]) -> list[int]:
    """Indexes of ``servers`` (HOST:PORT texts), the series' own server first."""
    metric, tags = series
    name = metric + "\0" + "\0".join(f"{k}\0{v}" for k, v in tags)

    def score(index: int) -> bytes:
        text = f"{servers[index]}\0{name}".encode(errors="surrogatepass")
        return hashlib.blake2b(text, digest_size=8).digest()

    return sorted(range(len(servers)), key=score, reverse=True)


class ServerGroup:
    """The links to one role's servers, used as one link is."""

    def __init__(self, name: str, links: Sequence[ServerLink], failover_after: float) -> None:
        assert links, "a role needs at least one server"
        self.name = name
        self.links = list(links)
        self.failover_after = failover_after
        self.servers = [f"{link.address[0]}:{link.address[1]}" for link in links]
        self._failed_over: set[int] = set()
        self._order = lru_cache(maxsize=1 << 16)(self._order_of)
        self._watcher: asyncio.Task[None] | None = None
        self._routing = 0  # _route calls under way

    def _order_of(self, series: Series) -> tuple[int, ...]:
        return tuple(rendezvous_order(series, self.servers))

    # --- as one link ------------------------------------------------------------------

    @property
    def input_id(self) -> str | None:
        return self.links[0].input_id

    @input_id.setter
    def input_id(self, value: str | None) -> None:
        for link in self.links:
            link.input_id = value

    @property
    def thresholds_frame(self) -> bytes | None:
        return self.links[0].thresholds_frame

    @thresholds_frame.setter
    def thresholds_frame(self, frame: bytes | None) -> None:
        for link in self.links:
            link.thresholds_frame = frame

    @property
    def on_verdicts(self) -> Callable[[dict[str, Any]], None] | None:
        return self.links[0].on_verdicts

    @on_verdicts.setter
    def on_verdicts(self, receive: Callable[[dict[str, Any]], None] | None) -> None:
        for link in self.links:
            link.on_verdicts = receive

    @property
    def unacked_frames(self) -> int:
        return sum(link.unacked_frames for link in self.links)

    @property
    def quarantined_rows(self) -> int:
        return sum(link.quarantined_rows for link in self.links)

    @property
    def refused_samples(self) -> Counter[str]:
        return sum((link.refused_samples for link in self.links), Counter())

    @property
    def refused_items(self) -> Counter[str]:
        return sum((link.refused_items for link in self.links), Counter())

    @property
    def refused(self) -> list[str]:
        return [text for link in self.links for text in link.refused]

    def start(self) -> None:
        for link in self.links:
            link.start()
        if len(self.links) > 1:
            self._watcher = asyncio.create_task(self._watch())

    async def send_generator(self, generator: protocol.Generator) -> None:
        """To every server not failed over (the generator rows are shared)."""
        for index, link in enumerate(self.links):
            if index not in self._failed_over:
                await link.send_generator(generator)

    async def wait_acked(self) -> None:
        """Return once every frame is in the database, as its server says (or refused).
        A server failed over meanwhile has its frames moved to the others, and they are
        waited for there."""
        while True:
            for link in self.links:
                await link.wait_acked()
            if not self._routing and not any(link.unacked_frames for link in self.links):
                return
            await asyncio.sleep(WATCH_EVERY / 10)

    async def wait_logged(self) -> None:
        """Return once every frame is logged by its server (or refused, or moved)."""
        while True:
            for link in self.links:
                await link.wait_logged()
            if not self._routing:
                return
            await asyncio.sleep(WATCH_EVERY / 10)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for link in self.links:
            await link.close()

    # --- routing ----------------------------------------------------------------------

    async def send_items(self, items: Sequence[list[Any]]) -> None:
        """Each item to its series' server (in their order per server)."""
        if len(self.links) == 1:
            await self.links[0].send_items(list(items))
            return
        usable, moved = self._check()
        with self._in_flight():
            await self._move(moved, usable)
            for index, batch in self._batches(items, usable).items():
                await self.links[index].send_items(batch)

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Until a link holds them, items are only here: wait_acked waits for them."""
        self._routing += 1
        try:
            yield
        finally:
            self._routing -= 1

    def _batches(self, items: Sequence[list[Any]], usable: set[int]
                 ) -> dict[int, list[list[Any]]]:
        batches: dict[int, list[list[Any]]] = {}
        for item in items:
            order = self._order(series_of(item))
            target = next((i for i in order if i in usable), order[0])
            batches.setdefault(target, []).append(item)
        return batches

    async def _move(self, moved: list[tuple[str, int, list[list[Any]]]],
                    usable: set[int]) -> None:
        """Frames taken from a failed-over server, each item to its series' next server,
        one frame per origin frame and server."""
        for source, source_seq, items in moved:
            for index, batch in self._batches(items, usable).items():
                await self.links[index].send_moved(source, source_seq, batch)

    async def _watch(self) -> None:
        """Fail over (and back) while no new items come, as at the end of a run."""
        while True:
            await asyncio.sleep(WATCH_EVERY)
            usable, moved = self._check()
            if moved:
                with self._in_flight():
                    await self._move(moved, usable)

    def _check(self) -> tuple[set[int], list[tuple[str, int, list[list[Any]]]]]:
        """The servers not failed over, and the frames a server failed over now had not
        said are in the database (to go to the others). Each change is said once."""
        usable = set()
        moved: list[tuple[str, int, list[list[Any]]]] = []
        for index, link in enumerate(self.links):
            down = link.down_for()
            if down >= self.failover_after:
                if index not in self._failed_over:
                    self._failed_over.add(index)
                    taken = link.take_held()
                    moved += taken
                    link.say(f"unreachable for {down:.0f}s (--failover-after "
                             f"{self.failover_after:g}): its series go to the next "
                             f"{self.name} in hash order until it is back, with the "
                             f"{sum(len(items) for _, _, items in taken)} partials of the "
                             f"{len(taken)} frames it had not stored (rows holding them "
                             "already do not count them twice)")
            else:
                if index in self._failed_over:
                    self._failed_over.discard(index)
                    link.say("reachable again: new buckets of its series go to it again")
                usable.add(index)
        return usable, moved

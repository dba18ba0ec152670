"""The forwarder's link to a server (k6_forward/link.py) over real loopback sockets:
resends after a cut, reconnects, spooling when memory is full, backpressure when the
spool is full too, and what it says on stderr about each."""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from common import protocol
from common.protocol import CounterPartial
from k6_forward.link import LinkRefused, ServerLink
from tests.utils import run_server, wait_until

pytestmark = pytest.mark.timeout(20)

BUCKET = int(time.time()) // 10 * 10 - 60


def item(i: int, metric: str = "http_reqs") -> list[Any]:
    value = float(i % 97 + 1)
    return protocol.counter_item(CounterPartial(
        metric, "counter", (("n", str(i % 5)),), BUCKET, 10, value, 1, 1, value, value,
        0, value))


def frame_size(address: tuple[str, int], i: int = 1) -> int:
    """The size of frame i as a link to ``address`` makes it (it names its stream)."""
    return len(protocol.data(i, [item(i)], f"{address[0]}:{address[1]}"))


class StubServer:
    """Speaks the protocol like common/server.py: a welcome with the producer's last
    merged seq, dedup by seq, cumulative acks. Records what it merged."""

    def __init__(self) -> None:
        self.last_seq: dict[str, int] = {}
        self.merged: list[int] = []
        self.items: list[Any] = []
        self.duplicates = 0
        self.connections = 0
        self.acks = asyncio.Event()   # cleared: merge but hold the acks (a slow server)
        self.acks.set()
        self.cut_after: int | None = None  # drop the connection after merging this many
        self.delay = 0.0              # > 0: a slow server, merging and acking frame by frame
        self.refuse: set[int] = set()
        self.refuse_hello: str | None = None
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        held = not self.acks.is_set()
        self.acks.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if held:
            self.acks.clear()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await self._converse(reader, writer)
        except (ConnectionError, protocol.FramingError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        limits = protocol.Limits()
        decoder = protocol.FrameDecoder()
        producer: str | None = None
        while chunk := await reader.read(65536):
            highest = 0
            for body in decoder.feed(chunk):
                message = protocol.unpack(body)
                if producer is None:
                    hello = protocol.parse_hello(message, limits)
                    if self.refuse_hello:
                        writer.write(protocol.error("wrong_server", self.refuse_hello,
                                                    None, fatal=True))
                        return
                    producer = hello.producer
                    writer.write(protocol.welcome(hello.role, self.last_seq.get(producer, 0)))
                    continue
                data = protocol.parse_data(message, limits)
                if data.seq in self.refuse:
                    writer.write(protocol.error("bad_item", "refused by the test", data.seq))
                    continue
                if data.seq <= self.last_seq.get(producer, 0):
                    self.duplicates += 1
                    highest = max(highest, data.seq)
                    continue
                self.merged.append(data.seq)
                self.items.extend(data.items)
                self.last_seq[producer] = highest = data.seq
                if self.cut_after is not None and len(self.merged) >= self.cut_after:
                    self.cut_after = None
                    writer.transport.abort()  # merged, never acknowledged
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                    writer.write(protocol.ack(data.seq))
            if highest:
                await self.acks.wait()
                if writer.is_closing():
                    return
                writer.write(protocol.ack(highest))
            await writer.drain()


class CuttingProxy:
    """Loopback TCP proxy. Connection k passes ``budgets[k]`` bytes from the client, then
    both sides are cut, whatever frame is half way through; later ones pass everything."""

    def __init__(self, target: tuple[str, int], budgets: list[int]) -> None:
        self.target = target
        self.budgets = list(budgets)
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return "127.0.0.1", self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        budget = self.budgets.pop(0) if self.budgets else None
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        up = asyncio.create_task(self._pipe(reader, up_writer, budget))
        down = asyncio.create_task(self._pipe(up_reader, writer, None))
        self._tasks |= {up, down}
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._tasks -= {up, down}
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    budget: int | None) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(4096):
                if budget is not None and len(chunk) >= budget:
                    writer.write(chunk[:budget])
                    await writer.drain()
                    self.cuts += 1
                    return
                if budget is not None:
                    budget -= len(chunk)
                writer.write(chunk)
                await writer.drain()


@contextlib.asynccontextmanager
async def open_link(address: tuple[str, int], tmp_path: Path, max_memory_bytes: int = 1 << 20,
                    max_spool_bytes: int = 1 << 20,
                    ) -> AsyncIterator[tuple[ServerLink, io.StringIO]]:
    report = io.StringIO()
    link = ServerLink("non-td-server", address, uuid.uuid4().hex, "run-1",
                      protocol.ROLE_NON_TD, max_memory_bytes, report, spool_dir=tmp_path,
                      max_spool_bytes=max_spool_bytes)
    link.start()
    try:
        yield link, report
    finally:
        await link.close()


def said(report: io.StringIO, text: str) -> int:
    """How many stderr lines contain ``text``."""
    return sum(text in line for line in report.getvalue().splitlines())


async def send_frames(link: ServerLink, first: int, count: int) -> list[list[Any]]:
    """``count`` frames of one item each: item i in frame i."""
    sent = []
    for i in range(first, first + count):
        sent.append(item(i))
        await link.send_items([item(i)])
    return sent


async def test_resend_after_the_server_drops_the_connection_mid_stream(
        tmp_path: Path) -> None:
    stub = StubServer()
    stub.cut_after = 7
    await stub.start()
    async with open_link(stub.address, tmp_path) as (link, report):
        sent = await send_frames(link, 1, 30)
        await asyncio.wait_for(link.wait_acked(), 10)
    await stub.stop()
    assert stub.connections == 2
    assert stub.merged == list(range(1, 31))      # every frame once, in order
    assert stub.duplicates == 0                   # the welcome's last_seq was honoured
    assert stub.items == sent
    assert said(report, "connection lost") == 1
    assert said(report, "connected after") == 1
    assert said(report, "server has logged up to seq 7") == 1


async def test_server_down_at_start_then_up(tmp_path: Path) -> None:
    stub = StubServer()
    await stub.start()
    await stub.stop()                             # a port where nobody listens, for now
    async with open_link(stub.address, tmp_path) as (link, report):
        sent = await send_frames(link, 1, 5)
        await asyncio.sleep(0.8)                  # several attempts: 0.1, 0.2, 0.4 s apart
        assert link.unacked_frames == 5
        assert link.frames_sent == 0
        assert said(report, "cannot connect") == 1    # said once, not per attempt
        await stub.start(stub.port)
        await asyncio.wait_for(link.wait_acked(), 10)
        assert said(report, "connected after") == 1
        more = await send_frames(link, 6, 3)
        await asyncio.wait_for(link.wait_acked(), 10)
    await stub.stop()
    assert stub.merged == list(range(1, 9))
    assert stub.items == sent + more
    assert said(report, "cannot connect") == 1


async def test_memory_full_spools_to_a_file_and_delivers_later_in_order(
        tmp_path: Path) -> None:
    stub = StubServer()
    await stub.start()
    await stub.stop()
    size = frame_size(stub.address)
    async with open_link(stub.address, tmp_path, max_memory_bytes=3 * size) as (link, report):
        sent = await send_frames(link, 1, 20)
        path = link.spool.path
        assert path.parent.parent == tmp_path
        assert list(link.memory) == [1, 2, 3]
        assert link.spool.seqs() == list(range(4, 21))
        assert path.stat().st_size == link.spool.live_bytes > 0
        assert said(report, f"spooling to {path} (3 frames, {3 * size} bytes") == 1
        await stub.start(stub.port)
        await asyncio.wait_for(link.wait_acked(), 10)
        assert path.stat().st_size == 0           # all acknowledged: truncated at once

        async def drained() -> bool:
            return said(report, "spool drained") == 1

        await wait_until(drained, 10)             # said once the spool has stayed empty
        assert not path.exists()                  # and the file is removed
        assert not path.parent.exists()
    await stub.stop()
    assert stub.merged == list(range(1, 21))
    assert stub.items == sent
    assert said(report, "spooling to") == 1


async def test_memory_and_spool_full_pause_input_until_acks_free_room(
        tmp_path: Path) -> None:
    stub = StubServer()
    stub.acks.clear()                             # connected, reading, but no acks
    await stub.start()
    size = frame_size(stub.address)
    max_spool = 4 * size
    async with open_link(stub.address, tmp_path, max_memory_bytes=2 * size,
                         max_spool_bytes=max_spool) as (link, report):
        sent = await send_frames(link, 1, 6)      # 2 in memory, 4 in the spool
        assert (len(link.memory), len(link.spool)) == (2, 4)
        assert link.spool.file_size <= max_spool
        assert said(report, "backpressure") == 0
        blocked = asyncio.create_task(link.send_items([item(7)]))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(blocked), 0.5)
        assert not blocked.done()
        assert link.next_seq == 7
        assert said(report, "backpressure: memory and spool full, pausing input") == 1
        assert said(report, "resumed") == 0
        stub.acks.set()
        await asyncio.wait_for(blocked, 10)
        sent.append(item(7))
        sent += await send_frames(link, 8, 5)
        await asyncio.wait_for(link.wait_acked(), 10)
        assert link.spool.file_size == 0

        async def resumed() -> bool:
            return said(report, "resumed input: paused") == 1

        await wait_until(resumed, 10)             # said once input has kept flowing
    await stub.stop()
    assert stub.merged == list(range(1, 13))
    assert stub.items == sent
    assert said(report, "backpressure: memory and spool full") == 1
    assert said(report, "spooling to") == 1


async def test_spool_stays_bounded_while_a_slow_server_catches_up(tmp_path: Path) -> None:
    """A server slower than the input: the spool's head advances while its tail grows, the
    file never grows past its limit, input pauses and resumes, and everything arrives
    once, in order. Each state is said once, not at each pause."""
    stub = StubServer()
    stub.delay = 0.003
    await stub.start()
    size = frame_size(stub.address)
    max_spool = 5 * size + size // 2
    async with open_link(stub.address, tmp_path, max_memory_bytes=2 * size,
                         max_spool_bytes=max_spool) as (link, report):
        sent = []
        for i in range(1, 201):
            sent.append(item(i))
            await link.send_items([item(i)])
            assert link.spool.file_size <= max_spool
            assert link.memory_bytes <= 2 * size
        await asyncio.wait_for(link.wait_acked(), 10)
        assert link.frames_spooled * size > 10 * max_spool   # the ring was reused
    await stub.stop()
    assert stub.merged == list(range(1, 201))
    assert stub.items == sent
    assert said(report, "spooling to") == said(report, "spool drained") == 1
    assert said(report, "backpressure: memory and spool full") == 1
    assert said(report, "resumed input: paused") == 1


async def test_a_refused_frame_is_removed_and_reported_once_per_reason(
        tmp_path: Path) -> None:
    stub = StubServer()
    stub.refuse = {3, 5}
    await stub.start()
    async with open_link(stub.address, tmp_path) as (link, report):
        await send_frames(link, 1, 5)
        await asyncio.wait_for(link.wait_acked(), 10)
        assert link.unacked_frames == 0
        assert len(link.refused) == 2
    await stub.stop()
    assert stub.merged == [1, 2, 4]
    assert said(report, "server refused frame 3 (bad_item: refused by the test)") == 1
    assert said(report, "refused") == 1


async def test_a_refused_hello_fails_the_link(tmp_path: Path) -> None:
    stub = StubServer()
    stub.refuse_hello = "this is not the server you want"
    await stub.start()
    async with open_link(stub.address, tmp_path) as (link, report):
        await link.send_items([item(1)])
        with pytest.raises(LinkRefused, match="wrong_server"):
            await asyncio.wait_for(link.wait_acked(), 10)
        with pytest.raises(LinkRefused):
            await link.send_items([item(2)])
    await stub.stop()
    assert said(report, "server refused this forwarder") == 1


async def test_real_server_counts_every_frame_once_across_cuts(dsn: str,
                                                               tmp_path: Path) -> None:
    """Through a proxy that cuts the first connections in the middle of a frame, into a
    real non-td-server and PostgreSQL, with frames going through the spool."""
    metrics = ("http_reqs", "iterations", "data_sent")
    items = [item(i, metrics[i % 3]) for i in range(1, 901)]
    async with run_server(dsn, tmp_path / "state", role=protocol.ROLE_NON_TD) as server:
        proxy = CuttingProxy(server.address, [5_000, 12_345, 777])
        await proxy.start()
        async with open_link(proxy.address, tmp_path / "spool",
                             max_memory_bytes=20_000) as (link, report):
            for start in range(0, len(items), 50):
                await link.send_items(items[start:start + 50])
            await asyncio.wait_for(link.wait_acked(), 15)
        await proxy.stop()

        async def merged_all() -> bool:
            return server.stats.items >= len(items)

        await wait_until(merged_all, 5)
    assert proxy.cuts == 3
    assert said(report, "connection lost") == 3
    assert said(report, "spooling to") == 1
    assert server.stats.items == len(items)
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT sum(value) AS value, sum(count) AS count FROM counter_buckets "
            "WHERE run_id = 'run-1'")
    finally:
        await conn.close()
    assert row["count"] == len(items)
    assert row["value"] == pytest.approx(math.fsum(float(i % 97 + 1) for i in range(1, 901)))

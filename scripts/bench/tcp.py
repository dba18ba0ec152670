"""3. td-server digests merged per second over TCP from concurrent producers against the
in-process deserialize + merge loop over the same frames; the same for non-td-server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import harness, protocol
from common.aggregate import OpenBuckets
from non_td_server.aggregator import CounterAggregator
from scripts.bench.base import (
    BUCKET_SECONDS,
    BenchError,
    Digest300,
    Plan,
    child_env,
    cpu_seconds,
    digest_pool,
    future_bucket,
    rss_bytes,
    series_tags,
)
from td_server.aggregator import TrendAggregator

Item = list[Any]


@dataclass
class TcpResult:
    role: str
    producers: int
    items: int
    keys: int
    frames: int
    frame_bytes: int
    items_per_frame: int
    rounds: int
    centroids_per_digest: int | None
    tcp_seconds: list[float]
    server_cpu_seconds: list[float]
    ceiling_seconds: list[float]  # the in-process loop before and after the TCP rounds
    server_rss_delta_per_key: float
    open_keys_at_end: int
    shutdown_seconds: float

    @property
    def tcp_per_s(self) -> float:
        return self.items / min(self.tcp_seconds)

    @property
    def ceiling_per_s(self) -> float:
        return self.items / min(self.ceiling_seconds)

    @property
    def ratio(self) -> float:
        return min(self.ceiling_seconds) / min(self.tcp_seconds)


def trend_items(producer: int, series: int, buckets: int, pool: list[Digest300]) -> list[Item]:
    first = future_bucket()
    items = []
    for b in range(buckets):
        for s in range(series):
            d = pool[(producer * 31 + s * 7 + b) % len(pool)]
            items.append(["http_req_duration", series_tags(s), first + b * BUCKET_SECONDS,
                          BUCKET_SECONDS, d.count, d.total, d.lo, d.hi, d.blob, 0])
    return items


def counter_items(producer: int, series: int, buckets: int) -> list[Item]:
    first = future_bucket()
    now_ns = time.time_ns()
    kinds = ("counter", "rate", "gauge")
    items = []
    for b in range(buckets):
        for s in range(series):
            kind = kinds[s % 3]
            count = 10 + (s + producer) % 50
            items.append([f"m_{kind}", kind, series_tags(s), first + b * BUCKET_SECONDS,
                          BUCKET_SECONDS, float(count * 3), count, count // 2, 0.0, 6.0,
                          now_ns + s, float(s % 7)])
    return items


def frames_of(items: list[Item], per_frame: int) -> list[bytes]:
    return [protocol.data(seq, items[start:start + per_frame])
            for seq, start in enumerate(range(0, len(items), per_frame), start=1)]


def merge_loop(aggregator: Any, run_id: str, frames: list[list[bytes]]) -> float:
    """The in-process ceiling: protocol.unpack + parse_data + parse_*_item +
    OpenBuckets.merge over the frame bodies, producers interleaved frame by frame as the
    server receives them. Returns seconds."""
    bodies = [[f[4:] for f in producer] for producer in frames]
    order = [(p, producer[i]) for i in range(max(map(len, bodies)))
             for p, producer in enumerate(bodies) if i < len(producer)]
    limits = protocol.Limits()
    buckets: OpenBuckets[Any, Any] = OpenBuckets(aggregator, BUCKET_SECONDS)
    gc.collect()
    started = time.perf_counter()
    for producer, body in order:
        message = protocol.unpack(body)
        name = f"p{producer}"
        for item in protocol.parse_data(message, limits).items:
            buckets.merge(run_id, name, aggregator.parse_item(item, limits))
    seconds = time.perf_counter() - started
    del buckets
    return seconds


async def _read_frame(reader: asyncio.StreamReader, decoder: protocol.FrameDecoder,
                      pending: list[bytes]) -> dict[str, Any]:
    while not pending:
        chunk = await reader.read(1 << 16)
        if not chunk:
            raise BenchError("the server closed the connection")
        pending.extend(decoder.feed(chunk))
    message = protocol.unpack(pending.pop(0))
    if message["type"] == "error":
        raise BenchError(f"server refused a frame: {message['reason']}: {message['detail']}")
    return message


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: protocol.FrameDecoder = field(default_factory=protocol.FrameDecoder)
    pending: list[bytes] = field(default_factory=list)

    @classmethod
    async def connect(cls, address: tuple[str, int], producer: str, run_id: str,
                      role: str) -> Client:
        reader, writer = await asyncio.open_connection(*address)
        client = cls(reader, writer)
        writer.write(protocol.hello(producer, run_id, role))
        await writer.drain()
        welcome = await _read_frame(reader, client.decoder, client.pending)
        if welcome["type"] != "welcome":
            raise BenchError(f"expected a welcome, got {welcome['type']}")
        return client

    async def send_all(self, frames: list[bytes]) -> None:
        """Send every frame, reading acks meanwhile; return once the last is acked."""
        last = len(frames)

        async def acks() -> None:
            acked = 0
            while acked < last:
                message = await _read_frame(self.reader, self.decoder, self.pending)
                if message["type"] == "ack":
                    acked = max(acked, int(message["seq"]))

        reading = asyncio.create_task(acks())
        try:
            for frame in frames:
                self.writer.write(frame)
                await self.writer.drain()
            await reading
        finally:
            reading.cancel()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def tcp_round(address: tuple[str, int], role: str, run_id: str,
                    frames: list[list[bytes]]) -> float:
    """Seconds from the first frame sent to the last ack, all producers at once."""
    clients = [await Client.connect(address, f"bench-{run_id}-{p}", run_id, role)
               for p in range(len(frames))]
    try:
        started = time.perf_counter()
        await asyncio.gather(*(c.send_all(f) for c, f in zip(clients, frames, strict=True)))
        return time.perf_counter() - started
    finally:
        for client in clients:
            await client.close()


async def run(plan: Plan, dsn: str, workdir: Path, role: str,
              log: Callable[[str], None]) -> TcpResult:
    """Items merged per second over TCP from plan.producers clients, against the
    in-process loop over the same frames (the faster of a run before and one after)."""
    workdir.mkdir()
    td = role == protocol.ROLE_TD
    aggregator: Any = TrendAggregator() if td else CounterAggregator()
    if td:
        pool = digest_pool(64)
        per_producer = [trend_items(p, plan.td_series, plan.td_buckets, pool)
                        for p in range(plan.producers)]
        size = plan.td_items_per_frame
    else:
        per_producer = [counter_items(p, plan.non_td_series, plan.non_td_buckets)
                        for p in range(plan.producers)]
        size = plan.non_td_items_per_frame
    items = sum(len(p) for p in per_producer)
    # Each round is its own run id, so its keys are new (and its producers too).
    rounds = [(f"tcp-{role}-{r}", [frames_of(p, size) for p in per_producer])
              for r in range(plan.tcp_rounds)]
    del per_producer
    frame_bytes = sum(len(f) for producer in rounds[0][1] for f in producer)
    keys = (plan.td_series * plan.td_buckets if td
            else plan.non_td_series * plan.non_td_buckets)
    ceiling_before = merge_loop(aggregator, "ceiling", rounds[0][1])
    module = "td_server" if td else "non_td_server"
    server = await harness.start_server(module, dsn, workdir, metrics_listen="",
                                        env=child_env())
    try:
        rss_before = rss_bytes(server.pid)
        tcp_seconds, server_cpu = [], []
        for run_id, frames in rounds:
            cpu_before = cpu_seconds(server.pid)
            seconds = await tcp_round(server.address, role, run_id, frames)
            tcp_seconds.append(seconds)
            server_cpu.append(cpu_seconds(server.pid) - cpu_before)
            log(f"  {module} over TCP: {items} items in {seconds:.2f} s, server CPU "
                f"{server_cpu[-1]:.2f} s")
        rss_after = rss_bytes(server.pid)
    finally:
        started = time.perf_counter()
        code = await server.stop(120)
        shutdown = time.perf_counter() - started
    if code != 0:
        raise BenchError(f"{module} exited {code}:\n{server.log_tail()}")
    ceiling_after = merge_loop(aggregator, "ceiling", rounds[0][1])
    open_keys = keys * plan.tcp_rounds
    return TcpResult(
        role=role, producers=plan.producers, items=items, keys=keys,
        frames=sum(len(p) for p in rounds[0][1]), frame_bytes=frame_bytes,
        items_per_frame=size, rounds=plan.tcp_rounds,
        centroids_per_digest=300 if td else None, tcp_seconds=tcp_seconds,
        server_cpu_seconds=server_cpu, ceiling_seconds=[ceiling_before, ceiling_after],
        server_rss_delta_per_key=(rss_after - rss_before) / open_keys,
        open_keys_at_end=open_keys, shutdown_seconds=shutdown)

"""The server skeleton both servers share: listener, connections, acks, flush loop and
ordered shutdown. Each server supplies only its Aggregator."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from common import protocol
from common.aggregate import Aggregator, BucketKey, OpenBuckets
from common.config import ServerConfig
from common.sink import PgSink, ensure_schema

log = logging.getLogger("tdagg.server")


@dataclass
class Stats:
    connections: int = 0
    frames: int = 0
    bytes: int = 0
    items: int = 0
    samples: int = 0
    duplicate_frames: int = 0
    buckets_written: int = 0
    late_rows: int = 0
    write_failures: int = 0
    refused: Counter[str] = field(default_factory=Counter)


class Connection:
    """One forwarder connection: framing, hello, dedup, merge, ack."""

    def __init__(self, server: AggregatorServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = writer.get_extra_info("peername")
        self.decoder = protocol.FrameDecoder(server.config.max_frame_bytes)
        self.hello: protocol.Hello | None = None

    def refuse(self, exc: protocol.Refused, seq: int | None, fatal: bool = False) -> None:
        self.server.stats.refused[exc.reason] += 1
        log.warning("refused frame from %s (seq %s): %s: %s", self.peer, seq, exc.reason,
                    exc.detail)
        self.writer.write(protocol.error(exc.reason, exc.detail, seq, fatal))

    async def run(self) -> None:
        try:
            while True:
                chunk = await self.reader.read(256 * 1024)
                if not chunk:
                    return
                self.server.stats.bytes += len(chunk)
                try:
                    bodies = self.decoder.feed(chunk)
                except protocol.FramingError as exc:
                    self.refuse(protocol.Refused("bad_framing", str(exc)), None, fatal=True)
                    return
                highest_ack = 0
                for body in bodies:
                    ack = self.handle(body)
                    if ack is None:
                        return
                    highest_ack = max(highest_ack, ack)
                # Acks are cumulative: one per read covers every frame in it.
                if highest_ack:
                    self.writer.write(protocol.ack(highest_ack))
                await self.writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    def handle(self, body: bytes) -> int | None:
        """Process one frame; return the seq to acknowledge (0 for none), None to close."""
        server = self.server
        server.stats.frames += 1
        seq: int | None = None
        try:
            message = protocol.unpack(body)
            if self.hello is None:
                self.hello = protocol.parse_hello(message, server.limits)
                if self.hello.role != server.aggregator.role:
                    raise protocol.Refused(
                        "wrong_server", f"this is the {server.aggregator.role} server; "
                        f"the client speaks for {self.hello.role}")
                last = server.last_seq.get(self.hello.producer, 0)
                self.writer.write(protocol.welcome(server.aggregator.role, last))
                return 0
            frame = protocol.parse_data(message, server.limits)
            seq = frame.seq
            producer = self.hello.producer
            if seq <= server.last_seq.get(producer, 0):
                server.stats.duplicate_frames += 1
                return seq
            agg = server.aggregator
            # Validate the whole frame before merging any of it: a frame is all or nothing.
            partials = [agg.parse_item(item, server.limits) for item in frame.items]
            for partial in partials:
                if partial.bucket_seconds != server.config.bucket_seconds:
                    raise protocol.Refused(
                        "bucket_width_mismatch",
                        f"item has bucket_seconds {partial.bucket_seconds}, the server uses "
                        f"{server.config.bucket_seconds}")
            run_id = self.hello.run_id
            for partial in partials:
                server.open.merge(run_id, producer, partial)
                server.stats.samples += agg.samples(partial)
            server.stats.items += len(partials)
            server.last_seq[producer] = seq
            return seq
        except protocol.Refused as exc:
            fatal = self.hello is None
            self.refuse(exc, seq, fatal=fatal)
            if seq is not None and self.hello is not None:
                # A refused frame is final; later frames must not wait on it.
                server.last_seq[self.hello.producer] = max(
                    seq, server.last_seq.get(self.hello.producer, 0))
            return None if fatal else 0


class AggregatorServer:
    def __init__(self, config: ServerConfig, aggregator: Aggregator[Any, Any], dsn: str,
                 dsn_label: str) -> None:
        self.config = config
        self.aggregator = aggregator
        self.dsn = dsn
        self.dsn_label = dsn_label
        self.limits = protocol.Limits(max_frame_bytes=config.max_frame_bytes)
        self.open: OpenBuckets[Any, Any] = OpenBuckets(aggregator, config.bucket_seconds)
        self.closing: dict[BucketKey, Any] = {}
        self.last_seq: dict[str, int] = {}
        self.stats = Stats()
        self.should_exit = asyncio.Event()
        self._connections: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Server | None = None
        self._pool: asyncpg.Pool | None = None
        self._sink: PgSink | None = None
        self._flush_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self.dsn or None, min_size=1, max_size=2)
        async with self._pool.acquire() as conn:
            await ensure_schema(conn)
        self._sink = PgSink(self._pool, self.aggregator, self.config.bucket_seconds)
        host, port = self.config.listen
        self._listener = await asyncio.start_server(self._accept, host, port)
        self._flush_task = asyncio.create_task(self._flush_loop())

    def ready_line(self) -> str:
        host, port = self.address
        return (f"{self.aggregator.role.replace('_', '-')}-server ready: listening on "
                f"{host}:{port}, database {self.dsn_label}, bucket "
                f"{self.config.bucket_seconds}s, grace {self.config.grace}s")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await Connection(self, reader, writer).run()
        finally:
            self._connections.discard(task)

    async def _flush_loop(self) -> None:
        backoff = self.config.flush_interval
        while True:
            await asyncio.sleep(backoff)
            self._swap_out(self.open.take_closable(time.time(), self.config.grace))
            if await self.flush_closing():
                backoff = self.config.flush_interval
            else:
                backoff = min(max(backoff * 2, 0.5), 30.0)

    def _swap_out(self, states: dict[BucketKey, Any]) -> None:
        for key, state in states.items():
            pending = self.closing.get(key)
            if pending is None:
                self.closing[key] = state
            else:
                self.aggregator.absorb(pending, state)

    async def flush_closing(self) -> bool:
        """Write every closing bucket in one batch; evict only after the commit."""
        if not self.closing:
            return True
        assert self._sink is not None
        batch = self.closing
        self.closing = {}
        try:
            late = await self._sink.write(batch)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.stats.write_failures += 1
            log.error("database write of %d buckets failed, will retry: %s", len(batch), exc)
            # Put the batch back in front of anything closed meanwhile.
            newer, self.closing = self.closing, batch
            self._swap_out(newer)
            return False
        self.stats.buckets_written += len(batch)
        if late:
            self.stats.late_rows += late
            log.warning("late data: merged into %d already written bucket rows", late)
        return True

    async def shutdown(self) -> None:
        # 1. Stop accepting new connections.
        if self._listener is not None:
            self._listener.close()
        # 2. Drain connections: frames already read are merged and acked; a forwarder
        #    resends anything unacknowledged once a server is back.
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
        # 3. Flush every open bucket, closed or not, retrying while the database is away.
        self._swap_out(self.open.take_all())
        delay = 0.2
        while not await self.flush_closing():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        # 4. Close the pool.
        if self._pool is not None:
            await self._pool.close()

    async def serve_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # The handler only sets a flag; shutdown runs in order below.
            loop.add_signal_handler(sig, self.should_exit.set)
        await self.start()
        print(self.ready_line(), file=sys.stderr, flush=True)
        await self.should_exit.wait()
        log.info("shutting down: flushing %d open buckets", len(self.open) + len(self.closing))
        await self.shutdown()
        s = self.stats
        print(f"stopped: {s.frames} frames, {s.samples} samples, {s.buckets_written} bucket "
              f"rows written, {s.late_rows} late, {sum(s.refused.values())} refused",
              file=sys.stderr, flush=True)

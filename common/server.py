"""The server skeleton both servers share: listener, connections, write-ahead log, acks,
flush loop and ordered shutdown. Each server supplies only its Aggregator."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from common import protocol
from common.aggregate import Aggregator, BucketKey, Entry, OpenBuckets, absorb_entry
from common.config import ConfigError, ServerConfig
from common.group_commit import GroupCommit
from common.notify import notify, watchdog_interval
from common.selfmetrics import Histogram, MetricsEndpoint, exposition
from common.sink import PgSink, ensure_schema
from common.wal import WriteAheadLog, segment_of

log = logging.getLogger("tdagg.server")

RUN_IDLE_SECONDS = 24 * 3600
# Database errors that mean "not reachable now" (for /healthz).
RETRYABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError)


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
    replayed_frames: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    write_seconds: Histogram = field(default_factory=Histogram)


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plaintext; bad files are a ConfigError."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ConfigError("tls_client_ca needs tls_cert and tls_key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("tls_cert and tls_key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            context.load_verify_locations(config.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert {config.tls_cert}, tls_key {config.tls_key}, "
                          f"tls_client_ca {config.tls_client_ca}: {exc}") from None
    return context


def read_token(config: ServerConfig) -> str | None:
    if config.token_file is None:
        return None
    try:
        token = config.token_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"token_file {config.token_file}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"token_file {config.token_file} is empty")
    return token


class Connection:
    """One forwarder connection: framing, hello, validation, log, dedup, merge, ack."""

    def __init__(self, server: AggregatorServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = writer.get_extra_info("peername")
        self.decoder = protocol.FrameDecoder(server.limits.max_frame_bytes)
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
                keep_open = True
                for body in bodies:
                    ack = self.handle(body)
                    if ack is None:
                        keep_open = False
                        break
                    highest_ack = max(highest_ack, ack)
                try:
                    self.decoder.check()  # good frames before a bad prefix still count
                except protocol.FramingError as exc:
                    self.refuse(protocol.Refused("bad_framing", str(exc)), None, fatal=True)
                    keep_open = False
                # One log commit per read covers every frame in it, shared with other
                # connections committing at the same time; the ack goes out only after
                # it. Acks are cumulative.
                await self.server.group_commit.commit()
                if highest_ack:
                    self.writer.write(protocol.ack(highest_ack))
                await self.writer.drain()
                if not keep_open:
                    return
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
                hello = protocol.parse_hello(message, server.limits)
                if server.token is not None and not hmac.compare_digest(
                        (hello.token or "").encode(), server.token.encode()):
                    raise protocol.Refused(
                        "bad_token", "missing token" if hello.token is None else "wrong token")
                if hello.role != server.aggregator.role:
                    raise protocol.Refused(
                        "wrong_server", f"this is the {server.aggregator.role} server; "
                        f"the client speaks for {hello.role}")
                self.hello = hello
                last = server.wal.last_seq(hello.producer)
                self.writer.write(protocol.welcome(server.aggregator.role, last))
                return 0
            frame = protocol.parse_data(message, server.limits)
            seq = frame.seq
            producer = self.hello.producer
            if seq <= server.wal.last_seq(producer):
                server.stats.duplicate_frames += 1
                return seq
            # Validate the whole frame before logging or merging any of it.
            partials = [server.aggregator.parse_item(item, server.limits)
                        for item in frame.items]
            server.check_partials(self.hello.run_id, partials)
            position = server.wal.append(producer, self.hello.run_id, seq, body)
            server.merge(self.hello.run_id, producer, partials, position)
            return seq
        except protocol.Refused as exc:
            fatal = self.hello is None
            self.refuse(exc, seq, fatal=fatal)
            return None if fatal else 0


class AggregatorServer:
    def __init__(self, config: ServerConfig, aggregator: Aggregator[Any, Any], dsn: str,
                 dsn_label: str) -> None:
        self.config = config
        self.aggregator = aggregator
        self.dsn = dsn
        self.dsn_label = dsn_label
        self.limits = protocol.Limits(
            max_frame_bytes=config.max_frame_bytes,
            max_items_per_frame=config.max_items_per_frame,
            max_name_length=config.max_name_length,
            max_tags=config.max_tags,
            max_tag_length=config.max_tag_length,
        )
        state_dir = config.state_dir or config.data_dir / f"{aggregator.role}_server"
        self.wal = WriteAheadLog(state_dir, config.wal_fsync)
        self.group_commit = GroupCommit(self.wal)
        self.tls = tls_context(config)
        self.token = read_token(config)
        self.metrics: MetricsEndpoint | None = None
        self.open: OpenBuckets[Any, Any] = OpenBuckets(aggregator, config.bucket_seconds)
        self.closing: dict[BucketKey, Entry[Any]] = {}
        self.series: dict[str, set[tuple[str, Any]]] = {}
        self.series_seen: dict[str, float] = {}
        self.stats = Stats()
        self.should_exit = asyncio.Event()
        self._connections: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Server | None = None
        self._pool: asyncpg.Pool | None = None
        self._sink: PgSink | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._stop_flushing = asyncio.Event()
        self._watchdog_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.sockets[0].getsockname()[:2]
        return host, port

    # --- ingest -----------------------------------------------------------------

    def check_partials(self, run_id: str, partials: list[Any]) -> None:
        """Refuse a frame whose buckets are off the server's grid, too far from now, or
        that would take its run past the series cap."""
        width = self.config.bucket_seconds
        now = time.time()
        oldest = now - self.config.max_bucket_age
        newest = now + self.config.max_bucket_ahead
        series = self.series.setdefault(run_id, set())
        self.series_seen[run_id] = now
        new = set()
        for p in partials:
            if p.bucket_seconds != width:
                raise protocol.Refused(
                    "bucket_width_mismatch",
                    f"item has bucket_seconds {p.bucket_seconds}, the server uses {width}")
            if not oldest <= p.bucket <= newest:
                raise protocol.Refused(
                    "bucket_out_of_window",
                    f"bucket {p.bucket} is outside [now - {self.config.max_bucket_age:g}s, "
                    f"now + {self.config.max_bucket_ahead:g}s]")
            name = (p.metric, p.tags)
            if name not in series:
                new.add(name)
        if len(series) + len(new) > self.config.max_series_per_run:
            raise protocol.Refused(
                "too_many_series",
                f"run {run_id!r} would exceed {self.config.max_series_per_run} series")
        series |= new

    def merge(self, run_id: str, producer: str, partials: list[Any], position: int) -> None:
        segment = segment_of(position)
        for partial in partials:
            self.open.merge(run_id, producer, partial, position, segment)
            self.stats.samples += self.aggregator.samples(partial)
        self.stats.items += len(partials)

    async def _replay(self) -> None:
        """Merge logged frames whose data the database rows do not hold yet."""
        records = self.wal.open()
        if not records:
            return
        assert self._sink is not None
        parsed = []
        for record in records:
            message = protocol.unpack(record.body)
            items = protocol.parse_data(message, self.limits).items
            partials = [self.aggregator.parse_item(item, self.limits) for item in items]
            parsed.append((record, partials))
        keys = list({self.aggregator.key_of(r.run_id, p) for r, ps in parsed for p in ps})
        stored = await self._sink.stored_positions(keys)
        skipped = 0
        for record, partials in parsed:
            fresh = [p for p in partials
                     if stored.get(self.aggregator.key_of(record.run_id, p), -1)
                     < record.position]
            skipped += len(partials) - len(fresh)
            if fresh:
                self.merge(record.run_id, record.producer, fresh, record.position)
        self.stats.replayed_frames = len(records)
        log.info("replayed %d logged frames (%d items already in the database)",
                 len(records), skipped)

    # --- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self.dsn or None, min_size=1, max_size=2)
        async with self._pool.acquire() as conn:
            await ensure_schema(conn)
        self._sink = PgSink(self._pool, self.aggregator, self.config.bucket_seconds)
        await self._replay()
        # A new or wiped state directory must still log at positions above every row's.
        stored_max = await self._sink.max_position()
        self.wal.ensure_after(stored_max)
        host, port = self.config.listen
        self._listener = await asyncio.start_server(self._accept, host, port)
        self._flush_task = asyncio.create_task(self._flush_loop())
        if self.config.metrics_listen is not None:
            self.metrics = MetricsEndpoint(self.render_metrics, self.healthy)
            await self.metrics.start(*self.config.metrics_listen)
        # Listening and the database answered: only now is the service ready.
        notify("READY=1")
        interval = watchdog_interval()
        if interval:
            self._watchdog_task = asyncio.create_task(self._watchdog(interval))

    async def _watchdog(self, interval: float) -> None:
        while True:
            if self._flush_task is not None and not self._flush_task.done():
                notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def healthy(self) -> bool:
        """Listening and the database answers within two seconds."""
        if self._listener is None or not self._listener.is_serving() or self._pool is None:
            return False
        try:
            async with asyncio.timeout(2):
                async with self._pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
        except (*RETRYABLE, asyncpg.exceptions.InterfaceError):
            return False
        return True

    def render_metrics(self) -> str:
        s = self.stats
        role = self.aggregator.role
        label = f'server="{role}"'
        counter = "counter"
        gauge = "gauge"
        return exposition([
            ("tdagg_connections_total", counter, "connections accepted",
             [(label, s.connections)]),
            ("tdagg_connections_open", gauge, "connections open now",
             [(label, len(self._connections))]),
            ("tdagg_frames_received_total", counter, "frames received", [(label, s.frames)]),
            ("tdagg_bytes_received_total", counter, "bytes received", [(label, s.bytes)]),
            ("tdagg_items_merged_total", counter, "partial aggregates merged",
             [(label, s.items)]),
            ("tdagg_samples_merged_total", counter, "k6 samples merged", [(label, s.samples)]),
            ("tdagg_duplicate_frames_total", counter, "resent frames ignored",
             [(label, s.duplicate_frames)]),
            ("tdagg_open_buckets", gauge, "open (series, bucket) states",
             [(label, len(self.open))]),
            ("tdagg_open_series", gauge, "distinct series in open buckets",
             [(label, len({k[:3] for k in self.open.entries}))]),
            ("tdagg_queue_buckets", gauge, "closed buckets waiting for the database",
             [(label, len(self.closing))]),
            ("tdagg_buckets_written_total", counter, "bucket rows written",
             [(label, s.buckets_written)]),
            ("tdagg_late_rows_total", counter, "written rows that late data was merged into",
             [(label, s.late_rows)]),
            ("tdagg_write_failures_total", counter, "failed database writes (retried)",
             [(label, s.write_failures)]),
            ("tdagg_refused_frames_total", counter, "frames refused, by reason",
             [(f'{label},reason="{r}"', n) for r, n in sorted(s.refused.items())]),
            ("tdagg_wal_bytes", gauge, "write-ahead log size on disk",
             [(label, self.wal.size_bytes())]),
            ("tdagg_wal_syncs_total", counter,
             "fdatasync calls of the write-ahead log; each covers every connection waiting",
             [(label, self.group_commit.syncs)]),
            ("tdagg_db_write_seconds", "histogram", "database batch write latency",
             [(label, s.write_seconds)]),
        ])

    def ready_line(self) -> str:
        host, port = self.address
        return (f"{self.aggregator.role.replace('_', '-')}-server ready: listening on "
                f"{host}:{port}, database {self.dsn_label}, bucket "
                f"{self.config.bucket_seconds}s, grace {self.config.grace}s, "
                f"log {self.wal.directory} (fsync {self.wal.fsync})"
                + (f", TLS{' with client certificates' if self.tls.verify_mode else ''}"
                   if self.tls else "")
                + (", token required" if self.token else "")
                + (f", metrics http://{self.metrics.address[0]}:{self.metrics.address[1]}"
                   "/metrics" if self.metrics else ""))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if self.tls is not None and not await self._start_tls(writer):
                return
            await Connection(self, reader, writer).run()
        except asyncio.CancelledError:
            pass  # shutdown cancels connections; asyncio would log a cancelled handler
        finally:
            self._connections.discard(task)

    async def _start_tls(self, writer: asyncio.StreamWriter) -> bool:
        peer = writer.get_extra_info("peername")
        try:
            assert self.tls is not None
            await writer.start_tls(self.tls, ssl_handshake_timeout=10)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            self.stats.refused["tls_handshake"] += 1
            log.warning("TLS handshake with %s failed, connection closed: %s (a plaintext "
                        "client, or a client certificate that is missing or not trusted)",
                        peer, exc)
            writer.close()
            return False
        return True

    # --- flushing ---------------------------------------------------------------

    async def _flush_loop(self) -> None:
        # Never cancelled mid-write: a cancelled write would leave its batch neither in
        # the database nor in `closing`. Shutdown sets _stop_flushing and waits for the
        # current iteration instead.
        delay = self.config.flush_interval
        while True:
            try:
                await asyncio.wait_for(self._stop_flushing.wait(), delay)
                return
            except TimeoutError:
                pass
            self._swap_out(self.open.take_closable(time.time(), self.config.grace))
            if await self.flush_closing():
                delay = self.config.flush_interval
            else:
                delay = min(max(delay * 2, 0.5), 2.0)

    def _swap_out(self, entries: dict[BucketKey, Entry[Any]]) -> None:
        for key, entry in entries.items():
            pending = self.closing.get(key)
            if pending is None:
                self.closing[key] = entry
            else:
                absorb_entry(self.aggregator, pending, entry)

    async def flush_closing(self) -> bool:
        """Write every closing bucket in one batch; evict only after the commit."""
        if not self.closing:
            return True
        assert self._sink is not None
        batch = self.closing
        self.closing = {}
        started = time.perf_counter()
        try:
            late = await self._sink.write(batch)
        except Exception as exc:  # any failure: writes are idempotent, so retry them all
            self.stats.write_failures += 1
            log.error("database write of %d buckets failed, kept for retry: %r",
                      len(batch), exc)
            # Put the batch back in front of anything closed meanwhile.
            newer, self.closing = self.closing, batch
            self._swap_out(newer)
            return False
        self.stats.write_seconds.observe(time.perf_counter() - started)
        self.stats.buckets_written += len(batch)
        if late:
            self.stats.late_rows += late
            log.warning("late data: merged into %d already written bucket rows", late)
        self._release_log()
        return True

    def _forget_idle_runs(self) -> None:
        """The series cap is per run; a run silent for a day no longer needs its set."""
        cutoff = time.time() - RUN_IDLE_SECONDS
        for run_id in [r for r, seen in self.series_seen.items() if seen < cutoff]:
            del self.series_seen[run_id]
            self.series.pop(run_id, None)

    def _release_log(self) -> None:
        """Drop log segments whose every bucket is written; roll the current one."""
        self._forget_idle_runs()
        self.wal.rotate_if_due(self.config.bucket_seconds)
        pending = [e.first_segment for e in self.open.entries.values()]
        pending += [e.first_segment for e in self.closing.values()]
        self.wal.release_before(min(pending, default=self.wal.segment))

    async def shutdown(self) -> None:
        notify("STOPPING=1")
        # 1. Stop accepting new connections.
        if self._listener is not None:
            self._listener.close()
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
        # 2. Drain connections: every frame read so far is logged, merged and acked; a
        #    forwarder resends anything unacknowledged once a server is back.
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._flush_task is not None:
            self._stop_flushing.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
        # 3. Flush every open bucket, closed or not, retrying while the database is away.
        self._swap_out(self.open.take_all())
        delay = 0.2
        while not await self.flush_closing():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        # 4. Close the log (everything in it is now in the database) and the pool.
        self.group_commit.close()
        self.wal.close()
        if self.metrics is not None:
            await self.metrics.close()
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
        log.info("shutting down: writing %d open buckets", len(self.open) + len(self.closing))
        await self.shutdown()
        s = self.stats
        print(f"stopped: {s.frames} frames, {s.samples} samples, {s.buckets_written} bucket "
              f"rows written, {s.late_rows} late, {sum(s.refused.values())} refused",
              file=sys.stderr, flush=True)

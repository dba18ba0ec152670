"""The server skeleton both servers share: listener, connections, write-ahead log, acks,
flush loop and ordered shutdown. Each server supplies only its Aggregator."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import ssl
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from common import protocol
from common.aggregate import Aggregator, BucketKey, Entry, OpenBuckets, absorb_entry
from common.config import ConfigError, ServerConfig
from common.connection import Connection
from common.generators import GeneratorLedger
from common.group_commit import GroupCommit
from common.live_thresholds import LiveThresholds, written_rows
from common.notify import notify, watchdog_interval
from common.quarantine import QUARANTINE_FILE, Quarantine
from common.selfmetrics import Histogram, MetricsEndpoint, exposition
from common.store import BucketWriter, Policies, Store, StoreError
from common.wal import WriteAheadLog, first_position_of, segment_of
from td_report.thresholds import Threshold

log = logging.getLogger("tdagg.server")
TABLE_OF_ROLE = {"td": "trend_buckets", "non_td": "counter_buckets"}  # named in quarantine

# A run's series set (for the series cap) is dropped once the run sent nothing for this
# long; it costs about 200 bytes per series.
RUN_IDLE_SECONDS = 15 * 60


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
    timeouts: int = 0
    log_failures: int = 0
    flush_loop_errors: int = 0
    quarantined_buckets: int = 0
    quarantined_samples: int = 0
    spilled_buckets: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # whole frames, by reason
    refused_items: Counter[str] = field(default_factory=Counter)
    refused_samples: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)  # e.g. tags_shortened
    caps_hit: Counter[str] = field(default_factory=Counter)
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


# Descriptors kept free of connections: the log, the database pool, /metrics, TLS files.
FILES_RESERVED = 64
class AggregatorServer:
    def __init__(self, config: ServerConfig, aggregator: Aggregator[Any, Any],
                 store: Store) -> None:
        self.config = config
        self.aggregator = aggregator
        self.store = store
        self.limits = protocol.Limits(
            max_frame_bytes=config.max_frame_bytes,
            max_items_per_frame=config.max_items_per_frame,
            max_name_length=config.max_name_length,
            max_tags=config.max_tags,
            max_tag_length=config.max_tag_length,
        )
        self.unpack_limits = protocol.unpack_limits(self.limits)
        state_dir = config.state_dir or config.data_dir / f"{aggregator.role}_server"
        self.wal = WriteAheadLog(state_dir, config.wal_fsync, role=aggregator.role)
        self.quarantine = Quarantine(state_dir / QUARANTINE_FILE)
        self.max_connections = config.max_connections
        self.buffered_bytes = 0  # incomplete frames held over all connections
        # Why the server is not healthy now, if it is not: set while the log cannot be
        # written, while database writes fail, and after the flush loop caught an error.
        self.log_error: str | None = None
        self.write_error: str | None = None
        self.flush_error: str | None = None
        self._caps_said: dict[str, float] = {}
        self.unwritten_at_exit = 0
        self.stuck = 0  # refused rows that could not be quarantined either
        self.group_commit = GroupCommit(self.wal)
        self.tls = tls_context(config)
        self.token = read_token(config)
        self.metrics: MetricsEndpoint | None = None
        self.open: OpenBuckets[Any, Any] = OpenBuckets(aggregator, config.bucket_seconds)
        self.closing: dict[BucketKey, Entry[Any]] = {}
        # Closed buckets dropped from memory while the database was away: the log span
        # (first segment, last position) to rebuild each from once it is back.
        self.spilled: dict[BucketKey, tuple[int, int]] = {}
        self.generators = GeneratorLedger(config.bucket_seconds)
        # Per run, the producers whose generator has started and not ended.
        self.running: dict[str, set[str]] = {}
        # Per producer, its logged frames not known to be in the database yet, as (log
        # position, seq), oldest first; and the connection of each producer that wants
        # to hear once they are (protocol "committed").
        self.uncommitted: dict[str, deque[tuple[int, int]]] = {}
        self.confirming: dict[str, Connection] = {}
        # Rows keep streams, not producers: the producer of each stream seen, so that
        # the producers whose samples a quarantined row holds can be told (rows, samples).
        self.stream_producers: dict[str, str] = {}
        self.quarantined_for: dict[str, list[int]] = {}
        self.live = LiveThresholds(aggregator.role, self._push_verdicts)
        self.watchers: dict[str, set[Connection]] = {}  # run -> connections that judge it
        self.series: dict[str, set[tuple[str, Any]]] = {}
        self.series_seen: dict[str, float] = {}
        self.stats = Stats()
        self.should_exit = asyncio.Event()
        self._connections: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Server | None = None
        self._writer: BucketWriter | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._stop_flushing = asyncio.Event()
        self._watchdog_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.sockets[0].getsockname()[:2]
        return host, port

    # --- ingest -----------------------------------------------------------------

    def accept_items(self, run_id: str, items: list[Any],
                     ) -> tuple[list[tuple[Any, Any]], list[protocol.ItemRefusal]]:
        """(partial, item) for each item of a frame that can be merged; the rest refused,
        by reason.

        Each item is judged alone: a bad value, a bucket off the server's grid or too far
        from now, or a series past the run's cap costs that item only.
        """
        now = time.time()
        self.series_seen[run_id] = now
        series = self.series.setdefault(run_id, set())
        accepted = []
        refused: dict[str, list[Any]] = {}
        for item in items:
            try:
                partial = self.aggregator.parse_item(item, self.limits, self.stats.notes)
                self._check_partial(run_id, partial, now, series)
            except protocol.Refused as exc:
                counts = refused.setdefault(exc.reason, [0, 0, exc.detail])
                counts[0] += 1
                counts[1] += protocol.claimed_samples(item)
                continue
            accepted.append((partial, item))
        refusals = [protocol.ItemRefusal(reason, n, samples, detail)
                    for reason, (n, samples, detail) in refused.items()]
        for r in refusals:
            self.stats.refused_items[r.reason] += r.items
            self.stats.refused_samples[r.reason] += r.samples
            log.warning("refused %d items (%d samples) of run %r: %s: %s", r.items,
                        r.samples, run_id[:80], r.reason, r.detail)
        return accepted, refusals

    def _check_partial(self, run_id: str, p: Any, now: float,
                       series: set[tuple[str, Any]]) -> None:
        width = self.config.bucket_seconds
        if p.bucket_seconds != width:
            raise protocol.Refused(
                "bucket_width_mismatch",
                f"item has bucket_seconds {p.bucket_seconds}, the server uses {width}")
        if not now - self.config.max_bucket_age <= p.bucket <= now + self.config.max_bucket_ahead:
            raise protocol.Refused(
                "bucket_out_of_window",
                f"bucket {p.bucket} is outside [now - {self.config.max_bucket_age:g}s, "
                f"now + {self.config.max_bucket_ahead:g}s]")
        name = (p.metric, p.tags)
        if name not in series:
            if len(series) >= self.config.max_series_per_run:
                raise protocol.Refused(
                    "too_many_series",
                    f"run {run_id[:80]!r} has its {self.config.max_series_per_run} series")
            series.add(name)

    async def rerun_of(self, hello: protocol.Hello) -> str | None:
        """Why this forwarder's input must not be added to its run (it is there), or
        None. When the database cannot tell, the input is let in: losing data is worse."""
        if hello.input_id is None or hello.append or self._writer is None:
            return None
        try:
            async with asyncio.timeout(5):
                first, since = await self.store.claim_input(
                    hello.run_id, self.aggregator.role, hello.input_id, hello.producer)
        except Exception as exc:  # the database is away or slow
            log.warning("cannot check whether run %r already holds this input (%s); "
                        "accepting it", hello.run_id[:80], exc)
            return None
        if first == hello.producer:
            return None
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
        return (f"run {hello.run_id[:80]!r} already holds this input (sent by another "
                f"forwarder at {when}); pass --append to add it a second time, or use "
                "another --run-id")

    def watch(self, conn: Connection, run_id: str, thresholds: list[Threshold]
              ) -> bytes | None:
        """``conn``'s forwarder wants the run's verdicts; return the latest, if any."""
        self.watchers.setdefault(run_id, set()).add(conn)
        return self.live.declare(run_id, thresholds)

    def unwatch(self, conn: Connection) -> None:
        if conn.hello is None:
            return
        run_id = conn.hello.run_id
        watching = self.watchers.get(run_id)
        if watching is not None:
            watching.discard(conn)
            if not watching:  # its forwarders say the thresholds again when they return
                del self.watchers[run_id]
                self.live.forget(run_id)

    def _push_verdicts(self, run_id: str, frame: bytes) -> None:
        for conn in self.watchers.get(run_id, ()):
            if not conn.writer.is_closing():
                conn.writer.write(frame)

    def note_cap(self, cap: str, detail: str) -> None:
        """Count a limit that was hit; say so at most once a minute per limit."""
        self.stats.caps_hit[cap] += 1
        now = time.monotonic()
        if now - self._caps_said.get(cap, -1e9) >= 60:
            self._caps_said[cap] = now
            log.warning("limit %s reached: %s (counted in tdagg_limit_hits_total)", cap,
                        detail)

    def merge(self, run_id: str, producer: str, partials: list[Any], position: int,
              stream: str | None = None, seq: int = 0, doubtful: bool = False) -> None:
        segment = segment_of(position)
        for partial in partials:
            self.open.merge(run_id, producer, partial, position, segment, stream, seq,
                            doubtful)
            self.stats.samples += self.aggregator.samples(partial)
        self.stats.items += len(partials)

    def note_generator(self, run_id: str, producer: str, generator: protocol.Generator,
                       position: int) -> None:
        """Keep a generator frame for its row. Once every generator of the run that this
        server heard start has ended, no more data is coming: the run's buckets are
        closed now rather than at their end + grace, so that forwarders hear sooner that
        everything is stored."""
        self.generators.note(run_id, producer, generator, segment_of(position))
        running = self.running.setdefault(run_id, set())
        if generator.state == "start":
            running.add(producer)
            return
        running.discard(producer)
        if not running:
            del self.running[run_id]
            self._swap_out(self.open.take_run(run_id))

    def logged_frame(self, producer: str, position: int, seq: int) -> None:
        self.uncommitted.setdefault(producer, deque()).append((position, seq))

    def committed_seq(self, producer: str) -> int:
        """The producer's highest seq below which every frame this server logged is in
        the database."""
        waiting = self.uncommitted.get(producer)
        if waiting:
            return waiting[0][1] - 1
        return self.wal.last_seq(producer)

    def _confirm_committed(self) -> None:
        """Tell each producer which of its frames are in the database now: those logged
        before the first log position a bucket still in memory (or spilled, or a
        generator row) holds."""
        if not self.uncommitted:
            return
        horizon = min((e.first_position for e in chain(self.open.entries.values(),
                                                        self.closing.values())),
                      default=1 << 62)
        segments = [first for first, _ in self.spilled.values()] + self.generators.segments()
        if segments:
            horizon = min(horizon, first_position_of(min(segments)))
        for producer in list(self.uncommitted):
            waiting = self.uncommitted[producer]
            done = 0
            while waiting and waiting[0][0] < horizon:
                done = waiting.popleft()[1]
            if not waiting:
                del self.uncommitted[producer]
            conn = self.confirming.get(producer)
            if done and conn is not None and not conn.writer.is_closing():
                conn.writer.write(protocol.committed(done))

    def _fit_connections_to_files(self) -> None:
        """Raise the open-files limit to its hard limit, and keep the connection cap
        below it, so that the log, the database and /metrics always have descriptors."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
        room = max(soft - FILES_RESERVED, 1) if soft != resource.RLIM_INFINITY else None
        if room is not None and self.max_connections > room:
            log.warning("max_connections %d lowered to %d: the open-files limit is %d "
                        "(raise LimitNOFILE / ulimit -n)", self.max_connections, room, soft)
            self.max_connections = room

    async def _replay(self, records: list[Any]) -> None:
        """Merge logged frames whose data the database rows do not hold yet."""
        if not records:
            return
        assert self._writer is not None
        parsed = []
        refused = 0
        for record in records:
            # Only accepted items are logged; a release that refused fewer items may
            # have logged one that this release refuses: it is counted and skipped.
            partials = []
            message = protocol.unpack(record.body)
            self.logged_frame(record.producer, record.position, record.seq)
            if message.get("type") == "generator":
                self.note_generator(record.run_id, record.producer,
                                    protocol.parse_generator(message, self.limits),
                                    record.position)
                continue
            for item in message.get("items") or []:
                try:
                    partials.append(self.aggregator.parse_item(item, self.limits))
                except protocol.Refused as exc:
                    refused += 1
                    self.stats.refused_items[exc.reason] += 1
                    self.stats.refused_samples[exc.reason] += protocol.claimed_samples(item)
            parsed.append((record, partials, message))
        if refused:
            log.warning("replay: %d logged items are refused by this release's validation "
                        "(counted in tdagg_refused_items_total)", refused)
        keys = list({self.aggregator.key_of(r.run_id, p) for r, ps, _ in parsed for p in ps})
        stored = await self._writer.stored_positions(keys)
        skipped = 0
        for record, partials, message in parsed:
            fresh = [p for p in partials
                     if stored.get(self.aggregator.key_of(record.run_id, p), -1)
                     < record.position]
            skipped += len(partials) - len(fresh)
            if fresh:
                # Doubtful: while this server was away, its forwarders may have sent these
                # frames to another server, which may have stored them.
                source_seq = message.get("source_seq")
                stream = protocol.stream_key(record.producer, message.get("source") or "")
                self.stream_producers[stream] = record.producer
                self.merge(record.run_id, record.producer, fresh, record.position, stream,
                           source_seq if isinstance(source_seq, int) else record.seq,
                           doubtful=True)
        self.stats.replayed_frames = len(records)
        log.info("replayed %d logged frames (%d items already in the database)",
                 len(records), skipped)

    # --- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        # The state directory first: it is locked, so a second server on it stops here.
        records = self.wal.open()
        if self.wal.torn_tail is not None:
            log.warning("write-ahead log: %s", self.wal.torn_tail)
        self._fit_connections_to_files()
        await self.store.open()
        await self.store.ensure_schema(Policies(self.config.retention_days,
                                                self.config.compress_after_days))
        self._writer = self.store.writer(self.aggregator, self.config.bucket_seconds,
                                         self.wal.log_id)
        self.live.start(self.store)
        await self._replay(records)
        # A new or wiped state directory must still log at positions above every row's.
        stored_max = await self._writer.max_position()
        self.wal.ensure_after(stored_max)
        host, port = self.config.listen
        try:
            self._listener = await asyncio.start_server(self._accept, host, port)
        except OSError as exc:
            raise ConfigError(f"listen {host}:{port}: {exc.strerror or exc}") from None
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

    def problems(self) -> list[str]:
        """Why the server is unhealthy now: the log, database writes, the flush loop."""
        return [f"{what}: {error}" for what, error in (
            ("write-ahead log", self.log_error), ("database writes", self.write_error),
            ("flush loop", self.flush_error)) if error]

    async def healthy(self) -> bool:
        """Listening, the log writable, writes succeeding, and the database answers
        within two seconds."""
        if self._listener is None or not self._listener.is_serving() or self._writer is None:
            return False
        if self.problems():
            return False
        try:
            async with asyncio.timeout(2):
                await self.store.ping()
        except (StoreError, TimeoutError):
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
             [(label, len(self.closing) + len(self.spilled))]),
            ("tdagg_queue_buckets_in_log_only", gauge,
             "closed buckets dropped from memory, to be rebuilt from the log",
             [(label, len(self.spilled))]),
            ("tdagg_buckets_written_total", counter, "bucket rows written",
             [(label, s.buckets_written)]),
            ("tdagg_late_rows_total", counter, "written rows that late data was merged into",
             [(label, s.late_rows)]),
            ("tdagg_write_failures_total", counter, "failed database writes (retried)",
             [(label, s.write_failures)]),
            ("tdagg_refused_frames_total", counter, "frames refused, by reason",
             [(f'{label},reason="{r}"', n) for r, n in sorted(s.refused.items())]),
            ("tdagg_refused_items_total", counter,
             "items refused alone (the rest of their frame is kept), by reason",
             [(f'{label},reason="{r}"', n) for r, n in sorted(s.refused_items.items())]),
            ("tdagg_refused_samples_total", counter, "k6 samples in refused items, by reason",
             [(f'{label},reason="{r}"', n) for r, n in sorted(s.refused_samples.items())]),
            ("tdagg_tags_shortened_total", counter,
             "tag keys or values longer than max_tag_length, stored shortened",
             [(label, s.notes["tags_shortened"])]),
            ("tdagg_quarantined_rows_total", counter,
             "bucket rows the database refused for good, kept in quarantine.msgpack",
             [(label, s.quarantined_buckets)]),
            ("tdagg_quarantined_samples_total", counter, "k6 samples in quarantined rows",
             [(label, s.quarantined_samples)]),
            ("tdagg_log_failures_total", counter,
             "reads whose frames the write-ahead log could not store (not acknowledged)",
             [(label, s.log_failures)]),
            ("tdagg_flush_loop_errors_total", counter, "errors caught by the flush loop",
             [(label, s.flush_loop_errors)]),
            ("tdagg_connection_timeouts_total", counter,
             "connections closed for sending no hello or no data in time",
             [(label, s.timeouts)]),
            ("tdagg_limit_hits_total", counter, "connections or reads stopped by a limit",
             [(f'{label},limit="{r}"', n) for r, n in sorted(s.caps_hit.items())]),
            ("tdagg_healthy", gauge,
             "1 when the log is writable, writes succeed and the flush loop runs",
             [(label, 0 if self.problems() else 1)]),
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
                f"{host}:{port}, database {self.store.label}, bucket "
                f"{self.config.bucket_seconds}s, grace {self.config.grace}s, "
                f"log {self.wal.directory} (fsync {self.wal.fsync})"
                + (f", TLS{' with client certificates' if self.tls.verify_mode else ''}"
                   if self.tls else "")
                + (", token required" if self.token else "")
                + (f", metrics http://{self.metrics.address[0]}:{self.metrics.address[1]}"
                   "/metrics" if self.metrics else ""))

    @staticmethod
    def parse_ready_line(line: str | bytes) -> tuple[str, int] | None:
        """The (host, port) that a line written by ``ready_line`` names; None for any other
        line. The host may hold colons (IPv6): the port follows the last one."""
        text = line.decode(errors="replace") if isinstance(line, bytes) else line
        _, marker, rest = text.partition("ready: listening on ")
        host, _, port = rest.split(",", 1)[0].rpartition(":")
        if not marker or not host or not port.isdigit():
            return None
        return host, int(port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        if len(self._connections) >= self.max_connections:
            self.note_cap("max_connections", f"{len(self._connections)} connections open; "
                          "new ones are closed until some end")
            writer.transport.abort()
            return
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
            try:
                self._swap_out(self.open.take_closable(time.time(), self.config.grace))
                written = await self.flush_closing()
            except Exception as exc:  # the loop must outlive any bug or disk error
                self._flush_failed(exc)
                written = False
            else:
                self.flush_error = None
            if written:
                delay = self.config.flush_interval
            else:
                delay = min(max(delay * 2, 0.5), 2.0)

    def _flush_failed(self, exc: Exception) -> None:
        self.stats.flush_loop_errors += 1
        text = f"{type(exc).__name__}: {exc}"
        if text != self.flush_error:  # once per distinct error, not every iteration
            log.error("flush loop error (it goes on; /healthz reports 503 until an "
                      "iteration succeeds): %s", text, exc_info=exc)
        self.flush_error = text

    def _swap_out(self, entries: dict[BucketKey, Entry[Any]]) -> None:
        for key, entry in entries.items():
            pending = self.closing.get(key)
            if pending is None:
                self.closing[key] = entry
            else:
                absorb_entry(self.aggregator, pending, entry)

    async def flush_closing(self) -> bool:
        """Write every closing bucket in one batch; evict only after the commit. False
        when the database could not be written (retry later).

        A batch that fails in a way retrying cannot mend is split until the entries
        that fail alone are found; those are quarantined and the rest is written.
        """
        if not self.closing:
            await self._write_generators()
            self._confirm_committed()
            return True
        assert self._writer is not None
        batch = self.closing
        self.closing = {}
        started = time.perf_counter()
        try:
            # Under the live thresholds' lock: what a write committed is fed to them
            # before any of their builds from the database can take its snapshot.
            async with self.live.write_lock:
                late, failed = await self._writer.write_each(batch)
                self.live.wrote(written_rows(
                    self.aggregator, self.config.bucket_seconds,
                    {key: entry for key, entry in batch.items() if key not in failed}))
            quarantined = self._quarantine(batch, failed)
        except Exception as exc:  # the database is away: writes are idempotent, retry all
            self.stats.write_failures += 1
            self.write_error = f"{type(exc).__name__}: {exc}"
            log.error("database write of %d buckets failed, kept for retry: %r",
                      len(batch), exc)
            # Put the batch back in front of anything closed meanwhile.
            newer, self.closing = self.closing, batch
            self._swap_out(newer)
            self._spill_excess()
            return False
        self.write_error = None
        stuck = failed.keys() - quarantined  # the quarantine file could not be written
        for key in stuck:
            self.closing[key] = batch[key]
        self.stuck = len(stuck)
        self.stats.write_seconds.observe(time.perf_counter() - started)
        self.stats.buckets_written += len(batch) - len(failed)
        if late:
            self.stats.late_rows += late
            log.warning("late data: merged into %d already written bucket rows", late)
        if self.spilled and len(self.closing) < self.config.max_queued_buckets:
            await self._restore_spilled()
        await self._write_generators()
        self._confirm_committed()
        self._release_log()
        return True

    async def _write_generators(self) -> None:
        """Store generator rows, then mark ended generators whose buckets are all written.
        A failure keeps them for the next round (the upserts are idempotent)."""
        assert self._writer is not None
        rows = self.generators.take_rows()
        if rows:
            try:
                await self.store.record_generators([row for row, _ in rows.values()])
            except Exception as exc:
                self.generators.put_back(rows)
                log.warning("could not store %d generator rows, kept for retry: %r",
                            len(rows), exc)
                return
        done = self.generators.written(
            chain(self.open.entries, self.closing, self.spilled))
        if done:
            try:
                await self.store.mark_written(self.aggregator.role, done)
                self.live.generators_written({run_id for run_id, _ in done})
            except Exception as exc:
                for key in done:
                    self.generators.ended[key] = (None, self.wal.segment)
                log.warning("could not mark %d generators written, kept for retry: %r",
                            len(done), exc)

    def _spill_excess(self) -> None:
        """Keep at most max_queued_buckets closed buckets in memory while writes fail;
        the oldest are dropped, and the log (which holds them) rebuilds them later."""
        excess = len(self.closing) - self.config.max_queued_buckets
        if excess <= 0:
            return
        for key in sorted(self.closing, key=lambda k: k[3])[:excess]:
            entry = self.closing.pop(key)
            first, last = self.spilled.get(key, (entry.first_segment, entry.last_position))
            self.spilled[key] = (min(first, entry.first_segment),
                                 max(last, entry.last_position))
        self.stats.spilled_buckets += excess
        self.note_cap("max_queued_buckets",
                      f"{len(self.spilled)} closed buckets wait in the write-ahead log only, "
                      "to be rebuilt from it once the database is back")

    async def _restore_spilled(self) -> None:
        """Rebuild the oldest spilled buckets from the log, as a replay does: an item
        counts if the stored row does not hold its position yet and it belongs to the
        spilled span (later data for the key is queued apart)."""
        assert self._writer is not None
        room = self.config.max_queued_buckets - len(self.closing)
        keys = sorted(self.spilled, key=lambda k: k[3])[:room]
        stored = await self._writer.stored_positions(keys)
        spans = {key: self.spilled[key] for key in keys}
        rebuilt: OpenBuckets[Any, Any] = OpenBuckets(self.aggregator,
                                                      self.config.bucket_seconds)
        agg = self.aggregator
        for record in self.wal.records_from(min(first for first, _ in spans.values())):
            for item in protocol.unpack(record.body).get("items") or []:
                partial = agg.parse_item(item, self.limits)
                key = agg.key_of(record.run_id, partial)
                span = spans.get(key)
                if span is not None and stored.get(key, -1) < record.position <= span[1]:
                    rebuilt.merge(record.run_id, record.producer, partial, record.position,
                                  segment_of(record.position))
        for key in keys:
            del self.spilled[key]
        self._swap_out(rebuilt.take_all())
        log.info("rebuilt %d closed buckets from the write-ahead log; %d still wait there",
                 len(keys), len(self.spilled))

    def _quarantine(self, batch: dict[BucketKey, Entry[Any]],
                    failed: dict[BucketKey, BaseException]) -> set[BucketKey]:
        """Keep the entries the database refuses in the quarantine file; the keys kept
        there (none when the file cannot be written: they stay queued)."""
        if not failed:
            return set()
        agg = self.aggregator
        records = []
        for (run_id, metric, tags, bucket), exc in failed.items():
            entry = batch[(run_id, metric, tags, bucket)]
            state = entry.state if entry.written is None else entry.written
            try:
                values: Any = dataclasses.asdict(agg.values(state))
            except Exception as values_exc:  # the state itself is what is broken
                values = f"{state!r} ({values_exc!r})"
            records.append({"table": TABLE_OF_ROLE[agg.role], "run_id": run_id, "metric": metric,
                            "tags": dict(tags), "bucket": bucket,
                            "samples": 0 if state is None else agg.state_samples(state),
                            "error": f"{type(exc).__name__}: {exc}", "values": values})
        try:
            self.quarantine.append(records)
        except OSError as exc:
            log.error("cannot write %s (%s): %d bucket rows the database refuses stay "
                      "queued", self.quarantine.path, exc, len(records))
            return set()
        self._tell_quarantined(batch, failed, records)
        for record in records:
            self.stats.quarantined_buckets += 1
            self.stats.quarantined_samples += record["samples"]
            log.error("quarantined bucket row: run %r metric %r tags %r bucket %d (%d "
                      "samples): the database refuses it: %s; kept in %s",
                      record["run_id"][:80], record["metric"][:80], record["tags"],
                      record["bucket"], record["samples"], record["error"],
                      self.quarantine.path)
        return set(failed)

    def _tell_quarantined(self, batch: dict[BucketKey, Entry[Any]],
                          failed: dict[BucketKey, BaseException],
                          records: list[dict[str, Any]]) -> None:
        """Tell each producer whose samples a quarantined row holds (its forwarder counts
        them as not stored, and exits 3)."""
        told = set()
        for key, record in zip(failed, records, strict=True):
            entry = batch[key]
            streams = set(entry.sources) | {source for source, *_ in entry.doubtful}
            for producer in {self.stream_producers.get(s) for s in streams} - {None}:
                assert producer is not None
                totals = self.quarantined_for.setdefault(producer, [0, 0])
                totals[0] += 1
                totals[1] += record["samples"]
                told.add(producer)
        for producer in told:
            conn = self.confirming.get(producer)
            if conn is not None and not conn.writer.is_closing():
                conn.writer.write(self.quarantine_notice(producer))

    def quarantine_notice(self, producer: str) -> bytes:
        rows, samples = self.quarantined_for[producer]
        return protocol.quarantined(
            rows, samples, f"the database refuses them for good; kept in "
            f"{self.quarantine.path} (tdagg_quarantined_rows_total on /metrics)")

    def _forget_idle_runs(self) -> None:
        """The series cap is per run; a run silent for RUN_IDLE_SECONDS drops its set."""
        cutoff = time.time() - RUN_IDLE_SECONDS
        for run_id in [r for r, seen in self.series_seen.items() if seen < cutoff]:
            del self.series_seen[run_id]
            self.series.pop(run_id, None)
            self.running.pop(run_id, None)

    def _release_log(self) -> None:
        """Drop log segments whose every bucket is written; roll the current one."""
        self._forget_idle_runs()
        self.wal.rotate_if_due(self.config.bucket_seconds)
        pending = [e.first_segment for e in self.open.entries.values()]
        pending += [e.first_segment for e in self.closing.values()]
        pending += [first for first, _ in self.spilled.values()]
        pending += self.generators.segments()
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
        #    Rows the database refuses for good that cannot be quarantined either (a
        #    full disk) stay in the log, which replays them at the next start.
        self._swap_out(self.open.take_all())
        delay = 0.2
        while self.closing or self.spilled:
            if await self._flush_for_shutdown():
                if not self.spilled and len(self.closing) == self.stuck:
                    self.unwritten_at_exit = self.stuck
                    log.error("%d bucket rows are neither stored nor quarantined; they stay "
                              "in the write-ahead log %s and are replayed at the next start",
                              self.stuck, self.wal.directory)
                    break
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        with contextlib.suppress(Exception):  # kept in the log otherwise, replayed at start
            await self._write_generators()
        # 4. Close the log (everything in it is now in the database) and the pool.
        self.group_commit.close()
        try:
            self.wal.close()
        except OSError as exc:
            log.error("write-ahead log %s could not be closed cleanly (%s); every bucket "
                      "row is written, so nothing is lost", self.wal.directory, exc)
        if self.metrics is not None:
            await self.metrics.close()
        await self.live.close()
        await self.store.close()

    async def _flush_for_shutdown(self) -> bool:
        try:
            return await self.flush_closing()
        except Exception as exc:  # e.g. the log cannot roll on a full disk
            self._flush_failed(exc)
            return False

    def _on_signal(self) -> None:
        # Only sets a flag; shutdown runs in order in serve_until_signal. A second signal
        # forces the exit: what is not written yet is in the log and replayed at start.
        if self.should_exit.is_set():
            print("second signal: exiting now; unwritten buckets are replayed from the "
                  "write-ahead log at the next start", file=sys.stderr, flush=True)
            os._exit(1)
        self.should_exit.set()

    async def serve_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        await self.start()
        print(self.ready_line(), file=sys.stderr, flush=True)
        await self.should_exit.wait()
        log.info("shutting down: writing %d open buckets", len(self.open) + len(self.closing))
        await self.shutdown()
        s = self.stats
        print(f"stopped: {s.frames} frames, {s.samples} samples, {s.buckets_written} bucket "
              f"rows written, {s.late_rows} late, {sum(s.refused.values())} frames and "
              f"{sum(s.refused_items.values())} items refused, {s.quarantined_buckets} rows "
              f"quarantined, {self.unwritten_at_exit} left in the log",
              file=sys.stderr, flush=True)

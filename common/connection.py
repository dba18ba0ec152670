"""One forwarder's connection to a server: framing, hello, validation, log, dedup, merge
and acks. The server (common.server) supplies the log, the aggregator and the limits."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from typing import TYPE_CHECKING, Any

from common import protocol
from common.live_thresholds import parse_items
from common.wal import WalWriteError

if TYPE_CHECKING:
    from common.server import AggregatorServer

log = logging.getLogger("tdagg.server")

# Before its hello, a connection can make the server hold at most this much.
HELLO_MAX_BYTES = 64 * 1024
# A data frame's seq may run ahead of the producer's last one by at most this much: a
# forwarder numbers its frames 1, 2, 3, ... and cannot get this far ahead.
MAX_SEQ_JUMP = 10**9


class Connection:
    """One forwarder connection: framing, hello, validation, log, dedup, merge, ack.

    Frames of one read are validated and appended to the log; only once the log's group
    commit has made them durable are they merged into the open buckets and acknowledged.
    If the log cannot be written, nothing of that read is merged or acknowledged: the
    forwarder is told to retry and the connection closes.
    """

    def __init__(self, server: AggregatorServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = writer.get_extra_info("peername")
        self.decoder = protocol.FrameDecoder(HELLO_MAX_BYTES)
        self.hello: protocol.Hello | None = None
        self.buffered = 0  # this connection's share of server.buffered_bytes
        self.hello_deadline = asyncio.get_running_loop().time() + server.config.hello_timeout
        # Logged frames of the current read, merged once the log commit succeeds: payload,
        # log position, seq, and for data its stream, its seq there, and whether it may be
        # stored already.
        self.logged: list[tuple[list[Any] | protocol.Generator, int, int, str, int, bool]] = []
        # Frames up to this seq may already be in the database (sent to a lost server).
        self.doubtful_through = 0
        self._streams: dict[str, str] = {}

    def refuse(self, exc: protocol.Refused, seq: int | None, fatal: bool = False) -> None:
        self.server.stats.refused[exc.reason] += 1
        log.warning("refused frame from %s (seq %s): %s: %s", self.peer, seq, exc.reason,
                    exc.detail)
        self.writer.write(protocol.error(exc.reason, exc.detail, seq, fatal))

    def _set_buffered(self, pending: int) -> None:
        self.server.buffered_bytes += pending - self.buffered
        self.buffered = pending

    async def _read(self) -> bytes:
        server = self.server
        timeout = server.config.idle_timeout
        if self.hello is None:
            # From the connection's start, not per read: trickling bytes buys no time.
            timeout = max(self.hello_deadline - asyncio.get_running_loop().time(), 0.0)
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read(256 * 1024)
        except TimeoutError:
            what = "no hello" if self.hello is None else "no data"
            server.stats.timeouts += 1
            limit = server.config.hello_timeout if self.hello is None else timeout
            log.info("closing connection from %s: %s in %gs", self.peer, what, limit)
            return b""

    async def run(self) -> None:
        try:
            while True:
                chunk = await self._read()
                if not chunk:
                    return
                server = self.server
                server.stats.bytes += len(chunk)
                if (server.buffered_bytes + len(chunk) > server.config.max_buffered_bytes
                        and self.decoder.pending_bytes + len(chunk) > HELLO_MAX_BYTES):
                    server.note_cap("max_buffered_bytes",
                                    f"incomplete frames of all connections would pass "
                                    f"{server.config.max_buffered_bytes} bytes")
                    self.writer.write(protocol.error(
                        "server_busy", "the server holds too many incomplete frames; "
                        "retry later", None, fatal=False, retry=True))
                    await self.writer.drain()
                    return
                try:
                    bodies = self.decoder.feed(chunk)
                except protocol.FramingError as exc:
                    self.refuse(protocol.Refused("bad_framing", str(exc)), None, fatal=True)
                    return
                self._set_buffered(self.decoder.pending_bytes)
                highest_ack = 0
                keep_open = True
                for body in bodies:
                    welcomed = self.hello is not None
                    ack = self.handle(body)
                    if ack is None or (not welcomed and not await self._welcome()):
                        keep_open = False
                        break
                    highest_ack = max(highest_ack, ack)
                try:
                    self.decoder.check()  # good frames before a bad prefix still count
                except protocol.FramingError as exc:
                    self.refuse(protocol.Refused("bad_framing", str(exc)), None, fatal=True)
                    keep_open = False
                if not await self._commit():
                    return
                if highest_ack:
                    self.writer.write(protocol.ack(highest_ack))
                await self.writer.drain()
                if not keep_open:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._set_buffered(0)
            self.server.unwatch(self)
            if self.hello is not None and self.server.confirming.get(self.hello.producer) is self:
                del self.server.confirming[self.hello.producer]
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _commit(self) -> bool:
        """Make this read's frames durable, then merge them; False if the log failed.

        One log commit per read covers every frame in it, shared with other connections
        committing at the same time; acks go out only after it. Acks are cumulative.
        """
        logged, self.logged = self.logged, []
        server = self.server
        try:
            await server.group_commit.commit()
        except WalWriteError as exc:
            server.stats.log_failures += 1
            server.log_error = str(exc)
            log.error("write-ahead log failed; %d frames from %s not acknowledged, the "
                      "forwarder will resend them: %s", len(logged), self.peer, exc)
            self.writer.write(protocol.error(
                "log_unavailable", f"the server cannot write its log ({exc}); retry later",
                None, fatal=False, retry=True))
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
            return False
        server.log_error = None
        assert self.hello is not None or not logged
        for payload, position, seq, stream, stream_seq, doubtful in logged:
            assert self.hello is not None
            server.logged_frame(self.hello.producer, position, seq)
            if isinstance(payload, protocol.Generator):
                server.note_generator(self.hello.run_id, self.hello.producer, payload,
                                      position)
            else:
                server.merge(self.hello.run_id, self.hello.producer, payload, position,
                             stream, stream_seq, doubtful)
        return True

    def stream(self, source: str) -> str:
        """The row's name for this producer's stream ``source`` (cached per connection)."""
        key = self._streams.get(source)
        if key is None:
            assert self.hello is not None
            key = self._streams[source] = protocol.stream_key(self.hello.producer, source)
            self.server.stream_producers[key] = self.hello.producer
        return key

    def handle(self, body: bytes) -> int | None:
        """Process one frame; return the seq to acknowledge (0 for none), None to close."""
        server = self.server
        server.stats.frames += 1
        seq: int | None = None
        try:
            if self.hello is None:
                return self._handle_hello(protocol.unpack(body, protocol.HELLO_UNPACK))
            message = protocol.unpack(body, server.unpack_limits)
            producer = self.hello.producer
            if message.get("type") == "thresholds":
                thresholds = parse_items(protocol.parse_thresholds(message))
                latest = server.watch(self, self.hello.run_id, thresholds)
                if latest is not None:
                    self.writer.write(latest)
                return 0
            if message.get("type") == "generator":
                generator = protocol.parse_generator(message, server.limits)
                seq = generator.seq
                if not self._new_seq(seq):
                    return seq
                position = server.wal.append(producer, self.hello.run_id, seq, body)
                self.logged.append((generator, position, seq, "", 0, False))
                return seq
            frame = protocol.parse_data(message, server.limits)
            seq = frame.seq
            if not self._new_seq(seq):
                return seq
            accepted, refusals = server.accept_items(self.hello.run_id, frame.items)
            if refusals:
                self.writer.write(protocol.items_refused(seq, refusals))
                # The log holds what was accepted, so that a replay merges just that.
                body = protocol.data_body(seq, [item for _, item in accepted], frame.source,
                                          frame.source_seq)
            position = server.wal.append(producer, self.hello.run_id, seq, body)
            # Moved from another server, or sent before to this one when it had lost its
            # log: the items may be stored already, and are checked at the write.
            moved = frame.source_seq is not None
            self.logged.append(([partial for partial, _ in accepted], position, seq,
                                self.stream(frame.source),
                                seq if frame.source_seq is None else frame.source_seq,
                                moved or seq <= self.doubtful_through))
            return seq
        except protocol.Refused as exc:
            fatal = self.hello is None
            self.refuse(exc, seq, fatal=fatal)
            return None if fatal else 0

    def _new_seq(self, seq: int) -> bool:
        """False for a frame already logged (a resend: acknowledged, not merged again)."""
        assert self.hello is not None
        seen = self.server.wal.seen_seq(self.hello.producer)
        if seq <= seen:
            self.server.stats.duplicate_frames += 1
            return False
        if seq - seen > MAX_SEQ_JUMP:
            raise protocol.Refused(
                "seq_jump", f"seq {seq} is more than {MAX_SEQ_JUMP} above this "
                f"producer's last ({seen})")
        return True

    def _handle_hello(self, message: dict[str, Any]) -> int:
        server = self.server
        hello = protocol.parse_hello(message, server.limits)
        if server.token is not None and not hmac.compare_digest(
                (hello.token or "").encode(), server.token.encode()):
            raise protocol.Refused(
                "bad_token", "missing token" if hello.token is None else "wrong token")
        if hello.role != server.aggregator.role:
            raise protocol.Refused(
                "wrong_server", f"this is the {server.aggregator.role} server; "
                f"the client speaks for {hello.role}")
        if not server.wal.bind(hello.producer, producer_key_digest(hello.producer_key)):
            raise protocol.Refused(
                "producer_taken", f"producer {hello.producer[:40]!r} belongs to another "
                "forwarder (its producer key differs)")
        self.hello = hello
        if hello.sent_before and not server.wal.last_seq(hello.producer):
            # This server does not know the producer, which has sent to it before: it lost
            # its state directory, maybe after storing some of those frames.
            self.doubtful_through = hello.sent_before
        return 0

    async def _welcome(self) -> bool:
        """Welcome a forwarder whose hello was accepted, unless it resends an input its
        run already holds; False (and a fatal error frame) for such a rerun."""
        server = self.server
        assert self.hello is not None
        rerun = await server.rerun_of(self.hello)
        if rerun is not None:
            self.refuse(protocol.Refused("rerun", rerun), None, fatal=True)
            return False
        self.decoder.max_frame_bytes = server.limits.max_frame_bytes
        producer = self.hello.producer
        committed = None
        if self.hello.confirm:
            server.confirming[producer] = self
            committed = server.committed_seq(producer)
        self.writer.write(protocol.welcome(server.aggregator.role,
                                           server.wal.last_seq(producer), committed))
        if self.hello.confirm and producer in server.quarantined_for:
            self.writer.write(server.quarantine_notice(producer))
        return True


def producer_key_digest(key: str | None) -> bytes:
    """What the log keeps of a producer key: never the key itself."""
    if key is None:
        return b""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()

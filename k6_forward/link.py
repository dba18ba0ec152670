"""A forwarder's connection to one server: hello, numbered frames, acks and resends.

No data is dropped. Every frame is kept until the server says it is in the database
(``committed``, cumulative), not only logged (``ack``), or refuses it: a server whose
disk is lost loses nothing, since its frames are sent again, to it or to another server
of the role. Frames not yet committed are held in memory up to ``max_memory_bytes``;
beyond that, in a bounded spool file (k6_forward/spool.py) of up to ``max_spool_bytes``.
When both are full, ``send_items`` waits, which stops the forwarder's reading loop: k6
then waits on the pipe.

Frames are always in sequence order: memory holds the oldest ones and the spool the
newer ones. While the spool is not empty, new frames go to its tail; as acks free
memory, frames move from the spool's head back into memory. A sender task writes frames
in order, reading spooled ones back from the file, and honours TCP flow control, so the
socket buffer holds at most one frame beyond the transport's high-water mark.

When the connection drops, the link reconnects with capped exponential backoff, sends
the hello again (saying the highest seq it ever sent), drops everything up to the
welcome's ``committed``, and resends everything above its ``last_seq`` in order; the
server ignores (but acknowledges) anything it has already merged, and a server that has
lost its log checks the frames it may have stored against the rows.

Each change of state is said once on stderr: connection lost / reconnected, spooling /
spool drained, backpressure / resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import ssl
import sys
import tempfile
import traceback
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from common import protocol
from k6_forward.spool import Spool, SpoolError

# Items per data frame: bounded so a frame stays well under the server's size limit.
ITEMS_PER_FRAME = 500
DEFAULT_MAX_SPOOL_BYTES = 1 << 30
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0  # a reconnect attempt is cheap; a server back after a restart is found fast
# While the server stays unreachable, a reminder at most this often.
STILL_DOWN_EVERY = 60.0
# After backpressure, input resumes once the spool is below this fraction of its limit,
# so that a server that is merely slow does not toggle the state at every frame.
RESUME_SPOOL_FRACTION = 0.75
# A state ends only after this long without falling back into it: spooling once the spool
# has stayed empty (with memory under half its limit), backpressure once input has not
# been paused again. A server that keeps up only just must not toggle them at every ack.
SETTLE_SECONDS = 2.0


class LinkRefused(Exception):
    """The server refused the hello (wrong server, bad version), or the spool cannot be
    read back: retrying cannot help."""


class _ProtocolViolation(Exception):
    """The peer sent something a server does not send; the connection is dropped."""


class _RetryLater(Exception):
    """The server could not take frames now (its log cannot be written, it is busy);
    nothing was refused: reconnect and resend."""


def default_spool_path(spool_dir: str | Path | None, producer: str, role: str) -> Path:
    """SPOOL_DIR/k6-forward-PRODUCER/ROLE.spool; SPOOL_DIR defaults to the temp dir."""
    base = Path(spool_dir) if spool_dir is not None else Path(tempfile.gettempdir())
    return base / f"k6-forward-{producer}" / f"{role}.spool"


class ServerLink:
    def __init__(self, name: str, address: tuple[str, int], producer: str, run_id: str,
                 role: str, max_memory_bytes: int, report: IO[str] | None = None, *,
                 spool_dir: str | Path | None = None,
                 max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
                 tls: ssl.SSLContext | None = None, token: str | None = None,
                 input_id: str | None = None, append: bool = False,
                 spool_name: str | None = None) -> None:
        self.name = name
        self.input_id = input_id
        self.append = append
        self.tls = tls
        self.token = token
        self.address = address
        self.producer = producer
        self.run_id = run_id
        self.role = role
        self.max_memory_bytes = max_memory_bytes
        self.report = report if report is not None else sys.stderr
        self.spool = Spool(default_spool_path(spool_dir, producer, spool_name or role),
                           max_spool_bytes, remove_empty_dir=True)
        self.next_seq = 1
        # This link's name for its stream of frames, kept by the rows they go into.
        self.source = f"{address[0]}:{address[1]}"
        self.logged_seq = 0  # the highest seq the server has acknowledged (logged)
        # A server that never says "committed" (an earlier release): acks free frames.
        self._acks_commit = False
        # Frames not yet committed, held in memory, oldest first; all older than the spool's.
        self.memory: OrderedDict[int, bytes] = OrderedDict()
        self.memory_bytes = 0
        self.frames_sent = 0
        self.frames_spooled = 0
        self.refused: list[str] = []
        # Samples the server refused, by reason: items refused alone, and whole frames.
        self.refused_samples: Counter[str] = Counter()
        self.refused_items: Counter[str] = Counter()
        # Bucket rows holding this forwarder's samples that the server's database refused
        # for good (kept in the server's quarantine file), and all samples in them.
        self.quarantined_rows = 0
        self.quarantined_samples = 0
        self.fatal: str | None = None
        # Secret proof that this forwarder owns its producer id (never printed).
        self.producer_key = secrets.token_hex(16)
        self._tls_probed = False
        self._sent_seq = 0  # highest seq written on the current connection
        self._ever_sent = 0  # highest seq written on any connection
        self._writer: asyncio.StreamWriter | None = None
        self._changed = asyncio.Event()  # acks, refusals, fatal: room may have been freed
        self._more = asyncio.Event()     # a new frame is waiting to be sent
        self._send_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # Reported states, each said once when it starts and once when it ends.
        self._spooling = False
        self._spool_failed = False
        self._spool_error = ""
        self._settle: asyncio.TimerHandle | None = None
        self._paused_since: float | None = None  # start of the backpressure episode
        self._paused_total = 0.0
        self._pauses = 0
        self._last_resume = 0.0
        self._resumed: asyncio.TimerHandle | None = None
        self._down_since: float | None = None
        self._refused_reasons: set[str] = set()
        # Global thresholds: said after every welcome; the server's verdicts go here.
        self.thresholds_frame: bytes | None = None
        self.on_verdicts: Callable[[dict[str, Any]], None] | None = None

    # --- public ----------------------------------------------------------------------

    @property
    def unacked_frames(self) -> int:
        """Frames held: not yet committed (or refused)."""
        return len(self.memory) + len(self.spool)

    @property
    def unacked_bytes(self) -> int:
        return self.memory_bytes + self.spool.live_bytes

    def down_for(self) -> float:
        """Seconds since the server was last reachable (0 while connected, or before the
        first attempt has failed)."""
        if self._down_since is None:
            return 0.0
        return asyncio.get_running_loop().time() - self._down_since

    def say(self, text: str) -> None:
        print(f"k6-forward: {self.name} {self.address[0]}:{self.address[1]}: {text}",
              file=self.report, flush=True)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def send_items(self, items: list[list[Any]]) -> None:
        """Queue items as frames. Waits while memory and spool are both full
        (backpressure); raises LinkRefused once the link has failed for good."""
        async with self._send_lock:
            for start in range(0, len(items), ITEMS_PER_FRAME):
                self._check_fatal()
                seq = self.next_seq
                frame = protocol.data(seq, items[start:start + ITEMS_PER_FRAME], self.source)
                await self._place(seq, frame)

    async def send_moved(self, source: str, source_seq: int, items: list[list[Any]]) -> None:
        """Queue items of frame ``source_seq`` of another server's stream ``source`` (it
        was failed over before saying they are stored): one frame, keeping their origin,
        so that rows holding them already do not count them twice."""
        async with self._send_lock:
            self._check_fatal()
            seq = self.next_seq
            await self._place(seq, protocol.data(seq, items, source, source_seq))

    async def send_generator(self, generator: protocol.Generator) -> None:
        """Queue a generator frame (its seq is this link's next); kept until acknowledged
        like data."""
        async with self._send_lock:
            self._check_fatal()
            seq = self.next_seq
            await self._place(seq, protocol.generator(generator._replace(seq=seq)))

    async def wait_acked(self) -> None:
        """Return once every frame is committed to the database (or refused)."""
        while self.unacked_frames and self.fatal is None:
            self._changed.clear()
            await self._changed.wait()
        self._check_fatal()

    async def wait_logged(self) -> None:
        """Return once the server has logged every frame (or refused it)."""
        while self._first_unlogged() is not None and self.fatal is None:
            self._changed.clear()
            await self._changed.wait()
        self._check_fatal()

    def _first_unlogged(self) -> int | None:
        seq = max(self.logged_seq + 1, self._first_held() or self.next_seq)
        while seq < self.next_seq:
            if seq in self.memory or seq in self.spool:
                return seq
            seq += 1
        return None

    def _first_held(self) -> int | None:
        if self.memory:
            return next(iter(self.memory))
        head = self.spool.first()
        return None if head is None else head[0]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None
        if self._resumed is not None:
            self._resumed.cancel()
            self._end_backpressure()
        if self.spool:
            self.say(f"removing the spool {self.spool.path} with {len(self.spool)} "
                     "unacknowledged frames")
        elif self._spooling:
            self.say(f"spool drained; removed {self.spool.path}")
        self._spooling = False
        self.spool.release()

    # --- placing frames: memory, spool or wait ---------------------------------------

    def _check_fatal(self) -> None:
        if self.fatal is not None:
            raise LinkRefused(self.fatal)

    def _holding(self) -> str:
        text = f"{len(self.memory)} frames, {self.memory_bytes} bytes unacknowledged in memory"
        if self.spool:
            text += f", {len(self.spool)} frames, {self.spool.live_bytes} bytes in the spool"
        return text

    async def _place(self, seq: int, frame: bytes) -> None:
        loop = asyncio.get_running_loop()
        blocked_at: float | None = None
        while not self._try_place(seq, frame, resuming=blocked_at is not None):
            self._check_fatal()
            if blocked_at is None:
                blocked_at = loop.time()
                self._pauses += 1
                if self._resumed is not None:  # paused again before the last pause settled
                    self._resumed.cancel()
                    self._resumed = None
                elif self._paused_since is None:
                    self._paused_since = blocked_at
                    self.say("backpressure: memory and spool full, pausing input "
                             f"({self._holding()})")
            self._changed.clear()
            await self._changed.wait()
        if blocked_at is not None:
            self._last_resume = loop.time()
            self._paused_total += self._last_resume - blocked_at
            self._resumed = loop.call_later(SETTLE_SECONDS, self._end_backpressure)

    def _end_backpressure(self) -> None:
        self._resumed = None
        if self._paused_since is None:
            return
        pauses = f"{self._pauses} pauses" if self._pauses > 1 else "1 pause"
        self.say(f"resumed input: paused {self._paused_total:.1f}s in all ({pauses} over "
                 f"{self._last_resume - self._paused_since:.1f}s); {self._holding()}")
        self._paused_since = None
        self._paused_total = 0.0
        self._pauses = 0

    def _try_place(self, seq: int, frame: bytes, resuming: bool) -> bool:
        size = len(frame)
        # Memory only while the spool is empty, so that memory stays the oldest frames.
        # An empty memory takes any frame, so that one huge frame cannot stall the link.
        if not self.spool and (not self.memory
                               or self.memory_bytes + size <= self.max_memory_bytes):
            self.memory[seq] = frame
            self.memory_bytes += size
        else:
            if self._spool_failed:
                return False
            limit = None
            if resuming and self.spool:
                limit = int(self.spool.capacity * RESUME_SPOOL_FRACTION)
            if not self.spool.fits(size, limit):
                return False
            try:
                self.spool.append(seq, frame)
            except SpoolError as exc:
                self._spool_failed = True
                if str(exc) != self._spool_error:  # a full disk fails at every attempt
                    self._spool_error = str(exc)
                    self.say(f"{exc}; treating the spool as full until it drains")
                return False
            self.frames_spooled += 1
            if self._settle is not None:
                self._settle.cancel()
                self._settle = None
            if not self._spooling:
                self._spooling = True
                self.say(f"memory limit of {self.max_memory_bytes} bytes reached: spooling to "
                         f"{self.spool.path} ({len(self.memory)} frames, {self.memory_bytes} "
                         "bytes in memory)")
        self.next_seq = seq + 1
        self._more.set()
        return True

    # --- removing frames: acks and refusals ------------------------------------------

    def _on_ack(self, seq: int) -> None:
        self.logged_seq = max(self.logged_seq, seq)
        if self._acks_commit:
            self._on_committed(seq)
        else:
            self._changed.set()

    def _on_committed(self, seq: int) -> None:
        memory = self.memory
        while memory:
            first = next(iter(memory))
            if first > seq:
                break
            self.memory_bytes -= len(memory.pop(first))
        self.spool.discard_through(seq)
        self._room_freed()

    def _remove(self, seq: int) -> bytes | None:
        """Take frame ``seq`` out of memory or the spool (None: held by neither)."""
        frame = self.memory.pop(seq, None)
        if frame is not None:
            self.memory_bytes -= len(frame)
        elif seq in self.spool:
            frame = self.spool.read(seq)
            self.spool.discard(seq)
        return frame

    def _on_refused(self, seq: int, reason: str) -> None:
        frame = self._remove(seq)
        if frame is not None:
            items = protocol.unpack(frame[4:]).get("items") or []
            self.refused_items[reason] += len(items)
            self.refused_samples[reason] += sum(map(protocol.claimed_samples, items))
        self._room_freed()

    def take_held(self) -> list[tuple[str, int, list[list[Any]]]]:
        """Remove every frame held (not known to be in the database); return the items of
        its data frames with their origin, (stream, seq there, items), for the other
        servers of the role. Generator frames among them are dropped: the other servers
        got theirs."""
        moved = []
        for seq in range(self._first_held() or self.next_seq, self.next_seq):
            frame = self._remove(seq)
            if frame is None:
                continue
            message = protocol.unpack(frame[4:])
            items = message.get("items")
            if items:
                moved.append((message.get("source") or "", message.get("source_seq") or seq,
                              items))
        self._room_freed()
        return moved

    def _room_freed(self) -> None:
        # Move frames from the spool's head back into memory while they fit.
        while True:
            head = self.spool.first()
            if head is None or (self.memory
                                and self.memory_bytes + head[1] > self.max_memory_bytes):
                break
            seq, frame = self.spool.pop_first()
            self.memory[seq] = frame
            self.memory_bytes += len(frame)
        if not self.spool:
            self._spool_failed = False
            if (self._spooling and self._settle is None
                    and self.memory_bytes <= self.max_memory_bytes // 2):
                self._settle = asyncio.get_running_loop().call_later(
                    SETTLE_SECONDS, self._end_spooling)
        self._changed.set()

    def _end_spooling(self) -> None:
        self._settle = None
        if self.spool or self.memory_bytes > self.max_memory_bytes // 2:
            return  # spilled again, or tried again at the next ack
        self._spooling = False
        self.spool.release()
        self.say(f"spool drained, back to memory only; removed {self.spool.path} "
                 f"({self._holding()})")

    # --- connection ------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        failures = 0
        last_report = 0.0
        while True:
            try:
                reader, writer = await asyncio.open_connection(*self.address, ssl=self.tls)
            except OSError as exc:
                now = loop.time()
                failures += 1
                if self._down_since is None:
                    self._down_since = now
                if isinstance(exc, ssl.SSLError):
                    reason = f"TLS: {exc.reason or exc}"
                    if exc.reason == "WRONG_VERSION_NUMBER":
                        reason += "; the server does not speak TLS: drop --tls-ca"
                else:
                    reason = os.strerror(exc.errno) if exc.errno else str(exc)
                if failures == 1:
                    self.say(f"cannot connect ({reason}); retrying with backoff up to "
                             f"{BACKOFF_MAX:.0f}s; holding {self._holding()}")
                    last_report = now
                elif now - last_report >= STILL_DOWN_EVERY:
                    self.say(f"still cannot connect after {failures} attempts in "
                             f"{now - self._down_since:.0f}s ({reason}); holding "
                             f"{self._holding()}")
                    last_report = now
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            _keepalive(writer)
            started = loop.time()
            done_before = self.next_seq - self.unacked_frames  # acknowledged or refused
            welcomed = False
            try:
                await self._session(reader, writer)
            except LinkRefused as exc:
                self._fail(f"server refused this forwarder: {exc}")
                return
            except SpoolError as exc:
                self._fail(f"frames are lost: {exc}")
                return
            except (OSError, asyncio.IncompleteReadError, protocol.FramingError,
                    protocol.Refused, _ProtocolViolation, _RetryLater) as exc:
                reason = (os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno
                          else str(exc) or type(exc).__name__)
                if isinstance(exc, _RetryLater):
                    reason = f"the server asks to retry later: {exc}"
                now = loop.time()
                welcomed = self._writer is not None
                if welcomed:
                    self._down_since = last_report = now
                    failures = 1
                    self.say(f"connection lost ({reason}); reconnecting; holding "
                             f"{self._holding()}")
                else:
                    failures += 1
                    if self._down_since is None:
                        self._down_since = now
                    if failures == 1:
                        hint = await self._tls_hint()
                        self.say(f"connection closed before the welcome ({reason}); "
                                 f"{hint}retrying with backoff up to {BACKOFF_MAX:.0f}s")
                        last_report = now
            except Exception as exc:  # a bug: fail loudly rather than hang in wait_acked
                traceback.print_exc(file=self.report)
                self._fail(f"link failed: {exc!r}")
                return
            finally:
                self._writer = None
                if self.unacked_frames:
                    writer.transport.abort()  # unsent bytes are resent on the next connection
                else:
                    writer.close()
            # A server that welcomes and drops at once must not be hammered: start the
            # backoff again only after a session that got frames acknowledged or lasted.
            progressed = self.next_seq - self.unacked_frames > done_before
            if welcomed and (progressed or loop.time() - started >= BACKOFF_MAX):
                delay = BACKOFF_FIRST
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _tls_hint(self) -> str:
        """When a plaintext hello was met by silence, find out once whether the server
        speaks TLS, and if so say which option is missing."""
        if self.tls is not None or self._tls_probed:
            return ""
        self._tls_probed = True
        probe = ssl.create_default_context()
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE  # only asks "is this TLS?"; nothing is sent
        try:
            async with asyncio.timeout(5):
                _, writer = await asyncio.open_connection(*self.address, ssl=probe)
        except (OSError, TimeoutError):
            return ""
        writer.transport.abort()
        return "the server speaks TLS: pass --tls-ca (and --tls-cert/--tls-key if it asks); "

    def _fail(self, text: str) -> None:
        self.fatal = text
        self.say(text)
        self._changed.set()

    async def _session(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        """One connection; it ends only by an exception. ``self._writer`` is set once the
        server has welcomed this forwarder."""
        writer.write(protocol.hello(self.producer, self.run_id, self.role, self.token,
                                    self.producer_key, self.input_id, self.append,
                                    confirm=True, sent_before=self._ever_sent))
        await writer.drain()
        decoder = protocol.FrameDecoder()
        pending: list[dict[str, Any]] = []
        message = await _receive(reader, decoder, pending)
        kind = message.get("type")
        if kind == "error":
            raise LinkRefused(f"{message.get('reason')}: {message.get('detail')}")
        if kind != "welcome":
            raise _ProtocolViolation(f"expected a welcome, got {kind!r}")
        last_seq = message.get("last_seq") or 0
        committed = message.get("committed", last_seq)
        if not isinstance(last_seq, int) or not isinstance(committed, int):
            raise _ProtocolViolation(f"welcome with last_seq {last_seq!r}, committed "
                                     f"{committed!r}")
        self._acks_commit = "committed" not in message
        # A server that lost its log says 0: frames it had logged are resent.
        self.logged_seq = last_seq
        self._on_committed(committed)
        if self.thresholds_frame is not None:
            writer.write(self.thresholds_frame)
        self._writer = writer
        self._sent_seq = min(last_seq, self.next_seq - 1)
        if self._down_since is not None:
            elapsed = asyncio.get_running_loop().time() - self._down_since
            resend = sum(1 for seq in self.memory if seq > last_seq) + sum(
                1 for seq in self.spool.seqs() if seq > last_seq)
            self.say(f"connected after {elapsed:.1f}s; server has logged up to seq {last_seq} "
                     f"and stored up to {committed}; sending the {resend} frames it has not "
                     f"logged; holding {self._holding()}")
            self._down_since = None
        receiver = asyncio.create_task(self._receive_loop(reader, decoder, pending))
        sender = asyncio.create_task(self._send_loop(writer))
        try:
            done, _ = await asyncio.wait({receiver, sender},
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise ConnectionResetError("session ended")  # neither task returns normally
        finally:
            for task in (receiver, sender):
                task.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)

    async def _receive_loop(self, reader: asyncio.StreamReader,
                            decoder: protocol.FrameDecoder,
                            pending: list[dict[str, Any]]) -> None:
        while True:
            message = await _receive(reader, decoder, pending)
            kind = message.get("type")
            if kind in ("ack", "committed"):
                seq = message.get("seq")
                if not isinstance(seq, int):
                    raise _ProtocolViolation(f"{kind} with seq {seq!r}")
                if kind == "ack":
                    self._on_ack(seq)
                else:
                    self._on_committed(seq)
            elif kind == "error":
                reason, detail = message.get("reason"), message.get("detail")
                if message.get("fatal"):
                    raise LinkRefused(f"{reason}: {detail}")
                if message.get("retry"):
                    raise _RetryLater(f"{reason}: {detail}")
                if isinstance(message.get("items"), list):
                    self._items_refused(message.get("seq"), message["items"])
                else:
                    self._refusal(message.get("seq"), str(reason), str(detail))
            elif kind == "verdicts":
                if self.on_verdicts is not None:
                    self.on_verdicts(message)
            elif kind == "quarantined":
                self._quarantined(message)
            else:
                raise _ProtocolViolation(f"unexpected {kind!r} frame from the server")

    def _refusal(self, seq: object, reason: str, detail: str) -> None:
        self.refused.append(f"{reason}: {detail}")
        if reason not in self._refused_reasons:
            self._refused_reasons.add(reason)
            self.say(f"server refused frame {seq} ({reason}: {detail}); the server drops it; "
                     "further refusals for this reason are counted, not printed")
        if isinstance(seq, int):
            self._on_refused(seq, reason)

    def _quarantined(self, message: dict[str, Any]) -> None:
        rows, samples = message.get("rows"), message.get("samples")
        if not (isinstance(rows, int) and isinstance(samples, int)):
            raise _ProtocolViolation(f"quarantined with rows {rows!r}, samples {samples!r}")
        if rows > self.quarantined_rows:
            self.quarantined_rows, self.quarantined_samples = rows, samples
            self.say(f"{rows} bucket rows holding samples of this forwarder are not "
                     f"stored ({samples} samples in them, over all generators): "
                     f"{message.get('detail')}")

    def _items_refused(self, seq: object, refusals: list[Any]) -> None:
        """Some items of frame ``seq`` were refused; the rest is kept (and acked)."""
        for entry in refusals:
            if not (isinstance(entry, list) and len(entry) == 4):
                raise _ProtocolViolation(f"item refusal {entry!r}")
            reason, items, samples, detail = entry
            reason = str(reason)
            self.refused_items[reason] += items if isinstance(items, int) else 0
            self.refused_samples[reason] += samples if isinstance(samples, int) else 0
            if reason not in self._refused_reasons:
                self._refused_reasons.add(reason)
                self.say(f"server refused {items} items ({samples} samples) of frame {seq}: "
                         f"{reason}: {detail}; the rest of the frame is stored; further "
                         "refusals for this reason are counted, not printed")

    def _next_frame(self) -> tuple[int, bytes] | None:
        """The first unacknowledged frame above the last one sent on this connection."""
        seq = self._sent_seq + 1
        if self.memory:
            seq = max(seq, next(iter(self.memory)))
        else:
            head = self.spool.first()
            if head is None:
                return None
            seq = max(seq, head[0])
        while seq < self.next_seq:  # gaps are refused frames only
            frame = self.memory.get(seq)
            if frame is not None:
                return seq, frame
            if seq in self.spool:
                return seq, self.spool.read(seq)
            seq += 1
        return None

    async def _send_loop(self, writer: asyncio.StreamWriter) -> None:
        while True:
            found = self._next_frame()
            if found is None:
                self._more.clear()
                await self._more.wait()
                continue
            seq, frame = found
            writer.write(frame)
            self._sent_seq = seq
            self._ever_sent = max(self._ever_sent, seq)
            self.frames_sent += 1
            await writer.drain()  # TCP flow control


async def _receive(reader: asyncio.StreamReader, decoder: protocol.FrameDecoder,
                   pending: list[dict[str, Any]]) -> dict[str, Any]:
    while not pending:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionResetError("server closed the connection")
        pending.extend(protocol.unpack(body) for body in decoder.feed(chunk))
    return pending.pop(0)


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """Notice a server host that vanished without closing the connection."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)

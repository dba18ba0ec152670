"""A forwarder's connection to one server: hello, numbered frames, acks and resends.

Every frame stays in ``unacked`` until the server acknowledges its sequence number (acks
are cumulative). When the connection drops, the link reconnects with capped exponential
backoff and resends everything unacknowledged, in order; the server drops the ones it
has already merged by (producer, seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import OrderedDict
from typing import IO, Any

from common import protocol

# Items per data frame: bounded so a frame stays well under the server's size limit.
ITEMS_PER_FRAME = 500


class LinkRefused(Exception):
    """The server refused the hello (wrong server, bad version): retrying cannot help."""


class ServerLink:
    def __init__(self, name: str, address: tuple[str, int], producer: str, run_id: str,
                 role: str, max_unacked_bytes: int, report: IO[str] | None = None) -> None:
        self.name = name
        self.address = address
        self.producer = producer
        self.run_id = run_id
        self.role = role
        self.max_unacked_bytes = max_unacked_bytes
        self.report = report if report is not None else sys.stderr
        self.next_seq = 1
        self.unacked: OrderedDict[int, bytes] = OrderedDict()
        self.unacked_bytes = 0
        self.frames_sent = 0
        self.refused: list[str] = []
        self.fatal: str | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def say(self, text: str) -> None:
        print(f"k6-forward: {self.name} {self.address[0]}:{self.address[1]}: {text}",
              file=self.report, flush=True)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def send_items(self, items: list[list[Any]]) -> None:
        """Queue items as frames; wait while too much is unacknowledged (backpressure)."""
        for start in range(0, len(items), ITEMS_PER_FRAME):
            await self._wait_for_room()
            seq = self.next_seq
            self.next_seq += 1
            frame = protocol.data(seq, items[start:start + ITEMS_PER_FRAME])
            self.unacked[seq] = frame
            self.unacked_bytes += len(frame)
            if self._writer is not None:
                self._writer.write(frame)
                self.frames_sent += 1

    async def _wait_for_room(self) -> None:
        warned = False
        while self.unacked_bytes > self.max_unacked_bytes and self.fatal is None:
            if not warned:
                self.say(f"{self.unacked_bytes} bytes unacknowledged: pausing input "
                         "(backpressure) until the server catches up")
                warned = True
            self._changed.clear()
            await self._changed.wait()
        if self.fatal is not None:
            raise LinkRefused(self.fatal)

    async def wait_acked(self) -> None:
        while self.unacked and self.fatal is None:
            self._changed.clear()
            await self._changed.wait()
        if self.fatal is not None:
            raise LinkRefused(self.fatal)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()

    async def _run(self) -> None:
        delay = 0.1
        connected_before = False
        while True:
            try:
                reader, writer = await asyncio.open_connection(*self.address)
            except OSError as exc:
                self.say(f"cannot connect ({exc.strerror or exc}); retrying in {delay:.1f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if connected_before:
                self.say(f"reconnected; resending {len(self.unacked)} unacknowledged frames")
            connected_before = True
            delay = 0.1
            try:
                await self._session(reader, writer)
            except (OSError, asyncio.IncompleteReadError, protocol.FramingError) as exc:
                self.say(f"connection lost ({exc!r}); reconnecting")
            except LinkRefused as exc:
                self.fatal = str(exc)
                self.say(f"server refused this forwarder: {exc}")
                self._changed.set()
                return
            finally:
                self._writer = None
                writer.close()
            await asyncio.sleep(delay)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(protocol.hello(self.producer, self.run_id, self.role))
        decoder = protocol.FrameDecoder()
        welcomed = False
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionResetError("server closed the connection")
            for body in decoder.feed(chunk):
                message = protocol.unpack(body)
                kind = message.get("type")
                if kind == "welcome" and not welcomed:
                    welcomed = True
                    self._on_ack(int(message.get("last_seq") or 0))
                    for frame in self.unacked.values():
                        writer.write(frame)
                        self.frames_sent += 1
                    self._writer = writer
                elif kind == "ack":
                    self._on_ack(int(message["seq"]))
                elif kind == "error":
                    reason, detail = message.get("reason"), message.get("detail")
                    if message.get("fatal") or not welcomed:
                        raise LinkRefused(f"{reason}: {detail}")
                    self.refused.append(f"{reason}: {detail}")
                    self.say(f"server refused frame {message.get('seq')}: {reason}: {detail}")
                    seq = message.get("seq")
                    if isinstance(seq, int) and seq in self.unacked:
                        self.unacked_bytes -= len(self.unacked.pop(seq))
                        self._changed.set()
            await writer.drain()

    def _on_ack(self, seq: int) -> None:
        while self.unacked:
            first = next(iter(self.unacked))
            if first > seq:
                break
            self.unacked_bytes -= len(self.unacked.pop(first))
        self._changed.set()

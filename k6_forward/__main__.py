"""k6-forward: read k6 ``--out json`` lines, aggregate per (series, bucket), send partials.

    k6 run --out json=- script.js | k6-forward --run-id checkout-test
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import ssl
import stat
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import IO, Any

from common import protocol
from common.cli import run_loop
from common.config import ConfigError, ForwarderConfig, load
from k6_forward.lines import LineAggregator
from k6_forward.link import LinkRefused, ServerLink

CHUNK_BYTES = 1 << 20
IDLE_FLUSH_SECONDS = 2.0

EPILOG = """\
Trend metrics go to td-server as t-digest partials; counters, gauges and rates go to
non-td-server as sums. A bucket's partial is sent once event time (the k6 timestamps)
has moved LOCAL_GRACE seconds past its end, when input has been idle for 2 s, and at end
of input; stragglers are sent as further partials. The forwarder exits 0 once both
servers have acknowledged everything it read.

It never drops data. Every frame is kept until a server acknowledges it and is resent
after a reconnect (capped exponential backoff); the servers drop duplicates. While a
server is away, frames are held in memory up to --max-unacked-bytes, then in a spool
file up to --max-spool-bytes; when both are full it stops reading its input and k6
waits on the pipe. Lines it cannot use (not JSON, unknown metric type, a point before
its Metric line, a bad time, a non-finite or huge value, a line cut off at the end) are
reported with their line number, counted and skipped; the last line sums them up.
"""


def _enlarge_pipe(fd: int) -> None:
    """Let a pipe hold CHUNK_BYTES, so that one read can take a whole chunk.

    A pipe holds 64 KiB by default, so each read of k6's output would return at most
    that. Linux only; where it fails, reads just stay smaller.
    """
    try:
        import fcntl  # noqa: PLC0415 - not on every platform

        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK_BYTES)
    except (ImportError, OSError, ValueError):
        pass


def _open(path: str) -> IO[bytes]:
    if path == "-":
        with contextlib.suppress(AttributeError, OSError, ValueError):
            _enlarge_pipe(sys.stdin.fileno())
        return sys.stdin.buffer
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115 - closed by the caller


async def read_chunks(paths: Sequence[str]) -> AsyncIterator[bytes | None]:
    """Yield input chunks; yield None when no input arrived for IDLE_FLUSH_SECONDS."""
    loop = asyncio.get_running_loop()
    for path in paths or ["-"]:
        stream = _open(path)
        read = getattr(stream, "read1", stream.read)
        try:
            while True:
                pending = loop.run_in_executor(None, read, CHUNK_BYTES)
                while True:
                    done, _ = await asyncio.wait({pending}, timeout=IDLE_FLUSH_SECONDS)
                    if done:
                        break
                    yield None
                chunk = pending.result()
                if not chunk:
                    break
                yield chunk
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()


def feed_chunk(lines: LineAggregator, carry: bytes, chunk: bytes) -> bytes:
    """Feed the complete lines of carry + chunk; return the incomplete rest (the new carry)."""
    if not carry:
        return lines.feed_buffer(chunk)
    # Complete the carried line on its own, rather than copy the whole chunk behind it.
    end = chunk.find(b"\n") + 1
    if not end:
        return carry + chunk
    lines.feed_buffer(carry + chunk[:end])
    return lines.feed_buffer(memoryview(chunk)[end:])


def client_security(config: ForwarderConfig) -> tuple[ssl.SSLContext | None, str | None]:
    """TLS context and token from the config; unreadable files are a ConfigError."""
    tls = None
    if config.tls_ca or config.tls_cert or config.tls_key:
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        try:
            tls = ssl.create_default_context(
                cafile=str(config.tls_ca) if config.tls_ca else None)
            if config.tls_cert and config.tls_key:
                tls.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls_ca {config.tls_ca}, tls_cert {config.tls_cert}, "
                              f"tls_key {config.tls_key}: {exc}") from None
    token = None
    if config.token_file:
        try:
            token = config.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"token_file {config.token_file}: {exc.strerror}") from None
    return tls, token


class Forwarder:
    def __init__(self, config: ForwarderConfig, run_id: str, producer: str) -> None:
        self.config = config
        tag_keys = tuple(k.strip() for k in config.tags.split(",") if k.strip())
        self.lines = LineAggregator(tag_keys, config.bucket_seconds)
        tls, token = client_security(config)
        self.td = ServerLink("td-server", config.td, producer, run_id, protocol.ROLE_TD,
                             config.max_unacked_bytes, spool_dir=config.spool_dir,
                             max_spool_bytes=config.max_spool_bytes, tls=tls, token=token)
        self.non_td = ServerLink("non-td-server", config.non_td, producer, run_id,
                                 protocol.ROLE_NON_TD, config.max_unacked_bytes,
                                 spool_dir=config.spool_dir,
                                 max_spool_bytes=config.max_spool_bytes, tls=tls, token=token)
        self.items_sent = 0

    async def send(self, closed: tuple[list[Any], list[Any]]) -> None:
        trends, counters = closed
        if trends:
            await self.td.send_items([protocol.trend_item(p) for p in trends])
        if counters:
            await self.non_td.send_items([protocol.counter_item(p) for p in counters])
        self.items_sent += len(trends) + len(counters)

    async def run(self, paths: Sequence[str]) -> None:
        self.td.start()
        self.non_td.start()
        carry = b""
        grace = self.config.local_grace
        async for chunk in read_chunks(paths):
            if chunk is None:
                await self.send(self.lines.close_all())
                continue
            carry = feed_chunk(self.lines, carry, chunk)
            await self.send(self.lines.close_ready(grace))
        if carry.strip():
            # k6 was cut off mid-line: the fragment is reported and counted, not parsed.
            self.lines.lines += 1
            self.lines.skip(self.lines.lines, "truncated_line",
                            f"input ended inside a line ({len(carry)} bytes without newline)")
        await self.send(self.lines.close_all())
        await self.td.wait_acked()
        await self.non_td.wait_acked()

    def summary(self) -> str:
        skipped = sum(self.lines.skipped.values())
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.lines.skipped.items()))
        return (f"k6-forward: done: {self.lines.lines} lines read, {self.lines.samples} samples "
                f"in {self.items_sent} partials sent and acknowledged, {skipped} lines skipped"
                + (f" ({reasons})" if reasons else ""))


def main(argv: Sequence[str] | None = None) -> int:
    def extra(parser: Any) -> None:
        parser.add_argument("inputs", nargs="*", metavar="FILE",
                            help="k6 JSON files (.gz accepted); default: standard input")
        parser.epilog = EPILOG

    config, args = load(ForwarderConfig, "k6-forward",
                        "Forward a k6 --out json stream to td-server and non-td-server.",
                        argv, extra=extra)
    run_id = config.run_id or f"run-{uuid.uuid4().hex[:12]}"
    if not config.run_id:
        print(f"k6-forward: run id {run_id}", file=sys.stderr, flush=True)
    producer = uuid.uuid4().hex
    try:
        forwarder = Forwarder(config, run_id, producer)
    except ConfigError as exc:
        print(f"k6-forward: error: {exc}", file=sys.stderr)
        return 2

    async def go() -> int:
        try:
            await forwarder.run(args.inputs)
        except LinkRefused as exc:
            print(f"k6-forward: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"k6-forward: error: cannot read input: {exc}", file=sys.stderr)
            return 1
        finally:
            await forwarder.td.close()
            await forwarder.non_td.close()
        print(forwarder.summary(), file=sys.stderr, flush=True)
        return 0

    return run_loop(go())


if __name__ == "__main__":
    sys.exit(main())

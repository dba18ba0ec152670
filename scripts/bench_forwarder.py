#!/usr/bin/env python3
"""Throughput of k6-forward against an in-process parse-only ceiling, as ratios.

The machine this runs on is noisy, so no absolute figure is a target on its own: every
figure is divided by the ceiling (``orjson.loads`` over every line, in-process) measured
in the same run. The target is forwarder / ceiling >= 0.5.

The input is the real k6 recording concatenated ``--copies`` times, each copy's
timestamps shifted by the recording's span (rounded up to a whole second, so copies do
not overlap and the nanosecond fractions stay verbatim), written to a temporary file.

Measured, each the best of ``--repeat`` runs:

* ceiling: ``orjson.loads`` on every line (file read and split before the timer), once
  before the other measurements and once after them, the faster counting;
* ``LineAggregator.feed`` alone, in-process, on the lines of the 1 MiB chunks the
  forwarder reads (the list-of-lines API, which joins them and calls ``feed_buffer``);
* ``LineAggregator.feed_buffer`` alone, in-process, on those chunks as the forwarder's
  reading loop hands them over (``k6_forward.__main__.feed_chunk``: raw bytes, the
  incomplete last line carried over);
* feed_buffer + closing buckets into digests, in-process (the forwarder's work besides
  I/O);
* the real ``k6-forward`` process with the file as argument, and once reading it from a
  pipe on stdin (``cat FILE | k6-forward``), sending to two stub servers this script
  runs on 127.0.0.1 (they speak common.protocol: welcome the hello, ack every frame);
* ``k6-forward`` on an empty file: its fixed start-up and shutdown cost.

    python scripts/bench_forwarder.py --input FILE [--copies 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import gzip
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from common import protocol
from common.config import ForwarderConfig
from common.timebucket import NS_PER_S, parse_epoch_ns
from k6_forward.__main__ import CHUNK_BYTES, feed_chunk
from k6_forward.lines import LineAggregator

TARGET_RATIO = 0.5
_TIME = re.compile(rb'"time":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)')


# --- building the input -------------------------------------------------------------


@dataclass
class Stream:
    path: Path
    copies: int
    lines: int
    nbytes: int
    span_seconds: float
    shift_seconds: int


def read_recording(path: Path) -> list[bytes]:
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw: bytes = f.read()
    lines = raw.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def recording_span_ns(lines: list[bytes]) -> int:
    """Last minus first event time of the Point lines, in nanoseconds."""
    lo, hi = math.inf, -math.inf
    for line in lines:
        obj = orjson.loads(line)
        if obj.get("type") == "Point":
            ns = parse_epoch_ns(obj["data"]["time"])
            lo, hi = min(lo, ns), max(hi, ns)
    if lo > hi:
        raise SystemExit("the recording holds no Point lines")
    return int(hi - lo)


def _shift_text(text: bytes, seconds: int) -> bytes:
    """Shift the 'YYYY-MM-DDTHH:MM:SS' part of a timestamp; the offset is left as is."""
    parsed = time.strptime(text.decode(), "%Y-%m-%dT%H:%M:%S")
    shifted = time.gmtime(calendar.timegm(parsed) + seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", shifted).encode()


def shifted_copy(lines: list[bytes], seconds: int) -> list[bytes]:
    if seconds == 0:
        return lines
    cache: dict[bytes, bytes] = {}

    def repl(match: re.Match[bytes]) -> bytes:
        key = match.group(1)
        new = cache.get(key)
        if new is None:
            new = cache[key] = _shift_text(key, seconds)
        return b'"time":"' + new

    return [_TIME.sub(repl, line, count=1) for line in lines]


def build_stream(source: Path, copies: int, directory: Path) -> Stream:
    lines = read_recording(source)
    span_ns = recording_span_ns(lines)
    shift = math.ceil(span_ns / NS_PER_S)
    path = directory / f"k6-x{copies}.json"
    nbytes = 0
    with open(path, "wb") as out:
        for copy in range(copies):
            chunk = b"\n".join(shifted_copy(lines, copy * shift)) + b"\n"
            out.write(chunk)
            nbytes += len(chunk)
    return Stream(path, copies, len(lines) * copies, nbytes, span_ns / NS_PER_S, shift)


# --- in-process measurements --------------------------------------------------------


def best_of(repeat: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeat))


def time_parse_ceiling(path: Path) -> float:
    lines = path.read_bytes().split(b"\n")
    loads = orjson.loads
    start = time.perf_counter()
    for line in lines:
        if line:
            loads(line)
    return time.perf_counter() - start


def read_chunks(path: Path) -> list[bytes]:
    """The forwarder's reads of the file: CHUNK_BYTES each."""
    with open(path, "rb") as f:
        return list(iter(lambda: f.read(CHUNK_BYTES), b""))


def line_lists(chunks: list[bytes]) -> list[list[bytes]]:
    """The same chunks as lists of complete lines (for ``feed``), carry kept."""
    lists: list[list[bytes]] = []
    carry = b""
    for chunk in chunks:
        parts = (carry + chunk).split(b"\n")
        carry = parts.pop()
        lists.append(parts)
    if carry:
        lists.append([carry])
    return lists


def new_aggregator() -> LineAggregator:
    config = ForwarderConfig()
    tag_keys = tuple(k.strip() for k in config.tags.split(",") if k.strip())
    return LineAggregator(tag_keys, config.bucket_seconds, report=io.StringIO())


def time_feed_lines(lists: list[list[bytes]]) -> float:
    agg = new_aggregator()
    start = time.perf_counter()
    for parts in lists:
        agg.feed(parts)
    return time.perf_counter() - start


def time_feed_buffer(chunks: list[bytes]) -> float:
    """What the forwarder's reading loop does with each chunk, without closing."""
    agg = new_aggregator()
    start = time.perf_counter()
    carry = b""
    for chunk in chunks:
        carry = feed_chunk(agg, carry, chunk)
    return time.perf_counter() - start


def time_feed_and_close(chunks: list[bytes]) -> float:
    """The forwarder's whole work on the chunks except I/O: feed, close, digests."""
    agg = new_aggregator()
    grace = ForwarderConfig().local_grace
    start = time.perf_counter()
    carry = b""
    for chunk in chunks:
        carry = feed_chunk(agg, carry, chunk)
        agg.close_ready(grace)
    agg.close_all()
    return time.perf_counter() - start


def in_process(path: Path, repeat: int) -> tuple[float, float, float]:
    """Best seconds of feed(lines), feed_buffer(chunks), and feed_buffer plus closing."""
    chunks = read_chunks(path)
    lists = line_lists(chunks)
    feed_lines = best_of(repeat, lambda: time_feed_lines(lists))
    feed = best_of(repeat, lambda: time_feed_buffer(chunks))
    feed_close = best_of(repeat, lambda: time_feed_and_close(chunks))
    return feed_lines, feed, feed_close


# --- the real forwarder against stub servers ----------------------------------------


@dataclass
class StubServer:
    """Acks everything: welcome(role, 0) for the hello, ack(seq) for each data frame."""

    role: str
    frames: int = 0
    items: int = 0
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = field(default=None, repr=False)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        decoder = protocol.FrameDecoder()
        try:
            while chunk := await reader.read(1 << 16):
                for body in decoder.feed(chunk):
                    message = protocol.unpack(body)
                    if message["type"] == "hello":
                        writer.write(protocol.welcome(self.role, 0))
                    elif message["type"] == "data":
                        self.frames += 1
                        self.items += len(message["items"])
                        writer.write(protocol.ack(message["seq"]))
                    elif message["type"] == "generator":  # start and end of the run
                        writer.write(protocol.ack(message["seq"]))
                await writer.drain()
        except (ConnectionError, protocol.FramingError, protocol.Refused):
            pass
        finally:
            writer.close()


_SUMMARY = re.compile(rb"done: (\d+) lines read; (\d+) samples read, .*; (\d+) partials "
                      rb"acknowledged")


@dataclass
class ForwarderRun:
    seconds: float
    lines_read: int
    samples: int
    partials: int


async def run_forwarder(path: Path, via_stdin: bool, td: StubServer,
                        non_td: StubServer) -> ForwarderRun:
    exe = shutil.which("k6-forward", path=str(Path(sys.executable).parent)) or "k6-forward"
    argv = [exe, "--td", f"127.0.0.1:{td.port}", "--non-td", f"127.0.0.1:{non_td.port}",
            "--run-id", "bench"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TDAGG_")}
    start = time.perf_counter()
    if via_stdin:
        read_fd, write_fd = os.pipe()
        cat = await asyncio.create_subprocess_exec("cat", str(path), stdout=write_fd)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=read_fd, stderr=asyncio.subprocess.PIPE, env=env)
        os.close(read_fd)
        os.close(write_fd)
    else:
        proc = await asyncio.create_subprocess_exec(
            *argv, str(path), stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env)
    _, stderr = await proc.communicate()
    seconds = time.perf_counter() - start
    if via_stdin:
        await cat.wait()
    found = _SUMMARY.search(stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"k6-forward failed (exit {proc.returncode}):\n{stderr.decode()}")
    lines, samples, partials = (int(g) for g in found.groups())
    return ForwarderRun(seconds, lines, samples, partials)


async def forwarder_measurements(stream: Stream, empty: Path, repeat: int,
                                 ) -> dict[str, ForwarderRun]:
    td, non_td = StubServer(protocol.ROLE_TD), StubServer(protocol.ROLE_NON_TD)
    await td.start()
    await non_td.start()
    try:
        results: dict[str, ForwarderRun] = {}
        for name, path, via_stdin in (("file", stream.path, False),
                                      ("stdin", stream.path, True),
                                      ("empty", empty, False)):
            runs = [await run_forwarder(path, via_stdin, td, non_td) for _ in range(repeat)]
            results[name] = min(runs, key=lambda r: r.seconds)
        return results
    finally:
        await td.stop()
        await non_td.stop()


# --- report -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-forwarder-") as tmp:
        directory = Path(tmp)
        stream = build_stream(args.input, args.copies, directory)
        empty = directory / "empty.json"
        empty.write_bytes(b"")
        load_before = os.getloadavg()[0]
        ceiling_first = best_of(args.repeat, lambda: time_parse_ceiling(stream.path))
        feed_lines, feed, feed_close = in_process(stream.path, args.repeat)
        runs = asyncio.run(forwarder_measurements(stream, empty, args.repeat))
        # Once more at the end: the faster of the two is the ceiling, so that a burst of
        # load on the machine cannot make the ceiling slow and the ratios look good.
        ceiling_last = best_of(args.repeat, lambda: time_parse_ceiling(stream.path))
        load_after = os.getloadavg()[0]
    ceiling = min(ceiling_first, ceiling_last)
    n = stream.lines
    for name in ("file", "stdin"):
        if runs[name].lines_read != n:
            print(f"warning: k6-forward ({name}) read {runs[name].lines_read} lines, "
                  f"expected {n}", file=sys.stderr)
    ceiling_rate = n / ceiling

    def row(what: str, seconds: float) -> dict[str, Any]:
        rate = n / seconds
        return {"what": what, "seconds": round(seconds, 4), "lines_per_s": round(rate),
                "ratio_to_ceiling": round(rate / ceiling_rate, 3)}

    rows = [
        row("ceiling: orjson.loads per line, in-process", ceiling),
        row("LineAggregator.feed(list of lines) alone, in-process", feed_lines),
        row("LineAggregator.feed_buffer(chunk) alone, in-process", feed),
        row("feed_buffer + close_ready/close_all (digests), in-process", feed_close),
        row("k6-forward FILE (process, stub servers)", runs["file"].seconds),
        row("k6-forward reading stdin (cat FILE piped in)", runs["stdin"].seconds),
    ]
    ratio = min(rows[-2]["ratio_to_ceiling"], rows[-1]["ratio_to_ceiling"])
    return {
        "machine": machine(),
        "input": {"source": str(args.input), "copies": stream.copies, "lines": n,
                  "bytes": stream.nbytes, "recording_span_s": round(stream.span_seconds, 3),
                  "shift_per_copy_s": stream.shift_seconds},
        "repeat": args.repeat,
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
        "ceiling_first_last_s": [round(ceiling_first, 4), round(ceiling_last, 4)],
        "rows": rows,
        "forwarder_startup_s": round(runs["empty"].seconds, 3),
        "forwarder": {k: asdict(v) for k, v in runs.items()},
        "target_ratio": TARGET_RATIO,
        "worst_forwarder_ratio": ratio,
        "meets_target": ratio >= TARGET_RATIO,
    }


def print_markdown(result: dict[str, Any]) -> None:
    m, inp = result["machine"], result["input"]
    print(f"Machine: {m['cores']} cores, Python {m['python']}, {m['platform']}")
    print(f"Input: {inp['source']} concatenated {inp['copies']} times, each copy's timestamps "
          f"shifted by the recording's span ({inp['recording_span_s']} s, rounded up to "
          f"{inp['shift_per_copy_s']} s): {inp['lines']} lines, "
          f"{inp['bytes'] / 1e6:.1f} MB. Best of {result['repeat']} runs each.")
    first, last = result["ceiling_first_last_s"]
    print(f"The ceiling is the faster of its runs before ({first} s) and after ({last} s) the "
          f"others. 1-minute load average: {result['load_average_1min'][0]} before, "
          f"{result['load_average_1min'][1]} after.")
    print()
    print("| measurement | seconds | lines/s | ratio to ceiling |")
    print("|---|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['what']} | {r['seconds']:.3f} | {r['lines_per_s']:,} | "
              f"{r['ratio_to_ceiling']:.2f} |")
    print()
    fw = result["forwarder"]["file"]
    print(f"k6-forward start-up + shutdown on an empty file: {result['forwarder_startup_s']} s "
          "(included in the process rows above).")
    print(f"k6-forward reported {fw['lines_read']} lines, {fw['samples']} samples, "
          f"{fw['partials']} partials acknowledged.")
    verdict = "meets" if result["meets_target"] else "is BELOW"
    print(f"Forwarder / ceiling (worse of file and stdin): {result['worst_forwarder_ratio']:.2f}"
          f", which {verdict} the target of {result['target_ratio']}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8,
                        help="how many time-shifted copies of the recording (default 8)")
    parser.add_argument("--input", type=Path, required=True,
                        help="k6 --out json recording, .gz accepted (python -m scripts.bench "
                        "records one: common/harness/record.js)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per measurement; the best is kept (default 3)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    if args.copies < 1 or args.repeat < 1:
        parser.error("--copies and --repeat must be >= 1")
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_markdown(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

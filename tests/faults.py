"""Helpers for fault-injection tests: a paced synthetic k6 stream, a cutting TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

METRICS = {"http_req_duration": "trend", "http_reqs": "counter", "http_req_failed": "rate",
           "vus": "gauge", "http_req_connecting": "trend"}
_OFFSET = timezone(timedelta(hours=5, minutes=45))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def k6_time(epoch_ns: int) -> str:
    """An RFC 3339 timestamp with nanoseconds and a +05:45 offset, as k6 might write it."""
    seconds, ns = divmod(epoch_ns, 10**9)
    local = datetime.fromtimestamp(seconds, UTC).astimezone(_OFFSET)
    return local.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}+05:45"


def metric_lines() -> list[str]:
    return [json.dumps({"type": "Metric", "metric": name,
                        "data": {"name": name, "type": kind, "contains": "default"}})
            for name, kind in METRICS.items()]


def point_line(metric: str, epoch_ns: int, value: float, tags: dict[str, str]) -> str:
    return json.dumps({"type": "Point", "metric": metric,
                       "data": {"time": k6_time(epoch_ns), "value": value, "tags": tags}})


def request_lines(rng: random.Random, epoch_ns: int, vus: int) -> list[str]:
    name = rng.choice(("a", "b"))
    failed = rng.random() < 0.05
    tags = {"name": name, "status": "500" if failed else "200", "url": f"/x/{rng.random()}"}
    return [
        point_line("http_reqs", epoch_ns, 1, tags),
        point_line("http_req_duration", epoch_ns, round(rng.lognormvariate(1.0, 0.8), 6), tags),
        point_line("http_req_connecting", epoch_ns,
                   0 if rng.random() < 0.9 else round(rng.random(), 6), tags),
        point_line("http_req_failed", epoch_ns, 1 if failed else 0, tags),
        point_line("vus", epoch_ns, vus, {}),
    ]


async def feed_stream(stdin: asyncio.StreamWriter, raw: Path, seconds: float,
                      per_second: int, seed: int = 7) -> int:
    """Write a live stream for ``seconds``: ``per_second`` requests/s stamped with now."""
    rng = random.Random(seed)
    lines = metric_lines()
    written = 0
    with raw.open("w") as out:
        out.write("\n".join(lines) + "\n")
        stdin.write(("\n".join(lines) + "\n").encode())
        start = time.monotonic()
        tick = 0.02
        while (elapsed := time.monotonic() - start) < seconds:
            batch: list[str] = []
            for _ in range(max(1, int(per_second * tick))):
                batch += request_lines(rng, time.time_ns(), 1 + int(elapsed) % 5)
            text = "\n".join(batch) + "\n"
            out.write(text)
            stdin.write(text.encode())
            await stdin.drain()
            written += len(batch)
            await asyncio.sleep(tick)
    stdin.close()
    return written


class CuttingProxy:
    """Forwards loopback TCP to a target and cuts every connection every ``cut_every`` s."""

    def __init__(self, target: tuple[str, int], cut_every: float) -> None:
        self.target = target
        self.cut_every = cut_every
        self.cuts = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._cutter: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    async def _cut_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cut_every)
            if self._writers:
                self.cuts += 1
            for writer in list(self._writers):
                transport = writer.transport
                transport.abort()  # type: ignore[attr-defined]

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self._cutter = asyncio.create_task(self._cut_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        assert self._cutter is not None
        self._cutter.cancel()
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def forwarder(td: tuple[str, int], non_td: tuple[str, int], run_id: str,
                    *extra: str) -> AsyncIterator[asyncio.subprocess.Process]:
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "k6_forward", "--run-id", run_id, "--td", f"{td[0]}:{td[1]}",
        "--non-td", f"{non_td[0]}:{non_td[1]}", *extra,
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ))
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def report(fault: str, **figures: Any) -> None:
    """Append one fault's figures to $TDAGG_FAULT_REPORT, for the closing note's table."""
    path = os.environ.get("TDAGG_FAULT_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"fault": fault, **figures}) + "\n")

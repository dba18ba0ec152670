"""Self-metrics and health over HTTP: /metrics (Prometheus text) and /healthz.

A tiny asyncio HTTP/1.0 responder: two fixed GET paths do not justify a dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

# Upper bounds of the database write latency histogram, in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}'
               for b, c in zip(self.bounds, self.counts, strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.sum}", f"{name}_count{suffix} {self.total}"]
        return out


def exposition(families: list[tuple[str, str, str, list[tuple[str, Any]]]]) -> str:
    """Prometheus text format from (name, type, help, [(labels, value)]) families."""
    lines: list[str] = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if kind == "histogram":
                lines += value.lines(name, labels)
            else:
                lines.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")
    return "\n".join(lines) + "\n"


class MetricsEndpoint:
    def __init__(self, render: Callable[[], str], healthy: Callable[[], Awaitable[bool]]) -> None:
        self.render = render
        self.healthy = healthy
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path = request.split(b" ", 2)[:2]
            if method != b"GET":
                status, body, kind = "405 Method Not Allowed", "GET only\n", "text/plain"
            elif path.split(b"?")[0] == b"/metrics":
                status, body = "200 OK", self.render()
                kind = "text/plain; version=0.0.4; charset=utf-8"
            elif path.split(b"?")[0] == b"/healthz":
                ok = await self.healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                body, kind = ("ok\n" if ok else "unhealthy\n"), "text/plain"
            else:
                status, body, kind = "404 Not Found", "try /metrics or /healthz\n", "text/plain"
            payload = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: "
                         f"{len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, ValueError):
            pass
        finally:
            writer.close()

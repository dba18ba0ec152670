"""The servers as processes: starting them (--start-servers), finding the process that
listens on a local port, and reading CPU time and peak RSS from /proc (Linux)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

_READY = re.compile(rb"ready: listening on (\S+):(\d+),")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process so far (not of its children)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM: the highest resident set size of the process over its life."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == _LISTEN \
                    and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    return inodes


def listening_pid(port: int) -> int | None:
    """The process holding a listening TCP socket on this port on this host, found in
    /proc (needs permission to read the other process's fd table: same user, or root)."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in wanted:
                        return int(entry.name)
    return None


def is_local(host: str) -> bool:
    return host in ("localhost", "::1", "0.0.0.0", "::") or host.startswith("127.")


@dataclass
class ServerProcess:
    """A td-server or non-td-server this program started."""

    name: str
    process: asyncio.subprocess.Process
    address: tuple[str, int]
    stderr_lines: list[bytes] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        return b"".join(self.stderr_lines[-lines:]).decode(errors="replace")

    async def stop(self, within: float = 60.0) -> int:
        """SIGTERM: the server writes every open bucket and exits."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        if self._drain is not None:
            await self._drain
        return code

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def _drain(stream: asyncio.StreamReader, sink: list[bytes]) -> None:
    while line := await stream.readline():
        sink.append(line)


async def start_server(module: str, name: str, dsn: str, state_dir: Path,
                       extra: list[str], ready_within: float = 60.0) -> ServerProcess:
    """Start ``python -m MODULE`` on 127.0.0.1:0 and return once its ready line names
    the port. Raises RuntimeError (with the server's output) if it does not get there."""
    command = [sys.executable, "-m", module, "--listen", "127.0.0.1:0",
               "--state-dir", str(state_dir), "--metrics-listen", "", *extra]
    # The DSN goes by environment, not argv, where ps would show its password.
    env = {**os.environ, "TDAGG_DSN": dsn} if dsn else None
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env)
    assert process.stderr is not None
    lines: list[bytes] = []
    try:
        async with asyncio.timeout(ready_within):
            while True:
                line = await process.stderr.readline()
                if not line:
                    await process.wait()
                    raise RuntimeError(f"{name} exited with code {process.returncode} before "
                                       f"it was ready:\n{b''.join(lines).decode()}")
                lines.append(line)
                match = _READY.search(line)
                if match:
                    break
    except BaseException as exc:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if isinstance(exc, TimeoutError):
            raise RuntimeError(f"{name} was not ready within {ready_within:.0f}s:\n"
                               f"{b''.join(lines).decode()}") from None
        raise
    server = ServerProcess(name, process, (match.group(1).decode(), int(match.group(2))),
                           lines)
    server._drain = asyncio.create_task(_drain(process.stderr, lines))
    return server

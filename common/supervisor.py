"""``--processes N``: N servers of one role on consecutive ports, run by one parent.

``common.cli.run_server`` hands over here when N > 1. Server i is the same program with
``--processes 1``, listening on the --listen port + i, serving /metrics on the
--metrics-listen port + i (port 0 stays 0), with its state in STATE_DIR/i. The parent:

- relays each server's stderr, every line prefixed with ``[i] ``, and once every server
  has printed its ready line prints its own, naming the list to give k6-forward, and
  tells systemd READY=1 (the servers do not talk to systemd: ``NotifyAccess=main``);
- under a systemd watchdog, gives each server a notify socket of its own and the same
  WATCHDOG_USEC, kills a ready server that stops pinging (it is then started again), and
  pings systemd itself;
- restarts a server that exits while no stop was asked, after a delay that doubles per
  death in a row (0.5 s up to 10 s), saying so with its exit status; a server that exits
  before its first ready line (a port taken, a locked state directory) stops them all
  instead, and the parent exits with its status;
- on SIGTERM or SIGINT passes the signal on (a second one kills them), and exits once all
  have exited: 0 if all exited 0, else 1.

The plan (ports, directories, flags, lines) is pure; ``Supervisor`` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import hostport_text
from common.notify import notify, watchdog_interval
from common.server import AggregatorServer
from common.wal import segment_numbers

FIRST_DELAY = 0.5  # seconds before a server that died is started again
MAX_DELAY = 10.0  # the delay doubles per death in a row, up to this
STABLE_AFTER = 60.0  # a server that ran this long counts its deaths afresh
LAST_PORT = 65535
LINE_LIMIT = 1 << 20  # a longer stderr line is not relayed
# systemd talks to the parent only (NotifyAccess=main): the servers must not see these.
PARENT_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
WILDCARDS = ("0.0.0.0", "::", "")


class PlanError(ValueError):
    """The settings do not fit N servers; the message names the option."""


@dataclass(frozen=True)
class Child:
    index: int
    listen: tuple[str, int]
    metrics_listen: tuple[str, int] | None
    state_dir: Path

    @property
    def name(self) -> str:
        return f"process {self.index} ({hostport_text(*self.listen)})"

    def flags(self) -> list[str]:
        """Appended to the parent's own arguments: the last of a flag wins."""
        metrics = "" if self.metrics_listen is None else hostport_text(*self.metrics_listen)
        return ["--processes", "1", "--listen", hostport_text(*self.listen),
                "--metrics-listen", metrics, "--state-dir", str(self.state_dir)]


def plan(processes: int, listen: tuple[str, int], metrics_listen: tuple[str, int] | None,
         state_dir: Path) -> list[Child]:
    if listen[1] == 0:
        raise PlanError(f"--processes {processes} needs a fixed --listen port, not 0: "
                        "server i listens on that port + i")
    for flag, address in (("--listen", listen), ("--metrics-listen", metrics_listen)):
        if address is not None and address[1] and address[1] + processes - 1 > LAST_PORT:
            raise PlanError(
                f"--processes {processes} with {flag} {hostport_text(*address)} needs ports "
                f"up to {address[1] + processes - 1}; the last port is {LAST_PORT}")
    if metrics_listen is not None and metrics_listen[1] and \
            abs(metrics_listen[1] - listen[1]) < processes:
        raise PlanError(
            f"--processes {processes}: the ports from --listen {hostport_text(*listen)} "
            f"and from --metrics-listen {hostport_text(*metrics_listen)} overlap")
    return [Child(i, (listen[0], listen[1] + i),
                  None if metrics_listen is None else
                  (metrics_listen[0], metrics_listen[1] + i if metrics_listen[1] else 0),
                  state_dir / str(i))
            for i in range(processes)]


def forwarder_list(children: Sequence[Child]) -> str:
    """HOST:PORT,... for k6-forward; a wildcard address is shown as HOST."""
    return ",".join(hostport_text("HOST" if host in WILDCARDS else host, port)
                    for host, port in (child.listen for child in children))


def ready_line(prog: str, role: str, children: Sequence[Child]) -> str:
    servers = forwarder_list(children)
    line = (f"{prog} ready: {len(children)} processes; give k6-forward "
            f"--{role.replace('_', '-')} {servers}")
    return line + (" (HOST: this machine's name or address)" if "HOST:" in servers else "")


def restart_delay(deaths_in_a_row: int) -> float:
    return min(FIRST_DELAY * 2 ** max(deaths_in_a_row - 1, 0), MAX_DELAY)


def exit_text(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def final_status(codes: Sequence[int]) -> int:
    return 0 if all(code == 0 for code in codes) else 1


def stray_logs(state_dir: Path, processes: int) -> list[Path]:
    """Directories whose write-ahead log no server of this start replays: STATE_DIR itself
    when N > 1 (a run without --processes), and STATE_DIR/j for j >= N (a run with more;
    with N = 1, every STATE_DIR/j)."""
    candidates = [state_dir] if processes > 1 else []
    with contextlib.suppress(OSError):
        candidates += sorted((path for path in state_dir.iterdir() if path.name.isdigit()
                              and int(path.name) >= (processes if processes > 1 else 0)
                              and path.is_dir()), key=lambda path: int(path.name))
    return [path for path in candidates if segment_numbers(path)]


def stray_warning(prog: str, directory: Path) -> str:
    return (f"{prog}: warning: {directory} holds a write-ahead log that no server started "
            "now replays (it was written with another --processes); anything in it not yet "
            "in the database stays there until a server runs on it once: "
            f"{prog} --processes 1 --state-dir {directory} --listen 127.0.0.1:0 "
            "--metrics-listen '' with the same database, stopped by SIGTERM once ready; "
            "then remove the directory")


def _die_with_parent() -> Callable[[], None] | None:
    """For a child, between fork and exec (Linux): SIGTERM when the parent dies, so that
    no server outlives a parent that was killed."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, pr_set_pdeathsig, sigterm = os.getpid(), 1, int(signal.SIGTERM)

    def set_up() -> None:
        prctl(pr_set_pdeathsig, sigterm)
        if os.getppid() != parent:  # it died before prctl
            os._exit(1)
    return set_up


class Supervisor:
    def __init__(self, prog: str, role: str, command: Sequence[str],
                 children: Sequence[Child], environ: Mapping[str, str]) -> None:
        self.prog = prog
        self.role = role
        self.command = list(command)
        self.children = list(children)
        self.env = {k: v for k, v in environ.items() if k not in PARENT_ONLY}
        self.running: dict[int, asyncio.subprocess.Process] = {}
        self.ever_ready: set[int] = set()
        self.codes: dict[int, int] = {}
        self.failed: int | None = None  # a server that exited before it was ever ready
        self.signalled = False
        self.killing = False
        self.stop_signal = signal.SIGTERM
        self.preexec = _die_with_parent()
        self.stopping = asyncio.Event()
        self.interval = watchdog_interval()  # systemd's WATCHDOG_USEC / 2, in seconds
        self.last_ping: dict[int, float] = {}  # servers watched: ready in their current run

    def say(self, text: str) -> None:
        print(f"{self.prog}: {text}", file=sys.stderr, flush=True)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        watchdog = asyncio.create_task(self._watchdog(self.interval)) if self.interval \
            else None
        try:
            await asyncio.gather(*(self._keep(child) for child in self.children))
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if self.failed is not None:
            return self.failed
        return final_status([self.codes.get(child.index, 0) for child in self.children])

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.signalled:
            self.killing = True
            self.say("second signal: killing the servers; what they have not written is "
                     "replayed from their write-ahead logs at the next start")
            for process in self.running.values():
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            return
        self.signalled = True
        self._stop(sig)

    def _stop(self, sig: signal.Signals) -> None:
        if not self.stopping.is_set():
            notify("STOPPING=1")
        self.stop_signal = sig
        self.stopping.set()
        for process in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    async def _keep(self, child: Child) -> None:
        env = dict(self.env)
        listener = None
        if self.interval:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
            name = f"tdagg-{os.getpid()}-{child.index}-{os.urandom(4).hex()}"
            sock.bind("\0" + name)  # abstract: no file to clean up
            env |= {"NOTIFY_SOCKET": "@" + name,
                    "WATCHDOG_USEC": str(round(self.interval * 2_000_000))}
            listener = asyncio.create_task(self._listen(child, sock))
        try:
            await self._keep_running(child, env)
        finally:
            if listener is not None:
                listener.cancel()
                sock.close()

    async def _keep_running(self, child: Child, env: Mapping[str, str]) -> None:
        """Run one server until a stop is asked, starting it again when it dies."""
        deaths = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            code = await self._run_once(child, env)
            self.codes[child.index] = code
            if self.stopping.is_set():
                return
            if child.index not in self.ever_ready:
                self.say(f"{child.name} {exit_text(code)} before it was ready: stopping "
                         "the others")
                self.failed = code if code > 0 else 1
                self._stop(signal.SIGTERM)
                return
            deaths = 1 if time.monotonic() - started >= STABLE_AFTER else deaths + 1
            delay = restart_delay(deaths)
            self.say(f"{child.name} {exit_text(code)}; starting it again in {delay:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def _run_once(self, child: Child, env: Mapping[str, str]) -> int:
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command, *child.flags(), env=env,
                stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                limit=LINE_LIMIT, process_group=0, preexec_fn=self.preexec)
        except OSError as exc:
            self.say(f"cannot start {child.name}: {exc}")
            return 1
        self.running[child.index] = process
        if self.stopping.is_set():  # the signal came while it was being started
            process.send_signal(signal.SIGKILL if self.killing else self.stop_signal)
        assert process.stderr is not None
        relay = asyncio.create_task(self._relay(child, process.stderr))
        try:
            code = await process.wait()
        finally:
            del self.running[child.index]
            self.last_ping.pop(child.index, None)
        # The rest of its output; not forever, should something it started hold the pipe.
        await asyncio.wait({relay}, timeout=1.0)
        return code

    async def _relay(self, child: Child, stream: asyncio.StreamReader) -> None:
        prefix = f"[{child.index}] ".encode()
        out = sys.stderr.buffer
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # longer than LINE_LIMIT; the rest of it is dropped
                line = b"(a line too long to relay)\n"
            if not line:
                return
            with contextlib.suppress(OSError):  # keep reading: a full pipe stops a server
                out.write(prefix + line + (b"" if line.endswith(b"\n") else b"\n"))
                out.flush()
            if AggregatorServer.parse_ready_line(line) is None:
                continue
            if self.interval and child.index in self.running:
                self.last_ping[child.index] = time.monotonic()  # watched from now on
            if child.index not in self.ever_ready:
                self.ever_ready.add(child.index)
                if len(self.ever_ready) == len(self.children) and not self.stopping.is_set():
                    print(ready_line(self.prog, self.role, self.children), file=sys.stderr,
                          flush=True)
                    notify("READY=1")

    async def _listen(self, child: Child, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await loop.sock_recv(sock, 4096)
            if b"WATCHDOG=1" in message.split(b"\n") and child.index in self.last_ping:
                self.last_ping[child.index] = time.monotonic()

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd; kill a server that missed its own pings for WATCHDOG_USEC."""
        while True:
            now = time.monotonic()
            for index, seen in list(self.last_ping.items()):
                process = self.running.get(index)
                if now - seen > 2 * interval and process and not self.stopping.is_set():
                    self.say(f"{self.children[index].name} sent no watchdog ping for "
                             f"{now - seen:.1f} s: killing it")
                    del self.last_ping[index]
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def supervise(prog: str, role: str, module: str, argv: Sequence[str], processes: int,
              listen: tuple[str, int], metrics_listen: tuple[str, int] | None,
              state_dir: Path) -> int:
    """Run ``processes`` servers (``python -m MODULE ARGV`` plus each one's flags) until a
    signal; the exit status of the whole. Exit 2 when the settings do not fit."""
    try:
        children = plan(processes, listen, metrics_listen, state_dir)
    except PlanError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    for directory in stray_logs(state_dir, processes):
        print(stray_warning(prog, directory), file=sys.stderr, flush=True)
    supervisor = Supervisor(prog, role, [sys.executable, "-m", module, *argv], children,
                            os.environ)
    return asyncio.run(supervisor.run())

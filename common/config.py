"""One frozen configuration object per program, resolved from four layers.

Precedence: defaults < TOML file (``--config``) < ``TDAGG_*`` environment < CLI flags.
Every value remembers where it came from, for ``--print-config`` and for errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import redact


class ConfigError(Exception):
    """An invalid setting: names the key, the source and the expected form."""


def parse_hostport(text: Any) -> tuple[str, int]:
    if not isinstance(text, str):
        raise ValueError("expected a string")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT with a port from 0 to 65535")
    return host.strip("[]"), int(port)


def hostport_text(host: str, port: int) -> str:
    """HOST:PORT as parse_hostport reads it back ([HOST]:PORT for an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_server_list(text: Any) -> tuple[tuple[str, int], ...]:
    """One or more HOST:PORT, comma-separated (or a TOML list): the servers of one role.
    An empty entry or a server named twice is refused, naming it."""
    entries = text if isinstance(text, list) else str(text).split(",") \
        if isinstance(text, str) else None
    if entries is None:
        raise ValueError("expected HOST:PORT[,HOST:PORT...] or a list of them")
    servers: list[tuple[str, int]] = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"entry {number} is empty: expected HOST:PORT[,HOST:PORT...]")
        try:
            server = parse_hostport(entry.strip())
        except ValueError as exc:
            raise ValueError(f"entry {number} ({entry.strip()!r}): {exc}") from None
        server = (server[0].lower(), server[1])
        if server in servers:
            raise ValueError(f"{server[0]}:{server[1]} is listed twice (entries "
                             f"{servers.index(server) + 1} and {number}): each server once")
        servers.append(server)
    return tuple(servers)


def _positive_int(text: Any) -> int:
    # TOML gives typed values: refuse bool and float rather than truncate them.
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"expected an integer, got {type(text).__name__}")
    value = int(text)
    if value < 1:
        raise ValueError("expected an integer >= 1")
    return value


def _at_least(text: Any, low: int) -> int:
    value = _positive_int(text)
    if value < low:
        raise ValueError(f"expected an integer >= {low}")
    return value


MAX_PROCESSES = 64


def _processes(text: Any) -> int:
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"expected an integer, got {type(text).__name__}")
    value = int(text)
    if not 1 <= value <= MAX_PROCESSES:
        raise ValueError(f"expected an integer from 1 to {MAX_PROCESSES}")
    return value


def _non_negative_float(text: Any) -> float:
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise ValueError(f"expected a number, got {type(text).__name__}")
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("expected a finite number >= 0")
    return value


def _optional_positive_float(text: Any) -> float | None:
    if text is None or text == "":
        return None
    return _positive_float(text)


def _positive_float(text: Any) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise ValueError("expected a number > 0")
    return value


def _bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    if isinstance(text, str) and text.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(text, str) and text.lower() in ("false", "no", "0", "off", ""):
        return False
    raise ValueError("expected true or false")


def _text(text: Any) -> str:
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        return ",".join(text)  # tags = ["name", "method"] in TOML
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    return text


def _optional_text(text: Any) -> str | None:
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    return text


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(text: Any) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return str(text)
    return parse


def _optional_hostport(text: Any) -> tuple[str, int] | None:
    return None if text in (None, "") else parse_hostport(text)


def _optional_path(text: Any) -> Path | None:
    value = _optional_text(text)
    return Path(value) if value else None


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tdagg"


def _field(default: Any, parse: Callable[[Any], Any], help: str, form: str,
           secret: bool = False) -> Any:
    """A setting; ``secret=True`` masks its value in --print-config and in errors."""
    return field(default=default,
                 metadata={"parse": parse, "help": help, "form": form, "secret": secret})


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, int] = _field(
        ("127.0.0.1", 7410), parse_hostport, "address to accept forwarders on", "HOST:PORT")
    processes: int = _field(
        1, _processes,
        "how many servers to run, on consecutive ports (one core each); with N > 1 this "
        "process starts and supervises them: see 'several processes' below",
        f"1..{MAX_PROCESSES}")
    dsn: str | None = _field(
        None, _optional_text,
        "where rows are stored: postgresql:// or postgres:// (PostgreSQL or TimescaleDB), "
        "clickhouse:// or chdb://PATH (ClickHouse), or memory://NAME (in this process "
        "only, gone at exit: for trials); without one, "
        "PG* variables if PGHOST or PGDATABASE is set, else the embedded PostgreSQL in "
        "DATA_DIR/pgdata", "DSN")
    data_dir: Path = _field(
        default_data_dir(), lambda text: Path(_text(text)),
        "directory for the embedded PostgreSQL, shared by both servers", "PATH")
    bucket_seconds: int = _field(10, _positive_int, "bucket width in seconds", "INT >= 1")
    retention_days: float | None = _field(
        None, _optional_positive_float,
        "TimescaleDB: drop bucket rows older than this many days (a retention policy on "
        "both tables); unset leaves any policy as it is", "DAYS")
    compress_after_days: float | None = _field(
        None, _optional_positive_float,
        "TimescaleDB: compress bucket rows older than this many days (a compression "
        "policy, segmented by run_id and metric); unset leaves any policy as it is", "DAYS")
    grace: float = _field(
        5.0, _non_negative_float,
        "seconds after a bucket's end to wait for stragglers before writing it", "SECONDS")
    flush_interval: float = _field(
        0.5, _non_negative_float, "how often the flush loop looks for closable buckets",
        "SECONDS")
    state_dir: Path | None = _field(
        None, _optional_path,
        "directory for the write-ahead log and the dedup table (default: DATA_DIR/td_server "
        "or DATA_DIR/non_td_server)", "PATH")
    wal_fsync: str = _field(
        "always", _choice("always", "off"),
        "'always': fsync the log before acknowledging (survives kill -9 and power loss); "
        "'off': hand it to the OS only (survives kill -9 of the server, not an OS crash)",
        "always|off")
    max_frame_bytes: int = _field(
        16 * 1024 * 1024, _positive_int, "largest frame accepted", "BYTES")
    max_items_per_frame: int = _field(100_000, _positive_int, "items per data frame", "INT")
    max_name_length: int = _field(
        200, _positive_int, "longest metric name, run id or producer id", "CHARS")
    max_tags: int = _field(32, _positive_int, "tags per series", "INT")
    max_tag_length: int = _field(
        256, lambda text: _at_least(text, 34),
        "longest tag key or value; longer ones are shortened to this many characters, "
        "ending in '~' and 16 hex digits of their hash", "CHARS >= 34")
    max_series_per_run: int = _field(
        100_000, _positive_int, "distinct (metric, tags) series accepted per run id", "INT")
    max_bucket_age: float = _field(
        7 * 24 * 3600.0, _non_negative_float,
        "oldest bucket accepted, in seconds before now", "SECONDS")
    max_bucket_ahead: float = _field(
        3600.0, _non_negative_float,
        "newest bucket accepted, in seconds after now (clock skew)", "SECONDS")
    max_queued_buckets: int = _field(
        10_000, _positive_int,
        "closed buckets held in memory while the database is away; older ones are "
        "dropped from memory and rebuilt from the write-ahead log (which holds them) "
        "once it is back", "INT")
    max_connections: int = _field(
        4096, _positive_int,
        "forwarder connections served at once; more are closed at once with a log line "
        "(also kept below the open-files limit)", "INT")
    max_buffered_bytes: int = _field(
        256 * 1024 * 1024, _positive_int,
        "bytes of incomplete frames held over all connections; a connection that would "
        "take the total past it is closed, and its forwarder resends later", "BYTES")
    hello_timeout: float = _field(
        10.0, _positive_float, "seconds a new connection has to send its hello", "SECONDS")
    idle_timeout: float = _field(
        900.0, _positive_float,
        "seconds without a byte after which a connection is closed (forwarders reconnect)",
        "SECONDS")
    metrics_listen: tuple[str, int] | None = _field(
        ("127.0.0.1", 9410), _optional_hostport,
        "HTTP address for /metrics and /healthz ('' to disable)", "HOST:PORT")
    tls_cert: Path | None = _field(
        None, _optional_path, "PEM certificate: accept forwarders over TLS only", "FILE")
    tls_key: Path | None = _field(None, _optional_path, "PEM private key of --tls-cert", "FILE")
    tls_client_ca: Path | None = _field(
        None, _optional_path,
        "PEM CA bundle: require client certificates signed by it (mutual TLS)", "FILE")
    token_file: Path | None = _field(
        None, _optional_path,
        "file holding a shared token that every forwarder's hello must carry", "FILE")
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class TdServerConfig(ServerConfig):
    pass


@dataclass(frozen=True)
class NonTdServerConfig(ServerConfig):
    listen: tuple[str, int] = _field(
        ("127.0.0.1", 7411), parse_hostport, "address to accept forwarders on", "HOST:PORT")
    metrics_listen: tuple[str, int] | None = _field(
        ("127.0.0.1", 9411), _optional_hostport,
        "HTTP address for /metrics and /healthz ('' to disable)", "HOST:PORT")


@dataclass(frozen=True)
class ForwarderConfig:
    td: tuple[tuple[str, int], ...] = _field(
        (("127.0.0.1", 7410),), parse_server_list,
        "td_server address; several, comma-separated, share the series (each series goes "
        "to one, chosen by a hash of the series that every forwarder computes alike)",
        "HOST:PORT[,...]")
    non_td: tuple[tuple[str, int], ...] = _field(
        (("127.0.0.1", 7411),), parse_server_list,
        "non_td_server address; several, comma-separated, share the series as --td's do",
        "HOST:PORT[,...]")
    failover_after: float = _field(
        10.0, _non_negative_float,
        "with several servers of a role: a server unreachable this long has its series "
        "sent to the next server in hash order until it is back", "SECONDS")
    commit_timeout: float = _field(
        120.0, _non_negative_float,
        "at the end, once the servers have logged every frame, wait at most this long for "
        "them to say it is in the database (a server whose disk is lost meanwhile has it "
        "sent again); then say what is logged only, and exit", "SECONDS")
    run_id: str | None = _field(
        None, _optional_text, "run id shared by all generators of one test (default: fresh)",
        "ID")
    tags: str = _field(
        "name,method,status,scenario,group", _text,
        "comma-separated tag keys that split series ('' for one series per metric)", "KEYS")
    bucket_seconds: int = _field(10, _positive_int, "bucket width; must match the servers",
                                 "INT >= 1")
    local_grace: float = _field(
        2.0, _non_negative_float,
        "event-time seconds past a bucket's end before its partial is sent", "SECONDS")
    max_unacked_bytes: int = _field(
        64 * 1024 * 1024, _positive_int,
        "unacknowledged bytes held in memory per server; beyond it frames go to the spool "
        "file", "BYTES")
    spool_dir: Path | None = _field(
        None, _optional_path,
        "directory for the spool files, used while memory is full; each forwarder uses "
        "its own k6-forward-PRODUCER subdirectory, removed when drained (default: the "
        "system temp directory)", "PATH")
    tls_ca: Path | None = _field(
        None, _optional_path,
        "PEM CA bundle to verify the servers' certificates: connect over TLS", "FILE")
    tls_cert: Path | None = _field(
        None, _optional_path, "PEM client certificate, for servers that require one", "FILE")
    tls_key: Path | None = _field(None, _optional_path, "PEM private key of --tls-cert", "FILE")
    token_file: Path | None = _field(
        None, _optional_path, "file holding the servers' shared token", "FILE")
    append: bool = _field(
        False, _bool,
        "add this input to a run that already holds it (a deliberate second copy); "
        "without it, input the servers already stored under this run id is refused",
        "true|false")
    max_spool_bytes: int = _field(
        1024 * 1024 * 1024, _positive_int,
        "size limit of each server's spool file; when memory and spool are both full, "
        "input reading pauses (k6 waits)", "BYTES")
    local_thresholds: bool = _field(
        False, _bool,
        "under '-- k6 run': let each k6 judge its thresholds on its own share of the load "
        "(k6's default alone); without it the servers judge them over all generators",
        "true|false")
    strict_thresholds: bool = _field(
        False, _bool,
        "a global percentile verdict too close to call (the merged digests cannot tell on "
        "which side of the bound the exact value is) fails, and may abort", "true|false")
    verdict_timeout: float = _field(
        300.0, _positive_float,
        "after k6 ends, how long to wait for the final global verdict (every generator "
        "ended and written); then exit 4", "SECONDS")
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)


def _plain(value: Any) -> Any:
    """An address, or a list of them, as written on the command line."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return ",".join(hostport_text(*address) for address in value)
    if isinstance(value, tuple):
        return hostport_text(*value)
    return value


def _settings(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.name != "sources"]


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per setting, defaulting to None so that given flags are known."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings")
    parser.add_argument("--print-config", action="store_true",
                        help="print every effective setting with its source and exit")
    for f in _settings(cls):
        flag = "--" + f.name.replace("_", "-")
        shown = _plain(f.default)
        # A yes/no setting is a plain switch on the command line: --append.
        help_text = (f"{f.metadata['help']} (default: {shown}; "
                     f"env TDAGG_{f.name.upper()})")
        if f.metadata["parse"] is _bool:
            parser.add_argument(flag, dest=f.name, default=None, action="store_const",
                                const="true", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None,
                                metavar=f.metadata["form"], help=help_text)


def resolve(cls: type, args: argparse.Namespace, environ: Mapping[str, str]) -> Any:
    """Build the frozen config: defaults < TOML < TDAGG_* env < CLI."""
    raw: dict[str, tuple[Any, str]] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            table = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        known = {f.name for f in _settings(cls)}
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"config file {path}: unknown key {key!r}")
            raw[name] = (value, f"file {path}")
    for f in _settings(cls):
        env_name = f"TDAGG_{f.name.upper()}"
        if env_name in environ:
            raw[f.name] = (environ[env_name], f"env {env_name}")
        cli = getattr(args, f.name, None)
        if cli is not None:
            raw[f.name] = (cli, "flag --" + f.name.replace("_", "-"))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in _settings(cls):
        if f.name not in raw:
            sources[f.name] = "default"
            continue
        value, source = raw[f.name]
        try:
            values[f.name] = f.metadata["parse"](value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{f.name} = {_shown(f, value)!r} from {source}: {exc or 'invalid'}; "
                f"expected {f.metadata['form']}"
            ) from None
        sources[f.name] = source
    return cls(**values, sources=sources)


def _shown(f: dataclasses.Field[Any], value: Any) -> Any:
    """``value`` of setting ``f`` as it may be printed: never a password or token.

    A DSN keeps its user, hosts and database (common.redact masks its passwords); any
    other setting marked ``secret`` in its metadata, or whose name says password, passwd,
    token or secret, is masked whole unless it is a path (a token *file* is not a secret).
    """
    if value is None or value == "":
        return value
    if f.name == "dsn" or f.name.endswith("_dsn"):
        return redact.redact_dsn(value) if isinstance(value, str) else redact.MASK
    if f.metadata.get("secret") or (redact.is_secret_name(f.name)
                                    and not isinstance(value, Path)):
        return redact.MASK
    return value


def describe(config: Any) -> str:
    lines = []
    for f in _settings(type(config)):
        value = _shown(f, getattr(config, f.name))
        value = _plain(value)
        if value is None:
            value = "''"
        lines.append(f"{f.name} = {value!s}  # {config.sources.get(f.name, 'default')}")
    return "\n".join(lines)


def load(cls: type, prog: str, description: str, argv: Sequence[str] | None,
         environ: Mapping[str, str] | None = None,
         extra: Callable[[argparse.ArgumentParser], None] | None = None,
         ) -> tuple[Any, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, cls)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    try:
        config = resolve(cls, args, os.environ if environ is None else environ)
    except ConfigError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")
    if args.print_config:
        print(describe(config))
        parser.exit(0)
    return config, args

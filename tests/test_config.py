"""Configuration layers (common.config): defaults < TOML < TDAGG_* env < CLI flags."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from common.config import (
    ConfigError,
    ForwarderConfig,
    NonTdServerConfig,
    ServerConfig,
    TdServerConfig,
    add_arguments,
    describe,
    load,
    parse_hostport,
    parse_server_list,
    resolve,
)
from common.protocol import Limits


def args_for(cls: type, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return parser.parse_args(argv)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tdagg.toml"
    path.write_text(text)
    return path


SERVER_SETTINGS = {
    "listen", "processes", "dsn", "data_dir", "bucket_seconds", "retention_days",
    "compress_after_days", "grace", "flush_interval", "state_dir",
    "wal_fsync", "max_frame_bytes", "max_items_per_frame", "max_name_length", "max_tags",
    "max_tag_length", "max_series_per_run", "max_bucket_age", "max_bucket_ahead",
    "max_queued_buckets", "max_connections", "max_buffered_bytes", "hello_timeout",
    "idle_timeout",
    "metrics_listen", "tls_cert", "tls_key", "tls_client_ca", "token_file"}


def test_defaults() -> None:
    config = resolve(TdServerConfig, args_for(TdServerConfig, []), {})
    assert config.listen == ("127.0.0.1", 7410)
    assert config.dsn is None
    assert config.bucket_seconds == 10
    assert config.grace == 5.0
    assert config.flush_interval == 0.5
    assert config.max_frame_bytes == 16 * 1024 * 1024
    assert config.state_dir is None
    assert config.wal_fsync == "always"
    assert config.max_series_per_run == 100_000
    assert (config.max_bucket_age, config.max_bucket_ahead) == (7 * 24 * 3600.0, 3600.0)
    # The frame limits default to the protocol's documented limits.
    limits = Limits()
    assert (config.max_frame_bytes, config.max_items_per_frame, config.max_name_length,
            config.max_tags, config.max_tag_length) == (
        limits.max_frame_bytes, limits.max_items_per_frame, limits.max_name_length,
        limits.max_tags, limits.max_tag_length)
    assert set(config.sources.values()) == {"default"}
    assert set(config.sources) == SERVER_SETTINGS

    assert config.metrics_listen == ("127.0.0.1", 9410)
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (None, None, None)
    assert config.token_file is None

    non_td = resolve(NonTdServerConfig, args_for(NonTdServerConfig, []), {})
    assert non_td.listen == ("127.0.0.1", 7411)
    assert non_td.metrics_listen == ("127.0.0.1", 9411)
    disabled = resolve(NonTdServerConfig, args_for(NonTdServerConfig, ["--metrics-listen", ""]),
                       {})
    assert disabled.metrics_listen is None

    forwarder = resolve(ForwarderConfig, args_for(ForwarderConfig, []), {})
    assert (forwarder.td, forwarder.non_td) == ((("127.0.0.1", 7410),), (("127.0.0.1", 7411),))
    assert forwarder.failover_after == 10.0
    assert forwarder.run_id is None
    assert forwarder.tags == "name,method,status,scenario,group"
    assert (forwarder.bucket_seconds, forwarder.local_grace) == (10, 2.0)
    assert forwarder.max_unacked_bytes == 64 * 1024 * 1024


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    path = write_toml(tmp_path, """
bucket_seconds = 20
grace = 7.5
flush_interval = 0.25
listen = "0.0.0.0:9000"
""")
    environ = {
        "TDAGG_GRACE": "8",
        "TDAGG_FLUSH_INTERVAL": "0.125",
        "TDAGG_MAX_FRAME_BYTES": "1024",
        "UNRELATED": "x",
    }
    argv = ["--config", str(path), "--flush-interval", "2", "--dsn", "postgresql://h/db"]
    config = resolve(TdServerConfig, args_for(TdServerConfig, argv), environ)
    assert config.bucket_seconds == 20            # file
    assert config.listen == ("0.0.0.0", 9000)     # file
    assert config.grace == 8.0                    # env over file
    assert config.max_frame_bytes == 1024         # env over default
    assert config.flush_interval == 2.0           # flag over env over file
    assert config.dsn == "postgresql://h/db"      # flag over default
    assert config.sources == {
        **{name: "default" for name in SERVER_SETTINGS},
        "listen": f"file {path}",
        "dsn": "flag --dsn",
        "bucket_seconds": f"file {path}",
        "grace": "env TDAGG_GRACE",
        "flush_interval": "flag --flush-interval",
        "max_frame_bytes": "env TDAGG_MAX_FRAME_BYTES",
    }


def test_env_without_file(tmp_path: Path) -> None:
    environ = {"TDAGG_TD": "10.0.0.1:1234", "TDAGG_TAGS": "", "TDAGG_RUN_ID": "r-7",
               "TDAGG_DATA_DIR": str(tmp_path)}
    config = resolve(ForwarderConfig, args_for(ForwarderConfig, []), environ)
    assert config.td == (("10.0.0.1", 1234),)
    assert config.tags == ""
    assert config.run_id == "r-7"
    assert config.sources["td"] == "env TDAGG_TD"
    assert config.sources["non_td"] == "default"
    # TDAGG_DATA_DIR is not a forwarder setting and is ignored.
    assert not hasattr(config, "data_dir")


def test_dashed_toml_keys_and_paths(tmp_path: Path) -> None:
    path = write_toml(tmp_path, f"""
bucket-seconds = 30
data-dir = "{tmp_path / 'pg'}"
""")
    config = resolve(ServerConfig, args_for(ServerConfig, ["--config", str(path)]), {})
    assert config.bucket_seconds == 30
    assert config.data_dir == tmp_path / "pg"
    assert isinstance(config.data_dir, Path)


def test_empty_dsn_means_none() -> None:
    config = resolve(ServerConfig, args_for(ServerConfig, []), {"TDAGG_DSN": ""})
    assert config.dsn is None
    assert config.sources["dsn"] == "env TDAGG_DSN"


def test_config_is_frozen() -> None:
    config = resolve(ServerConfig, args_for(ServerConfig, []), {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.grace = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7410", ("127.0.0.1", 7410)),
        ("localhost:0", ("localhost", 0)),
        ("example.org:65535", ("example.org", 65535)),
        ("[::1]:7411", ("::1", 7411)),
        ("::1:80", ("::1", 80)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["7410", "host", "host:", ":7410", "host:65536",
                                  "host:-1", "host:http", "host: 80"])
def test_parse_hostport_refusals(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_hostport(text)


def error_of(cls: type, argv: list[str], environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(cls, args_for(cls, argv), environ)
    return str(info.value)


@pytest.mark.parametrize(
    ("cls", "argv", "environ", "key", "source"),
    [
        (ServerConfig, ["--bucket-seconds", "0"], {}, "bucket_seconds", "flag --bucket-seconds"),
        (ServerConfig, ["--bucket-seconds", "ten"], {}, "bucket_seconds",
         "flag --bucket-seconds"),
        (ServerConfig, [], {"TDAGG_BUCKET_SECONDS": "2.5"}, "bucket_seconds",
         "env TDAGG_BUCKET_SECONDS"),
        (ServerConfig, [], {"TDAGG_GRACE": "-1"}, "grace", "env TDAGG_GRACE"),
        (ServerConfig, [], {"TDAGG_GRACE": "nan"}, "grace", "env TDAGG_GRACE"),
        (ServerConfig, [], {"TDAGG_GRACE": "inf"}, "grace", "env TDAGG_GRACE"),
        (ServerConfig, ["--flush-interval", "soon"], {}, "flush_interval",
         "flag --flush-interval"),
        (ServerConfig, ["--listen", "nohost"], {}, "listen", "flag --listen"),
        (ServerConfig, [], {"TDAGG_LISTEN": "h:99999"}, "listen", "env TDAGG_LISTEN"),
        (ServerConfig, [], {"TDAGG_MAX_FRAME_BYTES": "-5"}, "max_frame_bytes",
         "env TDAGG_MAX_FRAME_BYTES"),
        (ForwarderConfig, ["--td", "x"], {}, "td", "flag --td"),
        (ForwarderConfig, ["--td", "a:1,,b:2"], {}, "td", "flag --td"),
        (ForwarderConfig, [], {"TDAGG_NON_TD": "a:1,A:1"}, "non_td", "env TDAGG_NON_TD"),
        (ForwarderConfig, [], {"TDAGG_LOCAL_GRACE": "-0.5"}, "local_grace",
         "env TDAGG_LOCAL_GRACE"),
        (ForwarderConfig, ["--max-unacked-bytes", "0"], {}, "max_unacked_bytes",
         "flag --max-unacked-bytes"),
    ],
)
def test_invalid_values_name_key_and_source(cls: type, argv: list[str],
                                            environ: dict[str, str], key: str,
                                            source: str) -> None:
    message = error_of(cls, argv, environ)
    assert key in message
    assert source in message


def test_flag_overrides_a_bad_env_value() -> None:
    config = resolve(ServerConfig, args_for(ServerConfig, ["--grace", "3"]),
                     {"TDAGG_GRACE": "not a number"})
    assert config.grace == 3.0
    assert config.sources["grace"] == "flag --grace"


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("bucket_seconds = 0", "bucket_seconds"),
        ("bucket_seconds = -10", "bucket_seconds"),
        ('bucket_seconds = "ten"', "bucket_seconds"),
        ("grace = -1.0", "grace"),
        ("grace = inf", "grace"),
        ("grace = nan", "grace"),
        ('grace = "soon"', "grace"),
        ("listen = 7410", "listen"),
        ('listen = "nohost"', "listen"),
        ("data_dir = 5", "data_dir"),
    ],
)
def test_invalid_toml_values_name_key_and_file(tmp_path: Path, line: str, key: str) -> None:
    path = write_toml(tmp_path, line + "\n")
    message = error_of(ServerConfig, ["--config", str(path)], {})
    assert key in message
    assert f"file {path}" in message


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("bucket_seconds = 2.5", "bucket_seconds"),   # int() would truncate it to 2
        ("bucket_seconds = true", "bucket_seconds"),  # int(True) is 1
        ("grace = true", "grace"),                    # float(True) is 1.0
    ],
)
def test_toml_values_of_the_wrong_type_are_refused(tmp_path: Path, line: str,
                                                    key: str) -> None:
    """A TOML value of the wrong type must not be silently converted to another value."""
    path = write_toml(tmp_path, line + "\n")
    message = error_of(ServerConfig, ["--config", str(path)], {})
    assert key in message
    assert f"file {path}" in message


def test_toml_array_of_tags_is_not_stringified(tmp_path: Path) -> None:
    """``tags = ["name", "method"]`` must be refused or mean those two keys.

    str() of the list gives "['name', 'method']", which splits into the tag keys
    "['name'" and "'method']": series silently lose their tags.
    """
    path = write_toml(tmp_path, 'tags = ["name", "method"]\n')
    error: ConfigError | None = None
    try:
        config = resolve(ForwarderConfig, args_for(ForwarderConfig, ["--config", str(path)]),
                         {})
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert "tags" in str(error)
    else:
        keys = [k.strip() for k in config.tags.split(",") if k.strip()]
        assert keys == ["name", "method"]


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "bucket_seconds = 10\nbucket_secs = 5\n")
    message = error_of(ServerConfig, ["--config", str(path)], {})
    assert "bucket_secs" in message
    assert str(path) in message


@pytest.mark.parametrize("key", ["sources", "config", "local_grace"])
def test_keys_that_are_not_settings_of_this_program(tmp_path: Path, key: str) -> None:
    path = write_toml(tmp_path, f'{key} = "x"\n')
    message = error_of(ServerConfig, ["--config", str(path)], {})
    assert key in message


def test_unreadable_or_broken_toml(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert str(missing) in error_of(ServerConfig, ["--config", str(missing)], {})
    broken = write_toml(tmp_path, "bucket_seconds = = 3\n")
    assert str(broken) in error_of(ServerConfig, ["--config", str(broken)], {})


def test_describe_lists_values_and_sources(tmp_path: Path) -> None:
    config = resolve(ServerConfig, args_for(ServerConfig, ["--listen", "10.1.2.3:99"]),
                     {"TDAGG_GRACE": "1.5"})
    lines = describe(config).splitlines()
    assert "listen = 10.1.2.3:99  # flag --listen" in lines
    assert "grace = 1.5  # env TDAGG_GRACE" in lines
    assert "bucket_seconds = 10  # default" in lines
    assert "wal_fsync = always  # default" in lines
    assert len(lines) == len(SERVER_SETTINGS)


def test_load_parses_argv_and_environ(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "local_grace = 4.0\nrun_id = \"from-file\"\n")
    extra_seen: list[Any] = []

    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--input", default="-")
        extra_seen.append(parser)

    config, args = load(ForwarderConfig, "k6-forward", "test", [
        "--config", str(path), "--run-id", "from-flag", "--input", "k6.json"],
        environ={"TDAGG_LOCAL_GRACE": "3", "TDAGG_RUN_ID": "from-env"}, extra=extra)
    assert isinstance(config, ForwarderConfig)
    assert config.run_id == "from-flag"
    assert config.local_grace == 3.0
    assert config.sources["local_grace"] == "env TDAGG_LOCAL_GRACE"
    assert args.input == "k6.json"
    assert len(extra_seen) == 1


def test_load_exits_with_status_2_and_message_on_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load(TdServerConfig, "td-server", "test", [], environ={"TDAGG_BUCKET_SECONDS": "0"})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "td-server" in err
    assert "bucket_seconds" in err
    assert "TDAGG_BUCKET_SECONDS" in err


def test_load_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load(NonTdServerConfig, "non-td-server", "test", ["--print-config"],
             environ={"TDAGG_FLUSH_INTERVAL": "0.2"})
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "listen = 127.0.0.1:7411  # default" in out
    assert "flush_interval = 0.2  # env TDAGG_FLUSH_INTERVAL" in out


def test_every_setting_has_a_flag_and_an_env_name() -> None:
    for cls in (ServerConfig, ForwarderConfig):
        parser = argparse.ArgumentParser()
        add_arguments(parser, cls)
        help_text = parser.format_help()
        for f in dataclasses.fields(cls):
            if f.name == "sources":
                continue
            assert "--" + f.name.replace("_", "-") in help_text
            assert "TDAGG_" + f.name.upper() in help_text


def test_server_lists() -> None:
    """--td and --non-td take one server or several; in the file, a list or a string;
    each server once; --print-config shows the list as it is written."""
    config = resolve(ForwarderConfig, args_for(ForwarderConfig, [
        "--td", "a.example:7410, 10.0.0.2:7410,[::1]:7412", "--failover-after", "2.5"]), {})
    assert config.td == (("a.example", 7410), ("10.0.0.2", 7410), ("::1", 7412))
    assert config.failover_after == 2.5
    assert "td = a.example:7410,10.0.0.2:7410,[::1]:7412  # flag --td" in describe(config)
    assert parse_server_list(["h:1", "h:2"]) == (("h", 1), ("h", 2))
    for text, says in [("h:1,H:1", "h:1 is listed twice (entries 1 and 2)"),
                       ("h:1,", "entry 2 is empty"),
                       ("h:1,h", "entry 2 ('h'): expected HOST:PORT"),
                       (7410, "expected HOST:PORT[,HOST:PORT...] or a list")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_server_list(text)

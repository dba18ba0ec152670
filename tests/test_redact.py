"""No password ever prints: common.redact, and the programs' output end to end."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.cli import choose_database
from common.config import (
    ConfigError,
    ServerConfig,
    TdServerConfig,
    _field,
    _optional_text,
    add_arguments,
    describe,
    load,
    resolve,
)
from common.redact import (
    MASK,
    RedactingFormatter,
    dsn_secrets,
    format_exception,
    is_secret_name,
    known_secrets,
    redact_dsn,
    redact_text,
)

BIN = Path(sys.executable).parent
SECRET = "S3cretPW"
URL = f"postgresql://u:{SECRET}@127.0.0.1:1/db"


# --- redact_dsn: every place a DSN can carry a password ----------------------------------

@pytest.mark.parametrize(("dsn", "shown", "secret"), [
    # URL userinfo
    (URL, "postgresql://u:***@127.0.0.1:1/db", SECRET),
    ("postgres://u:pw0rd@h/db", "postgres://u:***@h/db", "pw0rd"),
    ("postgresql://:hunter22@h:5432/db", "postgresql://:***@h:5432/db", "hunter22"),
    # percent-escapes, and an unescaped '@' or '/' in the password
    ("postgresql://u:p%40ss%2Fw0rd@h:5432/db", "postgresql://u:***@h:5432/db", "p%40ss"),
    ("postgresql://u:p@ss@w0rd@h:5432/db", "postgresql://u:***@h:5432/db", "ss@w0rd"),
    ("postgresql://u:pa/ss:w0rd@h/db", "postgresql://u:***@h/db", "pa/ss"),
    # several hosts
    ("postgresql://u:hunter22@h1:5432,h2:5433,[::1]:5434/db?target_session_attrs=any",
     "postgresql://u:***@h1:5432,h2:5433,[::1]:5434/db?target_session_attrs=any", "hunter22"),
    # query parameters
    ("postgresql://u@h/db?password=hunter22&sslmode=require",
     "postgresql://u@h/db?password=***&sslmode=require", "hunter22"),
    ("postgresql://u@h/db?sslmode=require&PassWord=hunter22",
     "postgresql://u@h/db?sslmode=require&PassWord=***", "hunter22"),
    ("postgresql://u@h/db?sslpassword=keypass1&passwd=other22&api_token=tok99&x=1",
     "postgresql://u@h/db?sslpassword=***&passwd=***&api_token=***&x=1", "keypass1"),
    ("postgresql://u@h/db?my_password_2=hunter22", "postgresql://u@h/db?my_password_2=***",
     "hunter22"),
    ("postgresql://u@h/db?pass%77ord=hunter22", "postgresql://u@h/db?pass%77ord=***",
     "hunter22"),
    ("postgresql://u@h/db?password=hun&ter22&application_name=x",
     "postgresql://u@h/db?password=***&application_name=x", "ter22"),
    ("postgresql://u@h/db?password=hunter 22", "postgresql://u@h/db?password=***", "22"),
    # a password-free DSN and a passfile are shown as they are
    ("postgresql://u@h:5432/db?passfile=/etc/pgpass", None, None),
    ("postgresql://h:5432/db", None, None),
    # keyword/value (libpq conninfo)
    ("host=h port=5432 user=u password=hunter22 dbname=db",
     "host=h port=5432 user=u password=*** dbname=db", "hunter22"),
    ("host=h password = hunter22 dbname=db", "host=h password = *** dbname=db", "hunter22"),
    (r"host=h password='a b\'c d' dbname=db", "host=h password=*** dbname=db", "b\\'c"),
    (r"host=h password=a\ b\ c dbname=db", "host=h password=*** dbname=db", "b\\ c"),
    ("host=h password='' dbname=db", "host=h password=*** dbname=db", None),
    ("password='unterminated and more", "password=***", "unterminated"),
    ("host=h sslpassword=keypass1 PGPASSWORD=hunter22 dbname=db",
     "host=h sslpassword=*** PGPASSWORD=*** dbname=db", "keypass1"),
])
def test_redact_dsn(dsn: str, shown: str | None, secret: str | None) -> None:
    result = redact_dsn(dsn)
    assert result == (dsn if shown is None else shown)
    if secret is not None:
        assert secret not in result


@pytest.mark.parametrize("text", [
    f"error: cannot connect to {URL}: connection refused",
    f"invalid DSN '{URL}'",
    f'dsn = "{URL}"',
    f"a list: ['{URL}', 'x']",
    f"host=127.0.0.1 password={SECRET} dbname=db (port 1)",
    f"ConnectionParameters(user='u', password='{SECRET}', database='db')",
    f'{{"password": "{SECRET}", "user": "u"}}',
    f"{{'sslpassword': '{SECRET}'}}",
    f"PGPASSWORD={SECRET} td-report --run-id x",
])
def test_redact_dsn_inside_text(text: str) -> None:
    result = redact_dsn(text)
    assert SECRET not in result
    assert MASK in result


def test_redact_keeps_user_host_port_database() -> None:
    shown = redact_dsn("postgresql://tdagg:hunter22@db.example.internal:6432/metrics")
    assert shown == "postgresql://tdagg:***@db.example.internal:6432/metrics"
    shown = redact_dsn("host=db.example.internal port=6432 user=tdagg password=x dbname=m")
    assert shown == "host=db.example.internal port=6432 user=tdagg password=*** dbname=m"


def test_secret_names() -> None:
    for name in ("password", "PASSWORD", "sslpassword", "passwd", "api_token", "Token",
                 "client_secret", "pass%77ord"):
        assert is_secret_name(name), name
    for name in ("passfile", "token_file", "user", "host", "sslkey", "dbname", "pass"):
        assert not is_secret_name(name), name


# --- redact_text: the secret itself, wherever it reappears -----------------------------

def test_dsn_secrets_raw_and_decoded() -> None:
    assert dsn_secrets(URL) == [SECRET]
    assert "p@ss/w" in dsn_secrets("postgresql://u:p%40ss%2Fw@h/db")
    assert "a b'c" in dsn_secrets(r"host=h password='a b\'c'")
    assert "a b" in dsn_secrets(r"host=h password=a\ b")
    assert "hun&ter" in dsn_secrets("postgresql://u@h/db?password=hun&ter")
    assert dsn_secrets("postgresql://u@h/db") == []
    assert dsn_secrets(None) == dsn_secrets("") == []


@pytest.mark.parametrize("echo", [
    "password authentication failed: got 'p@ss/w0rd b'",   # decoded
    "p%40ss%2Fw0rd%20b",                                   # escaped again
    "p@ss/w0rd b",                                         # on its own
])
def test_redact_text_replaces_the_secret_anywhere(echo: str) -> None:
    secrets = dsn_secrets("postgresql://u:p%40ss%2Fw0rd%20b@h/db")
    result = redact_text(f"error: {echo} (database x)", secrets)
    assert "w0rd" not in result
    assert result.startswith("error: ")
    assert result.endswith(" (database x)")


def test_redact_text_quoted_keyword_secret() -> None:
    secrets = dsn_secrets(r"host=h password='it\'s a secret'")
    for echo in ("it's a secret", r"it\'s a secret", '"it\'s a secret"', "it%27s%20a%20secret"):
        assert "secret" not in redact_text(f"failed: {echo}!", secrets), echo


def test_short_secret_masked_only_on_its_own() -> None:
    # A two-letter password is masked where it stands alone; the "pw" inside other words
    # is left, or every message would be garbled.
    assert redact_text("user pw: pw, pwned", ["pw"]) == "user ***: ***, pwned"


def test_known_secrets_from_dsns_and_environment() -> None:
    env = {"PGPASSWORD": "envpass1", "TDAGG_DSN": "postgresql://u:fromenv1@h/db"}
    found = known_secrets(URL, None, "host=h password=kw123456", environ=env)
    assert {SECRET, "kw123456", "envpass1", "fromenv1"} <= set(found)
    assert known_secrets(environ={}) == []


def test_redacting_formatter_and_traceback() -> None:
    formatter = RedactingFormatter("%(levelname)s %(message)s", [SECRET])
    try:
        raise OSError(f"could not reach {URL} with {SECRET}")
    except OSError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed: %s", (URL,),
                                   sys.exc_info())
    text = formatter.format(record)
    assert SECRET not in text
    assert "failed: postgresql://u:***@127.0.0.1:1/db" in text
    assert "OSError: could not reach" in text
    error = ValueError(f"bad {SECRET}")
    assert SECRET not in format_exception(error, [SECRET])
    assert "ValueError: bad ***" in format_exception(error, [SECRET])


# --- configuration: --print-config and errors -------------------------------------------

def test_describe_redacts_the_dsn() -> None:
    config, _ = load(TdServerConfig, "td-server", "", [], environ={"TDAGG_DSN": URL})
    line = next(x for x in describe(config).splitlines() if x.startswith("dsn ="))
    assert line == "dsn = postgresql://u:***@127.0.0.1:1/db  # env TDAGG_DSN"
    # Path-valued token settings (a token *file*) are not secrets: they stay visible.
    config, _ = load(TdServerConfig, "td-server", "", ["--token-file", "/etc/tdagg/token"],
                     environ={})
    assert "token_file = /etc/tdagg/token  # flag --token-file" in describe(config)


@dataclass(frozen=True)
class _SecretsConfig:
    api_token: str | None = _field(None, _optional_text, "a token", "TOKEN")
    other: str | None = _field(None, _optional_text, "marked secret", "TEXT", secret=True)
    plain: str | None = _field(None, _optional_text, "not secret", "TEXT")
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)


def test_describe_masks_secret_fields() -> None:
    config = _SecretsConfig(api_token=SECRET, other="hunter22", plain="shown",
                            sources={"api_token": "env TDAGG_API_TOKEN"})
    text = describe(config)
    assert SECRET not in text
    assert "hunter22" not in text
    assert "api_token = ***  # env TDAGG_API_TOKEN" in text
    assert "other = ***  # default" in text
    assert "plain = shown  # default" in text
    assert dataclasses.fields(config)[1].metadata["secret"] is True


def test_config_error_does_not_echo_a_dsn(tmp_path: Path) -> None:
    path = tmp_path / "tdagg.toml"
    path.write_text(f'dsn = ["{URL}"]\n')  # a list, not a string: refused with its value
    parser = argparse.ArgumentParser()
    add_arguments(parser, TdServerConfig)
    with pytest.raises(ConfigError) as info:
        resolve(TdServerConfig, parser.parse_args(["--config", str(path)]), {})
    assert SECRET not in str(info.value)
    assert "dsn = '***' from file" in str(info.value)


def test_choose_database_label() -> None:
    for dsn in (URL, f"host=127.0.0.1 port=1 user=u password='{SECRET} x' dbname=db"):
        given, label = choose_database(ServerConfig(dsn=dsn))
        assert given == dsn
        assert SECRET not in label
        assert "127.0.0.1" in label
        assert "user=u " in label or "//u:***@" in label


async def test_replay_watcher_error_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.store import postgres
    from td_replay import verify

    async def refuse(dsn: str, **_: Any) -> None:
        raise OSError(f"cannot reach {dsn} ({SECRET})")

    monkeypatch.setattr(postgres.asyncpg, "create_pool", refuse)
    watcher = verify.Watcher(URL, "run", 0.01)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(watcher.run(), 0.3)
    assert watcher.errors >= 1
    assert watcher.last_error is not None
    assert SECRET not in watcher.last_error
    assert "postgresql://u:***@127.0.0.1:1/db" in watcher.last_error


# --- the programs, end to end -------------------------------------------------------------

def run(*argv: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("TDAGG_", "PG"))}
    environ.update(env or {})
    started = time.monotonic()
    result = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                            env=environ, timeout=timeout, stdin=subprocess.DEVNULL)
    return result, time.monotonic() - started


def assert_no_secret(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in (SECRET, *secrets):
        assert secret not in result.stdout, result.stdout
        assert secret not in result.stderr, result.stderr


KEYWORD_DSN = f"host=127.0.0.1 port=1 user=u password='{SECRET} b\\'c' dbname=db"


@pytest.mark.parametrize(("argv", "env", "shown"), [
    (["--dsn", URL], {}, "dsn = postgresql://u:***@127.0.0.1:1/db  # flag --dsn"),
    ([], {"TDAGG_DSN": URL}, "dsn = postgresql://u:***@127.0.0.1:1/db  # env TDAGG_DSN"),
    (["--dsn", f"{URL}?sslpassword={SECRET}x"], {},
     "dsn = postgresql://u:***@127.0.0.1:1/db?sslpassword=***  # flag --dsn"),
    (["--dsn", KEYWORD_DSN], {},
     "dsn = host=127.0.0.1 port=1 user=u password=*** dbname=db  # flag --dsn"),
])
def test_print_config(argv: list[str], env: dict[str, str], shown: str) -> None:
    result, _ = run("td-server", *argv, "--print-config", env=env)
    assert result.returncode == 0, result.stderr
    assert shown in result.stdout.splitlines()
    assert_no_secret(result, "b\\'c", "b'c")


@pytest.mark.parametrize(("program", "argv", "env"), [
    ("td-server", ["--dsn", URL], {}),
    ("non-td-server", [], {"TDAGG_DSN": URL}),
    ("td-server", ["--dsn", KEYWORD_DSN], {}),
    ("td-server", ["--dsn", f"postgresql://u@127.0.0.1:1/db?password={SECRET}"], {}),
    ("td-server", ["--dsn", "postgresql://u@127.0.0.1:1/db"], {"PGPASSWORD": SECRET}),
])
def test_server_start_failure(program: str, argv: list[str], env: dict[str, str],
                              tmp_path: Path) -> None:
    # Nothing listens on port 1: refused at once, and the server exits by itself.
    result, took = run(program, *argv, "--listen", "127.0.0.1:0", "--metrics-listen", "",
                       "--state-dir", str(tmp_path / "state"), env=env, timeout=60)
    assert result.returncode == 1, result.stderr
    assert took < 20, took
    assert f"{program}: error:" in result.stderr
    assert_no_secret(result, "b\\'c", "b'c")
    assert "127.0.0.1" in result.stderr


def test_report_with_a_bad_dsn() -> None:
    result, took = run("td-report", "--dsn", URL, "--run-id", "x")
    assert result.returncode == 1, result.stderr
    assert took < 30, took
    assert "td-report: error: cannot connect to the database postgresql://u:***@127.0.0.1:1/db"\
        in result.stderr
    assert_no_secret(result)
    # A DSN asyncpg cannot parse (port 'abc'): an error, not a traceback.
    result, _ = run("td-report", "--dsn", f"postgresql://u:{SECRET}@127.0.0.1:abc/db",
                    "--run-id", "x")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "postgresql://u:***@127.0.0.1:abc/db" in result.stderr
    assert_no_secret(result)
    # The same in --print-config, for a keyword DSN.
    result, _ = run("td-report", "--print-config", env={"TDAGG_DSN": KEYWORD_DSN})
    assert "dsn = host=127.0.0.1 port=1 user=u password=*** dbname=db  # env TDAGG_DSN" \
        in result.stdout
    assert_no_secret(result)


def test_replay_with_a_bad_dsn(tmp_path: Path) -> None:
    recording = tmp_path / "recording.json"
    recording.write_text(
        '{"type":"Metric","metric":"vus","data":{"name":"vus","type":"gauge"}}\n'
        '{"type":"Point","metric":"vus","data":{"time":"2026-01-01T00:00:00Z","value":1,'
        '"tags":{}}}\n')
    result, took = run("td-replay", str(recording), "--dsn", URL, "--start-servers",
                       "--progress", "none")
    assert result.returncode == 2, result.stderr
    assert took < 60, took
    assert "postgresql://u:***@127.0.0.1:1/db" in result.stderr
    assert_no_secret(result)


async def test_ready_line_hides_the_password(dsn: str, tmp_path: Path) -> None:
    # The test PostgreSQL trusts local connections: a password in the DSN is ignored by
    # the server, so the server starts and prints its ready line with the DSN in it.
    assert "postgres:@" in dsn
    with_password = dsn.replace("postgres:@", f"postgres:{SECRET}@", 1)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TDAGG_", "PG"))}
    process = await asyncio.create_subprocess_exec(
        str(BIN / "td-server"), "--dsn", with_password, "--listen", "127.0.0.1:0",
        "--metrics-listen", "", "--state-dir", str(tmp_path / "state"), env=environ,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while "ready: listening on" not in (line := (
                    await process.stderr.readline()).decode()):
                assert line, "".join(lines)
                lines.append(line)
            lines.append(line)
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = "".join(lines) + err.decode() + out.decode()
    assert process.returncode == 0, text
    assert SECRET not in text
    assert "database postgresql://postgres:***@" in text

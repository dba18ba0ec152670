"""Deployment files, checked against the programs they deploy.

No Docker engine and no systemd (as PID 1) run here, so each file meets what can run:

- the systemd units go through ``systemd-analyze verify`` and ``security --offline``
  (Debian package ``systemd``), and both servers run as the units start them: the
  units' environment and env examples, ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC``, under
  the seccomp rules that systemd applies for ``MemoryDenyWriteExecute=``,
  ``RestrictAddressFamilies=`` and ``SystemCallFilter=`` (through libseccomp, Debian
  package ``libseccomp2``), fed by the real k6;
- docker-compose.yml's healthcheck commands run against those servers, and its
  settings are resolved by the servers' own configuration code;
- the image's Python package is built from what ``.dockerignore`` and the Dockerfile's
  COPY lines leave of the build context;
- every Grafana query (panels and template variables) runs on the servers' output in
  PostgreSQL, with Grafana's variables and macros expanded as its PostgreSQL data source
  expands them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import dataclasses
import errno
import fnmatch
import functools
import json
import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
import urllib.parse
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from common.config import (
    ForwarderConfig,
    NonTdServerConfig,
    ServerConfig,
    TdServerConfig,
    load,
)
from common.harness import BIN, ServerProcess, http_target, k6_pipeline, start_process
from tests.conftest import create_database

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tdagg.json"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"

SERVERS: dict[str, type[ServerConfig]] = {
    "td-server": TdServerConfig, "non-td-server": NonTdServerConfig}
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())[
    "project"]["scripts"]
TDAGG_NAME = re.compile(r"TDAGG_[A-Z0-9_]+")

pytestmark = pytest.mark.timeout(300)


# --- the programs' configuration ---------------------------------------------------------

def setting_names(*classes: type) -> set[str]:
    return {f"TDAGG_{f.name.upper()}" for cls in classes for f in dataclasses.fields(cls)
            if f.name != "sources"}


def effective(cls: type[ServerConfig], argv: Iterable[str], environ: Mapping[str, str]) -> Any:
    """The configuration the program builds from these flags and this environment."""
    config, _ = load(cls, cls.__name__, "", list(argv), environ=dict(environ))
    return config


def default_of(cls: type, name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


# --- systemd units -------------------------------------------------------------------------

Unit = dict[str, list[tuple[str, str]]]


def read_unit(path: Path) -> Unit:
    sections: Unit = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: unparsable line {raw!r}"
        assert current, f"{path.name}: {raw!r} before any [section]"
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def unit_value(unit: Unit, section: str, key: str, default: str | None = None) -> str:
    values = unit_values(unit, section, key)
    if not values:
        assert default is not None, f"[{section}] {key}= is missing"
        return default
    return values[-1]


def expand_specifiers(value: str, state_root: Path) -> str:
    def one(match: re.Match[str]) -> str:
        letter = match.group(1)
        if letter == "S":
            return str(state_root)
        if letter == "%":
            return "%"
        raise AssertionError(f"specifier %{letter} in {value!r} is not emulated by this test")
    return re.sub(r"%(.)", one, value)


def unit_environment(unit: Unit, state_root: Path) -> dict[str, str]:
    env = {}
    for value in unit_values(unit, "Service", "Environment"):
        for assignment in shlex.split(value):
            key, sep, val = assignment.partition("=")
            assert sep, f"Environment={value!r}"
            env[key] = expand_specifiers(val, state_root)
    return env


def env_example(name: str, commented: bool = False) -> dict[str, str]:
    """KEY=value lines of deploy/systemd/NAME.env.example; with ``commented``, also the
    commented-out ``#TDAGG_...=`` settings."""
    env = {}
    for line in (SYSTEMD / f"{name}.env.example").read_text().splitlines():
        match = re.fullmatch(r"(#)?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match and (commented or not match.group(1)):
            env[match.group(2)] = match.group(3)
    return env


def documented_dropin(name: str) -> str:
    """The credentials drop-in that NAME.env.example shows in its comments."""
    lines = [line[4:] for line in (SYSTEMD / f"{name}.env.example").read_text().splitlines()
             if line.startswith("#   ")]
    assert lines, f"{name}.env.example shows no drop-in"
    assert lines[0] == "[Service]", lines
    return "\n".join(lines) + "\n"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: install the Debian package 'systemd' "
                    "(apt-get install -y systemd)")
    return found


def unit_copy(name: str, directory: Path) -> Path:
    """The unit with ExecStart on this venv's console script: verify needs the binary, and
    /usr/local/bin/NAME is where the installation (docs/DEPLOY.md) puts it."""
    text = (SYSTEMD / f"{name}.service").read_text()
    installed = f"ExecStart=/usr/local/bin/{name}\n"
    assert text.count(installed) == 1, f"{name}.service must start /usr/local/bin/{name}"
    script = BIN / name
    assert script.exists(), f"console script {script} is missing: pip install -e ."
    path = directory / f"{name}.service"
    path.write_text(text.replace(installed, f"ExecStart={script}\n"))
    return path


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_unit_declarations(name: str) -> None:
    unit = read_unit(SYSTEMD / f"{name}.service")
    service = "Service"
    module = name.replace("-", "_")
    assert SCRIPTS[name] == f"{module}.__main__:main"
    assert unit_value(unit, service, "ExecStart") == f"/usr/local/bin/{name}"
    assert unit_value(unit, service, "Type") == "notify"
    assert unit_value(unit, service, "NotifyAccess") == "main"
    state = unit_value(unit, service, "StateDirectory")
    assert state == f"tdagg/{name}"
    assert unit_environment(unit, Path("/var/lib"))["TDAGG_STATE_DIR"] == f"/var/lib/{state}"
    env_file = unit_value(unit, service, "EnvironmentFile")
    assert env_file == f"-/etc/tdagg/{name}.env"
    assert (SYSTEMD / f"{name}.env.example").is_file()
    for key, value in [("DynamicUser", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("NoNewPrivileges", "yes"), ("Restart", "on-failure"),
                       ("RestartSec", "2"), ("WatchdogSec", "30")]:
        assert unit_value(unit, service, key) == value, key
    # The final flush on SIGTERM needs time; systemd would SIGKILL after TimeoutStopSec.
    assert int(unit_value(unit, service, "TimeoutStopSec")) >= 120
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_unit_and_env_example_resolve_to_a_working_configuration(name: str) -> None:
    cls = SERVERS[name]
    unit = read_unit(SYSTEMD / f"{name}.service")
    for commented in (False, True):
        env = unit_environment(unit, Path("/var/lib")) | env_example(name, commented)
        config = effective(cls, [], env)
        assert config.dsn, "the env example must set TDAGG_DSN: services do not embed one"
        assert config.state_dir == Path("/var/lib/tdagg") / name
        assert config.listen[1] == default_of(cls, "listen")[1]
        assert config.metrics_listen[1] == default_of(cls, "metrics_listen")[1]
    # TLS files and token come through the drop-in's LoadCredential= (the dynamic user
    # cannot read /etc/tdagg): every path must be one of its credentials.
    credentials = {line.split("=", 1)[1].split(":", 1)[0]
                   for line in documented_dropin(name).splitlines()
                   if line.startswith("LoadCredential=")}
    optional = {k: v for k, v in env_example(name, commented=True).items()
                if k not in env_example(name)}
    files = {k: v for k, v in optional.items()
             if k in ("TDAGG_TLS_CERT", "TDAGG_TLS_KEY", "TDAGG_TLS_CLIENT_CA",
                      "TDAGG_TOKEN_FILE")}
    assert len(files) == 4, optional
    for key, path in files.items():
        directory, _, file = path.rpartition("/")
        assert directory == f"/run/credentials/{name}.service", key
        assert file in credentials, key


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_unit_verifies_without_a_word(name: str, tmp_path: Path) -> None:
    analyze = systemd_analyze()
    copy = unit_copy(name, tmp_path)

    def verify() -> str:
        result = subprocess.run([analyze, "verify", str(copy)], capture_output=True,
                                text=True, timeout=60, check=False)
        return (result.stdout + result.stderr).strip()

    assert verify() == ""
    # With the credentials drop-in that the env example documents.
    dropin = tmp_path / f"{name}.service.d"
    dropin.mkdir()
    (dropin / "credentials.conf").write_text(documented_dropin(name))
    assert verify() == ""
    # The check can fail: a misspelt directive is reported.
    (dropin / "typo.conf").write_text("[Service]\nProtectSytem=strict\n")
    assert "ProtectSytem" in verify()


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_unit_exposure_stays_low(name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager",
         str(unit_copy(name, tmp_path))],
        capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


# --- what the units' sandbox lets through: seccomp as systemd sets it up ------------------

SECCOMP_ALLOW = 0x7FFF0000
CMP_EQ, CMP_GE, CMP_MASKED_EQ = 4, 5, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def seccomp_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


# Loads filters given as JSON [[default action, [[action, syscall, [[arg, op, a, b]]]]]],
# then execs the command: filters and no_new_privs survive execve, as under systemd.
SANDBOX = r"""
import ctypes, ctypes.util, json, os, sys
lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
for default, rules in json.loads(sys.argv[1]):
    ctx = lib.seccomp_init(default)
    for action, name, cmps in rules:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            continue  # not a system call of this architecture
        array = (Cmp * len(cmps))(*[Cmp(*c) for c in cmps]) if cmps else None
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
        if rc < 0:
            raise OSError(-rc, "seccomp rule for " + name)
    rc = lib.seccomp_load(ctx)
    if rc < 0:
        raise OSError(-rc, "seccomp_load")
os.execv(sys.argv[2], sys.argv[2:])
"""


@functools.cache
def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run([systemd_analyze(), "syscall-filter"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: str | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif line.startswith("    ") and not line.strip().startswith("#") and current:
            groups[current].append(line.strip())
        elif line.strip() and not line.startswith("    "):
            current = None
    assert "@system-service" in groups, out[:2000]
    assert "@default" in groups, out[:2000]
    return groups


def expand_syscalls(names: Iterable[str]) -> set[str]:
    result: set[str] = set()
    for name in names:
        result |= expand_syscalls(syscall_groups()[name]) if name.startswith("@") else {name}
    return result


def sandbox_filters(unit: Unit) -> list[Any]:
    """The seccomp filters systemd installs for the unit's settings (systemd's
    seccomp-util.c): W+X mappings, socket families, and the system call allow list."""
    if ctypes.util.find_library("seccomp") is None:
        pytest.fail("libseccomp is missing: install the Debian package 'libseccomp2'")
    service = "Service"
    filters: list[Any] = []
    if unit_value(unit, service, "MemoryDenyWriteExecute", "no") == "yes":
        deny = seccomp_errno(errno.EPERM)
        wx = PROT_WRITE | PROT_EXEC
        filters.append([SECCOMP_ALLOW, [
            [deny, "mmap", [[2, CMP_MASKED_EQ, wx, wx]]],
            [deny, "mmap2", [[2, CMP_MASKED_EQ, wx, wx]]],
            [deny, "mprotect", [[2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC]]],
            [deny, "pkey_mprotect", [[2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC]]],
            [deny, "shmat", [[2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC]]],
        ]])
    families = " ".join(unit_values(unit, service, "RestrictAddressFamilies")).split()
    if families:
        assert not families[0].startswith("~"), "only allow lists are emulated"
        allowed = {int(getattr(socket, family)) for family in families}
        deny = seccomp_errno(errno.EAFNOSUPPORT)
        rules = [[deny, "socket", [[0, CMP_EQ, af, 0]]] for af in range(64) if af not in allowed]
        rules.append([deny, "socket", [[0, CMP_GE, 64, 0]]])
        filters.append([SECCOMP_ALLOW, rules])
    entries = unit_values(unit, service, "SystemCallFilter")
    if entries:
        assert not entries[0].startswith("~"), "only allow lists are emulated"
        calls: set[str] = expand_syscalls(["@default"])
        for entry in entries:
            names = expand_syscalls(entry.lstrip("~").split())
            calls = calls - names if entry.startswith("~") else calls | names
        number = getattr(errno, unit_value(unit, service, "SystemCallErrorNumber", "EPERM"))
        # Last: once it is loaded, only allowed calls (execve among them) remain.
        filters.append([seccomp_errno(number),
                        [[SECCOMP_ALLOW, call, []] for call in sorted(calls)]])
    return filters


def test_sandbox_emulation_denies_what_the_unit_denies() -> None:
    """The emulated sandbox is not a no-op: the denied operations fail under it."""
    unit = read_unit(SYSTEMD / "td-server.service")
    probe = (
        "import mmap, socket\n"
        "for what, attempt in [\n"
        "    ('wx', lambda: mmap.mmap(-1, 4096, prot=7)),\n"
        "    ('netlink', lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),\n"
        "    ('packet', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),\n"
        "]:\n"
        "    try:\n"
        "        attempt()\n"
        "        print(what, 'allowed')\n"
        "    except OSError as exc:\n"
        "        print(what, exc.errno)\n"
        "import os\n"
        "try:\n"
        "    os.setpriority(os.PRIO_PROCESS, 0, 5)\n"
        "    print('setpriority allowed')\n"
        "except OSError as exc:\n"
        "    print('setpriority', exc.errno)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", SANDBOX, json.dumps(sandbox_filters(unit)), sys.executable,
         "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n") == [
        f"wx {errno.EPERM}", f"netlink {errno.EAFNOSUPPORT}", f"packet {errno.EAFNOSUPPORT}",
        f"setpriority {errno.EPERM}", ""]


# --- docker-compose.yml and Dockerfile ---------------------------------------------------

_COMPOSE_VAR = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def compose_interpolate(value: Any) -> Any:
    """Compose's ${VAR:-default} with nothing set: every variable needs a default."""
    if isinstance(value, dict):
        return {k: compose_interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compose_interpolate(v) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        assert match.group("op"), f"{match.group(0)} in docker-compose.yml has no default"
        return match.group("default")
    return _COMPOSE_VAR.sub(one, value)


@functools.cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    assert "services" in data
    return dict(compose_interpolate(data))


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return dict(services[name])


def service_environment(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def port_range(text: str) -> list[int]:
    """"7410" or a range, "7410-7413"."""
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def published_ports(name: str) -> dict[int, int]:
    """Host port -> container port, from "[IP:]HOST:CONTAINER" entries (or ranges)."""
    ports: dict[int, int] = {}
    for entry in service(name).get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        host, container = port_range(parts[-2]), port_range(parts[-1])
        assert len(host) == len(container), entry
        ports.update(zip(host, container, strict=True))
    return ports


def container_ports(name: str) -> set[int]:
    return set(published_ports(name).values())


def mounts(name: str) -> dict[str, str]:
    """Container path -> source (a named volume, or a path relative to the compose file)."""
    result = {}
    for entry in service(name).get("volumes", []):
        parts = str(entry).split(":")
        result[parts[1]] = parts[0]
    return result


@functools.cache
def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            steps.append((instruction.upper(), rest.strip()))
    return steps


def dockerfile_args(instruction: str) -> list[str]:
    return [rest for ins, rest in dockerfile() if ins == instruction]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for rest in dockerfile_args("ENV"):
        for assignment in shlex.split(rest):
            key, sep, value = assignment.partition("=")
            assert sep, f"ENV {rest}: use KEY=value"
            env[key] = value
    return env


def server_in_compose(name: str) -> Any:
    """The effective configuration of compose service NAME: the image's ENV, the
    service's environment and its command, resolved by the program's own code."""
    svc = service(name)
    command = svc.get("command") or json.loads(dockerfile_args("CMD")[-1])
    if isinstance(command, str):
        command = shlex.split(command)
    assert command[0] == name, f"service {name} runs {command[0]}"
    return effective(SERVERS[name], command[1:], dockerfile_env() | service_environment(name))


def healthcheck_url_port(name: str) -> int:
    test = service(name)["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    match = re.fullmatch(r".*'http://127\.0\.0\.1:(\d+)/healthz'.*", test[3])
    assert match, test[3]
    return int(match.group(1))


def test_every_tdagg_variable_is_a_real_setting() -> None:
    server = setting_names(ServerConfig, TdServerConfig, NonTdServerConfig)
    files = [SYSTEMD / f"{name}{suffix}" for name in SERVERS
             for suffix in (".service", ".env.example")] + [COMPOSE, DOCKERFILE]
    for path in files:
        used = set(TDAGG_NAME.findall(path.read_text()))
        assert used, f"{path.name} names no TDAGG_ setting"
        assert used <= server, f"{path.name}: not settings of the servers: {used - server}"
    used = set(TDAGG_NAME.findall(DEPLOY_DOC.read_text()))
    known = server | setting_names(ForwarderConfig)
    assert used <= known, f"DEPLOY.md: not settings of any program: {used - known}"


def test_compose_references_and_pinned_images() -> None:
    data = compose()
    services = data["services"]
    assert set(SERVERS) | {"db", "grafana"} <= set(services)
    for name, svc in services.items():
        if "build" in svc:
            build = svc["build"]
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile_name = "Dockerfile" if isinstance(build, str) else build.get(
                "dockerfile", "Dockerfile")
            assert (context / dockerfile_name).resolve() == DOCKERFILE
        else:
            image = svc["image"]
            match = re.fullmatch(r"[\w./-]+:([\w.-]+)", image)
            assert match, f"{name}: pin an exact image tag, not {image!r}"
            assert re.search(r"\d+\.\d+\.\d+", match.group(1)), \
                f"{name}: pin an exact image tag, not {image!r}"
        for target, source in mounts(name).items():
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} (mounted on {target})"
            else:
                assert source in (data.get("volumes") or {}), f"{name}: volume {source}"
        for dependency, condition in (svc.get("depends_on") or {}).items():
            assert condition["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    host_ports = [port for name in services for port in published_ports(name)]
    assert len(host_ports) == len(set(host_ports)), "two services publish one host port"
    assert service("db")["image"].startswith("timescale/timescaledb:")
    assert service("grafana")["image"].startswith("grafana/grafana-oss:")
    test = service("db")["healthcheck"]["test"]
    assert "pg_isready" in " ".join(test)


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_compose_server_agrees_with_configuration(name: str) -> None:
    cls = SERVERS[name]
    config = server_in_compose(name)
    host, port = config.listen
    assert host == "0.0.0.0", "inside a container the server must listen on all interfaces"
    assert config.metrics_listen is not None
    metrics_host, metrics_port = config.metrics_listen
    assert metrics_host == "0.0.0.0"
    if name == "td-server":  # a forwarder's default --td reaches its first server
        assert (port, metrics_port) == (default_of(cls, "listen")[1],
                                        default_of(cls, "metrics_listen")[1])
    # Every server of the service (--processes: server i on the ports + i) is published.
    assert config.processes >= 1
    served = {first + i for first in (port, metrics_port) for i in range(config.processes)}
    assert served <= container_ports(name), (served, container_ports(name))
    assert healthcheck_url_port(name) == metrics_port
    # The write-ahead log lives on a named volume.
    assert config.state_dir is not None
    source = mounts(name).get(str(config.state_dir))
    assert source in (compose().get("volumes") or {}), f"state dir {config.state_dir}"
    # The database is the db service.
    db = service_environment("db")
    assert config.dsn == (f"postgresql://{db['POSTGRES_USER']}:{db['POSTGRES_PASSWORD']}"
                          f"@db:5432/{db['POSTGRES_DB']}")
    assert {"condition": "service_healthy"} == service(name)["depends_on"]["db"]


def test_dockerfile_image_user_ports_and_command() -> None:
    assert dockerfile_args("FROM") == ["python:3.11-slim"]
    users = dockerfile_args("USER")
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    exposed = {int(p) for rest in dockerfile_args("EXPOSE") for p in rest.split()}
    defaults = {default_of(cls, key)[1] for cls in SERVERS.values()
                for key in ("listen", "metrics_listen")}
    assert exposed == defaults == {7410, 7411, 9410, 9411}
    command = json.loads(dockerfile_args("CMD")[-1])
    assert command[0] == "td-server"
    config = effective(TdServerConfig, command[1:], dockerfile_env())
    assert config.listen == ("0.0.0.0", 7410)
    assert config.metrics_listen == ("0.0.0.0", 9410)
    assert config.state_dir == Path("/var/lib/tdagg/state")
    for name in SERVERS:
        assert mounts(name).get("/var/lib/tdagg/state"), name


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i:end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignored() -> Any:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _glob_regex(posixpath.normpath(line.lstrip("!").strip("/")))))

    def ignored(relative: str) -> bool:
        parts = relative.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        result = False
        for negate, regex in rules:
            if any(regex.fullmatch(p) for p in prefixes):
                result = not negate
        return result
    return ignored


def context_files(source: str, ignored: Any) -> Iterable[str]:
    """Files under SOURCE (relative to the context) that the build context holds."""
    top = ROOT / source
    if top.is_file():
        yield source
        return
    for directory, subdirs, files in os.walk(top):
        here = Path(directory).relative_to(ROOT).as_posix()
        here = "" if here == "." else here + "/"
        subdirs[:] = sorted(d for d in subdirs if not ignored(here + d))
        yield from (here + f for f in sorted(files) if not ignored(here + f))


def declared_packages() -> list[str]:
    """Top-level packages that pyproject.toml's [tool.setuptools.packages.find] takes."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()
                  and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in include))


def test_docker_build_context_builds_a_complete_package(tmp_path: Path) -> None:
    """Replays the Dockerfile's WORKDIR and COPY steps on the build context left by
    .dockerignore, then builds the wheel that its `pip install .` would install."""
    ignored = dockerignored()
    for left_out in (".git/config", "common/__pycache__/x.pyc", "nontd.log", "tests/x.py"):
        assert ignored(left_out), left_out
    image = tmp_path / "image"
    workdir = "/"
    build_dir = None
    for instruction, rest in dockerfile():
        if instruction == "WORKDIR":
            workdir = posixpath.join(workdir, rest)
        elif instruction == "COPY":
            *sources, dest = [a for a in shlex.split(rest) if not a.startswith("--")]
            target = image / posixpath.join(workdir, dest).lstrip("/")
            for source in sources:
                source = posixpath.normpath(source)
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                assert source == "." or not ignored(source), \
                    f"COPY {source}: .dockerignore leaves it out"
                for relative in context_files(source, ignored):
                    if (ROOT / source).is_dir():
                        into = target / Path(relative).relative_to(source)
                    elif dest.endswith("/") or len(sources) > 1:
                        into = target / Path(source).name
                    else:
                        into = target
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / relative, into)
        elif instruction == "RUN" and re.search(r"pip install \.(\s|$)", rest):
            build_dir = image / workdir.lstrip("/")
            break
    assert build_dir is not None, "no `pip install .` step in the Dockerfile"
    assert not (build_dir / "tests").exists()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir",
         str(tmp_path / "dist"), str(build_dir)],
        capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("tdagg-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in shipped
                            if n.endswith(".dist-info/entry_points.txt"))
    packages = declared_packages()
    assert {"common", "td_server", "non_td_server", "k6_forward"} <= set(packages)
    needed = {path.relative_to(ROOT).as_posix() for package in packages
              for path in (ROOT / package).rglob("*")
              if path.is_file() and "__pycache__" not in path.parts}
    not_copied = sorted(n for n in needed if not (build_dir / n).exists())
    assert not not_copied, f".dockerignore or the COPY steps leave out {not_copied}"
    not_packaged = sorted(needed - shipped)
    assert not not_packaged, (f"the built package lacks {not_packaged}: declare them as "
                              "package data in pyproject.toml "
                              "([tool.setuptools.package-data])")
    for script in SCRIPTS:
        assert f"{script} = " in entry_points, script


# --- Grafana provisioning ----------------------------------------------------------------

def grafana_datasource() -> dict[str, Any]:
    data = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "tdagg.yml").read_text())
    (source,) = data["datasources"]
    return dict(source)


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def datasource_refs(node: Any) -> Iterable[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for value in node.values():
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_refs(value)


def test_grafana_provisioning_matches_compose() -> None:
    grafana_mounts = mounts("grafana")
    provisioning = grafana_mounts.get("/etc/grafana/provisioning")
    assert provisioning
    assert (ROOT / provisioning).resolve() == GRAFANA / "provisioning"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "tdagg.yml").read_text())["providers"]
    (provider,) = providers
    path = provider["options"]["path"]
    assert (ROOT / grafana_mounts[path]).resolve() == DASHBOARD.parent
    home = service_environment("grafana").get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home == f"{path}/{DASHBOARD.name}"

    source = grafana_datasource()
    db = service_environment("db")
    assert source["type"] == "grafana-postgresql-datasource"
    assert source["url"] == "db:5432"
    assert source["user"] == db["POSTGRES_USER"]
    assert source["jsonData"]["database"] == db["POSTGRES_DB"]
    # The queries below are expanded as Grafana does without the TimescaleDB option,
    # which keeps them valid on plain PostgreSQL too.
    assert source["jsonData"]["timescaledb"] is False
    password = re.fullmatch(r"\$\{?([A-Z_]+)\}?", source["secureJsonData"]["password"])
    assert password, "the password comes from the Grafana container's environment"
    assert service_environment("grafana")[password.group(1)] == db["POSTGRES_PASSWORD"]

    board = dashboard()
    refs = list(datasource_refs(board))
    assert refs
    assert all(ref["uid"] == source["uid"] and ref["type"] == source["type"]
               for ref in refs if ref.get("type") != "grafana"), refs
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


# --- the servers as the units start them, fed by the real k6 ----------------------------

WATCHDOG_USEC = 1_000_000  # the unit's 30 s would outlast the run; the contract is the same
METRICS_URL = re.compile(r" metrics http://\S+:(\d+)/metrics")


def metrics_port(server: ServerProcess) -> int:
    found = METRICS_URL.search(server.ready_line)
    assert found, server.ready_line
    return int(found.group(1))


@dataclasses.dataclass
class Deployment:
    dsn: str
    run_id: str
    exit_codes: dict[str, int]
    stderr: dict[str, str]
    notifications: dict[str, list[str]]
    health: dict[str, tuple[int | None, str]]
    health_refused: dict[str, int | None]


@contextlib.asynccontextmanager
async def as_unit(name: str, dsn: str, root: Path, notify: socket.socket,
                  ) -> AsyncIterator[ServerProcess]:
    """Start NAME the way its unit does: ExecStart's console script, the unit's
    Environment= and the env example (EnvironmentFile=), $NOTIFY_SOCKET, $WATCHDOG_USEC,
    the seccomp sandbox; only the database and loopback ports come from flags."""
    unit = read_unit(SYSTEMD / f"{name}.service")
    state_root = root / "var-lib"
    (state_root / unit_value(unit, "Service", "StateDirectory")).mkdir(parents=True,
                                                                     mode=0o700)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8"}
    env |= unit_environment(unit, state_root)
    env |= env_example(name)
    env |= {"NOTIFY_SOCKET": notify.getsockname(), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    script = BIN / Path(unit_value(unit, "Service", "ExecStart")).name
    server = await start_process(
        [sys.executable, "-c", SANDBOX, json.dumps(sandbox_filters(unit)), str(script),
         "--dsn", dsn, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
        name, env=env)
    try:
        yield server
    finally:
        await server.close()


async def run_healthcheck(name: str, port: int) -> tuple[int | None, str]:
    """Compose's healthcheck command for service NAME, aimed at ``port``."""
    test = service(name)["healthcheck"]["test"]
    code = test[3]
    published = f"127.0.0.1:{healthcheck_url_port(name)}/"
    assert code.count(published) == 1
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code.replace(published, f"127.0.0.1:{port}/"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL)
    timeout = float(str(service(name)["healthcheck"]["timeout"]).rstrip("s"))
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return None, "timed out"
    return process.returncode, out.decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def listen_for_notifications(sock: socket.socket, sink: list[str]) -> None:
    """Read $NOTIFY_SOCKET as systemd does, at once: a full queue (10 datagrams) would
    block the server's sendto."""
    loop = asyncio.get_running_loop()
    while True:
        sink.append((await loop.sock_recv(sock, 4096)).decode())


@contextlib.asynccontextmanager
async def tcp_dsn(dsn: str) -> AsyncIterator[str]:
    """The embedded PostgreSQL listens on a unix socket only; a deployment reaches its
    database by host name over TCP. Relay localhost:PORT to the socket, so that the
    servers resolve a name and open AF_INET sockets inside their sandbox."""
    url = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qs(url.query)
    path = f"{query['host'][0]}/.s.PGSQL.{query.get('port', ['5432'])[0]}"
    relays: set[asyncio.Task[Any]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        relays.add(task)
        up_reader, up_writer = await asyncio.open_unix_connection(path)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    listener = await asyncio.start_server(relay, "localhost", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"postgresql://{url.username}@localhost:{port}{url.path}"
    finally:
        listener.close()
        await listener.wait_closed()
        await asyncio.wait_for(asyncio.gather(*relays, return_exceptions=True), 10)


async def deploy_and_run(dsn: str, root: Path) -> Deployment:
    run_id = f"deploy-{uuid.uuid4().hex[:8]}"
    sockets = {}
    notifications: dict[str, list[str]] = {}
    listeners = []
    for name in SERVERS:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(root / f"{name}.notify"))
        sock.setblocking(False)
        sockets[name] = sock
        notifications[name] = []
        listeners.append(asyncio.create_task(
            listen_for_notifications(sock, notifications[name])))
    stop_within = {name: float(unit_value(read_unit(SYSTEMD / f"{name}.service"), "Service",
                                          "TimeoutStopSec")) for name in SERVERS}
    try:
        async with (
            tcp_dsn(dsn) as database,
            http_target() as base,
            as_unit("td-server", database, root, sockets["td-server"]) as td,
            as_unit("non-td-server", database, root, sockets["non-td-server"]) as non_td,
        ):
            code, err = await asyncio.wait_for(
                k6_pipeline(base, root / "raw.json", td.address, non_td.address, run_id,
                            "12s"), 120)
            assert code == 0, err
            assert "acknowledged" in err, err
            running = {"td-server": td, "non-td-server": non_td}
            health = {name: await run_healthcheck(name, metrics_port(r))
                      for name, r in running.items()}
            refused = {name: (await run_healthcheck(name, free_port()))[0]
                       for name in running}
            exit_codes = {}
            for name, r in running.items():
                # SIGTERM; a server still running after TimeoutStopSec is killed (-9).
                exit_codes[name] = await r.stop(stop_within[name])
            stderr = {name: r.log() for name, r in running.items()}
        await asyncio.sleep(0.2)  # the last datagrams
    finally:
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        for sock in sockets.values():
            sock.close()
    return Deployment(dsn, run_id, exit_codes, stderr, notifications, health, refused)


@pytest.fixture(scope="module")
def deployment(pg_server: Any,
               tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """One real run: k6 -> k6-forward -> both servers started as their units start them."""
    dsn = asyncio.run(create_database(pg_server))
    return asyncio.run(deploy_and_run(dsn, tmp_path_factory.mktemp("deploy")))


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(SERVERS))
def test_server_keeps_the_units_contract(deployment: Deployment, name: str) -> None:
    """Type=notify with WatchdogSec: READY=1 once serving, WATCHDOG=1 at half the
    watchdog interval, STOPPING=1 on SIGTERM, exit 0 within TimeoutStopSec; all of it
    inside the unit's sandbox (MemoryDenyWriteExecute=, SystemCallFilter=, ...)."""
    assert deployment.exit_codes[name] == 0, deployment.stderr[name]
    assert "database postgresql://postgres@localhost:" in deployment.stderr[name]
    assert "Traceback" not in deployment.stderr[name], deployment.stderr[name]
    states = [line for message in deployment.notifications[name]
              for line in message.splitlines()]
    assert "READY=1" in states, states
    assert "STOPPING=1" in states, states
    assert states.index("READY=1") < states.index("STOPPING=1")
    # ~15 s of serving at one ping per 0.5 s.
    assert states.count("WATCHDOG=1") >= 10, states


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(SERVERS))
def test_compose_healthcheck_passes_on_a_serving_server(deployment: Deployment,
                                                         name: str) -> None:
    code, output = deployment.health[name]
    assert code == 0, output
    assert deployment.health_refused[name] not in (0, None), "the check cannot fail"


# --- the dashboard's queries on the pipeline's rows --------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]|\$(\w+)")
_MACRO = re.compile(r"\$__(\w+)\(([^)]*)\)")


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def interpolate(sql: str, variables: Mapping[str, dict[str, Any]],
                values: Mapping[str, list[str]], interval: str) -> str:
    """Template variables as Grafana's PostgreSQL data source formats them."""
    seconds = interval_seconds(interval)
    sql = sql.replace("$__interval_ms", str(int(seconds * 1000)))
    sql = sql.replace("$__interval", interval)

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3) or match.group(5)
        form = match.group(2) or match.group(4)
        if name.startswith("__"):
            return match.group(0)  # a macro, expanded later
        assert name in variables, f"${name} is not a dashboard variable"
        chosen = values[name]
        assert chosen, f"${name} has no value"
        definition = variables[name]
        if form == "sqlstring" or (form is None and (definition.get("multi")
                                                     or definition.get("includeAll"))):
            return ",".join(sql_literal(v) for v in chosen)
        assert form is None, f"format :{form} is not emulated"
        assert len(chosen) == 1
        return chosen[0].replace("'", "''")
    return _VARIABLE.sub(one, sql)


def interval_seconds(text: str) -> float:
    match = re.fullmatch(r"'?(\d+(?:\.\d+)?)(ms|s|m|h|d)'?", text.strip())
    assert match, f"interval {text!r}"
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * factor


def expand_macros(sql: str, start: datetime, end: datetime) -> str:
    """Grafana's PostgreSQL macros, as expanded with the TimescaleDB option off."""
    def stamp(moment: datetime) -> str:
        return "'" + moment.isoformat().replace("+00:00", "Z") + "'"

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        args = [a.strip() for a in match.group(2).split(",")] if match.group(2).strip() else []
        if name == "timeFilter":
            return f"{args[0]} BETWEEN {stamp(start)} AND {stamp(end)}"
        if name == "time":
            return f'{args[0]} AS "time"'
        if name == "timeFrom":
            return stamp(start)
        if name == "timeTo":
            return stamp(end)
        if name in ("timeGroup", "timeGroupAlias"):
            seconds = interval_seconds(args[1])
            step = int(seconds) if seconds == int(seconds) else seconds
            group = f"floor(extract(epoch from {args[0]})/{step})*{step}"
            return group + (' AS "time"' if name == "timeGroupAlias" else "")
        raise AssertionError(f"macro $__{name} is not emulated by this test")
    return _MACRO.sub(one, sql)


def check_frame(title: str, form: str, rows: list[asyncpg.Record]) -> None:
    assert rows, f"{title}: no rows"
    if form == "variable":
        return
    numbers = (int, float, Decimal)
    assert any(isinstance(v, numbers) for row in rows for v in row.values()), \
        f"{title}: no value"
    if form != "time_series":
        return
    columns = list(rows[0].keys())
    assert columns[0] == "time", f"{title}: the first column must be time, not {columns[0]}"
    times = [row["time"] for row in rows]
    assert times == sorted(times), f"{title}: Grafana needs rows in time order"
    # Long format (text columns name the series): Grafana turns it wide and needs each
    # (time, series) once.
    keys = [(row["time"], *(v for v in row.values() if isinstance(v, str))) for row in rows]
    assert len(keys) == len(set(keys)), f"{title}: a series has two rows at one time"


@pytest.mark.e2e
async def test_every_dashboard_query_runs_and_returns_rows(deployment: Deployment) -> None:
    conn = await asyncpg.connect(deployment.dsn)
    try:
        values = await run_every_dashboard_query(conn, deployment.run_id)
    finally:
        await conn.close()
    assert {"items", "search", "pay"} <= set(values["name"])


async def run_every_dashboard_query(conn: asyncpg.Connection, run_id: str
                                    ) -> dict[str, list[str]]:
    """Every panel's and variable's query of the dashboard on a run's rows, with Grafana's
    variables and macros expanded, each checked as the panel reads it; the variables'
    values."""
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"run_id", "metric", "name"}
    first, last = await conn.fetchrow(
        "SELECT min(bucket), max(bucket) FROM ("
        " SELECT bucket FROM trend_buckets WHERE run_id = $1"
        " UNION ALL SELECT bucket FROM counter_buckets WHERE run_id = $1) AS b",
        run_id)
    assert first is not None, "the pipeline wrote nothing"
    start, end = first - timedelta(minutes=5), last + timedelta(minutes=5)

    async def run(title: str, sql: str, values: Mapping[str, list[str]], interval: str,
                  form: str) -> list[asyncpg.Record]:
        text = expand_macros(interpolate(sql, variables, values, interval), start, end)
        assert "$" not in text, f"{title}: left unexpanded:\n{text}"
        try:
            rows: list[asyncpg.Record] = await conn.fetch(text)
        except asyncpg.PostgresError as exc:
            raise AssertionError(f"{title}: {exc}\n{text}") from None
        check_frame(title, form, rows)
        return rows

    # Template variables, in order: each may use the ones before it.
    values: dict[str, list[str]] = {}
    for name, definition in variables.items():
        assert definition["definition"] == definition["query"]
        rows = await run(f"variable {name}", definition["query"], values, "10s", "variable")
        found = [str(row[0]) for row in rows]
        if name == "run_id":
            assert run_id in found
            values[name] = [run_id]
        else:
            values[name] = found  # "All"
    assert "http_req_duration" in values["metric"]
    assert variables["metric"]["current"]["value"] == ["http_req_duration"]

    ran = 0
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            repeated = panel.get("repeat")
            choices = ([[v] for v in values[repeated]] if repeated
                       else [["http_req_duration"]])
            for choice in choices:
                for interval in ("1s", "10s", "1m"):
                    chosen = values | ({repeated: choice} if repeated else {"metric": choice})
                    title = f"panel {panel['title']!r} ({choice[0]}, {interval})"
                    rows = await run(title, target["rawSql"], chosen, interval,
                                     target["format"])
                    ran += 1
                    if panel["title"] == "Runs":
                        assert run_id in {r["run_id"] for r in rows}
    assert ran >= 10 * 3
    return values


def test_deploy_doc_covers_the_steps() -> None:
    text = DEPLOY_DOC.read_text()
    for needed in ("/opt/tdagg", "systemctl daemon-reload", "systemctl enable --now",
                   "docker compose up", "k6-forward", "deploy/systemd/td-server.service",
                   "deploy/systemd/non-td-server.env.example", "/etc/tdagg/td-server.env"):
        assert needed in text, needed

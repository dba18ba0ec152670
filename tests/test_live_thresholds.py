"""Global thresholds, piece by piece: k6's threshold objects and durations, the k6 inspect
command, the thresholds and verdicts frames, the forwarder's following of verdicts, and
a real server judging over two producers, refusing bad frames and surviving a restart."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common import protocol
from common.harness import k6_binary
from common.live_thresholds import parse_items
from k6_forward.child import ChildError
from k6_forward.thresholds import check_tags, inspect_argv, load, with_no_thresholds
from k6_forward.verdicts import GlobalVerdicts
from td_report.thresholds import (
    ThresholdError,
    from_options,
    parse_duration,
    parse_threshold,
)
from tests.test_server_db import OLD_BUCKET, counter_item, trend_item
from tests.utils import Client, fetch, quantile_ok, run_server

# --- k6's threshold objects ------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("10s", 10.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5s", 1.5),
    ("250", 0.25), (250, 0.25), (0, 0.0), ("2m0.5s", 120.5), ("100us", 1e-4)])
def test_durations_as_k6_reads_them(text: Any, seconds: float) -> None:
    assert math.isclose(parse_duration(text), seconds)


@pytest.mark.parametrize("text", ["10", "ten seconds", "10 s", "s", "-5s", True, None,
                                  [1], "1d", "5s5"])
def test_bad_durations_are_refused(text: Any) -> None:
    if text == "10":  # a bare number is milliseconds, as in k6's options
        assert parse_duration(text) == 0.01
        return
    with pytest.raises(ThresholdError, match="is not a duration"):
        parse_duration(text)


def test_threshold_objects_keep_abort_on_fail_and_its_delay() -> None:
    thresholds = from_options({"thresholds": {
        "http_req_duration{name:pay}": [
            {"threshold": "p(95)<300", "abortOnFail": True, "delayAbortEval": "1m"},
            "avg<100"],
        "http_req_failed": {"threshold": "rate<0.01", "abortOnFail": False},
        "checks": ["rate>0.9"]}}, "options")
    assert [(t.text, t.abort_on_fail, t.delay_abort_eval, t.role) for t in thresholds] == [
        ("http_req_duration{name:pay}: p(95)<300", True, 60.0, "td"),
        ("http_req_duration{name:pay}: avg<100", False, 0.0, "td"),
        ("http_req_failed: rate<0.01", False, 0.0, "non_td"),
        ("checks: rate>0.9", False, 0.0, "non_td")]


@pytest.mark.parametrize(("entry", "message"), [
    ({"threshold": "p(95)<1", "abortOnFail": "yes"}, "abortOnFail must be true or false"),
    ({"threshold": "p(95)<1", "delayAbortEval": "soon"}, "delayAbortEval: 'soon' is not"),
    ({"abortOnFail": True}, "must be a string like")])
def test_bad_threshold_objects_say_what_is_wrong(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ThresholdError, match=message):
        from_options({"thresholds": {"http_req_duration": [entry]}}, "options")


# --- the k6 commands -------------------------------------------------------------------


def test_inspect_sees_what_the_run_sees() -> None:
    argv = ["k6", "run", "--vus", "10", "-e", "A=1", "--env=B=2", "-c", "conf.json",
            "--out", "json=x.json", "--config=other.json", "--compatibility-mode", "base",
            "--include-system-env-vars=false", "-t", "js", "script.js", "--tag", "x=y"]
    assert inspect_argv(argv) == [
        "k6", "inspect", "--execution-requirements", "--include-system-env-vars=false",
        "-e", "A=1", "--env=B=2", "-c", "conf.json", "--config=other.json",
        "--compatibility-mode", "base", "-t", "js", "script.js"]
    assert inspect_argv(["/opt/k6", "run", "s.js"]) == [
        "/opt/k6", "inspect", "--execution-requirements", "--include-system-env-vars",
        "s.js"]


def test_inspect_needs_a_run_command_with_a_script() -> None:
    with pytest.raises(ChildError, match="-- k6 run script.js"):
        inspect_argv(["k6", "version"])
    with pytest.raises(ChildError, match="cannot tell the test script"):
        inspect_argv(["k6", "run", "-"])


def test_no_generator_judges_alone() -> None:
    assert with_no_thresholds(["k6", "run", "-q", "s.js"]) == [
        "k6", "run", "--no-thresholds", "-q", "s.js"]
    once = ["k6", "run", "--no-thresholds", "s.js"]
    assert with_no_thresholds(once) == once


def test_a_filter_on_a_tag_the_forwarder_drops_is_refused() -> None:
    check_tags([parse_threshold("http_req_duration{name:a}: p(95)<1")], ("name", "status"))
    with pytest.raises(ThresholdError, match="add it with --tags name,status,url"):
        check_tags([parse_threshold("http_req_duration{url:a}: p(95)<1")],
                   ("name", "status"))


async def test_real_k6_inspect_with_env_config_and_system_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The script reads its bound from __ENV: -e wins over the system environment, as in
    k6 run; a config file's thresholds count when the script has none."""
    script = tmp_path / "s.js"
    script.write_text(
        "export const options = { thresholds: { http_req_duration: [{ threshold: "
        "`p(95)<${__ENV.LIMIT}`, abortOnFail: true, delayAbortEval: '10s' }], "
        "'http_reqs{status:200}': ['count>5'] } };\nexport default function () {}\n")
    plain = tmp_path / "plain.js"
    plain.write_text("export default function () {}\n")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"thresholds": {"iterations": ["count>1"]}}))
    monkeypatch.setenv("LIMIT", "250")
    k6 = k6_binary()
    texts = [(t.text, t.abort_on_fail, t.delay_abort_eval)
             for t in await load([k6, "run", str(script)], [])]
    assert texts == [("http_req_duration: p(95)<250", True, 10.0),
                     ("http_reqs{status:200}: count>5", False, 0.0)]
    with_env = await load([k6, "run", "-e", "LIMIT=99", str(script)], ["checks: rate>0.5"])
    assert [t.text for t in with_env] == ["http_req_duration: p(95)<99",
                                          "http_reqs{status:200}: count>5",
                                          "checks: rate>0.5"]
    from_config = await load([k6, "run", "--config", str(config), str(plain)], [])
    assert [t.text for t in from_config] == ["iterations: count>1"]
    assert await load([k6, "run", str(plain)], []) == []


# --- frames ----------------------------------------------------------------------------


def test_thresholds_frame_round_trip() -> None:
    items = [("http_req_duration{name:a}: p(95)<300", True, 10.0), ("checks: rate>0.9",
                                                                     False, 0.0)]
    body = protocol.FrameDecoder().feed(protocol.thresholds(items))[0]
    parsed = protocol.parse_thresholds(protocol.unpack(body))
    assert parsed == items
    assert [(t.text, t.abort_on_fail, t.delay_abort_eval) for t in parse_items(parsed)] == items


@pytest.mark.parametrize(("message", "reason"), [
    ({"items": "x"}, "bad_field"),
    ({"items": [["a: p(95)<1", True]]}, "bad_field"),
    ({"items": [["a: p(95)<1", 1, 0.0]]}, "bad_field"),
    ({"items": [["a\x00: p(95)<1", True, 0.0]]}, "bad_character"),
    ({"items": [["a: p(95)<1", True, -1.0]]}, "bad_field"),
    ({"items": [["a: p(95)<1", True, float("nan")]]}, "not_finite"),
    ({"items": [["x" * 2000, True, 0.0]]}, "too_long"),
    ({"items": [["a: p(95)<1", False, 0.0]] * (protocol.MAX_THRESHOLDS + 1)}, "bad_field"),
])
def test_bad_thresholds_frames_are_refused(message: dict[str, Any], reason: str) -> None:
    with pytest.raises(protocol.Refused) as caught:
        protocol.parse_thresholds({"type": "thresholds", **message})
    assert caught.value.reason == reason


def test_a_threshold_the_server_cannot_parse_is_named() -> None:
    with pytest.raises(protocol.Refused) as caught:
        parse_items([("http_req_duration: p(95)<<1", False, 0.0)])
    assert caught.value.reason == "bad_threshold"
    assert "expected a single operator" in caught.value.detail


# --- following the verdicts ------------------------------------------------------------


def result(text: str, ok: bool, decided: bool = True, observed: float = 1.0) -> dict[str, Any]:
    return {"threshold": text, "ok": ok, "decided": decided, "observed": observed,
            "samples": 10, "note": ""}


async def test_abort_waits_for_delay_abort_eval_and_happens_once() -> None:
    slow = parse_threshold("http_req_duration: p(95)<100")
    slow = type(slow)(slow.metric, slow.tags, slow.expression, True, 30.0)
    aborted: list[str] = []
    verdicts = GlobalVerdicts([slow], False, lambda t, r: aborted.append(t.text),
                              started_at=time.time() - 10)
    verdicts.receive("td", {"results": [result(slow.text, False)], "final": False})
    assert aborted == []  # 10 s into the run, inside its 30 s delay
    verdicts.started_at -= 25
    verdicts.receive("td", {"results": [result(slow.text, False)], "final": False})
    verdicts.receive("td", {"results": [result(slow.text, False)], "final": False})
    assert aborted == [slow.text]
    assert verdicts.failed


async def test_strict_fails_a_verdict_too_close_to_call() -> None:
    p95 = parse_threshold("http_req_duration: p(95)<100")
    count = parse_threshold("http_reqs: count>1")
    for strict, failed in ((False, False), (True, True)):
        verdicts = GlobalVerdicts([p95, count], strict, lambda t, r: None)
        verdicts.receive("td", {"results": [result(p95.text, True, decided=False)],
                                "final": True})
        assert not verdicts.is_final  # non-td-server has not said its final verdict
        verdicts.receive("non_td", {"results": [result(count.text, True),
                                                result("unknown: count>1", False)],
                                    "final": True})
        assert verdicts.is_final
        assert verdicts.failed is failed
        lines = "\n".join(verdicts.lines())
        assert ("FAIL http_req_duration" in lines) is failed


async def test_waiting_for_the_final_verdict_ends_by_timeout_or_interrupt() -> None:
    p95 = parse_threshold("http_req_duration: p(95)<100")
    verdicts = GlobalVerdicts([p95], False, lambda t, r: None)
    assert not await verdicts.wait_final(0.05)
    asyncio.get_running_loop().call_later(0.05, verdicts.give_up)
    assert not await verdicts.wait_final(30)
    verdicts = GlobalVerdicts([p95], False, lambda t, r: None)
    asyncio.get_running_loop().call_later(0.05, verdicts.receive, "td",
                                          {"results": [result(p95.text, True)], "final": True})
    assert await verdicts.wait_final(30)
    assert "ok   http_req_duration: p(95)<100: observed 1" in "\n".join(verdicts.lines())


# --- a real server ---------------------------------------------------------------------


async def declare(client: Client, *texts: str) -> None:
    client.writer.write(protocol.thresholds([(t, t.startswith("m:"), 0.0) for t in texts]))
    await client.writer.drain()


VERDICTS: dict[int, list[dict[str, Any]]] = {}  # verdicts frames read while awaiting acks


async def reply(client: Client) -> dict[str, Any]:
    """The server's next answer that is not a verdicts frame (those may come any time)."""
    while True:
        message = await client.receive()
        if message["type"] != "verdicts":
            return message
        VERDICTS.setdefault(id(client), []).append(message)


async def send(client: Client, seq: int, items: list[Any]) -> dict[str, Any]:
    client.writer.write(protocol.data(seq, items))
    return await reply(client)


async def next_verdicts(client: Client, final: bool, within: float = 20.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        stash = VERDICTS.get(id(client), [])
        message = stash.pop(0) if stash else await client.receive(
            max(deadline - loop.time(), 0.01))
        if message["type"] == "verdicts" and message["final"] is final:
            return message


async def generator_frames(client: Client, seq: int, last_ns: int) -> None:
    for state, step in (("start", 0), ("end", 1)):
        client.writer.write(protocol.generator(protocol.Generator(
            seq + step, state, time.time(), last_ns=last_ns if state == "end" else None)))
        assert (await reply(client))["type"] == "ack"


async def test_server_judges_over_every_producer_and_again_after_a_restart(
        dsn: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    parts = [rng.lognormal(3.0, 0.5, 4000), rng.lognormal(5.0, 0.3, 300)]
    values = np.concatenate(parts)
    texts = ["m: p(95)<150", "m: max<1000000", "m{name:a}: avg<1", "absent: p(99)<5",
             "m: count>1"]  # the last is non-td-server's to judge
    last_ns = (OLD_BUCKET + 5) * 1_000_000_000
    async with run_server(dsn, tmp_path, grace=0.0) as server:
        clients = [await Client.connect(server.address, run_id="judged") for _ in parts]
        for client in clients:
            await declare(client, *texts)
        for client, part in zip(clients, parts, strict=True):
            assert (await send(client, 1, [trend_item(part, metric="m")]))["type"] == "ack"
        for client in clients:
            await generator_frames(client, 2, last_ns)
        finals = [await next_verdicts(client, final=True) for client in clients]
        for client in clients:
            await client.close()
    assert finals[0]["results"] == finals[1]["results"]  # pushed to every producer
    got = {r["threshold"]: r for r in finals[0]["results"]}
    assert list(got) == texts[:4]
    exact_p95 = float(np.quantile(values, 0.95))
    assert quantile_ok(values, 0.95, got["m: p(95)<150"]["observed"])
    assert got["m: p(95)<150"]["ok"] is (exact_p95 < 150)
    assert got["m: max<1000000"]["observed"] == values.max()
    assert got["m: max<1000000"]["ok"] is True
    assert got["m{name:a}: avg<1"]["observed"] == pytest.approx(values.mean(), rel=1e-12)
    assert got["m{name:a}: avg<1"]["ok"] is False
    assert got["m{name:a}: avg<1"]["samples"] == len(values)
    assert (got["absent: p(99)<5"]["verdict"], got["absent: p(99)<5"]["ok"]) == ("no_data",
                                                                                 True)
    assert finals[0]["through"] == OLD_BUCKET + 10
    stored = await fetch(dsn, "SELECT threshold, verdict, observed, final FROM "
                              "threshold_evaluations WHERE run_id = 'judged' AND final")
    assert {r["threshold"] for r in stored} == set(texts[:4])

    # A new server process on the same database and log: a forwarder that says its
    # thresholds again gets the same final verdicts, computed from the stored rows.
    async with run_server(dsn, tmp_path, grace=0.0) as server:
        client = await Client.connect(server.address, run_id="judged")
        await declare(client, *texts)
        again = await next_verdicts(client, final=True)
        await client.close()
    assert again["results"] == finals[0]["results"]


async def test_bad_thresholds_frame_is_refused_and_the_connection_goes_on(
        dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, protocol.ROLE_NON_TD, grace=0.0) as server:
        client = await Client.connect(server.address, protocol.ROLE_NON_TD,
                                      run_id="bad-thresholds")
        client.writer.write(protocol.thresholds([("checks: rate>>1", False, 0.0)]))
        refusal = await reply(client)
        assert (refusal["type"], refusal["reason"], refusal["fatal"]) == (
            "error", "bad_threshold", False)
        assert "checks: rate>>1" in refusal["detail"]
        answer = await send(client, 1, [counter_item("rate", [1.0, 0.0, 1.0],
                                                    OLD_BUCKET * 10**9, metric="checks")])
        assert answer["type"] == "ack"
        await declare(client, "checks: rate>0.5", "checks: rate>0.9")
        message = await next_verdicts(client, final=False)
        while message["results"][0]["samples"] == 0:  # judged before the write
            message = await next_verdicts(client, final=False)
        got = {r["threshold"]: (r["ok"], r["observed"]) for r in message["results"]}
        assert got == {"checks: rate>0.5": (True, 2 / 3), "checks: rate>0.9": (False, 2 / 3)}
        await client.close()


async def verdict_with(client: Client, text: str, samples: int
                       ) -> dict[str, dict[str, Any]]:
    """The results of the first verdicts frame in which ``text`` was judged over
    ``samples`` samples, by threshold."""
    while True:
        message = await next_verdicts(client, final=False)
        got = {r["threshold"]: r for r in message["results"]}
        if text in got and got[text]["samples"] == samples:
            return got


async def test_late_data_and_a_threshold_said_mid_run_count_each_sample_once(
        dsn: str, tmp_path: Path) -> None:
    """Each write adds what it wrote, late parts of stored rows included; a threshold
    first said after rows are stored starts from the database's rows."""
    rng = np.random.default_rng(5)
    early, late, other = (rng.gamma(2.0, 30.0, n) for n in (3000, 1000, 500))
    async with run_server(dsn, tmp_path, grace=0.0) as server:
        client = await Client.connect(server.address, run_id="late")
        await declare(client, "m: max<1000000")
        assert (await send(client, 1, [trend_item(early, metric="m")]))["type"] == "ack"
        first = await verdict_with(client, "m: max<1000000", len(early))
        assert first["m: max<1000000"]["observed"] == early.max()
        # Late data for the same stored row, and a row of another bucket.
        items = [trend_item(late, metric="m"),
                 trend_item(other, metric="m", bucket=OLD_BUCKET + 10)]
        assert (await send(client, 2, items))["type"] == "ack"
        everything = np.concatenate([early, late, other])
        both = await verdict_with(client, "m: max<1000000", len(everything))
        assert both["m: max<1000000"]["observed"] == everything.max()
        # Said now: built from the stored rows, then fed like the others.
        await declare(client, "m: p(90)<1")
        p90 = await verdict_with(client, "m: p(90)<1", len(everything))
        assert quantile_ok(everything, 0.90, p90["m: p(90)<1"]["observed"])
        more = rng.gamma(2.0, 30.0, 700)
        items = [trend_item(more, metric="m", bucket=OLD_BUCKET + 20)]
        assert (await send(client, 3, items))["type"] == "ack"
        everything = np.concatenate([everything, more])
        got = await verdict_with(client, "m: p(90)<1", len(everything))
        assert quantile_ok(everything, 0.90, got["m: p(90)<1"]["observed"])
        assert got["m: max<1000000"]["samples"] == len(everything)
        assert got["m: max<1000000"]["observed"] == everything.max()
        await client.close()

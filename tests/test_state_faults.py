"""The state directory on a bad day, with real server processes: a full disk, kill -9
on a full disk, a damaged log, two servers on one directory, foreign or damaged state.

Every acknowledged sample must be stored exactly once, and every refusal to start must
say what is wrong and what to do, without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common import digest
from common.harness import ServerProcess, server_process
from tests.faults import free_port
from tests.test_faults import FORWARD_ONE_SECOND, ONE_SECOND, run_forwarder, verify
from tests.utils import Client, fetch

pytestmark = pytest.mark.timeout(180)
ROOT = os.geteuid() == 0


async def start_fails(module: str, dsn: str, state_dir: Path) -> tuple[int, str]:
    """Run a server that must refuse to start; its exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--dsn", dsn,
        "--state-dir", str(state_dir), "--metrics-listen", "",
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, err.decode()


def no_traceback(text: str) -> bool:
    return "Traceback" not in text


# --- two servers, foreign and damaged state ---------------------------------------------


async def test_a_state_directory_serves_one_server(dsn: str, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    async with server_process("td_server", dsn, tmp_path, "--state-dir", str(shared)):
        code, err = await start_fails("td_server", dsn, shared)
        assert code == 2, err
        assert "in use by another server" in err, err
        assert no_traceback(err)
        code, err = await start_fails("non_td_server", dsn, shared)
        assert code == 2, err
        assert no_traceback(err)
    # The other role's directory, once free, is still refused, by name.
    code, err = await start_fails("non_td_server", dsn, shared)
    assert code == 2, err
    assert "td" in err
    assert "non_td" in err
    assert "--state-dir" in err
    assert no_traceback(err)


async def test_a_damaged_dedup_table_is_named_not_a_traceback(dsn: str, tmp_path: Path) -> None:
    state = tmp_path / "td"
    async with server_process("td_server", dsn, tmp_path, "--state-dir", str(state)) as td:
        await td.stop()
    (state / "producers.msgpack").write_bytes(b"\x82\xa9producers")  # cut short
    code, err = await start_fails("td_server", dsn, state)
    assert code == 2, err
    assert "producers.msgpack" in err
    assert "tdagg-wal-repair" in err
    assert no_traceback(err)


# --- a damaged record in the middle of the log ---------------------------------------


def trend_item(value: float, bucket: int, name: str = "a") -> list[object]:
    centroids = digest.from_values(np.array([value]))
    return ["http_req_duration", {"name": name}, bucket, 10, 1, value, value, value,
            digest.encode(centroids), 0]


async def test_damage_inside_the_log_is_refused_and_repaired(dsn: str, tmp_path: Path) -> None:
    state = tmp_path / "td"
    bucket = (int(time.time()) - 60) // 10 * 10
    async with server_process("td_server", dsn, tmp_path, "--state-dir", str(state),
                              "--grace", "3600") as td:
        client = await Client.connect(td.address)
        for seq in range(1, 201):
            assert (await client.send(seq, [trend_item(float(seq), bucket)]))["seq"] == seq
        await client.close()
        td.process.kill()  # every frame is only in the log now
        await td.process.wait()
    (segment,) = sorted(state.glob("wal-*.log"))
    data = bytearray(segment.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF  # one flipped byte, far from the end
    segment.write_bytes(bytes(data))

    code, err = await start_fails("td_server", dsn, state)
    assert code == 2, err
    assert segment.name in err
    assert re.search(r"byte \d+", err), err
    assert "tdagg-wal-repair" in err
    assert no_traceback(err)
    assert segment.read_bytes() == bytes(data)  # the evidence is untouched

    repaired = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "common.wal_repair", str(state)],
        capture_output=True, text=True, timeout=60)
    assert repaired.returncode == 0, repaired.stderr
    assert list(state.glob("wal-*.damaged-*"))  # a copy of the damaged segment is kept
    async with server_process("td_server", dsn, tmp_path, "--state-dir", str(state),
                              "--grace", "3600") as td:
        assert await td.stop() == 0
    rows = await fetch(dsn, "SELECT count, sum FROM trend_buckets")
    # Exactly one record, the damaged one, is gone: 199 of the 200 samples remain.
    assert rows[0]["count"] == 199
    lost = sum(range(1, 201)) - rows[0]["sum"]
    assert lost in range(1, 201)


# --- a full disk under the log ------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write zeros until the file system is full."""
    with open(path, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(64 * 1024))


def metrics_address(proc: ServerProcess) -> tuple[str, int]:
    for line in proc.stderr_lines:
        match = re.search(rb"metrics http://([\d.]+):(\d+)/metrics", line)
        if match:
            return match.group(1).decode(), int(match.group(2))
    raise AssertionError("no metrics address in the ready line")


async def healthz(address: tuple[str, int]) -> int:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root; CI runs as root")
async def test_a_full_log_disk_then_kill_9_loses_and_doubles_nothing(
        dsn: str, tmp_path: Path) -> None:
    ports = {"td_server": free_port(), "non_td_server": free_port()}
    with tmpfs(tmp_path / "state", "3m") as state:
        async with contextlib.AsyncExitStack() as stack:
            procs = {module: await stack.enter_async_context(server_process(
                module, dsn, state, *ONE_SECOND, listen=f"127.0.0.1:{port}"))
                for module, port in ports.items()}
            address = {m: ("127.0.0.1", p) for m, p in ports.items()}
            filler = state / "filler"
            health: list[int] = []

            async def fill_kill_free() -> None:
                await asyncio.sleep(3)
                fill(filler)
                await asyncio.sleep(3)  # frames are refused with "retry": nothing acked
                health.append(await healthz(metrics_address(procs["td_server"])))
                procs["td_server"].process.kill()  # kill -9 while the disk is full
                await procs["td_server"].process.wait()
                filler.unlink()
                procs["td_server"] = await stack.enter_async_context(server_process(
                    "td_server", dsn, state, *ONE_SECOND,
                    listen=f"127.0.0.1:{ports['td_server']}"))

            raw = tmp_path / "raw.json"
            lines, _ = await run_forwarder(address["td_server"], address["non_td_server"],
                                           "diskfull", raw, 12, 200, fill_kill_free,
                                           *FORWARD_ONE_SECOND)
            for proc in procs.values():
                assert await proc.stop() == 0
        assert health == [503]
        assert "retry later" in lines.text()
        figures = await verify(dsn, raw, "diskfull", width=1)
        assert figures["samples_stored"] == figures["samples_sent"]
        assert figures["duplicates"] == 0


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root; CI runs as root")
async def test_sigterm_on_a_full_disk_writes_what_it_can(dsn: str, tmp_path: Path) -> None:
    bucket = (int(time.time()) - 60) // 10 * 10
    with tmpfs(tmp_path / "state", "1m") as state:
        async with server_process("td_server", dsn, state, "--grace", "3600") as td:
            client = await Client.connect(td.address)
            assert (await client.send(1, [trend_item(2.0, bucket)]))["type"] == "ack"
            fill(state / "filler")
            # More than the page the log's last write left room in.
            answer = await client.send(2, [trend_item(3.0, bucket, f"n{i}") for i in range(300)])
            assert answer["reason"] == "log_unavailable"
            assert answer["retry"]
            await client.close()
            code = await td.stop()
            err = b"".join(td.stderr_lines).decode()
    assert code == 0, err
    assert "stopped:" in err
    rows = await fetch(dsn, "SELECT count, sum FROM trend_buckets")
    assert [(r["count"], r["sum"]) for r in rows] == [(1, 2.0)]  # the acked sample

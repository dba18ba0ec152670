"""Values a user's k6 can emit and bytes any client can send: a bad item costs only
itself, the writer never jams, and a client that has not said hello can hold almost
nothing. Real servers in this event loop, a real PostgreSQL, loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import orjson
import pytest

from common import digest, protocol
from common.quarantine import Quarantine
from tests.utils import Client, fetch, run_server, wait_until

TD, NON_TD = protocol.ROLE_TD, protocol.ROLE_NON_TD
OLD_BUCKET = (int(time.time()) - 3600) // 10 * 10  # closes at once with grace 0
WIDE = "\U0001f6d2"  # four bytes in UTF-8


def trend_item(values: list[float], metric: str = "http_req_duration",
               tags: dict[str, str] | None = None, bucket: int = OLD_BUCKET) -> list[Any]:
    array = np.asarray(values, dtype=np.float64)
    centroids, zeros = digest.split_zeros(array)
    return [metric, {"name": "a"} if tags is None else tags, bucket, 10, len(array),
            float(array.sum()), float(array.min()), float(array.max()),
            digest.encode(centroids), zeros]


def counter_item(total: float, count: int, metric: str = "http_reqs",
                 tags: dict[str, str] | None = None, lo: float | None = None,
                 hi: float | None = None) -> list[Any]:
    low = total / count if lo is None else lo
    high = total / count if hi is None else hi
    return [metric, "counter", {"name": "a"} if tags is None else tags, OLD_BUCKET, 10,
            total, count, count, low, high, 0, 0.0]


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (a reset too: it had unread bytes from us)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def answers(client: Client, seq: int, items: list[Any]) -> list[dict[str, Any]]:
    """Every frame the server sends for one data frame, up to and including its ack."""
    client.writer.write(protocol.data(seq, items))
    got = [await client.receive()]
    while got[-1]["type"] != "ack":
        got.append(await client.receive())
    return got


async def trend_rows(dsn: str) -> dict[tuple[str, str], tuple[int, float]]:
    rows = await fetch(dsn, "SELECT metric, tags::text AS tags, count, sum FROM trend_buckets")
    return {(r["metric"], r["tags"]): (r["count"], r["sum"]) for r in rows}


# --- one bad value costs only itself -------------------------------------------------


async def test_nul_characters_are_refused_per_item_and_neighbours_stored(
        dsn: str, tmp_path: Path) -> None:
    good = [trend_item([1.0, 2.0, 3.0], tags={"name": f"good-{i}"}) for i in range(3)]
    bad = [
        trend_item([5.0], tags={"name": "a\x00b"}),     # NUL in a tag value
        trend_item([5.0], tags={"na\x00me": "x"}),      # NUL in a tag key
        trend_item([5.0, 6.0], metric="http\x00req"),   # NUL in the metric name
    ]
    async with run_server(dsn, tmp_path, TD, grace=0) as server:
        client = await Client.connect(server.address)
        got = await answers(client, 1, [good[0], bad[0], good[1], bad[1], bad[2], good[2]])
        await client.close()
        refusal, ack = got
        assert ack == {"type": "ack", "seq": 1}
        assert refusal["type"] == "error"
        assert refusal["seq"] == 1
        assert not refusal["fatal"]
        assert refusal["items"][0][:3] == ["bad_character", 3, 4]
        await wait_until(lambda: server.stats.buckets_written == 3)
        assert server.stats.refused_items == {"bad_character": 3}
        assert server.stats.refused_samples == {"bad_character": 4}
        assert ('tdagg_refused_items_total{server="td",reason="bad_character"} 3'
                in server.render_metrics())
        assert server.problems() == []
    assert await trend_rows(dsn) == {
        ("http_req_duration", f'{{"name": "good-{i}"}}'): (3, 6.0) for i in range(3)}
    # A restart replays the log: the refused items were never logged.
    async with run_server(dsn, tmp_path, TD, grace=0) as server:
        assert server.stats.refused_items == {}
    assert len(await trend_rows(dsn)) == 3


async def test_nul_in_run_or_producer_id_refuses_the_hello(dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, TD, grace=0) as server:
        for producer, run in (("p\x00", "run"), ("p", "r\x00un")):
            reader, writer = await asyncio.open_connection(*server.address)
            client = Client(reader, writer)
            writer.write(protocol.hello(producer, run, TD))
            answer = await client.receive()
            assert answer["type"] == "error"
            assert answer["fatal"]
            assert answer["reason"] == "bad_character"
            assert await reader.read() == b""
            await client.close()
        # Good clients go on.
        client = await Client.connect(server.address)
        assert (await client.send(1, [trend_item([1.0])]))["type"] == "ack"
        await client.close()


async def test_long_url_tags_are_shortened_and_every_sample_stored(
        dsn: str, tmp_path: Path) -> None:
    url = "https://shop.example/search?q=" + "x" * 290  # 320 characters
    expected = url[:239] + "~" + hashlib.blake2b(url.encode(), digest_size=8).hexdigest()
    async with run_server(dsn, tmp_path, TD, grace=0) as server:
        client = await Client.connect(server.address)
        got = await answers(client, 1, [trend_item([1.0, 2.0], tags={"name": url}),
                                        trend_item([4.0], tags={"name": "short"})])
        assert [m["type"] for m in got] == ["ack"]
        await client.close()
        await wait_until(lambda: server.stats.buckets_written == 2)
        assert server.stats.notes["tags_shortened"] == 1
    rows = await fetch(dsn, "SELECT tags->>'name' AS name, count FROM trend_buckets "
                            "ORDER BY count DESC")
    assert [(r["name"], r["count"]) for r in rows] == [(expected, 2), ("short", 1)]


async def test_wide_tags_within_the_limits_are_stored(dsn: str, tmp_path: Path) -> None:
    """5 tags x 256 four-byte characters: a row key of over 5 KB, past a btree's 2,704."""
    tags = {f"k{i}": chr(0x1F600 + i) * 256 for i in range(5)}
    async with run_server(dsn, tmp_path, TD, grace=0) as server:
        client = await Client.connect(server.address)
        assert (await client.send(1, [trend_item([1.0, 2.0], tags=tags),
                                      trend_item([3.0], tags={"name": "b"})]))["type"] == "ack"
        assert (await client.send(2, [trend_item([5.0], tags=tags)]))["type"] == "ack"
        await client.close()
        await wait_until(lambda: server.stats.buckets_written >= 2)
        # The same series again, late: merged into its stored row by the wide key.
        client = await Client.connect(server.address)
        assert (await client.send(1, [trend_item([7.0], tags=tags)]))["type"] == "ack"
        await client.close()
        await wait_until(lambda: server.stats.late_rows == 1)
        assert server.stats.write_failures == 0
        assert server.stats.quarantined_buckets == 0
    rows = await fetch(dsn, "SELECT tags, count, sum FROM trend_buckets ORDER BY count DESC")
    assert [(orjson.loads(r["tags"]), r["count"], r["sum"]) for r in rows] == [
        (tags, 4, 15.0), ({"name": "b"}, 1, 3.0)]


async def test_huge_sums_are_refused_per_item_and_never_reach_the_writer(
        dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, NON_TD, grace=0) as server:
        client = await Client.connect(server.address, NON_TD)
        got = await answers(client, 1, [counter_item(1.7e308, 1), counter_item(1.7e308, 1),
                                        counter_item(5.0, 5, tags={"name": "ok"})])
        refusal, ack = got
        assert ack["seq"] == 1
        assert refusal["items"][0][:3] == ["huge_value", 2, 2]
        await wait_until(lambda: server.stats.buckets_written == 1)
        # A late partial for the stored row still merges.
        assert (await client.send(2, [counter_item(3.0, 3, tags={"name": "ok"})]))[
            "type"] == "ack"
        await wait_until(lambda: server.stats.late_rows == 1)
        await client.close()
        assert server.problems() == []
    rows = await fetch(dsn, "SELECT value, count, state FROM counter_buckets")
    assert [(r["value"], r["count"]) for r in rows] == [(8.0, 8)]


# --- the writer isolates what the database refuses -----------------------------------


async def test_a_row_the_database_refuses_is_quarantined_and_the_rest_written(
        dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, NON_TD, grace=0) as server:
        # A rule of this database that one series breaks: no retry can store it.
        await fetch(dsn, "ALTER TABLE counter_buckets ADD CONSTRAINT no_evil "
                         "CHECK (tags->>'name' <> 'evil')")
        client = await Client.connect(server.address, NON_TD)
        items = [counter_item(float(i + 1), i + 1, tags={"name": f"s{i}"}) for i in range(9)]
        items.insert(4, counter_item(7.0, 7, tags={"name": "evil"}))
        assert (await client.send(1, items))["type"] == "ack"
        await client.close()
        await wait_until(lambda: server.stats.quarantined_buckets == 1
                         and server.stats.buckets_written == 9)
        assert server.stats.quarantined_samples == 7
        assert server.problems() == []
        assert not server.closing
        metrics = server.render_metrics()
        assert 'tdagg_quarantined_rows_total{server="non_td"} 1' in metrics
        assert 'tdagg_quarantined_samples_total{server="non_td"} 7' in metrics
        kept = Quarantine(tmp_path / NON_TD / "quarantine.msgpack").read()
    assert [(r["tags"], r["samples"], r["bucket"]) for r in kept] == [
        ({"name": "evil"}, 7, OLD_BUCKET)]
    assert "no_evil" in kept[0]["error"]
    rows = await fetch(dsn, "SELECT tags->>'name' AS name, value FROM counter_buckets")
    assert {r["name"]: r["value"] for r in rows} == {f"s{i}": float(i + 1) for i in range(9)}


# --- before authentication a client holds almost nothing ------------------------------


async def test_big_frames_before_hello_are_cut_off_at_once(dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, TD, token_file=_token(tmp_path)) as server:
        half = struct.pack(">I", 16 * 1024 * 1024) + bytes(256 * 1024)
        streams = [await asyncio.open_connection(*server.address) for _ in range(40)]
        for _, writer in streams:
            writer.write(half)
        for reader, writer in streams:
            # The error frame may be lost to the reset that closing with our unread
            # bytes causes; the server's count below is what matters.
            with contextlib.suppress(ConnectionResetError):
                message = await Client(reader, writer).receive()
                assert message["reason"] == "bad_framing"
                assert message["fatal"]
            assert await closed_by_server(reader)
            writer.close()
        assert server.buffered_bytes == 0
        assert server.stats.refused["bad_framing"] == 40


async def test_a_hello_of_empty_maps_is_refused_cheaply(dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, TD) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        body = msgpack.packb({"type": "hello", "junk": [{}] * 5000})
        writer.write(struct.pack(">I", len(body)) + body)
        message = await Client(reader, writer).receive()
        assert message["fatal"]
        assert message["reason"] == "bad_msgpack"
        writer.close()


async def test_silent_and_idle_connections_are_closed(dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, TD, hello_timeout=0.3, idle_timeout=0.6) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # no hello in 0.3 s
        writer.close()
        client = await Client.connect(server.address)
        assert await asyncio.wait_for(client.reader.read(), 5) == b""  # idle for 0.6 s
        await client.close()
        assert server.stats.timeouts == 2


async def test_trickling_bytes_buys_no_time_before_the_hello(dsn: str,
                                                          tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, TD, hello_timeout=0.5) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        hello = protocol.hello("p", "run", TD)
        sent = 0
        with contextlib.suppress(ConnectionError):
            for byte in hello[:15]:  # one byte every 0.2 s: 3 s, never a whole hello
                if reader.at_eof():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.2)
        writer.close()
        assert sent < 15  # closed while it trickled, about 0.5 s after connecting
        assert server.stats.timeouts == 1


async def test_connections_past_the_cap_are_closed_and_others_served(
        dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, TD, grace=0, max_connections=3) as server:
        held = [await Client.connect(server.address) for _ in range(3)]
        reader, writer = await asyncio.open_connection(*server.address)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert server.stats.caps_hit["max_connections"] == 1
        assert (await held[0].send(1, [trend_item([1.0])]))["type"] == "ack"
        for client in held:
            await client.close()
        await wait_until(lambda: not server._connections)
        client = await Client.connect(server.address)  # room again
        await client.close()


async def test_incomplete_frames_are_capped_over_all_connections(
        dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, TD, max_buffered_bytes=1024 * 1024) as server:
        client = await Client.connect(server.address)
        client.writer.write(struct.pack(">I", 8 * 1024 * 1024) + bytes(2 * 1024 * 1024))
        message = await client.receive()
        assert message["reason"] == "server_busy"
        assert message["retry"]
        assert not message["fatal"]
        assert await closed_by_server(client.reader)
        await client.close()
        assert server.stats.caps_hit["max_buffered_bytes"] == 1
        await wait_until(lambda: server.buffered_bytes == 0)


def _token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("s3cret-token\n")
    return path


# --- producers cannot be taken over ------------------------------------------------


async def _hello(address: tuple[str, int], producer: str,
                 key: str) -> tuple[Client, dict[str, Any]]:
    reader, writer = await asyncio.open_connection(*address)
    client = Client(reader, writer)
    writer.write(protocol.hello(producer, "run", TD, producer_key=key))
    return client, await client.receive()


async def test_a_producer_id_cannot_be_taken_over(dsn: str, tmp_path: Path) -> None:
    producer = uuid.uuid4().hex
    async with run_server(dsn, tmp_path, TD, grace=0) as server:
        owner, welcome = await _hello(server.address, producer, "key-of-the-owner")
        assert welcome["type"] == "welcome"
        assert (await owner.send(1, [trend_item([1.0])]))["type"] == "ack"
        thief, answer = await _hello(server.address, producer, "guessed")
        assert answer["type"] == "error"
        assert answer["reason"] == "producer_taken"
        await thief.close()
        # A huge seq, from the owner or from a fresh producer, is refused.
        assert (await owner.send(2**62, [trend_item([1.0])]))["reason"] == "bad_field"
        assert (await owner.send(2**40, [trend_item([1.0])]))["reason"] == "seq_jump"
        assert (await owner.send(2, [trend_item([2.0])]))["type"] == "ack"
        await owner.close()
    # The binding survives a restart (it is in the log).
    async with run_server(dsn, tmp_path, TD, grace=0) as server:
        thief, answer = await _hello(server.address, producer, "guessed")
        assert answer["reason"] == "producer_taken"
        await thief.close()
        owner, welcome = await _hello(server.address, producer, "key-of-the-owner")
        assert welcome["last_seq"] == 2
        await owner.close()
    rows = await fetch(dsn, "SELECT sum(count) AS n, sum(sum) AS total FROM trend_buckets")
    assert (rows[0]["n"], rows[0]["total"]) == (2, 3.0)


@pytest.mark.parametrize("role", [TD, NON_TD])
async def test_state_files_are_private(dsn: str, tmp_path: Path, role: str) -> None:
    async with run_server(dsn, tmp_path, role, grace=0):
        pass
    state = tmp_path / role
    assert state.stat().st_mode & 0o777 == 0o700
    files = [p for p in state.iterdir() if p.is_file()]
    assert files
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o600 for p in files}


async def test_a_forwarder_whose_samples_a_quarantined_row_holds_exits_3(
        dsn: str, tmp_path: Path) -> None:
    """A real k6-forward: the database refuses the row of one series for good; the
    server quarantines it and tells the forwarders whose samples it holds, which say so
    and exit 3 (not every sample read was stored). The other rows are stored."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 120)) + "Z"
    lines = ['{"type":"Metric","metric":"orders","data":{"name":"orders","type":"counter",'
             '"contains":"default"}}']
    for name, count in (("evil", 3), ("fine", 4)):
        lines += [f'{{"type":"Point","metric":"orders","data":{{"time":"{stamp}","value":1,'
                  f'"tags":{{"name":"{name}"}}}}}}'] * count
    stream = tmp_path / "stream.json"
    stream.write_text("\n".join(lines) + "\n")
    async with (run_server(dsn, tmp_path, TD, grace=0) as td,
                run_server(dsn, tmp_path, NON_TD, grace=0) as non_td):
        await fetch(dsn, "ALTER TABLE counter_buckets ADD CONSTRAINT no_evil "
                         "CHECK (tags->>'name' <> 'evil')")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "k6_forward", "--run-id", "quarantine", "--td",
            f"{td.address[0]}:{td.address[1]}", "--non-td",
            f"{non_td.address[0]}:{non_td.address[1]}", "--commit-timeout", "30",
            str(stream), stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(process.communicate(), 60)
        text = err.decode()
        assert process.returncode == 3, text
        assert non_td.stats.quarantined_buckets == 1
    assert "1 bucket rows holding samples of this forwarder are not stored (3 samples" in text
    assert "1 bucket rows holding some of them refused by the database" in text
    assert "not every sample read was stored" in text
    rows = await fetch(dsn, "SELECT tags->>'name' AS name, count FROM counter_buckets "
                            "WHERE run_id = 'quarantine'")
    assert {r["name"]: r["count"] for r in rows} == {"fine": 4}

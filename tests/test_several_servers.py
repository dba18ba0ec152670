"""Several servers per role (k6_forward/route.py): every forwarder sends a series to the
same server, a server unreachable past --failover-after has its series (and every frame
it had not said was stored) sent to the next one, and it gets them back when it returns;
a server whose disk is lost loses nothing; rows that two servers write stay exact. Real
k6, real forwarders and servers, one real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from common import digest, protocol
from common.harness import (
    ServerProcess,
    child_env,
    http_target,
    k6_pipeline,
    start_server,
)
from common.store import open_store
from k6_forward.link import ServerLink
from k6_forward.route import ServerGroup, rendezvous_order, series_of
from tests.test_e2e_k6 import check_two_generators


def _series(n: int) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    return [(f"metric_{i % 7}", (("name", f"https://example.test/{i}"), ("status", "200")))
            for i in range(n)]


def test_every_forwarder_routes_a_series_alike_and_the_series_spread() -> None:
    servers = ["10.0.0.1:7410", "10.0.0.2:7410", "10.0.0.3:7410"]
    series = _series(3000)
    owner = {s: servers[rendezvous_order(s, servers)[0]] for s in series}
    # The order a forwarder lists its servers in does not matter.
    listed = list(reversed(servers))
    assert all(listed[rendezvous_order(s, listed)[0]] == owner[s] for s in series)
    assert all(sorted(rendezvous_order(s, servers)) == [0, 1, 2] for s in series)
    shares = Counter(owner.values())
    assert all(800 <= shares[server] <= 1200 for server in servers), shares
    # Without the third server, only its series move.
    two = servers[:2]
    for s in series:
        if owner[s] != servers[2]:
            assert two[rendezvous_order(s, two)[0]] == owner[s]
    # An item's series is its metric and its tags, whatever their order.
    trend = protocol.trend_item(protocol.TrendPartial(
        "m", (("b", "2"), ("a", "1")), 0, 10, 1, 1.0, 1.0, 1.0,
        digest.from_values(np.array([1.0]))))
    counter = protocol.counter_item(protocol.CounterPartial(
        "m", "counter", (("a", "1"), ("b", "2")), 0, 10, 1.0, 1, 1, 1.0, 1.0, 0, 1.0))
    assert series_of(trend) == series_of(counter) == ("m", (("a", "1"), ("b", "2")))


async def test_partials_queued_for_a_server_that_never_answers_go_to_the_next(
        dsn: str, tmp_path: Path) -> None:
    """Partials routed to a server before it counted as failed over wait in its queue,
    unsent; when the group fails it over (with no new partials coming), they go to the
    other server, and wait_acked ends. Every sample arrives once."""
    absent = ("127.0.0.1", _closed_port())
    async with servers(dsn, tmp_path, "td_server", 1) as (present,):
        links = [ServerLink("td-server", address, "p-1", "queued", protocol.ROLE_TD,
                            1 << 20, spool_dir=tmp_path, spool_name=f"td.{i}")
                 for i, address in enumerate([present.address, absent])]
        group = ServerGroup("td-server", links, failover_after=0.5)
        group.start()
        try:
            values = np.arange(1.0, 101.0)
            bucket = int(time.time()) // 10 * 10 - 60
            items = [protocol.trend_item(protocol.TrendPartial(
                metric, tags, bucket, 10, len(values), float(values.sum()), 1.0,
                100.0, digest.from_values(values))) for metric, tags in _series(60)]
            await group.send_items(items)
            assert links[1].unacked_frames > 0  # some series are the absent server's
            await asyncio.wait_for(group.wait_acked(), 30)
            assert links[1].unacked_frames == 0
            assert not group.refused_items
        finally:
            await group.close()
    store = open_store(dsn)
    await store.open(connections=1)
    try:
        async with store.snapshot() as view:
            rows = [row async for row in view.rows("trend", "queued", None, None, {})]
    finally:
        await store.close()
    assert sorted((r.metric, tuple(sorted(r.tags.items()))) for r in rows) == sorted(
        _series(60))
    assert all(r.values.count == 100 for r in rows)  # type: ignore[union-attr]


def test_a_server_listed_twice_is_refused_before_anything_is_read() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "k6_forward", "--td", "127.0.0.1:7410,127.0.0.1:7410"],
        input=b'{"type":"Point"}\n', capture_output=True, timeout=60, env=child_env(),
        check=False)
    assert done.returncode == 2
    assert b"127.0.0.1:7410 is listed twice (entries 1 and 2)" in done.stderr
    assert b"flag --td" in done.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def servers(dsn: str, root: Path, module: str, count: int,
                  graces: tuple[str, ...] = ()) -> AsyncIterator[list[ServerProcess]]:
    """``count`` servers, server i with ``--grace graces[i]`` (default 1)."""
    started: list[ServerProcess] = []
    try:
        launched = await asyncio.gather(*(
            start_server(module, dsn, root / f"{module}-{i}", "--grace",
                         graces[i] if i < len(graces) else "1")
            for i in range(count)), return_exceptions=True)
        started += [s for s in launched if isinstance(s, ServerProcess)]
        for outcome in launched:
            if isinstance(outcome, BaseException):
                raise outcome
        yield started
    finally:
        for server in started:
            await server.stop()


async def writers_per_row(dsn: str, table: str, run_id: str) -> list[list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT array(SELECT jsonb_object_keys(writer_pos)) "
                                f"FROM {table} WHERE run_id = $1", run_id)
    finally:
        await conn.close()
    return [sorted(row[0]) for row in rows]


async def check(dsn: str, run_id: str, raws: list[Path]) -> dict[str, int]:
    store = open_store(dsn)
    await store.open(connections=1)
    try:
        return await check_two_generators(store, run_id, raws)
    finally:
        await store.close()


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_servers_of_a_role_share_the_series_of_two_generators(
        dsn: str, tmp_path: Path) -> None:
    """Two generators, three td-servers listed of which one never answers, and two
    non-td-servers. The forwarders say the third is unreachable and fail it over at
    once; every sample is stored exactly once, each row by one server (both forwarders
    chose the same one for every series), and every server that runs wrote rows."""
    absent = ("127.0.0.1", _closed_port())
    async with (
        http_target() as base,
        servers(dsn, tmp_path, "td_server", 2) as tds,
        servers(dsn, tmp_path, "non_td_server", 2) as non_tds,
    ):
        raws = [tmp_path / f"raw{i}.json" for i in range(2)]
        results = await asyncio.gather(*(
            k6_pipeline(base, raw, [tds[0].address, absent, tds[1].address],
                        [s.address for s in non_tds], "shared", "22s",
                        forwarder_args=("--failover-after", "1"))
            for raw in raws))
        for code, err in results:
            assert code == 0, err
            assert f"td-server {absent[0]}:{absent[1]}: cannot connect" in err, err
            assert "unreachable for" in err, err
    await check(dsn, "shared", raws)
    for table in ("trend_buckets", "counter_buckets"):
        writers = await writers_per_row(dsn, table, "shared")
        assert all(len(w) == 1 for w in writers), table
        assert len({w[0] for w in writers}) == 2, table


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_servers_fail_over_lose_their_disk_and_return(dsn: str, tmp_path: Path) -> None:
    """Two generators, three td-servers and two non-td-servers, 16 s into the run:

    - td-server 1 is killed (kill -9), its state directory kept; it comes back 9 s later
      on its address, with the same log identity;
    - td-server 2 and non-td-server 1 lose their machine: killed, their state
      directories deleted. Both wait 12 s past a bucket's end before writing it, so at
      16 s they hold frames they have acknowledged and not stored, wherever the bucket
      boundaries fall (a bucket's partials arrive at its end + 2 s). td-server 2 never
      returns; non-td-server 1 comes back 9 s later with an empty directory: a new
      writer.

    The forwarders fail over after 2 s, sending every frame a lost server had not said
    was stored to the next server, and go back to the returning ones. Every sample is
    stored exactly once, and the rows name only writers that ran."""
    async with (
        http_target() as base,
        servers(dsn, tmp_path, "td_server", 3, graces=("1", "1", "12")) as tds,
        servers(dsn, tmp_path, "non_td_server", 2, graces=("1", "12")) as non_tds,
    ):
        raws = [tmp_path / f"raw{i}.json" for i in range(2)]
        pipelines = asyncio.gather(*(
            k6_pipeline(base, raw, [s.address for s in tds], [s.address for s in non_tds],
                        "failover", "30s", forwarder_args=("--failover-after", "2"))
            for raw in raws))
        await asyncio.sleep(16)
        state = {module: [tmp_path / f"{module}-{i}" / module for i in range(3)]
                 for module in ("td_server", "non_td_server")}
        ids = {module: [(d / "log-id").read_text().strip() for d in dirs if d.exists()]
               for module, dirs in state.items()}
        killed, lost = tds[1], [tds[2], non_tds[1]]
        for server in (killed, *lost):
            server.kill()
            await server.close()
        for directory in (state["td_server"][2], state["non_td_server"][1]):
            shutil.rmtree(directory)
        await asyncio.sleep(9)
        tds[1] = await start_server("td_server", dsn, tmp_path / "td_server-1", "--grace",
                                    "1", listen=f"127.0.0.1:{killed.address[1]}")
        non_tds[1] = await start_server(
            "non_td_server", dsn, tmp_path / "non_td_server-1", "--grace", "12",
            listen=f"127.0.0.1:{lost[1].address[1]}")
        tds.pop()  # td-server 2 never returns
        returned = {"td_server": (state["td_server"][1] / "log-id").read_text().strip(),
                    "non_td_server": (state["non_td_server"][1] / "log-id").read_text().strip()}
        results = await pipelines
        for code, err in results:
            assert code == 0, err
            for server in (killed, *lost):
                name = f"{server.address[0]}:{server.address[1]}"
                moved = re.search(rf"{re.escape(name)}: unreachable for .* with the (\d+) "
                                  r"partials of the (\d+) frames it had not stored", err)
                assert moved is not None, err
                if server in lost:
                    assert int(moved[1]) > 0, err  # it held data it had not stored
            assert err.count("reachable again") >= 2, err
        logs = "\n".join([err for _, err in results]
                         + [s.log() for s in [*tds, *non_tds, killed, *lost]])
    try:
        figures = await check(dsn, "failover", raws)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs}") from None
    moved = [int(n) for n in re.findall(r"with the (\d+) partials of the \d+ frames it had "
                                        r"not stored", "\n".join(err for _, err in results))]
    print(f"failover and disk loss, all exact against k6's raw streams: {figures}; "
          f"partials moved from each failed-over server by each forwarder: {moved}")
    assert returned["td_server"] == ids["td_server"][1]  # killed: the same log
    assert returned["non_td_server"] not in ids["non_td_server"]  # wiped: a new one
    for module, table in (("td_server", "trend_buckets"), ("non_td_server", "counter_buckets")):
        writers = {w for row in await writers_per_row(dsn, table, "failover") for w in row}
        ran = {*ids[module], returned[module]}
        assert writers <= ran, module
        assert {ids[module][0], returned[module]} <= writers, module

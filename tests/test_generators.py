"""Generator frames: logged like data, stored as rows of `generators`, and marked written
only once every bucket that can hold the generator's data is in the database."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from common import digest, protocol
from tests.utils import Client, fetch, run_server, wait_until

NOW = int(time.time())


def trend_item(bucket: int) -> list[object]:
    values = np.array([1.0, 2.0])
    return ["m", {}, bucket, 10, 2, 3.0, 1.0, 2.0, digest.encode(digest.from_values(values)), 0]


async def send_generator(client: Client, g: protocol.Generator) -> dict[str, object]:
    client.writer.write(protocol.generator(g))
    return await client.receive()


async def test_generator_rows_and_their_written_mark(dsn: str, tmp_path: Path) -> None:
    bucket = (NOW - 30) // 10 * 10
    start = protocol.Generator(1, "start", NOW - 40.0, "gen-host", "v1.1.0", "s.js")
    end = protocol.Generator(3, "end", NOW - 1.0, exit_status=0,
                             first_ns=(bucket + 1) * 10**9, last_ns=(bucket + 9) * 10**9,
                             samples=2)
    async with run_server(dsn, tmp_path, grace=3600) as server:
        client = await Client.connect(server.address, producer="p1", run_id="gen")
        assert await send_generator(client, start) == {"type": "ack", "seq": 1}
        assert (await client.send(2, [trend_item(bucket)]))["type"] == "ack"
        assert await send_generator(client, end) == {"type": "ack", "seq": 3}
        assert await send_generator(client, end) == {"type": "ack", "seq": 3}  # a resend
        await client.close()

        async def written() -> bool:
            return bool(await fetch(dsn, "SELECT 1 FROM generators "
                                         "WHERE td_written_at IS NOT NULL"))

        # The run's only generator has ended: no more data can come, so its bucket is
        # written now, not after its hour of grace, and the generator is marked.
        await wait_until(written)
        assert (await fetch(dsn, "SELECT count FROM trend_buckets"))[0]["count"] == 2
    (row,) = await fetch(dsn, "SELECT * FROM generators")
    assert (row["run_id"], row["producer"], row["host"], row["k6_version"], row["script"],
            row["exit_status"], row["samples"]) == ("gen", "p1", "gen-host", "v1.1.0", "s.js",
                                                    0, 2)
    assert row["started_at"].timestamp() == NOW - 40.0
    assert row["first_sample"].timestamp() == bucket + 1
    assert row["last_sample"].timestamp() == bucket + 9
    assert row["td_written_at"] is not None
    assert row["non_td_written_at"] is None  # the other server never heard of it
    assert (await fetch(dsn, "SELECT count FROM trend_buckets"))[0]["count"] == 2


async def test_generator_frames_survive_kill_9_in_the_log(dsn: str, tmp_path: Path) -> None:
    start = protocol.Generator(1, "start", NOW - 5.0, "h")
    async with run_server(dsn, tmp_path, grace=3600, flush_interval=3600) as server:
        client = await Client.connect(server.address, producer="p2", run_id="gen")
        assert await send_generator(client, start) == {"type": "ack", "seq": 1}
        await client.close()
        server.generators.take_rows()  # as if the process died before writing them
    # The log replays the frame at the next start; the row appears.
    async with run_server(dsn, tmp_path, grace=0):
        pass
    (row,) = await fetch(dsn, "SELECT host, started_at FROM generators")
    assert (row["host"], row["started_at"].timestamp()) == ("h", NOW - 5.0)

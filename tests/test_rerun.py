"""A forwarder rerun on input its run already holds is refused, unless --append says the
second copy is wanted; other inputs of the same run (other generators) are welcome."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from common import protocol
from tests.faults import metric_lines, point_line
from tests.utils import fetch, run_server

NOW_NS = (int(time.time()) - 120) * 10**9


def write_input(path: Path, seed: int) -> Path:
    lines = [*metric_lines()]
    for i in range(400):
        ns = NOW_NS + i * 10_000_000 + seed
        lines += [point_line("http_reqs", ns, 1, {"name": "a"}),
                  point_line("http_req_duration", ns, float(i % 40) + seed, {"name": "a"})]
    path.write_text("\n".join(lines) + "\n")
    return path


async def forward(td: tuple[str, int], non_td: tuple[str, int], path: Path,
                  *extra: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "k6_forward", "--run-id", "rerun", "--td",
        f"127.0.0.1:{td[1]}", "--non-td", f"127.0.0.1:{non_td[1]}", *extra, str(path),
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, err.decode()


async def counts(dsn: str) -> tuple[int, int]:
    reqs = await fetch(dsn, "SELECT coalesce(sum(value), 0) AS n FROM counter_buckets "
                            "WHERE run_id = 'rerun'")
    trend = await fetch(dsn, "SELECT coalesce(sum(count), 0) AS n FROM trend_buckets "
                             "WHERE run_id = 'rerun'")
    return int(reqs[0]["n"]), int(trend[0]["n"])


async def test_a_rerun_is_refused_and_append_adds_it(dsn: str, tmp_path: Path) -> None:
    first = write_input(tmp_path / "first.json", 0)
    other = write_input(tmp_path / "other.json", 1)
    async with (
        run_server(dsn, tmp_path, protocol.ROLE_TD, grace=0) as td,
        run_server(dsn, tmp_path, protocol.ROLE_NON_TD, grace=0) as non_td,
    ):
        async def settled(expected: tuple[int, int]) -> None:
            for _ in range(200):
                if await counts(dsn) == expected:
                    return
                await asyncio.sleep(0.05)
            assert await counts(dsn) == expected

        code, err = await forward(td.address, non_td.address, first)
        assert code == 0, err
        await settled((400, 400))
        # The same file again: refused before anything is sent, and it says how to add it.
        code, err = await forward(td.address, non_td.address, first)
        assert code == 1, err
        assert "already holds this input" in err
        assert "--append" in err
        # Another generator's input joins the run.
        code, err = await forward(td.address, non_td.address, other)
        assert code == 0, err
        await settled((800, 800))
        # A deliberate second copy.
        code, err = await forward(td.address, non_td.address, first, "--append")
        assert code == 0, err
        await settled((1200, 1200))
    assert await counts(dsn) == (1200, 1200)

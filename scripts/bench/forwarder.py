"""1. k6-forward's throughput: scripts/bench_forwarder.py --json on this run's own k6
recording, run as it is (k6-forward against the orjson.loads parse-only ceiling)."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.bench.base import FORWARDER_TARGET, ROOT, SCRIPTS, Plan


@dataclass
class ForwarderResult:
    argv: list[str]
    # bench_forwarder.py's own JSON, kept whole (its rows, input, ratios), or None
    data: dict[str, Any] | None = None
    error: str | None = None

    @property
    def meets_target(self) -> bool | None:
        if self.data is None:
            return None
        return bool(self.data["worst_forwarder_ratio"] >= FORWARDER_TARGET)


async def run(plan: Plan, recording: Path) -> ForwarderResult:
    argv = [sys.executable, str(SCRIPTS / "bench_forwarder.py"), "--json", "--input",
            str(recording), *plan.forwarder_args]
    shown = ["scripts/bench_forwarder.py", *argv[2:]]
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), 600)
    except TimeoutError:
        process.kill()
        await process.wait()
        return ForwarderResult(shown, error="scripts/bench_forwarder.py did not finish "
                               "within 600 s")
    if process.returncode != 0:
        return ForwarderResult(shown, error=f"scripts/bench_forwarder.py exited "
                               f"{process.returncode}: {err.decode()[-1500:]}")
    try:
        data: dict[str, Any] = json.loads(out)
    except ValueError as exc:
        return ForwarderResult(shown, error=f"scripts/bench_forwarder.py --json printed no "
                               f"JSON: {exc}")
    return ForwarderResult(shown, data)

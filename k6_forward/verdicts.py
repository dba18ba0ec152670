"""The global verdicts the servers push, as one forwarder follows them. No I/O.

td-server judges the trend thresholds and non-td-server the others; each pushes its
latest verdicts after every write of the run's buckets, marked final once every
generator has ended and its buckets are written. An ``abortOnFail`` threshold that fails
past its ``delayAbortEval`` calls ``on_abort`` once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from td_report.thresholds import Threshold

EXIT_THRESHOLDS_FAILED = 99  # as k6 run


class GlobalVerdicts:
    def __init__(self, thresholds: Sequence[Threshold], strict: bool,
                 on_abort: Callable[[Threshold, dict[str, Any]], None],
                 started_at: float | None = None) -> None:
        self.thresholds = {t.text: t for t in thresholds}
        self.roles = {t.role for t in thresholds}
        self.strict = strict
        self.on_abort = on_abort
        self.started_at = time.time() if started_at is None else started_at
        self.results: dict[str, dict[str, Any]] = {}
        self.final: dict[str, bool] = {}
        self.aborted_by: Threshold | None = None
        self.aborted_at: float | None = None
        self.changed = asyncio.Event()
        self.gave_up = False  # interrupted while waiting for the final verdict

    def receive(self, role: str, message: dict[str, Any]) -> None:
        """A verdicts frame from the server of ``role``; unknown thresholds are ignored."""
        results = message.get("results")
        if not isinstance(results, list):
            return
        for result in results:
            if isinstance(result, dict) and result.get("threshold") in self.thresholds:
                self.results[result["threshold"]] = result
        self.final[role] = message.get("final") is True
        self.changed.set()
        self._check_abort()

    def ok(self, result: dict[str, Any]) -> bool:
        """The verdict that counts; with --strict-thresholds one too close to call fails."""
        return result.get("ok") is True and (result.get("decided") is True or not self.strict)

    def _check_abort(self) -> None:
        if self.aborted_by is not None:
            return
        elapsed = time.time() - self.started_at
        for text, threshold in self.thresholds.items():
            result = self.results.get(text)
            if (threshold.abort_on_fail and result is not None and not self.ok(result)
                    and elapsed >= threshold.delay_abort_eval):
                self.aborted_by = threshold
                self.aborted_at = time.time()
                self.on_abort(threshold, result)
                return

    @property
    def is_final(self) -> bool:
        return all(self.final.get(role) for role in self.roles)

    @property
    def failed(self) -> bool:
        return self.aborted_by is not None or any(
            not self.ok(r) for r in self.results.values())

    async def wait_final(self, limit: float) -> bool:
        """Wait until both servers' verdicts are final; False after ``limit`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while not self.is_final:
            if self.gave_up:
                return False
            self.changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def give_up(self) -> None:
        self.gave_up = True
        self.changed.set()

    def lines(self) -> list[str]:
        """One line per threshold: its global verdict and observed value."""
        state = "final" if self.is_final else "NOT FINAL (not every generator was done)"
        lines = [f"k6-forward: global thresholds over all generators ({state}):"]
        for text, threshold in sorted(self.thresholds.items()):
            result = self.results.get(text)
            if result is None:
                lines.append(f"  ?    {text}: no verdict received")
                continue
            mark = "ok  " if self.ok(result) else "FAIL"
            observed = result.get("observed")
            value = "-" if not isinstance(observed, int | float) else _number(observed)
            extra = []
            if result.get("samples"):
                extra.append(f"{result['samples']} samples")
            if result.get("note"):
                extra.append(str(result["note"]))
            if threshold is self.aborted_by:
                extra.append("abortOnFail: stopped the test")
            tail = f" ({'; '.join(extra)})" if extra else ""
            lines.append(f"  {mark} {text}: observed {value}{tail}")
        return lines


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.6g}"

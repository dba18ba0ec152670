"""Progress on stderr: a bar redrawn in place when stderr is a terminal, otherwise a
plain line every few seconds. Messages (the links' state changes, skipped lines) are
printed above the bar without garbling it."""

from __future__ import annotations

import io
import shutil
import sys
import time
from typing import IO


class Console:
    def __init__(self, stream: IO[str] | None = None, tty: bool | None = None,
                 plain_every: float = 5.0, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet  # no progress at all (messages still print)
        self.tty = self.stream.isatty() if tty is None else tty
        self.plain_every = plain_every
        self._bar = ""  # text of the bar currently drawn (tty only)
        self._last_plain = 0.0
        self._last_text = ""  # the last plain line, not printed twice in a row

    def message(self, text: str) -> None:
        if self._bar:
            self.stream.write("\r\x1b[K")
        self.stream.write(text.rstrip("\n") + "\n")
        if self._bar:
            self.stream.write(self._bar)
        self.stream.flush()

    def status(self, text: str, force: bool = False) -> None:
        """Redraw the bar (tty), or print the text as a line every ``plain_every``
        seconds (or when ``force``)."""
        if self.quiet:
            return
        if self.tty:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self._bar = text[:width]
            self.stream.write("\r\x1b[K" + self._bar)
            self.stream.flush()
            return
        now = time.monotonic()
        if text == self._last_text:
            return
        if force or now - self._last_plain >= self.plain_every:
            self._last_plain = now
            self._last_text = text
            self.stream.write(text + "\n")
            self.stream.flush()

    def finish(self) -> None:
        """Leave the last bar on its own line."""
        if self._bar:
            self.stream.write("\n")
            self.stream.flush()
            self._bar = ""


class ReportStream(io.StringIO):
    """A text stream for ``print(..., file=...)`` whose lines go to Console.message."""

    def __init__(self, console: Console, prefix: str) -> None:
        super().__init__()
        self.console = console
        self.prefix = prefix
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            self.console.message(self.prefix + line)
        return len(text)

    def flush(self) -> None:
        pass


def bar(fraction: float, width: int = 24) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(fraction * width)
    return "[" + "#" * full + "-" * (width - full) + "]"

"""The quarantine file: bucket rows the database refused for good, kept for a person.

A row that no retry can store (a value the database cannot hold, a constraint it
breaks) must neither block the rows behind it nor vanish. The server appends it here,
counts it in /metrics and logs it, and writes the rest.

``STATE_DIR/quarantine.msgpack`` is a stream of msgpack maps, one per refused row:
``time`` (epoch seconds), ``table``, ``run_id``, ``metric``, ``tags`` (map), ``bucket``
(epoch seconds), ``samples``, ``error`` and ``values`` (the row's value columns in the
table's order, or the repr of the state when they could not be computed). Read it with
``msgpack.Unpacker(open(path, "rb"), raw=False)``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import msgpack

QUARANTINE_FILE = "quarantine.msgpack"


class Quarantine:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append records durably; raises OSError (the caller keeps the rows queued)."""
        data = b"".join(msgpack.packb({"time": time.time(), **r}, use_bin_type=True,
                                      default=repr) for r in records)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # no half record in front of the next append
                raise
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            return list(msgpack.Unpacker(f, raw=False))

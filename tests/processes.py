"""Moved to common.harness; kept only for tests/test_timescaledb.py until it imports
common.harness itself. New code imports common.harness."""

from __future__ import annotations

from common.harness import (
    BIN,
    HERE,
    ServerProcess,
    http_target,
    k6_binary,
    k6_pipeline,
    server_process,
)

FIXTURES = HERE  # the k6 scripts
Proc = ServerProcess

__all__ = ["BIN", "FIXTURES", "Proc", "ServerProcess", "http_target", "k6_binary",
           "k6_pipeline", "server_process"]

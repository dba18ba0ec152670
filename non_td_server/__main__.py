"""non-td-server: sums k6 counters, rates and gauges per (series, bucket)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from common.cli import run_server
from common.config import NonTdServerConfig
from non_td_server.aggregator import CounterAggregator


def main(argv: Sequence[str] | None = None) -> int:
    return run_server(
        "non-td-server",
        "Accepts counter, gauge and rate partials from k6-forward, adds them up per "
        "(run, metric, tags, bucket) and writes them to the counter_buckets table.",
        CounterAggregator(), NonTdServerConfig, argv,
    )


if __name__ == "__main__":
    sys.exit(main())

"""td-server: merges k6 trend digests per (series, 10 s bucket) into trend_buckets."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from common.cli import run_server
from common.config import TdServerConfig
from td_server.aggregator import TrendAggregator


def main(argv: Sequence[str] | None = None) -> int:
    return run_server(
        "td-server",
        "Accepts t-digest partials of k6 trend metrics from k6-forward, merges them per "
        "(run, metric, tags, bucket) and writes count, sum, min, max, mean, p50/p90/p95/p99 "
        "and the merged digest to the trend_buckets table.",
        TrendAggregator(), TdServerConfig, argv,
    )


if __name__ == "__main__":
    sys.exit(main())

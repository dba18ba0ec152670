"""Percentiles over any set of trend rows in ClickHouse SQL: the same figures as td-report
(docs/CLICKHOUSE.md), on ClickHouse 18.16 and today's (chdb) alike.

The rows store their sketches decoded (``sketch_values``: each bucket's representative
value, the very doubles common/digest.py uses; ``sketch_counts``), so merging the rows of
a group is ``sumMap`` over them, with the exact zeros added as a bucket at 0. Then, as
td-report and numpy's linear method: n samples, rank h = q(n-1), k = floor(h); the
samples at ranks k and k+1 are the first buckets whose cumulative count exceeds k and
k+1 (rank 0 and n-1 are the exact min and max), interpolated and clamped to [min, max].
"""

from __future__ import annotations

# {table}: database.trend_buckets; {where}: the rows (without WHERE); {group}: the group's
# expression (a time bucket); {q}: the quantile, 0..1. Any filter on key columns (run_id,
# metric, bucket, tags, tag_keys, tag_values) is right with FINAL.
PERCENTILE_SQL = """
SELECT t, greatest(lo, least(hi, first + (h - k) * (second - first))) AS value
FROM (
    SELECT t, lo, hi, h, k,
        if(k <= 0, lo, if(k >= n - 1, hi, vals[arrayFirstIndex(e -> e > k, ends)])) AS first,
        if(k + 1 >= n - 1, hi, vals[arrayFirstIndex(e -> e > k + 1, ends)]) AS second
    FROM (
        SELECT t, lo, hi, m.1 AS vals, arrayCumSum(m.2) AS ends, arraySum(m.2) AS n,
            {q} * (n - 1) AS h, floor(h) AS k
        FROM (
            SELECT {group} AS t,
                sumMap(arrayConcat(sketch_values, [0.]),
                       arrayConcat(sketch_counts, [zeros])) AS m,
                min(min) AS lo, max(max) AS hi
            FROM {table} FINAL
            WHERE {where}
            GROUP BY t
        )
    )
)
ORDER BY t
"""


def percentile_sql(table: str, q: float, where: str, group: str = "0") -> str:
    """The query of quantile ``q`` of the rows ``where`` selects, per ``group``: rows of
    (group, value)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q!r} is outside [0, 1]")
    return PERCENTILE_SQL.format(table=table, q=repr(float(q)), where=where, group=group)

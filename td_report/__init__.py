"""td-report: query the stored digests and sums of a run; global thresholds; reports.

Modules: ``database`` (which database, the queries), ``summary`` (merging rows),
``query`` (a report from a selection), ``thresholds`` (k6 threshold syntax),
``render`` (table, JSON, CSV, k6 summary) and ``html`` (the self-contained HTML report).
"""

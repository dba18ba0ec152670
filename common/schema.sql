-- Idempotent schema; run under an advisory lock so both servers may start at once.
-- wal_pos is the servers' own bookkeeping: the last write-ahead-log position merged
-- into the row, so that a replay after a crash does not count a frame twice.
CREATE TABLE IF NOT EXISTS trend_buckets (
    bucket          timestamptz      NOT NULL,
    bucket_seconds  integer          NOT NULL,
    run_id          text             NOT NULL,
    metric          text             NOT NULL,
    tags            jsonb            NOT NULL DEFAULT '{}',
    count           bigint           NOT NULL,
    sum             double precision NOT NULL,
    min             double precision NOT NULL,
    max             double precision NOT NULL,
    mean            double precision NOT NULL,
    p50             double precision NOT NULL,
    p90             double precision NOT NULL,
    p95             double precision NOT NULL,
    p99             double precision NOT NULL,
    digest          bytea            NOT NULL,
    zeros           bigint           NOT NULL DEFAULT 0,
    wal_pos         bigint           NOT NULL DEFAULT 0,
    UNIQUE (run_id, metric, tags, bucket)
);
CREATE INDEX IF NOT EXISTS trend_buckets_run_metric_bucket
    ON trend_buckets (run_id, metric, bucket);

CREATE TABLE IF NOT EXISTS counter_buckets (
    bucket          timestamptz      NOT NULL,
    bucket_seconds  integer          NOT NULL,
    run_id          text             NOT NULL,
    metric          text             NOT NULL,
    metric_type     text             NOT NULL CHECK (metric_type IN ('counter', 'gauge', 'rate')),
    tags            jsonb            NOT NULL DEFAULT '{}',
    value           double precision NOT NULL,
    count           bigint           NOT NULL,
    nonzero         bigint           NOT NULL,
    min             double precision NOT NULL,
    max             double precision NOT NULL,
    state           jsonb,
    wal_pos         bigint           NOT NULL DEFAULT 0,
    UNIQUE (run_id, metric, tags, bucket)
);
CREATE INDEX IF NOT EXISTS counter_buckets_run_metric_bucket
    ON counter_buckets (run_id, metric, bucket);

-- Columns added after the first release of the schema: older tables gain them in place.
ALTER TABLE trend_buckets ADD COLUMN IF NOT EXISTS zeros bigint NOT NULL DEFAULT 0;
ALTER TABLE trend_buckets ADD COLUMN IF NOT EXISTS wal_pos bigint NOT NULL DEFAULT 0;
ALTER TABLE counter_buckets ADD COLUMN IF NOT EXISTS wal_pos bigint NOT NULL DEFAULT 0;

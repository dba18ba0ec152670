-- Idempotent schema; run under an advisory lock so both servers may start at once.
-- wal_pos is the servers' own bookkeeping: the last write-ahead-log position merged
-- into the row, so that a replay after a crash does not count a frame twice.
--
-- A row's key is (run_id, metric, bucket, tags_hash). tags_hash is the md5 of the tags'
-- canonical jsonb text, decode(md5(tags::text), 'hex'), always computed by PostgreSQL from
-- the jsonb (common/sink.py, TAGS_HASH) so that no client can compute it differently. The
-- tags themselves cannot be a key column: 32 tags of 256 characters, up to 4 bytes each,
-- overflow a btree entry (2704 bytes). run_id and metric are at most 200 characters, so the
-- key fits. Its column order also serves the readers' (run_id, metric, bucket range) scans.
CREATE TABLE IF NOT EXISTS trend_buckets (
    bucket          timestamptz      NOT NULL,
    bucket_seconds  integer          NOT NULL,
    run_id          text             NOT NULL,
    metric          text             NOT NULL,
    tags            jsonb            NOT NULL DEFAULT '{}',
    tags_hash       bytea            NOT NULL,
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
    sum_rest        double precision[]
);
-- sum is the exact sum of the samples correctly rounded; sum_rest what rounding left out
-- (NULL when nothing): sum + the terms of sum_rest is exact (common/exactsum.py).
ALTER TABLE trend_buckets ADD COLUMN IF NOT EXISTS sum_rest double precision[];

CREATE TABLE IF NOT EXISTS counter_buckets (
    bucket          timestamptz      NOT NULL,
    bucket_seconds  integer          NOT NULL,
    run_id          text             NOT NULL,
    metric          text             NOT NULL,
    metric_type     text             NOT NULL CHECK (metric_type IN ('counter', 'gauge', 'rate')),
    tags            jsonb            NOT NULL DEFAULT '{}',
    tags_hash       bytea            NOT NULL,
    value           double precision NOT NULL,
    count           bigint           NOT NULL,
    nonzero         bigint           NOT NULL,
    min             double precision NOT NULL,
    max             double precision NOT NULL,
    state           jsonb,
    wal_pos         bigint           NOT NULL DEFAULT 0
);

-- Columns added after the first release of the schema: older tables gain them in place.
ALTER TABLE trend_buckets ADD COLUMN IF NOT EXISTS zeros bigint NOT NULL DEFAULT 0;
ALTER TABLE trend_buckets ADD COLUMN IF NOT EXISTS wal_pos bigint NOT NULL DEFAULT 0;
ALTER TABLE counter_buckets ADD COLUMN IF NOT EXISTS wal_pos bigint NOT NULL DEFAULT 0;

-- Tables of a release keyed on (run_id, metric, tags, bucket): add tags_hash and fill it
-- from the rows' tags (once: only while the column is missing, so that a start does not
-- scan a large table), then key on it instead.
DO $$
DECLARE
    tbl text;
    old_key name;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['trend_buckets', 'counter_buckets'] LOOP
        IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = tbl::regclass
                       AND attname = 'tags_hash' AND NOT attisdropped) THEN
            EXECUTE format('ALTER TABLE %I ADD COLUMN tags_hash bytea', tbl);
            EXECUTE format('UPDATE %I SET tags_hash = decode(md5(tags::text), ''hex'')', tbl);
            EXECUTE format('ALTER TABLE %I ALTER COLUMN tags_hash SET NOT NULL', tbl);
        END IF;
        -- The old key: a unique constraint on exactly (run_id, metric, tags, bucket).
        FOR old_key IN
            SELECT c.conname FROM pg_constraint c
            WHERE c.conrelid = tbl::regclass AND c.contype = 'u'
              AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
                   FROM pg_attribute a
                   WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey))
                  = ARRAY['bucket', 'metric', 'run_id', 'tags']
        LOOP
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', tbl, old_key);
        END LOOP;
    END LOOP;
END
$$;

CREATE UNIQUE INDEX IF NOT EXISTS trend_buckets_key
    ON trend_buckets (run_id, metric, bucket, tags_hash);
CREATE UNIQUE INDEX IF NOT EXISTS counter_buckets_key
    ON counter_buckets (run_id, metric, bucket, tags_hash);
-- The key above serves the (run_id, metric, bucket) lookups these older indexes did.
DROP INDEX IF EXISTS trend_buckets_run_metric_bucket;
DROP INDEX IF EXISTS counter_buckets_run_metric_bucket;

-- What each forwarder read, per run and server role: a second forwarder that sends the
-- same input under the same run id is refused unless it asks to append (k6-forward
-- --append), so that a rerun does not double the run's counts.
CREATE TABLE IF NOT EXISTS run_inputs (
    run_id      text        NOT NULL,
    role        text        NOT NULL,
    input       text        NOT NULL,
    producer    text        NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, role, input)
);

-- One row per load generator (forwarder) of a run, written by both servers from the
-- forwarder's start and end frames: td-report lists them, takes the run's span from the
-- first and last sample for rates, and --wait waits until every generator has ended and
-- each server has written all of that generator's buckets.
CREATE TABLE IF NOT EXISTS generators (
    run_id             text        NOT NULL,
    producer           text        NOT NULL,
    host               text,
    k6_version         text,
    script             text,
    started_at         timestamptz,
    ended_at           timestamptz,
    exit_status        integer,
    first_sample       timestamptz,
    last_sample        timestamptz,
    samples            bigint,
    td_written_at      timestamptz,
    non_td_written_at  timestamptz,
    units              jsonb,
    PRIMARY KEY (run_id, producer)
);
-- units: {metric: "time" | "data"} as k6's Metric lines say ("contains"), so that a
-- report shows a custom time Trend in ms/s as k6 does.
ALTER TABLE generators ADD COLUMN IF NOT EXISTS units jsonb;

-- Every evaluation of a run's global thresholds, appended each time a server has written
-- buckets of the run: over all generators, cumulative from the run's start up to
-- `through` (the end of the latest stored bucket). td-server judges the trend methods,
-- non-td-server count, rate and value. `final`: every generator had ended and this
-- server had written all of their buckets. rank_low..rank_high: for a percentile, the
-- share of samples certainly below the bound and possibly at or below it.
CREATE TABLE IF NOT EXISTS threshold_evaluations (
    run_id         text             NOT NULL,
    role           text             NOT NULL,
    threshold      text             NOT NULL,
    evaluated_at   timestamptz      NOT NULL,
    through        timestamptz,
    final          boolean          NOT NULL,
    verdict        text             NOT NULL,
    ok             boolean          NOT NULL,
    decided        boolean          NOT NULL,
    observed       double precision,
    samples        bigint           NOT NULL,
    rank_low       double precision,
    rank_high      double precision,
    abort_on_fail  boolean          NOT NULL,
    note           text
);
CREATE INDEX IF NOT EXISTS threshold_evaluations_run
    ON threshold_evaluations (run_id, evaluated_at);

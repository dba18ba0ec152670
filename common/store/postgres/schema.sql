-- Idempotent schema; run under an advisory lock so both servers may start at once.
-- wal_pos and writer_pos are the servers' own bookkeeping: writer_pos maps each server's
-- log identity to the last write-ahead-log position of that server merged into the row,
-- so that neither a replay after a crash nor a retried write counts a frame twice, even
-- when several servers write the row; wal_pos is the highest of them. A row with an empty
-- writer_pos was written before servers had identities: its wal_pos is its writer's.
-- source_pos maps each stream a forwarder sends (a hash of its producer id and its name
-- for the server it sent to) to the highest frame seq of that stream merged into the row:
-- a frame sent again after its server was lost is not merged twice (docs/SCALING.md).
--
-- A row's key is (run_id, metric, bucket, tags_hash). tags_hash is the md5 of the tags'
-- canonical jsonb text, decode(md5(tags::text), 'hex'), always computed by PostgreSQL from
-- the jsonb (common/store/postgres/writer.py, TAGS_HASH) so that no client can compute it differently. The
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
    sum_rest        double precision[],
    writer_pos      jsonb            NOT NULL DEFAULT '{}',
    source_pos      jsonb            NOT NULL DEFAULT '{}'
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
    wal_pos         bigint           NOT NULL DEFAULT 0,
    writer_pos      jsonb            NOT NULL DEFAULT '{}',
    source_pos      jsonb            NOT NULL DEFAULT '{}'
);

-- Columns added after the first release of the schema: older tables gain them in place.
ALTER TABLE trend_buckets ADD COLUMN IF NOT EXISTS zeros bigint NOT NULL DEFAULT 0;
ALTER TABLE trend_buckets ADD COLUMN IF NOT EXISTS wal_pos bigint NOT NULL DEFAULT 0;
ALTER TABLE counter_buckets ADD COLUMN IF NOT EXISTS wal_pos bigint NOT NULL DEFAULT 0;
ALTER TABLE trend_buckets ADD COLUMN IF NOT EXISTS writer_pos jsonb NOT NULL DEFAULT '{}';
ALTER TABLE counter_buckets ADD COLUMN IF NOT EXISTS writer_pos jsonb NOT NULL DEFAULT '{}';
ALTER TABLE trend_buckets ADD COLUMN IF NOT EXISTS source_pos jsonb NOT NULL DEFAULT '{}';
ALTER TABLE counter_buckets ADD COLUMN IF NOT EXISTS source_pos jsonb NOT NULL DEFAULT '{}';

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

-- Percentiles over any set of trend rows, in SQL: the same figures as td-report (within
-- rounding, 1e-9 relative), from the stored sketches (common/digest.py), for a window,
-- a tag subset, a Grafana $__interval:
--   SELECT tdagg_percentile(0.95, array_agg(digest), sum(zeros), min(min), max(max))
--   FROM trend_buckets WHERE run_id = 'R' AND metric = 'http_req_duration' AND ...
-- NULL when a row holds a t-digest of an earlier release (td-report reads those).
CREATE OR REPLACE FUNCTION tdagg_u32(d bytea, o integer) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT get_byte(d, o)::bigint | (get_byte(d, o + 1)::bigint << 8)
         | (get_byte(d, o + 2)::bigint << 16) | (get_byte(d, o + 3)::bigint << 24)
$$;

-- The buckets of one sketch as (value, count): its header (magic d5 6b, version, flags,
-- negative and positive bucket counts, zeros), int32 indices, then uint32 counts (uint64
-- with flag bit 0). A bucket stands for its samples at 2 GAMMA^i / (GAMMA + 1).
CREATE OR REPLACE FUNCTION tdagg_sketch(d bytea) RETURNS TABLE (value float8, count float8)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    WITH f AS (  -- CASE, not WHERE: the planner may fold a constant's fields first
        SELECT length(d) >= 20 AND length(d) % 16 <> 0 AND get_byte(d, 0) = 213
               AND get_byte(d, 1) = 107 AS sketch
    ), h AS (
        SELECT CASE WHEN f.sketch THEN tdagg_u32(d, 4) END AS negative,
               CASE WHEN f.sketch THEN tdagg_u32(d, 8) END AS positive,
               CASE WHEN f.sketch THEN get_byte(d, 3) & 1 END AS wide
        FROM f WHERE f.sketch
    ), g AS (SELECT (1.0::float8 + 0.01) / (1.0::float8 - 0.01) AS gamma)
    SELECT CASE WHEN i < h.negative THEN -1.0 ELSE 1.0 END
             * exp(x.idx * ln(g.gamma) + ln(2.0 / (g.gamma + 1.0))),
           CASE WHEN h.wide = 1
                THEN (tdagg_u32(d, (20 + 4 * n + 8 * i)::integer)
                      + tdagg_u32(d, (24 + 4 * n + 8 * i)::integer) * 4294967296)::float8
                ELSE tdagg_u32(d, (20 + 4 * n + 4 * i)::integer)::float8 END
    FROM h, g, LATERAL (SELECT h.negative + h.positive AS n) AS t,
         generate_series(0::bigint, t.n - 1) AS i,
         LATERAL (SELECT tdagg_u32(d, (20 + 4 * i)::integer) AS raw) AS r,
         LATERAL (SELECT CASE WHEN r.raw >= 2147483648 THEN r.raw - 4294967296
                              ELSE r.raw END AS idx) AS x
$$;

-- Quantile q of the samples of several rows, as numpy and k6 define it: the samples at
-- ranks floor(q(n-1)) and the next, from their buckets (rank 0 and n-1 are the exact min
-- and max), interpolated, clamped to [lo, hi]. zeros: the rows' exact zero counts.
CREATE OR REPLACE FUNCTION tdagg_percentile(q float8, digests bytea[], zeros numeric,
                                            lo float8, hi float8) RETURNS float8
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    WITH b AS (
        SELECT s.value, sum(s.count) AS count
        FROM unnest(digests) AS d(digest), tdagg_sketch(d.digest) AS s
        GROUP BY s.value
        UNION ALL
        SELECT 0.0, zeros::float8 WHERE zeros > 0
    ), c AS (
        SELECT value, sum(count) OVER (ORDER BY value ROWS UNBOUNDED PRECEDING) AS ends
        FROM b
    ), r AS (
        SELECT n, q * (n - 1) AS h, floor(q * (n - 1)) AS k
        FROM (SELECT sum(count) AS n FROM b) AS t WHERE n > 0
    ), v AS (
        SELECT h, k,
               CASE WHEN k <= 0 THEN lo WHEN k >= n - 1 THEN hi
                    ELSE (SELECT value FROM c WHERE ends > k ORDER BY value LIMIT 1) END
                   AS first,
               CASE WHEN k + 1 >= n - 1 THEN hi
                    ELSE (SELECT value FROM c WHERE ends > k + 1 ORDER BY value LIMIT 1) END
                   AS second
        FROM r
    )
    SELECT CASE
        WHEN q IS NULL OR q < 0 OR q > 1 THEN NULL
        WHEN EXISTS (SELECT 1 FROM unnest(digests) AS d(digest)
                     WHERE length(d.digest) > 0 AND length(d.digest) % 16 = 0) THEN NULL
        ELSE (SELECT greatest(lo, least(hi, first + (h - k) * (second - first))) FROM v)
    END
$$;

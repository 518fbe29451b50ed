-- Job counts and recent completions kept as they change, so that `GET /v1/stats` (which
-- `pinq monitor` asks every second) reads a few rows instead of every retained job.
--
-- Triggers on `jobs`, one per statement, add each statement's changes to two small
-- tables:
--   * `job_tallies`: jobs per owner and state. The totals are the sum over `shard`.
--   * `job_finishes`: jobs that reached `succeeded` or `failed`, per second, owner and
--     submit-to-done latency bucket, for the last minutes' rates and percentiles.
-- Each statement's rows go to the shard of its own backend process (`pg_backend_pid()`),
-- and a backend runs one transaction at a time, so no two transactions ever write one
-- row: a busy claim or success never waits on another's tally, nor can two deadlock on
-- them. (Only the fold, a recount and a truncate of `jobs` write other sessions' rows.)
-- Once a minute the scheduler folds the rows of backends that have exited into shard 0,
-- which only the fold and a recount write, and deletes finishes older than two minutes
-- (`pinq_fold_job_tallies`), so `job_tallies` stays about as small as the number of
-- connections times owners and states, and `job_finishes` holds two or three minutes of
-- rows.
--
-- If the tallies ever disagree with the jobs (say after a data-only restore, whose COPY
-- into `jobs` fires the insert trigger on top of the restored tallies),
-- `SELECT pinq_recount_job_tallies()` counts them again.

CREATE TABLE job_tallies (
    owner   text NOT NULL,
    state   text NOT NULL,
    -- The backend process that wrote the change; 0 holds what has been folded.
    shard   integer NOT NULL,
    n       bigint NOT NULL,
    PRIMARY KEY (owner, state, shard)
);

CREATE TABLE job_finishes (
    -- `finished_at` truncated to the second.
    second  timestamptz NOT NULL,
    owner   text NOT NULL,
    state   text NOT NULL CHECK (state IN ('succeeded', 'failed')),
    -- Submit-to-done latency (`finished_at - created_at`) bucket: bucket b holds
    -- latencies from 2^(b/8) up to 2^((b+1)/8) milliseconds, each about 9 % wide.
    bucket  smallint NOT NULL,
    shard   integer NOT NULL,
    n       bigint NOT NULL,
    -- The longest latency in the row, in milliseconds.
    max_ms  double precision NOT NULL,
    PRIMARY KEY (second, owner, state, bucket, shard)
);

-- The latency bucket of a finished job, in milliseconds (see `job_finishes.bucket`).
CREATE FUNCTION pinq_latency_bucket(ms double precision) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT floor(8 * ln(least(greatest(ms, 0.001), 1e12)) / ln(2))::smallint
$$;

CREATE FUNCTION pinq_tally_inserted_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_tallies AS t (owner, state, shard, n)
    SELECT owner, state, pg_backend_pid(), count(*) FROM added
    GROUP BY owner, state
    ON CONFLICT (owner, state, shard) DO UPDATE SET n = t.n + excluded.n;
    RETURN NULL;
END
$$;

-- An update's changes: each row's state before counts -1, after +1, so an update that
-- changes no state adds nothing to the tallies. A finish is a row that is `succeeded` or
-- `failed` after the update and was not, or finished at another time, before it.
-- One statement for both tables.
CREATE FUNCTION pinq_tally_updated_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH tallied AS (
        INSERT INTO job_tallies AS t (owner, state, shard, n)
        SELECT owner, state, pg_backend_pid(), sum(d)
        FROM (SELECT owner, state, -1 AS d FROM old_rows
              UNION ALL
              SELECT owner, state, 1 FROM new_rows) c
        GROUP BY owner, state HAVING sum(d) <> 0
        ON CONFLICT (owner, state, shard) DO UPDATE SET n = t.n + excluded.n
    )
    INSERT INTO job_finishes AS f (second, owner, state, bucket, shard, n, max_ms)
    SELECT date_trunc('second', finished_at), owner, state, pinq_latency_bucket(ms),
           pg_backend_pid(), count(*), max(ms)
    FROM (SELECT a.owner, a.state, a.finished_at,
                 extract(epoch FROM a.finished_at - a.created_at)::float8 * 1000 AS ms
          FROM new_rows a JOIN old_rows b ON b.id = a.id
          WHERE a.state IN ('succeeded', 'failed') AND a.finished_at IS NOT NULL
            AND (b.state IS DISTINCT FROM a.state
                 OR b.finished_at IS DISTINCT FROM a.finished_at)) x
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (second, owner, state, bucket, shard)
    DO UPDATE SET n = f.n + excluded.n, max_ms = greatest(f.max_ms, excluded.max_ms);
    RETURN NULL;
END
$$;

CREATE FUNCTION pinq_tally_deleted_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_tallies AS t (owner, state, shard, n)
    SELECT owner, state, pg_backend_pid(), -count(*) FROM gone
    GROUP BY owner, state
    ON CONFLICT (owner, state, shard) DO UPDATE SET n = t.n + excluded.n;
    RETURN NULL;
END
$$;

CREATE FUNCTION pinq_tally_truncated_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_tallies;
    DELETE FROM job_finishes;
    RETURN NULL;
END
$$;

-- Folds the tallies of backends that have exited into shard 0 and deletes finishes older
-- than two minutes (only the last 60 s are read). A backend that exits between the look at
-- `pg_stat_activity` and the delete keeps its row until the next fold; a new backend that
-- is given the pid of one being folded waits for the fold's row lock, then writes a row of
-- its own (a writer in REPEATABLE READ would instead fail to serialize and retry; pinq's
-- writers of jobs run in READ COMMITTED).
CREATE FUNCTION pinq_fold_job_tallies() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    folded bigint;
BEGIN
    WITH gone AS (
        DELETE FROM job_tallies t
        WHERE t.shard <> 0
          AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = t.shard)
        RETURNING owner, state, n
    ), summed AS (
        INSERT INTO job_tallies AS t (owner, state, shard, n)
        SELECT owner, state, 0, sum(n) FROM gone
        GROUP BY owner, state ORDER BY owner, state
        ON CONFLICT (owner, state, shard) DO UPDATE SET n = t.n + excluded.n
        RETURNING 1
    )
    SELECT count(*) INTO folded FROM gone;
    DELETE FROM job_tallies WHERE shard = 0 AND n = 0;
    DELETE FROM job_finishes WHERE second < now() - interval '2 minutes';
    RETURN folded;
END
$$;

-- Counts the tallies again from the jobs, under a lock that keeps writers of `jobs` out
-- meanwhile. Returns the number of jobs.
CREATE FUNCTION pinq_recount_job_tallies() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    total bigint;
BEGIN
    LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM job_tallies;
    INSERT INTO job_tallies (owner, state, shard, n)
    SELECT owner, state, 0, count(*) FROM jobs GROUP BY owner, state;
    SELECT coalesce(sum(n), 0) INTO total FROM job_tallies;
    RETURN total;
END
$$;

-- The starting tallies and the last two minutes' finishes, read under a lock that keeps
-- writers of `jobs` out until the triggers are in place.
LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;

INSERT INTO job_tallies (owner, state, shard, n)
SELECT owner, state, 0, count(*) FROM jobs GROUP BY owner, state;

INSERT INTO job_finishes (second, owner, state, bucket, shard, n, max_ms)
SELECT date_trunc('second', finished_at), owner, state, pinq_latency_bucket(ms), 0,
       count(*), max(ms)
FROM (SELECT finished_at, owner, state,
             extract(epoch FROM finished_at - created_at)::float8 * 1000 AS ms
      FROM jobs
      WHERE state IN ('succeeded', 'failed')
        AND finished_at >= now() - interval '2 minutes') f
GROUP BY 1, 2, 3, 4;

CREATE TRIGGER jobs_tally_insert
    AFTER INSERT ON jobs REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION pinq_tally_inserted_jobs();
CREATE TRIGGER jobs_tally_update
    AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pinq_tally_updated_jobs();
CREATE TRIGGER jobs_tally_delete
    AFTER DELETE ON jobs REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION pinq_tally_deleted_jobs();
CREATE TRIGGER jobs_tally_truncate
    AFTER TRUNCATE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION pinq_tally_truncated_jobs();

-- Dispatch debt moves from a column of every job to an outbox of a row per group of jobs,
-- and attempt records are written once, when the attempt ends.
--
-- Before: each job carried `dispatched_at`, NULL until the broker confirmed its message, so
-- every job was updated once more after its insert (a new row version and an entry in
-- every index of `jobs`) only to say "published". Now whoever commits jobs as `queued`
-- writes, in the same transaction, one `dispatch_outbox` row naming them; once their
-- messages are confirmed the row is deleted. An entry left behind (the publisher died, the
-- broker was down) is published by the scheduler's relay. One 10,000-job batch costs one
-- small row instead of 10,000 job updates.

CREATE TABLE dispatch_outbox (
    id              bigserial PRIMARY KEY,
    -- Jobs committed `queued` whose messages are still owed to the broker. The relay
    -- publishes those that are still `queued` when it gets to the entry.
    job_ids         uuid[] NOT NULL,
    -- True when the process that wrote the entry publishes it itself right after its
    -- commit (the API): the relay leaves it alone for its grace period. False when nobody
    -- else will (a worker handing a job back, the relay's own requeues, repair jobs).
    self_publishing boolean NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Whatever was still owed under the old scheme is owed under the new one.
INSERT INTO dispatch_outbox (job_ids, self_publishing)
SELECT array_agg(id ORDER BY id), false FROM jobs
WHERE state = 'queued' AND dispatched_at IS NULL
HAVING count(*) > 0;

DROP INDEX jobs_undispatched;
ALTER TABLE jobs DROP COLUMN dispatched_at;

-- The relay's safety net: queued jobs that have not started long after their message was
-- published (say the queue was purged) are published again. `updated_at` of a queued job
-- is when it became queued or was last republished.
--
-- No partial index of `jobs` has a predicate that the claim's or the completer's filter
-- (`state = 'queued'`, `state = 'running'`) implies on its own. Under statistics that lag
-- behind the queue (a burst of jobs after an ANALYZE that saw an empty queue) the planner
-- would otherwise take such an index for a small one and scan the whole queue for every
-- claim: that was measured at 25 ms a claim with 100,000 jobs queued, against 0.3 ms
-- through the primary key. The extra conjuncts below hold for every row the predicates
-- are meant to cover (a queued job never has a cancel request pending; only a running
-- job has a lease), so the indexes cover the same rows as before.
CREATE INDEX jobs_queued_since ON jobs (updated_at) WHERE state = 'queued' AND NOT cancel_requested;
DROP INDEX jobs_lease;
CREATE INDEX jobs_lease ON jobs (lease_until) WHERE lease_until IS NOT NULL;
DROP INDEX jobs_lease_owner;
CREATE INDEX jobs_lease_owner ON jobs (lease_owner) WHERE lease_owner IS NOT NULL;

-- Attempt records are written when the attempt ends (or is found lost), not opened at the
-- claim and closed later: a running attempt is read from its job's row. Attempts opened
-- under the old scheme stay valid; the writers update them in place.

-- Jobs reference their batch and backend without foreign keys. The checks cost a lookup
-- and a row lock per inserted job, about 40 % of the time of a 10,000-job insert, for
-- guarantees the writers give anyway: a batch and its jobs are inserted in one
-- transaction, only empty batches are ever deleted (retention), and every writer of jobs
-- first calls pinq_lock_backends, which takes the same key-share lock the foreign key
-- took, once per backend instead of once per job, so a backend cannot be deleted while
-- jobs for it are being inserted (the deletion waits, then sees them and refuses).
ALTER TABLE jobs DROP CONSTRAINT jobs_batch_id_fkey;
ALTER TABLE jobs DROP CONSTRAINT jobs_backend_id_fkey;

CREATE FUNCTION pinq_lock_backends(ids uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    found integer;
    wanted integer;
BEGIN
    SELECT count(DISTINCT x) INTO wanted FROM unnest(ids) AS x;
    PERFORM 1 FROM backends WHERE id = ANY(ids) FOR KEY SHARE;
    GET DIAGNOSTICS found = ROW_COUNT;
    IF found < wanted THEN
        RAISE EXCEPTION 'a backend of these jobs no longer exists'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
END;
$$;

-- Batch progress is counted through jobs_batch_seq (batch_id leads it); a second index on
-- (batch_id, state) cost an index entry for every row version of every job.
DROP INDEX jobs_batch_state;

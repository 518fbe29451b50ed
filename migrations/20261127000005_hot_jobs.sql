-- Claims and successes update a job's row in place (heap-only tuple updates), without a
-- new entry in any index of `jobs`.
--
-- PostgreSQL can keep an updated row version on its page and skip every index (a HOT
-- update) only if no column that an index names, in its key or in its predicate, changes
-- value, and the page has room. Until now a claim changed `state`, `lease_owner` and
-- `lease_until`, and a success `state` and `updated_at`, all named by partial indexes of
-- the relay's scans and of retention; so each of the two updates of every job added an
-- entry to every index of `jobs` whose predicate the new row matched (five or six of
-- them). Measured with the claim and success statements replayed by pgbench on 100,000
-- jobs (32 jobs a statement, 4 clients, a 2-vCPU machine; bench/hot-replay/run.sh):
-- 11,800–14,300 jobs/s before, 17,200–19,100 jobs/s without those indexes.
--
-- What the dropped indexes served now comes from columns the hot path leaves alone, or
-- from small tables of their own:
--   * leases live in `job_claims`, a row per claim (one message's jobs), not per job;
--   * a retry's due time is `retry_at`, set only while the job waits to retry;
--   * the safety net for lost messages reads the dispatch outbox, whose entries are now
--     kept (marked published) until they are checked;
--   * retention finds old jobs through their batches.

-- One row per claim: the worker that holds it and until when. The worker extends the
-- lease of its claims (one row for up to a message's worth of jobs, instead of every
-- job's row); the relay takes back the running jobs of a claim whose lease ran out, and
-- deletes claims whose jobs have all finished once their lease runs out.
CREATE TABLE job_claims (
    id              bigserial PRIMARY KEY,
    worker_id       uuid NOT NULL,
    job_ids         uuid[] NOT NULL,
    lease_until     timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_claims_lease ON job_claims (lease_until);
CREATE INDEX job_claims_worker ON job_claims (worker_id);

-- The claim a running job belongs to. A job claimed again later belongs to its new claim,
-- so an old claim's expiry never touches it.
ALTER TABLE jobs ADD COLUMN claim_id bigint;
-- When a job waiting to retry is due; NULL in every other state. Set when an attempt ends
-- in a retry (or a deferral), cleared when the job leaves `retry_wait`.
ALTER TABLE jobs ADD COLUMN retry_at timestamptz;

-- Jobs running now keep their leases: one claim each.
WITH c AS (
    INSERT INTO job_claims (worker_id, job_ids, lease_until)
    SELECT lease_owner, ARRAY[id], coalesce(lease_until, now())
    FROM jobs WHERE state = 'running'
    RETURNING id, job_ids[1] AS job_id
)
UPDATE jobs j SET claim_id = c.id FROM c WHERE j.id = c.job_id;
UPDATE jobs SET retry_at = run_at WHERE state = 'retry_wait';

DROP INDEX jobs_lease;
DROP INDEX jobs_lease_owner;
DROP INDEX jobs_queued_since;
DROP INDEX jobs_finished_age;
DROP INDEX jobs_retry_due;
ALTER TABLE jobs DROP COLUMN lease_until;

-- Neither a claim nor a success changes `retry_at` (it is NULL before and after).
CREATE INDEX jobs_retry_due ON jobs (retry_at) WHERE retry_at IS NOT NULL;

-- Room on each page for the updated versions of a job's row; pruning reclaims the dead
-- versions when the page fills. (Against 100 and 70 the replayed statements gained within
-- their noise; the table was 10 % larger.)
ALTER TABLE jobs SET (fillfactor = 50);

-- Outbox entries are kept once published, with the time they were; the relay checks an
-- entry `PINQ_REDISPATCH_AFTER_SECS` after that: jobs of it still queued are owed again
-- (their message may have been lost), and an entry none of whose jobs is still queued is
-- deleted.
ALTER TABLE dispatch_outbox ADD COLUMN published_at timestamptz;
CREATE INDEX dispatch_outbox_owed ON dispatch_outbox (id) WHERE published_at IS NULL;
CREATE INDEX dispatch_outbox_published ON dispatch_outbox (published_at)
    WHERE published_at IS NOT NULL;

-- Retention walks batches by age and deletes their finished jobs.
CREATE INDEX batches_created ON batches (created_at);

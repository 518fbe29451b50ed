-- Jobs on one CID and one backend run one at a time, in the order they were submitted.
--
-- Without this, a pin and a later unpin of the same CID (a batch that pins and then
-- unpins, a Pinning Service API delete followed at once by a re-add, a replace and a pin
-- of the CID it replaces) could be claimed by two workers at once and reach the node in
-- either order: the node could end with the CID unpinned while the newer request reports
-- it pinned, and the pin index could disagree with the node.
--
-- A claim now leaves out every job that has an earlier job on the same key (backend, and
-- the canonical form of either CID it touches) that has not ended, or any job on that key
-- running now. Such a job is parked: `retry_wait` with no `retry_at`, and `blocked_by`
-- naming the job it waits for. The relay requeues a parked job once that job has ended;
-- if another is still ahead, the next claim parks it again behind that one.

-- Submission order. A sequence without a per-session cache, so that a job inserted after
-- another committed always gets a larger number. (A UUIDv7 carries the clock of the API
-- process that made it, and two API hosts' clocks may disagree.)
CREATE SEQUENCE jobs_submit_seq AS bigint;

ALTER TABLE jobs
    ADD COLUMN submit_seq bigint,
    -- The canonical form (CIDv1, base32) of `cid` and of `replaces_cid`, so that two
    -- spellings of one CID share a key.
    ADD COLUMN cid_key text,
    ADD COLUMN replaces_key text,
    -- While parked: the job this one waits for.
    ADD COLUMN blocked_by uuid;

-- Existing jobs keep their creation order. Their keys are their CIDs as submitted (a
-- CIDv0 and its CIDv1 form are told apart for these jobs only): SQL cannot decode base58.
UPDATE jobs j
SET submit_seq = o.n, cid_key = j.cid, replaces_key = j.replaces_cid
FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS n FROM jobs) o
WHERE j.id = o.id;
SELECT setval('jobs_submit_seq', (SELECT coalesce(max(submit_seq), 0) + 1 FROM jobs), false);

ALTER TABLE jobs
    ALTER COLUMN submit_seq SET DEFAULT nextval('jobs_submit_seq'),
    ALTER COLUMN submit_seq SET NOT NULL,
    ALTER COLUMN cid_key SET NOT NULL;
ALTER SEQUENCE jobs_submit_seq OWNED BY jobs.submit_seq;

-- The claim's look-up of the jobs on a key; also the job list's CID filter, which now
-- finds every spelling of a CID. It replaces the index on the CID as submitted. None of
-- these columns changes after insert, so claims and successes stay heap-only updates.
DROP INDEX jobs_cid;
CREATE INDEX jobs_cid_key ON jobs (cid_key, backend_id);
CREATE INDEX jobs_replaces_key ON jobs (replaces_key, backend_id) WHERE replaces_key IS NOT NULL;
-- The relay's scan of parked jobs. Only parking and requeueing change `blocked_by`.
CREATE INDEX jobs_blocked ON jobs (blocked_by) WHERE blocked_by IS NOT NULL;

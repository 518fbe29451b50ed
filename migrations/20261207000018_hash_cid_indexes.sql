-- The indexes on CIDs are hash indexes.
--
-- `jobs_cid_key` gets an entry for every job at ingest, and `pins_cid` one for every pin a
-- success adds to the index. CIDs are long (59 characters for a CIDv1 in base32) and, to
-- a B-tree, random: each insert compared its key with others at every level on its way
-- down to a leaf anywhere in the index. A hash index compares 4-byte hash codes and stores
-- one per entry (crash-safe and replicated since PostgreSQL 10). Every query on these columns asks for equality (the claim's jobs on a key, the
-- unpin's pin-index row, the job and pin lists' CID filter, the index update's scans), which
-- is all a hash index answers; none reads them in CID order.
--
-- Measured with bench/cid-index-replay/run.sh (200,000 jobs with random CIDs inserted
-- 10,000 a statement by 4 clients, 2 vCPU): 85,000–94,000 jobs/s with the hash index
-- against 69,000–83,000 with the B-tree on `(cid_key, backend_id)`, taking turns
-- (docs/performance.md). The claim's look-up filters the backend on the job's row
-- instead of in the index: a CID on several backends costs a row per backend.
--
-- Writes to `jobs` and `pins` wait while the two indexes are built, as for any index this
-- schema has added.
DROP INDEX jobs_cid_key;
CREATE INDEX jobs_cid_key ON jobs USING hash (cid_key);

DROP INDEX pins_cid;
CREATE INDEX pins_cid ON pins USING hash (cid);

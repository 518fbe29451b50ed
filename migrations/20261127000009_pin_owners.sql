-- The pin index counts a reference per owner.
--
-- Until now a pin index row had one owner, the first tenant to pin the content. A second
-- tenant's pin of the same content (through `/v1/batches`) succeeded on the node but left
-- no trace in the index, so the first owner's unpin removed the content for both, and the
-- second owner could not see or unpin what it had pinned.
--
-- Every owner that pinned the content on the backend and has not unpinned it holds a
-- reference: `owner` (the first, whose `name` and `job_id` the row shows) and `others`,
-- NULL while there is no other, which is almost always: a pin's row is no wider than
-- before. A pin adds its owner; an unpin removes its owner's reference, and calls the
-- node only when no other owner holds one (the worker reads that when it claims the job;
-- jobs on one CID and backend run one at a time, so it cannot change while the job runs).
-- (A list of every owner written with each new pin measured the same: the success
-- statement replayed with pgbench and the end-to-end benchmark could not tell either from
-- the schema before, within their noise; docs/performance.md.)
ALTER TABLE pins ADD COLUMN others text[];

-- An unpin (or a replace's unpin of the old CID) that removes the pin for every owner,
-- not only its own owner's reference: an admin's. Set at submission, read by the claim.
-- No index names it, so claims and successes still update rows in place.
ALTER TABLE jobs ADD COLUMN unpin_all boolean NOT NULL DEFAULT false;
-- Unpins submitted before this migration and not yet run keep the meaning they were
-- submitted with: every unpin then removed the pin for everyone.
UPDATE jobs SET unpin_all = true
WHERE op <> 'pin' AND state IN ('queued', 'running', 'retry_wait');

-- The pin index counts a reference per owner.
--
-- Until now a pin index row had one owner, the first tenant to pin the content. A second
-- tenant's pin of the same content (through `/v1/batches`) succeeded on the node but left
-- no trace in the index, so the first owner's unpin removed the content for both, and the
-- second owner could not see or unpin what it had pinned.
--
-- `owners` holds every owner that pinned the content on the backend and has not unpinned
-- it. A pin adds its owner; an unpin removes its owner's reference, and calls the node
-- only when no other owner holds one (the worker reads that when it claims the job; jobs
-- on one CID and backend run one at a time, so it cannot change while the job runs).
-- `owner`, `name` and `job_id` stay those of the row's first live reference.
ALTER TABLE pins ADD COLUMN owners text[] NOT NULL DEFAULT '{}';
UPDATE pins SET owners = ARRAY[owner] WHERE owner IS NOT NULL;

-- An unpin (or a replace's unpin of the old CID) that removes the pin for every owner,
-- not only its own owner's reference: an admin's. Set at submission, read by the claim.
-- No index names it, so claims and successes still update rows in place.
ALTER TABLE jobs ADD COLUMN unpin_all boolean NOT NULL DEFAULT false;
-- Unpins submitted before this migration and not yet run keep the meaning they were
-- submitted with: every unpin then removed the pin for everyone.
UPDATE jobs SET unpin_all = true
WHERE op <> 'pin' AND state IN ('queued', 'running', 'retry_wait');

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
ALTER TABLE pins ADD COLUMN others text[];

-- The references the old index did not record, so that no unpin after this migration
-- removes content another tenant still holds: the owners of live Pinning Service API
-- requests for the CID on the backend (their deletes used to count every tenant's
-- requests; they now count only their own owner's), and the owners of retained
-- successful pins and replaces of it that no successful unpin or replace of it finished
-- after (until now every such removal unpinned the content from the node, whoever asked
-- for it). Counting one too many only keeps the content pinned longer.
UPDATE pins p
SET others = nullif(array_remove(s.holders, p.owner), '{}')
FROM (
    SELECT backend_id, cid, array_agg(DISTINCT holder ORDER BY holder) AS holders
    FROM (
        SELECT x.backend_id, x.cid, r.owner AS holder
        FROM pins x
        JOIN backends b ON b.id = x.backend_id
        JOIN pin_requests r ON r.cid_canonical = x.cid AND b.name = ANY (r.backends)
        WHERE r.deleted_at IS NULL
        UNION ALL
        SELECT x.backend_id, x.cid, j.owner
        FROM pins x
        JOIN jobs j ON j.backend_id = x.backend_id AND j.cid_key = x.cid
        WHERE j.op IN ('pin', 'replace') AND j.state = 'succeeded'
          AND NOT EXISTS (
              SELECT 1 FROM jobs u
              WHERE u.op = 'unpin' AND u.cid_key = x.cid AND u.backend_id = x.backend_id
                AND u.state = 'succeeded' AND u.finished_at > j.finished_at)
          AND NOT EXISTS (
              SELECT 1 FROM jobs u
              WHERE u.op = 'replace' AND u.replaces_key = x.cid
                AND u.backend_id = x.backend_id
                AND u.state = 'succeeded' AND u.finished_at > j.finished_at)
    ) refs
    GROUP BY backend_id, cid
) s
WHERE p.backend_id = s.backend_id AND p.cid = s.cid AND p.owner IS NOT NULL;

-- An unpin (or a replace's unpin of the old CID) that removes the pin for every owner,
-- not only its own owner's reference: an admin's. Set at submission, read by the claim.
-- No index names it, so claims and successes still update rows in place.
ALTER TABLE jobs ADD COLUMN unpin_all boolean NOT NULL DEFAULT false;
-- Unpins submitted before this migration that may still run (failed ones can be
-- re-driven), by an owner that holds no reference to what they remove, keep the meaning
-- they were submitted with: every unpin then removed the pin for everyone. A user token
-- could unpin only its owner's pins, so these are an admin's (or remove what the index
-- does not hold). One whose owner holds a reference now removes only that.
UPDATE jobs j SET unpin_all = true
WHERE j.op <> 'pin' AND j.state IN ('queued', 'running', 'retry_wait', 'failed')
  AND NOT EXISTS (
      SELECT 1 FROM pins p
      WHERE p.backend_id = j.backend_id
        AND p.cid = CASE WHEN j.op = 'unpin' THEN j.cid_key ELSE j.replaces_key END
        AND (p.owner = j.owner OR j.owner = ANY (p.others)));

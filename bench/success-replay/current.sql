-- The shape of the worker's success statement today (`db::finish_succeeded` without its
-- release and delete CTEs, which a group of pins does not reach): 32 running jobs locked in
-- id order, marked succeeded by their worker, and their pin-index upserts.
WITH r AS (SELECT (nextval('succ_seq') - 1) * 32 AS lo),
locked AS (SELECT j.id FROM jobs j, r WHERE j.seq > r.lo AND j.seq <= r.lo + 32 AND j.batch_id = '00000000-0000-0000-0000-0000000000ba'
           AND j.lease_owner = '00000000-0000-0000-0000-0000000000ee' AND j.state = 'running' ORDER BY j.id FOR UPDATE OF j),
done AS (UPDATE jobs j SET state = 'succeeded', succeeded_by = j.lease_owner, lease_owner = NULL, last_error = NULL, finished_at = now(), updated_at = now()
         FROM locked WHERE j.id = locked.id RETURNING j.id, j.backend_id, j.cid, j.owner, j.name),
upserts AS (INSERT INTO pins (backend_id, cid, owner, name, job_id, status, pinned_at, verified_at)
            SELECT backend_id, cid, owner, name, id, 'pinned', now(), now() FROM done ORDER BY backend_id, cid
            ON CONFLICT (backend_id, cid) DO UPDATE SET others = CASE WHEN pins.owner IS NULL OR pins.owner = EXCLUDED.owner OR EXCLUDED.owner = ANY (pins.others) THEN pins.others ELSE array_append(pins.others, EXCLUDED.owner) END, status = 'pinned', verified_at = now(), updated_at = now())
SELECT count(*) FROM done;

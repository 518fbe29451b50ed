-- One pgbench transaction of bench/floor/run.sh: a worker's fenced claim of the next 128
-- jobs (queued → running, attempt + 1, lease), then their fenced finish (running →
-- succeeded where the lease and attempt are still the worker's), each statement its own
-- commit, as a worker claims and later records. The ids are computed from the chunk's
-- number, as a worker has them from its message.
--
-- Variables (pgbench -D): `order` = 1 keeps one CID's jobs in order, as pinq's claim does:
-- a job is left queued while another job on its CID runs or an earlier one waits (a
-- look-up on the hash index of `cid` that run.sh adds for it; almost every job finds only
-- itself); with 0 the condition is constant and planned away. `pins` = 1 makes the finish
-- also insert each job's pin-index row, as pinq's success statement does.
SELECT nextval('chunk') AS c \gset
UPDATE jobs j SET state = 'running', attempt = j.attempt + 1,
       lease_owner = '00000000-0000-0000-0000-00000000000a',
       lease_until = now() + interval '30 seconds', started_at = now()
WHERE j.id = ANY (ARRAY(SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid
                        FROM generate_series(:c * 128, :c * 128 + 127) g))
  AND j.state = 'queued'
  AND (:order = 0 OR NOT EXISTS (
           SELECT 1 FROM jobs o
           WHERE o.cid = j.cid AND o.id <> j.id
             AND (o.state = 'running' OR (o.state = 'queued' AND o.id < j.id))));
WITH done AS (
    UPDATE jobs SET state = 'succeeded', lease_owner = NULL, lease_until = NULL, finished_at = now()
    WHERE id = ANY (ARRAY(SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid
                          FROM generate_series(:c * 128, :c * 128 + 127) g))
      AND state = 'running' AND lease_owner = '00000000-0000-0000-0000-00000000000a' AND attempt = 1
    RETURNING id, backend_id, cid, finished_at)
INSERT INTO pins (backend_id, cid, job_id, pinned_at)
SELECT backend_id, cid, id, finished_at FROM done WHERE :pins = 1
ON CONFLICT (backend_id, cid) DO NOTHING;

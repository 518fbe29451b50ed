-- Loads 100,000 queued pin jobs in one batch for bench/hot-replay/run.sh, and a table
-- numbering them so that each pgbench transaction takes the next 32.
TRUNCATE jobs, job_attempts, pins, batches CASCADE;
DELETE FROM backends;
INSERT INTO backends (id, name, kind, url) VALUES ('00000000-0000-0000-0000-000000000001','b1','kubo','http://x') ON CONFLICT DO NOTHING;
DROP TABLE IF EXISTS work; DROP SEQUENCE IF EXISTS chunk;
CREATE SEQUENCE chunk START 0 MINVALUE 0;
INSERT INTO batches (id, owner, priority, backends, retry, job_count) VALUES ('00000000-0000-0000-0000-0000000000b1','bench',5,'{}','{}',100000);
INSERT INTO jobs (id, batch_id, seq, owner, backend_id, op, cid, priority, max_attempts, backoff_base_ms, backoff_factor, backoff_max_ms)
SELECT gen_random_uuid(), '00000000-0000-0000-0000-0000000000b1', g, 'bench', '00000000-0000-0000-0000-000000000001', 'pin', 'bafy'||md5(g::text||random()::text), 5, 5, 100, 2, 10000
FROM generate_series(0, 99999) g;
CREATE TABLE work AS SELECT seq AS n, id FROM jobs; CREATE INDEX ON work(n);
VACUUM ANALYZE jobs; VACUUM ANALYZE work;
CHECKPOINT;

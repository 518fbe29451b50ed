TRUNCATE jobs, job_attempts, pins, batches CASCADE;
INSERT INTO backends (id, name, kind, url) VALUES ('00000000-0000-0000-0000-0000000000bb','b','kubo','http://127.0.0.1:9') ON CONFLICT DO NOTHING;
INSERT INTO batches (id, owner, priority, backends, retry, job_count) VALUES ('00000000-0000-0000-0000-0000000000ba','alice',5,ARRAY['b'],'{}'::jsonb,100000);
INSERT INTO jobs (id, batch_id, seq, owner, backend_id, op, cid, priority, state, attempt, max_attempts, backoff_base_ms, backoff_factor, backoff_max_ms, lease_owner, cid_key, claim_id, started_at)
SELECT gen_random_uuid(), '00000000-0000-0000-0000-0000000000ba', g, 'alice', '00000000-0000-0000-0000-0000000000bb', 'pin', 'bafkreicid'||g, 5, 'running', 1, 5, 1000, 2, 60000, '00000000-0000-0000-0000-0000000000ee', 'bafkreicid'||g, 1, now() FROM generate_series(1,100000) g;
DROP SEQUENCE IF EXISTS succ_seq; CREATE SEQUENCE succ_seq;
VACUUM ANALYZE;
CHECKPOINT;

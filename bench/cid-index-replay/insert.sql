-- 10,000 jobs whose CIDs (59 characters, like a CIDv1 in base32) are in no order.
INSERT INTO jobs (id, batch_id, seq, owner, backend_id, op, cid, priority, max_attempts, backoff_base_ms, backoff_factor, backoff_max_ms, cid_key)
SELECT gen_random_uuid(), '00000000-0000-0000-0000-0000000000ba', g, 'alice', '00000000-0000-0000-0000-0000000000bb', 'pin', c, 5, 5, 1000, 2, 60000, c
FROM (SELECT g, 'bafkrei' || md5(random()::text) || left(md5(random()::text), 20) AS c
      FROM generate_series(1, 10000) g) t;

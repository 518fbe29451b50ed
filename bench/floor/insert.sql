-- One batch of bench/floor/run.sh's ingest: 10,000 queued jobs in one statement. Job n's
-- id is n written as a time-ordered UUID (pinq's ids are UUIDv7, so its key is appended
-- to as well), and its CID is 59 characters that do not follow n's order.
SELECT nextval('chunk') AS b \gset
INSERT INTO jobs (id, backend_id, op, cid, priority)
SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
       '00000000-0000-0000-0000-000000000001', 'pin',
       'bafkrei' || md5(g::text) || left(md5((g + 1)::text), 20), 5
FROM generate_series(:b * 10000, :b * 10000 + 9999) g;

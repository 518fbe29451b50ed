TRUNCATE jobs, batches CASCADE;
INSERT INTO backends (id, name, kind, url) VALUES ('00000000-0000-0000-0000-0000000000bb','b','kubo','http://127.0.0.1:9') ON CONFLICT DO NOTHING;
INSERT INTO batches (id, owner, priority, backends, retry, job_count) VALUES ('00000000-0000-0000-0000-0000000000ba','alice',5,ARRAY['b'],'{}'::jsonb,200000);

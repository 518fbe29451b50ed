-- An idempotency key used again with a different request was answered with the first
-- batch, and the new request's operations were silently dropped. Each batch stored under a
-- key now keeps a digest (SHA-256) of the request body as the client sent it: the same key
-- with the same body still answers the first batch, and with a different one is refused
-- (422 `idempotency_key_reused`). Batches stored before this have no digest and keep
-- answering any request under their key, as before.
ALTER TABLE batches ADD COLUMN request_digest bytea;

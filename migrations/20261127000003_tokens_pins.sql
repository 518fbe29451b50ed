-- API tokens (tenants and scopes) and the Pinning Service API's pin requests.

-- A bearer token. Only the SHA-256 of the token is stored; `prefix` (the first characters
-- of the token) is kept so people can tell their tokens apart in listings.
CREATE TABLE api_tokens (
    id              uuid PRIMARY KEY,
    name            text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    -- The tenant. Several tokens may share an owner; every query a user token makes is
    -- scoped to it.
    owner           text NOT NULL CHECK (owner ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    scope           text NOT NULL CHECK (scope IN ('user', 'admin')),
    token_hash      text NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    prefix          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz
);
-- A name identifies one live token (`pinq tokens revoke NAME`); a revoked token's name
-- may be reused.
CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (name) WHERE revoked_at IS NULL;

-- A pin request of the Pinning Service API (`/pins`). Each request is backed by a batch
-- of one operation (a pin, or for a replace the 'replace' op), fanned out to the
-- placement backends; its status is derived from that batch's jobs.
CREATE TABLE pin_requests (
    -- The PSA `requestid`.
    id              uuid PRIMARY KEY,
    owner           text NOT NULL,
    -- The CID as the client sent it (returned unchanged in `pin.cid`), and its canonical
    -- form (CIDv1 base32) for the `cid` filter and for reference counting.
    cid             text NOT NULL,
    cid_canonical   text NOT NULL,
    name            text CHECK (char_length(name) <= 255),
    origins         text[] NOT NULL DEFAULT '{}',
    meta            jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Globally unique (the spec pages by it): clock_timestamp() advances within a
    -- transaction, and an insert that collides is retried with a fresh value.
    created         timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The batch whose jobs carry this request. No foreign key: retention may prune old
    -- finished jobs and batches, and the request must outlive them (its status then
    -- comes from the pin index).
    batch_id        uuid NOT NULL,
    backends        text[] NOT NULL,
    -- The request this one replaced (POST /pins/{requestid}).
    replaces        uuid,
    -- Set when the request is deleted or replaced; such a request is gone (404).
    deleted_at      timestamptz,
    replaced_by     uuid
);
CREATE UNIQUE INDEX pin_requests_created ON pin_requests (created);
CREATE INDEX pin_requests_owner_created ON pin_requests (owner, created DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX pin_requests_cid ON pin_requests (cid_canonical) WHERE deleted_at IS NULL;
CREATE INDEX pin_requests_batch ON pin_requests (batch_id);

-- The PSA status of a request, from its batch's jobs: any failed → failed, any running
-- → pinning, any queued or waiting → queued, all succeeded → pinned. NULL when the jobs
-- were pruned by retention.
CREATE FUNCTION psa_status_of_batch(p_batch uuid) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN count(*) = 0 THEN NULL
        WHEN bool_or(state = 'failed') THEN 'failed'
        WHEN bool_or(state = 'running') THEN 'pinning'
        WHEN bool_or(state IN ('queued', 'retry_wait')) THEN 'queued'
        WHEN bool_and(state = 'succeeded') THEN 'pinned'
        ELSE 'failed'
    END
    FROM jobs WHERE batch_id = p_batch
$$;

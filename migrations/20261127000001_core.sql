-- The core schema: backends, batches, jobs, their attempts, the pin index and the worker
-- fleet. Later capabilities (API tokens, schedules, health history) add tables beside
-- these rather than rewriting them.
--
-- States and kinds are text with CHECK constraints rather than enum types: adding a value
-- later is a one-line constraint change, and every client can read them as plain strings.

CREATE TABLE backends (
    id              uuid PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    kind            text NOT NULL CHECK (kind IN ('kubo', 'cluster', 'psa')),
    url             text NOT NULL,
    enabled         boolean NOT NULL DEFAULT true,
    -- Current health as judged by the scheduler's health checks; 'unknown' until probed.
    status          text NOT NULL DEFAULT 'unknown'
                    CHECK (status IN ('unknown', 'healthy', 'degraded', 'down')),
    status_since    timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE batches (
    id              uuid PRIMARY KEY,
    -- The tenant that owns the batch. Every query a tenant's token makes filters on it.
    owner           text NOT NULL,
    priority        smallint NOT NULL CHECK (priority BETWEEN 0 AND 9),
    backends        text[] NOT NULL,
    -- The retry policy the batch was submitted with, as given (for display); each job
    -- carries its own resolved copy so the worker needs no join.
    retry           jsonb NOT NULL,
    idempotency_key text,
    job_count       integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX batches_owner_created ON batches (owner, created_at DESC);

CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    batch_id        uuid NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    -- Position of the operation in the submitted batch (one op fans out to one job per
    -- target backend, so several jobs can share a seq).
    seq             integer NOT NULL,
    owner           text NOT NULL,
    backend_id      uuid NOT NULL REFERENCES backends (id),
    op              text NOT NULL CHECK (op IN ('pin', 'unpin', 'replace')),
    cid             text NOT NULL,
    -- For 'replace': the CID that is unpinned once `cid` is pinned.
    replaces_cid    text,
    name            text,
    meta            jsonb NOT NULL DEFAULT '{}'::jsonb,
    priority        smallint NOT NULL CHECK (priority BETWEEN 0 AND 9),
    state           text NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'running', 'retry_wait', 'succeeded', 'failed', 'cancelled')),
    attempt         integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL CHECK (max_attempts >= 1),
    backoff_base_ms integer NOT NULL CHECK (backoff_base_ms >= 0),
    backoff_factor  double precision NOT NULL CHECK (backoff_factor >= 1),
    backoff_max_ms  integer NOT NULL CHECK (backoff_max_ms >= 0),
    -- When the job may next run. Delayed work (retries) lives here, never in the broker.
    run_at          timestamptz NOT NULL DEFAULT now(),
    -- When a message for the current queued period was confirmed by the broker; NULL
    -- means the relay still owes the broker a message for this job.
    dispatched_at   timestamptz,
    lease_owner     uuid,
    lease_until     timestamptz,
    last_error      text,
    -- Set when a client cancels a running job; the worker holding it stops the pin.
    cancel_requested boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    CHECK ((state = 'running') = (lease_owner IS NOT NULL))
);
CREATE INDEX jobs_batch_state ON jobs (batch_id, state);
CREATE INDEX jobs_batch_seq ON jobs (batch_id, seq, id);
CREATE INDEX jobs_owner_created ON jobs (owner, created_at DESC);
CREATE INDEX jobs_cid ON jobs (cid);
-- The relay's three scans: undispatched queued jobs, due retries, expired leases.
CREATE INDEX jobs_undispatched ON jobs (priority DESC, updated_at)
    WHERE state = 'queued' AND dispatched_at IS NULL;
CREATE INDEX jobs_retry_due ON jobs (run_at) WHERE state = 'retry_wait';
CREATE INDEX jobs_lease ON jobs (lease_until) WHERE state = 'running';
CREATE INDEX jobs_lease_owner ON jobs (lease_owner) WHERE state = 'running';

CREATE TABLE job_attempts (
    job_id          uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt         integer NOT NULL,
    worker_id       uuid NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    -- NULL while running; 'lost' when the lease expired or the worker gave the job back.
    outcome         text CHECK (outcome IN ('succeeded', 'retry', 'failed', 'lost', 'cancelled')),
    error           text,
    PRIMARY KEY (job_id, attempt)
);

-- The pin index: which CID pinq holds pinned on which backend. `cid` is the canonical
-- form (CIDv1, base32) so that CIDv0 and CIDv1 spellings of one pin compare equal.
CREATE TABLE pins (
    backend_id      uuid NOT NULL REFERENCES backends (id) ON DELETE CASCADE,
    cid             text NOT NULL,
    owner           text,
    name            text,
    job_id          uuid,
    status          text NOT NULL DEFAULT 'pinned' CHECK (status IN ('pinned', 'missing', 'unmanaged')),
    pinned_at       timestamptz NOT NULL DEFAULT now(),
    verified_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (backend_id, cid)
);
CREATE INDEX pins_cid ON pins (cid);

CREATE TABLE workers (
    id              uuid PRIMARY KEY,
    host            text NOT NULL,
    pid             integer NOT NULL,
    concurrency     integer NOT NULL,
    in_flight       integer NOT NULL DEFAULT 0,
    state           text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'stopping', 'stopped', 'lost')),
    started_at      timestamptz NOT NULL DEFAULT now(),
    last_heartbeat  timestamptz NOT NULL DEFAULT now()
);

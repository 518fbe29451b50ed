-- The floor's schema (bench/floor/run.sh): not pinq's. A job row with what DESIGN.md asks
-- a job to carry through a fenced claim (state, attempt, lease owner and expiry, times),
-- a primary key on its id and nothing else: no tallies, no other index, no batch or
-- outbox row, no claim row. Room is kept on each page so that claims and finishes can be
-- heap-only updates, as in pinq's `jobs`. `pins` is the pin index of the `pins` and
-- `order` variants.
DROP TABLE IF EXISTS jobs, pins;
DROP SEQUENCE IF EXISTS chunk;
CREATE SEQUENCE chunk START 0 MINVALUE 0;
CREATE TABLE jobs (
    id uuid PRIMARY KEY,
    backend_id uuid NOT NULL,
    op text NOT NULL,
    cid text NOT NULL,
    priority smallint NOT NULL,
    state text NOT NULL DEFAULT 'queued',
    attempt integer NOT NULL DEFAULT 0,
    lease_owner uuid,
    lease_until timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz
) WITH (fillfactor = 50);
CREATE TABLE pins (
    backend_id uuid NOT NULL,
    cid text NOT NULL,
    job_id uuid NOT NULL,
    pinned_at timestamptz NOT NULL,
    PRIMARY KEY (backend_id, cid)
);

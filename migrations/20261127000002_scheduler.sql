-- The scheduler's cron schedules, their firings, and backend health history.
--
-- Every firing of a schedule is a row of `schedule_runs` under the unique key
-- (schedule, fire_time): a scheduler replica claims a firing by inserting that row, so
-- however many replicas run, each fire time runs at most once, and the row records what
-- happened to it (ran, failed, or skipped because it was missed while no scheduler ran).

CREATE TABLE schedules (
    name            text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    -- Standard 5-field cron, or 6 fields with seconds first. Evaluated in UTC.
    cron            text NOT NULL,
    task            text NOT NULL CHECK (task IN ('health-check', 'index-update', 'prune')),
    -- Per-task options (see docs/scheduler.md); keys a task does not know are ignored.
    args            jsonb NOT NULL DEFAULT '{}'::jsonb,
    enabled         boolean NOT NULL DEFAULT true,
    -- What happens to fire times missed while no scheduler ran: 'latest' runs the most
    -- recent one once and records the older ones as skipped; 'none' records them all as
    -- skipped.
    catch_up        text NOT NULL DEFAULT 'latest' CHECK (catch_up IN ('latest', 'none')),
    -- The latest fire time that was claimed (run or skipped); missed firings are counted
    -- from here.
    last_fire_at    timestamptz,
    -- The next fire time as the scheduler last computed it (informational).
    next_fire_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE schedule_runs (
    id              bigserial PRIMARY KEY,
    schedule        text NOT NULL REFERENCES schedules (name) ON DELETE CASCADE ON UPDATE CASCADE,
    fire_time       timestamptz NOT NULL,
    -- A run asked for through the API (`POST /v1/schedules/{name}/run`) rather than by
    -- the cron expression.
    manual          boolean NOT NULL DEFAULT false,
    -- pending (manual, not yet picked up) → running → succeeded | failed; or skipped.
    status          text NOT NULL
                    CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'skipped')),
    -- The scheduler process that ran it, and when it last said it was still at it.
    runner          uuid,
    heartbeat_at    timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    -- The task's summary (counts), or why it was skipped.
    output          jsonb NOT NULL DEFAULT '{}'::jsonb,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (schedule, fire_time)
);
CREATE INDEX schedule_runs_schedule_fire ON schedule_runs (schedule, fire_time DESC);
CREATE INDEX schedule_runs_active ON schedule_runs (status, fire_time)
    WHERE status IN ('pending', 'running');
CREATE INDEX schedule_runs_created ON schedule_runs (created_at);

-- Health as the probes see it, with the counters hysteresis needs.
ALTER TABLE backends
    ADD COLUMN consecutive_failures  integer NOT NULL DEFAULT 0,
    ADD COLUMN consecutive_successes integer NOT NULL DEFAULT 0,
    ADD COLUMN last_probe_at         timestamptz,
    ADD COLUMN last_probe_ok         boolean,
    ADD COLUMN last_probe_latency_ms integer,
    ADD COLUMN last_probe_error      text,
    ADD COLUMN node_version          text,
    ADD COLUMN repo_size             bigint,
    ADD COLUMN num_objects           bigint;

-- One row per probe of a backend.
CREATE TABLE backend_probes (
    id              bigserial PRIMARY KEY,
    backend_id      uuid NOT NULL REFERENCES backends (id) ON DELETE CASCADE,
    probed_at       timestamptz NOT NULL DEFAULT now(),
    ok              boolean NOT NULL,
    latency_ms      integer NOT NULL,
    error           text,
    peer_id         text,
    node_version    text,
    repo_size       bigint,
    num_objects     bigint,
    -- The backend's status after this probe.
    status          text NOT NULL CHECK (status IN ('unknown', 'healthy', 'degraded', 'down'))
);
CREATE INDEX backend_probes_backend_time ON backend_probes (backend_id, probed_at DESC);
CREATE INDEX backend_probes_time ON backend_probes (probed_at);

-- Retention scans finished jobs by age.
CREATE INDEX jobs_finished_age ON jobs (updated_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');

-- The built-in schedules. Editable (cron, enabled) through the admin API; the seconds
-- field is optional, so '*/30 * * * * *' means every 30 seconds.
INSERT INTO schedules (name, cron, task, args) VALUES
    ('health-check', '*/30 * * * * *', 'health-check', '{}'::jsonb),
    ('index-update', '0 */10 * * * *', 'index-update', '{"chunk_size": 5000, "repair_priority": 1}'::jsonb),
    ('prune',        '0 0 * * * *',    'prune',        '{"chunk_size": 5000}'::jsonb);

-- Generations and their ordered events. The generations row is the truth;
-- events are the history watch streams replay and resume from.

CREATE TABLE generations (
    id               uuid PRIMARY KEY,
    principal        text        NOT NULL,
    request_id       text,
    template         text        NOT NULL,
    parameters       jsonb       NOT NULL,
    -- The resolved ComfyUI graph, as JSON text: 64-bit seeds stay exact.
    graph            text        NOT NULL,
    checkpoint       text,
    priority         integer     NOT NULL DEFAULT 0,
    status           text        NOT NULL DEFAULT 'QUEUED'
        CHECK (status IN ('QUEUED', 'DISPATCHED', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    timeout_seconds  integer     NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    completed_at     timestamptz,
    duration_ms      bigint,
    outputs          jsonb       NOT NULL DEFAULT '[]',
    prompt_id        text,
    worker           text,
    -- Fencing token: bumped by every claim; every later write must match it.
    attempts         integer     NOT NULL DEFAULT 0,
    lease_owner      text,
    lease_expires_at timestamptz,
    progress_value   integer,
    progress_max     integer,
    progress_node    text,
    error_reason     text,
    error_message    text,
    error_details    jsonb,
    cancel_requested boolean     NOT NULL DEFAULT false,
    last_event_seq   bigint      NOT NULL DEFAULT 0,
    UNIQUE (principal, request_id)
);

-- Claim order: highest priority, then oldest, among queued rows only.
CREATE INDEX generations_queued ON generations (priority DESC, created_at) WHERE status = 'QUEUED';
-- Lease expiry scan for takeover.
CREATE INDEX generations_leased ON generations (lease_expires_at)
    WHERE status IN ('DISPATCHED', 'RUNNING');
-- A caller's listing, newest first (keyset paging on created_at, id).
CREATE INDEX generations_by_principal ON generations (principal, created_at DESC, id DESC);

CREATE TABLE generation_inputs (
    generation_id uuid  NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    name          text  NOT NULL,
    data          bytea NOT NULL,
    PRIMARY KEY (generation_id, name)
);

CREATE TABLE generation_events (
    generation_id uuid        NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    seq           bigint      NOT NULL,
    type          text        NOT NULL,
    status        text        NOT NULL,
    payload       jsonb       NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (generation_id, seq)
);

-- The queue table churns (every claim and heartbeat is an update): vacuum it
-- early so dead tuples never pile up under the claim index.
ALTER TABLE generations SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0,
    fillfactor = 80
);
ALTER TABLE generation_events SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05
);

-- trimtab's schema: the one schema the data plane, the optimizer and the trainer share.

-- One row per connection (tuning::Profile). Partitioned by day on started_at: a DEFAULT
-- partition catches everything, and trimtab_ensure_profile_partitions() creates daily
-- partitions ahead of time so old days can be dropped cheaply (retention).
CREATE TABLE profiles (
    connection_id        uuid        NOT NULL,
    dataplane_id         text        NOT NULL,
    started_at           timestamptz NOT NULL,
    ended_at             timestamptz NOT NULL,
    duration_us          bigint      NOT NULL CHECK (duration_us >= 0),
    written_at           timestamptz NOT NULL DEFAULT now(),

    -- decision-time context
    service              text        NOT NULL,
    route                text        NOT NULL,
    protocol             text        NOT NULL CHECK (protocol IN ('http', 'websocket', 'upgrade', 'tcp')),
    subprotocol          text,
    offers_deflate       boolean     NOT NULL,
    client_class         text        NOT NULL,
    client_region        text        NOT NULL,
    hour_of_week         smallint    NOT NULL CHECK (hour_of_week BETWEEN 0 AND 167),
    client_key           text,

    -- settings used
    buffer_size          integer     NOT NULL,
    ping_interval_s      integer     NOT NULL,
    idle_timeout_s       integer     NOT NULL,
    compression          boolean     NOT NULL,
    mode                 text        NOT NULL CHECK (mode IN ('zero_copy', 'frame_aware')),

    -- the decision behind them
    reason               text        NOT NULL CHECK (reason IN ('kill_switch', 'override', 'canary', 'model', 'default', 'fallback')),
    model_version        text,
    cohort               text        NOT NULL CHECK (cohort IN ('none', 'control', 'canary')),
    propensity           real        NOT NULL CHECK (propensity > 0 AND propensity <= 1),
    explored             boolean     NOT NULL DEFAULT false,
    shadow_settings      jsonb,

    -- timings, microseconds
    dns_us               bigint,
    connect_us           bigint,
    tls_us               bigint,
    upgrade_us           bigint,
    c2u_first_message_us bigint,
    u2c_first_message_us bigint,

    -- traffic, client -> upstream (c2u) and upstream -> client (u2c); histograms are log2
    c2u_bytes            bigint      NOT NULL DEFAULT 0,
    c2u_messages         bigint      NOT NULL DEFAULT 0,
    c2u_msg_size_hist    bigint[]    NOT NULL,
    c2u_read_size_hist   bigint[]    NOT NULL,
    c2u_gap_ms_hist      bigint[]    NOT NULL,
    c2u_max_gap_ms       bigint      NOT NULL DEFAULT 0,
    c2u_sampled_in       bigint      NOT NULL DEFAULT 0,
    c2u_sampled_out      bigint      NOT NULL DEFAULT 0,
    u2c_bytes            bigint      NOT NULL DEFAULT 0,
    u2c_messages         bigint      NOT NULL DEFAULT 0,
    u2c_msg_size_hist    bigint[]    NOT NULL,
    u2c_read_size_hist   bigint[]    NOT NULL,
    u2c_gap_ms_hist      bigint[]    NOT NULL,
    u2c_max_gap_ms       bigint      NOT NULL DEFAULT 0,
    u2c_sampled_in       bigint      NOT NULL DEFAULT 0,
    u2c_sampled_out      bigint      NOT NULL DEFAULT 0,

    -- pings (client leg and upstream leg)
    client_pings_sent    bigint      NOT NULL DEFAULT 0,
    client_pongs_missed  bigint      NOT NULL DEFAULT 0,
    client_rtt_min_us    bigint,
    client_rtt_p50_us    bigint,
    client_rtt_p99_us    bigint,
    client_rtt_max_us    bigint,
    upstream_pings_sent  bigint      NOT NULL DEFAULT 0,
    upstream_pongs_missed bigint     NOT NULL DEFAULT 0,
    upstream_rtt_min_us  bigint,
    upstream_rtt_p50_us  bigint,
    upstream_rtt_p99_us  bigint,
    upstream_rtt_max_us  bigint,

    -- pressure
    paused_ms            bigint      NOT NULL DEFAULT 0,
    peak_buffered_bytes  bigint      NOT NULL DEFAULT 0,

    -- end
    closed_by            text        NOT NULL CHECK (closed_by IN ('client', 'upstream', 'proxy')),
    close_code           integer,
    close_reason         text,
    error_class          text,
    dead_peer            boolean     NOT NULL DEFAULT false,
    idle_timeout_fired   boolean     NOT NULL DEFAULT false,

    PRIMARY KEY (started_at, connection_id)
) PARTITION BY RANGE (started_at);

CREATE TABLE profiles_default PARTITION OF profiles DEFAULT;
CREATE INDEX profiles_service_time ON profiles (service, started_at);
CREATE INDEX profiles_time ON profiles (started_at);

-- Create daily partitions [from, from + days). A day whose rows already sit in the DEFAULT
-- partition is skipped (it stays there) so the call never fails.
CREATE FUNCTION trimtab_ensure_profile_partitions(from_day date, days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d date;
    made integer := 0;
    name text;
BEGIN
    FOR i IN 0 .. days - 1 LOOP
        d := from_day + i;
        name := 'profiles_' || to_char(d, 'YYYYMMDD');
        IF to_regclass(name) IS NULL AND NOT EXISTS (
            SELECT 1 FROM profiles_default
            WHERE started_at >= d AND started_at < d + 1
        ) THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF profiles FOR VALUES FROM (%L) TO (%L)',
                name, d::timestamptz, (d + 1)::timestamptz);
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END $$;

-- Model registry. The ONNX bytes live here so every optimizer replica loads the same model.
CREATE TABLE models (
    version     text        PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    onnx        bytea       NOT NULL,
    metadata    jsonb       NOT NULL,
    metrics     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status      text        NOT NULL DEFAULT 'candidate'
                CHECK (status IN ('candidate', 'active', 'retired')),
    activated_at timestamptz
);
-- At most one active model.
CREATE UNIQUE INDEX models_one_active ON models ((true)) WHERE status = 'active';

-- Pointers the optimizer keeps: the model to fall back to on a one-step rollback.
CREATE TABLE model_state (
    id                  boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_good_version   text REFERENCES models (version),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
INSERT INTO model_state (id) VALUES (true);

-- Manual overrides: partial settings scoped to a service, optionally a route and a client key.
CREATE TABLE overrides (
    id          bigserial   PRIMARY KEY,
    service     text        NOT NULL,
    route       text,
    client_key  text,
    settings    jsonb       NOT NULL,
    expires_at  timestamptz,
    comment     text        NOT NULL DEFAULT '',
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX overrides_scope ON overrides (service, coalesce(route, ''), coalesce(client_key, ''));

-- The kill switch: one row; when enabled every decision is the static default.
CREATE TABLE kill_switch (
    id          boolean     PRIMARY KEY DEFAULT true CHECK (id),
    enabled     boolean     NOT NULL DEFAULT false,
    comment     text        NOT NULL DEFAULT '',
    set_by      text,
    set_at      timestamptz
);
INSERT INTO kill_switch (id) VALUES (true);

-- Gradual rollouts of candidate models.
CREATE TABLE rollouts (
    id                  bigserial   PRIMARY KEY,
    candidate_version   text        NOT NULL REFERENCES models (version),
    control_version     text        REFERENCES models (version),
    salt                bigint      NOT NULL,
    steps               real[]      NOT NULL,
    step_index          integer     NOT NULL DEFAULT 0,
    shadow_share        real        NOT NULL DEFAULT 0,
    step_duration_s     integer     NOT NULL CHECK (step_duration_s > 0),
    min_connections     integer     NOT NULL CHECK (min_connections > 0),
    tolerances          jsonb       NOT NULL,
    state               text        NOT NULL
                        CHECK (state IN ('shadow', 'canary', 'paused', 'promoted', 'rolled_back', 'aborted')),
    state_reason        text        NOT NULL DEFAULT '',
    step_started_at     timestamptz NOT NULL DEFAULT now(),
    last_gate           jsonb,
    created_by          text        NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
-- One active rollout at a time.
CREATE UNIQUE INDEX rollouts_one_active ON rollouts ((true)) WHERE state IN ('shadow', 'canary', 'paused');

-- Every change by a person or by the controller.
CREATE TABLE audit_log (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,
    action      text        NOT NULL,
    target      text        NOT NULL,
    old_value   jsonb,
    new_value   jsonb,
    comment     text        NOT NULL DEFAULT ''
);
CREATE INDEX audit_log_at ON audit_log (at);

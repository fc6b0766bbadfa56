-- Cron schedules. A tick is claimed by compare-and-set on next_fire_at inside the transaction
-- that enqueues it (with the idempotency key cron:<name>:<tick>), so it fires exactly once
-- whatever the number of scheduler replicas.
CREATE TABLE schedules (
    name           text        PRIMARY KEY,
    cron           text        NOT NULL,
    timezone       text        NOT NULL DEFAULT 'UTC',
    job            jsonb       NOT NULL,
    enabled        boolean     NOT NULL DEFAULT true,
    misfire        text        NOT NULL DEFAULT 'fire_once' CHECK (misfire IN ('skip', 'fire_once', 'catch_up')),
    catch_up_limit integer     NOT NULL DEFAULT 10,
    source         text        NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'config')),
    next_fire_at   timestamptz,
    last_fired_at  timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE enabled;

-- Every job a schedule fired: by its tick, or by a manual trigger.
CREATE TABLE schedule_runs (
    schedule_name text        NOT NULL REFERENCES schedules (name) ON DELETE CASCADE,
    tick          timestamptz NOT NULL,
    trigger       text        NOT NULL CHECK (trigger IN ('cron', 'manual')),
    job_id        uuid        NOT NULL,
    queue         text        NOT NULL,
    fired_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_name, tick, trigger)
);

CREATE INDEX schedule_runs_recent ON schedule_runs (schedule_name, fired_at DESC);

-- One row per finished attempt, written by the scheduler's recorder from the Redis outbox.
-- (job_id, run, attempt) makes the write idempotent: a re-delivered event inserts nothing.
CREATE TABLE job_executions (
    job_id      uuid        NOT NULL,
    run         integer     NOT NULL,
    attempt     integer     NOT NULL,
    queue       text        NOT NULL,
    job_type    text        NOT NULL,
    outcome     text        NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'dead', 'cancelled')),
    error       text,
    worker      text,
    started_at  timestamptz,
    finished_at timestamptz,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, run, attempt)
);

CREATE INDEX job_executions_finished_at ON job_executions (finished_at);

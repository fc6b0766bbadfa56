-- The dead-letter queue: one row per dead job (its latest death), unbounded, kept in Postgres.
CREATE TABLE dead_jobs (
    job_id      uuid        PRIMARY KEY,
    queue       text        NOT NULL,
    job_type    text        NOT NULL,
    priority    text        NOT NULL,
    payload     jsonb       NOT NULL,
    envelope    jsonb       NOT NULL,
    run         integer     NOT NULL,
    attempts    integer     NOT NULL,
    last_error  text,
    reason      text        NOT NULL,
    failed_at   timestamptz NOT NULL,
    -- Set when the job was re-enqueued from the DLQ; cleared if it dies again in a later run.
    retried_at  timestamptz,
    retry_count integer     NOT NULL DEFAULT 0
);

CREATE INDEX dead_jobs_newest ON dead_jobs (failed_at DESC, job_id DESC) WHERE retried_at IS NULL;
CREATE INDEX dead_jobs_queue_type ON dead_jobs (queue, job_type, failed_at DESC) WHERE retried_at IS NULL;

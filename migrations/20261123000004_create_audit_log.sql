-- Every DLQ retry, payload edit, delete and purge: who, when, what filter, how many.
CREATE TABLE audit_log (
    id      bigserial   PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text        NOT NULL,
    action  text        NOT NULL,
    target  text,
    filter  jsonb,
    count   bigint      NOT NULL DEFAULT 0,
    details jsonb
);

CREATE INDEX audit_log_at ON audit_log (at DESC);
CREATE INDEX dead_jobs_failed_at ON dead_jobs (failed_at);

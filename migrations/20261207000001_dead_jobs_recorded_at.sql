-- When the recorder wrote the row's latest death (Postgres' clock): a DLQ replay taken over by
-- another API process retries only rows recorded before the replay began, so a death recorded
-- late (a recorder catching up after an outage) is not mistaken for one of its selection.
ALTER TABLE dead_jobs ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT now();

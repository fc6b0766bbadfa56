-- Schedule runs are pruned with the history retention, oldest first.
CREATE INDEX schedule_runs_fired_at ON schedule_runs (fired_at);

-- A DLQ retry by filter in progress: the replay that runs it (a random id per run) and when it
-- last reported. A replay whose report is stale (its API process stopped) is taken over and
-- finished by another.
ALTER TABLE audit_log ADD COLUMN replay_owner uuid, ADD COLUMN replay_alive_at timestamptz;
CREATE INDEX audit_log_replays ON audit_log (replay_alive_at) WHERE replay_alive_at IS NOT NULL;

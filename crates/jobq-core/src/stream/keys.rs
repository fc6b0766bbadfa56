//! Every Redis key name jobq uses. `docs/redis-keys.md` describes each one.
//!
//! All keys of one queue carry the hash tag `{q:<queue>}`, so a queue lives in one Cluster slot
//! and every Lua script touches one slot.

use crate::job::{JobId, Priority, QueueName};

/// Builds key names under one namespace (`jobq` in production, random in tests).
#[derive(Debug, Clone)]
pub struct Keys {
    ns: String,
}

impl Keys {
    /// Consumer group of the workers on every priority stream.
    pub const GROUP: &'static str = "jobq-workers";
    /// Consumer group of the recorders on every outbox stream.
    pub const RECORDER_GROUP: &'static str = "jobq-recorder";

    /// Keys under `namespace`.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self { ns: namespace.into() }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// Stream of ready jobs of one queue and priority. Entries (`id` → job id) are XDEL'ed on ack.
    pub fn stream(&self, queue: &QueueName, p: Priority) -> String {
        format!("{}:{{q:{queue}}}:stream:{p}", self.ns)
    }

    /// The four priority streams of a queue, highest first (the order the scripts expect).
    pub fn streams(&self, queue: &QueueName) -> [String; 4] {
        Priority::ALL.map(|p| self.stream(queue, p))
    }

    /// Hash holding a job's envelope and state; the source of truth.
    pub fn job(&self, queue: &QueueName, id: JobId) -> String {
        format!("{}{id}", self.job_prefix(queue))
    }

    /// Prefix of the job hashes of a queue (scripts append the id).
    pub fn job_prefix(&self, queue: &QueueName) -> String {
        format!("{}:{{q:{queue}}}:job:", self.ns)
    }

    /// A limit shared by every worker (`kind` slots | rate) named by the user (job type,
    /// partition key); its own hash tag, so each limit is one key in one slot.
    pub fn limit(&self, kind: &str, name: &str) -> String {
        format!("{}:{{limit:{name}}}:{kind}", self.ns)
    }

    /// Sorted set of delayed and retrying jobs, scored by run-at milliseconds.
    pub fn scheduled(&self, queue: &QueueName) -> String {
        format!("{}:{{q:{queue}}}:scheduled", self.ns)
    }

    /// Outbox stream of attempt events, read by the recorder, XDEL'ed once written to Postgres.
    pub fn events(&self, queue: &QueueName) -> String {
        format!("{}:{{q:{queue}}}:events", self.ns)
    }

    /// Sorted set of jobs with an `expires_at`, scored by it (swept by the promoter).
    pub fn expiring(&self, queue: &QueueName) -> String {
        format!("{}:{{q:{queue}}}:expiring", self.ns)
    }

    /// Sorted set of succeeded jobs kept for the retention: one member per `complete_many`
    /// call (its job ids, space-separated), scored by the ms their retention ends; the promoter
    /// deletes the hashes of due members. (A TTL per hash would make every lookup of every key
    /// also look in Redis' table of expiring keys.)
    pub fn retained(&self, queue: &QueueName) -> String {
        format!("{}:{{q:{queue}}}:retained", self.ns)
    }

    /// Hash of counters of finished attempts by outcome (`succeeded`, `failed`, `dead`,
    /// `cancelled`), incremented by the scripts that write the outbox.
    pub fn stats(&self, queue: &QueueName) -> String {
        format!("{}:{{q:{queue}}}:stats", self.ns)
    }

    /// Hash of the leases the queue's workers run with (consumer -> `lease_ms until_ms`),
    /// registered by their reapers: a reaper waits for the longest one before it takes a job.
    pub fn leases(&self, queue: &QueueName) -> String {
        format!("{}:{{q:{queue}}}:leases", self.ns)
    }

    /// Flag that pauses a queue: while it exists, workers start none of the queue's jobs.
    pub fn paused(&self, queue: &QueueName) -> String {
        format!("{}:{{q:{queue}}}:paused", self.ns)
    }

    /// Lock of a unique key: holds the id of the job that owns it.
    pub fn unique(&self, queue: &QueueName, key: &str) -> String {
        format!("{}:{{q:{queue}}}:unique:{key}", self.ns)
    }

    /// Prefix of the queue's priority streams (scripts append the priority).
    pub fn stream_prefix(&self, queue: &QueueName) -> String {
        format!("{}:{{q:{queue}}}:stream:", self.ns)
    }

    /// Pub/sub channel on which cancel requests of running jobs are published (job id).
    pub fn cancel_channel(&self) -> String {
        format!("{}:cancel", self.ns)
    }

    /// Set of every queue name ever used in this namespace.
    pub fn queues(&self) -> String {
        format!("{}:queues", self.ns)
    }

    /// Pattern matching every key of the namespace (for `SCAN MATCH`). It also matches the keys
    /// of a namespace nested in this one (`jobq:staging` in `jobq`): filter with [`Keys::owns`].
    pub fn pattern(&self) -> String {
        format!("{}:*", self.ns)
    }

    /// Whether `key`, matched by [`Keys::pattern`], is a key of this namespace: one carrying a
    /// hash tag right after the namespace (`ns:{q:...}`, `ns:{limit:...}`) or the queue set. A
    /// namespace holds no `{`, so `ns:staging:{q:...}` belongs to the nested namespace.
    pub fn owns(&self, key: &str) -> bool {
        key.strip_prefix(self.ns.as_str())
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|rest| rest.starts_with('{') || rest == "queues")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_key_carries_the_queue_hash_tag() {
        let k = Keys::new("jobq");
        let q: QueueName = "mail".parse().unwrap();
        let id = JobId::new();
        assert_eq!(k.stream(&q, Priority::High), "jobq:{q:mail}:stream:high");
        assert_eq!(k.job(&q, id), format!("jobq:{{q:mail}}:job:{id}"));
        assert_eq!(k.scheduled(&q), "jobq:{q:mail}:scheduled");
        assert_eq!(k.events(&q), "jobq:{q:mail}:events");
        assert_eq!(k.stats(&q), "jobq:{q:mail}:stats", "the scripts derive it from the events key");
        for key in k.streams(&q).iter().chain([&k.job(&q, id), &k.scheduled(&q), &k.events(&q)]) {
            assert!(key.contains("{q:mail}"), "{key}");
        }
    }

    #[test]
    fn a_nested_namespace_keys_are_not_its_parents() {
        let (outer, inner) = (Keys::new("jobq"), Keys::new("jobq:staging"));
        let q: QueueName = "mail".parse().unwrap();
        for key in [outer.stream(&q, Priority::Low), outer.limit("slots", "pdf"), outer.queues()] {
            assert!(outer.owns(&key) && !inner.owns(&key), "{key}");
        }
        for key in [inner.stream(&q, Priority::Low), inner.limit("rate", "pdf"), inner.queues()] {
            assert!(inner.owns(&key) && !outer.owns(&key), "{key}");
        }
        assert!(!outer.owns("jobq2:{q:mail}:stream:low") && !outer.owns("jobq:other"));
    }
}

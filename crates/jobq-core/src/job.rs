//! The job: identifiers, priorities, states, the stored envelope and the enqueue request.
//!
//! A job is stored in one Redis hash (`jobq:{q:<queue>}:job:<id>`): the immutable
//! [`Envelope`] as JSON in field `envelope`, and the mutable fields (state, attempt, times,
//! lease, last error, result) beside it, so each Lua script changes them atomically.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::backoff::Backoff;

/// Version of the [`Envelope`] layout (field `v`).
pub const ENVELOPE_VERSION: u32 = 1;
/// Longest accepted job type.
pub const MAX_TYPE_LEN: usize = 128;
/// Longest accepted queue name.
pub const MAX_QUEUE_LEN: usize = 64;

/// Job identifier: a UUIDv7, so ids sort by creation time.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// A queue name: 1–64 characters of `[A-Za-z0-9_.-]` (it becomes part of Redis keys).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueName(String);

impl QueueName {
    /// The queue used when a job names none.
    pub fn default_queue() -> Self {
        Self("default".to_owned())
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for QueueName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("A queue name: 1-64 characters of `[A-Za-z0-9_.-]` (it becomes part of Redis keys)."))
            .pattern(Some(format!("^[A-Za-z0-9_.-]{{1,{MAX_QUEUE_LEN}}}$")))
            .examples([serde_json::json!("default")])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for QueueName {}

impl TryFrom<String> for QueueName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok_chars = s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if s.is_empty() || s.len() > MAX_QUEUE_LEN || !ok_chars {
            return Err(format!(
                "invalid queue name `{s}`: use 1-{MAX_QUEUE_LEN} characters of A-Z, a-z, 0-9, '_', '-', '.'"
            ));
        }
        Ok(Self(s))
    }
}

impl FromStr for QueueName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::try_from(s.to_owned())
    }
}

impl From<QueueName> for String {
    fn from(q: QueueName) -> String {
        q.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Priority inside a queue. Each has its own stream; workers drain them strictly in this order.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Always first.
    Critical,
    /// Before normal work.
    High,
    /// The default.
    #[default]
    Normal,
    /// Only when nothing else waits.
    Low,
}

impl Priority {
    /// All priorities, highest first (the fetch order).
    pub const ALL: [Priority; 4] = [Priority::Critical, Priority::High, Priority::Normal, Priority::Low];

    /// The lowercase name used in keys and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("invalid priority `{s}`: expected critical, high, normal or low"))
    }
}

/// Where a job is in its life (see `docs/architecture.md` for the state machine).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waits for its `run_at` in the scheduled set.
    Scheduled,
    /// In a priority stream, ready to start.
    Queued,
    /// Started by a worker that holds its lease.
    Running,
    /// Finished successfully (terminal).
    Succeeded,
    /// Failed an attempt; waits for its backoff in the scheduled set.
    Retrying,
    /// Out of attempts, or failed fatally; recorded in the dead-letter queue (terminal).
    Dead,
    /// Cancelled before it finished (terminal).
    Cancelled,
    /// Waits for the jobs it depends on.
    Waiting,
}

impl JobState {
    /// The lowercase name stored in Redis and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Retrying => "retrying",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
            JobState::Waiting => "waiting",
        }
    }

    /// True for states a job never leaves by itself.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Dead | JobState::Cancelled)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| format!("invalid job state `{s}`"))
    }
}

/// The immutable part of a job, stored as JSON in the job hash and in `dead_jobs.envelope`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Layout version, [`ENVELOPE_VERSION`].
    pub v: u32,
    /// The job's id.
    pub id: JobId,
    /// The handler to run ("email.send").
    #[serde(rename = "type")]
    pub kind: String,
    /// The queue the job lives in.
    pub queue: QueueName,
    /// Its priority inside the queue.
    pub priority: Priority,
    /// Arbitrary JSON given to the handler.
    pub payload: serde_json::Value,
    /// Attempts allowed before the job is dead (per run; a DLQ retry starts a new run).
    pub max_attempts: u32,
    /// How long to wait between failed attempts.
    pub backoff: Backoff,
    /// Longest time one attempt may run.
    #[serde(with = "crate::duration::serde_human_opt", default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// When the job was accepted.
    #[serde(deserialize_with = "rfc3339::deserialize")]
    pub created_at: DateTime<Utc>,
    /// Deadline to start: a job not started by then is dead with reason `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "rfc3339::deserialize_opt")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Deduplication key: while held, enqueueing another job with it returns this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    /// Name of the API key that enqueued the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueued_by: Option<String>,
    /// Groups jobs for per-partition concurrency limits (a tenant id, an account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    /// Jobs (same queue) this one waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<JobId>,
    /// What the dependencies must reach (with `depends_on`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency_mode: Option<DependencyMode>,
    /// Free-form string map (carries trace context).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// Timestamps of an envelope, read as chrono's `Deserialize` reads them, but trying chrono's
/// strict RFC 3339 parser first: what an envelope holds (chrono writes RFC 3339) parses about
/// five times faster that way than by the relaxed parser chrono's `Deserialize` uses, and a
/// worker decodes an envelope per job. Anything else takes the relaxed parser, as before.
mod rfc3339 {
    use chrono::{DateTime, FixedOffset, Utc};
    use serde::de::{Deserializer, Error, Visitor};

    struct Rfc3339;

    impl Visitor<'_> for Rfc3339 {
        type Value = DateTime<Utc>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an RFC 3339 date and time")
        }

        fn visit_str<E: Error>(self, s: &str) -> Result<Self::Value, E> {
            DateTime::parse_from_rfc3339(s)
                .or_else(|_| s.parse::<DateTime<FixedOffset>>())
                .map(|t| t.with_timezone(&Utc))
                .map_err(E::custom)
        }
    }

    struct Rfc3339Opt;

    impl<'de> Visitor<'de> for Rfc3339Opt {
        type Value = Option<DateTime<Utc>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an RFC 3339 date and time or null")
        }

        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(Rfc3339).map(Some)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        d.deserialize_str(Rfc3339)
    }

    pub(super) fn deserialize_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        d.deserialize_option(Rfc3339Opt)
    }
}

/// When a new job should first become ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// Right away.
    #[default]
    Now,
    /// After this delay, measured on the Redis clock.
    After(Duration),
    /// At this instant.
    At(DateTime<Utc>),
}

/// A job to enqueue. Unset options take the configured defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Handler name.
    pub kind: String,
    /// Handler input.
    pub payload: serde_json::Value,
    /// Queue (default `default`).
    pub queue: QueueName,
    /// Priority (default `normal`).
    pub priority: Priority,
    /// Attempt budget (default from settings).
    pub max_attempts: Option<u32>,
    /// Retry policy (default from settings).
    pub backoff: Option<Backoff>,
    /// Per-attempt timeout (default from settings).
    pub timeout: Option<Duration>,
    /// When it may start.
    pub start: Start,
    /// Deadline to start.
    pub expires_at: Option<DateTime<Utc>>,
    /// Deduplication key.
    pub unique_key: Option<String>,
    /// How long the unique key is held; `None` holds it until the job is finished.
    pub unique_ttl: Option<Duration>,
    /// Name of the API key that enqueues it.
    pub enqueued_by: Option<String>,
    /// Partition for per-partition concurrency limits.
    pub partition_key: Option<String>,
    /// Jobs of the same queue this one waits for.
    pub depends_on: Vec<JobId>,
    /// What the dependencies must reach before this job is queued.
    pub dependency_mode: DependencyMode,
    /// Every job of `depends_on` is known to have been enqueued in this job's queue (set by
    /// [`NewJob::after_batch`], for a batch's callback): with [`DependencyMode::Finished`], a
    /// dependency whose hash is gone has finished and left per retention (at once with
    /// `JOBQ_RETENTION_SUCCEEDED=0`), and counts as finished instead of unknown.
    pub dependencies_enqueued: bool,
    /// String map carried to the handler.
    pub metadata: BTreeMap<String, String>,
    /// Labels.
    pub tags: Vec<String>,
}

impl NewJob {
    /// A job of `kind` with `payload`, every option at its default.
    pub fn new(kind: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            payload,
            queue: QueueName::default_queue(),
            priority: Priority::Normal,
            max_attempts: None,
            backoff: None,
            timeout: None,
            start: Start::Now,
            expires_at: None,
            unique_key: None,
            partition_key: None,
            depends_on: Vec::new(),
            dependency_mode: DependencyMode::Succeeded,
            dependencies_enqueued: false,
            unique_ttl: None,
            enqueued_by: None,
            metadata: BTreeMap::new(),
            tags: Vec::new(),
        }
    }

    /// Sets the queue.
    pub fn queue(mut self, queue: QueueName) -> Self {
        self.queue = queue;
        self
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the attempt budget.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the retry policy.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// Delays the first run.
    pub fn delay(mut self, d: Duration) -> Self {
        self.start = Start::After(d);
        self
    }

    /// Sets a deadline to start.
    pub fn expires_at(mut self, at: DateTime<Utc>) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Makes the job unique by `key` (held for `ttl`, or until the job finishes when `None`).
    pub fn unique(mut self, key: impl Into<String>, ttl: Option<Duration>) -> Self {
        self.unique_key = Some(key.into());
        self.unique_ttl = ttl;
        self
    }

    /// Sets the partition key (per-partition concurrency limits count jobs by it).
    pub fn partition(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// Waits until every job in `ids` (same queue) has succeeded; if one dies or is cancelled,
    /// this job is dead-lettered with reason `dependency_failed`.
    pub fn depends_on(mut self, ids: impl IntoIterator<Item = JobId>) -> Self {
        self.depends_on = ids.into_iter().collect();
        self.dependency_mode = DependencyMode::Succeeded;
        self.dependencies_enqueued = false;
        self
    }

    /// Waits until every job in `ids` (same queue) has finished, whatever its outcome (a batch
    /// callback). An id that is not a job of the queue is refused.
    pub fn after_all_finish(mut self, ids: impl IntoIterator<Item = JobId>) -> Self {
        self.depends_on = ids.into_iter().collect();
        self.dependency_mode = DependencyMode::Finished;
        self.dependencies_enqueued = false;
        self
    }

    /// Like [`NewJob::after_all_finish`], for the callback of a batch the caller has just
    /// enqueued in this job's queue: `ids` are that batch's jobs, so one no longer in Redis has
    /// finished and left per retention (at once with `JOBQ_RETENTION_SUCCEEDED=0`, possibly
    /// before this job is enqueued) and counts as finished. Ids of any other jobs would count as
    /// finished too: use it only with the ids an enqueue of the same queue returned.
    pub fn after_batch(mut self, ids: impl IntoIterator<Item = JobId>) -> Self {
        self.depends_on = ids.into_iter().collect();
        self.dependency_mode = DependencyMode::Finished;
        self.dependencies_enqueued = true;
        self
    }

    /// Checks the fields a caller controls; the error names the field.
    pub fn validate(&self) -> crate::Result<()> {
        let invalid = |m: String| Err(crate::Error::Invalid(m));
        if self.kind.is_empty() || self.kind.len() > MAX_TYPE_LEN {
            return invalid(format!("`type` must be 1-{MAX_TYPE_LEN} characters"));
        }
        if self.kind.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return invalid("`type` must not contain whitespace or control characters".into());
        }
        if let Some(n) = self.max_attempts {
            if !(1..=1000).contains(&n) {
                return invalid(format!("`max_attempts` must be between 1 and 1000, got {n}"));
            }
        }
        if let Some(b) = &self.backoff {
            b.validate().map_err(crate::Error::Invalid)?;
        }
        if let Some(t) = self.timeout {
            if t.is_zero() {
                return invalid("`timeout` must be greater than zero".into());
            }
            if t > crate::config::MAX_DURATION {
                return invalid(format!("`timeout` must be at most 100 years, got {}", crate::duration::format(t)));
            }
        }
        if let Some(k) = &self.unique_key {
            if k.is_empty() || k.len() > 256 || k.chars().any(char::is_control) {
                return invalid("`unique_key` must be 1-256 characters without control characters".into());
            }
        }
        if let Some(k) = &self.partition_key {
            if k.is_empty() || k.len() > 256 || k.chars().any(char::is_control) {
                return invalid("`partition_key` must be 1-256 characters without control characters".into());
            }
        }
        if self.depends_on.len() > MAX_DEPENDENCIES {
            return invalid(format!(
                "`depends_on` lists at most {MAX_DEPENDENCIES} jobs, got {}",
                self.depends_on.len()
            ));
        }
        if self.unique_ttl.is_some() && self.unique_key.is_none() {
            return invalid("`unique_ttl` needs a `unique_key`".into());
        }
        if self.unique_ttl.is_some_and(|t| t < Duration::from_millis(1) || t > MAX_UNIQUE_TTL) {
            return invalid("`unique_ttl` must be between 1ms and 10 years".into());
        }
        if self.tags.len() > 32 || self.tags.iter().any(|t| t.len() > 128) {
            return invalid("`tags`: at most 32 tags of at most 128 characters".into());
        }
        // The entries jobq adds itself (trace context, a cron tick's schedule and tick) do not
        // count: a job valid as sent stays valid once they are added.
        let own = self.metadata.keys().filter(|k| !SYSTEM_METADATA.contains(&k.as_str())).count();
        if own > 64 || self.metadata.iter().any(|(k, v)| k.len() > 128 || v.len() > 4096) {
            return invalid("`metadata`: at most 64 entries, keys up to 128 and values up to 4096 characters".into());
        }
        // History and the DLQ keep these in Postgres, whose text and jsonb cannot hold U+0000.
        if has_nul(&self.payload) {
            return invalid("`payload` must not contain the character U+0000".into());
        }
        if self.tags.iter().any(|t| t.contains('\0')) {
            return invalid("`tags` must not contain the character U+0000".into());
        }
        if self.metadata.iter().any(|(k, v)| k.contains('\0') || v.contains('\0')) {
            return invalid("`metadata` must not contain the character U+0000".into());
        }
        // Times are answered in RFC 3339, which has four-digit years.
        let last =
            chrono::NaiveDate::from_ymd_opt(9999, 12, 31).and_then(|d| d.and_hms_opt(0, 0, 0)).map(|t| t.and_utc());
        let start_at = match &self.start {
            Start::After(d) => chrono::Duration::from_std(*d).ok().and_then(|d| Utc::now().checked_add_signed(d)),
            Start::At(t) => Some(*t),
            Start::Now => Some(Utc::now()),
        };
        if start_at.is_none() || [start_at, self.expires_at].into_iter().flatten().any(|t| Some(t) > last) {
            return invalid("`delay`, `run_at`, `ttl` and `expires_at` must end before the year 10000".into());
        }
        if let Some(at) = self.expires_at {
            if at <= Utc::now() {
                return invalid("`expires_at` is in the past".into());
            }
            let starts = match self.start {
                Start::Now => None,
                Start::After(d) => chrono::Duration::from_std(d).ok().map(|d| Utc::now() + d),
                Start::At(t) => Some(t),
            };
            if starts.is_some_and(|s| s >= at) {
                return invalid("`expires_at` must be after the job's start (`delay` / `run_at`)".into());
            }
        }
        Ok(())
    }
}

/// The longest `unique_ttl`: a lock past it would outlive any retention and overflow Redis'
/// expiry arithmetic well before `u64` milliseconds do.
pub const MAX_UNIQUE_TTL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// Whether a string or key anywhere in `v` holds U+0000.
pub fn has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(has_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// The full view of a job: envelope plus the mutable state, as the API returns it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Id.
    pub id: JobId,
    /// Handler name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Queue.
    pub queue: QueueName,
    /// Priority.
    pub priority: Priority,
    /// Current state.
    pub state: JobState,
    /// Attempts started in the current run.
    pub attempt: u32,
    /// Attempt budget per run.
    pub max_attempts: u32,
    /// 1, plus one per retry from the dead-letter queue.
    pub run: u32,
    /// Handler input.
    pub payload: serde_json::Value,
    /// Handler output of the successful attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Retry policy.
    pub backoff: Backoff,
    /// Per-attempt timeout.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "30s"))]
    #[serde(with = "crate::duration::serde_human_opt", skip_serializing_if = "Option::is_none", default)]
    pub timeout: Option<Duration>,
    /// Accepted at.
    pub created_at: DateTime<Utc>,
    /// When it became (or becomes) ready to run.
    pub run_at: Option<DateTime<Utc>>,
    /// Start of the latest attempt.
    pub started_at: Option<DateTime<Utc>>,
    /// End of the latest attempt.
    pub finished_at: Option<DateTime<Utc>>,
    /// Error of the latest failed attempt.
    pub last_error: Option<String>,
    /// Deadline to start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Deduplication key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    /// Partition key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    /// Jobs this one waits for (state `waiting` until they finish).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<JobId>,
    /// What the dependencies must reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency_mode: Option<DependencyMode>,
    /// Name of the API key that enqueued it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enqueued_by: Option<String>,
    /// Times the job was taken back from a worker that stopped while running it.
    pub reclaims: u32,
    /// A cancel was requested while the job was running.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub cancel_requested: bool,
    /// Why the job is dead (`max_attempts`, `fatal`, `unknown_type`, `expired`, `max_reclaims`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_reason: Option<String>,
    /// What the running (or last) attempt reported through `JobContext::progress`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The last checkpoint saved by an attempt; the next attempt of the run resumes from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<serde_json::Value>,
    /// While scheduled after being held back by a limit or an open circuit: which one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    /// Metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// Most entries in `depends_on`.
pub const MAX_DEPENDENCIES: usize = 1000;

/// Metadata entries jobq writes itself: the trace context of the enqueuing request, and the
/// schedule and tick of a cron job, or the trigger of a schedule's manual run. They do not count
/// towards the 64 entries a job may carry.
pub const SYSTEM_METADATA: [&str; 5] = ["traceparent", "tracestate", "schedule", "tick", "trigger"];

/// What the jobs in `depends_on` must reach before the dependent job is queued.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DependencyMode {
    /// All succeeded; one dead or cancelled dead-letters the dependent (`dependency_failed`).
    #[default]
    Succeeded,
    /// All finished in any state (a batch's on-complete callback).
    Finished,
}

impl DependencyMode {
    /// The name stored in Redis.
    pub fn as_str(self) -> &'static str {
        match self {
            DependencyMode::Succeeded => "succeeded",
            DependencyMode::Finished => "finished",
        }
    }
}

/// Progress reported by a running attempt.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// 0 to 100.
    pub percent: f32,
    /// What the handler is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it was reported.
    pub at: DateTime<Utc>,
}

/// The trace id and parent span id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn parse_traceparent(v: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    match parts[..] {
        [version, trace, span, flags]
            if hex(version, 2) && version != "ff" && hex(trace, 32) && hex(span, 16) && hex(flags, 2) =>
        {
            (trace.bytes().any(|b| b != b'0') && span.bytes().any(|b| b != b'0')).then_some((trace, span))
        }
        _ => None,
    }
}

/// Milliseconds since the epoch to a UTC time.
pub fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::Backoff;

    fn envelope() -> Envelope {
        Envelope {
            v: ENVELOPE_VERSION,
            id: JobId::new(),
            kind: "email.send".into(),
            queue: "mail".parse().unwrap(),
            priority: Priority::High,
            payload: serde_json::json!({"to": "a@b.c"}),
            max_attempts: 5,
            backoff: Backoff::default(),
            timeout: Some(Duration::from_secs(30)),
            created_at: Utc::now(),
            expires_at: None,
            unique_key: Some("u1".into()),
            partition_key: None,
            depends_on: Vec::new(),
            dependency_mode: None,
            enqueued_by: None,
            metadata: BTreeMap::from([("traceparent".into(), "00-abc".into())]),
            tags: vec!["t".into()],
        }
    }

    #[test]
    fn metadata_jobq_adds_itself_does_not_count_towards_the_limit() {
        let mut job = NewJob::new("report", serde_json::json!({}));
        job.metadata = (0..64).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        job.validate().unwrap();
        for name in SYSTEM_METADATA {
            job.metadata.insert(name.into(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        }
        job.validate().expect("64 entries of the caller's plus the ones jobq adds");
        job.metadata.insert("k64".into(), "v".into());
        let err = job.validate().unwrap_err().to_string();
        assert!(err.contains("at most 64 entries"), "{err}");
    }

    #[test]
    fn envelope_round_trips_through_json_with_its_version() {
        let env = envelope();
        let json = serde_json::to_value(&env).unwrap();
        assert_eq!(json["v"], 1);
        assert_eq!(json["type"], "email.send");
        assert_eq!(json["priority"], "high");
        assert_eq!(json["timeout"], "30s");
        let back: Envelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn envelope_times_read_as_chrono_reads_them_strict_rfc3339_or_relaxed() {
        let mut env = envelope();
        env.expires_at = Some(Utc::now() + chrono::Duration::hours(1));
        // From a string (borrowed) and from a `Value` (owned strings), null and absent.
        let back: Envelope = serde_json::from_str(&serde_json::to_string(&env).unwrap()).unwrap();
        assert_eq!(back, env);
        let mut json = serde_json::to_value(&env).unwrap();
        assert_eq!(serde_json::from_value::<Envelope>(json.clone()).unwrap(), env);
        json["expires_at"] = serde_json::Value::Null;
        assert_eq!(serde_json::from_value::<Envelope>(json.clone()).unwrap().expires_at, None);
        json.as_object_mut().unwrap().remove("expires_at");
        assert_eq!(serde_json::from_value::<Envelope>(json.clone()).unwrap().expires_at, None);
        // Offsets and the forms only the relaxed parser takes give the same instants as chrono's
        // own Deserialize; what neither takes is an error.
        for written in [
            "2026-12-02T07:28:20.532Z",
            "2026-12-02T08:28:20.532+01:00",
            "2026-12-02 07:28:20.532Z",
            "2026-12-02T07:28:20.532 +00:00",
            "2026-12-02t07:28:20.532z",
        ] {
            json["created_at"] = written.into();
            let ours = serde_json::from_value::<Envelope>(json.clone()).unwrap().created_at;
            let chrono: DateTime<Utc> = serde_json::from_value(written.into()).unwrap();
            assert_eq!(ours, chrono, "{written}");
            assert_eq!(ours.timestamp_millis(), 1_796_196_500_532, "{written}");
        }
        for bad in ["yesterday", "2026-13-02T07:28:20Z", ""] {
            json["created_at"] = bad.into();
            assert!(serde_json::from_value::<Envelope>(json.clone()).is_err(), "{bad}");
        }
        json["created_at"] = 5.into();
        assert!(serde_json::from_value::<Envelope>(json).is_err());
    }

    #[test]
    fn queue_names_that_would_break_keys_are_refused() {
        assert!("default".parse::<QueueName>().is_ok());
        assert!("mail.v2-eu_1".parse::<QueueName>().is_ok());
        for bad in ["", "a b", "q}", "{q", "a:b", &"x".repeat(65)] {
            let err = bad.parse::<QueueName>().unwrap_err();
            assert!(err.contains("invalid queue name"), "{bad}: {err}");
        }
    }

    #[test]
    fn priorities_and_states_use_their_design_names() {
        let names: Vec<_> = Priority::ALL.iter().map(|p| p.to_string()).collect();
        assert_eq!(names, ["critical", "high", "normal", "low"]);
        assert!(Priority::Critical < Priority::Low);
        assert_eq!("dead".parse::<JobState>().unwrap(), JobState::Dead);
        assert!("bogus".parse::<JobState>().is_err());
        assert!(JobState::Succeeded.is_terminal() && !JobState::Retrying.is_terminal());
    }

    #[test]
    fn traceparents_are_parsed_and_garbage_is_refused() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parse_traceparent(tp), Some(("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")));
        for bad in [
            "",
            "00-abc-def-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            &tp.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn new_job_validation_names_the_field() {
        let err = NewJob::new("", serde_json::Value::Null).validate().unwrap_err();
        assert!(err.to_string().contains("`type`"));
        let err = NewJob::new("x", serde_json::Value::Null).max_attempts(0).validate().unwrap_err();
        assert!(err.to_string().contains("`max_attempts`"));
        assert!(NewJob::new("echo", serde_json::json!({})).validate().is_ok());
        let mut job = NewJob::new("x", serde_json::Value::Null);
        job.timeout = Some(Duration::from_secs(100_000_000_000 * 86_400));
        let err = job.validate().unwrap_err().to_string();
        assert!(err.contains("`timeout` must be at most 100 years"), "{err}");
        job.timeout = Some(Duration::from_secs(100 * 365 * 86_400));
        job.validate().unwrap();
    }

    #[test]
    fn a_start_or_deadline_past_the_year_9999_is_refused_wherever_the_job_comes_from() {
        let mut job = NewJob::new("echo", serde_json::json!({}));
        job.start = Start::After(Duration::from_secs(20_000 * 365 * 24 * 3600));
        assert!(job.validate().unwrap_err().to_string().contains("year 10000"));
        job.start = Start::After(Duration::MAX);
        assert!(job.validate().unwrap_err().to_string().contains("year 10000"));
        job.start = Start::After(Duration::from_secs(3600));
        job.expires_at =
            chrono::NaiveDate::from_ymd_opt(10_001, 1, 1).map(|d| d.and_hms_opt(0, 0, 0).unwrap().and_utc());
        assert!(job.validate().unwrap_err().to_string().contains("year 10000"));
        job.expires_at = None;
        assert!(job.validate().is_ok());
    }
}

//! Settings: embedded defaults (`config/default.toml`) → optional file → environment.
//!
//! Environment variables have flat names users can type (`JOBQ_WORKER_CONCURRENCY`), plus the
//! conventional `REDIS_URL` and `DATABASE_URL`; [`ENV_VARS`] lists every one. A bad value stops
//! the program at start with a message naming the setting and its variable.
//!
//! ```
//! let env = |name: &str| match name {
//!     "JOBQ_WORKER_CONCURRENCY" => Some("8".to_owned()),
//!     "JOBQ_AUTH" => Some("off".to_owned()),
//!     _ => None,
//! };
//! let settings = jobq_core::config::load_from(None, env).unwrap();
//! assert_eq!(settings.worker.concurrency, 8);
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::backoff::Backoff;
use crate::duration::serde_setting;
use crate::job::QueueName;

const DEFAULTS: &str = include_str!("../../../config/default.toml");

/// Environment variable → setting key. Earlier entries win over later ones for the same key.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("JOBQ_NAMESPACE", "namespace"),
    ("JOBQ_REDIS_URL", "redis.url"),
    ("REDIS_URL", "redis.url"),
    ("JOBQ_REDIS_ALLOW_EVICTION", "redis.allow_eviction"),
    ("JOBQ_REDIS_TIMEOUT", "redis.timeout"),
    ("JOBQ_DATABASE_URL", "database.url"),
    ("DATABASE_URL", "database.url"),
    ("JOBQ_DATABASE_MAX_CONNECTIONS", "database.max_connections"),
    ("JOBQ_DATABASE_MIGRATE", "database.migrate"),
    ("JOBQ_DATABASE_CREATE", "database.create"),
    ("JOBQ_API_ADDR", "api.addr"),
    ("JOBQ_API_BODY_LIMIT", "api.body_limit"),
    ("JOBQ_API_PAYLOAD_LIMIT", "api.payload_limit"),
    ("JOBQ_AUTH", "api.auth"),
    ("JOBQ_API_KEYS", "api.keys"),
    ("JOBQ_API_RATE_LIMIT", "api.rate_limit"),
    ("JOBQ_API_RATE_BURST", "api.rate_burst"),
    ("JOBQ_API_DLQ_REPLAY_RATE", "api.dlq_replay_rate"),
    ("JOBQ_WORKER_CONCURRENCY", "worker.concurrency"),
    ("JOBQ_WORKER_QUEUES", "worker.queues"),
    ("JOBQ_WORKER_SHUTDOWN_TIMEOUT", "worker.shutdown_timeout"),
    ("JOBQ_WORKER_POLL_INTERVAL", "worker.poll_interval"),
    ("JOBQ_WORKER_ID", "worker.id"),
    ("JOBQ_WORKER_LEASE", "worker.lease"),
    ("JOBQ_WORKER_HEARTBEAT", "worker.heartbeat"),
    ("JOBQ_WORKER_REAPER_INTERVAL", "worker.reaper_interval"),
    ("JOBQ_WORKER_MAX_RECLAIMS", "worker.max_reclaims"),
    ("JOBQ_WORKER_THREADS", "worker.threads"),
    ("JOBQ_SCHEDULER_PROMOTE_INTERVAL", "scheduler.promote_interval"),
    ("JOBQ_SCHEDULER_PROMOTE_BATCH", "scheduler.promote_batch"),
    ("JOBQ_SCHEDULER_RECORD_BATCH", "scheduler.record_batch"),
    ("JOBQ_SCHEDULER_RECLAIM_IDLE", "scheduler.reclaim_idle"),
    ("JOBQ_SCHEDULER_CRON_POLL", "scheduler.cron_poll"),
    ("JOBQ_SCHEDULER_MISFIRE_GRACE", "scheduler.misfire_grace"),
    ("JOBQ_JOBS_MAX_ATTEMPTS", "jobs.max_attempts"),
    ("JOBQ_JOBS_TIMEOUT", "jobs.timeout"),
    ("JOBQ_RETENTION_SUCCEEDED", "retention.succeeded"),
    ("JOBQ_RETENTION_DEAD", "retention.dead"),
    ("JOBQ_RETENTION_HISTORY", "retention.history"),
    ("JOBQ_RETENTION_DLQ", "retention.dlq"),
    ("JOBQ_METRICS_ADDR", "metrics_addr"),
    ("JOBQ_LOG_FORMAT", "log.format"),
    ("JOBQ_LOG_LEVEL", "log.level"),
    ("JOBQ_OTLP_ENDPOINT", "log.otlp_endpoint"),
];

/// A setting that could not be read or makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Every setting of every jobq process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Prefix of every Redis key.
    pub namespace: String,
    /// Where the worker and the scheduler serve /health, /ready and /metrics ("" = not served).
    pub metrics_addr: String,
    /// Redis connection.
    pub redis: RedisSettings,
    /// Postgres connection.
    pub database: DatabaseSettings,
    /// REST API.
    pub api: ApiSettings,
    /// Worker processes.
    pub worker: WorkerSettings,
    /// Scheduler processes.
    pub scheduler: SchedulerSettings,
    /// Defaults of jobs that set none.
    pub jobs: JobDefaults,
    /// How long finished jobs are kept.
    pub retention: RetentionSettings,
    /// Logging.
    pub log: LogSettings,
    /// Cron schedules declared in the config file, upserted by the scheduler at start.
    #[serde(default)]
    pub schedules: Vec<crate::schedule::ScheduleSpec>,
}

/// `[redis]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port/db`.
    pub url: String,
    /// Run even when Redis may evict keys.
    pub allow_eviction: bool,
    /// Longest wait for a reply.
    #[serde(with = "serde_setting")]
    pub timeout: Duration,
}

/// `[database]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user@host:port/db`.
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// Apply migrations at start.
    pub migrate: bool,
    /// Create the database if missing.
    pub create: bool,
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Listen address.
    pub addr: SocketAddr,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Largest job payload in bytes.
    pub payload_limit: usize,
    /// `on` (default) or `off`: API keys required.
    #[serde(deserialize_with = "on_off")]
    pub auth: bool,
    /// API keys (hashes) with their roles.
    #[serde(deserialize_with = "key_list")]
    pub keys: Vec<ApiKey>,
    /// Requests per second per key (0 = unlimited).
    pub rate_limit: u32,
    /// Burst size of the per-key rate limit.
    pub rate_burst: u32,
    /// Jobs per second a DLQ retry-by-filter re-enqueues.
    pub dlq_replay_rate: u32,
}

/// What an API key may do (see `jobq_api::auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Enqueue, and read its own jobs.
    Producer,
    /// Read everything.
    Reader,
}

impl Role {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Producer => "producer",
            Role::Reader => "reader",
        }
    }
}

/// One API key: a name (for logs and audit), a role, and the hex SHA-256 of the key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Name shown in logs and the audit log.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Lowercase hex SHA-256 of the key (`jobq api-key` makes one).
    pub sha256: String,
}

fn on_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bool(bool),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Bool(b) => Ok(b),
        Raw::Text(t) => match t.to_ascii_lowercase().as_str() {
            "on" | "true" | "1" => Ok(true),
            "off" | "false" | "0" => Ok(false),
            _ => Err(serde::de::Error::custom(format!("expected on or off, got `{t}`"))),
        },
    }
}

/// `"name:role:sha256,..."` (environment) or a list of tables (file).
fn key_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ApiKey>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        List(Vec<ApiKey>),
    }
    let keys = match Raw::deserialize(d)? {
        Raw::List(l) => l,
        Raw::Text(t) => t
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let parts: Vec<&str> = p.split(':').collect();
                let [name, role, sha256] = parts[..] else {
                    return Err(serde::de::Error::custom(format!("expected name:role:sha256, got `{p}`")));
                };
                let role = serde_json::from_value(serde_json::Value::String(role.to_owned())).map_err(|_| {
                    serde::de::Error::custom(format!("unknown role `{role}` (admin, producer or reader)"))
                })?;
                Ok(ApiKey { name: name.to_owned(), role, sha256: sha256.to_owned() })
            })
            .collect::<Result<_, _>>()?,
    };
    for k in &keys {
        let hex = k.sha256.len() == 64 && k.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if !hex || k.name.trim().is_empty() {
            return Err(serde::de::Error::custom(format!(
                "key `{}`: sha256 must be 64 lowercase hex digits (the hash of the key, not the key)",
                k.name
            )));
        }
    }
    Ok(keys)
}

/// Checks the name of a new API key (`jobq api-key`): 1-64 characters, none of them `:`, `,`,
/// whitespace or a control character, so that its `JOBQ_API_KEYS` line (which separates with
/// `:` and `,`) reads back. Names in a file only need to be non-empty.
pub fn valid_key_name(name: &str) -> Result<(), String> {
    let bad = |c: char| c == ':' || c == ',' || c.is_whitespace() || c.is_control();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(bad) {
        return Err(format!("key name `{name}`: 1-64 characters without `:`, `,`, whitespace or control characters"));
    }
    Ok(())
}

/// `[worker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Jobs at once.
    pub concurrency: usize,
    /// Served queues: in strict order (highest first), or weighted when weights are given.
    #[serde(deserialize_with = "queue_list")]
    pub queues: QueueSelection,
    /// Grace period for in-flight jobs on shutdown.
    #[serde(with = "serde_setting")]
    pub shutdown_timeout: Duration,
    /// Longest idle wait.
    #[serde(with = "serde_setting")]
    pub poll_interval: Duration,
    /// Consumer name ("" = generated).
    pub id: String,
    /// A running job whose worker has not renewed its lease for this long is reclaimed.
    #[serde(with = "serde_setting")]
    pub lease: Duration,
    /// How often a worker renews the leases of its running jobs.
    #[serde(with = "serde_setting")]
    pub heartbeat: Duration,
    /// How often a worker looks for jobs with lapsed leases.
    #[serde(with = "serde_setting")]
    pub reaper_interval: Duration,
    /// Reclaims after which a job is dead (reason `max_reclaims`): a job that kills its worker.
    pub max_reclaims: u32,
    /// Runtime threads of a worker binary (`jobq_worker::main`, `main_with`); 0 = one per core.
    pub threads: usize,
}

/// The queues a worker serves and how it picks among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSelection {
    /// Queue names with their weights (all 1 in strict mode).
    pub queues: Vec<(QueueName, u32)>,
    /// Strict: always the first queue with work. Weighted: the queues share the worker's slots
    /// in proportion to their weights (smooth weighted round-robin, see `jobq_worker::QueuePlanner`).
    pub weighted: bool,
}

impl QueueSelection {
    /// The queue names, in configured order.
    pub fn names(&self) -> Vec<QueueName> {
        self.queues.iter().map(|(q, _)| q.clone()).collect()
    }
}

/// `[scheduler]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    /// Promotion period.
    #[serde(with = "serde_setting")]
    pub promote_interval: Duration,
    /// Jobs promoted per queue per call.
    pub promote_batch: usize,
    /// Events per Postgres transaction.
    pub record_batch: usize,
    /// Take over outbox entries idle this long.
    #[serde(with = "serde_setting")]
    pub reclaim_idle: Duration,
    /// How often due cron ticks are looked for.
    #[serde(with = "serde_setting")]
    pub cron_poll: Duration,
    /// A tick later than this is a misfire, handled by the schedule's misfire policy.
    #[serde(with = "serde_setting")]
    pub misfire_grace: Duration,
}

/// `[jobs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDefaults {
    /// Attempt budget.
    pub max_attempts: u32,
    /// Per-attempt timeout.
    #[serde(with = "serde_setting")]
    pub timeout: Duration,
    /// Retry policy.
    pub backoff: Backoff,
}

/// `[retention]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Succeeded job hashes.
    #[serde(with = "serde_setting")]
    pub succeeded: Duration,
    /// Dead job hashes.
    #[serde(with = "serde_setting")]
    pub dead: Duration,
    /// `job_executions` rows in Postgres.
    #[serde(with = "serde_setting")]
    pub history: Duration,
    /// `dead_jobs` rows in Postgres.
    #[serde(with = "serde_setting")]
    pub dlq: Duration,
}

/// Output format of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Pretty,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// json | pretty.
    pub format: LogFormat,
    /// tracing filter.
    pub level: String,
    /// OpenTelemetry collector base URL (`http://host:4318`); spans are exported over OTLP/HTTP
    /// to `<endpoint>/v1/traces`. Empty: no export.
    #[serde(default)]
    pub otlp_endpoint: String,
}

/// Parses `"critical,default,low"` (strict order) or `"critical=6,default=3,low=1"` (weights).
pub fn parse_queues(names: &[String]) -> Result<QueueSelection, String> {
    let mut queues = Vec::new();
    let mut weights = 0;
    for n in names {
        let (name, weight) = match n.split_once('=') {
            Some((name, w)) => {
                weights += 1;
                let w: u32 =
                    w.trim().parse().map_err(|_| format!("invalid weight in `{n}`: expected a whole number"))?;
                if !(1..=1000).contains(&w) {
                    return Err(format!("weight of `{name}` must be between 1 and 1000"));
                }
                (name.trim(), w)
            }
            None => (n.trim(), 1),
        };
        let q = QueueName::try_from(name.to_owned())?;
        if queues.iter().any(|(x, _)| *x == q) {
            return Err(format!("queue `{q}` is listed twice"));
        }
        queues.push((q, weight));
    }
    if queues.is_empty() {
        return Err("at least one queue is required".into());
    }
    if weights != 0 && weights != queues.len() {
        return Err("give every queue a weight (`a=3,b=1`) or none (strict order)".into());
    }
    Ok(QueueSelection { queues, weighted: weights > 0 })
}

fn queue_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<QueueSelection, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        List(Vec<String>),
    }
    let names = match Raw::deserialize(d)? {
        Raw::Text(s) => s.split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect(),
        Raw::List(l) => l,
    };
    parse_queues(&names).map_err(serde::de::Error::custom)
}

/// Loads settings from the defaults, the optional file and the process environment.
pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
    load_from(file, |name| std::env::var(name).ok())
}

/// Like [`load`], reading variables through `env` (tests pass a closure instead of mutating
/// the process environment).
pub fn load_from(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
    load_layered(file, env, "")
}

/// Like [`load_from`], with `defaults` (TOML) over the built-in defaults and under the file and
/// the environment: a command's own defaults (`jobq dev` runs with auth off unless the file or
/// the environment says otherwise).
pub fn load_layered(
    file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
    defaults: &str,
) -> Result<Settings, ConfigError> {
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
        .add_source(config::File::from_str(defaults, config::FileFormat::Toml));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError(format!("config file {} does not exist", path.display())));
        }
        builder = builder.add_source(config::File::from(path));
    }
    let mut set = std::collections::HashSet::new();
    for (var, key) in ENV_VARS {
        // An empty variable is unset, as `.env` files and compose files leave them.
        if let Some(value) = env(var).filter(|v| !v.trim().is_empty()) {
            if set.insert(*key) {
                builder = builder.set_override(*key, value).map_err(|e| ConfigError(e.to_string()))?;
            }
        }
    }
    let settings: Settings =
        builder.build().and_then(|c| c.try_deserialize()).map_err(|e| ConfigError(explain(&e.to_string())))?;
    settings.validate()?;
    Ok(settings)
}

/// Adds the environment variable to a message that names a setting key.
fn explain(message: &str) -> String {
    for (var, key) in ENV_VARS {
        if message.contains(&format!("`{key}`")) || message.contains(&format!("key {key}")) {
            return format!("{message} (environment variable {var})");
        }
    }
    message.to_owned()
}

/// The environment variables of a setting key (`REDIS_URL or JOBQ_REDIS_URL`).
fn var_of(key: &str) -> String {
    let vars: Vec<&str> = ENV_VARS.iter().filter(|(_, k)| *k == key).map(|(v, _)| *v).collect();
    vars.join(" or ")
}

/// Longest duration any setting (or a job's `timeout`) takes: beyond it, times computed from
/// it overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Longest wait between two passes of a loop (polling, promotion, reaping, cron).
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// Most jobs per second a DLQ retry-by-filter is set to re-enqueue.
pub const MAX_REPLAY_RATE: u32 = 100_000;

impl Settings {
    /// Checks values and relations between values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("`{key}` ({}) {why}", var_of(key))));
        let ns_ok = self.namespace.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
        if self.namespace.is_empty() || !ns_ok || self.namespace.contains('{') {
            return bad(
                "namespace",
                format!("must be non-empty and use A-Z, a-z, 0-9, '_', '-', '.', ':', got `{}`", self.namespace),
            );
        }
        if !self.log.otlp_endpoint.is_empty() && !self.log.otlp_endpoint.starts_with("http://") {
            let got = &self.log.otlp_endpoint;
            return bad("log.otlp_endpoint", format!("must be an http:// URL of an OTLP collector, got `{got}`"));
        }
        if !self.metrics_addr.is_empty() && self.metrics_addr.parse::<SocketAddr>().is_err() {
            return bad("metrics_addr", format!("must be host:port, got `{}`", self.metrics_addr));
        }
        if !self.redis.url.starts_with("redis://")
            && !self.redis.url.starts_with("rediss://")
            && !self.redis.url.starts_with("unix://")
        {
            return bad(
                "redis.url",
                format!("must start with redis://, rediss:// or unix://, got `{}`", self.redis.url),
            );
        }
        if !self.database.url.starts_with("postgres://") && !self.database.url.starts_with("postgresql://") {
            return bad("database.url", "must start with postgres:// or postgresql://".into());
        }
        if self.database.max_connections == 0 {
            return bad("database.max_connections", "must be at least 1".into());
        }
        if !(1..=10_000).contains(&self.worker.concurrency) {
            return bad("worker.concurrency", format!("must be between 1 and 10000, got {}", self.worker.concurrency));
        }
        // The consumer name goes into every attempt's history row: Postgres takes no U+0000.
        if self.worker.id.chars().count() > 200 || self.worker.id.chars().any(char::is_control) {
            return bad("worker.id", "must be at most 200 characters, none of them a control character".into());
        }
        if self.worker.threads > 1024 {
            return bad(
                "worker.threads",
                format!("must be at most 1024 (0 = one per core), got {}", self.worker.threads),
            );
        }
        if self.worker.lease < Duration::from_millis(100) {
            return bad("worker.lease", "must be at least 100ms".into());
        }
        let durations = [
            ("redis.timeout", self.redis.timeout),
            ("worker.shutdown_timeout", self.worker.shutdown_timeout),
            ("worker.poll_interval", self.worker.poll_interval),
            ("worker.lease", self.worker.lease),
            ("worker.heartbeat", self.worker.heartbeat),
            ("worker.reaper_interval", self.worker.reaper_interval),
            ("scheduler.promote_interval", self.scheduler.promote_interval),
            ("scheduler.reclaim_idle", self.scheduler.reclaim_idle),
            ("scheduler.cron_poll", self.scheduler.cron_poll),
            ("scheduler.misfire_grace", self.scheduler.misfire_grace),
            ("jobs.timeout", self.jobs.timeout),
            ("retention.succeeded", self.retention.succeeded),
            ("retention.dead", self.retention.dead),
            ("retention.history", self.retention.history),
            ("retention.dlq", self.retention.dlq),
        ];
        for (key, d) in durations {
            if d > MAX_DURATION {
                return bad(key, format!("must be at most 100 years, got {}", crate::duration::format(d)));
            }
        }
        for (key, d) in [
            ("worker.poll_interval", self.worker.poll_interval),
            ("worker.reaper_interval", self.worker.reaper_interval),
            ("scheduler.promote_interval", self.scheduler.promote_interval),
            ("scheduler.cron_poll", self.scheduler.cron_poll),
        ] {
            if d > MAX_INTERVAL {
                return bad(key, format!("must be at most 1h, got {}", crate::duration::format(d)));
            }
        }
        if self.redis.timeout < Duration::from_millis(100) {
            return bad("redis.timeout", "must be at least 100ms".into());
        }
        if self.scheduler.reclaim_idle < Duration::from_secs(1) {
            return bad(
                "scheduler.reclaim_idle",
                "must be at least 1s: a shorter one lets recorders take each other's batches while they are written"
                    .into(),
            );
        }
        if self.worker.heartbeat.is_zero() || self.worker.heartbeat > self.worker.lease / 2 {
            return bad(
                "worker.heartbeat",
                format!(
                    "must be above zero and at most half of JOBQ_WORKER_LEASE ({}), so a lease is renewed well before it lapses",
                    crate::duration::format(self.worker.lease)
                ),
            );
        }
        if self.worker.reaper_interval < Duration::from_millis(10) {
            return bad("worker.reaper_interval", "must be at least 10ms".into());
        }
        if self.worker.poll_interval < Duration::from_millis(10) {
            return bad("worker.poll_interval", "must be at least 10ms".into());
        }
        if self.scheduler.promote_interval < Duration::from_millis(10) {
            return bad("scheduler.promote_interval", "must be at least 10ms".into());
        }
        if self.scheduler.promote_batch == 0 {
            return bad("scheduler.promote_batch", "must be at least 1".into());
        }
        if self.scheduler.record_batch == 0 {
            return bad("scheduler.record_batch", "must be at least 1".into());
        }
        if !(1..=1000).contains(&self.jobs.max_attempts) {
            return bad("jobs.max_attempts", format!("must be between 1 and 1000, got {}", self.jobs.max_attempts));
        }
        if self.jobs.timeout.is_zero() {
            return bad("jobs.timeout", "must be greater than zero".into());
        }
        self.jobs.backoff.validate().map_err(|e| ConfigError(format!("jobs.backoff: {e}")))?;
        if self.api.payload_limit == 0 {
            return bad("api.payload_limit", "must be at least 1 byte".into());
        }
        if !(1..=MAX_REPLAY_RATE).contains(&self.api.dlq_replay_rate) {
            return bad(
                "api.dlq_replay_rate",
                format!("must be between 1 and {MAX_REPLAY_RATE} jobs/s, got {}", self.api.dlq_replay_rate),
            );
        }
        // Zero would mean "never" for one and "at once" for the others: a retention is a time.
        for (key, d) in [
            ("retention.dead", self.retention.dead),
            ("retention.history", self.retention.history),
            ("retention.dlq", self.retention.dlq),
        ] {
            if d < Duration::from_secs(1) {
                return bad(key, format!("must be at least 1s, got {}", crate::duration::format(d)));
            }
        }
        // A key's name decides what a producer sees and its rate limit; its hash, which key
        // was given: both are one key's own.
        let (mut key_names, mut key_hashes) = (std::collections::HashSet::new(), std::collections::HashSet::new());
        for k in &self.api.keys {
            if !key_names.insert(&k.name) {
                return bad("api.keys", format!("name `{}` is given to two keys; each key needs its own", k.name));
            }
            if !key_hashes.insert(&k.sha256) {
                return bad(
                    "api.keys",
                    format!("key `{}` has the hash of another key; each key needs its own", k.name),
                );
            }
        }
        if self.api.payload_limit > self.api.body_limit {
            return bad("api.payload_limit", "must not exceed api.body_limit".into());
        }
        if self.scheduler.cron_poll < Duration::from_millis(10) {
            return bad("scheduler.cron_poll", "must be at least 10ms".into());
        }
        if self.scheduler.misfire_grace < self.scheduler.cron_poll {
            return bad("scheduler.misfire_grace", "must be at least JOBQ_SCHEDULER_CRON_POLL".into());
        }
        let mut names = std::collections::HashSet::new();
        for spec in &self.schedules {
            spec.validate().map_err(|e| ConfigError(format!("schedule `{}`: {e}", spec.name)))?;
            if !names.insert(&spec.name) {
                return Err(ConfigError(format!("schedule `{}` is declared twice", spec.name)));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return bad("log.level", format!("is not a valid filter: `{}`", self.log.level));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        map.entry("JOBQ_AUTH".into()).or_insert_with(|| "off".into());
        load_from(None, |n| map.get(n).cloned())
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = with(&[("JOBQ_AUTH", "off")]).unwrap();
        assert_eq!(s.namespace, "jobq");
        assert_eq!(s.api.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.worker.queues.names(), vec![QueueName::default_queue()]);
        assert!(!s.worker.queues.weighted);
        assert_eq!(s.worker.lease, Duration::from_secs(30));
        assert_eq!(s.worker.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(s.jobs.backoff, Backoff::default());
    }

    #[test]
    fn documented_environment_names_override_defaults() {
        let s = with(&[
            ("REDIS_URL", "redis://10.0.0.1:6380"),
            ("DATABASE_URL", "postgres://u@db/x"),
            ("JOBQ_NAMESPACE", "staging"),
            ("JOBQ_API_ADDR", "0.0.0.0:9000"),
            ("JOBQ_WORKER_CONCURRENCY", "7"),
            ("JOBQ_WORKER_QUEUES", "critical, default,low"),
            ("JOBQ_LOG_FORMAT", "json"),
            ("JOBQ_LOG_LEVEL", "debug"),
            ("JOBQ_WORKER_SHUTDOWN_TIMEOUT", "5s"),
        ])
        .unwrap();
        assert_eq!(s.redis.url, "redis://10.0.0.1:6380");
        assert_eq!(s.database.url, "postgres://u@db/x");
        assert_eq!(s.namespace, "staging");
        assert_eq!(s.api.addr.port(), 9000);
        assert_eq!(s.worker.concurrency, 7);
        let q: Vec<_> = s.worker.queues.names().iter().map(|q| q.to_string()).collect();
        assert_eq!(q, ["critical", "default", "low"]);
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.worker.shutdown_timeout, Duration::from_secs(5));
    }

    #[test]
    fn api_keys_parse_from_the_environment_and_auth_needs_them() {
        let (hash, other) = ("a".repeat(64), "b".repeat(64));
        let s =
            with(&[("JOBQ_AUTH", "on"), ("JOBQ_API_KEYS", &format!("ci:producer:{hash}, ops:admin:{other}"))]).unwrap();
        assert!(s.api.auth);
        assert_eq!(s.api.keys.iter().map(|k| k.role).collect::<Vec<_>>(), [Role::Producer, Role::Admin]);
        // Two keys with one name (a producer would see the other's jobs) or one hash.
        for (keys, says) in [
            (format!("ci:producer:{hash},ci:admin:{other}"), "name `ci`"),
            (format!("ci:producer:{hash},ops:admin:{hash}"), "hash"),
        ] {
            let err = with(&[("JOBQ_AUTH", "on"), ("JOBQ_API_KEYS", &keys)]).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains("JOBQ_API_KEYS"), "{keys}: {err}");
        }
        for bad in ["ci:producer", "ci:boss:aaaa", &format!("ci:reader:{}", "A".repeat(64)), &format!(":reader:{hash}")]
        {
            let err = with(&[("JOBQ_AUTH", "on"), ("JOBQ_API_KEYS", bad)]).unwrap_err().to_string();
            assert!(err.contains("JOBQ_API_KEYS") || err.contains("key"), "{bad}: {err}");
        }
        assert!(with(&[("JOBQ_AUTH", "maybe")]).unwrap_err().to_string().contains("JOBQ_AUTH"));
    }

    #[test]
    fn weighted_queues_parse_with_their_weights() {
        let s = with(&[("JOBQ_WORKER_QUEUES", "critical=6, default=3,low=1")]).unwrap();
        assert!(s.worker.queues.weighted);
        let w: Vec<u32> = s.worker.queues.queues.iter().map(|(_, w)| *w).collect();
        assert_eq!(w, [6, 3, 1]);
    }

    #[test]
    fn prefixed_variable_wins_over_conventional_one() {
        let s = with(&[("REDIS_URL", "redis://a"), ("JOBQ_REDIS_URL", "redis://b")]).unwrap();
        assert_eq!(s.redis.url, "redis://b");
    }

    #[test]
    fn bad_values_name_the_setting_and_its_variable() {
        for (var, value) in [
            ("JOBQ_WORKER_CONCURRENCY", "many"),
            ("JOBQ_WORKER_CONCURRENCY", "0"),
            ("JOBQ_API_ADDR", "nowhere"),
            ("JOBQ_LOG_FORMAT", "xml"),
            ("JOBQ_WORKER_QUEUES", "a b"),
            ("JOBQ_WORKER_SHUTDOWN_TIMEOUT", "soon"),
            ("REDIS_URL", "http://x"),
            ("JOBQ_NAMESPACE", "a{b}"),
            ("JOBQ_WORKER_QUEUES", "a=3,b"),
            ("JOBQ_WORKER_QUEUES", "a=x"),
            ("JOBQ_WORKER_QUEUES", "a,a"),
            ("JOBQ_WORKER_HEARTBEAT", "20s"),
            ("JOBQ_WORKER_THREADS", "2000"),
            ("JOBQ_WORKER_THREADS", "-1"),
            ("JOBQ_OTLP_ENDPOINT", "collector:4318"),
            ("JOBQ_WORKER_ID", "w\u{0}1"),
            ("JOBQ_WORKER_ID", "w\n1"),
        ] {
            let err = with(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn a_duration_setting_needs_a_unit_unless_it_is_zero() {
        let err = with(&[("JOBQ_JOBS_TIMEOUT", "600")]).unwrap_err().to_string();
        assert!(err.contains("no unit") && err.contains("600s") && err.contains("JOBQ_JOBS_TIMEOUT"), "{err}");
        let s = with(&[("JOBQ_JOBS_TIMEOUT", "600s"), ("JOBQ_RETENTION_SUCCEEDED", "0")]).unwrap();
        assert_eq!(s.jobs.timeout, Duration::from_secs(600));
        assert_eq!(s.retention.succeeded, Duration::ZERO);
        // A number in a file is refused the same way.
        let dir = std::env::temp_dir().join(format!("jobq-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jobq.toml");
        std::fs::write(&path, "[worker]\nshutdown_timeout = 30\n").unwrap();
        let err = load_from(Some(&path), |n| (n == "JOBQ_AUTH").then(|| "off".into())).unwrap_err().to_string();
        assert!(err.contains("no unit") && err.contains("worker.shutdown_timeout"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_empty_variable_is_unset() {
        let hash = "a".repeat(64);
        let dir = std::env::temp_dir().join(format!("jobq-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jobq.toml");
        std::fs::write(&path, format!("[api]\nauth = \"on\"\nkeys = \"ops:admin:{hash}\"\n")).unwrap();
        // As an exported `.env` leaves them: empty values do not wipe the file's keys.
        let s = load_from(Some(&path), |n| match n {
            "JOBQ_API_KEYS" | "JOBQ_METRICS_ADDR" | "JOBQ_WORKER_ID" | "JOBQ_AUTH" => Some(String::new()),
            _ => None,
        })
        .unwrap();
        assert!(s.api.auth);
        assert_eq!(s.api.keys.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations_out_of_range_are_refused_without_a_panic() {
        for (var, value, says) in [
            ("JOBQ_WORKER_HEARTBEAT", "10000000000000000000s", "JOBQ_WORKER_HEARTBEAT"),
            ("JOBQ_RETENTION_HISTORY", "300000y", "100 years"),
            ("JOBQ_WORKER_LEASE", "200y", "100 years"),
            ("JOBQ_SCHEDULER_PROMOTE_INTERVAL", "2h", "at most 1h"),
            ("JOBQ_SCHEDULER_CRON_POLL", "1d", "at most 1h"),
            ("JOBQ_WORKER_POLL_INTERVAL", "90m", "at most 1h"),
            ("JOBQ_REDIS_TIMEOUT", "0", "at least 100ms"),
            ("JOBQ_SCHEDULER_RECLAIM_IDLE", "0", "at least 1s"),
            ("JOBQ_SCHEDULER_PROMOTE_BATCH", "0", "scheduler.promote_batch"),
            ("JOBQ_SCHEDULER_RECORD_BATCH", "0", "scheduler.record_batch"),
            ("JOBQ_RETENTION_DLQ", "0", "at least 1s"),
            ("JOBQ_RETENTION_HISTORY", "0", "at least 1s"),
            ("JOBQ_RETENTION_DEAD", "500ms", "at least 1s"),
            ("JOBQ_API_DLQ_REPLAY_RATE", "4294967295", "between 1 and 100000"),
            ("JOBQ_API_DLQ_REPLAY_RATE", "0", "between 1 and 100000"),
            ("JOBQ_API_PAYLOAD_LIMIT", "0", "at least 1 byte"),
        ] {
            let err = with(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains(var), "{var}={value}: {err}");
        }
        // Both variables of a setting are named.
        let err = with(&[("REDIS_URL", "http://x")]).unwrap_err().to_string();
        assert!(err.contains("JOBQ_REDIS_URL or REDIS_URL"), "{err}");
        let s = with(&[("JOBQ_SCHEDULER_PROMOTE_INTERVAL", "10s"), ("JOBQ_SCHEDULER_MISFIRE_GRACE", "1h")]).unwrap();
        assert_eq!(s.scheduler.promote_interval, Duration::from_secs(10));
    }

    #[test]
    fn a_file_overrides_defaults_and_env_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("jobq-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jobq.toml");
        std::fs::write(&path, "namespace = \"fromfile\"\n[worker]\nconcurrency = 3\n").unwrap();
        let s = load_from(Some(&path), |n| match n {
            "JOBQ_WORKER_CONCURRENCY" => Some("4".into()),
            "JOBQ_AUTH" => Some("off".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(s.namespace, "fromfile");
        assert_eq!(s.worker.concurrency, 4);
        let yaml = dir.join("jobq.yaml");
        std::fs::write(&yaml, "worker:\n  queues: [mail, default]\n").unwrap();
        let s = load_from(Some(&yaml), |n| (n == "JOBQ_AUTH").then(|| "off".into())).unwrap();
        assert_eq!(s.worker.queues.queues.len(), 2);
        std::fs::write(
            &yaml,
            "schedules:\n  - name: nightly\n    cron: \"0 30 2 * * *\"\n    timezone: Europe/Berlin\n    job: {type: report, payload: {full: true}}\n",
        )
        .unwrap();
        let s = load_from(Some(&yaml), |n| (n == "JOBQ_AUTH").then(|| "off".into())).unwrap();
        assert_eq!(s.schedules.len(), 1);
        assert_eq!(s.schedules[0].job.kind, "report");
        std::fs::write(&yaml, "schedules:\n  - name: bad\n    cron: \"whenever\"\n    job: {type: x}\n").unwrap();
        let err = load_from(Some(&yaml), |n| (n == "JOBQ_AUTH").then(|| "off".into())).unwrap_err().to_string();
        assert!(err.contains("schedule `bad`") && err.contains("`cron`"), "{err}");
        std::fs::write(&path, "[worker]\nconcurency = 3\n").unwrap();
        assert!(load_from(Some(&path), |n| (n == "JOBQ_AUTH").then(|| "off".into()))
            .unwrap_err()
            .to_string()
            .contains("concurency"));
        assert!(load_from(Some(&dir.join("missing.toml")), |n| (n == "JOBQ_AUTH").then(|| "off".into())).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}

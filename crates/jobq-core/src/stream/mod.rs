//! The broker: every Redis command jobq sends lives here.
//!
//! State changes of a job (enqueue, start, complete, fail/retry/dead-letter, promote, DLQ
//! re-enqueue) are each one Lua script in `lua/`, so the job hash, the stream or scheduled-set
//! membership and the outbox event change together or not at all. Scripts are sent with
//! EVALSHA in pipelines; after a Redis restart (empty script cache) they are loaded again and
//! the refused calls re-sent, so `NOSCRIPT` never reaches a caller.

pub mod keys;
pub mod outbox;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use chrono::Utc;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, Script, Value};
use serde_json::Value as Json;

pub use keys::Keys;

use crate::config::{JobDefaults, RetentionSettings, Settings};
use crate::error::{Error, Result};
use crate::job::{
    from_millis, DependencyMode, Envelope, JobId, JobInfo, JobState, NewJob, Priority, QueueName, Start,
    ENVELOPE_VERSION,
};

/// Most jobs in one enqueue script call: a 1,000-job batch holds Redis for a few short calls
/// rather than one long one.
const ENQUEUE_CHUNK: usize = 250;

/// One job's answer from the enqueue script: created (1, 0 existing, -1 unknown dependency),
/// state, run_at ms, job id.
type EnqueueReply = (i64, String, i64, String);

/// Splits the enqueue script's flat answer, four values per job.
fn enqueue_replies(reply: Value) -> Result<Vec<EnqueueReply>> {
    let flat: Vec<Value> = redis::from_redis_value(reply).map_err(protocol)?;
    flat.chunks(4)
        .map(|c| match c {
            [a, b, c, d] => Ok((
                redis::from_redis_value_ref(a).map_err(protocol)?,
                redis::from_redis_value_ref(b).map_err(protocol)?,
                redis::from_redis_value_ref(c).map_err(protocol)?,
                redis::from_redis_value_ref(d).map_err(protocol)?,
            )),
            _ => Err(protocol("short enqueue reply")),
        })
        .collect()
}

/// Longest stored handler result (JSON bytes); larger results are replaced by a marker.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

struct Scripts {
    enqueue: Script,
    fetch: Script,
    complete_many: Script,
    fail: Script,
    promote: Script,
    retry_dead: Script,
    heartbeat: Script,
    reclaim: Script,
    lease_register: Script,
    cancel: Script,
    cleanup_consumers: Script,
    touch: Script,
    slot_acquire: Script,
    rate_take: Script,
    breaker: Script,
    give_up: Script,
    disown: Script,
    run_now: Script,
    queue_jobs: Script,
}

/// Helpers prepended to every script.
const LIB: &str = include_str!("lua/lib.lua");

fn script(body: &str) -> Script {
    Script::new(&format!("local GROUP = '{}'\n{LIB}\n{body}", Keys::GROUP))
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    enqueue: script(include_str!("lua/enqueue.lua")),
    fetch: script(include_str!("lua/fetch.lua")),
    complete_many: script(include_str!("lua/complete_many.lua")),
    fail: script(include_str!("lua/fail.lua")),
    promote: script(include_str!("lua/promote.lua")),
    retry_dead: script(include_str!("lua/retry_dead.lua")),
    heartbeat: script(include_str!("lua/heartbeat.lua")),
    reclaim: script(include_str!("lua/reclaim.lua")),
    lease_register: script(include_str!("lua/lease_register.lua")),
    cancel: script(include_str!("lua/cancel.lua")),
    cleanup_consumers: script(include_str!("lua/cleanup_consumers.lua")),
    touch: script(include_str!("lua/touch.lua")),
    slot_acquire: script(include_str!("lua/slot_acquire.lua")),
    rate_take: script(include_str!("lua/rate_take.lua")),
    breaker: script(include_str!("lua/breaker.lua")),
    give_up: script(include_str!("lua/give_up.lua")),
    disown: script(include_str!("lua/disown.lua")),
    run_now: script(include_str!("lua/run_now.lua")),
    queue_jobs: script(include_str!("lua/queue_jobs.lua")),
});

/// Longest delay before a retry or a held-back job's next start.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn all_scripts() -> [&'static Script; 19] {
    let s = &*SCRIPTS;
    [
        &s.enqueue,
        &s.fetch,
        &s.complete_many,
        &s.fail,
        &s.promote,
        &s.retry_dead,
        &s.heartbeat,
        &s.reclaim,
        &s.lease_register,
        &s.cancel,
        &s.cleanup_consumers,
        &s.touch,
        &s.slot_acquire,
        &s.rate_take,
        &s.breaker,
        &s.give_up,
        &s.disown,
        &s.run_now,
        &s.queue_jobs,
    ]
}

/// One EVALSHA call, ready to be pipelined.
struct Call(Cmd);

impl Call {
    fn new(script: &Script, keys: &[&str]) -> Self {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
        Self(cmd)
    }

    fn arg(mut self, a: impl redis::ToRedisArgs) -> Self {
        self.0.arg(a);
        self
    }

    /// The job's id, envelope JSON, priority, type and max_attempts: how the enqueue and
    /// retry_dead scripts begin each job.
    fn envelope(self, env: &Envelope) -> Result<Self> {
        Ok(self
            .arg(env.id.to_string())
            .arg(serde_json::to_string(env)?)
            .arg(env.priority.as_str())
            .arg(&env.kind)
            .arg(env.max_attempts))
    }
}

/// A started job handed to a worker.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The job's queue.
    pub queue: QueueName,
    /// Stream entry id (acked and deleted on completion).
    pub entry: String,
    /// The stream the entry is in.
    pub priority: Priority,
    /// Attempt number in this run, starting at 1.
    pub attempt: u32,
    /// Attempts over every run of the job, this one included.
    pub attempts_total: u32,
    /// Lease token; complete/fail refuse any other.
    pub lease: String,
    /// Run number (1, +1 per DLQ retry).
    pub run: u32,
    /// The job itself.
    pub envelope: Envelope,
    /// The last checkpoint an earlier attempt of this run saved, if any.
    pub checkpoint: Option<Json>,
    /// When the attempt started, by the Redis clock (ms since the epoch; the job's `started_at`).
    pub started_ms: i64,
    /// The consumer that started it.
    pub worker: Arc<str>,
}

/// A started job as the fetch script returned it, its envelope and checkpoint not decoded yet
/// ([`Broker::fetch_raw`]): a worker decodes each in the job's own task, off its fetch loop.
#[derive(Debug)]
pub struct RawDelivery {
    /// The job's id (its envelope holds it too).
    pub id: JobId,
    queue: QueueName,
    entry: String,
    priority: Priority,
    attempt: u32,
    attempts_total: u32,
    lease: String,
    run: u32,
    started_ms: i64,
    worker: Arc<str>,
    envelope: String,
    checkpoint: String,
}

impl RawDelivery {
    /// Decodes the envelope (and the checkpoint, if any).
    pub fn decode(self) -> Result<Delivery> {
        let envelope: Envelope = serde_json::from_str(&self.envelope)?;
        if envelope.id != self.id {
            return Err(protocol("the envelope names another job"));
        }
        let checkpoint = if self.checkpoint.is_empty() { None } else { serde_json::from_str(&self.checkpoint).ok() };
        Ok(Delivery {
            queue: self.queue,
            entry: self.entry,
            priority: self.priority,
            attempt: self.attempt,
            attempts_total: self.attempts_total,
            lease: self.lease,
            run: self.run,
            envelope,
            checkpoint,
            started_ms: self.started_ms,
            worker: self.worker,
        })
    }
}

/// The last entry a worker received from each priority stream of one queue, noted from every
/// fetch reply that reached it, so that after a fetch whose reply was lost [`Broker::disown`]
/// can tell the attempts that fetch started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Received([Option<String>; 4]);

impl Received {
    /// Notes the jobs of a fetch reply (each stream's come in id order, so its last one is the
    /// newest).
    pub fn note(&mut self, jobs: &[RawDelivery]) {
        for (slot, priority) in self.0.iter_mut().zip(Priority::ALL) {
            if let Some(last) = jobs.iter().rev().find(|j| j.priority == priority) {
                *slot = Some(last.entry.clone());
            }
        }
    }

    /// Takes what `later` noted (from a fetch sent after the ones noted here), stream by stream.
    pub fn merge(&mut self, later: Received) {
        for (slot, entry) in self.0.iter_mut().zip(later.0) {
            if entry.is_some() {
                *slot = entry;
            }
        }
    }
}

/// What [`Broker::fetch`] ([`Broker::fetch_raw`]) found.
#[derive(Debug, Default)]
pub struct Fetched<J = Delivery> {
    /// Jobs now running under this consumer.
    pub jobs: Vec<J>,
    /// When nothing was started: (stream, last generated id) to block on.
    pub last_ids: Vec<(String, String)>,
    /// The queue is paused: nothing was started and nothing should be awaited.
    pub paused: bool,
    /// The fetch stopped after dead-lettering or deleting many expired or stale entries, with
    /// entries of this queue still to look at: fetch again at once rather than wait, and start
    /// nothing of a queue after this one meanwhile.
    pub more: bool,
}

/// Why an attempt failed and what should follow.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Shown as `last_error` and stored in history.
    pub message: String,
    /// `Some(delay)`: retry after the delay if attempts remain. `None`: dead now.
    pub retry_in: Option<Duration>,
    /// Recorded as the dead-letter reason when not retried (`handler_error`, `unknown_type`...).
    pub reason: &'static str,
}

/// The end of one attempt, to be written by [`Broker::settle`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The attempt.
    pub delivery: Delivery,
    /// Its result.
    pub result: std::result::Result<Option<Json>, Failure>,
}

/// What became of an [`Outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Job succeeded.
    Succeeded,
    /// Job waits for a retry.
    Retrying,
    /// Job is in the dead-letter queue.
    Dead,
    /// Job was cancelled (a cancel request stopped the attempt).
    Cancelled,
    /// The attempt did not run (held back by a limit): the job waits in the scheduled set
    /// without having spent an attempt.
    Postponed,
    /// The lease was stale: another owner has the job; nothing was written.
    Stale,
}

/// Result of [`Broker::enqueue`].
#[derive(Debug, Clone)]
pub struct Enqueued {
    /// The job as stored.
    pub job: JobInfo,
    /// False when a job with this id existed already.
    pub created: bool,
}

/// Result of promoting one queue.
#[derive(Debug, Clone)]
pub struct Promoted {
    /// Queue.
    pub queue: QueueName,
    /// Jobs moved to their streams.
    pub count: u64,
    /// Milliseconds the oldest still-due job is late (0 when none is left).
    pub lag_ms: i64,
    /// Jobs dead-lettered because their `expires_at` passed before they started.
    pub expired: u64,
    /// Succeeded jobs deleted because their retention ended.
    pub swept: u64,
    /// The sweep stopped at its limit with more succeeded jobs due.
    pub more: bool,
}

/// Result of [`Broker::retry_dead`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeued {
    /// Enqueued again as this run.
    Queued { run: u32 },
    /// The job was not dead in that run any more (already retried): nothing enqueued.
    NotDead { state: String, run: u32 },
}

/// Handle to Redis for every jobq operation. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    conn: ConnectionManager,
    client: redis::Client,
    keys: Keys,
    defaults: JobDefaults,
    retention: RetentionSettings,
    timeout: Duration,
    /// Queues this process added to the namespace's queue set, and when.
    registered: std::sync::Arc<Mutex<HashMap<QueueName, std::time::Instant>>>,
    /// How long the process trusts such a registration ([`Broker::register_queue`]).
    registered_for: Duration,
    scripts: Arc<ScriptLoads>,
}

/// How long a process trusts that a queue it added to the queue set is still there: the set goes
/// with `jobq purge-all`, and the promoter and the recorder see only the queues in it.
const REGISTERED_FOR: Duration = Duration::from_secs(60);

/// How many times this broker (and its clones) loaded the scripts into Redis, and the lock
/// that lets one caller at a time do it: when Redis answers NOSCRIPT to many calls at once
/// (a restart, a SCRIPT FLUSH), one of them loads the scripts and the others re-send theirs.
#[derive(Default)]
struct ScriptLoads {
    count: AtomicU64,
    lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("namespace", &self.keys.namespace()).finish()
    }
}

/// Reconnects on its own; a command waits at most `timeout` for its answer.
/// Whether a Redis error met at start-up will not pass by waiting: the server answered and
/// refused (a wrong password, a user without the rights, `SELECT` of a database it does not
/// have), or the URL's settings are wrong. A server that is loading or in a fail-over, and
/// every connection error, pass on their own (`Error::is_transient_redis`).
fn refused_for_good(e: &redis::RedisError) -> bool {
    if Error::Redis(e.clone()).is_transient_redis() {
        return false;
    }
    matches!(e.kind(), redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig)
        || e.code().is_some()
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(if d.is_zero() { 0 } else { 1 })
}

fn protocol(what: impl std::fmt::Display) -> Error {
    Error::Protocol(what.to_string())
}

impl Broker {
    /// Connects (lazily: commands fail with a Redis error while Redis is down and work again
    /// once it is back) with the settings' namespace, defaults and retention.
    pub async fn connect(settings: &Settings) -> Result<Self> {
        let client = redis::Client::open(settings.redis.url.as_str())?;
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config(settings.redis.timeout))?;
        Ok(Self {
            conn,
            client,
            keys: Keys::new(settings.namespace.clone()),
            defaults: settings.jobs.clone(),
            retention: settings.retention.clone(),
            timeout: settings.redis.timeout,
            registered: Default::default(),
            registered_for: REGISTERED_FOR,
            scripts: Default::default(),
        })
    }

    /// The same broker, adding a queue to the queue set again once its last registration is
    /// `every` old (a minute by default; see [`Broker::register_queue`]).
    pub fn registering_queues_every(self, every: Duration) -> Self {
        Self { registered_for: every, ..self }
    }

    /// The same broker over a shared connection of its own, opened on first use by the Tokio
    /// runtime that uses it: for a task on another runtime (a thread of its own) that must keep
    /// talking to Redis while the main runtime's threads are busy.
    pub fn with_own_connection(&self) -> Result<Self> {
        let conn = ConnectionManager::new_lazy_with_config(self.client.clone(), manager_config(self.timeout))?;
        Ok(Self { conn, ..self.clone() })
    }

    /// Key names of this namespace.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A shared connection for ad-hoc commands.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// A dedicated connection for blocking reads (XREAD BLOCK / XREADGROUP BLOCK), which would
    /// stall every other command on a shared one.
    pub async fn blocking_connection(&self, block: Duration) -> Result<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(block + self.timeout));
        Ok(self.client.get_multiplexed_async_connection_with_config(&config).await?)
    }

    /// PING.
    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Checks the server: Redis 7+ and `maxmemory-policy noeviction` (unless allowed).
    pub async fn check_server(&self, allow_eviction: bool) -> Result<()> {
        let mut conn = self.conn.clone();
        let info: String = redis::cmd("INFO").query_async(&mut conn).await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .map(str::trim)
                .unwrap_or("")
        };
        let version = field("redis_version");
        let major: u32 = version.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
        if major < 7 {
            return Err(Error::Invalid(format!("Redis {version} is too old: jobq needs Redis 7.0 or newer")));
        }
        let policy = field("maxmemory_policy");
        if policy != "noeviction" {
            if allow_eviction {
                tracing::warn!(policy, "Redis may evict keys: jobs can be lost (allowed by JOBQ_REDIS_ALLOW_EVICTION)");
            } else {
                return Err(Error::Invalid(format!(
                    "Redis runs with maxmemory-policy `{policy}`: an evicted key is a lost job. \
                     Set `maxmemory-policy noeviction`, or JOBQ_REDIS_ALLOW_EVICTION=true to run anyway"
                )));
            }
        }
        Ok(())
    }

    /// Waits until Redis answers and passes [`Broker::check_server`], retrying with backoff
    /// while it is unreachable or not ready (loading, say). A misconfigured server, and a
    /// server that refuses the connection's settings (a wrong password, a user without the
    /// rights, a database index out of range), is an error; `false` when shut down first.
    pub async fn wait_until_ready(
        &self,
        allow_eviction: bool,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<bool> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.check_server(allow_eviction).await {
                Ok(()) => return Ok(true),
                Err(e @ Error::Invalid(_)) => return Err(e),
                Err(Error::Redis(e)) if refused_for_good(&e) => {
                    return Err(Error::Invalid(format!("Redis refused the connection's settings (REDIS_URL): {e}")));
                }
                Err(e) => tracing::warn!(error = %e, "Redis is not reachable yet; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Sends the calls in one pipeline; loads the scripts and re-sends what came back NOSCRIPT.
    async fn run(&self, calls: Vec<Call>) -> Result<Vec<redis::RedisResult<Value>>> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for c in &calls {
            pipe.add_command(c.0.clone());
        }
        let mut seen = self.scripts.count.load(Ordering::Acquire);
        let mut results: Vec<redis::RedisResult<Value>> = pipe.query_async(&mut conn).await?;
        let is_noscript = |r: &redis::RedisResult<Value>| matches!(r, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript));
        // Twice at most: the second time only when the scripts another call loaded after this
        // one was sent were lost again before the re-send.
        for _ in 0..2 {
            let missing: Vec<usize> = (0..results.len()).filter(|&i| is_noscript(&results[i])).collect();
            if missing.is_empty() {
                break;
            }
            {
                let _one_at_a_time = self.scripts.lock.lock().await;
                if self.scripts.count.load(Ordering::Acquire) == seen {
                    tracing::info!(calls = missing.len(), "loading scripts into Redis (first use, or Redis restarted)");
                    for s in all_scripts() {
                        s.prepare_invoke().load_async(&mut conn).await?;
                    }
                    self.scripts.count.fetch_add(1, Ordering::AcqRel);
                }
                seen = self.scripts.count.load(Ordering::Acquire);
            }
            let mut retry = redis::pipe();
            retry.ignore_errors();
            for &i in &missing {
                retry.add_command(calls[i].0.clone());
            }
            let again: Vec<redis::RedisResult<Value>> = retry.query_async(&mut conn).await?;
            for (i, r) in missing.into_iter().zip(again) {
                results[i] = r;
            }
        }
        Ok(results)
    }

    async fn run_one(&self, call: Call) -> Result<Value> {
        let mut results = self.run(vec![call]).await?;
        Ok(results.pop().ok_or_else(|| protocol("empty pipeline reply"))??)
    }

    /// Adds the queue to the namespace's queue set: once per process and queue, and again when
    /// the process last did it more than a minute ago (the set may have been purged since).
    pub async fn register_queue(&self, queue: &QueueName) -> Result<()> {
        let fresh = |s: &HashMap<QueueName, std::time::Instant>| {
            s.get(queue).is_some_and(|at| at.elapsed() < self.registered_for)
        };
        if self.registered.lock().map(|s| fresh(&s)).unwrap_or(false) {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        redis::cmd("SADD").arg(self.keys.queues()).arg(queue.as_str()).query_async::<()>(&mut conn).await?;
        if let Ok(mut s) = self.registered.lock() {
            s.insert(queue.clone(), std::time::Instant::now());
        }
        Ok(())
    }

    /// Every queue known in this namespace.
    pub async fn queues(&self) -> Result<Vec<QueueName>> {
        let mut conn = self.conn.clone();
        let names: Vec<String> = redis::cmd("SMEMBERS").arg(self.keys.queues()).query_async(&mut conn).await?;
        let mut queues: Vec<QueueName> = names.into_iter().filter_map(|n| n.parse().ok()).collect();
        queues.sort();
        Ok(queues)
    }

    /// Creates the worker consumer group on the queue's priority streams (idempotent).
    pub async fn ensure_groups(&self, queue: &QueueName) -> Result<()> {
        self.register_queue(queue).await?;
        let mut conn = self.conn.clone();
        for stream in self.keys.streams(queue) {
            create_group(&mut conn, &stream, Keys::GROUP).await?;
        }
        Ok(())
    }

    /// Builds the stored envelope of a new job, applying defaults.
    pub fn envelope(&self, job: &NewJob) -> Envelope {
        Envelope {
            v: ENVELOPE_VERSION,
            id: JobId::new(),
            kind: job.kind.clone(),
            queue: job.queue.clone(),
            priority: job.priority,
            payload: job.payload.clone(),
            max_attempts: job.max_attempts.unwrap_or(self.defaults.max_attempts),
            backoff: job.backoff.unwrap_or(self.defaults.backoff),
            timeout: job.timeout,
            created_at: Utc::now(),
            expires_at: job.expires_at,
            unique_key: job.unique_key.clone(),
            partition_key: job.partition_key.clone(),
            depends_on: job.depends_on.clone(),
            dependency_mode: (!job.depends_on.is_empty()).then_some(job.dependency_mode),
            enqueued_by: job.enqueued_by.clone(),
            metadata: job.metadata.clone(),
            tags: job.tags.clone(),
        }
    }

    /// Enqueues one job (validated first).
    pub async fn enqueue(&self, job: NewJob) -> Result<Enqueued> {
        job.validate()?;
        let envelope = self.envelope(&job);
        self.register_queue(&envelope.queue).await?;
        let call =
            self.enqueue_call(&envelope.queue, [(&envelope, job.start, job.unique_ttl, job.dependencies_enqueued)])?;
        let reply = enqueue_replies(self.run_one(call).await?)?.into_iter().next();
        let reply = reply.ok_or_else(|| protocol("empty enqueue reply"))?;
        self.enqueued(vec![(envelope, Ok(reply))]).await.pop().unwrap_or_else(|| Err(protocol("empty enqueue reply")))
    }

    /// One enqueue script call for jobs of one queue, in their order.
    fn enqueue_call<'a>(
        &self,
        queue: &QueueName,
        jobs: impl IntoIterator<Item = (&'a Envelope, Start, Option<Duration>, bool)>,
    ) -> Result<Call> {
        let streams = self.keys.streams(queue);
        let (scheduled, expiring) = (self.keys.scheduled(queue), self.keys.expiring(queue));
        let mut keys: Vec<&str> = streams.iter().map(String::as_str).collect();
        keys.extend([scheduled.as_str(), expiring.as_str()]);
        let mut call =
            Call::new(&SCRIPTS.enqueue, &keys).arg(self.keys.job_prefix(queue)).arg(secs(self.retention.dead));
        for (env, start, unique_ttl, deps_enqueued) in jobs {
            let (delay, run_at) = match start {
                Start::Now => (String::new(), String::new()),
                Start::After(d) => (d.as_millis().to_string(), String::new()),
                Start::At(t) => (String::new(), t.timestamp_millis().to_string()),
            };
            let unique = env.unique_key.as_deref().map(|k| self.keys.unique(queue, k)).unwrap_or_default();
            let mode = match env.dependency_mode.filter(|_| !env.depends_on.is_empty()) {
                // Dependencies known to have been enqueued: one that is gone has finished.
                Some(DependencyMode::Finished) if deps_enqueued => "finished-enqueued",
                Some(m) => m.as_str(),
                None => "",
            };
            call = call
                .envelope(env)?
                .arg(delay)
                .arg(run_at)
                .arg(env.expires_at.map(|t| t.timestamp_millis().to_string()).unwrap_or_default())
                .arg(unique)
                .arg(unique_ttl.map(|t| t.as_millis().max(1).to_string()).unwrap_or_default())
                .arg(mode)
                .arg(if mode.is_empty() { 0 } else { env.depends_on.len() });
            if !mode.is_empty() {
                for dep in &env.depends_on {
                    call = call.arg(dep.to_string());
                }
            }
        }
        Ok(call)
    }

    /// What the enqueue script answered for each job, as results. The existing job of every
    /// duplicate (its unique key already held) is read in one pipeline for them all, so
    /// that a batch sent again costs one more round trip, not one per job.
    async fn enqueued(&self, answers: Vec<(Envelope, Result<EnqueueReply>)>) -> Vec<Result<Enqueued>> {
        let mut results: Vec<Result<Enqueued>> = Vec::with_capacity(answers.len());
        // Each duplicate's place in `results` and where its existing job is.
        let mut duplicates: Vec<(usize, QueueName, JobId)> = Vec::new();
        for (envelope, answer) in answers {
            let (created, state, run_at, id) = match answer {
                Ok(r) => r,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            results.push(if created < 0 {
                Err(Error::Invalid(format!(
                    "`depends_on`: no job {id} in queue `{}` (dependencies must be in the job's queue)",
                    envelope.queue
                )))
            } else if created == 0 {
                match id.parse::<JobId>() {
                    Ok(id) => {
                        duplicates.push((results.len(), envelope.queue, id));
                        Err(Error::JobNotFound(id))
                    }
                    Err(e) => Err(protocol(e)),
                }
            } else {
                state
                    .parse::<JobState>()
                    .map_err(protocol)
                    .map(|state| Enqueued { job: info_of_new(envelope, state, run_at), created: true })
            });
        }
        let at: Vec<(&QueueName, JobId)> = duplicates.iter().map(|(_, q, id)| (q, *id)).collect();
        match self.jobs_in(&at).await {
            Ok(jobs) => {
                for ((k, ..), job) in duplicates.iter().zip(jobs) {
                    match job {
                        Ok(Some(job)) => results[*k] = Ok(Enqueued { job, created: false }),
                        // The job that held the key finished and left Redis since
                        // the script saw it (no retention): nothing was enqueued, and sending
                        // again enqueues it. Not a 404 naming a job the caller never asked for.
                        Ok(None) => {
                            results[*k] = Err(Error::Conflict(
                                "the job holding this unique key finished and left Redis meanwhile; nothing was \
                                 enqueued: send it again"
                                    .into(),
                            ))
                        }
                        Err(e) => results[*k] = Err(e),
                    }
                }
            }
            Err(Error::Redis(e)) => {
                for (k, ..) in &duplicates {
                    results[*k] = Err(Error::Redis(e.clone()));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (k, ..) in &duplicates {
                    results[*k] = Err(protocol(&msg));
                }
            }
        }
        results
    }

    /// Looks a job up in every known queue.
    pub async fn job(&self, id: JobId) -> Result<Option<JobInfo>> {
        let queues = self.queues().await?;
        if queues.is_empty() {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        for q in &queues {
            pipe.hgetall(self.keys.job(q, id));
        }
        let mut conn = self.conn.clone();
        let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        hashes.into_iter().find(|h| !h.is_empty()).map(|h| info_of_hash(&h)).transpose()
    }

    /// The state of each job (None when its hash is gone), one pipeline.
    pub async fn states(&self, jobs: &[(QueueName, JobId)]) -> Result<Vec<Option<JobState>>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (q, id) in jobs {
            pipe.hget(self.keys.job(q, *id), "state");
        }
        let mut conn = self.conn.clone();
        let states: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
        Ok(states.into_iter().map(|s| s.and_then(|s| s.parse().ok())).collect())
    }

    /// Looks a job up in one queue.
    pub async fn job_in(&self, queue: &QueueName, id: JobId) -> Result<Option<JobInfo>> {
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> =
            redis::cmd("HGETALL").arg(self.keys.job(queue, id)).query_async(&mut conn).await?;
        if h.is_empty() {
            return Ok(None);
        }
        info_of_hash(&h).map(Some)
    }

    /// Several jobs, each looked up in its queue, in one pipeline: per job `None` when it is
    /// not found, or the error of a hash that does not read as a job.
    pub async fn jobs_in(&self, at: &[(&QueueName, JobId)]) -> Result<Vec<Result<Option<JobInfo>>>> {
        if at.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (queue, id) in at {
            pipe.hgetall(self.keys.job(queue, *id));
        }
        let mut conn = self.conn.clone();
        let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        Ok(hashes.iter().map(|h| if h.is_empty() { Ok(None) } else { info_of_hash(h).map(Some) }).collect())
    }

    /// Starts up to `count` jobs of `queue` for `consumer`, strictly by priority (one script).
    pub async fn fetch(&self, queue: &QueueName, consumer: &str, count: usize) -> Result<Fetched> {
        let raw = self.fetch_raw(queue, consumer, count).await?;
        let jobs = raw.jobs.into_iter().map(RawDelivery::decode).collect::<Result<Vec<_>>>()?;
        Ok(Fetched { jobs, last_ids: raw.last_ids, paused: raw.paused, more: raw.more })
    }

    /// [`Broker::fetch`], leaving each job's envelope to decode ([`RawDelivery::decode`]).
    pub async fn fetch_raw(&self, queue: &QueueName, consumer: &str, count: usize) -> Result<Fetched<RawDelivery>> {
        let streams = self.keys.streams(queue);
        let (events, paused) = (self.keys.events(queue), self.keys.paused(queue));
        let mut keys: Vec<&str> = streams.iter().map(String::as_str).collect();
        keys.extend([events.as_str(), paused.as_str()]);
        let call = Call::new(&SCRIPTS.fetch, &keys)
            .arg(Keys::GROUP)
            .arg(consumer)
            .arg(count)
            .arg(self.keys.job_prefix(queue))
            .arg(secs(self.retention.dead));
        let reply = self.run_one(call).await?;
        let (flat, last, paused, now, more): (Vec<Value>, Vec<String>, i64, String, i64) =
            redis::from_redis_value(reply).map_err(protocol)?;
        let mut fetched = Fetched {
            jobs: Vec::with_capacity(flat.len() / 3),
            last_ids: Vec::new(),
            paused: paused == 1,
            more: more == 1,
        };
        let started_ms: i64 = if flat.is_empty() { 0 } else { now.parse().map_err(|_| protocol("bad fetch clock"))? };
        let worker: Arc<str> = consumer.into();
        let mut it = flat.into_iter();
        while let Some(head) = it.next() {
            let (Some(envelope), Some(checkpoint)) = (it.next(), it.next()) else {
                return Err(protocol("short fetch reply"));
            };
            let head: String = redis::from_redis_value(head).map_err(protocol)?;
            let mut parts = head.split(' ');
            let mut part = || parts.next().ok_or_else(|| protocol("short job head in fetch reply"));
            let (id, entry, prio, attempt, lease, run, total) =
                (part()?, part()?, part()?, part()?, part()?, part()?, part()?);
            let number = |s: &str| s.parse::<u32>().map_err(|_| protocol("bad number in fetch reply"));
            let id: JobId = id.parse().map_err(|_| protocol("bad job id in fetch reply"))?;
            let prio: usize = prio.parse().map_err(|_| protocol("bad priority index"))?;
            let priority = *Priority::ALL.get(prio.wrapping_sub(1)).ok_or_else(|| protocol("bad priority index"))?;
            fetched.jobs.push(RawDelivery {
                id,
                queue: queue.clone(),
                entry: entry.to_owned(),
                priority,
                attempt: number(attempt)?,
                attempts_total: number(total)?,
                lease: lease.to_owned(),
                run: number(run)?,
                started_ms,
                worker: worker.clone(),
                envelope: redis::from_redis_value(envelope).map_err(protocol)?,
                checkpoint: redis::from_redis_value(checkpoint).map_err(protocol)?,
            });
        }
        if fetched.jobs.is_empty() && !fetched.paused && !fetched.more {
            fetched.last_ids = streams.into_iter().zip(last).filter(|(_, id)| !id.is_empty()).collect();
        }
        Ok(fetched)
    }

    /// Blocks on `conn` until a stream gets an entry newer than the given ids, or `block` passes.
    pub async fn wait_for_work(
        conn: &mut MultiplexedConnection,
        last_ids: &[(String, String)],
        block: Duration,
    ) -> Result<()> {
        if last_ids.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(());
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(1).arg("BLOCK").arg(block.as_millis().max(1) as u64).arg("STREAMS");
        for (k, _) in last_ids {
            cmd.arg(k);
        }
        for (_, id) in last_ids {
            cmd.arg(id);
        }
        cmd.query_async::<Value>(conn).await?;
        Ok(())
    }

    /// Writes the end of many attempts in one pipeline: the successes of each queue in one
    /// `complete_many` call, each failure in its own `fail` call. Each entry of the result
    /// matches the outcome at the same index.
    pub async fn settle(&self, outcomes: &[Outcome]) -> Result<Vec<Settled>> {
        let mut calls = Vec::new();
        // For each call: the outcome indexes it answers for.
        let mut answers: Vec<Vec<usize>> = Vec::new();
        let mut successes: std::collections::BTreeMap<&QueueName, Vec<usize>> = Default::default();
        for (i, o) in outcomes.iter().enumerate() {
            let d = &o.delivery;
            match &o.result {
                Ok(_) => successes.entry(&d.queue).or_default().push(i),
                Err(f) => {
                    let id = d.envelope.id;
                    let job_key = self.keys.job(&d.queue, id);
                    let stream = self.keys.stream(&d.queue, d.priority);
                    let events = self.keys.events(&d.queue);
                    let scheduled = self.keys.scheduled(&d.queue);
                    // At most 10 years: a handler's `retry_after(Duration::MAX)` would
                    // otherwise wrap to "not retryable" or schedule past the year 9999.
                    let delay = f.retry_in.map(|d| d.min(MAX_RETRY_DELAY).as_millis() as i64).unwrap_or(-1);
                    calls.push(
                        Call::new(&SCRIPTS.fail, &[&job_key, &stream, &events, &scheduled])
                            .arg(id.to_string())
                            .arg(&d.lease)
                            .arg(&d.entry)
                            .arg(Keys::GROUP)
                            .arg(truncate(&f.message, 8 * 1024))
                            .arg(delay)
                            .arg(secs(self.retention.dead))
                            .arg(f.reason),
                    );
                    answers.push(vec![i]);
                }
            }
        }
        for (q, idx) in successes {
            let streams = self.keys.streams(q);
            let (events, retained) = (self.keys.events(q), self.keys.retained(q));
            let mut keys: Vec<&str> = streams.iter().map(String::as_str).collect();
            keys.extend([events.as_str(), retained.as_str()]);
            let mut call = Call::new(&SCRIPTS.complete_many, &keys)
                .arg(Keys::GROUP)
                .arg(secs(self.retention.succeeded))
                .arg(self.keys.job_prefix(q))
                .arg(batch_event(idx.iter().map(|&i| &outcomes[i].delivery)));
            let delivered = idx.iter().map(|&i| &outcomes[i].delivery);
            for newest in newest_entries(delivered.map(|d| (d.priority, d.entry.as_str()))) {
                call = call.arg(newest.unwrap_or(""));
            }
            let mut id = uuid::Uuid::encode_buffer();
            for &i in &idx {
                let o = &outcomes[i];
                let d = &o.delivery;
                let prio = Priority::ALL.iter().position(|p| *p == d.priority).unwrap_or(2) + 1;
                let result = o.result.as_ref().ok().and_then(Option::as_ref).map(bounded_result).unwrap_or_default();
                // The id encoded into a buffer on the stack, not through `fmt` into a new String.
                let id = &*d.envelope.id.0.as_hyphenated().encode_lower(&mut id);
                call = call.arg(prio).arg(id).arg(&d.lease).arg(&d.entry).arg(result);
            }
            calls.push(call);
            answers.push(idx);
        }
        let results = self.run(calls).await?;
        let mut settled = vec![Settled::Stale; outcomes.len()];
        for (idx, r) in answers.into_iter().zip(results) {
            let v = r?;
            if idx.len() == 1 && outcomes[idx[0]].result.is_err() {
                let (ok, state): (i64, String) = redis::from_redis_value(v).map_err(protocol)?;
                settled[idx[0]] = match (ok, state.as_str()) {
                    (0, _) => Settled::Stale,
                    (_, "retrying") => Settled::Retrying,
                    (_, "cancelled") => Settled::Cancelled,
                    (_, "postponed") => Settled::Postponed,
                    _ => Settled::Dead,
                };
            } else {
                let codes: Vec<i64> = redis::from_redis_value(v).map_err(protocol)?;
                for (i, code) in idx.into_iter().zip(codes) {
                    // 2: written by an earlier call whose reply was lost (a retried write).
                    settled[i] = if code == 1 || code == 2 { Settled::Succeeded } else { Settled::Stale };
                }
            }
        }
        Ok(settled)
    }

    /// Moves due delayed and retrying jobs of each queue into their streams (one pipeline).
    pub async fn promote(&self, queues: &[QueueName], limit: usize) -> Result<Vec<Promoted>> {
        self.promote_each(queues, limit).await?.into_iter().collect()
    }

    /// [`Broker::promote`], with each queue's own result: a queue whose script fails (a key of
    /// another type among its keys) does not hide what the others did. `Err` only when the
    /// calls could not be made at all.
    pub async fn promote_each(&self, queues: &[QueueName], limit: usize) -> Result<Vec<Result<Promoted>>> {
        let calls = queues
            .iter()
            .map(|q| {
                let scheduled = self.keys.scheduled(q);
                let streams = self.keys.streams(q);
                let (expiring, events, retained) = (self.keys.expiring(q), self.keys.events(q), self.keys.retained(q));
                let mut keys = vec![scheduled.as_str()];
                keys.extend(streams.iter().map(String::as_str));
                keys.extend([expiring.as_str(), events.as_str(), retained.as_str()]);
                Call::new(&SCRIPTS.promote, &keys)
                    .arg(limit)
                    .arg(self.keys.job_prefix(q))
                    .arg(Keys::GROUP)
                    .arg(secs(self.retention.dead))
            })
            .collect();
        let results = self.run(calls).await?;
        Ok(queues
            .iter()
            .zip(results)
            .map(|(q, r)| {
                let (count, oldest, now, expired, swept, more): (u64, i64, i64, u64, u64, i64) =
                    redis::from_redis_value(r?).map_err(protocol)?;
                let lag_ms = if oldest < 0 { 0 } else { now - oldest };
                Ok(Promoted { queue: q.clone(), count, lag_ms, expired, swept, more: more == 1 })
            })
            .collect())
    }

    /// Re-enqueues a dead job (from its DLQ envelope) as a new run with a fresh attempt count,
    /// unless it is no longer dead in run `dead_run`.
    pub async fn retry_dead(&self, envelope: &Envelope, dead_run: u32) -> Result<Requeued> {
        self.register_queue(&envelope.queue).await?;
        let job_key = self.keys.job(&envelope.queue, envelope.id);
        let stream = self.keys.stream(&envelope.queue, envelope.priority);
        let call =
            Call::new(&SCRIPTS.retry_dead, &[&job_key, &stream]).envelope(envelope)?.arg(dead_run).arg(Keys::GROUP);
        let (ok, state, run): (i64, String, u32) =
            redis::from_redis_value(self.run_one(call).await?).map_err(protocol)?;
        Ok(if ok == 1 { Requeued::Queued { run } } else { Requeued::NotDead { state, run } })
    }
}

/// Per priority stream (in `Priority::ALL` order), the newest of these entries on it: what
/// `complete_many` trims up to when nothing older is pending.
fn newest_entries<'a>(entries: impl Iterator<Item = (Priority, &'a str)>) -> [Option<&'a str>; 4] {
    let mut newest: [Option<((u64, u64), &str)>; 4] = [None; 4];
    for (priority, entry) in entries {
        let Some(at) = Priority::ALL.iter().position(|p| *p == priority) else { continue };
        // Entries come from Redis: one that does not parse is named only if nothing else is.
        let id = stream_id(entry).unwrap_or((0, 0));
        if newest[at].is_none_or(|(seen, _)| id > seen) {
            newest[at] = Some((id, entry));
        }
    }
    newest.map(|n| n.map(|(_, entry)| entry))
}

/// A stream entry id (`<ms>-<seq>`) as two numbers.
fn stream_id(entry: &str) -> Option<(u64, u64)> {
    let (ms, seq) = entry.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The `batch` array of a `complete_many` outbox event for these attempts: six JSON strings
/// each (id, run, attempt, type, started_at, worker), as `decode_batch` reads them.
fn batch_event<'a>(deliveries: impl ExactSizeIterator<Item = &'a Delivery>) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(deliveries.len() * 128 + 2);
    let mut id = uuid::Uuid::encode_buffer();
    out.push(b'[');
    for (k, d) in deliveries.enumerate() {
        if k > 0 {
            out.push(b',');
        }
        // Ids and numbers need no escaping; the type and the worker name go through serde_json.
        out.push(b'"');
        out.extend_from_slice(d.envelope.id.0.as_hyphenated().encode_lower(&mut id).as_bytes());
        let _ = write!(out, "\",\"{}\",\"{}\",", d.run, d.attempt);
        let _ = serde_json::to_writer(&mut out, &d.envelope.kind);
        let _ = write!(out, ",\"{}\",", d.started_ms);
        let _ = serde_json::to_writer(&mut out, &*d.worker);
    }
    out.push(b']');
    out
}

/// A running job whose lease a worker renews.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Queue.
    pub queue: QueueName,
    /// Stream of the entry.
    pub priority: Priority,
    /// Stream entry.
    pub entry: String,
    /// Job.
    pub id: JobId,
    /// Lease token.
    pub token: String,
}

/// A step of a shared circuit breaker ([`Broker::breaker`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerOp {
    /// May a job run now (closed, or the half-open probe)?
    Admit,
    /// A job succeeded: close.
    Ok,
    /// A job failed (retryable): count it; open at the threshold or when the probe failed.
    Fail,
    /// An admitted job did not run after all: a probe gives its turn back.
    Held,
}

/// What a heartbeat learned about one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Renewed.
    Held,
    /// Renewed, and a cancel was requested: stop the job.
    CancelRequested,
    /// Lost: the job was reclaimed or finished elsewhere; stop it, its outcome will be refused.
    Lost,
}

/// What one reclaim pass did on a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Jobs put back in their stream.
    pub requeued: u64,
    /// Jobs dead-lettered after too many reclaims.
    pub dead: u64,
    /// Jobs cancelled (cancel requested before their worker stopped).
    pub cancelled: u64,
    /// Pending entries whose content was deleted (should never happen; an alarm).
    pub deleted: u64,
    /// The idle time an entry needed to be taken: the longest lease a live worker of the
    /// queue has registered (at least this reaper's own).
    pub min_idle: Duration,
}

/// Result of [`Broker::run_now`].
#[derive(Debug, Clone, PartialEq)]
pub enum RunNow {
    /// The job was scheduled or retrying and is queued now: the job as the same script left it
    /// (a worker may have run it since, and with no retention its hash is gone then).
    Queued(Box<JobInfo>),
    /// The job is in this state, which has no run_at to bring forward; nothing changed.
    Not(JobState),
}

/// What [`Broker::queue_jobs`] does with the jobs of a queue that have not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkAction {
    /// Cancel them, as [`Broker::cancel`] cancels one: queued, scheduled and retrying jobs.
    Cancel,
    /// Run them now, as [`Broker::run_now`] runs one: scheduled and retrying jobs.
    Run,
}

/// Which jobs [`Broker::queue_jobs`] takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkFilter {
    /// Only jobs of this type.
    pub kind: Option<String>,
    /// Only jobs in these states, of those the action takes; empty for all of them.
    pub states: Vec<JobState>,
}

/// Result of [`Broker::queue_jobs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bulk {
    /// Jobs cancelled or queued (or, in a dry run, that would be).
    pub count: u64,
    /// The limit stopped the call before the end of the queue: there may be more.
    pub more: bool,
}

/// A [`Broker::queue_jobs`] stopped by an error after it took `done.count` jobs.
#[derive(Debug)]
pub struct BulkStopped {
    /// What was done before the error (`more` is true).
    pub done: Bulk,
    /// The error.
    pub error: Error,
}

/// Result of [`Broker::cancel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    /// The job will never start.
    Cancelled,
    /// The job is running; its worker is told to stop it.
    Requested,
    /// The job had already finished in this state.
    Finished(JobState),
}

impl Broker {
    /// Writes `fields` on the job of `lease` if the lease is still current (one script).
    /// Returns false when the job moved on: another worker owns it, or it finished.
    pub async fn touch(&self, lease: &Lease, fields: &[(&str, String)]) -> Result<bool> {
        let key = self.keys.job(&lease.queue, lease.id);
        let mut call = Call::new(&SCRIPTS.touch, &[&key]).arg(&lease.token);
        for (f, v) in fields {
            call = call.arg(*f).arg(v);
        }
        let held: i64 = redis::from_redis_value(self.run_one(call).await?).map_err(protocol)?;
        Ok(held == 1)
    }

    /// Takes (or renews) one of `limit` slots of the semaphore `name` for `member`, shared by
    /// every process on this namespace; a slot not renewed within `ttl` frees itself.
    pub async fn acquire_slot(&self, name: &str, member: &str, limit: u32, ttl: Duration) -> Result<bool> {
        let key = self.keys.limit("slots", name);
        let call = Call::new(&SCRIPTS.slot_acquire, &[&key]).arg(member).arg(limit).arg(ttl.as_millis() as u64);
        let held: i64 = redis::from_redis_value(self.run_one(call).await?).map_err(protocol)?;
        Ok(held == 1)
    }

    /// Gives back the slot of `member` in the semaphore `name`.
    pub async fn release_slot(&self, name: &str, member: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("ZREM").arg(self.keys.limit("slots", name)).arg(member).query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Takes one start for `member` from the rate limit `name` (`per_second` on average,
    /// `burst` at once), shared by every process on this namespace. `None`: go now;
    /// `Some(wait)`: a start is reserved for `member` after `wait`; ask again then.
    pub async fn rate_take(&self, name: &str, member: &str, per_second: f64, burst: u32) -> Result<Option<Duration>> {
        let (key, reserved) = (self.keys.limit("rate", name), self.keys.limit("reserved", name));
        let interval_ms = 1000.0 / per_second.max(1e-6);
        let call = Call::new(&SCRIPTS.rate_take, &[&key, &reserved])
            .arg(format!("{interval_ms:.6}"))
            .arg(burst.max(1))
            .arg(member);
        let wait: i64 = redis::from_redis_value(self.run_one(call).await?).map_err(protocol)?;
        Ok((wait > 0).then(|| Duration::from_millis(wait as u64)))
    }

    /// One step of the circuit breaker `name`, shared by every process on this namespace (see
    /// [`BreakerOp`]). Returns the script's answer: for `Admit`, 0 = run, else milliseconds to
    /// hold the job back; for `Ok`/`Fail`, 1 when the circuit closed/opened.
    pub async fn breaker(
        &self,
        name: &str,
        op: BreakerOp,
        threshold: u32,
        open_for: Duration,
        job: JobId,
    ) -> Result<u64> {
        let key = self.keys.limit("breaker", name);
        let op = match op {
            BreakerOp::Admit => "admit",
            BreakerOp::Ok => "ok",
            BreakerOp::Fail => "fail",
            BreakerOp::Held => "held",
        };
        let call = Call::new(&SCRIPTS.breaker, &[&key])
            .arg(op)
            .arg(threshold)
            .arg(open_for.as_millis() as u64)
            .arg(job.to_string());
        let n: i64 = redis::from_redis_value(self.run_one(call).await?).map_err(protocol)?;
        Ok(n.max(0) as u64)
    }

    /// Registers `lease` as the one `consumer` runs its jobs of `queues` with, for `valid_for`
    /// (one script per queue, one pipeline): reapers of the queues wait for the longest lease
    /// registered and not lapsed before they take a job (see [`Broker::reclaim`]).
    pub async fn register_lease(
        &self,
        consumer: &str,
        queues: &[QueueName],
        lease: Duration,
        valid_for: Duration,
    ) -> Result<()> {
        let calls = queues
            .iter()
            .map(|q| {
                Call::new(&SCRIPTS.lease_register, &[&self.keys.leases(q)])
                    .arg(consumer)
                    .arg(lease.as_millis() as u64)
                    .arg(valid_for.as_millis() as u64)
            })
            .collect();
        for r in self.run(calls).await? {
            r?;
        }
        Ok(())
    }

    /// One call of `script` per queue of `leases`, each with the queue's priority streams as
    /// keys and ARGV group, consumer, job key prefix, then per lease its priority index, entry,
    /// id and token; with the indexes into `leases` of each call.
    fn lease_calls(&self, script: &Script, consumer: &str, leases: &[Lease]) -> (Vec<Vec<usize>>, Vec<Call>) {
        let mut by_queue: std::collections::BTreeMap<&QueueName, Vec<usize>> = Default::default();
        for (i, l) in leases.iter().enumerate() {
            by_queue.entry(&l.queue).or_default().push(i);
        }
        let mut calls = Vec::new();
        for (q, idx) in &by_queue {
            let streams = self.keys.streams(q);
            let keys: Vec<&str> = streams.iter().map(String::as_str).collect();
            let mut call = Call::new(script, &keys).arg(Keys::GROUP).arg(consumer).arg(self.keys.job_prefix(q));
            for &i in idx {
                let l = &leases[i];
                let prio = Priority::ALL.iter().position(|p| *p == l.priority).unwrap_or(2) + 1;
                call = call.arg(prio).arg(&l.entry).arg(l.id.to_string()).arg(&l.token);
            }
            calls.push(call);
        }
        (by_queue.into_values().collect(), calls)
    }

    /// Renews leases (one heartbeat script per queue, one pipeline). Statuses match `leases`.
    pub async fn heartbeat(&self, consumer: &str, leases: &[Lease]) -> Result<Vec<LeaseStatus>> {
        let (by_queue, calls) = self.lease_calls(&SCRIPTS.heartbeat, consumer, leases);
        let results = self.run(calls).await?;
        let mut out = vec![LeaseStatus::Lost; leases.len()];
        for (idx, r) in by_queue.iter().zip(results) {
            let codes: Vec<i64> = redis::from_redis_value(r?).map_err(protocol)?;
            for (&i, code) in idx.iter().zip(codes) {
                out[i] = match code {
                    0 => LeaseStatus::Held,
                    1 => LeaseStatus::CancelRequested,
                    _ => LeaseStatus::Lost,
                };
            }
        }
        Ok(out)
    }

    /// Hands back attempts `consumer` gave up at shutdown without an outcome: they stay pending,
    /// and the next reaper pass of any worker re-queues them without counting a reclaim. A lease
    /// lost meanwhile is left alone. Returns how many were handed back.
    pub async fn give_up(&self, consumer: &str, leases: &[Lease]) -> Result<u64> {
        let (_, calls) = self.lease_calls(&SCRIPTS.give_up, consumer, leases);
        let mut handed = 0;
        for r in self.run(calls).await? {
            handed += redis::from_redis_value::<u64>(r?).map_err(protocol)?;
        }
        Ok(handed)
    }

    /// Hands back the attempts a fetch of `queue` started for `consumer` whose reply never
    /// reached it (a timeout, a dropped connection): the entries pending to `consumer` newer than
    /// what `received` noted. As with [`Broker::give_up`], the next reaper pass of any worker
    /// re-queues them without counting a reclaim, instead of once their lease lapses. Call it
    /// after a failed fetch, and fetch the queue again only once it has succeeded. Returns how
    /// many were handed back.
    pub async fn disown(&self, queue: &QueueName, consumer: &str, received: &Received) -> Result<u64> {
        redis::from_redis_value(self.run_one(self.disown_call(queue, consumer, received, false)).await?)
            .map_err(protocol)
    }

    /// Renews the lease of every job of `queues` running under `consumer` (one call per queue,
    /// in one pipeline), as [`Broker::heartbeat`] does for the leases it is given: for the jobs
    /// a fetch started whose reply has not reached the worker yet, so that it does not know
    /// their leases; but not those of `except` (attempts the worker has given up). Returns how
    /// many were renewed.
    pub async fn renew_pending(&self, queues: &[QueueName], consumer: &str, except: &[JobId]) -> Result<u64> {
        let none = Received::default();
        let calls = queues
            .iter()
            .map(|q| except.iter().fold(self.disown_call(q, consumer, &none, true), |c, id| c.arg(id.to_string())))
            .collect();
        let mut renewed = 0;
        for r in self.run(calls).await? {
            renewed += redis::from_redis_value::<u64>(r?).map_err(protocol)?;
        }
        Ok(renewed)
    }

    fn disown_call(&self, queue: &QueueName, consumer: &str, received: &Received, renew: bool) -> Call {
        let streams = self.keys.streams(queue);
        let keys: Vec<&str> = streams.iter().map(String::as_str).collect();
        let mut call =
            Call::new(&SCRIPTS.disown, &keys).arg(Keys::GROUP).arg(consumer).arg(self.keys.job_prefix(queue));
        for last in &received.0 {
            call = call.arg(last.as_deref().unwrap_or(""));
        }
        call.arg(if renew { "1" } else { "" })
    }

    /// Reclaims jobs of `queues` whose pending idle time exceeds the longest lease their live
    /// workers run with: re-queues them, or dead-letters those reclaimed more than
    /// `max_reclaims` times. Registers `lease` as this consumer's for `registered_for` (the
    /// caller renews it by calling again within that time); other reapers wait for it.
    pub async fn reclaim(
        &self,
        consumer: &str,
        queues: &[QueueName],
        lease: Duration,
        max_reclaims: u32,
        registered_for: Duration,
    ) -> Result<Vec<Reclaimed>> {
        let calls = queues
            .iter()
            .map(|q| {
                let streams = self.keys.streams(q);
                let (events, leases) = (self.keys.events(q), self.keys.leases(q));
                let mut keys: Vec<&str> = streams.iter().map(String::as_str).collect();
                keys.push(&events);
                keys.push(&leases);
                Call::new(&SCRIPTS.reclaim, &keys)
                    .arg(Keys::GROUP)
                    .arg(consumer)
                    .arg(lease.as_millis() as u64)
                    .arg(500)
                    .arg(self.keys.job_prefix(q))
                    .arg(max_reclaims)
                    .arg(secs(self.retention.dead))
                    .arg(registered_for.as_millis() as u64)
            })
            .collect();
        self.run(calls)
            .await?
            .into_iter()
            .map(|r| {
                let (requeued, dead, cancelled, deleted, min_idle): (u64, u64, u64, u64, u64) =
                    redis::from_redis_value(r?).map_err(protocol)?;
                Ok(Reclaimed { requeued, dead, cancelled, deleted, min_idle: Duration::from_millis(min_idle) })
            })
            .collect()
    }

    /// Cancels a job: a queued or scheduled job never starts; a running one is asked to stop.
    pub async fn cancel(&self, id: JobId) -> Result<Cancel> {
        let job = self.job(id).await?.ok_or(Error::JobNotFound(id))?;
        let q = &job.queue;
        let (job_key, scheduled) = (self.keys.job(q, id), self.keys.scheduled(q));
        let call = Call::new(&SCRIPTS.cancel, &[&job_key, &scheduled])
            .arg(id.to_string())
            .arg(self.keys.stream_prefix(q))
            .arg(self.keys.cancel_channel())
            .arg(secs(self.retention.dead));
        let (ok, state): (i64, String) = redis::from_redis_value(self.run_one(call).await?).map_err(protocol)?;
        match (ok, state.as_str()) {
            (_, "") => Err(Error::JobNotFound(id)),
            (1, "running") => Ok(Cancel::Requested),
            (1, _) => Ok(Cancel::Cancelled),
            (_, s) => Ok(Cancel::Finished(s.parse().map_err(protocol)?)),
        }
    }

    /// Runs a scheduled or retrying job now instead of at its run_at: it goes to its priority
    /// stream at once, as the promoter would move it once due (one script).
    pub async fn run_now(&self, id: JobId) -> Result<RunNow> {
        let job = self.job(id).await?.ok_or(Error::JobNotFound(id))?;
        let q = &job.queue;
        let (job_key, scheduled) = (self.keys.job(q, id), self.keys.scheduled(q));
        let [critical, high, normal, low] = self.keys.streams(q);
        let call =
            Call::new(&SCRIPTS.run_now, &[&job_key, &scheduled, &critical, &high, &normal, &low]).arg(id.to_string());
        let (ok, state, hash): (i64, String, HashMap<String, String>) =
            redis::from_redis_value(self.run_one(call).await?).map_err(protocol)?;
        match (ok, state.as_str()) {
            (_, "") => Err(Error::JobNotFound(id)),
            (1, _) => Ok(RunNow::Queued(Box::new(info_of_hash(&hash)?))),
            (_, s) => Ok(RunNow::Not(s.parse().map_err(protocol)?)),
        }
    }

    /// Cancels, or runs now, up to `limit` jobs of `queue` that have not started (see
    /// [`BulkAction`]); with `dry_run`, only counts them. Runs one script per about 100 entries
    /// and members looked at, so that Redis is never held long (measured: 2.0 ms a call, 3.5 ms
    /// at most, 100,000 jobs cancelled in 2.6 s, half of them queued and half delayed).
    pub async fn queue_jobs(
        &self,
        queue: &QueueName,
        action: BulkAction,
        filter: &BulkFilter,
        limit: u64,
        dry_run: bool,
    ) -> std::result::Result<Bulk, BulkStopped> {
        const LOOK_AT: u64 = 100;
        let stopped = |count, error| BulkStopped { done: Bulk { count, more: true }, error };
        match filter.kind.as_deref() {
            // No job has an empty type: the script would read it as no filter at all.
            Some("") => return Err(stopped(0, Error::Invalid("`type` must not be empty".into()))),
            Some(k) if k.contains('\0') => {
                return Err(stopped(0, Error::Invalid("`type` must not contain the character U+0000".into())));
            }
            _ => {}
        }
        let (takes, mode): (&[JobState], _) = match action {
            BulkAction::Cancel => (&[JobState::Queued, JobState::Scheduled, JobState::Retrying], "cancel"),
            BulkAction::Run => (&[JobState::Scheduled, JobState::Retrying], "run"),
        };
        let mut states = String::from(" ");
        for s in if filter.states.is_empty() { takes } else { &filter.states } {
            if !takes.contains(s) {
                let names: Vec<String> = takes.iter().map(ToString::to_string).collect();
                let only = names.join(", ");
                return Err(stopped(
                    0,
                    Error::Invalid(format!("`states`: {s} jobs are not taken by a queue {mode} (only {only})")),
                ));
            }
            states.push_str(&format!("{s} "));
        }
        let streams = self.keys.streams(queue);
        let scheduled = self.keys.scheduled(queue);
        let keys = [&streams[0], &streams[1], &streams[2], &streams[3], &scheduled].map(String::as_str);
        let mut cursors: [String; 5] = Default::default();
        let mut began = String::new();
        let mut count = 0;
        loop {
            let mut call = Call::new(&SCRIPTS.queue_jobs, &keys)
                .arg(self.keys.job_prefix(queue))
                .arg(secs(self.retention.dead))
                .arg(LOOK_AT)
                .arg(filter.kind.as_deref().unwrap_or(""))
                .arg(&states)
                .arg(if dry_run { "count" } else { mode });
            for c in &cursors {
                call = call.arg(c);
            }
            let reply = match self.run_one(call.arg(limit - count).arg(&began)).await {
                Ok(v) => redis::from_redis_value(v).map_err(protocol),
                Err(e) => Err(e),
            };
            let (n, c1, c2, c3, c4, c5, b): (u64, String, String, String, String, String, String) =
                reply.map_err(|e| stopped(count, e))?;
            count += n;
            cursors = [c1, c2, c3, c4, c5];
            began = b;
            let done = cursors.iter().all(|c| c == "-");
            if done || count >= limit {
                return Ok(Bulk { count, more: !done });
            }
        }
    }

    /// Removes consumers of `group` on each queue's streams (the priority streams for the worker
    /// group, the outbox for the recorder group) that have nothing pending and have been idle
    /// longer than `idle`. Returns how many were removed.
    pub async fn cleanup_consumers(&self, queues: &[QueueName], group: &str, idle: Duration) -> Result<u64> {
        let calls = queues
            .iter()
            .map(|q| {
                let keys: Vec<String> = if group == Keys::RECORDER_GROUP {
                    vec![self.keys.events(q)]
                } else {
                    self.keys.streams(q).to_vec()
                };
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                Call::new(&SCRIPTS.cleanup_consumers, &keys).arg(group).arg(idle.as_millis() as u64)
            })
            .collect();
        let mut removed = 0;
        for r in self.run(calls).await? {
            removed += redis::from_redis_value::<u64>(r?).map_err(protocol)?;
        }
        Ok(removed)
    }

    /// Pauses a queue: workers start none of its jobs until [`Broker::resume`]. Enqueueing works.
    pub async fn pause(&self, queue: &QueueName) -> Result<()> {
        self.register_queue(queue).await?;
        let mut conn = self.conn.clone();
        redis::cmd("SET").arg(self.keys.paused(queue)).arg(1).query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Resumes a paused queue.
    pub async fn resume(&self, queue: &QueueName) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL").arg(self.keys.paused(queue)).query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Subscribes to cancel requests of running jobs (the fast path; heartbeats are the sure one).
    pub async fn cancel_requests(&self) -> Result<impl futures_util::Stream<Item = JobId> + Send + 'static> {
        use futures_util::StreamExt as _;
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(self.keys.cancel_channel()).await?;
        Ok(pubsub.into_on_message().filter_map(|m| async move { m.get_payload::<String>().ok()?.parse().ok() }))
    }

    /// True when the queue is paused.
    pub async fn is_paused(&self, queue: &QueueName) -> Result<bool> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("EXISTS").arg(self.keys.paused(queue)).query_async::<i64>(&mut conn).await? == 1)
    }
}

/// XGROUP CREATE ... MKSTREAM, treating an existing group as success.
pub(crate) async fn create_group(conn: &mut ConnectionManager, stream: &str, group: &str) -> Result<()> {
    let r: redis::RedisResult<()> =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg("0").arg("MKSTREAM").query_async(conn).await;
    match r {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => Ok(other?),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn bounded_result(v: &Json) -> String {
    let s = v.to_string();
    if s.len() <= MAX_RESULT_BYTES {
        s
    } else {
        serde_json::json!({"truncated": true, "bytes": s.len()}).to_string()
    }
}

fn info_of_new(env: Envelope, state: JobState, run_at: i64) -> JobInfo {
    JobInfo {
        id: env.id,
        kind: env.kind,
        queue: env.queue,
        priority: env.priority,
        state,
        attempt: 0,
        max_attempts: env.max_attempts,
        run: 1,
        payload: env.payload,
        result: None,
        backoff: env.backoff,
        timeout: env.timeout,
        created_at: env.created_at,
        run_at: from_millis(run_at),
        started_at: None,
        finished_at: None,
        last_error: None,
        expires_at: env.expires_at,
        unique_key: env.unique_key,
        partition_key: env.partition_key,
        depends_on: env.depends_on,
        dependency_mode: env.dependency_mode,
        enqueued_by: env.enqueued_by,
        reclaims: 0,
        cancel_requested: false,
        dead_reason: None,
        progress: None,
        checkpoint: None,
        held_by: None,
        metadata: env.metadata,
        tags: env.tags,
    }
}

fn info_of_hash(h: &HashMap<String, String>) -> Result<JobInfo> {
    let env: Envelope = serde_json::from_str(h.get("envelope").ok_or_else(|| protocol("job hash without envelope"))?)?;
    let num = |f: &str| h.get(f).and_then(|v| v.parse::<i64>().ok());
    let state: JobState = h.get("state").map(String::as_str).unwrap_or("").parse().map_err(protocol)?;
    let mut info = info_of_new(env, state, num("run_at").unwrap_or(0));
    info.attempt = num("attempt").unwrap_or(0) as u32;
    info.run = num("run").unwrap_or(1) as u32;
    info.max_attempts = num("max_attempts").map(|m| m as u32).unwrap_or(info.max_attempts);
    info.started_at = num("started_at").and_then(from_millis);
    info.finished_at = num("finished_at").and_then(from_millis);
    info.last_error = h.get("last_error").cloned();
    info.result = h.get("result").and_then(|r| serde_json::from_str(r).ok());
    info.reclaims = num("reclaims").unwrap_or(0) as u32;
    info.cancel_requested = h.get("cancel_requested").is_some_and(|v| v == "1");
    info.dead_reason = h.get("dead_reason").cloned();
    info.progress = h.get("progress").and_then(|p| serde_json::from_str(p).ok());
    info.checkpoint = h.get("checkpoint").and_then(|c| serde_json::from_str(c).ok());
    info.held_by = h.get("held_by").filter(|_| state == JobState::Scheduled).cloned();
    Ok(info)
}

/// Depth and counters of one queue.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct QueueStats {
    /// Queue.
    pub queue: QueueName,
    /// Jobs ready to start, by priority.
    pub queued: std::collections::BTreeMap<String, u64>,
    /// Jobs running (pending entries).
    pub running: u64,
    /// Delayed and retrying jobs.
    pub scheduled: u64,
    /// Paused.
    pub paused: bool,
    /// Finished attempts by outcome since the queue was created.
    pub counts: std::collections::BTreeMap<String, u64>,
    /// Age in milliseconds of the oldest job waiting or running in a stream (0 when none).
    pub oldest_age_ms: i64,
}

/// One item of a batch enqueue.
pub type BatchItem = Result<Enqueued>;

impl Broker {
    /// Depth, running, scheduled, paused and counters of each queue (two pipelines).
    pub async fn queue_stats(&self, queues: &[QueueName]) -> Result<Vec<QueueStats>> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for q in queues {
            for s in self.keys.streams(q) {
                pipe.cmd("XLEN").arg(&s);
                pipe.cmd("XPENDING").arg(&s).arg(Keys::GROUP);
                pipe.cmd("XRANGE").arg(&s).arg("-").arg("+").arg("COUNT").arg(1);
            }
            pipe.cmd("ZCARD").arg(self.keys.scheduled(q));
            pipe.cmd("EXISTS").arg(self.keys.paused(q));
            pipe.cmd("HGETALL").arg(self.keys.stats(q));
        }
        pipe.cmd("TIME");
        let mut replies: Vec<redis::RedisResult<Value>> = pipe.query_async(&mut conn).await?;
        let time: (String, String) =
            redis::from_redis_value(replies.pop().ok_or_else(|| protocol("no TIME"))??).map_err(protocol)?;
        let now = time.0.parse::<i64>().unwrap_or(0) * 1000 + time.1.parse::<i64>().unwrap_or(0) / 1000;
        let mut it = replies.into_iter();
        let mut next = || it.next().unwrap_or(Ok(Value::Nil)).unwrap_or(Value::Nil);
        let mut out = Vec::with_capacity(queues.len());
        for q in queues {
            let mut stats = QueueStats {
                queue: q.clone(),
                queued: Default::default(),
                running: 0,
                scheduled: 0,
                paused: false,
                counts: Default::default(),
                oldest_age_ms: 0,
            };
            let mut oldest: Option<i64> = None;
            for p in Priority::ALL {
                let len: u64 = redis::from_redis_value(next()).unwrap_or(0);
                let pending: u64 = match next() {
                    Value::Array(v) => v.into_iter().next().and_then(|c| redis::from_redis_value(c).ok()).unwrap_or(0),
                    _ => 0,
                };
                let first: Vec<(String, Value)> = redis::from_redis_value(next()).unwrap_or_default();
                if let Some(ms) = first.first().and_then(|(id, _)| id.split('-').next()?.parse::<i64>().ok()) {
                    oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
                }
                stats.queued.insert(p.to_string(), len.saturating_sub(pending));
                stats.running += pending;
            }
            stats.scheduled = redis::from_redis_value(next()).unwrap_or(0);
            stats.paused = redis::from_redis_value::<i64>(next()).unwrap_or(0) == 1;
            stats.counts = redis::from_redis_value(next()).unwrap_or_default();
            stats.oldest_age_ms = oldest.map(|o| (now - o).max(0)).unwrap_or(0);
            out.push(stats);
        }
        Ok(out)
    }

    /// Enqueues many jobs in one round trip, and one more that reads the existing jobs of the
    /// items that are duplicates (unique key held), if any. Not atomic: each item
    /// succeeds or fails on its own (invalid items fail without touching Redis). Atomic: every
    /// item must be valid, and all are written in one MULTI/EXEC transaction, or none.
    pub async fn enqueue_many(&self, jobs: Vec<NewJob>, atomic: bool) -> Result<Vec<BatchItem>> {
        let mut items: Vec<Option<BatchItem>> = Vec::with_capacity(jobs.len());
        let mut prepared = Vec::new();
        for (i, job) in jobs.into_iter().enumerate() {
            match job.validate() {
                Ok(()) => {
                    let env = self.envelope(&job);
                    prepared.push((i, env, job.start, job.unique_ttl, job.dependencies_enqueued));
                    items.push(None);
                }
                Err(e) if atomic => return Err(Error::Invalid(format!("item {i}: {e}"))),
                Err(e) => items.push(Some(Err(e))),
            }
        }
        let queues: HashSet<QueueName> = prepared.iter().map(|(_, e, ..)| e.queue.clone()).collect();
        for q in &queues {
            self.register_queue(q).await?;
        }
        if atomic {
            self.check_dependencies(prepared.iter().map(|(_, env, ..)| env)).await?;
        }
        // One script call per queue and chunk: jobs of a queue keep their order (a job may
        // depend on one earlier in the batch), and no call holds Redis for long.
        let mut by_queue: Vec<(&QueueName, Vec<usize>)> = Vec::new();
        for (k, (_, env, ..)) in prepared.iter().enumerate() {
            match by_queue.iter_mut().find(|(q, idx)| *q == &env.queue && idx.len() < ENQUEUE_CHUNK) {
                Some((_, idx)) => idx.push(k),
                None => by_queue.push((&env.queue, vec![k])),
            }
        }
        let calls = by_queue
            .iter()
            .map(|(q, idx)| {
                self.enqueue_call(q, idx.iter().map(|&k| (&prepared[k].1, prepared[k].2, prepared[k].3, prepared[k].4)))
            })
            .collect::<Result<Vec<_>>>()?;
        let replies = if atomic { self.run_atomic(&SCRIPTS.enqueue, calls).await? } else { self.run(calls).await? };
        let mut answers: Vec<Option<Result<EnqueueReply>>> =
            std::iter::repeat_with(|| None).take(prepared.len()).collect();
        for ((_, idx), reply) in by_queue.iter().zip(replies) {
            match reply.map_err(Error::from).and_then(enqueue_replies) {
                Ok(r) if r.len() == idx.len() => {
                    for (&k, r) in idx.iter().zip(r) {
                        answers[k] = Some(Ok(r));
                    }
                }
                Ok(_) => idx.iter().for_each(|&k| answers[k] = Some(Err(protocol("short enqueue reply")))),
                Err(Error::Redis(e)) => idx.iter().for_each(|&k| answers[k] = Some(Err(Error::Redis(e.clone())))),
                Err(e) => {
                    let msg = e.to_string();
                    idx.iter().for_each(|&k| answers[k] = Some(Err(protocol(&msg))));
                }
            }
        }
        let mut places = Vec::with_capacity(prepared.len());
        let mut replies = Vec::with_capacity(prepared.len());
        for ((i, env, ..), answer) in prepared.into_iter().zip(answers) {
            places.push(i);
            replies.push((env, answer.unwrap_or_else(|| Err(protocol("missing batch reply")))));
        }
        for (i, r) in places.into_iter().zip(self.enqueued(replies).await) {
            items[i] = Some(r);
        }
        Ok(items.into_iter().map(|i| i.unwrap_or_else(|| Err(protocol("missing batch reply")))).collect())
    }

    /// Fails when a dependency of `envs` is neither among them (earlier in the batch) nor a job
    /// of the dependent's queue: an atomic batch is refused whole instead of failing half-way.
    async fn check_dependencies<'a>(&self, envs: impl Iterator<Item = &'a Envelope> + Clone) -> Result<()> {
        let in_batch: HashSet<JobId> = envs.clone().map(|e| e.id).collect();
        let outside: Vec<(&QueueName, JobId)> = envs
            .flat_map(|e| e.depends_on.iter().filter(|d| !in_batch.contains(d)).map(move |d| (&e.queue, *d)))
            .collect();
        if outside.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (q, id) in &outside {
            pipe.exists(self.keys.job(q, *id));
        }
        let mut conn = self.conn.clone();
        let found: Vec<bool> = pipe.query_async(&mut conn).await?;
        match outside.iter().zip(found).find(|(_, f)| !f) {
            Some(((q, id), _)) => Err(Error::Invalid(format!(
                "`depends_on`: no job {id} in queue `{q}` (dependencies must be in the job's queue); nothing was enqueued"
            ))),
            None => Ok(()),
        }
    }

    /// Runs calls of one script in a MULTI/EXEC transaction. The script is loaded first, so the
    /// transaction cannot fail half-way on a missing script.
    async fn run_atomic(&self, script: &Script, calls: Vec<Call>) -> Result<Vec<redis::RedisResult<Value>>> {
        let mut conn = self.conn.clone();
        for attempt in 0..2 {
            script.prepare_invoke().load_async(&mut conn).await?;
            let mut pipe = redis::pipe();
            pipe.atomic();
            for c in &calls {
                pipe.add_command(c.0.clone());
            }
            match pipe.query_async::<Vec<Value>>(&mut conn).await {
                Ok(values) => return Ok(values.into_iter().map(Ok).collect()),
                Err(e) if attempt == 0 && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(protocol("script vanished twice during a transaction"))
    }

    /// The first `count` jobs waiting in a queue's streams (one priority, or all in fetch order).
    pub async fn peek(&self, queue: &QueueName, priority: Option<Priority>, count: usize) -> Result<Vec<JobInfo>> {
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        for p in Priority::ALL.into_iter().filter(|p| priority.is_none_or(|only| only == *p)) {
            if out.len() >= count {
                break;
            }
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(self.keys.stream(queue, p))
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(count * 2)
                .query_async(&mut conn)
                .await?;
            let at: Vec<(&QueueName, JobId)> = entries
                .iter()
                .filter_map(|(_, fields)| fields.iter().find(|(k, _)| k == "id").and_then(|(_, v)| v.parse().ok()))
                .map(|id| (queue, id))
                .collect();
            for job in self.jobs_in(&at).await? {
                let Some(job) = job? else { continue };
                if job.state == JobState::Queued && out.len() < count {
                    out.push(job);
                }
            }
        }
        Ok(out)
    }

    /// Deletes every key of the namespace (SCAN + UNLINK); returns how many. The keys of a
    /// namespace nested in this one (`jobq:staging` in `jobq`) stay.
    pub async fn purge_namespace(&self) -> Result<u64> {
        let mut conn = self.conn.clone();
        let (mut cursor, mut deleted) = (0u64, 0u64);
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.keys.pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            let keys: Vec<String> = keys.into_iter().filter(|k| self.keys.owns(k)).collect();
            if !keys.is_empty() {
                deleted += redis::cmd("UNLINK").arg(&keys).query_async::<u64>(&mut conn).await?;
            }
            if next == 0 {
                if let Ok(mut s) = self.registered.lock() {
                    s.clear();
                }
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// A page of about `limit` jobs, found by scanning job hashes (bounded work per call): in
    /// `queue` or every queue, filtered by state and type. `cursor` continues a previous page.
    ///
    /// A cursor is `{scan}.{queue}`: the SCAN position within `queue` (queues are visited in name
    /// order, so a queue created between pages moves nothing). A page ends only between SCAN
    /// calls, never inside one: the same position may cover other keys once keys are added or
    /// deleted, so a page that ended inside a call could not be continued without skipping or
    /// repeating jobs. Each call asks for as many keys as the page still has room for (at least
    /// 10), so a page holds at most a few more than `limit` (a call returns whole buckets of
    /// Redis' table).
    pub async fn list_jobs(
        &self,
        queue: Option<&QueueName>,
        state: Option<JobState>,
        kind: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<(Vec<JobInfo>, Option<String>)> {
        let limit = limit.max(1);
        let queues = match queue {
            Some(q) => vec![q.clone()],
            None => self.queues().await?,
        };
        let (mut qi, mut scan) = (0usize, 0u64);
        if let Some(c) = cursor {
            let bad = || Error::Invalid(format!("invalid cursor `{c}`"));
            let (at, name) = c.split_once('.').ok_or_else(bad)?;
            let at: u64 = at.parse().map_err(|_| bad())?;
            let name: QueueName = name.parse().map_err(|_| bad())?;
            qi = queues.iter().position(|q| *q >= name).unwrap_or(queues.len());
            if queues.get(qi) == Some(&name) {
                scan = at;
            }
        }
        let mut conn = self.conn.clone();
        let mut items = Vec::new();
        // SCAN calls per page, whatever their COUNT.
        let mut calls = 40;
        while qi < queues.len() && items.len() < limit && calls > 0 {
            calls -= 1;
            let count = (limit - items.len()).clamp(10, 500);
            let pattern = format!("{}*", self.keys.job_prefix(&queues[qi]));
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(scan)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.hgetall(k);
                }
                let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
                for h in hashes.iter().filter(|h| !h.is_empty()) {
                    let info = info_of_hash(h)?;
                    if state.is_some_and(|s| s != info.state) || kind.is_some_and(|k| k != info.kind) {
                        continue;
                    }
                    items.push(info);
                }
            }
            if next == 0 {
                qi += 1;
                scan = 0;
            } else {
                scan = next;
            }
        }
        items.sort_by_key(|j| std::cmp::Reverse(j.id));
        Ok((items, queues.get(qi).map(|q| format!("{scan}.{q}"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_entry_per_stream_compares_ids_as_numbers() {
        let entries = [
            (Priority::Normal, "1733486400000-9"),
            (Priority::Normal, "1733486400000-10"),
            (Priority::Normal, "999999999999-99"),
            (Priority::Critical, "5-0"),
        ];
        assert_eq!(newest_entries(entries.into_iter()), [Some("5-0"), None, Some("1733486400000-10"), None]);
    }

    #[test]
    fn a_later_fetch_replaces_the_noted_entries_of_its_streams_only() {
        let noted = |e: [Option<&str>; 4]| Received(e.map(|e| e.map(str::to_owned)));
        let mut received = noted([Some("1-0"), None, Some("2-0"), None]);
        received.merge(noted([None, Some("3-0"), Some("4-0"), None]));
        assert_eq!(received, noted([Some("1-0"), Some("3-0"), Some("4-0"), None]));
        received.merge(Received::default());
        assert_eq!(received, noted([Some("1-0"), Some("3-0"), Some("4-0"), None]));
        assert_eq!(newest_entries([].into_iter()), [None; 4]);
        assert_eq!(stream_id("12-3"), Some((12, 3)));
        assert_eq!(stream_id("12"), None);
    }
}

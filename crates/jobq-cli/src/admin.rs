//! Admin commands of `jobq`: they talk to Redis and Postgres directly (no API needed), print
//! human tables by default and JSON with `--json`, and exit with a code that says what happened.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::Subcommand;
use jobq_core::config::Settings;
use jobq_core::job::{JobId, JobState, NewJob, Priority, QueueName, Start};
use jobq_core::schedule::ScheduleSpec;
use jobq_core::store::{DlqFilter, Store};
use jobq_core::stream::{Broker, BulkAction, BulkFilter, BulkStopped, RunNow};
use serde_json::{json, Value};

/// Exit codes of the admin commands (0 = done).
pub mod exit {
    /// Something failed.
    pub const FAILED: u8 = 1;
    /// Bad settings or arguments.
    pub const USAGE: u8 = 2;
    /// The job, schedule or queue does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// A destructive command without `--yes`.
    pub const REFUSED: u8 = 4;
    /// Redis or Postgres is unreachable.
    pub const UNAVAILABLE: u8 = 5;
}

/// An error with its exit code.
#[derive(Debug)]
pub struct Failure(pub u8, pub String);

impl From<jobq_core::Error> for Failure {
    fn from(e: jobq_core::Error) -> Self {
        let code = match &e {
            jobq_core::Error::JobNotFound(_) | jobq_core::Error::NotFound(_) => exit::NOT_FOUND,
            e if e.is_unavailable() => exit::UNAVAILABLE,
            jobq_core::Error::Invalid(_) => exit::USAGE,
            _ => exit::FAILED,
        };
        Failure(code, e.to_string())
    }
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure(exit::USAGE, msg.into())
}

/// DLQ filters on the command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DlqArgs {
    /// Only this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only this job type.
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// Only jobs whose last error contains this text.
    #[arg(long)]
    pub error: Option<String>,
}

impl DlqArgs {
    fn filter(&self, limit: i64) -> DlqFilter {
        DlqFilter {
            queue: self.queue.clone(),
            kind: self.kind.clone(),
            error: self.error.clone(),
            limit,
            ..Default::default()
        }
    }
}

/// `jobq dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Dead jobs, newest first.
    List {
        #[command(flatten)]
        filter: DlqArgs,
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: i64,
    },
    /// One dead job with every attempt.
    Show {
        /// Job id.
        id: String,
    },
    /// Retry one dead job (by id) or every match of the filters (needs --yes).
    Retry {
        /// Job id; leave out to retry by filter.
        id: Option<String>,
        #[command(flatten)]
        filter: DlqArgs,
        /// Confirm a retry by filter.
        #[arg(long)]
        yes: bool,
    },
    /// Delete every dead job matching the filters (needs --yes).
    Purge {
        #[command(flatten)]
        filter: DlqArgs,
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

/// `jobq schedules ...`
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Every schedule with its next fire time.
    List,
    /// Create a schedule.
    Add {
        /// Name.
        name: String,
        /// Cron expression (`0 30 2 * * *`, `*/5 * * * *`, `@hourly`).
        #[arg(long)]
        cron: String,
        /// Job type.
        #[arg(long = "type")]
        kind: String,
        /// Job payload (JSON).
        #[arg(long, default_value = "null")]
        payload: String,
        /// IANA time zone.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// Queue.
        #[arg(long)]
        queue: Option<String>,
    },
    /// Delete a schedule.
    Rm {
        /// Name.
        name: String,
    },
    /// Fire a schedule now.
    Trigger {
        /// Name.
        name: String,
    },
}

/// The admin commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Table of every queue: depth per priority, running, scheduled, dead, paused, counts.
    Stats,
    /// Queue names.
    Queues,
    /// The next jobs waiting in a queue.
    Peek {
        /// Queue.
        queue: String,
        /// Only this priority.
        #[arg(long)]
        priority: Option<String>,
        /// How many.
        #[arg(short = 'n', long, default_value_t = 10)]
        count: usize,
    },
    /// One job.
    Job {
        /// Job id.
        id: String,
    },
    /// Run a scheduled or retrying job now instead of at its run_at (exit 1 for any other
    /// state, which stays as it is).
    RunNow {
        /// Job id.
        id: String,
    },
    /// Enqueue a job.
    Enqueue {
        /// Job type.
        kind: String,
        /// Payload (JSON).
        #[arg(long, default_value = "null")]
        payload: String,
        /// Queue.
        #[arg(long)]
        queue: Option<String>,
        /// Priority: critical, high, normal, low.
        #[arg(long)]
        priority: Option<String>,
        /// Start after this delay (`30s`, `5m`).
        #[arg(long)]
        delay: Option<String>,
    },
    /// Dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Cron schedules.
    #[command(subcommand)]
    Schedules(ScheduleCommand),
    /// Pause a queue: workers start none of its jobs.
    Pause {
        /// Queue.
        queue: String,
    },
    /// Resume a paused queue.
    Resume {
        /// Queue.
        queue: String,
    },
    /// Cancel a queue's jobs that have not started (queued, delayed, held back, waiting for a
    /// retry); running jobs are left. Needs --yes unless --dry-run.
    CancelJobs(BulkArgs),
    /// Queue a queue's scheduled and retrying jobs now instead of at their run_at. Needs --yes
    /// unless --dry-run.
    RunJobs(BulkArgs),
    /// Delete every Redis key of this namespace (JOBQ_NAMESPACE): all jobs, queues and locks.
    /// Postgres history, DLQ and schedules are kept.
    PurgeAll {
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

/// Which jobs of a queue `cancel-jobs` and `run-jobs` take.
#[derive(Debug, Clone, clap::Args)]
pub struct BulkArgs {
    /// Queue.
    queue: String,
    /// Only jobs of this type.
    #[arg(long = "type")]
    kind: Option<String>,
    /// Only jobs in this state (cancel-jobs: queued, scheduled, retrying; run-jobs: scheduled,
    /// retrying); repeat for more. Default: all of them.
    #[arg(long = "state")]
    states: Vec<String>,
    /// Only count them.
    #[arg(long)]
    dry_run: bool,
    /// Confirm.
    #[arg(long)]
    yes: bool,
}

/// `cancel-jobs` and `run-jobs`: every matching job, 100,000 per call; audited.
async fn bulk(
    broker: &Broker,
    settings: &Settings,
    action: BulkAction,
    args: BulkArgs,
    as_json: bool,
) -> Result<(), Failure> {
    let q = queue(&args.queue)?;
    let states = args.states.iter().map(|s| s.parse()).collect::<Result<Vec<JobState>, _>>().map_err(usage)?;
    let (command, audit, key, done_verb, dry_verb) = match action {
        BulkAction::Cancel => ("cancel-jobs", "queue.cancel", "cancelled", "cancelled", "would cancel"),
        BulkAction::Run => ("run-jobs", "queue.run", "queued", "queued now", "would queue now"),
    };
    if !args.dry_run && !args.yes {
        return Err(Failure(
            exit::REFUSED,
            format!(
                "{command} changes the jobs of queue `{q}` that have not started; run again with --yes (or --dry-run)"
            ),
        ));
    }
    let filter = BulkFilter { kind: args.kind, states };
    // A dry run counts the whole queue in one go; the real thing goes 100,000 at a time.
    let limit = if args.dry_run { u64::MAX } else { 100_000 };
    let mut count = 0;
    let mut error = None;
    loop {
        match broker.queue_jobs(&q, action, &filter, limit, args.dry_run).await {
            Ok(done) => {
                count += done.count;
                if args.dry_run || !done.more {
                    break;
                }
            }
            Err(BulkStopped { done, error: e }) => {
                count += done.count;
                error = Some(e);
                break;
            }
        }
    }
    // Refused (bad filter), or only counting: nothing to audit. A Redis error is audited even
    // with nothing counted: the call that failed may have taken jobs before its reply was lost.
    if let Some(e) = error.take_if(|e| args.dry_run || (count == 0 && matches!(e, jobq_core::Error::Invalid(_)))) {
        return Err(e.into());
    }
    if !args.dry_run {
        let f = json!({"queue": q, "type": filter.kind, "states": filter.states});
        let details = error.as_ref().map(|e| json!({"stopped": e.to_string()}));
        let mut db = settings.database.clone();
        db.create = false;
        let audited = match Store::connect(&db).await {
            Ok(store) => store.audit(&actor(), audit, Some(q.to_string()), Some(f), count as i64, details).await,
            Err(e) => Err(e),
        };
        if let Err(e) = audited {
            eprintln!("warning: the jobs are {done_verb}, but the audit entry could not be written: {e}");
        }
    }
    if as_json {
        let key = if args.dry_run { "matched" } else { key };
        let mut v = json!({"queue": q});
        v[key] = json!(count);
        println!("{v}");
    } else {
        println!("{} {count} jobs of queue {q}", if args.dry_run { dry_verb } else { done_verb });
    }
    match error {
        // Stopped half-way: what was done is printed and audited, and the exit code says so.
        Some(e) => Err(Failure::from(e)),
        None => Ok(()),
    }
}

fn queue(name: &str) -> Result<QueueName, Failure> {
    name.parse().map_err(usage)
}

fn job_id(id: &str) -> Result<JobId, Failure> {
    id.parse().map_err(|_| usage(format!("invalid job id `{id}`: expected a UUID")))
}

fn payload(raw: &str) -> Result<Value, Failure> {
    serde_json::from_str(raw).map_err(|e| usage(format!("--payload is not JSON: {e}")))
}

fn actor() -> String {
    format!("cli:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()))
}

/// A progress line on stderr when it is a terminal.
fn progress(done: usize, total: usize, what: &str) {
    let mut err = std::io::stderr();
    if err.is_terminal() && total > 0 {
        let width = 30;
        let filled = done * width / total;
        let _ = write!(err, "\r{what} [{}{}] {done}/{total}", "#".repeat(filled), ".".repeat(width - filled));
        if done == total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}

/// Prints rows as an aligned table.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_owned()
    };
    println!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        println!("{}", line(r.clone()));
    }
}

fn age(ms: i64) -> String {
    match ms {
        0 => "-".into(),
        ms if ms < 1000 => format!("{ms}ms"),
        ms => jobq_core::duration::format(Duration::from_secs((ms / 1000) as u64)),
    }
}

/// Runs one admin command; prints its result; returns the exit code.
pub async fn run(settings: &Settings, cmd: AdminCommand, as_json: bool) -> Result<(), Failure> {
    let broker = Broker::connect(settings).await?;
    let store = || async {
        let mut db = settings.database.clone();
        db.create = false;
        Store::connect(&db).await
    };
    let print = |v: Value| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    match cmd {
        AdminCommand::Stats => {
            let queues = broker.queues().await?;
            let stats = broker.queue_stats(&queues).await?;
            // Redis' figures stand without Postgres; DEAD then shows `?` (null in JSON).
            let dead = match store().await {
                Ok(store) => store.dead_counts().await,
                Err(e) => Err(e),
            };
            let dead = match dead {
                Ok(d) => Some(d),
                Err(e) => {
                    eprintln!("warning: dead-job counts unavailable (Postgres: {e})");
                    None
                }
            };
            let dead_of = |q: &str| dead.as_ref().map(|d| d.get(q).copied().unwrap_or(0));
            if as_json {
                let items: Vec<Value> = stats
                    .iter()
                    .map(|s| {
                        let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
                        v["dead"] = json!(dead_of(s.queue.as_str()));
                        v
                    })
                    .collect();
                print(json!({"queues": items}));
            } else {
                let rows: Vec<Vec<String>> = stats
                    .iter()
                    .map(|s| {
                        let q = |p: &str| s.queued.get(p).copied().unwrap_or(0).to_string();
                        let c = |o: &str| s.counts.get(o).copied().unwrap_or(0).to_string();
                        vec![
                            s.queue.to_string(),
                            q("critical"),
                            q("high"),
                            q("normal"),
                            q("low"),
                            s.running.to_string(),
                            s.scheduled.to_string(),
                            dead_of(s.queue.as_str()).map_or("?".into(), |n| n.to_string()),
                            if s.paused { "yes".into() } else { "no".into() },
                            c("succeeded"),
                            c("failed"),
                            age(s.oldest_age_ms),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "QUEUE",
                        "CRITICAL",
                        "HIGH",
                        "NORMAL",
                        "LOW",
                        "RUNNING",
                        "SCHEDULED",
                        "DEAD",
                        "PAUSED",
                        "SUCCEEDED",
                        "FAILED",
                        "OLDEST",
                    ],
                    &rows,
                );
            }
        }
        AdminCommand::Queues => {
            let queues = broker.queues().await?;
            if as_json {
                print(json!(queues));
            } else {
                for q in queues {
                    println!("{q}");
                }
            }
        }
        AdminCommand::Peek { queue: q, priority, count } => {
            let q = queue(&q)?;
            let only: Option<Priority> = priority.map(|p| p.parse().map_err(usage)).transpose()?;
            let jobs = broker.peek(&q, only, count).await?;
            if as_json {
                print(json!(jobs));
            } else {
                let rows: Vec<Vec<String>> = jobs
                    .iter()
                    .map(|j| {
                        vec![
                            j.id.to_string(),
                            j.kind.clone(),
                            j.priority.to_string(),
                            j.state.to_string(),
                            j.created_at.to_rfc3339(),
                        ]
                    })
                    .collect();
                table(&["ID", "TYPE", "PRIORITY", "STATE", "CREATED"], &rows);
            }
        }
        AdminCommand::Job { id } => {
            let id = job_id(&id)?;
            let job = broker.job(id).await?.ok_or(jobq_core::Error::JobNotFound(id))?;
            print(serde_json::to_value(&job).unwrap_or(Value::Null));
        }
        AdminCommand::RunNow { id } => {
            let id = job_id(&id)?;
            let job = match broker.run_now(id).await? {
                RunNow::Queued(job) => job,
                RunNow::Not(state) => {
                    return Err(Failure(
                        exit::FAILED,
                        format!("job {id} is {state}: only a scheduled or retrying job can be run now"),
                    ));
                }
            };
            if as_json {
                print(serde_json::to_value(&job).unwrap_or(Value::Null));
            } else {
                println!("job {id} is {} in queue {}", job.state, job.queue);
            }
        }
        AdminCommand::Enqueue { kind, payload: p, queue: q, priority, delay } => {
            let mut job = NewJob::new(kind, payload(&p)?);
            if let Some(q) = q {
                job.queue = queue(&q)?;
            }
            if let Some(p) = priority {
                job.priority = p.parse().map_err(usage)?;
            }
            if let Some(d) = delay {
                job.start = Start::After(jobq_core::duration::parse_with_unit(&d).map_err(usage)?);
            }
            job.enqueued_by = Some(actor());
            let e = broker.enqueue(job).await?;
            if as_json {
                print(serde_json::to_value(&e.job).unwrap_or(Value::Null));
            } else {
                println!("{} {} ({})", if e.created { "enqueued" } else { "exists" }, e.job.id, e.job.state);
            }
        }
        AdminCommand::Dlq(cmd) => dlq(&broker, &store().await?, cmd, as_json).await?,
        AdminCommand::Schedules(cmd) => schedules(&broker, &store().await?, cmd, as_json).await?,
        AdminCommand::Pause { queue: q } => {
            broker.pause(&queue(&q)?).await?;
            println!(
                "{}",
                if as_json { json!({"queue": q, "paused": true}).to_string() } else { format!("paused {q}") }
            );
        }
        AdminCommand::Resume { queue: q } => {
            broker.resume(&queue(&q)?).await?;
            println!(
                "{}",
                if as_json { json!({"queue": q, "paused": false}).to_string() } else { format!("resumed {q}") }
            );
        }
        AdminCommand::CancelJobs(args) => bulk(&broker, settings, BulkAction::Cancel, args, as_json).await?,
        AdminCommand::RunJobs(args) => bulk(&broker, settings, BulkAction::Run, args, as_json).await?,
        AdminCommand::PurgeAll { yes } => {
            if !yes {
                return Err(Failure(
                    exit::REFUSED,
                    format!("purge-all deletes every job of namespace `{}`; run again with --yes", settings.namespace),
                ));
            }
            let deleted = broker.purge_namespace().await?;
            println!(
                "{}",
                if as_json {
                    json!({"deleted_keys": deleted}).to_string()
                } else {
                    format!("deleted {deleted} keys of namespace {}", settings.namespace)
                }
            );
        }
    }
    Ok(())
}

async fn dlq(broker: &Broker, store: &Store, cmd: DlqCommand, as_json: bool) -> Result<(), Failure> {
    let print = |v: Value| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    match cmd {
        DlqCommand::List { filter, limit } => {
            if !(1..=jobq_core::store::MAX_PAGE).contains(&limit) {
                return Err(usage(format!("-n: between 1 and {}", jobq_core::store::MAX_PAGE)));
            }
            let page = store.dead_jobs(&filter.filter(limit)).await?;
            if as_json {
                print(serde_json::to_value(&page).unwrap_or(Value::Null));
            } else {
                let rows: Vec<Vec<String>> = page
                    .items
                    .iter()
                    .map(|d| {
                        let err: String = d.last_error.clone().unwrap_or_default().chars().take(60).collect();
                        vec![
                            d.job_id.to_string(),
                            d.queue.clone(),
                            d.kind.clone(),
                            d.reason.clone(),
                            d.failed_at.to_rfc3339(),
                            err,
                        ]
                    })
                    .collect();
                table(&["ID", "QUEUE", "TYPE", "REASON", "FAILED", "ERROR"], &rows);
            }
        }
        DlqCommand::Show { id } => {
            let id = job_id(&id)?;
            let dead = store
                .dead_job(id)
                .await?
                .ok_or_else(|| Failure(exit::NOT_FOUND, format!("job {id} is not in the dead-letter queue")))?;
            let executions = store.executions(id).await?;
            print(json!({"job": dead, "executions": executions}));
        }
        DlqCommand::Retry { id: Some(id), .. } => {
            let id = job_id(&id)?;
            let r = store.retry_dead(broker, id, None).await?;
            if let Err(e) = store.audit(&actor(), "dlq.retry", Some(id.to_string()), None, 1, None).await {
                eprintln!("warning: job {id} is re-enqueued, but the audit entry could not be written: {e}");
            }
            println!(
                "{}",
                if as_json {
                    json!({"job_id": r.job_id, "run": r.run}).to_string()
                } else {
                    format!("re-enqueued {} (run {})", r.job_id, r.run)
                }
            );
        }
        DlqCommand::Retry { id: None, filter, yes } => {
            // The jobs dead now: one retried that dies again meanwhile is not taken twice.
            let mut f = filter.filter(jobq_core::store::MAX_PAGE);
            let now = chrono::Utc::now();
            f.failed_before = Some(f.failed_before.map_or(now, |b| b.min(now)));
            let total = store.count_dead(&f).await? as usize;
            if !yes {
                return Err(Failure(
                    exit::REFUSED,
                    format!("{total} dead jobs match; run again with --yes to retry them"),
                ));
            }
            let mut retried = 0usize;
            // A job retried or deleted meanwhile is skipped; any other error (Redis or Postgres
            // out) is counted, and the command fails once the rest are done. Pages follow the
            // DLQ's cursor, so every match is reached however many there are.
            let (mut failed, mut first_error, mut done) = (0usize, None, 0usize);
            loop {
                let page = match store.dead_jobs(&f).await {
                    Ok(page) => page,
                    Err(e) => {
                        failed += total.saturating_sub(done);
                        first_error.get_or_insert(e);
                        break;
                    }
                };
                for dead in page.items {
                    match store.retry_dead_matching(broker, dead.job_id, &f, None).await {
                        Ok(_) => retried += 1,
                        Err(
                            jobq_core::Error::Conflict(_)
                            | jobq_core::Error::JobNotFound(_)
                            | jobq_core::Error::NotFound(_),
                        ) => {}
                        Err(e) => {
                            failed += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                    done += 1;
                    progress(done.min(total), total, "retrying");
                }
                match page.next_cursor {
                    Some(c) => f.cursor = Some(c),
                    None => break,
                }
            }
            f.cursor = None;
            let details = first_error.as_ref().map(|e| json!({"failed": failed, "stopped": e.to_string()}));
            let filter = serde_json::to_value(&f).ok();
            if let Err(e) = store.audit(&actor(), "dlq.retry_filter", None, filter, retried as i64, details).await {
                eprintln!("warning: {retried} jobs are re-enqueued, but the audit entry could not be written: {e}");
            }
            println!(
                "{}",
                if as_json {
                    json!({"retried": retried, "matched": total, "failed": failed}).to_string()
                } else if failed > 0 {
                    format!("re-enqueued {retried} of {total}; {failed} failed")
                } else {
                    format!("re-enqueued {retried} of {total}")
                }
            );
            if let Some(e) = first_error {
                return Err(e.into());
            }
        }
        DlqCommand::Purge { filter, yes } => {
            let f = filter.filter(0);
            let matched = store.count_dead(&f).await?;
            if !yes {
                return Err(Failure(
                    exit::REFUSED,
                    format!("{matched} dead jobs match; run again with --yes to delete them"),
                ));
            }
            progress(0, matched as usize, "purging");
            let (deleted, error) = match store.purge_dead(&f).await {
                Ok(n) => (n, None),
                Err(jobq_core::store::PurgeStopped { deleted, error }) => (deleted, Some(error)),
            };
            progress(matched as usize, matched as usize, "purging");
            // Batches commit one by one: a purge stopped half-way is audited with what it did.
            let details = error.as_ref().map(|e| json!({"stopped": e.to_string()}));
            let filter = serde_json::to_value(&f).ok();
            if let Err(e) = store.audit(&actor(), "dlq.purge", None, filter, deleted as i64, details).await {
                eprintln!("warning: {deleted} dead jobs are deleted, but the audit entry could not be written: {e}");
            }
            println!(
                "{}",
                if as_json { json!({"deleted": deleted}).to_string() } else { format!("deleted {deleted}") }
            );
            if let Some(e) = error {
                return Err(e.into());
            }
        }
    }
    Ok(())
}

async fn schedules(broker: &Broker, store: &Store, cmd: ScheduleCommand, as_json: bool) -> Result<(), Failure> {
    match cmd {
        ScheduleCommand::List => {
            let all = store.schedules().await?;
            if as_json {
                println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|s| {
                        let next = s.next_fire_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into());
                        vec![
                            s.spec.name.clone(),
                            s.spec.cron.clone(),
                            s.spec.timezone.clone(),
                            s.spec.job.kind.clone(),
                            s.spec.enabled.to_string(),
                            next,
                        ]
                    })
                    .collect();
                table(&["NAME", "CRON", "TIMEZONE", "TYPE", "ENABLED", "NEXT"], &rows);
            }
        }
        ScheduleCommand::Add { name, cron, kind, payload: p, timezone, queue: q } => {
            let spec: ScheduleSpec = serde_json::from_value(json!({
                "name": name, "cron": cron, "timezone": timezone,
                "job": {"type": kind, "payload": payload(&p)?, "queue": q},
            }))
            .map_err(|e| usage(e.to_string()))?;
            let s = store.create_schedule(&spec).await.map_err(|e| match e {
                jobq_core::Error::Conflict(m) => Failure(exit::FAILED, m),
                e => e.into(),
            })?;
            println!(
                "{}",
                if as_json {
                    serde_json::to_string(&s).unwrap_or_default()
                } else {
                    format!(
                        "created {} (next {})",
                        s.spec.name,
                        s.next_fire_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                    )
                }
            );
        }
        ScheduleCommand::Rm { name } => {
            if !store.delete_schedule(&name).await? {
                return Err(Failure(exit::NOT_FOUND, format!("schedule `{name}` not found")));
            }
            if let Err(e) = store.audit(&actor(), "schedule.delete", Some(name.clone()), None, 1, None).await {
                eprintln!("warning: schedule {name} is deleted, but the audit entry could not be written: {e}");
            }
            println!("{}", if as_json { json!({"deleted": name}).to_string() } else { format!("deleted {name}") });
        }
        ScheduleCommand::Trigger { name } => {
            let job = store.trigger_schedule(broker, &name).await?;
            println!(
                "{}",
                if as_json { serde_json::to_string(&job).unwrap_or_default() } else { format!("enqueued {}", job.id) }
            );
        }
    }
    Ok(())
}

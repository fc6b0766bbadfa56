//! The chaos suite's workload and its history checker.
//!
//! `jobq-chaos-worker` runs the handlers below; `chaos.work` appends one row per finished
//! attempt to `chaos_effects (job_id, attempt, worker, started_at, finished_at)` in the test's
//! database, the side effect a real handler would have. After the fault and quiescence,
//! [`check`] compares the acknowledged enqueues with the job states, the dead-letter queue,
//! the history and the side effects.

use std::collections::{HashMap, HashSet};

use jobq_core::job::{JobId, JobState};
use jobq_core::stream::Broker;
use sqlx::PgPool;

/// Creates the side-effect table.
pub async fn create_effects_table(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS chaos_effects (
            job_id uuid NOT NULL, attempt int NOT NULL, worker text NOT NULL,
            started_at timestamptz NOT NULL, finished_at timestamptz NOT NULL)",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// What the checker found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Acknowledged enqueues.
    pub jobs: usize,
    /// Acknowledged jobs not in exactly one terminal state (missing, or still not finished).
    pub lost: Vec<JobId>,
    /// Jobs whose side effect happened more than once.
    pub duplicated: Vec<JobId>,
    /// Duplicated jobs that were not in flight on a killed or frozen worker.
    pub unexplained_duplicates: Vec<JobId>,
    /// Side effects, history or DLQ rows of jobs that were never enqueued.
    pub phantoms: usize,
    /// (job, run, attempt) keys with more than one history row, and jobs with more than one
    /// DLQ row per run.
    pub double_records: usize,
    /// Terminal states of the acknowledged jobs.
    pub states: HashMap<JobState, usize>,
}

impl Verdict {
    /// No loss, no phantom, no double record, duplicates only where a process died.
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.unexplained_duplicates.is_empty() && self.phantoms == 0 && self.double_records == 0
    }

    /// One line for the figures table.
    pub fn line(&self, scenario: &str, bound: &str) -> String {
        format!(
            "| {scenario} | {} | {} | {} | {bound} | {} |",
            self.jobs,
            self.lost.len(),
            self.duplicated.len(),
            if self.passed() { "pass" } else { "FAIL" }
        )
    }
}

/// Checks the history of a run: `acked` are the ids whose enqueue was acknowledged;
/// `victims` the worker names (`pid`) of processes that were killed or frozen; `effects`
/// whether the workload's handler writes side effects (every succeeded job must have one).
pub async fn check(
    broker: &Broker,
    pool: &PgPool,
    acked: &[JobId],
    victims: &HashSet<String>,
) -> anyhow::Result<Verdict> {
    let mut v = Verdict { jobs: acked.len(), ..Verdict::default() };
    let known: HashSet<JobId> = acked.iter().copied().collect();
    for chunk in acked.chunks(1000) {
        let jobs: Vec<_> = chunk.iter().map(|id| (jobq_core::job::QueueName::default_queue(), *id)).collect();
        for (id, state) in chunk.iter().zip(broker.states(&jobs).await?) {
            match state {
                Some(s) if s.is_terminal() => *v.states.entry(s).or_default() += 1,
                _ => v.lost.push(*id),
            }
        }
    }
    let effects: Vec<(uuid::Uuid, i32, String)> =
        sqlx::query_as("SELECT job_id, attempt, worker FROM chaos_effects ORDER BY finished_at")
            .fetch_all(pool)
            .await?;
    let mut by_job: HashMap<JobId, Vec<String>> = HashMap::new();
    for (id, _attempt, worker) in effects {
        let id = JobId(id);
        if !known.contains(&id) {
            v.phantoms += 1;
        }
        by_job.entry(id).or_default().push(worker);
    }
    for (id, workers) in &by_job {
        if workers.len() > 1 {
            v.duplicated.push(*id);
            // All but the last effect must come from a worker that died or froze mid-job.
            if !workers[..workers.len() - 1].iter().all(|w| victims.contains(w)) {
                v.unexplained_duplicates.push(*id);
            }
        }
    }
    let history: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT DISTINCT job_id FROM job_executions").fetch_all(pool).await?;
    v.phantoms += history.iter().filter(|id| !known.contains(&JobId(**id))).count();
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT job_id, run, attempt FROM job_executions GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await?;
    let dlq_doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT job_id, run FROM dead_jobs GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await?;
    v.double_records = (doubled + dlq_doubled) as usize;
    v.lost.sort();
    v.duplicated.sort();
    Ok(v)
}

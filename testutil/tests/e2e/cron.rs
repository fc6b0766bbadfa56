//! Cron with several real scheduler processes: every tick fires exactly once, also when one
//! replica is killed mid-run.

use std::collections::HashSet;
use std::time::Duration;

use jobq_core::job::{Priority, QueueName};
use jobq_testutil::{Proc, TestEnv};
use redis::AsyncCommands;

#[tokio::test]
async fn two_schedulers_fire_each_tick_once_even_when_one_is_killed() {
    let env = TestEnv::with(&[("JOBQ_SCHEDULER_CRON_POLL", "250ms")]).await;
    let spec = serde_json::from_value(serde_json::json!({
        "name": "every-second", "cron": "* * * * * *", "job": {"type": "echo"}
    }))
    .unwrap();
    env.store.create_schedule(&spec).await.unwrap();
    let mut a = Proc::spawn("jobq-scheduler", &env.env());
    let mut b = Proc::spawn("jobq-scheduler", &env.env());
    tokio::time::sleep(Duration::from_secs(10)).await;
    a.signal("KILL");
    a.wait(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    b.signal("TERM");
    assert_eq!(b.wait(Duration::from_secs(10)).await, Some(0));

    let rows: Vec<(chrono::DateTime<chrono::Utc>, uuid::Uuid)> =
        sqlx::query_as("SELECT tick, job_id FROM schedule_runs WHERE trigger = 'cron' ORDER BY tick")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(rows.len() >= 17, "about 20 ticks in 20 s, got {}", rows.len());
    let jobs: HashSet<uuid::Uuid> = rows.iter().map(|r| r.1).collect();
    assert_eq!(jobs.len(), rows.len(), "one job per tick");
    for pair in rows.windows(2) {
        assert_eq!((pair[1].0 - pair[0].0).num_seconds(), 1, "no tick lost between {} and {}", pair[0].0, pair[1].0);
    }
    let enqueued: u64 =
        env.broker.connection().xlen(env.keys().stream(&QueueName::default_queue(), Priority::Normal)).await.unwrap();
    assert_eq!(enqueued as usize, rows.len(), "every tick enqueued exactly once");
    eprintln!("cron figures: ticks={} doubled=0 lost=0 (20 s, 2 replicas, one killed at 10 s)", rows.len());
    env.cleanup().await;
}

#[tokio::test]
async fn a_replica_frozen_mid_claim_does_not_fire_the_tick_again_when_it_wakes() {
    // Replica A stops (SIGSTOP) once it holds the schedule's row and has enqueued nothing.
    frozen_replica_fires_nothing_when_it_wakes("cron.claimed").await;
}

#[tokio::test]
async fn a_replica_frozen_right_after_its_session_answered_does_not_fire_the_tick_when_it_wakes() {
    // Replica A stops right after the statement that vouches for its session has answered, just
    // before the enqueue (as when the answer waits in the socket while the process is frozen).
    frozen_replica_fires_nothing_when_it_wakes("cron.checked").await;
}

/// Replica A stops (SIGSTOP) at `point` of its first claim; B fires the tick once Postgres has
/// ended A's session; the tick's key is deleted (its expiry after a long freeze) and A wakes.
async fn frozen_replica_fires_nothing_when_it_wakes(point: &str) {
    let env = TestEnv::with(&[("JOBQ_SCHEDULER_CRON_POLL", "250ms")]).await;
    let spec = serde_json::from_value(serde_json::json!({
        "name": "every-second", "cron": "* * * * * *", "job": {"type": "echo"}
    }))
    .unwrap();
    env.store.create_schedule(&spec).await.unwrap();
    let first: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT next_fire_at FROM schedules").fetch_one(&env.pool).await.unwrap();
    let mut a = Proc::spawn("jobq-scheduler", &env.env_with(&[("JOBQ_FAULTS", &format!("{point}=stop"))]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut b = Proc::spawn("jobq-scheduler", &env.env());
    // Postgres ends A's session after 10 s idle in its transaction; B then fires the tick.
    jobq_testutil::wait_until(Duration::from_secs(30), "B to fire A's tick", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM schedule_runs WHERE tick = $1")
            .bind(first)
            .fetch_one(&env.pool)
            .await
            .unwrap();
        (n == 1).then_some(())
    })
    .await;
    // A stays frozen past the tick key's ttl (its expiry is what is simulated here), then wakes.
    let key =
        env.keys().unique(&QueueName::default_queue(), &format!("cron:every-second:{}", first.timestamp_millis()));
    let _: () = env.broker.connection().del(&key).await.unwrap();
    a.signal("CONT");
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.signal("KILL");
    a.wait(Duration::from_secs(5)).await;
    // Killed between an enqueue and its commit, A leaves a job whose run is not recorded; B
    // fires that tick again and records it with A's job (the tick's key gives it back). A job
    // that never gets a run is one fired twice, which the assertion below names.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !unrecorded(&env).await.1.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.signal("TERM");
    assert_eq!(b.wait(Duration::from_secs(10)).await, Some(0));
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM schedule_runs WHERE trigger = 'cron'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let (entries, extra) = unrecorded(&env).await;
    assert_eq!(entries as i64, runs, "A enqueued nothing after it woke: one job per tick; not recorded: {extra:?}");
    env.cleanup().await;
}

/// The number of entries in the default queue's stream, and those whose job no schedule run
/// names (entry id, the job's metadata and creation time).
async fn unrecorded(env: &TestEnv) -> (usize, Vec<String>) {
    let stream = env.keys().stream(&QueueName::default_queue(), Priority::Normal);
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(&stream).arg("-").arg("+").query_async(&mut env.broker.connection()).await.unwrap();
    let recorded: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT job_id FROM schedule_runs").fetch_all(&env.pool).await.unwrap();
    let mut extra = Vec::new();
    for (entry, fields) in &entries {
        let id: uuid::Uuid = fields[0].1.parse().unwrap();
        if !recorded.contains(&id) {
            let job = env.broker.job(jobq_core::job::JobId(id)).await.unwrap();
            extra.push(format!("{entry}: {:?}", job.map(|j| (j.metadata, j.created_at))));
        }
    }
    (entries.len(), extra)
}

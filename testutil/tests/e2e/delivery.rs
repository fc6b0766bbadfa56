//! Delivery under faults with real processes: kill -9, SIGTERM, Postgres outage, priorities,
//! cancellation, unique keys, pause.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use jobq_core::job::{JobId, NewJob, Priority, QueueName};
use jobq_testutil::{free_port, wait_until, Api, Proc, TcpProxy, TestEnv};
use redis::AsyncCommands;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const FAST_LEASES: &[(&str, &str)] =
    &[("JOBQ_WORKER_LEASE", "1500ms"), ("JOBQ_WORKER_HEARTBEAT", "300ms"), ("JOBQ_WORKER_REAPER_INTERVAL", "300ms")];

fn with_id(env: &TestEnv, id: &str) -> HashMap<String, String> {
    env.env_with(&[("JOBQ_WORKER_ID", id)])
}

/// HMGET of `fields` for every job, in one pipeline.
async fn fields(env: &TestEnv, ids: &[JobId], names: &[&str]) -> Vec<Vec<Option<String>>> {
    let q = QueueName::default_queue();
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HMGET").arg(env.keys().job(&q, *id)).arg(names);
    }
    pipe.query_async(&mut env.broker.connection()).await.unwrap()
}

async fn count_states(env: &TestEnv, ids: &[JobId]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for f in fields(env, ids, &["state"]).await {
        *m.entry(f[0].clone().unwrap_or_default()).or_insert(0) += 1;
    }
    m
}

async fn enqueue_many(env: &TestEnv, jobs: impl IntoIterator<Item = NewJob>) -> Vec<JobId> {
    let mut ids = Vec::new();
    for j in jobs {
        ids.push(env.broker.enqueue(j).await.unwrap().job.id);
    }
    ids
}

#[tokio::test]
async fn a_worker_killed_mid_run_loses_no_job_and_only_its_jobs_run_twice() {
    let env = TestEnv::with(FAST_LEASES).await;
    let ids = enqueue_many(&env, (0..2000u64).map(|i| NewJob::new("sleep", json!({"ms": 50 + (i * 37) % 151})))).await;
    let mut scheduler = Proc::spawn("jobq-scheduler", &env.env());
    let mut victim = Proc::spawn("jobq-worker", &with_id(&env, "victim"));
    let mut survivor = Proc::spawn("jobq-worker", &with_id(&env, "survivor"));
    wait_until(WAIT, "a quarter of the jobs to finish", || async {
        (count_states(&env, &ids).await.get("succeeded").copied().unwrap_or(0) >= 500).then_some(())
    })
    .await;
    victim.signal("KILL");
    victim.wait(Duration::from_secs(5)).await;
    let killed_at = Instant::now();
    // What the victim held when it died: jobs running under its name.
    let held: HashSet<JobId> = fields(&env, &ids, &["state", "worker"])
        .await
        .into_iter()
        .zip(&ids)
        .filter(|(f, _)| {
            f[0].as_deref() == Some("running") && f[1].as_deref().is_some_and(|w| w.starts_with("victim-"))
        })
        .map(|(_, id)| *id)
        .collect();
    assert!(!held.is_empty(), "the victim was running jobs when it was killed");
    wait_until(WAIT, "every job to succeed", || async {
        (count_states(&env, &ids).await.get("succeeded").copied().unwrap_or(0) == 2000).then_some(())
    })
    .await;
    let recovered_in = killed_at.elapsed();
    let twice: HashSet<JobId> = fields(&env, &ids, &["attempts_total", "reclaims", "attempt"])
        .await
        .into_iter()
        .zip(&ids)
        .filter(|(f, _)| {
            assert_eq!(f[2].as_deref(), Some("1"), "a crash spends no attempt");
            // `reclaims` is absent until a first reclaim.
            f[0].as_deref() != Some("1") || f[1].as_deref().unwrap_or("0") != "0"
        })
        .map(|(_, id)| *id)
        .collect();
    assert!(twice.is_subset(&held), "only jobs running on the killed worker ran again");
    // A job whose outcome the victim had already sent may still complete from its socket
    // buffer; every other job it held runs again.
    assert!(!twice.is_empty(), "the victim's jobs were reclaimed and re-run");
    let rows = wait_until(WAIT, "every attempt recorded", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM job_executions").fetch_one(&env.pool).await.unwrap();
        (n >= 2000).then_some(n)
    })
    .await;
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT job_id) FROM job_executions WHERE outcome = 'succeeded'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((rows, distinct), (2000, 2000), "one history row per job: crashed attempts leave none");
    eprintln!(
        "kill -9 figures: jobs=2000 lost=0 held_by_victim={} rerun={} recovered_in={:?}",
        held.len(),
        twice.len(),
        recovered_in
    );
    survivor.signal("TERM");
    scheduler.signal("TERM");
    assert_eq!(survivor.wait(Duration::from_secs(10)).await, Some(0));
    assert_eq!(scheduler.wait(Duration::from_secs(10)).await, Some(0));
    env.cleanup().await;
}

#[tokio::test]
async fn sigterm_finishes_short_jobs_and_leaves_long_ones_for_another_worker() {
    let mut vars: Vec<(&str, &str)> = FAST_LEASES.to_vec();
    vars.push(("JOBQ_WORKER_SHUTDOWN_TIMEOUT", "1s"));
    let env = TestEnv::with(&vars).await;
    let short = enqueue_many(&env, (0..10).map(|_| NewJob::new("sleep", json!({"ms": 300})))).await;
    let long = enqueue_many(&env, (0..5).map(|_| NewJob::new("sleep", json!({"ms": 4000})))).await;
    let mut first = Proc::spawn("jobq-worker", &with_id(&env, "first"));
    wait_until(WAIT, "all 15 jobs to start", || async {
        (count_states(&env, &[short.clone(), long.clone()].concat()).await.get("running").copied() == Some(15))
            .then_some(())
    })
    .await;
    let signalled = Instant::now();
    first.signal("TERM");
    assert_eq!(first.wait(Duration::from_secs(5)).await, Some(0), "exit 0");
    let took = signalled.elapsed();
    assert!(took < Duration::from_millis(3000), "exited within the shutdown timeout + 2s ({took:?})");
    assert_eq!(count_states(&env, &short).await.get("succeeded").copied(), Some(10), "in-flight short jobs finished");
    assert_eq!(
        count_states(&env, &long).await.get("running").copied(),
        Some(5),
        "long jobs were left unacked, not failed"
    );
    let mut second = Proc::spawn("jobq-worker", &with_id(&env, "second"));
    wait_until(WAIT, "the long jobs to be reclaimed and finish", || async {
        (count_states(&env, &long).await.get("succeeded").copied() == Some(5)).then_some(())
    })
    .await;
    for f in fields(&env, &long, &["reclaims", "attempt"]).await {
        // Given up at a graceful stop: re-queued without counting a reclaim, no attempt spent.
        assert_eq!((f[0].as_deref(), f[1].as_deref()), (None, Some("1")));
    }
    second.signal("TERM");
    assert_eq!(second.wait(Duration::from_secs(10)).await, Some(0));
    env.cleanup().await;
}

#[tokio::test]
async fn a_poison_job_that_kills_its_worker_every_time_is_dead_after_max_reclaims() {
    let mut vars: Vec<(&str, &str)> = FAST_LEASES.to_vec();
    vars.push(("JOBQ_WORKER_MAX_RECLAIMS", "2"));
    let env = TestEnv::with(&vars).await;
    let id = env.broker.enqueue(NewJob::new("sleep", json!({"ms": 60000}))).await.unwrap().job.id;
    for round in 0..3 {
        let mut w = Proc::spawn("jobq-worker", &env.env());
        wait_until(WAIT, &format!("the job to run (round {round})"), || async {
            let job = env.broker.job(id).await.unwrap()?;
            (job.state == jobq_core::job::JobState::Running && job.reclaims == round).then_some(())
        })
        .await;
        w.signal("KILL");
        w.wait(Duration::from_secs(5)).await;
    }
    let mut reaper = Proc::spawn("jobq-worker", &env.env());
    let job = wait_until(WAIT, "the job to be dead", || async {
        let job = env.broker.job(id).await.unwrap()?;
        (job.state == jobq_core::job::JobState::Dead).then_some(job)
    })
    .await;
    assert_eq!(job.dead_reason.as_deref(), Some("max_reclaims"));
    assert_eq!(job.attempt, 0, "crashes spent none of the error-retry budget");
    reaper.signal("TERM");
    reaper.wait(Duration::from_secs(10)).await;
    env.cleanup().await;
}

#[tokio::test]
async fn dead_jobs_wait_out_a_postgres_outage_and_are_recorded_exactly_once() {
    let env = TestEnv::new().await;
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let vars = env.env_with(&[("DATABASE_URL", &env.database_url.replace(":5432/", &format!(":{}/", proxy.port())))]);
    let mut scheduler = Proc::spawn("jobq-scheduler", &vars);
    let mut worker = Proc::spawn("jobq-worker", &env.env());
    // The scheduler is up and connected before the outage.
    let probe = env.broker.enqueue(NewJob::new("echo", json!({}))).await.unwrap().job.id;
    wait_until(WAIT, "the probe to be recorded", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM job_executions WHERE job_id = $1")
            .bind(probe.0)
            .fetch_one(&env.pool)
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await;
    proxy.cut();
    let ids = enqueue_many(&env, (0..500).map(|_| NewJob::new("fail", json!({})).max_attempts(1))).await;
    wait_until(WAIT, "all 500 jobs to die", || async {
        (count_states(&env, &ids).await.get("dead").copied() == Some(500)).then_some(())
    })
    .await;
    let during: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_jobs").fetch_one(&env.pool).await.unwrap();
    assert_eq!(during, 0, "nothing reached Postgres through the cut");
    let outbox: u64 = env.broker.connection().xlen(env.keys().events(&QueueName::default_queue())).await.unwrap();
    assert!(outbox >= 500, "the events wait in the outbox ({outbox})");
    proxy.restore();
    wait_until(WAIT, "500 DLQ rows", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_jobs").fetch_one(&env.pool).await.ok()?;
        (n == 500).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_jobs").fetch_one(&env.pool).await.unwrap();
    let execs: i64 = sqlx::query_scalar("SELECT count(*) FROM job_executions").fetch_one(&env.pool).await.unwrap();
    assert_eq!((dead, execs), (500, 501), "exactly one row per dead job and per attempt");
    eprintln!("postgres outage figures: dead_jobs={dead} executions={execs} (500 deaths + 1 probe)");
    for p in [&mut scheduler, &mut worker] {
        p.signal("TERM");
        assert_eq!(p.wait(Duration::from_secs(10)).await, Some(0));
    }
    env.cleanup().await;
}

#[tokio::test]
async fn with_a_critical_backlog_no_low_job_starts() {
    let env = TestEnv::with(&[("JOBQ_WORKER_CONCURRENCY", "4")]).await;
    let low = enqueue_many(&env, (0..200).map(|_| NewJob::new("echo", json!({})).priority(Priority::Low))).await;
    let critical =
        enqueue_many(&env, (0..200).map(|_| NewJob::new("echo", json!({})).priority(Priority::Critical))).await;
    let mut w = Proc::spawn("jobq-worker", &env.env());
    let all = [low.clone(), critical.clone()].concat();
    wait_until(WAIT, "all jobs to finish", || async {
        (count_states(&env, &all).await.get("succeeded").copied() == Some(400)).then_some(())
    })
    .await;
    let started_at = |f: Vec<Option<String>>| f[0].as_deref().unwrap().parse::<i64>().unwrap();
    let last_critical = fields(&env, &critical, &["started_at"]).await.into_iter().map(started_at).max().unwrap();
    let first_low = fields(&env, &low, &["started_at"]).await.into_iter().map(started_at).min().unwrap();
    assert!(first_low >= last_critical, "a low job started at {first_low} before the last critical at {last_critical}");
    w.signal("TERM");
    w.wait(Duration::from_secs(10)).await;
    env.cleanup().await;
}

#[tokio::test]
async fn weighted_queues_share_the_worker_in_proportion_to_their_weights() {
    let env =
        TestEnv::with(&[("JOBQ_WORKER_QUEUES", "critical=6,default=3,low=1"), ("JOBQ_WORKER_CONCURRENCY", "5")]).await;
    let mut ids: HashMap<&str, Vec<JobId>> = HashMap::new();
    for name in ["critical", "default", "low"] {
        let q: QueueName = name.parse().unwrap();
        ids.insert(name, enqueue_many(&env, (0..3000).map(|_| NewJob::new("echo", json!({})).queue(q.clone()))).await);
    }
    let mut w = Proc::spawn("jobq-worker", &env.env());
    // Measure the first 3,000 jobs started while every queue still has a backlog.
    wait_until(WAIT, "3,000 jobs to start", || async {
        let mut n = 0;
        for name in ["critical", "default", "low"] {
            n += env.broker.connection().xlen::<_, u64>(env.keys().events(&name.parse().unwrap())).await.unwrap();
        }
        (n >= 3000).then_some(())
    })
    .await;
    for name in ["critical", "default", "low"] {
        env.broker.pause(&name.parse().unwrap()).await.unwrap();
    }
    let mut starts: Vec<(i64, &str)> = Vec::new();
    for (name, list) in &ids {
        let q: QueueName = name.parse().unwrap();
        let mut pipe = redis::pipe();
        for id in list {
            pipe.hget(env.keys().job(&q, *id), "started_at");
        }
        let got: Vec<Option<i64>> = pipe.query_async(&mut env.broker.connection()).await.unwrap();
        starts.extend(got.into_iter().flatten().map(|t| (t, *name)));
    }
    starts.sort();
    let first: Vec<&str> = starts.iter().take(3000).map(|(_, n)| *n).collect();
    assert_eq!(first.len(), 3000);
    let share = |name: &str| first.iter().filter(|n| **n == name).count() as f64 / 3000.0;
    let (c, d, l) = (share("critical"), share("default"), share("low"));
    eprintln!("weighted figures over 3000 jobs: critical={c:.3} default={d:.3} low={l:.3} (weights 0.6/0.3/0.1)");
    for (got, want) in [(c, 0.6), (d, 0.3), (l, 0.1)] {
        assert!((got - want).abs() <= want * 0.10, "share {got:.3} is not within 10% of {want}");
    }
    w.signal("TERM");
    w.wait(Duration::from_secs(10)).await;
    env.cleanup().await;
}

#[tokio::test]
async fn cancel_unique_and_pause_through_the_api() {
    let env = TestEnv::new().await;
    let port = free_port();
    let vars = env.env_with(&[("JOBQ_API_ADDR", &format!("127.0.0.1:{port}"))]);
    let mut procs =
        vec![Proc::spawn("jobq-api", &vars), Proc::spawn("jobq-worker", &vars), Proc::spawn("jobq-scheduler", &vars)];
    let api = Api::new(port);
    api.wait_ready(WAIT).await;

    // Pause: jobs wait, nothing is lost, resume runs them.
    let (s, _) = api.post("/api/v1/queues/default/pause", &json!(null)).await;
    assert_eq!(s, 200);
    let (_, held) = api.post("/api/v1/jobs", &json!({"type": "echo"})).await;
    let (_, doomed) = api.post("/api/v1/jobs", &json!({"type": "echo"})).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, job) = api.get(&format!("/api/v1/jobs/{}", held["id"].as_str().unwrap())).await;
    assert_eq!(job["state"], "queued", "a paused queue starts nothing");
    // Cancel a queued job: it never starts.
    let client = reqwest::Client::new();
    let r = client.delete(format!("{}/api/v1/jobs/{}", api.base, doomed["id"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (s, _) = api.post("/api/v1/queues/default/resume", &json!(null)).await;
    assert_eq!(s, 200);
    api.wait_for_state(held["id"].as_str().unwrap(), "succeeded", WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, job) = api.get(&format!("/api/v1/jobs/{}", doomed["id"].as_str().unwrap())).await;
    assert_eq!((job["state"].as_str(), job["started_at"].is_null()), (Some("cancelled"), true));

    // Cancel a running job: its handler is stopped and the attempt ends cancelled.
    let (_, long) = api.post("/api/v1/jobs", &json!({"type": "sleep", "payload": {"ms": 60000}})).await;
    let long_id = long["id"].as_str().unwrap().to_owned();
    api.wait_for_state(&long_id, "running", WAIT).await;
    let asked = Instant::now();
    let r = client.delete(format!("{}/api/v1/jobs/{long_id}", api.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    api.wait_for_state(&long_id, "cancelled", Duration::from_secs(10)).await;
    eprintln!("running job cancelled in {:?}", asked.elapsed());
    let r = client.delete(format!("{}/api/v1/jobs/{long_id}", api.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 409, "a finished job cannot be cancelled");

    // Cancel racing the start: every job ends cancelled or succeeded, none is stuck.
    let mut ids = Vec::new();
    for _ in 0..100 {
        let (_, j) = api.post("/api/v1/jobs", &json!({"type": "sleep", "payload": {"ms": 20}})).await;
        let id = j["id"].as_str().unwrap().to_owned();
        let _ = client.delete(format!("{}/api/v1/jobs/{id}", api.base)).send().await.unwrap();
        ids.push(id);
    }
    for id in &ids {
        let job = wait_until(WAIT, "a terminal state", || async {
            let (_, j) = api.get(&format!("/api/v1/jobs/{id}")).await;
            matches!(j["state"].as_str(), Some("cancelled" | "succeeded")).then_some(j)
        })
        .await;
        if job["state"] == "cancelled" && !job["started_at"].is_null() {
            assert!(job["cancel_requested"].as_bool().unwrap_or(false));
        }
    }

    // Unique keys: the duplicate gets the existing job with 200.
    let body = json!({"type": "sleep", "payload": {"ms": 500}, "unique_key": "invoice-42"});
    let (s1, a) = api.post("/api/v1/jobs", &body).await;
    let (s2, b) = api.post("/api/v1/jobs", &body).await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(a["id"], b["id"]);

    for p in &mut procs {
        p.signal("TERM");
        assert_eq!(p.wait(Duration::from_secs(10)).await, Some(0));
    }
    env.cleanup().await;
}

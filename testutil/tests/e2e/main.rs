//! End-to-end tests through the real binaries (`jobq-api`, `jobq-worker`, `jobq-scheduler`)
//! against real Redis and PostgreSQL.

mod cron;
mod delivery;
mod library;
mod observability;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use jobq_testutil::{free_port, Api, Proc, TestEnv};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

struct System {
    env: TestEnv,
    api: Api,
    procs: Vec<Proc>,
}

impl System {
    /// Starts api + scheduler + `workers` worker processes on a fresh namespace and database.
    async fn start(workers: usize, vars: &[(&str, &str)]) -> Self {
        let env = TestEnv::with(vars).await;
        let port = free_port();
        let vars = env.env_with(&[("JOBQ_API_ADDR", &format!("127.0.0.1:{port}"))]);
        let mut procs = vec![Proc::spawn("jobq-api", &vars), Proc::spawn("jobq-scheduler", &vars)];
        for _ in 0..workers {
            procs.push(Proc::spawn("jobq-worker", &vars));
        }
        let api = Api::new(port);
        api.wait_ready(WAIT).await;
        Self { env, api, procs }
    }

    async fn enqueue(&self, body: serde_json::Value) -> String {
        let (status, job) = self.api.post("/api/v1/jobs", &body).await;
        assert_eq!(status, 201, "{job}");
        job["id"].as_str().expect("id").to_owned()
    }

    async fn executions(&self, id: &str) -> Vec<(i32, i32, String, Option<chrono::DateTime<chrono::Utc>>)> {
        sqlx::query_as("SELECT run, attempt, outcome, started_at FROM job_executions WHERE job_id = $1::uuid ORDER BY run, attempt")
            .bind(id)
            .fetch_all(&self.env.pool)
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        for p in &self.procs {
            p.signal("TERM");
        }
        for p in &mut self.procs {
            assert_eq!(p.wait(Duration::from_secs(15)).await, Some(0), "clean exit on SIGTERM");
        }
        self.env.cleanup().await;
    }
}

#[tokio::test]
async fn an_echo_job_succeeds_and_its_attempt_is_recorded() {
    let sys = System::start(1, &[]).await;
    let id = sys.enqueue(json!({"type": "echo", "payload": {"hello": "world"}})).await;
    let job = sys.api.wait_for_state(&id, "succeeded", WAIT).await;
    assert_eq!(job["result"], json!({"hello": "world"}));
    assert_eq!(job["attempt"], 1);
    assert!(job["started_at"].is_string() && job["finished_at"].is_string());
    jobq_testutil::wait_until(WAIT, "the attempt to be recorded", || async {
        let rows = sys.executions(&id).await;
        (rows.len() == 1 && rows[0].2 == "succeeded").then_some(())
    })
    .await;
    sys.stop().await;
}

#[tokio::test]
async fn a_failing_job_retries_with_backoff_dies_is_listed_retried_and_succeeds() {
    let sys = System::start(1, &[]).await;
    let id = sys
        .enqueue(json!({
            "type": "fail",
            "payload": {"times": 2, "message": "smtp down"},
            "max_attempts": 2,
            "backoff": {"strategy": "constant", "base": "300ms", "jitter": "none"}
        }))
        .await;
    let job = sys.api.wait_for_state(&id, "dead", WAIT).await;
    assert_eq!(job["attempt"], 2);
    assert!(job["last_error"].as_str().unwrap().contains("smtp down"));

    let listed = jobq_testutil::wait_until(WAIT, "the dead job to be listed in the DLQ", || async {
        let (status, page) = sys.api.get("/api/v1/dlq?type=fail&queue=default").await;
        assert_eq!(status, 200);
        page["items"].as_array().and_then(|items| items.iter().find(|d| d["job_id"] == id.as_str()).cloned())
    })
    .await;
    assert_eq!(listed["attempts"], 2);
    assert_eq!(listed["reason"], "max_attempts");
    let rows = sys.executions(&id).await;
    assert_eq!(rows.iter().map(|r| r.2.as_str()).collect::<Vec<_>>(), ["failed", "dead"]);
    let gap = rows[1].3.unwrap() - rows[0].3.unwrap();
    assert!(gap >= chrono::Duration::milliseconds(250), "the retry waited for its backoff ({gap})");

    let (status, retried) = sys.api.post(&format!("/api/v1/dlq/{id}/retry"), &json!(null)).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["run"], 2);
    let (status, again) = sys.api.post(&format!("/api/v1/dlq/{id}/retry"), &json!(null)).await;
    assert_eq!(status, 409, "retrying twice does not enqueue twice: {again}");
    let job = sys.api.wait_for_state(&id, "succeeded", WAIT).await;
    assert_eq!((job["run"].as_u64(), job["attempt"].as_u64()), (Some(2), Some(1)), "a fresh attempt count");
    let (_, page) = sys.api.get("/api/v1/dlq").await;
    assert!(page["items"].as_array().unwrap().iter().all(|d| d["job_id"] != id.as_str()), "no longer listed");
    jobq_testutil::wait_until(WAIT, "the third attempt to be recorded", || async {
        (sys.executions(&id).await.len() == 3).then_some(())
    })
    .await;
    sys.stop().await;
}

#[tokio::test]
async fn an_unknown_job_type_ends_in_the_dlq_with_an_error_naming_it() {
    let sys = System::start(1, &[]).await;
    let id = sys.enqueue(json!({"type": "no.such.handler", "max_attempts": 5})).await;
    let job = sys.api.wait_for_state(&id, "dead", WAIT).await;
    assert_eq!(job["attempt"], 1, "not retried: no attempt can succeed");
    assert!(job["last_error"].as_str().unwrap().contains("`no.such.handler`"), "{job}");
    let dead = jobq_testutil::wait_until(WAIT, "the DLQ row", || async {
        let (status, body) = sys.api.get(&format!("/api/v1/dlq/{id}")).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(dead["job"]["reason"], "unknown_type");
    sys.stop().await;
}

#[tokio::test]
async fn several_workers_share_a_queue_without_running_a_job_twice() {
    let sys = System::start(3, &[("JOBQ_WORKER_CONCURRENCY", "8")]).await;
    let mut ids = HashSet::new();
    for i in 0..300 {
        ids.insert(sys.enqueue(json!({"type": "sleep", "payload": {"ms": 5 + i % 10}})).await);
    }
    let rows: Vec<(String, String)> = jobq_testutil::wait_until(WAIT, "every attempt to be recorded", || async {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT job_id::text, worker FROM job_executions WHERE outcome = 'succeeded'")
                .fetch_all(&sys.env.pool)
                .await
                .unwrap();
        (rows.len() >= 300).then_some(rows)
    })
    .await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM job_executions").fetch_one(&sys.env.pool).await.unwrap();
    assert_eq!(total, 300, "one attempt per job, no job ran twice");
    let ran: HashSet<String> = rows.iter().map(|r| r.0.clone()).collect();
    assert_eq!(ran, ids);
    let per_worker: HashMap<&str, usize> = rows.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.1.as_str()).or_default() += 1;
        m
    });
    assert!(per_worker.len() >= 2, "the load was shared: {per_worker:?}");
    sys.stop().await;
}

#[tokio::test]
async fn a_worker_on_one_runtime_thread_runs_jobs_and_bad_thread_counts_are_refused() {
    let env = TestEnv::new().await;
    for bad in ["lots", "-1", "5000"] {
        let out = std::process::Command::new(jobq_testutil::bin_path("jobq-worker"))
            .envs(env.env())
            .env("JOBQ_WORKER_THREADS", bad)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "JOBQ_WORKER_THREADS={bad}: {stderr}");
        assert!(stderr.contains("JOBQ_WORKER_THREADS"), "JOBQ_WORKER_THREADS={bad}: {stderr}");
    }
    let mut worker = Proc::spawn("jobq-worker", &env.env_with(&[("JOBQ_WORKER_THREADS", "1")]));
    let mut ids = Vec::new();
    for i in 0..20 {
        let kind = if i % 2 == 0 { "echo" } else { "sleep" };
        ids.push(env.broker.enqueue(jobq_core::job::NewJob::new(kind, json!({"ms": 50}))).await.unwrap().job.id);
    }
    for id in ids {
        jobq_testutil::wait_until(WAIT, "every job to succeed", || async {
            let job = env.broker.job(id).await.unwrap()?;
            (job.state == jobq_core::job::JobState::Succeeded).then_some(())
        })
        .await;
    }
    worker.signal("TERM");
    assert_eq!(worker.wait(Duration::from_secs(15)).await, Some(0));
    env.cleanup().await;
}

#[tokio::test]
async fn a_redis_that_refuses_the_connection_settings_stops_each_binary_at_start() {
    let env = TestEnv::new().await;
    let url = jobq_testutil::redis_url();
    let host = url.split("://").nth(1).unwrap().trim_end_matches('/');
    // This Redis has no password (AUTH is refused) and 16 databases.
    for bad in [format!("redis://:wrong@{host}"), format!("redis://{host}/99")] {
        for bin in ["jobq-worker", "jobq-scheduler", "jobq-api"] {
            let mut vars = env.env_with(&[("REDIS_URL", &bad)]);
            vars.insert("JOBQ_API_ADDR".into(), format!("127.0.0.1:{}", jobq_testutil::free_port()));
            let mut proc = Proc::spawn(bin, &vars);
            let code = proc.wait(Duration::from_secs(20)).await;
            assert_eq!(code, Some(1), "{bin} with REDIS_URL={bad} stops instead of retrying forever");
        }
    }
    env.cleanup().await;
}

#[tokio::test]
async fn sigterm_during_a_worker_setup_that_hangs_exits_zero() {
    // The chaos worker connects to Postgres in its setup; this "database" accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let env = TestEnv::new().await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/none");
    let mut worker = Proc::spawn("jobq-chaos-worker", &env.env_with(&[("DATABASE_URL", &url)]));
    let (_held, _) = tokio::time::timeout(WAIT, silent.accept()).await.expect("the setup connects").unwrap();
    worker.signal("TERM");
    assert_eq!(worker.wait(Duration::from_secs(10)).await, Some(0));
    env.cleanup().await;
}

#[tokio::test]
async fn sigterm_lets_the_running_job_finish_and_exits_zero() {
    let env = TestEnv::new().await;
    let vars = env.env();
    let mut worker = Proc::spawn("jobq-worker", &vars);
    let id = env.broker.enqueue(jobq_core::job::NewJob::new("sleep", json!({"ms": 1500}))).await.unwrap().job.id;
    jobq_testutil::wait_until(WAIT, "the job to start", || async {
        let job = env.broker.job(id).await.unwrap()?;
        (job.state == jobq_core::job::JobState::Running).then_some(())
    })
    .await;
    worker.signal("TERM");
    // Give the process a moment to handle the signal; a job enqueued after that is not fetched.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = env.broker.enqueue(jobq_core::job::NewJob::new("echo", json!({}))).await.unwrap().job.id;
    assert_eq!(worker.wait(Duration::from_secs(10)).await, Some(0));
    assert_eq!(
        env.broker.job(id).await.unwrap().unwrap().state,
        jobq_core::job::JobState::Succeeded,
        "in-flight job finished"
    );
    assert_eq!(
        env.broker.job(queued).await.unwrap().unwrap().state,
        jobq_core::job::JobState::Queued,
        "nothing is fetched after the signal"
    );
    env.cleanup().await;
}

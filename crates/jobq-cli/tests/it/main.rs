//! The `jobq` binary: `migrate`, `dev`, `--version`, bad settings.

use std::time::Duration;

use jobq_testutil::{free_port, Api, Proc, TestEnv};
use serde_json::json;

fn jobq() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_jobq"));
    for (var, _) in std::env::vars() {
        if var.starts_with("JOBQ_") {
            cmd.env_remove(var);
        }
    }
    cmd
}

#[tokio::test]
async fn migrate_creates_the_database_and_applies_migrations() {
    let env = TestEnv::new().await;
    let name = format!("jobq_cli_{}", uuid::Uuid::new_v4().simple());
    let url = env.database_url.replace(&env.database, &name);
    let out = jobq().env("DATABASE_URL", &url).arg("migrate").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied"));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert!(tables.contains(&"dead_jobs".to_owned()) && tables.contains(&"job_executions".to_owned()), "{tables:?}");
    let _ = sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)")).execute(&env.pool).await;
    env.cleanup().await;
}

#[test]
fn bad_settings_stop_the_program_naming_the_variable() {
    let out = jobq().env("JOBQ_WORKER_CONCURRENCY", "lots").arg("dev").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("JOBQ_WORKER_CONCURRENCY"));
    let out = jobq().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("jobq "));
}

#[tokio::test]
async fn dev_runs_api_worker_and_scheduler_in_one_process() {
    let env = TestEnv::new().await;
    let port = free_port();
    let mut vars = env.env();
    vars.insert("JOBQ_API_ADDR".into(), format!("127.0.0.1:{port}"));
    let mut dev = Proc::spawn_args("jobq", &["dev"], &vars);
    let api = Api::new(port);
    api.wait_ready(Duration::from_secs(30)).await;
    let (status, job) = api.post("/api/v1/jobs", &json!({"type": "echo", "payload": [1, 2]})).await;
    assert_eq!(status, 201);
    let done = api.wait_for_state(job["id"].as_str().unwrap(), "succeeded", Duration::from_secs(20)).await;
    assert_eq!(done["result"], json!([1, 2]));
    dev.signal("TERM");
    assert_eq!(dev.wait(Duration::from_secs(15)).await, Some(0));
    env.cleanup().await;
}

#[tokio::test]
async fn bench_runs_every_scenario_in_its_own_namespace_and_database() {
    let env = TestEnv::new().await;
    let vars = env.env();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobq"))
        .args(["bench", "-n", "300", "--scenario", "all"])
        .envs(&vars)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<&str> = lines.iter().map(|l| l["scenario"].as_str().unwrap()).collect();
    assert_eq!(names, ["enqueue-lib", "enqueue-api", "drain", "latency"]);
    for l in &lines[..3] {
        assert!(l["jobs_per_s"].as_f64().unwrap() > 0.0, "{l}");
    }
    assert!(lines[2]["recorded_jobs_per_s"].as_f64().unwrap() > 0.0);
    assert!(lines[3]["start_ms_p99"].as_f64().unwrap() >= 0.0);
    assert!(stdout.contains("scenario") && stdout.contains("jobs/s"), "the table follows");
    // Nothing left behind in the test's own namespace by the bench's.
    let leftover: Vec<String> =
        redis::cmd("KEYS").arg("bench-*").query_async(&mut env.broker.connection()).await.unwrap();
    assert!(leftover.is_empty(), "{leftover:?}");
    env.cleanup().await;
}

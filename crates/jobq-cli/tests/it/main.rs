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
    // A key name the JOBQ_API_KEYS list could not hold is refused, not printed.
    for bad in ["a:b", "a,b", "", "two words"] {
        let out = jobq().args(["api-key", "--name", bad, "--role", "admin"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("key name"), "{bad}");
    }
    let out = jobq().args(["api-key", "--name", "ci-deploy", "--role", "producer"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("config: JOBQ_API_KEYS=")).unwrap().trim_matches('"');
    let parsed = jobq_core::config::load_from(None, |n| match n {
        "JOBQ_API_KEYS" => Some(line.to_owned()),
        _ => None,
    })
    .unwrap();
    assert_eq!(parsed.api.keys[0].name, "ci-deploy");
}

#[tokio::test]
async fn stats_show_redis_figures_when_postgres_is_down_and_dlq_pages_are_bounded() {
    let env = TestEnv::new().await;
    let mut vars = env.env();
    vars.insert("DATABASE_URL".into(), "postgres://postgres@127.0.0.1:1/nowhere".into());
    env.broker.enqueue(jobq_core::job::NewJob::new("echo", json!({}))).await.unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobq")).arg("stats").envs(&vars).output();
    let out = tokio::time::timeout(Duration::from_secs(60), out).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("dead-job counts unavailable"), "{stderr}");
    let row = stdout.lines().find(|l| l.starts_with("default")).unwrap();
    assert!(row.split_whitespace().any(|c| c == "?"), "DEAD is unknown, not 0: {row}");
    let (code, _, err) = jobq_in(&env, &["dlq", "list", "-n", "1000"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("between 1 and 500"), "{err}");
    env.cleanup().await;
}

#[tokio::test]
async fn dev_runs_api_worker_and_scheduler_in_one_process() {
    let env = TestEnv::new().await;
    let port = free_port();
    let vars = env.env_with(&[("JOBQ_API_ADDR", &format!("127.0.0.1:{port}"))]);
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
async fn dev_keeps_the_auth_a_file_turns_on_and_serves_metrics_addr_once() {
    let env = TestEnv::new().await;
    let (port, metrics) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("jobq-dev-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("auth.toml");
    let line = format!("ops:admin:{}", jobq_api::auth::hash_key("jobq_secret"));
    std::fs::write(&file, format!("[api]\nauth = \"on\"\nkeys = \"{line}\"\n")).unwrap();
    let mut vars = env.env_with(&[
        ("JOBQ_API_ADDR", &format!("127.0.0.1:{port}")),
        ("JOBQ_METRICS_ADDR", &format!("127.0.0.1:{metrics}")),
    ]);
    vars.remove("JOBQ_AUTH");
    let mut dev = Proc::spawn_args("jobq", &["--config", file.to_str().unwrap(), "dev"], &vars);
    let api = Api::new(port);
    api.wait_ready(Duration::from_secs(30)).await;
    let (status, _) = api.get("/api/v1/queues").await;
    assert_eq!(status, 401, "the file's auth = on holds in dev");
    let r = api.client.get(format!("{}/api/v1/queues", api.base)).bearer_auth("jobq_secret").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Worker and scheduler share the process: JOBQ_METRICS_ADDR is served once, not bound twice.
    let m = api.client.get(format!("http://127.0.0.1:{metrics}/metrics")).send().await.unwrap();
    assert_eq!(m.status().as_u16(), 200);
    dev.signal("TERM");
    assert_eq!(dev.wait(Duration::from_secs(15)).await, Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
    env.cleanup().await;
}

/// Runs `jobq bench --scenario all` on 300 jobs; returns its JSON lines and its whole stdout.
async fn bench_all(env: &TestEnv) -> (Vec<serde_json::Value>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobq"))
        .args(["bench", "-n", "300", "--scenario", "all", "--seconds", "1"])
        .envs(env.env())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines = stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    (lines, stdout)
}

#[tokio::test]
async fn bench_runs_every_scenario_with_succeeded_jobs_removed_at_once_on_one_runtime_thread() {
    let env = TestEnv::with(&[("JOBQ_RETENTION_SUCCEEDED", "0"), ("JOBQ_WORKER_THREADS", "1")]).await;
    let (lines, _) = bench_all(&env).await;
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[2]["retention_succeeded_s"], 0, "{}", lines[2]);
    assert_eq!(lines[2]["worker_threads"], 1, "{}", lines[2]);
    assert!(lines[2]["recorded_jobs_per_s"].as_f64().unwrap() > 0.0, "every attempt recorded: {}", lines[2]);
    assert!(lines[3]["start_ms_p99"].as_f64().unwrap() > 0.0, "{}", lines[3]);
    assert!(lines[4]["jobs_per_s"].as_f64().unwrap() > 0.0, "{}", lines[4]);
    env.cleanup().await;
}

#[tokio::test]
async fn bench_runs_every_scenario_in_its_own_namespace_and_database() {
    let env = TestEnv::new().await;
    let (lines, stdout) = bench_all(&env).await;
    let names: Vec<&str> = lines.iter().map(|l| l["scenario"].as_str().unwrap()).collect();
    assert_eq!(names, ["enqueue-lib", "enqueue-api", "drain", "latency", "mixed", "soak"]);
    assert!(lines[4]["jobs_per_s"].as_f64().unwrap() > 0.0);
    assert!(!lines[5]["samples"].as_array().unwrap().is_empty(), "soak samples memory");
    for l in &lines[..3] {
        assert!(l["jobs_per_s"].as_f64().unwrap() > 0.0, "{l}");
    }
    assert!(lines[2]["recorded_jobs_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(lines[0]["producers"], 50, "{}", lines[0]);
    assert!(lines[0]["cpu_us_per_job"]["redis"].as_f64().unwrap() > 0.0, "{}", lines[0]);
    let ms = |k: &str| lines[3][k].as_f64().unwrap();
    assert!(ms("start_ms_p50") > 0.0, "{}", lines[3]);
    assert!(ms("start_ms_p50") <= ms("start_ms_p99") && ms("start_ms_p99") <= ms("start_ms_max"), "{}", lines[3]);
    assert!(ms("done_ms_p50") >= ms("start_ms_p50") && ms("done_ms_p99") <= ms("done_ms_max"), "{}", lines[3]);
    assert!(stdout.contains("scenario") && stdout.contains("jobs/s"), "the table follows");
    // Nothing left behind by the bench's namespace, which is under the test's.
    bench_left_nothing(&env).await;
    env.cleanup().await;
}

/// Runs `jobq <args>` against the test's namespace and database; returns (exit code, stdout, stderr).
async fn jobq_in(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    let out =
        tokio::process::Command::new(env!("CARGO_BIN_EXE_jobq")).args(args).envs(env.env()).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `jobq bench <args>`, which must succeed; returns its first JSON line.
async fn bench_line(env: &TestEnv, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = jobq_in(env, &[&["bench"], args].concat()).await;
    assert_eq!(code, 0, "{out}\n{err}");
    serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap()).unwrap()
}

/// Runs `jobq bench <args>`, which must fail; returns its stderr.
async fn bench_refused(env: &TestEnv, args: &[&str]) -> String {
    let (code, _, err) = jobq_in(env, &[&["bench"], args].concat()).await;
    assert_ne!(code, 0, "{err}");
    err
}

#[tokio::test]
async fn bench_runs_its_processes_at_the_log_level_asked_for_and_refuses_a_bad_one() {
    let env = TestEnv::new().await;
    let line =
        bench_line(&env, &["-n", "200", "--scenario", "drain", "--log-level", "info", "--concurrency", "5"]).await;
    assert_eq!(line["log_level"], "info", "{line}");
    assert!(line["recorded_jobs_per_s"].as_f64().unwrap() > 0.0, "{line}");
    assert_eq!(line["job_ms"], 0, "{line}");
    assert!(line.get("slot_use").is_none(), "no-op jobs have no handler time to weigh: {line}");
    assert!(line["attempt_ms"].as_f64().unwrap() >= 0.0, "{line}");
    assert!(line["slot_cycle_ms"].as_f64().unwrap() > 0.0, "{line}");
    let err = bench_refused(&env, &["-n", "10", "--scenario", "drain", "--log-level", "warn,["]).await;
    assert!(err.contains("--log-level") && err.contains("not a valid filter"), "{err}");
    env.cleanup().await;
}

#[tokio::test]
async fn bench_drain_runs_jobs_that_wait_and_weighs_the_slots_time_in_handlers() {
    let env = TestEnv::new().await;
    let line = bench_line(&env, &["-n", "400", "--scenario", "drain", "--concurrency", "10", "--job-ms", "25"]).await;
    assert_eq!(line["job_ms"], 25, "{line}");
    // 10 slots of 25 ms jobs take at least a second for 400 jobs: no more than 400 jobs/s,
    // where 400 no-op jobs drain in a fraction of that.
    let rate = line["jobs_per_s"].as_f64().unwrap();
    assert!(rate > 0.0 && rate <= 400.0, "{line}");
    assert!(line["recorded_jobs_per_s"].as_f64().unwrap() > 0.0, "{line}");
    let slot_use = line["slot_use"].as_f64().unwrap();
    assert!(slot_use > 0.0 && slot_use <= 1.0, "{line}");
    // Each handler waits its 25 ms (the workers' own metric), each attempt, fetch to outcome,
    // spans its handler, and a slot's turn is no shorter.
    let handler = line["handler_ms"].as_f64().unwrap();
    assert!((25.0..1000.0).contains(&handler), "{line}");
    let attempt = line["attempt_ms"].as_f64().unwrap();
    assert!(attempt >= 25.0, "{line}");
    let cycle = line["slot_cycle_ms"].as_f64().unwrap();
    assert!(cycle >= 25.0 && (cycle - 10.0 * 1000.0 / rate).abs() < 0.1, "{line}");
    let err = bench_refused(&env, &["-n", "10", "--scenario", "drain", "--job-ms", "10001"]).await;
    assert!(err.contains("--job-ms"), "{err}");
    env.cleanup().await;
}

#[tokio::test]
async fn bench_stops_with_an_error_when_a_job_dies_instead_of_waiting_for_it() {
    // One attempt each, shorter than the job: every job dies of its timeout and never succeeds.
    let env = TestEnv::with(&[("JOBQ_JOBS_MAX_ATTEMPTS", "1"), ("JOBQ_JOBS_TIMEOUT", "100ms")]).await;
    let run = jobq_in(&env, &["bench", "-n", "20", "--scenario", "drain", "--concurrency", "5", "--job-ms", "1000"]);
    let (code, out, err) = tokio::time::timeout(Duration::from_secs(60), run).await.expect("the drain gives up");
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("ended dead"), "{err}");
    bench_left_nothing(&env).await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_interrupted_bench_removes_its_namespace_and_database() {
    let env = TestEnv::new().await;
    // Worker processes (mixed), and tasks of the bench's own: HTTP clients and an API (enqueue-api).
    interrupt_bench(&env, &["--scenario", "mixed", "-n", "1000", "--seconds", "300"]).await;
    interrupt_bench(&env, &["--scenario", "enqueue-api", "-n", "100000000", "--concurrency", "4"]).await;
    env.cleanup().await;
}

/// Runs `jobq bench <args>`, interrupts it with SIGINT once its jobs are in Redis, and checks
/// that its namespace and database are gone.
async fn interrupt_bench(env: &TestEnv, args: &[&str]) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobq"))
        .arg("bench")
        .args(args)
        .envs(env.env())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pattern = format!("{}-bench-*", env.namespace);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let tag = loop {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(&pattern).query_async(&mut env.broker.connection()).await.unwrap();
        if let Some(k) = keys.iter().find(|k| k.contains(":job:")) {
            break k[pattern.len() - 1..][..8].to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "the bench did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let database = format!("jobq_bench_{tag}");
    let exists = || sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)");
    assert!(exists().bind(&database).fetch_one(&env.pool).await.unwrap(), "{database}");
    std::process::Command::new("kill").args(["-INT", &child.id().unwrap().to_string()]).status().unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.expect("it stops").unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("interrupted"), "{err}");
    assert!(!exists().bind(&database).fetch_one(&env.pool).await.unwrap(), "{database} dropped");
    // Nothing writes into it afterwards either.
    tokio::time::sleep(Duration::from_secs(1)).await;
    bench_left_nothing(env).await;
}

/// No key of a bench namespace (under the test's) is left.
async fn bench_left_nothing(env: &TestEnv) {
    let pattern = format!("{}-bench-*", env.namespace);
    let leftover: Vec<String> =
        redis::cmd("KEYS").arg(&pattern).query_async(&mut env.broker.connection()).await.unwrap();
    assert!(leftover.is_empty(), "{leftover:?}");
}

#[tokio::test]
async fn bench_processes_use_the_bench_database_whatever_jobq_database_url_says() {
    // JOBQ_DATABASE_URL wins over DATABASE_URL: inherited, it pointed the bench's scheduler at
    // the test's database, and the drain waited forever for rows in its own.
    let env = TestEnv::new().await;
    let mut vars = env.env();
    vars.insert("JOBQ_DATABASE_URL".into(), env.database_url.clone());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobq"))
        .args(["bench", "-n", "200", "--scenario", "drain", "--concurrency", "5"])
        .envs(&vars)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out).await.expect("the drain ends").unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_executions").fetch_one(&env.pool).await.unwrap_or_default();
    assert_eq!(rows, 0, "nothing recorded into the test's own database");
    for (args, says) in [
        (&["--workers", "0"][..], "--workers"),
        (&["--concurrency", "0"][..], "--concurrency"),
        (&["-n", "0"][..], "-n"),
    ] {
        let err = bench_refused(&env, &[&["--scenario", "drain"], args].concat()).await;
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobq"))
        .args(["bench", "-n", "10", "--scenario", "drain"])
        .envs(env.env_with(&[("JOBQ_METRICS_ADDR", "127.0.0.1:9")]))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JOBQ_METRICS_ADDR"));
    env.cleanup().await;
}

#[tokio::test]
async fn the_mixed_producer_offers_the_rate_asked_for_and_a_rate_of_zero_is_refused() {
    let env = TestEnv::new().await;
    let line =
        bench_line(&env, &["--scenario", "mixed", "--rate", "1000", "--seconds", "2", "--concurrency", "10"]).await;
    assert_eq!(line["offered_per_s"], 1000, "{line}");
    // 2 s at 1,000 jobs/s: what the rate owes by the end, and no more.
    let n = line["n"].as_u64().unwrap();
    assert!((1_500..=2_000).contains(&n), "{line}");
    assert!(line["backlog_max"].as_u64().unwrap() <= n, "{line}");
    let ms = |k: &str| line[k].as_f64().unwrap();
    assert!(line["sampled"].as_u64().unwrap() > 0, "{line}");
    assert!(ms("done_ms_p50") <= ms("done_ms_p90") && ms("done_ms_p90") <= ms("done_ms_p99"), "{line}");
    assert!(ms("done_ms_p99") <= ms("done_ms_max"), "{line}");
    let err = bench_refused(&env, &["--scenario", "mixed", "--rate", "0"]).await;
    assert!(err.contains("--rate"), "{err}");
    env.cleanup().await;
}

#[tokio::test]
async fn admin_commands_print_tables_or_json_and_exit_codes_mean_something() {
    let env = TestEnv::new().await;
    let (code, out, err) = jobq_in(
        &env,
        &["--json", "enqueue", "echo", "--payload", r#"{"a":1}"#, "--queue", "mail", "--priority", "high"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (job["queue"].as_str(), job["priority"].as_str(), job["state"].as_str()),
        (Some("mail"), Some("high"), Some("queued"))
    );

    let (code, out, _) = jobq_in(&env, &["--json", "job", &id]).await;
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["payload"], serde_json::json!({"a": 1}));
    let (code, _, err) = jobq_in(&env, &["job", &uuid::Uuid::now_v7().to_string()]).await;
    assert_eq!(code, 3, "not found: {err}");
    let (code, _, _) = jobq_in(&env, &["job", "nope"]).await;
    assert_eq!(code, 2, "bad input");

    let (code, _, err) = jobq_in(&env, &["enqueue", "echo", "--queue", "mail", "--delay", "3600"]).await;
    assert!(code == 2 && err.contains("no unit"), "a delay without a unit is refused, not read as ms: {code} {err}");
    let (_, out, _) = jobq_in(&env, &["--json", "enqueue", "echo", "--queue", "mail", "--delay", "1h"]).await;
    let later = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_owned();
    let (code, out, err) = jobq_in(&env, &["run-now", &later]).await;
    assert_eq!((code, out.trim()), (0, format!("job {later} is queued in queue mail").as_str()), "{err}");
    let (code, _, err) = jobq_in(&env, &["run-now", &later]).await;
    assert!(code == 1 && err.contains("is queued: only a scheduled or retrying job"), "{code} {err}");
    let (code, _, _) = jobq_in(&env, &["run-now", &uuid::Uuid::now_v7().to_string()]).await;
    assert_eq!(code, 3);

    let (code, out, _) = jobq_in(&env, &["--json", "stats"]).await;
    assert_eq!(code, 0);
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["queues"][0]["queued"]["high"], 1);
    let (_, table, _) = jobq_in(&env, &["stats"]).await;
    assert!(table.starts_with("QUEUE") && table.contains("mail"), "{table}");
    let (_, peek, _) = jobq_in(&env, &["peek", "mail", "-n", "5"]).await;
    assert!(peek.contains(&id), "{peek}");
    let (_, queues, _) = jobq_in(&env, &["queues"]).await;
    assert_eq!(queues.trim(), "mail");

    let (code, _, _) = jobq_in(&env, &["pause", "mail"]).await;
    assert_eq!(code, 0);
    assert!(env.broker.is_paused(&"mail".parse().unwrap()).await.unwrap());
    jobq_in(&env, &["resume", "mail"]).await;
    assert!(!env.broker.is_paused(&"mail".parse().unwrap()).await.unwrap());

    let (code, out, err) = jobq_in(&env, &["schedules", "add", "nightly", "--cron", "@daily", "--type", "echo"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (_, list, _) = jobq_in(&env, &["--json", "schedules", "list"]).await;
    assert_eq!(serde_json::from_str::<serde_json::Value>(&list).unwrap()[0]["name"], "nightly");
    let (code, _, _) = jobq_in(&env, &["schedules", "trigger", "nightly"]).await;
    assert_eq!(code, 0);
    let (code, _, _) = jobq_in(&env, &["schedules", "rm", "nightly"]).await;
    assert_eq!(code, 0);
    let (code, _, _) = jobq_in(&env, &["schedules", "rm", "nightly"]).await;
    assert_eq!(code, 3);

    let (_, out, _) = jobq_in(&env, &["--json", "enqueue", "echo", "--queue", "mail", "--delay", "1h"]).await;
    let delayed = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_owned();
    let (code, _, err) = jobq_in(&env, &["run-jobs", "mail"]).await;
    assert_eq!(code, 4, "refused without --yes: {err}");
    let (code, out, err) = jobq_in(&env, &["run-jobs", "mail", "--state", "retrying", "--dry-run"]).await;
    assert_eq!((code, out.trim()), (0, "would queue now 0 jobs of queue mail"), "{err}");
    let (code, out, err) = jobq_in(&env, &["--json", "run-jobs", "mail", "--yes"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap(), json!({"queue": "mail", "queued": 1}));
    assert_eq!(
        env.broker.job(delayed.parse().unwrap()).await.unwrap().unwrap().state,
        jobq_core::job::JobState::Queued
    );
    let (code, _, err) = jobq_in(&env, &["cancel-jobs", "mail"]).await;
    assert_eq!(code, 4, "refused without --yes: {err}");
    let (code, out, err) = jobq_in(&env, &["--json", "cancel-jobs", "mail", "--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        json!({"queue": "mail", "matched": 3}),
        "the three queued echo jobs"
    );
    let (code, _, err) = jobq_in(&env, &["cancel-jobs", "mail", "--state", "running", "--yes"]).await;
    assert!(code == 2 && err.contains("running"), "{code} {err}");
    let (code, out, err) = jobq_in(&env, &["cancel-jobs", "mail", "--type", "echo", "--yes"]).await;
    assert_eq!((code, out.trim()), (0, "cancelled 3 jobs of queue mail"), "{err}");
    assert_eq!(env.broker.job(id.parse().unwrap()).await.unwrap().unwrap().state, jobq_core::job::JobState::Cancelled);

    // A namespace nested in this one (`<ns>:staging`) is another deployment's: it stays.
    let nested_vars = env.env_with(&[("JOBQ_NAMESPACE", &format!("{}:staging", env.namespace))]);
    let nested_settings = jobq_core::config::load_from(None, |n| nested_vars.get(n).cloned()).unwrap();
    let nested = jobq_core::stream::Broker::connect(&nested_settings).await.unwrap();
    let kept = nested.enqueue(jobq_core::job::NewJob::new("echo", json!({}))).await.unwrap().job.id;
    let (code, _, err) = jobq_in(&env, &["purge-all"]).await;
    assert_eq!(code, 4, "refused without --yes: {err}");
    assert!(!env.broker.queues().await.unwrap().is_empty());
    let (code, _, _) = jobq_in(&env, &["purge-all", "--yes"]).await;
    assert_eq!(code, 0);
    assert!(env.broker.queues().await.unwrap().is_empty(), "the namespace is empty");
    let job = nested.job(kept).await.unwrap().expect("the nested namespace's job is kept");
    assert_eq!(job.state, jobq_core::job::JobState::Queued);
    assert!(nested.purge_namespace().await.unwrap() > 0);
    env.cleanup().await;
}

/// `n` jobs of `kind` dead (one fatal attempt each), recorded in the DLQ.
async fn dead_jobs(env: &TestEnv, kind: &str, n: usize) {
    let q = jobq_core::job::QueueName::default_queue();
    let jobs = (0..n).map(|_| jobq_core::job::NewJob::new(kind, serde_json::json!({})).max_attempts(1)).collect();
    env.broker.enqueue_many(jobs, true).await.unwrap();
    env.broker.ensure_recorder_groups(std::slice::from_ref(&q)).await.unwrap();
    let mut conn = env.broker.blocking_connection(std::time::Duration::from_millis(100)).await.unwrap();
    let mut left = n;
    while left > 0 {
        let f = env.broker.fetch(&q, "w", left.min(100)).await.unwrap();
        left -= f.jobs.len();
        let outcomes: Vec<_> = f
            .jobs
            .into_iter()
            .map(|d| jobq_core::stream::Outcome {
                delivery: d,
                result: Err(jobq_core::stream::Failure { message: "boom".into(), retry_in: None, reason: "fatal" }),
            })
            .collect();
        env.broker.settle(&outcomes).await.unwrap();
        let batch = env
            .broker
            .read_events(&mut conn, "r", std::slice::from_ref(&q), 1000, std::time::Duration::from_millis(100))
            .await
            .unwrap();
        env.store.record(&batch.events).await.unwrap();
    }
}

#[tokio::test]
async fn dlq_retry_by_filter_reaches_every_match_past_a_page() {
    let env = TestEnv::new().await;
    dead_jobs(&env, "y", 501).await;
    let (code, out, err) = jobq_in(&env, &["--json", "dlq", "retry", "--type", "y", "--yes"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["retried"].as_u64(), v["matched"].as_u64(), v["failed"].as_u64()), (Some(501), Some(501), Some(0)));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_jobs WHERE retried_at IS NULL")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn dlq_commands_list_retry_and_purge() {
    let env = TestEnv::new().await;
    dead_jobs(&env, "x", 3).await;

    let (code, out, _) = jobq_in(&env, &["--json", "dlq", "list"]).await;
    assert_eq!(code, 0);
    let page: serde_json::Value = serde_json::from_str(&out).unwrap();
    let first = page["items"][0]["job_id"].as_str().unwrap().to_owned();
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    let (code, _, _) = jobq_in(&env, &["dlq", "retry", &first]).await;
    assert_eq!(code, 0);
    let (code, _, err) = jobq_in(&env, &["dlq", "retry", "--type", "x"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("2 dead jobs match"));
    // With Redis out, each retry fails and rolls back: the command says so and fails.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobq"))
        .args(["--json", "dlq", "retry", "--type", "x", "--yes"])
        .envs(env.env())
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_ne!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(stdout.trim()) {
        assert_eq!((v["retried"].as_u64(), v["failed"].as_u64()), (Some(0), Some(2)), "{v}");
    }
    let (code, out, _) = jobq_in(&env, &["--json", "dlq", "retry", "--type", "x", "--yes"]).await;
    assert_eq!((code, serde_json::from_str::<serde_json::Value>(&out).unwrap()["retried"].as_u64()), (0, Some(2)));
    let (code, out, _) = jobq_in(&env, &["--json", "dlq", "purge", "--yes"]).await;
    assert_eq!((code, serde_json::from_str::<serde_json::Value>(&out).unwrap()["deleted"].as_u64()), (0, Some(0)));
    let audit: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE actor LIKE 'cli:%'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(audit, 4, "retry, the failed and the done retry by filter, and purge are audited");
    env.cleanup().await;
}

/// `jobq dev --config bare.toml` in `dir`, in a process group of its own (as a shell runs it in a
/// terminal), with nothing in the environment naming Redis or Postgres.
fn bare_dev_command(dir: &std::path::Path, port: u16) -> tokio::process::Command {
    let mut dev = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobq"));
    dev.args(["--config", "bare.toml", "dev"])
        .current_dir(dir)
        .env_remove("REDIS_URL")
        .env_remove("DATABASE_URL")
        .env_remove("JOBQ_REDIS_URL")
        .env_remove("JOBQ_DATABASE_URL")
        .env("JOBQ_API_ADDR", format!("127.0.0.1:{port}"))
        .env("JOBQ_LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    dev
}

fn bare_dev(dir: &std::path::Path, port: u16) -> tokio::process::Child {
    bare_dev_command(dir, port).spawn().unwrap()
}

/// Sends `sig` to the process group of `child`, as Ctrl+C in a terminal does.
fn signal_group(child: &tokio::process::Child, sig: &str) {
    let group = format!("-{}", child.id().unwrap());
    std::process::Command::new("kill").args([&format!("-{sig}"), "--", &group]).status().unwrap();
}

#[tokio::test]
async fn dev_on_a_bare_machine_starts_private_redis_and_postgres_and_stops_them() {
    let dir = std::env::temp_dir().join(format!("jobq-bare-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    if std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0")) {
        // PostgreSQL runs as the postgres user then: it must be able to reach the directory.
        let _ = std::process::Command::new("chmod").arg("755").arg(&dir).status();
    }
    // Nothing answers at the configured addresses, and the environment names none.
    std::fs::write(
        dir.join("bare.toml"),
        "[redis]\nurl = \"redis://127.0.0.1:1\"\n[database]\nurl = \"postgres://postgres@127.0.0.1:2/jobq\"\n",
    )
    .unwrap();
    let port = free_port();
    let api = Api::new(port);
    let child = bare_dev(&dir, port);
    api.wait_ready(Duration::from_secs(60)).await;
    let (status, job) = api.post("/api/v1/jobs", &json!({"type": "echo", "payload": "bare"})).await;
    assert_eq!(status, 201);
    api.wait_for_state(job["id"].as_str().unwrap(), "succeeded", Duration::from_secs(20)).await;
    std::process::Command::new("kill").arg("-TERM").arg(child.id().unwrap().to_string()).status().unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("starting a private redis-server") && stdout.contains("starting a private one"),
        "{stdout}"
    );
    // Both are stopped: PostgreSQL removed its pid file, Redis no longer answers.
    assert!(!dir.join(".jobq-dev/postgres/postmaster.pid").exists(), "postgres stopped");
    let redis_port: u16 =
        stdout.split("redis-server on 127.0.0.1:").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", redis_port)).is_err(), "redis stopped");

    // Ctrl+C in the terminal signals the whole group: the private Redis outlives the graceful
    // stop, so a job that finishes during it is written as succeeded, not run again later.
    let child = bare_dev(&dir, port);
    api.wait_ready(Duration::from_secs(60)).await;
    let (_, job) = api.post("/api/v1/jobs", &json!({"type": "sleep", "payload": {"ms": 1500}})).await;
    let id = job["id"].as_str().unwrap().to_owned();
    api.wait_for_state(&id, "running", Duration::from_secs(20)).await;
    signal_group(&child, "INT");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let child = bare_dev(&dir, port);
    api.wait_ready(Duration::from_secs(60)).await;
    let (_, job) = api.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("succeeded"), Some(1)), "{job}");
    // A second Ctrl+C exits at once (a job still runs) and leaves the private servers running;
    // the next run stops them and starts afresh on the same data.
    let (_, long) = api.post("/api/v1/jobs", &json!({"type": "sleep", "payload": {"ms": 20000}})).await;
    api.wait_for_state(long["id"].as_str().unwrap(), "running", Duration::from_secs(20)).await;
    signal_group(&child, "INT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal_group(&child, "INT");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stdout));
    // Its pid file stays behind; say its number now belongs to another process, one whose
    // command line even names jobq.
    use std::os::unix::process::CommandExt as _;
    let mut lookalike = std::process::Command::new("sh")
        .args(["-c", "sleep 60", "jobq-worker"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    std::fs::write(dir.join(".jobq-dev/jobq-dev.pid"), lookalike.id().to_string()).unwrap();
    let child = bare_dev(&dir, port);
    api.wait_ready(Duration::from_secs(60)).await;
    let (_, again) = api.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(again["state"], "succeeded", "{again}");
    // A second jobq dev on the same data is refused and leaves the running one's servers alone.
    let second = bare_dev_command(&dir, free_port()).stderr(std::process::Stdio::piped()).output().await.unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("another jobq dev"), "{err}");
    assert_eq!(api.get("/ready").await.0, 200, "the first one still has its Redis and PostgreSQL");
    std::process::Command::new("kill").arg("-TERM").arg(child.id().unwrap().to_string()).status().unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("stopping the private redis-server an earlier run left"), "{stdout}");
    assert!(!dir.join(".jobq-dev/postgres/postmaster.pid").exists(), "postgres stopped");
    let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{}", lookalike.id())]).status();
    let _ = lookalike.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dev_says_what_to_install_when_redis_is_missing() {
    let dir = std::env::temp_dir().join(format!("jobq-nobin-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bare.toml"), "[redis]\nurl = \"redis://127.0.0.1:1\"\n").unwrap();
    let out = jobq()
        .args(["--config", "bare.toml", "dev"])
        .current_dir(&dir)
        .env("PATH", dir.join("empty"))
        .env_remove("REDIS_URL")
        .env_remove("JOBQ_REDIS_URL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("redis-server is not on PATH") && err.contains("apt-get install redis-server"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

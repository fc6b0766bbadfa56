//! A user's worker binary built on the library (`examples/custom-worker`), as a real process.

use std::time::Duration;

use jobq_core::job::{JobState, NewJob};
use jobq_testutil::{wait_until, Proc, TestEnv};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_checkpoint_survives_a_kill_9_of_the_worker() {
    let env = TestEnv::with(&[
        ("JOBQ_WORKER_LEASE", "1500ms"),
        ("JOBQ_WORKER_HEARTBEAT", "300ms"),
        ("JOBQ_WORKER_REAPER_INTERVAL", "300ms"),
    ])
    .await;
    let vars = env.env();
    let first = Proc::spawn("custom-worker", &vars);
    let report = NewJob::new("report.build", json!({"rows": 3000, "ms_per_chunk": 50})).partition("acme");
    let id = env.broker.enqueue(report).await.unwrap().job.id;
    let saved = wait_until(WAIT, "a checkpoint past 1,000 rows", || async {
        let job = env.broker.job(id).await.ok()??;
        job.checkpoint.as_ref()?.as_u64().filter(|rows| *rows >= 1000)
    })
    .await;
    first.signal("KILL");
    let _second = Proc::spawn("custom-worker", &vars);
    let job = wait_until(WAIT, "the report to be built by the second worker", || async {
        let job = env.broker.job(id).await.ok()??;
        (job.state == JobState::Succeeded).then_some(job)
    })
    .await;
    let result = job.result.unwrap();
    let resumed_from = result["resumed_from"].as_u64().unwrap();
    println!("killed at checkpoint {saved}; the next attempt resumed from row {resumed_from}");
    assert!(resumed_from >= saved, "resumed from {resumed_from}, checkpoint was {saved}");
    assert_eq!(result["rows"], 3000);
    assert_eq!((job.attempt, job.reclaims), (1, 1), "the crash was reclaimed without spending an attempt");
    drop(first);
    env.cleanup().await;
}

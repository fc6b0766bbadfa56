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

/// Most intervals overlapping at one instant.
fn peak_overlap(spans: &[(u64, u64)]) -> usize {
    let mut edges: Vec<(u64, i32)> = spans.iter().flat_map(|&(s, e)| [(s, 1), (e, -1)]).collect();
    // An end and a start at the same millisecond: count the end first.
    edges.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    peak as usize
}

#[tokio::test]
async fn a_partition_limit_holds_across_two_worker_processes() {
    let env = TestEnv::with(&[("JOBQ_WORKER_CONCURRENCY", "10")]).await;
    let vars = env.env();
    // The scheduler promotes held-back jobs when their delay is over.
    let _procs = [
        Proc::spawn("custom-worker", &vars),
        Proc::spawn("custom-worker", &vars),
        Proc::spawn("jobq-scheduler", &vars),
    ];
    let jobs: Vec<_> = (0..40)
        .map(|i| {
            let tenant = if i % 4 == 0 { "small" } else { "acme" };
            NewJob::new("report.build", json!({"rows": 300, "ms_per_chunk": 15})).partition(tenant)
        })
        .collect();
    let ids: Vec<_> =
        env.broker.enqueue_many(jobs, false).await.unwrap().into_iter().map(|r| r.unwrap().job.id).collect();
    let mut spans: std::collections::HashMap<String, Vec<(u64, u64)>> = Default::default();
    for id in ids {
        let job = wait_until(WAIT, "every report", || async {
            let job = env.broker.job(id).await.ok()??;
            (job.state == JobState::Succeeded).then_some(job)
        })
        .await;
        assert_eq!(job.attempt, 1, "held-back starts spent no attempt");
        let span = &job.result.as_ref().unwrap()["span_ms"];
        let span = (span[0].as_u64().unwrap(), span[1].as_u64().unwrap());
        spans.entry(job.partition_key.clone().unwrap()).or_default().push(span);
    }
    let (acme, small) = (peak_overlap(&spans["acme"]), peak_overlap(&spans["small"]));
    println!("partition limit 2, two worker processes x 10 slots: peak in flight acme {acme}, small {small}");
    assert_eq!(acme, 2, "the limit holds across processes and is reached");
    assert!(small <= 2);
    env.cleanup().await;
}

//! The handlers against a real Redis, through `jobq_worker::testing`.

use custom_worker::Thumbnail;
use jobq_core::job::{JobState, NewJob};
use jobq_worker::testing::TestWorker;
use jobq_worker::JobContext;
use serde_json::json;

#[tokio::test]
async fn a_thumbnail_is_resized_and_a_bad_width_is_not_retried() {
    let worker = TestWorker::start(custom_worker::registry()).await.unwrap();
    let job =
        worker.run(NewJob::new("thumbnail.resize", json!({"url": "s3://img/1.png", "width": 200}))).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    let thumb: Thumbnail = serde_json::from_value(job.result.unwrap()).unwrap();
    assert_eq!(thumb, Thumbnail { url: "s3://img/1.png?w=200".into(), width: 200 });

    let bad = NewJob::new("thumbnail.resize", json!({"url": "s3://img/2.png", "width": 0})).max_attempts(5);
    let job = worker.run(bad).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Dead, 1));
    assert!(job.last_error.unwrap().contains("width must be 1 to 4096"));
    worker.finish().await;
}

#[tokio::test]
async fn a_report_reports_progress_and_resumes_from_its_checkpoint() {
    let worker = TestWorker::start(custom_worker::registry()).await.unwrap();
    let job = worker.run(NewJob::new("report.build", json!({"rows": 1000})).partition("acme")).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.progress.unwrap().message.as_deref(), Some("1000/1000 rows"));

    // The handler itself, called directly with a detached context that has a checkpoint.
    let ctx = JobContext::detached("report.build", json!({})).with_checkpoint(json!(700));
    let built = custom_worker::build_report(serde_json::from_value(json!({"rows": 1000})).unwrap(), ctx).await.unwrap();
    assert_eq!((built.rows, built.resumed_from), (1000, 700));
    assert!(built.span_ms.0 <= built.span_ms.1);
    worker.finish().await;
}

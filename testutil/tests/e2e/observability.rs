//! /metrics, /health and /ready of the worker and the scheduler, through real processes.

use std::time::Duration;

use jobq_core::job::NewJob;
use jobq_testutil::{free_port, wait_until, Proc, TcpProxy, TestEnv};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// The value of the first sample of `metric` whose labels contain every `labels` pair.
fn sample(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
        .find(|l| labels.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_count_a_known_workload_and_readiness_follows_redis() {
    let env = TestEnv::new().await;
    let proxy = TcpProxy::start("127.0.0.1:6379".parse().unwrap()).await;
    let (wport, sport) = (free_port(), free_port());
    let mut wvars = env.env();
    wvars.insert("JOBQ_METRICS_ADDR".into(), format!("127.0.0.1:{wport}"));
    wvars.insert("REDIS_URL".into(), format!("redis://127.0.0.1:{}", proxy.port()));
    let mut svars = env.env();
    svars.insert("JOBQ_METRICS_ADDR".into(), format!("127.0.0.1:{sport}"));
    let mut worker = Proc::spawn("jobq-worker", &wvars);
    let mut scheduler = Proc::spawn("jobq-scheduler", &svars);
    let http = reqwest::Client::new();
    let get = |port: u16, path: &'static str| {
        let http = http.clone();
        async move {
            let r = http.get(format!("http://127.0.0.1:{port}{path}")).send().await.ok()?;
            let status = r.status().as_u16();
            Some((status, r.text().await.ok()?))
        }
    };
    wait_until(WAIT, "the worker to be ready", || async { (get(wport, "/ready").await?.0 == 200).then_some(()) }).await;
    wait_until(WAIT, "the scheduler to be ready", || async { (get(sport, "/ready").await?.0 == 200).then_some(()) })
        .await;
    assert_eq!(get(wport, "/health").await.unwrap().0, 200);

    for i in 0..5 {
        env.broker.enqueue(NewJob::new("echo", json!(i))).await.unwrap();
    }
    for _ in 0..2 {
        env.broker.enqueue(NewJob::new("fail", json!({})).max_attempts(1)).await.unwrap();
    }
    let text = wait_until(WAIT, "the workload to be counted", || async {
        let (_, text) = get(wport, "/metrics").await?;
        let ok = sample(&text, "jobq_jobs_finished_total", &["type=\"echo\"", "outcome=\"succeeded\""]) == Some(5.0)
            && sample(&text, "jobq_jobs_finished_total", &["type=\"fail\"", "outcome=\"dead\""]) == Some(2.0);
        ok.then_some(text)
    })
    .await;
    assert_eq!(sample(&text, "jobq_jobs_started_total", &["type=\"echo\""]), Some(5.0));
    assert!(text.contains("jobq_attempt_duration_seconds_bucket"), "attempt duration histogram");
    assert!(text.contains("jobq_enqueue_to_start_seconds_bucket"), "enqueue-to-start histogram");
    let stext = wait_until(WAIT, "the scheduler's gauges and recorder counters", || async {
        let (_, t) = get(sport, "/metrics").await?;
        (sample(&t, "jobq_recorded_events_total", &[]) == Some(7.0) && t.contains("jobq_queue_depth")).then_some(t)
    })
    .await;
    assert!(stext.contains("jobq_promotion_lag_seconds"));

    proxy.cut();
    let (status, body) = wait_until(WAIT, "readiness to fail", || async {
        let (s, b) = get(wport, "/ready").await?;
        (s == 503).then_some((s, b))
    })
    .await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 503);
    assert_ne!(body["checks"]["redis"], "ok", "{body}");
    assert_eq!(get(wport, "/health").await.unwrap().0, 200, "still alive");
    proxy.restore();
    wait_until(WAIT, "readiness to come back", || async { (get(wport, "/ready").await?.0 == 200).then_some(()) }).await;

    for p in [&mut worker, &mut scheduler] {
        p.signal("TERM");
        assert_eq!(p.wait(Duration::from_secs(15)).await, Some(0));
    }
    env.cleanup().await;
}

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

#[tokio::test]
async fn lease_renewals_racing_outcome_writes_lose_no_lease() {
    // Heartbeats every 10 ms while thousands of jobs finish: a renewal that reaches Redis just
    // after a job's outcome was written finds its lease gone, and must not count it as lost.
    let env = TestEnv::new().await;
    let port = free_port();
    let vars = env.env_with(&[
        ("JOBQ_METRICS_ADDR", &format!("127.0.0.1:{port}")),
        ("JOBQ_WORKER_HEARTBEAT", "10ms"),
        ("JOBQ_WORKER_CONCURRENCY", "50"),
    ]);
    let n = 5000;
    for chunk in 0..n / 1000 {
        let jobs = (0..1000).map(|i| NewJob::new("echo", json!(chunk * 1000 + i))).collect();
        env.broker.enqueue_many(jobs, false).await.unwrap();
    }
    let mut worker = Proc::spawn("jobq-worker", &vars);
    let http = reqwest::Client::new();
    let text = wait_until(WAIT, "every job to succeed", || async {
        let r = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.ok()?;
        let text = r.text().await.ok()?;
        (sample(&text, "jobq_jobs_finished_total", &["outcome=\"succeeded\""]) == Some(n as f64)).then_some(text)
    })
    .await;
    assert_eq!(sample(&text, "jobq_worker_leases_lost_total", &[]).unwrap_or(0.0), 0.0, "no lease was lost");
    worker.signal("TERM");
    assert_eq!(worker.wait(Duration::from_secs(15)).await, Some(0));
    env.cleanup().await;
}

/// One exported span: (service, name, trace id, span id, parent span id, attributes).
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace: String,
    span: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP/HTTP collector on a free port that decodes `POST /v1/traces` into [`Exported`] spans.
async fn collector() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Exported>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                    return axum::http::StatusCode::BAD_REQUEST;
                };
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .map(|a| text(&a.value))
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        sink.lock().unwrap().push(Exported {
                            service: service.clone(),
                            name: span.name,
                            trace: hex(&span.trace_id),
                            span: hex(&span.span_id),
                            parent: hex(&span.parent_span_id),
                            attributes: span.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect(),
                        });
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, spans)
}

#[tokio::test]
async fn spans_are_exported_over_otlp_and_the_request_trace_reaches_the_job() {
    let env = TestEnv::new().await;
    let (otlp, spans) = collector().await;
    let port = free_port();
    let vars = env.env_with(&[
        ("JOBQ_API_ADDR", &format!("127.0.0.1:{port}")),
        ("JOBQ_OTLP_ENDPOINT", &format!("http://127.0.0.1:{otlp}")),
    ]);
    let _api_proc = Proc::spawn("jobq-api", &vars);
    let _worker = Proc::spawn("jobq-worker", &vars);
    let api = jobq_testutil::Api::new(port);
    api.wait_ready(WAIT).await;

    let (trace, caller) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let r = api
        .client
        .post(format!("{}/api/v1/jobs", api.base))
        .header("traceparent", format!("00-{trace}-{caller}-01"))
        .json(&json!({"type": "echo", "payload": {"traced": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let job = api.wait_for_state(&id, "succeeded", WAIT).await;

    let find = |service: &str, name: &str| {
        spans.lock().unwrap().iter().find(|s| s.trace == trace && s.service == service && s.name == name).cloned()
    };
    let (request, attempt) = wait_until(WAIT, "the api's and the worker's spans at the collector", || async {
        Some((find("jobq-api", "request")?, find("jobq-worker", "job")?))
    })
    .await;
    assert_eq!(request.parent, caller, "the request span continues the caller's trace");
    assert_eq!(attempt.parent, request.span, "the job's span is a child of the enqueuing request's span");
    assert!(attempt.attributes.contains(&("job.id".into(), id.clone())), "{:?}", attempt.attributes);
    assert_eq!(
        job["metadata"]["traceparent"],
        format!("00-{trace}-{}-01", request.span),
        "the job carries the request span's context"
    );
    env.cleanup().await;
}

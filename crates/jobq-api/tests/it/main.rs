//! Handler tests through the router (no socket) against real Redis and PostgreSQL.

mod endpoints;
mod openapi;
mod security;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use jobq_api::{router, AppState};
use jobq_testutil::TestEnv;
use serde_json::{json, Value};
use tower::ServiceExt;

pub(crate) fn app(env: &TestEnv) -> Router {
    let s = env.settings();
    router(AppState::new(env.broker.clone(), env.store.clone(), &s), s.api.body_limit)
}

pub(crate) async fn call(app: &Router, method: &str, uri: &str, body: Option<&str>) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(body.map(|b| Body::from(b.to_owned())).unwrap_or_else(Body::empty)).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn assert_error(body: &Value, code: &str, mentions: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(mentions), "message {message:?} should mention {mentions:?}");
}

#[tokio::test]
async fn enqueue_returns_201_and_get_returns_every_documented_field() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let (status, job) = call(
        &app,
        "POST",
        "/api/v1/jobs",
        Some(r#"{"type":"echo","payload":{"n":1},"queue":"mail","priority":"high","max_attempts":3,"timeout":"10s","backoff":{"strategy":"linear","base":"2s"}}"#),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    assert_eq!(job["state"], "queued");
    let id = job["id"].as_str().unwrap();
    let (status, got) = call(&app, "GET", &format!("/api/v1/jobs/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    for field in [
        "id",
        "type",
        "queue",
        "priority",
        "state",
        "attempt",
        "max_attempts",
        "payload",
        "created_at",
        "run_at",
        "started_at",
        "finished_at",
        "last_error",
    ] {
        assert!(got.get(field).is_some(), "missing {field} in {got}");
    }
    assert_eq!(
        (got["type"].as_str(), got["queue"].as_str(), got["priority"].as_str()),
        (Some("echo"), Some("mail"), Some("high"))
    );
    assert_eq!(got["max_attempts"], 3);
    assert_eq!(got["timeout"], "10s");
    assert_eq!(got["backoff"]["strategy"], "linear");
    env.cleanup().await;
}

#[tokio::test]
async fn delay_and_run_at_schedule_the_job() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let (status, job) = call(&app, "POST", "/api/v1/jobs", Some(r#"{"type":"echo","delay":"5m"}"#)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(job["state"], "scheduled");
    let run_at = chrono::DateTime::parse_from_rfc3339(job["run_at"].as_str().unwrap()).unwrap();
    let ahead = run_at.timestamp() - chrono::Utc::now().timestamp();
    assert!((290..=301).contains(&ahead), "{ahead}");
    let at = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (status, job) =
        call(&app, "POST", "/api/v1/jobs", Some(&json!({"type": "echo", "run_at": at}).to_string())).await;
    assert_eq!((status, job["state"].as_str()), (StatusCode::CREATED, Some("scheduled")));
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let (_, job) = call(&app, "POST", "/api/v1/jobs", Some(&json!({"type": "echo", "run_at": past}).to_string())).await;
    assert_eq!(job["state"], "queued", "a run_at in the past runs now");
    env.cleanup().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_enqueues_nothing() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let cases: &[(&str, StatusCode, &str, &str)] = &[
        ("{not json", StatusCode::BAD_REQUEST, "bad_request", ""),
        (r#"{"payload":{}}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "type"),
        (r#"{"type":"echo","colour":"red"}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "colour"),
        (r#"{"type":7}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "type"),
        (r#"{"type":"echo","priority":"urgent"}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "urgent"),
        (r#"{"type":"echo","queue":"a b"}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "queue"),
        (r#"{"type":"echo","delay":"soon"}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "soon"),
        (
            r#"{"type":"echo","delay":"1s","run_at":"2030-01-01T00:00:00Z"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "run_at",
        ),
        (r#"{"type":"echo","run_at":"tomorrow"}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "run_at"),
        (r#"{"type":"echo","max_attempts":0}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "max_attempts"),
        (r#"{"type":"echo","max_attempts":-1}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "max_attempts"),
        (r#"{"type":""}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "type"),
        // A schedule tick's key, which would stop that tick from running.
        (
            r#"{"type":"echo","unique_key":"cron:nightly:1772332200000"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "cron:",
        ),
        (
            r#"{"type":"echo","backoff":{"base":"10s","max":"1s"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "backoff.max",
        ),
        (r#"{"type":"echo","backoff":{"factor":2}}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "factor"),
        // Past what Redis can expire: refused here, not a Redis error.
        (
            r#"{"type":"echo","unique_key":"k","unique_ttl":18446744073709551615}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "unique_ttl",
        ),
        (
            r#"{"type":"echo","unique_key":"k","unique_ttl":"11years"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "unique_ttl",
        ),
        // Postgres keeps history and the DLQ, and cannot store U+0000.
        (
            r#"{"type":"echo","payload":{"a":["\u0000"]}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "payload",
        ),
        (r#"{"type":"echo","payload":{"\u0000":1}}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "payload"),
        (r#"{"type":"echo","tags":["a\u0000"]}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "tags"),
        (
            r#"{"type":"echo","metadata":{"k":"\u0000"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "metadata",
        ),
    ];
    for (body, status, code, mentions) in cases {
        let (got, err) = call(&app, "POST", "/api/v1/jobs", Some(body)).await;
        assert_eq!(got, *status, "{body} -> {err}");
        assert_error(&err, code, mentions);
    }
    // In a batch, such an item is refused alone and the others are enqueued.
    let batch =
        r#"{"jobs":[{"type":"echo","unique_key":"b","unique_ttl":"20years"},{"type":"echo","payload":"\u0000"}]}"#;
    let (got, res) = call(&app, "POST", "/api/v1/jobs/batch", Some(batch)).await;
    assert_eq!((got, res["failed"].as_u64()), (StatusCode::OK, Some(2)), "{res}");
    for item in res["results"].as_array().unwrap() {
        assert_eq!(item["error"]["code"], "invalid_request", "{item}");
    }
    assert!(env.broker.queues().await.unwrap().is_empty(), "nothing was enqueued");
    env.cleanup().await;
}

#[tokio::test]
async fn size_limits_are_413_with_the_limit_in_the_message() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let limit = env.settings().api.payload_limit;
    let big = "x".repeat(limit);
    let (status, err) =
        call(&app, "POST", "/api/v1/jobs", Some(&json!({"type": "echo", "payload": big}).to_string())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&err, "payload_too_large", &limit.to_string());
    let huge = "y".repeat(env.settings().api.body_limit + 1);
    let (status, err) =
        call(&app, "POST", "/api/v1/jobs", Some(&json!({"type": "echo", "payload": huge}).to_string())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    assert_eq!(err["error"]["code"], "payload_too_large", "{err}");
    // The DLQ retry reads its optional body itself: over the limit it answers the same JSON.
    let uri = format!("/api/v1/dlq/{}/retry", uuid::Uuid::now_v7());
    let (status, err) = call(&app, "POST", &uri, Some(&json!({"payload": huge}).to_string())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    assert_eq!(err["error"]["code"], "payload_too_large", "{err}");
    let req = Request::builder().method("POST").uri("/api/v1/jobs").body(Body::from(r#"{"type":"echo"}"#)).unwrap();
    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    env.cleanup().await;
}

#[tokio::test]
async fn unknown_jobs_routes_and_ids_are_4xx_json() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let (status, err) = call(&app, "GET", &format!("/api/v1/jobs/{}", uuid::Uuid::now_v7()), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&err, "not_found", "not found");
    let (status, err) = call(&app, "GET", "/api/v1/jobs/not-a-uuid", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&err, "bad_request", "not-a-uuid");
    // A path segment that is not UTF-8 once decoded: the same JSON error, on every route.
    for uri in ["/api/v1/jobs/%FF", "/api/v1/dlq/%FF", "/api/v1/queues/%FF", "/api/v1/schedules/%FF"] {
        let (status, err) = call(&app, "GET", uri, None).await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("bad_request")),
            "{uri}: {err}"
        );
    }
    let (status, err) = call(&app, "GET", "/api/v1/nothing", None).await;
    assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let (status, err) = call(&app, "PUT", "/api/v1/dlq", None).await;
    assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")));
    let (status, err) = call(&app, "POST", &format!("/api/v1/dlq/{}/retry", uuid::Uuid::now_v7()), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    env.cleanup().await;
}

#[tokio::test]
async fn dlq_listing_validates_its_query() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let (status, page) = call(&app, "GET", "/api/v1/dlq?queue=default&type=echo&limit=10", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"], json!([]));
    let (status, err) = call(&app, "GET", "/api/v1/dlq?limit=0", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_error(&err, "invalid_request", "limit");
    let (status, err) = call(&app, "GET", "/api/v1/dlq?limit=many", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "a value that does not parse: {err}");
    assert_error(&err, "invalid_request", "limit");
    for cursor in ["garbage", &format!("-8000000000000000000_{}", uuid::Uuid::now_v7())] {
        let (status, err) = call(&app, "GET", &format!("/api/v1/dlq?cursor={cursor}"), None).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_error(&err, "invalid_request", "cursor");
    }
    let (status, _) = call(&app, "GET", "/api/v1/dlq?sort=asc", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    env.cleanup().await;
}

#[tokio::test]
async fn health_is_up_and_ready_reports_each_dependency() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let (status, body) = call(&app, "GET", "/health", None).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (status, body) = call(&app, "GET", "/ready", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"], json!({"redis": "ok", "postgres": "ok"}));

    let mut settings = env.settings();
    settings.redis.url = "redis://127.0.0.1:1".into();
    settings.redis.timeout = std::time::Duration::from_millis(300);
    let broken = jobq_core::stream::Broker::connect(&settings).await.unwrap();
    let down = router(AppState::new(broken, env.store.clone(), &settings), 4096);
    let (status, body) = call(&down, "GET", "/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_ne!(body["checks"]["redis"], "ok");
    let (status, err) = call(&down, "POST", "/api/v1/jobs", Some(r#"{"type":"echo"}"#)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "an outage is a 503, never a 201 or 500");
    assert_error(&err, "unavailable", "Redis");
    env.cleanup().await;
}

#[tokio::test]
async fn a_scheduled_job_runs_now_on_request_and_other_states_are_a_conflict() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let (_, job) = call(&app, "POST", "/api/v1/jobs", Some(r#"{"type":"echo","delay":"1h","priority":"high"}"#)).await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(job["state"], "scheduled");
    let (s, ran) = call(&app, "POST", &format!("/api/v1/jobs/{id}/run"), None).await;
    assert_eq!(
        (s, ran["state"].as_str(), ran["priority"].as_str()),
        (StatusCode::OK, Some("queued"), Some("high")),
        "{ran}"
    );
    let run_at: chrono::DateTime<chrono::Utc> = ran["run_at"].as_str().unwrap().parse().unwrap();
    assert!(run_at <= chrono::Utc::now(), "run_at moved to now: {ran}");
    let (s, err) = call(&app, "POST", &format!("/api/v1/jobs/{id}/run"), None).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_error(&err, "conflict", "is queued");
    let (s, _) = call(&app, "POST", &format!("/api/v1/jobs/{}/run", uuid::Uuid::now_v7()), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&app, "POST", "/api/v1/jobs/not-a-uuid/run", None).await;
    assert!(s.is_client_error() && s != StatusCode::NOT_FOUND, "{s}");
    let (s, _) = call(&app, "POST", &format!("/api/v1/jobs/{id}/run?now=1"), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "no query parameters");
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_cancel_counts_until_confirmed_and_is_audited() {
    let env = TestEnv::new().await;
    let app = app(&env);
    for body in [
        r#"{"type":"echo","queue":"mail"}"#,
        r#"{"type":"echo","queue":"mail","delay":"1h"}"#,
        r#"{"type":"other","queue":"mail"}"#,
    ] {
        let (s, _) = call(&app, "POST", "/api/v1/jobs", Some(body)).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let path = "/api/v1/queues/mail/cancel";
    let (s, dry) = call(&app, "POST", path, Some(r#"{"type":"echo"}"#)).await;
    assert_eq!((s, dry["matched"].as_u64(), dry["more"].as_bool()), (StatusCode::OK, Some(2), Some(false)), "{dry}");
    assert_eq!((dry["dry_run"].as_bool(), dry.get("cancelled")), (Some(true), None), "without confirm: {dry}");
    let (_, dry) = call(&app, "POST", path, Some(r#"{"confirm":false}"#)).await;
    assert_eq!(dry["matched"].as_u64(), Some(3), "{dry}");
    let (s, one) = call(&app, "POST", path, Some(r#"{"type":"echo","states":["scheduled"],"confirm":true}"#)).await;
    assert_eq!((s, one["cancelled"].as_u64()), (StatusCode::OK, Some(1)), "{one}");
    let (s, rest) = call(&app, "POST", path, Some(r#"{"confirm":true,"limit":1}"#)).await;
    assert_eq!(
        (s, rest["cancelled"].as_u64(), rest["more"].as_bool()),
        (StatusCode::OK, Some(1), Some(true)),
        "{rest}"
    );
    let (_, rest) = call(&app, "POST", path, Some(r#"{"confirm":true}"#)).await;
    assert_eq!((rest["cancelled"].as_u64(), rest["more"].as_bool()), (Some(1), Some(false)), "{rest}");
    let (_, stats) = call(&app, "GET", "/api/v1/queues/mail", None).await;
    assert_eq!((stats["queued"]["normal"].as_u64(), stats["scheduled"].as_u64()), (Some(0), Some(0)), "{stats}");
    for (body, status, mentions) in [
        (r#"{"states":["running"],"confirm":true}"#, StatusCode::UNPROCESSABLE_ENTITY, "running"),
        (r#"{"states":["bogus"],"confirm":true}"#, StatusCode::UNPROCESSABLE_ENTITY, "bogus"),
        (r#"{"limit":0,"confirm":true}"#, StatusCode::UNPROCESSABLE_ENTITY, "limit"),
        (r#"{"type":"a\u0000b"}"#, StatusCode::UNPROCESSABLE_ENTITY, "U+0000"),
        (r#"{"type":"","confirm":true}"#, StatusCode::UNPROCESSABLE_ENTITY, "empty"),
        (r#"{"states":[],"confirm":true}"#, StatusCode::UNPROCESSABLE_ENTITY, "at least one state"),
        (r#"{"confirm":true,"colour":"red"}"#, StatusCode::UNPROCESSABLE_ENTITY, "colour"),
    ] {
        let (s, err) = call(&app, "POST", path, Some(body)).await;
        assert_eq!(s, status, "{body}: {err}");
        assert!(err["error"]["message"].as_str().unwrap_or_default().contains(mentions), "{body}: {err}");
    }
    let (s, _) = call(&app, "POST", "/api/v1/queues/bad%20name/cancel", Some(r#"{"confirm":true}"#)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // A call Redis fails is audited even with nothing counted: its reply may have been lost after
    // it took jobs. (A scheduled set that is not a sorted set makes the script fail.)
    let broken: jobq_core::job::QueueName = "broken".parse().unwrap();
    let _: () = redis::AsyncCommands::set(&mut env.broker.connection(), env.keys().scheduled(&broken), "a string")
        .await
        .unwrap();
    let (s, err) = call(&app, "POST", "/api/v1/queues/broken/cancel", Some(r#"{"confirm":true}"#)).await;
    assert!(s.is_server_error(), "{s}: {err}");
    let (_, audit) = call(&app, "GET", "/api/v1/audit", None).await;
    let cancels: Vec<&Value> =
        audit["items"].as_array().unwrap().iter().filter(|a| a["action"] == "queue.cancel").collect();
    assert_eq!(cancels.len(), 4, "3, then the failed one; none of the refused ones: {audit}");
    assert!(
        cancels.iter().any(|a| a["target"] == "broken" && a["count"] == 0 && a["details"]["stopped"].is_string()),
        "{audit}"
    );
    assert!(
        cancels
            .iter()
            .any(|a| a["count"] == 1 && a["filter"]["type"] == "echo" && a["filter"]["states"][0] == "scheduled"),
        "{audit}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_run_counts_until_confirmed_then_queues_the_waiting_jobs_now() {
    let env = TestEnv::new().await;
    let app = app(&env);
    for body in [r#"{"type":"echo","queue":"mail","delay":"1h"}"#, r#"{"type":"other","queue":"mail","delay":"1h"}"#] {
        let (s, _) = call(&app, "POST", "/api/v1/jobs", Some(body)).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let path = "/api/v1/queues/mail/run";
    let (s, dry) = call(&app, "POST", path, Some("{}")).await;
    assert_eq!((s, dry["matched"].as_u64(), dry["dry_run"].as_bool()), (StatusCode::OK, Some(2), Some(true)), "{dry}");
    let (s, ran) = call(&app, "POST", path, Some(r#"{"type":"echo","states":["scheduled"],"confirm":true}"#)).await;
    assert_eq!((s, ran["queued"].as_u64(), ran["more"].as_bool()), (StatusCode::OK, Some(1), Some(false)), "{ran}");
    let (_, stats) = call(&app, "GET", "/api/v1/queues/mail", None).await;
    assert_eq!((stats["queued"]["normal"].as_u64(), stats["scheduled"].as_u64()), (Some(1), Some(1)), "{stats}");
    let (s, err) = call(&app, "POST", path, Some(r#"{"states":["queued"],"confirm":true}"#)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(err["error"]["message"].as_str().unwrap_or_default().contains("queued"), "{err}");
    let (_, audit) = call(&app, "GET", "/api/v1/audit", None).await;
    let runs: Vec<&Value> = audit["items"].as_array().unwrap().iter().filter(|a| a["action"] == "queue.run").collect();
    assert_eq!((runs.len(), runs[0]["count"].as_i64()), (1, Some(1)), "{audit}");
    env.cleanup().await;
}

#[tokio::test]
async fn cancel_pause_unique_and_expiry_routes() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let (s, paused) = call(&app, "POST", "/api/v1/queues/mail/pause", None).await;
    assert_eq!((s, paused["paused"].as_bool()), (StatusCode::OK, Some(true)));
    assert!(env.broker.is_paused(&"mail".parse().unwrap()).await.unwrap());
    let (s, _) = call(&app, "POST", "/api/v1/queues/mail/resume", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!env.broker.is_paused(&"mail".parse().unwrap()).await.unwrap());
    let (s, err) = call(&app, "POST", "/api/v1/queues/bad%20name/pause", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{err}");

    let (_, job) = call(&app, "POST", "/api/v1/jobs", Some(r#"{"type":"echo","delay":"1h"}"#)).await;
    let id = job["id"].as_str().unwrap();
    let (s, cancelled) = call(&app, "DELETE", &format!("/api/v1/jobs/{id}"), None).await;
    assert_eq!((s, cancelled["state"].as_str()), (StatusCode::OK, Some("cancelled")));
    let (s, err) = call(&app, "DELETE", &format!("/api/v1/jobs/{id}"), None).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_error(&err, "conflict", "cancelled");
    let (s, _) = call(&app, "DELETE", &format!("/api/v1/jobs/{}", uuid::Uuid::now_v7()), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let body = r#"{"type":"echo","unique_key":"k1","unique_ttl":"1m"}"#;
    let (s1, a) = call(&app, "POST", "/api/v1/jobs", Some(body)).await;
    let (s2, b) = call(&app, "POST", "/api/v1/jobs", Some(body)).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(a["id"], b["id"]);
    assert_eq!(a["unique_key"], "k1");

    let (s, job) = call(&app, "POST", "/api/v1/jobs", Some(r#"{"type":"echo","ttl":"10m"}"#)).await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(job["expires_at"].is_string());
    for (body, mentions) in [
        (r#"{"type":"echo","ttl":"1m","expires_at":"2099-01-01T00:00:00Z"}"#, "ttl"),
        (r#"{"type":"echo","expires_at":"2001-01-01T00:00:00Z"}"#, "expires_at"),
        (r#"{"type":"echo","delay":"1h","ttl":"1m"}"#, "expires_at"),
        (r#"{"type":"echo","unique_ttl":"1m"}"#, "unique_key"),
        (r#"{"type":"echo","unique_key":""}"#, "unique_key"),
    ] {
        let (s, err) = call(&app, "POST", "/api/v1/jobs", Some(body)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {err}");
        assert_error(&err, "invalid_request", mentions);
    }
    env.cleanup().await;
}

#[tokio::test]
async fn schedules_crud_trigger_and_runs() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let body = r#"{"name":"nightly","cron":"0 30 2 * * *","timezone":"America/New_York","job":{"type":"echo","payload":{"r":1}}}"#;
    let (s, created) = call(&app, "POST", "/api/v1/schedules", Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let next = created["next_fires"].as_array().unwrap();
    assert_eq!(next.len(), 5);
    assert!(next.iter().all(|t| t.as_str().unwrap().contains(":30:00")), "{next:?}");
    assert_eq!(created["misfire"], "fire_once");
    assert_eq!(created["enabled"], true);
    let (s, err) = call(&app, "POST", "/api/v1/schedules", Some(body)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{err}");

    let (s, list) = call(&app, "GET", "/api/v1/schedules", None).await;
    assert_eq!((s, list["items"].as_array().unwrap().len()), (StatusCode::OK, 1));
    let (s, paused) = call(&app, "PATCH", "/api/v1/schedules/nightly", Some(r#"{"enabled":false}"#)).await;
    assert_eq!(
        (s, paused["enabled"].as_bool(), paused["next_fires"].as_array().unwrap().len()),
        (StatusCode::OK, Some(false), 0)
    );
    let (s, put) = call(
        &app,
        "PUT",
        "/api/v1/schedules/hourly",
        Some(r#"{"cron":"@hourly","job":{"type":"echo"},"misfire":"skip"}"#),
    )
    .await;
    assert_eq!((s, put["name"].as_str()), (StatusCode::CREATED, Some("hourly")));
    let (s, _) =
        call(&app, "PUT", "/api/v1/schedules/hourly", Some(r#"{"cron":"@daily","job":{"type":"echo"}}"#)).await;
    assert_eq!(s, StatusCode::OK);

    let (s, job) = call(&app, "POST", "/api/v1/schedules/nightly/trigger", None).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(job["payload"], json!({"r": 1}));
    let (s, runs) = call(&app, "GET", "/api/v1/schedules/nightly/runs", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(runs["items"][0]["trigger"], "manual");
    assert_eq!(runs["items"][0]["job_id"], job["id"]);
    assert_eq!(runs["items"][0]["state"], "queued");

    let (s, _) = call(&app, "DELETE", "/api/v1/schedules/nightly", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    for (method, uri) in [
        ("GET", "/api/v1/schedules/nightly"),
        ("DELETE", "/api/v1/schedules/nightly"),
        ("POST", "/api/v1/schedules/nightly/trigger"),
        ("GET", "/api/v1/schedules/nightly/runs"),
    ] {
        let (s, _) = call(&app, method, uri, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {uri}");
    }
    let (s, _) = call(&app, "PATCH", "/api/v1/schedules/nightly", Some(r#"{"enabled":true}"#)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, audit) = call(&app, "GET", "/api/v1/audit", None).await;
    let deletes: Vec<&Value> =
        audit["items"].as_array().unwrap().iter().filter(|a| a["action"] == "schedule.delete").collect();
    assert_eq!(deletes.len(), 1, "the delete, not the one that found nothing: {audit}");
    assert_eq!((&deletes[0]["target"], &deletes[0]["count"]), (&json!("nightly"), &json!(1)));
    env.cleanup().await;
}

#[tokio::test]
async fn bad_schedules_are_422_naming_the_field_and_never_stored() {
    let env = TestEnv::new().await;
    let app = app(&env);
    for (body, field) in [
        (r#"{"name":"a","cron":"every day","job":{"type":"echo"}}"#, "`cron`"),
        (r#"{"name":"a","cron":"61 * * * *","job":{"type":"echo"}}"#, "`cron`"),
        (r#"{"name":"a","cron":"@daily","timezone":"Mars/Base","job":{"type":"echo"}}"#, "`timezone`"),
        (r#"{"name":"a b","cron":"@daily","job":{"type":"echo"}}"#, "`name`"),
        (r#"{"name":"a","cron":"@daily","job":{"type":""}}"#, "`job`"),
        (r#"{"name":"a","cron":"@daily","job":{"type":"echo","colour":1}}"#, "colour"),
        (r#"{"name":"a","cron":"@daily","job":{"type":"echo"},"misfire":"sometimes"}"#, "sometimes"),
        (r#"{"name":"a","cron":"@daily","job":{"type":"echo","payload":"\u0000"}}"#, "U+0000"),
        (
            r#"{"name":"a","cron":"@daily","job":{"type":"echo","tags":["t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t","t"]}}"#,
            "tags",
        ),
    ] {
        let (s, err) = call(&app, "POST", "/api/v1/schedules", Some(body)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {err}");
        assert_error(&err, "invalid_request", field);
    }
    let (s, _) =
        call(&app, "POST", "/api/v1/schedules", Some(r#"{"name":"ok","cron":"@daily","job":{"type":"echo"}}"#)).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, err) = call(&app, "PATCH", "/api/v1/schedules/ok", Some(r#"{"timezone":"Nowhere/Town"}"#)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_error(&err, "invalid_request", "`timezone`");
    let (s, err) =
        call(&app, "PUT", "/api/v1/schedules/ok", Some(r#"{"name":"other","cron":"@daily","job":{"type":"echo"}}"#))
            .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    // Every tick enqueues the template, so its payload is held to the enqueue limit.
    let limit = env.settings().api.payload_limit;
    let big = json!({"name": "big", "cron": "@daily", "job": {"type": "echo", "payload": "x".repeat(limit)}});
    let (s, err) = call(&app, "POST", "/api/v1/schedules", Some(&big.to_string())).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    assert_error(&err, "payload_too_large", "job.payload");
    let patch = json!({"job": {"type": "echo", "payload": "x".repeat(limit)}});
    let (s, _) = call(&app, "PATCH", "/api/v1/schedules/ok", Some(&patch.to_string())).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let (_, list) = call(&app, "GET", "/api/v1/schedules", None).await;
    let names: Vec<&str> = list["items"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ok"]);
    assert_eq!(list["items"][0]["timezone"], "UTC", "the failed patch changed nothing");
    env.cleanup().await;
}

#[tokio::test]
async fn metrics_count_enqueues_by_queue_and_type() {
    let env = TestEnv::new().await;
    jobq_core::ops::prometheus();
    let app = app(&env);
    for _ in 0..3 {
        call(&app, "POST", "/api/v1/jobs", Some(r#"{"type":"report","queue":"metrics-q"}"#)).await;
    }
    // A batch counts each created job once, per queue and type; a duplicate is not counted.
    let batch = r#"{"jobs":[{"type":"report","queue":"metrics-q","unique_key":"u"},{"type":"report","queue":"metrics-q"},
        {"type":"report.csv","queue":"metrics-q"},{"type":"report","queue":"metrics-q","unique_key":"u"}]}"#;
    let (status, out) = call(&app, "POST", "/api/v1/jobs/batch", Some(batch)).await;
    assert_eq!((status, &out["created"], &out["existing"]), (StatusCode::OK, &json!(3), &json!(1)), "{out}");
    let resp = app.clone().oneshot(Request::builder().uri("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    // The exporter lists label sets in no fixed order: each line is found by both labels.
    let count = |kind: &str| {
        let labels = [r#"queue="metrics-q""#.to_owned(), format!(r#"type="{kind}""#)];
        text.lines()
            .find(|l| l.starts_with("jobq_jobs_enqueued_total") && labels.iter().all(|x| l.contains(x.as_str())))
            .and_then(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
    };
    assert_eq!((count("report"), count("report.csv")), (Some(5), Some(1)), "{text}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_asked_for_a_minimal_answer_lists_ids_and_states_only() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let batch = r#"{"jobs":[{"type":"echo","unique_key":"once"},{"type":"echo","delay":"1h"},
        {"type":"echo","unique_key":"once"},{"type":""}]}"#;
    let post = |prefer: &'static str| {
        let req = Request::builder()
            .method("POST")
            .uri("/api/v1/jobs/batch")
            .header("content-type", "application/json")
            .header("prefer", prefer)
            .body(Body::from(batch))
            .unwrap();
        app.clone().oneshot(req)
    };
    let resp = post("respond-async, RETURN = \"minimal\"; x=1").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers().get("preference-applied").and_then(|v| v.to_str().ok()), Some("return=minimal"));
    assert_eq!(resp.headers().get("vary").and_then(|v| v.to_str().ok()), Some("prefer"));
    let out: Value =
        serde_json::from_slice(&axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap()).unwrap();
    assert_eq!((&out["created"], &out["existing"], &out["failed"]), (&json!(2), &json!(1), &json!(1)), "{out}");
    let results = out["results"].as_array().unwrap();
    let first = results[0]["id"].as_str().unwrap();
    assert_eq!(results[0], json!({"index": 0, "status": 201, "id": first, "state": "queued"}));
    assert_eq!(results[1]["state"], "scheduled", "{out}");
    assert_eq!(results[2], json!({"index": 2, "status": 200, "id": first, "state": "queued"}), "the holder");
    assert_eq!((&results[3]["status"], &results[3]["error"]["code"]), (&json!(422), &json!("invalid_request")));
    let (status, job) = call(&app, "GET", &format!("/api/v1/jobs/{first}"), None).await;
    assert_eq!((status, &job["state"]), (StatusCode::OK, &json!("queued")));

    // Any other preference keeps the whole job in each result, and so does a first `return`
    // preference other than minimal.
    let resp = post("return=representation, return=minimal").await.unwrap();
    assert!(resp.headers().get("preference-applied").is_none());
    assert_eq!(resp.headers().get("vary").and_then(|v| v.to_str().ok()), Some("prefer"), "either way");
    let out: Value =
        serde_json::from_slice(&axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap()).unwrap();
    assert_eq!(out["results"][0]["job"]["id"], first, "{out}");
    assert_eq!(out["results"][1]["job"]["type"], "echo", "{out}");
    env.cleanup().await;
}

#[tokio::test]
async fn the_request_trace_context_travels_in_the_job_metadata() {
    let env = TestEnv::new().await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/jobs")
        .header("content-type", "application/json")
        .header("traceparent", tp)
        .body(Body::from(r#"{"type":"echo"}"#))
        .unwrap();
    let resp = app(&env).oneshot(req).await.unwrap();
    let job: Value =
        serde_json::from_slice(&axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap()).unwrap();
    assert_eq!(job["metadata"]["traceparent"], tp);
    let bad = Request::builder()
        .method("POST")
        .uri("/api/v1/jobs")
        .header("content-type", "application/json")
        .header("traceparent", "garbage")
        .body(Body::from(r#"{"type":"echo"}"#))
        .unwrap();
    let resp = app(&env).oneshot(bad).await.unwrap();
    let job: Value =
        serde_json::from_slice(&axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap()).unwrap();
    assert!(job.get("metadata").is_none(), "an invalid traceparent is not carried: {job}");
    env.cleanup().await;
}

#[tokio::test]
async fn dependencies_partition_keys_and_a_batch_callback_through_the_api() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let (status, first) =
        call(&app, "POST", "/api/v1/jobs", Some(r#"{"type":"echo","payload":1,"partition_key":"acme"}"#)).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["partition_key"], "acme");
    let id = first["id"].as_str().unwrap();
    let body = format!(r#"{{"type":"echo","payload":2,"depends_on":["{id}"]}}"#);
    let (status, second) = call(&app, "POST", "/api/v1/jobs", Some(&body)).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_eq!((second["state"].as_str(), second["depends_on"][0].as_str()), (Some("waiting"), Some(id)));
    let missing = format!(r#"{{"type":"echo","payload":3,"depends_on":["{}"]}}"#, uuid::Uuid::now_v7());
    let (status, err) = call(&app, "POST", "/api/v1/jobs", Some(&missing)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_error(&err, "invalid_request", "depends_on");
    let (status, err) =
        call(&app, "POST", "/api/v1/jobs", Some(r#"{"type":"echo","payload":1,"dependency_mode":"sometimes"}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");

    let batch = r#"{"jobs":[{"type":"echo","payload":1,"queue":"reports"},{"type":"echo","payload":2,"queue":"reports"}],
        "on_complete":{"type":"echo","payload":"all done"}}"#;
    let (status, out) = call(&app, "POST", "/api/v1/jobs/batch", Some(batch)).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let callback = &out["on_complete"];
    assert_eq!((callback["state"].as_str(), callback["queue"].as_str()), (Some("waiting"), Some("reports")));
    assert_eq!(callback["dependency_mode"], "finished");
    let ids: Vec<&str> = out["results"].as_array().unwrap().iter().map(|r| r["job"]["id"].as_str().unwrap()).collect();
    let waits: Vec<&str> = callback["depends_on"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(waits, ids);
    let mixed = r#"{"jobs":[{"type":"echo","payload":1,"queue":"a"},{"type":"echo","payload":2,"queue":"b"}],
        "on_complete":{"type":"echo","payload":0}}"#;
    let (status, err) = call(&app, "POST", "/api/v1/jobs/batch", Some(mixed)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_error(&err, "invalid_request", "on_complete");

    // Redis refuses the callback after it took the batch (its unique key's name holds a value
    // of another type): the answer still lists the batch's jobs, and says what became of the
    // callback, so that nobody sends the batch again.
    let lock = env.keys().unique(&"reports".parse().unwrap(), "report-done");
    let _: () = redis::AsyncCommands::hset(&mut env.broker.connection(), &lock, "not", "a string").await.unwrap();
    let batch = r#"{"jobs":[{"type":"echo","payload":1,"queue":"reports"}],
        "on_complete":{"type":"echo","unique_key":"report-done"}}"#;
    let (status, out) = call(&app, "POST", "/api/v1/jobs/batch", Some(batch)).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["created"], 1, "{out}");
    assert!(out.get("on_complete").is_none(), "{out}");
    assert_eq!(out["on_complete_error"]["code"], "unavailable", "{out}");
    let id = out["results"][0]["job"]["id"].as_str().unwrap();
    let (status, _) = call(&app, "GET", &format!("/api/v1/jobs/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    env.cleanup().await;
}

#[tokio::test]
async fn while_redis_is_frozen_requests_that_need_it_fail_fast_and_postgres_routes_still_answer() {
    let redis = jobq_testutil::RedisServer::start();
    let env = TestEnv::with(&[("REDIS_URL", &redis.url()), ("JOBQ_REDIS_TIMEOUT", "500ms")]).await;
    let app = app(&env);
    let enqueue = || call(&app, "POST", "/api/v1/jobs", Some(r#"{"type":"echo"}"#));
    let (_, job) = enqueue().await;
    let schedule = r#"{"name":"nightly","cron":"0 30 2 * * *","job":{"type":"echo"}}"#;
    assert_eq!(call(&app, "POST", "/api/v1/schedules", Some(schedule)).await.0, StatusCode::CREATED);
    assert_eq!(call(&app, "POST", "/api/v1/schedules/nightly/trigger", None).await.0, StatusCode::CREATED);
    redis.signal("STOP");
    let t = std::time::Instant::now();
    let (status, err) = enqueue().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert!(t.elapsed() >= std::time::Duration::from_millis(400), "the first one waits for the timeout");
    // The breaker is open: 20 more answer at once, but for at most one probe per 500 ms.
    let t = std::time::Instant::now();
    let mut slow = 0;
    for _ in 0..20 {
        let one = std::time::Instant::now();
        let (status, err) = enqueue().await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_error(&err, "unavailable", "Redis");
        slow += usize::from(one.elapsed() >= std::time::Duration::from_millis(300));
    }
    assert!(slow <= 1 + t.elapsed().as_millis() as usize / 500, "{slow} of 20 waited for Redis in {:?}", t.elapsed());
    let (status, _) = call(&app, "GET", "/api/v1/dlq", None).await;
    assert_eq!(status, StatusCode::OK, "a Postgres route does not wait for Redis");
    let history = format!("/api/v1/jobs/{}/executions", job["id"].as_str().unwrap());
    let (status, err) = call(&app, "GET", &history, None).await;
    assert_eq!(status, StatusCode::OK, "a job's history is in Postgres: {err}");
    let t = std::time::Instant::now();
    let (status, runs) = call(&app, "GET", "/api/v1/schedules/nightly/runs", None).await;
    assert_eq!((status, runs["items"].as_array().map(Vec::len)), (StatusCode::OK, Some(1)), "{runs}");
    assert!(t.elapsed() < std::time::Duration::from_millis(300), "the open breaker spares the wait");
    // Successes of held routes that never reached Redis do not close the breaker: a DLQ retry
    // by filter (Postgres; the replay runs later) and a batch whose every item is invalid.
    for (path, body) in
        [("/api/v1/dlq/retry", r#"{"dry_run":true}"#), ("/api/v1/jobs/batch", r#"{"jobs":[{"type":""}]}"#)]
    {
        tokio::time::sleep(jobq_api::breaker::PROBE_EVERY + std::time::Duration::from_millis(50)).await;
        let (status, out) = call(&app, "POST", path, Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{path}, let through as the probe: {out}");
        let t = std::time::Instant::now();
        assert_eq!(enqueue().await.0, StatusCode::SERVICE_UNAVAILABLE);
        assert!(t.elapsed() < std::time::Duration::from_millis(300), "still open after {path}: {:?}", t.elapsed());
    }
    redis.signal("CONT");
    let back = std::time::Instant::now();
    jobq_testutil::wait_until(std::time::Duration::from_secs(5), "an enqueue to succeed", || async {
        (enqueue().await.0 == StatusCode::CREATED).then_some(())
    })
    .await;
    assert!(back.elapsed() < std::time::Duration::from_secs(2), "open for {:?} after Redis came back", back.elapsed());
    env.cleanup().await;
}

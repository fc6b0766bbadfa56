//! Auth matrix (every route × every role), rate limits, request ids, random bodies, load.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use jobq_api::auth::hash_key;
use jobq_api::{router, AppState};
use jobq_testutil::TestEnv;
use serde_json::json;
use tower::ServiceExt;

/// Every route the router serves, with the least role it needs (None = open).
pub(crate) const ROUTES: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/health", None),
    ("GET", "/ready", None),
    ("GET", "/metrics", None),
    ("GET", "/api/v1/openapi.json", None),
    ("GET", "/api/v1/docs", None),
    ("GET", "/dashboard", None),
    ("GET", "/dashboard/app.js", None),
    ("GET", "/dashboard/", None),
    ("GET", "/", None),
    ("POST", "/api/v1/jobs", Some("producer")),
    ("GET", "/api/v1/jobs", Some("reader")),
    ("POST", "/api/v1/jobs/batch", Some("producer")),
    ("GET", "/api/v1/jobs/{id}", Some("producer")),
    ("DELETE", "/api/v1/jobs/{id}", Some("admin")),
    ("GET", "/api/v1/jobs/{id}/executions", Some("producer")),
    ("POST", "/api/v1/jobs/{id}/run", Some("admin")),
    ("GET", "/api/v1/queues", Some("reader")),
    ("GET", "/api/v1/queues/{queue}", Some("reader")),
    ("POST", "/api/v1/queues/{queue}/pause", Some("admin")),
    ("POST", "/api/v1/queues/{queue}/resume", Some("admin")),
    ("POST", "/api/v1/queues/{queue}/cancel", Some("admin")),
    ("POST", "/api/v1/queues/{queue}/run", Some("admin")),
    ("GET", "/api/v1/dlq", Some("reader")),
    ("DELETE", "/api/v1/dlq", Some("admin")),
    ("POST", "/api/v1/dlq/retry", Some("admin")),
    ("GET", "/api/v1/dlq/{id}", Some("reader")),
    ("DELETE", "/api/v1/dlq/{id}", Some("admin")),
    ("POST", "/api/v1/dlq/{id}/retry", Some("admin")),
    ("GET", "/api/v1/audit", Some("reader")),
    ("POST", "/api/v1/schedules", Some("admin")),
    ("GET", "/api/v1/schedules", Some("reader")),
    ("GET", "/api/v1/schedules/{name}", Some("reader")),
    ("PUT", "/api/v1/schedules/{name}", Some("admin")),
    ("PATCH", "/api/v1/schedules/{name}", Some("admin")),
    ("DELETE", "/api/v1/schedules/{name}", Some("admin")),
    ("POST", "/api/v1/schedules/{name}/trigger", Some("admin")),
    ("GET", "/api/v1/schedules/{name}/runs", Some("reader")),
];

fn secured(env: &TestEnv, extra: &[(&str, &str)]) -> Router {
    let keys = format!(
        "root:admin:{},ci:producer:{},dash:reader:{}",
        hash_key("k-admin"),
        hash_key("k-producer"),
        hash_key("k-reader")
    );
    let mut vars: Vec<(&str, &str)> = vec![("JOBQ_AUTH", "on"), ("JOBQ_API_KEYS", &keys)];
    vars.extend_from_slice(extra);
    let map: std::collections::HashMap<String, String> =
        env.env().into_iter().chain(vars.iter().map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    let settings = jobq_core::config::load_from(None, |n| map.get(n).cloned()).unwrap();
    router(AppState::new(env.broker.clone(), env.store.clone(), &settings), settings.api.body_limit)
}

fn concrete(path: &str) -> String {
    path.replace("{id}", &uuid::Uuid::now_v7().to_string()).replace("{queue}", "default").replace("{name}", "nightly")
}

async fn status(app: &Router, method: &str, path: &str, key: Option<&str>, bearer: bool) -> StatusCode {
    let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(k) = key {
        req = if bearer { req.header("authorization", format!("Bearer {k}")) } else { req.header("x-api-key", k) };
    }
    app.clone().oneshot(req.body(Body::from("{}")).unwrap()).await.unwrap().status()
}

#[tokio::test]
async fn every_route_answers_401_without_a_key_and_403_for_a_role_below_its_own() {
    let env = TestEnv::new().await;
    let app = secured(&env, &[]);
    for (method, path, needed) in ROUTES {
        let uri = concrete(path);
        let anonymous = status(&app, method, &uri, None, true).await;
        match needed {
            None => assert_ne!(anonymous, StatusCode::UNAUTHORIZED, "{method} {path} is open"),
            Some(_) => assert_eq!(anonymous, StatusCode::UNAUTHORIZED, "{method} {path} without a key"),
        }
        assert!(
            needed.is_none() || status(&app, method, &uri, Some("wrong"), true).await == StatusCode::UNAUTHORIZED,
            "{method} {path} with an unknown key"
        );
        for (role, key) in [("admin", "k-admin"), ("producer", "k-producer"), ("reader", "k-reader")] {
            let got = status(&app, method, &uri, Some(key), role == "reader").await;
            let allowed = match needed {
                None => true,
                Some("producer") => role != "reader" || *method == "GET",
                Some("reader") => role != "producer",
                _ => role == "admin",
            };
            if allowed {
                assert!(
                    got != StatusCode::UNAUTHORIZED && got != StatusCode::FORBIDDEN,
                    "{role} on {method} {path}: {got}"
                );
            } else {
                assert_eq!(got, StatusCode::FORBIDDEN, "{role} on {method} {path}");
            }
            assert!(got.as_u16() < 500 || got == StatusCode::SERVICE_UNAVAILABLE, "{role} on {method} {path}: {got}");
        }
    }
    env.cleanup().await;
}

#[tokio::test]
async fn every_api_route_refuses_a_query_parameter_it_does_not_take() {
    let env = TestEnv::new().await;
    let app = secured(&env, &[]);
    let mut refused = 0;
    for (method, path, needed) in ROUTES {
        if needed.is_none() {
            continue;
        }
        let uri = format!("{}?colour=red&limit=1", concrete(path));
        let req = Request::builder()
            .method(*method)
            .uri(&uri)
            .header("content-type", "application/json")
            .header("x-api-key", "k-admin")
            .body(Body::from("{}"))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {uri}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{method} {uri}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("colour"), "{method} {uri} names the parameter: {message}");
        refused += 1;
    }
    assert_eq!(refused, 28, "every authenticated route was tried");
    // A bare `?` carries no parameter.
    let req = Request::builder().uri("/api/v1/queues?").header("x-api-key", "k-reader").body(Body::empty()).unwrap();
    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::OK);
    env.cleanup().await;
}

#[tokio::test]
async fn a_producer_reads_only_the_jobs_its_key_enqueued() {
    let env = TestEnv::new().await;
    let app = secured(&env, &[]);
    let post = |key: &'static str| {
        let app = app.clone();
        async move {
            let req = Request::builder()
                .method("POST")
                .uri("/api/v1/jobs")
                .header("content-type", "application/json")
                .header("x-api-key", key)
                .body(Body::from(r#"{"type":"echo"}"#))
                .unwrap();
            let resp = app.oneshot(req).await.unwrap();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["id"].as_str().unwrap().to_owned()
        }
    };
    let mine = post("k-producer").await;
    let theirs = post("k-admin").await;
    assert_eq!(status(&app, "GET", &format!("/api/v1/jobs/{mine}"), Some("k-producer"), false).await, StatusCode::OK);
    assert_eq!(
        status(&app, "GET", &format!("/api/v1/jobs/{theirs}"), Some("k-producer"), false).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(status(&app, "GET", &format!("/api/v1/jobs/{theirs}"), Some("k-reader"), false).await, StatusCode::OK);

    // A unique key held by a job of another key: 409, and that job is not shown.
    let send = |key: &'static str, path: &'static str, body: &'static str| {
        let app = app.clone();
        async move {
            let req = Request::builder()
                .method("POST")
                .uri(path)
                .header("content-type", "application/json")
                .header("x-api-key", key)
                .body(Body::from(body))
                .unwrap();
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
            (status, serde_json::from_slice::<serde_json::Value>(&bytes).unwrap())
        }
    };
    let one = r#"{"type":"echo","payload":{"secret":1},"unique_key":"shared"}"#;
    let (s, held) = send("k-admin", "/api/v1/jobs", one).await;
    assert_eq!(s, StatusCode::CREATED, "{held}");
    let (s, err) = send("k-producer", "/api/v1/jobs", one).await;
    assert_eq!(s, StatusCode::CONFLICT, "{err}");
    assert!(!err.to_string().contains("secret") && !err.to_string().contains(held["id"].as_str().unwrap()), "{err}");
    let batch = r#"{"jobs":[{"type":"echo","unique_key":"shared"},{"type":"echo","unique_key":"mine"}]}"#;
    let (s, r) = send("k-producer", "/api/v1/jobs/batch", batch).await;
    assert_eq!(
        (s, r["results"][0]["status"].as_u64(), r["results"][1]["status"].as_u64()),
        (StatusCode::OK, Some(409), Some(201)),
        "{r}"
    );
    assert!(!r.to_string().contains(held["id"].as_str().unwrap()), "{r}");
    // Nor as a batch's on_complete callback: the batch is enqueued, the callback refused.
    let callback = r#"{"jobs":[{"type":"echo"}],"on_complete":{"type":"echo","unique_key":"shared"}}"#;
    let (s, cb) = send("k-producer", "/api/v1/jobs/batch", callback).await;
    assert_eq!(
        (s, cb["created"].as_u64(), cb["on_complete_error"]["code"].as_str()),
        (StatusCode::OK, Some(1), Some("conflict")),
        "{cb}"
    );
    assert!(cb.get("on_complete").is_none(), "{cb}");
    assert!(!cb.to_string().contains("secret") && !cb.to_string().contains(held["id"].as_str().unwrap()), "{cb}");
    // Nor in the callback's dependencies, when an item of the batch names the held key: the
    // callback waits for the producer's own jobs only.
    let callback = r#"{"jobs":[{"type":"echo","unique_key":"shared"},{"type":"echo"}],"on_complete":{"type":"echo"}}"#;
    let (s, cb) = send("k-producer", "/api/v1/jobs/batch", callback).await;
    assert_eq!((s, cb["results"][0]["status"].as_u64()), (StatusCode::OK, Some(409)), "{cb}");
    assert_eq!(cb["on_complete"]["depends_on"], json!([cb["results"][1]["job"]["id"]]), "{cb}");
    assert!(!cb.to_string().contains(held["id"].as_str().unwrap()), "{cb}");
    let (s, again) = send("k-producer", "/api/v1/jobs", r#"{"type":"echo","unique_key":"mine"}"#).await;
    assert_eq!((s, &again["id"]), (StatusCode::OK, &r["results"][1]["job"]["id"]), "its own key's job: {again}");
    let (s, same) = send("k-admin", "/api/v1/jobs", one).await;
    assert_eq!((s, &same["id"]), (StatusCode::OK, &held["id"]), "an admin sees every job: {same}");
    env.cleanup().await;
}

#[tokio::test]
async fn over_the_rate_limit_a_key_gets_429_with_retry_after_and_requests_carry_an_id() {
    let env = TestEnv::new().await;
    let app = secured(&env, &[("JOBQ_API_RATE_LIMIT", "1"), ("JOBQ_API_RATE_BURST", "3")]);
    let get = |id: Option<&'static str>| {
        let app = app.clone();
        async move {
            let mut req = Request::builder().uri("/api/v1/queues").header("x-api-key", "k-reader");
            if let Some(id) = id {
                req = req.header("x-request-id", id);
            }
            app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap()
        }
    };
    let first = get(Some("req-123")).await;
    assert_eq!(first.headers().get("x-request-id").unwrap(), "req-123", "a given request id is echoed");
    let second = get(None).await;
    assert!(!second.headers().get("x-request-id").unwrap().is_empty(), "one is made up otherwise");
    get(None).await;
    let limited = get(None).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers().get("retry-after").unwrap(), "1");
    env.cleanup().await;
}

/// Random bytes and random JSON at the enqueue endpoints: never a 5xx, and a rejected request
/// changes nothing. (Cases come from proptest strategies, run on this test's runtime.)
#[tokio::test]
async fn a_json_body_must_be_an_object_not_an_array_of_its_fields() {
    // serde builds a struct from an array of its fields in order: `[null, null]` would pass for
    // a body of optional fields (the queue cancel's count, a DLQ retry by filter).
    let env = TestEnv::new().await;
    let app = crate::app(&env);
    for (method, path) in [
        ("POST", "/api/v1/jobs"),
        ("POST", "/api/v1/jobs/batch"),
        ("POST", "/api/v1/queues/default/cancel"),
        ("POST", "/api/v1/queues/default/run"),
        ("POST", "/api/v1/dlq/retry"),
        ("POST", "/api/v1/schedules"),
        ("PUT", "/api/v1/schedules/nightly"),
        ("PATCH", "/api/v1/schedules/nightly"),
    ] {
        for body in ["[null, null]", "[]", r#"["echo"]"#, "null", "7"] {
            let (status, err) = crate::call(&app, method, path, Some(body)).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{method} {path} {body}: {err}");
            let message = err["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("a JSON object"), "{method} {path} {body}: {message}");
        }
    }
    assert!(env.broker.queues().await.unwrap().is_empty(), "nothing was enqueued");
    env.cleanup().await;
}

#[tokio::test]
async fn random_bodies_never_cause_a_5xx_or_a_state_change() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    let env = TestEnv::new().await;
    let app = crate::app(&env);
    let cases = (proptest::collection::vec(any::<u8>(), 0..300), random_json(), any::<bool>());
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut rejected = 0;
    for _ in 0..300 {
        let (bytes, json, batch) = cases.new_tree(&mut runner).unwrap().current();
        let uri = if batch { "/api/v1/jobs/batch" } else { "/api/v1/jobs" };
        for body in [bytes, json.to_string().into_bytes()] {
            let before = env.broker.queues().await.unwrap();
            let req = Request::builder()
                .method("POST")
                .uri(uri)
                .header("content-type", "application/json")
                .body(Body::from(body.clone()))
                .unwrap();
            let status = app.clone().oneshot(req).await.unwrap().status();
            assert!(status.as_u16() < 500, "{uri} {:?}: {status}", String::from_utf8_lossy(&body));
            if status.is_client_error() {
                rejected += 1;
                assert_eq!(env.broker.queues().await.unwrap(), before, "a rejected request enqueued nothing");
            }
        }
    }
    assert!(rejected > 300, "most random bodies are rejected ({rejected})");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    for uri in ["/api/v1/jobs", "/api/v1/jobs/batch"] {
        let req = Request::builder()
            .method("POST")
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(deep.clone()))
            .unwrap();
        let status = app.clone().oneshot(req).await.unwrap().status();
        assert!(status.is_client_error(), "JSON nested 10,000 deep: {status}");
    }
    env.cleanup().await;
}

/// JSON values shaped like (and unlike) enqueue requests.
fn random_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("type".to_owned()),
                    Just("payload".to_owned()),
                    Just("queue".to_owned()),
                    Just("jobs".to_owned()),
                    Just("delay".to_owned()),
                    Just("priority".to_owned()),
                    ".{0,8}".prop_map(|s| s)
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_enqueues_all_exist() {
    let env = TestEnv::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let token = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(jobq_api::serve(env.settings(), listener, token.clone()));
    let api = jobq_testutil::Api::new(port);
    api.wait_ready(std::time::Duration::from_secs(10)).await;
    let started = std::time::Instant::now();
    let client = reqwest::Client::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..10_000 {
        let (client, sem, url) = (client.clone(), sem.clone(), format!("{}/api/v1/jobs", api.base));
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let t = std::time::Instant::now();
            let r = client.post(url).json(&json!({"type": "echo", "payload": {"i": i}})).send().await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, body["id"].as_str().map(str::to_owned), t.elapsed())
        }));
    }
    let mut ids = Vec::new();
    let mut latencies = Vec::new();
    for t in tasks {
        let (status, id, took) = t.await.unwrap();
        assert_eq!(status, 201);
        ids.push(id.unwrap().parse::<jobq_core::job::JobId>().unwrap());
        latencies.push(took);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let q = jobq_core::job::QueueName::default_queue();
    let states = env.broker.states(&ids.iter().map(|id| (q.clone(), *id)).collect::<Vec<_>>()).await.unwrap();
    assert!(states.iter().all(Option::is_some), "every accepted job exists in Redis");
    eprintln!(
        "load figures: 10000 enqueues, concurrency 64, {:.0} req/s, p50 {:?}, p99 {:?}",
        10_000.0 / elapsed.as_secs_f64(),
        latencies[5000],
        latencies[9900]
    );
    token.cancel();
    server.await.unwrap().unwrap();
    env.cleanup().await;
}

/// Sends `method path` as a browser would, with `headers`; returns the status.
async fn from_browser(app: &Router, method: &str, path: &str, headers: &[(&str, &str)]) -> StatusCode {
    let mut req = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap().status()
}

#[tokio::test]
async fn a_page_of_another_site_cannot_act_through_the_browser_and_with_auth_off_needs_a_local_host() {
    let env = TestEnv::new().await;
    let open = crate::app(&env);
    let pause = "/api/v1/queues/default/pause";
    let local = ("host", "127.0.0.1:8080");
    // A form posted from another site (CSRF): refused with auth off, where nothing else stops it.
    for other_site in [
        [local, ("origin", "http://evil.example")],
        [local, ("sec-fetch-site", "cross-site")],
        [local, ("origin", "null")],
        [("host", "localhost:8080"), ("origin", "http://localhost:3000")],
    ] {
        assert_eq!(from_browser(&open, "POST", pause, &other_site).await, StatusCode::FORBIDDEN, "{other_site:?}");
    }
    assert!(!env.broker.is_paused(&jobq_core::job::QueueName::default_queue()).await.unwrap(), "nothing paused");
    // The dashboard on its own origin, and clients that are not browsers, act as before.
    let same = [local, ("origin", "http://127.0.0.1:8080"), ("sec-fetch-site", "same-origin")];
    assert_eq!(from_browser(&open, "POST", pause, &same).await, StatusCode::OK);
    assert_eq!(from_browser(&open, "POST", "/api/v1/queues/default/resume", &[local]).await, StatusCode::OK);
    assert_eq!(from_browser(&open, "POST", pause, &[("host", "jobq-api.internal:8080")]).await, StatusCode::OK);
    // Behind a proxy that rewrote Host, the browser's Sec-Fetch-Site decides; without it, the
    // Origin is compared whatever its case and default port.
    let proxied = [local, ("origin", "https://jobq.example.com"), ("sec-fetch-site", "same-origin")];
    assert_eq!(from_browser(&open, "POST", "/api/v1/queues/default/resume", &proxied).await, StatusCode::OK);
    let old_browser = [("host", "localhost"), ("origin", "HTTP://LOCALHOST:80")];
    assert_eq!(from_browser(&open, "POST", "/api/v1/queues/default/resume", &old_browser).await, StatusCode::OK);
    // With auth off, a browser reaching the API by a host name (DNS rebinding: the page's own
    // origin) is refused, reads included; by localhost or an IP address it is served.
    let rebound = [("host", "evil.example:8080"), ("sec-fetch-site", "same-origin")];
    assert_eq!(from_browser(&open, "GET", "/api/v1/queues", &rebound).await, StatusCode::FORBIDDEN);
    for host in ["localhost:8080", "127.0.0.1:8080", "[::1]:8080", "10.1.2.3"] {
        let ok = [("host", host), ("sec-fetch-site", "same-origin")];
        assert_eq!(from_browser(&open, "GET", "/api/v1/queues", &ok).await, StatusCode::OK, "{host}");
    }
    // With auth on, a key does not make a cross-site request acceptable; a host name is fine.
    let secured = secured(&env, &[]);
    let keyed = [("host", "jobq.example.com"), ("x-api-key", "k-admin"), ("origin", "http://evil.example")];
    assert_eq!(from_browser(&secured, "POST", pause, &keyed).await, StatusCode::FORBIDDEN);
    let keyed = [("host", "jobq.example.com"), ("x-api-key", "k-admin"), ("sec-fetch-site", "same-origin")];
    assert_eq!(from_browser(&secured, "GET", "/api/v1/queues", &keyed).await, StatusCode::OK);
    env.cleanup().await;
}

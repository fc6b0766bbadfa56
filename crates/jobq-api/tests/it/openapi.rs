//! The OpenAPI document covers every route the router serves, and the reference page is
//! self-contained.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use jobq_testutil::TestEnv;

use crate::security::ROUTES;
use crate::{app, call};

/// (METHOD, path) of every `.route(...)` call in the route modules' source.
fn registered_routes() -> BTreeSet<(String, String)> {
    let sources = [
        include_str!("../../src/routes/jobs.rs"),
        include_str!("../../src/routes/queues.rs"),
        include_str!("../../src/routes/dlq.rs"),
        include_str!("../../src/routes/schedules.rs"),
        include_str!("../../src/routes/health.rs"),
        include_str!("../../src/openapi.rs"),
        include_str!("../../src/dashboard.rs"),
    ];
    let mut out = BTreeSet::new();
    for src in sources {
        for part in src.split(".route(\"").skip(1) {
            let (path, rest) = part.split_once('"').unwrap();
            let handlers = &rest[..rest.find(")\n").unwrap_or(rest.len())];
            for m in ["get", "post", "put", "patch", "delete"] {
                if handlers.contains(&format!("{m}(")) {
                    out.insert((m.to_uppercase(), path.to_owned()));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn the_document_covers_every_served_route_and_is_openapi_3_1() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let (s, doc) = call(&app, "GET", "/api/v1/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let registered = registered_routes();
    assert!(registered.len() >= 31, "found the route calls: {registered:?}");
    assert_eq!(documented, registered, "every served route is documented, and nothing else");
    let table: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p, _)| (m.to_string(), p.to_string())).collect();
    assert_eq!(table, registered, "the auth matrix test covers every route");
    for name in ["JobInfo", "EnqueueRequest", "ScheduleSpec", "ApiErrorBody", "DeadJob", "Backoff", "BatchAnswer"] {
        assert!(doc["components"]["schemas"].get(name).is_some(), "schema {name}");
    }
    // The batch answer's shapes: the whole job, the brief one `Prefer: return=minimal` asks
    // for, and an item's error; and the headers that go with them.
    let item = &doc["components"]["schemas"]["BatchItem"];
    let shapes: BTreeSet<String> = item["oneOf"]
        .as_array()
        .unwrap_or_else(|| panic!("BatchItem: {item}"))
        .iter()
        .map(|s| {
            let mut keys: Vec<&str> = s["properties"].as_object().unwrap().keys().map(String::as_str).collect();
            keys.sort();
            keys.join(",")
        })
        .collect();
    let expected = ["id,index,state,status", "error,index,status", "index,job,status"];
    assert_eq!(shapes, expected.iter().map(|s| s.to_string()).collect(), "{item}");
    let answer = &doc["paths"]["/api/v1/jobs/batch"]["post"]["responses"]["200"];
    for h in ["Preference-Applied", "Vary"] {
        assert!(answer["headers"].get(h).is_some(), "{h}: {answer}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn the_reference_page_needs_nothing_from_elsewhere() {
    let env = TestEnv::new().await;
    let resp = tower::ServiceExt::oneshot(
        app(&env),
        axum::http::Request::builder().uri("/api/v1/docs").body(axum::body::Body::empty()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let html = String::from_utf8(axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    assert!(html.contains("/api/v1/openapi.json"));
    assert!(!html.contains("http://") && !html.contains("https://"), "no external resources");
    env.cleanup().await;
}

async fn get_text(app: &axum::Router, uri: &str) -> (StatusCode, axum::http::HeaderMap, String) {
    let req = axum::http::Request::builder().uri(uri).body(axum::body::Body::empty()).unwrap();
    let resp = tower::ServiceExt::oneshot(app.clone(), req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn the_dashboard_is_self_contained_and_calls_only_documented_routes() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let (s, headers, html) = get_text(&app, "/dashboard").await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'") && policy.contains("connect-src 'self'"), "{policy}");
    assert!(html.contains(r#"<script src="/dashboard/app.js">"#));
    assert!(!html.contains("http://") && !html.contains("https://"), "no external resources");
    for tab in ["tab-queues", "tab-jobs", "tab-dlq", "tab-schedules"] {
        assert!(html.contains(tab), "{tab}");
    }
    // The address with a trailing slash, and the server's root, lead to the page.
    for uri in ["/dashboard/", "/"] {
        let (s, headers, _) = get_text(&app, uri).await;
        assert_eq!(s, StatusCode::PERMANENT_REDIRECT, "{uri}");
        assert_eq!(headers["location"], "/dashboard", "{uri}");
    }

    let (s, headers, js) = get_text(&app, "/dashboard/app.js").await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/javascript"));
    assert!(!js.contains("innerHTML"), "values from the API go in as text");
    // Every `call('METHOD', '/api/v1/...')` of the script names a documented operation.
    let (_, doc) = call(&app, "GET", "/api/v1/openapi.json", None).await;
    let mut called = BTreeSet::new();
    for part in js.split("call('").skip(1) {
        let Some((method, rest)) = part.split_once("', '") else { continue };
        let path = &rest[..rest.find('\'').unwrap()];
        assert!(
            doc["paths"][path].get(method.to_lowercase()).is_some(),
            "the dashboard calls {method} {path}, which the API does not serve"
        );
        called.insert((method.to_owned(), path.to_owned()));
    }
    for (method, path) in [
        ("GET", "/api/v1/queues"),
        ("POST", "/api/v1/queues/{queue}/pause"),
        ("POST", "/api/v1/queues/{queue}/resume"),
        ("POST", "/api/v1/queues/{queue}/cancel"),
        ("POST", "/api/v1/queues/{queue}/run"),
        ("GET", "/api/v1/jobs/{id}/executions"),
        ("DELETE", "/api/v1/jobs/{id}"),
        ("POST", "/api/v1/jobs/{id}/run"),
        ("GET", "/api/v1/dlq"),
        ("POST", "/api/v1/dlq/{id}/retry"),
        ("POST", "/api/v1/dlq/retry"),
        ("DELETE", "/api/v1/dlq/{id}"),
        ("POST", "/api/v1/schedules/{name}/trigger"),
        ("PATCH", "/api/v1/schedules/{name}"),
    ] {
        assert!(called.contains(&(method.to_owned(), path.to_owned())), "the dashboard offers {method} {path}");
    }
    // The script parses, where Node.js is installed (it is on the project's machines).
    if let Ok(node) = which_node() {
        let file = std::env::temp_dir().join(format!("jobq-dashboard-{}.js", uuid::Uuid::new_v4()));
        std::fs::write(&file, &js).unwrap();
        let out = std::process::Command::new(node).arg("--check").arg(&file).output().unwrap();
        std::fs::remove_file(&file).ok();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    env.cleanup().await;
}

fn which_node() -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path).map(|d| d.join("node")).find(|p| p.is_file()).ok_or(())
}

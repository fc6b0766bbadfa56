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
    assert!(registered.len() >= 29, "found the route calls: {registered:?}");
    assert_eq!(documented, registered, "every served route is documented, and nothing else");
    let table: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p, _)| (m.to_string(), p.to_string())).collect();
    assert_eq!(table, registered, "the auth matrix test covers every route");
    for name in ["JobInfo", "EnqueueRequest", "ScheduleSpec", "ApiErrorBody", "DeadJob", "Backoff"] {
        assert!(doc["components"]["schemas"].get(name).is_some(), "schema {name}");
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

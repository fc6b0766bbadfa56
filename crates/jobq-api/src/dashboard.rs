//! The web dashboard (`GET /dashboard`): queues with their depth per priority, pause and resume;
//! jobs by id or filter with their attempts, and cancel; the dead-letter queue with filters,
//! retry, retry by filter and delete; schedules with their next fire times, trigger, enable and
//! disable. A static page and script compiled into the binary: it holds no data and needs no
//! key, and everything it shows it reads through the REST API with the key typed into it.

use axum::http::header;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use axum::Router;

use crate::AppState;

/// What the page may load: its own script, inline styles, and calls to this server.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; \
                      base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /dashboard` and its script; `/dashboard/` and the server's root lead to the page.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/", get(to_page))
        .route("/", get(root))
}

/// To the dashboard page, from its address with a trailing slash and from the server's root.
#[utoipa::path(get, path = "/dashboard/", tag = "health", responses((status = 308, description = "to /dashboard", headers(("location" = String)))))]
pub(crate) async fn to_page() -> Redirect {
    Redirect::permanent("/dashboard")
}

/// The server's root: to the dashboard page.
#[utoipa::path(get, path = "/", tag = "health", responses((status = 308, description = "to /dashboard", headers(("location" = String)))))]
pub(crate) async fn root() -> Redirect {
    to_page().await
}

/// The dashboard page.
#[utoipa::path(get, path = "/dashboard", tag = "health", responses((status = 200, description = "HTML", content_type = "text/html")))]
pub(crate) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        include_str!("dashboard/index.html"),
    )
}

/// The dashboard's script.
#[utoipa::path(get, path = "/dashboard/app.js", tag = "health", responses((status = 200, description = "JavaScript", content_type = "text/javascript")))]
pub(crate) async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
        include_str!("dashboard/app.js"),
    )
}

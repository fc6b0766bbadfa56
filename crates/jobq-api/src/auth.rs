//! API keys with roles.
//!
//! Keys are configured as SHA-256 hashes (never in clear), sent as `Authorization: Bearer <key>`
//! or `X-API-Key: <key>`, and compared in constant time against every configured hash. Roles:
//!
//! | role | may |
//! |---|---|
//! | `admin` | everything |
//! | `producer` | enqueue (`POST /api/v1/jobs`, `/jobs/batch`) and read the jobs it enqueued |
//! | `reader` | every `GET` |
//!
//! `/health`, `/ready`, the OpenAPI document and the dashboard page (which shows only what its
//! key may read; `/` and `/dashboard/` redirect to it) need no key. `JOBQ_AUTH=off` turns checks
//! off (the server warns at start); `jobq dev` does so.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jobq_core::config::{ApiKey, Role};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

/// Who is calling, as handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's name (`anonymous` when auth is off).
    pub name: String,
    /// Its role.
    pub role: Role,
}

impl Principal {
    /// The caller when auth is off.
    pub fn anonymous() -> Self {
        Self { name: "anonymous".into(), role: Role::Admin }
    }
}

/// Hex SHA-256 of a key, as `api.keys` stores it (`jobq api-key` prints one).
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The configured key matching `presented`, comparing against every hash in constant time.
fn find<'a>(keys: &'a [ApiKey], presented: &str) -> Option<&'a ApiKey> {
    let digest = hash_key(presented);
    let mut found = None;
    for k in keys {
        if bool::from(k.sha256.as_bytes().ct_eq(digest.as_bytes())) {
            found = Some(k);
        }
    }
    found
}

/// The least role a route needs; `None` for open routes.
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    match path {
        "/health"
        | "/ready"
        | "/metrics"
        | "/api/v1/openapi.json"
        | "/api/v1/docs"
        | "/dashboard"
        | "/dashboard/"
        | "/"
        | "/dashboard/app.js" => None,
        "/api/v1/jobs" | "/api/v1/jobs/batch" if method == Method::POST => Some(Role::Producer),
        "/api/v1/jobs/{id}" | "/api/v1/jobs/{id}/executions" if method == Method::GET || method == Method::HEAD => {
            Some(Role::Producer)
        }
        _ if method == Method::GET || method == Method::HEAD => Some(Role::Reader),
        _ => Some(Role::Admin),
    }
}

/// Whether `role` may call `method` on a route that needs `needed`. A reader may read what a
/// producer may (`GET /api/v1/jobs/{id}`), but never write (enqueue).
pub fn allows(role: Role, needed: Role, method: &Method) -> bool {
    match needed {
        Role::Admin => role == Role::Admin,
        Role::Reader => matches!(role, Role::Admin | Role::Reader),
        Role::Producer => role != Role::Reader || *method == Method::GET || *method == Method::HEAD,
    }
}

fn presented_key(req: &Request) -> Option<String> {
    let h = req.headers();
    if let Some(v) = h.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_owned());
    }
    let auth = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim().to_owned())
}

/// Route middleware: authenticates, authorizes by route, rate-limits, and puts the
/// [`Principal`] in the request's extensions.
pub async fn authorize(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let Some(needed) = required_role(req.method(), &path) else { return next.run(req).await };
    let principal = if state.auth.enabled {
        let Some(key) = presented_key(&req) else {
            return ApiError::Unauthorized(
                "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key`".into(),
            )
            .into_response();
        };
        let Some(found) = find(&state.auth.keys, &key) else {
            return ApiError::Unauthorized("unknown API key".into()).into_response();
        };
        if !allows(found.role, needed, req.method()) {
            return ApiError::Forbidden(format!(
                "the `{}` role may not {} {path}; it needs `{}`",
                found.role.as_str(),
                req.method(),
                needed.as_str()
            ))
            .into_response();
        }
        Principal { name: found.name.clone(), role: found.role }
    } else {
        Principal::anonymous()
    };
    if let Err(retry_after) = state.limiter.check(&principal.name) {
        return ApiError::RateLimited(retry_after).into_response();
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_by_hash_only() {
        let keys = vec![
            ApiKey { name: "a".into(), role: Role::Reader, sha256: hash_key("secret-a") },
            ApiKey { name: "b".into(), role: Role::Admin, sha256: hash_key("secret-b") },
        ];
        assert_eq!(find(&keys, "secret-b").map(|k| k.name.as_str()), Some("b"));
        assert!(find(&keys, "secret-c").is_none());
        assert!(find(&keys, &hash_key("secret-a")).is_none(), "the hash itself is not a key");
        assert_eq!(hash_key("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn roles_follow_the_table() {
        let post = Method::POST;
        let get = Method::GET;
        assert_eq!(required_role(&get, "/health"), None);
        assert_eq!(required_role(&post, "/api/v1/jobs"), Some(Role::Producer));
        assert_eq!(required_role(&get, "/api/v1/jobs/{id}"), Some(Role::Producer));
        assert_eq!(required_role(&Method::HEAD, "/api/v1/jobs/{id}"), Some(Role::Producer), "as GET");
        assert_eq!(required_role(&get, "/api/v1/dlq"), Some(Role::Reader));
        assert_eq!(required_role(&Method::DELETE, "/api/v1/jobs/{id}"), Some(Role::Admin));
        assert!(allows(Role::Admin, Role::Reader, &get) && allows(Role::Reader, Role::Producer, &get));
        assert!(!allows(Role::Producer, Role::Reader, &get) && !allows(Role::Reader, Role::Admin, &get));
        assert!(allows(Role::Producer, Role::Producer, &post) && !allows(Role::Reader, Role::Producer, &post));
    }
}

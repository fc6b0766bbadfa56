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
//!
//! Browsers are held to their own origin on the key-checked routes: a request that changes
//! something and comes from another site (`Sec-Fetch-Site`, or an `Origin` other than the
//! `Host`) is refused, so that a page elsewhere cannot pause a queue or retry a job through a
//! form (with auth off, nothing else would stop it). With auth off, a browser must also reach
//! the API by `localhost` or an IP address: a page whose own host name is made to resolve to
//! the API's address (DNS rebinding) is its own origin. Clients other than browsers send
//! neither header and are not affected.

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
    if let Some(why) = browser_refusal(&req, state.auth.enabled) {
        return ApiError::Forbidden(why).into_response();
    }
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

/// Why a browser's request is refused (see the module docs), if it is.
fn browser_refusal(req: &Request, auth_enabled: bool) -> Option<String> {
    let h = req.headers();
    let text = |name| h.get(name).and_then(|v: &header::HeaderValue| v.to_str().ok());
    let (fetch_site, origin) = (text("sec-fetch-site"), text(header::ORIGIN.as_str()));
    let host = text(header::HOST.as_str()).unwrap_or("");
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let other_site = match fetch_site {
            // The browser's own judgement, made before a proxy in front may rewrite `Host`.
            Some(site) => !matches!(site, "same-origin" | "none"),
            None => origin.is_some_and(|o| !same_origin(o, host)),
        };
        if other_site {
            return Some(format!(
                "a browser request from another site ({}) may not {} this API",
                origin.unwrap_or("Sec-Fetch-Site: cross-site"),
                req.method()
            ));
        }
    }
    if !auth_enabled && (fetch_site.is_some() || origin.is_some()) && !local_host(host) {
        return Some(format!(
            "with JOBQ_AUTH=off, a browser must reach this API by localhost or an IP address, not `{host}`: turn auth on to serve it under a host name"
        ));
    }
    None
}

/// Whether `origin` (`scheme://host[:port]`) names `host` (a `Host` header), whatever the case
/// and whether the scheme's default port is written.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else { return false };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => "",
    };
    let plain = |h: &str| {
        let h = h.to_ascii_lowercase();
        match h.strip_suffix(default_port) {
            Some(bare) if !default_port.is_empty() => bare.to_owned(),
            _ => h,
        }
    };
    plain(rest) == plain(host)
}

/// `localhost` (or a name under it) or an IP address, with or without a port.
fn local_host(host: &str) -> bool {
    if host.starts_with('[') {
        return true; // an IPv6 literal
    }
    let name = host.rsplit_once(':').map_or(host, |(n, _)| n);
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name.parse::<std::net::Ipv4Addr>().is_ok()
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

//! Extractors whose rejections use the API's error shape.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::error::ApiError;

/// `Json<T>` whose errors are [`ApiError`]s (400 syntax, 422 data, 413 size, 415 type).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Ok(Self(axum::Json::<Object<T>>::from_request(req, state).await?.0 .0))
    }
}

/// A `T` read from a JSON object only: serde also builds a struct from an array of its fields
/// in order, so that `[null, null]` would pass for a body of two optional fields.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(PhantomData)).map(Object)
    }
}

/// A `T` read from one JSON object (an item of a batch, a body read by hand): 400 for JSON that
/// does not parse, 422 for anything but an object or an object that is not a `T`.
pub fn object<'de, T: Deserialize<'de>>(json: &'de str) -> Result<T, serde_json::Error> {
    serde_json::from_str::<Object<T>>(json).map(|o| o.0)
}

/// The [`ApiError`] of a JSON body that [`object`] refused, `what` naming it in the message.
pub fn body_error(what: &str, e: serde_json::Error) -> ApiError {
    match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::BadRequest(format!("{what} is not valid JSON: {e}"))
        }
        _ => ApiError::Invalid(format!("{what}: {e}")),
    }
}

/// `Query<T>` whose errors are [`ApiError`]s.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Ok(Self(axum::extract::Query::<T>::from_request_parts(parts, state).await?.0))
    }
}

/// Refuses a query string on a route that takes no query parameters (400 naming the first
/// parameter), as the routes that take some refuse unknown ones; an empty `?` is accepted.
pub struct NoQuery;

impl<S: Send + Sync> FromRequestParts<S> for NoQuery {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let Some(query) = parts.uri.query().filter(|q| !q.is_empty()) else { return Ok(Self) };
        let first = query.split('&').find(|p| !p.is_empty()).unwrap_or(query);
        let name: String = first.split('=').next().unwrap_or(first).chars().take(64).collect();
        Err(ApiError::BadRequest(format!("unknown query parameter `{name}`: this route takes no query parameters")))
    }
}

/// `Path<T>` whose errors are [`ApiError`]s (a segment that is not UTF-8 is a JSON 400 too).
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Ok(Self(axum::extract::Path::<T>::from_request_parts(parts, state).await?.0))
    }
}

/// Parses a job id path segment; a malformed one is a 400 naming it.
pub fn job_id(raw: &str) -> Result<jobq_core::job::JobId, ApiError> {
    raw.parse().map_err(|_| ApiError::BadRequest(format!("invalid job id `{raw}`: expected a UUID")))
}

//! Extractors: authentication and JSON/query parsing whose rejections are our JSON errors.

use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use burrow_store::User;
use burrow_types::codes;
use serde::de::DeserializeOwned;

use super::error::HttpError;
use super::AppState;
use crate::auth::hash_key;

/// The authenticated user behind a request: `Authorization: Bearer <key>` or `X-API-Key: <key>`.
pub struct Caller(pub User);

impl FromRequestParts<AppState> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let key = header("authorization")
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .or_else(|| header("x-api-key"))
            .map(str::trim);
        let unauthorized =
            |m: &str| HttpError::new(StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED, m);
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Err(unauthorized(
                "missing API key: send `Authorization: Bearer <key>`",
            ));
        };
        match state.control.store().user_by_key_hash(&hash_key(key)) {
            Ok(Some(user)) => Ok(Caller(user)),
            Ok(None) => Err(unauthorized("invalid API key")),
            Err(e) => Err(HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::UNAVAILABLE,
                e.to_string(),
            )),
        }
    }
}

/// `Json<T>` whose rejections (bad JSON, wrong types, too large, wrong content type) are JSON errors.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Ok(ApiJson(Json::<T>::from_request(req, state).await?.0))
    }
}

/// `Query<T>` with JSON rejections.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Query decoding replaces invalid UTF-8 with U+FFFD; a path must never silently become
        // another path, so such a query is refused (attack F6 in docs/threat-model.md).
        let raw = parts.uri.query().unwrap_or_default();
        for pair in raw.split('&') {
            let value = pair
                .split_once('=')
                .map_or(pair, |(_, v)| v)
                .replace('+', " ");
            if percent_encoding::percent_decode_str(&value)
                .decode_utf8()
                .is_err()
            {
                return Err(HttpError::bad_request(
                    "a query parameter is not valid UTF-8",
                ));
            }
        }
        Ok(ApiQuery(
            Query::<T>::from_request_parts(parts, state).await?.0,
        ))
    }
}

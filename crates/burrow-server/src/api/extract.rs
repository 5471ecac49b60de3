//! Extractors: authentication and JSON/query parsing whose rejections are our JSON errors.

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
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
            // Keys are read from a WAL reader, so only a database that cannot be read at all
            // ends here: 503 with Retry-After, like every other store failure.
            Err(e) => Err(e.into()),
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
        // another path, so such a query is refused (ATTACKS.md F6).
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

/// `Path<T>` with JSON rejections (a path parameter of the wrong type is a 400 in our shape).
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(ApiPath(
            Path::<T>::from_request_parts(parts, state).await?.0,
        ))
    }
}

/// The longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The optional `Idempotency-Key` header of a create: 1 to 255 visible ASCII characters.
pub struct IdempotencyHeader(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyHeader {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all("idempotency-key").iter();
        let Some(v) = values.next() else {
            return Ok(IdempotencyHeader(None));
        };
        let bad = || {
            HttpError::bad_request(format!(
                "Idempotency-Key must be one header of 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
            ))
        };
        if values.next().is_some() {
            return Err(bad());
        }
        let key = v.to_str().map_err(|_| bad())?;
        if key.is_empty()
            || key.len() > MAX_IDEMPOTENCY_KEY
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(bad());
        }
        Ok(IdempotencyHeader(Some(key.to_string())))
    }
}

/// A fingerprint of a request for idempotency keys: which API it came through and its parsed
/// body, so whitespace and field order do not make "another request".
pub fn fingerprint(api: &str, body: &impl serde::Serialize) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(api.as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(body).unwrap_or_default());
    hex::encode(h.finalize())
}

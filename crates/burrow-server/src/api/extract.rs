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
        match state.control.store().user_by_key_hash(&hash_key(key)).await {
            Ok(Some(user)) => Ok(Caller(user)),
            Ok(None) => Err(unauthorized("invalid API key")),
            // Keys are read from a WAL reader, so only a database that cannot be read at all
            // ends here: 503 with Retry-After, like every other store failure.
            Err(e) => Err(e.into()),
        }
    }
}

/// `Json<T>` whose rejections (bad JSON, wrong types, too large, wrong content type, too slow)
/// are JSON errors. Numbers are read as JSON means them: `60.0` is the integer 60.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<serde_json::Value>::from_request(req, state).await?;
        from_json_value(value).map(ApiJson)
    }
}

/// A parsed JSON body as `T`, with integral floats taken as integers and errors that name the
/// field they are about.
pub fn from_json_value<T: DeserializeOwned>(mut value: serde_json::Value) -> Result<T, HttpError> {
    // Every request body of this API is an object (serde would also read a struct from an array).
    if !value.is_object() {
        return Err(HttpError::bad_request(
            "invalid request body: expected a JSON object",
        ));
    }
    integral_floats(&mut value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            HttpError::bad_request(format!("invalid request body: {}", e.inner()))
        } else {
            HttpError::bad_request(format!("invalid request body: {path}: {}", e.inner()))
        }
    })
}

/// JSON has one number type: a client (or a JSON library) may write the integer 60 as `60.0`.
/// Such numbers become integers when they fit one, so integer fields accept them.
pub fn integral_floats(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            let Some(f) = n.as_f64().filter(|f| f.is_finite() && f.fract() == 0.0) else {
                return;
            };
            // 2^64 and -2^63 are exact in f64; every integral float in between converts exactly.
            if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                *v = Value::from(f as u64);
            } else if (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                *v = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats),
        Value::Object(map) => map.values_mut().for_each(integral_floats),
        _ => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integral_floats_are_integers_and_others_stay() {
        let mut v =
            json!({"a": 60.0, "b": [1.5, -2.0], "c": {"d": 1e30}, "e": 9.223372036854776e18});
        integral_floats(&mut v);
        assert_eq!(v["a"], json!(60));
        assert_eq!(v["b"], json!([1.5, -2]));
        assert!(v["c"]["d"].is_f64(), "out of range stays a float");
        assert_eq!(v["e"], json!(9_223_372_036_854_775_808_u64));
    }

    #[test]
    fn bodies_are_objects_and_errors_name_the_field() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct T {
            n: u16,
        }
        assert!(from_json_value::<T>(json!([1])).is_err());
        let e = from_json_value::<T>(json!({"n": 70000})).unwrap_err();
        assert!(e.message.contains("n:"), "{}", e.message);
        assert_eq!(from_json_value::<T>(json!({"n": 7.0})).unwrap().n, 7);
    }
}

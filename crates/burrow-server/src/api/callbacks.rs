//! `GET /v1/callback-key`: the caller's own key for checking run callbacks' signatures.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::HttpError;
use super::extract::Caller;
use super::AppState;
use crate::callback::REPLAY_WINDOW_S;

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallbackKey {
    /// 64 hex characters; this text (its ASCII bytes) is the HMAC-SHA256 key. Derived from the
    /// server's callback key and the user's id: the same on every call, different for every
    /// user, changed for everyone when the operator replaces the server's key.
    pub key: String,
    /// `hmac-sha256`.
    pub algorithm: String,
    /// `X-Burrow-Signature`: `t=<unix seconds>,v1=<hex HMAC of "<t>.<body>">`.
    pub header: String,
    /// Refuse a callback whose `t` is further than this from your clock, and remember the event
    /// `id`s seen within it (a retry keeps its `id`).
    pub replay_window_s: u64,
}

/// The caller's callback key (every user sees only their own).
#[utoipa::path(get, path = "/v1/callback-key", tag = "runs",
    responses((status = 200, body = CallbackKey), (status = 401, body = burrow_types::ApiError)))]
pub async fn callback_key(
    State(s): State<AppState>,
    Caller(user): Caller,
) -> Result<Json<CallbackKey>, HttpError> {
    Ok(Json(CallbackKey {
        key: s.control.callbacks().user_key(&user.id),
        algorithm: "hmac-sha256".into(),
        header: "X-Burrow-Signature".into(),
        replay_window_s: REPLAY_WINDOW_S,
    }))
}

//! `/v1/sandboxes`: create, list, get, delete.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use burrow_types::{ApiError, CreateSandbox, RunSpec, Sandbox, SetTimeout};

use super::error::HttpError;
use super::extract::{fingerprint, ApiJson, ApiPath, Caller, IdempotencyHeader};
use super::AppState;
use crate::control::IdempotencyKey;

/// Create a sandbox and start it; answers once it runs.
///
/// With an `Idempotency-Key` header, the create is made once per key (per user, for 24 hours):
/// a repeat of the same request answers with the first one's sandbox (as it is now, with
/// `Idempotent-Replayed: true`), waiting for it if it is still being made; the same key with a
/// different request is `422 idempotency_key_reused`.
#[utoipa::path(post, path = "/v1/sandboxes", request_body = CreateSandbox, tag = "sandboxes",
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$",
        description = "makes the create happen once for this key (1-255 visible ASCII characters)")),
    responses((status = 201, body = Sandbox, headers(("Idempotent-Replayed" = String,
            description = "`true` when an earlier request with the same key made this sandbox"))),
        (status = 400, body = ApiError),
        (status = 403, body = ApiError, description = "a plan above the user's own (`plan_not_allowed`), or a callback target the server refuses (`callback_not_allowed`)"),
        (status = 409, body = ApiError, description = "a network policy on a server without sandbox networking, or the first request with this Idempotency-Key is still being served"),
        (status = 422, body = ApiError, description = "the Idempotency-Key was used with another request"),
        (status = 429, body = ApiError, description = "a quota would be exceeded (`details` names it); see Retry-After"),
        (status = 503, body = ApiError, description = "the host is full, or the database is busy; see Retry-After")))]
pub async fn create_sandbox(
    State(s): State<AppState>,
    Caller(user): Caller,
    IdempotencyHeader(key): IdempotencyHeader,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> Result<Response, HttpError> {
    let key = key.map(|key| IdempotencyKey {
        fingerprint: fingerprint("v1", &req),
        key,
    });
    let created = s.control.create_with(&user, req, key).await?;
    let mut resp = (StatusCode::CREATED, Json(created.sandbox)).into_response();
    if created.replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// The caller's sandboxes that are not destroyed.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", responses((status = 200, body = [Sandbox])))]
pub async fn list_sandboxes(
    State(s): State<AppState>,
    Caller(user): Caller,
) -> Result<Json<Vec<Sandbox>>, HttpError> {
    Ok(Json(s.control.list(&user).await?))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    responses((status = 200, body = Sandbox), (status = 404, body = ApiError)))]
pub async fn get_sandbox(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Sandbox>, HttpError> {
    Ok(Json(s.control.get(&user, &id).await?))
}

/// Destroy a sandbox: every process ends and its files are deleted.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    responses((status = 204), (status = 404, body = ApiError)))]
pub async fn delete_sandbox(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, HttpError> {
    s.control.destroy(&user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pause: sync files, then freeze every process in place (memory and connections stay).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes",
    responses((status = 200, body = Sandbox), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn pause_sandbox(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Sandbox>, HttpError> {
    Ok(Json(s.control.pause(&user, &id).await?))
}

/// Resume: a paused sandbox carries on where it was (hot); a hibernated one starts cold with its files.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes",
    responses((status = 200, body = Sandbox), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn resume_sandbox(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Sandbox>, HttpError> {
    Ok(Json(s.control.resume(&user, &id).await?))
}

/// Hibernate: sync and keep the files, end every process. Resume starts it cold.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/hibernate", tag = "sandboxes",
    responses((status = 200, body = Sandbox), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn hibernate_sandbox(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Sandbox>, HttpError> {
    Ok(Json(s.control.hibernate(&user, &id).await?))
}

/// Set or clear the idle timeout (no API call for `timeout_s` seconds → `on_timeout`).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", request_body = SetTimeout, tag = "sandboxes",
    responses((status = 200, body = Sandbox), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn set_timeout(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<SetTimeout>,
) -> Result<Json<Sandbox>, HttpError> {
    Ok(Json(s.control.set_timeout(&user, &id, req).await?))
}

/// Give the sandbox a new run (task, memory tokens, callback URL, env); its tool calls count
/// from zero. Refused while a run is active.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/run", request_body = RunSpec, tag = "runs",
    responses((status = 200, body = Sandbox), (status = 403, body = ApiError, description = "a callback target the server refuses"),
        (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn start_run(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RunSpec>,
) -> Result<Json<Sandbox>, HttpError> {
    Ok(Json(s.control.start_run(&user, &id, req).await?))
}

/// End the sandbox's run. An ephemeral sandbox is destroyed with it; the run's callback URL is told.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/run/end", tag = "runs",
    responses((status = 200, body = Sandbox), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn end_run(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Sandbox>, HttpError> {
    Ok(Json(s.control.finish_run(&user, &id).await?))
}

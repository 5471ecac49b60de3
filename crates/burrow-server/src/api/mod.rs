//! Transport: parses and authenticates HTTP and WebSocket requests and hands them to the control
//! layer. Nothing here decides policy.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use burrow_types::codes;
use tower_http::catch_panic::CatchPanicLayer;

use crate::control::Control;

pub mod admin;
pub mod error;
pub mod exec;
pub mod extract;
pub mod files;
pub mod openapi;
pub mod pools;
pub mod sandboxes;
mod ws;

use error::HttpError;

/// Largest JSON body; file uploads stream and are bounded by the sandbox's disk instead.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub control: Arc<Control>,
}

pub fn router(state: AppState) -> Router {
    let sandbox = Router::new()
        .route(
            "/",
            get(sandboxes::get_sandbox).delete(sandboxes::delete_sandbox),
        )
        .route("/pause", post(sandboxes::pause_sandbox))
        .route("/resume", post(sandboxes::resume_sandbox))
        .route("/hibernate", post(sandboxes::hibernate_sandbox))
        .route("/timeout", post(sandboxes::set_timeout))
        .route("/run", post(sandboxes::start_run))
        .route("/run/end", post(sandboxes::end_run))
        .route("/exec", post(exec::exec))
        .route("/exec/ws", get(exec::exec_ws))
        .route("/terminal", get(exec::terminal))
        .route(
            "/processes",
            get(exec::list_processes).post(exec::start_process),
        )
        .route(
            "/processes/{pid}",
            axum::routing::delete(exec::kill_process),
        )
        .route("/processes/{pid}/signal", post(exec::signal_process))
        .route("/processes/{pid}/attach", get(exec::attach))
        .route(
            "/files",
            get(files::download)
                .put(files::upload)
                .delete(files::remove),
        )
        .route("/files/stat", get(files::stat))
        .route("/files/list", get(files::list))
        .route("/files/mkdir", post(files::mkdir))
        .route("/files/rename", post(files::rename));
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/v1/admin/users", post(admin::create_user))
        .route("/v1/pools", get(pools::list_pools))
        .route(
            "/v1/pools/{name}",
            axum::routing::put(pools::put_pool).delete(pools::delete_pool),
        )
        .route("/metrics", get(pools::metrics))
        .route(
            "/v1/sandboxes",
            post(sandboxes::create_sandbox).get(sandboxes::list_sandboxes),
        )
        .nest("/v1/sandboxes/{id}", sandbox)
        .fallback(|| async {
            HttpError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, "no such route")
        })
        .method_not_allowed_fallback(|| async {
            HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                codes::BAD_REQUEST,
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(CatchPanicLayer::custom(|_| {
            HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::INTERNAL,
                "internal error",
            )
            .into_response()
        }))
        .with_state(state)
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub backend: &'static str,
    pub version: &'static str,
}

/// Liveness; needs no key.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = Health)))]
pub async fn health(axum::extract::State(state): axum::extract::State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok",
        backend: state.control.backend_name(),
        version: env!("CARGO_PKG_VERSION"),
    })
}

//! Transport: parses and authenticates HTTP and WebSocket requests and hands them to the control
//! layer. Nothing here decides policy.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use burrow_types::{codes, ApiError};
use tower_http::catch_panic::CatchPanicLayer;

use crate::control::Control;

pub mod admin;
pub mod callbacks;
pub mod error;
pub mod exec;
pub mod extract;
pub mod files;
pub mod images;
pub mod network;
pub mod openapi;
pub mod pools;
pub mod ports;
pub mod quotas;
pub mod sandboxes;
mod ws;

use error::HttpError;

/// Largest JSON body; file uploads stream and are bounded by the sandbox's disk instead.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub control: Arc<Control>,
    /// The E2B-compatible facade's own state (tokens, templates, watchers).
    pub e2b: Arc<crate::e2b::Facade>,
}

/// The API with Host routing: `49983-<id>.<domain>` is the E2B facade's envd, other
/// `<port>-<id>.<domain>` go to the port proxy.
pub fn router(state: AppState) -> Router {
    let envd: ports::HostHandler = Arc::new(|r: ports::HostRequest| {
        Box::pin(crate::e2b::serve_envd(r.state, r.sandbox_id, r.request))
    });
    router_with(
        state,
        ports::HostClaims::default().claim(crate::e2b::ENVD_PORT, envd),
    )
}

/// The API, with Host routing of ports in front: `<port>-<id>.<domain>` goes to the handler
/// `claims` names for that port (the E2B facade's envd on 49983), or else to the port proxy.
pub fn router_with(state: AppState, claims: ports::HostClaims) -> Router {
    let host_state = (state.clone(), claims);
    Router::new()
        .fallback_service(api_router(state.clone()))
        .layer(axum::middleware::from_fn_with_state(
            state,
            crate::e2b::route_by_port_header,
        ))
        .layer(axum::middleware::from_fn_with_state(
            host_state,
            ports::host_router,
        ))
}

fn api_router(state: AppState) -> Router {
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
        .route("/files/rename", post(files::rename))
        .route(
            "/network",
            axum::routing::put(network::put_network).patch(network::patch_network),
        )
        .route(
            "/ports/{port}",
            get(network::get_port).put(network::put_port),
        )
        .route("/ports/{port}/", axum::routing::any(ports::proxy_root))
        .route(
            "/ports/{port}/{*rest}",
            axum::routing::any(ports::proxy_path),
        );
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/v1/admin/users", post(admin::create_user))
        .route(
            "/v1/admin/users/{name}",
            axum::routing::patch(admin::update_user),
        )
        .route("/v1/callback-key", get(callbacks::callback_key))
        .route("/v1/admin/network", get(network::firewall))
        .route(
            "/v1/admin/users/{name}/quota",
            get(quotas::get_quota)
                .put(quotas::put_quota)
                .delete(quotas::delete_quota),
        )
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
        .merge(crate::e2b::router())
        .merge(images::router())
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
        .layer(axum::middleware::from_fn(crate::server_timing::layer))
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
    /// `ok`, or `degraded` when something the server needs works only in part (`problems` says
    /// what).
    pub status: &'static str,
    pub backend: &'static str,
    pub version: &'static str,
    /// The database: reads go on while it cannot be written, but creates and other changes
    /// answer `503` with `Retry-After`.
    pub database: DatabaseHealth,
    /// What is wrong now, with the stable code the failing requests answer with.
    pub problems: Vec<ApiError>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct DatabaseHealth {
    pub writable: bool,
}

/// Liveness and what works; needs no key. Always `200` while the server answers: `status` and
/// `problems` say whether anything is degraded (the database locked by another process or
/// unwritable).
#[utoipa::path(get, path = "/v1/health", security(()), responses((status = 200, body = Health)))]
pub async fn health(axum::extract::State(state): axum::extract::State<AppState>) -> Json<Health> {
    let db = state.control.store().health().await;
    let problems: Vec<ApiError> = db
        .problem
        .iter()
        .map(|(code, message)| ApiError {
            code: code.to_string(),
            message: message.clone(),
            details: None,
        })
        .collect();
    Json(Health {
        status: if problems.is_empty() {
            "ok"
        } else {
            "degraded"
        },
        backend: state.control.backend_name(),
        version: env!("CARGO_PKG_VERSION"),
        database: DatabaseHealth {
            writable: db.writable,
        },
        problems,
    })
}

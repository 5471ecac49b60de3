//! `/v1/pools` (warm pools: status for everyone, changes for admins) and Prometheus `/metrics`.

use std::fmt::Write;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use burrow_types::{ApiError, PoolSpec, PoolStatus};

use super::admin::require_admin;
use super::error::HttpError;
use super::extract::{ApiJson, Caller};
use super::AppState;

/// Every warm pool: target, ready, claims, cold fallbacks and the 24 h hit rate.
#[utoipa::path(get, path = "/v1/pools", tag = "pools", responses((status = 200, body = [PoolStatus])))]
pub async fn list_pools(
    State(s): State<AppState>,
    Caller(_caller): Caller,
) -> Result<Json<Vec<PoolStatus>>, HttpError> {
    Ok(Json(s.control.pools()?))
}

/// Create or resize a warm pool (admins only). Creates whose image matches, and whose plan has the
/// pool plan's disk and open-file limits, claim from it; CPU, memory and pids are set at claim.
#[utoipa::path(put, path = "/v1/pools/{name}", request_body = PoolSpec, tag = "pools",
    responses((status = 200, body = PoolStatus), (status = 400, body = ApiError), (status = 403, body = ApiError)))]
pub async fn put_pool(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(name): Path<String>,
    ApiJson(spec): ApiJson<PoolSpec>,
) -> Result<Json<PoolStatus>, HttpError> {
    require_admin(&user)?;
    Ok(Json(s.control.put_pool(&name, spec)?))
}

/// Delete a warm pool and its unclaimed sandboxes (admins only).
#[utoipa::path(delete, path = "/v1/pools/{name}", tag = "pools",
    responses((status = 204), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn delete_pool(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, HttpError> {
    require_admin(&user)?;
    s.control.delete_pool(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Prometheus text format. Aggregates only (no ids, no names of users), so it needs no key.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition")))]
pub async fn metrics(State(s): State<AppState>) -> Result<impl IntoResponse, HttpError> {
    let pools = s.control.pools()?;
    let states = s
        .control
        .store()
        .state_counts()
        .map_err(crate::control::ControlError::from)?;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_pool = |f: &dyn Fn(&PoolStatus) -> String| -> Vec<(String, String)> {
        pools
            .iter()
            .map(|p| (format!("{{pool=\"{}\"}}", p.name), f(p)))
            .collect()
    };
    family(
        "burrow_sandboxes",
        "gauge",
        "Sandboxes of users by state (warm pool sandboxes not included).",
        states
            .iter()
            .map(|(state, n)| (format!("{{state=\"{state}\"}}"), n.to_string()))
            .collect(),
    );
    family(
        "burrow_pool_target",
        "gauge",
        "Warm sandboxes each pool keeps.",
        per_pool(&|p| p.target.to_string()),
    );
    family(
        "burrow_pool_ready",
        "gauge",
        "Warm sandboxes ready to be claimed.",
        per_pool(&|p| p.ready.to_string()),
    );
    family(
        "burrow_pool_starting",
        "gauge",
        "Warm sandboxes being built.",
        per_pool(&|p| p.starting.to_string()),
    );
    family(
        "burrow_pool_claims_total",
        "counter",
        "Creates served warm from each pool.",
        per_pool(&|p| p.claims.to_string()),
    );
    family(
        "burrow_pool_cold_fallbacks_total",
        "counter",
        "Creates that matched a pool, found it empty and started cold.",
        per_pool(&|p| p.cold_fallbacks.to_string()),
    );
    family(
        "burrow_pool_hit_rate_24h",
        "gauge",
        "Claims over claims plus cold fallbacks in the last 24 hours (NaN without creates).",
        per_pool(&|p| {
            p.hit_rate_24h
                .map(|r| r.to_string())
                .unwrap_or_else(|| "NaN".into())
        }),
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

//! `/v1/pools` (warm pools: status for everyone, changes for admins) and Prometheus `/metrics`.

use std::sync::OnceLock;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use burrow_types::{ApiError, PoolSpec, PoolStatus};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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
    Ok(Json(s.control.pools().await?))
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
    Ok(Json(s.control.put_pool(&name, spec).await?))
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

/// The exporter of the process's global metrics recorder, when the binary installed one: what
/// library code counts with `metrics::counter!` (run callbacks, ...) is rendered through it.
static EXPORTER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Called once by the binary after it installed the global Prometheus recorder.
pub fn serve_exporter(handle: PrometheusHandle) {
    let _ = EXPORTER.set(handle);
}

/// Prometheus text format. Aggregates only (no ids, no names of users), so it needs no key.
///
/// What the store holds (sandboxes by state, pools) is read at each scrape into a recorder made
/// for that scrape, so a deleted pool's series go with it; what the process counts as it runs
/// comes from the global recorder the binary installed.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition")))]
pub async fn metrics(State(s): State<AppState>) -> Result<impl IntoResponse, HttpError> {
    let pools = s.control.pools().await?;
    let states = s
        .control
        .store()
        .state_counts()
        .await
        .map_err(crate::control::ControlError::from)?;
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        use metrics::{counter, describe_counter, describe_gauge, gauge};
        describe_gauge!(
            "burrow_sandboxes",
            "Sandboxes of users by state (warm pool sandboxes not included)."
        );
        for (state, n) in &states {
            gauge!("burrow_sandboxes", "state" => state.clone()).set(*n as f64);
        }
        describe_gauge!("burrow_pool_target", "Warm sandboxes each pool keeps.");
        describe_gauge!("burrow_pool_ready", "Warm sandboxes ready to be claimed.");
        describe_gauge!("burrow_pool_starting", "Warm sandboxes being built.");
        describe_counter!(
            "burrow_pool_claims_total",
            "Creates served warm from each pool."
        );
        describe_counter!(
            "burrow_pool_cold_fallbacks_total",
            "Creates that matched a pool, found it empty and started cold."
        );
        describe_gauge!(
            "burrow_pool_hit_rate_24h",
            "Claims over claims plus cold fallbacks in the last 24 hours (NaN without creates)."
        );
        for p in &pools {
            let pool = p.name.clone();
            gauge!("burrow_pool_target", "pool" => pool.clone()).set(f64::from(p.target));
            gauge!("burrow_pool_ready", "pool" => pool.clone()).set(f64::from(p.ready));
            gauge!("burrow_pool_starting", "pool" => pool.clone()).set(f64::from(p.starting));
            counter!("burrow_pool_claims_total", "pool" => pool.clone()).absolute(p.claims);
            counter!("burrow_pool_cold_fallbacks_total", "pool" => pool.clone())
                .absolute(p.cold_fallbacks);
            gauge!("burrow_pool_hit_rate_24h", "pool" => pool)
                .set(p.hit_rate_24h.unwrap_or(f64::NAN));
        }
    });
    let mut out = handle.render();
    if let Some(global) = EXPORTER.get() {
        out.push_str(&global.render());
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

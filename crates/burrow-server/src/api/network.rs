//! `/v1/sandboxes/{id}/network` (egress policy), `/v1/sandboxes/{id}/ports/{port}` (port URLs and
//! public opt-in) and `/v1/admin/network` (the firewall as installed and as the kernel holds it).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use burrow_node::network::RulesSummary;
use burrow_types::{codes, ApiError, NetworkPatch, NetworkPolicy, PortInfo, Sandbox, SetPort};
use serde::{Deserialize, Serialize};

use super::error::HttpError;
use super::extract::{ApiJson, ApiQuery, Caller};
use super::AppState;

/// Replace a sandbox's egress policy; a running sandbox follows it at once (new connections).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/network", request_body = NetworkPolicy, tag = "network",
    responses((status = 200, body = Sandbox), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn put_network(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
    ApiJson(policy): ApiJson<NetworkPolicy>,
) -> Result<Json<Sandbox>, HttpError> {
    Ok(Json(s.control.set_network(&user, &id, policy).await?))
}

/// Change parts of a sandbox's egress policy (absent fields stay).
#[utoipa::path(patch, path = "/v1/sandboxes/{id}/network", request_body = NetworkPatch, tag = "network",
    responses((status = 200, body = Sandbox), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn patch_network(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<NetworkPatch>,
) -> Result<Json<Sandbox>, HttpError> {
    let current = s.control.get(&user, &id).await?;
    let policy = current
        .network
        .map(|n| n.policy.patched(&patch))
        .ok_or_else(|| HttpError::from(crate::control::ControlError::NoNetwork))?;
    Ok(Json(s.control.set_network(&user, &id, policy).await?))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PortQuery {
    /// Also return a signed URL valid for this many seconds (at most a week).
    #[serde(default)]
    #[param(minimum = 1, maximum = 604800)]
    pub signed_ttl_s: Option<u64>,
}

/// The server's URL as this client reached it.
pub fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// A port's URLs (by Host and by path), whether it is public, and optionally a signed URL.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports/{port}", tag = "network", params(PortQuery),
    responses((status = 200, body = PortInfo), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn get_port(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path((id, port)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<PortQuery>,
    headers: HeaderMap,
) -> Result<Json<PortInfo>, HttpError> {
    let port = super::ports::parse_port(&port)?;
    Ok(Json(
        s.control
            .port_info_for(&user, &id, port, &base_url(&headers), q.signed_ttl_s)
            .await?,
    ))
}

/// Make a port public (no token needed through the proxy) or private.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/ports/{port}", request_body = SetPort, tag = "network",
    responses((status = 200, body = PortInfo), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn put_port(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path((id, port)): Path<(String, String)>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<SetPort>,
) -> Result<Json<PortInfo>, HttpError> {
    let port = super::ports::parse_port(&port)?;
    let (rec, port) = s
        .control
        .set_port_public(&user, &id, port, req.public)
        .await?;
    Ok(Json(s.control.port_info(
        &rec,
        port,
        &base_url(&headers),
        None,
    )?))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FirewallRules {
    /// burrow's table as `nft -f` input.
    pub rules: String,
    /// Chains (with rule counts), map and set elements burrow installed.
    #[schema(value_type = Object)]
    pub expected: RulesSummary,
    /// The same, read back from the kernel.
    #[schema(value_type = Object)]
    pub actual: RulesSummary,
    pub in_sync: bool,
}

/// The firewall as burrow installed it and as the kernel holds it (admins only).
#[utoipa::path(get, path = "/v1/admin/network", tag = "admin",
    responses((status = 200, body = FirewallRules), (status = 403, body = ApiError), (status = 409, body = ApiError)))]
pub async fn firewall(
    State(s): State<AppState>,
    Caller(caller): Caller,
) -> Result<Json<FirewallRules>, HttpError> {
    if !caller.is_admin {
        return Err(HttpError::new(
            StatusCode::FORBIDDEN,
            codes::FORBIDDEN,
            "admin key required",
        ));
    }
    let (rules, expected, actual) = s.control.firewall_rules()?;
    Ok(Json(FirewallRules {
        in_sync: expected == actual,
        rules,
        expected,
        actual,
    }))
}

//! `/v1/admin/users/{name}/quota`: an operator's per-user quota override (admins only). A user's
//! quota is their plan's (`quota` in the plans file) with the override's fields on top.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use burrow_store::User;
use burrow_types::{codes, ApiError, Quota};
use serde::{Deserialize, Serialize};

use super::admin::require_admin;
use super::error::HttpError;
use super::extract::{ApiJson, ApiPath, Caller};
use super::AppState;

/// A user's quota: where it comes from, what applies, and what they hold now.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotaStatus {
    pub user: String,
    pub plan: String,
    /// What the user's plan sets.
    pub plan_quota: Quota,
    /// What the operator set for this user (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_override: Option<Quota>,
    /// What applies: the plan's, with the override's fields on top. Absent fields: no cap.
    pub effective: Quota,
    pub usage: QuotaUsage,
}

/// What the user's live sandboxes (starting, running, paused, hibernated) were promised.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotaUsage {
    pub sandboxes: u64,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

async fn user_named(s: &AppState, name: &str) -> Result<User, HttpError> {
    s.control
        .store()
        .user_by_name(name)
        .await?
        .ok_or_else(|| HttpError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, "no such user"))
}

async fn status(s: &AppState, user: &User) -> Result<QuotaStatus, HttpError> {
    let plan_quota = s.control.plan_quota(&user.plan).unwrap_or_default();
    let user_override = s.control.store().user_quota(&user.id).await?;
    let usage = s.control.store().usage_of(&user.id, &[]).await?;
    Ok(QuotaStatus {
        user: user.name.clone(),
        plan: user.plan.clone(),
        effective: s.control.quota_of(user).await?,
        plan_quota,
        user_override,
        usage: QuotaUsage {
            sandboxes: usage.sandboxes,
            memory_mib: usage.memory_mib,
            disk_mib: usage.disk_mib,
        },
    })
}

/// A user's quota and usage (admins only).
#[utoipa::path(get, path = "/v1/admin/users/{name}/quota", tag = "admin",
    params(("name" = String, Path, description = "user name")),
    responses((status = 200, body = QuotaStatus), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn get_quota(
    State(s): State<AppState>,
    Caller(caller): Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<QuotaStatus>, HttpError> {
    require_admin(&caller)?;
    let user = user_named(&s, &name).await?;
    Ok(Json(status(&s, &user).await?))
}

/// Set a user's quota override (admins only): its fields replace the plan's; fields left out
/// follow the plan. Replaces any earlier override whole.
#[utoipa::path(put, path = "/v1/admin/users/{name}/quota", request_body = Quota, tag = "admin",
    params(("name" = String, Path, description = "user name")),
    responses((status = 200, body = QuotaStatus), (status = 400, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn put_quota(
    State(s): State<AppState>,
    Caller(caller): Caller,
    ApiPath(name): ApiPath<String>,
    ApiJson(quota): ApiJson<Quota>,
) -> Result<Json<QuotaStatus>, HttpError> {
    require_admin(&caller)?;
    if let Some((field, max)) = quota.out_of_range() {
        return Err(HttpError::out_of_range(field, 0, max));
    }
    let user = user_named(&s, &name).await?;
    s.control
        .store()
        .set_user_quota(&user.id, Some(&quota))
        .await?;
    Ok(Json(status(&s, &user).await?))
}

/// Remove a user's quota override: the plan's quota applies again (admins only).
#[utoipa::path(delete, path = "/v1/admin/users/{name}/quota", tag = "admin",
    params(("name" = String, Path, description = "user name")),
    responses((status = 200, body = QuotaStatus), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn delete_quota(
    State(s): State<AppState>,
    Caller(caller): Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<QuotaStatus>, HttpError> {
    require_admin(&caller)?;
    let user = user_named(&s, &name).await?;
    s.control.store().set_user_quota(&user.id, None).await?;
    Ok(Json(status(&s, &user).await?))
}

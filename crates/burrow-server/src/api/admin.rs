//! `/v1/admin`: operator-only routes.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use burrow_types::{codes, ApiError};
use serde::{Deserialize, Serialize};

use super::error::HttpError;
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::auth;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
    #[serde(default)]
    pub plan: Option<String>,
    /// `e2b` issues the key as `e2b_<40 hex>`, the shape the e2b SDKs expect (docs/e2b.md);
    /// default `burrow` (`burrow_<40 hex>`).
    #[serde(default)]
    pub key_style: Option<KeyStyle>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyStyle {
    #[default]
    Burrow,
    E2b,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedUser {
    pub id: String,
    pub name: String,
    pub plan: String,
    /// Shown once; only its hash is stored.
    pub api_key: String,
}

/// Create a user with one API key (admins only).
#[utoipa::path(post, path = "/v1/admin/users", request_body = CreateUser, tag = "admin",
    responses((status = 201, body = CreatedUser), (status = 403, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create_user(
    State(s): State<AppState>,
    Caller(caller): Caller,
    ApiJson(req): ApiJson<CreateUser>,
) -> Result<(StatusCode, Json<CreatedUser>), HttpError> {
    require_admin(&caller)?;
    let name_ok = !req.name.is_empty()
        && req.name.len() <= 64
        && req
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !name_ok {
        return Err(HttpError::bad_request(
            "user name must be 1-64 letters, digits, '-', '_' or '.'",
        ));
    }
    let plan = req.plan.unwrap_or_else(|| "free".into());
    if !s.control.has_plan(&plan) {
        return Err(s.control.unknown_plan(&plan).into());
    }
    let store = s.control.store();
    let internal = |e: burrow_store::StoreError| {
        HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::INTERNAL,
            e.to_string(),
        )
    };
    if store
        .user_by_name(&req.name)
        .await
        .map_err(internal)?
        .is_some()
    {
        return Err(HttpError::new(
            StatusCode::CONFLICT,
            codes::ALREADY_EXISTS,
            format!("user {:?} exists", req.name),
        ));
    }
    let user = store
        .create_user(&auth::new_id(16), &req.name, &plan, false)
        .await
        .map_err(internal)?;
    let key = match req.key_style.unwrap_or_default() {
        KeyStyle::Burrow => auth::generate_key(),
        KeyStyle::E2b => auth::generate_e2b_key(),
    };
    store
        .add_api_key(
            &auth::new_id(16),
            &user.id,
            &auth::hash_key(&key),
            &auth::key_display_prefix(&key),
        )
        .await
        .map_err(internal)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedUser {
            id: user.id,
            name: user.name,
            plan: user.plan,
            api_key: key,
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    /// The user's plan: what they may ask for (any plan whose every limit is within it).
    pub plan: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserInfo {
    pub id: String,
    pub name: String,
    pub plan: String,
    pub is_admin: bool,
    /// The plans this user may ask for at create.
    pub plans_allowed: Vec<String>,
}

/// Change a user's plan (admins only). Their sandboxes keep the plan they were made with; new
/// creates are bounded by the new plan.
#[utoipa::path(patch, path = "/v1/admin/users/{name}", request_body = UpdateUser, tag = "admin",
    responses((status = 200, body = UserInfo), (status = 400, body = ApiError),
        (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn update_user(
    State(s): State<AppState>,
    Caller(caller): Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UpdateUser>,
) -> Result<Json<UserInfo>, HttpError> {
    require_admin(&caller)?;
    if !s.control.has_plan(&req.plan) {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            codes::UNKNOWN_PLAN,
            format!(
                "unknown plan {:?}; this server has {}",
                req.plan,
                s.control.plan_names().join(", ")
            ),
        ));
    }
    let user = s
        .control
        .store()
        .set_user_plan(&name, &req.plan)
        .await
        .map_err(crate::control::ControlError::from)?
        .ok_or_else(|| {
            HttpError::new(
                StatusCode::NOT_FOUND,
                codes::NOT_FOUND,
                format!("no user named {name:?}"),
            )
        })?;
    Ok(Json(UserInfo {
        plans_allowed: s.control.plans_allowed(&user),
        id: user.id,
        name: user.name,
        plan: user.plan,
        is_admin: user.is_admin,
    }))
}

/// Operator-only routes answer 403 to every other key.
pub fn require_admin(user: &burrow_store::User) -> Result<(), HttpError> {
    if user.is_admin {
        Ok(())
    } else {
        Err(HttpError::new(
            StatusCode::FORBIDDEN,
            codes::FORBIDDEN,
            "admin key required",
        ))
    }
}

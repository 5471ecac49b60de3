//! E2B's REST API (the control plane the SDKs call at `E2B_API_URL`), translated onto burrow's
//! control layer. Keys come in `X-API-Key` and are burrow API keys. Errors are E2B's
//! `{"code": <status>, "message"}`; features burrow does not have answer 501 naming the feature.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use burrow_store::{now_unix, SandboxRecord};
use burrow_types::{CreateSandbox, NetworkPolicy, OnTimeout, SandboxState, SetTimeout};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Facade, ENVD_VERSION};
use crate::api::error::HttpError;
use crate::api::extract::{fingerprint, Caller, IdempotencyHeader};
use crate::api::AppState;
use crate::control::{IdempotencyKey, MAX_TIMEOUT_S};

/// E2B's default sandbox timeout when a create names none.
const DEFAULT_TIMEOUT_S: u64 = 300;
const DEFAULT_PAGE: usize = 100;
/// The most sandboxes one page of `GET /v2/sandboxes` may ask for.
const MAX_LIST_LIMIT: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/{id}/fork", post(unsupported_fork))
        .route("/sandboxes/{id}/snapshots", post(unsupported_snapshots))
        .route(
            "/sandboxes/{id}/network",
            axum::routing::put(unsupported_network),
        )
        .route("/sandboxes/{id}/logs", get(unsupported_logs))
        .route("/v2/sandboxes/{id}/logs", get(unsupported_logs))
}

/// An E2B error body (`{"code": <status>, "message"}`), with `Retry-After` when burrow's own
/// answer had one (busy, full, over a quota).
#[derive(Debug)]
pub struct E2bError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl E2bError {
    fn new(status: StatusCode, message: String) -> E2bError {
        E2bError {
            status,
            message,
            retry_after: None,
        }
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"code": self.status.as_u16(), "message": self.message})),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<HttpError> for E2bError {
    fn from(e: HttpError) -> Self {
        E2bError {
            status: e.status,
            message: e.message,
            retry_after: e.retry_after,
        }
    }
}

/// A number outside what burrow accepts, named by E2B's field name.
fn out_of_range(field: &str, min: u64, max: u64) -> E2bError {
    bad(format!("{field} must be between {min} and {max}"))
}

/// E2B's timeouts (seconds) fit burrow's idle timeout range.
fn check_timeout(field: &str, t: Option<u64>) -> Result<(), E2bError> {
    match t {
        Some(t) if !(1..=MAX_TIMEOUT_S).contains(&t) => Err(out_of_range(field, 1, MAX_TIMEOUT_S)),
        _ => Ok(()),
    }
}

impl From<crate::control::ControlError> for E2bError {
    fn from(e: crate::control::ControlError) -> Self {
        HttpError::from(e).into()
    }
}

fn bad(m: impl Into<String>) -> E2bError {
    E2bError::new(StatusCode::BAD_REQUEST, m.into())
}

fn unsupported(feature: &str, why: &str) -> E2bError {
    E2bError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!("{feature} is not supported by burrow's E2B facade: {why}"),
    )
}

async fn unsupported_fork() -> E2bError {
    unsupported("sandbox fork", "burrow has no memory snapshots to clone")
}
async fn unsupported_snapshots() -> E2bError {
    unsupported("sandbox snapshots", "burrow has no named snapshots yet")
}
async fn unsupported_network() -> E2bError {
    unsupported(
        "updating network rules through the E2B API",
        "set them at create, or with burrow's own PATCH /v1/sandboxes/{id}/network",
    )
}
async fn unsupported_logs() -> E2bError {
    unsupported(
        "sandbox logs",
        "burrow keeps per-command output, not a sandbox log",
    )
}

/// A request body, read whole (within the API's body limit and timeouts), with E2B-shaped errors.
pub struct E2bBody(axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for E2bBody {
    type Rejection = E2bError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => Ok(E2bBody(b)),
            Err(r) if crate::api::error::is_body_timeout(&r) => {
                Err(crate::api::error::body_timeout().into())
            }
            Err(r) => Err(E2bError::new(r.status(), r.body_text())),
        }
    }
}

/// JSON bodies are read leniently (E2B clients send fields burrow ignores); a malformed one is a
/// 400 in E2B's shape.
fn body<T: serde::de::DeserializeOwned + Default>(raw: &axum::body::Bytes) -> Result<T, E2bError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let value: Value =
        serde_json::from_slice(raw).map_err(|e| bad(format!("malformed JSON body: {e}")))?;
    crate::api::extract::from_json_value(value).map_err(E2bError::from)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<u64>,
    auto_pause: Option<bool>,
    auto_pause_memory: Option<bool>,
    auto_resume: Option<Value>,
    secure: Option<bool>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    network: Option<Value>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
    mcp: Option<Value>,
    iam: Option<Value>,
    volume_mounts: Option<Value>,
}

fn non_empty(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

/// Refuses, by name, the create options burrow cannot honour.
fn check_options(req: &NewSandbox) -> Result<(), E2bError> {
    if non_empty(&req.mcp) {
        return Err(unsupported("mcp", "burrow does not run E2B's MCP gateway"));
    }
    if non_empty(&req.iam) {
        return Err(unsupported(
            "iam (workload identity tokens)",
            "burrow has no token broker",
        ));
    }
    if non_empty(&req.volume_mounts) {
        return Err(unsupported(
            "volumeMounts",
            "every burrow sandbox has its own persistent /workspace instead",
        ));
    }
    let auto_resume = req
        .auto_resume
        .as_ref()
        .and_then(|v| v.get("enabled"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if auto_resume {
        return Err(unsupported(
            "autoResume",
            "a paused burrow sandbox resumes on connect or resume, not on traffic",
        ));
    }
    if req.auto_pause_memory == Some(false) && req.auto_pause == Some(true) {
        // A filesystem-only auto-pause is burrow's hibernate; the hot pause is kept instead and
        // hibernates after the hot window.
        tracing::debug!("autoPauseMemory=false: pausing hot, hibernating after the hot window");
    }
    // `secure` is always on (every envd call needs the sandbox's token).
    let _ = req.secure;
    Ok(())
}

/// E2B's network options as burrow's egress policy (`None`: the server's default).
/// `allow_internet_access: false` and a `denyOut` of `0.0.0.0/0` mean "no internet";
/// `allowOut` entries (addresses, CIDRs, domain names) are reachable even then. Unlike E2B,
/// burrow's other `denyOut` entries win over `allowOut` (see docs/e2b.md).
fn e2b_policy(
    allow_internet_access: Option<bool>,
    network: Option<&Value>,
    server_has_network: bool,
) -> Result<Option<NetworkPolicy>, E2bError> {
    let list = |key: &str| -> Result<Vec<String>, E2bError> {
        match network.and_then(|n| n.get(key)) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("network.{key} must be a list of strings")))
                })
                .collect(),
            Some(_) => Err(bad(format!("network.{key} must be a list of strings"))),
        }
    };
    if network
        .and_then(|n| n.get("maskRequestHost"))
        .is_some_and(|v| !v.is_null())
    {
        return Err(unsupported(
            "network.maskRequestHost",
            "burrow's port proxy passes the Host it was given",
        ));
    }
    let (allow, mut deny) = (list("allowOut")?, list("denyOut")?);
    let deny_all = deny.iter().any(|d| d == "0.0.0.0/0");
    deny.retain(|d| d != "0.0.0.0/0");
    let internet = allow_internet_access != Some(false) && !deny_all;
    if internet && allow.is_empty() && deny.is_empty() {
        return Ok(None);
    }
    if !server_has_network {
        // No network at all is already stricter than any deny; an allow cannot be honoured.
        return if allow.is_empty() {
            Ok(None)
        } else {
            Err(unsupported(
                "network.allowOut",
                "this burrow server gives sandboxes no network (start it with --network)",
            ))
        };
    }
    Ok(Some(NetworkPolicy {
        internet,
        allow_out: allow,
        deny_out: deny,
    }))
}

/// The E2B template a burrow image answers to (the first table entry for it).
fn template_of(f: &Facade, image: &str) -> String {
    f.templates
        .iter()
        .find(|(_, i)| *i == image)
        .map(|(t, _)| t.clone())
        .unwrap_or_else(|| image.to_string())
}

/// E2B's `Sandbox` (the answer to create, connect and resume).
fn created(f: &Facade, rec: &SandboxRecord) -> Value {
    json!({
        "templateID": template_of(f, &rec.image),
        "sandboxID": rec.id,
        "clientID": "burrow",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": f.access_token(&rec.id),
        // burrow's ports are private: the same token opens them, and the code-interpreter SDK
        // sends only this one on some calls.
        "trafficAccessToken": f.access_token(&rec.id),
        "domain": f.domain(),
    })
}

fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn e2b_state(s: SandboxState) -> &'static str {
    match s {
        SandboxState::Paused | SandboxState::Hibernated => "paused",
        _ => "running",
    }
}

/// E2B's `ListedSandbox` / `SandboxDetail`. `endAt` is when the idle timeout would fire if the
/// sandbox stayed idle from its start (burrow's timeouts are idle timeouts, see docs/e2b.md).
fn listed(f: &Facade, rec: &SandboxRecord, detail: bool) -> Value {
    let started = rec.started_at;
    let end = started
        + rec
            .timeout_s
            .unwrap_or(rec.limits.max_duration_s)
            .min(rec.limits.max_duration_s) as i64;
    let mut v = json!({
        "templateID": template_of(f, &rec.image),
        "sandboxID": rec.id,
        "clientID": "burrow",
        "startedAt": rfc3339(started),
        "endAt": rfc3339(end),
        "cpuCount": rec.limits.cpu_millis.div_ceil(1000).max(1),
        "memoryMB": rec.limits.memory_mib,
        "diskSizeMB": rec.limits.disk_mib,
        "metadata": rec.metadata,
        "state": e2b_state(rec.state),
        "envdVersion": ENVD_VERSION,
    });
    if detail {
        v["envdAccessToken"] = json!(f.access_token(&rec.id));
        v["domain"] = json!(f.domain());
    }
    v
}

async fn create(
    State(s): State<AppState>,
    Caller(user): Caller,
    IdempotencyHeader(key): IdempotencyHeader,
    E2bBody(raw): E2bBody,
) -> Result<Response, E2bError> {
    let req: NewSandbox = body(&raw)?;
    check_options(&req)?;
    // The key's fingerprint is the body as parsed (field order and whitespace do not count).
    let key = match key {
        Some(key) => {
            let parsed: Value = body(&raw)?;
            Some(IdempotencyKey {
                fingerprint: fingerprint("e2b", &parsed),
                key,
            })
        }
        None => None,
    };
    let template = req.template_id.clone().unwrap_or_else(|| "base".into());
    let Some(image) = s.e2b.image_for(&template) else {
        return Err(E2bError::new(
            StatusCode::NOT_FOUND,
            format!(
                "template {template:?} not found: this server maps {} (BURROW_E2B_TEMPLATES adds more)",
                s.e2b.templates.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    };
    let code_interpreter = super::code_interpreter::check_create(&s, &template, image)?;
    let timeout = req.timeout.unwrap_or(DEFAULT_TIMEOUT_S);
    check_timeout("timeout", Some(timeout))?;
    let create = CreateSandbox {
        image: Some(image.to_string()),
        env: req.env_vars.unwrap_or_default(),
        metadata: req.metadata.unwrap_or_default(),
        timeout_s: Some(timeout),
        on_timeout: Some(if req.auto_pause == Some(true) {
            OnTimeout::Pause
        } else {
            OnTimeout::Destroy
        }),
        network: e2b_policy(
            req.allow_internet_access,
            req.network.as_ref(),
            s.control.network().is_some(),
        )?,
        ..Default::default()
    };
    let made = s.control.create_with(&user, create, key).await?;
    // A replayed create answers with its sandbox whatever it became since (E2B has no state for
    // "destroyed": the record is read whatever its state).
    let rec = match s.control.store().sandbox(&made.sandbox.id).await {
        Ok(Some(rec)) if rec.owner_id == user.id => rec,
        Ok(_) => return Err(crate::control::ControlError::NotFound.into()),
        Err(e) => return Err(HttpError::from(e).into()),
    };
    if code_interpreter && !made.replayed {
        super::code_interpreter::prepare(&s, &user, &rec.id).await?;
    }
    let mut resp = (StatusCode::CREATED, Json(created(&s.e2b, &rec))).into_response();
    if made.replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

#[derive(Debug, Default)]
struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
    order: Option<String>,
    template: Option<String>,
}

/// Query pairs, with a repeated `state` (as the JS SDK sends it) joined by commas.
fn list_query(pairs: Vec<(String, String)>) -> Result<ListQuery, E2bError> {
    let mut q = ListQuery::default();
    for (k, v) in pairs {
        match k.as_str() {
            "metadata" => q.metadata = Some(v),
            "state" => {
                q.state = Some(match q.state.take() {
                    Some(s) => format!("{s},{v}"),
                    None => v,
                })
            }
            "limit" => {
                let n: usize = v
                    .parse()
                    .map_err(|_| out_of_range("limit", 1, MAX_LIST_LIMIT as u64))?;
                if !(1..=MAX_LIST_LIMIT).contains(&n) {
                    return Err(out_of_range("limit", 1, MAX_LIST_LIMIT as u64));
                }
                q.limit = Some(n)
            }
            "nextToken" => q.next_token = Some(v),
            "order" => q.order = Some(v),
            "template" => q.template = Some(v),
            _ => {}
        }
    }
    Ok(q)
}

/// `metadata` is itself a query string (`k=v&k2=v2`, each side percent-encoded).
fn metadata_filter(q: &Option<String>) -> Result<BTreeMap<String, String>, E2bError> {
    let mut out = BTreeMap::new();
    let Some(q) = q.as_deref().filter(|q| !q.is_empty()) else {
        return Ok(out);
    };
    let dec = |s: &str| -> Result<String, E2bError> {
        let once = percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8()
            .map_err(|_| bad("metadata filter is not UTF-8"))?
            .into_owned();
        Ok(percent_encoding::percent_decode_str(&once)
            .decode_utf8()
            .map_err(|_| bad("metadata filter is not UTF-8"))?
            .into_owned())
    };
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(dec(k)?, dec(v)?);
    }
    Ok(out)
}

fn state_filter(q: &Option<String>) -> Result<Vec<&'static str>, E2bError> {
    let Some(s) = q.as_deref().filter(|s| !s.is_empty()) else {
        return Ok(vec!["running", "paused"]);
    };
    s.split(',')
        .map(|x| match x.trim() {
            "running" => Ok("running"),
            "paused" => Ok("paused"),
            other => Err(bad(format!(
                "state {other:?}: E2B states are running and paused"
            ))),
        })
        .collect()
}

async fn matching(
    s: &AppState,
    user: &burrow_store::User,
    q: &ListQuery,
) -> Result<Vec<SandboxRecord>, E2bError> {
    let meta = metadata_filter(&q.metadata)?;
    let states = state_filter(&q.state)?;
    let mut recs: Vec<SandboxRecord> = s
        .control
        .store()
        .sandboxes_of(&user.id)
        .await
        .map_err(|e| E2bError::from(HttpError::from(e)))?
        .into_iter()
        .filter(|r| {
            matches!(
                r.state,
                SandboxState::Running | SandboxState::Paused | SandboxState::Hibernated
            )
        })
        .filter(|r| states.contains(&e2b_state(r.state)))
        .filter(|r| meta.iter().all(|(k, v)| r.metadata.get(k) == Some(v)))
        .filter(|r| {
            q.template
                .as_deref()
                .is_none_or(|t| template_of(&s.e2b, &r.image) == t)
        })
        .collect();
    recs.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    if q.order.as_deref() != Some("asc") {
        recs.reverse();
    }
    Ok(recs)
}

/// `GET /sandboxes` (v1): the running sandboxes, unpaginated.
async fn list_v1(
    State(s): State<AppState>,
    Caller(user): Caller,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<Vec<Value>>, E2bError> {
    let mut q = list_query(pairs)?;
    q.state = Some("running".into());
    let recs = matching(&s, &user, &q).await?;
    Ok(Json(
        recs.iter().map(|r| listed(&s.e2b, r, false)).collect(),
    ))
}

/// `GET /v2/sandboxes`: filtered by state and metadata, paginated with `limit` and
/// `nextToken` (the `x-next-token` response header names the next page).
async fn list_v2(
    State(s): State<AppState>,
    Caller(user): Caller,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, E2bError> {
    let q = list_query(pairs)?;
    let recs = matching(&s, &user, &q).await?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    let start = match q.next_token.as_deref().filter(|t| !t.is_empty()) {
        None => 0,
        Some(t) => recs
            .iter()
            .position(|r| r.id == t)
            .ok_or_else(|| bad("nextToken does not name a page of this listing"))?,
    };
    let page: Vec<Value> = recs
        .iter()
        .skip(start)
        .take(limit)
        .map(|r| listed(&s.e2b, r, false))
        .collect();
    let mut resp = Json(page).into_response();
    if let Some(next) = recs.get(start + limit) {
        if let Ok(v) = HeaderValue::from_str(&next.id) {
            resp.headers_mut().insert("x-next-token", v);
        }
    }
    Ok(resp)
}

async fn detail(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, E2bError> {
    let rec = s.control.record(&user, &id).await?;
    if !matches!(
        rec.state,
        SandboxState::Running | SandboxState::Paused | SandboxState::Hibernated
    ) {
        return Err(E2bError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox {id} is {} and cannot be used", rec.state.as_str()),
        ));
    }
    Ok(Json(listed(&s.e2b, &rec, true)))
}

async fn kill(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    s.control.destroy(&user, &id).await?;
    s.e2b.forget(&id);
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let rec = s.control.record(&user, &id).await?;
    if matches!(rec.state, SandboxState::Paused | SandboxState::Hibernated) {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already paused"),
        ));
    }
    s.control.pause(&user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TimeoutBody {
    timeout: Option<u64>,
    auto_pause: Option<bool>,
}

/// Sets the sandbox's timeout (E2B: seconds from now; burrow: idle seconds, restarting now).
async fn apply_timeout(
    s: &AppState,
    user: &burrow_store::User,
    id: &str,
    (field, timeout): (&str, Option<u64>),
    auto_pause: Option<bool>,
) -> Result<(), E2bError> {
    check_timeout(field, timeout)?;
    let rec = s.control.record(user, id).await?;
    let t = timeout.or(rec.timeout_s);
    s.control
        .set_timeout(
            user,
            id,
            SetTimeout {
                timeout_s: t,
                on_timeout: auto_pause.map(|p| {
                    if p {
                        OnTimeout::Pause
                    } else {
                        OnTimeout::Destroy
                    }
                }),
            },
        )
        .await?;
    Ok(())
}

async fn resume(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
    E2bBody(raw): E2bBody,
) -> Result<Response, E2bError> {
    let req: TimeoutBody = body(&raw)?;
    let rec = s.control.record(&user, &id).await?;
    if rec.state == SandboxState::Running {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already running"),
        ));
    }
    check_timeout("timeout", req.timeout)?;
    s.control.resume(&user, &id).await?;
    apply_timeout(&s, &user, &id, ("timeout", req.timeout), req.auto_pause).await?;
    let rec = s.control.record(&user, &id).await?;
    Ok((StatusCode::CREATED, Json(created(&s.e2b, &rec))).into_response())
}

/// Connect: a running sandbox answers 200, a paused one is resumed (hot; cold from hibernation)
/// and answers 201.
async fn connect(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
    E2bBody(raw): E2bBody,
) -> Result<Response, E2bError> {
    let req: TimeoutBody = body(&raw)?;
    check_timeout("timeout", req.timeout)?;
    let rec = s.control.record(&user, &id).await?;
    let status = match rec.state {
        SandboxState::Running => StatusCode::OK,
        SandboxState::Paused | SandboxState::Hibernated => {
            s.control.resume(&user, &id).await?;
            StatusCode::CREATED
        }
        other => {
            return Err(E2bError::new(
                StatusCode::NOT_FOUND,
                format!("sandbox {id} is {} and cannot be connected", other.as_str()),
            ))
        }
    };
    if req.timeout.is_some() {
        apply_timeout(&s, &user, &id, ("timeout", req.timeout), None).await?;
    }
    let rec = s.control.record(&user, &id).await?;
    Ok((status, Json(created(&s.e2b, &rec))).into_response())
}

async fn set_timeout(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
    E2bBody(raw): E2bBody,
) -> Result<StatusCode, E2bError> {
    let req: TimeoutBody = body(&raw)?;
    let Some(t) = req.timeout else {
        return Err(bad("timeout is required"));
    };
    apply_timeout(&s, &user, &id, ("timeout", Some(t)), None).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RefreshBody {
    duration: Option<u64>,
}

/// Keep-alive: restarts the idle clock (and sets the timeout when a duration is given).
async fn refresh(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
    E2bBody(raw): E2bBody,
) -> Result<StatusCode, E2bError> {
    let req: RefreshBody = body(&raw)?;
    apply_timeout(&s, &user, &id, ("duration", req.duration), None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resource use of a running sandbox, one sample taken now: memory and CPU from its cgroup (CPU
/// over 100 ms, as a percentage of the sandbox's CPU limit), disk from inside it.
async fn metrics(
    State(s): State<AppState>,
    Caller(user): Caller,
    Path(id): Path<String>,
    _headers: HeaderMap,
) -> Result<Json<Vec<Value>>, E2bError> {
    let rec = s.control.record(&user, &id).await?;
    if rec.state != SandboxState::Running {
        return Ok(Json(Vec::new()));
    }
    let (rec, guest) = s.control.guest(&user, &id).await?;
    // Disk use of the sandbox's own disk (root and /workspace share it).
    let spec = burrow_proto::ExecSpec {
        argv: vec![
            "df".into(),
            "-B1".into(),
            "--output=used,size".into(),
            "/".into(),
        ],
        timeout_ms: Some(5000),
        ..Default::default()
    };
    let out = guest
        .exec_buffered(spec, None, 4096)
        .await
        .map_err(HttpError::from)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<u64> = text
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let (disk_used, disk_total) = match nums.as_slice() {
        [u, t] => (*u, *t),
        _ => (0, rec.limits.disk_mib * 1024 * 1024),
    };
    let mem_used = s.control.memory_usage(&user, &id).await?.unwrap_or(0);
    let cpu = s
        .control
        .cpu_share(&user, &id, std::time::Duration::from_millis(100))
        .await?
        .unwrap_or(0.0);
    let now = now_unix();
    Ok(Json(vec![json!({
        "timestamp": rfc3339(now),
        "timestampUnix": now,
        "cpuCount": rec.limits.cpu_millis.div_ceil(1000).max(1),
        "cpuUsedPct": (cpu * 1000.0).round() / 10.0,
        "memUsed": mem_used,
        "memTotal": rec.limits.memory_mib * 1024 * 1024,
        "memCache": 0,
        "diskUsed": disk_used,
        "diskTotal": disk_total,
    })]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_are_query_strings() {
        let m = metadata_filter(&Some("team=a%20b&run=1".into())).unwrap();
        assert_eq!(m.get("team").map(String::as_str), Some("a b"));
        assert_eq!(m.get("run").map(String::as_str), Some("1"));
        // Double-encoded, as the Python SDK sends it.
        let m = metadata_filter(&Some("k%253D=v%2526".into())).unwrap();
        assert_eq!(m.get("k=").map(String::as_str), Some("v&"));
    }

    #[test]
    fn states_filter_by_e2b_names() {
        assert_eq!(state_filter(&None).unwrap(), vec!["running", "paused"]);
        assert_eq!(
            state_filter(&Some("paused".into())).unwrap(),
            vec!["paused"]
        );
        assert!(state_filter(&Some("hibernated".into())).is_err());
    }

    #[test]
    fn unsupported_options_are_named() {
        let req = NewSandbox {
            mcp: Some(json!({"x": 1})),
            ..Default::default()
        };
        let e = check_options(&req).err().unwrap();
        assert_eq!(e.status, StatusCode::NOT_IMPLEMENTED);
        assert!(e.message.contains("mcp"));
        let ok = NewSandbox {
            network: Some(json!({"allowPublicTraffic": true})),
            ..Default::default()
        };
        assert!(check_options(&ok).is_ok());
        let only = json!({"denyOut": ["0.0.0.0/0"], "allowOut": ["1.2.3.4", "pypi.org"]});
        let p = e2b_policy(None, Some(&only), true).unwrap().unwrap();
        assert_eq!(
            (p.internet, p.allow_out, p.deny_out),
            (
                false,
                vec!["1.2.3.4".to_string(), "pypi.org".to_string()],
                vec![]
            )
        );
        let off = e2b_policy(Some(false), None, true).unwrap().unwrap();
        assert!(!off.internet);
        assert!(e2b_policy(None, None, true).unwrap().is_none());
        assert!(e2b_policy(Some(false), None, false).unwrap().is_none());
        assert!(e2b_policy(None, Some(&only), false).is_err());
        assert!(e2b_policy(None, Some(&json!({"allowOut": "x"})), true).is_err());
        assert!(e2b_policy(None, Some(&json!({"maskRequestHost": "h"})), true).is_err());
    }
}

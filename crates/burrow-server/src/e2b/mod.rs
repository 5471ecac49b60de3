//! The E2B-compatible facade (docs/e2b.md, docs/adr/0020): E2B's REST API and the in-sandbox daemon protocol
//! ("envd": Connect-RPC `process.Process` and `filesystem.Filesystem`, `GET/POST /files`,
//! `GET /health`), so the unmodified `e2b` SDKs drive burrow. Everything here translates onto
//! the control layer and the guest client; there is no second sandbox implementation.
//!
//! Routing: the REST routes answer on the server's own address (`E2B_API_URL`). envd requests
//! name their sandbox with the `E2b-Sandbox-Id` header (the SDKs send it on every envd call, so
//! `E2B_SANDBOX_URL` can be the same address) or with a Host of `49983-<id>.<domain>`, which a
//! Host router hands to [`envd_router`].
//!
//! Authentication: REST calls carry a burrow API key in `X-API-Key`. envd calls carry the
//! sandbox's access token (`X-Access-Token`), an HMAC of the sandbox id under a server secret,
//! returned as `envdAccessToken` when the sandbox is created or connected: a leaked token acts for
//! that one sandbox only.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use burrow_node::guest::GuestClient;
use burrow_store::{SandboxRecord, User};
use burrow_types::SandboxState;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::api::AppState;

mod code_interpreter;
mod connect;
mod files;
mod filesystem;
mod process;
mod rest;

/// The envd port the SDKs address (`49983-<id>.<domain>`).
pub const ENVD_PORT: u16 = 49983;
/// The envd version we report. It selects what the SDKs use: default user (0.4.0), closing
/// stdin (0.5.2), octet-stream uploads (0.5.7). File metadata (0.6.2) is not offered, and the
/// SDKs then say so themselves.
pub const ENVD_VERSION: &str = "0.5.7";
/// E2B's default user inside a sandbox; burrow's image has the same `user` (uid 1000).
pub const DEFAULT_USER: &str = "user";

/// What the facade keeps beside the control layer: the token secret, the template table, and
/// per-process details envd reports that burrow's guest does not keep (tags, env, cwd).
pub struct Facade {
    secret: Vec<u8>,
    /// The server's `--domain`: `get_host(port)` in the SDKs builds `<port>-<id>.<domain>` on it.
    domain: Option<String>,
    templates: BTreeMap<String, String>,
    procs: Mutex<HashMap<(String, u32), process::ProcMeta>>,
    watchers: filesystem::Watchers,
    code_interpreter: code_interpreter::CodeInterpreter,
}

#[derive(Debug, thiserror::Error)]
pub enum FacadeError {
    #[error("BURROW_E2B_TEMPLATES is not a JSON object of template name to image: {0}")]
    Templates(String),
}

impl Facade {
    /// `secret` is the server's (`<data>/secret`): the envd token is the sandbox's own access
    /// token, so it also opens the sandbox's ports (`X-Access-Token`). Templates map E2B
    /// template names to burrow images: `base` is burrow's default image; more come from
    /// `BURROW_E2B_TEMPLATES` (a JSON object).
    pub fn open(
        secret: Vec<u8>,
        domain: Option<String>,
        templates_json: Option<&str>,
    ) -> Result<Facade, FacadeError> {
        let mut templates = BTreeMap::from([(
            "base".to_string(),
            crate::control::DEFAULT_IMAGE.to_string(),
        )]);
        if let Some(json) = templates_json.filter(|j| !j.trim().is_empty()) {
            let extra: BTreeMap<String, String> =
                serde_json::from_str(json).map_err(|e| FacadeError::Templates(e.to_string()))?;
            templates.extend(extra);
        }
        Ok(Facade {
            secret,
            domain,
            templates,
            procs: Mutex::default(),
            watchers: filesystem::Watchers::default(),
            code_interpreter: code_interpreter::CodeInterpreter::default(),
        })
    }

    /// Offers E2B's `code-interpreter-v1` template (docs/code-interpreter.md), its bundle
    /// looked for in `templates_dir`.
    pub fn with_code_interpreter(mut self, templates_dir: std::path::PathBuf) -> Facade {
        self.code_interpreter = code_interpreter::CodeInterpreter::new(templates_dir);
        self.templates
            .entry(code_interpreter::TEMPLATE.to_string())
            .or_insert_with(|| crate::control::DEFAULT_IMAGE.to_string());
        self
    }

    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// The envd access token of a sandbox: its burrow access token.
    pub fn access_token(&self, sandbox_id: &str) -> String {
        crate::control::net::access_token_with(&self.secret, sandbox_id)
    }

    fn token_ok(&self, sandbox_id: &str, token: &str) -> bool {
        crate::control::Control::token_matches(&self.access_token(sandbox_id), token)
    }

    /// A file URL signed with the sandbox's token (the SDKs' `download_url`/`upload_url`):
    /// `signature=v1_<base64 sha256 of path:operation:user:token[:expiration]>` on `/files`.
    fn signed_url_ok(&self, sandbox_id: &str, parts: &Parts) -> bool {
        use base64::Engine;
        use sha2::Digest;
        if parts.uri.path() != "/files" {
            return false;
        }
        let operation = match parts.method {
            axum::http::Method::GET => "read",
            axum::http::Method::POST => "write",
            _ => return false,
        };
        let q: HashMap<String, String> = parts
            .uri
            .query()
            .map(|q| {
                q.split('&')
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        let dec = |x: &str| {
                            percent_encoding::percent_decode_str(&x.replace('+', " "))
                                .decode_utf8()
                                .ok()
                                .map(|c| c.into_owned())
                        };
                        Some((dec(k)?, dec(v)?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let Some(sig) = q.get("signature") else {
            return false;
        };
        let path = q.get("path").map(String::as_str).unwrap_or_default();
        let user = q.get("username").map(String::as_str).unwrap_or_default();
        let token = self.access_token(sandbox_id);
        let raw = match q.get("signature_expiration") {
            None => format!("{path}:{operation}:{user}:{token}"),
            Some(exp) => {
                let Ok(e) = exp.parse::<i64>() else {
                    return false;
                };
                if e < burrow_store::now_unix() {
                    return false;
                }
                format!("{path}:{operation}:{user}:{token}:{e}")
            }
        };
        let want = format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(raw.as_bytes()))
        );
        // Constant-time: compare MACs of both rather than the strings.
        let mac = |v: &str| {
            let mut m = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
            m.update(v.as_bytes());
            m.finalize().into_bytes()
        };
        mac(sig) == mac(&want)
    }

    pub fn image_for(&self, template: &str) -> Option<&str> {
        self.templates.get(template).map(String::as_str)
    }

    /// Forgets what the facade kept about a sandbox that is gone.
    fn forget(&self, sandbox_id: &str) {
        lock(&self.procs).retain(|(sid, _), _| sid != sandbox_id);
        self.watchers.forget(sandbox_id);
    }

    /// Forgets what the facade kept about every sandbox that has ended since (destroyed by its
    /// timeout, say), so watchers' snapshots and process details do not pile up.
    pub(crate) async fn sweep(&self, store: &burrow_store::AsyncStore) {
        let mut ids: std::collections::BTreeSet<String> = lock(&self.procs)
            .keys()
            .map(|(sid, _)| sid.clone())
            .collect();
        ids.extend(self.watchers.sandboxes());
        for id in ids {
            let live = matches!(
                store.sandbox(&id).await,
                Ok(Some(r)) if !matches!(r.state, SandboxState::Destroyed | SandboxState::Error)
            );
            if !live {
                self.forget(&id);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every E2B route: REST on the server's own address plus envd selected by header or Host.
pub fn router() -> Router<AppState> {
    rest::router().merge(envd_routes())
}

/// Middleware for the whole API: requests with `E2b-Sandbox-Port` go to that port of the
/// sandbox (the code interpreter's 49999, or any other), through the port proxy.
pub use code_interpreter::route_by_port_header;

/// envd alone: the sandbox comes from `E2b-Sandbox-Id` or a Host of `49983-<id>.<anything>`, so
/// it can be mounted at `/` of any listener (see also [`serve_envd`]).
pub fn envd_router(state: AppState) -> Router {
    envd_routes().with_state(state)
}

/// Serves one envd request for `sandbox_id`, whatever its Host: the hook for a Host router
/// (`<port>-<id>.<domain>` with port [`ENVD_PORT`]) to hand envd's requests to the facade.
pub async fn serve_envd(
    state: AppState,
    sandbox_id: String,
    mut request: axum::extract::Request,
) -> Response {
    use tower::ServiceExt;
    match axum::http::HeaderValue::from_str(&sandbox_id) {
        Ok(v) => {
            request.headers_mut().insert("e2b-sandbox-id", v);
        }
        Err(_) => {
            return envd_error(StatusCode::BAD_REQUEST, "malformed sandbox id".into());
        }
    }
    match envd_router(state).oneshot(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

fn envd_routes() -> Router<AppState> {
    use axum::routing::{get, post};
    Router::new()
        .route("/health", get(envd_health))
        .route(
            "/files",
            get(files::download)
                .post(files::upload)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/process.Process/{method}", post(process::call))
        .route("/filesystem.Filesystem/{method}", post(filesystem::call))
}

/// envd's health check answers 204; without a sandbox id this is the REST API's own liveness.
/// With one, the sandbox's access token comes first: a caller without it gets one answer for
/// every id (another tenant's, missing, paused, running), so health cannot probe for ids or
/// states. The SDKs send the token on every envd call, this one included.
async fn envd_health(
    axum::extract::State(s): axum::extract::State<AppState>,
    parts: axum::http::HeaderMap,
) -> Response {
    let Some(id) = sandbox_id_of(&parts) else {
        return StatusCode::OK.into_response();
    };
    if !s.e2b.token_ok(&id, &access_token_of(&parts)) {
        return bad_token();
    }
    match s.control.store().sandbox(&id).await {
        Ok(Some(r)) if r.state == SandboxState::Running => StatusCode::NO_CONTENT.into_response(),
        Ok(Some(r)) if r.state != SandboxState::Destroyed && r.state != SandboxState::Error => {
            envd_error(
                StatusCode::BAD_GATEWAY,
                format!("sandbox {id} is {}", r.state.as_str()),
            )
        }
        _ => not_found_502(&id),
    }
}

/// The `X-Access-Token` of an envd call (surrounding whitespace is not part of it).
fn access_token_of(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim_matches([' ', '\t'])
        .to_string()
}

/// The answer to an envd call without the sandbox's token: the same for every id.
fn bad_token() -> Response {
    envd_error(
        StatusCode::UNAUTHORIZED,
        "missing or invalid X-Access-Token for this sandbox".into(),
    )
}

/// The sandbox an envd request is for: `E2b-Sandbox-Id`, else a Host of `49983-<id>.<domain>`.
pub fn sandbox_id_of(headers: &axum::http::HeaderMap) -> Option<String> {
    let valid = |s: &str| {
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if let Some(id) = headers.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()) {
        return valid(id).then(|| id.to_string());
    }
    let host = headers.get("host").and_then(|v| v.to_str().ok())?;
    let label = host.split('.').next()?;
    let (port, id) = label.split_once('-')?;
    (port == ENVD_PORT.to_string() && valid(id)).then(|| id.to_string())
}

/// envd's plain HTTP error body.
pub(crate) fn envd_error(status: StatusCode, message: String) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"code": status.as_u16(), "message": message})),
    )
        .into_response()
}

/// What E2B's sandbox proxy answers for a sandbox that is gone; the SDKs recognise the words
/// "was not found" and report the sandbox as not running.
fn not_found_502(id: &str) -> Response {
    envd_error(
        StatusCode::BAD_GATEWAY,
        format!("The sandbox {id} was not found"),
    )
}

/// An authenticated envd call: the sandbox (running), its owner and its guest, and the user the
/// call acts as (`Authorization: Basic <user>:`, else E2B's default `user`).
pub struct Envd {
    pub rec: SandboxRecord,
    pub owner: User,
    pub guest: GuestClient,
    pub user: String,
}

impl Envd {
    pub fn home(&self) -> String {
        home_of(&self.user)
    }

    /// envd resolves relative paths (and `~`) against the user's home directory.
    pub fn path(&self, p: &str) -> String {
        let home = self.home();
        if p.is_empty() || p == "~" {
            home
        } else if let Some(rest) = p.strip_prefix("~/") {
            format!("{home}/{rest}")
        } else if p.starts_with('/') {
            p.to_string()
        } else {
            format!("{home}/{p}")
        }
    }
}

pub fn home_of(user: &str) -> String {
    if user == "root" || user == "0" {
        "/root".into()
    } else {
        format!("/home/{user}")
    }
}

/// Why an envd call was refused before reaching the sandbox.
pub struct EnvdRejection(Response);

impl IntoResponse for EnvdRejection {
    fn into_response(self) -> Response {
        self.0
    }
}

impl FromRequestParts<AppState> for Envd {
    type Rejection = EnvdRejection;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let reject = |status, m: String| EnvdRejection(envd_error(status, m));
        // A signed file URL carries no header (a browser may open it): its signature names
        // the sandbox, found among the live ones.
        let mut id = sandbox_id_of(&parts.headers);
        if id.is_none() && parts.uri.query().unwrap_or_default().contains("signature=") {
            if let Ok(live) = state.control.store().live_sandboxes().await {
                id = live
                    .into_iter()
                    .map(|r| r.id)
                    .find(|id| state.e2b.signed_url_ok(id, parts));
            }
        }
        let Some(id) = id else {
            if parts.uri.query().unwrap_or_default().contains("signature=") {
                return Err(reject(
                    StatusCode::UNAUTHORIZED,
                    "the file URL's signature is invalid or has expired".into(),
                ));
            }
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "no sandbox named: send the E2b-Sandbox-Id header or use the host 49983-<id>.<domain>"
                    .into(),
            ));
        };
        let token = access_token_of(&parts.headers);
        // A wrong token and an unknown sandbox look the same, so tokens cannot probe for ids.
        if !state.e2b.token_ok(&id, &token) && !state.e2b.signed_url_ok(&id, parts) {
            return Err(EnvdRejection(bad_token()));
        }
        let rec = match state.control.store().sandbox(&id).await {
            Ok(Some(r)) if r.state != SandboxState::Destroyed => r,
            Ok(_) => {
                state.e2b.forget(&id);
                return Err(EnvdRejection(not_found_502(&id)));
            }
            Err(e) => return Err(reject(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        };
        let owner = User {
            id: rec.owner_id.clone(),
            name: String::new(),
            plan: String::new(),
            is_admin: false,
        };
        let (rec, guest) = match state.control.guest(&owner, &id).await {
            Ok(g) => g,
            Err(crate::control::ControlError::NotFound) => {
                return Err(EnvdRejection(not_found_502(&id)))
            }
            Err(e) => {
                return Err(reject(
                    StatusCode::BAD_GATEWAY,
                    format!("sandbox {id} cannot serve this call: {e}"),
                ))
            }
        };
        let user = basic_user(&parts.headers).unwrap_or_else(|| DEFAULT_USER.to_string());
        Ok(Envd {
            rec,
            owner,
            guest,
            user,
        })
    }
}

/// The user of `Authorization: Basic base64(<user>:)`, as the SDKs send it per call.
fn basic_user(headers: &axum::http::HeaderMap) -> Option<String> {
    use base64::Engine;
    let v = headers.get("authorization")?.to_str().ok()?;
    let b64 = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let user = s.split(':').next()?.trim();
    (!user.is_empty()).then(|| user.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_per_sandbox_and_per_server_secret() {
        let a = Facade::open(vec![7; 32], None, None).unwrap();
        let t = a.access_token("abc");
        assert!(a.token_ok("abc", &t));
        assert!(!a.token_ok("abd", &t));
        assert!(!a.token_ok("abc", "zz"));
        assert!(Facade::open(vec![7; 32], None, None)
            .unwrap()
            .token_ok("abc", &t));
        assert!(!Facade::open(vec![8; 32], None, None)
            .unwrap()
            .token_ok("abc", &t));
    }

    #[test]
    fn templates_map_to_images() {
        let f = Facade::open(vec![1; 32], None, Some(r#"{"python":"py-img"}"#)).unwrap();
        assert_eq!(f.image_for("base"), Some("system"));
        assert_eq!(f.image_for("python"), Some("py-img"));
        assert_eq!(f.image_for("nope"), None);
        assert!(Facade::open(vec![1; 32], None, Some("[1]")).is_err());
    }

    #[test]
    fn sandbox_ids_come_from_the_header_or_the_host() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("host", "49983-abc123.burrow.local".parse().unwrap());
        assert_eq!(sandbox_id_of(&h).as_deref(), Some("abc123"));
        h.insert("host", "8080-abc123.burrow.local".parse().unwrap());
        assert_eq!(sandbox_id_of(&h), None);
        h.insert("e2b-sandbox-id", "xyz".parse().unwrap());
        assert_eq!(sandbox_id_of(&h).as_deref(), Some("xyz"));
        h.insert("e2b-sandbox-id", "../etc".parse().unwrap());
        assert_eq!(sandbox_id_of(&h), None);
    }

    #[test]
    fn basic_auth_names_the_user() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("authorization", "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(basic_user(&h).as_deref(), Some("root"));
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert_eq!(basic_user(&h), None);
    }
}

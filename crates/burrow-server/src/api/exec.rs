//! Commands in a sandbox: buffered exec, streaming exec and terminals over WebSocket, and
//! background processes (list, attach, signal, kill).

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use burrow_node::guest::ExecEvent;
use burrow_proto::ExecSpec;
use burrow_store::User;
use burrow_types::{bounds, codes, ApiError, ExecRequest, ExecResult, ProcessInfo, PtySize};
use serde::{Deserialize, Serialize};

use super::error::HttpError;
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::{ws, AppState};
use crate::control::{error_chain, ControlError};

/// A command that cannot start (no such program, no such cwd or user) is the caller's mistake: 400
/// with the guest's code, not the 404 a missing file would be.
fn start_error(e: burrow_node::guest::GuestError) -> HttpError {
    let mut h = HttpError::from(e);
    if h.status == StatusCode::NOT_FOUND {
        h.status = StatusCode::BAD_REQUEST;
    }
    h
}

/// Who a command or file operation acts as: `root`, `user` or a uid the sandbox maps (the
/// OpenAPI document's pattern, checked here exactly).
pub fn check_user(user: Option<&str>) -> Result<(), HttpError> {
    let Some(u) = user else { return Ok(()) };
    // A sandbox maps uids 0-65535; digits only, so `+1` or ` 1` are not uids.
    let numeric = !u.is_empty()
        && u.len() <= 5
        && u.bytes().all(|b| b.is_ascii_digit())
        && u.parse::<u32>().is_ok_and(|n| n <= 65535);
    if u == "root" || u == "user" || numeric {
        Ok(())
    } else {
        Err(HttpError::bad_request(format!(
            "user {u:?} is unknown: use \"root\", \"user\" or a uid from 0 to 65535"
        )))
    }
}

/// A WebSocket upgrade, or a JSON `426` for a plain HTTP request to a WebSocket route.
pub struct Upgrade(pub WebSocketUpgrade);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Upgrade {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map(Upgrade)
            .map_err(|r| {
                HttpError::new(
                    StatusCode::UPGRADE_REQUIRED,
                    codes::BAD_REQUEST,
                    format!("this route speaks WebSocket: {}", r.body_text()),
                )
            })
    }
}

/// A buffered exec without `timeout_ms` is stopped after this, so no request waits forever.
pub const DEFAULT_EXEC_TIMEOUT_MS: u64 = 60_000;
/// The longest `timeout_ms` accepted (a week); a command never outlives its sandbox's maximum
/// duration either way.
pub const MAX_EXEC_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
const SIGKILL: i32 = 9;

/// A command's timeout never outlives its sandbox's maximum duration.
fn cap_timeout(mut spec: ExecSpec, rec: &burrow_store::SandboxRecord) -> ExecSpec {
    let max_ms = rec.limits.max_duration_s.saturating_mul(1000);
    spec.timeout_ms = spec.timeout_ms.map(|t| t.min(max_ms));
    spec
}

/// Checks an exec request (before the sandbox is looked up or a tool call counted) and makes it
/// the guest's spec.
fn spec_of(req: ExecRequest, default_ms: Option<u64>) -> Result<ExecSpec, HttpError> {
    if req.cmd.is_empty() || req.cmd[0].is_empty() {
        return Err(HttpError::bad_request("cmd must name a program"));
    }
    if req.cmd.len() > bounds::ARGS || req.cmd[0].chars().count() > bounds::PATH_CHARS {
        return Err(HttpError::bad_request(format!(
            "cmd: at most {} arguments, and a program name of at most {} characters",
            bounds::ARGS,
            bounds::PATH_CHARS
        )));
    }
    crate::control::validate_map("env", &req.env, bounds::ENV_ENTRIES, true)?;
    if let Some(cwd) = &req.cwd {
        super::files::check_path("cwd", cwd)?;
    }
    check_user(req.user.as_deref())?;
    if req
        .cmd
        .iter()
        .chain(req.env.keys())
        .chain(req.env.values())
        .any(|s| s.contains('\0'))
    {
        return Err(HttpError::bad_request(
            "cmd and env must not contain NUL bytes",
        ));
    }
    if let Some(t) = req.timeout_ms {
        if !(1..=MAX_EXEC_TIMEOUT_MS).contains(&t) {
            return Err(HttpError::out_of_range(
                "timeout_ms",
                1,
                MAX_EXEC_TIMEOUT_MS,
            ));
        }
    }
    if let Some(p) = req.pty {
        if p.cols == 0 {
            return Err(HttpError::out_of_range("pty.cols", 1, u16::MAX.into()));
        }
        if p.rows == 0 {
            return Err(HttpError::out_of_range("pty.rows", 1, u16::MAX.into()));
        }
    }
    Ok(ExecSpec {
        argv: req.cmd,
        env: req.env,
        cwd: req.cwd,
        user: req.user,
        pty: req.pty,
        stdin: req.stdin.is_some(),
        timeout_ms: req.timeout_ms.or(default_ms),
        background: req.background,
    })
}

/// Run a command and wait for it; output beyond the sandbox's limit is dropped and flagged.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", request_body = ExecRequest, tag = "exec",
    responses((status = 200, body = ExecResult), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn exec(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Json<ExecResult>, HttpError> {
    if req.background || req.pty.is_some() {
        return Err(HttpError::bad_request(
            "background and pty commands use /processes or the exec WebSocket, not buffered exec",
        ));
    }
    let stdin = req.stdin.clone().map(String::into_bytes);
    let spec = spec_of(req, Some(DEFAULT_EXEC_TIMEOUT_MS))?;
    let (rec, guest) = s.control.tool_call(&user, &id).await?;
    let spec = cap_timeout(spec, &rec);
    let out = s
        .control
        .while_running(
            &id,
            guest.exec_buffered(spec, stdin, rec.limits.output_bytes),
        )
        .await
        .map_err(|e| match e {
            ControlError::Guest(g) => start_error(g),
            other => other.into(),
        })?;
    Ok(Json(ExecResult {
        exit_code: out.exit_code,
        signal: out.signal,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout_truncated: out.stdout_truncated,
        stderr_truncated: out.stderr_truncated,
        truncated: out.stdout_truncated || out.stderr_truncated,
        timed_out: out.timed_out,
        duration_ms: out.duration.as_millis() as u64,
    }))
}

/// Streaming exec. The first client message is a JSON `ExecRequest`; then see `burrow_types::stream`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/exec/ws", tag = "exec",
    responses((status = 101, description = "switched to WebSocket"), (status = 426, body = ApiError, description = "not a WebSocket request")))]
pub async fn exec_ws(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    Upgrade(upgrade): Upgrade,
) -> Result<Response, HttpError> {
    let (rec, guest) = s.control.tool_call(&user, &id).await?;
    Ok(upgrade.on_upgrade(move |mut socket| async move {
        use axum::extract::ws::Message;
        let first =
            match tokio::time::timeout(std::time::Duration::from_secs(30), socket.recv()).await {
                Ok(Some(Ok(Message::Text(t)))) => t,
                _ => {
                    return ws::fail(
                        socket,
                        codes::BAD_REQUEST,
                        "expected an ExecRequest as the first message".into(),
                    )
                    .await
                }
            };
        let req: ExecRequest = match serde_json::from_str(&first) {
            Ok(r) => r,
            Err(e) => {
                return ws::fail(socket, codes::BAD_REQUEST, format!("bad ExecRequest: {e}")).await
            }
        };
        let spec = match spec_of(req, None) {
            Ok(spec) => {
                let mut spec = cap_timeout(spec, &rec);
                // Streaming clients send stdin themselves.
                spec.stdin = true;
                spec
            }
            Err(e) => return ws::fail(socket, e.code, e.message).await,
        };
        match guest.exec_stream(spec).await {
            Ok((input, output)) => ws::pump(socket, input, output).await,
            Err(e) => {
                let e = start_error(e);
                ws::fail(socket, e.code, e.message).await
            }
        }
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TerminalQuery {
    #[serde(default)]
    #[param(minimum = 1, maximum = 65535)]
    pub cols: Option<u16>,
    #[serde(default)]
    #[param(minimum = 1, maximum = 65535)]
    pub rows: Option<u16>,
    /// `root` (default), `user` or a uid from 0 to 65535.
    #[serde(default)]
    #[param(
        pattern = "^(root|user|[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
    )]
    pub user: Option<String>,
}

/// An interactive login shell under a PTY; same messages as the exec WebSocket.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/terminal", params(TerminalQuery), tag = "exec",
    responses((status = 101, description = "switched to WebSocket"), (status = 426, body = ApiError, description = "not a WebSocket request")))]
pub async fn terminal(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<TerminalQuery>,
    Upgrade(upgrade): Upgrade,
) -> Result<Response, HttpError> {
    let req = ExecRequest {
        cmd: vec!["/bin/bash".into(), "-l".into()],
        user: q.user,
        pty: Some(PtySize {
            cols: q.cols.unwrap_or(80),
            rows: q.rows.unwrap_or(24),
        }),
        ..Default::default()
    };
    let spec = spec_of(req, None)?;
    let (rec, guest) = s.control.guest(&user, &id).await?;
    let mut spec = cap_timeout(spec, &rec);
    spec.stdin = true;
    Ok(upgrade.on_upgrade(move |socket| async move {
        match guest.exec_stream(spec).await {
            Ok((input, output)) => ws::pump(socket, input, output).await,
            Err(e) => ws::fail(socket, codes::GUEST_UNREACHABLE, error_chain(&e)).await,
        }
    }))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Started {
    pub pid: u32,
}

/// Start a background process; it keeps running after this request and can be attached later.
/// Its stdin comes through attach (`stdin` here must be absent or empty).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes", request_body = ExecRequest, tag = "processes",
    responses((status = 201, body = Started), (status = 404, body = ApiError)))]
pub async fn start_process(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<(StatusCode, Json<Started>), HttpError> {
    if req.stdin.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(HttpError::bad_request(
            "a background process takes stdin through attach, not `stdin`",
        ));
    }
    let spec = spec_of(req, None)?;
    let (rec, guest) = s.control.tool_call(&user, &id).await?;
    let mut spec = cap_timeout(spec, &rec);
    spec.background = true;
    spec.stdin = true;
    let (_input, mut output) = s
        .control
        .while_running(&id, guest.exec_stream(spec))
        .await
        .map_err(|e| match e {
            ControlError::Guest(g) => start_error(g),
            e => e.into(),
        })?;
    match output.next().await? {
        Some(ExecEvent::Started { pid }) => Ok((StatusCode::CREATED, Json(Started { pid }))),
        _ => Err(HttpError::new(
            StatusCode::BAD_GATEWAY,
            codes::GUEST_UNREACHABLE,
            "the guest did not start the process",
        )),
    }
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes", tag = "processes", responses((status = 200, body = [ProcessInfo])))]
pub async fn list_processes(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Vec<ProcessInfo>>, HttpError> {
    let (_, guest) = s.control.guest(&user, &id).await?;
    Ok(Json(
        s.control.while_running(&id, guest.list_processes()).await?,
    ))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    pub signal: i32,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/signal", request_body = SignalRequest, tag = "processes",
    responses((status = 204), (status = 404, body = ApiError)))]
pub async fn signal_process(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    ApiJson(req): ApiJson<SignalRequest>,
) -> Result<StatusCode, HttpError> {
    if !(1..=64).contains(&req.signal) {
        return Err(HttpError::out_of_range("signal", 1, 64));
    }
    signal(&s, &user, &id, pid, req.signal).await
}

/// Kill a process (SIGKILL to its process group).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/processes/{pid}", tag = "processes",
    responses((status = 204), (status = 404, body = ApiError)))]
pub async fn kill_process(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
) -> Result<StatusCode, HttpError> {
    signal(&s, &user, &id, pid, SIGKILL).await
}

async fn signal(
    s: &AppState,
    user: &User,
    id: &str,
    pid: u32,
    sig: i32,
) -> Result<StatusCode, HttpError> {
    let (_, guest) = s.control.guest(user, id).await?;
    s.control.while_running(id, guest.signal(pid, sig)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Re-attach to a background process: its kept output, then live output and its exit.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}/attach", tag = "processes",
    responses((status = 101, description = "switched to WebSocket"), (status = 426, body = ApiError, description = "not a WebSocket request")))]
pub async fn attach(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    Upgrade(upgrade): Upgrade,
) -> Result<Response, HttpError> {
    let (_, guest) = s.control.guest(&user, &id).await?;
    // Attach before upgrading so an unknown pid is a plain 404.
    let (input, output) = s.control.while_running(&id, guest.attach(pid)).await?;
    Ok(upgrade.on_upgrade(move |socket| ws::pump(socket, input, output)))
}

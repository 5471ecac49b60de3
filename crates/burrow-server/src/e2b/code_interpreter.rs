//! The code-interpreter template (docs/code-interpreter.md, ADR 0070): what makes the unmodified
//! `e2b-code-interpreter` SDKs work against burrow.
//!
//! The SDK talks to a server inside the sandbox on port 49999 (`/execute`, `/contexts`), at
//! `E2B_SANDBOX_URL` with the headers `E2b-Sandbox-Id` and `E2b-Sandbox-Port`. This module owns
//! three things:
//! - **routing by header**: a request carrying `E2b-Sandbox-Port` (any port but envd's) goes to
//!   burrow's port proxy for that sandbox and port, which authenticates it first (ADR 0037);
//!   E2B's `E2B-Traffic-Access-Token` counts as the sandbox's access token;
//! - **setting up** a sandbox of the template: the server (`images/code-interpreter/`, our own
//!   program over Jupyter kernels) is started as the sandbox's `user` and waited for. While the
//!   template runs on the `system` image, the server and its packages come from a bundle on the
//!   host (`<data>/templates/code-interpreter-v1.tar.zst`, made by
//!   `images/code-interpreter/build-bundle.sh`), unpacked inside the sandbox by the sandbox's
//!   own `tar`: the host never writes into the sandbox's files;
//! - **restarting** the server when a request finds nothing on port 49999 (a sandbox that
//!   hibernated and came back cold has its files but no processes).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use burrow_node::guest::{ExecEvent, ExecSpec, GuestClient};
use burrow_store::User;
use burrow_types::codes;
use tokio::io::AsyncReadExt;

use crate::api::error::HttpError;
use crate::api::AppState;

/// The template name the SDK creates by default.
pub const TEMPLATE: &str = "code-interpreter-v1";
/// The port the SDK addresses the server on.
pub const PORT: u16 = 49999;
/// Where the server lives inside the sandbox (the bundle and the image both put it there).
const SERVER: &str = "/opt/burrow/code-interpreter/server.py";
/// How long the server may take to answer its first `/health` (it starts the default Python
/// kernel first; a loaded machine imports IPython slowly).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long unpacking the bundle may take.
const UNPACK_TIMEOUT: Duration = Duration::from_secs(300);
/// The largest request body buffered for a retry after a restart of the server (a cell's code).
const MAX_RETRY_BODY: usize = 16 * 1024 * 1024;
/// How much of a failed step's output goes into the error.
const ERROR_OUTPUT: usize = 2000;

/// Unpacks the bundle from stdin next to where it belongs, then moves it into place, so a
/// half-unpacked copy is never taken for the server. Runs inside the sandbox, as its root.
const UNPACK: &str = r#"set -e
mkdir -p /opt/burrow
d=$(mktemp -d /opt/burrow/.code-interpreter.XXXXXX)
tar --zstd -x --no-same-owner -C "$d"
chmod 755 "$d"
rm -rf /opt/burrow/code-interpreter
mv "$d" /opt/burrow/code-interpreter
"#;

/// Waits for the server's `/health` inside the sandbox. Arguments: the server's pid (0: do not
/// watch it) and the seconds to wait. Exit 0: ready; 2: not within the time; 3: the server exited.
const PROBE: &str = r#"import os, sys, time, urllib.request
pid, secs = int(sys.argv[1]), float(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
end = time.monotonic() + secs
while True:
    try:
        opener.open("http://127.0.0.1:49999/health", timeout=5).read()
        sys.exit(0)
    except Exception as e:
        err = e
    if pid and not os.path.exists(f"/proc/{pid}"):
        sys.exit(3)
    if time.monotonic() >= end:
        print(f"not ready: {err}", file=sys.stderr)
        sys.exit(2)
    time.sleep(0.1)
"#;

/// The template's state in the facade: where the bundle is, and one lock per sandbox so two
/// requests never set the same sandbox up at once.
#[derive(Default)]
pub struct CodeInterpreter {
    bundle: Option<PathBuf>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl CodeInterpreter {
    /// `templates_dir` holds `code-interpreter-v1.tar.zst`, looked for at each create (so a
    /// bundle built while the server runs is used without a restart).
    pub fn new(templates_dir: PathBuf) -> CodeInterpreter {
        CodeInterpreter {
            bundle: Some(templates_dir.join(format!("{TEMPLATE}.tar.zst"))),
            locks: Mutex::default(),
        }
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        super::lock(&self.locks)
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn release(&self, id: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = super::lock(&self.locks);
        // Ours and the map's: nobody else waits, so the entry can go.
        if Arc::strong_count(&lock) <= 2 {
            locks.remove(id);
        }
    }
}

/// Whether `template` is the code interpreter, and if so whether this server can make one:
/// checked before a sandbox exists, so a refusal leaves nothing behind.
pub(super) fn check_create(s: &AppState, template: &str, image: &str) -> Result<bool, HttpError> {
    if template != TEMPLATE {
        return Ok(false);
    }
    if s.control.network().is_none() {
        return Err(HttpError::new(
            StatusCode::NOT_IMPLEMENTED,
            codes::NETWORK_UNAVAILABLE,
            format!(
                "template {TEMPLATE:?} needs a server started with --network: the SDK reaches \
                 its kernel server on port {PORT} through burrow's port proxy"
            ),
        ));
    }
    if image == crate::control::DEFAULT_IMAGE && bundle(s).is_none() {
        let at = s
            .e2b
            .code_interpreter
            .bundle
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("<data dir>/templates/{TEMPLATE}.tar.zst"));
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            codes::UNKNOWN_IMAGE,
            format!(
                "template {TEMPLATE:?} is not installed on this server: build it with \
                 images/code-interpreter/build-bundle.sh {at}"
            ),
        ));
    }
    Ok(true)
}

fn bundle(s: &AppState) -> Option<PathBuf> {
    s.e2b
        .code_interpreter
        .bundle
        .clone()
        .filter(|p| p.is_file())
}

/// Sets up a new sandbox of the template: unpacks the server when the image has none and
/// starts it. On failure the sandbox is destroyed (it is new: nothing of the user's is in it).
pub(super) async fn prepare(s: &AppState, user: &User, id: &str) -> Result<(), HttpError> {
    match ensure_running(s, user, id, true).await {
        Ok(_) => Ok(()),
        Err(e) => {
            if let Err(d) = s.control.destroy(user, id).await {
                tracing::warn!(sandbox_id = id, error = %crate::control::error_chain(&d),
                    "could not destroy a code-interpreter sandbox whose setup failed");
            }
            Err(e)
        }
    }
}

/// Makes sure the server answers in sandbox `id`: returns at once when it does, else starts it
/// (unpacking the bundle first if `install` and the server is missing) and waits for it.
/// `Ok(false)`: the sandbox has no server and `install` was not asked.
async fn ensure_running(
    s: &AppState,
    owner: &User,
    id: &str,
    install: bool,
) -> Result<bool, HttpError> {
    let ci = &s.e2b.code_interpreter;
    let lock = ci.lock_for(id);
    let result = {
        let _held = lock.lock().await;
        start_if_needed(s, owner, id, install).await
    };
    ci.release(id, lock);
    result
}

async fn start_if_needed(
    s: &AppState,
    owner: &User,
    id: &str,
    install: bool,
) -> Result<bool, HttpError> {
    let (_, guest) = s.control.guest(owner, id).await?;
    if probe(&guest, 0, Duration::ZERO).await?.is_ok() {
        return Ok(true);
    }
    let started = std::time::Instant::now();
    let mut unpack_ms = 0;
    if guest.stat(SERVER).await.is_err() {
        if !install {
            return Ok(false);
        }
        let Some(bundle) = bundle(s) else {
            return Err(setup_failed(
                id,
                "the template's bundle is gone from the host".into(),
            ));
        };
        s.control
            .check_free_space("unpacking the code interpreter")?;
        unpack(&guest, id, &bundle).await?;
        unpack_ms = started.elapsed().as_millis() as u64;
    }
    let pid = start(&guest, id).await?;
    match probe(&guest, pid, READY_TIMEOUT).await? {
        Ok(()) => {
            tracing::info!(
                sandbox_id = id,
                unpack_ms,
                ready_ms = started.elapsed().as_millis() as u64,
                "code interpreter started"
            );
            Ok(true)
        }
        Err(why) => {
            let log = output_of(&guest, pid).await;
            Err(match why {
                Probe::NotReady => HttpError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::UNAVAILABLE,
                    format!(
                        "the code interpreter in sandbox {id} did not answer within {}s (the \
                         machine is busy?): {log}",
                        READY_TIMEOUT.as_secs()
                    ),
                )
                .with_retry_after(5),
                Probe::Exited => {
                    setup_failed(id, format!("the code-interpreter server exited: {log}"))
                }
            })
        }
    }
}

fn setup_failed(id: &str, why: String) -> HttpError {
    HttpError::new(
        StatusCode::BAD_GATEWAY,
        codes::PORT_CLOSED,
        format!("the code interpreter did not start in sandbox {id}: {why}"),
    )
}

fn guest_error(id: &str, what: &str, e: burrow_node::guest::GuestError) -> HttpError {
    HttpError::new(
        StatusCode::BAD_GATEWAY,
        codes::GUEST_UNREACHABLE,
        format!(
            "{what} in sandbox {id} failed: {}",
            crate::control::error_chain(&e)
        ),
    )
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let start = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| text.len() - i <= ERROR_OUTPUT)
        .unwrap_or(0);
    text[start..].to_string()
}

/// Streams the bundle into the sandbox's `tar` (as the sandbox's root).
async fn unpack(guest: &GuestClient, id: &str, bundle: &std::path::Path) -> Result<(), HttpError> {
    let spec = ExecSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), UNPACK.into()],
        user: Some("root".into()),
        stdin: true,
        timeout_ms: Some(UNPACK_TIMEOUT.as_millis() as u64),
        ..Default::default()
    };
    let (mut input, mut output) = guest
        .exec_stream(spec)
        .await
        .map_err(|e| guest_error(id, "unpacking the code interpreter", e))?;
    let mut file = tokio::fs::File::open(bundle).await.map_err(|e| {
        setup_failed(
            id,
            format!("cannot read the bundle {}: {e}", bundle.display()),
        )
    })?;
    let feed = async {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return Err(format!("reading the bundle: {e}")),
            };
            // `tar` may stop reading early (a full disk): its exit status says why.
            if input.stdin(&buf[..n]).await.is_err() {
                return Ok(());
            }
        }
        let _ = input.close_stdin().await;
        Ok(())
    };
    let collect = async {
        let mut stderr = Vec::new();
        loop {
            match output.next().await {
                Ok(Some(ExecEvent::Stderr(b))) | Ok(Some(ExecEvent::Stdout(b))) => {
                    if stderr.len() < 64 * 1024 {
                        stderr.extend_from_slice(&b);
                    }
                }
                Ok(Some(ExecEvent::Started { .. })) => {}
                Ok(Some(ExecEvent::Exited {
                    exit_code,
                    timed_out,
                    ..
                })) => return Ok((exit_code, timed_out, stderr)),
                Ok(None) => return Err("the guest closed the stream".to_string()),
                Err(e) => return Err(crate::control::error_chain(&e)),
            }
        }
    };
    let (fed, done) = tokio::join!(feed, collect);
    fed.map_err(|e| setup_failed(id, e))?;
    let (exit, timed_out, out) = done.map_err(|e| setup_failed(id, e))?;
    if exit == Some(0) {
        return Ok(());
    }
    let out = tail(&out);
    if out.contains("No space left") || out.contains("Disk quota exceeded") {
        return Err(HttpError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            codes::NO_SPACE,
            format!("the code interpreter does not fit on sandbox {id}'s disk: {out}"),
        ));
    }
    if timed_out {
        return Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::UNAVAILABLE,
            format!(
                "unpacking the code interpreter in sandbox {id} took over {}s (the machine is busy?)",
                UNPACK_TIMEOUT.as_secs()
            ),
        )
        .with_retry_after(5));
    }
    Err(setup_failed(id, format!("unpacking it failed: {out}")))
}

/// Starts the server as the sandbox's user, as a background process (it outlives this call,
/// and `commands.list()` shows it, as on E2B). Returns its pid inside the sandbox.
async fn start(guest: &GuestClient, id: &str) -> Result<u32, HttpError> {
    let spec = ExecSpec {
        argv: vec!["python3".into(), SERVER.into()],
        env: [("HOME".to_string(), super::home_of(super::DEFAULT_USER))].into(),
        cwd: Some(super::home_of(super::DEFAULT_USER)),
        user: Some(super::DEFAULT_USER.into()),
        background: true,
        ..Default::default()
    };
    let (_input, mut output) = guest
        .exec_stream(spec)
        .await
        .map_err(|e| guest_error(id, "starting the code interpreter", e))?;
    match output.next().await {
        Ok(Some(ExecEvent::Started { pid })) => Ok(pid),
        Ok(other) => Err(setup_failed(
            id,
            format!("the guest answered {other:?} to the start"),
        )),
        Err(e) => Err(guest_error(id, "starting the code interpreter", e)),
    }
}

enum Probe {
    NotReady,
    Exited,
}

/// Asks the server's `/health` from inside the sandbox (so it works whatever the network),
/// for up to `wait`.
async fn probe(
    guest: &GuestClient,
    pid: u32,
    wait: Duration,
) -> Result<Result<(), Probe>, HttpError> {
    let spec = ExecSpec {
        argv: vec![
            "python3".into(),
            "-c".into(),
            PROBE.into(),
            pid.to_string(),
            wait.as_secs().to_string(),
        ],
        user: Some(super::DEFAULT_USER.into()),
        timeout_ms: Some((wait + Duration::from_secs(30)).as_millis() as u64),
        ..Default::default()
    };
    let out = guest
        .exec_buffered(spec, None, 64 * 1024)
        .await
        .map_err(|e| HttpError::from(crate::control::ControlError::from(e)))?;
    Ok(match out.exit_code {
        Some(0) => Ok(()),
        Some(3) => Err(Probe::Exited),
        _ => Err(Probe::NotReady),
    })
}

/// The last of what the server printed (its own output is kept by burrow, as any command's).
async fn output_of(guest: &GuestClient, pid: u32) -> String {
    let Ok((_input, mut output)) = guest.attach(pid).await else {
        return "(its output is gone)".into();
    };
    let mut text = Vec::new();
    let read = async {
        while let Ok(Some(ev)) = output.next().await {
            match ev {
                ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => text.extend_from_slice(&b),
                ExecEvent::Exited { .. } => break,
                ExecEvent::Started { .. } => {}
            }
        }
    };
    // A server still running never ends its stream: what came so far is enough.
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    tail(&text)
}

/// Middleware: a request with `E2b-Sandbox-Port` (other than envd's) goes to that port of the
/// sandbox named by `E2b-Sandbox-Id`, through the port proxy. Anything else passes on.
pub async fn route_by_port_header(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(raw) = req.headers().get("e2b-sandbox-port") else {
        return next.run(req).await;
    };
    let Some(port) = raw
        .to_str()
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok())
        .filter(|p| *p > 0)
    else {
        return super::envd_error(
            StatusCode::BAD_REQUEST,
            "E2b-Sandbox-Port is not a port number (1-65535)".into(),
        );
    };
    if port == super::ENVD_PORT {
        return next.run(req).await;
    }
    let Some(id) = req
        .headers()
        .get("e2b-sandbox-id")
        .and_then(|_| super::sandbox_id_of(req.headers()))
    else {
        return super::envd_error(
            StatusCode::BAD_REQUEST,
            "E2b-Sandbox-Port needs the E2b-Sandbox-Id header naming the sandbox".into(),
        );
    };
    // E2B's traffic token is the sandbox's access token here (the create answer says so): the
    // SDK sends it alone on some calls. The proxy removes both before forwarding.
    let headers = req.headers_mut();
    if !headers.contains_key(crate::api::ports::TOKEN_HEADER) {
        if let Some(t) = headers.get("e2b-traffic-access-token").cloned() {
            headers.insert(crate::api::ports::TOKEN_HEADER, t);
        }
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    // Port 49999 with the sandbox's token: the request is kept so that it can be sent again
    // once a server that was not running (a sandbox back from hibernation) has been started.
    // Anything else streams straight to the proxy: nothing is buffered for a caller before the
    // proxy has decided it may use the port.
    let may_retry = port == PORT
        && state
            .e2b
            .token_ok(&id, &super::access_token_of(req.headers()));
    if !may_retry {
        return crate::api::ports::proxy(&state, &id, u32::from(port), pq, req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_RETRY_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::PAYLOAD_TOO_LARGE,
                format!(
                "the request to the code interpreter could not be read whole (at most {} MiB): {}",
                MAX_RETRY_BODY >> 20,
                crate::control::error_chain(&e)
            ),
            )
            .into_response()
        }
    };
    let again = || {
        let mut r = Request::new(Body::from(bytes.clone()));
        *r.method_mut() = parts.method.clone();
        *r.uri_mut() = parts.uri.clone();
        *r.headers_mut() = parts.headers.clone();
        r
    };
    let first = crate::api::ports::proxy(&state, &id, u32::from(PORT), pq.clone(), again()).await;
    if first.status() != StatusCode::BAD_GATEWAY {
        return first;
    }
    let (head, body) = first.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    // The proxy answers port_closed only to a caller it authorised, for a running sandbox.
    let closed = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| Some(v.get("code")?.as_str()? == codes::PORT_CLOSED))
        .unwrap_or(false);
    let first = Response::from_parts(head, Body::from(body));
    if !closed {
        return first;
    }
    let owner = match state.control.store().sandbox(&id).await {
        Ok(Some(rec)) => crate::control::owner_of(&rec),
        _ => return first,
    };
    match ensure_running(&state, &owner, &id, false).await {
        Ok(true) => crate::api::ports::proxy(&state, &id, u32::from(PORT), pq, again()).await,
        Ok(false) => first,
        Err(e) => e.into_response(),
    }
}

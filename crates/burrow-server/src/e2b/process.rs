//! envd's `process.Process` service over burrow's guest: every process is started as a burrow
//! background process, so (as in envd) it outlives the call that started it and can be listed,
//! re-connected, signalled and fed input later. Tags, env and cwd, which envd reports and the
//! guest does not keep, are kept here per sandbox.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use burrow_node::guest::{ExecEvent, ExecInput, ExecOutput, ExecSpec};
use burrow_types::PtySize;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::connect::{self, Code, RpcError};
use super::{lock, Envd};
use crate::api::AppState;

/// What envd reports about a process that burrow's guest does not keep.
#[derive(Debug, Clone, Default)]
pub struct ProcMeta {
    pub config: ProcessConfig,
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProcessConfig {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct Size {
    #[serde(default)]
    cols: u32,
    #[serde(default)]
    rows: u32,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct Pty {
    size: Option<Size>,
}

impl Pty {
    fn size(&self) -> Result<PtySize, RpcError> {
        let s = self.size.unwrap_or(Size { cols: 80, rows: 24 });
        let fit = |v: u32| u16::try_from(v).ok().filter(|v| *v > 0);
        match (fit(s.cols), fit(s.rows)) {
            (Some(cols), Some(rows)) => Ok(PtySize { cols, rows }),
            _ => Err(RpcError::invalid(
                "pty cols and rows must be between 1 and 65535",
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartRequest {
    process: Option<ProcessConfig>,
    pty: Option<Pty>,
    tag: Option<String>,
    stdin: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Selected {
    process: Option<Selector>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateRequest {
    process: Option<Selector>,
    pty: Option<Pty>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Input {
    stdin: Option<String>,
    pty: Option<String>,
}

impl Input {
    fn bytes(&self) -> Result<Vec<u8>, RpcError> {
        match (&self.stdin, &self.pty) {
            (Some(s), _) | (None, Some(s)) => connect::unb64(s),
            (None, None) => Ok(Vec::new()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendInputRequest {
    process: Option<Selector>,
    input: Option<Input>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendSignalRequest {
    process: Option<Selector>,
    signal: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct StreamInputRequest {
    start: Option<Selected>,
    data: Option<StreamData>,
    keepalive: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamData {
    input: Option<Input>,
}

/// `POST /process.Process/{method}`.
pub async fn call(
    State(s): State<AppState>,
    Path(method): Path<String>,
    envd: Envd,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if method == "StreamInput" {
        return stream_input(&s, &envd, &headers, body).await;
    }
    let body = match axum::body::to_bytes(body, connect::MAX_MESSAGE).await {
        Ok(b) => b,
        Err(e) => return RpcError::invalid(format!("request body: {e}")).into_response(),
    };
    match method.as_str() {
        "Start" => match connect::request::<StartRequest>(&headers, &body) {
            Ok(req) => start(&s, envd, &headers, req).await,
            Err(e) => connect::stream_error(e),
        },
        "Connect" => match connect::request::<Selected>(&headers, &body) {
            Ok(req) => attach(&s, envd, &headers, req).await,
            Err(e) => connect::stream_error(e),
        },
        "List" => unary(list(&s, &envd).await),
        "SendInput" => unary(send_input(&s, &envd, &headers, &body).await),
        "SendSignal" => unary(send_signal(&s, &envd, &headers, &body).await),
        "CloseStdin" => unary(close_stdin(&s, &envd, &headers, &body).await),
        "Update" => unary(update(&s, &envd, &headers, &body).await),
        other => RpcError::new(
            Code::Unimplemented,
            format!("process.Process/{other} is not a method burrow's E2B facade serves"),
        )
        .into_response(),
    }
}

fn unary(r: Result<serde_json::Value, RpcError>) -> Response {
    match r {
        Ok(v) => connect::unary(&v),
        Err(e) => e.into_response(),
    }
}

/// The pid a selector names (by pid, or by a tag given at Start).
fn resolve(s: &AppState, envd: &Envd, sel: Option<Selector>) -> Result<u32, RpcError> {
    let sel = sel.unwrap_or_default();
    if let Some(pid) = sel.pid {
        return Ok(pid);
    }
    let Some(tag) = sel.tag else {
        return Err(RpcError::invalid("process selector needs a pid or a tag"));
    };
    lock(&s.e2b.procs)
        .iter()
        .find(|((sid, _), m)| *sid == envd.rec.id && m.tag.as_deref() == Some(tag.as_str()))
        .map(|((_, pid), _)| *pid)
        .ok_or_else(|| RpcError::new(Code::NotFound, format!("no process with tag {tag:?}")))
}

async fn start(s: &AppState, envd: Envd, headers: &HeaderMap, req: StartRequest) -> Response {
    let config = req.process.unwrap_or_default();
    if config.cmd.is_empty() {
        return connect::stream_error(RpcError::invalid("process.cmd is empty"));
    }
    let pty = match req.pty.map(|p| p.size()).transpose() {
        Ok(p) => p,
        Err(e) => return connect::stream_error(e),
    };
    let mut argv = vec![config.cmd.clone()];
    argv.extend(config.args.iter().cloned());
    let spec = ExecSpec {
        argv,
        env: config.envs.clone(),
        cwd: config.cwd.as_deref().map(|c| envd.path(c)),
        user: Some(envd.user.clone()),
        pty,
        // envd's default when the field is absent (older SDKs) is an open stdin.
        stdin: req.stdin.unwrap_or(true) || pty.is_some(),
        timeout_ms: connect::timeout(headers)
            .map(|d| (d.as_millis() as u64).min(envd.rec.limits.max_duration_s * 1000)),
        // As in envd, a process outlives the call that started it.
        background: true,
    };
    let (input, output) = match envd.guest.exec_stream(spec).await {
        Ok(io) => io,
        Err(e) => {
            let mut e = RpcError::from(e);
            // A cwd or program that does not exist is the caller's mistake, as in envd.
            if e.code == Code::NotFound {
                e.code = Code::InvalidArgument;
            }
            return connect::stream_error(e);
        }
    };
    s.e2b.sweep(s.control.store()).await;
    let meta = ProcMeta {
        config,
        tag: req.tag,
    };
    let is_pty = pty.is_some();
    stream_events(s, envd, headers, input, output, Some(meta), is_pty).await
}

async fn attach(s: &AppState, envd: Envd, headers: &HeaderMap, req: Selected) -> Response {
    let pid = match resolve(s, &envd, req.process) {
        Ok(p) => p,
        Err(e) => return connect::stream_error(e),
    };
    let pty = is_pty(&envd, pid).await;
    match envd.guest.attach(pid).await {
        Ok((input, output)) => stream_events(s, envd, headers, input, output, None, pty).await,
        Err(e) => connect::stream_error(e.into()),
    }
}

fn event(ev: serde_json::Value) -> serde_json::Value {
    json!({ "event": ev })
}

fn signal_name(sig: i32) -> String {
    match sig {
        1 => "hangup".into(),
        2 => "interrupt".into(),
        9 => "killed".into(),
        15 => "terminated".into(),
        n => format!("signal {n}"),
    }
}

/// envd's end event, worded as Go's `os.ProcessState` words it.
fn end_event(exit_code: Option<i32>, signal: Option<i32>, timed_out: bool) -> serde_json::Value {
    let (code, exited, status) = match (exit_code, signal) {
        (Some(c), _) => (c, true, format!("exit status {c}")),
        (None, Some(sig)) => (-1, false, format!("signal: {}", signal_name(sig))),
        (None, None) => (-1, false, "unknown".to_string()),
    };
    let mut end = json!({"exitCode": code, "exited": exited, "status": status});
    if code != 0 {
        end["error"] = json!(if timed_out {
            format!("{status} (the command's timeout ran out)")
        } else {
            status.clone()
        });
    }
    event(json!({ "end": end }))
}

/// Forwards a guest process stream as envd `ProcessEvent`s until the process ends or the client
/// leaves (the process keeps running then).
async fn stream_events(
    s: &AppState,
    envd: Envd,
    headers: &HeaderMap,
    input: ExecInput,
    mut output: ExecOutput,
    meta: Option<ProcMeta>,
    pty: bool,
) -> Response {
    let (tx, resp) = connect::streaming();
    let keepalive = connect::keepalive(headers);
    let facade = s.e2b.clone();
    let sandbox = envd.rec.id.clone();
    tokio::spawn(async move {
        // The input half stays open for the stream's life: closing it early could read as the
        // caller going away.
        let _input = input;
        let mut meta = meta;
        let period = keepalive.unwrap_or(std::time::Duration::from_secs(3600));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            let next = tokio::select! {
                ev = output.next() => ev,
                // The client left while the process was quiet; it keeps running, as in envd.
                _ = tx.gone() => return,
                _ = tick.tick(), if keepalive.is_some() => {
                    if !tx.send(&event(json!({"keepalive": {}}))).await { return; }
                    continue;
                }
            };
            let msg = match next {
                Ok(Some(ExecEvent::Started { pid })) => {
                    if let Some(m) = meta.take() {
                        lock(&facade.procs).insert((sandbox.clone(), pid), m);
                    }
                    event(json!({"start": {"pid": pid}}))
                }
                Ok(Some(ExecEvent::Stdout(b))) => {
                    let field = if pty { "pty" } else { "stdout" };
                    event(json!({"data": { field: connect::b64(&b) }}))
                }
                Ok(Some(ExecEvent::Stderr(b))) => {
                    event(json!({"data": {"stderr": connect::b64(&b)}}))
                }
                Ok(Some(ExecEvent::Exited {
                    exit_code,
                    signal,
                    timed_out,
                })) => {
                    if tx.send(&end_event(exit_code, signal, timed_out)).await {
                        tx.end(None).await;
                    }
                    return;
                }
                Ok(None) => {
                    tx.end(Some(RpcError::new(
                        Code::Unavailable,
                        "the sandbox's guest agent closed the process stream",
                    )))
                    .await;
                    return;
                }
                Err(e) => {
                    tx.end(Some(e.into())).await;
                    return;
                }
            };
            if !tx.send(&msg).await {
                // The client left; the process keeps running, as in envd.
                return;
            }
            tick.reset();
        }
    });
    resp
}

async fn is_pty(envd: &Envd, pid: u32) -> bool {
    envd.guest
        .list_processes()
        .await
        .map(|ps| ps.iter().any(|p| p.pid == pid && p.pty))
        .unwrap_or(false)
}

async fn list(s: &AppState, envd: &Envd) -> Result<serde_json::Value, RpcError> {
    let procs = envd.guest.list_processes().await?;
    // What the facade kept about processes that have ended goes now.
    let meta = {
        let mut m = lock(&s.e2b.procs);
        m.retain(|(sid, pid), _| {
            *sid != envd.rec.id || procs.iter().any(|p| p.pid == *pid && p.running)
        });
        m.iter()
            .filter(|((sid, _), _)| *sid == envd.rec.id)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let processes: Vec<serde_json::Value> = procs
        .iter()
        .filter(|p| p.running)
        .map(|p| {
            let m = meta.get(&(envd.rec.id.clone(), p.pid));
            let config = m
                .map(|m| m.config.clone())
                .unwrap_or_else(|| ProcessConfig {
                    cmd: p.cmd.first().cloned().unwrap_or_default(),
                    args: p.cmd.iter().skip(1).cloned().collect(),
                    ..Default::default()
                });
            let mut v = json!({"config": config, "pid": p.pid});
            if let Some(tag) = m.and_then(|m| m.tag.clone()) {
                v["tag"] = json!(tag);
            }
            v
        })
        .collect();
    Ok(json!({ "processes": processes }))
}

async fn send_input(
    s: &AppState,
    envd: &Envd,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: SendInputRequest = connect::request(headers, body)?;
    let pid = resolve(s, envd, req.process)?;
    let data = req.input.unwrap_or_default().bytes()?;
    envd.guest
        .send_stdin(pid, data, false)
        .await
        .map_err(stdin_error)?;
    Ok(json!({}))
}

/// Input to a process whose stdin is closed (or was never opened) is a precondition failure.
fn stdin_error(e: burrow_node::guest::GuestError) -> RpcError {
    let mut r = RpcError::from(e);
    if r.code == Code::InvalidArgument {
        r.code = Code::FailedPrecondition;
    }
    r
}

async fn stream_input(s: &AppState, envd: &Envd, headers: &HeaderMap, body: Body) -> Response {
    let mut msgs = match connect::MessageStream::new(headers, body) {
        Ok(m) => m,
        Err(e) => return connect::stream_error(e),
    };
    let mut pid = None;
    let result: Result<(), RpcError> = async {
        while let Some(m) = msgs.next::<StreamInputRequest>().await? {
            if let Some(start) = m.start {
                pid = Some(resolve(s, envd, start.process)?);
            } else if let Some(data) = m.data {
                let Some(p) = pid else {
                    return Err(RpcError::invalid(
                        "the input stream must start with a start event",
                    ));
                };
                let bytes = data.input.unwrap_or_default().bytes()?;
                envd.guest
                    .send_stdin(p, bytes, false)
                    .await
                    .map_err(stdin_error)?;
            } else if m.keepalive.is_none() {
                return Err(RpcError::invalid("unknown input stream event"));
            }
        }
        Ok(())
    }
    .await;
    let (tx, resp) = connect::streaming();
    tokio::spawn(async move {
        match result {
            Ok(()) => {
                if tx.send(&json!({})).await {
                    tx.end(None).await;
                }
            }
            Err(e) => tx.end(Some(e)).await,
        }
    });
    resp
}

async fn send_signal(
    s: &AppState,
    envd: &Envd,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: SendSignalRequest = connect::request(headers, body)?;
    let pid = resolve(s, envd, req.process)?;
    let sig = match req.signal {
        Some(serde_json::Value::String(name)) => match name.as_str() {
            "SIGNAL_SIGKILL" => 9,
            "SIGNAL_SIGTERM" => 15,
            other => {
                return Err(RpcError::invalid(format!(
                    "signal {other:?}: envd knows SIGNAL_SIGTERM and SIGNAL_SIGKILL"
                )))
            }
        },
        Some(serde_json::Value::Number(n)) if n.as_i64() == Some(9) || n.as_i64() == Some(15) => {
            n.as_i64().unwrap_or(9) as i32
        }
        _ => {
            return Err(RpcError::invalid(
                "signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL",
            ))
        }
    };
    envd.guest.signal(pid, sig).await?;
    Ok(json!({}))
}

async fn close_stdin(
    s: &AppState,
    envd: &Envd,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: Selected = connect::request(headers, body)?;
    let pid = resolve(s, envd, req.process)?;
    envd.guest
        .send_stdin(pid, Vec::new(), true)
        .await
        .map_err(stdin_error)?;
    Ok(json!({}))
}

async fn update(
    s: &AppState,
    envd: &Envd,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: UpdateRequest = connect::request(headers, body)?;
    let pid = resolve(s, envd, req.process)?;
    if let Some(pty) = req.pty {
        envd.guest.resize(pid, pty.size()?).await?;
    }
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_read_like_envd() {
        let ok = end_event(Some(0), None, false);
        assert_eq!(ok["event"]["end"]["exitCode"], 0);
        assert!(ok["event"]["end"].get("error").is_none());
        let fail = end_event(Some(3), None, false);
        assert_eq!(fail["event"]["end"]["error"], "exit status 3");
        let killed = end_event(None, Some(9), true);
        assert_eq!(killed["event"]["end"]["exitCode"], -1);
        assert_eq!(killed["event"]["end"]["status"], "signal: killed");
    }
}

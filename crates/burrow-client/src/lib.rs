//! A client of burrow's REST + WebSocket API (used by the CLI, the benchmarks and the tests).
//! It knows nothing the OpenAPI document does not say.

use burrow_types::stream::{StreamEvent, StreamInput, STREAM_STDERR, STREAM_STDOUT};
use burrow_types::{
    ApiError, CreateSandbox, DirListing, ExecRequest, ExecResult, FileStat, ProcessInfo, Sandbox,
};
use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

mod images;
mod net;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the burrow server")]
    Http(#[from] reqwest::Error),
    #[error("{code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("websocket")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("unexpected response")]
    Json(#[from] serde_json::Error),
    #[error("invalid server URL {0:?}")]
    BadUrl(String),
}

impl ClientError {
    /// The API's stable error code, if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base_url: &str, api_key: &str) -> Client {
        Client {
            base: base_url.trim_end_matches('/').to_string(),
            key: api_key.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.key)
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.bytes().await?;
        Err(match serde_json::from_slice::<ApiError>(&body) {
            Ok(e) => ClientError::Api {
                status,
                code: e.code,
                message: e.message,
            },
            Err(_) => ClientError::Api {
                status,
                code: "http_error".into(),
                message: String::from_utf8_lossy(&body).chars().take(500).collect(),
            },
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = Self::check(rb.send().await?).await?;
        Ok(serde_json::from_slice(&resp.bytes().await?)?)
    }

    async fn empty(&self, rb: reqwest::RequestBuilder) -> Result<(), ClientError> {
        Self::check(rb.send().await?).await?;
        Ok(())
    }

    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.json(self.request(Method::GET, "/v1/health")).await
    }

    pub async fn create(&self, req: &CreateSandbox) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::POST, "/v1/sandboxes").json(req))
            .await
    }

    pub async fn list(&self) -> Result<Vec<Sandbox>, ClientError> {
        self.json(self.request(Method::GET, "/v1/sandboxes")).await
    }

    pub async fn get(&self, id: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/sandboxes/{id}")))
            .await
    }

    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.empty(self.request(Method::DELETE, &format!("/v1/sandboxes/{id}")))
            .await
    }

    pub async fn set_timeout(
        &self,
        id: &str,
        req: &burrow_types::SetTimeout,
    ) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(Method::POST, &format!("/v1/sandboxes/{id}/timeout"))
                .json(req),
        )
        .await
    }

    pub async fn pause(&self, id: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::POST, &format!("/v1/sandboxes/{id}/pause")))
            .await
    }

    pub async fn hibernate(&self, id: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::POST, &format!("/v1/sandboxes/{id}/hibernate")))
            .await
    }

    pub async fn resume(&self, id: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::POST, &format!("/v1/sandboxes/{id}/resume")))
            .await
    }

    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        self.json(
            self.request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                .json(req),
        )
        .await
    }

    pub async fn start_process(&self, id: &str, req: &ExecRequest) -> Result<u32, ClientError> {
        let v: serde_json::Value = self
            .json(
                self.request(Method::POST, &format!("/v1/sandboxes/{id}/processes"))
                    .json(req),
            )
            .await?;
        Ok(v["pid"].as_u64().unwrap_or_default() as u32)
    }

    pub async fn processes(&self, id: &str) -> Result<Vec<ProcessInfo>, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/sandboxes/{id}/processes")))
            .await
    }

    pub async fn signal(&self, id: &str, pid: u32, signal: i32) -> Result<(), ClientError> {
        let body = serde_json::json!({ "signal": signal });
        self.empty(
            self.request(
                Method::POST,
                &format!("/v1/sandboxes/{id}/processes/{pid}/signal"),
            )
            .json(&body),
        )
        .await
    }

    pub async fn kill(&self, id: &str, pid: u32) -> Result<(), ClientError> {
        self.empty(self.request(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}/processes/{pid}"),
        ))
        .await
    }

    /// Uploads `body` (anything reqwest can stream) to `path` inside the sandbox.
    pub async fn upload(
        &self,
        id: &str,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<FileStat, ClientError> {
        let rb = self
            .request(Method::PUT, &format!("/v1/sandboxes/{id}/files"))
            .query(&[("path", path)])
            .body(body);
        self.json(rb).await
    }

    /// Starts a download; read the body with `bytes_stream()`.
    pub async fn download(&self, id: &str, path: &str) -> Result<reqwest::Response, ClientError> {
        let rb = self
            .request(Method::GET, &format!("/v1/sandboxes/{id}/files"))
            .query(&[("path", path)]);
        Self::check(rb.send().await?).await
    }

    pub async fn stat(&self, id: &str, path: &str) -> Result<FileStat, ClientError> {
        self.json(
            self.request(Method::GET, &format!("/v1/sandboxes/{id}/files/stat"))
                .query(&[("path", path)]),
        )
        .await
    }

    pub async fn list_dir(
        &self,
        id: &str,
        path: &str,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<DirListing, ClientError> {
        let mut q = vec![("path", path.to_string())];
        if let Some(c) = cursor {
            q.push(("cursor", c.to_string()));
        }
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        self.json(
            self.request(Method::GET, &format!("/v1/sandboxes/{id}/files/list"))
                .query(&q),
        )
        .await
    }

    pub async fn mkdir(&self, id: &str, path: &str) -> Result<FileStat, ClientError> {
        let body = serde_json::json!({ "path": path });
        self.json(
            self.request(Method::POST, &format!("/v1/sandboxes/{id}/files/mkdir"))
                .json(&body),
        )
        .await
    }

    pub async fn rename(&self, id: &str, from: &str, to: &str) -> Result<FileStat, ClientError> {
        let body = serde_json::json!({ "from": from, "to": to });
        self.json(
            self.request(Method::POST, &format!("/v1/sandboxes/{id}/files/rename"))
                .json(&body),
        )
        .await
    }

    pub async fn remove(&self, id: &str, path: &str, recursive: bool) -> Result<(), ClientError> {
        let q = [
            ("path", path.to_string()),
            ("recursive", recursive.to_string()),
        ];
        self.empty(
            self.request(Method::DELETE, &format!("/v1/sandboxes/{id}/files"))
                .query(&q),
        )
        .await
    }

    pub async fn pools(&self) -> Result<Vec<burrow_types::PoolStatus>, ClientError> {
        self.json(self.request(Method::GET, "/v1/pools")).await
    }

    pub async fn put_pool(
        &self,
        name: &str,
        spec: &burrow_types::PoolSpec,
    ) -> Result<burrow_types::PoolStatus, ClientError> {
        self.json(
            self.request(Method::PUT, &format!("/v1/pools/{name}"))
                .json(spec),
        )
        .await
    }

    pub async fn delete_pool(&self, name: &str) -> Result<(), ClientError> {
        self.empty(self.request(Method::DELETE, &format!("/v1/pools/{name}")))
            .await
    }

    pub async fn start_run(
        &self,
        id: &str,
        run: &burrow_types::RunSpec,
    ) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(Method::POST, &format!("/v1/sandboxes/{id}/run"))
                .json(run),
        )
        .await
    }

    pub async fn end_run(&self, id: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::POST, &format!("/v1/sandboxes/{id}/run/end")))
            .await
    }

    /// Creates a user with one API key (admin key required). Returns the server's JSON, which holds
    /// `api_key`.
    pub async fn create_user(
        &self,
        name: &str,
        plan: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        self.create_user_with(name, plan, false).await
    }

    /// Like [`Client::create_user`]; `e2b_key` issues the key as `e2b_<hex>` (for the e2b SDKs).
    pub async fn create_user_with(
        &self,
        name: &str,
        plan: Option<&str>,
        e2b_key: bool,
    ) -> Result<serde_json::Value, ClientError> {
        let mut body = serde_json::json!({ "name": name, "plan": plan });
        if e2b_key {
            body["key_style"] = "e2b".into();
        }
        self.json(self.request(Method::POST, "/v1/admin/users").json(&body))
            .await
    }

    /// A user's quota: plan, override, effective and usage (admin key required).
    pub async fn quota(&self, user: &str) -> Result<serde_json::Value, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/admin/users/{user}/quota")))
            .await
    }

    /// Sets a user's quota override, or with `None` removes it (admin key required).
    pub async fn set_quota(
        &self,
        user: &str,
        quota: Option<&burrow_types::Quota>,
    ) -> Result<serde_json::Value, ClientError> {
        let path = format!("/v1/admin/users/{user}/quota");
        match quota {
            Some(q) => self.json(self.request(Method::PUT, &path).json(q)).await,
            None => self.json(self.request(Method::DELETE, &path)).await,
        }
    }

    /// Gives a user another plan (admin key required). Returns the server's JSON: the user and
    /// `plans_allowed`.
    pub async fn set_user_plan(
        &self,
        name: &str,
        plan: &str,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::json!({ "plan": plan });
        self.json(
            self.request(Method::PATCH, &format!("/v1/admin/users/{name}"))
                .json(&body),
        )
        .await
    }

    /// The caller's key for checking run callbacks' signatures (`GET /v1/callback-key`).
    pub async fn callback_key(&self) -> Result<serde_json::Value, ClientError> {
        self.json(self.request(Method::GET, "/v1/callback-key"))
            .await
    }

    /// Sends a request asking for the server's breakdown (`Burrow-Timing: 1`) and returns the
    /// decoded answer with the stages of its `Server-Timing` header, in milliseconds.
    pub async fn timed<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(T, Vec<(String, f64)>), ClientError> {
        let mut rb = self.request(method, path).header("burrow-timing", "1");
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = Self::check(rb.send().await?).await?;
        let stages = resp
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .map(parse_server_timing)
            .unwrap_or_default();
        let body = resp.bytes().await?;
        let value = if body.is_empty() {
            serde_json::from_slice(b"null")?
        } else {
            serde_json::from_slice(&body)?
        };
        Ok((value, stages))
    }

    /// Sends any request and returns status and body, for callers that test the API's edges.
    pub async fn raw<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(StatusCode, Vec<u8>), ClientError> {
        let mut rb = self.request(method, path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await?;
        Ok((resp.status(), resp.bytes().await?.to_vec()))
    }

    async fn websocket(&self, path_and_query: &str) -> Result<Session, ClientError> {
        let url = format!("{}{}", self.base, path_and_query);
        let ws_url = if let Some(rest) = url.strip_prefix("http://") {
            format!("ws://{rest}")
        } else if let Some(rest) = url.strip_prefix("https://") {
            format!("wss://{rest}")
        } else {
            return Err(ClientError::BadUrl(self.base.clone()));
        };
        let mut req = ws_url.into_client_request()?;
        let auth = format!("Bearer {}", self.key)
            .parse()
            .map_err(|_| ClientError::BadUrl("api key is not a header value".into()))?;
        req.headers_mut().insert("authorization", auth);
        let (ws, _) = match tokio_tungstenite::connect_async(req).await {
            Ok(ok) => ok,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp.body().clone().unwrap_or_default();
                let e: ApiError = serde_json::from_slice(&body).unwrap_or(ApiError {
                    code: "http_error".into(),
                    message: format!("status {status}"),
                    details: None,
                });
                return Err(ClientError::Api {
                    status,
                    code: e.code,
                    message: e.message,
                });
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Session::new(ws))
    }

    /// Runs a command with streamed output (and stdin, resize and signals).
    pub async fn exec_stream(&self, id: &str, req: &ExecRequest) -> Result<Session, ClientError> {
        let mut s = self
            .websocket(&format!("/v1/sandboxes/{id}/exec/ws"))
            .await?;
        s.input.text(serde_json::to_string(req)?).await?;
        Ok(s)
    }

    pub async fn terminal(
        &self,
        id: &str,
        cols: u16,
        rows: u16,
        user: Option<&str>,
    ) -> Result<Session, ClientError> {
        let user = user.map(|u| format!("&user={u}")).unwrap_or_default();
        self.websocket(&format!(
            "/v1/sandboxes/{id}/terminal?cols={cols}&rows={rows}{user}"
        ))
        .await
    }

    pub async fn attach(&self, id: &str, pid: u32) -> Result<Session, ClientError> {
        self.websocket(&format!("/v1/sandboxes/{id}/processes/{pid}/attach"))
            .await
    }
}

/// What a stream session delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Event(StreamEvent),
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A streaming exec, attach or terminal session: an input half and an output half, usable from
/// two tasks.
pub struct Session {
    pub input: SessionInput,
    pub output: SessionOutput,
}

impl Session {
    fn new(ws: WsStream) -> Session {
        let (sink, stream) = ws.split();
        Session {
            input: SessionInput { sink },
            output: SessionOutput { stream },
        }
    }

    /// Next output or event; `None` once the server closed the stream.
    pub async fn next(&mut self) -> Result<Option<Output>, ClientError> {
        self.output.next().await
    }

    pub async fn stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.input.stdin(data).await
    }

    pub async fn control(&mut self, input: &StreamInput) -> Result<(), ClientError> {
        self.input.control(input).await
    }
}

pub struct SessionInput {
    sink: futures_util::stream::SplitSink<WsStream, Message>,
}

impl SessionInput {
    pub async fn stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        Ok(self
            .sink
            .send(Message::Binary(data.to_vec().into()))
            .await?)
    }

    pub async fn control(&mut self, input: &StreamInput) -> Result<(), ClientError> {
        Ok(self
            .sink
            .send(Message::Text(serde_json::to_string(input)?.into()))
            .await?)
    }

    async fn text(&mut self, text: String) -> Result<(), ClientError> {
        Ok(self.sink.send(Message::Text(text.into())).await?)
    }
}

pub struct SessionOutput {
    stream: futures_util::stream::SplitStream<WsStream>,
}

impl SessionOutput {
    /// Next output or event; `None` once the server closed the stream.
    pub async fn next(&mut self) -> Result<Option<Output>, ClientError> {
        while let Some(msg) = self.stream.next().await {
            match msg? {
                Message::Binary(b) if !b.is_empty() => match b[0] {
                    STREAM_STDOUT => return Ok(Some(Output::Stdout(b[1..].to_vec()))),
                    STREAM_STDERR => return Ok(Some(Output::Stderr(b[1..].to_vec()))),
                    _ => continue,
                },
                Message::Text(t) => return Ok(Some(Output::Event(serde_json::from_str(&t)?))),
                Message::Close(_) => return Ok(None),
                _ => continue,
            }
        }
        Ok(None)
    }
}

/// `name;dur=<ms>, ...` (a `Server-Timing` value) as (name, milliseconds); metrics without a
/// duration are left out.
pub fn parse_server_timing(value: &str) -> Vec<(String, f64)> {
    value
        .split(',')
        .filter_map(|metric| {
            let mut parts = metric.trim().split(';');
            let name = parts.next()?.trim();
            let dur = parts.find_map(|p| p.trim().strip_prefix("dur="))?;
            Some((name.to_string(), dur.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod timing_tests {
    #[test]
    fn server_timing_values_parse_into_stages() {
        assert_eq!(
            super::parse_server_timing("store;dur=2.000, disk;desc=\"x\";dur=10.5, miss"),
            vec![("store".to_string(), 2.0), ("disk".to_string(), 10.5)]
        );
    }
}

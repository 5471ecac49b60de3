//! The port proxy: HTTP and WebSocket to a port inside a sandbox, by path
//! (`/v1/sandboxes/{id}/ports/{port}/...`) or by Host (`<port>-<id>.<domain>`).
//!
//! Access needs one of: the owner's API key, the sandbox's access token (`X-Access-Token` header
//! or `burrow_token` query parameter), or a signed URL (`burrow_exp` + `burrow_sig`); a port made
//! public needs none. Access is decided before anything else (ADR 0037): a caller without rights
//! gets one answer for every id and never touches the sandbox's idle clock. burrow's credentials
//! are removed before the request reaches the sandbox, in every spelling HTTP allows.
//!
//! Host routing is open to other handlers: a [`HostClaims`] maps a port to a handler of its own
//! (the E2B facade claims 49983 for envd), so `49983-<id>.<domain>` goes there instead of the proxy.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use burrow_types::codes;
use hyper_util::rt::TokioIo;

use super::error::HttpError;
use super::AppState;
use crate::auth::hash_key;
use crate::control::{error_chain, Control, ControlError};

/// Header that carries a sandbox's access token.
pub const TOKEN_HEADER: &str = "x-access-token";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A request routed by Host to a claimed port.
pub struct HostRequest {
    pub state: AppState,
    pub sandbox_id: String,
    pub port: u16,
    pub request: Request,
}

pub type HostHandler =
    Arc<dyn Fn(HostRequest) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// Ports whose `<port>-<id>.<domain>` requests go to a handler of their own instead of the proxy.
#[derive(Clone, Default)]
pub struct HostClaims(BTreeMap<u16, HostHandler>);

impl HostClaims {
    pub fn claim(mut self, port: u16, handler: HostHandler) -> HostClaims {
        self.0.insert(port, handler);
        self
    }
}

/// `<port>-<id>` of a Host header under `domain` (ports of either are ignored).
pub fn parse_host(host: &str, domain: &str) -> Option<(u16, String)> {
    let strip_port = |h: &str| -> String {
        h.rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(h, |(h, _)| h)
            .to_ascii_lowercase()
    };
    let (host, domain) = (strip_port(host), strip_port(domain));
    let label = host.strip_suffix(&domain)?.strip_suffix('.')?;
    let (port, id) = label.split_once('-')?;
    if id.is_empty() || id.contains('.') {
        return None;
    }
    Some((port.parse().ok()?, id.to_string()))
}

/// Middleware in front of the whole API: requests for `<port>-<id>.<domain>` never reach it.
pub async fn host_router(
    State((state, claims)): State<(AppState, HostClaims)>,
    req: Request,
    next: Next,
) -> Response {
    let target = state.control.domain().and_then(|d| {
        req.headers()
            .get("host")
            .and_then(|h| h.to_str().ok())
            .and_then(|h| parse_host(h, d))
    });
    let Some((port, id)) = target else {
        return next.run(req).await;
    };
    if let Some(handler) = claims.0.get(&port) {
        return handler(HostRequest {
            state,
            sandbox_id: id,
            port,
            request: req,
        })
        .await;
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    proxy(&state, &id, u32::from(port), pq, req).await
}

pub fn parse_port(p: &str) -> Result<u32, HttpError> {
    p.parse::<u32>()
        .map_err(|_| HttpError::bad_request(format!("port {p:?} is not a number (1-65535)")))
}

/// `ANY /v1/sandboxes/{id}/ports/{port}/`
pub async fn proxy_root(
    State(s): State<AppState>,
    Path((id, port)): Path<(String, String)>,
    req: Request,
) -> Response {
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    match parse_port(&port) {
        Ok(port) => proxy(&s, &id, port, format!("/{query}"), req).await,
        Err(e) => e.into_response(),
    }
}

/// `ANY /v1/sandboxes/{id}/ports/{port}/{*rest}`
pub async fn proxy_path(
    State(s): State<AppState>,
    Path((id, port, rest)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    // The raw path keeps the client's encoding; the extracted `rest` is decoded.
    let raw = req.uri().path();
    let marker = format!("/ports/{port}/");
    let tail = raw
        .find(&marker)
        .map(|i| raw[i + marker.len()..].to_string())
        .unwrap_or(rest);
    match parse_port(&port) {
        Ok(port) => proxy(&s, &id, port, format!("/{tail}{query}"), req).await,
        Err(e) => e.into_response(),
    }
}

/// The credential of one `Authorization` value when its scheme is Bearer, in any case and with
/// any whitespace HTTP allows around and between them (RFC 9110 §11.1: the scheme is
/// case-insensitive, and one or more spaces or tabs separate it from the credential).
pub fn bearer_credential(value: &str) -> Option<&str> {
    let v = value.trim_matches([' ', '\t']);
    let split = v.find([' ', '\t'])?;
    let (scheme, rest) = v.split_at(split);
    let cred = rest.trim_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !cred.is_empty()).then_some(cred)
}

/// Every credential a request to the port proxy carries, in every spelling burrow accepts:
/// `Authorization: Bearer` (any case, any whitespace, repeated), `X-API-Key` (E2B's), the
/// sandbox's access token (`X-Access-Token`, repeated, or `?burrow_token=`) and a signed URL.
#[derive(Debug, Default)]
struct Credentials {
    /// Bearer credentials and `X-API-Key` values: API keys, or the access token.
    keys: Vec<String>,
    /// `X-Access-Token` values and `burrow_token`.
    tokens: Vec<String>,
    signed: Option<(String, String)>,
}

impl Credentials {
    fn of(headers: &HeaderMap, ours: &BTreeMap<String, String>) -> Credentials {
        let values = |name: &str| -> Vec<String> {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(|v| v.trim_matches([' ', '\t']).to_string())
                .filter(|v| !v.is_empty())
                .collect()
        };
        let mut keys: Vec<String> = headers
            .get_all("authorization")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(bearer_credential)
            .map(str::to_string)
            .collect();
        keys.extend(values("x-api-key"));
        let mut tokens = values(TOKEN_HEADER);
        tokens.extend(ours.get("burrow_token").cloned());
        let signed = ours
            .get("burrow_exp")
            .cloned()
            .zip(ours.get("burrow_sig").cloned());
        Credentials {
            keys,
            tokens,
            signed,
        }
    }
}

/// The one answer a caller without rights gets, whatever the id (another tenant's, missing,
/// paused, running): nothing about the sandbox is looked at before this is decided.
fn no_rights() -> HttpError {
    HttpError::new(
        StatusCode::UNAUTHORIZED,
        codes::UNAUTHORIZED,
        "this port needs a token: the API key, the sandbox's access token (X-Access-Token), or a signed URL",
    )
}

/// Decides whether the caller may use `id:port`, before anything else happens: the idle clock
/// is not touched and the sandbox's state is not revealed. Tokens and signed URLs are checked
/// against the requested id alone (they are HMACs of it), so their answer is the same whether
/// or not the sandbox exists; an API key needs the owner, and a valid key of anyone else gets
/// the same 404 as an id that never existed.
async fn authorize(
    control: &Control,
    id: &str,
    port: u16,
    owner: Option<(&str, bool)>,
    creds: &Credentials,
) -> Result<(), HttpError> {
    let expected = control.access_token(id);
    let token_ok = |t: &str| Control::token_matches(&expected, t);
    if creds.tokens.iter().chain(&creds.keys).any(|t| token_ok(t)) {
        return Ok(());
    }
    let mut valid_key = false;
    for key in &creds.keys {
        match control.store().user_by_key_hash(&hash_key(key)).await {
            Ok(Some(user)) if owner.is_some_and(|(o, _)| o == user.id) => return Ok(()),
            Ok(Some(_)) => valid_key = true,
            Ok(None) => {}
            Err(e) => return Err(ControlError::from(e).into()),
        }
    }
    if valid_key {
        // Another tenant's key: the same answer as for a sandbox that does not exist.
        return Err(ControlError::NotFound.into());
    }
    if let Some((exp, sig)) = &creds.signed {
        if let Ok(exp) = exp.parse::<u64>() {
            let want = control.port_signature(id, port, exp);
            if Control::token_matches(&want, sig) {
                let now = burrow_store::now_unix().max(0) as u64;
                if exp < now {
                    return Err(HttpError::new(
                        StatusCode::UNAUTHORIZED,
                        codes::UNAUTHORIZED,
                        "this signed URL has expired",
                    ));
                }
                return Ok(());
            }
        }
    }
    // A public port needs no credential (and its traffic counts as activity: the owner opened
    // it to everyone).
    if owner.is_some_and(|(_, public)| public) {
        return Ok(());
    }
    Err(no_rights())
}

/// Whether an `Authorization` value carries one of burrow's credentials (then it never reaches
/// the sandbox): an API key of any user, this sandbox's access token, or anything shaped like
/// burrow's keys and tokens (a revoked key is still a secret).
async fn is_burrow_credential(control: &Control, id: &str, value: &str) -> bool {
    let v = value.trim_matches([' ', '\t']);
    let cred = bearer_credential(v).unwrap_or(v);
    let expected = control.access_token(id);
    if cred.starts_with(crate::auth::KEY_PREFIX)
        || cred.starts_with("bst_")
        || Control::token_matches(&expected, cred)
    {
        return true;
    }
    matches!(
        control.store().user_by_key_hash(&hash_key(cred)).await,
        Ok(Some(_))
    )
}

/// Headers that only ever carry burrow's (or E2B's) credentials, or are addressed to the proxy
/// itself (`Proxy-Authorization`, RFC 9110 §11.7.2: burrow is that proxy): never forwarded.
const CREDENTIAL_HEADERS: &[&str] = &[
    "x-api-key",
    TOKEN_HEADER,
    "e2b-traffic-access-token",
    "proxy-authorization",
];

/// Splits a path-and-query into the path and its query pairs, without burrow's own parameters.
fn split_query(pq: &str) -> (String, BTreeMap<String, String>, String) {
    let (path, q) = pq.split_once('?').unwrap_or((pq, ""));
    let mut ours = BTreeMap::new();
    let mut kept = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        // burrow's parameters in any spelling (`burrow%5Ftoken`, `BURROW_TOKEN`, `+` for space)
        // are burrow's: read here, never forwarded.
        let decode = |x: &str| {
            percent_encoding::percent_decode_str(&x.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        let name = decode(k).trim().to_ascii_lowercase();
        if name.starts_with("burrow_") {
            ours.entry(name).or_insert_with(|| decode(v));
        } else {
            kept.push(pair);
        }
    }
    let forwarded = if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    (path.to_string(), ours, forwarded)
}

/// Authenticates, then forwards `req` to `id:port` as `path_and_query`.
pub async fn proxy(state: &AppState, id: &str, port: u32, pq: String, req: Request) -> Response {
    match proxy_inner(state, id, port, pq, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn proxy_inner(
    state: &AppState,
    id: &str,
    port: u32,
    pq: String,
    mut req: Request,
) -> Result<Response, HttpError> {
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| HttpError::bad_request(format!("port {port} is out of range (1-65535)")))?;
    let (_, ours, forwarded) = split_query(&pq);
    let creds = Credentials::of(req.headers(), &ours);
    // Authenticate first: who may use this port is settled before the sandbox's state is looked
    // at or its idle clock touched.
    let found = state.control.port_lookup(id, port).await?;
    let owner = found.as_ref().map(|t| (t.owner_id.as_str(), t.public));
    authorize(&state.control, id, port, owner, &creds).await?;
    let target = state.control.port_target(found)?;
    let port = u32::from(port);

    let stream =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(HttpError::new(
                    StatusCode::BAD_GATEWAY,
                    codes::PORT_CLOSED,
                    format!("nothing answers on port {port} in the sandbox: {e}"),
                ))
            }
            Err(_) => {
                return Err(HttpError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    codes::PORT_CLOSED,
                    format!("port {port} in the sandbox did not accept within {CONNECT_TIMEOUT:?}"),
                ))
            }
        };
    let client_upgrade = req
        .headers()
        .contains_key("upgrade")
        .then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut out = axum::http::Request::builder()
        .method(parts.method)
        .uri(
            forwarded
                .parse::<Uri>()
                .map_err(|e| HttpError::bad_request(e.to_string()))?,
        )
        .body(body)
        .map_err(|e| HttpError::bad_request(e.to_string()))?;
    let headers = out.headers_mut();
    for (k, v) in parts.headers.iter() {
        let name = k.as_str();
        if CREDENTIAL_HEADERS.contains(&name) {
            continue;
        }
        if name == "authorization" {
            let burrows = match v.to_str() {
                Ok(v) => is_burrow_credential(&state.control, id, v).await,
                Err(_) => true,
            };
            if burrows {
                continue;
            }
        }
        headers.append(k.clone(), v.clone());
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));

    let bad_gateway = |e: hyper::Error| {
        HttpError::new(
            StatusCode::BAD_GATEWAY,
            codes::PORT_CLOSED,
            format!(
                "the sandbox's port {port} broke the connection: {}",
                error_chain(&e)
            ),
        )
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(bad_gateway)?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = sender.send_request(out).await.map_err(bad_gateway)?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let server_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(s))
                            .await;
                }
            });
        }
    }
    Ok(resp.map(Body::new))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burrow_node::{Backend, Liveness, NodeError, RuntimeInfo, SandboxSpec};
    use tower::ServiceExt;

    /// A backend that builds nothing: these tests only route requests.
    struct NoBackend;

    impl Backend for NoBackend {
        fn name(&self) -> &'static str {
            "none"
        }
        fn create(&self, _: &SandboxSpec) -> Result<RuntimeInfo, NodeError> {
            Err(NodeError::Setup("no backend".into()))
        }
        fn destroy(&self, _: &str, _: Option<&RuntimeInfo>) -> Result<(), NodeError> {
            Ok(())
        }
        fn stop(&self, _: &str, _: Option<&RuntimeInfo>) -> Result<(), NodeError> {
            Ok(())
        }
        fn probe(&self, _: &str, _: &RuntimeInfo) -> Liveness {
            Liveness::Gone
        }
        fn pause(&self, _: &str) -> Result<(), NodeError> {
            Ok(())
        }
        fn resume(&self, _: &str) -> Result<(), NodeError> {
            Ok(())
        }
        fn set_limits(&self, _: &str, _: &burrow_types::Limits) -> Result<(), NodeError> {
            Ok(())
        }
        fn set_hostname(&self, _: &str, _: &RuntimeInfo, _: &str) -> Result<(), NodeError> {
            Ok(())
        }
        fn host_sandboxes(&self) -> Result<Vec<String>, NodeError> {
            Ok(Vec::new())
        }
    }

    fn state() -> AppState {
        let store = burrow_store::AsyncStore::new(Arc::new(
            burrow_store_sqlite::SqliteStore::open_in_memory().unwrap(),
        ));
        let control = Control::new(store, Arc::new(NoBackend), burrow_types::Plan::defaults())
            .with_domain(Some("sb.test".into()));
        AppState {
            control: Arc::new(control),
            e2b: Arc::new(crate::e2b::Facade::open(vec![0; 32], None, None).unwrap()),
        }
    }

    async fn get(app: axum::Router, host: &str, path: &str) -> (StatusCode, String) {
        let req = axum::http::Request::builder()
            .uri(path)
            .header("host", host)
            .body(Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The hook the E2B facade uses: a claimed port's Host route goes to its handler, other ports
    /// to the proxy, and other hosts to the API.
    #[tokio::test]
    async fn a_claimed_port_goes_to_its_own_handler() {
        let claims = HostClaims::default().claim(
            49983,
            Arc::new(|r: HostRequest| {
                Box::pin(async move {
                    format!(
                        "envd for {} on {}{}",
                        r.sandbox_id,
                        r.port,
                        r.request.uri().path()
                    )
                    .into_response()
                })
            }),
        );
        let app = crate::api::router_with(state(), claims);
        let (st, body) = get(app.clone(), "49983-abc.sb.test", "/files").await;
        assert_eq!(
            (st, body.as_str()),
            (StatusCode::OK, "envd for abc on 49983/files")
        );
        // An unclaimed port goes to the proxy, which asks for credentials before anything else.
        let (st, body) = get(app.clone(), "8000-abc.sb.test", "/").await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body.contains("unauthorized"), "{body}");
        // Any other host is the API.
        let (st, body) = get(app, "api.example", "/v1/health").await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }

    #[test]
    fn hosts_name_a_port_and_a_sandbox() {
        assert_eq!(
            parse_host("8000-abc123.sb.test", "sb.test"),
            Some((8000, "abc123".into()))
        );
        assert_eq!(
            parse_host("8000-abc123.sb.test:7070", "sb.test:7070"),
            Some((8000, "abc123".into()))
        );
        assert_eq!(parse_host("sb.test", "sb.test"), None);
        assert_eq!(parse_host("x-abc.sb.test", "sb.test"), None);
        assert_eq!(parse_host("8000-abc.evil.test", "sb.test"), None);
        assert_eq!(parse_host("8000-a.b.sb.test", "sb.test"), None);
        assert_eq!(parse_host("99999-abc.sb.test", "sb.test"), None);
    }

    #[test]
    fn burrow_parameters_are_taken_out_of_the_query() {
        let (path, ours, fwd) = split_query("/a/b?x=1&burrow_token=t%21&y=2&burrow_sig=s");
        assert_eq!(path, "/a/b");
        assert_eq!(ours["burrow_token"], "t!");
        assert_eq!(ours["burrow_sig"], "s");
        assert_eq!(fwd, "/a/b?x=1&y=2");
        assert_eq!(split_query("/").2, "/");
        // Every spelling of a burrow parameter is burrow's, and none is forwarded.
        let (_, ours, fwd) =
            split_query("/?burrow%5Ftoken=a&BURROW_TOKEN=b&Burrow_Exp=1&burrow_sig+=c&keep=1");
        assert_eq!(ours["burrow_token"], "a");
        assert_eq!(ours["burrow_exp"], "1");
        assert_eq!(ours["burrow_sig"], "c");
        assert_eq!(fwd, "/?keep=1");
    }

    #[test]
    fn bearer_credentials_in_every_spelling() {
        for v in [
            "Bearer k",
            "bearer k",
            "BEARER k",
            "bEaReR   k",
            "Bearer\tk",
            " Bearer k \t",
        ] {
            assert_eq!(bearer_credential(v), Some("k"), "{v:?}");
        }
        for v in ["Bearerk", "Basic k", "Bearer", "Bearer   ", "k"] {
            assert_eq!(bearer_credential(v), None, "{v:?}");
        }
    }
}

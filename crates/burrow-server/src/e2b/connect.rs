//! The Connect protocol (connectrpc.com/docs/protocol) with the JSON codec, as envd speaks it:
//! unary calls are a plain JSON body both ways (errors: an HTTP status and `{"code","message"}`);
//! streaming calls use `application/connect+json` envelopes (one flag byte, a 32-bit big-endian
//! length, the message) and end with an end-stream envelope (flag 2) that carries any error.
//! Only the JSON codec is served: the binary one is refused by name.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use burrow_node::guest::GuestError;
use burrow_types::codes;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

/// Largest request message we accept (envd's requests are small JSON; input chunks included).
pub const MAX_MESSAGE: usize = 4 << 20;

const FLAG_END_STREAM: u8 = 0b10;
const FLAG_COMPRESSED: u8 = 0b01;

/// Connect's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
        }
    }

    /// The HTTP status of a unary error with this code (the protocol's table).
    pub fn status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::REQUEST_TIMEOUT,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn unimplemented(what: &str) -> Self {
        Self::new(
            Code::Unimplemented,
            format!("{what} is not supported by burrow's E2B facade"),
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }
}

impl From<GuestError> for RpcError {
    fn from(e: GuestError) -> Self {
        match e {
            GuestError::Remote { code, message } => {
                let c = match code.as_str() {
                    codes::FILE_NOT_FOUND | codes::PROCESS_NOT_FOUND => Code::NotFound,
                    codes::PERMISSION_DENIED => Code::PermissionDenied,
                    codes::NOT_A_DIRECTORY
                    | codes::IS_A_DIRECTORY
                    | codes::NOT_REGULAR_FILE
                    | codes::INVALID_PATH
                    | codes::BAD_REQUEST => Code::InvalidArgument,
                    codes::ALREADY_EXISTS => Code::AlreadyExists,
                    codes::DIRECTORY_NOT_EMPTY => Code::FailedPrecondition,
                    codes::NO_SPACE | codes::LIMIT_EXCEEDED => Code::ResourceExhausted,
                    codes::UNAVAILABLE => Code::Unavailable,
                    _ => Code::Internal,
                };
                RpcError::new(c, message)
            }
            other => RpcError::new(
                Code::Unavailable,
                format!(
                    "the sandbox's guest agent did not answer: {}",
                    crate::control::error_chain(&other)
                ),
            ),
        }
    }
}

/// A unary error response.
impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        if self.code == Code::Internal {
            tracing::warn!(message = %self.message, "e2b rpc failed");
        }
        (
            self.code.status(),
            [(header::CONTENT_TYPE, "application/json")],
            self.json().to_string(),
        )
            .into_response()
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Whether this call is a streaming one (`application/connect+...`).
pub fn is_streaming(headers: &HeaderMap) -> bool {
    content_type(headers).starts_with("application/connect+")
}

fn check_codec(headers: &HeaderMap) -> Result<(), RpcError> {
    let ct = content_type(headers);
    match ct.as_str() {
        "application/json" | "application/connect+json" => Ok(()),
        "application/proto" | "application/connect+proto" => Err(RpcError::unimplemented(
            "the binary protobuf codec (use JSON)",
        )),
        other => Err(RpcError::invalid(format!(
            "unsupported content type {other:?}: envd calls are Connect with the JSON codec"
        ))),
    }
}

/// The `Connect-Timeout-Ms` deadline of a call, if any.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let ms: u64 = headers
        .get("connect-timeout-ms")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// How often a streaming call should send keepalives (`Keepalive-Ping-Interval`, seconds).
pub fn keepalive(headers: &HeaderMap) -> Option<Duration> {
    let s: u64 = headers
        .get("keepalive-ping-interval")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (s > 0).then(|| Duration::from_secs(s))
}

fn parse<T: DeserializeOwned>(data: &[u8]) -> Result<T, RpcError> {
    serde_json::from_slice(data).map_err(|e| RpcError::invalid(format!("malformed message: {e}")))
}

/// The request message of a unary call or of a server-streaming call (one envelope).
pub fn request<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, RpcError> {
    check_codec(headers)?;
    if !is_streaming(headers) {
        return parse(if body.is_empty() { b"{}" } else { body });
    }
    let (flags, msg, rest) = split_envelope(body)?
        .ok_or_else(|| RpcError::invalid("the request has no message envelope"))?;
    if flags & FLAG_COMPRESSED != 0 {
        return Err(RpcError::unimplemented("compressed messages"));
    }
    if !rest.is_empty() && split_envelope(rest)?.is_some_and(|(f, _, _)| f & FLAG_END_STREAM == 0) {
        return Err(RpcError::invalid(
            "a server-streaming call takes one message",
        ));
    }
    parse(msg)
}

/// An envelope's flags and message, and what follows it.
type Split<'a> = (u8, &'a [u8], &'a [u8]);

/// One envelope off the front of `buf`, or None while `buf` holds no whole envelope yet.
fn split_envelope_partial(buf: &[u8]) -> Result<Option<Split<'_>>, RpcError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("message of {len} bytes is over the {MAX_MESSAGE}-byte limit"),
        ));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    Ok(Some((buf[0], &buf[5..5 + len], &buf[5 + len..])))
}

/// One envelope off the front of a whole body: None when it is empty, an error when truncated.
fn split_envelope(buf: &[u8]) -> Result<Option<Split<'_>>, RpcError> {
    if buf.is_empty() {
        return Ok(None);
    }
    split_envelope_partial(buf)?
        .map(Some)
        .ok_or_else(|| RpcError::invalid("truncated envelope"))
}

/// The messages of a client-streaming request body, read as they arrive.
pub struct MessageStream {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
    done: bool,
}

impl MessageStream {
    pub fn new(headers: &HeaderMap, body: Body) -> Result<Self, RpcError> {
        check_codec(headers)?;
        if !is_streaming(headers) {
            return Err(RpcError::invalid(
                "a client-streaming call needs application/connect+json",
            ));
        }
        Ok(MessageStream {
            body: body.into_data_stream(),
            buf: Vec::new(),
            done: false,
        })
    }

    /// The next message, or None at the end of the stream.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, RpcError> {
        loop {
            if let Some((flags, msg, _)) = split_envelope_partial(&self.buf)? {
                let used = 5 + msg.len();
                if flags & FLAG_END_STREAM != 0 {
                    self.done = true;
                    return Ok(None);
                }
                if flags & FLAG_COMPRESSED != 0 {
                    return Err(RpcError::unimplemented("compressed messages"));
                }
                let parsed = parse(msg);
                self.buf.drain(..used);
                return parsed.map(Some);
            }
            if self.done {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(RpcError::invalid("truncated envelope"))
                };
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    return Err(RpcError::new(
                        Code::Canceled,
                        format!("request stream: {e}"),
                    ))
                }
                None => self.done = true,
            }
        }
    }
}

/// A unary success.
pub fn unary<T: Serialize>(msg: &T) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(msg).unwrap_or_else(|_| "{}".into()),
    )
        .into_response()
}

fn envelope(flags: u8, json: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(json.len() + 5);
    v.push(flags);
    v.extend_from_slice(&(json.len() as u32).to_be_bytes());
    v.extend_from_slice(json);
    Bytes::from(v)
}

/// The sending half of a streaming response.
pub struct Sender {
    tx: mpsc::Sender<Bytes>,
}

impl Sender {
    /// Sends one message; false when the client has gone away.
    pub async fn send<T: Serialize>(&self, msg: &T) -> bool {
        let json = serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec());
        self.tx.send(envelope(0, &json)).await.is_ok()
    }

    /// Ends the stream, with an error or without.
    pub async fn end(self, error: Option<RpcError>) {
        let body = match error {
            None => serde_json::json!({}),
            Some(e) => serde_json::json!({"error": e.json()}),
        };
        let _ = self
            .tx
            .send(envelope(FLAG_END_STREAM, body.to_string().as_bytes()))
            .await;
    }

    pub fn closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the client has gone away.
    pub async fn gone(&self) {
        self.tx.closed().await
    }
}

/// A streaming response whose messages come from the returned [`Sender`].
pub fn streaming() -> (Sender, Response) {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/connect+json")],
        Body::from_stream(stream),
    )
        .into_response();
    (Sender { tx }, resp)
}

/// A streaming response that fails at once.
pub fn stream_error(e: RpcError) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/connect+json")],
        envelope(
            FLAG_END_STREAM,
            serde_json::json!({"error": e.json()})
                .to_string()
                .as_bytes(),
        ),
    )
        .into_response()
}

/// Protobuf JSON for `bytes`: standard base64.
pub fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Protobuf JSON parsers accept standard or URL-safe base64, padded or not.
pub fn unb64(s: &str) -> Result<Vec<u8>, RpcError> {
    use base64::Engine;
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines
        .iter()
        .find_map(|e| e.decode(s).ok())
        .ok_or_else(|| RpcError::invalid("bytes field is not base64"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        h
    }

    #[test]
    fn unary_and_enveloped_requests_parse() {
        let v: serde_json::Value =
            request(&headers("application/json"), br#"{"path":"/a"}"#).unwrap();
        assert_eq!(v["path"], "/a");
        let body = envelope(0, br#"{"path":"/b"}"#);
        let v: serde_json::Value = request(&headers("application/connect+json"), &body).unwrap();
        assert_eq!(v["path"], "/b");
        let err = request::<serde_json::Value>(&headers("application/proto"), b"").unwrap_err();
        assert_eq!(err.code, Code::Unimplemented);
        let err = request::<serde_json::Value>(&headers("application/connect+json"), &body[..7])
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
    }

    #[tokio::test]
    async fn client_streams_split_across_chunks() {
        let mut all = envelope(0, br#"{"n":1}"#).to_vec();
        all.extend_from_slice(&envelope(0, br#"{"n":2}"#));
        all.extend_from_slice(&envelope(FLAG_END_STREAM, b"{}"));
        let chunks: Vec<Result<Bytes, std::io::Error>> = all
            .chunks(3)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let mut s = MessageStream::new(&headers("application/connect+json"), body).unwrap();
        let a: serde_json::Value = s.next().await.unwrap().unwrap();
        let b: serde_json::Value = s.next().await.unwrap().unwrap();
        assert_eq!((a["n"].as_u64(), b["n"].as_u64()), (Some(1), Some(2)));
        assert!(s.next::<serde_json::Value>().await.unwrap().is_none());
    }

    #[test]
    fn bytes_round_trip() {
        assert_eq!(unb64(&b64(b"\x00hi\xff")).unwrap(), b"\x00hi\xff");
        assert_eq!(unb64("_w").unwrap(), vec![0xff]);
    }
}

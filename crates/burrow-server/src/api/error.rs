//! The one mapping from errors to HTTP: every error body is `{"code", "message"}` with a stable code.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use burrow_node::guest::GuestError;
use burrow_store::StoreError;
use burrow_types::{codes, ApiError, ErrorReason};

use crate::control::{error_chain, ControlError};

#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Structured facts about the error (for a limit: the reason with `limit` and `observed`).
    pub details: Option<serde_json::Value>,
    /// Seconds after which the same request may succeed (`Retry-After`): busy, full or over a
    /// rate.
    pub retry_after: Option<u64>,
}

impl HttpError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        HttpError {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    /// An error whose structured reason (a limit, a failed resume) goes in `details`.
    pub fn with_reason(status: StatusCode, code: &'static str, why: &ErrorReason) -> Self {
        let mut e = HttpError::new(status, code, why.message.clone());
        e.details = serde_json::to_value(why).ok();
        e
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// `field` is outside `min..=max`: a 400 that names both.
    pub fn out_of_range(field: &str, min: u64, max: u64) -> Self {
        Self::bad_request(format!("{field} must be between {min} and {max}"))
            .with_details(serde_json::json!({"field": field, "minimum": min, "maximum": max}))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, message)
    }

    pub fn body(&self) -> ApiError {
        ApiError {
            code: self.code.to_string(),
            message: self.message.clone(),
            details: self.details.clone(),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Seconds to suggest before retrying, by what went wrong with the database.
pub fn store_retry_after(e: &StoreError) -> u64 {
    if e.is_busy() {
        1
    } else {
        5
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        match e.unavailable_code() {
            Some(code) => {
                let status = if code == codes::NO_SPACE {
                    StatusCode::INSUFFICIENT_STORAGE
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let retry = store_retry_after(&e);
                HttpError::new(status, code, error_chain(&e)).with_retry_after(retry)
            }
            None => HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::INTERNAL,
                error_chain(&e),
            ),
        }
    }
}

/// Status for an error code the guest agent returned.
fn guest_status(code: &str) -> (StatusCode, &'static str) {
    use StatusCode as S;
    // Codes come from the sandbox, which is not trusted: only known ones pass through.
    let known: &[(&'static str, StatusCode)] = &[
        (codes::FILE_NOT_FOUND, S::NOT_FOUND),
        (codes::PROCESS_NOT_FOUND, S::NOT_FOUND),
        (codes::PERMISSION_DENIED, S::FORBIDDEN),
        (codes::NOT_A_DIRECTORY, S::BAD_REQUEST),
        (codes::IS_A_DIRECTORY, S::BAD_REQUEST),
        (codes::NOT_REGULAR_FILE, S::BAD_REQUEST),
        (codes::INVALID_PATH, S::BAD_REQUEST),
        (codes::BAD_REQUEST, S::BAD_REQUEST),
        (codes::ALREADY_EXISTS, S::CONFLICT),
        (codes::DIRECTORY_NOT_EMPTY, S::CONFLICT),
        (codes::NO_SPACE, S::INSUFFICIENT_STORAGE),
        (codes::LIMIT_EXCEEDED, S::PAYLOAD_TOO_LARGE),
    ];
    known
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(c, s)| (*s, *c))
        .unwrap_or((S::INTERNAL_SERVER_ERROR, codes::INTERNAL))
}

impl From<GuestError> for HttpError {
    fn from(e: GuestError) -> Self {
        match e {
            GuestError::Remote { code, message } => {
                let (status, code) = guest_status(&code);
                HttpError::new(status, code, message)
            }
            other => HttpError::new(
                StatusCode::BAD_GATEWAY,
                codes::GUEST_UNREACHABLE,
                format!(
                    "the sandbox's guest agent did not answer: {}",
                    error_chain(&other)
                ),
            ),
        }
    }
}

impl From<ControlError> for HttpError {
    fn from(e: ControlError) -> Self {
        use StatusCode as S;
        match e {
            ControlError::NotFound => {
                HttpError::new(S::NOT_FOUND, codes::SANDBOX_NOT_FOUND, "sandbox not found")
            }
            ControlError::NotRunning(state) => HttpError::new(
                S::CONFLICT,
                codes::SANDBOX_NOT_RUNNING,
                format!("sandbox is {state}, not running"),
            ),
            e @ ControlError::WrongState { .. } => {
                HttpError::new(S::CONFLICT, codes::CONFLICT, e.to_string())
            }
            e @ ControlError::UnknownPlan { .. } => {
                HttpError::new(S::BAD_REQUEST, codes::UNKNOWN_PLAN, e.to_string())
            }
            e @ ControlError::UnknownImage { .. } => {
                HttpError::new(S::BAD_REQUEST, codes::UNKNOWN_IMAGE, e.to_string())
            }
            ControlError::BadRequest(m) => HttpError::bad_request(m),
            e @ ControlError::IsolationUnavailable(_) => {
                HttpError::new(S::BAD_REQUEST, codes::ISOLATION_UNAVAILABLE, e.to_string())
            }
            ref e @ ControlError::PlanNotAllowed {
                ref plan,
                ref user_plan,
                ref allowed,
            } => {
                let mut h = HttpError::new(S::FORBIDDEN, codes::PLAN_NOT_ALLOWED, e.to_string());
                h.details = Some(serde_json::json!({
                    "plan": plan, "user_plan": user_plan, "allowed": allowed
                }));
                h
            }
            // A well-formed URL whose target the server's rules refuse (an operator can allow a
            // range): a refusal like a plan above the user's, not a malformed request.
            ControlError::CallbackNotAllowed(m) => {
                HttpError::new(S::FORBIDDEN, codes::CALLBACK_NOT_ALLOWED, m)
            }
            e @ ControlError::NoNetwork => {
                HttpError::new(S::CONFLICT, codes::NETWORK_UNAVAILABLE, e.to_string())
            }
            ControlError::ToolCallsExceeded(why) => {
                HttpError::with_reason(S::TOO_MANY_REQUESTS, codes::TOOL_ITERATIONS_EXCEEDED, &why)
            }
            e @ ControlError::Interrupted(_) => {
                HttpError::new(S::CONFLICT, codes::SANDBOX_NOT_RUNNING, e.to_string())
            }
            e @ ControlError::RunEnded => {
                HttpError::new(S::CONFLICT, codes::RUN_ENDED, e.to_string())
            }
            e @ ControlError::NoActiveRun => {
                HttpError::new(S::CONFLICT, codes::NO_RUN, e.to_string())
            }
            e @ ControlError::UnknownPool { .. } => {
                HttpError::new(S::NOT_FOUND, codes::UNKNOWN_POOL, e.to_string())
            }
            ControlError::Guest(g) => g.into(),
            ControlError::InsufficientStorage(why) => {
                HttpError::with_reason(S::INSUFFICIENT_STORAGE, codes::INSUFFICIENT_STORAGE, &why)
                    .with_retry_after(crate::control::storage::RETRY_AFTER_S)
            }
            ControlError::ResumeFailed(why) => {
                HttpError::with_reason(S::INTERNAL_SERVER_ERROR, codes::RESUME_FAILED, &why)
            }
            ControlError::Store(e) => e.into(),
            e @ ControlError::IdempotencyKeyReused => HttpError::new(
                S::UNPROCESSABLE_ENTITY,
                codes::IDEMPOTENCY_KEY_REUSED,
                e.to_string(),
            ),
            e @ ControlError::IdempotencyInProgress => {
                HttpError::new(S::CONFLICT, codes::IDEMPOTENCY_IN_PROGRESS, e.to_string())
                    .with_retry_after(5)
            }
            ControlError::QuotaExceeded {
                details,
                retry_after_s,
            } => HttpError::new(
                S::TOO_MANY_REQUESTS,
                codes::QUOTA_EXCEEDED,
                details["message"].as_str().unwrap_or("quota exceeded"),
            )
            .with_details(details)
            .with_retry_after(retry_after_s),
            ControlError::HostFull(details) => HttpError::new(
                S::SERVICE_UNAVAILABLE,
                codes::HOST_FULL,
                details["message"].as_str().unwrap_or("the host is full"),
            )
            .with_details(details)
            .with_retry_after(30),
            ControlError::OutOfRange { field, min, max } => {
                HttpError::out_of_range(field, min, max)
            }
            ref e if crate::control::is_storage_full(e) => HttpError::new(
                S::INSUFFICIENT_STORAGE,
                codes::INSUFFICIENT_STORAGE,
                format!("the host's data filesystem is full: {}", error_chain(e)),
            )
            .with_retry_after(crate::control::storage::RETRY_AFTER_S),
            other => HttpError::new(
                S::INTERNAL_SERVER_ERROR,
                codes::INTERNAL,
                error_chain(&other),
            ),
        }
    }
}

/// Whether an error (or one of its causes) is a request body that came too slowly.
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<crate::serve::BodyTimeout>() {
            return true;
        }
        cur = c.source();
    }
    false
}

/// The request body came too slowly: 408, and the connection is closed.
pub fn body_timeout() -> HttpError {
    HttpError::new(
        StatusCode::REQUEST_TIMEOUT,
        codes::REQUEST_TIMEOUT,
        "the request body arrived too slowly",
    )
}

impl From<JsonRejection> for HttpError {
    fn from(r: JsonRejection) -> Self {
        if is_body_timeout(&r) {
            return body_timeout();
        }
        // axum answers 422 for well-formed JSON of the wrong shape; to a client both are a bad request.
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::PAYLOAD_TOO_LARGE,
                r.body_text(),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => HttpError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                codes::BAD_REQUEST,
                r.body_text(),
            ),
            _ => HttpError::bad_request(r.body_text()),
        }
    }
}

impl From<QueryRejection> for HttpError {
    fn from(r: QueryRejection) -> Self {
        HttpError::bad_request(r.body_text())
    }
}

impl From<PathRejection> for HttpError {
    fn from(r: PathRejection) -> Self {
        HttpError::bad_request(r.body_text())
    }
}

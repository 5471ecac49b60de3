//! Files inside a sandbox. Every path is resolved by the guest agent inside the sandbox's own root,
//! so no path or symlink can name a host file. Up- and downloads stream in bounded chunks.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use burrow_types::{ApiError, DirListing, FileStat};
use futures_util::StreamExt;
use serde::Deserialize;

use super::error::HttpError;
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::AppState;
use burrow_store::User;
use burrow_types::bounds;

/// Entries per listing page when the caller gives no limit, and the most it may ask for.
const DEFAULT_PAGE: u32 = 200;
const MAX_PAGE: u32 = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// Path inside the sandbox (relative paths start at `/`).
    #[param(min_length = 1, max_length = 4096, pattern = "^[^\\u0000]+$")]
    pub path: String,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    #[param(min_length = 1, max_length = 4096, pattern = "^[^\\u0000]+$")]
    pub path: String,
    /// Permission bits in octal, e.g. `755`.
    #[serde(default)]
    #[param(pattern = "^[0-7]{1,4}$")]
    pub mode: Option<String>,
    /// Owner of new files and directories: `root` (default), `user` or a uid from 0 to 65535.
    #[serde(default)]
    #[param(
        pattern = "^(root|user|[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
    )]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RemoveQuery {
    #[param(min_length = 1, max_length = 4096, pattern = "^[^\\u0000]+$")]
    pub path: String,
    /// Remove a directory and everything in it.
    #[serde(default)]
    #[param(required = false)]
    pub recursive: bool,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    #[param(min_length = 1, max_length = 4096, pattern = "^[^\\u0000]+$")]
    pub path: String,
    /// From the previous page's `next_cursor`.
    #[serde(default)]
    #[param(pattern = "^[0-9]{0,18}$")]
    pub cursor: Option<String>,
    /// Entries per page (200 when absent).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// A path inside a sandbox as the OpenAPI document bounds it (the guest checks the rest: at
/// most 4096 bytes, components of at most 255).
pub fn check_path(field: &str, p: &str) -> Result<(), HttpError> {
    if p.is_empty() || p.contains('\0') || p.chars().count() > bounds::PATH_CHARS {
        // The same code the guest gives a path it refuses.
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            burrow_types::codes::INVALID_PATH,
            format!(
                "{field} must be 1 to {} characters without NUL",
                bounds::PATH_CHARS
            ),
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirRequest {
    pub path: String,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    pub from: String,
    pub to: String,
}

/// Download a regular file as a byte stream.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", params(PathQuery), tag = "files",
    responses((status = 200, content_type = "application/octet-stream"), (status = 404, body = ApiError)))]
pub async fn download(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Response, HttpError> {
    check_path("path", &q.path)?;
    let (_, guest) = s.control.tool_call(&user, &id).await?;
    // Errors before the first byte (missing file, FIFO, directory) are proper HTTP errors.
    let download = guest.read_file(q.path).await?;
    let size = download.size;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            ("x-file-size".parse().unwrap(), size.to_string()),
        ],
        download_body(download),
    )
        .into_response())
}

/// A download as a response body. An error after the first chunk ends the response early: the
/// client sees a truncated transfer, not a short file passed off as whole.
pub fn download_body(download: burrow_node::guest::FileDownload) -> Body {
    let stream = futures_util::stream::unfold(Some(download), |state| async move {
        let mut dl = state?;
        match dl.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok(bytes::Bytes::from(chunk)), Some(dl))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    Body::from_stream(stream)
}

/// Upload a file (the request body, streamed); parent directories are created.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", params(UploadQuery), tag = "files",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = FileStat), (status = 507, body = ApiError)))]
pub async fn upload(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    body: Body,
) -> Result<Json<FileStat>, HttpError> {
    check_path("path", &q.path)?;
    super::exec::check_user(q.user.as_deref())?;
    let mode = match q.mode.as_deref() {
        None => None,
        Some(m) if (1..=4).contains(&m.len()) && m.bytes().all(|b| (b'0'..=b'7').contains(&b)) => {
            u32::from_str_radix(m, 8).ok()
        }
        Some(m) => {
            return Err(HttpError::bad_request(format!(
                "mode {m:?} is not octal permission bits (1 to 4 digits 0-7)"
            )))
        }
    };
    let mut chunks = body.into_data_stream();
    let result = write_body(&s, &user, &id, q, mode, &mut chunks).await;
    if result.is_err() {
        // Read (and drop) the rest of the body before answering, so the client can finish sending
        // and read the error instead of seeing a reset connection.
        drain(chunks).await;
    }
    result.map(Json)
}

async fn write_body(
    s: &AppState,
    user: &User,
    id: &str,
    q: UploadQuery,
    mode: Option<u32>,
    chunks: &mut axum::body::BodyDataStream,
) -> Result<FileStat, HttpError> {
    s.control.check_free_space("an upload")?;
    let (_, guest) = s.control.tool_call(user, id).await?;
    let mut upload = guest.write_file(q.path, mode, q.user).await?;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| {
            if super::error::is_body_timeout(&e) {
                super::error::body_timeout()
            } else {
                HttpError::bad_request(format!("reading the request body: {e}"))
            }
        })?;
        if let Err(e) = upload.write(&chunk).await {
            // The guest may have refused (no space, not a regular file): its reason beats the
            // broken pipe we saw.
            return Err(upload.finish().await.err().unwrap_or(e).into());
        }
    }
    Ok(upload.finish().await?)
}

/// Bounded: a client that keeps sending past these gets the connection closed instead.
const DRAIN_BYTES: usize = 256 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(30);

async fn drain(mut chunks: axum::body::BodyDataStream) {
    let read = async {
        let mut n = 0;
        while let Some(Ok(c)) = chunks.next().await {
            n += c.len();
            if n > DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// Metadata of a path (symlinks are not followed).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/stat", params(PathQuery), tag = "files",
    responses((status = 200, body = FileStat), (status = 404, body = ApiError)))]
pub async fn stat(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Json<FileStat>, HttpError> {
    check_path("path", &q.path)?;
    let (_, guest) = s.control.tool_call(&user, &id).await?;
    Ok(Json(
        s.control.while_running(&id, guest.stat(q.path)).await?,
    ))
}

/// One page of a directory listing.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", params(ListQuery), tag = "files",
    responses((status = 200, body = DirListing), (status = 404, body = ApiError)))]
pub async fn list(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<DirListing>, HttpError> {
    check_path("path", &q.path)?;
    let cursor = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) if c.len() <= 18 && c.bytes().all(|b| b.is_ascii_digit()) => c.parse::<u64>().ok(),
        Some(_) => return Err(HttpError::bad_request("cursor is not one this server gave")),
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(HttpError::out_of_range("limit", 1, MAX_PAGE.into()));
    }
    let (_, guest) = s.control.tool_call(&user, &id).await?;
    let (entries, next) = s
        .control
        .while_running(&id, guest.list_dir(q.path, cursor, limit))
        .await?;
    Ok(Json(DirListing {
        entries,
        next_cursor: next.map(|c| c.to_string()),
    }))
}

/// Create a directory and its parents.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/mkdir", request_body = MkdirRequest, tag = "files",
    responses((status = 200, body = FileStat)))]
pub async fn mkdir(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<MkdirRequest>,
) -> Result<Json<FileStat>, HttpError> {
    check_path("path", &req.path)?;
    super::exec::check_user(req.user.as_deref())?;
    let (_, guest) = s.control.tool_call(&user, &id).await?;
    Ok(Json(
        s.control
            .while_running(&id, guest.make_dir(req.path, req.user))
            .await?,
    ))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/rename", request_body = RenameRequest, tag = "files",
    responses((status = 200, body = FileStat)))]
pub async fn rename(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RenameRequest>,
) -> Result<Json<FileStat>, HttpError> {
    check_path("from", &req.from)?;
    check_path("to", &req.to)?;
    let (_, guest) = s.control.tool_call(&user, &id).await?;
    Ok(Json(
        s.control
            .while_running(&id, guest.rename(req.from, req.to))
            .await?,
    ))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", params(RemoveQuery), tag = "files",
    responses((status = 204), (status = 404, body = ApiError)))]
pub async fn remove(
    State(s): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> Result<StatusCode, HttpError> {
    check_path("path", &q.path)?;
    let (_, guest) = s.control.tool_call(&user, &id).await?;
    s.control
        .while_running(&id, guest.remove(q.path, q.recursive))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

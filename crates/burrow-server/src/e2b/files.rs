//! envd's file transfer API: `GET /files?path=` streams a file out, `POST /files` writes one or
//! more files (multipart, one part per file named by its path, or a raw octet-stream body for
//! the `path` in the query). Errors are envd's plain JSON `{"code": <status>, "message"}`.

use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use burrow_node::guest::GuestError;
use burrow_types::codes;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::{envd_error, Envd};
use crate::api::AppState;

#[derive(Debug, Default, Deserialize)]
pub struct FileQuery {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    username: Option<String>,
}

fn guest_error(e: GuestError) -> Response {
    let status = match e.code() {
        Some(codes::FILE_NOT_FOUND) => StatusCode::NOT_FOUND,
        Some(codes::PERMISSION_DENIED) => StatusCode::FORBIDDEN,
        Some(codes::NO_SPACE) => StatusCode::INSUFFICIENT_STORAGE,
        Some(
            codes::IS_A_DIRECTORY
            | codes::NOT_A_DIRECTORY
            | codes::NOT_REGULAR_FILE
            | codes::INVALID_PATH
            | codes::BAD_REQUEST
            | codes::ALREADY_EXISTS,
        ) => StatusCode::BAD_REQUEST,
        Some(codes::LIMIT_EXCEEDED) => StatusCode::PAYLOAD_TOO_LARGE,
        Some(_) => StatusCode::INTERNAL_SERVER_ERROR,
        None => StatusCode::BAD_GATEWAY,
    };
    envd_error(status, crate::control::error_chain(&e))
}

fn with_user(mut envd: Envd, q: &FileQuery) -> Envd {
    if let Some(u) = q.username.as_deref().filter(|u| !u.is_empty()) {
        envd.user = u.to_string();
    }
    envd
}

/// `GET /files?path=&username=`.
pub async fn download(envd: Envd, Query(q): Query<FileQuery>) -> Response {
    let envd = with_user(envd, &q);
    let Some(path) = q.path.as_deref().filter(|p| !p.is_empty()) else {
        return envd_error(StatusCode::BAD_REQUEST, "path is required".into());
    };
    let path = envd.path(path);
    let download = match envd.guest.read_file(path).await {
        Ok(d) => d,
        Err(e) => return guest_error(e),
    };
    let size = download.size;
    let mut resp = crate::api::files::download_body(download).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if size > 0 {
        if let Ok(v) = size.to_string().parse() {
            h.insert("x-file-size", v);
        }
    }
    resp
}

/// Writes one file from a stream of chunks; returns envd's `{name, type, path}`.
async fn write_one<S, E>(
    envd: &Envd,
    path: &str,
    mut chunks: S,
) -> Result<serde_json::Value, Response>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let path = envd.path(path);
    let mut up = envd
        .guest
        .write_file(path.clone(), None, Some(envd.user.clone()))
        .await
        .map_err(guest_error)?;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk
            .map_err(|e| envd_error(StatusCode::BAD_REQUEST, format!("reading the upload: {e}")))?;
        up.write(&chunk).await.map_err(guest_error)?;
    }
    let st = up.finish().await.map_err(guest_error)?;
    Ok(json!({"name": st.name, "type": "file", "path": st.path}))
}

/// `POST /files?path=&username=`: multipart (`file` parts named by their paths) or an
/// `application/octet-stream` body.
pub async fn upload(
    State(s): State<AppState>,
    envd: Envd,
    Query(q): Query<FileQuery>,
    headers: HeaderMap,
    req: Request,
) -> Response {
    let envd = with_user(envd, &q);
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.eq_ignore_ascii_case("identity"))
    {
        return envd_error(
            StatusCode::BAD_REQUEST,
            "compressed (gzip) uploads are not supported by burrow's E2B facade; upload without gzip"
                .into(),
        );
    }
    // Under the data filesystem's watermark, new data is refused before any of it is written.
    if let Err(e) = s.control.check_free_space("an upload") {
        let mut r = envd_error(StatusCode::INSUFFICIENT_STORAGE, e.to_string());
        r.headers_mut().insert(
            header::RETRY_AFTER,
            crate::control::storage::RETRY_AFTER_S.into(),
        );
        return r;
    }
    let mut written = Vec::new();
    if ct.starts_with("multipart/form-data") {
        let mut mp = match Multipart::from_request(req, &s).await {
            Ok(m) => m,
            Err(e) => return envd_error(StatusCode::BAD_REQUEST, e.body_text()),
        };
        let mut index = 0usize;
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return envd_error(StatusCode::BAD_REQUEST, e.body_text()),
            };
            // envd: the query's path names a single file; otherwise each part's file name is
            // its path.
            let path = match (index, q.path.as_deref(), field.file_name()) {
                (0, Some(p), _) if !p.is_empty() => p.to_string(),
                (_, _, Some(name)) if !name.is_empty() => name.to_string(),
                _ => {
                    return envd_error(
                        StatusCode::BAD_REQUEST,
                        "each file part needs a file name (its path) or the query needs path"
                            .into(),
                    )
                }
            };
            index += 1;
            match write_one(&envd, &path, field).await {
                Ok(v) => written.push(v),
                Err(r) => return r,
            }
        }
    } else {
        let Some(path) = q.path.as_deref().filter(|p| !p.is_empty()) else {
            return envd_error(
                StatusCode::BAD_REQUEST,
                "path is required for an octet-stream upload".into(),
            );
        };
        match write_one(&envd, path, req.into_body().into_data_stream()).await {
            Ok(v) => written.push(v),
            Err(r) => return r,
        }
    }
    if written.is_empty() {
        return envd_error(StatusCode::BAD_REQUEST, "the upload has no files".into());
    }
    (StatusCode::OK, axum::Json(written)).into_response()
}

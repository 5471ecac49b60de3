//! `/v1/images`: the node's OCI images (docs/images.md). Transport only: parses and authenticates,
//! then calls the image store (`burrow-image`), which owns `<data>/images`. A pull can answer as it
//! goes (NDJSON progress lines, the image or the error last); the pull itself runs in a task of its
//! own, so a client that hangs up does not leave a half-stored image (the store is all or nothing).

use std::path::Path;
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use burrow_image::{Credentials, RegistryClient, RegistryConfig, Store};
use burrow_types::images::{Image, ImageConfig, PullEvent, PullImage, PullProgress, RemovedImage};
use burrow_types::{codes, ApiError};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::admin::require_admin;
use super::error::HttpError;
use super::extract::{ApiJson, ApiQuery, Caller};
use super::AppState;

/// The node's image store, handed to the handlers as a request extension.
#[derive(Clone)]
pub struct Images {
    store: Store,
    registry: RegistryConfig,
}

impl Images {
    pub fn open(data_dir: &Path) -> Result<Images, burrow_image::Error> {
        Ok(Images {
            store: Store::open(data_dir, burrow_image::Limits::default())?,
            registry: RegistryConfig::default(),
        })
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/images", get(list_images).post(pull_image))
        .route("/v1/images/import", post(import_image))
        .route("/v1/images/{*name}", get(get_image).delete(delete_image))
}

impl From<burrow_image::Error> for HttpError {
    fn from(e: burrow_image::Error) -> Self {
        use burrow_image::Error as E;
        let status = match &e {
            E::BadReference { .. } => StatusCode::BAD_REQUEST,
            E::NotFound(_) => StatusCode::NOT_FOUND,
            E::AuthRequired { .. } => StatusCode::UNAUTHORIZED,
            E::AuthFailed { .. } => StatusCode::FORBIDDEN,
            E::PlatformNotFound { .. } | E::UnsafePath { .. } | E::Unsupported { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            E::DigestMismatch { .. } | E::Corrupt { .. } | E::Registry { .. } => {
                StatusCode::BAD_GATEWAY
            }
            E::LimitExceeded { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            E::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            E::InUse { .. } => StatusCode::CONFLICT,
            E::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            E::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let err = HttpError::new(status, e.code(), crate::control::error_chain(&e));
        match status {
            StatusCode::SERVICE_UNAVAILABLE => err.with_retry_after(5),
            StatusCode::INSUFFICIENT_STORAGE => err.with_retry_after(30),
            _ => err,
        }
    }
}

fn to_api(r: burrow_image::ImageRecord) -> Image {
    Image {
        id: r.id.to_string(),
        refs: r.refs,
        manifest: r.manifest.map(|d| d.to_string()),
        layers: r.layers.iter().map(|d| d.to_string()).collect(),
        size: r.size,
        platform: r.platform.to_string(),
        created: r.created,
        config: ImageConfig {
            env: r.config.env.unwrap_or_default(),
            working_dir: r.config.working_dir,
            user: r.config.user,
            entrypoint: r.config.entrypoint.unwrap_or_default(),
            cmd: r.config.cmd.unwrap_or_default(),
        },
        added_at: r.added_at,
    }
}

/// Every image on this node.
#[utoipa::path(get, path = "/v1/images", tag = "images", responses((status = 200, body = [Image])))]
pub async fn list_images(
    Caller(_caller): Caller,
    Extension(images): Extension<Images>,
) -> Json<Vec<Image>> {
    Json(images.store.list().into_iter().map(to_api).collect())
}

/// One image, by name (`ubuntu:24.04`), id or id prefix (12+ hex digits).
#[utoipa::path(get, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "a reference, an id or an id prefix")),
    responses((status = 200, body = Image), (status = 404, body = ApiError)))]
pub async fn get_image(
    Caller(_caller): Caller,
    Extension(images): Extension<Images>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Image>, HttpError> {
    Ok(Json(to_api(images.store.get(&name)?)))
}

/// Removes a name of an image, or the image with its last name or by id, with the layers no
/// other image uses. An image a sandbox or a warm pool uses is `409 image_in_use`.
#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "a reference, an id or an id prefix")),
    responses((status = 200, body = RemovedImage), (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn delete_image(
    State(s): State<AppState>,
    Caller(caller): Caller,
    Extension(images): Extension<Images>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<RemovedImage>, HttpError> {
    require_admin(&caller)?;
    let store = s.control.store();
    let sandboxes = store.live_sandboxes().await?;
    let pools = store.pools().await?;
    let in_use = move |img: &burrow_image::ImageRecord| {
        let names = |n: &str| n == img.id.as_str() || img.refs.iter().any(|r| r == n);
        if let Some(sb) = sandboxes.iter().find(|sb| names(&sb.image)) {
            return Some(format!("sandbox {}", sb.id));
        }
        pools
            .iter()
            .find(|p| names(&p.image))
            .map(|p| format!("pool {}", p.name))
    };
    let store = images.store.clone();
    let removed = tokio::task::spawn_blocking(move || store.remove(&name, &in_use))
        .await
        .map_err(|_| {
            HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::INTERNAL,
                "remove failed",
            )
        })??;
    Ok(Json(RemovedImage {
        untagged: removed.untagged,
        deleted: removed.deleted.map(|d| d.to_string()),
        layers_deleted: removed.layers_deleted,
    }))
}

/// Pulls an image from its registry. With `progress`, the answer is `application/x-ndjson`: one
/// `PullEvent` a line (progress, then the image or the error).
#[utoipa::path(post, path = "/v1/images", tag = "images", request_body = PullImage,
    responses((status = 200, body = Image), (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 422, body = ApiError), (status = 502, body = ApiError),
        (status = 503, body = ApiError), (status = 507, body = ApiError)))]
pub async fn pull_image(
    Caller(caller): Caller,
    Extension(images): Extension<Images>,
    ApiJson(req): ApiJson<PullImage>,
) -> Result<Response, HttpError> {
    require_admin(&caller)?;
    let reference: burrow_image::Reference = req.reference.parse()?;
    let mut config = images.registry.clone();
    if let Some(username) = req.username {
        config.credentials.insert(
            reference.registry.clone(),
            Credentials {
                username,
                password: req.password.unwrap_or_default(),
            },
        );
    }
    let client = RegistryClient::new(config)?;
    let store = images.store.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<PullEvent>(64);
    // The pull runs on its own: it finishes (or rolls back) whether or not anyone still listens.
    let task = tokio::spawn({
        let tx = tx.clone();
        async move {
            let last = Mutex::new(PullProgress::default());
            let report = move |p: &burrow_image::Progress| {
                let now = PullProgress {
                    layers_total: p.layers_total,
                    layers_done: p.layers_done,
                    bytes_total: p.bytes_total,
                    bytes_done: p.bytes_done,
                };
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                // About a hundred lines per image: every layer, and each 1% of the bytes.
                let step = (now.bytes_total / 100).max(64 << 10);
                if now.layers_done != last.layers_done
                    || now.bytes_done >= last.bytes_done + step
                    || now.bytes_done == now.bytes_total
                    || last.bytes_total == 0
                {
                    // A full channel (a slow reader) skips a line; the last one always goes.
                    let _ = tx.try_send(PullEvent::Progress(now.clone()));
                    *last = now;
                }
            };
            store.pull(&client, &reference, &report).await
        }
    });
    if !req.progress {
        drop(tx);
        let rec = task.await.map_err(|_| {
            HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::INTERNAL,
                "pull failed",
            )
        })??;
        return Ok(Json(to_api(rec)).into_response());
    }
    tokio::spawn(async move {
        let last = match task.await {
            Ok(Ok(rec)) => PullEvent::Image(to_api(rec)),
            Ok(Err(e)) => PullEvent::Error(HttpError::from(e).body()),
            Err(_) => PullEvent::Error(ApiError {
                code: codes::INTERNAL.into(),
                message: "pull failed".into(),
                details: None,
            }),
        };
        let _ = tx.send(last).await;
    });
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    /// Name the (one) image in the archive this instead of the names it carries.
    pub tag: Option<String>,
}

/// Imports the images of a `docker save` tarball or a tar of an OCI image layout (either may be
/// gzip'd), sent as the body.
#[utoipa::path(post, path = "/v1/images/import", tag = "images", params(ImportQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses((status = 200, body = [Image]), (status = 400, body = ApiError), (status = 403, body = ApiError), (status = 413, body = ApiError),
        (status = 422, body = ApiError), (status = 507, body = ApiError)))]
pub async fn import_image(
    Caller(caller): Caller,
    Extension(images): Extension<Images>,
    ApiQuery(q): ApiQuery<ImportQuery>,
    body: Body,
) -> Result<Json<Vec<Image>>, HttpError> {
    require_admin(&caller)?;
    let tag = q
        .tag
        .as_deref()
        .map(str::parse::<burrow_image::Reference>)
        .transpose()?;
    let store = images.store.clone();
    let path = store.scratch_path("upload");
    let result = async {
        let max = store.limits().max_blob_bytes;
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| burrow_image::Error::io("storing an upload", e))?;
        let mut stream = body.into_data_stream();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                if super::error::is_body_timeout(&e) {
                    super::error::body_timeout()
                } else {
                    HttpError::bad_request(format!("reading the upload: {e}"))
                }
            })?;
            n += chunk.len() as u64;
            if n > max {
                return Err(burrow_image::Error::LimitExceeded {
                    limit: "max_blob_bytes",
                    max,
                    what: "the upload".into(),
                }
                .into());
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| HttpError::from(burrow_image::Error::io("storing an upload", e)))?;
        }
        file.flush().await.ok();
        let (store2, path2) = (store.clone(), path.clone());
        let imported = tokio::task::spawn_blocking(move || {
            // A broken archive is the client's input here, not a registry's answer: 422.
            store2.import(&path2, tag.as_ref()).map_err(|e| {
                let mut h = HttpError::from(e);
                if h.status == StatusCode::BAD_GATEWAY {
                    h.status = StatusCode::UNPROCESSABLE_ENTITY;
                }
                h
            })
        })
        .await
        .map_err(|_| {
            HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::INTERNAL,
                "import failed",
            )
        })??;
        Ok::<_, HttpError>(imported)
    }
    .await;
    let _ = tokio::fs::remove_file(&path).await;
    Ok(Json(result?.into_iter().map(to_api).collect()))
}

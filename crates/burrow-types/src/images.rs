//! API shapes of `/v1/images` (docs/images.md).

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/images`: pull an image from its registry.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    /// `ubuntu:24.04`, `ghcr.io/org/app:v2`, `localhost:5000/x@sha256:...`.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 512))]
    pub reference: String,
    /// Credentials for the image's registry (basic, or to get a bearer token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Answer with `application/x-ndjson`: one [`PullEvent`] a line while the pull runs, the
    /// image or the error last. Without it the answer is the image once pulled.
    #[serde(default)]
    pub progress: bool,
}

/// One line of a pull's progress stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PullEvent {
    Progress(PullProgress),
    Image(Image),
    Error(crate::ApiError),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PullProgress {
    pub layers_total: usize,
    pub layers_done: usize,
    /// Compressed bytes of the image's layers; those already stored count as done at once.
    pub bytes_total: u64,
    pub bytes_done: u64,
}

/// An image stored on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Image {
    /// The digest of the image's config (`sha256:...`).
    pub id: String,
    /// Normalised names (`docker.io/library/ubuntu:24.04`); empty once a newer image took them.
    pub refs: Vec<String>,
    /// The platform manifest's digest, when pulled or imported from an OCI layout.
    pub manifest: Option<String>,
    /// Layer diff_ids, lowest first.
    pub layers: Vec<String>,
    /// Bytes of the layers, unpacked.
    pub size: u64,
    /// `linux/amd64`.
    pub platform: String,
    pub created: Option<String>,
    pub config: ImageConfig,
    /// Unix seconds when it was stored.
    pub added_at: u64,
}

/// What the image says to run with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// Answer of `DELETE /v1/images/{name}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RemovedImage {
    /// Names removed.
    pub untagged: Vec<String>,
    /// The image deleted (absent when only a name was removed).
    pub deleted: Option<String>,
    /// Layers no image used any more, deleted.
    pub layers_deleted: usize,
}

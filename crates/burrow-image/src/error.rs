//! The one error type of image operations, each variant a stable code (`Error::code`) the API
//! maps to HTTP.

use std::io;

use crate::Digest;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad image reference {reference:?}: {why}")]
    BadReference {
        reference: String,
        why: &'static str,
    },
    #[error("image {0:?} not found")]
    NotFound(String),
    #[error("registry {registry} refused the credentials for {repository}")]
    AuthFailed {
        registry: String,
        repository: String,
    },
    #[error("registry {registry} needs credentials for {repository}")]
    AuthRequired {
        registry: String,
        repository: String,
    },
    #[error("no manifest for {wanted} in {reference} (it has: {})", available.join(", "))]
    PlatformNotFound {
        reference: String,
        wanted: String,
        available: Vec<String>,
    },
    #[error("{what} has digest {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what} is corrupt: {why}")]
    Corrupt { what: String, why: String },
    #[error("unsupported {what}: {value}")]
    Unsupported { what: &'static str, value: String },
    #[error("layer entry {path:?} refused: {why}")]
    UnsafePath { path: String, why: &'static str },
    #[error("limit {limit} ({max}) exceeded by {what}")]
    LimitExceeded {
        limit: &'static str,
        max: u64,
        what: String,
    },
    #[error("registry {registry} is unreachable")]
    Unreachable {
        registry: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry {registry} answered {status} to {what}")]
    Registry {
        registry: String,
        status: u16,
        what: String,
    },
    #[error("image {image} is used by {by}")]
    InUse { image: String, by: String },
    #[error("no space left for the image store")]
    NoSpace(#[source] io::Error),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadReference { .. } => "bad_reference",
            Error::NotFound(_) => "image_not_found",
            Error::AuthFailed { .. } => "registry_auth_failed",
            Error::AuthRequired { .. } => "registry_auth_required",
            Error::PlatformNotFound { .. } => "platform_not_found",
            Error::DigestMismatch { .. } => "digest_mismatch",
            Error::Corrupt { .. } => "image_corrupt",
            Error::Unsupported { .. } => "image_unsupported",
            Error::UnsafePath { .. } => "unsafe_layer_path",
            Error::LimitExceeded { .. } => "limit_exceeded",
            Error::Unreachable { .. } => "registry_unreachable",
            Error::Registry { .. } => "registry_error",
            Error::InUse { .. } => "image_in_use",
            Error::NoSpace(_) => "insufficient_storage",
            Error::Io { .. } => "internal",
        }
    }

    /// An I/O error while doing `what`; a full disk becomes [`Error::NoSpace`].
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            return Error::NoSpace(source);
        }
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// `.map_err(io_err("doing x"))`.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

//! OCI images on a node: pulled from any distribution registry, imported from a `docker save`
//! tarball or an OCI layout, kept in one content-addressed store under the data directory, and
//! unpacked once per layer so every image that has a layer shares it.
//!
//! - [`Reference`]: `[registry/]repository[:tag][@sha256:...]`, normalised the way Docker does.
//! - [`RegistryClient`]: the distribution protocol over `reqwest` and rustls: bearer-token and
//!   basic auth, manifest lists resolved to this platform, every blob's digest checked while it
//!   streams in.
//! - [`Store`]: `<data>/images/{blobs,layers,tmp}` and `index.json` (docs/images.md has the
//!   layout). Everything lands in `tmp/` first and is renamed into place once whole and verified,
//!   so a failed pull or import leaves the store as it was; layers are removed when no image
//!   references them.
//! - [`unpack`]: a layer tar into a directory with the host-path rule: names with `..` or a
//!   leading `/` refused, links stored as links and never followed out of the layer, no device
//!   nodes, whiteouts in overlayfs form, and a size and entry limit per layer.
//!
//! No HTTP server lives here: the API and the CLI call this library.

mod digest;
mod error;
mod import;
mod reference;
mod registry;
mod spec;
mod store;
pub mod unpack;

pub use digest::Digest;
pub use error::{Error, Result};
pub use reference::Reference;
pub use registry::{Credentials, RegistryClient, RegistryConfig};
pub use spec::{ImageConfig, Platform};
pub use store::{ImageRecord, LayerRecord, Limits, Progress, Removed, Store};

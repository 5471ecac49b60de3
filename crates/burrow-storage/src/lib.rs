//! Each sandbox's writable storage: one volume per sandbox with a hard size limit, read-only
//! snapshots of a volume, and new volumes cloned from a snapshot. Two implementations behind one
//! blocking trait, [`Storage`] (the node calls it from blocking threads):
//!
//! - [`BtrfsPool`] (the default where the kernel has btrfs simple quotas, 6.7+): one btrfs pool
//!   per node (a preallocated image file on a loop device, or a btrfs data directory), one
//!   subvolume per sandbox limited by its simple-quota qgroup, snapshots as read-only subvolume
//!   snapshots and clones as writable snapshots of them. Create, snapshot and clone cost the same
//!   whatever the volume holds.
//! - [`Ext4Loop`] (the fallback): today's layout, `<data>/sandboxes/<id>/disk.img`, an ext4 image
//!   per sandbox on a loop device. Creating one copies a blank image formatted once per size (no
//!   `mkfs` on the create path); snapshots and clones are sparse copies of the image, so they cost
//!   what the files hold ([`Costs`] says so).
//!
//! A volume holds three top directories, [`UPPER`], [`WORK`] and [`WORKSPACE`]: the overlay's
//! upper and work directories of the sandbox's root, and its `/workspace`. The sandbox never sees
//! the volume's top, only what is inside `upper` (as its root) and `workspace`.
//!
//! **Paths.** The host never follows a path inside a volume. Volumes, snapshots and the pool's
//! own directories are opened by descriptor, one plain name at a time, with `O_NOFOLLOW`;
//! destroying a volume renames it (by name) into the pool's trash and deletes it as a subvolume or
//! an image file, never by walking what the sandbox wrote.
//!
//! **Crash safety.** Every operation is one atomic step or ends in one (a subvolume ioctl, a
//! `rename` with `RENAME_NOREPLACE`); anything half-made has a name that says so (`staging/`,
//! `trash/`), and [`Storage::prepare`] finds it: half-made copies are removed, deletes are
//! finished, volumes missing a top directory get it back. See `docs/storage.md`.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod btrfs;
mod common;
mod ext4;
mod purge;
mod volume;

pub use btrfs::{BtrfsConfig, BtrfsPool, PoolMode};
pub use ext4::{Ext4Config, Ext4Loop};
pub use volume::{Attached, Owners, Volume, VolumeSource};

/// The overlay's upper directory (the sandbox's root file changes) in a volume.
pub const UPPER: &str = "upper";
/// The overlay's work directory in a volume.
pub const WORK: &str = "work";
/// The sandbox's `/workspace` in a volume.
pub const WORKSPACE: &str = "workspace";

/// Which implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Btrfs,
    Ext4,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Btrfs => "btrfs",
            Kind::Ext4 => "ext4",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = StorageError;
    fn from_str(s: &str) -> Result<Kind, StorageError> {
        match s {
            "btrfs" => Ok(Kind::Btrfs),
            "ext4" => Ok(Kind::Ext4),
            _ => Err(StorageError::Unsupported(format!(
                "unknown storage {s:?}: the choices are btrfs and ext4"
            ))),
        }
    }
}

/// How an operation's cost grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cost {
    /// The same whatever the volume holds.
    Constant,
    /// In proportion to the bytes the volume's files hold (a copy).
    Data,
}

/// What each operation costs in an implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Costs {
    pub create: Cost,
    pub snapshot: Cost,
    pub clone: Cost,
    /// On the caller's path; the space comes back later, in the background.
    pub destroy: Cost,
}

/// A volume's figures, for metrics and the API. `df` inside a btrfs-backed sandbox shows the
/// pool, not these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// btrfs: bytes charged to the volume's qgroup as of the last transaction commit (at most
    /// 30 s old; data and metadata the volume wrote, including what its snapshots still hold,
    /// not what it shares with the snapshot it was cloned from). ext4: bytes the image file holds
    /// on the host (it is mounted with `discard`, so deleted files give theirs back).
    pub used_bytes: u64,
    /// The hard limit: writes past it fail inside with EDQUOT (btrfs) or ENOSPC (ext4).
    pub limit_bytes: u64,
}

/// What the filesystem that holds the volumes has left. Every sandbox on it gets ENOSPC when it
/// runs out, whatever its own limit: the node refuses creates and uploads before that (see
/// `docs/storage.md`, "Watching the pool").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Space {
    /// The filesystem measured: the btrfs pool's mount, or the data directory (ext4).
    pub path: PathBuf,
    pub total_bytes: u64,
    /// What unprivileged writes can still get (`statvfs` `f_bavail`).
    pub free_bytes: u64,
    /// btrfs: device space not yet given to data or metadata chunks. When it and
    /// `metadata_free_bytes` run low, btrfs fails writes with ENOSPC even with `free_bytes` left.
    pub unallocated_bytes: Option<u64>,
    /// btrfs: room left in the metadata chunks already allocated.
    pub metadata_free_bytes: Option<u64>,
}

impl Space {
    /// The smaller of the free space for data and (btrfs) what metadata can still grow into
    /// (its own free room plus the unallocated space, halved for the duplicated metadata of a
    /// single-device pool): the figure to hold a watermark against.
    pub fn writable_bytes(&self) -> u64 {
        match (self.unallocated_bytes, self.metadata_free_bytes) {
            (Some(unalloc), Some(meta)) => self.free_bytes.min(meta.saturating_add(unalloc / 2)),
            _ => self.free_bytes,
        }
    }
}

/// What exists, for the node's reconcile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Inventory {
    /// Ids of sandbox volumes.
    pub volumes: Vec<String>,
    /// Names of snapshots.
    pub snapshots: Vec<String>,
    /// Half-made volumes or snapshots (a create, snapshot or clone interrupted): `prepare`
    /// removes them.
    pub half_made: Vec<String>,
    /// Deleted volumes and snapshots whose space is still being given back.
    pub pending_deletes: usize,
}

/// What [`Storage::prepare`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Recovery {
    /// Half-made volumes and snapshots removed (interrupted creates, snapshots or clones).
    pub removed_half_made: Vec<String>,
    /// Volumes whose top directories were missing and were made again.
    pub repaired: Vec<String>,
    /// Deletes interrupted by a crash, finished now or queued for the background.
    pub pending_deletes: usize,
}

/// The node's storage. Every method blocks (ioctls, file copies, mounts): call it from a blocking
/// thread. Ids and snapshot names are plain names (`[A-Za-z0-9_-]`, 1-64 bytes).
pub trait Storage: Send + Sync {
    fn kind(&self) -> Kind;

    /// What each operation costs here.
    fn costs(&self) -> Costs;

    /// Makes the node's storage ready: the btrfs pool (created once, mounted again after a host
    /// reboot, simple quotas on) or the ext4 directories; then finds what a crash left half-made.
    /// Idempotent; call it at node start before anything else.
    fn prepare(&self) -> Result<Recovery, StorageError>;

    /// A new, empty volume for sandbox `id` with a hard limit of `limit_bytes`.
    fn create(&self, id: &str, limit_bytes: u64) -> Result<Volume, StorageError>;

    /// The existing volume of sandbox `id` (a cold resume, or after a node restart).
    fn open(&self, id: &str) -> Result<Volume, StorageError>;

    /// Deletes sandbox `id`'s volume: at once from the caller's view (its name is free again), its
    /// space in the background. The sandbox must be stopped: nothing may have it attached.
    /// Idempotent: a volume that does not exist is already destroyed.
    fn destroy(&self, id: &str) -> Result<(), StorageError>;

    /// The volume's figures.
    fn usage(&self, id: &str) -> Result<Usage, StorageError>;

    /// A read-only snapshot `snap` of sandbox `id`'s volume. Consistent if nothing writes to the
    /// volume meanwhile: the node freezes the sandbox's cgroup first (buffered writes are flushed
    /// by the snapshot itself). Durable when the call returns.
    fn snapshot(&self, id: &str, snap: &str) -> Result<(), StorageError>;

    /// A new volume for sandbox `id` holding what snapshot `snap` holds, with its own limit.
    /// Independent of the snapshot and of every other clone from then on.
    fn clone_snapshot(
        &self,
        snap: &str,
        id: &str,
        limit_bytes: u64,
    ) -> Result<Volume, StorageError>;

    /// Deletes snapshot `snap`; volumes cloned from it stay intact. Idempotent.
    fn delete_snapshot(&self, snap: &str) -> Result<(), StorageError>;

    /// Every volume and snapshot, and what is half-made or being deleted.
    fn list(&self) -> Result<Inventory, StorageError>;

    /// Free space of the filesystem the volumes live on (not the data directory's, for a pool on
    /// an image file): what the node's storage watermark must watch.
    fn space(&self) -> Result<Space, StorageError>;

    /// Finishes pending deletes now, returning how many were done. A background thread started by
    /// `prepare` does this after every destroy; call it to wait for space.
    fn purge(&self) -> Result<usize, StorageError>;
}

/// How the node chooses its storage at start (`burrow up --storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// btrfs where the kernel supports simple quotas (and the tools to make a pool are here),
    /// ext4 otherwise.
    #[default]
    Auto,
    Only(Kind),
}

/// Why a btrfs pool cannot be used on this host, if it cannot.
pub fn btrfs_unsupported() -> Option<String> {
    if !Path::new("/sys/fs/btrfs/features").is_dir() {
        return Some("the kernel has no btrfs (module not loaded or not built)".into());
    }
    if !Path::new("/sys/fs/btrfs/features/simple_quota").exists() {
        return Some("the kernel has no btrfs simple quotas (they came in Linux 6.7)".into());
    }
    None
}

/// The node's storage for `data_dir`: `choice` decides, `pool_size` sizes a new btrfs pool image
/// (`None`: see [`BtrfsConfig::image_size`]). Not yet prepared: call [`Storage::prepare`].
pub fn select(
    data_dir: &Path,
    choice: Choice,
    pool_size: Option<u64>,
) -> Result<Box<dyn Storage>, StorageError> {
    let btrfs = || -> Box<dyn Storage> {
        Box::new(BtrfsPool::new(BtrfsConfig {
            data_dir: data_dir.to_path_buf(),
            image_size: pool_size,
            background_purge: true,
        }))
    };
    let ext4 = || -> Box<dyn Storage> {
        Box::new(Ext4Loop::new(Ext4Config {
            data_dir: data_dir.to_path_buf(),
            background_purge: true,
        }))
    };
    match choice {
        Choice::Only(Kind::Ext4) => Ok(ext4()),
        Choice::Only(Kind::Btrfs) => match btrfs_unsupported() {
            Some(why) => Err(StorageError::Unsupported(why)),
            None => Ok(btrfs()),
        },
        Choice::Auto => match btrfs_unsupported() {
            Some(why) => {
                tracing::info!("storage: ext4 images ({why})");
                Ok(ext4())
            }
            None => Ok(btrfs()),
        },
    }
}

/// Storage failures, each with a stable [`code`](StorageError::code).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("no volume for sandbox {0}")]
    VolumeNotFound(String),
    #[error("no snapshot {0}")]
    SnapshotNotFound(String),
    #[error("sandbox {0} already has a volume")]
    VolumeExists(String),
    #[error("snapshot {0} already exists")]
    SnapshotExists(String),
    /// The filesystem holding the volumes is full (ENOSPC): every sandbox on it is affected.
    #[error("no space left for {what}")]
    NoSpace { what: String },
    /// A volume's own limit was reached (EDQUOT) while the host worked in it.
    #[error("{what}: the volume's size limit is reached")]
    QuotaExceeded { what: String },
    /// An ext4 clone cannot be smaller than the image it is copied from.
    #[error("a limit of {asked} bytes is below the {needed} bytes of the snapshot's disk")]
    LimitTooSmall { asked: u64, needed: u64 },
    #[error("{what}: in use")]
    Busy { what: String },
    #[error("{0}")]
    Unsupported(String),
    /// The pool is not prepared, not mounted, or went read-only (btrfs aborts a transaction on a
    /// write error and keeps the whole pool read-only until it is mounted again).
    #[error("the storage pool is unavailable: {0}")]
    PoolUnavailable(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl StorageError {
    /// The stable code of this error. In the HTTP API a sandbox at its own limit is `no_space`
    /// (507), like a full disk today; `quota_exceeded` there means a user's quota.
    pub fn code(&self) -> &'static str {
        match self {
            StorageError::InvalidName { .. } => "invalid_name",
            StorageError::VolumeNotFound(_) => "volume_not_found",
            StorageError::SnapshotNotFound(_) => "snapshot_not_found",
            StorageError::VolumeExists(_) => "volume_exists",
            StorageError::SnapshotExists(_) => "snapshot_exists",
            StorageError::NoSpace { .. } => "no_space",
            StorageError::QuotaExceeded { .. } => "quota_exceeded",
            StorageError::LimitTooSmall { .. } => "limit_too_small",
            StorageError::Busy { .. } => "storage_busy",
            StorageError::Unsupported(_) => "storage_unsupported",
            StorageError::PoolUnavailable(_) => "pool_unavailable",
            StorageError::Io { .. } => "storage_failed",
        }
    }

    /// An I/O error while doing `what`, mapped by errno: ENOSPC is [`StorageError::NoSpace`],
    /// EDQUOT [`StorageError::QuotaExceeded`], EROFS [`StorageError::PoolUnavailable`], EBUSY
    /// [`StorageError::Busy`].
    pub fn io(what: impl Into<String>, source: io::Error) -> StorageError {
        let what = what.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) => StorageError::NoSpace { what },
            Some(libc::EDQUOT) => StorageError::QuotaExceeded { what },
            Some(libc::EROFS) => {
                StorageError::PoolUnavailable(format!("{what}: the filesystem is read-only"))
            }
            Some(libc::EBUSY) => StorageError::Busy { what },
            _ => StorageError::Io { what, source },
        }
    }
}

/// `map_err` helper: `.map_err(io_err("creating the volume"))`.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StorageError {
    let what = what.into();
    move |e| StorageError::io(what, e)
}

/// The same for rustix's errno.
pub(crate) fn errno(what: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> StorageError {
    let what = what.into();
    move |e| StorageError::io(what, e.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_stable_codes_by_errno() {
        let e = |n| StorageError::io("x", io::Error::from_raw_os_error(n)).code();
        assert_eq!(e(libc::ENOSPC), "no_space");
        assert_eq!(e(libc::EDQUOT), "quota_exceeded");
        assert_eq!(e(libc::EROFS), "pool_unavailable");
        assert_eq!(e(libc::EBUSY), "storage_busy");
        assert_eq!(e(libc::EIO), "storage_failed");
    }

    #[test]
    fn the_watermark_figure_counts_metadata_room_on_btrfs() {
        let mut s = Space {
            path: PathBuf::from("/p"),
            total_bytes: 100,
            free_bytes: 50,
            unallocated_bytes: Some(20),
            metadata_free_bytes: Some(5),
        };
        assert_eq!(s.writable_bytes(), 15);
        s.unallocated_bytes = Some(200);
        assert_eq!(s.writable_bytes(), 50);
        s.unallocated_bytes = None;
        assert_eq!(s.writable_bytes(), 50);
    }
}

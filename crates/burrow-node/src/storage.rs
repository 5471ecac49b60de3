//! Which storage this node's sandboxes get (`burrow up --storage`, ADR 0067), chosen once per
//! data directory and kept: the choice is written to `<data>/storage.kind`, so a restart never
//! looks for its sandboxes' files in the other implementation.
//!
//! `auto` (the default) takes the btrfs pool only where it costs the operator nothing they did not
//! ask for: a pool already there (an image made before, a btrfs filesystem mounted at
//! `<data>/pool`), a data directory on btrfs with simple quotas, or a pool size given. Anywhere
//! else (a fresh machine whose data directory is ext4) it takes ext4 images cloned from a blank
//! template, rather than silently preallocating a pool image out of the operator's disk.

use std::path::Path;
use std::sync::Arc;

use burrow_storage::{BtrfsConfig, BtrfsPool, Ext4Config, Ext4Loop, Kind, Storage, StorageError};

use crate::backend::NodeError;

/// Where the choice is kept.
const KIND_FILE: &str = "storage.kind";

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StorageChoice {
    #[default]
    Auto,
    Btrfs,
    Ext4,
}

impl std::str::FromStr for StorageChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<StorageChoice, String> {
        match s {
            "auto" => Ok(StorageChoice::Auto),
            "btrfs" => Ok(StorageChoice::Btrfs),
            "ext4" => Ok(StorageChoice::Ext4),
            _ => Err(format!(
                "unknown storage {s:?}: the choices are auto, btrfs and ext4"
            )),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct StorageConfig {
    pub choice: StorageChoice,
    /// Size of a new btrfs pool image (bytes); given with `auto`, it asks for the pool.
    pub pool_size: Option<u64>,
}

/// Parses a size: bytes, or a number with `K`, `M`, `G` or `T` (powers of 1024; `iB` or `B`
/// may follow).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a size (bytes, or a number with K, M, G or T)"))
}

/// A [`StorageError`] as the node reports it.
pub(crate) fn node_err(id: &str, e: StorageError) -> NodeError {
    match e {
        StorageError::NoSpace { .. } | StorageError::QuotaExceeded { .. } => {
            NodeError::NoSpace(crate::backend::error_text(&e))
        }
        StorageError::Busy { .. } => NodeError::DiskBusy(id.to_string()),
        other => NodeError::Setup(format!("storage: {}", crate::backend::error_text(&other))),
    }
}

fn make(data_dir: &Path, kind: Kind, pool_size: Option<u64>) -> Arc<dyn Storage> {
    match kind {
        Kind::Btrfs => Arc::new(BtrfsPool::new(BtrfsConfig {
            data_dir: data_dir.to_path_buf(),
            image_size: pool_size,
            background_purge: true,
        })),
        Kind::Ext4 => Arc::new(Ext4Loop::new(Ext4Config {
            data_dir: data_dir.to_path_buf(),
            background_purge: true,
        })),
    }
}

/// Sandbox disks made before storage was chosen per data directory: ext4 images.
fn has_ext4_disks(data_dir: &Path) -> bool {
    std::fs::read_dir(data_dir.join("sandboxes"))
        .map(|rd| rd.flatten().any(|e| e.path().join("disk.img").is_file()))
        .unwrap_or(false)
}

/// The kind `auto` takes for a data directory with no choice recorded.
fn detect(data_dir: &Path, pool_size: Option<u64>) -> (Kind, String) {
    if let Some(why) = burrow_storage::btrfs_unsupported() {
        return (Kind::Ext4, why);
    }
    if has_ext4_disks(data_dir) {
        return (
            Kind::Ext4,
            "sandboxes of this data directory already have ext4 disks".into(),
        );
    }
    if pool_size.is_some() {
        return (Kind::Btrfs, "a pool size was given".into());
    }
    if BtrfsPool::is_at_hand(data_dir) {
        return (Kind::Btrfs, "a btrfs pool is at hand".into());
    }
    (
        Kind::Ext4,
        "no btrfs pool here: give --storage-pool-size (or --storage btrfs) to make one".into(),
    )
}

/// The node's storage for `data_dir`, prepared (crash leftovers found, deletes resumed).
pub fn open(data_dir: &Path, cfg: &StorageConfig) -> Result<Arc<dyn Storage>, NodeError> {
    let file = data_dir.join(KIND_FILE);
    let recorded = match std::fs::read_to_string(&file) {
        Ok(s) => Some(
            s.trim()
                .parse::<Kind>()
                .map_err(|e| NodeError::Setup(format!("{}: {}", file.display(), e)))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(NodeError::Host {
                what: format!("reading {}", file.display()),
                source: e,
            })
        }
    };
    let (kind, why) = match (cfg.choice, recorded) {
        (StorageChoice::Btrfs, _) => (Kind::Btrfs, "asked for".to_string()),
        (StorageChoice::Ext4, _) => (Kind::Ext4, "asked for".to_string()),
        (StorageChoice::Auto, Some(k)) => (k, format!("chosen before ({KIND_FILE})")),
        (StorageChoice::Auto, None) => detect(data_dir, cfg.pool_size),
    };
    // Another kind than the one the data directory's sandboxes live on would not find their
    // files: refused while any is there.
    let other = match recorded {
        Some(r) if r != kind => Some(r),
        None if kind == Kind::Btrfs && has_ext4_disks(data_dir) => Some(Kind::Ext4),
        _ => None,
    };
    if let Some(old) = other {
        let old_storage = make(data_dir, old, None);
        let held = old_storage
            .prepare()
            .and_then(|_| old_storage.list())
            .map_err(|e| node_err("", e))?
            .volumes
            .len();
        if held > 0 {
            return Err(NodeError::Setup(format!(
                "this data directory's {held} sandboxes have their files on {} storage; \
                 start with --storage {} (or destroy them first)",
                old.as_str(),
                old.as_str()
            )));
        }
    }
    let storage = make(data_dir, kind, cfg.pool_size);
    let found = storage.prepare().map_err(|e| node_err("", e))?;
    if !found.removed_half_made.is_empty()
        || found.pending_deletes > 0
        || !found.repaired.is_empty()
    {
        tracing::info!(
            removed_half_made = ?found.removed_half_made,
            repaired = ?found.repaired,
            pending_deletes = found.pending_deletes,
            "storage: finished what a crash left"
        );
    }
    if recorded != Some(kind) {
        burrow_linux::fs::replace_file(
            &rustix::fs::open(
                data_dir,
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| NodeError::Host {
                what: format!("opening {}", data_dir.display()),
                source: e.into(),
            })?,
            KIND_FILE,
            format!("{}\n", kind.as_str()).as_bytes(),
            0o644,
        )
        .map_err(|e| NodeError::Host {
            what: format!("writing {}", file.display()),
            source: e,
        })?;
    }
    tracing::info!(storage = kind.as_str(), why = %why, "sandbox storage");
    Ok(storage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in ["", "G", "0", "-1G", "1.5G", "20000000T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse(), Ok(StorageChoice::Auto));
        assert_eq!("btrfs".parse(), Ok(StorageChoice::Btrfs));
        assert!("zfs".parse::<StorageChoice>().is_err());
    }
}

//! The data filesystem as the control layer guards it: its real free space (under a watermark,
//! creates and uploads are refused before it runs out) and what sparse disks promise (an image of
//! 1 GiB takes host space only as it fills, so 5,000 of them promise 5 TiB on any disk: the
//! operator says how far past the filesystem's size promises may go).

use std::path::PathBuf;

use burrow_types::{codes, ErrorReason};

use super::ControlError;

/// Promises may reach this many times the data filesystem's size unless the operator says
/// otherwise: 5,000 idle sandboxes of 1 GiB on a 256 GiB disk.
pub const DEFAULT_OVERCOMMIT: f64 = 20.0;
/// Default watermark: this share of the filesystem, within the bounds below.
const DEFAULT_MIN_FREE_SHARE: f64 = 0.05;
const DEFAULT_MIN_FREE_FLOOR_MIB: u64 = 256;
const DEFAULT_MIN_FREE_CAP_MIB: u64 = 10 * 1024;
/// What a refused client is told to wait before trying again.
pub const RETRY_AFTER_S: u64 = 60;
const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct StorageGuard {
    data_dir: PathBuf,
    /// Refuse creates and uploads while less than this is free (MiB); `None`: the default share.
    min_free_mib: Option<u64>,
    overcommit: f64,
}

impl StorageGuard {
    pub fn new(data_dir: PathBuf, min_free_mib: Option<u64>, overcommit: Option<f64>) -> Self {
        StorageGuard {
            data_dir,
            min_free_mib,
            overcommit: overcommit.unwrap_or(DEFAULT_OVERCOMMIT),
        }
    }

    fn space(&self) -> Result<burrow_linux::sys::FsSpace, ControlError> {
        burrow_linux::sys::fs_space(&self.data_dir).map_err(|e| {
            ControlError::BadRequest(format!(
                "cannot read the free space of {}: {e}",
                self.data_dir.display()
            ))
        })
    }

    /// The watermark in MiB for a filesystem of `total_mib`.
    pub fn min_free_of(&self, total_mib: u64) -> u64 {
        self.min_free_mib.unwrap_or_else(|| {
            ((total_mib as f64 * DEFAULT_MIN_FREE_SHARE) as u64)
                .clamp(DEFAULT_MIN_FREE_FLOOR_MIB, DEFAULT_MIN_FREE_CAP_MIB)
                .min(total_mib / 2)
        })
    }

    /// Refused (`insufficient_storage`) while the data filesystem has less free than the
    /// watermark: what sandboxes already hold must be able to grow.
    pub fn check_free(&self, what: &str) -> Result<(), ControlError> {
        let space = self.space()?;
        let (free, total) = (space.available / MIB, space.total / MIB);
        let floor = self.min_free_of(total);
        if free < floor {
            return Err(ControlError::InsufficientStorage(ErrorReason {
                code: codes::INSUFFICIENT_STORAGE.into(),
                message: format!(
                    "the host's data filesystem is nearly full ({free} MiB free, {floor} MiB kept in \
                     reserve): {what} refused; try again once space is freed"
                ),
                limit: Some(serde_json::json!({ "min_free_mib": floor })),
                observed: Some(serde_json::json!({ "free_mib": free })),
            }));
        }
        Ok(())
    }

    /// Refused (`insufficient_storage`) while the volumes' own filesystem (a btrfs pool) has
    /// less writable than the watermark for its size.
    pub fn check_volumes(
        &self,
        what: &str,
        pool: &burrow_node::VolumeSpace,
    ) -> Result<(), ControlError> {
        let (free, total) = (pool.writable_bytes / MIB, pool.total_bytes / MIB);
        let floor = self.min_free_of(total);
        if free < floor {
            return Err(ControlError::InsufficientStorage(ErrorReason {
                code: codes::INSUFFICIENT_STORAGE.into(),
                message: format!(
                    "the sandboxes' storage pool at {} is nearly full ({free} MiB writable, \
                     {floor} MiB kept in reserve): {what} refused; try again once space is freed",
                    pool.path.display()
                ),
                limit: Some(serde_json::json!({ "min_free_mib": floor })),
                observed: Some(serde_json::json!({ "free_mib": free })),
            }));
        }
        Ok(())
    }

    /// Refused while the disks already promised plus `more_mib` would pass the overcommit ratio
    /// times the size of the filesystem they live on (`volumes_total`: a pool of their own,
    /// bytes; otherwise the data filesystem).
    pub fn check_promise(
        &self,
        promised_mib: u64,
        more_mib: u64,
        volumes_total: Option<u64>,
    ) -> Result<(), ControlError> {
        let total = match volumes_total {
            Some(bytes) => bytes / MIB,
            None => self.space()?.total / MIB,
        };
        let allowed = (total as f64 * self.overcommit) as u64;
        let wanted = promised_mib.saturating_add(more_mib);
        if wanted > allowed {
            return Err(ControlError::InsufficientStorage(ErrorReason {
                code: codes::INSUFFICIENT_STORAGE.into(),
                message: format!(
                    "sandbox disks on this host would promise {wanted} MiB, over the {allowed} MiB \
                     allowed ({} times the {total} MiB their filesystem holds); delete sandboxes or raise \
                     --disk-overcommit",
                    self.overcommit
                ),
                limit: Some(serde_json::json!({ "promised_disk_mib": allowed })),
                observed: Some(serde_json::json!({ "promised_disk_mib": wanted })),
            }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_watermark_is_a_share_within_bounds() {
        let g = StorageGuard::new(PathBuf::from("/"), None, None);
        assert_eq!(g.min_free_of(1024 * 1024), DEFAULT_MIN_FREE_CAP_MIB);
        assert_eq!(g.min_free_of(100 * 1024), 5 * 1024);
        assert_eq!(g.min_free_of(2048), DEFAULT_MIN_FREE_FLOOR_MIB);
        // A tiny filesystem keeps half of itself at most.
        assert_eq!(g.min_free_of(300), 150);
        let set = StorageGuard::new(PathBuf::from("/"), Some(64), None);
        assert_eq!(set.min_free_of(1024 * 1024), 64);
    }

    #[test]
    fn promises_past_the_ratio_are_refused_with_the_limit_named() {
        let total = burrow_linux::sys::fs_space(std::path::Path::new("/"))
            .unwrap()
            .total
            / MIB;
        let g = StorageGuard::new(PathBuf::from("/"), None, Some(2.0));
        assert!(g.check_promise(total, total, None).is_ok());
        // Against a pool of its own, its size counts.
        assert!(g.check_promise(1024, 1, Some(512 * MIB)).is_err());
        match g.check_promise(total, total + 1, None) {
            Err(ControlError::InsufficientStorage(r)) => {
                assert_eq!(r.code, "insufficient_storage");
                assert_eq!(
                    r.limit,
                    Some(serde_json::json!({"promised_disk_mib": 2 * total}))
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

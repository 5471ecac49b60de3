//! A sandbox's volume as the node holds it ([`Volume`], serialisable: the backend hands it to
//! `burrow __init`), and [`Volume::attach`]: making its top directories reachable at the
//! sandbox's `disk` mount point inside `__init`'s private mount namespace, with the owners the
//! sandbox's uid range needs.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use burrow_linux::{btrfs, mount as dmount};
use nix::mount::MsFlags;
use rustix::fs::{Gid, Mode, OFlags, Uid};
use serde::{Deserialize, Serialize};

use crate::common::{open_dir, open_sub};
use crate::{errno, io_err, StorageError, UPPER, WORK, WORKSPACE};

/// How long an ext4 attach waits for the loop device of the disk's previous mount to detach.
const ATTACHED_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// One sandbox's volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// The sandbox's id.
    pub id: String,
    /// Its hard limit.
    pub limit_bytes: u64,
    pub source: VolumeSource,
}

/// Where a volume lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VolumeSource {
    /// The subvolume `<pool>/volumes/<id>`, whose id is `subvol_id` (checked at attach, so a
    /// volume destroyed and made again under the same name is never taken for the old one).
    Btrfs {
        pool: PathBuf,
        subvol_id: u64,
        /// The pool's block device (for the sandbox's I/O throttle), if it has one.
        device: Option<(u32, u32)>,
    },
    /// The ext4 image file.
    Ext4 { image: PathBuf },
}

/// Host uids the volume's top directories belong to: the sandbox's root owns `upper` (the root
/// directory inside), its `user` owns `workspace`; `work` is host root's (overlayfs uses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owners {
    pub root: u32,
    pub user: u32,
}

/// A volume made reachable by [`Volume::attach`].
#[derive(Debug)]
pub struct Attached {
    /// Where its top directories are: [`UPPER`], [`WORK`] and [`WORKSPACE`] under it.
    pub dir: PathBuf,
    /// The block device the volume's writes go to, for the I/O throttle.
    pub device: Option<(u32, u32)>,
}

impl Attached {
    pub fn upper(&self) -> PathBuf {
        self.dir.join(UPPER)
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join(WORK)
    }
    pub fn workspace(&self) -> PathBuf {
        self.dir.join(WORKSPACE)
    }
}

impl Volume {
    /// Makes the volume's top directories reachable at `at`, an empty directory the host made
    /// (the sandbox's `disk`), and gives them `owners`. Mounts on `at` in the calling thread's
    /// mount namespace, which must be a private one that dies with the sandbox (`__init`'s): a
    /// bind of the subvolume (btrfs) or the image on an autoclear loop device (ext4; mounted
    /// with `discard`, so deleted files give their space back to the host, and `noinit_itable`:
    /// the image is sparse, its unwritten inode tables already read as zeroes).
    pub fn attach(&self, at: &Path, owners: Owners) -> Result<Attached, StorageError> {
        let target = rustix::fs::open(
            at,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno(format!("opening {}", at.display())))?;
        let device = match &self.source {
            VolumeSource::Btrfs {
                pool,
                subvol_id,
                device,
            } => {
                let top = open_btrfs_volume(pool, &self.id, *subvol_id)?;
                make_top_dirs(&top, owners)?;
                let tree = dmount::clone_tree(&top, "").map_err(io_err("cloning the volume"))?;
                dmount::set_attrs(&tree, dmount::ATTR_NOSUID | dmount::ATTR_NODEV, None)
                    .map_err(io_err("setting the volume's mount flags"))?;
                dmount::attach(&tree, &target).map_err(io_err("mounting the volume"))?;
                *device
            }
            VolumeSource::Ext4 { image } => {
                // One ext4 filesystem mounted through two loop devices would be corrupted. A
                // device whose last mount just went (its namespace died) detaches by itself
                // shortly; one still there after that is in use: busy.
                let deadline = std::time::Instant::now() + ATTACHED_WAIT;
                while let Some(dev) = crate::common::loop_of(image)? {
                    if std::time::Instant::now() >= deadline {
                        return Err(StorageError::Busy {
                            what: format!(
                                "the disk of {} is still attached to {}",
                                self.id,
                                dev.display()
                            ),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let lo = burrow_linux::loopdev::attach(image)
                    .map_err(io_err("attaching the disk to a loop device"))?;
                nix::mount::mount(
                    Some(&lo.path),
                    &burrow_linux::fs::fd_path(&target),
                    Some("ext4"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some("discard,noinit_itable"),
                )
                .map_err(|e| {
                    StorageError::io(format!("mounting {}", lo.path.display()), e.into())
                })?;
                let top = open_dir(at)?;
                make_top_dirs(&top, owners)?;
                Some(
                    lo.rdev()
                        .map_err(io_err("reading the loop device's number"))?,
                )
            }
        };
        Ok(Attached {
            dir: at.to_path_buf(),
            device,
        })
    }
}

/// Opens `<pool>/volumes/<id>`, checking it is the subvolume `subvol_id`.
pub(crate) fn open_btrfs_volume(
    pool: &Path,
    id: &str,
    subvol_id: u64,
) -> Result<OwnedFd, StorageError> {
    crate::common::check_name(id)?;
    let sandboxes = open_sub(open_dir(pool)?, crate::btrfs::SANDBOXES)
        .map_err(errno("opening the pool's sandboxes"))?;
    let top = match open_sub(&sandboxes, id) {
        Err(rustix::io::Errno::NOENT) => return Err(StorageError::VolumeNotFound(id.into())),
        r => r.map_err(errno(format!("opening the volume of {id}")))?,
    };
    let found = btrfs::subvol_id(&top).map_err(io_err("reading the volume's subvolume id"))?;
    if found != subvol_id {
        return Err(StorageError::VolumeNotFound(format!(
            "{id} (subvolume {subvol_id}; {found} has its name now)"
        )));
    }
    Ok(top)
}

/// `upper` (the sandbox's root, 0755), `work` (host root's, 0700) and `workspace` (the sandbox's
/// user, 0755) at the top of a volume: made if missing, given their owners and modes. The
/// sandbox never sees the top of its volume, so nothing here is its link; each is opened with
/// `O_NOFOLLOW` anyway and changed through its descriptor.
pub(crate) fn make_top_dirs(top: impl AsFd, owners: Owners) -> Result<(), StorageError> {
    let top = top.as_fd();
    for (name, owner, mode) in [
        (UPPER, owners.root, 0o755),
        (WORK, 0, 0o700),
        (WORKSPACE, owners.user, 0o755),
    ] {
        match rustix::fs::mkdirat(top, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                return Err(StorageError::io(
                    format!("creating the volume's {name}"),
                    e.into(),
                ))
            }
        }
        let fd = open_sub(top, name).map_err(errno(format!("opening the volume's {name}")))?;
        rustix::fs::fchown(&fd, Some(Uid::from_raw(owner)), Some(Gid::from_raw(owner)))
            .map_err(errno(format!("chown of the volume's {name}")))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
            .map_err(errno(format!("chmod of the volume's {name}")))?;
    }
    Ok(())
}

/// Reads a small whole file (sysfs).
pub(crate) fn read_u64(path: &Path) -> Result<u64, StorageError> {
    let mut s = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(io_err(format!("reading {}", path.display())))?;
    s.trim().parse().map_err(|_| StorageError::Io {
        what: format!("reading {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{s:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_travel_as_json_to_init() {
        let v = Volume {
            id: "sbx".into(),
            limit_bytes: 1 << 30,
            source: VolumeSource::Btrfs {
                pool: "/data/pool".into(),
                subvol_id: 257,
                device: Some((7, 3)),
            },
        };
        let s = serde_json::to_string(&v).unwrap();
        assert!(s.contains(r#""kind":"btrfs""#), "{s}");
        assert_eq!(serde_json::from_str::<Volume>(&s).unwrap(), v);
    }
}

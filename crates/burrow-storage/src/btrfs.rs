//! [`BtrfsPool`]: one btrfs filesystem per node, one subvolume per sandbox.
//!
//! Where the pool is, decided by [`BtrfsPool::prepare`] in this order ([`PoolMode`]):
//! - `<data>/pool` is already a mounted btrfs filesystem (a pool image mounted by an earlier
//!   start, or a partition the operator mounted there): use it;
//! - the data directory is itself on btrfs with simple quotas on: the subvolume `<data>/pool`;
//! - otherwise `<data>/pool.img`, a preallocated (not sparse: a sparse image that finds its host
//!   filesystem full makes btrfs abort and turn the whole pool read-only) image file on a loop
//!   device (`LO_FLAGS_DIRECT_IO`, so pages are not cached twice), mounted at `<data>/pool`. It
//!   is made once, under a temporary name, formatted with `mkfs.btrfs`, given simple quotas while
//!   it is still empty (extents written before are never charged), and renamed into place only
//!   when complete.
//!
//! Inside the pool: `volumes/<id>` (a subvolume per sandbox, its qgroup limited to the
//! sandbox's disk size in the same ioctl that makes it), `snapshots/<name>` (read-only
//! snapshots), `trash/` (what is being deleted, under names that say what it was) and the marker
//! file `burrow-pool`. Every operation is one ioctl or one rename, so a `kill -9` leaves either
//! the old state or the new one; deletes are finished by a background thread and by `prepare`.
//!
//! Limits are **simple quotas** (squota): a subvolume is charged for the extents it writes, not
//! for what it shares with the snapshot it was cloned from, and stays charged for extents its
//! own snapshots keep alive. Writes past the limit fail with EDQUOT; a full pool fails everyone's
//! writes with ENOSPC, so the node watches [`Storage::space`].

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use burrow_linux::btrfs;
use nix::mount::{MntFlags, MsFlags};
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags, StatxFlags, CWD};
use serde::Serialize;

use crate::common::{
    check_limit, check_name, ensure_sub, entries, exists, find_tool, loop_of, open_dir, open_sub,
    unique, Ready,
};
use crate::purge::PurgeSlot;
use crate::volume::{make_top_dirs, read_u64};
use crate::{
    errno, io_err, Cost, Costs, Inventory, Kind, Owners, Recovery, Space, Storage, StorageError,
    Usage, Volume, VolumeSource, UPPER, WORK, WORKSPACE,
};

/// Where volumes live in the pool. Not `sandboxes`: a sandbox's own mounts show this path in its
/// `/proc/self/mountinfo` (the bind's root and btrfs's `subvol=`), and nothing there may read
/// like burrow's host layout.
pub(crate) const SANDBOXES: &str = "volumes";
const SNAPSHOTS: &str = "snapshots";
const TRASH: &str = "trash";
const MARKER: &str = "burrow-pool";
const MARKER_BODY: &[u8] = b"burrow storage pool, format 1\n";
const IMAGE: &str = "pool.img";
const IMAGE_NEW: &str = "pool.img.new";
const MOUNT: &str = "pool";
const MOUNT_NEW: &str = "pool.new";
const LOCK: &str = "storage.lock";
const BTRFS_MAGIC: u64 = 0x9123_683e;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// Smallest pool image (btrfs needs ~120 MiB for itself with duplicated metadata).
pub const MIN_IMAGE_SIZE: u64 = 256 * MIB;
/// Smallest volume limit.
const MIN_LIMIT: u64 = MIB;

/// How a [`BtrfsPool`] is configured.
#[derive(Debug, Clone)]
pub struct BtrfsConfig {
    /// The node's data directory: the pool is `<data>/pool` (and `<data>/pool.img`).
    pub data_dir: PathBuf,
    /// Size of a new pool image. `None`: half of the data filesystem's free space when the pool
    /// is made, between 1 GiB and 1 TiB. An existing pool keeps its size (see [`BtrfsPool::grow`]).
    pub image_size: Option<u64>,
    /// Delete destroyed volumes in a background thread (otherwise only [`Storage::purge`] does).
    pub background_purge: bool,
}

/// Where the pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// `<data>/pool.img` on a loop device, mounted at `<data>/pool`.
    Image,
    /// A btrfs filesystem the operator mounted at `<data>/pool`.
    Mounted,
    /// The subvolume `<data>/pool` of a data directory on btrfs.
    Subvolume,
}

/// The pool once prepared: descriptors of its directories (every later operation starts from
/// them, never from a path) and what sysfs calls it.
struct Prepared {
    mode: PoolMode,
    mountpoint: PathBuf,
    root: OwnedFd,
    sandboxes: OwnedFd,
    snapshots: OwnedFd,
    trash: OwnedFd,
    fsid: String,
    device: Option<(u32, u32)>,
}

/// One btrfs pool per node, one subvolume per sandbox (module docs).
pub struct BtrfsPool {
    cfg: BtrfsConfig,
    prepared: Ready<Prepared>,
    purger: PurgeSlot,
}

impl BtrfsPool {
    pub fn new(cfg: BtrfsConfig) -> BtrfsPool {
        BtrfsPool {
            cfg,
            prepared: Ready::default(),
            purger: PurgeSlot::default(),
        }
    }

    fn pool(&self) -> Result<Arc<Prepared>, StorageError> {
        self.prepared.get()
    }

    fn nudge(&self) {
        self.purger.nudge();
    }

    /// Where the pool is, once prepared.
    pub fn mode(&self) -> Option<PoolMode> {
        self.pool().ok().map(|p| p.mode)
    }

    /// The pool's mount point, once prepared.
    pub fn mountpoint(&self) -> Option<PathBuf> {
        self.pool().ok().map(|p| p.mountpoint.clone())
    }

    /// Grows a pool image to `size` bytes, online: the image is extended (preallocated), the loop
    /// device told, and btrfs resized to it. A pool never shrinks.
    pub fn grow(&self, size: u64) -> Result<(), StorageError> {
        let p = self.pool()?;
        if p.mode != PoolMode::Image {
            return Err(StorageError::Unsupported(
                "only a pool image can be grown by burrow; grow its device yourself".into(),
            ));
        }
        let img = self.cfg.data_dir.join(IMAGE);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .map_err(io_err(format!("opening {}", img.display())))?;
        let now = f
            .metadata()
            .map_err(io_err("reading the pool image"))?
            .len();
        if size <= now {
            return Ok(());
        }
        rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), now, size - now)
            .map_err(errno("preallocating the pool image"))?;
        f.sync_all().map_err(io_err("syncing the pool image"))?;
        let dev = loop_of(&img)?.ok_or_else(|| {
            StorageError::PoolUnavailable("the pool image is not attached".into())
        })?;
        burrow_linux::loopdev::set_capacity(&dev).map_err(io_err("resizing the loop device"))?;
        btrfs::resize_to_device(&p.root).map_err(io_err("resizing the pool"))?;
        Ok(())
    }

    /// Unmounts a pool image from the host (the loop device detaches once nothing else has it
    /// mounted) and stops the background thread. For tests and operators taking a node down; a
    /// pool in another mode stays as it is.
    pub fn unmount(self) -> Result<(), StorageError> {
        self.purger.stop();
        let p = self.prepared.take();
        if let Some(p) = p {
            if p.mode == PoolMode::Image {
                let at = p.mountpoint.clone();
                drop(p);
                nix::mount::umount2(&at, MntFlags::MNT_DETACH).map_err(|e| {
                    StorageError::io(format!("unmounting {}", at.display()), e.into())
                })?;
            }
        }
        Ok(())
    }

    /// Whether `data_dir` has a pool, or can have one without an image file: a pool image made
    /// before, a btrfs filesystem mounted at `<data>/pool`, or a data directory on btrfs with
    /// simple quotas on. (Otherwise [`Storage::prepare`] would make and preallocate an image.)
    pub fn is_at_hand(data_dir: &Path) -> bool {
        if data_dir.join(IMAGE).is_file() {
            return true;
        }
        if is_mount_point(data_dir, &data_dir.join(MOUNT)).unwrap_or(false) {
            return true;
        }
        let Ok(fd) = open_dir(data_dir) else {
            return false;
        };
        is_btrfs(&fd).unwrap_or(false)
            && btrfs::fsid(&fd)
                .ok()
                .and_then(|id| quota_mode(&id))
                .as_deref()
                == Some("squota")
    }

    fn prepare_pool(&self) -> Result<Prepared, StorageError> {
        let data = &self.cfg.data_dir;
        std::fs::create_dir_all(data).map_err(io_err(format!("creating {}", data.display())))?;
        let data = std::fs::canonicalize(data).map_err(io_err("resolving the data directory"))?;
        let data_fd = open_dir(&data)?;
        // One prepare at a time per data directory (two servers, or a test and its child).
        let lock = rustix::fs::openat(
            &data_fd,
            LOCK,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(errno("opening the storage lock"))?;
        rustix::fs::flock(&lock, FlockOperation::LockExclusive)
            .map_err(errno("locking the storage"))?;

        let mountpoint = data.join(MOUNT);
        let (mode, root) = if is_mount_point(&data, &mountpoint)? {
            let root = open_dir(&mountpoint)?;
            if !is_btrfs(&root)? {
                return Err(StorageError::Unsupported(format!(
                    "{} is mounted but is not btrfs",
                    mountpoint.display()
                )));
            }
            let mode = if loop_of(&data.join(IMAGE))?.is_some() {
                PoolMode::Image
            } else {
                PoolMode::Mounted
            };
            (mode, root)
        } else if is_btrfs(&data_fd)?
            && quota_mode(&btrfs::fsid(&data_fd).map_err(io_err("reading the data fs id"))?)
                .as_deref()
                == Some("squota")
        {
            (PoolMode::Subvolume, ensure_pool_subvolume(&data_fd)?)
        } else {
            if !exists(&data_fd, IMAGE)? {
                self.make_image(&data, &data_fd)?;
            }
            mount_image(&data.join(IMAGE), &mountpoint)?;
            (PoolMode::Image, open_dir(&mountpoint)?)
        };

        let fsid = btrfs::fsid(&root).map_err(io_err("reading the pool's fs id"))?;
        match quota_mode(&fsid).as_deref() {
            Some("squota") => {}
            None => {
                tracing::warn!(
                    pool = %mountpoint.display(),
                    "the pool had no quotas: enabling simple quotas (extents already there are never charged)"
                );
                btrfs::enable_simple_quotas(&root).map_err(io_err("enabling simple quotas"))?;
            }
            Some(other) => {
                return Err(StorageError::Unsupported(format!(
                    "the pool at {} has quotas in mode {other:?}; burrow needs simple quotas \
                     (full qgroups slow down with every clone): disable quotas there",
                    mountpoint.display()
                )))
            }
        }
        let sandboxes = ensure_sub(&root, SANDBOXES)?;
        let snapshots = ensure_sub(&root, SNAPSHOTS)?;
        let trash = ensure_sub(&root, TRASH)?;
        if !exists(&root, MARKER)? {
            burrow_linux::fs::replace_file(&root, MARKER, MARKER_BODY, 0o644)
                .map_err(io_err("writing the pool's marker"))?;
        }
        let device = pool_device(&fsid);
        Ok(Prepared {
            mode,
            mountpoint,
            root,
            sandboxes,
            snapshots,
            trash,
            fsid,
            device,
        })
    }

    /// Makes `<data>/pool.img`: preallocated under a temporary name, formatted, mounted at a
    /// temporary mount point to enable simple quotas and make the pool's directories, unmounted,
    /// synced, and only then renamed into place. A crash at any point leaves either no
    /// `pool.img` (the next prepare starts again) or a complete one.
    fn make_image(&self, data: &Path, data_fd: &OwnedFd) -> Result<(), StorageError> {
        let new_mount = data.join(MOUNT_NEW);
        if is_mount_point(data, &new_mount)? {
            nix::mount::umount2(&new_mount, MntFlags::MNT_DETACH)
                .map_err(|e| StorageError::io("unmounting a half-made pool", e.into()))?;
        }
        match rustix::fs::unlinkat(data_fd, IMAGE_NEW, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => {
                return Err(StorageError::io(
                    "removing a half-made pool image",
                    e.into(),
                ))
            }
        }
        let size = match self.cfg.image_size {
            Some(s) => s,
            None => default_image_size(data_fd)?,
        };
        if size < MIN_IMAGE_SIZE {
            return Err(StorageError::Unsupported(format!(
                "a pool of {size} bytes is too small (at least {MIN_IMAGE_SIZE})"
            )));
        }
        let img = rustix::fs::openat(
            data_fd,
            IMAGE_NEW,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(errno("creating the pool image"))?;
        rustix::fs::fallocate(&img, rustix::fs::FallocateFlags::empty(), 0, size)
            .map_err(errno(format!("preallocating a pool image of {size} bytes")))?;
        let path = data.join(IMAGE_NEW);
        let mkfs = find_tool("mkfs.btrfs").ok_or_else(|| {
            StorageError::Unsupported("mkfs.btrfs is missing (install btrfs-progs)".into())
        })?;
        let out = Command::new(mkfs)
            .args(["-q", "-f", "-L", "burrow-pool"])
            .arg(&path)
            .output()
            .map_err(io_err("running mkfs.btrfs"))?;
        if !out.status.success() {
            return Err(StorageError::Io {
                what: format!(
                    "mkfs.btrfs failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                source: std::io::Error::other("mkfs.btrfs"),
            });
        }
        std::fs::create_dir_all(&new_mount).map_err(io_err("creating the pool's mount point"))?;
        mount_image(&path, &new_mount)?;
        let set_up = (|| {
            let root = open_dir(&new_mount)?;
            btrfs::enable_simple_quotas(&root).map_err(io_err("enabling simple quotas"))?;
            for d in [SANDBOXES, SNAPSHOTS, TRASH] {
                ensure_sub(&root, d)?;
            }
            burrow_linux::fs::replace_file(&root, MARKER, MARKER_BODY, 0o644)
                .map_err(io_err("writing the pool's marker"))?;
            btrfs::sync(&root).map_err(io_err("committing the new pool"))
        })();
        let unmounted = nix::mount::umount2(&new_mount, MntFlags::empty())
            .map_err(|e| StorageError::io("unmounting the new pool", e.into()));
        set_up?;
        unmounted?;
        let _ = std::fs::remove_dir(&new_mount);
        rustix::fs::fsync(&img).map_err(errno("syncing the pool image"))?;
        drop(img);
        if !crate::common::rename_noreplace(data_fd, IMAGE_NEW, data_fd, IMAGE)
            .map_err(errno("renaming the pool image into place"))?
        {
            return Err(StorageError::Busy {
                what: "another process made the pool image meanwhile".into(),
            });
        }
        rustix::fs::fsync(data_fd).map_err(errno("syncing the data directory"))?;
        tracing::info!(image = %data.join(IMAGE).display(), size, "made the btrfs storage pool");
        Ok(())
    }
}

/// Half the data filesystem's free space, between 1 GiB and 1 TiB, in whole MiB.
fn default_image_size(data: &OwnedFd) -> Result<u64, StorageError> {
    let st = rustix::fs::fstatvfs(data).map_err(errno("reading the data filesystem's size"))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < 2 * GIB {
        return Err(StorageError::NoSpace {
            what: format!(
                "a storage pool: the data filesystem has {} MiB free (at least 2 GiB needed; or set the pool's size)",
                free / MIB
            ),
        });
    }
    Ok((free / 2).clamp(GIB, 1024 * GIB) / MIB * MIB)
}

/// `<data>/pool` as a subvolume of a btrfs data directory.
fn ensure_pool_subvolume(data: &OwnedFd) -> Result<OwnedFd, StorageError> {
    if !exists(data, MOUNT)? {
        match btrfs::subvol_create(data, MOUNT, None) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                return Err(StorageError::io("creating the pool subvolume", e))
            }
            _ => {}
        }
    }
    let fd = open_sub(data, MOUNT).map_err(errno("opening the pool subvolume"))?;
    let st = rustix::fs::fstat(&fd).map_err(errno("reading the pool subvolume"))?;
    if st.st_ino != btrfs::SUBVOL_ROOT_INO {
        return Err(StorageError::Unsupported(
            "the data directory's `pool` exists and is not a btrfs subvolume".into(),
        ));
    }
    Ok(fd)
}

/// Attaches `image` (or finds the loop device it is already on: the pool may still be mounted in
/// sandboxes' mount namespaces after the host's mount went, and one filesystem must never be
/// mounted through two devices) and mounts it at `at`.
fn mount_image(image: &Path, at: &Path) -> Result<(), StorageError> {
    std::fs::create_dir_all(at).map_err(io_err(format!("creating {}", at.display())))?;
    let (dev, _held) = match loop_of(image)? {
        Some(dev) => (dev, None),
        None => {
            let lo = burrow_linux::loopdev::attach_with(image, true)
                .map_err(io_err("attaching the pool image to a loop device"))?;
            (lo.path.clone(), Some(lo))
        }
    };
    nix::mount::mount(
        Some(&dev),
        at,
        Some("btrfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|e| StorageError::io(format!("mounting the pool at {}", at.display()), e.into()))
}

/// Whether `path` is the root of a mount other than `parent`'s.
fn is_mount_point(parent: &Path, path: &Path) -> Result<bool, StorageError> {
    let id = |p: &Path| {
        rustix::fs::statx(CWD, p, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::MNT_ID)
            .map(|s| s.stx_mnt_id)
    };
    match id(path) {
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(StorageError::io(
            format!("looking at {}", path.display()),
            e.into(),
        )),
        Ok(m) => Ok(m != id(parent).map_err(errno("looking at the data directory"))?),
    }
}

fn is_btrfs(fd: impl AsFd) -> Result<bool, StorageError> {
    let st = rustix::fs::fstatfs(fd).map_err(errno("reading a filesystem's type"))?;
    Ok(st.f_type as u64 == BTRFS_MAGIC)
}

/// `squota`, `qgroup`, or `None` when quotas are off.
fn quota_mode(fsid: &str) -> Option<String> {
    let dir = Path::new("/sys/fs/btrfs").join(fsid).join("qgroups");
    if !dir.is_dir() {
        return None;
    }
    Some(
        std::fs::read_to_string(dir.join("mode"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "qgroup".into()),
    )
}

/// The first device of the filesystem `fsid`, for I/O throttles.
fn pool_device(fsid: &str) -> Option<(u32, u32)> {
    let devs = Path::new("/sys/fs/btrfs").join(fsid).join("devices");
    let name = std::fs::read_dir(devs).ok()?.flatten().next()?.file_name();
    let dev = std::fs::read_to_string(Path::new("/sys/class/block").join(name).join("dev")).ok()?;
    let (major, minor) = dev.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Total size of the filesystem's devices in bytes.
fn device_bytes(fsid: &str) -> Option<u64> {
    let devs = Path::new("/sys/fs/btrfs").join(fsid).join("devices");
    let mut total = 0u64;
    for e in std::fs::read_dir(devs).ok()?.flatten() {
        let sectors = read_u64(&e.path().join("size")).ok()?;
        total += sectors * 512;
    }
    Some(total)
}

/// The id of the subvolume whose root is `fd`, or `None` when `fd` is a plain directory.
fn subvolume_of(fd: &OwnedFd) -> Result<Option<u64>, StorageError> {
    let st = rustix::fs::fstat(fd).map_err(errno("reading a volume"))?;
    if st.st_ino != btrfs::SUBVOL_ROOT_INO {
        return Ok(None);
    }
    btrfs::subvol_id(fd)
        .map(Some)
        .map_err(io_err("reading a subvolume's id"))
}

/// Deletes, by id, every subvolume below `id` (deepest first): what a sandbox could have made
/// inside its volume before subvolume ioctls were refused to it, or what an operator made. No
/// path inside the volume is involved.
fn delete_nested(fs: &OwnedFd, id: u64, depth: u32) -> std::io::Result<()> {
    if depth > 64 {
        return Err(std::io::Error::other("subvolumes nested too deep"));
    }
    for child in btrfs::child_subvols(fs, id)? {
        delete_nested(fs, child, depth + 1)?;
        match btrfs::subvol_delete_by_id(fs, child) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Deletes everything in the trash; returns how many were deleted.
fn purge_trash(p: &Prepared) -> Result<usize, StorageError> {
    let mut done = 0;
    for name in entries(&p.trash)? {
        let fd = match open_sub(&p.trash, &name) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => {
                tracing::warn!(entry = %name, error = %e, "storage: cannot open a trash entry");
                continue;
            }
        };
        let id = match subvolume_of(&fd) {
            Ok(Some(id)) => id,
            Ok(None) => {
                tracing::warn!(entry = %name, "storage: a trash entry is not a subvolume; left alone");
                continue;
            }
            Err(e) => {
                tracing::warn!(entry = %name, error = %e, "storage: cannot read a trash entry");
                continue;
            }
        };
        drop(fd);
        // Deleting a subvolume inside a volume reserves metadata in that volume: a volume at its
        // limit (a full sandbox) would refuse with EDQUOT. It is being deleted: lift its limit.
        let r = btrfs::set_limit(&p.root, id, None)
            .and_then(|()| delete_nested(&p.root, id, 0))
            .and_then(|()| btrfs::subvol_delete(&p.trash, &name));
        match r {
            Ok(()) => done += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                tracing::warn!(entry = %name, error = %e, "storage: deleting a volume failed; retried later")
            }
        }
    }
    Ok(done)
}

impl Prepared {
    fn qgroup_file(&self, subvol_id: u64, file: &str) -> PathBuf {
        Path::new("/sys/fs/btrfs")
            .join(&self.fsid)
            .join("qgroups")
            .join(format!("0_{subvol_id}"))
            .join(file)
    }

    fn limit_of(&self, subvol_id: u64) -> Result<u64, StorageError> {
        let flags = read_u64(&self.qgroup_file(subvol_id, "limit_flags"))?;
        if flags & 1 == 0 {
            return Ok(u64::MAX);
        }
        read_u64(&self.qgroup_file(subvol_id, "max_referenced"))
    }

    fn volume(&self, id: &str, subvol_id: u64) -> Result<Volume, StorageError> {
        Ok(Volume {
            id: id.to_string(),
            limit_bytes: self.limit_of(subvol_id)?,
            source: VolumeSource::Btrfs {
                pool: self.mountpoint.clone(),
                subvol_id,
                device: self.device,
            },
        })
    }

    /// The volume `id`: its root and subvolume id.
    fn open_volume(&self, id: &str) -> Result<(OwnedFd, u64), StorageError> {
        check_name(id)?;
        let fd = match open_sub(&self.sandboxes, id) {
            Err(rustix::io::Errno::NOENT) => return Err(StorageError::VolumeNotFound(id.into())),
            r => r.map_err(errno(format!("opening the volume of {id}")))?,
        };
        match subvolume_of(&fd)? {
            Some(sid) => Ok((fd, sid)),
            None => Err(StorageError::VolumeNotFound(format!(
                "{id} (a directory that is not a subvolume is in its place)"
            ))),
        }
    }

    /// Moves `dir/name` into the trash; false if it was not there.
    fn to_trash(&self, dir: &OwnedFd, kind: &str, name: &str) -> Result<bool, StorageError> {
        match rustix::fs::renameat(dir, name, &self.trash, unique(kind, name).as_str()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(StorageError::io(format!("deleting {name}"), e.into())),
        }
    }
}

impl Storage for BtrfsPool {
    fn kind(&self) -> Kind {
        Kind::Btrfs
    }

    fn costs(&self) -> Costs {
        Costs {
            create: Cost::Constant,
            snapshot: Cost::Constant,
            clone: Cost::Constant,
            destroy: Cost::Constant,
        }
    }

    fn prepare(&self) -> Result<Recovery, StorageError> {
        let p = self.prepared.get_or_make(|| self.prepare_pool())?;
        let mut rec = Recovery::default();
        // Volumes are made in one ioctl and their top directories just after: a crash in
        // between leaves a volume without them, which gets them back here (owners are set again
        // by every attach).
        for id in entries(&p.sandboxes)? {
            let Ok((fd, _)) = p.open_volume(&id) else {
                continue;
            };
            let mut missing = false;
            for d in [UPPER, WORK, WORKSPACE] {
                missing |= !exists(&fd, d)?;
            }
            if missing {
                make_top_dirs(&fd, Owners { root: 0, user: 0 })?;
                rec.repaired.push(id);
            }
        }
        rec.pending_deletes = entries(&p.trash)?.len();
        let q = p.clone();
        self.purger.start(
            self.cfg.background_purge,
            rec.pending_deletes > 0,
            move || purge_trash(&q),
        )?;
        Ok(rec)
    }

    fn create(&self, id: &str, limit_bytes: u64) -> Result<Volume, StorageError> {
        check_name(id)?;
        check_limit(limit_bytes, MIN_LIMIT)?;
        let p = self.pool()?;
        match btrfs::subvol_create(&p.sandboxes, id, Some(limit_bytes)) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                return Err(StorageError::VolumeExists(id.into()))
            }
            r => r.map_err(io_err(format!("creating the volume of {id}")))?,
        }
        let (fd, sid) = p.open_volume(id)?;
        make_top_dirs(&fd, Owners { root: 0, user: 0 })?;
        p.volume(id, sid)
    }

    fn open(&self, id: &str) -> Result<Volume, StorageError> {
        let p = self.pool()?;
        let (_, sid) = p.open_volume(id)?;
        p.volume(id, sid)
    }

    fn destroy(&self, id: &str) -> Result<(), StorageError> {
        check_name(id)?;
        let p = self.pool()?;
        if p.to_trash(&p.sandboxes, "v", id)? {
            self.nudge();
        }
        Ok(())
    }

    fn usage(&self, id: &str) -> Result<Usage, StorageError> {
        let p = self.pool()?;
        let (_, sid) = p.open_volume(id)?;
        Ok(Usage {
            used_bytes: read_u64(&p.qgroup_file(sid, "referenced"))?,
            limit_bytes: p.limit_of(sid)?,
        })
    }

    fn snapshot(&self, id: &str, snap: &str) -> Result<(), StorageError> {
        check_name(snap)?;
        let p = self.pool()?;
        let (src, _) = p.open_volume(id)?;
        match btrfs::snapshot(&src, &p.snapshots, snap, true, None) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                Err(StorageError::SnapshotExists(snap.into()))
            }
            r => r.map_err(io_err(format!("snapshotting {id}"))),
        }
    }

    fn clone_snapshot(
        &self,
        snap: &str,
        id: &str,
        limit_bytes: u64,
    ) -> Result<Volume, StorageError> {
        check_name(snap)?;
        check_name(id)?;
        check_limit(limit_bytes, MIN_LIMIT)?;
        let p = self.pool()?;
        let src = match open_sub(&p.snapshots, snap) {
            Err(rustix::io::Errno::NOENT) => {
                return Err(StorageError::SnapshotNotFound(snap.into()))
            }
            r => r.map_err(errno(format!("opening snapshot {snap}")))?,
        };
        match btrfs::snapshot(&src, &p.sandboxes, id, false, Some(limit_bytes)) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                return Err(StorageError::VolumeExists(id.into()))
            }
            r => r.map_err(io_err(format!("cloning {snap} into {id}")))?,
        }
        let (_, sid) = p.open_volume(id)?;
        p.volume(id, sid)
    }

    fn delete_snapshot(&self, snap: &str) -> Result<(), StorageError> {
        check_name(snap)?;
        let p = self.pool()?;
        // A read-only subvolume cannot be renamed into the trash; deleting it directly is one
        // ioctl, and cheap: a snapshot holds no cached inodes of its own unless read, and no
        // nested subvolumes (a snapshot leaves them out).
        match btrfs::subvol_delete(&p.snapshots, snap) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r.map_err(io_err(format!("deleting snapshot {snap}"))),
        }
    }

    fn list(&self) -> Result<Inventory, StorageError> {
        let p = self.pool()?;
        let mut inv = Inventory::default();
        for (dir, out) in [
            (&p.sandboxes, &mut inv.volumes),
            (&p.snapshots, &mut inv.snapshots),
        ] {
            for name in entries(dir)? {
                let sub = open_sub(dir, &name).ok();
                let is_subvol = match &sub {
                    Some(fd) => subvolume_of(fd)?.is_some(),
                    None => false,
                };
                if is_subvol && check_name(&name).is_ok() {
                    out.push(name);
                } else {
                    inv.half_made.push(name);
                }
            }
        }
        inv.pending_deletes = entries(&p.trash)?.len();
        Ok(inv)
    }

    fn space(&self) -> Result<Space, StorageError> {
        let p = self.pool()?;
        let st = rustix::fs::fstatvfs(&p.root).map_err(errno("reading the pool's free space"))?;
        let alloc = Path::new("/sys/fs/btrfs").join(&p.fsid).join("allocation");
        let get = |rel: &str| read_u64(&alloc.join(rel)).ok();
        let allocated = ["data", "metadata", "system"]
            .iter()
            .map(|k| get(&format!("{k}/disk_total")))
            .sum::<Option<u64>>();
        let unallocated = device_bytes(&p.fsid)
            .zip(allocated)
            .map(|(dev, a)| dev.saturating_sub(a));
        let metadata_free = (|| {
            let total = get("metadata/total_bytes")?;
            let taken = [
                "bytes_used",
                "bytes_reserved",
                "bytes_pinned",
                "bytes_may_use",
            ]
            .iter()
            .map(|f| get(&format!("metadata/{f}")))
            .sum::<Option<u64>>()?;
            Some(total.saturating_sub(taken))
        })();
        Ok(Space {
            path: p.mountpoint.clone(),
            total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
            free_bytes: st.f_bavail.saturating_mul(st.f_frsize),
            unallocated_bytes: unallocated,
            metadata_free_bytes: metadata_free,
        })
    }

    fn purge(&self) -> Result<usize, StorageError> {
        purge_trash(&*self.pool()?)
    }
}

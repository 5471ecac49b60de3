//! [`Ext4Loop`]: the fallback, for kernels without btrfs simple quotas. Each sandbox's volume is
//! an ext4 image, `<data>/sandboxes/<id>/disk.img` (the layout burrow always had), mounted on a
//! loop device inside the sandbox's mount namespace only ([`crate::Volume::attach`]).
//!
//! A new volume is a sparse copy of a blank image formatted once per size
//! (`<data>/storage/templates/`): ~0.4 ms instead of `mkfs` on every create. A clone with a
//! larger limit than its snapshot's disk is grown offline (`e2fsck`, `resize2fs`) before it is
//! put in place; a smaller one is refused ([`StorageError::LimitTooSmall`]). Snapshots
//! (`<data>/storage/snapshots/<name>.img`) and clones are sparse copies too, so on a data
//! filesystem without reflinks (ext4) they cost what the files hold: [`Storage::costs`] says
//! [`Cost::Data`]. Copies are made under `storage/staging/`, synced, and renamed into place
//! without replacing anything; `prepare` removes what a crash left in `staging/`, and deletes go
//! through `storage/trash/`.
//!
//! A snapshot of an attached volume first flushes the filesystem on its loop device
//! (`BLKFLSBUF`: the kernel syncs the filesystem mounted there, journal included), after the node
//! froze the sandbox, so the copy is consistent without a path into the sandbox's mount
//! namespace.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::common::{
    check_limit, check_name, ensure_sub, entries, exists, find_tool, loop_of, open_dir, open_sub,
    original_name, rename_noreplace, sparse_copy, unique, Ready,
};
use crate::purge::PurgeSlot;
use crate::{
    errno, io_err, Cost, Costs, Inventory, Kind, Recovery, Space, Storage, StorageError, Usage,
    Volume, VolumeSource,
};

const SANDBOXES: &str = "sandboxes";
const STORAGE: &str = "storage";
const SNAPSHOTS: &str = "snapshots";
const TEMPLATES: &str = "templates";
const STAGING: &str = "staging";
const TRASH: &str = "trash";
const DISK: &str = "disk.img";
const MIB: u64 = 1024 * 1024;
/// Smallest disk (ext4 wants room for its journal).
const MIN_LIMIT: u64 = 8 * MIB;

/// How an [`Ext4Loop`] is configured.
#[derive(Debug, Clone)]
pub struct Ext4Config {
    pub data_dir: PathBuf,
    /// Delete destroyed images in a background thread (otherwise only [`Storage::purge`] does).
    pub background_purge: bool,
}

struct Dirs {
    data: PathBuf,
    data_fd: OwnedFd,
    sandboxes: OwnedFd,
    snapshots: OwnedFd,
    templates: OwnedFd,
    staging: OwnedFd,
    trash: OwnedFd,
}

/// One ext4 image per sandbox (module docs).
pub struct Ext4Loop {
    cfg: Ext4Config,
    prepared: Ready<Dirs>,
    purger: PurgeSlot,
}

impl Ext4Loop {
    pub fn new(cfg: Ext4Config) -> Ext4Loop {
        Ext4Loop {
            cfg,
            prepared: Ready::default(),
            purger: PurgeSlot::default(),
        }
    }

    fn dirs(&self) -> Result<Arc<Dirs>, StorageError> {
        self.prepared.get()
    }

    fn nudge(&self) {
        self.purger.nudge();
    }

    fn make_dirs(&self) -> Result<Dirs, StorageError> {
        let data = &self.cfg.data_dir;
        std::fs::create_dir_all(data).map_err(io_err(format!("creating {}", data.display())))?;
        let data = std::fs::canonicalize(data).map_err(io_err("resolving the data directory"))?;
        let data_fd = open_dir(&data)?;
        let sandboxes = ensure_sub(&data_fd, SANDBOXES)?;
        // The sandbox directories must stay traversable for the sandboxes' own uids.
        rustix::fs::fchmod(&sandboxes, Mode::from_raw_mode(0o711))
            .map_err(errno("chmod of the sandboxes directory"))?;
        let storage = ensure_sub(&data_fd, STORAGE)?;
        Ok(Dirs {
            snapshots: ensure_sub(&storage, SNAPSHOTS)?,
            templates: ensure_sub(&storage, TEMPLATES)?,
            staging: ensure_sub(&storage, STAGING)?,
            trash: ensure_sub(&storage, TRASH)?,
            sandboxes,
            data,
            data_fd,
        })
    }
}

fn snap_file(snap: &str) -> String {
    format!("{snap}.img")
}

/// A disk size in whole 4 KiB blocks (what ext4 and the loop device use).
fn round_limit(limit: u64) -> u64 {
    limit / 4096 * 4096
}

/// Opens `dir/name` as a regular file, never through a link.
fn open_file(dir: &OwnedFd, name: &str, flags: OFlags) -> rustix::io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(rustix::io::Errno::INVAL);
    }
    Ok(File::from(fd))
}

/// A new file in `staging` holding a sparse copy of `src` (`len` bytes, then extended to
/// `size`), synced. Returns its name there.
fn staged_copy(
    d: &Dirs,
    kind: &str,
    name: &str,
    src: &File,
    len: u64,
    size: u64,
) -> Result<String, StorageError> {
    let tmp = unique(kind, name);
    let fd = rustix::fs::openat(
        &d.staging,
        tmp.as_str(),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(errno("creating a copy"))?;
    let f = File::from(fd);
    let copied = sparse_copy(src, &f, len)
        .map_err(|e| StorageError::io(format!("copying {name}"), e))
        .and_then(|_| {
            if size > len {
                grow_image(&f, &d.data.join(STORAGE).join(STAGING).join(&tmp), size)
            } else {
                Ok(())
            }
        })
        .and_then(|()| {
            f.sync_all()
                .map_err(io_err(format!("syncing the copy of {name}")))
        });
    if let Err(e) = copied {
        let _ = rustix::fs::unlinkat(&d.staging, tmp.as_str(), AtFlags::empty());
        return Err(e);
    }
    Ok(tmp)
}

/// Grows the ext4 image `f` (at `path`, not mounted anywhere) to `size` bytes: the file, then its
/// filesystem. A snapshot of a mounted disk has a journal to replay first, which `e2fsck` does;
/// the kernel's online resize would need `CAP_SYS_RESOURCE`, which hosts may not give.
fn grow_image(f: &File, path: &Path, size: u64) -> Result<(), StorageError> {
    f.set_len(size).map_err(io_err("growing a disk"))?;
    let tool = |name: &str| {
        find_tool(name).ok_or_else(|| {
            StorageError::Unsupported(format!("{name} is missing (install e2fsprogs)"))
        })
    };
    let run = |cmd: &mut Command, ok: &[i32]| -> Result<(), StorageError> {
        let out = cmd.output().map_err(io_err("running e2fsprogs"))?;
        if out.status.code().is_some_and(|c| ok.contains(&c)) {
            return Ok(());
        }
        Err(StorageError::Io {
            what: format!(
                "{:?} failed ({}): {}",
                cmd.get_program(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            source: std::io::Error::other("e2fsprogs"),
        })
    };
    // 0: clean; 1: errors corrected (the journal replayed counts).
    run(
        Command::new(tool("e2fsck")?).args(["-f", "-p"]).arg(path),
        &[0, 1],
    )?;
    run(
        Command::new(tool("resize2fs")?)
            .arg(path)
            .arg(format!("{}K", size / 1024)),
        &[0],
    )
}

/// Moves a staged copy to `dir/to` (never replacing anything) and syncs `dir`; false (and the
/// copy removed) if `to` exists.
fn publish(d: &Dirs, tmp: &str, dir: &OwnedFd, to: &str) -> Result<bool, StorageError> {
    let moved =
        rename_noreplace(&d.staging, tmp, dir, to).map_err(errno("moving a copy into place"));
    if !matches!(moved, Ok(true)) {
        let _ = rustix::fs::unlinkat(&d.staging, tmp, AtFlags::empty());
    }
    if moved? {
        rustix::fs::fsync(dir).map_err(errno("syncing a directory"))?;
        return Ok(true);
    }
    Ok(false)
}

/// The blank image of `size` bytes, formatted once (`mkfs.ext4` with burrow's flags: no reserved
/// blocks, lazy inode tables and journal) and kept for every later create of that size.
fn template(d: &Dirs, size: u64) -> Result<File, StorageError> {
    let name = format!("ext4-{size}.img");
    match open_file(&d.templates, &name, OFlags::RDONLY) {
        Ok(f) => return Ok(f),
        Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(StorageError::io("opening a blank disk", e.into())),
    }
    let tmp = unique("t", &size.to_string());
    let f = rustix::fs::openat(
        &d.staging,
        tmp.as_str(),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(errno("creating a blank disk"))?;
    let f = File::from(f);
    f.set_len(size).map_err(io_err("sizing a blank disk"))?;
    let path = d.data.join(STORAGE).join(STAGING).join(&tmp);
    let out = Command::new(mkfs_ext4().ok_or_else(|| {
        StorageError::Unsupported("mkfs.ext4 is missing (install e2fsprogs)".into())
    })?)
    .args([
        "-q",
        "-F",
        "-m",
        "0",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
    ])
    .arg(&path)
    .output()
    .map_err(io_err("running mkfs.ext4"))?;
    if !out.status.success() {
        let _ = rustix::fs::unlinkat(&d.staging, tmp.as_str(), AtFlags::empty());
        return Err(StorageError::Io {
            what: format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            source: std::io::Error::other("mkfs.ext4"),
        });
    }
    f.sync_all().map_err(io_err("syncing a blank disk"))?;
    // Another create may have made the same template meanwhile: either is fine.
    publish(d, &tmp, &d.templates, &name)?;
    open_file(&d.templates, &name, OFlags::RDONLY).map_err(errno("opening a blank disk"))
}

fn mkfs_ext4() -> Option<PathBuf> {
    find_tool("mkfs.ext4")
}

impl Dirs {
    fn image_path(&self, id: &str) -> PathBuf {
        self.data.join(SANDBOXES).join(id).join(DISK)
    }

    fn volume(&self, id: &str, size: u64) -> Volume {
        Volume {
            id: id.to_string(),
            limit_bytes: size,
            source: VolumeSource::Ext4 {
                image: self.image_path(id),
            },
        }
    }

    /// The sandbox's directory, if it exists.
    fn sandbox_dir(&self, id: &str) -> Result<Option<OwnedFd>, StorageError> {
        check_name(id)?;
        match open_sub(&self.sandboxes, id) {
            Ok(fd) => Ok(Some(fd)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(StorageError::io(
                format!("opening the directory of {id}"),
                e.into(),
            )),
        }
    }

    /// The volume's image, opened.
    fn image(&self, id: &str) -> Result<(OwnedFd, File), StorageError> {
        let dir = self
            .sandbox_dir(id)?
            .ok_or_else(|| StorageError::VolumeNotFound(id.into()))?;
        let f = match open_file(&dir, DISK, OFlags::RDONLY) {
            Err(rustix::io::Errno::NOENT) => return Err(StorageError::VolumeNotFound(id.into())),
            r => r.map_err(errno(format!("opening the disk of {id}")))?,
        };
        Ok((dir, f))
    }

    /// Puts a staged copy in place as `id`'s disk.
    fn publish_volume(&self, id: &str, tmp: &str) -> Result<(), StorageError> {
        match rustix::fs::mkdirat(&self.sandboxes, id, Mode::from_raw_mode(0o711)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                let _ = rustix::fs::unlinkat(&self.staging, tmp, AtFlags::empty());
                return Err(StorageError::io(
                    format!("creating the directory of {id}"),
                    e.into(),
                ));
            }
        }
        let dir = match open_sub(&self.sandboxes, id) {
            Ok(d) => d,
            Err(e) => {
                let _ = rustix::fs::unlinkat(&self.staging, tmp, AtFlags::empty());
                return Err(StorageError::io(
                    format!("opening the directory of {id}"),
                    e.into(),
                ));
            }
        };
        if !publish(self, tmp, &dir, DISK)? {
            return Err(StorageError::VolumeExists(id.into()));
        }
        Ok(())
    }
}

fn purge_trash(d: &Dirs) -> Result<usize, StorageError> {
    let mut done = 0;
    for name in entries(&d.trash)? {
        match rustix::fs::unlinkat(&d.trash, name.as_str(), AtFlags::empty()) {
            Ok(()) => done += 1,
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => tracing::warn!(entry = %name, error = %e, "storage: deleting a disk failed"),
        }
    }
    Ok(done)
}

impl Storage for Ext4Loop {
    fn kind(&self) -> Kind {
        Kind::Ext4
    }

    fn costs(&self) -> Costs {
        Costs {
            create: Cost::Constant,
            snapshot: Cost::Data,
            clone: Cost::Data,
            destroy: Cost::Constant,
        }
    }

    fn prepare(&self) -> Result<Recovery, StorageError> {
        if mkfs_ext4().is_none() {
            return Err(StorageError::Unsupported(
                "mkfs.ext4 is missing (install e2fsprogs)".into(),
            ));
        }
        let d = self.prepared.get_or_make(|| self.make_dirs())?;
        let mut rec = Recovery::default();
        // Whatever is in staging was being copied when the process died: it was never in place.
        for name in entries(&d.staging)? {
            match rustix::fs::unlinkat(&d.staging, name.as_str(), AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {
                    rec.removed_half_made.push(original_name(&name))
                }
                Err(e) => return Err(StorageError::io("removing a half-made copy", e.into())),
            }
        }
        rec.pending_deletes = entries(&d.trash)?.len();
        let q = d.clone();
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
        let size = round_limit(limit_bytes);
        let d = self.dirs()?;
        if let Some(dir) = d.sandbox_dir(id)? {
            if exists(&dir, DISK)? {
                return Err(StorageError::VolumeExists(id.into()));
            }
        }
        let blank = template(&d, size)?;
        let tmp = staged_copy(&d, "v", id, &blank, size, size)?;
        d.publish_volume(id, &tmp)?;
        Ok(d.volume(id, size))
    }

    fn open(&self, id: &str) -> Result<Volume, StorageError> {
        let d = self.dirs()?;
        let (_, f) = d.image(id)?;
        let size = f.metadata().map_err(io_err("reading a disk"))?.len();
        Ok(d.volume(id, size))
    }

    fn destroy(&self, id: &str) -> Result<(), StorageError> {
        let d = self.dirs()?;
        let Some(dir) = d.sandbox_dir(id)? else {
            return Ok(());
        };
        match rustix::fs::renameat(&dir, DISK, &d.trash, unique("v", id).as_str()) {
            Ok(()) => self.nudge(),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => {
                return Err(StorageError::io(
                    format!("deleting the disk of {id}"),
                    e.into(),
                ))
            }
        }
        Ok(())
    }

    fn usage(&self, id: &str) -> Result<Usage, StorageError> {
        let d = self.dirs()?;
        let (_, f) = d.image(id)?;
        let st = rustix::fs::fstat(&f).map_err(errno("reading a disk"))?;
        Ok(Usage {
            used_bytes: (st.st_blocks as u64).saturating_mul(512),
            limit_bytes: st.st_size as u64,
        })
    }

    fn snapshot(&self, id: &str, snap: &str) -> Result<(), StorageError> {
        check_name(snap)?;
        let d = self.dirs()?;
        if exists(&d.snapshots, &snap_file(snap))? {
            return Err(StorageError::SnapshotExists(snap.into()));
        }
        let (_, src) = d.image(id)?;
        if let Some(dev) = loop_of(&d.image_path(id))? {
            burrow_linux::loopdev::flush(&dev)
                .map_err(io_err(format!("flushing the disk of {id}")))?;
        }
        let len = src.metadata().map_err(io_err("reading a disk"))?.len();
        let tmp = staged_copy(&d, "s", snap, &src, len, len)?;
        if !publish(&d, &tmp, &d.snapshots, &snap_file(snap))? {
            return Err(StorageError::SnapshotExists(snap.into()));
        }
        Ok(())
    }

    fn clone_snapshot(
        &self,
        snap: &str,
        id: &str,
        limit_bytes: u64,
    ) -> Result<Volume, StorageError> {
        check_name(snap)?;
        check_name(id)?;
        let d = self.dirs()?;
        let src = match open_file(&d.snapshots, &snap_file(snap), OFlags::RDONLY) {
            Err(rustix::io::Errno::NOENT) => {
                return Err(StorageError::SnapshotNotFound(snap.into()))
            }
            r => r.map_err(errno(format!("opening snapshot {snap}")))?,
        };
        let len = src.metadata().map_err(io_err("reading a snapshot"))?.len();
        let size = round_limit(limit_bytes);
        if size < len {
            return Err(StorageError::LimitTooSmall {
                asked: limit_bytes,
                needed: len,
            });
        }
        if let Some(dir) = d.sandbox_dir(id)? {
            if exists(&dir, DISK)? {
                return Err(StorageError::VolumeExists(id.into()));
            }
        }
        let tmp = staged_copy(&d, "v", id, &src, len, size)?;
        d.publish_volume(id, &tmp)?;
        Ok(d.volume(id, size))
    }

    fn delete_snapshot(&self, snap: &str) -> Result<(), StorageError> {
        check_name(snap)?;
        let d = self.dirs()?;
        match rustix::fs::renameat(
            &d.snapshots,
            snap_file(snap).as_str(),
            &d.trash,
            unique("s", snap).as_str(),
        ) {
            Ok(()) => self.nudge(),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => {
                return Err(StorageError::io(
                    format!("deleting snapshot {snap}"),
                    e.into(),
                ))
            }
        }
        Ok(())
    }

    fn list(&self) -> Result<Inventory, StorageError> {
        let d = self.dirs()?;
        let mut inv = Inventory::default();
        for id in entries(&d.sandboxes)? {
            if check_name(&id).is_err() {
                continue;
            }
            if let Ok(dir) = open_sub(&d.sandboxes, &id) {
                if exists(&dir, DISK)? {
                    inv.volumes.push(id);
                }
            }
        }
        for name in entries(&d.snapshots)? {
            match name.strip_suffix(".img") {
                Some(s) if check_name(s).is_ok() => inv.snapshots.push(s.to_string()),
                _ => inv.half_made.push(name),
            }
        }
        inv.half_made
            .extend(entries(&d.staging)?.iter().map(|n| original_name(n)));
        inv.pending_deletes = entries(&d.trash)?.len();
        Ok(inv)
    }

    fn space(&self) -> Result<Space, StorageError> {
        let d = self.dirs()?;
        let st = rustix::fs::fstatvfs(&d.data_fd).map_err(errno("reading the free space"))?;
        Ok(Space {
            path: d.data.clone(),
            total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
            free_bytes: st.f_bavail.saturating_mul(st.f_frsize),
            unallocated_bytes: None,
            metadata_free_bytes: None,
        })
    }

    fn purge(&self) -> Result<usize, StorageError> {
        purge_trash(&*self.dirs()?)
    }
}

//! What both implementations share: name checks, opening the storage's own directories one plain
//! name at a time (never through a link), unique names for half-made and deleted things, atomic
//! renames, and the sparse copy of an image file.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, SeekFrom};

use crate::{errno, StorageError};

/// Longest sandbox id or snapshot name.
const NAME_MAX: usize = 64;

/// Checks a sandbox id or snapshot name: `[A-Za-z0-9_-]`, 1-64 bytes. Such a name has no `/`,
/// `.` or NUL, so it can only ever name one entry of the directory it is used in.
pub(crate) fn check_name(name: &str) -> Result<(), StorageError> {
    let bad = |why| {
        Err(StorageError::InvalidName {
            name: name.chars().take(80).collect(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > NAME_MAX {
        return bad("longer than 64 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return bad("only letters, digits, '-' and '_' are allowed");
    }
    Ok(())
}

/// What `prepare` made (the pool's or the directories' descriptors), shared by every later call.
pub(crate) struct Ready<T>(Mutex<Option<Arc<T>>>);

impl<T> Default for Ready<T> {
    fn default() -> Self {
        Ready(Mutex::new(None))
    }
}

impl<T> Ready<T> {
    pub(crate) fn get(&self) -> Result<Arc<T>, StorageError> {
        self.0
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .ok_or_else(|| StorageError::PoolUnavailable("not prepared".into()))
    }

    /// The prepared value, made by `make` the first time (one caller at a time).
    pub(crate) fn get_or_make(
        &self,
        make: impl FnOnce() -> Result<T, StorageError>,
    ) -> Result<Arc<T>, StorageError> {
        let mut guard = self
            .0
            .lock()
            .map_err(|_| StorageError::PoolUnavailable("a prepare panicked".into()))?;
        if let Some(v) = guard.as_ref() {
            return Ok(v.clone());
        }
        let v = Arc::new(make()?);
        *guard = Some(v.clone());
        Ok(v)
    }

    pub(crate) fn take(&self) -> Option<Arc<T>> {
        self.0.lock().ok().and_then(|mut p| p.take())
    }
}

/// Refuses a limit under `min`.
pub(crate) fn check_limit(limit: u64, min: u64) -> Result<(), StorageError> {
    if limit < min {
        return Err(StorageError::LimitTooSmall {
            asked: limit,
            needed: min,
        });
    }
    Ok(())
}

/// A name no other call (in this or any other process) will make: for entries of `staging/` and
/// `trash/`, `<kind>.<name>.<pid>.<nanos>.<n>`. The dots keep it apart from every valid id.
pub(crate) fn unique(kind: &str, name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{kind}.{name}.{}.{nanos}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The name a `unique` entry was made for (`v.<id>.…` → `<id>`), for reports.
pub(crate) fn original_name(entry: &str) -> String {
    let mut parts = entry.splitn(3, '.');
    match (parts.next(), parts.next()) {
        (Some(kind), Some(name)) => format!("{kind}:{name}"),
        _ => entry.to_string(),
    }
}

/// Opens the directory `path` (a host path burrow made; its last component must not be a link).
pub(crate) fn open_dir(path: &Path) -> Result<OwnedFd, StorageError> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno(format!("opening {}", path.display())))
}

/// Opens the entry `name` of `dir` as a directory, never through a link.
pub(crate) fn open_sub(dir: impl AsFd, name: &str) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// `mkdir` of `name` in `dir` (mode 0700, root's), fine if it exists as a directory.
pub(crate) fn ensure_sub(dir: impl AsFd, name: &str) -> Result<OwnedFd, StorageError> {
    let dir = dir.as_fd();
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(StorageError::io(format!("creating {name}"), e.into())),
    }
    open_sub(dir, name).map_err(errno(format!("opening {name}")))
}

/// Whether `dir` has an entry `name` (of any type; links are not followed).
pub(crate) fn exists(dir: impl AsFd, name: &str) -> Result<bool, StorageError> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(StorageError::io(format!("looking up {name}"), e.into())),
    }
}

/// Renames `from_dir/from` to `to_dir/to` in one step, never replacing anything: `Ok(false)`
/// when `to` exists.
pub(crate) fn rename_noreplace(
    from_dir: impl AsFd,
    from: &str,
    to_dir: impl AsFd,
    to: &str,
) -> rustix::io::Result<bool> {
    match rustix::fs::renameat_with(from_dir, from, to_dir, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::EXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Names in `dir` (not `.` or `..`).
pub(crate) fn entries(dir: impl AsFd) -> Result<Vec<String>, StorageError> {
    // A fresh descriptor: reading a directory moves its offset.
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("reopening a directory"))?;
    let mut out = Vec::new();
    let d = rustix::fs::Dir::read_from(&fd).map_err(errno("reading a directory"))?;
    for e in d {
        let e = e.map_err(errno("reading a directory"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// The loop device whose backing file is exactly `image`.
pub(crate) fn loop_of(image: &Path) -> Result<Option<PathBuf>, StorageError> {
    let want = image.as_os_str().as_encoded_bytes();
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Ok(None);
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read(format!("/sys/block/{name}/loop/backing_file")) {
            if b.strip_suffix(b"\n").unwrap_or(&b) == want {
                return Ok(Some(PathBuf::from(format!("/dev/{name}"))));
            }
        }
    }
    Ok(None)
}

/// A tool in the usual system directories or on `PATH` (the server's `PATH` may lack `sbin`).
pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Copies `len` bytes of `src` into `dst` (a new, empty file), writing only `src`'s data ranges:
/// the holes of a sparse image stay holes (`SEEK_DATA`/`SEEK_HOLE`, then `copy_file_range`,
/// which the kernel does without a trip through user space).
pub(crate) fn sparse_copy(src: &File, dst: &File, len: u64) -> std::io::Result<u64> {
    dst.set_len(len)?;
    let mut pos = 0u64;
    let mut copied = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data))?.min(len);
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = usize::try_from(hole - off_in)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            let n =
                rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the source image shrank while it was copied",
                ));
            }
            copied += n as u64;
        }
        pos = hole;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn names_are_one_plain_entry() {
        for good in ["a", "sbx-1_A", &"x".repeat(64)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a.b",
            "a b",
            "é",
            &"x".repeat(65),
            "a\0",
        ] {
            let e = check_name(bad).unwrap_err();
            assert_eq!(e.code(), "invalid_name", "{bad:?}");
        }
    }

    #[test]
    fn unique_names_differ_and_say_what_they_were() {
        let (a, b) = (unique("v", "sbx"), unique("v", "sbx"));
        assert_ne!(a, b);
        assert_eq!(original_name(&a), "v:sbx");
        assert!(
            check_name(&a).is_err(),
            "a staging name must never be a valid id"
        );
    }

    #[test]
    fn a_sparse_copy_keeps_holes_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = File::create(dir.path().join("src")).unwrap();
        let len = 64u64 << 20;
        src.set_len(len).unwrap();
        src.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
        src.write_all(&[7u8; 8192]).unwrap();
        src.seek(std::io::SeekFrom::Start(40 << 20)).unwrap();
        src.write_all(b"tail").unwrap();
        src.sync_all().unwrap();
        let src = File::open(dir.path().join("src")).unwrap();
        let dst = File::create(dir.path().join("dst")).unwrap();
        let copied = sparse_copy(&src, &dst, len).unwrap();
        assert!(
            copied < 1 << 20,
            "copied {copied} bytes of a mostly empty image"
        );
        let mut a = Vec::new();
        let mut b = Vec::new();
        File::open(dir.path().join("src"))
            .unwrap()
            .read_to_end(&mut a)
            .unwrap();
        File::open(dir.path().join("dst"))
            .unwrap()
            .read_to_end(&mut b)
            .unwrap();
        assert!(a == b, "the copy differs");
        let blocks = std::os::unix::fs::MetadataExt::blocks(&dst.metadata().unwrap());
        assert!(
            blocks * 512 < 1 << 20,
            "the copy is not sparse: {blocks} blocks"
        );
    }
}

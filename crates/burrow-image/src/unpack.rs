//! One layer (a tar, plain, gzip or zstd) unpacked into a directory, safely.
//!
//! The layer is hostile input. Every entry is created through a descriptor of its parent
//! directory, which is resolved with `openat2(RESOLVE_IN_ROOT)` under the layer's root
//! ([`burrow_linux::fs::dir_in_root`]): a link the layer made earlier resolves inside the layer,
//! never to a host path. The entry itself is made with `O_EXCL | O_NOFOLLOW` (or
//! `symlinkat`/`linkat`/`mkdirat`, which never follow the last component), after whatever was at
//! that name is removed. Then:
//!
//! - names with a `..` component or a leading `/` are refused ([`Error::UnsafePath`]);
//! - symbolic links are stored as links, whatever they point at; hard links must name an entry
//!   of the same layer;
//! - device nodes are skipped and counted (a sandbox gets its devices from burrow, never from an
//!   image); FIFOs are kept;
//! - whiteouts become overlayfs whiteouts (`.wh.NAME` → a 0/0 character device `NAME`;
//!   `.wh..wh..opq` → `trusted.overlay.opaque=y` on the directory), so the layers stack as
//!   overlay lower directories;
//! - extended attributes: only `user.*` and `security.capability` are kept (a layer must not
//!   set `trusted.overlay.*` and so forge overlay metadata);
//! - owners and modes (set-id bits included) are kept as the tar says, owned by host uids: the
//!   store's directories are 0700, and sandboxes see the files through idmapped mounts;
//! - the uncompressed bytes and the entries are counted against [`LayerLimits`]; a layer over
//!   either is [`Error::LimitExceeded`] (the caller discards the half-made directory).
//!
//! The uncompressed stream's sha256 is the layer's `diff_id`, returned for the caller to check
//! against the image config.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, XattrFlags};
use serde::{Deserialize, Serialize};

use crate::digest::HashingReader;
use crate::error::io_err;
use crate::{Digest, Error, Result};

/// Per-layer limits. The defaults fit the largest common images (CUDA and ML layers of a few
/// GiB, a few hundred thousand files) with room to spare.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct LayerLimits {
    /// Uncompressed bytes of one layer's tar stream.
    pub max_bytes: u64,
    /// Entries in one layer.
    pub max_entries: u64,
}

impl Default for LayerLimits {
    fn default() -> Self {
        LayerLimits {
            max_bytes: 16 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// What one unpacked layer holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unpacked {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar.
    pub bytes: u64,
    pub entries: u64,
    /// Device nodes in the layer, not created.
    pub skipped_devices: u64,
    /// Where the last entry's data ends in the stream, and whether reading the next header
    /// failed (see `unpack`).
    #[serde(skip)]
    data_end: u64,
    #[serde(skip)]
    cut_at_header: bool,
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const MAX_PATH: usize = 4096;

/// Reads the first bytes of `input` to tell its compression, and returns a reader of the
/// uncompressed stream.
pub(crate) fn decompress<'a>(input: impl Read + 'a, what: &str) -> Result<Box<dyn Read + 'a>> {
    let mut input = BufReader::with_capacity(64 << 10, input);
    let head = input
        .fill_buf()
        .map_err(io_err(format!("reading {what}")))?;
    Ok(match head {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(input)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            Box::new(ruzstd::decoding::StreamingDecoder::new(input).map_err(|e| {
                Error::Corrupt {
                    what: what.to_owned(),
                    why: format!("zstd: {e}"),
                }
            })?)
        }
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
            return Err(Error::Unsupported {
                what: "layer compression",
                value: "xz".into(),
            })
        }
        [b'B', b'Z', b'h', ..] => {
            return Err(Error::Unsupported {
                what: "layer compression",
                value: "bzip2".into(),
            })
        }
        _ => Box::new(input),
    })
}

/// Unpacks the layer `input` (any supported compression) into the directory `root`, which the
/// caller made empty and alone writes. `what` names the layer in errors.
pub fn unpack(input: impl Read, root: &Path, limits: &LayerLimits, what: &str) -> Result<Unpacked> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(format!("opening {}", root.display()), e.into()))?;
    let plain = decompress(input, what)?;
    let mut archive = tar::Archive::new(HashingReader::new(plain, limits.max_bytes));
    let mut stats = Unpacked {
        diff_id: Digest::of(b""),
        bytes: 0,
        entries: 0,
        skipped_devices: 0,
        data_end: 0,
        cut_at_header: false,
    };
    let result = unpack_entries(&mut archive, &root_fd, limits, what, &mut stats);
    let mut reader = archive.into_inner();
    let over = |r: &HashingReader<_>| Error::LimitExceeded {
        limit: "max_layer_bytes",
        max: limits.max_bytes,
        what: format!("{what} ({} bytes read so far)", r.count),
    };
    if let Err(e) = result {
        // Some writers (umoci 0.4) end a layer right after the last entry's data, without the
        // padding and end blocks. The data is all there (and the stream is what the diff_id
        // names), so that end is accepted; any other early end is not.
        let clean_end = stats.cut_at_header && reader.count == stats.data_end && !reader.over;
        if !clean_end {
            return Err(if reader.over { over(&reader) } else { e });
        }
    }
    // The tar's end (zero blocks, padding) is part of the diff_id.
    if let Err(e) = io::copy(&mut reader, &mut io::sink()) {
        return Err(if reader.over {
            over(&reader)
        } else {
            corrupt(what, e)
        });
    }
    stats.bytes = reader.count;
    stats.diff_id = reader.digest();
    Ok(stats)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        what: what.to_owned(),
        why: e.to_string(),
    }
}

fn unpack_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    root: &OwnedFd,
    limits: &LayerLimits,
    what: &str,
    stats: &mut Unpacked,
) -> Result<()> {
    for entry in archive.entries().map_err(|e| corrupt(what, e))? {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                stats.cut_at_header = true;
                return Err(corrupt(what, e));
            }
        };
        stats.data_end = entry.raw_file_position() + entry.size();
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(Error::LimitExceeded {
                limit: "max_layer_entries",
                max: limits.max_entries,
                what: what.to_owned(),
            });
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        let Some(path) = clean(&raw, &shown)? else {
            continue; // the root itself ("./"): the store made it
        };
        if entry.header().entry_size().unwrap_or(0) > limits.max_bytes {
            return Err(Error::LimitExceeded {
                limit: "max_layer_bytes",
                max: limits.max_bytes,
                what: format!("{what}: {shown}"),
            });
        }
        let name = path.file_name().expect("clean paths end in a name");
        let parent_path = path.parent().unwrap_or(Path::new(""));
        let ctx = || format!("unpacking {shown:?} of {what}");
        let parent = burrow_linux::fs::dir_in_root(root, parent_path, 0o755).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTDIR) || e.raw_os_error() == Some(libc::ELOOP) {
                corrupt(what, format!("{shown:?}: a parent is not a directory"))
            } else {
                Error::io(ctx(), e)
            }
        })?;
        let name_bytes = name.as_bytes();
        if name_bytes == OPAQUE.as_bytes() {
            let dir = rustix::fs::openat(
                &parent,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(ctx(), e.into()))?;
            rustix::fs::fsetxattr(&dir, "trusted.overlay.opaque", b"y", XattrFlags::empty())
                .map_err(|e| Error::io(ctx(), e.into()))?;
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT.as_bytes()) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
                return Err(Error::UnsafePath {
                    path: shown,
                    why: "a whiteout must name an entry",
                });
            }
            let hidden = OsStr::from_bytes(hidden);
            clear(&parent, hidden).map_err(|e| Error::io(ctx(), e))?;
            rustix::fs::mknodat(
                &parent,
                hidden,
                FileType::CharacterDevice,
                Mode::empty(),
                rustix::fs::makedev(0, 0),
            )
            .map_err(|e| Error::io(ctx(), e.into()))?;
            continue;
        }
        let header = entry.header();
        let mode = Mode::from_raw_mode(header.mode().map_err(|e| corrupt(what, e))? & 0o7777);
        let uid = header.uid().map_err(|e| corrupt(what, e))?;
        let gid = header.gid().map_err(|e| corrupt(what, e))?;
        let owner = (
            Some(rustix::fs::Uid::from_raw(uid as u32)),
            Some(rustix::fs::Gid::from_raw(gid as u32)),
        );
        let mtime = header.mtime().unwrap_or(0);
        let xattrs = kept_xattrs(&mut entry).map_err(|e| corrupt(what, e))?;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                clear(&parent, name).map_err(|e| Error::io(ctx(), e))?;
                let fd = rustix::fs::openat(
                    &parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| Error::io(ctx(), e.into()))?;
                let mut file = File::from(fd);
                let copied = io::copy(&mut entry, &mut file).map_err(|e| {
                    // A read error is the layer's (or the limit's); a write error is ours.
                    if e.raw_os_error().is_some() {
                        Error::io(ctx(), e)
                    } else {
                        corrupt(what, e)
                    }
                })?;
                if copied != entry.size() {
                    return Err(corrupt(
                        what,
                        format!("{shown:?} cut short: {copied} of {} bytes", entry.size()),
                    ));
                }
                finish(&file, owner, mode, Some(mtime), &xattrs)
                    .map_err(|e| Error::io(ctx(), e))?;
            }
            tar::EntryType::Directory => {
                match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) => {}
                    Err(rustix::io::Errno::EXIST) => {
                        if !is_dir(&parent, name) {
                            clear(&parent, name).map_err(|e| Error::io(ctx(), e))?;
                            rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))
                                .map_err(|e| Error::io(ctx(), e.into()))?;
                        }
                    }
                    Err(e) => return Err(Error::io(ctx(), e.into())),
                }
                let dir = rustix::fs::openat(
                    &parent,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| Error::io(ctx(), e.into()))?;
                finish(&dir, owner, mode, None, &xattrs).map_err(|e| Error::io(ctx(), e))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| corrupt(what, format!("{shown:?}: a link without a target")))?
                    .into_owned();
                clear(&parent, name).map_err(|e| Error::io(ctx(), e))?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, name)
                    .map_err(|e| Error::io(ctx(), e.into()))?;
                rustix::fs::chownat(&parent, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| Error::io(ctx(), e.into()))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| corrupt(what, format!("{shown:?}: a link without a target")))?
                    .into_owned();
                let target_shown = String::from_utf8_lossy(&target).into_owned();
                let Some(target) = clean(&target, &target_shown)? else {
                    return Err(Error::UnsafePath {
                        path: shown,
                        why: "a hard link to the layer's root",
                    });
                };
                let missing = || {
                    corrupt(
                        what,
                        format!("{shown:?}: hard link to {target_shown:?}, which the layer does not hold"),
                    )
                };
                let tparent = burrow_linux::fs::open_in_root(
                    root,
                    target.parent().and_then(Path::to_str).ok_or_else(missing)?,
                    OFlags::PATH | OFlags::DIRECTORY,
                )
                .map_err(|_| missing())?;
                let tname = target.file_name().expect("clean paths end in a name");
                if tname == name && same_dir(&tparent, &parent) {
                    continue;
                }
                clear(&parent, name).map_err(|e| Error::io(ctx(), e))?;
                // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
                rustix::fs::linkat(&tparent, tname, &parent, name, AtFlags::empty()).map_err(
                    |e| match e {
                        rustix::io::Errno::NOENT => missing(),
                        rustix::io::Errno::PERM => {
                            corrupt(what, format!("{shown:?}: hard link to a directory"))
                        }
                        e => Error::io(ctx(), e.into()),
                    },
                )?;
            }
            tar::EntryType::Fifo => {
                clear(&parent, name).map_err(|e| Error::io(ctx(), e))?;
                rustix::fs::mknodat(&parent, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                    .map_err(|e| Error::io(ctx(), e.into()))?;
                let fifo = rustix::fs::openat(
                    &parent,
                    name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| Error::io(ctx(), e.into()))?;
                rustix::fs::chownat(&fifo, "", owner.0, owner.1, AtFlags::EMPTY_PATH)
                    .map_err(|e| Error::io(ctx(), e.into()))?;
                rustix::fs::chmodat(&parent, name, mode, AtFlags::empty())
                    .map_err(|e| Error::io(ctx(), e.into()))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => stats.skipped_devices += 1,
            // GNU volume labels, multi-volume continuations and the like carry no file.
            _ => {}
        }
    }
    Ok(())
}

/// The entry's path as components below the root, or `None` for the root itself. Refuses `..`
/// anywhere and absolute names; drops `.` components and a trailing `/`.
fn clean(raw: &[u8], shown: &str) -> Result<Option<PathBuf>> {
    let refuse = |why| Error::UnsafePath {
        path: shown.to_owned(),
        why,
    };
    // A lone `/` (umoci writes one for the root of an insert) is the root, like `./`.
    if raw.iter().all(|&b| b == b'/') {
        return Ok(None);
    }
    if raw.first() == Some(&b'/') {
        return Err(refuse("an absolute name"));
    }
    if raw.len() > MAX_PATH {
        return Err(refuse("a name longer than 4096 bytes"));
    }
    if raw.contains(&0) {
        return Err(refuse("a NUL byte in a name"));
    }
    let mut out = PathBuf::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(refuse("a `..` component")),
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Removes whatever is at `parent/name` (a directory with everything in it), never following a
/// link there.
fn clear(parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
    match rustix::fs::unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::ISDIR) => {
            // std's remove_dir_all opens each level with O_NOFOLLOW; the parent is named through
            // its descriptor, so no host path is walked.
            std::fs::remove_dir_all(burrow_linux::fs::fd_path(parent).join(name))
        }
        Err(e) => Err(e.into()),
    }
}

fn is_dir(parent: &OwnedFd, name: &OsStr) -> bool {
    rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
        .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
        .unwrap_or(false)
}

fn same_dir(a: &OwnedFd, b: &OwnedFd) -> bool {
    match (rustix::fs::fstat(a), rustix::fs::fstat(b)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// Owner first (a chown clears set-id bits), then mode, times and extended attributes.
fn finish(
    fd: &impl AsFd,
    owner: (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>),
    mode: Mode,
    mtime: Option<u64>,
    xattrs: &[(String, Vec<u8>)],
) -> io::Result<()> {
    rustix::fs::fchown(fd, owner.0, owner.1)?;
    rustix::fs::fchmod(fd, mode)?;
    for (k, v) in xattrs {
        rustix::fs::fsetxattr(fd, k.as_str(), v, XattrFlags::empty())?;
    }
    if let Some(t) = mtime {
        let t = rustix::fs::Timespec {
            tv_sec: t.min(i64::MAX as u64) as i64,
            tv_nsec: 0,
        };
        rustix::fs::futimens(
            fd,
            &rustix::fs::Timestamps {
                last_access: t,
                last_modification: t,
            },
        )?;
    }
    Ok(())
}

/// The entry's PAX extended attributes burrow keeps.
fn kept_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                if name.starts_with("user.") || name == "security.capability" {
                    out.push((name.to_owned(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_or_refused() {
        let c = |s: &str| clean(s.as_bytes(), s);
        assert_eq!(c("./a/./b/").unwrap().unwrap(), PathBuf::from("a/b"));
        assert_eq!(c("./").unwrap(), None);
        assert_eq!(c("/").unwrap(), None);
        for bad in ["/etc/passwd", "../x", "a/../../x", "a/.."] {
            assert_eq!(c(bad).unwrap_err().code(), "unsafe_layer_path", "{bad}");
        }
    }
}

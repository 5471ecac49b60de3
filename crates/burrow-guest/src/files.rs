//! File operations inside the sandbox: path checks, errno → stable codes, and the blocking
//! syscalls behind ReadFile/WriteFile/Stat/ListDir/MakeDir/Rename/Remove. Everything here is
//! synchronous; the connection layer runs it on the blocking pool.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use burrow_types::{codes, FileKind, FileStat};

use crate::sys;

pub const MAX_PATH: usize = 4096;
pub const MAX_COMPONENT: usize = 255;
/// Largest number of entries in one ListDir page.
pub const MAX_LIST: u32 = 1000;
/// Largest chunk read from a file at once (one Data frame).
pub const CHUNK: usize = 1 << 20;
/// Cap on files whose size is not known up front (/proc, /sys report 0).
pub const UNSIZED_READ_CAP: u64 = 1 << 30;

/// A refusal with a stable code (burrow_types::codes) and a human message.
#[derive(Debug, Clone)]
pub struct Fail {
    pub code: &'static str,
    pub message: String,
}

impl Fail {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Fail {
            code,
            message: message.into(),
        }
    }

    /// Maps an errno to a stable code; `what` says what was being done.
    pub fn io(what: &str, err: &io::Error) -> Self {
        let code = match err.raw_os_error() {
            Some(libc::ENOENT) => codes::FILE_NOT_FOUND,
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => codes::PERMISSION_DENIED,
            Some(libc::ENOTDIR) => codes::NOT_A_DIRECTORY,
            Some(libc::EISDIR) => codes::IS_A_DIRECTORY,
            Some(libc::EEXIST) => codes::ALREADY_EXISTS,
            Some(libc::ENOTEMPTY) => codes::DIRECTORY_NOT_EMPTY,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => codes::NO_SPACE,
            Some(libc::ENAMETOOLONG) | Some(libc::ELOOP) => codes::INVALID_PATH,
            // A FIFO with no reader, or a socket: not something we read or write.
            Some(libc::ENXIO) => codes::NOT_REGULAR_FILE,
            _ => codes::INTERNAL,
        };
        Fail {
            code,
            message: format!("{what}: {err}"),
        }
    }
}

/// A checked, lexically cleaned absolute path.
#[derive(Debug, Clone)]
pub struct SPath {
    pub text: String,
    pub c: CString,
}

impl SPath {
    pub fn as_path(&self) -> &Path {
        Path::new(&self.text)
    }

    pub fn is_root(&self) -> bool {
        self.text == "/"
    }

    pub fn name(&self) -> String {
        match self.text.rsplit('/').next() {
            Some("") | None => "/".to_string(),
            Some(n) => n.to_string(),
        }
    }

    pub fn parent(&self) -> Option<SPath> {
        if self.is_root() {
            return None;
        }
        let idx = self.text.rfind('/').unwrap_or(0);
        let p = if idx == 0 { "/" } else { &self.text[..idx] };
        check_path(p).ok()
    }
}

/// Rejects NUL bytes, over-long components and paths; resolves a relative path against `/` and
/// `.`/`..` lexically (`..` at the root stays at the root), so the result is always inside the
/// sandbox's own root whatever the kernel does with symlinks afterwards (F1).
pub fn check_path(p: &str) -> Result<SPath, Fail> {
    if p.contains('\0') {
        return Err(Fail::new(codes::INVALID_PATH, "path contains a NUL byte"));
    }
    if p.len() > MAX_PATH {
        return Err(Fail::new(
            codes::INVALID_PATH,
            format!("path is over {MAX_PATH} bytes"),
        ));
    }
    if p.is_empty() {
        return Err(Fail::new(codes::INVALID_PATH, "empty path"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for comp in p.split('/') {
        if comp.len() > MAX_COMPONENT {
            return Err(Fail::new(
                codes::INVALID_PATH,
                format!("a path component is over {MAX_COMPONENT} bytes"),
            ));
        }
        match comp {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    let text = format!("/{}", parts.join("/"));
    let c = CString::new(text.clone())
        .map_err(|_| Fail::new(codes::INVALID_PATH, "path contains a NUL byte"))?;
    Ok(SPath { text, c })
}

/// The uid/gid a request acts as, with its name and home directory.
#[derive(Debug, Clone)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: String,
}

/// `root`, `user`, any name from the sandbox's /etc/passwd, or a numeric uid.
pub fn resolve_user(spec: Option<&str>) -> Result<User, Fail> {
    let spec = spec.unwrap_or("root");
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let numeric = spec.parse::<u32>().ok();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
            continue;
        };
        if f[0] == spec || numeric == Some(uid) {
            return Ok(User {
                uid,
                gid,
                name: f[0].to_string(),
                home: f[5].to_string(),
            });
        }
    }
    match (spec, numeric) {
        ("root", _) | (_, Some(0)) => Ok(User {
            uid: 0,
            gid: 0,
            name: "root".into(),
            home: "/root".into(),
        }),
        ("user", _) => Ok(User {
            uid: 1000,
            gid: 1000,
            name: "user".into(),
            home: "/home/user".into(),
        }),
        (_, Some(uid)) => Ok(User {
            uid,
            gid: uid,
            name: uid.to_string(),
            home: "/".into(),
        }),
        _ => Err(Fail::new(
            codes::BAD_REQUEST,
            format!(
                "unknown user {spec:?}; use \"root\", \"user\", a numeric uid or a name in the sandbox's /etc/passwd"
            ),
        )),
    }
}

/// The (uid, gid) to chown new files and directories to, or None when that is who we are.
pub fn owner_for(user: Option<&str>) -> Result<Option<(u32, u32)>, Fail> {
    let u = resolve_user(user)?;
    let (euid, egid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if u.uid == euid && u.gid == egid {
        Ok(None)
    } else {
        Ok(Some((u.uid, u.gid)))
    }
}

fn kind_of(ft: std::fs::FileType) -> FileKind {
    if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

fn to_stat(path: &Path, text: String, name: String, md: &std::fs::Metadata) -> FileStat {
    let kind = kind_of(md.file_type());
    let symlink_target = if kind == FileKind::Symlink {
        std::fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    FileStat {
        path: text,
        name,
        kind,
        size: md.size(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        modified: md.mtime(),
        symlink_target,
    }
}

/// lstat: symlinks are reported, not followed.
pub fn stat(p: &SPath) -> Result<FileStat, Fail> {
    let md = std::fs::symlink_metadata(p.as_path()).map_err(|e| Fail::io("stat", &e))?;
    Ok(to_stat(p.as_path(), p.text.clone(), p.name(), &md))
}

/// One page of a directory. The cursor is the getdents64 `d_off` of the last entry returned,
/// so memory stays bounded by `limit` whatever the directory's size (F6).
pub fn list_dir(
    p: &SPath,
    cursor: Option<u64>,
    limit: u32,
) -> Result<(Vec<FileStat>, Option<u64>), Fail> {
    let limit = limit.clamp(1, MAX_LIST) as usize;
    let dir = sys::open(&p.c, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOCTTY, 0)
        .map_err(|e| Fail::io("open directory", &e))?;
    let mut raw = Vec::with_capacity(limit + 1);
    sys::read_dir_from(&dir, cursor.map(|c| c as i64), limit + 1, &mut raw)
        .map_err(|e| Fail::io("read directory", &e))?;
    let more = raw.len() > limit;
    raw.truncate(limit);
    let next_cursor = if more {
        raw.last().map(|e| e.next_off as u64)
    } else {
        None
    };
    let mut entries = Vec::with_capacity(raw.len());
    for e in raw {
        let name_os = OsStr::from_bytes(&e.name);
        let full = p.as_path().join(name_os);
        // An entry removed since getdents is skipped, not an error.
        let Ok(md) = std::fs::symlink_metadata(&full) else {
            continue;
        };
        let text = full.to_string_lossy().into_owned();
        let name = name_os.to_string_lossy().into_owned();
        entries.push(to_stat(&full, text, name, &md));
    }
    Ok((entries, next_cursor))
}

/// `mkdir -p` of `p` (including `p` itself when `include_self`), chowning what it creates.
/// Returns whether `p` itself was created.
fn mkdir_p(p: &SPath, owner: Option<(u32, u32)>, include_self: bool) -> Result<bool, Fail> {
    let mut chain = Vec::new();
    let mut cur = if include_self {
        Some(p.clone())
    } else {
        p.parent()
    };
    while let Some(c) = cur {
        if c.is_root() {
            break;
        }
        cur = c.parent();
        chain.push(c);
    }
    let mut created_last = false;
    for (i, d) in chain.iter().rev().enumerate() {
        let last = i + 1 == chain.len();
        match nix::unistd::mkdir(d.as_path(), nix::sys::stat::Mode::from_bits_truncate(0o755)) {
            Ok(()) => {
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::lchown(d.as_path(), Some(uid), Some(gid))
                        .map_err(|e| Fail::io("chown directory", &e))?;
                }
                created_last = last;
            }
            Err(nix::errno::Errno::EEXIST) => {
                let md = std::fs::metadata(d.as_path()).map_err(|e| Fail::io("stat", &e))?;
                if !md.is_dir() {
                    return Err(Fail::new(
                        codes::NOT_A_DIRECTORY,
                        format!("{} exists and is not a directory", d.text),
                    ));
                }
                created_last = false;
            }
            Err(e) => return Err(Fail::io("create directory", &io::Error::from(e))),
        }
    }
    Ok(created_last)
}

/// Creates `p` and its parents; `already_exists` when `p` was already there (so a caller can
/// tell "created" from "was there").
pub fn make_dir(p: &SPath, user: Option<&str>) -> Result<FileStat, Fail> {
    let owner = owner_for(user)?;
    if p.is_root() || !mkdir_p(p, owner, true)? {
        return Err(Fail::new(
            codes::ALREADY_EXISTS,
            format!("{} already exists", p.text),
        ));
    }
    stat(p)
}

pub fn rename(from: &SPath, to: &SPath) -> Result<FileStat, Fail> {
    if from.is_root() || to.is_root() {
        return Err(Fail::new(
            codes::PERMISSION_DENIED,
            "cannot rename the root directory",
        ));
    }
    std::fs::rename(from.as_path(), to.as_path()).map_err(|e| Fail::io("rename", &e))?;
    stat(to)
}

pub fn remove(p: &SPath, recursive: bool) -> Result<(), Fail> {
    let md = std::fs::symlink_metadata(p.as_path()).map_err(|e| Fail::io("stat", &e))?;
    let root = std::fs::symlink_metadata("/").map_err(|e| Fail::io("stat /", &e))?;
    if p.is_root() || (md.dev() == root.dev() && md.ino() == root.ino()) {
        return Err(Fail::new(
            codes::PERMISSION_DENIED,
            "refusing to remove the root directory",
        ));
    }
    let r = if md.is_dir() {
        if recursive {
            std::fs::remove_dir_all(p.as_path())
        } else {
            std::fs::remove_dir(p.as_path())
        }
    } else {
        std::fs::remove_file(p.as_path())
    };
    r.map_err(|e| Fail::io("remove", &e))
}

/// An open regular file being read; `size` is what fstat said at open.
pub struct Reader {
    file: File,
    pub size: u64,
    read: u64,
    cap: u64,
    capped_by_size: bool,
}

/// Opens a regular file for reading without blocking on FIFOs or devices (F4).
pub fn open_read(p: &SPath) -> Result<Reader, Fail> {
    // Refuse before opening when we can (opening some devices has side effects); the fstat below
    // closes the race with a swap in between.
    if let Ok(md) = std::fs::metadata(p.as_path()) {
        if md.is_dir() {
            return Err(Fail::new(
                codes::IS_A_DIRECTORY,
                format!("{} is a directory", p.text),
            ));
        }
        if !md.is_file() {
            return Err(not_regular(p));
        }
    }
    let fd = sys::open(&p.c, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)
        .map_err(|e| Fail::io("open", &e))?;
    let file = File::from(fd);
    let md = file.metadata().map_err(|e| Fail::io("stat", &e))?;
    if md.is_dir() {
        return Err(Fail::new(
            codes::IS_A_DIRECTORY,
            format!("{} is a directory", p.text),
        ));
    }
    if !md.is_file() {
        return Err(not_regular(p));
    }
    let size = md.len();
    // A file that reports its size is read up to that size (a growing log cannot make the read
    // endless); one that reports 0 (/proc) is read to EOF under a cap.
    let (cap, capped_by_size) = if size > 0 {
        (size, true)
    } else {
        (UNSIZED_READ_CAP, false)
    };
    Ok(Reader {
        file,
        size,
        read: 0,
        cap,
        capped_by_size,
    })
}

fn not_regular(p: &SPath) -> Fail {
    Fail::new(
        codes::NOT_REGULAR_FILE,
        format!("{} is not a regular file", p.text),
    )
}

impl Reader {
    /// The next chunk of at most [`CHUNK`] bytes; None at the end.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Fail> {
        let left = self.cap - self.read;
        if left == 0 {
            if self.capped_by_size {
                return Ok(None);
            }
            // Unsized file at the cap: fine if it ends exactly here.
            let mut one = [0u8; 1];
            return match self.file.read(&mut one) {
                Ok(0) => Ok(None),
                Ok(_) => Err(Fail::new(
                    codes::LIMIT_EXCEEDED,
                    format!("file is over the {UNSIZED_READ_CAP}-byte read limit"),
                )),
                Err(e) => Err(Fail::io("read", &e)),
            };
        }
        let want = left.min(CHUNK as u64) as usize;
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match self.file.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fail::io("read", &e)),
            }
        }
        if got == 0 {
            return Ok(None);
        }
        buf.truncate(got);
        self.read += got as u64;
        Ok(Some(buf))
    }
}

/// An open regular file being written.
pub struct Writer {
    file: File,
    path: SPath,
}

/// Creates parents, opens without truncating or blocking, refuses anything but a regular file,
/// then truncates (F4: writing "over" a FIFO or /dev/zero fails fast).
pub fn open_write(p: &SPath, mode: Option<u32>, user: Option<&str>) -> Result<Writer, Fail> {
    if p.is_root() {
        return Err(Fail::new(codes::IS_A_DIRECTORY, "/ is a directory"));
    }
    if let Some(m) = mode {
        if m > 0o7777 {
            return Err(Fail::new(codes::BAD_REQUEST, "mode has bits beyond 0o7777"));
        }
    }
    let owner = owner_for(user)?;
    mkdir_p(p, owner, false)?;
    let base = libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
    let create_mode = mode.unwrap_or(0o644) as libc::mode_t;
    let (fd, created) = match sys::open(&p.c, base | libc::O_CREAT | libc::O_EXCL, create_mode) {
        Ok(fd) => (fd, true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => (
            sys::open(&p.c, base, 0).map_err(|e| Fail::io("open", &e))?,
            false,
        ),
        Err(e) => return Err(Fail::io("create", &e)),
    };
    let file = File::from(fd);
    let md = file.metadata().map_err(|e| Fail::io("stat", &e))?;
    if md.is_dir() {
        return Err(Fail::new(
            codes::IS_A_DIRECTORY,
            format!("{} is a directory", p.text),
        ));
    }
    if !md.is_file() {
        return Err(not_regular(p));
    }
    file.set_len(0).map_err(|e| Fail::io("truncate", &e))?;
    if created {
        if let Some((uid, gid)) = owner {
            nix::unistd::fchown(
                file.as_raw_fd(),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| Fail::io("chown", &io::Error::from(e)))?;
        }
    }
    if let Some(m) = mode {
        // After chown: chown clears setuid/setgid bits.
        file.set_permissions(std::fs::Permissions::from_mode(m))
            .map_err(|e| Fail::io("chmod", &e))?;
    }
    Ok(Writer {
        file,
        path: p.clone(),
    })
}

impl Writer {
    pub fn write(&mut self, data: &[u8]) -> Result<(), Fail> {
        self.file.write_all(data).map_err(|e| Fail::io("write", &e))
    }

    /// Flushes the file to the disk before it is reported saved: on a sparse image over a full
    /// host disk the write-back fails, and the caller must hear it now rather than lose the file
    /// later.
    pub fn finish(self) -> Result<FileStat, Fail> {
        if let Err(e) = self.file.sync_all() {
            let mut fail = Fail::io("saving the file (fsync)", &e);
            if e.raw_os_error() == Some(libc::EIO) {
                fail.code = codes::NO_SPACE;
                fail.message.push_str(
                    " (the sandbox's disk could not be written; the host's data filesystem may be full)",
                );
            }
            return Err(fail);
        }
        let md = self.file.metadata().map_err(|e| Fail::io("stat", &e))?;
        Ok(to_stat(
            self.path.as_path(),
            self.path.text.clone(),
            self.path.name(),
            &md,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_and_checked() {
        assert_eq!(check_path("a/b").unwrap().text, "/a/b");
        assert_eq!(check_path("/../../etc/passwd").unwrap().text, "/etc/passwd");
        assert_eq!(check_path("/a/./b//c/..").unwrap().text, "/a/b");
        assert_eq!(check_path("/..").unwrap().text, "/");
        assert!(check_path("/..").unwrap().is_root());
        assert_eq!(check_path("/a/b").unwrap().name(), "b");
        assert_eq!(check_path("/a/b").unwrap().parent().unwrap().text, "/a");
        assert_eq!(check_path("/a").unwrap().parent().unwrap().text, "/");
        assert_eq!(check_path("a\0b").unwrap_err().code, codes::INVALID_PATH);
        assert_eq!(
            check_path(&"a".repeat(256)).unwrap_err().code,
            codes::INVALID_PATH
        );
        assert_eq!(
            check_path(&"a/".repeat(2500)).unwrap_err().code,
            codes::INVALID_PATH
        );
        assert_eq!(check_path("").unwrap_err().code, codes::INVALID_PATH);
    }

    #[test]
    fn errno_maps_to_codes() {
        let f = |e| Fail::io("x", &io::Error::from_raw_os_error(e)).code;
        assert_eq!(f(libc::ENOENT), codes::FILE_NOT_FOUND);
        assert_eq!(f(libc::EACCES), codes::PERMISSION_DENIED);
        assert_eq!(f(libc::EPERM), codes::PERMISSION_DENIED);
        assert_eq!(f(libc::ENOTDIR), codes::NOT_A_DIRECTORY);
        assert_eq!(f(libc::EISDIR), codes::IS_A_DIRECTORY);
        assert_eq!(f(libc::EEXIST), codes::ALREADY_EXISTS);
        assert_eq!(f(libc::ENOTEMPTY), codes::DIRECTORY_NOT_EMPTY);
        assert_eq!(f(libc::ENOSPC), codes::NO_SPACE);
        assert_eq!(f(libc::EDQUOT), codes::NO_SPACE);
        assert_eq!(f(libc::EIO), codes::INTERNAL);
    }
}

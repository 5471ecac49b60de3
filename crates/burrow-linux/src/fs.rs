//! Paths a sandbox may have touched, opened from outside it.
//!
//! **The rule.** Everything under a sandbox's root belongs to the sandbox: its upper layer, its
//! disk, `/workspace`. Its root user may have replaced any component of any path there with a
//! link to a host path (another sandbox's `disk.img`, the server's `secret`, a `/proc/sys`
//! file). Host code therefore never follows such a path the ordinary way. It either acts from
//! inside the sandbox (the guest agent, or the sandbox's PID 1 after `pivot_root`, running as the
//! sandbox's own root), or it opens the path here: resolution confined to the root
//! (`RESOLVE_IN_ROOT`: `..` and absolute links stop at the root, as they would for a process
//! inside) and never through a `/proc` magic link (`RESOLVE_NO_MAGICLINKS`). What is then done
//! is done through the file descriptor, never by path again.
//!
//! Also here: [`sealed_copy`], the guest binary as one sealed memfd every sandbox executes.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, MemfdFlags, Mode, OFlags, ResolveFlags, SealFlags};

/// How paths under a sandbox's root are resolved: as inside the sandbox, no magic links.
const IN_ROOT: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

/// Opens `path` (relative to the root; a leading `/` is ignored) under the directory `root`, as
/// a process whose root is `root` would find it, without ever leaving `root`. `flags` are
/// `open(2)` flags (`O_PATH | O_DIRECTORY` for a mount point); `O_CLOEXEC` is always added.
pub fn open_in_root(root: impl AsFd, path: &str, flags: OFlags) -> io::Result<OwnedFd> {
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    Ok(rustix::fs::openat2(
        root,
        rel,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        IN_ROOT,
    )?)
}

/// A directory under `root` to mount on: opened as [`open_in_root`] does, created (0755, owned
/// by the caller) if it is missing, so a sandbox that removed one of its mount points still
/// starts. Fails if something other than a directory is there.
pub fn mount_point(root: impl AsFd, path: &str) -> io::Result<OwnedFd> {
    dir_in_root(root, Path::new(path.trim_matches('/')), 0o755)
}

/// The directory `path` under `root` as an `O_PATH` descriptor, resolved as [`open_in_root`]
/// does, with each missing component made (`mode`, owned by the caller). Takes any bytes as a
/// name (a layer's tar may hold names that are not UTF-8); `path` is relative to the root.
pub fn dir_in_root(root: impl AsFd, path: &Path, mode: u32) -> io::Result<OwnedFd> {
    let dir = OFlags::PATH | OFlags::DIRECTORY;
    let rel = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    match rustix::fs::openat2(
        root.as_fd(),
        rel,
        dir | OFlags::CLOEXEC,
        Mode::empty(),
        IN_ROOT,
    ) {
        Err(rustix::io::Errno::NOENT) => {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(io::ErrorKind::NotFound.into());
            };
            let parent = dir_in_root(root.as_fd(), parent, mode)?;
            match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(mode)) {
                Err(rustix::io::Errno::EXIST) | Ok(()) => {}
                Err(e) => return Err(e.into()),
            }
            Ok(rustix::fs::openat(
                &parent,
                name,
                dir | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?)
        }
        r => Ok(r?),
    }
}

/// `/proc/self/fd/N` for `fd`: a path that names exactly the file `fd` holds, whatever has been
/// renamed or swapped since, for syscalls that only take paths (`mount(2)`).
pub fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Replaces the entry `name` of the directory `dir` with a regular file holding `contents`. A
/// link (or anything else) at `name` is replaced, never followed: the file is written under a
/// temporary name created with `O_EXCL | O_NOFOLLOW`, then renamed over `name`.
pub fn replace_file(dir: impl AsFd, name: &str, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = format!(".{name}.burrow-new");
    match rustix::fs::unlinkat(dir.as_fd(), tmp.as_str(), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let fd = rustix::fs::openat(
        dir.as_fd(),
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    let mut f = File::from(fd);
    f.write_all(contents)?;
    // The mode passed to open is cut by the umask.
    rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))?;
    drop(f);
    rustix::fs::renameat(dir.as_fd(), tmp.as_str(), dir.as_fd(), name)?;
    Ok(())
}

/// A copy of the file at `src` in a memfd sealed against any change (write, grow, shrink, new
/// seals). One copy serves every sandbox: their PID 1 executes it by descriptor, so no host
/// path of the binary is mounted or linked anywhere a sandbox can read it.
pub fn sealed_copy(src: &Path, name: &str) -> io::Result<File> {
    sealed_from(&mut File::open(src)?, name)
}

/// [`sealed_copy`] of bytes this program carries (the static guest agent).
pub fn sealed_bytes(bytes: &[u8], name: &str) -> io::Result<File> {
    sealed_from(&mut io::Cursor::new(bytes), name)
}

fn sealed_from(src: &mut impl io::Read, name: &str) -> io::Result<File> {
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    // MFD_EXEC says so explicitly where `vm.memfd_noexec` asks; kernels before 6.3 refuse it.
    let fd = match rustix::fs::memfd_create(name, flags | MemfdFlags::EXEC) {
        Err(rustix::io::Errno::INVAL) => rustix::fs::memfd_create(name, flags)?,
        r => r?,
    };
    let mut out = File::from(fd);
    io::copy(src, &mut out)?;
    rustix::fs::fcntl_add_seals(
        &out,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    Ok(out)
}

/// Whether `fd` is a memfd that can no longer change.
pub fn is_sealed(fd: impl AsFd) -> bool {
    rustix::fs::fcntl_get_seals(fd)
        .map(|s| {
            s.contains(SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn dir(p: &Path) -> OwnedFd {
        rustix::fs::open(p, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap()
    }

    #[test]
    fn links_resolve_inside_the_root_and_never_out_of_it() {
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("secret"), "host").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        // An absolute link, a `..` link, and a magic link, all pointing at the host's file.
        let secret = host.path().join("secret");
        symlink(&secret, root.path().join("etc/abs")).unwrap();
        let up = "../".repeat(20) + secret.to_str().unwrap().trim_start_matches('/');
        symlink(&up, root.path().join("etc/dots")).unwrap();
        let f = File::open(&secret).unwrap();
        symlink(fd_path(&f), root.path().join("etc/magic")).unwrap();
        let r = dir(root.path());
        for name in ["etc/abs", "etc/dots"] {
            let e = open_in_root(&r, name, OFlags::RDONLY).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{name} left the root");
        }
        assert!(open_in_root(&r, "etc/magic", OFlags::RDONLY).is_err());
        // The same target inside the root is found.
        std::fs::create_dir_all(
            root.path()
                .join(secret.parent().unwrap().strip_prefix("/").unwrap()),
        )
        .unwrap();
        std::fs::write(
            root.path().join(secret.strip_prefix("/").unwrap()),
            "inside",
        )
        .unwrap();
        let mut s = String::new();
        io::Read::read_to_string(
            &mut File::from(open_in_root(&r, "/etc/abs", OFlags::RDONLY).unwrap()),
            &mut s,
        )
        .unwrap();
        assert_eq!(s, "inside");
    }

    #[test]
    fn replace_file_replaces_a_link_instead_of_writing_through_it() {
        let host = tempfile::tempdir().unwrap();
        let target = host.path().join("target");
        std::fs::write(&target, "host").unwrap();
        let root = tempfile::tempdir().unwrap();
        symlink(&target, root.path().join("hostname")).unwrap();
        symlink(&target, root.path().join(".hostname.burrow-new")).unwrap();
        replace_file(dir(root.path()), "hostname", b"box\n", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "host");
        let md = std::fs::symlink_metadata(root.path().join("hostname")).unwrap();
        assert!(md.is_file());
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
            0o644
        );
        assert_eq!(
            std::fs::read_to_string(root.path().join("hostname")).unwrap(),
            "box\n"
        );
    }

    #[test]
    fn missing_mount_points_are_made_inside_the_root() {
        let host = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        // A link to a host directory: followed inside the root, where that path does not exist.
        symlink(host.path(), root.path().join("run")).unwrap();
        assert!(mount_point(dir(root.path()), "run/burrow").is_err());
        assert!(!host.path().join("burrow").exists(), "made on the host");
        // Once the path exists inside, the mount point is made there.
        let inside = root.path().join(host.path().strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        mount_point(dir(root.path()), "run/burrow").unwrap();
        assert!(inside.join("burrow").is_dir());
        assert!(!host.path().join("burrow").exists(), "made on the host");
        mount_point(dir(root.path()), "a/b/c").unwrap();
        assert!(root.path().join("a/b/c").is_dir());
        std::fs::write(root.path().join("file"), "").unwrap();
        assert!(mount_point(dir(root.path()), "file").is_err());
    }

    #[test]
    fn a_sealed_copy_cannot_change() {
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), b"binary").unwrap();
        let f = sealed_copy(src.path(), "test").unwrap();
        assert!(is_sealed(&f));
        assert!((&f).write_all(b"x").is_err());
        assert!(f.set_len(1).is_err());
        let mut s = String::new();
        io::Read::read_to_string(&mut File::open(fd_path(&f)).unwrap(), &mut s).unwrap();
        assert_eq!(s, "binary");
    }
}

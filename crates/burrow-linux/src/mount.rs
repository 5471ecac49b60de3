//! Detached mounts (the mount API of `open_tree`, `mount_setattr` and `move_mount`): a copy of a
//! tree is made read-only, idmapped to a sandbox's user namespace and so on while nothing can see
//! it, then attached onto a target held by file descriptor (a target found with
//! [`crate::fs::open_in_root`], so a sandbox's links cannot send the mount elsewhere).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use rustix::mount::{MoveMountFlags, OpenTreeFlags};

pub const ATTR_RDONLY: u64 = 0x1;
pub const ATTR_NOSUID: u64 = 0x2;
pub const ATTR_NODEV: u64 = 0x4;
pub const ATTR_NOEXEC: u64 = 0x8;
/// Files show the owners the user namespace maps their on-disk owners to (uid 0 on disk is the
/// sandbox's root).
pub const ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` from `<linux/mount.h>`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached copy of the mount at `path` (relative to `dir`; `""` for `dir` itself), without the
/// mounts below it.
pub fn clone_tree(dir: impl AsFd, path: &str) -> io::Result<OwnedFd> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if path.is_empty() {
        flags |= OpenTreeFlags::AT_EMPTY_PATH;
    }
    Ok(rustix::mount::open_tree(dir, path, flags)?)
}

/// Sets `attrs` (`ATTR_*`) on a detached tree; `userns` is required with [`ATTR_IDMAP`]. Fails
/// with EINVAL (or EOPNOTSUPP) where the filesystem cannot be idmapped.
pub fn set_attrs(tree: impl AsFd, attrs: u64, userns: Option<&OwnedFd>) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |f| f.as_raw_fd() as u64),
    };
    // SAFETY: mount_setattr reads `size` bytes of a struct mount_attr, which MountAttr lays out,
    // from a pointer valid for the call; the path is an empty C string and the fds are ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches a detached tree onto the directory (or file) `target` holds.
pub fn attach(tree: impl AsFd, target: impl AsFd) -> io::Result<()> {
    Ok(rustix::mount::move_mount(
        tree,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn mount_attr_matches_the_kernel_header() {
        // MOUNT_ATTR_SIZE_VER0
        assert_eq!(std::mem::size_of::<super::MountAttr>(), 32);
    }
}

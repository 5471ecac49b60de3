//! btrfs ioctls: subvolumes, snapshots, simple quotas and the odd query, as safe functions over
//! file descriptors. Every call that names something takes a directory descriptor and one plain
//! name (no `/`), so nothing here ever resolves a path, let alone follows a link in one.
//!
//! Also here: [`SANDBOX_DENIED_IOCTLS`], the btrfs ioctls a sandbox must never make (used by
//! [`crate::seccomp`]). `SUBVOL_CREATE` needs only write access to a directory, and a new
//! subvolume gets a fresh qgroup with no limit: a sandbox that could make one inside its own
//! volume could write past its limit.
//!
//! Numbers and layouts are x86_64 and aarch64 (`<linux/btrfs.h>`, checked by the tests below).

use std::io;
use std::os::fd::{AsFd, AsRawFd};

const SNAP_CREATE: u32 = 0x5000_9401;
const RESIZE: u32 = 0x5000_9403;
const SYNC: u32 = 0x9408;
const CLONE: u32 = 0x4004_9409;
const SUBVOL_CREATE: u32 = 0x5000_940e;
const SNAP_DESTROY: u32 = 0x5000_940f;
const TREE_SEARCH: u32 = 0xd000_9411;
const INO_LOOKUP: u32 = 0xd000_9412;
const DEFAULT_SUBVOL: u32 = 0x4008_9413;
const WAIT_SYNC: u32 = 0x4008_9416;
const SNAP_CREATE_V2: u32 = 0x5000_9417;
const SUBVOL_CREATE_V2: u32 = 0x5000_9418;
const START_SYNC: u32 = 0x8008_9418;
const SUBVOL_GETFLAGS: u32 = 0x8008_9419;
const SUBVOL_SETFLAGS: u32 = 0x4008_941a;
const FS_INFO: u32 = 0x8400_941f;
const SET_RECEIVED_SUBVOL: u32 = 0xc0c8_9425;
const QUOTA_CTL: u32 = 0xc010_9428;
const QGROUP_ASSIGN: u32 = 0x4018_9429;
const QGROUP_CREATE: u32 = 0x4010_942a;
const QGROUP_LIMIT: u32 = 0x8030_942b;
const QUOTA_RESCAN: u32 = 0x4040_942c;
const QUOTA_RESCAN_STATUS: u32 = 0x8040_942d;
const QUOTA_RESCAN_WAIT: u32 = 0x942e;
const SNAP_DESTROY_V2: u32 = 0x5000_943f;

/// The btrfs ioctls refused inside a sandbox (seccomp, by number), each with its name. Making,
/// snapshotting, deleting or re-flagging subvolumes, and every quota and qgroup call (most need
/// `CAP_SYS_ADMIN` anyway; refusing them by number does not depend on that). Reflink copies
/// (`FICLONE`, `FICLONERANGE`, `FIDEDUPERANGE`) share the 0x94 magic and stay allowed: `cp
/// --reflink` inside a sandbox is a feature.
pub const SANDBOX_DENIED_IOCTLS: &[(u32, &str)] = &[
    (SNAP_CREATE, "BTRFS_IOC_SNAP_CREATE"),
    (SUBVOL_CREATE, "BTRFS_IOC_SUBVOL_CREATE"),
    (SNAP_DESTROY, "BTRFS_IOC_SNAP_DESTROY"),
    (SNAP_CREATE_V2, "BTRFS_IOC_SNAP_CREATE_V2"),
    (SUBVOL_CREATE_V2, "BTRFS_IOC_SUBVOL_CREATE_V2"),
    (SUBVOL_SETFLAGS, "BTRFS_IOC_SUBVOL_SETFLAGS"),
    (SNAP_DESTROY_V2, "BTRFS_IOC_SNAP_DESTROY_V2"),
    (DEFAULT_SUBVOL, "BTRFS_IOC_DEFAULT_SUBVOL"),
    (SET_RECEIVED_SUBVOL, "BTRFS_IOC_SET_RECEIVED_SUBVOL"),
    (RESIZE, "BTRFS_IOC_RESIZE"),
    (QUOTA_CTL, "BTRFS_IOC_QUOTA_CTL"),
    (QGROUP_ASSIGN, "BTRFS_IOC_QGROUP_ASSIGN"),
    (QGROUP_CREATE, "BTRFS_IOC_QGROUP_CREATE"),
    (QGROUP_LIMIT, "BTRFS_IOC_QGROUP_LIMIT"),
    (QUOTA_RESCAN, "BTRFS_IOC_QUOTA_RESCAN"),
    (QUOTA_RESCAN_STATUS, "BTRFS_IOC_QUOTA_RESCAN_STATUS"),
    (QUOTA_RESCAN_WAIT, "BTRFS_IOC_QUOTA_RESCAN_WAIT"),
];

/// `FICLONE`: a reflink copy of a whole file (allowed in sandboxes; here for tests).
pub const FICLONE: u32 = CLONE;

/// The root directory of every subvolume has this inode number.
pub const SUBVOL_ROOT_INO: u64 = 256;
/// `BTRFS_FS_TREE_OBJECTID`: the top-level subvolume.
pub const TOP_LEVEL_ID: u64 = 5;

const SUBVOL_RDONLY: u64 = 1 << 1;
const SUBVOL_QGROUP_INHERIT: u64 = 1 << 2;
const SUBVOL_SPEC_BY_ID: u64 = 1 << 4;
const QGROUP_INHERIT_SET_LIMITS: u64 = 1;
const QGROUP_LIMIT_MAX_RFER: u64 = 1;
const QUOTA_CTL_ENABLE_SIMPLE: u64 = 4;
const ROOT_TREE_OBJECTID: u64 = 1;
const ROOT_REF_KEY: u32 = 156;
const NAME_MAX: usize = 255;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

/// `struct btrfs_ioctl_vol_args_v2`: `size` and `qgroup_inherit` share a 32-byte union with
/// `unused[4]`; `name` shares its union with `devid` and `subvolid`.
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    size: u64,
    qgroup_inherit: *const QgroupInherit,
    _unused: [u64; 2],
    name: [u8; 4040],
}

/// `struct btrfs_qgroup_limit`.
#[repr(C)]
#[derive(Default)]
struct QgroupLimit {
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

/// `struct btrfs_qgroup_inherit` with no `qgroups[]`.
#[repr(C)]
#[derive(Default)]
struct QgroupInherit {
    flags: u64,
    num_qgroups: u64,
    num_ref_copies: u64,
    num_excl_copies: u64,
    lim: QgroupLimit,
}

/// `struct btrfs_ioctl_qgroup_limit_args`.
#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    lim: QgroupLimit,
}

/// `struct btrfs_ioctl_quota_ctl_args`.
#[repr(C)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

/// `struct btrfs_ioctl_ino_lookup_args`.
#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

/// `struct btrfs_ioctl_fs_info_args`.
#[repr(C)]
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    nodesize: u32,
    sectorsize: u32,
    clone_alignment: u32,
    csum_type: u16,
    csum_size: u16,
    flags: u64,
    generation: u64,
    metadata_uuid: [u8; 16],
    reserved: [u8; 944],
}

/// `struct btrfs_ioctl_search_key`.
#[repr(C)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused1: [u64; 4],
}

/// `struct btrfs_ioctl_search_args`.
#[repr(C)]
struct SearchArgs {
    key: SearchKey,
    buf: [u8; 3992],
}

/// `struct btrfs_ioctl_search_header` (read from `SearchArgs::buf`).
const SEARCH_HEADER_LEN: usize = 32;

fn ioctl<T>(fd: impl AsFd, request: u32, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: every caller passes a request number together with a pointer to the `#[repr(C)]`
    // struct (or integer) that request reads and writes, valid and exclusively borrowed for the
    // call; the kernel touches no memory past it, and the fd is borrowed for the call.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), request as libc::c_ulong, arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// An ioctl with a 4096-byte zeroed argument, for the seccomp tests.
#[cfg(test)]
pub(crate) fn raw_ioctl(fd: impl AsFd, request: u32, buf: *mut u8) -> io::Result<libc::c_int> {
    ioctl(fd, request, buf)
}

/// The same with a 64-bit request whose upper half the kernel ignores.
#[cfg(test)]
pub(crate) fn raw_ioctl_wide(fd: impl AsFd, request: u64, buf: *mut u8) -> io::Result<()> {
    // SAFETY: `buf` points to 4096 writable bytes (the largest argument of any request the tests
    // pass), valid for the call; the fd is borrowed for the call.
    let r = unsafe { libc::syscall(libc::SYS_ioctl, fd.as_fd().as_raw_fd(), request, buf) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A plain name for a subvolume: no `/`, no NUL, not `.` or `..`, at most 255 bytes.
fn check_name(name: &str) -> io::Result<&[u8]> {
    let b = name.as_bytes();
    if b.is_empty()
        || b.len() > NAME_MAX
        || b.contains(&b'/')
        || b.contains(&0)
        || name == "."
        || name == ".."
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain subvolume name"),
        ));
    }
    Ok(b)
}

fn v2(
    name: &str,
    flags: u64,
    src: i64,
    inherit: Option<&QgroupInherit>,
) -> io::Result<Box<VolArgsV2>> {
    let b = check_name(name)?;
    let mut args = Box::new(VolArgsV2 {
        fd: src,
        transid: 0,
        flags,
        size: 0,
        qgroup_inherit: std::ptr::null(),
        _unused: [0; 2],
        name: [0; 4040],
    });
    args.name[..b.len()].copy_from_slice(b);
    if let Some(inh) = inherit {
        args.flags |= SUBVOL_QGROUP_INHERIT;
        args.size = std::mem::size_of::<QgroupInherit>() as u64;
        args.qgroup_inherit = inh;
    }
    Ok(args)
}

fn limit_inherit(limit: Option<u64>) -> Option<QgroupInherit> {
    limit.map(|bytes| QgroupInherit {
        flags: QGROUP_INHERIT_SET_LIMITS,
        lim: QgroupLimit {
            flags: QGROUP_LIMIT_MAX_RFER,
            max_rfer: bytes,
            ..Default::default()
        },
        ..Default::default()
    })
}

/// Creates the subvolume `name` in the directory `parent`, with a limit of `limit` bytes on its
/// qgroup when given (set in the same ioctl: there is no moment without it).
pub fn subvol_create(parent: impl AsFd, name: &str, limit: Option<u64>) -> io::Result<()> {
    let inherit = limit_inherit(limit);
    let mut args = v2(name, 0, 0, inherit.as_ref())?;
    ioctl(parent, SUBVOL_CREATE_V2, &mut *args)?;
    Ok(())
}

/// Snapshots the subvolume whose root `src` holds into `parent/name`: read-only or writable, with
/// a limit on the new qgroup when given (simple quotas honour it; full qgroups overwrite it with
/// the source's, see the storage ADR). The kernel commits the transaction before it returns: the
/// snapshot is on disk, complete, and includes every buffered write to the source.
pub fn snapshot(
    src: impl AsFd,
    parent: impl AsFd,
    name: &str,
    readonly: bool,
    limit: Option<u64>,
) -> io::Result<()> {
    let inherit = limit_inherit(limit);
    let flags = if readonly { SUBVOL_RDONLY } else { 0 };
    let mut args = v2(
        name,
        flags,
        i64::from(src.as_fd().as_raw_fd()),
        inherit.as_ref(),
    )?;
    ioctl(parent, SNAP_CREATE_V2, &mut *args)?;
    Ok(())
}

/// Deletes the subvolume `parent/name` (which must hold no other subvolume: ENOTEMPTY). The
/// kernel unlinks it at once; its extents are freed later by the cleaner thread.
pub fn subvol_delete(parent: impl AsFd, name: &str) -> io::Result<()> {
    let b = check_name(name)?;
    let mut args = Box::new(VolArgs {
        fd: 0,
        name: [0; 4088],
    });
    args.name[..b.len()].copy_from_slice(b);
    ioctl(parent, SNAP_DESTROY, &mut *args)?;
    Ok(())
}

/// Deletes the subvolume with id `id`, found by number rather than by any path; `fs` is any
/// descriptor on the filesystem.
pub fn subvol_delete_by_id(fs: impl AsFd, id: u64) -> io::Result<()> {
    let mut args = Box::new(VolArgsV2 {
        fd: 0,
        transid: 0,
        flags: SUBVOL_SPEC_BY_ID,
        size: 0,
        qgroup_inherit: std::ptr::null(),
        _unused: [0; 2],
        name: [0; 4040],
    });
    args.name[..8].copy_from_slice(&id.to_ne_bytes());
    ioctl(fs, SNAP_DESTROY_V2, &mut *args)?;
    Ok(())
}

/// The id of the subvolume `fd` is in (any file or directory of it).
pub fn subvol_id(fd: impl AsFd) -> io::Result<u64> {
    let mut args = Box::new(InoLookupArgs {
        treeid: 0,
        objectid: SUBVOL_ROOT_INO,
        name: [0; 4080],
    });
    ioctl(fd, INO_LOOKUP, &mut *args)?;
    Ok(args.treeid)
}

/// Whether the subvolume `fd` is in is read-only.
pub fn subvol_is_readonly(fd: impl AsFd) -> io::Result<bool> {
    let mut flags: u64 = 0;
    ioctl(fd, SUBVOL_GETFLAGS, &mut flags)?;
    Ok(flags & SUBVOL_RDONLY != 0)
}

/// Ids of the subvolumes directly inside subvolume `id` (from the root tree's `ROOT_REF` items,
/// no path involved); `fs` is any descriptor on the filesystem.
pub fn child_subvols(fs: impl AsFd, id: u64) -> io::Result<Vec<u64>> {
    let fs = fs.as_fd();
    let mut out = Vec::new();
    let mut min_offset = 0u64;
    loop {
        let mut args = Box::new(SearchArgs {
            key: SearchKey {
                tree_id: ROOT_TREE_OBJECTID,
                min_objectid: id,
                max_objectid: id,
                min_offset,
                max_offset: u64::MAX,
                min_transid: 0,
                max_transid: u64::MAX,
                min_type: ROOT_REF_KEY,
                max_type: ROOT_REF_KEY,
                nr_items: 4096,
                unused: 0,
                unused1: [0; 4],
            },
            buf: [0; 3992],
        });
        ioctl(fs, TREE_SEARCH, &mut *args)?;
        let n = args.key.nr_items as usize;
        if n == 0 {
            return Ok(out);
        }
        let mut at = 0usize;
        let mut last = min_offset;
        for _ in 0..n {
            let h = args
                .buf
                .get(at..at + SEARCH_HEADER_LEN)
                .ok_or_else(|| io::Error::other("short tree search reply"))?;
            let u64_at = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[i..i + 8]);
                u64::from_ne_bytes(b)
            };
            let (objectid, offset) = (u64_at(8), u64_at(16));
            let mut t = [0u8; 4];
            t.copy_from_slice(&h[24..28]);
            let kind = u32::from_ne_bytes(t);
            t.copy_from_slice(&h[28..32]);
            let len = u32::from_ne_bytes(t) as usize;
            if objectid == id && kind == ROOT_REF_KEY {
                out.push(offset);
            }
            last = offset;
            at += SEARCH_HEADER_LEN + len;
        }
        match last.checked_add(1) {
            Some(next) => min_offset = next,
            None => return Ok(out),
        }
    }
}

/// Makes `dst` share all of `src`'s extents (`FICLONE`, a reflink copy): no data is copied.
pub fn reflink(src: impl AsFd, dst: impl AsFd) -> io::Result<()> {
    let fd = src.as_fd().as_raw_fd();
    // SAFETY: FICLONE takes the source fd as its argument, by value (cast to a pointer-sized
    // integer, which is how the kernel reads it); no memory is passed.
    let r = unsafe { libc::ioctl(dst.as_fd().as_raw_fd(), FICLONE as libc::c_ulong, fd) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns on simple quotas (squota, kernel 6.7+) on the filesystem `fs` is on. Only extents
/// written afterwards are charged: enable it on an empty filesystem.
pub fn enable_simple_quotas(fs: impl AsFd) -> io::Result<()> {
    let mut args = QuotaCtlArgs {
        cmd: QUOTA_CTL_ENABLE_SIMPLE,
        status: 0,
    };
    ioctl(fs, QUOTA_CTL, &mut args)?;
    Ok(())
}

/// Sets the limit (referenced bytes) of subvolume `id`'s qgroup; `None` removes it.
pub fn set_limit(fs: impl AsFd, id: u64, limit: Option<u64>) -> io::Result<()> {
    let mut args = QgroupLimitArgs {
        qgroupid: id,
        lim: QgroupLimit {
            flags: QGROUP_LIMIT_MAX_RFER,
            max_rfer: limit.unwrap_or(u64::MAX),
            ..Default::default()
        },
    };
    ioctl(fs, QGROUP_LIMIT, &mut args)?;
    Ok(())
}

/// The filesystem's id (`/sys/fs/btrfs/<fsid>`), as the kernel formats it.
pub fn fsid(fs: impl AsFd) -> io::Result<String> {
    // SAFETY: FsInfoArgs is plain old data; all-zero is a valid value.
    let mut args: Box<FsInfoArgs> = Box::new(unsafe { std::mem::zeroed() });
    ioctl(fs, FS_INFO, &mut *args)?;
    let u = &args.fsid;
    let hex =
        |r: std::ops::Range<usize>| u[r].iter().map(|b| format!("{b:02x}")).collect::<String>();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    ))
}

/// Commits the current transaction and waits for it.
pub fn sync(fs: impl AsFd) -> io::Result<()> {
    ioctl(fs, SYNC, std::ptr::null_mut::<u8>())?;
    Ok(())
}

/// Starts a commit of the current transaction and waits for it to reach the disk, without
/// flushing every file's buffered writes first (which `sync` and `syncfs` do).
pub fn commit(fs: impl AsFd) -> io::Result<()> {
    let fs = fs.as_fd();
    let mut transid: u64 = 0;
    ioctl(fs, START_SYNC, &mut transid)?;
    ioctl(fs, WAIT_SYNC, &mut transid)?;
    Ok(())
}

/// Grows the filesystem on its (single) device to the device's size, after the device grew.
pub fn resize_to_device(fs: impl AsFd) -> io::Result<()> {
    let mut args = Box::new(VolArgs {
        fd: 0,
        name: [0; 4088],
    });
    args.name[..3].copy_from_slice(b"max");
    ioctl(fs, RESIZE, &mut *args)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `_IOC(dir, 0x94, nr, size)` as `<asm-generic/ioctl.h>` builds it.
    fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
        (dir << 30) | ((size as u32) << 16) | (0x94 << 8) | nr
    }
    const W: u32 = 1;
    const R: u32 = 2;

    #[test]
    fn layouts_and_numbers_match_the_kernel_headers() {
        use std::mem::size_of;
        assert_eq!(size_of::<VolArgs>(), 4096);
        assert_eq!(size_of::<VolArgsV2>(), 4096);
        assert_eq!(std::mem::offset_of!(VolArgsV2, size), 24);
        assert_eq!(std::mem::offset_of!(VolArgsV2, qgroup_inherit), 32);
        assert_eq!(std::mem::offset_of!(VolArgsV2, name), 56);
        assert_eq!(size_of::<QgroupInherit>(), 72);
        assert_eq!(size_of::<QgroupLimitArgs>(), 48);
        assert_eq!(size_of::<InoLookupArgs>(), 4096);
        assert_eq!(size_of::<FsInfoArgs>(), 1024);
        assert_eq!(std::mem::offset_of!(FsInfoArgs, fsid), 16);
        assert_eq!(size_of::<SearchKey>(), 104);
        assert_eq!(size_of::<SearchArgs>(), 4096);
        assert_eq!(SNAP_CREATE, ioc(W, 1, 4096));
        assert_eq!(SUBVOL_CREATE, ioc(W, 14, 4096));
        assert_eq!(SNAP_DESTROY, ioc(W, 15, 4096));
        assert_eq!(SNAP_CREATE_V2, ioc(W, 23, 4096));
        assert_eq!(SUBVOL_CREATE_V2, ioc(W, 24, 4096));
        assert_eq!(SNAP_DESTROY_V2, ioc(W, 63, 4096));
        assert_eq!(SUBVOL_GETFLAGS, ioc(R, 25, 8));
        assert_eq!(SUBVOL_SETFLAGS, ioc(W, 26, 8));
        assert_eq!(QUOTA_CTL, ioc(R | W, 40, 16));
        assert_eq!(QGROUP_LIMIT, ioc(R, 43, 48));
        assert_eq!(INO_LOOKUP, ioc(R | W, 18, 4096));
        assert_eq!(FS_INFO, ioc(R, 31, 1024));
        assert_eq!(TREE_SEARCH, ioc(R | W, 17, 4096));
        assert_eq!(SET_RECEIVED_SUBVOL, ioc(R | W, 37, 200));
        assert_eq!(FICLONE, ioc(W, 9, 4));
    }

    #[test]
    fn names_with_a_slash_or_dots_are_refused_before_any_ioctl() {
        for bad in ["", ".", "..", "a/b", "/x", "a\0b", &"x".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("sandbox-1").is_ok());
    }

    #[test]
    fn reflink_copies_are_not_among_the_denied_ioctls() {
        for (nr, name) in SANDBOX_DENIED_IOCTLS {
            assert_ne!(*nr, FICLONE, "{name}");
            // FICLONERANGE and FIDEDUPERANGE
            assert_ne!(*nr, 0x4020_940d, "{name}");
            assert_ne!(*nr, 0xc018_9436, "{name}");
        }
    }
}

//! The few raw syscalls the guest needs that nix does not wrap the way we want. Every `unsafe`
//! block of the guest lives here.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Opens `path` without following magic links (`/proc/<pid>/root`, `/proc/<pid>/fd/*`): F2.
/// Falls back to plain `open` where `openat2` is unavailable or filtered.
pub fn open(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_CLOEXEC;
    // SAFETY: open_how is plain old data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: path is NUL-terminated, `how` lives across the call and its size is passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: the kernel just returned this fd to us; nobody else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let err = io::Error::last_os_error();
    // ENOSYS: an old kernel; EPERM: a seccomp filter that denies openat2. The plain `open`
    // retry gives the real answer either way (a genuine EPERM comes back again).
    if !matches!(err.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) {
        return Err(err);
    }
    // SAFETY: path is NUL-terminated; flags/mode are plain integers.
    let fd = unsafe { libc::open(path.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above, a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Marks every fd from 3 up close-on-exec; called between fork and exec, so only
/// async-signal-safe work (one syscall). Errors (old kernels) are ignored: every fd the guest
/// opens is O_CLOEXEC already, this is the belt to those braces.
pub fn cloexec_from_3() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes fd flags.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
}

/// Makes the tty on fd 0 the caller's controlling terminal (caller must be a session leader).
pub fn set_controlling_tty() -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument; fd 0 is the pty slave set up by the spawner.
    let r = unsafe { libc::ioctl(0, libc::TIOCSCTTY as _, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets a PTY's window size (the kernel then sends SIGWINCH to the foreground group).
pub fn set_winsize(fd: RawFd, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize struct from the pointer, which is valid here.
    let r = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ as _, &ws as *const libc::winsize) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the peer of a connected socket has fully closed (POLLHUP), without blocking.
pub fn peer_hung_up(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// One directory entry as getdents64 returns it.
pub struct DirEntry {
    pub name: Vec<u8>,
    /// Position of the next entry: seeking there resumes right after this one.
    pub next_off: i64,
}

/// Reads directory entries starting at `pos` into `out` until it holds `want` entries (not
/// counting `.` and `..`) or the directory ends. Memory is one fixed buffer plus the entries.
pub fn read_dir_from(
    dir: &OwnedFd,
    pos: Option<i64>,
    want: usize,
    out: &mut Vec<DirEntry>,
) -> io::Result<()> {
    let fd = dir.as_raw_fd();
    if let Some(pos) = pos {
        // SAFETY: lseek on an fd we own; for directories the offset is the fs's opaque cookie.
        let r = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_SET) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let mut buf = vec![0u8; 32 * 1024];
    while out.len() < want {
        // SAFETY: buf is writable for buf.len() bytes; the kernel writes at most that much.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(());
        }
        let n = n as usize;
        let mut off = 0usize;
        // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        while off + 19 <= n {
            let d_off = i64::from_ne_bytes(buf[off + 8..off + 16].try_into().unwrap_or_default());
            let reclen =
                u16::from_ne_bytes(buf[off + 16..off + 18].try_into().unwrap_or_default()) as usize;
            if reclen == 0 || off + reclen > n {
                break;
            }
            let name_bytes = &buf[off + 19..off + reclen];
            let end = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let name = &name_bytes[..end];
            off += reclen;
            if name == b"." || name == b".." {
                continue;
            }
            out.push(DirEntry {
                name: name.to_vec(),
                next_off: d_off,
            });
            if out.len() >= want {
                // Leave the fd wherever; the caller continues from `next_off`, not the fd.
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Switches the calling process's `PR_SET_DUMPABLE` off: no ptrace, no /proc/<pid>/fd from
/// sandbox processes (K6, K7).
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Becomes the reaper of orphaned descendants (when the guest is not PID 1, e.g. in tests).
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets FD_CLOEXEC on an inherited fd.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl F_SETFD with an integer flag on a caller-provided fd.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of an inherited fd number.
///
/// # Safety
/// `fd` must be open and owned by nobody else in this process.
pub unsafe fn adopt_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Registers an owned fd with the tokio reactor.
pub fn register(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and keeps returning the same fd until it is dropped, which
    // happens only when the AsyncFd itself is dropped.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// Sets the hostname of this process's UTS namespace.
pub fn set_hostname(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !ok {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

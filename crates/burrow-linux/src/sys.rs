//! Small syscall wrappers used while building a sandbox.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// `clone(2)` with fork semantics (the child continues on a copy of the caller's stack) and the
/// given namespace flags. Returns 0 in the child and the child's pid in the parent.
///
/// # Safety
/// The caller must be single-threaded: the child gets a copy of only the calling thread, so any
/// lock another thread held stays locked forever in the child.
pub unsafe fn clone_fork(flags: libc::c_int) -> io::Result<libc::pid_t> {
    // SAFETY: a null stack makes clone behave like fork; the caller guarantees single-threadedness.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as libc::pid_t)
    }
}

/// Closes every file descriptor from `first` up.
pub fn close_from(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; callers hold no Rust owners of fds ≥ first.
    let r = unsafe { libc::close_range(first as libc::c_uint, libc::c_uint::MAX, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clears `FD_CLOEXEC` so `fd` survives the next exec.
pub fn keep_on_exec(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on a descriptor the caller owns changes only its flags.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    #[repr(C)]
    struct IfreqFlags {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    // SAFETY: a plain socket() call; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut req = IfreqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq, which IfreqFlags lays out
    // (name, then the flags union member, padded to the full 40 bytes).
    let r = unsafe {
        let mut r = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
        if r == 0 {
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        }
        r
    };
    let err = io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(sock) };
    if r < 0 {
        return Err(err);
    }
    Ok(())
}

/// Sets `resource`'s soft and hard limit to `value`, but never above the current hard limit (this
/// host has no CAP_SYS_RESOURCE to raise it).
pub fn limit(resource: nix::sys::resource::Resource, value: u64) -> io::Result<()> {
    let (_, hard) = nix::sys::resource::getrlimit(resource)?;
    let v = value.min(hard);
    nix::sys::resource::setrlimit(resource, v, v)?;
    Ok(())
}

/// Writes `0 <base> <count>` to a process's uid and gid maps (needs root in the parent namespace).
pub fn write_id_maps(pid: libc::pid_t, base: u32, count: u32) -> io::Result<()> {
    let line = format!("0 {base} {count}\n");
    std::fs::write(format!("/proc/{pid}/uid_map"), &line)?;
    std::fs::write(format!("/proc/{pid}/gid_map"), &line)?;
    Ok(())
}

/// Asks the kernel to SIGKILL this process when the thread that started it exits, so a helper
/// whose parent was killed cannot go on changing the host. Fails if the parent is already gone.
pub fn die_with_parent() -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number only.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // The parent may have died before the call: then we were already reparented.
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        return Err(io::Error::other(
            "the parent exited before the helper started",
        ));
    }
    Ok(())
}

/// Sets the hostname inside the UTS namespace of `pid` (a sandbox's PID 1), from the host: the
/// guest has no `CAP_SYS_ADMIN` and cannot. `setns` moves only the calling thread, so this runs on
/// a short-lived thread of its own and leaves the caller's namespaces alone.
pub fn set_hostname_of(pid: u32, name: &str) -> io::Result<()> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/uts"))?;
    let name = name.to_string();
    std::thread::spawn(move || -> io::Result<()> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWUTS)?;
        nix::unistd::sethostname(&name)?;
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("hostname thread panicked"))?
}

/// Size and free space of the filesystem holding `path`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    pub total: u64,
    /// Free to unprivileged writers (what is left before the filesystem refuses writes).
    pub available: u64,
}

pub fn fs_space(path: &std::path::Path) -> io::Result<FsSpace> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let unit = st.fragment_size() as u64;
    Ok(FsSpace {
        total: (st.blocks() as u64).saturating_mul(unit),
        available: (st.blocks_available() as u64).saturating_mul(unit),
    })
}

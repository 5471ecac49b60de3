//! Network namespace plumbing: entering a sandbox's network namespace for a moment, per-namespace
//! sysctls, and the original destination of a redirected TCP connection.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

/// Runs `f` inside the network namespace of `pid`, then returns to the caller's. The caller must
/// be single-threaded or accept that only this thread moves (setns(2) is per thread).
pub fn in_netns_of<T>(pid: u32, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    in_netns(Path::new(&format!("/proc/{pid}/ns/net")), f)
}

/// Runs `f` inside the network namespace at `ns` (`/proc/PID/ns/net`, `/run/netns/NAME`), then
/// returns to the caller's; only the calling thread moves.
pub fn in_netns<T>(ns: &Path, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let home = std::fs::File::open("/proc/thread-self/ns/net")?;
    let target = std::fs::File::open(ns)?;
    nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(io::Error::from)?;
    let out = f();
    nix::sched::setns(home.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(io::Error::from)?;
    out
}

/// Writes a sysctl of the calling thread's network namespace (`net.ipv6.conf.all.disable_ipv6`).
pub fn write_sysctl(name: &str, value: &str) -> io::Result<()> {
    let path = Path::new("/proc/sys").join(name.replace('.', "/"));
    std::fs::write(&path, value)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

pub fn read_sysctl(name: &str) -> io::Result<String> {
    let path = Path::new("/proc/sys").join(name.replace('.', "/"));
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// Where a connection redirected by the firewall (`redirect to :port`) was going: conntrack's
/// `SO_ORIGINAL_DST`.
pub fn original_dst(sock: &impl AsRawFd) -> io::Result<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the fd is a socket the caller owns; addr and len point to a buffer of len bytes.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// Every address on this host's interfaces (in the caller's network namespace), for checks that
/// must not let a request reach the host itself by one of its own addresses.
pub fn local_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                return Some(std::net::IpAddr::V4(v4.ip()));
            }
            sa.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()))
        })
        .collect())
}

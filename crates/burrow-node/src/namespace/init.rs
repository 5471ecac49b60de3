//! `burrow __init`: builds one sandbox. Runs in a fresh process (a re-exec of the `burrow` binary,
//! single-threaded, no async runtime), because it forks into new namespaces. Three processes take
//! part, each with only what it needs:
//!
//! - **`__init`** (host root) prepares what needs host privileges, in a private mount namespace
//!   (nothing is mounted on the host; everything disappears with the sandbox's last process): the
//!   sandbox's volume (`burrow_storage::Volume::attach`: a bind of its btrfs subvolume, or its
//!   ext4 image on a loop device), the cgroups (with the disk's I/O throttle), the guest's listening
//!   socket, and the root: an overlay of the image, idmapped to the sandbox's user namespace (its
//!   files belong to root inside without a single chown), over the sandbox's own upper layer; the
//!   host's `/usr` (idmapped, read-only), `/workspace` and an empty read-only `/run/burrow` are
//!   attached onto mount points found inside the root. It writes the id maps and wires the network.
//! - **a helper** drops to the sandbox's first host uid and creates the sandbox's user namespace,
//!   which that uid then owns: per-user kernel counters (inotify instances and watches, fanotify
//!   groups, POSIX message queue bytes, pending signals) are charged to the sandbox's own uid,
//!   never to host root. It clones PID 1 into new mount, pid, uts, ipc, net and cgroup namespaces
//!   and exits.
//! - **PID 1** (the sandbox half) makes the mounts only its namespaces can make (proc, sys, dev,
//!   tmp, the masks), pivots into the root, writes `/etc/hostname`, `hosts` and `resolv.conf` as the
//!   sandbox's own root, drops capabilities, installs seccomp and executes the guest agent from the
//!   sealed memfd the server shares with every sandbox. `__init` exits once it has.
//!
//! **The host never follows a path under the sandbox's root.** Everything there may be a link a
//! previous run of the sandbox planted. `__init` touches the root only through mount points it
//! opens with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` (`burrow_linux::fs`) and attaches
//! onto by file descriptor; files inside are written by PID 1 after `pivot_root`, when the host's
//! tree is no longer reachable at all. The disk's own top directories (`upper`, `work`,
//! `workspace`) are outside the sandbox's reach and are made through a descriptor of the disk.
//! Overlay layers are named relative to the sandbox's directory, so `/proc/self/mountinfo` inside
//! shows neither a host path nor a sandbox id.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use burrow_linux::cgroup::{Cgroups, IoLimits};
use burrow_linux::fs::{fd_path, mount_point, open_in_root, replace_file};
use burrow_linux::{caps, mount as dmount, proc, seccomp, sys};
use burrow_types::Limits;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{Gid, Pid, Uid};
use rustix::fs::{Mode, OFlags, CWD};
use serde::{Deserialize, Serialize};

use super::image::USER_UID;

/// What the backend sends `__init` on stdin.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct InitRequest {
    pub id: String,
    pub hostname: String,
    pub uid_base: u32,
    pub limits: Limits,
    pub env: BTreeMap<String, String>,
    pub sandbox_dir: PathBuf,
    /// The sandbox's volume, made (or opened) by the backend.
    pub volume: burrow_storage::Volume,
    pub image_root: PathBuf,
    /// Where to open the server's sealed copy of the guest agent (`/proc/<server>/fd/<n>`).
    pub guest_fd: PathBuf,
    /// The sandbox's veth, address and resolvers; `None`: loopback only.
    #[serde(default)]
    pub net: Option<crate::network::NetSpec>,
}

/// What `__init` prints on stdout when the sandbox's PID 1 runs the guest.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct InitReply {
    pub pid: u32,
    pub pid_start: u64,
    /// How long each stage of the build took, in microseconds, in order.
    #[serde(default)]
    pub stages: Vec<(String, u64)>,
    /// CPU time (user + system, microseconds) `__init` and the children it waited for
    /// used before it joined the sandbox's cgroups; what came after is charged to them.
    #[serde(default)]
    pub cpu_outside_us: u64,
}

/// Stage timings of one build, reported to the backend.
#[derive(Default)]
struct Clock {
    stages: Vec<(String, u64)>,
    last: Option<std::time::Instant>,
}

impl Clock {
    fn start() -> Clock {
        Clock {
            stages: Vec::new(),
            last: Some(std::time::Instant::now()),
        }
    }

    /// Ends stage `name`: it took the time since the previous one ended.
    fn lap(&mut self, name: &str) {
        let now = std::time::Instant::now();
        if let Some(last) = self.last {
            self.stages.push((
                name.to_string(),
                now.duration_since(last).as_micros() as u64,
            ));
        }
        self.last = Some(now);
    }
}

/// Ids mapped into each sandbox: 0..65536 inside.
pub const ID_RANGE: u32 = 65536;
/// The guest's listening socket is this fd in PID 1.
const GUEST_FD: i32 = 3;
/// The pipe PID 1 reports setup errors on, until exec closes it.
const ERR_FD: i32 = 4;
/// The guest agent's executable (close-on-exec), until PID 1 executes it.
const EXE_FD: i32 = 5;
/// The sandbox's own devpts. Terminals come from one host-wide pool (`kernel.pty.max`, less the
/// `kernel.pty.reserve` kept for the host's own devpts): `max` keeps one sandbox from taking it all.
const PTS_OPTIONS: &str = "newinstance,ptmxmode=0666,mode=620,gid=5,max=128";
/// What `argv[0]` of the guest says (no file of that name needs to exist).
const GUEST_ARGV0: &str = "/run/burrow/guest";

pub(crate) type Result<T> = std::result::Result<T, String>;

pub(crate) trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

/// Entry point of `burrow __init`.
pub fn main() -> ! {
    let mut input = String::new();
    // If the server dies mid-create, this half-built sandbox must not be finished behind the back of
    // the next server's clean-up.
    let result = sys::die_with_parent()
        .ctx(|| "PR_SET_PDEATHSIG".into())
        .and_then(|_| {
            std::io::stdin()
                .read_to_string(&mut input)
                .ctx(|| "reading the request".into())
        })
        .and_then(|_| {
            serde_json::from_str::<InitRequest>(&input).ctx(|| "parsing the request".into())
        })
        .and_then(|req| build(&req));
    match result {
        Ok(reply) => {
            println!("{}", serde_json::to_string(&reply).unwrap_or_default());
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}

/// The disk's throttle, from the plan.
pub(crate) fn io_limits(l: &Limits) -> IoLimits {
    IoLimits {
        read_bps: l.disk_read_bps,
        write_bps: l.disk_write_bps,
        read_iops: l.disk_read_iops,
        write_iops: l.disk_write_iops,
    }
}

/// Reads exactly `buf.len()` bytes from a pipe; false on EOF (every copy of the write end closed:
/// the process on the other side died or gave up) or an error.
fn read_exact_or_eof(fd: &OwnedFd, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf[got..]) {
            Ok(0) => return false,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
    true
}

/// Everything the error pipe holds until every writer is gone.
fn drain(fd: OwnedFd) -> String {
    let mut msg = String::new();
    let _ = std::fs::File::from(fd).read_to_string(&mut msg);
    msg
}

/// Host half. Everything it mounts lives in a private mount namespace of this process, which the
/// sandbox's mount namespace copies; the host's own mount table never changes.
fn build(req: &InitRequest) -> Result<InitReply> {
    let mut clock = Clock::start();
    let dir = &req.sandbox_dir;
    let base = req.uid_base;
    let user = base
        .checked_add(USER_UID)
        .ok_or_else(|| format!("uid base {base} leaves no room for the sandbox's user"))?;
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    // Traversable but not listable: the helper (running as the sandbox's first uid) starts here
    // and walks into the root; nobody else needs to see what is in it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .ctx(|| "chmod sandbox dir".into())?;
    // The guest agent, as the server's sealed copy: nothing of the host's file is mounted inside.
    let guest = std::fs::File::open(&req.guest_fd)
        .ctx(|| format!("opening the guest agent at {}", req.guest_fd.display()))?;
    if !burrow_linux::fs::is_sealed(&guest) {
        return Err("the guest agent's copy is not sealed".into());
    }
    clock.lap("init-start");

    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .ctx(|| "unshare(CLONE_NEWNS)".into())?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .ctx(|| "making / private".into())?;

    let disk = dir.join("disk");
    for d in ["disk", "root", "lower"] {
        std::fs::create_dir_all(dir.join(d))
            .ctx(|| format!("creating {d} in {}", dir.display()))?;
    }
    // The volume's top directories (`upper`, `work`, `workspace`) appear under `disk`, owned by
    // the sandbox's root and user.
    let owners = burrow_storage::Owners { root: base, user };
    let attached = req
        .volume
        .attach(&disk, owners)
        .map_err(|e| crate::backend::error_text(&e))
        .ctx(|| "attaching the sandbox's volume".into())?;
    clock.lap("init-disk");

    let cgroups = Cgroups::host();
    cgroups
        .create(&req.id, super::cgroup_limits(&req.limits))
        .ctx(|| "creating cgroups".into())?;
    if let Some(dev) = attached.device {
        cgroups
            .set_io(&req.id, dev, io_limits(&req.limits))
            .ctx(|| "throttling the disk".into())?;
    }
    // What this process (and any child it waited for) used so far is charged to no sandbox
    // cgroup: count it now.
    let cpu_outside = crate::timing::rusage_cpu(libc::RUSAGE_SELF)
        + crate::timing::rusage_cpu(libc::RUSAGE_CHILDREN);
    // Join first, so the sandbox's cgroup namespace is rooted at its own cgroup.
    cgroups
        .join(&req.id, std::process::id())
        .ctx(|| "joining the sandbox cgroups".into())?;
    clock.lap("init-cgroups");

    let sock = dir.join("guest.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).ctx(|| format!("binding {}", sock.display()))?;

    // From here on paths are relative to the sandbox's directory: the overlay's layer names (what
    // mountinfo shows inside), and where the helper starts.
    std::env::set_current_dir(dir).ctx(|| format!("chdir {}", dir.display()))?;
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "pipe".into());
    // go: __init releases PID 1. err: the helper and PID 1 report failures, until exec.
    // up: the helper says its user namespace exists, then sends PID 1's pid. mapped: __init says
    // the maps are written and the root is mounted.
    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (up_r, up_w) = pipe()?;
    let (mapped_r, mapped_w) = pipe()?;
    // SAFETY: `burrow __init` is single-threaded (dispatched in main before any runtime or thread).
    let helper = unsafe { sys::clone_fork(0) }.ctx(|| "forking the helper".into())?;
    if helper == 0 {
        drop((go_w, err_r, up_r, mapped_w));
        let h = Helper {
            base,
            up: up_w,
            mapped: mapped_r,
        };
        let pid1 = Inherited {
            listener,
            go: go_r,
            guest,
        };
        if let Err(e) = h.run(req, pid1, &err_w) {
            let _ = nix::unistd::write(&err_w, e.as_bytes());
            // SAFETY: _exit ends the helper without running the parent's destructors.
            unsafe { libc::_exit(127) };
        }
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    drop((go_r, err_w, up_w, mapped_r, listener, guest));
    let mut go = Some(go_w);
    // The helper until it is reaped (after that its pid may belong to anyone), then PID 1 (which
    // cannot exit on its own before it is released or its go pipe closes).
    let mut helper_pid = Some(Pid::from_raw(helper));
    let mut pid1: Option<i32> = None;
    // On any failure: release whatever waits on us (PID 1 aborts on EOF), end both, and report.
    let fail =
        |msg: String, go: &mut Option<OwnedFd>, helper: Option<Pid>, pid1: Option<i32>| -> String {
            drop(go.take());
            if let Some(p) = pid1 {
                let _ = proc::kill9(p as u32);
            }
            if let Some(h) = helper {
                let _ = proc::kill9(h.as_raw() as u32);
                let _ = nix::sys::wait::waitpid(h, None);
            }
            msg
        };
    // The helper died: reap it, let anything it started go, and say what it wrote.
    let helper_died = |go: &mut Option<OwnedFd>, err_r: OwnedFd| -> String {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(helper), None);
        drop(go.take());
        format!("the helper failed: {}", drain(err_r))
    };
    let mut b = [0u8; 1];
    if !read_exact_or_eof(&up_r, &mut b) || b != *b"u" {
        return Err(helper_died(&mut go, err_r));
    }
    clock.lap("init-userns");
    let userns = match sys::write_id_maps(helper, base, ID_RANGE)
        .and_then(|_| std::fs::File::open(format!("/proc/{helper}/ns/user")))
    {
        Ok(f) => OwnedFd::from(f),
        Err(e) => {
            return Err(fail(
                format!("writing id maps: {e}"),
                &mut go,
                helper_pid,
                pid1,
            ))
        }
    };
    if let Err(e) = mount_root(req, &userns) {
        return Err(fail(e, &mut go, helper_pid, pid1));
    }
    drop(userns);
    clock.lap("init-overlay");
    if let Err(e) = nix::unistd::write(&mapped_w, b"m") {
        return Err(fail(
            format!("releasing the helper: {e}"),
            &mut go,
            helper_pid,
            pid1,
        ));
    }
    let mut pid_bytes = [0u8; 4];
    if !read_exact_or_eof(&up_r, &mut pid_bytes) {
        return Err(helper_died(&mut go, err_r));
    }
    let pid = i32::from_ne_bytes(pid_bytes);
    if pid > 0 {
        pid1 = Some(pid);
    }
    let reaped = nix::sys::wait::waitpid(Pid::from_raw(helper), None);
    helper_pid = None;
    match reaped {
        Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) if pid > 0 => {}
        other => {
            let msg = format!("the helper ended with {other:?} (PID 1: {pid})");
            return Err(fail(msg, &mut go, helper_pid, pid1));
        }
    }
    clock.lap("init-namespaces");
    // The network is wired before the sandbox runs anything of its own.
    if let Some(net) = &req.net {
        if let Err(e) = wire_network(pid as u32, net) {
            return Err(fail(
                format!("wiring the network: {e}"),
                &mut go,
                helper_pid,
                pid1,
            ));
        }
    }
    if req.net.is_some() {
        clock.lap("init-network");
    }
    if let Some(go_w) = &go {
        if let Err(e) = nix::unistd::write(go_w, b"g") {
            return Err(fail(
                format!("releasing the sandbox: {e}"),
                &mut go,
                helper_pid,
                pid1,
            ));
        }
    }
    // EOF with nothing read means the exec succeeded (the pipe is close-on-exec).
    let msg = drain(err_r);
    if !msg.is_empty() {
        return Err(fail(
            format!("sandbox setup: {msg}"),
            &mut go,
            helper_pid,
            pid1,
        ));
    }
    clock.lap("init-pid1-setup");
    let pid_start =
        proc::start_time(pid as u32).ok_or_else(|| "the sandbox exited at once".to_string())?;
    let _ = std::io::stdout().flush();
    Ok(InitReply {
        pid: pid as u32,
        pid_start,
        stages: clock.stages,
        cpu_outside_us: cpu_outside.as_micros() as u64,
    })
}

/// The root, mounted in `__init`'s namespace (the cwd is the sandbox's directory): the overlay,
/// then `/usr`, `/workspace` and `/run/burrow` attached onto mount points opened inside it.
fn mount_root(req: &InitRequest, userns: &OwnedFd) -> Result<()> {
    // The image, idmapped to the sandbox's user namespace: its files (owned by host uid 0, and
    // `home/user` by 1000) are root's (and user's) inside, and copy-up keeps those owners.
    let image = dmount::clone_tree(CWD, req.image_root.to_str().unwrap_or_default())
        .ctx(|| format!("cloning the image at {}", req.image_root.display()))?;
    dmount::set_attrs(
        &image,
        dmount::ATTR_RDONLY | dmount::ATTR_NOSUID | dmount::ATTR_NODEV | dmount::ATTR_IDMAP,
        Some(userns),
    )
    .ctx(|| "idmapping the image".into())?;
    // Directories of the sandbox's directory (the cwd): the host's, not the sandbox's.
    let own_dir = |name: &str| {
        rustix::fs::open(
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .ctx(|| format!("opening {name}"))
    };
    dmount::attach(&image, own_dir("lower")?).ctx(|| "mounting the image".into())?;
    mount(
        Some("overlay"),
        "root",
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some("lowerdir=lower,upperdir=disk/upper,workdir=disk/work"),
    )
    .ctx(|| "mounting the overlay root".into())?;
    let root = own_dir("root")?;
    let at = |rel: &str| mount_point(&root, rel).ctx(|| format!("mount point /{rel}"));

    // The host's /usr, read-only; idmapped so its files are root's inside, plain where the
    // filesystem cannot be idmapped.
    let usr = dmount::clone_tree(CWD, "/usr").ctx(|| "cloning /usr".into())?;
    let ro = dmount::ATTR_RDONLY | dmount::ATTR_NOSUID | dmount::ATTR_NODEV;
    if dmount::set_attrs(&usr, ro | dmount::ATTR_IDMAP, Some(userns)).is_err() {
        dmount::set_attrs(&usr, ro, None).ctx(|| "making /usr read-only".into())?;
    }
    dmount::attach(&usr, at("usr")?).ctx(|| "mounting /usr".into())?;

    let ws = dmount::clone_tree(CWD, "disk/workspace").ctx(|| "cloning the workspace".into())?;
    dmount::attach(&ws, at("workspace")?).ctx(|| "mounting /workspace".into())?;

    // burrow's own directory: empty and read-only, so nothing there can pass for burrow's.
    mount(
        Some("tmpfs"),
        &fd_path(&at("run/burrow")?),
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k,mode=755"),
    )
    .ctx(|| "mounting /run/burrow".into())?;
    Ok(())
}

/// The helper: becomes the sandbox's first host uid, creates the sandbox's user namespace (so that
/// uid owns it), and clones PID 1 into the other namespaces from inside it.
struct Helper {
    base: u32,
    up: OwnedFd,
    mapped: OwnedFd,
}

/// What PID 1 inherits from `__init` through the helper.
struct Inherited {
    /// The guest's listening socket.
    listener: UnixListener,
    /// Where `__init` releases PID 1 (or closes: abort).
    go: OwnedFd,
    /// The sealed guest agent.
    guest: std::fs::File,
}

impl Helper {
    fn run(self, req: &InitRequest, pid1: Inherited, err: &OwnedFd) -> Result<()> {
        let (uid, gid) = (Uid::from_raw(self.base), Gid::from_raw(self.base));
        nix::unistd::setgroups(&[]).ctx(|| "setgroups".into())?;
        nix::unistd::setresgid(gid, gid, gid).ctx(|| "setresgid".into())?;
        nix::unistd::setresuid(uid, uid, uid).ctx(|| "setresuid".into())?;
        // A credential change clears the parent-death signal: set it again.
        sys::die_with_parent().ctx(|| "PR_SET_PDEATHSIG".into())?;
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)
            .ctx(|| "creating the user namespace".into())?;
        nix::unistd::write(&self.up, b"u").ctx(|| "reporting the user namespace".into())?;
        let mut b = [0u8; 1];
        if !read_exact_or_eof(&self.mapped, &mut b) || b != *b"m" {
            return Err("the host half went away".into());
        }
        // PID 1 starts in the root (a clone's new mount namespace keeps its cwd, on its own copy).
        std::env::set_current_dir("root").ctx(|| "entering the root".into())?;
        let flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWCGROUP;
        // SAFETY: the helper is single-threaded (a fork of the single-threaded `__init`).
        let pid = unsafe { sys::clone_fork(flags) }.ctx(|| "clone into new namespaces".into())?;
        if pid == 0 {
            drop((self.up, self.mapped));
            // Errors after the fd shuffle were already written to the pipe; they come back empty.
            if let Err(e) = sandbox_half(req, pid1, err) {
                if !e.is_empty() {
                    let _ = nix::unistd::write(err, e.as_bytes());
                }
            }
            // SAFETY: _exit ends PID 1 without running the helper's destructors.
            unsafe { libc::_exit(127) };
        }
        nix::unistd::write(&self.up, &pid.to_ne_bytes()).ctx(|| "reporting PID 1".into())?;
        Ok(())
    }
}

/// `/etc/resolv.conf` of a sandbox with a network.
pub(crate) fn resolv_conf(net: &crate::network::NetSpec) -> String {
    let mut s = String::from("# written by burrow\n");
    for r in &net.resolvers {
        s.push_str(&format!("nameserver {r}\n"));
    }
    s.push_str("options timeout:2 attempts:2\n");
    s
}

fn ip_batch(script: &str) -> Result<()> {
    let mut child = Command::new("/usr/sbin/ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ctx(|| "running ip (install iproute2)".into())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .ctx(|| "writing to ip".into())?;
    }
    let out = child.wait_with_output().ctx(|| "waiting for ip".into())?;
    if !out.status.success() {
        return Err(format!(
            "ip: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// One veth pair: `eth0` inside with the sandbox's /32, the host end with the gateway address and
/// a /32 route back. IPv6 is off on both ends (attack N5 in docs/threat-model.md). Point to point: no bridge.
pub(crate) fn wire_network(pid: u32, net: &crate::network::NetSpec) -> Result<()> {
    let (ifname, addr, gw) = (&net.ifname, net.address, net.gateway);
    let add = format!("link add {ifname} type veth peer name eth0 netns {pid}\n");
    if ip_batch(&add).is_err() {
        // The host end of this sandbox's previous run (a cold resume right after a stop: network
        // namespaces are torn down asynchronously) may still hold the name.
        ip_batch(&format!("link del {ifname}\n"))?;
        ip_batch(&add)?;
    }
    let _ = burrow_linux::net::write_sysctl(&format!("net.ipv6.conf.{ifname}.disable_ipv6"), "1");
    ip_batch(&format!(
        "addr add {gw}/32 dev {ifname}\nlink set {ifname} up\nroute add {addr}/32 dev {ifname} scope link\n"
    ))?;
    burrow_linux::net::in_netns_of(pid, || {
        for name in ["all", "default", "eth0"] {
            burrow_linux::net::write_sysctl(&format!("net.ipv6.conf.{name}.disable_ipv6"), "1")?;
        }
        ip_batch(&format!(
            "addr add {addr}/32 dev eth0\nlink set eth0 up\nroute add {gw}/32 dev eth0 scope link\nroute add default via {gw} dev eth0\n"
        ))
        .map_err(std::io::Error::other)
    })
    .ctx(|| "configuring eth0 inside".into())
}

/// Sandbox half: PID 1 of the new namespaces, until it executes the guest. Returns only on error.
fn sandbox_half(req: &InitRequest, inherited: Inherited, err: &OwnedFd) -> Result<()> {
    let Inherited {
        listener,
        go,
        guest,
    } = inherited;
    // Anything but the go byte (EOF: `__init` died or gave up) aborts.
    let mut b = [0u8; 1];
    if !read_exact_or_eof(&go, &mut b) || b != *b"g" {
        return Err("the host half went away before releasing the sandbox".into());
    }
    drop(go);
    let zero = Gid::from_raw(0);
    nix::unistd::setresgid(zero, zero, zero).ctx(|| "setresgid".into())?;
    nix::unistd::setgroups(&[]).ctx(|| "setgroups".into())?;
    let zero = Uid::from_raw(0);
    nix::unistd::setresuid(zero, zero, zero).ctx(|| "setresuid".into())?;
    nix::unistd::sethostname(&req.hostname).ctx(|| "sethostname".into())?;

    // The cwd is the root, as the helper left it, on this namespace's copy. That copy is locked
    // (it came from a more privileged namespace) and pivot_root refuses a locked root: stack an
    // unlocked recursive copy on it, and step onto that through the sandbox's directory.
    mount(
        Some("."),
        ".",
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| "re-binding the root".into())?;
    std::env::set_current_dir("../root").ctx(|| "entering the root".into())?;
    let root = rustix::fs::open(".", OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
        .ctx(|| "opening the root".into())?;
    inner_mounts(req, &root)?;
    drop(root);

    nix::unistd::pivot_root(".", ".").ctx(|| "pivot_root".into())?;
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "detaching the old root".into())?;
    std::env::set_current_dir("/").ctx(|| "chdir /".into())?;
    // From here on no host path is reachable: "/" is the sandbox's.
    write_etc(req);

    sys::loopback_up().ctx(|| "bringing lo up".into())?;
    sys::limit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        req.limits.nofile,
    )
    .ctx(|| "RLIMIT_NOFILE".into())?;

    // Descriptors: 0-2 /dev/null, 3 the guest socket, 4 the error pipe and 5 the guest's
    // executable (both close-on-exec), no others. Each is first moved above any fd number it
    // could collide with.
    let high = |fd: i32| {
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)).ctx(|| "dup fd".into())
    };
    let (listen_hi, err_hi, exe_hi) = (
        high(listener.as_raw_fd())?,
        high(err.as_raw_fd())?,
        high(guest.as_raw_fd())?,
    );
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .ctx(|| "/dev/null".into())?;
    for fd in 0..3 {
        nix::unistd::dup2(null.as_raw_fd(), fd).ctx(|| "dup2 stdio".into())?;
    }
    nix::unistd::dup2(listen_hi, GUEST_FD).ctx(|| "dup2 guest socket".into())?;
    nix::unistd::dup2(err_hi, ERR_FD).ctx(|| "dup2 error pipe".into())?;
    nix::unistd::dup2(exe_hi, EXE_FD).ctx(|| "dup2 guest executable".into())?;
    // SAFETY: these fds were just made by dup2; nothing else owns them.
    let (err4, guest_fd, exe) = unsafe {
        (
            OwnedFd::from_raw_fd(ERR_FD),
            OwnedFd::from_raw_fd(GUEST_FD),
            OwnedFd::from_raw_fd(EXE_FD),
        )
    };
    for fd in [&err4, &exe] {
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .ctx(|| "close-on-exec".into())?;
    }
    sys::keep_on_exec(&guest_fd).ctx(|| "keeping the guest socket".into())?;
    // Everything else goes; the Rust owners of those fds are never used again (exec or _exit follow).
    std::mem::forget((null, listener, guest));
    sys::close_from(EXE_FD + 1).ctx(|| "closing inherited fds".into())?;
    let report = |msg: String| -> Result<()> {
        let _ = nix::unistd::write(&err4, msg.as_bytes());
        Err(String::new())
    };

    let mut env: Vec<CString> = Vec::new();
    for (k, v) in req.env.iter().filter(|(k, _)| !k.starts_with("BURROW_")) {
        match CString::new(format!("{k}={v}")) {
            Ok(c) => env.push(c),
            Err(_) => return report(format!("env {k:?} contains NUL")),
        }
    }
    for var in [
        format!("BURROW_GUEST_FD={GUEST_FD}"),
        format!("BURROW_SANDBOX_ID={}", req.id),
        format!("HOSTNAME={}", req.hostname),
    ] {
        env.push(CString::new(var).unwrap_or_default());
    }
    let argv0 = CString::new(GUEST_ARGV0).unwrap_or_default();
    if let Err(e) = caps::restrict_to(caps::SANDBOX) {
        return report(format!("dropping capabilities: {e}"));
    }
    if let Err(e) = caps::no_new_privs() {
        return report(format!("no_new_privs: {e}"));
    }
    if let Err(e) = seccomp::install() {
        return report(format!("installing seccomp: {e}"));
    }
    let e = nix::unistd::fexecve(exe.as_raw_fd(), &[&argv0], &env).unwrap_err();
    report(format!("exec the guest agent: {e}"))
}

/// `/etc/hostname`, `/etc/hosts` and (with a network) `/etc/resolv.conf`, written by PID 1 after
/// `pivot_root`, as the sandbox's own root: whatever links the sandbox left there are its own and
/// resolve inside it, and each file is replaced rather than written through a link. A sandbox
/// that broke its own `/etc` (made it a file, or a link into read-only `/usr`) still starts,
/// without these files.
fn write_etc(req: &InitRequest) {
    let mut files = vec![
        ("hostname", format!("{}\n", req.hostname)),
        ("hosts", crate::backend::etc_hosts(&req.hostname)),
    ];
    if let Some(net) = &req.net {
        files.push(("resolv.conf", resolv_conf(net)));
    }
    let _ = std::fs::create_dir("/etc");
    let Ok(etc) = rustix::fs::open("/etc", OFlags::PATH | OFlags::DIRECTORY, Mode::empty()) else {
        return;
    };
    for (name, body) in files {
        let _ = replace_file(&etc, name, body.as_bytes(), 0o644);
    }
}

/// Mounts that must be made by the sandbox's own namespaces: a proc for its pid namespace, a sysfs
/// for its network namespace, a minimal /dev, a fresh /tmp; then the masks over /proc and /sys.
/// Every target is opened inside `root` (the sandbox's links resolve inside it) and mounted on by
/// descriptor.
fn inner_mounts(req: &InitRequest, root: &OwnedFd) -> Result<()> {
    let at = |rel: &str| mount_point(root, rel).ctx(|| format!("mount point /{rel}"));
    let on = |src: &str, target: &OwnedFd, fstype: &str, flags: MsFlags, data: Option<&str>| {
        mount(Some(src), &fd_path(target), Some(fstype), flags, data)
            .ctx(|| format!("mounting {fstype} ({src})"))
    };
    let bind = |src: &Path, target: &OwnedFd| {
        mount(
            Some(src),
            &fd_path(target),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .ctx(|| format!("binding {}", src.display()))
    };
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    on("proc", &at("proc")?, "proc", hardened, None)?;
    on(
        "sysfs",
        &at("sys")?,
        "sysfs",
        hardened | MsFlags::MS_RDONLY,
        None,
    )?;

    on(
        "tmpfs",
        &at("dev")?,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=1m"),
    )?;
    // The fresh tmpfs: nothing of the sandbox's is in it.
    let dev = at("dev")?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let f = rustix::fs::openat(
            &dev,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o666),
        )
        .ctx(|| format!("creating /dev/{name}"))?;
        bind(&Path::new("/dev").join(name), &f)?;
    }
    for d in ["pts", "shm", "mqueue"] {
        rustix::fs::mkdirat(&dev, d, Mode::from_raw_mode(0o755))
            .ctx(|| format!("creating /dev/{d}"))?;
    }
    on(
        "devpts",
        &at("dev/pts")?,
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(PTS_OPTIONS),
    )?;
    let shm_size = format!("mode=1777,size={}m", (req.limits.memory_mib / 4).max(16));
    on(
        "tmpfs",
        &at("dev/shm")?,
        "tmpfs",
        hardened,
        Some(shm_size.as_str()),
    )?;
    on("mqueue", &at("dev/mqueue")?, "mqueue", hardened, None)?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        rustix::fs::symlinkat(target, &dev, link).ctx(|| format!("/dev/{link}"))?;
    }
    let tmp_size = format!("mode=1777,size={}m", (req.limits.memory_mib / 2).max(16));
    on(
        "tmpfs",
        &at("tmp")?,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(tmp_size.as_str()),
    )?;

    // /proc and /sys: hide what leaks host information (the host's kernel command line; the
    // loop devices, whose backing files name every sandbox and the data directory), freeze what
    // could change host settings (K8).
    let existing = |rel: &str| open_in_root(root, rel, OFlags::PATH).ok();
    for name in [
        "kcore",
        "keys",
        "timer_list",
        "sched_debug",
        "latency_stats",
        "kallsyms",
        "kmsg",
        "cmdline",
    ] {
        if let Some(t) = existing(&format!("proc/{name}")) {
            bind(Path::new("/dev/null"), &t)?;
        }
    }
    let empty = |t: &OwnedFd| {
        on(
            "tmpfs",
            t,
            "tmpfs",
            hardened | MsFlags::MS_RDONLY,
            Some("mode=555"),
        )
    };
    for rel in [
        "proc/acpi",
        "proc/scsi",
        "proc/asound",
        "sys/block",
        "sys/class/block",
        "sys/dev/block",
        "sys/devices/virtual/block",
    ] {
        if let Ok(t) = open_in_root(root, rel, OFlags::PATH | OFlags::DIRECTORY) {
            empty(&t)?;
        }
    }
    for name in ["sys", "sysrq-trigger", "irq", "bus", "fs"] {
        let rel = format!("proc/{name}");
        if let Some(t) = existing(&rel) {
            mount(
                Some(&fd_path(&t)),
                &fd_path(&t),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .ctx(|| format!("bind /{rel}"))?;
            // The bind now sits on top: open it again to remount it, not what is under it.
            let top = open_in_root(root, &rel, OFlags::PATH).ctx(|| format!("/{rel}"))?;
            mount(
                None::<&str>,
                &fd_path(&top),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | hardened,
                None::<&str>,
            )
            .ctx(|| format!("read-only /{rel}"))?;
        }
    }
    Ok(())
}

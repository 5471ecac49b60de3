//! `burrow __gvisor`: prepares one gVisor sandbox's host side and hands it to `runsc`. Runs in a
//! fresh process (a re-exec of the `burrow` binary, single-threaded, no async runtime), because it
//! changes its own mount namespace and forks.
//!
//! In a private mount namespace (the host's mount table never changes): the sandbox's ext4 disk on
//! a loop device, and the root, an overlay of the `system` image under the disk's upper layer.
//! `runsc` is started from inside that namespace, so its gofer (the process that serves the
//! sandbox's files) sees the root, and the mounts disappear with the sandbox's last process, as
//! a namespace sandbox's do. The process joins the sandbox's cgroups first: `runsc`, its Sentry,
//! its gofer and every stub of the `ptrace` platform are charged to them.
//!
//! With a network, a child makes the sandbox's network namespace and holds it until the sandbox
//! has joined it (through the config), and this process wires the veth into it (runsc's netstack
//! takes over the addresses it finds there). `runsc` itself runs in the server's namespace: its
//! control socket is an abstract one, which only that namespace's later runsc commands reach.
//! Before `runsc` runs, an empty read-only tmpfs covers `/proc/sys/net` in this mount namespace:
//! runsc 2022 takes any namespace that has `/proc/sys/net/core/rmem_default` for the host's root
//! namespace (on kernels since 6.x every namespace has it) and refuses to start.
//!
//! The host never follows a path under the sandbox's root: `/etc/hostname`, `hosts` and
//! `resolv.conf` are replaced through a descriptor opened with `RESOLVE_IN_ROOT`.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use burrow_linux::cgroup::Cgroups;
use burrow_linux::fs::{open_in_root, replace_file};
use burrow_linux::sys;
use burrow_types::Limits;
use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use rustix::fs::OFlags;
use serde::{Deserialize, Serialize};

use crate::namespace::init::{resolv_conf, wire_network, Ctx, Result};
use crate::network::NetSpec;

/// What the backend sends `__gvisor` on stdin.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct BootRequest {
    pub id: String,
    pub hostname: String,
    pub limits: Limits,
    pub sandbox_dir: PathBuf,
    pub image_root: PathBuf,
    /// The sandbox's volume, made (or opened) by the backend.
    pub volume: burrow_storage::Volume,
    pub net: Option<NetSpec>,
    /// The whole `runsc` command line (global flags, `run` or `restore`, its flags, the id),
    /// without the binary.
    pub runsc: PathBuf,
    pub args: Vec<String>,
    /// The OCI config, with `NETNS_PLACEHOLDER` where the network namespace's path goes.
    pub config: serde_json::Value,
    /// The cgroups the sandbox is charged to (made by the backend).
    pub cgroup_limits: (u32, u64, u32),
    /// Whether the `statx` shim is bound in: `/etc/ld.so.preload` names it.
    pub preload: bool,
}

/// runsc's own messages, in the sandbox's directory (the cwd).
const RUNSC_LOG: &str = "runsc.log";

/// Stands for `/proc/<pid>/ns/net` of the child that runs `runsc`, unknown until it exists.
pub(crate) const NETNS_PLACEHOLDER: &str = "@netns@";

/// Entry point of `burrow __gvisor`: the request as JSON on stdin; the error on stderr and exit
/// status 1.
pub fn main() -> ! {
    let mut input = String::new();
    // If the server dies mid-create, this half-built sandbox must not be finished behind the back
    // of the next server's clean-up.
    let result = sys::die_with_parent()
        .ctx(|| "PR_SET_PDEATHSIG".into())
        .and_then(|_| {
            std::io::stdin()
                .read_to_string(&mut input)
                .ctx(|| "reading the request".into())
        })
        .and_then(|_| {
            serde_json::from_str::<BootRequest>(&input).ctx(|| "parsing the request".into())
        })
        .and_then(|req| boot(&req));
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}

fn boot(req: &BootRequest) -> Result<()> {
    let dir = &req.sandbox_dir;
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .ctx(|| "chmod sandbox dir".into())?;
    let (cpu_millis, memory_bytes, pids) = req.cgroup_limits;
    let cgroups = Cgroups::host();
    cgroups
        .create(
            &req.id,
            burrow_linux::cgroup::CgroupLimits {
                cpu_millis,
                memory_bytes,
                pids,
            },
        )
        .ctx(|| "creating cgroups".into())?;
    cgroups
        .join(&req.id, std::process::id())
        .ctx(|| "joining the sandbox cgroups".into())?;

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
    std::env::set_current_dir(dir).ctx(|| format!("chdir {}", dir.display()))?;
    for d in ["disk", "root", "bundle", "sock"] {
        std::fs::create_dir_all(d).ctx(|| format!("creating {d} in {}", dir.display()))?;
    }
    // Root inside a gVisor sandbox is host root to the gofer: the layers keep host ids as they
    // are, with `user` (1000) owning the workspace.
    let owners = burrow_storage::Owners {
        root: 0,
        user: crate::namespace::USER_UID,
    };
    let attached = req
        .volume
        .attach(Path::new("disk"), owners)
        .map_err(|e| crate::backend::error_text(&e))
        .ctx(|| "attaching the sandbox's volume".into())?;
    if let Some(dev) = attached.device {
        cgroups
            .set_io(&req.id, dev, crate::namespace::init::io_limits(&req.limits))
            .ctx(|| "throttling the disk".into())?;
    }
    let lower = format!("lowerdir={}", req.image_root.display());
    mount(
        Some("overlay"),
        "root",
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(format!("{lower},upperdir=disk/upper,workdir=disk/work").as_str()),
    )
    .ctx(|| "mounting the overlay root".into())?;
    write_etc(req)?;

    // The sandbox's network namespace is made by a holder child and only joined by the sandbox
    // (through the config): `runsc` itself stays in the server's namespace, where its control
    // socket (an abstract one) must be for every later runsc command to reach the sandbox.
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "pipe".into());
    let holder = match &req.net {
        Some(_) => Some(NetnsHolder::start()?),
        None => None,
    };
    let netns = holder
        .as_ref()
        .map(|h| format!("/proc/{}/ns/net", h.pid))
        .unwrap_or_default();
    let prepared = (|| -> Result<()> {
        if let (Some(net), Some(h)) = (&req.net, &holder) {
            wire_network(h.pid as u32, net).ctx(|| "wiring the network".into())?;
            // After the wiring (which writes sysctls of both namespaces), before runsc.
            mount(
                Some("tmpfs"),
                "/proc/sys/net",
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=4k,mode=555"),
            )
            .ctx(|| "covering /proc/sys/net for runsc".into())?;
        }
        let config = serde_json::to_string_pretty(&req.config)
            .ctx(|| "encoding config.json".into())?
            .replace(NETNS_PLACEHOLDER, &netns);
        std::fs::write("bundle/config.json", config).ctx(|| "writing config.json".into())?;
        Ok(())
    })();
    prepared?;
    let (go_r, go_w) = pipe()?;
    // SAFETY: `burrow __gvisor` is single-threaded (dispatched in main before any runtime).
    let child = unsafe { sys::clone_fork(0) }.ctx(|| "forking".into())?;
    if child == 0 {
        drop(go_w);
        let e = run_child(req, go_r);
        eprintln!("{e}");
        // SAFETY: _exit ends the child without running the parent's destructors.
        unsafe { libc::_exit(127) };
    }
    drop(go_r);
    nix::unistd::write(&go_w, b"g").ctx(|| "releasing runsc".into())?;
    drop(go_w);
    let said = || {
        let log = std::fs::read_to_string(RUNSC_LOG).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    let r = match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None) {
        Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
        Ok(other) => Err(format!("runsc ended with {other:?}: {}", said())),
        Err(e) => Err(format!("waiting for runsc: {e}")),
    };
    // The sandbox holds its network namespace now (or failed to start): the holder can go.
    drop(holder);
    r
}

/// A child that makes a network namespace and keeps it until dropped.
struct NetnsHolder {
    pid: i32,
    /// Closing it ends the holder.
    keep: Option<OwnedFd>,
}

impl NetnsHolder {
    fn start() -> Result<NetnsHolder> {
        let (up_r, up_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
        let (keep_r, keep_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
        // SAFETY: `burrow __gvisor` is single-threaded.
        let pid = unsafe { sys::clone_fork(0) }.ctx(|| "forking the netns holder".into())?;
        if pid == 0 {
            drop((up_r, keep_w));
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_ok()
                && nix::unistd::write(&up_w, b"u").is_ok()
            {
                let mut b = [0u8; 1];
                // Until the parent closes its end (or dies).
                let _ = nix::unistd::read(keep_r.as_raw_fd(), &mut b);
            }
            // SAFETY: _exit ends the holder without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        drop((up_w, keep_r));
        let holder = NetnsHolder {
            pid,
            keep: Some(keep_w),
        };
        let mut b = [0u8; 1];
        if nix::unistd::read(up_r.as_raw_fd(), &mut b).ok() != Some(1) {
            return Err("the network namespace holder failed".into());
        }
        Ok(holder)
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        drop(self.keep.take());
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid), None);
    }
}

/// The child that becomes `runsc` once released. Returns only on error.
fn run_child(req: &BootRequest, go: OwnedFd) -> String {
    let mut b = [0u8; 1];
    if nix::unistd::read(go.as_raw_fd(), &mut b).ok() != Some(1) {
        return "the host half gave up".into();
    }
    drop(go);
    // runsc's sandbox and gofer keep its stdout and stderr for their whole life: they must not
    // be the pipe the server waits on. Its messages go to a log the parent reads on failure.
    let log = match std::fs::File::create(RUNSC_LOG) {
        Ok(f) => f,
        Err(e) => return format!("creating {RUNSC_LOG}: {e}"),
    };
    for fd in [1, 2] {
        if let Err(e) = nix::unistd::dup2(log.as_raw_fd(), fd) {
            return format!("dup2 of the runsc log: {e}");
        }
    }
    let null = std::fs::File::open("/dev/null").map(|f| nix::unistd::dup2(f.as_raw_fd(), 0));
    if !matches!(null, Ok(Ok(_))) {
        return "stdin from /dev/null".into();
    }
    use std::os::unix::process::CommandExt;
    let e = Command::new(&req.runsc).args(&req.args).exec();
    format!("executing {}: {e}", req.runsc.display())
}

/// `/etc/hostname`, `hosts` and (with a network) `resolv.conf`, replaced through a descriptor of
/// `/etc` resolved inside the root (the sandbox's links resolve inside it). A sandbox that broke
/// its own `/etc` still starts, without these files.
fn write_etc(req: &BootRequest) -> Result<()> {
    let root = rustix::fs::open(
        "root",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW,
        rustix::fs::Mode::empty(),
    )
    .ctx(|| "opening the root".into())?;
    let Ok(etc) = open_in_root(&root, "etc", OFlags::PATH | OFlags::DIRECTORY) else {
        return Ok(());
    };
    let mut files = vec![
        ("hostname", format!("{}\n", req.hostname)),
        ("hosts", crate::backend::etc_hosts(&req.hostname)),
    ];
    if let Some(net) = &req.net {
        files.push(("resolv.conf", resolv_conf(net)));
    }
    if req.preload {
        files.push(("ld.so.preload", format!("{}\n", super::SHIM_PATH)));
    }
    for (name, body) in files {
        let _ = replace_file(&etc, name, body.as_bytes(), 0o644);
    }
    Ok(())
}

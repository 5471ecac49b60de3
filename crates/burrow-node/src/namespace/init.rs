//! `burrow __init`: builds one sandbox. Runs in a fresh process (a re-exec of the `burrow` binary,
//! single-threaded, no async runtime), because it forks into new namespaces.
//!
//! The host half (this process, host root) prepares what needs host privileges: the ext4 disk on a
//! loop device, the overlay root, bind mounts, cgroups and the guest's listening socket, all inside
//! a private mount namespace, so nothing is mounted on the host and everything disappears with the
//! sandbox's last process. It then clones the sandbox's PID 1 into new user, mount, pid, uts, ipc,
//! net and cgroup namespaces, writes its id maps, and exits once PID 1 has exec'd the guest agent.
//! The sandbox half (the clone) finishes the mounts that must be made inside (proc, sys, dev, tmp),
//! pivots into the root, drops capabilities, installs seccomp, and execs `/run/burrow/guest`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{chown, lchown, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use burrow_linux::cgroup::Cgroups;
use burrow_linux::{caps, loopdev, proc, seccomp, sys};
use burrow_types::Limits;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
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
    pub image_root: PathBuf,
    pub guest_exe: PathBuf,
    /// The sandbox's veth, address and resolvers; `None`: loopback only.
    #[serde(default)]
    pub net: Option<crate::network::NetSpec>,
}

/// What `__init` prints on stdout when the sandbox's PID 1 runs the guest.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct InitReply {
    pub pid: u32,
    pub pid_start: u64,
}

/// Ids mapped into each sandbox: 0..65536 inside.
pub const ID_RANGE: u32 = 65536;
/// The guest's listening socket is this fd in PID 1.
const GUEST_FD: i32 = 3;
/// The pipe PID 1 reports setup errors on, until exec closes it.
const ERR_FD: i32 = 4;

type Result<T> = std::result::Result<T, String>;

trait Ctx<T> {
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

fn bind(src: &Path, dst: &Path, readonly: bool) -> Result<()> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .ctx(|| format!("bind {} on {}", src.display(), dst.display()))?;
    if readonly {
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        mount(None::<&str>, dst, None::<&str>, flags, None::<&str>)
            .ctx(|| format!("read-only {}", dst.display()))?;
    }
    Ok(())
}

fn make_disk(req: &InitRequest, img: &Path) -> Result<()> {
    let f = std::fs::File::create(img).ctx(|| format!("creating {}", img.display()))?;
    f.set_len(req.limits.disk_mib * 1024 * 1024)
        .ctx(|| "sizing the disk image".into())?;
    drop(f);
    // No reserved blocks (the sandbox gets its whole size); lazy inode tables keep mkfs ~10 ms.
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ])
        .arg(img)
        .output()
        .ctx(|| "running mkfs.ext4 (install e2fsprogs)".into())?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Host half. Everything it mounts lives in a private mount namespace of this process, which the
/// sandbox's mount namespace copies; the host's own mount table never changes.
fn build(req: &InitRequest) -> Result<InitReply> {
    let dir = &req.sandbox_dir;
    let (base, user) = (req.uid_base, req.uid_base + USER_UID);
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    // Traversable but not listable: the sandbox's root user (an unprivileged uid here) must walk
    // through it to its root while setting up; nobody else needs to see what is in it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .ctx(|| "chmod sandbox dir".into())?;
    let img = dir.join("disk.img");
    // A sandbox whose disk exists keeps it (a cold start after a host reboot reuses its files).
    if !img.exists() {
        make_disk(req, &img)?;
    }

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
    let root = dir.join("root");
    for d in [&disk, &root] {
        std::fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
    }
    let lo = loopdev::attach(&img).ctx(|| "attaching the disk to a loop device".into())?;
    mount(
        Some(&lo.path),
        &disk,
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .ctx(|| format!("mounting {}", lo.path.display()))?;
    drop(lo);
    for (sub, owner, mode) in [
        ("upper", base, 0o755),
        ("work", 0, 0o700),
        ("workspace", user, 0o755),
    ] {
        let p = disk.join(sub);
        if !p.exists() {
            std::fs::create_dir(&p).ctx(|| format!("creating {}", p.display()))?;
            chown(&p, Some(owner), Some(owner)).ctx(|| format!("chown {}", p.display()))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .ctx(|| "chmod".into())?;
        }
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        req.image_root.display(),
        disk.join("upper").display(),
        disk.join("work").display()
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .ctx(|| "mounting the overlay root".into())?;
    own_image_dirs(&req.image_root, &root, base, user)?;
    let mut etc = vec![
        ("etc/hostname", format!("{}\n", req.hostname)),
        ("etc/hosts", crate::backend::etc_hosts(&req.hostname)),
    ];
    if let Some(net) = &req.net {
        etc.push(("etc/resolv.conf", resolv_conf(net)));
    }
    for (name, body) in etc {
        let p = root.join(name);
        std::fs::write(&p, body).ctx(|| format!("writing {name}"))?;
        chown(&p, Some(base), Some(base)).ctx(|| format!("chown {name}"))?;
    }
    bind(Path::new("/usr"), &root.join("usr"), true)?;
    bind(&disk.join("workspace"), &root.join("workspace"), false)?;
    bind(&req.guest_exe, &root.join("run/burrow/guest"), true)?;

    let cgroups = Cgroups::host();
    cgroups
        .create(&req.id, super::cgroup_limits(&req.limits))
        .ctx(|| "creating cgroups".into())?;
    // Join first, so the sandbox's cgroup namespace is rooted at its own cgroup.
    cgroups
        .join(&req.id, std::process::id())
        .ctx(|| "joining the sandbox cgroups".into())?;

    let sock = dir.join("guest.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).ctx(|| format!("binding {}", sock.display()))?;

    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP;
    // SAFETY: `burrow __init` is single-threaded (dispatched in main before any runtime or thread).
    let pid = unsafe { sys::clone_fork(flags) }.ctx(|| "clone into new namespaces".into())?;
    if pid == 0 {
        drop(go_w);
        drop(err_r);
        // Errors after the fd shuffle were already written to the pipe; they come back empty here.
        if let Err(err) = sandbox_half(req, &root, listener, go_r, &err_w) {
            if !err.is_empty() {
                let _ = nix::unistd::write(&err_w, err.as_bytes());
            }
        }
        // SAFETY: _exit ends the child without running the parent's atexit handlers or destructors.
        unsafe { libc::_exit(127) };
    }
    drop(go_r);
    drop(err_w);
    drop(listener);
    let fail = |msg: String| -> Result<InitReply> {
        let _ = proc::kill9(pid as u32);
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        Err(msg)
    };
    if let Err(e) = sys::write_id_maps(pid, base, ID_RANGE) {
        return fail(format!("writing id maps: {e}"));
    }
    // The network is wired before the sandbox runs anything of its own.
    if let Some(net) = &req.net {
        if let Err(e) = wire_network(pid as u32, net) {
            return fail(format!("wiring the network: {e}"));
        }
    }
    if let Err(e) = nix::unistd::write(&go_w, b"g") {
        return fail(format!("releasing the sandbox: {e}"));
    }
    // EOF with nothing read means the exec succeeded (the pipe is close-on-exec).
    let mut msg = String::new();
    let _ = std::fs::File::from(err_r).read_to_string(&mut msg);
    if !msg.is_empty() {
        return fail(format!("sandbox setup: {msg}"));
    }
    let pid_start =
        proc::start_time(pid as u32).ok_or_else(|| "the sandbox exited at once".to_string())?;
    let _ = std::io::stdout().flush();
    Ok(InitReply {
        pid: pid as u32,
        pid_start,
    })
}

/// `/etc/resolv.conf` of a sandbox with a network.
fn resolv_conf(net: &crate::network::NetSpec) -> String {
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
fn wire_network(pid: u32, net: &crate::network::NetSpec) -> Result<()> {
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

/// Directories of the image, owned by root inside (and `/home/user` by `user`), so the sandbox can
/// create files in them; copied up to the sandbox's own layer, the shared image is untouched.
fn own_image_dirs(image: &Path, root: &Path, base: u32, user: u32) -> Result<()> {
    fn walk(image: &Path, rel: &Path, root: &Path, base: u32, user: u32) -> Result<()> {
        let rd = std::fs::read_dir(image.join(rel))
            .ctx(|| format!("reading image {}", rel.display()))?;
        for entry in rd {
            let entry = entry.ctx(|| "reading image".into())?;
            let ft = entry.file_type().ctx(|| "reading image".into())?;
            if !ft.is_dir() {
                continue;
            }
            let rel = rel.join(entry.file_name());
            // Mount points get their owners from what is mounted on them.
            if ["usr", "proc", "sys", "dev", "tmp", "workspace"]
                .iter()
                .any(|m| rel == Path::new(m))
            {
                continue;
            }
            let owner = if rel.starts_with("home/user") {
                user
            } else {
                base
            };
            lchown(root.join(&rel), Some(owner), Some(owner))
                .ctx(|| format!("chown /{}", rel.display()))?;
            walk(image, &rel, root, base, user)?;
        }
        Ok(())
    }
    lchown(root, Some(base), Some(base)).ctx(|| "chown /".into())?;
    walk(image, Path::new(""), root, base, user)
}

/// Sandbox half: PID 1 of the new namespaces, until it execs the guest. Returns only on error.
fn sandbox_half(
    req: &InitRequest,
    root: &Path,
    listener: UnixListener,
    go: OwnedFd,
    err: &OwnedFd,
) -> Result<()> {
    let mut b = [0u8; 1];
    nix::unistd::read(go.as_raw_fd(), &mut b).ctx(|| "waiting for id maps".into())?;
    drop(go);
    let zero = nix::unistd::Gid::from_raw(0);
    nix::unistd::setresgid(zero, zero, zero).ctx(|| "setresgid".into())?;
    nix::unistd::setgroups(&[]).ctx(|| "setgroups".into())?;
    let zero = nix::unistd::Uid::from_raw(0);
    nix::unistd::setresuid(zero, zero, zero).ctx(|| "setresuid".into())?;
    nix::unistd::sethostname(&req.hostname).ctx(|| "sethostname".into())?;

    // The root and its submounts came from the host half's namespace, so they are locked here and
    // pivot_root refuses a locked new root: a recursive bind onto itself makes an unlocked copy.
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| "re-binding the root".into())?;
    inner_mounts(req, root)?;

    std::env::set_current_dir(root).ctx(|| "chdir root".into())?;
    nix::unistd::pivot_root(".", ".").ctx(|| "pivot_root".into())?;
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "detaching the old root".into())?;
    std::env::set_current_dir("/").ctx(|| "chdir /".into())?;

    sys::loopback_up().ctx(|| "bringing lo up".into())?;
    sys::limit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        req.limits.nofile,
    )
    .ctx(|| "RLIMIT_NOFILE".into())?;

    // Descriptors: 0-2 /dev/null, 3 the guest socket, 4 the error pipe (close-on-exec), no others.
    // Both are first moved above any fd number they could collide with.
    let high = |fd: i32| {
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)).ctx(|| "dup fd".into())
    };
    let (listen_hi, err_hi) = (high(listener.as_raw_fd())?, high(err.as_raw_fd())?);
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
    // SAFETY: ERR_FD and GUEST_FD were just made by dup2; nothing else owns them.
    let (err4, guest_fd) =
        unsafe { (OwnedFd::from_raw_fd(ERR_FD), OwnedFd::from_raw_fd(GUEST_FD)) };
    nix::fcntl::fcntl(
        err4.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .ctx(|| "cloexec error pipe".into())?;
    sys::keep_on_exec(&guest_fd).ctx(|| "keeping the guest socket".into())?;
    // Everything else goes; the Rust owners of those fds are never used again (exec or _exit follow).
    std::mem::forget(null);
    std::mem::forget(listener);
    sys::close_from(ERR_FD + 1).ctx(|| "closing inherited fds".into())?;
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
    let guest = CString::new("/run/burrow/guest").unwrap_or_default();
    if let Err(e) = caps::restrict_to(caps::SANDBOX) {
        return report(format!("dropping capabilities: {e}"));
    }
    if let Err(e) = caps::no_new_privs() {
        return report(format!("no_new_privs: {e}"));
    }
    if let Err(e) = seccomp::install() {
        return report(format!("installing seccomp: {e}"));
    }
    let e = nix::unistd::execve(&guest, &[&guest], &env).unwrap_err();
    report(format!("exec /run/burrow/guest: {e}"))
}

/// Mounts that must be made by the sandbox's own namespaces: a proc for its pid namespace, a sysfs
/// for its network namespace, a minimal /dev, a fresh /tmp; then the masks over /proc.
fn inner_mounts(req: &InitRequest, root: &Path) -> Result<()> {
    let m = |src: &str, dst: &Path, fstype: &str, flags: MsFlags, data: Option<&str>| {
        mount(Some(src), dst, Some(fstype), flags, data)
            .ctx(|| format!("mounting {fstype} on {}", dst.display()))
    };
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    m("proc", &root.join("proc"), "proc", hardened, None)?;
    m(
        "sysfs",
        &root.join("sys"),
        "sysfs",
        hardened | MsFlags::MS_RDONLY,
        None,
    )?;

    let dev = root.join("dev");
    m(
        "tmpfs",
        &dev,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=1m"),
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let p = dev.join(name);
        std::fs::write(&p, b"").ctx(|| format!("creating /dev/{name}"))?;
        bind(&Path::new("/dev").join(name), &p, false)?;
    }
    for d in ["pts", "shm", "mqueue"] {
        std::fs::create_dir(dev.join(d)).ctx(|| format!("creating /dev/{d}"))?;
    }
    m(
        "devpts",
        &dev.join("pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620,gid=5"),
    )?;
    let shm_size = format!("mode=1777,size={}m", (req.limits.memory_mib / 4).max(16));
    m(
        "tmpfs",
        &dev.join("shm"),
        "tmpfs",
        hardened,
        Some(shm_size.as_str()),
    )?;
    m("mqueue", &dev.join("mqueue"), "mqueue", hardened, None)?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link)).ctx(|| format!("/dev/{link}"))?;
    }
    let tmp_size = format!("mode=1777,size={}m", (req.limits.memory_mib / 2).max(16));
    m(
        "tmpfs",
        &root.join("tmp"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(tmp_size.as_str()),
    )?;

    // /proc: hide what leaks host information, freeze what could change host settings (K8).
    let procdir = root.join("proc");
    for name in [
        "kcore",
        "keys",
        "timer_list",
        "sched_debug",
        "latency_stats",
        "kallsyms",
        "kmsg",
    ] {
        let p = procdir.join(name);
        if p.exists() {
            bind(&dev.join("null"), &p, false)?;
        }
    }
    for name in ["acpi", "scsi", "asound"] {
        let p = procdir.join(name);
        if p.is_dir() {
            m(
                "tmpfs",
                &p,
                "tmpfs",
                hardened | MsFlags::MS_RDONLY,
                Some("size=0"),
            )?;
        }
    }
    for name in ["sys", "sysrq-trigger", "irq", "bus", "fs"] {
        let p = procdir.join(name);
        if p.exists() {
            mount(
                Some(&p),
                &p,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .ctx(|| format!("bind /proc/{name}"))?;
            mount(
                None::<&str>,
                &p,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | hardened,
                None::<&str>,
            )
            .ctx(|| format!("read-only /proc/{name}"))?;
        }
    }
    Ok(())
}

//! The namespace backend: each sandbox is a set of fresh Linux namespaces, cgroups and an overlay
//! root on a size-limited ext4 disk, with burrow's guest agent as PID 1 (docs/architecture.md).
//!
//! `create` re-executes the `burrow` binary as `burrow __init` (see [`init`]) and waits for the
//! guest to answer; nothing of a sandbox is mounted on the host, and its PID 1 is not our child, so
//! a server that dies or restarts leaves sandboxes running. Everything needed to find a sandbox
//! again is in [`RuntimeInfo`] and in its directory `<data_dir>/sandboxes/<id>/`.
//!
//! Host-side operations here touch only host paths (the sandbox's directory, its cgroups, the
//! loop device list): never a path under a sandbox's root, which the sandbox owns (see [`init`]
//! and `burrow_linux::fs` for how `__init` reaches into it).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burrow_linux::cgroup::{CgroupLimits, Cgroups};
use burrow_linux::{loopdev, proc};
use burrow_types::Limits;

use crate::backend::{Backend, Liveness, NodeError, RuntimeInfo, SandboxSpec};

mod image;
pub mod init;

/// The `system` image's root under a data directory (also what `burrow bench` gives its peers).
pub use image::ensure_system_image;
pub(crate) use image::USER_UID;

/// First host uid of the sandbox ranges: far above ordinary users and the usual subuid ranges.
const UID_BASE: u32 = 0x1000_0000;
/// How many sandboxes get distinct uid ranges (slots `0..UID_SLOTS`).
pub use burrow_types::limits::UID_SLOTS;
/// How long a new sandbox's guest may take to answer its first ping.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long destroy waits for a sandbox's processes to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The part of a sandbox's limits that lives in its cgroups.
pub(crate) fn cgroup_limits(l: &Limits) -> CgroupLimits {
    CgroupLimits {
        cpu_millis: l.cpu_millis,
        memory_bytes: l.memory_mib * 1024 * 1024,
        pids: l.pids,
    }
}

/// Host uid (and gid) that root inside sandbox slot `slot` runs as; `None` past the last slot,
/// whose range would run into `u32::MAX` (no uid) or wrap around to host uids below the base.
pub fn uid_base(slot: u32) -> Option<u32> {
    if slot >= UID_SLOTS {
        return None;
    }
    let base = slot.checked_mul(init::ID_RANGE)?.checked_add(UID_BASE)?;
    // The whole range must fit below u32::MAX.
    base.checked_add(init::ID_RANGE)?;
    Some(base)
}

#[derive(Debug, Clone)]
pub struct NamespaceConfig {
    pub data_dir: PathBuf,
    /// The `burrow` binary, re-executed as `burrow __init`.
    pub init_exe: PathBuf,
    /// The guest agent. The backend keeps one sealed in-memory copy of it, which every
    /// sandbox's PID 1 executes (no host path of it is visible inside).
    pub guest_exe: PathBuf,
}

impl NamespaceConfig {
    /// Defaults: this executable for `__init`, and `burrow-guest` next to it.
    pub fn new(data_dir: PathBuf) -> NamespaceConfig {
        let init_exe = std::env::current_exe()
            .and_then(std::fs::canonicalize)
            .unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        let guest_exe = init_exe.with_file_name("burrow-guest");
        NamespaceConfig {
            data_dir,
            init_exe,
            guest_exe,
        }
    }
}

pub struct NamespaceBackend {
    cfg: NamespaceConfig,
    image_root: PathBuf,
    cgroups: Cgroups,
    /// The sealed copy of the guest agent; `__init` opens it through `/proc/<our pid>/fd`.
    guest: File,
}

fn host_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Host { what, source }
}

impl NamespaceBackend {
    /// Prepares the host: checks the binaries, creates burrow's parent cgroups and the `system`
    /// image. Cheap when they already exist.
    pub fn new(cfg: NamespaceConfig) -> Result<NamespaceBackend, NodeError> {
        for exe in [&cfg.init_exe, &cfg.guest_exe] {
            if !exe.is_file() {
                return Err(NodeError::Setup(format!(
                    "{} is missing (build every binary: cargo build --workspace)",
                    exe.display()
                )));
            }
        }
        std::fs::create_dir_all(cfg.data_dir.join("sandboxes"))
            .map_err(host_err("creating the sandboxes directory"))?;
        let cgroups = Cgroups::host();
        cgroups
            .prepare()
            .map_err(host_err("creating burrow's cgroups"))?;
        let image_root = image::ensure_system_image(&cfg.data_dir)
            .map_err(host_err("building the system image"))?;
        let guest = burrow_linux::fs::sealed_copy(&cfg.guest_exe, "burrow-guest").map_err(
            host_err(format!("copying {} into memory", cfg.guest_exe.display())),
        )?;
        Ok(NamespaceBackend {
            cfg,
            image_root,
            cgroups,
            guest,
        })
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("sandboxes").join(id)
    }

    fn disk_of(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("disk.img")
    }

    /// Runs `__init` and waits for the guest to answer. On failure everything it started is
    /// stopped; the directory and disk are removed only when `fresh` (this call made them), so a
    /// failed cold start never costs a sandbox its files.
    fn boot(&self, spec: &SandboxSpec, fresh: bool) -> Result<RuntimeInfo, NodeError> {
        let started = Instant::now();
        let undo = |info: Option<&RuntimeInfo>| {
            let r = if fresh {
                self.destroy(&spec.id, info)
            } else {
                self.stop(&spec.id, info)
            };
            if let Err(e) = r {
                tracing::warn!(sandbox_id = %spec.id, error = %e, "cleaning up a failed start");
            }
        };
        let reply = match self.run_init(spec) {
            Ok(r) => r,
            // Refused before anything was made: the disk is someone else's now (their
            // processes, their loop device), and waiting for it to detach would wait for them.
            Err(e @ NodeError::DiskBusy(_)) => return Err(e),
            Err(e) => {
                undo(None);
                return Err(e);
            }
        };
        let info = RuntimeInfo {
            pid: reply.pid,
            pid_start: reply.pid_start,
            guest_socket: self.sandbox_dir(&spec.id).join("guest.sock"),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match ping(&info.guest_socket) {
                Ok(()) => break,
                Err(e)
                    if Instant::now() >= deadline
                        || self.probe(&spec.id, &info) == Liveness::Gone =>
                {
                    undo(Some(&info));
                    return Err(NodeError::Setup(format!(
                        "the guest agent did not answer: {e}"
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        tracing::debug!(sandbox_id = %spec.id, ms = started.elapsed().as_millis() as u64, "sandbox built");
        Ok(info)
    }

    /// Loop devices that have this sandbox's disk attached (by the image's device and inode;
    /// by path when the image is gone).
    fn disk_devices(&self, id: &str) -> Vec<String> {
        match loopdev::FileId::of(&self.disk_of(id)) {
            Ok(file) => loopdev::devices_backing(file),
            Err(_) => loopdev::devices_backed_by(&format!("/sandboxes/{id}/")),
        }
    }

    fn run_init(&self, spec: &SandboxSpec) -> Result<init::InitReply, NodeError> {
        let base = uid_base(spec.uid_slot).ok_or_else(|| {
            NodeError::Setup(format!(
                "uid slot {} is past the last of {UID_SLOTS}",
                spec.uid_slot
            ))
        })?;
        let req = init::InitRequest {
            id: spec.id.clone(),
            hostname: spec.hostname.clone(),
            uid_base: base,
            limits: spec.limits.clone(),
            env: spec.env.clone(),
            sandbox_dir: self.sandbox_dir(&spec.id),
            image_root: self.image_root.clone(),
            guest_fd: PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                self.guest.as_raw_fd()
            )),
            net: spec.net.clone(),
        };
        let body = serde_json::to_vec(&req)
            .map_err(|e| NodeError::Setup(format!("encoding the init request: {e}")))?;
        let out = run_helper(&self.cfg.init_exe, "__init", &body, &spec.id)?;
        serde_json::from_slice(&out).map_err(|e| {
            NodeError::Setup(format!(
                "bad reply from __init ({e}): {}",
                String::from_utf8_lossy(&out)
            ))
        })
    }
}

/// Runs a setup helper (`burrow __init`, `burrow __gvisor`) with `body` on its stdin and returns
/// its stdout. Its error text becomes the error: a full data filesystem as `NoSpace`, a disk
/// attached elsewhere as `DiskBusy` (the helpers report io errors as text).
pub(crate) fn run_helper(
    exe: &Path,
    arg: &str,
    body: &[u8],
    id: &str,
) -> Result<Vec<u8>, NodeError> {
    let mut child = Command::new(exe)
        .arg(arg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .spawn()
        .map_err(host_err(format!("starting {} {arg}", exe.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(body)
            .map_err(host_err(format!("writing the {arg} request")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(host_err(format!("waiting for {arg}")))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.contains(&std::io::Error::from_raw_os_error(libc::ENOSPC).to_string()) {
            return Err(NodeError::NoSpace(msg));
        }
        if msg.contains("is already attached to") {
            return Err(NodeError::DiskBusy(id.to_string()));
        }
        return Err(NodeError::Setup(msg));
    }
    Ok(out.stdout)
}

/// Device number (major, minor) of the loop device holding sandbox `id`'s disk, read from the
/// host's `/sys/block`.
pub(crate) fn disk_device(id: &str) -> Option<(u32, u32)> {
    let name = loopdev::devices_backed_by(&format!("/sandboxes/{id}/"))
        .into_iter()
        .next()?;
    let dev = std::fs::read_to_string(format!("/sys/block/{name}/dev")).ok()?;
    let (major, minor) = dev.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// One blocking ping over the guest protocol: the guest is up when it answers.
pub(crate) fn ping(socket: &Path) -> std::io::Result<()> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let body = br#"{"op":"ping"}"#;
    let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    frame.push(burrow_proto::FrameKind::Control as u8);
    frame.extend_from_slice(body);
    s.write_all(&frame)?;
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    if head[4] != burrow_proto::FrameKind::Control as u8 {
        return Err(std::io::Error::other("unexpected frame from the guest"));
    }
    Ok(())
}

impl Backend for NamespaceBackend {
    fn name(&self) -> &'static str {
        "namespace"
    }

    fn create(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, NodeError> {
        // A new sandbox: whatever a failure leaves is ours to remove. An id whose disk already
        // exists is not new, and its disk is not ours to remove.
        let fresh = !self.disk_of(&spec.id).exists();
        self.boot(spec, fresh)
    }

    fn start(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, NodeError> {
        // Without this check `__init` would make an empty disk and the sandbox would come back
        // without its files, as if nothing had happened.
        let disk = self.disk_of(&spec.id);
        if !disk.is_file() {
            return Err(NodeError::DiskMissing(disk));
        }
        self.boot(spec, false)
    }

    fn destroy(&self, id: &str, info: Option<&RuntimeInfo>) -> Result<(), NodeError> {
        self.stop(id, info)?;
        let dir = self.sandbox_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(NodeError::Host {
                    what: format!("removing {}", dir.display()),
                    source: e,
                })
            }
            _ => {}
        }
        Ok(())
    }

    fn stop(&self, id: &str, info: Option<&RuntimeInfo>) -> Result<(), NodeError> {
        // PID 1's death takes the whole pid namespace with it.
        if let Some(info) = info {
            if self.probe(id, info) == Liveness::Alive {
                proc::kill9(info.pid).map_err(host_err("killing the sandbox"))?;
            }
        }
        // Anything left (a crash mid-create, before PID 1 existed) is found through the cgroups.
        self.cgroups
            .kill_all(id, KILL_TIMEOUT)
            .map_err(host_err("killing the sandbox's processes"))?;
        self.cgroups
            .remove(id)
            .map_err(host_err("removing the sandbox's cgroups"))?;
        let _ = std::fs::remove_file(self.sandbox_dir(id).join("guest.sock"));
        // The loop device detaches itself once the disk's last mount namespace is gone. Wait for
        // it: "stopped" must mean the disk is no longer mounted anywhere, or a cold start could
        // mount the same ext4 image twice.
        let deadline = Instant::now() + KILL_TIMEOUT * 3;
        while !self.disk_devices(id).is_empty() {
            if Instant::now() >= deadline {
                return Err(NodeError::DiskBusy(id.to_string()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn probe(&self, _id: &str, info: &RuntimeInfo) -> Liveness {
        match proc::start_time(info.pid) {
            Some(t) if t == info.pid_start && !proc::is_dead(info.pid) => Liveness::Alive,
            _ => Liveness::Gone,
        }
    }

    fn pause(&self, id: &str) -> Result<(), NodeError> {
        self.cgroups
            .freeze(id, Duration::from_secs(5))
            .map_err(host_err("freezing the sandbox"))
    }

    fn frozen(&self, id: &str) -> Option<bool> {
        self.cgroups.frozen(id)
    }

    fn active(&self, id: &str) -> bool {
        !self.cgroups.procs(id).is_empty()
    }

    fn disks_in_use(&self) -> Vec<String> {
        let attached: std::collections::HashSet<loopdev::FileId> =
            loopdev::attached().into_iter().map(|(_, f)| f).collect();
        if attached.is_empty() {
            return Vec::new();
        }
        self.host_sandboxes()
            .unwrap_or_default()
            .into_iter()
            .filter(|id| {
                loopdev::FileId::of(&self.disk_of(id)).is_ok_and(|f| attached.contains(&f))
            })
            .collect()
    }

    fn resume(&self, id: &str) -> Result<(), NodeError> {
        self.cgroups
            .set_frozen(id, false)
            .map_err(host_err("thawing the sandbox"))
    }

    fn set_limits(&self, id: &str, limits: &Limits) -> Result<(), NodeError> {
        self.cgroups
            .set_limits(id, cgroup_limits(limits))
            .map_err(host_err("rewriting the sandbox's cgroup limits"))?;
        let dev = disk_device(id)
            .ok_or_else(|| NodeError::Setup(format!("the disk of sandbox {id} is not attached")))?;
        self.cgroups
            .set_io(id, dev, init::io_limits(limits))
            .map_err(host_err("rewriting the sandbox's disk throttle"))
    }

    fn set_hostname(&self, id: &str, info: &RuntimeInfo, hostname: &str) -> Result<(), NodeError> {
        if self.probe(id, info) == Liveness::Gone {
            return Err(NodeError::Setup(format!("sandbox {id} is not running")));
        }
        burrow_linux::sys::set_hostname_of(info.pid, hostname)
            .map_err(host_err("setting the sandbox's hostname"))
    }

    fn memory_usage(&self, id: &str) -> Option<u64> {
        self.cgroups.memory_usage(id)
    }

    fn cpu_usage_ns(&self, id: &str) -> Option<u64> {
        self.cgroups.cpu_usage_ns(id)
    }

    /// Sandboxes are known by their directories under this node's data directory: `__init` makes the
    /// directory before anything else and `destroy` removes it last. (Cgroups are shared by every
    /// burrow on the host, so they cannot say which node a sandbox belongs to.)
    fn host_sandboxes(&self) -> Result<Vec<String>, NodeError> {
        let mut ids = std::collections::BTreeSet::new();
        let dir = self.cfg.data_dir.join("sandboxes");
        for entry in
            std::fs::read_dir(&dir).map_err(host_err(format!("listing {}", dir.display())))?
        {
            let entry = entry.map_err(host_err("listing sandboxes"))?;
            if let Ok(name) = entry.file_name().into_string() {
                ids.insert(name);
            }
        }
        Ok(ids.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_slots_never_wrap_below_the_base_or_reach_the_invalid_uid() {
        assert_eq!(uid_base(0), Some(UID_BASE));
        assert_eq!(uid_base(1), Some(UID_BASE + init::ID_RANGE));
        let top = uid_base(UID_SLOTS - 1).unwrap();
        assert!(top > UID_BASE);
        // The top range ends below u32::MAX (no uid); one more range would include it.
        let end = |base: u32| u64::from(base) + u64::from(init::ID_RANGE) - 1;
        assert!(end(top) < u64::from(u32::MAX));
        assert!(end(top) + u64::from(init::ID_RANGE) >= u64::from(u32::MAX));
        for slot in [
            UID_SLOTS,
            UID_SLOTS + 1,
            61440,
            65535,
            u32::MAX / init::ID_RANGE,
            u32::MAX,
        ] {
            assert_eq!(uid_base(slot), None, "slot {slot}");
        }
        assert_eq!(UID_SLOTS, (u32::MAX - UID_BASE) / init::ID_RANGE);
    }
}

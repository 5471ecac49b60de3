//! The namespace backend: each sandbox is a set of fresh Linux namespaces, cgroups and an overlay
//! root on a size-limited volume (`burrow_storage`: a btrfs subvolume or an ext4 image, see
//! [`crate::storage`]), with burrow's guest agent as PID 1 (docs/architecture.md).
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
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_linux::cgroup::{CgroupLimits, Cgroups};
use burrow_linux::{loopdev, proc};
use burrow_storage::{Kind, Storage, StorageError, Volume, VolumeSource};
use burrow_types::Limits;

use crate::backend::{Backend, Liveness, NodeError, RuntimeInfo, SandboxSpec, VolumeSpace};
use crate::storage::{node_err, StorageConfig};
use crate::timing;

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
    /// The guest agent, or `None` for the static one this binary carries
    /// ([`crate::STATIC_GUEST`]). The backend keeps one sealed in-memory copy of it, which every
    /// sandbox's PID 1 executes (no host path of it is visible inside).
    pub guest_exe: Option<PathBuf>,
    /// Which storage sandboxes' volumes live on.
    pub storage: StorageConfig,
}

impl NamespaceConfig {
    /// Defaults: this executable for `__init`, and the static guest it carries.
    pub fn new(data_dir: PathBuf) -> NamespaceConfig {
        let init_exe = std::env::current_exe()
            .and_then(std::fs::canonicalize)
            .unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        NamespaceConfig {
            data_dir,
            init_exe,
            guest_exe: None,
            storage: StorageConfig::default(),
        }
    }
}

pub struct NamespaceBackend {
    cfg: NamespaceConfig,
    image_root: PathBuf,
    cgroups: Cgroups,
    /// The sealed copy of the guest agent; `__init` opens it through `/proc/<our pid>/fd`.
    guest: File,
    /// Where sandboxes' volumes live.
    storage: Arc<dyn Storage>,
}

fn host_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Host { what, source }
}

impl NamespaceBackend {
    /// Prepares the host: checks the binaries, creates burrow's parent cgroups and the `system`
    /// image. Cheap when they already exist.
    pub fn new(cfg: NamespaceConfig) -> Result<NamespaceBackend, NodeError> {
        for exe in std::iter::once(&cfg.init_exe).chain(&cfg.guest_exe) {
            if !exe.is_file() {
                return Err(NodeError::Setup(format!(
                    "{} is missing (build every binary: cargo build --workspace)",
                    exe.display()
                )));
            }
        }
        std::fs::create_dir_all(cfg.data_dir.join("sandboxes"))
            .map_err(host_err("creating the sandboxes directory"))?;
        let storage = crate::storage::open(&cfg.data_dir, &cfg.storage)?;
        let cgroups = Cgroups::host();
        cgroups
            .prepare()
            .map_err(host_err("creating burrow's cgroups"))?;
        let image_root = image::ensure_system_image(&cfg.data_dir)
            .map_err(host_err("building the system image"))?;
        let guest = match &cfg.guest_exe {
            Some(exe) => burrow_linux::fs::sealed_copy(exe, "burrow-guest")
                .map_err(host_err(format!("copying {} into memory", exe.display())))?,
            None => burrow_linux::fs::sealed_bytes(crate::STATIC_GUEST, "burrow-guest")
                .map_err(host_err("copying the guest agent into memory"))?,
        };
        Ok(NamespaceBackend {
            cfg,
            image_root,
            cgroups,
            guest,
            storage,
        })
    }

    /// The storage sandboxes' volumes live on.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn is_ext4(&self) -> bool {
        self.storage.kind() == Kind::Ext4
    }

    /// Sandbox `id`'s existing volume; `DiskMissing` when it has none.
    fn volume_of(&self, id: &str) -> Result<Volume, NodeError> {
        match self.storage.open(id) {
            Ok(v) => Ok(v),
            Err(StorageError::VolumeNotFound(_)) => {
                Err(NodeError::DiskMissing(match self.storage.kind() {
                    Kind::Ext4 => self.disk_of(id),
                    Kind::Btrfs => self.cfg.data_dir.join("pool").join("volumes").join(id),
                }))
            }
            Err(e) => Err(node_err(id, e)),
        }
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("sandboxes").join(id)
    }

    fn disk_of(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("disk.img")
    }

    /// Runs `__init` on `volume` and waits for the guest to answer. On failure everything it
    /// started is stopped; the directory and volume are removed only when `fresh` (this call made
    /// them), so a failed cold start never costs a sandbox its files.
    fn boot(
        &self,
        spec: &SandboxSpec,
        volume: &Volume,
        fresh: bool,
    ) -> Result<RuntimeInfo, NodeError> {
        let started = Instant::now();
        let cpu_before = timing::thread_cpu();
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
        let reply = match self.run_init(spec, volume) {
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
        let waiting = Instant::now();
        let deadline = waiting + READY_TIMEOUT;
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
        timing::record("guest-start", waiting.elapsed());
        if let Some(ns) = self.cgroups.cpu_usage_ns(&spec.id) {
            timing::record("cpu-sandbox-cgroup", Duration::from_nanos(ns));
        }
        timing::record(
            "cpu-server-thread",
            timing::thread_cpu().saturating_sub(cpu_before),
        );
        tracing::debug!(sandbox_id = %spec.id, ms = started.elapsed().as_millis() as u64, "sandbox built");
        Ok(info)
    }

    /// Loop devices that have this sandbox's disk attached (by the image's device and inode;
    /// by path when the image is gone). None on btrfs: a volume is a subvolume, no device of
    /// its own, and two mounts of it cannot corrupt it.
    fn disk_devices(&self, id: &str) -> Vec<String> {
        if !self.is_ext4() {
            return Vec::new();
        }
        match loopdev::FileId::of(&self.disk_of(id)) {
            Ok(file) => loopdev::devices_backing(file),
            Err(_) => loopdev::devices_backed_by(&format!("/sandboxes/{id}/")),
        }
    }

    fn run_init(&self, spec: &SandboxSpec, volume: &Volume) -> Result<init::InitReply, NodeError> {
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
            volume: volume.clone(),
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
        let mut child = Command::new(&self.cfg.init_exe)
            .arg("__init")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .spawn()
            .map_err(host_err(format!(
                "starting {} __init",
                self.cfg.init_exe.display()
            )))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&body)
                .map_err(host_err("writing the init request"))?;
        }
        let spawned = Instant::now();
        let out = wait_with_rusage(child).map_err(host_err("waiting for __init"))?;
        let took = spawned.elapsed();
        if !out.success {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            // `__init` reports io errors as text; a full data filesystem must still read as one.
            let full = [libc::ENOSPC, libc::EDQUOT]
                .map(|e| std::io::Error::from_raw_os_error(e).to_string());
            if full.iter().any(|f| msg.contains(f.as_str()))
                || msg.contains("no space left for")
                || msg.contains("size limit is reached")
            {
                return Err(NodeError::NoSpace(msg));
            }
            if msg.contains("is already attached to") || msg.contains("is still attached to") {
                return Err(NodeError::DiskBusy(spec.id.clone()));
            }
            return Err(NodeError::Setup(msg));
        }
        let reply: init::InitReply = serde_json::from_slice(&out.stdout).map_err(|e| {
            NodeError::Setup(format!(
                "bad reply from __init ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            ))
        })?;
        // `__init`'s own stages, and what they leave out: starting the process (exec, the
        // dynamic loader, reading the request) and exiting.
        let mut inside = Duration::ZERO;
        for (name, us) in &reply.stages {
            let d = Duration::from_micros(*us);
            inside += d;
            timing::record(name, d);
        }
        timing::record("init-process", took.saturating_sub(inside));
        timing::record(
            "cpu-init-outside",
            Duration::from_micros(reply.cpu_outside_us),
        );
        tracing::debug!(target: "burrow::timing", stage = "cpu-init-all", us = out.cpu.as_micros() as u64);
        Ok(reply)
    }
}

/// What a finished `__init` said and used.
struct Finished {
    success: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// CPU time of the process and every child it waited for.
    cpu: Duration,
}

/// Waits for `child` like `wait_with_output`, with its resource usage (`wait4`): the server runs
/// many creates at once, so `RUSAGE_CHILDREN` could not tell one's from another's.
fn wait_with_rusage(mut child: std::process::Child) -> std::io::Result<Finished> {
    let err_reader = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = e.read_to_end(&mut buf);
            buf
        })
    });
    let mut stdout = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_end(&mut stdout)?;
    }
    let stderr = err_reader.and_then(|t| t.join().ok()).unwrap_or_default();
    let pid = child.id() as libc::pid_t;
    let (status, ru) = loop {
        let mut status = 0;
        // SAFETY: wait4 writes into the status and the zeroed rusage we own; `pid` is our own
        // child, not yet reaped (std's Child is never waited for after this).
        let (r, ru) = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            let r = libc::wait4(pid, &mut status, 0, &mut ru);
            (r, ru)
        };
        if r == pid {
            break (status, ru);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    Ok(Finished {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stdout,
        stderr,
        cpu: timing::cpu_of(&ru),
    })
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
        // A new sandbox: whatever a failure leaves is ours to remove. An id whose volume already
        // exists is not new, and its volume is not ours to remove.
        let made = timing::stage("storage-create");
        let limit = spec.limits.disk_mib.saturating_mul(1024 * 1024);
        let (volume, fresh) = match self.storage.create(&spec.id, limit) {
            Ok(v) => (v, true),
            Err(StorageError::VolumeExists(_)) => (self.volume_of(&spec.id)?, false),
            Err(e) => return Err(node_err(&spec.id, e)),
        };
        drop(made);
        self.boot(spec, &volume, fresh)
    }

    fn start(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, NodeError> {
        // Never a new volume: the sandbox would come back without its files, as if nothing had
        // happened.
        let volume = self.volume_of(&spec.id)?;
        self.boot(spec, &volume, false)
    }

    fn destroy(&self, id: &str, info: Option<&RuntimeInfo>) -> Result<(), NodeError> {
        self.stop(id, info)?;
        // The volume first, the directory last: a directory is how a sandbox is found again.
        self.storage.destroy(id).map_err(|e| node_err(id, e))?;
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
        // An ext4 disk's loop device detaches itself once the disk's last mount namespace is
        // gone. Wait for it: "stopped" must mean the disk is no longer mounted anywhere, or a
        // cold start could mount the same ext4 image twice. (A btrfs volume has no device.)
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
        if !self.is_ext4() {
            return Vec::new();
        }
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
        let dev = match self.storage.kind() {
            Kind::Ext4 => disk_device(id).ok_or_else(|| {
                NodeError::Setup(format!("the disk of sandbox {id} is not attached"))
            })?,
            Kind::Btrfs => match self.volume_of(id)?.source {
                VolumeSource::Btrfs {
                    device: Some(d), ..
                } => d,
                // A pool without a block device of its own has nothing to throttle.
                _ => return Ok(()),
            },
        };
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
        // A volume whose create was cut short before `__init` made the directory.
        let inventory = self.storage.list().map_err(|e| node_err("", e))?;
        ids.extend(inventory.volumes);
        Ok(ids.into_iter().collect())
    }

    fn volume_space(&self) -> Result<Option<VolumeSpace>, NodeError> {
        if self.is_ext4() {
            return Ok(None);
        }
        let s = self.storage.space().map_err(|e| node_err("", e))?;
        Ok(Some(VolumeSpace {
            writable_bytes: s.writable_bytes(),
            total_bytes: s.total_bytes,
            path: s.path,
        }))
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

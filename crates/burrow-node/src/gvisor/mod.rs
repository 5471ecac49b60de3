//! The gVisor backend: each sandbox runs under gVisor's `runsc`, so its system calls are served
//! by a user-space kernel of its own (the Sentry), not by the host's (docs/isolation.md).
//!
//! What is the same as a namespace sandbox: the directory `<data_dir>/sandboxes/<id>/` with its
//! ext4 disk, the overlay of the `system` image, the host's `/usr` read-only, `/workspace` on the
//! disk, the cgroups `burrow/<id>` (CPU, memory, pids, disk throttle), the veth and firewall, and
//! burrow's guest agent as PID 1 serving the same protocol. What differs: `runsc` builds the
//! sandbox from an OCI bundle this module writes (`bundle/config.json`); the guest binds its own
//! socket at `/run/burrow/sock/guest.sock`, a directory bound from the host's `sock/`
//! (`--host-uds=create`); and a stop first tries a `runsc checkpoint` into `checkpoint/`, which the
//! next start restores (processes and memory come back) instead of starting fresh.
//!
//! A file `gvisor` in the sandbox's directory marks it as this backend's (written before anything
//! else, so even a half-built one is found); it holds the platform.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burrow_linux::cgroup::{CgroupLimits, Cgroups};
use burrow_linux::{loopdev, proc};
use burrow_types::{Isolation, Limits};
use serde_json::json;

use crate::backend::{Backend, Liveness, NodeError, RuntimeInfo, SandboxSpec};

pub mod boot;

/// How long a new sandbox's guest may take to answer its first ping.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stop waits for the sandbox's processes to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Host tasks the Sentry, the gofer and the platform need besides the sandbox's own processes
/// (Go runtime threads; the `ptrace` platform's stubs). The sandbox's pids limit is its plan's
/// plus this (docs/isolation.md, "Limits").
pub const PIDS_HEADROOM: u32 = 256;
/// Memory the Sentry and the gofer need besides the sandbox's own (page tables, caches, Go heap).
pub const MEMORY_HEADROOM_MIB: u64 = 128;
/// The guest's socket inside the sandbox (its directory is the host's `sock/`).
const GUEST_SOCKET: &str = "/run/burrow/sock/guest.sock";
/// Where the guest agent's binary is bound inside the sandbox.
const GUEST_PATH: &str = "/run/burrow/guest";
/// Where the `statx` shim is bound inside the sandbox (named by its `/etc/ld.so.preload`).
pub(crate) const SHIM_PATH: &str = "/run/burrow/statx.so";
/// The shim: runsc 2022 refuses `AT_NO_AUTOMOUNT` and the `AT_STATX_*` sync hints in `statx` and
/// `fstatat` with EINVAL, and coreutils passes them (`ls`, `stat`, `du`, `find` fail). Preloaded
/// into every dynamically linked program of a gVisor sandbox, it drops those flags, which mean
/// nothing there (gVisor has no automounts; its files are always in sync).
const STATX_SHIM_C: &str = r#"#include <sys/syscall.h>
long syscall(long number, ...);
#define KEEP (0x100 | 0x1000) /* AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH */
int statx(int dirfd, const char *path, int flags, unsigned int mask, void *buf) {
  return syscall(SYS_statx, dirfd, path, flags & KEEP, mask, buf);
}
int fstatat(int dirfd, const char *path, void *buf, int flags) {
  return syscall(SYS_newfstatat, dirfd, path, buf, flags & KEEP);
}
int fstatat64(int dirfd, const char *path, void *buf, int flags) {
  return syscall(SYS_newfstatat, dirfd, path, buf, flags & KEEP);
}
"#;
/// The marker file of a gVisor sandbox's directory.
const MARKER: &str = "gvisor";

#[derive(Debug, Clone)]
pub struct GvisorConfig {
    pub data_dir: PathBuf,
    /// The `burrow` binary, re-executed as `burrow __gvisor`.
    pub init_exe: PathBuf,
    pub runsc: PathBuf,
    /// `ptrace` (works everywhere) or `kvm` (needs hardware virtualisation).
    pub platform: String,
}

impl GvisorConfig {
    /// Defaults: this executable, `runsc` from `/usr/bin` (Debian's
    /// package) or `BURROW_RUNSC`, and the platform from `BURROW_GVISOR_PLATFORM` (`ptrace`).
    pub fn new(data_dir: PathBuf) -> GvisorConfig {
        let ns = crate::namespace::NamespaceConfig::new(data_dir.clone());
        GvisorConfig {
            data_dir,
            init_exe: ns.init_exe,
            runsc: std::env::var_os("BURROW_RUNSC")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/usr/bin/runsc")),
            platform: std::env::var("BURROW_GVISOR_PLATFORM").unwrap_or_else(|_| "ptrace".into()),
        }
    }
}

pub struct GvisorBackend {
    cfg: GvisorConfig,
    image_root: PathBuf,
    cgroups: Cgroups,
    /// runsc's state directory (`--root`), one per node.
    state_root: PathBuf,
    /// The guest agent, copied once per node (read-only, bound into every sandbox).
    guest: PathBuf,
    /// The `statx` shim, when the host's C compiler could build it.
    statx_shim: Option<PathBuf>,
    /// Where sandboxes' volumes live: the namespace backend's storage, shared.
    storage: std::sync::Arc<dyn burrow_storage::Storage>,
}

fn host_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Host { what, source }
}

/// Why a node offers no gVisor tier, or `None` when it can: `runsc` must run, and the platform
/// must be one this host has (`kvm` needs `/dev/kvm`).
pub fn unavailable(cfg: &GvisorConfig) -> Option<String> {
    let out = match Command::new(&cfg.runsc).arg("--version").output() {
        Ok(o) => o,
        Err(e) => {
            return Some(format!(
                "{} cannot run ({e}); install Debian's runsc package (scripts/deps)",
                cfg.runsc.display()
            ))
        }
    };
    if !out.status.success() {
        return Some(format!("{} --version failed", cfg.runsc.display()));
    }
    match cfg.platform.as_str() {
        "ptrace" => None,
        "kvm" if Path::new("/dev/kvm").exists() => None,
        "kvm" => Some("the kvm platform needs /dev/kvm".into()),
        other => Some(format!("unknown gVisor platform {other:?} (ptrace or kvm)")),
    }
}

impl GvisorBackend {
    /// Prepares the host: checks runsc and the platform, the shared guest copy, the image and
    /// cgroups. Errors say why the node offers no gVisor tier.
    pub fn new(
        cfg: GvisorConfig,
        native: &crate::namespace::NamespaceBackend,
    ) -> Result<GvisorBackend, NodeError> {
        if let Some(why) = unavailable(&cfg) {
            return Err(NodeError::Setup(why));
        }
        if !cfg.init_exe.is_file() {
            return Err(NodeError::Setup(format!(
                "{} is missing (build every binary: cargo build --workspace)",
                cfg.init_exe.display()
            )));
        }
        let base = cfg.data_dir.join("gvisor");
        let state_root = base.join("runsc");
        std::fs::create_dir_all(&state_root).map_err(host_err("creating runsc's state dir"))?;
        std::fs::create_dir_all(cfg.data_dir.join("sandboxes"))
            .map_err(host_err("creating the sandboxes directory"))?;
        // A fresh copy per server start (a rebuilt guest replaces the old one); running sandboxes
        // keep the file they bound, which a rename does not change.
        let guest = base.join("burrow-guest");
        let tmp = base.join(".burrow-guest.new");
        std::fs::write(&tmp, crate::STATIC_GUEST).map_err(host_err("writing the guest agent"))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o555))
            .map_err(host_err("chmod the guest agent"))?;
        std::fs::rename(&tmp, &guest).map_err(host_err("installing the guest agent"))?;
        let cgroups = Cgroups::host();
        cgroups
            .prepare()
            .map_err(host_err("creating burrow's cgroups"))?;
        let image_root = crate::namespace::ensure_system_image(&cfg.data_dir)
            .map_err(host_err("building the system image"))?;
        let statx_shim = match build_shim(&base) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "no statx shim: ls and stat fail inside gVisor sandboxes");
                None
            }
        };
        Ok(GvisorBackend {
            cfg,
            image_root,
            cgroups,
            state_root,
            guest,
            statx_shim,
            storage: native.storage().clone(),
        })
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("sandboxes").join(id)
    }

    /// Whether sandbox `id` of the node with data directory `data_dir` is a gVisor one.
    pub fn owns(data_dir: &Path, id: &str) -> bool {
        data_dir.join("sandboxes").join(id).join(MARKER).exists()
    }

    /// Sandbox `id`'s existing volume; `DiskMissing` when it has none.
    fn volume_of(&self, id: &str) -> Result<burrow_storage::Volume, NodeError> {
        match self.storage.open(id) {
            Ok(v) => Ok(v),
            Err(burrow_storage::StorageError::VolumeNotFound(_)) => {
                Err(NodeError::DiskMissing(self.sandbox_dir(id)))
            }
            Err(e) => Err(crate::storage::node_err(id, e)),
        }
    }

    fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("checkpoint")
    }

    /// runsc with the global flags every subcommand of one container must repeat.
    fn runsc_args(&self, with_net: bool) -> Vec<String> {
        vec![
            format!("--root={}", self.state_root.display()),
            format!("--platform={}", self.cfg.platform),
            format!("--network={}", if with_net { "sandbox" } else { "none" }),
            // The guest binds its socket in a directory bound from the host.
            "--host-uds=create".into(),
            // burrow makes and joins the sandbox's cgroups itself (v1 and v2 alike).
            "--ignore-cgroups".into(),
        ]
    }

    /// Runs a runsc subcommand for sandbox `id` and returns its output.
    fn runsc(&self, with_net: bool, args: &[&str]) -> Result<std::process::Output, NodeError> {
        Command::new(&self.cfg.runsc)
            .args(self.runsc_args(with_net))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(host_err(format!("running {}", self.cfg.runsc.display())))
    }

    /// The OCI config of a sandbox: the overlay root, the guest as its init, the mounts a
    /// namespace sandbox has, its limits as gVisor sees them.
    fn config(&self, spec: &SandboxSpec) -> serde_json::Value {
        let dir = self.sandbox_dir(&spec.id);
        let mut env: Vec<String> = spec
            .env
            .iter()
            .filter(|(k, _)| !k.starts_with("BURROW_"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !spec.env.contains_key("PATH") {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        env.push(format!("HOSTNAME={}", spec.hostname));
        env.push(format!("BURROW_SANDBOX_ID={}", spec.id));
        // What a namespace sandbox keeps (docs/threat-model.md): no NET_RAW, no MKNOD.
        let caps = [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_FSETID",
            "CAP_FOWNER",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_NET_BIND_SERVICE",
            "CAP_SYS_CHROOT",
            "CAP_KILL",
            "CAP_AUDIT_WRITE",
            "CAP_SETFCAP",
            // The guest sets the hostname of a claimed warm sandbox inside gVisor's kernel.
            "CAP_SYS_ADMIN",
        ];
        let memory = spec.limits.memory_mib * 1024 * 1024;
        let mut namespaces = vec![
            json!({"type": "pid"}),
            json!({"type": "ipc"}),
            json!({"type": "uts"}),
            json!({"type": "mount"}),
        ];
        if spec.net.is_some() {
            namespaces.push(json!({"type": "network", "path": boot::NETNS_PLACEHOLDER}));
        }
        let shm = format!("size={}m", (spec.limits.memory_mib / 4).max(16));
        let tmp = format!("size={}m", (spec.limits.memory_mib / 2).max(16));
        let mut config = json!({
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": [GUEST_PATH, "--listen", GUEST_SOCKET],
                "env": env,
                "cwd": "/",
                "capabilities": {
                    "bounding": caps, "effective": caps, "permitted": caps,
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": spec.limits.nofile, "soft": spec.limits.nofile}],
            },
            "root": {"path": dir.join("root"), "readonly": false},
            "hostname": spec.hostname,
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "nodev", "noexec", "mode=1777", shm]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", tmp]},
                {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro", "nosuid", "nodev"]},
                {"destination": "/workspace", "type": "bind", "source": dir.join("disk/workspace"), "options": ["rbind", "nosuid", "nodev"]},
                {"destination": "/run/burrow", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755"]},
                {"destination": GUEST_PATH, "type": "bind", "source": self.guest, "options": ["bind", "ro", "nosuid", "nodev"]},
                {"destination": "/run/burrow/sock", "type": "bind", "source": dir.join("sock"), "options": ["bind", "nosuid", "nodev", "noexec"]},
            ],
            "linux": {
                "namespaces": namespaces,
                // gVisor sizes its own memory accounting from this (what `free` shows inside).
                "resources": {"memory": {"limit": memory}},
            },
        });
        if let (Some(shim), Some(mounts)) = (&self.statx_shim, config["mounts"].as_array_mut()) {
            mounts.push(json!({"destination": SHIM_PATH, "type": "bind", "source": shim, "options": ["bind", "ro", "nosuid", "nodev"]}));
        }
        config
    }

    /// The host side of a sandbox: cgroups, disk, root, bundle, network; then `runsc run` (or
    /// `restore` from `checkpoint/`) through `burrow __gvisor`.
    fn run_boot(
        &self,
        spec: &SandboxSpec,
        volume: &burrow_storage::Volume,
        restore: bool,
    ) -> Result<(), NodeError> {
        let with_net = spec.net.is_some();
        let mut args = self.runsc_args(with_net);
        let bundle = self.sandbox_dir(&spec.id).join("bundle");
        if restore {
            args.push("restore".into());
            args.push(format!(
                "--image-path={}",
                self.checkpoint_dir(&spec.id).display()
            ));
        } else {
            args.push("run".into());
        }
        args.extend([
            "--detach".into(),
            format!("--bundle={}", bundle.display()),
            spec.id.clone(),
        ]);
        let l = &spec.limits;
        let req = boot::BootRequest {
            id: spec.id.clone(),
            hostname: spec.hostname.clone(),
            limits: spec.limits.clone(),
            sandbox_dir: self.sandbox_dir(&spec.id),
            image_root: self.image_root.clone(),
            volume: volume.clone(),
            net: spec.net.clone(),
            runsc: self.cfg.runsc.clone(),
            args,
            config: self.config(spec),
            preload: self.statx_shim.is_some(),
            cgroup_limits: {
                let c = cgroup_limits(l);
                (c.cpu_millis, c.memory_bytes, c.pids)
            },
        };
        let body = serde_json::to_vec(&req)
            .map_err(|e| NodeError::Setup(format!("encoding the boot request: {e}")))?;
        run_helper(&self.cfg.init_exe, "__gvisor", &body, &spec.id)
    }

    /// Boots (or restores) and waits for the guest. On failure everything started is stopped;
    /// the directory and disk go only when `fresh`.
    fn boot(
        &self,
        spec: &SandboxSpec,
        volume: &burrow_storage::Volume,
        fresh: bool,
        restore: bool,
    ) -> Result<RuntimeInfo, NodeError> {
        let started = Instant::now();
        let log = self.sandbox_dir(&spec.id).join("runsc.log");
        // What runsc and the guest said (the guest's stderr is runsc's), for the error.
        let said = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            tail.into_iter().rev().collect::<Vec<_>>().join("; ")
        };
        let undo = |e: NodeError| {
            let e = match e {
                NodeError::Setup(m) => NodeError::Setup(format!("{m} (runsc said: {})", said())),
                other => other,
            };
            let r = if fresh {
                self.destroy(&spec.id, None)
            } else {
                self.halt(&spec.id, spec.net.is_some())
            };
            if let Err(e) = r {
                tracing::warn!(sandbox_id = %spec.id, error = %e, "cleaning up a failed gVisor start");
            }
            e
        };
        let dir = self.sandbox_dir(&spec.id);
        std::fs::create_dir_all(&dir).map_err(host_err(format!("creating {}", dir.display())))?;
        std::fs::write(dir.join(MARKER), format!("{}\n", self.cfg.platform))
            .map_err(host_err("marking the sandbox as gVisor's"))?;
        // A container of this id left by an earlier run (a crash, a checkpoint) must go first.
        let _ = self.runsc(spec.net.is_some(), &["delete", "--force", &spec.id]);
        match self.run_boot(spec, volume, restore) {
            Ok(()) => {}
            Err(e @ NodeError::DiskBusy(_)) => return Err(e),
            Err(e) => return Err(undo(e)),
        }
        let socket = dir.join("sock/guest.sock");
        // The guest closed its listener for the checkpoint; it listens again on SIGUSR2. Sent
        // again while it does not answer: a signal that reaches the restored kernel before the
        // guest runs again is not lost, but one runsc could not deliver would be.
        let wake = || self.runsc(spec.net.is_some(), &["kill", &spec.id, "USR2"]);
        if restore {
            let out = wake()?;
            if !out.status.success() {
                return Err(undo(NodeError::Setup(format!(
                    "waking the restored guest: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))));
            }
        }
        let pid = match self.sandbox_pid(&spec.id, spec.net.is_some()) {
            Ok(p) => p,
            Err(e) => return Err(undo(e)),
        };
        let Some(pid_start) = proc::start_time(pid) else {
            return Err(undo(NodeError::Setup(
                "the gVisor sandbox exited at once".into(),
            )));
        };
        let info = RuntimeInfo {
            pid,
            pid_start,
            guest_socket: socket,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut woken = Instant::now();
        loop {
            if restore && woken.elapsed() > Duration::from_millis(500) {
                let _ = wake();
                woken = Instant::now();
            }
            match crate::namespace::ping(&info.guest_socket) {
                Ok(()) => break,
                Err(e)
                    if Instant::now() >= deadline
                        || self.probe(&spec.id, &info) == Liveness::Gone =>
                {
                    return Err(undo(NodeError::Setup(format!(
                        "the guest agent did not answer: {e}"
                    ))));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        tracing::debug!(sandbox_id = %spec.id, ms = started.elapsed().as_millis() as u64, restore, "gVisor sandbox up");
        Ok(info)
    }

    /// Host pid of the sandbox's Sentry (what `runsc state` calls the container's pid).
    fn sandbox_pid(&self, id: &str, with_net: bool) -> Result<u32, NodeError> {
        let out = self.runsc(with_net, &["state", id])?;
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            NodeError::Setup(format!(
                "runsc state {id}: {e}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })?;
        state["pid"]
            .as_u64()
            .filter(|p| *p > 0)
            .map(|p| p as u32)
            .ok_or_else(|| NodeError::Setup(format!("runsc state {id} names no pid: {state}")))
    }

    /// Saves the running sandbox's processes and memory into `checkpoint/` and leaves it
    /// stopped. The guest first closes its listener (gVisor cannot save a socket bound on the
    /// host); a checkpoint that fails wakes it again, and the caller stops the sandbox cold.
    fn checkpoint(&self, id: &str, info: &RuntimeInfo) -> Result<(), NodeError> {
        // A paused sandbox is frozen in its cgroups, and a frozen Sentry cannot save itself.
        if self.cgroups.frozen(id) == Some(true) {
            self.cgroups
                .set_frozen(id, false)
                .map_err(host_err("thawing the sandbox for its checkpoint"))?;
        }
        let started = Instant::now();
        guest_call(&info.guest_socket, &burrow_proto::Request::Quiesce)
            .map_err(|e| NodeError::Setup(format!("asking the guest to close its socket: {e}")))?;
        let quiesced = started.elapsed();
        let dir = self.checkpoint_dir(id);
        let tmp = self.sandbox_dir(id).join("checkpoint.new");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(host_err("creating the checkpoint directory"))?;
        let with_net = self.sandbox_dir(id).join("bundle/config.json").is_file()
            && std::fs::read_to_string(self.sandbox_dir(id).join("bundle/config.json"))
                .is_ok_and(|c| c.contains("\"network\""));
        let out = self.runsc(
            with_net,
            &["checkpoint", &format!("--image-path={}", tmp.display()), id],
        )?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&tmp);
            let _ = self.runsc(with_net, &["kill", id, "USR2"]);
            return Err(NodeError::Setup(format!(
                "runsc checkpoint: {}",
                first_line(&out.stderr)
            )));
        }
        tracing::debug!(sandbox_id = %id, quiesce_ms = quiesced.as_millis() as u64,
            checkpoint_ms = (started.elapsed() - quiesced).as_millis() as u64, "checkpoint taken");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(host_err("keeping the checkpoint"))?;
        Ok(())
    }

    /// Ends every process of the sandbox and releases what it holds on the host but its files
    /// (and a checkpoint): runsc's container, the cgroups, the socket, the disk's loop device.
    fn halt(&self, id: &str, with_net: bool) -> Result<(), NodeError> {
        let _ = self.runsc(with_net, &["kill", id, "KILL"]);
        let _ = self.runsc(with_net, &["delete", "--force", id]);
        self.cgroups
            .kill_all(id, KILL_TIMEOUT)
            .map_err(host_err("killing the sandbox's processes"))?;
        self.cgroups
            .remove(id)
            .map_err(host_err("removing the sandbox's cgroups"))?;
        let _ = std::fs::remove_file(self.sandbox_dir(id).join("sock/guest.sock"));
        // "Stopped" means the disk is mounted nowhere (see the namespace backend).
        let deadline = Instant::now() + KILL_TIMEOUT * 3;
        while !self.disk_devices(id).is_empty() {
            if Instant::now() >= deadline {
                return Err(NodeError::DiskBusy(id.to_string()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn disk_devices(&self, id: &str) -> Vec<String> {
        // A btrfs volume has no device of its own.
        if self.storage.kind() != burrow_storage::Kind::Ext4 {
            return Vec::new();
        }
        match loopdev::FileId::of(&self.sandbox_dir(id).join("disk.img")) {
            Ok(file) => loopdev::devices_backing(file),
            Err(_) => loopdev::devices_backed_by(&format!("/sandboxes/{id}/")),
        }
    }
}

/// The cgroup limits of a gVisor sandbox: its plan's, plus what the Sentry, the gofer and the
/// platform's stubs need on top (they are host tasks and host memory of the same cgroup).
fn cgroup_limits(l: &Limits) -> CgroupLimits {
    CgroupLimits {
        cpu_millis: l.cpu_millis,
        memory_bytes: (l.memory_mib + MEMORY_HEADROOM_MIB) * 1024 * 1024,
        pids: l.pids.saturating_add(PIDS_HEADROOM),
    }
}

/// Compiles the `statx` shim into `dir` with the host's `gcc` (scripts/deps installs it).
fn build_shim(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("statx-shim.c");
    let out = dir.join("statx-shim.so");
    let tmp = dir.join(".statx-shim.so.new");
    std::fs::write(&src, STATX_SHIM_C).map_err(|e| format!("writing {}: {e}", src.display()))?;
    let o = Command::new("/usr/bin/gcc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&tmp)
        .arg(&src)
        .output()
        .map_err(|e| format!("running gcc: {e}"))?;
    if !o.status.success() {
        return Err(format!("gcc: {}", first_line(&o.stderr)));
    }
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o555))
        .map_err(|e| format!("chmod the shim: {e}"))?;
    std::fs::rename(&tmp, &out).map_err(|e| format!("installing the shim: {e}"))?;
    Ok(out)
}

/// Runs `burrow __gvisor` with `body` on its stdin. Its error text becomes the error: a full data
/// filesystem as `NoSpace`, a disk attached elsewhere as `DiskBusy`.
fn run_helper(exe: &Path, arg: &str, body: &[u8], id: &str) -> Result<(), NodeError> {
    let mut child = Command::new(exe)
        .arg(arg)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
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
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if msg.contains(&std::io::Error::from_raw_os_error(libc::ENOSPC).to_string()) {
        return Err(NodeError::NoSpace(msg));
    }
    if msg.contains("is already attached to") || msg.contains("is still attached to") {
        return Err(NodeError::DiskBusy(id.to_string()));
    }
    Err(NodeError::Setup(format!("gVisor: {msg}")))
}

fn first_line(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(500)
        .collect()
}

/// One blocking request over the guest protocol that answers `Ok`; returns once the guest has
/// closed the connection too (a checkpoint must find no host socket open).
fn guest_call(socket: &Path, req: &burrow_proto::Request) -> std::io::Result<()> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let body = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    frame.push(burrow_proto::FrameKind::Control as u8);
    frame.extend_from_slice(&body);
    s.write_all(&frame)?;
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if head[4] != burrow_proto::FrameKind::Control as u8 || len == 0 || len > 65536 {
        return Err(std::io::Error::other("unexpected frame from the guest"));
    }
    let mut payload = vec![0u8; len - 1];
    s.read_exact(&mut payload)?;
    match serde_json::from_slice::<burrow_proto::Reply>(&payload) {
        Ok(burrow_proto::Reply::Ok) => {}
        Ok(burrow_proto::Reply::Error { message, .. }) => {
            return Err(std::io::Error::other(message))
        }
        _ => return Err(std::io::Error::other("unexpected reply from the guest")),
    }
    // Wait for the guest's end of the connection to close.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    Ok(())
}

impl Backend for GvisorBackend {
    fn name(&self) -> &'static str {
        "gvisor"
    }

    fn offers(&self, isolation: Isolation) -> bool {
        isolation == Isolation::Gvisor
    }

    fn platform(&self, id: &str) -> Option<String> {
        std::fs::read_to_string(self.sandbox_dir(id).join(MARKER))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    fn checkpointed(&self, id: &str) -> bool {
        self.checkpoint_dir(id).join("checkpoint.img").is_file()
    }

    fn create(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, NodeError> {
        let limit = spec.limits.disk_mib.saturating_mul(1024 * 1024);
        let (volume, fresh) = match self.storage.create(&spec.id, limit) {
            Ok(v) => (v, true),
            Err(burrow_storage::StorageError::VolumeExists(_)) => {
                (self.volume_of(&spec.id)?, false)
            }
            Err(e) => return Err(crate::storage::node_err(&spec.id, e)),
        };
        // A new sandbox never restores someone's checkpoint.
        let _ = std::fs::remove_dir_all(self.checkpoint_dir(&spec.id));
        self.boot(spec, &volume, fresh, false)
    }

    /// A cold start of a stopped sandbox: its checkpoint restored when it has one (processes and
    /// memory come back), fresh processes on its files otherwise, or when the restore fails (a
    /// checkpoint of another runsc version): the files are never lost for a checkpoint.
    fn start(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, NodeError> {
        let volume = self.volume_of(&spec.id)?;
        if self.checkpointed(&spec.id) {
            match self.boot(spec, &volume, false, true) {
                Ok(info) => {
                    // Restored: the checkpoint is spent (its processes now run and change).
                    let _ = std::fs::remove_dir_all(self.checkpoint_dir(&spec.id));
                    return Ok(info);
                }
                Err(e) => {
                    tracing::warn!(sandbox_id = %spec.id, error = %e, "restoring the checkpoint failed; starting cold");
                    let _ = std::fs::remove_dir_all(self.checkpoint_dir(&spec.id));
                }
            }
        }
        self.boot(spec, &volume, false, false)
    }

    fn destroy(&self, id: &str, _info: Option<&RuntimeInfo>) -> Result<(), NodeError> {
        self.halt(id, true)?;
        // The volume first, the directory last: a directory is how a sandbox is found again.
        self.storage
            .destroy(id)
            .map_err(|e| crate::storage::node_err(id, e))?;
        let dir = self.sandbox_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(NodeError::Host {
                what: format!("removing {}", dir.display()),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Stops the sandbox, keeping its memory when it can: a running sandbox is checkpointed
    /// first (its next `start` restores it); one that cannot be is stopped cold.
    fn stop(&self, id: &str, info: Option<&RuntimeInfo>) -> Result<(), NodeError> {
        if let Some(info) = info.filter(|i| self.probe(id, i) == Liveness::Alive) {
            match self.checkpoint(id, info) {
                Ok(()) => tracing::info!(sandbox_id = %id, "gVisor sandbox checkpointed"),
                Err(e) => {
                    tracing::warn!(sandbox_id = %id, error = %e, "no checkpoint; the sandbox stops cold")
                }
            }
        }
        self.halt(id, true)
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

    fn resume(&self, id: &str) -> Result<(), NodeError> {
        self.cgroups
            .set_frozen(id, false)
            .map_err(host_err("thawing the sandbox"))
    }

    fn frozen(&self, id: &str) -> Option<bool> {
        self.cgroups.frozen(id)
    }

    fn active(&self, id: &str) -> bool {
        !self.cgroups.procs(id).is_empty()
    }

    fn set_limits(&self, id: &str, limits: &Limits) -> Result<(), NodeError> {
        self.cgroups
            .set_limits(id, cgroup_limits(limits))
            .map_err(host_err("rewriting the sandbox's cgroup limits"))?;
        let dev = crate::namespace::disk_device(id)
            .ok_or_else(|| NodeError::Setup(format!("the disk of sandbox {id} is not attached")))?;
        self.cgroups
            .set_io(id, dev, crate::namespace::init::io_limits(limits))
            .map_err(host_err("rewriting the sandbox's disk throttle"))
    }

    /// Through the guest: gVisor's kernel holds the sandbox's UTS namespace, which no host
    /// `setns` reaches.
    fn set_hostname(&self, id: &str, info: &RuntimeInfo, hostname: &str) -> Result<(), NodeError> {
        if self.probe(id, info) == Liveness::Gone {
            return Err(NodeError::Setup(format!("sandbox {id} is not running")));
        }
        guest_call(
            &info.guest_socket,
            &burrow_proto::Request::SetHostname {
                hostname: hostname.to_string(),
            },
        )
        .map_err(host_err("setting the sandbox's hostname through its guest"))
    }

    fn host_sandboxes(&self) -> Result<Vec<String>, NodeError> {
        let dir = self.cfg.data_dir.join("sandboxes");
        let mut ids = Vec::new();
        for entry in
            std::fs::read_dir(&dir).map_err(host_err(format!("listing {}", dir.display())))?
        {
            let entry = entry.map_err(host_err("listing sandboxes"))?;
            if entry.path().join(MARKER).exists() {
                if let Ok(name) = entry.file_name().into_string() {
                    ids.push(name);
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn memory_usage(&self, id: &str) -> Option<u64> {
        self.cgroups.memory_usage(id)
    }

    fn cpu_usage_ns(&self, id: &str) -> Option<u64> {
        self.cgroups.cpu_usage_ns(id)
    }
}

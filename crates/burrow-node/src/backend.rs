//! The runtime boundary: everything above this trait (server, pool, API) is the same whatever
//! isolates a sandbox; everything below it (namespaces today, gVisor and microVMs later) is not.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burrow_types::{Isolation, Limits};
use serde::{Deserialize, Serialize};

/// What the control layer asks a backend to build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub id: String,
    pub hostname: String,
    /// Image name; the namespace backend knows `system`.
    pub image: String,
    pub limits: Limits,
    /// Index of this sandbox's host uid/gid range (root inside is `uid_base(slot)` outside).
    pub uid_slot: u32,
    /// Environment every process in the sandbox starts with (on top of the image's defaults).
    pub env: BTreeMap<String, String>,
    /// The sandbox's network (veth, address, resolvers); `None`: loopback only.
    #[serde(default)]
    pub net: Option<crate::network::NetSpec>,
}

/// What a backend reports about a sandbox it built, persisted by the control layer so that a
/// restarted server can find and adopt the sandbox again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// Host pid of the sandbox's PID 1 (the guest agent).
    pub pid: u32,
    /// Start time of that pid in clock ticks since boot (field 22 of `/proc/<pid>/stat`), so a
    /// recycled pid is never mistaken for the sandbox.
    pub pid_start: u64,
    /// Host path of the guest agent's Unix socket.
    pub guest_socket: PathBuf,
}

/// Whether a sandbox the store believes in is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("unknown image {0:?}")]
    UnknownImage(String),
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    /// The data filesystem is full (the message is what failed).
    #[error("no space left on the host's data filesystem: {0}")]
    NoSpace(String),
    /// A cold start found no disk to start from: the sandbox's files are gone.
    #[error("the sandbox's disk {} is missing", .0.display())]
    DiskMissing(PathBuf),
    /// The sandbox's disk is still attached (a stop that did not finish, or a second start).
    #[error("the disk of sandbox {0} is still in use")]
    DiskBusy(String),
    #[error("host resource {what}")]
    Host {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// An isolation backend. Methods block (they fork, mount and write cgroup files); the control layer
/// calls them from a blocking thread.
pub trait Backend: Send + Sync + 'static {
    /// Short name shown in node status (`namespace`, `gvisor`, `microvm`).
    fn name(&self) -> &'static str;

    /// Whether this node can build sandboxes of `isolation` (`limits.isolation` of a spec).
    fn offers(&self, isolation: Isolation) -> bool {
        isolation == Isolation::Native
    }

    /// How the sandbox's kernel traps system calls, for tiers that have a choice (gVisor's
    /// `ptrace` or `kvm`); `None` for the namespace backend.
    fn platform(&self, _id: &str) -> Option<String> {
        None
    }

    /// Whether a stopped sandbox's processes and memory are saved (a gVisor checkpoint): its next
    /// `start` restores them instead of starting fresh processes.
    fn checkpointed(&self, _id: &str) -> bool {
        false
    }

    /// Builds and starts a new sandbox; returns once its guest agent accepts connections.
    /// On error nothing of the sandbox is left on the host (a disk it did not make excepted).
    fn create(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, NodeError>;

    /// Starts fresh processes on the disk a sandbox already has (a cold resume). Never makes a
    /// disk and never removes one: on error nothing of the sandbox runs and its disk is as it
    /// was. `DiskMissing` when there is no disk to start from.
    fn start(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, NodeError> {
        Err(NodeError::Setup(format!(
            "the {} backend cannot start sandbox {} cold",
            self.name(),
            spec.id
        )))
    }

    /// Ends every process of the sandbox and removes everything it had on the host: cgroups,
    /// mounts, loop devices, files. Idempotent; works with `info` unknown (after a crash mid-create).
    fn destroy(&self, id: &str, info: Option<&RuntimeInfo>) -> Result<(), NodeError>;

    /// Ends every process of the sandbox and releases its cgroups, but keeps its disk: a later
    /// `create` with the same id starts fresh processes on the same files (a cold resume).
    fn stop(&self, id: &str, info: Option<&RuntimeInfo>) -> Result<(), NodeError>;

    /// Whether the sandbox described by `info` still runs.
    fn probe(&self, id: &str, info: &RuntimeInfo) -> Liveness;

    /// Freezes every process of the sandbox (memory, open connections and state stay); returns
    /// once they are all frozen. The caller syncs files first.
    fn pause(&self, id: &str) -> Result<(), NodeError>;

    /// Thaws a paused sandbox.
    fn resume(&self, id: &str) -> Result<(), NodeError>;

    /// Whether the sandbox's processes are frozen now (`None`: it has none, or the backend
    /// cannot tell). Reconcile compares this with the row.
    fn frozen(&self, _id: &str) -> Option<bool> {
        None
    }

    /// Whether any process of the sandbox runs on the host (a hibernated one must have none).
    fn active(&self, _id: &str) -> bool {
        false
    }

    /// Ids of this node's sandboxes whose disk is attached now, found in one pass (reconcile
    /// asks once for every sandbox).
    fn disks_in_use(&self) -> Vec<String> {
        Vec::new()
    }

    /// Rewrites a running sandbox's resource limits (a warm sandbox claimed with another plan's
    /// CPU, memory or process limits). The disk size and open-file limit are fixed at create.
    fn set_limits(&self, id: &str, limits: &Limits) -> Result<(), NodeError>;

    /// Sets the hostname the sandbox's processes see (`uname -n`); `/etc/hostname` and
    /// `/etc/hosts` are the caller's to write through the guest.
    fn set_hostname(&self, id: &str, info: &RuntimeInfo, hostname: &str) -> Result<(), NodeError>;

    /// Ids of every sandbox that has anything on this host (directories, cgroups), so the control
    /// layer can destroy the ones it has no row for.
    fn host_sandboxes(&self) -> Result<Vec<String>, NodeError>;

    /// Bytes of memory charged to the sandbox now, when the backend can tell.
    fn memory_usage(&self, _id: &str) -> Option<u64> {
        None
    }

    /// CPU time the sandbox's processes have used so far, in nanoseconds, when the backend can tell.
    fn cpu_usage_ns(&self, _id: &str) -> Option<u64> {
        None
    }

    /// The volumes' own filesystem, when it is not the data directory's: what the control
    /// layer's free-space watermark must also watch (a full pool is ENOSPC for every sandbox).
    fn volume_space(&self) -> Result<Option<VolumeSpace>, NodeError> {
        Ok(None)
    }
}

/// An error with its sources, `: `-separated.
pub(crate) fn error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// Space on the filesystem that holds the sandboxes' volumes, when that is not the data
/// directory's (a btrfs pool on an image, or an operator's own disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpace {
    pub path: PathBuf,
    pub total_bytes: u64,
    /// What sandboxes can still write (btrfs: also bounded by the room metadata can grow into).
    pub writable_bytes: u64,
}

/// `/etc/hosts` of a sandbox called `hostname`, whatever isolates it: written at build, and again
/// when a warm sandbox is claimed under another name.
pub fn etc_hosts(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    )
}

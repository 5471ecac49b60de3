//! Plans and the limits they give a sandbox: `free`, `pro` and `scale` by default, more or
//! replaced with `burrow up --plans`.

use serde::{Deserialize, Serialize};

/// Resource limits of one sandbox. Every one is enforced by the kernel or by burrow, and every hit
/// is reported as a structured error naming the limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Limits {
    /// CPU in thousandths of a core (500 = half a core).
    pub cpu_millis: u32,
    pub memory_mib: u64,
    /// Maximum number of processes and threads.
    pub pids: u32,
    /// Hard size of the sandbox disk (writable root layer and `/workspace`).
    pub disk_mib: u64,
    /// Open files per process (RLIMIT_NOFILE).
    pub nofile: u64,
    /// stdout and stderr kept per command, each.
    pub output_bytes: u64,
    pub max_duration_s: u64,
    /// Tool calls (exec and file operations) per run; past it the run ends.
    #[serde(default = "default_tool_calls")]
    pub tool_calls: u32,
    /// Reads from the sandbox's disk, bytes per second (0: no limit). Like the three below, it
    /// bounds I/O the sandbox's processes submit themselves (direct I/O, page-cache misses, the
    /// flush an `fsync` does); see `docs/threat-model.md` for what cgroup v1 leaves out.
    #[serde(default = "default_disk_bps")]
    pub disk_read_bps: u64,
    /// Writes to the sandbox's disk, bytes per second (0: no limit).
    #[serde(default = "default_disk_bps")]
    pub disk_write_bps: u64,
    /// Read operations on the sandbox's disk per second (0: no limit).
    #[serde(default = "default_disk_iops")]
    pub disk_read_iops: u64,
    /// Write operations on the sandbox's disk per second (0: no limit).
    #[serde(default = "default_disk_iops")]
    pub disk_write_iops: u64,
    /// What isolates the sandbox: `native` (namespaces on the host's kernel) or `gvisor` (a
    /// user-space kernel of its own). Fixed when the sandbox is built (docs/isolation.md).
    #[serde(default)]
    pub isolation: Isolation,
}

/// An isolation tier. Every tier runs the same guest agent behind the same API; they differ in
/// which kernel serves the sandbox's system calls (docs/isolation.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Linux namespaces, cgroups and seccomp on the host's kernel.
    #[default]
    Native,
    /// gVisor's `runsc`: the sandbox's system calls are served by a user-space kernel.
    Gvisor,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Native => "native",
            Isolation::Gvisor => "gvisor",
        }
    }
}

impl Limits {
    /// Whether every limit here is at most `other`'s. This is what "a user's plan bounds what they
    /// may ask for" means: a plan is open to a user when it gives no more, in any dimension, than
    /// the user's own plan (a plan with more CPU but less memory is not).
    pub fn within(&self, other: &Limits) -> bool {
        // Destructured whole, so a new limit cannot be added without deciding how it bounds.
        let Limits {
            cpu_millis,
            memory_mib,
            pids,
            disk_mib,
            nofile,
            output_bytes,
            max_duration_s,
            tool_calls,
            disk_read_bps,
            disk_write_bps,
            disk_read_iops,
            disk_write_iops,
            // Not a bound: every tier gives the same limits, and a stronger one costs the user
            // nothing they could take from others (its overhead is the host's).
            isolation: _,
        } = self;
        // For the disk throttle 0 means no limit: more than any number.
        let throttle = |mine: u64, theirs: u64| theirs == 0 || (mine != 0 && mine <= theirs);
        *cpu_millis <= other.cpu_millis
            && *memory_mib <= other.memory_mib
            && *pids <= other.pids
            && *disk_mib <= other.disk_mib
            && *nofile <= other.nofile
            && *output_bytes <= other.output_bytes
            && *max_duration_s <= other.max_duration_s
            && *tool_calls <= other.tool_calls
            && throttle(*disk_read_bps, other.disk_read_bps)
            && throttle(*disk_write_bps, other.disk_write_bps)
            && throttle(*disk_read_iops, other.disk_read_iops)
            && throttle(*disk_write_iops, other.disk_write_iops)
    }
}

pub const DEFAULT_TOOL_CALLS: u32 = 20;

fn default_tool_calls() -> u32 {
    DEFAULT_TOOL_CALLS
}

/// Disk bandwidth of the smallest plan, and of plans that do not name one.
pub const DEFAULT_DISK_BPS: u64 = 64 * MIB;
/// Disk operations per second of the smallest plan, and of plans that do not name them.
pub const DEFAULT_DISK_IOPS: u64 = 1000;

fn default_disk_bps() -> u64 {
    DEFAULT_DISK_BPS
}

fn default_disk_iops() -> u64 {
    DEFAULT_DISK_IOPS
}

/// How many sandboxes one host can give distinct uid ranges: each takes 65,536 host uids from
/// 0x1000_0000 up, and the last range must end below `u32::MAX` (which is no uid: `(uid_t)-1`).
/// Slots are `0..UID_SLOTS`; the store hands out none past the top.
pub const UID_SLOTS: u32 = (u32::MAX - 0x1000_0000) / 65536;

/// A named bundle of limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Plan {
    pub name: String,
    pub limits: Limits,
    /// Per-user caps for this plan's users (none by default).
    #[serde(default)]
    pub quota: Quota,
}

pub const MIB: u64 = 1024 * 1024;
pub const DEFAULT_OUTPUT_BYTES: u64 = 10 * MIB;

impl Plan {
    /// A plan; disk throughput scales with its CPU (the smallest plan gets the defaults).
    fn with(name: &str, cpu_millis: u32, memory_mib: u64, max_duration_s: u64) -> Plan {
        let scale = u64::from(cpu_millis.max(500) / 500);
        Plan {
            name: name.to_string(),
            limits: Limits {
                cpu_millis,
                memory_mib,
                pids: 512,
                disk_mib: 1024,
                nofile: 1024,
                output_bytes: DEFAULT_OUTPUT_BYTES,
                max_duration_s,
                tool_calls: DEFAULT_TOOL_CALLS,
                disk_read_bps: DEFAULT_DISK_BPS * scale,
                disk_write_bps: DEFAULT_DISK_BPS * scale,
                disk_read_iops: DEFAULT_DISK_IOPS * scale,
                disk_write_iops: DEFAULT_DISK_IOPS * scale,
                isolation: Isolation::Native,
            },
            quota: Quota::default(),
        }
    }

    /// The plans every server ships with.
    pub fn defaults() -> Vec<Plan> {
        vec![
            Plan::with("free", 500, 512, 30 * 60),
            Plan::with("pro", 1000, 1024, 2 * 3600),
            Plan::with("scale", 2000, 2048, 4 * 3600),
        ]
    }
}

/// Caps on what one user may hold at once and how fast they may create. A plan
/// sets them for its users; an operator can override them per user. Absent means no cap.
/// "Live" sandboxes are those not destroyed and not in `error`: starting, running, paused and
/// hibernated (a hibernated sandbox keeps its disk and gets its memory back when it resumes, so
/// what it was promised still counts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Live sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1000000))]
    pub sandboxes: Option<u32>,
    /// Memory promised to live sandboxes (the sum of their memory limits), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1099511627776_i64))]
    pub memory_mib: Option<u64>,
    /// Disk promised to live sandboxes (the sum of their disk sizes: sparse disks are
    /// promises), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1099511627776_i64))]
    pub disk_mib: Option<u64>,
    /// Creates per second, with bursts of as many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1000000))]
    pub creates_per_s: Option<u32>,
}

/// The largest value any quota field takes (what fits every counter with room to spare).
pub const MAX_QUOTA_SANDBOXES: u32 = 1_000_000;
pub const MAX_QUOTA_MIB: u64 = 1 << 40;

impl Quota {
    /// `over` where it says something, `self` elsewhere.
    pub fn overridden_by(&self, over: &Quota) -> Quota {
        Quota {
            sandboxes: over.sandboxes.or(self.sandboxes),
            memory_mib: over.memory_mib.or(self.memory_mib),
            disk_mib: over.disk_mib.or(self.disk_mib),
            creates_per_s: over.creates_per_s.or(self.creates_per_s),
        }
    }

    /// The first field out of range, as `(field, max)`.
    pub fn out_of_range(&self) -> Option<(&'static str, u64)> {
        let big = |v: Option<u64>, max: u64| v.is_some_and(|v| v > max);
        if big(
            self.sandboxes.map(u64::from),
            u64::from(MAX_QUOTA_SANDBOXES),
        ) {
            return Some(("sandboxes", u64::from(MAX_QUOTA_SANDBOXES)));
        }
        if big(self.memory_mib, MAX_QUOTA_MIB) {
            return Some(("memory_mib", MAX_QUOTA_MIB));
        }
        if big(self.disk_mib, MAX_QUOTA_MIB) {
            return Some(("disk_mib", MAX_QUOTA_MIB));
        }
        if big(
            self.creates_per_s.map(u64::from),
            u64::from(MAX_QUOTA_SANDBOXES),
        ) {
            return Some(("creates_per_s", u64::from(MAX_QUOTA_SANDBOXES)));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_within_another_when_no_limit_is_larger() {
        let [free, pro, scale] = <[Plan; 3]>::try_from(Plan::defaults()).unwrap();
        assert!(free.limits.within(&pro.limits) && pro.limits.within(&scale.limits));
        assert!(free.limits.within(&free.limits));
        assert!(!scale.limits.within(&free.limits) && !pro.limits.within(&free.limits));
        // More of one thing and less of another is not within.
        let mut odd = free.limits.clone();
        odd.memory_mib = 256;
        odd.pids = 4096;
        assert!(!odd.within(&pro.limits));
        odd.pids = 512;
        assert!(odd.within(&free.limits));
        // No disk throttle (0) is more than any throttle.
        odd.disk_write_bps = 0;
        assert!(!odd.within(&scale.limits));
        let mut open = scale.limits.clone();
        open.disk_write_bps = 0;
        assert!(scale.limits.within(&open) && !open.within(&scale.limits));
    }

    #[test]
    fn plans_without_disk_limits_get_the_defaults() {
        let l: Limits = serde_json::from_str(
            r#"{"cpu_millis": 500, "memory_mib": 256, "pids": 128, "disk_mib": 64, "nofile": 1024,
                "output_bytes": 1048576, "max_duration_s": 60}"#,
        )
        .unwrap();
        assert_eq!(
            (l.disk_read_bps, l.disk_write_bps),
            (DEFAULT_DISK_BPS, DEFAULT_DISK_BPS)
        );
        assert_eq!(
            (l.disk_read_iops, l.disk_write_iops),
            (DEFAULT_DISK_IOPS, DEFAULT_DISK_IOPS)
        );
        let plans = Plan::defaults();
        assert_eq!(plans[0].limits.disk_write_bps, DEFAULT_DISK_BPS);
        assert_eq!(plans[2].limits.disk_write_iops, 4 * DEFAULT_DISK_IOPS);
    }

    #[test]
    fn the_last_uid_slot_ends_below_the_invalid_uid() {
        let end = |slot: u32| 0x1000_0000u64 + (u64::from(slot) + 1) * 65536 - 1;
        assert!(end(UID_SLOTS - 1) < u64::from(u32::MAX));
        assert!(end(UID_SLOTS) >= u64::from(u32::MAX));
    }
}

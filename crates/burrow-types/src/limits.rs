//! Plans and the limits they give a sandbox (DESIGN.md §6).

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
        } = self;
        *cpu_millis <= other.cpu_millis
            && *memory_mib <= other.memory_mib
            && *pids <= other.pids
            && *disk_mib <= other.disk_mib
            && *nofile <= other.nofile
            && *output_bytes <= other.output_bytes
            && *max_duration_s <= other.max_duration_s
            && *tool_calls <= other.tool_calls
    }
}

pub const DEFAULT_TOOL_CALLS: u32 = 20;

fn default_tool_calls() -> u32 {
    DEFAULT_TOOL_CALLS
}

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
    fn with(name: &str, cpu_millis: u32, memory_mib: u64, max_duration_s: u64) -> Plan {
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

/// Caps on what one user may hold at once and how fast they may create (DESIGN.md §6). A plan
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
    }
}

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

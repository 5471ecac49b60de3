//! Where each operation's time goes, as the server reports it: every request the bench times
//! asks for the server's stages (`Burrow-Timing: 1`, answered in `Server-Timing`), and this keeps
//! them per operation. `--breakdown` prints a table of their p50 and p99; `--json` always carries
//! them.
//!
//! Stage names are the server's: `request` (the whole request inside the server), `admission`,
//! `store` (its SQLite writes, added up), `init-*` (inside `burrow __init`: disk, cgroups, user
//! namespace, overlay root, the other namespaces, network, PID 1's own set-up until the guest's
//! exec), `init-process` (starting and ending `__init` itself), `guest-start` (from `__init`'s
//! exit until the guest answers), `net-attach`, `inject`, `guest-connect`, `guest-exec`, `thaw`,
//! and CPU time: `cpu-init-outside` (`__init` and `mkfs` before joining the sandbox's cgroups),
//! `cpu-sandbox-cgroup` (everything charged to them by the time the guest answered: the rest of
//! `__init`, its helper, PID 1, the guest's start), `cpu-server-thread` (the server thread that
//! built it). Their sum per create is the `cpu (server + children)` line.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use super::stats::nearest_rank;

/// One request's stages: (name, milliseconds).
type Sample = Vec<(String, f64)>;

/// Samples of stages, per operation, in the order operations were first seen.
#[derive(Default)]
pub struct Breakdown {
    ops: Mutex<Vec<(&'static str, Vec<Sample>)>>,
}

/// One operation's stages over its samples.
#[derive(Debug, Clone, Serialize)]
pub struct OpBreakdown {
    pub operation: String,
    /// Requests sampled (a stage may be in fewer: `init-network` only with a network).
    pub n: usize,
    pub stages: Vec<StageFigures>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageFigures {
    pub stage: String,
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

/// The derived line: every `cpu-*` stage of one request added up.
pub const CPU_TOTAL: &str = "cpu (server + children)";

impl Breakdown {
    pub fn add(&self, op: &'static str, stages: Sample) {
        if stages.is_empty() {
            return;
        }
        let Ok(mut ops) = self.ops.lock() else { return };
        match ops.iter_mut().find(|(o, _)| *o == op) {
            Some((_, v)) => v.push(stages),
            None => ops.push((op, vec![stages])),
        }
    }

    pub fn report(&self) -> Vec<OpBreakdown> {
        let Ok(ops) = self.ops.lock() else {
            return Vec::new();
        };
        ops.iter()
            .map(|(op, samples)| summarise(op, samples))
            .collect()
    }
}

fn summarise(op: &str, samples: &[Sample]) -> OpBreakdown {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for sample in samples {
        let mut cpu = None;
        for (name, ms) in sample {
            if !order.contains(name) {
                order.push(name.clone());
            }
            values.entry(name.clone()).or_default().push(*ms);
            if name.starts_with("cpu-") {
                *cpu.get_or_insert(0.0) += ms;
            }
        }
        if let Some(total) = cpu {
            values.entry(CPU_TOTAL.to_string()).or_default().push(total);
        }
    }
    if values.contains_key(CPU_TOTAL) {
        order.push(CPU_TOTAL.to_string());
    }
    let stages = order
        .into_iter()
        .filter_map(|name| {
            let mut v = values.remove(&name)?;
            v.sort_by(f64::total_cmp);
            Some(StageFigures {
                n: v.len(),
                p50_ms: nearest_rank(&v, 0.5),
                p99_ms: nearest_rank(&v, 0.99),
                mean_ms: v.iter().sum::<f64>() / v.len() as f64,
                stage: name,
            })
        })
        .collect();
    OpBreakdown {
        operation: op.to_string(),
        n: samples.len(),
        stages,
    }
}

/// One block per operation: its stages with p50, p99, mean and n.
pub fn render(ops: &[OpBreakdown]) -> String {
    let mut out = String::new();
    for op in ops {
        out.push_str(&format!(
            "{:<44} {:>10} {:>10} {:>10} {:>5}\n",
            format!("{} (server's stages, {} requests)", op.operation, op.n),
            "p50",
            "p99",
            "mean",
            "n"
        ));
        for s in &op.stages {
            out.push_str(&format!(
                "  {:<42} {:>7.2} ms {:>7.2} ms {:>7.2} ms {:>5}\n",
                s.stage, s.p50_ms, s.p99_ms, s.mean_ms, s.n
            ));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_keep_their_order_and_cpu_adds_up_per_request() {
        let b = Breakdown::default();
        let s = |v: &[(&str, f64)]| v.iter().map(|(n, d)| (n.to_string(), *d)).collect();
        b.add(
            "cold create",
            s(&[
                ("store", 1.0),
                ("cpu-a", 2.0),
                ("cpu-b", 3.0),
                ("request", 9.0),
            ]),
        );
        b.add(
            "cold create",
            s(&[
                ("store", 3.0),
                ("cpu-a", 4.0),
                ("cpu-b", 4.0),
                ("request", 11.0),
            ]),
        );
        b.add("exec", Vec::new());
        let r = b.report();
        assert_eq!(r.len(), 1, "an operation without stages is not listed");
        let names: Vec<&str> = r[0].stages.iter().map(|s| s.stage.as_str()).collect();
        assert_eq!(names, ["store", "cpu-a", "cpu-b", "request", CPU_TOTAL]);
        let cpu = r[0].stages.last().unwrap();
        assert_eq!((cpu.p50_ms, cpu.p99_ms, cpu.mean_ms), (5.0, 8.0, 6.5));
        assert!(render(&r).contains("cold create (server's stages, 2 requests)"));
    }
}

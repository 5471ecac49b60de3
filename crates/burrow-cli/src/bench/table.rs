//! What the bench reports and how it prints: rows of burrow's own measures, rows of the peers run
//! side by side, as one plain-text table each (or JSON with `--json`).

use serde::Serialize;

use super::stats::Latency;

/// One measured figure, or why there is none.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Value {
    Latency(Latency),
    /// Completed operations per second with `concurrency` in flight.
    Rate {
        per_s: f64,
        n: usize,
        concurrency: usize,
    },
    /// Host memory per sandbox, measured with `n` sandboxes up.
    Memory {
        mib_per_sandbox: f64,
        n: usize,
    },
    /// Milliseconds of something (CPU time) per operation, over `n` operations.
    PerOp {
        ms: f64,
        n: usize,
    },
    Unavailable {
        reason: String,
    },
}

impl Value {
    pub fn unavailable(reason: impl Into<String>) -> Value {
        Value::Unavailable {
            reason: reason.into(),
        }
    }

    pub fn p50_ms(&self) -> Option<f64> {
        match self {
            Value::Latency(l) => Some(l.p50_ms),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub measure: String,
    #[serde(flatten)]
    pub value: Value,
    /// The target for this measure (docs/performance.md), if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Row {
    pub fn new(measure: impl Into<String>, value: Value) -> Row {
        Row {
            measure: measure.into(),
            value,
            target: None,
            note: None,
        }
    }

    pub fn target(mut self, target: &'static str) -> Row {
        self.target = Some(target);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = Some(note.into());
        self
    }
}

/// A peer's cold start → first command, and burrow's p50 divided by the peer's.
#[derive(Debug, Clone, Serialize)]
pub struct PeerRow {
    pub peer: String,
    #[serde(flatten)]
    pub value: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burrow_over_peer: Option<f64>,
}

impl PeerRow {
    /// A peer's row with its ratio against burrow's p50 (when both were measured).
    pub fn new(peer: impl Into<String>, value: Value, burrow_p50_ms: Option<f64>) -> PeerRow {
        let burrow_over_peer = match (burrow_p50_ms, value.p50_ms()) {
            (Some(b), Some(p)) if p > 0.0 => Some(b / p),
            _ => None,
        };
        PeerRow {
            peer: peer.into(),
            value,
            burrow_over_peer,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub server: String,
    pub iterations: usize,
    pub rows: Vec<Row>,
    /// burrow's cold create → first command, the peers' yardstick.
    #[serde(skip)]
    pub burrow_cold: Value,
    /// Empty with `--no-peers`.
    pub peers: Vec<PeerRow>,
    /// The server's stages per operation (`breakdown.rs`).
    pub breakdown: Vec<super::breakdown::OpBreakdown>,
}

const MEASURE_W: usize = 44;
const NUM_W: usize = 10;
const N_W: usize = 5;
/// The width of the p50 and p99 columns together, for figures that span both.
const SPAN_W: usize = NUM_W * 2 + 1;

fn ms(v: f64) -> String {
    format!("{v:.2} ms")
}

/// The p50, p99 and n columns of a value.
fn figures(v: &Value) -> String {
    match v {
        Value::Latency(l) => format!(
            "{:>NUM_W$} {:>NUM_W$} {:>N_W$}",
            ms(l.p50_ms),
            ms(l.p99_ms),
            l.n
        ),
        Value::Rate { per_s, n, .. } => {
            format!("{:>SPAN_W$} {n:>N_W$}", format!("{per_s:.1} sandboxes/s"))
        }
        Value::Memory {
            mib_per_sandbox, n, ..
        } => format!(
            "{:>SPAN_W$} {n:>N_W$}",
            format!("{mib_per_sandbox:.2} MiB/sandbox")
        ),
        Value::PerOp { ms, n } => format!("{:>SPAN_W$} {n:>N_W$}", format!("{ms:.2} ms each")),
        Value::Unavailable { reason } => format!("{:>SPAN_W$} {:>N_W$}", reason, "-"),
    }
}

/// Burrow's table: one line per measure, then the notes.
pub fn render_rows(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<MEASURE_W$} {:>NUM_W$} {:>NUM_W$} {:>N_W$}  target\n",
        "burrow", "p50", "p99", "n"
    );
    for r in rows {
        let line = format!(
            "{:<MEASURE_W$} {}  {}",
            r.measure,
            figures(&r.value),
            r.target.unwrap_or("-")
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let notes: Vec<&Row> = rows.iter().filter(|r| r.note.is_some()).collect();
    if !notes.is_empty() {
        out.push('\n');
        for r in notes {
            out.push_str(&format!(
                "note: {}: {}\n",
                r.measure,
                r.note.as_deref().unwrap_or_default()
            ));
        }
    }
    out
}

/// The side-by-side table: burrow's cold create → first command against each peer's.
pub fn render_peers(burrow: &Value, peers: &[PeerRow]) -> String {
    let mut out = format!(
        "{:<MEASURE_W$} {:>NUM_W$} {:>NUM_W$} {:>N_W$}  burrow ÷ peer (p50)\n",
        "cold start → first command, same rootfs", "p50", "p99", "n"
    );
    let line = format!(
        "{:<MEASURE_W$} {}  1.00",
        "burrow (create → exec `true`)",
        figures(burrow)
    );
    out.push_str(&line);
    out.push('\n');
    for p in peers {
        let ratio = p
            .burrow_over_peer
            .map(|r| format!("{r:.2}"))
            .unwrap_or_else(|| "-".into());
        let line = format!("{:<MEASURE_W$} {}  {ratio}", p.peer, figures(&p.value));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(p50: f64, p99: f64, n: usize) -> Value {
        Value::Latency(Latency {
            n,
            p50_ms: p50,
            p99_ms: p99,
            min_ms: p50,
            max_ms: p99,
        })
    }

    #[test]
    fn rows_line_up_under_their_headers() {
        let rows = vec![
            Row::new("cold create → first command", lat(18.3, 67.9, 20)).target("p50 < 60 ms"),
            Row::new(
                "warm create → first command",
                Value::unavailable("n/a (no pool API)"),
            ),
            Row::new(
                "create throughput",
                Value::Rate {
                    per_s: 61.25,
                    n: 40,
                    concurrency: 4,
                },
            ),
            Row::new(
                "idle density",
                Value::Memory {
                    mib_per_sandbox: 1.5,
                    n: 50,
                },
            )
            .note("noisy"),
        ];
        let text = render_rows(&rows);
        let lines: Vec<&str> = text.lines().collect();
        let col = |line: &str, what: &str| {
            line.chars().count() - line[line.find(what).unwrap()..].chars().count()
        };
        // p50 values end where the p50 header ends.
        let header_p50_end = col(lines[0], "p50") + 3;
        let value_end = col(lines[1], "18.30 ms") + "18.30 ms".len();
        assert_eq!(header_p50_end, value_end, "{text}");
        assert!(lines[1].ends_with("p50 < 60 ms"), "{text}");
        assert!(lines[2].contains("n/a (no pool API)"), "{text}");
        assert!(
            lines[3].contains("61.2 sandboxes/s") && lines[3].contains(" 40"),
            "{text}"
        );
        assert!(lines[4].contains("1.50 MiB/sandbox"), "{text}");
        assert!(text.contains("note: idle density: noisy"), "{text}");
        // Every n column ends at the same place.
        let n_end = col(lines[0], " n ") + 2;
        for l in &lines[1..=4] {
            assert_eq!(
                l.chars()
                    .nth(n_end - 1)
                    .map(|c| c.is_ascii_digit() || c == '-'),
                Some(true),
                "{l:?}\n{text}"
            );
        }
    }

    #[test]
    fn ratio_is_burrow_over_peer_and_absent_without_a_figure() {
        let burrow = Some(18.0);
        let crun = PeerRow::new("crun run", lat(9.0, 12.0, 20), burrow);
        assert_eq!(crun.burrow_over_peer, Some(2.0));
        let bwrap = PeerRow::new("bwrap", Value::unavailable("not installed"), burrow);
        assert_eq!(bwrap.burrow_over_peer, None);
        let text = render_peers(&lat(18.0, 30.0, 20), &[crun, bwrap]);
        assert!(text.lines().nth(2).unwrap().ends_with("2.00"), "{text}");
        assert!(
            text.lines().nth(3).unwrap().contains("not installed"),
            "{text}"
        );
        assert!(text.lines().nth(3).unwrap().ends_with('-'), "{text}");
    }

    #[test]
    fn json_names_the_kind_of_each_figure() {
        let r = Row::new("x", Value::unavailable("n/a (no pool API)"));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], "unavailable");
        assert_eq!(v["reason"], "n/a (no pool API)");
        let v = serde_json::to_value(Row::new("y", lat(1.0, 2.0, 3))).unwrap();
        assert_eq!(
            (v["kind"].as_str(), v["p50_ms"].as_f64()),
            (Some("latency"), Some(1.0))
        );
    }
}

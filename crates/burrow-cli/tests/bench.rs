//! `burrow bench` against a real server, so the bench cannot rot: every row is measured, and every
//! sandbox and pool it made is gone afterwards, also when it is interrupted. No figure is asserted
//! (benchmarks are not tests).

mod common;

use std::time::Duration;

use common::*;

const BURROW_ROWS: &[&str] = &[
    "cold create → first command",
    "warm create → first command",
    "exec round trip (`true`)",
    "hot pause",
    "hot resume",
    "hibernate",
    "cold resume → first command",
    "destroy",
    "exec round trip, neighbour idle",
    "exec round trip, neighbour noisy",
    "create throughput (2 concurrent)",
    "CPU per create, host-wide (throughput)",
    "idle density: host MemAvailable drop",
    "idle density: sandboxes' memory cgroup",
];

async fn assert_nothing_left(srv: &TestServer) {
    assert!(
        eventually(10, || srv.host_sandbox_dirs().is_empty()).await,
        "sandbox directories left: {:?}",
        srv.host_sandbox_dirs()
    );
    let left = srv.client().list().await.unwrap();
    assert!(left.is_empty(), "sandboxes left: {left:?}");
    let pools = srv.client().pools().await.unwrap();
    assert!(pools.is_empty(), "pools left: {pools:?}");
}

/// A server, and `burrow bench --no-peers ARGS` run against it to success.
async fn bench_without_peers(args: &str) -> Option<(TestServer, String)> {
    if !require_root("burrow bench") {
        return None;
    }
    let srv = TestServer::start().await;
    let mut full = vec!["bench", "--no-peers"];
    full.extend(args.split(' '));
    let out = srv.cli(&full);
    assert_ok(&out);
    let text = stdout(&out);
    Some((srv, text))
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_reports_every_row_and_leaves_no_sandbox() {
    // The gVisor rows have a test of their own (tests/gvisor.rs).
    let args = "--iterations 2 --throughput 3 --concurrency 2 --density 2 --no-gvisor --json";
    let Some((srv, out)) = bench_without_peers(args).await else {
        return;
    };
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let measures: Vec<&str> = rows
        .iter()
        .map(|r| r["measure"].as_str().unwrap())
        .collect();
    assert_eq!(measures, BURROW_ROWS, "{report:#}");
    for r in rows {
        match r["kind"].as_str().unwrap() {
            "latency" => {
                assert!(r["n"].as_u64().unwrap() >= 2, "{r}");
                assert!(r["p50_ms"].as_f64().unwrap() > 0.0, "{r}");
                assert!(r["p99_ms"].as_f64() >= r["p50_ms"].as_f64(), "{r}");
            }
            "rate" => assert_eq!(
                (r["n"].as_u64(), r["concurrency"].as_u64()),
                (Some(3), Some(2))
            ),
            "memory" => assert_eq!(r["n"].as_u64(), Some(2), "{r}"),
            "per_op" => {
                assert_eq!(r["n"].as_u64(), Some(3), "{r}");
                assert!(r["ms"].as_f64().unwrap() > 0.0, "{r}");
            }
            other => panic!("{other} row: {r}"),
        }
    }
    assert_eq!(report["peers"], serde_json::json!([]));
    // Where the time went, as the server reported it for each timed request.
    let ops = report["breakdown"].as_array().unwrap();
    let op = |name: &str| {
        ops.iter()
            .find(|o| o["operation"] == name)
            .unwrap_or_else(|| panic!("no {name} in the breakdown: {report:#}"))
    };
    let stage_names = |name: &str| -> Vec<String> {
        op(name)["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap().to_string())
            .collect()
    };
    let cold = stage_names("cold create");
    for stage in [
        "admission",
        "store",
        "init-cgroups",
        "init-overlay",
        "init-pid1-setup",
        "guest-start",
        "cpu-sandbox-cgroup",
        "request",
        "cpu (server + children)",
    ] {
        assert!(cold.contains(&stage.to_string()), "{stage}: {cold:?}");
    }
    assert_eq!(op("cold create")["n"].as_u64(), Some(2));
    assert!(stage_names("exec").contains(&"guest-exec".to_string()));
    assert!(stage_names("hot resume").contains(&"thaw".to_string()));
    assert!(stage_names("cold resume").contains(&"guest-start".to_string()));
    assert_nothing_left(&srv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_prints_one_table_with_p50_p99_and_n() {
    let args = "--iterations 1 --throughput 0 --density 0";
    let Some((srv, text)) = bench_without_peers(args).await else {
        return;
    };
    let header = text
        .lines()
        .find(|l| l.starts_with("burrow ") && l.contains("p50"))
        .unwrap_or_else(|| panic!("no table header:\n{text}"));
    for col in ["p99", " n ", "target"] {
        assert!(header.contains(col), "{text}");
    }
    for row in [
        "cold create → first command",
        "exec round trip",
        "cold resume",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(row) && l.contains(" ms")),
            "{row}:\n{text}"
        );
    }
    assert!(
        !text.contains("burrow ÷ peer"),
        "peers ran with --no-peers:\n{text}"
    );
    assert_nothing_left(&srv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_bench_removes_what_it_made() {
    if !require_root("burrow bench") {
        return;
    }
    let srv = TestServer::start().await;
    let mut bench = srv
        .cli_cmd(&["bench", "--iterations", "50", "--no-peers"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = srv.client();
    let mut seen = false;
    for _ in 0..400 {
        if !client.list().await.unwrap().is_empty() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(seen, "the bench never created a sandbox");
    let pid = rustix::process::Pid::from_raw(bench.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let status = bench.wait().unwrap();
    assert!(!status.success(), "an interrupted bench reported success");
    assert_nothing_left(&srv).await;
}

//! The gVisor isolation tier (docs/isolation.md): sandboxes whose system calls are served by
//! gVisor's user-space kernel, through the same API as native ones. Needs root and Debian's
//! `runsc` (`scripts/deps`); each test says why it skips without them.

mod common;

use std::time::Duration;

use burrow_client::Client;
use burrow_types::{CreateSandbox, ExecRequest, Isolation, PtySize};
use common::world::{FAKE_HOST, METADATA, PRIVATE_HOST};
use common::*;

const RUNSC: &str = "/usr/bin/runsc";

fn have_runsc(what: &str) -> bool {
    if !require_root(what) {
        return false;
    }
    if !std::path::Path::new(RUNSC).is_file() {
        eprintln!("skipping: {what} needs gVisor's runsc (scripts/deps installs Debian's package)");
        return false;
    }
    true
}

/// A server whose plans include `gfree`: the free plan's limits with `"isolation": "gvisor"`
/// (the plans file must outlive the server's start).
async fn server_with_a_gvisor_plan() -> (TestServer, tempfile::NamedTempFile) {
    let plans = tempfile::NamedTempFile::new().unwrap();
    let plan = serde_json::json!([{ "name": "gfree", "limits": {
        "cpu_millis": 500, "memory_mib": 512, "pids": 512, "disk_mib": 1024, "nofile": 1024,
        "output_bytes": 10485760, "max_duration_s": 1800, "isolation": "gvisor" } }]);
    std::fs::write(plans.path(), plan.to_string()).unwrap();
    let srv = TestServer::start_with_env(&[("BURROW_PLANS", plans.path().to_str().unwrap())]).await;
    (srv, plans)
}

fn gvisor() -> CreateSandbox {
    CreateSandbox {
        isolation: Some(Isolation::Gvisor),
        ..Default::default()
    }
}

fn argv(a: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: a.iter().map(|s| s.to_string()).collect(),
        timeout_ms: Some(120_000),
        ..Default::default()
    }
}

/// Processes on the host whose command line names `needle` (runsc's sandbox and gofer name the
/// container id).
fn host_processes_naming(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gvisor_sandbox_runs_python_node_files_and_a_pty_on_a_kernel_of_its_own() {
    if !have_runsc("gVisor sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let sb = c.create(&gvisor()).await.unwrap();
    assert_eq!(sb.isolation, Isolation::Gvisor);
    assert_eq!(sb.platform.as_deref(), Some("ptrace"));
    let id = sb.id;

    // Another kernel: its release and its boot log are gVisor's, not the host's.
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let r = run(&c, &id, "uname -r; dmesg | head -n 1").await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert!(
        !r.stdout.contains(host_release.trim()),
        "the host's kernel answered: {r:?}"
    );
    assert!(r.stdout.contains("gVisor"), "{r:?}");
    // A system call the host kernel has and gVisor does not implement: ENOSYS from gVisor's
    // kernel (a native sandbox's seccomp filter says EPERM before the host kernel sees it).
    let r = py(
        &c,
        &id,
        "import ctypes, os; l = ctypes.CDLL(None, use_errno=True); \
         print(l.syscall(323, 0), os.strerror(ctypes.get_errno()))",
    )
    .await;
    assert_eq!(r.stdout.trim(), "-1 Function not implemented", "{r:?}");

    // Python, Node, coreutils (ls and stat need the guest's statx fallback), pipes.
    let r = run(
        &c,
        &id,
        "python3 -c 'print(6*7)' && node -e 'console.log(\"node\", 6*7)' && ls -la /workspace && stat -c %U /workspace",
    )
    .await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert!(r.stdout.starts_with("42\nnode 42\n"), "{r:?}");
    assert!(r.stdout.trim_end().ends_with("user"), "{r:?}");

    // Files through the API, both ways, and what the sandbox sees of them.
    c.upload(&id, "/workspace/in.txt", b"from the host".to_vec())
        .await
        .unwrap();
    let r = run(
        &c,
        &id,
        "cat /workspace/in.txt; echo -n made inside > /workspace/out.txt",
    )
    .await;
    assert_eq!(r.stdout, "from the host", "{r:?}");
    let body = c
        .download(&id, "/workspace/out.txt")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "made inside");
    let st = c.stat(&id, "/workspace/out.txt").await.unwrap();
    assert_eq!(st.size, 11);
    let listing = c.list_dir(&id, "/workspace", None, None).await.unwrap();
    let names: Vec<&str> = listing.entries.iter().map(|e| e.name.as_str()).collect();
    assert!(
        names.contains(&"in.txt") && names.contains(&"out.txt"),
        "{names:?}"
    );

    // A terminal: the command runs on a pseudo-terminal of gVisor's.
    let mut s = c
        .exec_stream(
            &id,
            &ExecRequest {
                pty: Some(PtySize {
                    cols: 100,
                    rows: 30,
                }),
                ..argv(&["/bin/sh", "-c", "tty; stty size"])
            },
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.next())
            .await
            .expect("pty exec hung")
            .unwrap()
        {
            Some(burrow_client::Output::Stdout(b)) => out.extend(b),
            Some(burrow_client::Output::Event(burrow_types::stream::StreamEvent::Exit {
                exit_code,
                ..
            })) => {
                assert_eq!(exit_code, Some(0));
                break;
            }
            Some(_) => {}
            None => panic!("stream closed before the exit"),
        }
    }
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("/dev/pts/") && out.contains("30 100"),
        "{out:?}"
    );

    c.delete(&id).await.unwrap();
    assert!(
        host_leftovers(&srv, &id).is_empty(),
        "{:?}",
        host_leftovers(&srv, &id)
    );
    assert!(
        host_processes_naming(&id).is_empty(),
        "{:?}",
        host_processes_naming(&id)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tier_the_node_lacks_is_refused_with_isolation_unavailable() {
    if !require_root("starting a server") {
        return;
    }
    let srv = TestServer::start_with_env(&[("BURROW_RUNSC", "/nonexistent/runsc")]).await;
    let (status, body) = srv
        .client()
        .raw(
            reqwest::Method::POST,
            "/v1/sandboxes",
            Some(&serde_json::json!({"isolation": "gvisor"})),
        )
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 400);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "isolation_unavailable", "{body}");
    // The CLI says the same, and a native sandbox is still there for the asking.
    let o = srv.cli(&["create", "--isolation", "gvisor"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("isolation_unavailable"),
        "{o:?}"
    );
    assert_ok(&srv.cli(&["create", "--isolation", "native"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn cpu_and_memory_limits_hold_and_a_memory_bomb_costs_no_files() {
    if !have_runsc("gVisor limits") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let id = c.create(&gvisor()).await.unwrap().id;
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/burrow/{id}/memory.limit_in_bytes"
    ))
    .unwrap_or_default();
    assert_eq!(
        limit.trim(),
        ((512 + 128) * 1024 * 1024).to_string(),
        "the plan's memory plus the Sentry's headroom"
    );
    // CPU: two spinning processes for 3 s of wall time get about half a core (the free plan),
    // as the cgroup's own accounting says.
    let cpu = |id: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/cpuacct/burrow/{id}/cpuacct.usage"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let quota = std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/burrow/{id}/cpu.cfs_quota_us"))
        .unwrap_or_default();
    assert_eq!(quota.trim(), "50000", "the free plan's half core");
    let before = cpu(&id).unwrap_or(0);
    let start = std::time::Instant::now();
    let r = run(
        &c,
        &id,
        "for i in 1 2; do timeout 3 sh -c 'while :; do :; done' & done; wait",
    )
    .await;
    let wall = start.elapsed().as_nanos() as u64;
    let used = cpu(&id).unwrap_or(0) - before;
    assert!(r.exit_code.is_some(), "{r:?}");
    // The quota allows half of the wall time; one whole core's worth would mean it did not hold.
    assert!(
        used < wall * 3 / 4,
        "used {used} ns of CPU in {wall} ns of wall time"
    );
    c.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn gvisor_egress_is_the_same_policy_as_native() {
    if !have_runsc("gVisor networking") {
        return;
    }
    let srv = TestServer::start_in_world(&[]).await;
    let c = srv.client();
    let probe = format!(
        r#"
import socket
for h, p in [("{FAKE_HOST}", 80), ("{PRIVATE_HOST}", 80), ("{METADATA}", 80)]:
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((h, p)); print(1, end="")
    except Exception:
        print(0, end="")
"#
    );
    let mut seen = Vec::new();
    for isolation in [Isolation::Native, Isolation::Gvisor] {
        let sb = c
            .create(&CreateSandbox {
                isolation: Some(isolation),
                ..Default::default()
            })
            .await
            .unwrap();
        let r = py(&c, &sb.id, &probe).await;
        let curl = run(&c, &sb.id, "curl -sS -f --max-time 5 http://fake.internet/").await;
        assert!(
            curl.stdout.contains("host=fake.internet"),
            "{isolation:?}: {curl:?}\n{}",
            srv.log()
        );
        seen.push((isolation, r.stdout));
        c.delete(&sb.id).await.unwrap();
    }
    // The fake internet yes; the private range and the metadata address no; both tiers alike.
    assert_eq!(seen[0].1, "100", "{seen:?}");
    assert_eq!(seen[0].1, seen[1].1, "{seen:?}");
}

/// A background counter that also keeps a dict in memory: it writes "<pid> <count> <dict size>"
/// to /workspace/counter every 0.1 s.
const COUNTER: &str = r#"
import os, time
d = {}
i = 0
while True:
    i += 1
    d[i] = "x" * 100
    with open("/workspace/counter.tmp", "w") as f:
        f.write(f"{os.getpid()} {i} {len(d)}")
    os.replace("/workspace/counter.tmp", "/workspace/counter")
    time.sleep(0.1)
"#;

async fn counter(c: &Client, id: &str) -> (u32, u64, u64) {
    let r = run(c, id, "cat /workspace/counter").await;
    let v: Vec<u64> = r
        .stdout
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    assert_eq!(v.len(), 3, "{r:?}");
    (v[0] as u32, v[1], v[2])
}

/// Starts the counter in the background and returns its first reading.
async fn first_count(c: &Client, id: &str) -> (u32, u64, u64) {
    c.start_process(id, &argv(&["python3", "-c", COUNTER]))
        .await
        .unwrap();
    for _ in 0..300 {
        let r = run(c, id, "cat /workspace/counter 2>/dev/null").await;
        if !r.stdout.is_empty() {
            return counter(c, id).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the counter never started");
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_and_resume_keep_a_gvisor_sandbox_running_where_it_was() {
    if !have_runsc("gVisor pause") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let id = c.create(&gvisor()).await.unwrap().id;
    let (pid, n, _) = first_count(&c, &id).await;
    let paused = c.pause(&id).await.unwrap();
    assert_eq!(paused.state, burrow_types::SandboxState::Paused);
    assert!(c.exec(&id, &argv(&["true"])).await.is_err());
    c.resume(&id).await.unwrap();
    let (pid2, n2, size2) = counter(&c, &id).await;
    assert_eq!(pid2, pid, "the same process carries on");
    assert!(n2 >= n && size2 == n2, "{n} then {n2} ({size2})");
    c.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn hibernate_keeps_processes_and_memory_across_a_server_restart() {
    if !have_runsc("gVisor checkpoint and restore") {
        return;
    }
    let mut srv = TestServer::start().await;
    let c = srv.client();
    let id = c.create(&gvisor()).await.unwrap().id;
    let (pid, _, _) = first_count(&c, &id).await;
    // Let it count a while, then hibernate: the state says the resume will be hot.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let h = c.hibernate(&id).await.unwrap();
    assert_eq!(h.state, burrow_types::SandboxState::Hibernated);
    assert_eq!(
        h.resume_from.as_deref(),
        Some("checkpoint"),
        "{}",
        srv.log()
    );
    // Nothing of the sandbox runs on the host: no runsc, no Sentry, no gofer.
    assert!(
        host_processes_naming(&id).is_empty(),
        "{:?}",
        host_processes_naming(&id)
    );
    let procs = std::fs::read_to_string(format!("/sys/fs/cgroup/pids/burrow/{id}/cgroup.procs"))
        .unwrap_or_default();
    assert!(procs.trim().is_empty(), "{procs}");
    let image = srv
        .data
        .join(format!("sandboxes/{id}/checkpoint/checkpoint.img"));
    assert!(image.is_file(), "no checkpoint at {}", image.display());

    srv.restart().await;
    let c = srv.client();
    assert_eq!(
        c.get(&id).await.unwrap().resume_from.as_deref(),
        Some("checkpoint")
    );
    let r = c.resume(&id).await.unwrap();
    assert_eq!(r.state, burrow_types::SandboxState::Running);
    let (pid2, n2, size2) = counter(&c, &id).await;
    assert_eq!(pid2, pid, "the same process, restored");
    assert_eq!(size2, n2, "its dict kept every entry");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, n3, size3) = counter(&c, &id).await;
    assert!(n3 > n2 && size3 == n3, "it keeps counting: {n2} then {n3}");
    c.delete(&id).await.unwrap();
    assert!(host_processes_naming(&id).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_gvisor_pool_serves_claims_with_the_hostname_set_inside_gvisor() {
    if !have_runsc("gVisor warm pools") {
        return;
    }
    let (srv, _plans) = server_with_a_gvisor_plan().await;
    let c = srv.client();
    c.put_pool(
        "g",
        &burrow_types::PoolSpec {
            plan: Some("gfree".into()),
            size: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut ready = false;
    for _ in 0..600 {
        if c.pools().await.unwrap().iter().any(|p| p.ready >= 1) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the pool never filled:\n{}", srv.log());
    // A native create of the same plan's size does not take a gVisor sandbox.
    let native = c
        .create(&CreateSandbox {
            plan: Some("gfree".into()),
            isolation: Some(Isolation::Native),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!native.warm_hit);
    assert_eq!(native.isolation, Isolation::Native);
    let sb = c
        .create(&CreateSandbox {
            plan: Some("gfree".into()),
            hostname: Some("agent-7".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(sb.warm_hit, "{}", srv.log());
    assert_eq!(sb.isolation, Isolation::Gvisor);
    let r = run(&c, &sb.id, "hostname; cat /etc/hostname; uname -r").await;
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[..2], ["agent-7", "agent-7"], "{r:?}");
    c.delete(&sb.id).await.unwrap();
    c.delete(&native.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_measures_gvisor_next_to_native() {
    if !have_runsc("the gVisor bench rows") {
        return;
    }
    let (srv, _plans) = server_with_a_gvisor_plan().await;
    let out = srv.cli(&[
        "bench",
        "--no-peers",
        "--iterations",
        "2",
        "--throughput",
        "0",
        "--density",
        "0",
        "--gvisor-plan",
        "gfree",
        "--json",
    ]);
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let row = |m: &str| {
        rows.iter()
            .find(|r| r["measure"] == m)
            .unwrap_or_else(|| panic!("no row {m}: {report:#}"))
    };
    for m in [
        "cold create → first command",
        "exec round trip (`true`)",
        "gVisor: cold create → first command",
        "gVisor: warm create → first command (pool)",
        "gVisor: exec round trip (`true`)",
        "gVisor: hibernate (runsc checkpoint)",
        "gVisor: resume (runsc restore) → first command",
    ] {
        let r = row(m);
        assert_eq!(r["kind"], "latency", "{r}");
        assert!(r["n"].as_u64().unwrap() >= 1, "{r}");
    }
    assert!(
        row("gVisor: hibernate (runsc checkpoint)")["note"].is_null(),
        "a hibernation fell back to cold: {report:#}"
    );
    assert!(srv.client().list().await.unwrap().is_empty());
}

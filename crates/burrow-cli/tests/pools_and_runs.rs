//! The lifecycle issue's warm pool, runs and ephemeral sandboxes, against a real `burrow up`:
//! claims under concurrency, context injection, tool-call limits, run callbacks and memory
//! pressure. Timing here is about behaviour (a pool refills, a limit fires), never about speed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use burrow_client::Client;
use burrow_types::{CreateSandbox, PoolStatus, RunSpec, RunState, SandboxState};
use common::*;

/// The script's stdout; it must succeed.
async fn run_sh(c: &Client, id: &str, script: &str) -> String {
    let r = run(c, id, script).await;
    assert_eq!(r.exit_code, Some(0), "{script}: {}", r.stderr);
    r.stdout
}

/// A server with a `tiny` plan (small disk, three tool calls per run) and the given pools. Its
/// 64 pids let 250 live sandboxes fit the host's pid budget (docs/adr/0046).
async fn server(pools: serde_json::Value, extra: &[(&str, &str)]) -> (TestServer, TempFiles) {
    let plans = tempfile::NamedTempFile::new().unwrap();
    let tiny = serde_json::json!([{ "name": "tiny", "limits": {
        "cpu_millis": 500, "memory_mib": 256, "pids": 64, "disk_mib": 64, "nofile": 1024,
        "output_bytes": 1048576, "max_duration_s": 3600, "tool_calls": 3 } },
        { "name": "roomy", "limits": {
        "cpu_millis": 1500, "memory_mib": 768, "pids": 256, "disk_mib": 64, "nofile": 1024,
        "output_bytes": 1048576, "max_duration_s": 3600, "tool_calls": 3 } }]);
    std::fs::write(plans.path(), tiny.to_string()).unwrap();
    let pools_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pools_file.path(), pools.to_string()).unwrap();
    let mut env = vec![
        ("BURROW_PLANS", plans.path().to_str().unwrap()),
        ("BURROW_POOLS", pools_file.path().to_str().unwrap()),
    ];
    env.extend_from_slice(extra);
    let srv = TestServer::start_with_env(&env).await;
    (srv, TempFiles(vec![plans, pools_file]))
}

/// Files the server reads at start; kept alive as long as the server.
struct TempFiles(#[allow(dead_code)] Vec<tempfile::NamedTempFile>);

async fn pool(c: &Client, name: &str) -> PoolStatus {
    c.pools()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no pool {name}"))
}

async fn wait_ready(c: &Client, name: &str, n: u32, secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let p = pool(c, name).await;
        if p.ready >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pool {name} never reached {n} ready: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tiny() -> CreateSandbox {
    CreateSandbox {
        plan: Some("tiny".into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_creates_against_a_pool_of_fifty() {
    if !require_root("starting sandboxes") {
        return;
    }
    let (srv, _files) = server(
        serde_json::json!({"hot": {"plan": "tiny", "size": 50}}),
        &[],
    )
    .await;
    let c = srv.client();
    wait_ready(&c, "hot", 50, 300).await;

    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let req = CreateSandbox {
                    metadata: BTreeMap::from([("n".to_string(), i.to_string())]),
                    ..tiny()
                };
                (i, c.create(&req).await)
            })
        })
        .collect();
    let mut made = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        let sb = r.unwrap_or_else(|e| panic!("create {i} failed: {e}\n{}", srv.log()));
        assert_eq!(sb.state, SandboxState::Running);
        assert_eq!(
            sb.metadata["n"],
            i.to_string(),
            "create {i} got another's sandbox"
        );
        made.push(sb);
    }
    let ids: BTreeSet<_> = made.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids.len(), 200, "a sandbox was handed out twice");
    let warm = made.iter().filter(|s| s.warm_hit).count() as u64;
    // The fifty that were ready, plus the few the replenisher built in the gaps between arriving
    // requests (it builds only while no create is in flight). The rest went cold at once: had
    // creates waited for the pool, nearly all 200 would be warm hits.
    assert!(warm >= 50, "only {warm} warm hits with 50 ready");
    assert!(
        200 - warm >= 130,
        "{warm} warm hits: creates waited for the pool"
    );
    let mine = c.list().await.unwrap();
    assert_eq!(mine.len(), 200, "the user sees exactly its 200 sandboxes");

    let p = pool(&c, "hot").await;
    assert_eq!((p.claims, p.cold_fallbacks), (warm, 200 - warm));
    assert_eq!(p.hit_rate_24h, Some(warm as f64 / 200.0));
    let metrics = reqwest::get(format!("{}/metrics", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "burrow_pool_target{pool=\"hot\"} 50".to_string(),
        format!("burrow_pool_claims_total{{pool=\"hot\"}} {warm}"),
        format!(
            "burrow_pool_cold_fallbacks_total{{pool=\"hot\"}} {}",
            200 - warm
        ),
        format!(
            "burrow_pool_hit_rate_24h{{pool=\"hot\"}} {}",
            warm as f64 / 200.0
        ),
        "burrow_sandboxes{state=\"running\"} 200".to_string(),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
    // The replenisher brings the pool back to its target.
    wait_ready(&c, "hot", 50, 300).await;

    let deletes: Vec<_> = made
        .into_iter()
        .map(|s| {
            let c = c.clone();
            tokio::spawn(async move { c.delete(&s.id).await })
        })
        .collect();
    for d in deletes {
        d.await.unwrap().unwrap();
    }
    c.delete_pool("hot").await.unwrap();
    assert!(
        eventually(60, || srv.host_sandbox_dirs().is_empty()).await,
        "sandboxes left after deleting everything: {:?}",
        srv.host_sandbox_dirs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_sandbox_takes_the_callers_context_and_is_never_reused() {
    if !require_root("starting sandboxes") {
        return;
    }
    let (srv, _files) = server(serde_json::json!({"p": {"plan": "tiny", "size": 2}}), &[]).await;
    let c = srv.client();
    wait_ready(&c, "p", 2, 120).await;

    // A different plan with the same disk: the warm sandbox gets roomy's CPU, memory and pids.
    let req = CreateSandbox {
        plan: Some("roomy".into()),
        hostname: Some("agent-one".into()),
        env: BTreeMap::from([("SECRET".to_string(), "first-claimant".to_string())]),
        files: BTreeMap::from([
            ("notes/plan.md".to_string(), "step one\n".to_string()),
            ("/etc/agent.conf".to_string(), "mode=fast\n".to_string()),
        ]),
        run: Some(RunSpec {
            task: "fix the bug".into(),
            memory_tokens: vec!["mem-123".into()],
            callback_url: None,
            env: BTreeMap::from([("RUN_ONLY".to_string(), "yes".to_string())]),
        }),
        ..Default::default()
    };
    let a = c.create(&req).await.unwrap();
    assert!(a.warm_hit, "a ready pool should serve this create: {a:?}");
    assert_eq!(
        (a.plan.as_str(), a.hostname.as_str()),
        ("roomy", "agent-one")
    );
    let inside = run_sh(
        &c,
        &a.id,
        "hostname; cat /etc/hostname; grep -c agent-one /etc/hosts; echo $SECRET $RUN_ONLY $HOSTNAME; \
         cat /workspace/notes/plan.md /etc/agent.conf; cat /etc/burrow/run.json",
    )
    .await;
    let lines: Vec<&str> = inside.lines().collect();
    assert_eq!(
        &lines[..6],
        &[
            "agent-one",
            "agent-one",
            "1",
            "first-claimant yes agent-one",
            "step one",
            "mode=fast"
        ],
        "{inside}"
    );
    let run: serde_json::Value = serde_json::from_str(&lines[6..].join("\n")).unwrap();
    assert_eq!(run["task"], "fix the bug");
    assert_eq!(run["memory_tokens"][0], "mem-123");
    // Limits are in the sandbox's cgroups, read from the host.
    let cg = |ctrl: &str, file: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{ctrl}/burrow/{}/{file}", a.id))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        cg("memory", "memory.limit_in_bytes"),
        (768u64 << 20).to_string()
    );
    assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "150000");
    assert_eq!(cg("pids", "pids.max"), "256");

    c.delete(&a.id).await.unwrap();
    assert!(host_leftovers(&srv, &a.id).is_empty());
    // Every later create, warm or cold, is a different computer with none of A's context.
    wait_ready(&c, "p", 2, 120).await;
    for _ in 0..3 {
        let b = c.create(&tiny()).await.unwrap();
        assert_ne!(b.id, a.id);
        assert_eq!(b.hostname, b.id);
        let seen = run_sh(
            &c,
            &b.id,
            "echo \"[$SECRET][$RUN_ONLY]\"; hostname; ls /workspace; ls /etc/burrow 2>&1 || true",
        )
        .await;
        assert!(seen.starts_with("[][]\n"), "{seen}");
        assert!(
            !seen.contains("agent-one") && !seen.contains("notes") && !seen.contains("run.json")
        );
        c.delete(&b.id).await.unwrap();
    }
    assert_eq!(
        c.get(&a.id).await.unwrap_err().code(),
        Some("sandbox_not_found")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_past_the_plan_limit_end_the_run() {
    if !require_root("starting sandboxes") {
        return;
    }
    // The receiver is on loopback, which callbacks may reach only when the operator allows it.
    let (srv, _files) = server(
        serde_json::json!({}),
        &[("BURROW_CALLBACK_ALLOW", "127.0.0.0/8")],
    )
    .await;
    let c = srv.client();
    let (port, calls) = http_receiver("127.0.0.1:0");
    let hook = format!("http://127.0.0.1:{port}/hook");
    let with_run = |ephemeral: bool, callback: Option<String>| CreateSandbox {
        ephemeral,
        run: Some(RunSpec {
            task: "three calls".into(),
            callback_url: callback,
            ..Default::default()
        }),
        ..tiny()
    };

    // Ephemeral: the fourth tool call ends the run, the sandbox is in `error` with the reason and
    // its computer is gone.
    let eph = c.create(&with_run(true, Some(hook.clone()))).await.unwrap();
    assert_eq!(eph.run.as_ref().unwrap().tool_call_limit, 3);
    run_sh(&c, &eph.id, "echo 1 > /workspace/a").await;
    c.stat(&eph.id, "/workspace/a").await.unwrap();
    c.list_dir(&eph.id, "/workspace", None, None).await.unwrap();
    let (status, body) = c
        .raw(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{}/exec", eph.id),
            Some(&sh("true")),
        )
        .await
        .unwrap();
    let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status.as_u16(), 429, "{err}");
    assert_eq!(err["code"], "tool_iterations_exceeded");
    assert_eq!(
        (
            err["details"]["limit"].as_u64(),
            err["details"]["observed"].as_u64()
        ),
        (Some(3), Some(4))
    );
    let gone = c.get(&eph.id).await.unwrap();
    assert_eq!(gone.state, SandboxState::Error);
    assert_eq!(gone.error.unwrap().code, "tool_iterations_exceeded");
    assert!(
        host_leftovers(&srv, &eph.id).is_empty(),
        "{:?}",
        host_leftovers(&srv, &eph.id)
    );
    // The run's callback hears of it, signed with the caller's own callback key over the
    // timestamp and the body.
    let (head, body) = calls
        .recv_timeout(Duration::from_secs(20))
        .expect("no callback");
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (event["event"].as_str(), event["sandbox_id"].as_str()),
        (Some("run.ended"), Some(eph.id.as_str()))
    );
    assert_eq!(event["reason"]["code"], "tool_iterations_exceeded");
    let key = c.callback_key().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let t = event["timestamp"]
        .as_i64()
        .expect("a timestamp in the body");
    let sig =
        burrow_server::callback::hmac_sha256(key.as_bytes(), format!("{t}.{body}").as_bytes());
    let want = format!("x-burrow-signature: t={t},v1={}", hex_lower(&sig));
    assert!(
        head.to_ascii_lowercase().lines().any(|l| l == want),
        "{head}"
    );

    // Persistent: the run ends but the computer and its files stay; tool calls are refused until
    // a new run starts.
    let per = c.create(&with_run(false, None)).await.unwrap();
    for _ in 0..3 {
        run_sh(&c, &per.id, "echo kept >> /workspace/log").await;
    }
    let over = c.exec(&per.id, &sh("true")).await.unwrap_err();
    assert_eq!(over.code(), Some("tool_iterations_exceeded"));
    let after = c.exec(&per.id, &sh("true")).await.unwrap_err();
    assert_eq!(after.code(), Some("run_ended"));
    let sb = c.get(&per.id).await.unwrap();
    assert_eq!(sb.state, SandboxState::Running);
    let run = sb.run.unwrap();
    assert_eq!((run.state, run.tool_calls), (RunState::Ended, 3));
    assert_eq!(run.ended.unwrap().code, "tool_iterations_exceeded");
    c.start_run(
        &per.id,
        &RunSpec {
            task: "again".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        run_sh(&c, &per.id, "cat /workspace/log").await,
        "kept\nkept\nkept\n"
    );

    // Ending the run by hand destroys an ephemeral sandbox; a sandbox without a run is not counted.
    let eph2 = c.create(&with_run(true, None)).await.unwrap();
    c.end_run(&eph2.id).await.unwrap();
    assert_eq!(
        c.get(&eph2.id).await.unwrap_err().code(),
        Some("sandbox_not_found")
    );
    assert!(host_leftovers(&srv, &eph2.id).is_empty());
    let free = c.create(&tiny()).await.unwrap();
    for _ in 0..6 {
        run_sh(&c, &free.id, "true").await;
    }
    assert_eq!(
        c.end_run(&free.id).await.unwrap_err().code(),
        Some("no_run")
    );

    // Deleting a sandbox ends its run too, and the callback hears why.
    let doomed = c.create(&with_run(false, Some(hook))).await.unwrap();
    c.delete(&doomed.id).await.unwrap();
    let (_, body) = calls
        .recv_timeout(Duration::from_secs(20))
        .expect("no callback");
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["sandbox_id"].as_str(), Some(doomed.id.as_str()));
    assert_eq!(event["reason"]["code"], "sandbox_destroyed");
    assert_eq!(event["sandbox_destroyed"], true);
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ephemeral_sandbox_is_destroyed_at_its_idle_timeout_even_if_it_asked_to_pause() {
    if !require_root("starting sandboxes") {
        return;
    }
    let (srv, _files) = server(serde_json::json!({}), &[]).await;
    let c = srv.client();
    let eph = c
        .create(&CreateSandbox {
            ephemeral: true,
            timeout_s: Some(1),
            on_timeout: Some(burrow_types::OnTimeout::Pause),
            ..tiny()
        })
        .await
        .unwrap();
    let persistent = c
        .create(&CreateSandbox {
            timeout_s: Some(1),
            on_timeout: Some(burrow_types::OnTimeout::Pause),
            ..tiny()
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let e = c.get(&eph.id).await;
        let p = c.get(&persistent.id).await.unwrap();
        if e.is_err() && p.state == SandboxState::Paused {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ephemeral {e:?}, persistent {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(host_leftovers(&srv, &eph.id).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn under_memory_pressure_paused_sandboxes_hibernate_early() {
    if !require_root("starting sandboxes") {
        return;
    }
    // A floor above any machine's memory: the host is always "under pressure".
    let (srv, _files) = server(
        serde_json::json!({}),
        &[("BURROW_HIBERNATE_BELOW_MIB", "1000000000")],
    )
    .await;
    let c = srv.client();
    let paused = c.create(&tiny()).await.unwrap();
    let running = c.create(&tiny()).await.unwrap();
    run_sh(&c, &paused.id, "echo before > /workspace/f").await;
    c.pause(&paused.id).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.get(&paused.id).await.unwrap().state != SandboxState::Hibernated {
        assert!(
            std::time::Instant::now() < deadline,
            "never hibernated:\n{}",
            srv.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Running sandboxes are left alone; the hibernated one resumes cold with its files.
    assert_eq!(
        c.get(&running.id).await.unwrap().state,
        SandboxState::Running
    );
    c.resume(&paused.id).await.unwrap();
    assert_eq!(run_sh(&c, &paused.id, "cat /workspace/f").await, "before\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_changes_are_for_admins_and_bad_specs_are_refused() {
    if !require_root("starting a server") {
        return;
    }
    let (srv, _files) = server(serde_json::json!({}), &[]).await;
    let admin = srv.client();
    let key = admin.create_user("bob", None).await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let bob = srv.client_with(&key);
    let spec = |size, plan: &str| burrow_types::PoolSpec {
        image: None,
        plan: Some(plan.into()),
        size,
    };
    assert_eq!(
        bob.put_pool("p", &spec(1, "tiny"))
            .await
            .unwrap_err()
            .code(),
        Some("forbidden")
    );
    assert!(
        bob.pools().await.unwrap().is_empty(),
        "anyone may read pool status"
    );
    for (name, s, code) in [
        ("p", spec(1, "nope"), "unknown_plan"),
        ("p", spec(100_000, "tiny"), "bad_request"),
        ("bad name", spec(1, "tiny"), "bad_request"),
    ] {
        assert_eq!(
            admin.put_pool(name, &s).await.unwrap_err().code(),
            Some(code)
        );
    }
    let bad_image = burrow_types::PoolSpec {
        image: Some("nope".into()),
        ..spec(1, "tiny")
    };
    assert_eq!(
        admin.put_pool("p", &bad_image).await.unwrap_err().code(),
        Some("unknown_image")
    );
    assert_eq!(
        admin.delete_pool("none").await.unwrap_err().code(),
        Some("unknown_pool")
    );
    let bad_run = CreateSandbox {
        run: Some(RunSpec {
            callback_url: Some("ftp://example.test/hook".into()),
            ..Default::default()
        }),
        ..tiny()
    };
    assert_eq!(
        admin.create(&bad_run).await.unwrap_err().code(),
        Some("bad_request")
    );
    let zero_timeout = CreateSandbox {
        timeout_s: Some(0),
        ..tiny()
    };
    let too_many_files = CreateSandbox {
        files: (0..65).map(|i| (format!("f{i}"), String::new())).collect(),
        ..tiny()
    };
    for bad in [zero_timeout, too_many_files] {
        assert_eq!(
            admin.create(&bad).await.unwrap_err().code(),
            Some("bad_request")
        );
    }
    // Refused before anything was built.
    assert!(admin.list().await.unwrap().is_empty());
    assert!(srv.host_sandbox_dirs().is_empty());
    drop(srv);
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_sandboxes_survive_a_server_restart_and_lost_ones_are_rebuilt() {
    if !require_root("starting sandboxes") {
        return;
    }
    let (mut srv, _files) =
        server(serde_json::json!({"p": {"plan": "tiny", "size": 2}}), &[]).await;
    wait_ready(&srv.client(), "p", 2, 120).await;
    let before: BTreeSet<String> = srv.host_sandbox_dirs().into_iter().collect();
    assert_eq!(before.len(), 2);
    // A restart of the server adopts the warm sandboxes as they are.
    srv.restart().await;
    let c = srv.client();
    let p = pool(&c, "p").await;
    assert_eq!((p.ready, p.starting), (2, 0), "{p:?}");
    let after: BTreeSet<String> = srv.host_sandbox_dirs().into_iter().collect();
    assert_eq!(
        before, after,
        "warm sandboxes were rebuilt instead of adopted"
    );
    let claimed = c.create(&tiny()).await.unwrap();
    assert!(claimed.warm_hit && before.contains(&claimed.id));
    // As after a host reboot: the warm sandboxes' processes die with the server down. They hold no
    // one's files, so they are dropped and the pool is refilled with new ones.
    srv.kill9();
    for id in srv.host_sandbox_dirs() {
        if id != claimed.id {
            force_clean(&id);
        }
    }
    srv.restart().await;
    let c = srv.client();
    wait_ready(&c, "p", 2, 120).await;
    let now: BTreeSet<String> = srv.host_sandbox_dirs().into_iter().collect();
    assert!(now.contains(&claimed.id), "the user's sandbox stays");
    assert!(
        now.iter().filter(|id| before.contains(*id)).count() == 1,
        "{now:?}"
    );
    assert_eq!(
        c.get(&claimed.id).await.unwrap().state,
        SandboxState::Running
    );
}

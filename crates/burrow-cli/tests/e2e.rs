//! The foundation issue's "done when" list, as a new user would try it: the real server, the real
//! CLI, real sandboxes on the real kernel.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use burrow_client::ClientError;
use burrow_types::{CreateSandbox, ExecRequest, SandboxState};
use common::*;

fn cmd(args: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    cmd(&["/bin/sh", "-c", script])
}

fn create_cli(srv: &TestServer) -> String {
    let out = srv.cli(&["create"]);
    assert_ok(&out);
    let id = stdout(&out).trim().to_string();
    assert_eq!(id.len(), 20, "create printed {id:?}");
    id
}

fn exec_cli(srv: &TestServer, id: &str, args: &[&str]) -> String {
    let mut full = vec!["exec", id, "--"];
    full.extend_from_slice(args);
    let out = srv.cli(&full);
    assert_ok(&out);
    stdout(&out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_is_a_computer_of_its_own() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let id = create_cli(&srv);

    let cmdline = exec_cli(&srv, &id, &["cat", "/proc/1/cmdline"]);
    assert!(
        cmdline.starts_with("/run/burrow/guest"),
        "PID 1 is {cmdline:?}"
    );

    assert_eq!(exec_cli(&srv, &id, &["hostname"]).trim(), id);
    let me = exec_cli(&srv, &id, &["id"]);
    assert!(me.starts_with("uid=0(root) gid=0(root)"), "id says {me:?}");

    // Only the sandbox's own processes: the guest (PID 1) and `ps` itself.
    let ps = exec_cli(&srv, &id, &["ps", "-e", "-o", "pid=,comm="]);
    let pids: Vec<&str> = ps
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        pids.len(),
        2,
        "ps shows more than the guest and itself:\n{ps}"
    );
    assert_eq!(pids[0], "1");

    let links = exec_cli(&srv, &id, &["ip", "-o", "link"]);
    let names: Vec<&str> = links.lines().filter_map(|l| l.split(": ").nth(1)).collect();
    assert_eq!(names, ["lo"], "interfaces: {links}");

    // Root inside is an unprivileged, per-sandbox uid outside.
    let map = exec_cli(&srv, &id, &["cat", "/proc/self/uid_map"]);
    let fields: Vec<u64> = map.split_whitespace().map(|f| f.parse().unwrap()).collect();
    assert_eq!(fields[0], 0);
    assert!(
        fields[1] >= 65536,
        "root inside maps to host uid {}",
        fields[1]
    );
    let other = create_cli(&srv);
    let map2 = exec_cli(&srv, &other, &["cat", "/proc/self/uid_map"]);
    assert_ne!(map, map2, "two sandboxes share a uid range");

    // `ls` and `get` show it; `--json` gives the document.
    let ls = stdout(&srv.cli(&["ls"]));
    assert!(ls.contains(&id) && ls.contains("running"), "ls:\n{ls}");
    let doc: serde_json::Value =
        serde_json::from_slice(&srv.cli(&["--json", "get", &id]).stdout).unwrap();
    assert_eq!(doc["state"], "running");
    assert_eq!(doc["limits"]["memory_mib"], 512);
}

#[tokio::test(flavor = "multi_thread")]
async fn cp_round_trips_100_mib_and_the_disk_limit_holds() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let id = create_cli(&srv);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.bin");
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let mut rng = std::fs::File::open("/dev/urandom").unwrap();
        std::io::copy(&mut std::io::Read::by_ref(&mut rng).take(100 << 20), &mut f).unwrap();
        f.flush().unwrap();
    }
    use std::io::Read;
    assert_ok(&srv.cli(&[
        "cp",
        src.to_str().unwrap(),
        &format!("{id}:/workspace/in/big.bin"),
    ]));
    let size = exec_cli(&srv, &id, &["stat", "-c", "%s", "/workspace/in/big.bin"]);
    assert_eq!(size.trim(), (100u64 << 20).to_string());
    let back = dir.path().join("back.bin");
    assert_ok(&srv.cli(&[
        "cp",
        &format!("{id}:/workspace/in/big.bin"),
        back.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(),
        "100 MiB copy differs after the round trip"
    );

    // Past the 1 GiB disk: ENOSPC inside, nothing on the host grows past the image.
    let out = srv
        .client()
        .exec(
            &id,
            &sh("dd if=/dev/zero of=/workspace/fill bs=1M count=1300 2>&1; echo rc=$?"),
        )
        .await
        .unwrap();
    // ENOSPC on an ext4 disk, EDQUOT at a btrfs volume's quota.
    assert!(
        out.stdout.contains("No space left on device")
            || out.stdout.contains("Disk quota exceeded"),
        "dd said: {}",
        out.stdout
    );
    assert!(!out.stdout.contains("rc=0"));
    let img = srv.data.join("sandboxes").join(&id).join("disk.img");
    let allocated = std::fs::metadata(&img)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0);
    assert!(
        allocated <= 1100 << 20,
        "sandbox disk uses {allocated} bytes on the host"
    );
    // The API says so too, with a stable code.
    let err = srv
        .client()
        .upload(&id, "/workspace/more", vec![7u8; 64 << 20])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("no_space"), "{err}");
    // Earlier files are intact.
    let size = exec_cli(&srv, &id, &["stat", "-c", "%s", "/workspace/in/big.bin"]);
    assert_eq!(size.trim(), (100u64 << 20).to_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn output_is_capped_timeouts_kill_and_bombs_stay_inside() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let client = srv.client();
    let id = client.create(&CreateSandbox::default()).await.unwrap().id;

    let r = client
        .exec(
            &id,
            &sh("head -c 52428800 /dev/zero | tr '\\0' a; echo done >&2"),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout.len(), 10 << 20);
    assert!(r.truncated && r.stdout_truncated && !r.stderr_truncated);
    assert_eq!((r.exit_code, r.stderr.trim()), (Some(0), "done"));

    let r = client
        .exec(
            &id,
            &ExecRequest {
                timeout_ms: Some(500),
                ..sh("trap '' TERM; sleep 60")
            },
        )
        .await
        .unwrap();
    assert!(r.timed_out, "{r:?}");
    assert_eq!(
        r.signal,
        Some(9),
        "a process that ignores SIGTERM gets SIGKILL"
    );
    assert!(r.duration_ms < 20_000);

    // Fork bomb: the pids limit stops it inside; the server keeps answering.
    let bomb = tokio::spawn({
        let client = client.clone();
        let id = id.clone();
        async move {
            client
                .exec(
                    &id,
                    &ExecRequest {
                        timeout_ms: Some(4000),
                        ..cmd(&["/bin/bash", "-c", "b(){ b|b& }; b; sleep 5"])
                    },
                )
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t = std::time::Instant::now();
    client
        .health()
        .await
        .expect("server answers during a fork bomb");
    assert!(t.elapsed() < Duration::from_secs(5));
    let _ = bomb.await;
    let events = std::fs::read_to_string(format!("/sys/fs/cgroup/pids/burrow/{id}/pids.events"))
        .unwrap_or_default();
    assert!(
        events.contains("max") && !events.contains("max 0"),
        "pids limit never hit: {events:?}"
    );
    // The timeout killed the bomb's whole process group: only the guest's own threads remain.
    let current = format!("/sys/fs/cgroup/pids/burrow/{id}/pids.current");
    let settled = eventually(20, || {
        std::fs::read_to_string(&current)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .is_some_and(|n| n <= 20)
    })
    .await;
    assert!(
        settled,
        "fork bomb processes outlived the exec: pids.current = {:?}",
        std::fs::read_to_string(&current)
    );

    // Memory bomb: killed inside its cgroup; the sandbox and the server live on.
    let r = client
        .exec(
            &id,
            &ExecRequest {
                timeout_ms: Some(30_000),
                ..cmd(&["python3", "-c", "x = 'a' * (2 * 1024**3)"])
            },
        )
        .await
        .unwrap();
    assert_eq!(r.signal, Some(9), "memory bomb was not OOM-killed: {r:?}");
    let r = client.exec(&id, &cmd(&["echo", "alive"])).await.unwrap();
    assert_eq!(r.stdout, "alive\n");
    assert!(client.delete(&id).await.is_ok());
    assert!(
        host_leftovers(&srv, &id).is_empty(),
        "{:?}",
        host_leftovers(&srv, &id)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_is_interactive_under_a_real_pty() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let id = create_cli(&srv);
    // `script` gives `burrow shell` a real terminal; we type into it.
    let burrow_cmd = format!("{BURROW} shell {id}");
    let mut child = std::process::Command::new("script")
        .args(["-qfec", &burrow_cmd, "/dev/null"])
        .env("BURROW_URL", &srv.url)
        .env("BURROW_API_KEY", &srv.key)
        .env("HOME", &srv.home)
        .env("TERM", "xterm")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script(1) from bsdutils");
    let mut stdin = child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    stdin.write_all(b"echo tty=$(tty) sum=$((6*7))\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(b"exit 3\n").unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tty=/dev/pts/0 sum=42"),
        "shell output:\n{text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "shell's exit code is passed through"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rm_leaves_nothing_on_the_host() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let id = create_cli(&srv);
    // A few daemons that try to outlive their sandbox.
    exec_cli(
        &srv,
        &id,
        &[
            "sh",
            "-c",
            "setsid sleep 1000 >/dev/null 2>&1 & (sleep 1000 &) ; echo ok",
        ],
    );
    assert!(
        !host_leftovers(&srv, &id).is_empty(),
        "the leftover probe sees nothing even while running"
    );
    assert_ok(&srv.cli(&["rm", &id]));
    assert_eq!(host_leftovers(&srv, &id), Vec::<String>::new());
    let out = srv.cli(&["get", &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sandbox_not_found"));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_create_and_mid_exec_then_restart_leaves_nothing_half_made() {
    if !require_root("starting sandboxes") {
        return;
    }
    let mut srv = TestServer::start().await;
    let client = srv.client();
    let keeper = client.create(&CreateSandbox::default()).await.unwrap().id;
    client
        .exec(&keeper, &sh("echo kept > /workspace/f"))
        .await
        .unwrap();

    for delay_ms in [0u64, 5, 15, 40, 80] {
        let c = client.clone();
        let create = tokio::spawn(async move { c.create(&CreateSandbox::default()).await });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        srv.kill9();
        let _ = create.await;
        srv.restart().await;
    }

    // Mid-delete: the server dies while a sandbox is being torn down.
    let doomed = client.create(&CreateSandbox::default()).await.unwrap().id;
    let c = client.clone();
    let d = doomed.clone();
    let delete = tokio::spawn(async move { c.delete(&d).await });
    tokio::time::sleep(Duration::from_millis(3)).await;
    srv.kill9();
    let _ = delete.await;
    srv.restart().await;

    // Mid-exec: a long command is running when the server dies.
    let mut session = client
        .exec_stream(&keeper, &cmd(&["sleep", "300"]))
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), session.next()).await;
    srv.kill9();
    drop(session);
    srv.restart().await;
    let client = srv.client();

    let all = client.list().await.unwrap();
    for sb in &all {
        match sb.state {
            SandboxState::Running => {
                let r = client.exec(&sb.id, &cmd(&["true"])).await.unwrap();
                assert_eq!(r.exit_code, Some(0), "{} is running but unusable", sb.id);
            }
            SandboxState::Error => {
                assert_eq!(
                    host_leftovers(&srv, &sb.id),
                    Vec::<String>::new(),
                    "{} in error but not cleaned",
                    sb.id
                );
            }
            // Its processes were lost with the server (mid-delete): files kept, no process left.
            SandboxState::Hibernated => {
                assert_eq!(
                    host_leftovers(&srv, &sb.id),
                    ["sandbox directory"],
                    "{}",
                    sb.id
                );
                client.resume(&sb.id).await.unwrap();
                let r = client.exec(&sb.id, &cmd(&["true"])).await.unwrap();
                assert_eq!(r.exit_code, Some(0), "{} resumed but unusable", sb.id);
            }
            other => panic!("{} is {other:?} after restart", sb.id),
        }
    }
    // Every sandbox directory on the host belongs to a running (or resumed) sandbox.
    let running: Vec<_> = all
        .iter()
        .filter(|s| matches!(s.state, SandboxState::Running | SandboxState::Hibernated))
        .map(|s| s.id.clone())
        .collect();
    for dir in srv.host_sandbox_dirs() {
        assert!(
            running.contains(&dir),
            "orphan sandbox dir {dir} after restart"
        );
    }
    // The sandbox that was running throughout was adopted with its files, and the interrupted
    // exec's process is gone.
    let r = client
        .exec(
            &keeper,
            &sh("cat /workspace/f; ps -e -o comm= | grep -c '^sleep' || true"),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "kept\n0\n", "{r:?}");
    for sb in all {
        client.delete(&sb.id).await.unwrap();
        assert_eq!(host_leftovers(&srv, &sb.id), Vec::<String>::new());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_passes_flags_stdin_and_exit_codes_through_the_cli() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let id = create_cli(&srv);
    let out = srv.cli(&[
        "exec",
        &id,
        "--env",
        "GREETING=hi",
        "--cwd",
        "/workspace",
        "--",
        "sh",
        "-c",
        "echo $GREETING $(pwd); echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(stdout(&out), "hi /workspace\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    let t = std::time::Instant::now();
    let out = srv.cli(&["exec", &id, "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124), "timeout exit code");
    assert!(t.elapsed() < Duration::from_secs(15));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));

    let out = srv.cli(&["exec", &id, "--", "no-such-program"]);
    assert_eq!(
        out.status.code(),
        Some(127),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut child = srv
        .cli_cmd(&["exec", &id, "--", "wc", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&[b'x'; 300_000])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        stdout(&out).trim(),
        "300000",
        "piped stdin reaches the command"
    );

    let json: serde_json::Value = serde_json::from_slice(
        &srv.cli(&["--json", "exec", &id, "--", "echo", "doc"])
            .stdout,
    )
    .unwrap();
    assert_eq!(
        (json["stdout"].as_str(), json["exit_code"].as_i64()),
        (Some("doc\n"), Some(0))
    );

    // Commands can run as the unprivileged `user`.
    let r = srv
        .client()
        .exec(
            &id,
            &ExecRequest {
                user: Some("user".into()),
                ..sh("id -u; echo $HOME; touch /workspace/mine")
            },
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "1000\n/home/user\n", "{r:?}");
    let r = srv
        .client()
        .exec(
            &id,
            &ExecRequest {
                user: Some("user".into()),
                ..sh("touch /etc/nope")
            },
        )
        .await
        .unwrap();
    assert_ne!(r.exit_code, Some(0), "user could write /etc");

    // A background process keeps its output for a later attach.
    let pid = srv
        .client()
        .start_process(&id, &sh("echo one; sleep 1; echo two; exit 3"))
        .await
        .unwrap();
    let mut session = srv.client().attach(&id, pid).await.unwrap();
    let mut out = Vec::new();
    let exit = loop {
        match tokio::time::timeout(Duration::from_secs(10), session.next())
            .await
            .expect("attach hung")
            .unwrap()
        {
            Some(burrow_client::Output::Stdout(b)) => out.extend(b),
            Some(burrow_client::Output::Event(burrow_types::stream::StreamEvent::Exit {
                exit_code,
                ..
            })) => break exit_code,
            Some(_) => {}
            None => panic!("stream closed before the exit"),
        }
    };
    assert_eq!(
        (String::from_utf8_lossy(&out).as_ref(), exit),
        ("one\ntwo\n", Some(3))
    );

    // A background process is listed and killed.
    let pid = srv
        .client()
        .start_process(&id, &cmd(&["sleep", "300"]))
        .await
        .unwrap();
    assert!(stdout(&srv.cli(&["ps", &id])).contains("sleep 300"));
    assert_ok(&srv.cli(&["kill", &id, &pid.to_string()]));
    let gone = eventually(10, || !stdout(&srv.cli(&["ps", &id])).contains("running")).await;
    assert!(gone, "killed process still running");
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_freezes_processes_in_place_and_resume_carries_on() {
    if !require_root("starting sandboxes") {
        return;
    }
    let mut srv = TestServer::start().await;
    let c = srv.client();
    let id = c.create(&CreateSandbox::default()).await.unwrap().id;
    let counter = c
        .start_process(
            &id,
            &sh("i=0; while true; do i=$((i+1)); echo $i > /workspace/counter; sleep 0.1; done"),
        )
        .await
        .unwrap();
    let web = c
        .start_process(
            &id,
            &cmd(&[
                "python3",
                "-m",
                "http.server",
                "8000",
                "--bind",
                "127.0.0.1",
                "--directory",
                "/workspace",
            ]),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let read = |c: burrow_client::Client, id: String| async move {
        c.exec(&id, &sh("cat /workspace/counter"))
            .await
            .unwrap()
            .stdout
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before = read(c.clone(), id.clone()).await;
    let t_before = std::time::Instant::now();
    assert_eq!(c.pause(&id).await.unwrap().state, SandboxState::Paused);
    let running_before_freeze = t_before.elapsed();
    let t_frozen = std::time::Instant::now();
    assert_eq!(
        c.pause(&id).await.unwrap_err().code(),
        Some("conflict"),
        "double pause"
    );
    assert_eq!(
        c.exec(&id, &cmd(&["true"])).await.unwrap_err().code(),
        Some("sandbox_not_running")
    );
    let freezer =
        std::fs::read_to_string(format!("/sys/fs/cgroup/freezer/burrow/{id}/freezer.state"))
            .unwrap();
    assert_eq!(freezer.trim(), "FROZEN");

    // Paused across a server restart: adopted as paused, not mistaken for lost.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    srv.restart().await;
    let c = srv.client();
    assert_eq!(c.get(&id).await.unwrap().state, SandboxState::Paused);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let paused = t_frozen.elapsed();
    let t_thaw = std::time::Instant::now();
    assert_eq!(c.resume(&id).await.unwrap().state, SandboxState::Running);
    let after = read(c.clone(), id.clone()).await;
    let running_after_thaw = t_thaw.elapsed();
    assert_eq!(
        c.resume(&id).await.unwrap_err().code(),
        Some("conflict"),
        "resume of a running sandbox"
    );
    // The counter ticks at most every 100 ms, and only while not frozen.
    let ticks = |d: Duration| (d.as_millis() / 100) as u64;
    let allowed = ticks(running_before_freeze) + ticks(running_after_thaw) + 2;
    assert!(
        allowed < ticks(paused),
        "the machine is too slow for this test to tell ({allowed} vs {paused:?})"
    );
    assert!(
        after >= before && after - before <= allowed,
        "counter went {before} -> {after} across a {paused:?} pause (at most {allowed} allowed)"
    );
    let running: Vec<u32> = c
        .processes(&id)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.running)
        .map(|p| p.pid)
        .collect();
    assert!(
        running.contains(&counter) && running.contains(&web),
        "processes lost across pause: {running:?}"
    );
    let r = c
        .exec(&id, &cmd(&["python3", "-c", "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/counter').status)"]))
        .await
        .unwrap();
    assert_eq!(r.stdout, "200\n", "{r:?}");

    // A paused sandbox deletes cleanly too.
    c.pause(&id).await.unwrap();
    c.delete(&id).await.unwrap();
    assert_eq!(host_leftovers(&srv, &id), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn hibernate_keeps_files_and_resume_starts_cold() {
    if !require_root("starting sandboxes") {
        return;
    }
    let mut srv = TestServer::start().await;
    let c = srv.client();
    let sb = c
        .create(&CreateSandbox {
            hostname: Some("keeper".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let id = sb.id;
    // Written just before hibernating, in /workspace and in the root layer.
    c.exec(
        &id,
        &sh("echo ws > /workspace/f && echo root > /root/g && mkdir -p /opt/app"),
    )
    .await
    .unwrap();
    let old = c.start_process(&id, &cmd(&["sleep", "600"])).await.unwrap();

    assert_eq!(
        c.hibernate(&id).await.unwrap().state,
        SandboxState::Hibernated
    );
    assert_eq!(c.hibernate(&id).await.unwrap_err().code(), Some("conflict"));
    assert_eq!(
        c.exec(&id, &cmd(&["true"])).await.unwrap_err().code(),
        Some("sandbox_not_running")
    );
    // No process, cgroup or mount is left; only the disk stays.
    let left = host_leftovers(&srv, &id);
    assert_eq!(
        left,
        ["sandbox directory"],
        "hibernated sandbox still holds {left:?}"
    );
    assert!(srv
        .data
        .join("sandboxes")
        .join(&id)
        .join("disk.img")
        .exists());

    // Hibernated across a server restart: kept, not cleaned as an orphan.
    srv.restart().await;
    let c = srv.client();
    assert_eq!(c.get(&id).await.unwrap().state, SandboxState::Hibernated);

    assert_eq!(c.resume(&id).await.unwrap().state, SandboxState::Running);
    let r = c
        .exec(
            &id,
            &sh("cat /workspace/f /root/g; hostname; test -d /opt/app && echo dir"),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "ws\nroot\nkeeper\ndir\n", "{r:?}");
    let procs = c.processes(&id).await.unwrap();
    assert!(
        procs.iter().all(|p| p.pid != old || !p.running),
        "a process survived hibernation: {procs:?}"
    );
    assert_eq!(c.get(&id).await.unwrap().id, id);

    c.hibernate(&id).await.unwrap();
    c.delete(&id).await.unwrap();
    assert_eq!(host_leftovers(&srv, &id), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeouts_pause_or_destroy_and_max_duration_ends_in_a_structured_error() {
    if !require_root("starting sandboxes") {
        return;
    }
    let plans = tempfile::NamedTempFile::new().unwrap();
    let tiny = serde_json::json!([{ "name": "tiny", "limits": {
        "cpu_millis": 500, "memory_mib": 256, "pids": 128, "disk_mib": 256, "nofile": 1024,
        "output_bytes": 1048576, "max_duration_s": 3 } }]);
    std::fs::write(plans.path(), tiny.to_string()).unwrap();
    let srv = TestServer::start_with_env(&[("BURROW_PLANS", plans.path().to_str().unwrap())]).await;
    let c = srv.client();
    let with_timeout = |on: burrow_types::OnTimeout| CreateSandbox {
        timeout_s: Some(2),
        on_timeout: Some(on),
        ..Default::default()
    };
    let doomed = c
        .create(&with_timeout(burrow_types::OnTimeout::Destroy))
        .await
        .unwrap()
        .id;
    let napper = c
        .create(&with_timeout(burrow_types::OnTimeout::Pause))
        .await
        .unwrap()
        .id;
    let busy = c
        .create(&with_timeout(burrow_types::OnTimeout::Destroy))
        .await
        .unwrap()
        .id;
    let cleared = c
        .create(&with_timeout(burrow_types::OnTimeout::Destroy))
        .await
        .unwrap();
    assert_eq!(
        (cleared.timeout_s, cleared.on_timeout),
        (Some(2), burrow_types::OnTimeout::Destroy)
    );
    let cleared = cleared.id;
    let off = c
        .set_timeout(
            &cleared,
            &burrow_types::SetTimeout {
                timeout_s: None,
                on_timeout: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(off.timeout_s, None);
    let short = c
        .create(&CreateSandbox {
            plan: Some("tiny".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(short.limits.max_duration_s, 3);

    // `busy` is used every half second for 5 s; the others sit idle.
    for _ in 0..10 {
        c.exec(&busy, &cmd(&["true"])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        c.exec(&busy, &cmd(&["true"])).await.unwrap();
        let gone = c
            .get(&doomed)
            .await
            .err()
            .and_then(|e| e.code().map(str::to_string));
        let napping = c.get(&napper).await.unwrap().state;
        let ended = c.get(&short.id).await.unwrap();
        if gone.as_deref() == Some("sandbox_not_found")
            && napping == SandboxState::Paused
            && ended.state == SandboxState::Error
        {
            let reason = ended.error.unwrap();
            assert_eq!(reason.code, "max_duration_exceeded");
            assert_eq!(reason.limit, Some(serde_json::json!(3)));
            assert!(reason
                .observed
                .and_then(|o| o.as_u64())
                .is_some_and(|o| o >= 3));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timeouts not applied: {gone:?} {napping:?} {:?}",
            ended.state
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(host_leftovers(&srv, &doomed), Vec::<String>::new());
    assert_eq!(
        host_leftovers(&srv, &short.id),
        Vec::<String>::new(),
        "max duration left the computer behind"
    );
    assert_eq!(
        c.exec(&short.id, &cmd(&["true"])).await.unwrap_err().code(),
        Some("sandbox_not_running")
    );
    assert_eq!(
        c.get(&busy).await.unwrap().state,
        SandboxState::Running,
        "activity did not keep it alive"
    );
    assert_eq!(
        c.get(&cleared).await.unwrap().state,
        SandboxState::Running,
        "a cleared timeout still fired"
    );
    for id in [&napper, &busy, &cleared, &short.id] {
        c.delete(id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_sandbox_hibernates_after_the_hot_window() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start_with_env(&[("BURROW_HOT_WINDOW", "2")]).await;
    let c = srv.client();
    let id = c.create(&CreateSandbox::default()).await.unwrap().id;
    c.exec(&id, &sh("echo before-pause > /workspace/f"))
        .await
        .unwrap();
    c.pause(&id).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while c.get(&id).await.unwrap().state != SandboxState::Hibernated {
        assert!(
            std::time::Instant::now() < deadline,
            "not hibernated after the hot window"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        std::fs::read_dir(format!("/sys/fs/cgroup/pids/burrow/{id}")).is_err(),
        "a hibernated sandbox still has cgroups"
    );
    c.resume(&id).await.unwrap();
    let r = c.exec(&id, &sh("cat /workspace/f")).await.unwrap();
    assert_eq!(r.stdout, "before-pause\n");
    c.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_host_reboot_sandboxes_come_back_cold_with_their_files() {
    if !require_root("starting sandboxes") {
        return;
    }
    let mut srv = TestServer::start().await;
    let c = srv.client();
    let id = c.create(&CreateSandbox::default()).await.unwrap().id;
    c.exec(&id, &sh("echo survived > /workspace/f && sync"))
        .await
        .unwrap();
    // A reboot, as far as burrow can tell: the server and every process of the sandbox die.
    srv.kill9();
    force_clean(&id);
    srv.restart().await;
    let c = srv.client();
    assert_eq!(c.get(&id).await.unwrap().state, SandboxState::Hibernated);
    c.resume(&id).await.unwrap();
    let r = c.exec(&id, &sh("cat /workspace/f")).await.unwrap();
    assert_eq!(r.stdout, "survived\n");
    c.delete(&id).await.unwrap();
    assert_eq!(host_leftovers(&srv, &id), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pause_mid_call_answers_the_waiting_call_instead_of_hanging() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let id = c.create(&CreateSandbox::default()).await.unwrap().id;
    let (c2, id2) = (c.clone(), id.clone());
    let waiting = tokio::spawn(async move {
        c2.exec(&id2, &sh("sleep 3; echo late > /workspace/after"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.pause(&id).await.unwrap();
    // The sandbox stays paused; without the interruption this call would wait for a resume.
    let answer = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the exec hung on a paused sandbox")
        .unwrap();
    assert_eq!(
        answer.unwrap_err().code(),
        Some("sandbox_not_running"),
        "a call interrupted by a pause says so"
    );
    assert_eq!(c.get(&id).await.unwrap().state, SandboxState::Paused);
    // Calls after the pause are refused at once. At resume the interrupted command ends, as any
    // foreground command whose caller went away; the sandbox itself carries on.
    assert_eq!(
        c.stat(&id, "/workspace").await.unwrap_err().code(),
        Some("sandbox_not_running")
    );
    c.resume(&id).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = c
        .exec(
            &id,
            &sh("ls /workspace; ps -eo args | grep -c '[s]leep 3' || true"),
        )
        .await
        .unwrap();
    assert_eq!(
        r.stdout, "0\n",
        "the interrupted command should be gone: {r:?}"
    );
    c.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_racing_a_delete_or_a_pause_get_an_answer_about_the_sandbox_never_a_5xx() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    for round in 0..6 {
        let id = c.create(&CreateSandbox::default()).await.unwrap().id;
        let mut calls = Vec::new();
        for k in 0..4 {
            let (c, id) = (c.clone(), id.clone());
            calls.push(tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..20 {
                    let r = match k {
                        0 => c.exec(&id, &sh("sleep 0.05")).await.map(|_| ()),
                        1 => c.processes(&id).await.map(|_| ()),
                        2 => c.stat(&id, "/workspace").await.map(|_| ()),
                        _ => c.exec(&id, &sh("true")).await.map(|_| ()),
                    };
                    answers.push(r);
                }
                answers
            }));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        // Half the rounds delete mid-call, the others pause.
        if round % 2 == 0 {
            c.delete(&id).await.unwrap();
        } else {
            c.pause(&id).await.unwrap();
        }
        for (k, call) in calls.into_iter().enumerate() {
            for r in call.await.unwrap() {
                match r {
                    Ok(()) => {}
                    Err(ClientError::Api {
                        status,
                        code,
                        message,
                    }) => assert!(
                        (status == 409 && code == "sandbox_not_running")
                            || (status == 404 && code == "sandbox_not_found"),
                        "call {k} racing a transition got {status} {code}: {message}"
                    ),
                    Err(e) => panic!("a call racing a transition failed: {e}"),
                }
            }
        }
        if round % 2 == 1 {
            c.delete(&id).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_mid_create_leaves_no_half_made_sandbox() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    // Each create is sent whole and its connection dropped as soon as the server has begun it (its
    // row is listed), without reading the answer. A client-side timeout instead may fire before the
    // request is even written on a loaded machine, and a connection closed together with its request
    // may be dropped before the server dispatches it.
    let addr = srv.url.trim_start_matches("http://").to_string();
    let body = serde_json::to_string(&CreateSandbox::default()).unwrap();
    let c = srv.client();
    for begun in 1..=3 {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = format!(
            "POST /v1/sandboxes HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            srv.key,
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut conn, request.as_bytes())
            .await
            .unwrap();
        while c.list().await.unwrap().len() < begun {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(conn);
    }
    // Each create finishes on its own: the sandboxes run and are the user's to see and delete.
    let mut settled = false;
    for _ in 0..300 {
        let list = c.list().await.unwrap();
        if list.len() == 3 && list.iter().all(|s| s.state == SandboxState::Running) {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "{:?}", c.list().await.unwrap());
    for s in c.list().await.unwrap() {
        c.delete(&s.id).await.unwrap();
        assert!(host_leftovers(&srv, &s.id).is_empty());
    }
    assert!(srv.host_sandbox_dirs().is_empty());
}

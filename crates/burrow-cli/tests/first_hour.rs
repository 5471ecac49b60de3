//! The first hour, tried as a new user would: the README's examples through the real CLI against
//! a real `burrow up` (networked ones in a world of namespaces the test makes, so no packet
//! leaves them), what a second server does to the CLI's config, what the logs and the errors
//! look like, and a test run that gets killed leaving nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use burrow_client::ClientError;
use burrow_types::CreateSandbox;
use common::*;

/// Fetches a URL the CLI printed through the test's relay: the relay stands in for the server's
/// address, and a Host-routed URL keeps its Host.
async fn fetch(srv: &TestServer, printed: &str) -> Option<(u16, String)> {
    let rest = printed.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let r = reqwest::Client::new()
        .get(format!("{}/{path}", srv.url))
        .header("host", host)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    Some((r.status().as_u16(), r.text().await.ok()?))
}

#[tokio::test]
async fn the_readme_port_example_answers_through_its_signed_url() {
    if !require_root("a networked burrow up") {
        return;
    }
    let srv = TestServer::start_in_world(&[]).await;
    // The README's lines, as printed there.
    let out = srv.cli(&[
        "create",
        "--no-internet",
        "--allow-out",
        "pypi.org",
        "--allow-out",
        "files.pythonhosted.org",
    ]);
    assert_ok(&out);
    let id = stdout(&out).trim().to_string();
    assert_ok(&srv.cli(&[
        "net",
        &id,
        "--internet",
        "on",
        "--deny-out",
        "203.0.113.0/24",
    ]));
    let out = srv.cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "python3 -m http.server 8000 &",
    ]);
    assert_ok(&out);
    let out = srv.cli(&["port", &id, "8000", "--signed", "600"]);
    assert_ok(&out);
    let url = stdout(&out).trim().to_string();
    assert!(url.contains("burrow_sig="), "{url}");

    // The server needs a moment to listen; then every request is answered, each one logged
    // by the server to the stderr it inherited from the command that has ended.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut served = 0;
    let mut last = None;
    while served < 4 {
        let got = fetch(&srv, &url).await;
        match &got {
            Some((200, body)) => {
                assert!(body.contains("Directory listing"), "{body}");
                served += 1;
            }
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "the README's server never answered (after {served} answers): {got:?}\n{}",
                    srv.log()
                );
                last = got;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let _ = last;

    // The process is the user's to see, read and stop.
    let out = srv.cli(&["ps", &id]);
    assert_ok(&out);
    let ps = stdout(&out);
    let line = ps
        .lines()
        .find(|l| l.contains("http.server"))
        .unwrap_or_else(|| panic!("the server is not listed:\n{ps}"));
    assert!(line.contains("running"), "{ps}");
    let pid = line.split_whitespace().next().unwrap().to_string();
    assert_ok(&srv.cli(&["kill", &id, &pid, "--signal", "15"]));
    let out = srv.cli(&["logs", &id, &pid]);
    assert_ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.matches("\"GET / HTTP/1.1\" 200").count() >= 4,
        "every request is in the kept output:\n{log}"
    );
    assert!(log.contains("ended by signal 15"), "{log}");

    // The same for a command run as the unprivileged `user` (as E2B's SDKs run every command),
    // next to a job of the same command that redirected its output: that one is not taken for
    // the holder of the command's pipes, though the guest may not ptrace the user's processes.
    let script = "sleep 600 >/dev/null 2>&1 & \
        python3 -u -c 'import time\nfor i in range(600): print(\"tick\", i); time.sleep(0.1)' &";
    let out = srv.cli(&["exec", &id, "--user", "user", "--", "sh", "-c", script]);
    assert_ok(&out);
    let mut line = None;
    assert!(
        eventually(20, || {
            let ps = stdout(&srv.cli(&["ps", &id]));
            line = ps
                .lines()
                // One line: `burrow ps` shows the newline in that command line as `\n`.
                .find(|l| l.contains("import time\\nfor") && l.contains("running"))
                .map(str::to_string);
            line.is_some()
        })
        .await,
        "a user's process left running is not listed: {}",
        stdout(&srv.cli(&["ps", &id]))
    );
    let ps = stdout(&srv.cli(&["ps", &id]));
    assert!(!ps.contains("sleep 600"), "{ps}");
    let pid = line.unwrap().split_whitespace().next().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_ok(&srv.cli(&["kill", &id, &pid]));
    let out = srv.cli(&["logs", &id, &pid]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains("tick 0\n") && text.contains("tick 10\n"),
        "{text}"
    );
}

// ------------------------------------------------------------------ a killed test run

/// Where the helper below reports what it started.
const KILLED_REPORT: &str = "BURROW_TEST_KILLED_REPORT";

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    if f.first() == Some(&"Z") {
        return None;
    }
    f.get(19)?.parse().ok()
}

#[tokio::test]
#[ignore = "a helper: `a_killed_test_process_leaves_no_server_or_helper_behind` runs it and kills it"]
async fn helper_a_test_process_that_gets_killed() {
    let Some(report) = std::env::var_os(KILLED_REPORT) else {
        return;
    };
    let srv = TestServer::start_in_world(&[]).await;
    let sb = srv
        .client()
        .create(&CreateSandbox::default())
        .await
        .unwrap();
    let (server, fake) = (srv.pid(), srv.world().fake_pid());
    let text = serde_json::json!({
        "server": [server, start_time(server)],
        "fake_internet": [fake, start_time(fake)],
        "namespaces": [srv.world().server_ns, srv.world().inet_ns],
        "dir": srv.dir(),
        "data": srv.data,
        "sandbox": sb.id,
    });
    std::fs::write(&report, text.to_string()).unwrap();
    // Killed here, mid-test, with no chance to run any `Drop`.
    std::future::pending::<()>().await;
}

/// After the helper test was ended: its server and fake internet are gone at once, and the next
/// run's sweep (which runs at every server start) removes what is left by design: the sandbox
/// outlives its server, the namespaces and the directory belong to the dead test.
async fn assert_nothing_left(r: &serde_json::Value) {
    let same = |v: &serde_json::Value| {
        let pid = v[0].as_u64().unwrap() as u32;
        pid != 0 && start_time(pid).is_some() && start_time(pid) == v[1].as_u64()
    };
    let (server, fake) = (&r["server"], &r["fake_internet"]);
    assert!(
        eventually(30, || !same(server) && !same(fake)).await,
        "still running after the test process was killed: server {} fake internet {}",
        same(server),
        same(fake)
    );
    sweep_dead_runs();
    for ns in r["namespaces"].as_array().unwrap() {
        let ns = ns.as_str().unwrap();
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "namespace {ns} left behind"
        );
    }
    let data = PathBuf::from(r["data"].as_str().unwrap());
    let left = host_leftovers_in(&data, r["sandbox"].as_str().unwrap());
    assert!(left.is_empty(), "left behind: {left:?}");
    let dir = r["dir"].as_str().unwrap();
    assert!(!Path::new(dir).exists(), "{dir} left behind");
}

#[tokio::test]
async fn a_killed_test_process_leaves_no_server_or_helper_behind() {
    if !require_root("a networked burrow up") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("report.json");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_a_test_process_that_gets_killed",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(KILLED_REPORT, &report)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let r: serde_json::Value = loop {
        if let Some(v) = std::fs::read(&report)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            break v;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the helper test ended by itself: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "the helper never started its server"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The harshest end a test runner gives: SIGKILL to the test process alone.
    child.kill().unwrap();
    child.wait().unwrap();

    assert_nothing_left(&r).await;
}

#[tokio::test]
async fn nextest_ends_a_hung_test_and_the_servers_it_started_go_with_it() {
    if !require_root("a networked burrow up") {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let has_nextest = Command::new(&cargo)
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_nextest {
        eprintln!(
            "skipping: cargo-nextest is not installed (scripts/test falls back to cargo test)"
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let config = std::fs::read_to_string(root.join(".config/nextest.toml")).unwrap();
    assert!(
        config.contains("[profile.default]") && config.contains("terminate-after"),
        "the default profile ends hung tests:\n{config}"
    );
    // The same mechanism with a short limit, on the helper above, which hangs once its server runs.
    let tmp = tempfile::tempdir().unwrap();
    let tool = tmp.path().join("hang.toml");
    std::fs::write(
        &tool,
        "[profile.hangcheck]\nslow-timeout = { period = \"20s\", terminate-after = 3, grace-period = \"5s\" }\n",
    )
    .unwrap();
    let report = tmp.path().join("report.json");
    let out = Command::new(&cargo)
        .current_dir(&root)
        .args(["nextest", "run", "--tool-config-file"])
        .arg(format!("burrow-hangcheck:{}", tool.display()))
        .args([
            "--profile",
            "hangcheck",
            "-p",
            "burrow-cli",
            "--test",
            "first_hour",
            "--run-ignored",
            "only",
            "-E",
            "test(=helper_a_test_process_that_gets_killed)",
        ])
        .env(KILLED_REPORT, &report)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "a hung test passed:\n{text}");
    assert!(text.contains("TIMEOUT"), "{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_nothing_left(&r).await;
}

// ------------------------------------------------------------------ profiles

/// The CLI as a user on the machine runs it: HOME only, no BURROW_* variables.
fn cli_at(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BURROW)
        .args(args)
        .env("HOME", home)
        .env_remove("BURROW_URL")
        .env_remove("BURROW_API_KEY")
        .env_remove("BURROW_PROFILE")
        .env_remove("XDG_CONFIG_HOME")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ids(o: &Output) -> String {
    assert_ok(o);
    stdout(o)
}

fn port_of(srv: &TestServer) -> String {
    srv.url.rsplit(':').next().unwrap().to_string()
}

#[tokio::test]
async fn a_second_server_gets_its_own_profile_and_replaces_nothing() {
    if !require_root("burrow up") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().to_path_buf();
    let home_env = [("HOME", home.to_str().unwrap())];
    let mut a = TestServer::start_with_env(&home_env).await;
    assert!(
        a.log().contains("(profile \"default\", the current one)"),
        "{}",
        a.log()
    );
    let out = cli_at(&home, &["create"], &[]);
    assert_ok(&out);
    let sb_a = stdout(&out).trim().to_string();

    let b = TestServer::start_with_env(&home_env).await;
    let b_name = format!("local-{}", port_of(&b));
    assert!(
        b.log().contains(&format!(
            "as profile {b_name:?}; the current profile is still \"default\""
        )),
        "the second server says where it saved itself:\n{}",
        b.log()
    );
    // The first server is still the one the CLI talks to.
    assert!(ids(&cli_at(&home, &["ls"], &[])).contains(&sb_a));
    // The second one by name, with --profile or BURROW_PROFILE.
    let out = cli_at(&home, &["--profile", &b_name, "create"], &[]);
    assert_ok(&out);
    let sb_b = stdout(&out).trim().to_string();
    let on_b = ids(&cli_at(&home, &["ls"], &[("BURROW_PROFILE", &b_name)]));
    assert!(on_b.contains(&sb_b) && !on_b.contains(&sb_a), "{on_b}");
    assert!(!ids(&cli_at(&home, &["ls"], &[])).contains(&sb_b));

    let listing = ids(&cli_at(&home, &["profile", "ls"], &[]));
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("* default") && l.contains(&a.url)),
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(&format!("  {b_name}")) && l.contains(&b.url)),
        "{listing}"
    );
    let json = ids(&cli_at(&home, &["--json", "profile", "ls"], &[]));
    assert!(!json.contains(&a.key), "keys stay in the file: {json}");

    // An unknown profile names the ones there are.
    let out = cli_at(&home, &["--profile", "nope", "ls"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"default\"") && err.contains(&format!("{b_name:?}")),
        "{err}"
    );

    // `profile use` switches; a restart of the first server updates its own profile (same
    // data directory) without taking the current one back.
    assert_ok(&cli_at(&home, &["profile", "use", &b_name], &[]));
    assert!(ids(&cli_at(&home, &["ls"], &[])).contains(&sb_b));
    a.restart().await;
    assert!(
        a.log()
            .contains("as profile \"default\"; the current profile is still"),
        "{}",
        a.log()
    );
    let listing = ids(&cli_at(&home, &["profile", "ls"], &[]));
    assert_eq!(
        listing.lines().count(),
        3,
        "a restart adds no profile:\n{listing}"
    );
    assert!(ids(&cli_at(&home, &["--profile", "default", "ls"], &[])).contains(&sb_a));
    assert!(ids(&cli_at(&home, &["ls"], &[])).contains(&sb_b));
}

#[test]
fn a_config_from_before_profiles_is_read_as_the_default_profile() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(".config/burrow");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"url": "http://127.0.0.1:1", "api_key": "burrow_old"}"#,
    )
    .unwrap();
    let out = cli_at(tmp.path(), &["profile", "ls"], &[]);
    let listing = ids(&out);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("* default") && l.contains("http://127.0.0.1:1")),
        "{listing}"
    );
    // And it is used: the request goes to that (closed) address.
    let out = cli_at(tmp.path(), &["ls"], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------------ logs and errors

#[tokio::test]
async fn server_logs_written_to_a_file_carry_no_colour_codes() {
    if !require_root("burrow up") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let sb = c.create(&CreateSandbox::default()).await.unwrap();
    c.delete(&sb.id).await.unwrap();
    let log = srv.log();
    assert!(log.contains("INFO"), "the log has lines: {log}");
    assert!(log.contains("burrow is up at"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log:?}"
    );
}

/// The CLI's error text, after checking that it failed.
fn refused_saying(out: Output) -> String {
    assert!(!out.status.success(), "{}", stdout(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn api_message(e: ClientError) -> (u16, String, String) {
    match e {
        ClientError::Api {
            status,
            code,
            message,
        } => (status, code, message),
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn unknown_names_are_answered_with_the_valid_ones() {
    if !require_root("burrow up") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let refused = |req: CreateSandbox| {
        let c = c.clone();
        async move { api_message(c.create(&req).await.unwrap_err()) }
    };
    let (status, code, msg) = refused(CreateSandbox {
        plan: Some("huge".into()),
        ..Default::default()
    })
    .await;
    assert_eq!((status, code.as_str()), (400, "unknown_plan"));
    for p in ["\"free\"", "\"pro\"", "\"scale\"", "\"huge\""] {
        assert!(msg.contains(p), "{msg}");
    }
    let (status, code, msg) = refused(CreateSandbox {
        image: Some("ubuntu".into()),
        ..Default::default()
    })
    .await;
    assert_eq!((status, code.as_str()), (400, "unknown_image"));
    assert!(msg.contains("\"system\""), "{msg}");

    // Pools: with none, and with one.
    let (_, code, msg) = api_message(c.delete_pool("nope").await.unwrap_err());
    assert_eq!(code, "unknown_pool");
    assert!(msg.contains("no pools"), "{msg}");
    assert_ok(&srv.cli(&["pool", "set", "small", "--size", "0"]));
    let err = refused_saying(srv.cli(&["pool", "rm", "nope"]));
    assert!(err.contains("\"small\""), "{err}");
    let err = refused_saying(srv.cli(&["pool", "set", "other", "--size", "0", "--plan", "huge"]));
    assert!(
        err.contains("\"free\"") && err.contains("\"scale\""),
        "{err}"
    );

    // Users' plans, through the CLI.
    let err = refused_saying(srv.cli(&["admin", "create-user", "carol", "--plan", "gold"]));
    assert!(err.contains("\"gold\"") && err.contains("\"pro\""), "{err}");

    // E2B templates.
    let r = reqwest::Client::new()
        .post(format!("{}/sandboxes", srv.url))
        .header("x-api-key", &srv.key)
        .json(&serde_json::json!({"templateID": "no-such-template"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let text = r.text().await.unwrap();
    assert!(text.contains("base"), "{text}");

    // Users inside a sandbox.
    let sb = c.create(&CreateSandbox::default()).await.unwrap();
    let err = refused_saying(srv.cli(&["exec", &sb.id, "--user", "alice", "--", "true"]));
    assert!(
        err.contains("\"root\"") && err.contains("\"user\""),
        "{err}"
    );

    // Commands of the CLI itself.
    let out = srv.cli(&["craete"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("create") && err.contains("exec") && err.contains("profile"),
        "{err}"
    );
    let err = refused_saying(srv.cli(&["pool", "list"]));
    assert!(err.contains("`burrow pool` are: ls, set, rm"), "{err}");
}

// ------------------------------------------------------------------ the README's tour

/// Runs `argv` in the server's network namespace.
fn in_server_ns(srv: &TestServer, argv: &[&str]) -> String {
    let out = srv.world().server(argv);
    assert_ok(&out);
    stdout(&out)
}

#[tokio::test]
async fn the_readme_describes_what_a_networked_server_shows_and_how_to_remove_it() {
    if !require_root("a networked burrow up") {
        return;
    }
    let mut srv = TestServer::start_in_world(&[]).await;
    let out = srv.cli(&["create"]);
    assert_ok(&out);
    let id = stdout(&out).trim().to_string();

    // `eth0` as well as `lo`.
    let out = srv.cli(&["exec", &id, "--", "sh", "-c", "hostname; id -u; ip -o link"]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.starts_with(&format!("{id}\n0\n")), "{text}");
    let links: Vec<&str> = text
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or(""))
        .collect();
    assert_eq!(links, ["lo", "eth0"], "{text}");

    // `/tmp` is memory: it survives a pause, not a hibernate; `/workspace` survives both.
    let out = srv.cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo t > /tmp/t; echo w > /workspace/w; stat -f -c %T /tmp",
    ]);
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), "tmpfs");
    assert_ok(&srv.cli(&["pause", &id]));
    assert_ok(&srv.cli(&["resume", &id]));
    let out = srv.cli(&["exec", &id, "--", "cat", "/tmp/t", "/workspace/w"]);
    assert_eq!(stdout(&out), "t\nw\n");
    assert_ok(&srv.cli(&["hibernate", &id]));
    assert_ok(&srv.cli(&["resume", &id]));
    let out = srv.cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "ls -A /tmp; cat /workspace/w",
    ]);
    assert_eq!(stdout(&out), "w\n");

    // Sandboxes outlive the server: its processes keep running while it is down.
    let out = srv.cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "sleep 1000 >/dev/null 2>&1 & echo $!",
    ]);
    assert_ok(&out);
    let marker = format!("burrow/{id}");
    let sleeping = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                let p = e.path();
                std::fs::read_to_string(p.join("cmdline")).is_ok_and(|c| c == "sleep\u{0}1000\u{0}")
                    && std::fs::read_to_string(p.join("cgroup")).is_ok_and(|c| c.contains(&marker))
            })
            .count()
    };
    assert_eq!(sleeping(), 1);
    srv.kill9();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sleeping(), 1, "the sandbox's process ended with the server");
    srv.restart().await;
    let out = srv.cli(&["exec", &id, "--", "cat", "/workspace/w"]);
    assert_eq!(stdout(&out), "w\n", "adopted at the next start");

    // Removing everything, as the README says: the sandboxes through the API, then with the
    // server stopped, its firewall table and forwarding.
    assert_ok(&srv.cli(&["rm", &id]));
    assert!(host_leftovers(&srv, &id).is_empty());
    assert!(in_server_ns(&srv, &["nft", "list", "tables"]).contains("inet burrow"));
    assert_eq!(
        in_server_ns(&srv, &["sysctl", "-n", "net.ipv4.ip_forward"]).trim(),
        "1"
    );
    srv.kill9();
    in_server_ns(&srv, &["nft", "delete", "table", "inet", "burrow"]);
    in_server_ns(&srv, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    assert!(!in_server_ns(&srv, &["nft", "list", "tables"]).contains("burrow"));
    // A sandbox's veth goes with its network namespace, which the kernel tears down a moment
    // after the last process is gone.
    assert!(
        eventually(10, || !in_server_ns(&srv, &["ip", "-o", "link"])
            .contains(": bw"))
        .await,
        "a sandbox link is left: {}",
        in_server_ns(&srv, &["ip", "-o", "link"])
    );
    for ctrl in CGROUP_CONTROLLERS {
        let dir = format!("/sys/fs/cgroup/{ctrl}/burrow/{id}");
        assert!(!Path::new(&dir).exists(), "{dir}");
    }
    std::fs::remove_dir_all(&srv.data).unwrap();
}

// ------------------------------------------------------------------ the docs stand alone

/// Files outside the repository that its docs and comments once pointed at.
fn outside_names() -> Vec<String> {
    let mut v: Vec<String> = ["DESIGN", "ATTACKS", "MACHINE", "CONVENTIONS"]
        .iter()
        .map(|n| format!("{n}.md"))
        .collect();
    v.push(format!("../{}", "shared"));
    v.push(format!("/work/{}", "shared"));
    v
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "target" || name.starts_with('.') || name == "node_modules" {
            continue;
        }
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn the_docs_and_comments_name_no_file_outside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    walk(&root, &mut files);
    assert!(files.len() > 50, "walked {} files", files.len());
    let mut found = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for name in outside_names() {
            if text.contains(&name) {
                found.push(format!("{} names {name}", f.display()));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

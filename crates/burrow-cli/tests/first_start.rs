//! `burrow up` on a fresh data directory without BURROW_ADMIN_KEY: it makes an admin key, shows it
//! once, and configures the CLI on this machine so client commands need no set-up.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn wait_for_line(log: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn first_start_prints_a_key_once_and_configures_the_cli() {
    if !require_root("burrow up") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (data, home) = (tmp.path().join("data"), tmp.path().join("home"));
    std::fs::create_dir_all(&home).unwrap();
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let start = |log: &std::path::Path| {
        let f = std::fs::File::create(log).unwrap();
        let mut cmd = Command::new(BURROW);
        cmd.args([
            "up",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &listen,
        ])
        .env("HOME", &home)
        .env_remove("BURROW_ADMIN_KEY")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("BURROW_PROFILE")
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
        // Dies with this test process, however it ends.
        spawn_tied(cmd).unwrap()
    };
    let cli = |args: &[&str]| {
        Command::new(BURROW)
            .args(args)
            .env("HOME", &home)
            .env_remove("BURROW_URL")
            .env_remove("BURROW_API_KEY")
            .env_remove("XDG_CONFIG_HOME")
            .output()
            .unwrap()
    };

    let log1 = tmp.path().join("first.log");
    let mut server = start(&log1);
    let text = wait_for_line(&log1, "configured in");
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("admin API key (shown once): "))
        .unwrap_or_else(|| panic!("no key printed:\n{text}"))
        .to_string();
    assert!(key.starts_with("burrow_") && key.len() == 47, "{key}");
    let cfg = std::fs::read_to_string(home.join(".config/burrow/config.json")).unwrap();
    assert!(cfg.contains(&key));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(home.join(".config/burrow/config.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the config holding a key is private");
    let out = cli(&["ls"]);
    assert_ok(&out);
    assert!(stdout(&out).starts_with("ID"));
    let _ = server.kill();
    let _ = server.wait();

    // A second start keeps the key and does not print a new one.
    let log2 = tmp.path().join("second.log");
    let mut server = start(&log2);
    let text = wait_for_line(&log2, "configured in");
    assert!(
        !text.contains("shown once"),
        "a second key was made:\n{text}"
    );
    assert_ok(&cli(&["ls"]));
    let _ = server.kill();
    let _ = server.wait();
}

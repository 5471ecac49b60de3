//! Processes a command leaves running with its output (`sh -c 'server &'`): the command ends as
//! usual, the process keeps writing without ever meeting a broken pipe, and it is listed,
//! attachable (its kept output, then live output) and signalled like a background process.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use burrow_node::guest::ExecEvent;
use burrow_types::ProcessInfo;
use common::*;

/// A writer that notices a broken pipe: it counts lines on stdout and stderr and, if a write
/// ever fails, leaves a file saying so and exits 3 (SIGPIPE is ignored, as Python does).
const LOOP: &str = r#"
trap '' PIPE
i=0
while :; do
  echo "out$i" || { echo broken > "$1/broken"; exit 3; }
  echo "err$i" >&2 || { echo broken > "$1/broken"; exit 3; }
  i=$((i+1))
  sleep 0.05
done
"#;

async fn wait_listed(g: &Guest, what: &str, pred: impl Fn(&ProcessInfo) -> bool) -> ProcessInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = g.client.list_processes().await.unwrap();
        if let Some(p) = list.iter().find(|p| pred(p)) {
            return p.clone();
        }
        assert!(Instant::now() < deadline, "{what} never listed: {list:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_loop(p: &ProcessInfo) -> bool {
    p.cmd.iter().any(|a| a.ends_with("loop.sh"))
}

#[tokio::test]
async fn a_process_left_running_keeps_its_output_and_is_listed_attached_and_signalled() {
    let g = Guest::start();
    std::fs::write(g.root().join("loop.sh"), LOOP).unwrap();
    let script = format!("sh {} {} & echo started", g.path("loop.sh"), g.path(""));
    let r = g.client.exec_buffered(sh(&script), None, 1 << 20).await;
    let r = r.unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("started"));

    // The command has ended; what it left behind is listed, running.
    let p = wait_listed(&g, "the loop", |p| is_loop(p) && p.running).await;
    assert!(
        !g.client
            .list_processes()
            .await
            .unwrap()
            .iter()
            .any(|q| q.cmd.get(1).is_some_and(|c| c == "-c")),
        "the finished foreground command itself is not listed"
    );

    // Its output keeps coming after the exec ended, both streams, and nothing broke.
    let (_input, mut output) = g.client.attach(p.pid).await.unwrap();
    assert_eq!(
        output.next().await.unwrap(),
        Some(ExecEvent::Started { pid: p.pid })
    );
    let mut acc = Vec::new();
    read_until(&mut output, &mut acc, |s| {
        s.contains("out40") && s.contains("err40")
    })
    .await;
    assert!(
        !g.root().join("broken").exists(),
        "a write of the left-behind process failed"
    );
    let again = wait_listed(&g, "the loop", |q| q.pid == p.pid).await;
    assert!(again.running, "{again:?}");

    // It is the guest's to signal; its exit is reported like any other process's.
    g.client.signal(p.pid, libc::SIGTERM).await.unwrap();
    let ev = read_until(&mut output, &mut acc, |_| false).await;
    assert_eq!(
        ev,
        Some(ExecEvent::Exited {
            exit_code: None,
            signal: Some(libc::SIGTERM),
            timed_out: false
        })
    );
    let gone = wait_listed(&g, "the ended loop", |q| q.pid == p.pid).await;
    assert!(!gone.running);
    assert!(!pid_exists(p.pid));
}

#[tokio::test]
async fn the_readme_http_server_answers_after_the_command_that_started_it_ended() {
    let g = Guest::start();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // The README's example, on the host's loopback (the guest runs unsandboxed here).
    let script = format!(
        "cd {} && python3 -m http.server {port} --bind 127.0.0.1 &",
        g.path("")
    );
    let r = g.client.exec_buffered(sh(&script), None, 1 << 20).await;
    assert_eq!(r.unwrap().exit_code, Some(0));
    std::fs::write(g.root().join("index.html"), "served\n").unwrap();

    let get = || -> Option<String> {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
        let mut s = String::new();
        c.read_to_string(&mut s).ok()?;
        Some(s)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answers = Vec::new();
    // Each request makes the server log a line to the stderr it inherited from the ended
    // command: with that pipe closed, the first log line broke the request.
    while answers.len() < 3 {
        match get() {
            Some(a) => answers.push(a),
            None => {
                assert!(Instant::now() < deadline, "the server never answered");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for a in &answers {
        assert!(a.starts_with("HTTP/1.0 200"), "{a}");
        assert!(a.ends_with("served\n"), "{a}");
    }

    let p = wait_listed(&g, "the server", |p| {
        p.running && p.cmd.iter().any(|a| a == "http.server")
    })
    .await;
    // Its log, kept by the guest, holds every request.
    let (_input, mut output) = g.client.attach(p.pid).await.unwrap();
    let mut acc = Vec::new();
    read_until(&mut output, &mut acc, |s| {
        s.matches("\"GET /index.html HTTP/1.0\" 200").count() >= 3
    })
    .await;
    g.client.signal(p.pid, libc::SIGKILL).await.unwrap();
    read_until(&mut output, &mut acc, |_| false).await;
}

/// Runs `script` (in which `LOOP` names the loop script and `DIR` the guest's directory), then
/// attaches to the loop it leaves behind and reads until its output has gone on well past the
/// command's end without a broken pipe.
async fn left_behind_loop(
    g: &Guest,
    script: &str,
) -> (u32, burrow_node::guest::ExecOutput, Vec<u8>) {
    std::fs::write(g.root().join("loop.sh"), LOOP).unwrap();
    let script = script
        .replace("LOOP", &g.path("loop.sh"))
        .replace("DIR", &g.path(""));
    let r = g.client.exec_buffered(sh(&script), None, 1 << 20).await;
    assert_eq!(r.unwrap().exit_code, Some(0));
    let p = wait_listed(g, "the loop", |p| is_loop(p) && p.running).await;
    // No input for it: a half-closed attach keeps streaming until the host fully hangs up.
    let (_, mut output) = g.client.attach(p.pid).await.unwrap();
    let mut acc = Vec::new();
    read_until(&mut output, &mut acc, |s| s.contains("out30")).await;
    assert!(!g.root().join("broken").exists());
    (p.pid, output, acc)
}

#[tokio::test]
async fn when_the_adopted_process_ends_the_next_holder_takes_the_output_over() {
    let g = Guest::start();
    // Two processes left behind on the same pipes: a short one (the lower pid, adopted first)
    // and the loop, which must keep its output when the first one ends.
    let script = "(sleep 0.3; echo first-done) & sleep 0.05; sh LOOP DIR & echo started";
    let (pid, mut output, mut acc) = left_behind_loop(&g, script).await;
    g.client.signal(pid, libc::SIGKILL).await.unwrap();
    read_until(&mut output, &mut acc, |_| false).await;
}

#[tokio::test]
async fn a_process_that_left_the_session_is_still_found_by_its_pipes() {
    let g = Guest::start();
    let (pid, mut output, mut acc) =
        left_behind_loop(&g, "setsid sh LOOP DIR & echo started").await;
    // It leads its own group now: the signal reaches it.
    g.client.signal(pid, libc::SIGKILL).await.unwrap();
    let ev = read_until(&mut output, &mut acc, |_| false).await;
    assert!(matches!(
        ev,
        Some(ExecEvent::Exited {
            signal: Some(9),
            ..
        })
    ));
}

#[tokio::test]
async fn a_job_that_redirected_its_output_is_not_taken_for_the_holder() {
    let g = Guest::start();
    // The sleep (the lower pid, in the same session) holds none of the command's pipes.
    let script = "sleep 25 >/dev/null 2>&1 & sh LOOP DIR & echo started";
    let (pid, mut output, mut acc) = left_behind_loop(&g, script).await;
    let listed = g.client.list_processes().await.unwrap();
    assert!(
        !listed
            .iter()
            .any(|p| p.cmd.first().is_some_and(|c| c == "sleep")),
        "{listed:?}"
    );
    g.client.signal(pid, libc::SIGKILL).await.unwrap();
    read_until(&mut output, &mut acc, |_| false).await;
}

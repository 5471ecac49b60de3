//! Processes through the guest: exec, output limits, timeouts, background, reaping, PTYs.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use burrow_node::guest::{ExecEvent, ExecSpec, GuestError};
use burrow_types::{codes, PtySize};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn ping_reports_the_protocol_version() {
    let g = Guest::start();
    assert_eq!(
        g.client.ping().await.unwrap(),
        burrow_proto::PROTOCOL_VERSION
    );
}

#[tokio::test]
async fn exec_reports_exit_codes_signals_and_separate_streams() {
    let g = Guest::start();
    let r = g
        .client
        .exec_buffered(sh("echo out; echo err >&2; exit 3"), None, 1 << 20)
        .await;
    let r = r.unwrap();
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.signal, None);
    assert_eq!(r.stdout, b"out\n");
    assert_eq!(r.stderr, b"err\n");
    assert!(!r.timed_out && !r.stdout_truncated && !r.stderr_truncated);

    let r = g
        .client
        .exec_buffered(sh("kill -9 $$"), None, 1024)
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.signal), (None, Some(9)));

    // Arbitrary bytes pass through untouched.
    let r = g
        .client
        .exec_buffered(sh("printf '\\377\\000\\033[31m'"), None, 1024)
        .await
        .unwrap();
    assert_eq!(r.stdout, b"\xff\x00\x1b[31m");

    let spec = ExecSpec {
        argv: vec!["no-such-command-xyz".into()],
        ..Default::default()
    };
    let e = g.client.exec_buffered(spec, None, 1024).await.unwrap_err();
    assert_eq!(code(&e), codes::FILE_NOT_FOUND, "{e}");
}

#[tokio::test]
async fn exec_env_cwd_and_defaults() {
    let g = Guest::start();
    let mut spec = sh("env; echo cwd=$(pwd)");
    spec.env.insert("REQ_VAR".into(), "from-request".into());
    spec.env.insert("OVERRIDDEN".into(), "request".into());
    spec.cwd = Some(g.path(""));
    let r = g.client.exec_buffered(spec, None, 1 << 20).await.unwrap();
    let out = String::from_utf8(r.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    for want in [
        "SANDBOX_VAR=from-sandbox",
        "REQ_VAR=from-request",
        "OVERRIDDEN=request",
        "LANG=C.UTF-8",
        "USER=root",
    ] {
        assert!(lines.contains(&want), "missing {want} in {out}");
    }
    assert!(!out.contains("BURROW_"), "guest plumbing leaked: {out}");
    assert!(!out.contains("TERM="), "TERM is for PTYs only: {out}");
    let cwd = std::fs::canonicalize(g.root()).unwrap();
    assert!(out.contains(&format!("cwd={}", cwd.display())), "{out}");

    // PATH: the default list, then the sandbox env (which sets PATH in this harness).
    let spec = sh("echo $PATH");
    let r = g.client.exec_buffered(spec, None, 1024).await.unwrap();
    assert_eq!(r.stdout, b"/usr/bin:/bin\n");

    let mut spec = sh("true");
    spec.cwd = Some(g.path("missing-dir"));
    let e = g.client.exec_buffered(spec, None, 1024).await.unwrap_err();
    assert_eq!(code(&e), codes::FILE_NOT_FOUND, "{e}");
}

#[tokio::test]
async fn exec_as_another_user() {
    if !is_root() {
        println!("skipped: switching users needs the guest to run as root");
        return;
    }
    let g = Guest::start();
    let mut spec = sh("id -u; id -g; id -G; echo $HOME");
    spec.user = Some("1000".into());
    let r = g.client.exec_buffered(spec, None, 1024).await.unwrap();
    let out = String::from_utf8(r.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000", "{out}");
    assert!(
        !lines[2].split(' ').any(|gid| gid == "0"),
        "root's groups kept: {out}"
    );

    let mut spec = sh("id -u; pwd");
    spec.user = Some("user".into());
    let r = g.client.exec_buffered(spec, None, 1024).await.unwrap();
    let out = String::from_utf8(r.stdout).unwrap();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let user_uid = passwd
        .lines()
        .find(|l| l.starts_with("user:"))
        .and_then(|l| l.split(':').nth(2).map(str::to_string))
        .unwrap_or_else(|| "1000".into());
    assert_eq!(out.lines().next(), Some(user_uid.as_str()), "{out}");

    let mut spec = sh("true");
    spec.user = Some("no-such-user".into());
    let e = g.client.exec_buffered(spec, None, 1024).await.unwrap_err();
    assert_eq!(code(&e), codes::BAD_REQUEST);
}

#[tokio::test]
async fn exec_stdin_is_fed_then_closed_and_defaults_to_dev_null() {
    let g = Guest::start();
    let spec = ExecSpec {
        argv: vec!["cat".into()],
        ..Default::default()
    };
    let r = g
        .client
        .exec_buffered(spec.clone(), Some(b"hello\x00world".to_vec()), 1024)
        .await;
    assert_eq!(r.unwrap().stdout, b"hello\x00world");

    // More than a pipe buffer and a frame: written while output is read.
    let big = vec![b'x'; 3 << 20];
    let r = g
        .client
        .exec_buffered(spec.clone(), Some(big.clone()), 8 << 20)
        .await
        .unwrap();
    assert_eq!(r.stdout.len(), big.len());

    // Without stdin, reading it ends at once (it is /dev/null), no hang.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        g.client
            .exec_buffered(sh("cat; readlink /proc/self/fd/0"), None, 1024),
    )
    .await
    .expect("cat without stdin hung")
    .unwrap();
    assert_eq!(r.stdout, b"/dev/null\n");
}

#[tokio::test]
async fn output_over_the_limit_is_cut_flagged_and_never_blocks_the_process() {
    let g = Guest::start();
    let t = Instant::now();
    let spec =
        sh("head -c 52428800 /dev/zero & head -c 52428800 /dev/zero >&2; wait; echo done >&2");
    let r = g.client.exec_buffered(spec, None, 10 << 20).await.unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout.len(), 10 << 20);
    assert_eq!(r.stderr.len(), 10 << 20);
    assert!(r.stdout_truncated && r.stderr_truncated);
    assert!(r.stdout.iter().all(|&b| b == 0));
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );

    let r = g
        .client
        .exec_buffered(sh("printf 12345678"), None, 8)
        .await
        .unwrap();
    assert_eq!(r.stdout, b"12345678");
    assert!(!r.stdout_truncated, "exactly at the limit is not truncated");
}

#[tokio::test]
async fn timeout_sends_term_then_kill_after_the_grace_period() {
    let g = Guest::start();
    let mut spec = sh("sleep 30");
    spec.timeout_ms = Some(300);
    let t = Instant::now();
    let r = g.client.exec_buffered(spec, None, 1024).await.unwrap();
    assert!(r.timed_out);
    assert_eq!(r.signal, Some(libc::SIGTERM));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    let mut spec = sh("trap '' TERM; echo ready; while :; do sleep 0.1; done");
    spec.timeout_ms = Some(300);
    let t = Instant::now();
    let r = g.client.exec_buffered(spec, None, 1024).await.unwrap();
    let took = t.elapsed();
    assert!(r.timed_out);
    assert_eq!(r.signal, Some(libc::SIGKILL));
    assert_eq!(r.stdout, b"ready\n");
    assert!(
        took >= Duration::from_millis(2200),
        "killed before the grace period: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");

    let mut spec = sh("exit 0");
    spec.timeout_ms = Some(10_000);
    let r = g.client.exec_buffered(spec, None, 1024).await.unwrap();
    assert!(!r.timed_out);
}

#[tokio::test]
async fn background_process_is_listed_fed_reattached_and_signalled() {
    let g = Guest::start();
    let mut spec = sh("echo started; while read l; do echo got:$l; done");
    spec.background = true;
    spec.stdin = true;
    let (input, mut output) = g
        .client
        .exec_stream(spec)
        .await
        .map_err(|e| format!("{e:?}"))
        .unwrap();
    let Some(ExecEvent::Started { pid }) = output.next().await.unwrap() else {
        panic!()
    };
    let mut acc = Vec::new();
    read_until(&mut output, &mut acc, |s| s.contains("started")).await;
    // The host goes away: a background process keeps running.
    drop((input, output));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let list = g.client.list_processes().await.unwrap();
    let p = list.iter().find(|p| p.pid == pid).expect("listed");
    assert!(p.running);
    assert_eq!(p.cmd[0], "sh");

    g.client
        .send_stdin(pid, b"one\n".to_vec(), false)
        .await
        .unwrap();
    let (mut input, mut output) = g.client.attach(pid).await.unwrap();
    assert_eq!(
        output.next().await.unwrap(),
        Some(ExecEvent::Started { pid })
    );
    let mut acc = Vec::new();
    // Output from before the attach was kept.
    read_until(&mut output, &mut acc, |s| {
        s.contains("started") && s.contains("got:one")
    })
    .await;
    input.stdin(b"two\n").await.unwrap();
    read_until(&mut output, &mut acc, |s| s.contains("got:two")).await;

    g.client.signal(pid, libc::SIGTERM).await.unwrap();
    let ev = read_until(&mut output, &mut acc, |_| false).await;
    assert_eq!(
        ev,
        Some(ExecEvent::Exited {
            exit_code: None,
            signal: Some(15),
            timed_out: false
        })
    );

    let list = g.client.list_processes().await.unwrap();
    let p = list
        .iter()
        .find(|p| p.pid == pid)
        .expect("recently exited still listed");
    assert!(!p.running);
    assert_eq!(p.signal, Some(15));
    let e = g.client.signal(pid, 9).await.unwrap_err();
    assert_eq!(code(&e), codes::PROCESS_NOT_FOUND);
    // Attaching after the end replays the kept output and the exit.
    let (_i, mut output) = g.client.attach(pid).await.unwrap();
    let (acc, ev) = drain(&mut output).await;
    assert!(String::from_utf8_lossy(&acc).contains("got:two"));
    assert!(matches!(
        ev,
        ExecEvent::Exited {
            signal: Some(15),
            ..
        }
    ));

    // Killing through the stream's own signal message.
    let mut spec = sh("sleep 1000");
    spec.background = true;
    let (mut input, mut output) = g.client.exec_stream(spec).await.unwrap();
    input.signal(libc::SIGKILL).await.unwrap();
    let (_, ev) = drain(&mut output).await;
    assert!(matches!(
        ev,
        ExecEvent::Exited {
            signal: Some(9),
            ..
        }
    ));

    let e = g.client.attach(999_999).await.err().expect("unknown pid");
    assert_eq!(code(&e), codes::PROCESS_NOT_FOUND);
}

#[tokio::test]
async fn background_output_without_a_reader_is_bounded_and_never_blocks() {
    let g = Guest::start();
    // 20 MiB with nobody attached: the process must finish, the guest keeps only the tail.
    let mut spec = sh("head -c 20971520 /dev/zero; echo; echo tail-marker");
    spec.background = true;
    let (input, mut output) = g
        .client
        .exec_stream(spec)
        .await
        .map_err(|e| format!("{e:?}"))
        .unwrap();
    let Some(ExecEvent::Started { pid }) = output.next().await.unwrap() else {
        panic!()
    };
    drop((input, output));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = g.client.list_processes().await.unwrap();
        if list.iter().any(|p| p.pid == pid && !p.running) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "background process blocked on its output"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_i, mut output) = g.client.attach(pid).await.unwrap();
    let (acc, ev) = drain(&mut output).await;
    assert!(matches!(
        ev,
        ExecEvent::Exited {
            exit_code: Some(0),
            ..
        }
    ));
    assert!(
        acc.len() <= (1 << 20) + (64 << 10),
        "kept {} bytes",
        acc.len()
    );
    assert!(
        acc.len() >= (1 << 20) - (128 << 10),
        "kept only {} bytes",
        acc.len()
    );
    assert!(String::from_utf8_lossy(&acc).ends_with("tail-marker\n"));
}

#[tokio::test]
async fn dropping_a_foreground_exec_kills_its_process_group() {
    let g = Guest::start();
    let (input, mut output) = g
        .client
        .exec_stream(sh("sleep 1000 & echo $!; wait"))
        .await
        .unwrap();
    let Some(ExecEvent::Started { pid }) = output.next().await.unwrap() else {
        panic!()
    };
    let mut acc = Vec::new();
    read_until(&mut output, &mut acc, |s| s.ends_with('\n')).await;
    let child: u32 = String::from_utf8_lossy(&acc).trim().parse().unwrap();
    assert!(pid_exists(pid) && pid_exists(child));
    drop((input, output));
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_exists(pid) || pid_exists(child) {
        assert!(
            Instant::now() < deadline,
            "process group survived the disconnect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(g
        .client
        .list_processes()
        .await
        .unwrap()
        .iter()
        .all(|p| p.pid != pid));
}

#[tokio::test]
async fn orphans_daemons_and_zombies_are_reaped() {
    let g = Guest::start();
    // A double-forked daemon: its parent exits at once, it is reparented to the guest.
    let r = g
        .client
        .exec_buffered(sh("sh -c 'sleep 1 >/dev/null 2>&1 & echo $!'"), None, 1024)
        .await
        .unwrap();
    let daemon: u32 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
    // A zombie: `sleep 1` never waits for its exited child; the guest inherits the zombie.
    let r = g
        .client
        .exec_buffered(sh("sleep 0.2 & echo $!; exec sleep 1"), None, 1024)
        .await
        .unwrap();
    let zombie: u32 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_exists(daemon) || pid_exists(zombie) {
        assert!(
            Instant::now() < deadline,
            "not reaped: daemon {:?} zombie {:?}",
            proc_state(daemon),
            proc_state(zombie)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A daemon holding the stdout pipe does not keep the exec open.
    let t = Instant::now();
    let r = g
        .client
        .exec_buffered(sh("sleep 5 & echo hi"), None, 1024)
        .await
        .unwrap();
    assert_eq!(r.stdout, b"hi\n");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test]
async fn pty_has_a_controlling_terminal_resizes_and_echoes() {
    let g = Guest::start();
    let mut spec =
        sh("tty; echo term=$TERM; read a; stty size; read b; stty size; read c; echo \"in:$c\"");
    spec.pty = Some(PtySize { cols: 80, rows: 24 });
    let (mut input, mut output) = g.client.exec_stream(spec).await.unwrap();
    let Some(ExecEvent::Started { pid }) = output.next().await.unwrap() else {
        panic!()
    };
    let mut acc = Vec::new();
    read_until(&mut output, &mut acc, |s| s.contains("term=")).await;
    let text = String::from_utf8_lossy(&acc).into_owned();
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("term=xterm-256color"), "{text}");

    input
        .resize(PtySize {
            cols: 100,
            rows: 40,
        })
        .await
        .unwrap();
    input.stdin(b"\n").await.unwrap();
    read_until(&mut output, &mut acc, |s| s.contains("40 100")).await;

    g.client
        .resize(
            pid,
            PtySize {
                cols: 132,
                rows: 50,
            },
        )
        .await
        .unwrap();
    input.stdin(b"\n").await.unwrap();
    read_until(&mut output, &mut acc, |s| s.contains("50 132")).await;

    input.stdin(b"hello\n").await.unwrap();
    let (rest, ev) = drain(&mut output).await;
    acc.extend(rest);
    let text = String::from_utf8_lossy(&acc).into_owned();
    assert!(text.contains("hello\r\n"), "no echo: {text:?}");
    assert!(text.contains("in:hello"), "{text:?}");
    assert!(matches!(
        ev,
        ExecEvent::Exited {
            exit_code: Some(0),
            ..
        }
    ));

    let e = g
        .client
        .resize(999_999, PtySize { cols: 1, rows: 1 })
        .await
        .unwrap_err();
    assert_eq!(code(&e), codes::PROCESS_NOT_FOUND);
}

#[tokio::test]
async fn children_inherit_only_stdio() {
    // An fd the guest inherited without CLOEXEC must still not reach sandbox processes.
    let g = Guest::start_with(|cmd| {
        pre_exec(cmd, || {
            // SAFETY: dup2 onto a fixed number; async-signal-safe.
            if unsafe { libc::dup2(2, 57) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    });
    let r = g
        .client
        .exec_buffered(sh("ls /proc/$$/fd"), None, 1024)
        .await
        .unwrap();
    let fds: Vec<String> = String::from_utf8_lossy(&r.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(fds, ["0", "1", "2"], "leaked fds");
}

#[tokio::test]
async fn malformed_or_silent_connections_do_not_disturb_the_guest() {
    let g = Guest::start();
    // Garbage JSON in a valid frame: an error reply, then the connection closes.
    let mut s = tokio::net::UnixStream::connect(g.socket()).await.unwrap();
    let body = b"{\"op\":\"exec\",\"spec\":42}";
    let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    frame.push(1);
    frame.extend_from_slice(body);
    s.write_all(&frame).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf).contains("bad_request"));

    // An oversized length and an unknown kind: closed without a reply.
    for bytes in [&[0xffu8, 0xff, 0xff, 0xff, 1][..], &[0, 0, 0, 1, 99][..]] {
        let mut s = tokio::net::UnixStream::connect(g.socket()).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "guest kept a malformed connection open");
    }

    // A silent connection does not block others.
    let _silent = tokio::net::UnixStream::connect(g.socket()).await.unwrap();
    assert_eq!(
        g.client.ping().await.unwrap(),
        burrow_proto::PROTOCOL_VERSION
    );
    let r = g
        .client
        .exec_buffered(sh("echo ok"), None, 1024)
        .await
        .unwrap();
    assert_eq!(r.stdout, b"ok\n");
    let _ = _silent.as_raw_fd();
}

#[tokio::test]
async fn an_unreachable_guest_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let c = burrow_node::guest::GuestClient::new(dir.path().join("none.sock"));
    let e = c.ping().await.unwrap_err();
    assert!(matches!(e, GuestError::Unreachable(_)), "{e:?}");
    // A socket nobody answers on: the ping times out.
    let path = dir.path().join("mute.sock");
    let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let c = burrow_node::guest::GuestClient::new(path);
    let t = Instant::now();
    let e = c.ping().await.unwrap_err();
    assert!(matches!(e, GuestError::Timeout), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn sandbox_processes_cannot_read_the_guests_proc_entries() {
    if !is_root() {
        println!("skipped: needs root to start the guest as an unprivileged uid");
        return;
    }
    // The guest and its children share a uid (as PID 1 and sandbox root do); without
    // PR_SET_DUMPABLE=0 the children could read its environ and fds (K6, K7).
    let g = Guest::start_with(|cmd| {
        std::os::unix::process::CommandExt::uid(cmd, 1000);
        std::os::unix::process::CommandExt::gid(cmd, 1000);
    });
    let guest = g.pid();
    let mut spec = sh(&format!(
        "cat /proc/self/environ >/dev/null && echo own-ok; \
         cat /proc/{guest}/environ >/dev/null 2>&1 && echo environ-readable; \
         ls /proc/{guest}/fd >/dev/null 2>&1 && echo fds-readable; \
         readlink /proc/{guest}/exe >/dev/null 2>&1 && echo exe-readable; true"
    ));
    spec.user = Some("1000".into());
    let r = g.client.exec_buffered(spec, None, 4096).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "own-ok\n");
}

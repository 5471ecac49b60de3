//! The attack list (docs/threat-model.md), run for real: from inside real sandboxes, and against the real API. Each test fails
//! if the protection it names is removed. "Host intact" is checked with host-side sentinels.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use burrow_client::Client;
use burrow_types::{CreateSandbox, ExecRequest};
use common::*;
use reqwest::{Method, StatusCode};

async fn setup() -> Option<(TestServer, Client, String)> {
    if !require_root("starting sandboxes") {
        return None;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let id = c.create(&CreateSandbox::default()).await.unwrap().id;
    Some((srv, c, id))
}

fn unique(tag: &str) -> String {
    format!(
        "burrow-{tag}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    )
}

async fn download(c: &Client, id: &str, path: &str) -> Result<Vec<u8>, burrow_client::ClientError> {
    let resp = c.download(id, path).await?;
    Ok(resp.bytes().await.map(|b| b.to_vec())?)
}

// ---------------------------------------------------------------- Files API

#[tokio::test(flavor = "multi_thread")]
async fn f1_f2_f3_paths_and_symlinks_never_reach_the_host() {
    let Some((_srv, c, id)) = setup().await else {
        return;
    };
    let inside_passwd = run(&c, &id, "cat /etc/passwd").await.stdout;
    let host_passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    assert_ne!(
        inside_passwd, host_passwd,
        "the sandbox's /etc/passwd is the host's"
    );

    // F1: traversal and absolute host paths resolve inside the sandbox.
    for p in [
        "/workspace/../../../../etc/passwd",
        "../../etc/passwd",
        "/../etc/passwd",
    ] {
        let body = download(&c, &id, p).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&body), inside_passwd, "{p}");
    }
    let (status, _) = c
        .raw::<()>(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files?path=%2e%2e%2f%2e%2e%2fetc%2fpasswd"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let host_only = std::env::current_exe().unwrap();
    let err = download(&c, &id, host_only.to_str().unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some("file_not_found"),
        "a host-only path was readable: {err}"
    );

    // F2: symlinks to / and to /proc/1/root made inside lead to the sandbox's own files.
    run(
        &c,
        &id,
        "ln -s / /workspace/r && ln -s /proc/1/root /workspace/p",
    )
    .await;
    for p in ["/workspace/r/etc/passwd", "/workspace/p/etc/passwd"] {
        match download(&c, &id, p).await {
            Ok(body) => assert_eq!(String::from_utf8_lossy(&body), inside_passwd, "{p}"),
            Err(e) => assert!(e.code().is_some(), "{p}: {e}"),
        }
    }
    let name = unique("f2");
    c.upload(&id, &format!("/workspace/r/tmp/{name}"), b"inside".to_vec())
        .await
        .unwrap();
    assert!(
        !std::path::Path::new(&format!("/tmp/{name}")).exists(),
        "write through a symlink landed on the host"
    );
    assert_eq!(
        run(&c, &id, &format!("cat /tmp/{name}")).await.stdout,
        "inside"
    );

    // F3: a symlink swapped in a loop while the API writes through it.
    let sentinel_dir = tempfile::tempdir().unwrap();
    let sentinel = sentinel_dir.path().join("sentinel");
    std::fs::write(&sentinel, "host").unwrap();
    let target = sentinel_dir.path().to_str().unwrap().to_string();
    let swapper = ExecRequest {
        background: true,
        ..sh(&format!(
            "mkdir -p /workspace/real; while true; do ln -sfn {target} /workspace/d; ln -sfn /workspace/real /workspace/d; done"
        ))
    };
    let pid = c.start_process(&id, &swapper).await.unwrap();
    for i in 0..100 {
        let _ = c
            .upload(
                &id,
                "/workspace/d/sentinel",
                format!("sandbox {i}").into_bytes(),
            )
            .await;
    }
    c.kill(&id, pid).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&sentinel).unwrap(),
        "host",
        "the host sentinel changed"
    );
    assert_eq!(std::fs::read_dir(sentinel_dir.path()).unwrap().count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn f5_archives_are_stored_as_they_are_never_extracted() {
    // Every file or link newer than the sandbox's creation, outside the pseudo-filesystems and the
    // read-only /usr.
    const NEWER_FILES: &str = "find / \\( -path /proc -o -path /sys -o -path /dev -o -path /usr \\) -prune -o ! -type d -newer /etc/hostname -print | sort";
    let Some((_srv, c, id)) = setup().await else {
        return;
    };
    // An archive with `../x`, an absolute name and a symlink-then-file pair: burrow has no
    // extraction path, so uploading it must store exactly these bytes as one file and create
    // nothing else, in the sandbox or on the host.
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("evil.tar");
    let script = format!(
        "import tarfile, io\nt = tarfile.open('{}', 'w')\n\
         def add(name, data=b'x', kind=tarfile.REGTYPE, link=''):\n\
         \ti = tarfile.TarInfo(name); i.type = kind; i.linkname = link; i.size = len(data) if kind == tarfile.REGTYPE else 0\n\
         \tt.addfile(i, io.BytesIO(data) if kind == tarfile.REGTYPE else None)\n\
         add('../escape-{tag}')\nadd('/tmp/abs-{tag}')\nadd('l', kind=tarfile.SYMTYPE, link='/etc')\nadd('l/passwd', b'owned')\nt.close()\n",
        tar.display(),
        tag = std::process::id()
    );
    let ok = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(ok.success());
    let bytes = std::fs::read(&tar).unwrap();
    let before = run(&c, &id, NEWER_FILES).await.stdout;
    let stat = c
        .upload(&id, "/workspace/evil.tar", bytes.clone())
        .await
        .unwrap();
    assert_eq!(stat.size, bytes.len() as u64);
    assert_eq!(
        download(&c, &id, "/workspace/evil.tar").await.unwrap(),
        bytes
    );
    let after = run(&c, &id, NEWER_FILES).await.stdout;
    let new: Vec<&str> = after
        .lines()
        .filter(|l| !before.lines().any(|b| b == *l))
        .collect();
    assert_eq!(
        new,
        ["/workspace/evil.tar"],
        "uploading an archive created more than the file"
    );
    assert!(!run(&c, &id, "cat /etc/passwd")
        .await
        .stdout
        .contains("owned"));
    assert!(!std::path::Path::new(&format!("/tmp/abs-{}", std::process::id())).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn f4_special_files_are_refused_without_hanging() {
    let Some((_srv, c, id)) = setup().await else {
        return;
    };
    run(&c, &id, "mkfifo /workspace/fifo").await;
    let sock = c
        .start_process(&id, &ExecRequest {
            background: true,
            ..sh("python3 -c \"import socket,time; s=socket.socket(socket.AF_UNIX); s.bind('/workspace/sock'); s.listen(); time.sleep(600)\"")
        })
        .await
        .unwrap();
    assert!(eventually(10, || true).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for p in [
        "/workspace/fifo",
        "/workspace/sock",
        "/dev/zero",
        "/dev/urandom",
        "/workspace",
    ] {
        let t = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(10), download(&c, &id, p))
            .await
            .expect("download hung")
            .unwrap_err();
        assert!(
            matches!(
                err.code(),
                Some("not_regular_file") | Some("is_a_directory")
            ),
            "{p}: {err}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    // /proc/self/mem is "regular" but unreadable at offset 0: an error, not a hang or host memory.
    let r = tokio::time::timeout(Duration::from_secs(10), download(&c, &id, "/proc/self/mem"))
        .await
        .expect("download hung");
    if let Ok(body) = r {
        assert!(
            body.is_empty(),
            "read {} bytes of /proc/self/mem",
            body.len()
        );
    }
    for p in ["/workspace/fifo", "/dev/zero", "/workspace/sock"] {
        let err = tokio::time::timeout(Duration::from_secs(10), c.upload(&id, p, b"x".to_vec()))
            .await
            .expect("upload hung")
            .unwrap_err();
        assert_eq!(err.code(), Some("not_regular_file"), "{p}: {err}");
    }
    c.kill(&id, sock).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn f6_malformed_paths_and_huge_directories() {
    let Some((_srv, c, id)) = setup().await else {
        return;
    };
    let long = format!("/workspace/{}", "a/".repeat(2500));
    for (path, what) in [
        (
            "/v1/sandboxes/{id}/files?path=%2Fworkspace%2Fa%00b",
            "NUL byte",
        ),
        (
            "/v1/sandboxes/{id}/files?path=%2Fworkspace%2F%ff%fe",
            "invalid UTF-8",
        ),
    ] {
        let (status, body) = c
            .raw::<()>(Method::GET, &path.replace("{id}", &id), None)
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{what}: {}",
            String::from_utf8_lossy(&body)
        );
        let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(e["code"].is_string(), "{what}");
    }
    let err = c.stat(&id, &long).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_path"), "5,000-byte path: {err}");

    // A directory far bigger than a page lists page by page, each name once.
    let n = 100_000;
    let r = py(&c, &id, &format!("import os\nos.mkdir('/tmp/big')\nfor i in range({n}): open(f'/tmp/big/f{{i}}', 'w').close()")).await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = c
            .list_dir(&id, "/tmp/big", cursor.as_deref(), Some(1000))
            .await
            .unwrap();
        assert!(page.entries.len() <= 1000);
        pages += 1;
        for e in page.entries {
            assert!(seen.insert(e.name.clone()), "{} listed twice", e.name);
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), n);
    assert!(pages >= n / 1000);
}

// ---------------------------------------------------------------- Resources

#[tokio::test(flavor = "multi_thread")]
async fn r1_r3_r5_r8_disk_shm_output_and_fds_are_bounded() {
    let Some((srv, c, id)) = setup().await else {
        return;
    };
    // R1: a sparse 1 TB file costs nothing; filling the disk stops at its size; so do inodes.
    let r = run(
        &c,
        &id,
        "truncate -s 1T /workspace/sparse && du -k /workspace/sparse | cut -f1",
    )
    .await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert!(r.stdout.trim().parse::<u64>().unwrap() < 1024);
    let r = py(&c, &id, "import os\nos.mkdir('/workspace/many')\ntry:\n  for i in range(10**7): open(f'/workspace/many/{i}', 'w').close()\nexcept OSError as e: print(e.errno)").await;
    // ENOSPC (28) on an ext4 disk, EDQUOT (122) at a btrfs volume's quota.
    assert!(
        ["28", "122"].contains(&r.stdout.trim()),
        "millions of tiny files did not end in ENOSPC or EDQUOT: {r:?}"
    );
    // On ext4 the image is all the host holds for the sandbox (a btrfs volume's usage is its
    // quota's, checked by the limit above).
    let img = srv.data.join("sandboxes").join(&id).join("disk.img");
    let used = std::fs::metadata(&img)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0);
    assert!(
        used <= 1100 << 20,
        "disk image uses {used} bytes on the host"
    );
    assert_eq!(
        c.exec(&id, &sh("echo still")).await.unwrap().stdout,
        "still\n"
    );

    // R3: /dev/shm is bounded.
    let r = run(
        &c,
        &id,
        "head -c 2000000000 /dev/zero > /dev/shm/fill; echo rc=$?",
    )
    .await;
    assert!(
        !r.stdout.contains("rc=0"),
        "2 GB written to /dev/shm: {r:?}"
    );

    // R5: binary, newline-free output: capped, flagged, decoded lossily.
    let r = run(&c, &id, "head -c 20000000 /dev/urandom").await;
    assert!(r.stdout_truncated && r.truncated);
    assert!(r.stdout.len() >= 10 << 20, "kept {} bytes", r.stdout.len());

    // R8: a million fds stop at RLIMIT_NOFILE.
    let r = py(&c, &id, "import os\nfds = []\ntry:\n  while len(fds) < 10**6: fds.append(os.open('/dev/null', os.O_RDONLY))\nexcept OSError as e:\n  n = len(fds)\n  for f in fds: os.close(f)\n  print(e.errno, n)").await;
    let parts: Vec<u64> = r
        .stdout
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(parts[0], 24, "{r:?}");
    assert!(parts[1] <= 1100, "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn r6_zombies_and_daemons_are_reaped_and_killed_on_destroy() {
    let Some((srv, c, id)) = setup().await else {
        return;
    };
    run(
        &c,
        &id,
        "for i in 1 2 3 4 5; do (sh -c 'exit 0' &) ; done; setsid sh -c 'sleep 600 &' ; sleep 1",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = run(&c, &id, "ps -e -o stat= | grep -c Z || true").await;
    assert_eq!(r.stdout.trim(), "0", "zombies left: {r:?}");
    assert!(run(&c, &id, "ps -e -o comm=")
        .await
        .stdout
        .contains("sleep"));
    c.delete(&id).await.unwrap();
    assert_eq!(host_leftovers(&srv, &id), Vec::<String>::new());
}

// ---------------------------------------------------------------- Kernel surface

/// Calls each syscall with harmless arguments and prints `name errno` (0 = it succeeded).
const PROBE: &str = r#"
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(nr, *a):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(x) if isinstance(x, int) else ctypes.c_char_p(x) for x in a])
    if r == 0 and nr == 56:
        os._exit(0)
    return 0 if r >= 0 else ctypes.get_errno()
def sock(dom, typ, proto=0):
    try:
        socket.socket(dom, typ, proto).close(); return 0
    except OSError as e:
        return e.errno
checks = {
  'mount': lambda: sc(165, b'none', b'/mnt', b'tmpfs', 0, 0),
  'umount2': lambda: sc(166, b'/proc', 2),
  'pivot_root': lambda: sc(155, b'/tmp', b'/tmp'),
  'unshare_user': lambda: sc(272, 0x10000000),
  'unshare_ns': lambda: sc(272, 0x20000),
  'clone_newuser': lambda: sc(56, 0x10000000 | 17, 0, 0, 0, 0),
  'setns': lambda: sc(308, os.open('/proc/self/ns/net', os.O_RDONLY), 0),
  'fsopen': lambda: sc(430, b'tmpfs', 0),
  'open_tree': lambda: sc(428, -100, b'/', 0),
  'move_mount': lambda: sc(429, -100, b'/tmp', -100, b'/mnt', 0),
  'add_key': lambda: sc(248, b'user', b'burrow', b'x', 1, -2),
  'keyctl': lambda: sc(250, 0, -3, 0),
  'request_key': lambda: sc(249, b'user', b'burrow', 0, 0),
  'bpf': lambda: sc(321, 0, 0, 0),
  'perf_event_open': lambda: sc(298, 0, 0, -1, -1, 0),
  'userfaultfd': lambda: sc(323, 0),
  'io_uring_setup': lambda: sc(425, 1, 0),
  'af_alg': lambda: sock(38, 5),
  'af_packet': lambda: sock(17, 3, 0x0300),
  'af_vsock': lambda: sock(40, 1),
  'raw_inet': lambda: sock(2, 3, 1),
  'init_module': lambda: sc(175, 0, 0, b''),
  'kexec_load': lambda: sc(246, 0, 0, 0, 0),
  'reboot': lambda: sc(169, 0xfee1dead, 672274793, 0, 0),
  'swapon': lambda: sc(167, b'/workspace/nothing', 0),
  'settimeofday': lambda: sc(164, 0, 0),
  'acct': lambda: sc(163, 0),
  'iopl': lambda: sc(172, 3),
  'ptrace_pid1': lambda: sc(101, 16, 1, 0, 0),
  'mknod': lambda: sc(133, b'/tmp/mem', 0o20600, (1 << 8) | 1),
}
for name, f in checks.items():
    print(name, f())
"#;

#[tokio::test(flavor = "multi_thread")]
async fn k1_k2_k3_k4_k10_dangerous_syscalls_fail() {
    let Some((_srv, c, id)) = setup().await else {
        return;
    };
    let r = py(&c, &id, PROBE).await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let results: BTreeMap<String, i32> = r
        .stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect();
    assert_eq!(
        results.len(),
        PROBE.matches("': lambda").count(),
        "{}",
        r.stdout
    );
    const EPERM: i32 = 1;
    const ENOSYS: i32 = 38;
    const EACCES: i32 = 13;
    let mut bad = Vec::new();
    for (name, errno) in &results {
        // Socket families the kernel refuses outright (no module) are as good as EPERM.
        let ok =
            [EPERM, ENOSYS, EACCES].contains(errno) || (name.starts_with("af_") && *errno == 97);
        if !ok {
            bad.push(format!("{name} -> errno {errno}"));
        }
    }
    assert!(bad.is_empty(), "not refused: {bad:?}\n{}", r.stdout);

    // K2: only the sandbox's processes are visible; kill -9 -1 hits only them.
    let other = c.create(&CreateSandbox::default()).await.unwrap().id;
    let r = run(&c, &id, "ls /proc | grep -c '^[0-9]'").await;
    assert!(r.stdout.trim().parse::<u32>().unwrap() <= 4, "{r:?}");
    let _ = c.exec(&id, &sh("kill -9 -1; sleep 1")).await;
    c.health().await.unwrap();
    assert_eq!(c.exec(&other, &sh("echo ok")).await.unwrap().stdout, "ok\n");
    assert_eq!(
        c.exec(&id, &sh("echo survived")).await.unwrap().stdout,
        "survived\n",
        "PID 1 died of kill -1"
    );

    // K10: no host devices.
    let r = run(&c, &id, "for d in /dev/mem /dev/kvm /dev/vda /dev/sda /dev/loop0 /dev/loop-control; do [ -e $d ] && echo $d; done; true").await;
    assert_eq!(r.stdout, "", "host devices visible: {}", r.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn k5_k6_every_sandbox_thread_is_confined_and_sees_no_host_paths() {
    let Some((srv, c, id)) = setup().await else {
        return;
    };
    let bg = c
        .start_process(
            &id,
            &ExecRequest {
                background: true,
                ..sh("sleep 600")
            },
        )
        .await
        .unwrap();
    // K5, read from the host: every thread of every process in the sandbox's cgroup.
    let procs =
        std::fs::read_to_string(format!("/sys/fs/cgroup/pids/burrow/{id}/cgroup.procs")).unwrap();
    let pids: Vec<&str> = procs.lines().collect();
    assert!(pids.len() >= 2, "expected the guest and a sleep: {pids:?}");
    const DANGEROUS: &[u32] = &[21, 13, 19, 2, 16]; // SYS_ADMIN, NET_RAW, SYS_PTRACE, DAC_READ_SEARCH, SYS_MODULE
    for pid in &pids {
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            let field = |k: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(k))
                    .map(|l| l[k.len()..].trim().to_string())
                    .unwrap()
            };
            assert_eq!(field("Seccomp:"), "2", "pid {pid}");
            assert_eq!(field("NoNewPrivs:"), "1", "pid {pid}");
            for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
                let caps = u64::from_str_radix(&field(set), 16).unwrap();
                for cap in DANGEROUS {
                    assert_eq!(
                        caps & (1 << cap),
                        0,
                        "pid {pid} has capability {cap} in {set}"
                    );
                }
            }
        }
    }
    // K6, read from inside: fd, cwd, root and exe links of PID 1 and of exec'd processes.
    let r = run(&c, &id, "for p in 1 self $(pgrep sleep); do for l in /proc/$p/fd/* /proc/$p/cwd /proc/$p/root /proc/$p/exe; do readlink $l; done; done 2>/dev/null; true").await;
    let data = srv.data.to_str().unwrap();
    for line in r.stdout.lines() {
        assert!(
            !line.contains(data) && !line.contains("/var/lib/burrow") && !line.contains("target/"),
            "host path visible: {line}"
        );
    }
    assert!(
        r.stdout.contains("/run/burrow/guest") || r.stdout.contains("/usr/bin/sleep"),
        "{}",
        r.stdout
    );
    c.kill(&id, bg).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn k7_k8_k9_guest_binary_proc_and_sys_are_protected() {
    let Some((_srv, c, id)) = setup().await else {
        return;
    };
    let guest = std::path::PathBuf::from(BURROW).with_file_name("burrow-guest");
    let before = std::fs::read(&guest).unwrap();
    let r = run(
        &c,
        &id,
        "echo x >> /proc/1/exe; echo rc=$?; echo x >> /run/burrow/guest; echo rc=$?",
    )
    .await;
    assert!(!r.stdout.contains("rc=0"), "guest binary writable: {r:?}");
    assert!(
        std::fs::read(&guest).unwrap() == before,
        "the host's guest binary changed"
    );

    // The masks themselves, not only their effect (a user namespace already hides some of these).
    let mounts = run(&c, &id, "cat /proc/self/mountinfo").await.stdout;
    let mount_at = |p: &str| {
        mounts
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(p))
            .map(str::to_string)
    };
    // Only what this kernel has (this one is built without kcore, sched_debug and sysrq-trigger).
    let present = |p: &&&str| std::path::Path::new(p).exists();
    for masked in [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
    ]
    .iter()
    .filter(present)
    {
        assert!(
            mount_at(masked).is_some(),
            "{masked} is not masked:\n{mounts}"
        );
    }
    for ro in ["/proc/sys", "/proc/sysrq-trigger", "/proc/bus", "/proc/irq"]
        .iter()
        .filter(present)
    {
        let line = mount_at(ro).unwrap_or_else(|| panic!("{ro} has no read-only mount:\n{mounts}"));
        assert!(
            line.split(' ')
                .nth(5)
                .unwrap_or("")
                .split(',')
                .any(|o| o == "ro"),
            "{ro} is writable: {line}"
        );
    }
    let core_before = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    let r = run(&c, &id, "head -c 16 /proc/kcore | wc -c; cat /proc/keys | wc -c; cat /proc/sched_debug 2>/dev/null | wc -c; \
                          echo c > /proc/sysrq-trigger; echo rc=$?; echo '|/bin/evil' > /proc/sys/kernel/core_pattern; echo rc=$?").await;
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        &lines[..3],
        ["0", "0", "0"],
        "kcore, keys or sched_debug readable: {r:?}"
    );
    assert!(!r.stdout.contains("rc=0"), "{r:?}");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap(),
        core_before
    );

    let r = run(&c, &id, "touch /sys/fs/cgroup/x 2>&1; echo rc=$?; ls /sys/class/net; find /sys/fs/cgroup -name release_agent 2>/dev/null | head -3").await;
    assert!(r.stdout.contains("rc=1"), "sysfs writable: {r:?}");
    let after_rc: Vec<&str> = r
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("rc="))
        .skip(1)
        .collect();
    assert_eq!(
        after_rc.first().copied(),
        Some("lo"),
        "host interfaces visible: {r:?}"
    );
    for ra in after_rc.iter().skip(1) {
        let w = run(&c, &id, &format!("echo /x > {ra}; echo rc=$?")).await;
        assert!(!w.stdout.contains("rc=0"), "{ra} writable");
    }
}

// ---------------------------------------------------------------- API

#[tokio::test(flavor = "multi_thread")]
async fn a1_another_tenant_gets_the_same_404_as_a_random_id() {
    let Some((srv, alice, id)) = setup().await else {
        return;
    };
    alice
        .upload(&id, "/workspace/secret", b"alice's".to_vec())
        .await
        .unwrap();
    let created = alice.create_user("bob", None).await.unwrap();
    let bob = srv.client_with(created["api_key"].as_str().unwrap());
    let random = "zzzzzzzzzzzzzzzzzzzz";
    let exec = serde_json::json!({"cmd": ["rm", "-rf", "/workspace"]});
    for (method, path, body) in [
        (Method::GET, "/v1/sandboxes/{id}", None),
        (Method::POST, "/v1/sandboxes/{id}/exec", Some(&exec)),
        (
            Method::GET,
            "/v1/sandboxes/{id}/files?path=/workspace/secret",
            None,
        ),
        (
            Method::GET,
            "/v1/sandboxes/{id}/files/list?path=/workspace",
            None,
        ),
        (Method::GET, "/v1/sandboxes/{id}/processes", None),
        (Method::DELETE, "/v1/sandboxes/{id}", None),
    ] {
        let theirs = bob
            .raw(method.clone(), &path.replace("{id}", &id), body)
            .await
            .unwrap();
        let nobody = bob
            .raw(method.clone(), &path.replace("{id}", random), body)
            .await
            .unwrap();
        assert_eq!(theirs.0, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(
            theirs, nobody,
            "{method} {path}: another tenant's sandbox is distinguishable"
        );
    }
    let err = bob
        .terminal(&id, 80, 24, None)
        .await
        .err()
        .expect("terminal opened for another tenant");
    assert_eq!(err.code(), Some("sandbox_not_found"));
    assert!(bob.list().await.unwrap().is_empty());
    // Alice's sandbox is untouched.
    assert_eq!(
        download(&alice, &id, "/workspace/secret").await.unwrap(),
        b"alice's"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a5_a6_bodies_that_overreach_or_are_malformed_get_4xx() {
    if !require_root("starting the server") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    for field in ["owner", "limits", "privileged", "host_path"] {
        let body = serde_json::json!({ field: if field == "limits" { serde_json::json!({"memory_mib": 999999}) } else { serde_json::json!("x") } });
        let (status, resp) = c
            .raw(Method::POST, "/v1/sandboxes", Some(&body))
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{field}: {}",
            String::from_utf8_lossy(&resp)
        );
    }
    assert!(
        c.list().await.unwrap().is_empty(),
        "a refused create left a sandbox"
    );

    let http = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        http.post(format!("{}/v1/sandboxes", srv.url))
            .bearer_auth(&srv.key)
            .header("content-type", "application/json")
            .body(body)
    };
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    for (what, body, want) in [
        (
            "truncated",
            b"{\"image\": \"sys".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "wrong type",
            br#"{"image": 7}"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        ("deep nesting", deep.into_bytes(), StatusCode::BAD_REQUEST),
    ] {
        let resp = post(body).send().await.unwrap();
        assert_eq!(resp.status(), want, "{what}");
        let e: serde_json::Value = resp.json().await.unwrap();
        assert!(e["code"].is_string(), "{what}: {e}");
    }
    // 100 MB announced: refused from the headers, without the server reading (or keeping) it all.
    // A raw socket, because an HTTP client cannot read the answer while the server stops reading.
    let head = format!(
        "POST /v1/sandboxes HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        srv.key,
        100u64 << 20
    );
    let answer = raw_http(&srv.url, head.as_bytes(), &[b' '; 2 << 20]).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "100 MB body: {answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    let resp = http
        .get(format!("{}/v1/sandboxes", srv.url))
        .bearer_auth(&srv.key)
        .header("x-big", "a".repeat(1 << 20))
        .send()
        .await;
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    let (status, _) = srv
        .client_with("burrow_wrong")
        .raw::<()>(Method::GET, "/v1/sandboxes", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The server is still healthy after all of it.
    c.health().await.unwrap();
}

/// Sends `head` then as much of `body` as the server takes, and returns what it answers.
async fn raw_http(url: &str, head: &[u8], body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the error body has arrived; the server may keep the connection open after it.
    while !String::from_utf8_lossy(&out).contains("\"message\"") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
